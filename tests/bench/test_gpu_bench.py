"""bench/gpu.py runs end to end at toy sizes on whatever device the suite has (CPU here), and its JSON adds up."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_bench_small_prints_consistent_json_lines():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "bench" / "gpu.py"), "--small", "--volume", "64", "64", "64", "--device", "cpu"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    by_metric = {r["metric"]: r for r in rows if "metric" in r}
    expected = {"train_step_s_64_bf16", "train_samples_per_s_64_bf16", "train_achieved_tflops_64_bf16",
                "train_mfu_64_bf16", "sliding_window_s_per_volume_64x64x64"}  # fmt: skip
    assert expected <= set(by_metric), sorted(by_metric)
    for row in by_metric.values():  # DESIGN.md's fields, ratio = ours / peer
        assert {"bench", "metric", "ours", "peer", "peer_name", "ratio", "better", "target", "device"} <= set(row)
        assert row["bench"] == "gpu" and row["better"] in ("lower", "higher")
        assert row["ours"] > 0 and row["peer"] > 0 and math.isclose(row["ratio"], row["ours"] / row["peer"])
    step, samples = by_metric["train_step_s_64_bf16"], by_metric["train_samples_per_s_64_bf16"]
    tflops, mfu = by_metric["train_achieved_tflops_64_bf16"], by_metric["train_mfu_64_bf16"]
    for who in ("ours", "peer"):
        assert math.isclose(samples[who], step["batch"] / step[who], rel_tol=1e-9)
        assert math.isclose(tflops[who], tflops["flops_per_step"][who] / step[who] / 1e12, rel_tol=1e-9)
        assert math.isclose(mfu[who], tflops[who] / mfu["peak_tflops"], rel_tol=1e-9)
        assert 0 < mfu[who] < 1
    # SwinUNETR's dense decoder does more FLOPs per step than Swin-NeXt's depthwise one
    assert tflops["flops_per_step"]["peer"] > tflops["flops_per_step"]["ours"]
    assert "FLOP/cycle" in mfu["peak_source"] and step["precision"] == "bf16"
    assert any("total_s" in r for r in rows)
