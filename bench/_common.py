"""Shared helpers for bench/*.py: timing and the one-JSON-object-per-line output of DESIGN.md."""

from __future__ import annotations

import json
import time
from typing import Callable

import torch


def device_name(device: torch.device | str) -> str:
    """Human-readable name of the device a figure was measured on."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


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
