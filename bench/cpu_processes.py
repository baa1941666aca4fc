"""Fine-tuning throughput on a CPU: one process using every core vs one single-thread DDP process per core.

The pipeline's network (tiny nnynet, cross_attention_film after the bottleneck, deep supervision, Dice + Focal +
CE, AdamW) trains on random 64 x 64 x 32 patches with a clinical vector. ours = N DDP processes (``accelerate
launch``, gloo) with 1 thread and 1 patch each; peer = one process with N threads and a batch of 1 (the pipeline
before 2026-12-01) and, as a second row, a batch of N (the same patches per step as ours). Samples per second.

    python bench/cpu_processes.py [--steps 20] [--precision no|bf16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._common import emit  # noqa: E402
from finetune.pipeline import _cores, stage_command  # noqa: E402

PATCH = (64, 64, 32)
CLINICAL = 29  # the embedded phantoms' encoded clinical width


def build(batch: int):
    from finetune.loss import DiceFocalCELoss
    from nny_models.config import NnyNetConfig
    from nny_models.hub import NnyNet
    from nny_models.zoo import resolve_model_kwargs

    kwargs = resolve_model_kwargs("nnynet", "tiny", fusion="cross_attention_film", clinical_features=CLINICAL,
                                  fusion_position="after_bottleneck")  # fmt: skip
    torch.manual_seed(0)
    model = NnyNet(NnyNetConfig(model="nnynet", model_kwargs=kwargs, patch_size=PATCH), deep_supervision=True)
    g = torch.Generator().manual_seed(1)
    batch_data = {"image": torch.randn(batch, 1, *PATCH, generator=g),
                  "label": torch.randint(0, 5, (batch, 1, *PATCH), generator=g),
                  "clinical": torch.randn(batch, CLINICAL, generator=g)}  # fmt: skip
    return model.train(), DiceFocalCELoss(include_background=False), batch_data


def measure(batch: int, steps: int, precision: str, accelerator=None) -> float:
    """Seconds per optimizer step after 3 warm-up steps (the median of ``steps``)."""
    model, loss_fn, data = build(batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if accelerator is not None:
        model, optimizer = accelerator.prepare(model, optimizer)
    times = []
    for i in range(3 + steps):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(data["image"], data["clinical"])
        loss = loss_fn(out, data["label"])
        optimizer.zero_grad(set_to_none=True)
        (accelerator.backward(loss) if accelerator is not None else loss.backward())
        optimizer.step()
        if i >= 3:
            times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def worker(args: argparse.Namespace) -> None:
    """One DDP rank (run under accelerate launch): rank 0 prints its step time as JSON."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, mixed_precision="no")
    step = measure(1, args.steps, args.precision, accelerator)
    if accelerator.is_main_process:
        print(json.dumps({"step_s": step, "processes": accelerator.num_processes, "threads": torch.get_num_threads()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--precision", choices=("no", "bf16"), default="no")
    parser.add_argument("--processes", type=int, default=None, help="default: the cores torch may use")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    cores = args.processes or _cores()
    if cores < 2:
        raise SystemExit("bench/cpu_processes.py: needs at least 2 cores (or --processes 2)")
    torch.set_num_threads(cores)
    one_1 = measure(1, args.steps, args.precision)
    one_n = measure(cores, args.steps, args.precision)
    # the pipeline's own launch command: one single-thread process per core (autocast is set in measure)
    cmd = stage_command([__file__, "--worker", "--steps", str(args.steps), "--precision", args.precision], cores)
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not rows:
        raise SystemExit(f"DDP worker failed ({done.returncode}):\n{done.stderr[-3000:]}")
    ddp = rows[-1]["step_s"]
    device = f"cpu ({cores} cores), precision {args.precision}"
    extra = {"patch": list(PATCH), "steps": args.steps, "step_s_ddp": ddp, "step_s_one_process_batch1": one_1,
             f"step_s_one_process_batch{cores}": one_n}  # fmt: skip
    emit("cpu_processes", "train_samples_per_s", cores / ddp, 1 / one_1,
         f"one process, {cores} threads, batch 1", "higher", None, device, **extra)
    emit("cpu_processes", "train_samples_per_s_same_batch", cores / ddp, cores / one_n,
         f"one process, {cores} threads, batch {cores}", "higher", None, device, **extra)


if __name__ == "__main__":
    main()
