"""bench/cpu_processes.py runs its DDP ranks through accelerate launch and prints ratios that add up."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_cpu_processes_bench_prints_both_comparisons_from_one_ddp_run():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "bench" / "cpu_processes.py"), "--steps", "1", "--processes", "2"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {r["metric"]: r for r in map(json.loads, (line for line in out.stdout.splitlines() if line.startswith("{")))}
    assert set(rows) == {"train_samples_per_s", "train_samples_per_s_same_batch"}
    for row in rows.values():
        assert row["bench"] == "cpu_processes" and row["better"] == "higher"
        assert math.isclose(row["ours"], 2 / row["step_s_ddp"]) and math.isclose(row["ratio"], row["ours"] / row["peer"])
    assert math.isclose(rows["train_samples_per_s"]["peer"], 1 / rows["train_samples_per_s"]["step_s_one_process_batch1"])
    assert math.isclose(rows["train_samples_per_s_same_batch"]["peer"],
                        2 / rows["train_samples_per_s_same_batch"]["step_s_one_process_batch2"])
