"""GPU readiness in one command: Swin-NeXt (nnynet) fs48 vs MONAI SwinUNETR fs48, bf16, one JSON line per comparison.

    python bench/gpu.py                      # one GPU: under 8 minutes (--budget_s guards the optional parts)
    python bench/gpu.py --peak_tflops 989    # a device missing from PEAK_BF16_TFLOPS
    python bench/gpu.py --small              # CPU or GPU at toy sizes (the test suite runs this, in seconds)

Measures, per input size (96^3 and 128^3, batch 2, bf16 autocast, AdamW):
- training step: s/it, samples/s, achieved TFLOP/s (FLOPs of one forward + backward counted by
  torch.utils.flop_counter.FlopCounterMode), MFU = achieved / the device's dense bf16 peak, peak memory
  (torch.cuda.max_memory_allocated during the step; CPU: not measured);
- the same with torch.compile (at the first size only, to stay in budget; off with --no_compile);
- sliding-window inference seconds per 512x512x300 volume (ROI 96, overlap 0.5, 4 windows per batch, bf16);
- with more than one GPU, a 2-process DDP training step (NCCL) against the 1-process step.
Goals of issue 14: MFU >= 35% at 96^3; fs48 at 128^3 batch 2 under 40 GB.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import cpu_peak_flops, device_name, emit, time_it  # noqa: E402
from nny_models.zoo import create_model  # noqa: E402

OURS, PEER = "nnynet", "swinunetr"

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s. Matched in order against
# torch.cuda.get_device_name(), so the more specific names come first.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("B200", 2250.0),
    ("H200", 989.0),  # SXM; H200 NVL 835
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H800", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
    ("RTX 6000 Ada", 364.0),
]


def peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    """(peak dense bf16 TFLOP/s, where the figure comes from)."""
    if override:
        return override, "--peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_BF16_TFLOPS:
            if key in name:
                return value, f"data sheet ({key}, dense bf16)"
        return None, f"unknown device {name!r}: pass --peak_tflops"
    flops, how = cpu_peak_flops(torch.bfloat16)
    return flops / 1e12, how


def build(name: str, fs: int, small: bool, device: torch.device) -> torch.nn.Module:
    kwargs = {"feature_size": fs}
    if small:
        kwargs["window_size"] = 4  # the CPU "tiny" presets' windows
    return create_model(name, "base", in_channels=1, out_channels=5, **kwargs).to(device)


def step_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    """One bf16-autocast forward + cross-entropy + backward + AdamW step (fp32 master weights)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=x.device.type == "cuda")
    model.train()

    def step() -> None:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def count_flops(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    model.train()
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(x.device.type, dtype=torch.bfloat16):
        torch.nn.functional.cross_entropy(model(x).float(), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def measure_training(name: str, size: int, args, device, compiled: bool) -> dict:
    torch.manual_seed(0)
    model = build(name, args.feature_size, args.small, device)
    x = torch.randn(args.batch, 1, size, size, size, device=device)
    y = torch.randint(0, 5, (args.batch, size, size, size), device=device)
    flops = count_flops(model, x, y)
    run = torch.compile(model) if compiled else model
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    step = step_fn(run, x, y)
    step()  # the first step compiles / autotunes; excluded from the timing
    first = time.perf_counter() - start
    s_it = time_it(step, device, warmup=args.warmup, repeats=args.iters)
    peak_gb = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del model, run, step
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"s_it": s_it, "samples_s": args.batch / s_it, "tflops": flops / s_it / 1e12, "flops": flops,
            "peak_gb": peak_gb, "first_step_s": first}  # fmt: skip


def sliding_window_seconds(name: str, args, device) -> float:
    from nny_models.inference import sliding_window_probs

    torch.manual_seed(0)
    model = build(name, args.feature_size, args.small, device).eval()
    x = torch.rand(1, 1, *args.volume, device=device) * 2 - 1
    roi = (args.roi,) * 3

    def run() -> None:
        with torch.inference_mode():
            sliding_window_probs(model, x, roi, overlap=0.5, sw_batch_size=4, device=device, amp=True)

    return time_it(run, device, warmup=1 if device.type == "cuda" else 0, repeats=1)


def _ddp_worker(rank: int, world: int, size: int, args, queue) -> None:
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("nccl", rank=rank, world_size=world)
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(build(OURS, args.feature_size, False, device), device_ids=[rank])
    x = torch.randn(args.batch, 1, size, size, size, device=device)
    y = torch.randint(0, 5, (args.batch, size, size, size), device=device)
    s_it = time_it(step_fn(model, x, y), device, warmup=args.warmup + 1, repeats=args.iters)
    if rank == 0:
        queue.put(s_it)
    dist.destroy_process_group()


def ddp_step_seconds(size: int, args) -> float:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_ddp_worker, args=(2, size, args, queue), nprocs=2, start_method="spawn", join=True)
    return queue.get()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true", help="toy sizes: fs12, 64^3, batch 1, 4^3 windows, no compile")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="training cube sides (default 96 128)")
    p.add_argument("--batch", type=int, default=None, help="default 2 (1 with --small)")
    p.add_argument("--feature_size", type=int, default=None, help="default 48 (12 with --small)")
    p.add_argument("--iters", type=int, default=None, help="timed steps, median (default 10; 1 with --small)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps after the first (default 3; 0 --small)")
    p.add_argument("--volume", type=int, nargs=3, default=None, help="sliding-window volume (default 512 512 300)")
    p.add_argument("--roi", type=int, default=None, help="sliding-window ROI (default 96; 64 with --small)")
    p.add_argument("--peak_tflops", type=float, default=None, help="the device's dense bf16 peak, TFLOP/s")
    p.add_argument("--no_compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--budget_s", type=float, default=420.0, help="skip optional rows once this much time is used")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    small = args.small
    args.sizes = args.sizes or ([64] if small else [96, 128])
    args.batch = args.batch or (1 if small else 2)
    args.feature_size = args.feature_size or (12 if small else 48)
    args.iters = args.iters or (1 if small else 10)
    args.warmup = args.warmup if args.warmup is not None else (0 if small else 3)
    args.volume = tuple(args.volume or ((96, 80, 64) if small else (512, 512, 300)))
    args.roi = args.roi or (64 if small else 96)
    compile_rows = not args.no_compile and not small  # CPU compile needs a C++ toolchain and minutes
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    t_start = time.perf_counter()
    peak, peak_source = peak_tflops(device, args.peak_tflops)
    dev = device_name(device)
    peer_name = f"MONAI SwinUNETR (feature_size {args.feature_size})"
    common = {"batch": args.batch, "feature_size": args.feature_size, "precision": "bf16", "small": small,
              "peak_tflops": peak, "peak_source": peak_source}  # fmt: skip

    def over_budget(what: str) -> bool:
        used = time.perf_counter() - t_start
        if used > args.budget_s:
            print(f'{{"bench": "gpu", "skipped": "{what}", "reason": "budget {args.budget_s:.0f} s used ({used:.0f} s)"}}',
                  flush=True)  # fmt: skip
            return True
        return False

    for i, size in enumerate(args.sizes):
        for compiled in ([False, True] if compile_rows and i == 0 else [False]):
            if (compiled or i > 0) and over_budget(f"training {size}^3 compile={compiled}"):
                continue
            res = {n: measure_training(n, size, args, device, compiled) for n in (OURS, PEER)}
            o, q = res[OURS], res[PEER]
            tag = {**common, "input": f"{args.batch}x1x{size}^3", "compile": compiled,
                   "first_step_s": {"ours": o["first_step_s"], "peer": q["first_step_s"]}}  # fmt: skip
            suffix = f"{size}_bf16" + ("_compiled" if compiled else "")
            emit("gpu", f"train_step_s_{suffix}", o["s_it"], q["s_it"], peer_name, "lower", None, dev, **tag)
            emit("gpu", f"train_samples_per_s_{suffix}", o["samples_s"], q["samples_s"], peer_name, "higher", None,
                 dev, **tag)  # fmt: skip
            emit("gpu", f"train_achieved_tflops_{suffix}", o["tflops"], q["tflops"], peer_name, "higher", None, dev,
                 flops_per_step={"ours": o["flops"], "peer": q["flops"]}, **tag)  # fmt: skip
            if peak:
                target = ">= 0.35" if size == 96 and not small else None
                emit("gpu", f"train_mfu_{suffix}", o["tflops"] / peak, q["tflops"] / peak, peer_name, "higher",
                     target, dev, **tag)  # fmt: skip
            if o["peak_gb"] is not None:
                target = "< 40 GB" if size == 128 and args.batch == 2 and args.feature_size == 48 else None
                emit("gpu", f"train_peak_memory_gb_{suffix}", o["peak_gb"], q["peak_gb"], peer_name, "lower", target,
                     dev, memory="torch.cuda.max_memory_allocated", **tag)  # fmt: skip

    if not over_budget("sliding window"):
        t = {n: sliding_window_seconds(n, args, device) for n in (OURS, PEER)}
        windows = math.prod(1 if n <= args.roi else math.ceil((n - args.roi) / (args.roi * 0.5)) + 1 for n in args.volume)
        emit("gpu", "sliding_window_s_per_volume_" + "x".join(map(str, args.volume)), t[OURS], t[PEER],
             peer_name + " + the same sliding_window_probs", "lower", None, dev, roi=args.roi, overlap=0.5,
             sw_batch_size=4, windows=windows, **common)  # fmt: skip

    if device.type == "cuda" and torch.cuda.device_count() > 1 and not over_budget("ddp"):
        size = args.sizes[0]
        one = measure_training(OURS, size, args, device, False)["s_it"]
        two = ddp_step_seconds(size, args)
        emit("gpu", f"ddp2_train_step_s_{size}_bf16", two, one, "the same model, 1 process / 1 GPU", "lower", None,
             dev, processes=2, per_gpu_batch=args.batch, **common)  # fmt: skip
    elif device.type == "cuda":
        print('{"bench": "gpu", "skipped": "ddp", "reason": "one GPU visible"}', flush=True)
    print(f'{{"bench": "gpu", "total_s": {time.perf_counter() - t_start:.1f}}}', flush=True)


if __name__ == "__main__":
    main()
