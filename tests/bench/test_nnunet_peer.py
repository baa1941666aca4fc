"""bench/nnunet_peer.py's pure parts without nnU-Net: data conversion, nnynet's split, the trainer file, the
budget plans, step timing and the JSON rows; the generated trainer is imported by nnU-Net's venv when it exists."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import nnunet_peer as peer
from bench.plan_vs_nnunet import label_map, ras_axes, to_nnunet_raw
from finetune.evaluate import evaluate_case, summarize
from nny_models.clinical import read_clinical_csv
from nny_models.io import discover_cases
from nny_models.phantoms import write_dataset

NNUNET_PYTHON = Path("/tmp/nnunet-venv/bin/python")
EMIT_FIELDS = {"bench", "metric", "ours", "peer", "peer_name", "ratio", "better", "target", "device"}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("peer") / "train", cases=3, seed=5, preset="test")


def test_subset_keeps_first_cases_and_their_clinical_rows_and_converts_to_nnunet_raw(phantoms, tmp_path):
    sub = peer.subset_dataset(phantoms, tmp_path / "sub", 2)
    records = discover_cases(sub)
    ids = sorted(r.case_id for r in discover_cases(phantoms))[:2]
    assert [r.case_id for r in records] == ids and all(Path(r.label).is_file() for r in records)
    table = read_clinical_csv(sub / "clinical.csv", case_ids=ids)  # refuses rows of cases it does not know
    assert sorted(table.index) == ids
    labels = label_map(sub)
    names = json.loads((phantoms / "dataset.json").read_text())["labels"]
    assert labels["background"] == 0 and len(labels) == len(names)
    ds = to_nnunet_raw(sub, tmp_path / "raw", labels)
    assert sorted(p.name for p in (ds / "imagesTr").iterdir()) == [f"{i}_0000.nii.gz" for i in ids]
    assert sorted(p.name for p in (ds / "labelsTr").iterdir()) == [f"{i}.nii.gz" for i in ids]
    meta = json.loads((ds / "dataset.json").read_text())
    assert meta["numTraining"] == 2 and meta["labels"] == labels and meta["channel_names"] == {"0": "CT"}
    with pytest.raises(ValueError, match="no labelled cases"):
        peer.subset_dataset(phantoms, tmp_path / "none", 0)


def test_ours_split_is_a_partition_like_finetune_and_epochs_multiply_to_steps():
    ids = [f"c{i:02d}" for i in range(24)]
    folds = [peer.ours_split(list(reversed(ids)), 5, f, 0) for f in range(5)]
    assert sorted(v for _, val in folds for v in val) == ids  # every case validates once
    for train, val in folds:
        assert not set(train) & set(val) and sorted(train + val) == ids
    assert folds[0] == peer.ours_split(ids, 5, 0, 0) != peer.ours_split(ids, 5, 0, 1)  # order-free, seeded
    assert len(peer.ours_split(ids[:4], 5, 0, 0)[1]) == 1  # fewer cases than folds: as many folds as cases
    for steps in (1, 10, 97, 1000, 1250):
        epochs, per_epoch = peer.epoch_layout(steps)
        assert epochs * per_epoch == steps and per_epoch <= 50
    assert peer.epoch_layout(1000) == (20, 50)
    with pytest.raises(ValueError, match="--steps"):
        peer.epoch_layout(0)


def test_trainer_file_is_written_into_the_package_once(tmp_path, monkeypatch):
    trainer_dir = tmp_path / "site" / "nnunetv2" / "training" / "nnUNetTrainer"
    trainer_dir.mkdir(parents=True)
    (tmp_path / "site" / "nnunetv2" / "__init__.py").write_text("")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "site"))
    path = peer.install_trainer(Path(sys.executable))
    assert path == trainer_dir / f"{peer.TRAINER_NAME}.py" and path.read_text() == peer.TRAINER_SOURCE
    mtime = path.stat().st_mtime_ns
    assert peer.install_trainer(Path(sys.executable)) == path and path.stat().st_mtime_ns == mtime
    code = compile(peer.TRAINER_SOURCE, str(path), "exec")
    assert f"class {peer.TRAINER_NAME}(nnUNetTrainer)" in peer.TRAINER_SOURCE and peer.STEP_TIMES in peer.TRAINER_SOURCE
    assert code.co_filename == str(path)


def _plans() -> dict:
    arch = {"n_stages": 6, "features_per_stage": [32, 64, 128, 256, 320, 320], "kernel_sizes": [[3, 3, 3]] * 6,
            "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5, "n_conv_per_stage": [2] * 6, "n_conv_per_stage_decoder": [2] * 5,
            "conv_op": "torch.nn.modules.conv.Conv3d"}
    cfg = {"data_identifier": "nnUNetPlans_3d_fullres", "batch_size": 2, "patch_size": [64, 128, 128],
           "spacing": [4.0, 2.7, 2.7], "architecture": {"network_class_name": "PlainConvUNet", "arch_kwargs": arch}}
    return {"plans_name": "nnUNetPlans", "transpose_forward": [0, 1, 2],
            "configurations": {"3d_fullres": cfg, "2d": {"batch_size": 40}}}


def test_budget_plans_override_patch_batch_and_topology_on_a_copy():
    plans = _plans()
    before = json.dumps(plans, sort_keys=True)
    patch = [int(v) for v in peer.to_plan_axes([96, 96, 32], plans["transpose_forward"])]
    assert patch == [32, 96, 96]  # SimpleITK order (z, y, x) for an untransposed plan
    topo = {"patch_size": patch, "n_stages": 5, "features_per_stage": [32, 64, 128, 256, 320],
            "kernel_sizes": [[1, 3, 3]] + [[3, 3, 3]] * 4,
            "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
            "n_conv_per_stage": [2] * 5, "n_conv_per_stage_decoder": [2] * 4}
    new = peer.budget_plans(plans, patch, 1, topo, spacing_plan=[4.0, 2.5, 2.5])
    assert json.dumps(plans, sort_keys=True) == before  # the nnU-Net plan itself is untouched
    assert new["plans_name"] == peer.PLANS_NAME and list(new["configurations"]) == ["3d_fullres"]
    cfg = new["configurations"]["3d_fullres"]
    assert cfg["patch_size"] == patch and cfg["batch_size"] == 1 and cfg["spacing"] == [4.0, 2.5, 2.5]
    assert cfg["data_identifier"] == f"{peer.PLANS_NAME}_3d_fullres"
    arch = cfg["architecture"]["arch_kwargs"]
    assert arch["n_stages"] == 5 and arch["strides"] == topo["strides"] and arch["conv_op"].endswith("Conv3d")
    with pytest.raises(ValueError, match="patches would differ"):
        peer.budget_plans(plans, patch, 1, {**topo, "patch_size": [32, 96, 128]})
    for tf in ([0, 1, 2], [2, 1, 0], [1, 0, 2]):  # to_plan_axes inverts plan_vs_nnunet's mapping to RAS
        plan_vals = peer.to_plan_axes([10, 20, 30], tf)
        back = [0] * 3
        for k, axis in enumerate(ras_axes(tf)):
            back[axis] = plan_vals[k]
        assert back == [10, 20, 30]


def test_step_seconds_use_step_to_step_wall_within_epochs():
    # epoch 0: steps start at 0, 2, 4 (1 s of compute each); epoch 1 starts after a 100 s validation gap
    steps = [[0, 0.0, 1.0], [0, 2.0, 3.0], [0, 4.0, 5.0], [1, 105.0, 106.5], [1, 107.0, 108.0]]
    record = {"torch_threads": 2, "steps": steps}
    got = peer.peer_step_seconds(record)
    assert got["s_per_step"] == 2.0 and got["timed_steps"] == 3 and got["compute_s_per_step"] == 1.0
    with pytest.raises(ValueError, match="no train steps"):
        peer.peer_step_seconds({"steps": []})


def test_ours_budget_reads_the_run_and_refuses_missing_fields(tmp_path):
    run = tmp_path / "finetune"
    (run / "model").mkdir(parents=True)
    (run / "run_config.json").write_text(json.dumps({"max_steps": 30, "patch_size": [96, 96, 32], "batch_size": 2,
                                                     "grad_accum": 2, "folds": 5, "fold": 1, "seed": 3}))
    rows = [{"step": 0}, {"step": 1, "samples_per_s": 0.1}] + [{"step": s, "samples_per_s": 4.0} for s in range(2, 5)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert peer.find_run_dir(run / "model") == run
    b = peer.ours_budget(run)
    assert (b["steps"], b["batch_size"], b["fold"], b["seed"], b["s_per_step_rows"]) == (30, 4, 1, 3, 3)
    assert b["s_per_step"] == 1.0  # batch 4 / 4 samples per s; the warm-up row is left out
    (run / "run_config.json").write_text(json.dumps({"max_steps": 30, "batch_size": 1}))
    with pytest.raises(ValueError, match="patch_size"):
        peer.ours_budget(run)
    with pytest.raises(FileNotFoundError, match="--ours_run"):
        peer.find_run_dir(tmp_path / "elsewhere" / "model")


def _summary(preds: list[np.ndarray], gts: list[np.ndarray]) -> dict:
    names = ["background", "liver", "tumor"]
    return summarize([evaluate_case(p, g, (1.0, 1.0, 1.0), names, case_id=str(i))
                      for i, (p, g) in enumerate(zip(preds, gts))])


def test_rows_compare_each_class_and_step_time_and_say_whether_the_budget_matched():
    gt = np.zeros((16, 16, 16), np.int64)
    gt[2:12, 2:12, 2:12], gt[4:6, 4:6, 4:6] = 1, 2
    ours = _summary([gt], [gt])
    worse = gt.copy()
    worse[2:7] = 0  # peer loses half the liver and the tumor
    peer_s = _summary([worse], [gt])
    setup = {"budget_matched": False, "steps": 10, "patch_size": [96, 96, 32], "batch_size": 1,
             "ours": {"timing_source": "metrics.jsonl"}}
    rows = peer.assemble_rows({"test": {"ours": ours, "peer": peer_s}}, 0.5, 2.0, setup, "cpu (test)")
    by = {r["metric"]: r for r in rows}
    assert rows[-1]["metric"] == "setup" and rows[-1]["budget_matched"] is False
    for name in ("dice_liver_test", "dice_tumor_test", "mean_dice_test", "train_step_s"):
        row = by[name]
        assert EMIT_FIELDS <= set(row) and row["budget_matched"] is False and row["steps"] == 10
    liver = by["dice_liver_test"]
    assert liver["ours"] == 1.0 and 0 < liver["peer"] < 1 and math.isclose(liver["ratio"], 1.0 / liver["peer"])
    assert by["dice_tumor_test"]["peer"] == 0.0 and by["dice_tumor_test"]["ratio"] is None  # no division by 0
    assert by["train_step_s"]["ratio"] == 0.25 and by["train_step_s"]["better"] == "lower"
    small = by["lesion_detection_rate_small_test"]
    assert small["ours"] == 1.0 and small["peer"] == 0.0
    json.dumps(rows, allow_nan=False)  # valid JSON: NaN (no large lesions) became null
    assert by["lesion_detection_rate_large_test"]["ours"] is None


def test_main_prints_an_error_json_not_numbers(tmp_path, capsys):
    assert peer.main(["--data", str(tmp_path / "missing"), "--ours", str(tmp_path / "model")]) == 1
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(out) == 1 and out[0]["metric"] == "error" and "--ours_run" in out[0]["error"]
    assert "ours" not in out[0] and "ratio" not in out[0]


def test_main_says_when_nnunet_is_missing_before_any_slow_work(tmp_path, capsys):
    run = tmp_path / "finetune"
    (run / "model").mkdir(parents=True)
    (run / "run_config.json").write_text(json.dumps({"max_steps": 30, "patch_size": [96, 96, 32], "batch_size": 1}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 2, "samples_per_s": 1.0}) + "\n")
    for d in ("train", "test"):
        (tmp_path / "data" / d).mkdir(parents=True)
    argv = ["--data", str(tmp_path / "data"), "--ours", str(run / "model"), "--nnunet_bin", str(tmp_path / "none")]
    assert peer.main(argv) == 1
    (out,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert out["stage"] == "find nnU-Net" and str(tmp_path / "none" / "python") in out["error"]


@pytest.mark.skipif(not NNUNET_PYTHON.is_file(), reason="no nnU-Net benchmark venv at /tmp/nnunet-venv")
def test_generated_trainer_imports_in_nnunet_and_checks_its_budget(tmp_path):
    (tmp_path / "nnynet_budget_trainer.py").write_text(peer.TRAINER_SOURCE)
    code = (f"import nnynet_budget_trainer as t\n"
            f"from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer\n"
            f"assert issubclass(t.{peer.TRAINER_NAME}, nnUNetTrainer)\n"
            "try:\n    t._env_int('NNYNET_PEER_STEPS', 1)\nexcept RuntimeError as e:\n    print('refused', e)\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1", "nnUNet_raw": str(tmp_path),
           "nnUNet_preprocessed": str(tmp_path), "nnUNet_results": str(tmp_path)}
    out = subprocess.run([str(NNUNET_PYTHON), "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "refused NNYNET_PEER_STEPS must be an integer >= 1" in out.stdout
