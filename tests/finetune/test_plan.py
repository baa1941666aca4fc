"""--plan in fine-tuning: what the plan sets, what flags override, and that predict replays it from config.json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from finetune.run import FinetuneConfig, preprocess_config
from nny_models.config import NnyNetConfig, PreprocessConfig
from nny_models.planning import CTNormalization, Plan

REPO = Path(__file__).resolve().parents[2]
NORM = CTNormalization(clip_low=-20.0, clip_high=250.0, mean=100.0, std=40.0, foreground="label > 0")


def _plan() -> Plan:
    return Plan(task="segmentation", spacing=(2.5, 2.5, 4.0), normalization=NORM, patch_size=(96, 96, 32),
                batch_size=1, median_shape=(120, 100, 50), anisotropic=False, memory_budget_voxels=96 * 96 * 32,
                divisor=32, fingerprint={})  # fmt: skip


def test_plan_sets_spacing_and_normalization_and_flags_win():
    source = NnyNetConfig(preprocessing=PreprocessConfig(spacing=(3.0, 3.0, 4.0), hu_window=(-200.0, 300.0)).to_dict())
    planned = preprocess_config(FinetuneConfig(), source, _plan())
    assert planned.spacing == (2.5, 2.5, 4.0) and planned.normalization == NORM.to_dict()  # the plan beats the export
    window = preprocess_config(FinetuneConfig(hu_window=(-200, 300)), source, _plan())
    assert window.normalization is None and window.hu_window == (-200.0, 300.0)  # a fixed window replaces the z-score
    assert preprocess_config(FinetuneConfig(spacing=(2, 2, 2)), source, _plan()).spacing == (2.0, 2.0, 2.0)


def test_planned_normalization_is_the_foreground_zscore_and_air_pads():
    from nny_models.preprocessing import preprocess_volume

    cfg = PreprocessConfig(spacing=(2.0, 2.0, 2.0), normalization=NORM.to_dict(), crop_foreground=False)
    hu = np.full((20, 20, 20), 100.0, dtype=np.float32)
    hu[:5] = -1000.0  # air
    hu[-5:] = 1000.0  # bone, above the clip
    out, _ = preprocess_volume(hu, np.diag([2.0, 2.0, 2.0, 1.0]), cfg)
    values = np.unique(np.round(out.numpy(), 4))
    assert set(values) == {round((-20 - 100) / 40, 4), 0.0, round((250 - 100) / 40, 4)}
    assert cfg.air_value == pytest.approx((-20 - 100) / 40)
    assert PreprocessConfig(hu_window=(-200.0, 300.0)).air_value == -1.0  # the window maps air to out_range's low end


def test_finetune_plans_by_default_and_predict_replays_the_plan(tmp_path):
    """A 1-step fine-tune with no spacing/window/patch flags: plan.json is written, config.json holds its
    preprocessing, and nnynet-predict on a training image runs with exactly that preprocessing."""
    from nny_models.phantoms import write_dataset

    data = write_dataset(tmp_path / "data", cases=3, seed=5, preset="test")
    out = tmp_path / "ft"
    cmd = [sys.executable, str(REPO / "finetune/run.py"), "--data_dir", str(data), "--output_dir", str(out),
           "--max_steps", "1", "--val_every", "0", "--num_workers", "0", "--folds", "2", "--fusion", "none"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "1", **_env()})
    assert done.returncode == 0, done.stderr[-3000:]
    plan = Plan.load(out / "plan.json")
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["preprocessing"]["normalization"] == plan.normalization.to_dict()
    assert config["preprocessing"]["spacing"] == list(plan.spacing)
    assert config["patch_size"] == list(plan.patch_size) and config["plan"]["task"] == "segmentation"
    assert json.loads((out / "run_config.json").read_text())["patch_size"] == list(plan.patch_size)

    image = next((data / "imagesTr").glob("*.nii.gz"))
    mask = tmp_path / "mask.nii.gz"
    predicted = subprocess.run([sys.executable, "-m", "nny_models.cli", "--model", str(out / "model"), "--input",
                                str(image), "--output", str(mask)], capture_output=True, text=True, timeout=600,
                               env={"OMP_NUM_THREADS": "1", **_env()}, cwd=REPO)  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert nib.load(mask).shape == nib.load(image).shape


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}


def test_a_patch_size_the_network_cannot_take_names_the_flag(tmp_path):
    from finetune.run import main
    from nny_models.phantoms import write_dataset

    data = write_dataset(tmp_path / "data", cases=3, seed=6, preset="test")
    # both refused before the cache is built (minutes on a real dataset), not at the first training step
    for patch, why in (("48", "multiple of 32"), ("32", "bottleneck of more than one voxel")):
        out = tmp_path / f"ft{patch}"
        expected = rf"--patch_size \[{patch}, {patch}, {patch}\] \(from --patch_size\): .*{why}"
        with pytest.raises(ValueError, match=expected):
            main(["--data_dir", str(data), "--output_dir", str(out), "--patch_size", patch, patch, patch,
                  "--max_steps", "1", "--num_workers", "0", "--folds", "2", "--fusion", "none"])
        assert not (out / "cache").exists() or not any((out / "cache").iterdir())


def test_resume_refuses_another_stage_s_saved_plan(tmp_path):
    from nny_models.training.plan import PLAN_FILE, run_plan

    class MainFirst:  # the accelerator part run_plan uses
        @staticmethod
        def main_process_first():
            import contextlib

            return contextlib.nullcontext()

    _plan().save(tmp_path / PLAN_FILE)
    assert run_plan("auto", tmp_path, tmp_path, task="segmentation", resume=True, accelerator=MainFirst()) == _plan()
    with pytest.raises(ValueError, match=r"a 'segmentation' plan; this stage trains with a 'pretraining'"):
        run_plan("auto", tmp_path, tmp_path, task="pretraining", resume=True, accelerator=MainFirst())
