"""Shared helpers for bench/*.py: timing and the one-JSON-object-per-line output of DESIGN.md."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch


def device_name(device: torch.device | str) -> str:
    """Human-readable name of the device a figure was measured on."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({_cpu_model() or platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _cpu_model() -> str | None:
    """The CPU's model name on Linux ("AMD EPYC", "Intel(R) Xeon(R) ..."): hosts change, and with them the figures."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_it(fn: Callable[[], object], device: torch.device | str, *, warmup: int = 1, repeats: int = 3) -> float:
    """Median wall-clock seconds of ``fn()`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def emit(
    bench: str,
    metric: str,
    ours: float,
    peer: float,
    peer_name: str,
    better: str,
    target: str | None,
    device: str,
    **extra: object,
) -> dict:
    """Print one comparison as a JSON line; ratio = ours / peer."""
    if better not in ("lower", "higher"):
        raise ValueError(f"better must be 'lower' or 'higher', got {better!r}")
    row = {
        "bench": bench,
        "metric": metric,
        "ours": ours,
        "peer": peer,
        "peer_name": peer_name,
        "ratio": (ours / peer) if peer else None,
        "better": better,
        "target": target,
        "device": device,
        **extra,
    }
    print(json.dumps(row), flush=True)
    return row


def cpu_peak_flops(dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s of this machine's CPUs for ``dtype`` matmuls, how it was computed).

    peak = logical CPUs torch may use x clock (GHz from /proc/cpuinfo "cpu MHz") x FLOPs per cycle and core:
    bf16 with AMX (amx_bf16): 1024 (Intel's figure for one AMX unit per core); bf16 with AVX512-BF16 only: 128 (2 FMA units x 32 bf16 lanes x 2);
    fp32 with AVX-512: 64 (2 FMA units x 16 lanes x 2); AVX2: 32. Logical CPUs may be hyperthreads of
    fewer physical cores (a VM does not say), so the real ceiling can be lower: MFU is a lower bound.
    """
    import os
    from pathlib import Path

    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    flags = set()
    mhz = 0.0
    for line in info.splitlines():
        if line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
        if line.startswith("cpu MHz") and not mhz:
            mhz = float(line.split(":", 1)[1])
    cores = min(torch.get_num_threads(), os.cpu_count() or 1)
    ghz = mhz / 1000 if mhz else 2.0
    if dtype == torch.bfloat16 and "amx_bf16" in flags:
        per_cycle, isa = 1024, "AMX-BF16"
    elif dtype == torch.bfloat16 and "avx512_bf16" in flags:
        per_cycle, isa = 128, "AVX512-BF16"
    elif "avx512f" in flags:
        per_cycle, isa = 64, "AVX-512 FMA fp32"
    else:
        per_cycle, isa = 32, "AVX2 FMA fp32"
    if dtype != torch.bfloat16 and per_cycle > 64:
        per_cycle, isa = 64, "AVX-512 FMA fp32"
    peak = cores * ghz * 1e9 * per_cycle
    return peak, f"{cores} logical CPUs x {ghz:.2f} GHz x {per_cycle} FLOP/cycle ({isa}) = {peak / 1e9:.0f} GFLOP/s"
