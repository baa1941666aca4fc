"""Layering: only the stages import the training engine; inference never imports accelerate; finetune/ never
imports pretrain/ (the pipeline launches pretraining as a process from a run-config JSON)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_finetune_never_imports_pretrain():
    offenders = {p.name: sorted(n for n in _imports(p) if n.split(".")[0] == "pretrain")
                 for p in (ROOT / "finetune").glob("*.py")}  # fmt: skip
    assert not {k: v for k, v in offenders.items() if v}


def test_stages_import_the_shared_engine_not_each_other():
    for stage in ("pretrain/run.py", "finetune/run.py"):
        assert "nny_models.training" in _imports(ROOT / stage), stage
    assert not (ROOT / "pretrain" / "training.py").exists()


def test_import_and_predict_never_import_accelerate(tmp_path):
    code = f"""
import sys, numpy as np, torch
import nny_models
from nny_models.config import NnyNetConfig
from nny_models.zoo import resolve_model_kwargs
model = nny_models.NnyNet(NnyNetConfig(model="unet", model_kwargs=resolve_model_kwargs("unet", "tiny"),
                                       patch_size=(32, 32, 32)))
model.save_pretrained({str(tmp_path)!r})
model = nny_models.NnyNet.from_pretrained({str(tmp_path)!r})
ct = np.full((40, 40, 36), -1000.0, np.float32)  # air, a fat layer, soft tissue and a bone
ct[4:36, 4:36] = -100.0
ct[8:32, 8:32] = 50.0
ct[18:22, 18:22] = 700.0
ct += np.random.default_rng(0).normal(0, 10, ct.shape).astype(np.float32)
mask = nny_models.predict(model, ct, (2.0, 2.0, 2.0))
assert mask.shape == ct.shape, mask.shape
bad = sorted(m for m in sys.modules if m.split(".")[0] == "accelerate" or m.startswith("nny_models.training"))
assert not bad, bad
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
