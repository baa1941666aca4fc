"""bench/train_step.py times every variant and prints ratios that add up."""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))


def test_train_step_bench_compares_ours_with_the_defaults_and_each_ablation(one_thread):
    import train_step

    rows = train_step.main(["--steps", "2", "--block", "1", "--threads", "1", "--precision", "fp32"])
    metrics = [r["metric"] for r in rows]
    assert metrics == ["train_step_s"] + [f"train_step_s_without_{f}" for f in train_step.FIXES]
    step_s = rows[0]["step_s"]
    assert set(step_s) == {"ours", "peer"} | {f"without_{f}" for f in train_step.FIXES}
    assert all(v > 0 for v in step_s.values())
    for row in rows:
        assert row["ours"] == step_s["ours"] and math.isclose(row["ratio"], row["ours"] / row["peer"])
    assert rows[0]["peer"] == step_s["peer"]
