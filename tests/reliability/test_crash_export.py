"""kill -9 during fine-tuning's export leaves OUTPUT_DIR/model complete: weights, config.json and the card
of one and the same export (the old or the new one), never a README alone or a card beside other weights.

The child kills itself at each point inside the second export (card written, weights written, everything
written but not swapped in, swapped in but the old copy not yet deleted), then at a random moment."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHILD = str(ROOT / "tests" / "reliability" / "_export_loop.py")


def _check_complete(out: Path) -> int:
    """The step of the export in ``out``, after checking that weights, config.json and card all belong to it."""
    from nny_models.hub import NnyNet

    model = NnyNet.from_pretrained(out)  # loads: weights and config.json are there and agree
    k = model.config.metrics["step"]
    assert model.config.metrics["mean_foreground_dice"] == k / 1000
    values = {float(v) for t in model.state_dict().values() if t.is_floating_point() for v in t.unique()}
    assert values == {float(k)}, f"weights of another export than config.json's step {k}"
    assert f"- step: {k}\n" in (out / "README.md").read_text()  # the card of the same export
    assert json.loads((out / "config.json").read_text())["metrics"]["step"] == k
    return k


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


@pytest.mark.parametrize("point, expected", [("card", 1), ("weights", 1), ("before_swap", 1), ("after_swap", 2)])
def test_kill9_inside_an_export_leaves_the_old_or_the_new_one(tmp_path, point, expected):
    out = tmp_path / "model"
    proc = subprocess.run([sys.executable, CHILD, str(out)], env=_env(KILL_POINT=point, KILL_AT="2"),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert proc.stdout.split() == ["1"]  # export 1 completed, export 2 was killed inside
    assert _check_complete(out) == expected


def test_kill9_at_random_moments(tmp_path):
    out = tmp_path / "model"
    rng = random.Random(0)
    for _ in range(2):
        proc = subprocess.Popen([sys.executable, CHILD, str(out)], env=_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)  # fmt: skip
        assert proc.stdout.readline().strip() == "1", "the export loop did not start"
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        _check_complete(out)
