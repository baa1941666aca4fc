"""Swin-NeXt (nnynet) against MONAI SwinUNETR at equal feature_size 48 (one JSON line per comparison).

Both networks get the same input (batch x 1 x S^3), the same torch thread count, out_channels=5 and an
AdamW optimizer. Per input size S it reports: training step time (forward + backward + AdamW step),
inference time (eval, inference_mode), parameter counts and peak memory of a training step (CPU: growth of
peak RSS over the RSS before the first step, the smaller of two fresh subprocesses per model; CUDA: growth of
torch.cuda.max_memory_allocated over the memory allocated before the step). On CUDA it also reports the
bf16 (autocast) training throughput and the achieved TFLOP/s, with FLOPs of one step counted by
torch.utils.flop_counter.FlopCounterMode.

Timing: warmup, then the two models' runs are interleaved (ours, peer, ours, peer, ...) and the median of
--repeats runs is reported, so that load from other processes hits both alike; each timing line also
carries the median process CPU time (time.process_time, all threads), which contention inflates less.
Depthwise convs use nny_models.swin_next's fast CPU path (PyTorch's own is ~100x slower in backward).

Both precisions on every device: fp32 and bf16 autocast (CPU: AMX / AVX512-BF16 when the CPU has them), plus
ours-bf16 over ours-fp32, and achieved FLOP/s (FlopCounterMode FLOPs of one forward + backward / step time) as a
fraction of the machine's peak (CPU: logical CPUs x clock x FLOPs/cycle, bench/_common.cpu_peak_flops).

CPU: S = 64. CUDA: S = 96 and 128. Target: nnynet training step <= 0.6x SwinUNETR's on CPU at 64^3.
Run: python bench/models.py [--threads N] [--repeats R] [--sizes 64 96]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import cpu_peak_flops, device_name, emit, sync  # noqa: E402
from nny_models.zoo import create_model  # noqa: E402

OURS, PEER = "nnynet", "swinunetr"
PEER_NAME = "MONAI SwinUNETR (feature_size 48)"


def build(name: str, device: torch.device) -> torch.nn.Module:
    return create_model(name, "base", feature_size=48, in_channels=1, out_channels=5).to(device)


def train_step_fn(model: torch.nn.Module, x: torch.Tensor, bf16: bool = False):
    """One forward + backward + AdamW step; returns the closure."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(x).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def infer_fn(model: torch.nn.Module, x: torch.Tensor, bf16: bool = False):
    model.eval()

    def run() -> None:
        with torch.inference_mode(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            model(x)

    return run


def step_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one training forward + backward (the optimizer step is negligible and not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    model.train()
    counter = FlopCounterMode(display=False)
    with counter:
        model(x).float().square().mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def cpu_peak_rss_child(name: str, size: int, batch: int, threads: int) -> None:
    """Subprocess body: peak RSS growth (MB) of two training steps, printed as JSON."""
    import resource

    import psutil

    torch.set_num_threads(threads)
    model = build(name, torch.device("cpu"))
    x = torch.randn(batch, 1, size, size, size)
    step = train_step_fn(model, x)
    base = psutil.Process().memory_info().rss
    step()
    step()  # the second step holds AdamW state as well
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"peak_mb": (peak - base) / 2**20}))


def cpu_peak_rss(name: str, size: int, batch: int, threads: int, runs: int = 2) -> float:
    """Smallest peak RSS growth over ``runs`` fresh subprocesses (allocator noise only ever inflates it)."""
    cmd = [sys.executable, __file__, "--_rss_child", name, "--sizes", str(size), "--batch", str(batch),
           "--threads", str(threads)]  # fmt: skip
    # A fixed glibc mmap threshold: tensors >= 1 MiB are mmapped and returned on free, so RSS follows live
    # memory. With the default dynamic threshold the same step measured 2.1-3.1 GB from run to run.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    peaks = []
    for _ in range(runs):
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        peaks.append(json.loads(out.strip().splitlines()[-1])["peak_mb"])
    return min(peaks)


def time_interleaved(fns: dict[str, object], device: torch.device, warmup: int, repeats: int) -> dict:
    """Median wall and CPU (process) seconds per fn, calling the fns in turn so that both see the same load."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in fns}


def measure(size: int, batch: int, device: torch.device, args: argparse.Namespace) -> dict[str, dict]:
    """All figures for OURS and PEER at one input size."""
    # CPU memory first, while this process holds nothing big (fresh subprocesses either way).
    rss = {n: cpu_peak_rss(n, size, batch, args.threads) for n in (OURS, PEER)} if device.type == "cpu" else {}
    torch.manual_seed(0)
    models = {name: build(name, device) for name in (OURS, PEER)}
    x = torch.randn(batch, 1, size, size, size, device=device)
    res: dict[str, dict] = {n: {"params_m": sum(p.numel() for p in m.parameters()) / 1e6} for n, m in models.items()}
    w, r = args.warmup, args.repeats
    runs = {
        "train": {n: train_step_fn(m, x) for n, m in models.items()},
        "infer": {n: infer_fn(m, x) for n, m in models.items()},
    }
    # bf16 autocast on CPU too: AMX / AVX512-BF16 Xeons run it natively (the custom depthwise kernels follow autocast)
    runs["bf16_train"] = {n: train_step_fn(m, x, bf16=True) for n, m in models.items()}
    runs["bf16_infer"] = {n: infer_fn(m, x, bf16=True) for n, m in models.items()}
    for kind, fns in runs.items():
        for name, (wall, cpu) in time_interleaved(fns, device, w, r).items():
            res[name][f"{kind}_s"] = wall
            res[name][f"{kind}_cpu_s"] = cpu
    for name, model in models.items():
        if device.type == "cuda":
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()  # both models' weights and earlier optimizer states
            train_step_fn(model, x)()  # a fresh optimizer: the growth includes AdamW state creation
            res[name]["peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            res[name]["peak_mb"] = rss[name]
        res[name]["flops"] = step_flops(model, x)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="cube sides (default 64 CPU, 96 128 CUDA)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 1 CPU, 2 CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch threads for both models (default: all cores)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per model, interleaved; medians reported")
    p.add_argument("--_rss_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    device = torch.device(args.device)
    args.threads = args.threads or os.cpu_count() or 1
    args.batch = args.batch or (2 if device.type == "cuda" else 1)
    args.sizes = args.sizes or ([96, 128] if device.type == "cuda" else [64])
    if args._rss_child:
        cpu_peak_rss_child(args._rss_child, args.sizes[0], args.batch, args.threads)
        return
    torch.set_num_threads(args.threads)  # the same for both models (and their RSS subprocesses)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    dev = device_name(device)

    for size in args.sizes:
        res = measure(size, args.batch, device, args)
        ours, peer = res[OURS], res[PEER]
        tag = {"input": f"{args.batch}x1x{size}^3", "threads": torch.get_num_threads()}

        def line(metric: str, key: str, better: str, target: str | None = None, **extra) -> None:
            emit("models", metric, ours[key], peer[key], PEER_NAME, better, target, dev, **tag, **extra)

        target = "<= 0.6 (ratio)" if device.type == "cpu" else None
        cpu_time = {"ours": ours["train_cpu_s"], "peer": peer["train_cpu_s"]}
        line(f"train_step_s_{size}", "train_s", "lower", target, dtype="float32", process_cpu_s=cpu_time)
        cpu_time = {"ours": ours["infer_cpu_s"], "peer": peer["infer_cpu_s"]}
        line(f"inference_s_{size}", "infer_s", "lower", dtype="float32", process_cpu_s=cpu_time)
        line(f"params_millions_{size}", "params_m", "lower")
        kind = "cuda max_memory_allocated growth" if device.type == "cuda" else "peak RSS growth (subprocess)"
        line(f"train_peak_memory_mb_{size}", "peak_mb", "lower", memory=kind)
        line(f"train_step_s_{size}_bf16", "bf16_train_s", "lower", target, dtype="bfloat16 (autocast)")
        line(f"inference_s_{size}_bf16", "bf16_infer_s", "lower", dtype="bfloat16 (autocast)")
        emit("models", f"train_step_bf16_over_fp32_{size}", ours["bf16_train_s"], ours["train_s"],
             "nnynet, the same step in fp32", "lower", None, dev, **tag)  # fmt: skip
        voxels = args.batch * size**3
        peaks = {"fp32": peak_flops(device, torch.float32), "bf16": peak_flops(device, torch.bfloat16)}
        for r in (ours, peer):
            r["bf16_vox_s"] = voxels / r["bf16_train_s"]
            r["bf16_infer_vox_s"] = voxels / r["bf16_infer_s"]
            for prec, key in (("fp32", "train_s"), ("bf16", "bf16_train_s")):
                r[f"{prec}_tflops"] = r["flops"] / r[key] / 1e12
                r[f"{prec}_peak_frac"] = r["flops"] / r[key] / peaks[prec][0] if peaks[prec][0] else None
        line(f"bf16_train_throughput_voxels_per_s_{size}", "bf16_vox_s", "higher", dtype="bfloat16")
        line(f"bf16_inference_throughput_voxels_per_s_{size}", "bf16_infer_vox_s", "higher", dtype="bfloat16")
        flops = {"ours": ours["flops"], "peer": peer["flops"]}
        for prec in ("fp32", "bf16"):
            line(f"{prec}_train_achieved_tflops_{size}", f"{prec}_tflops", "higher", dtype=prec, flops_per_step=flops,
                 peak_tflops=None if peaks[prec][0] is None else peaks[prec][0] / 1e12, peak_source=peaks[prec][1])
            if peaks[prec][0]:
                line(f"{prec}_train_fraction_of_peak_{size}", f"{prec}_peak_frac", "higher", dtype=prec,
                     peak_source=peaks[prec][1])


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float | None, str]:
    """(peak FLOP/s, how it was computed): CPU from cores x clock x FLOPs/cycle, CUDA bf16 from bench/gpu.py's table."""
    if device.type == "cpu":
        return cpu_peak_flops(dtype)
    if dtype == torch.bfloat16:
        from bench.gpu import peak_tflops

        tflops, source = peak_tflops(device, None)
        return (None if tflops is None else tflops * 1e12), source
    return None, "no fp32 peak table for GPUs"


if __name__ == "__main__":
    main()
