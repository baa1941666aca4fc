"""finetune/study.py: the bootstrap on known inputs, the permutation control, the report, and a 2-step grid."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from finetune.study import bootstrap_ci, permuted_clinical, summarize_runs, write_report

ROOT = Path(__file__).resolve().parents[2]


def test_bootstrap_ci_known_inputs():
    constant = bootstrap_ci([0.2] * 7)
    assert constant == {"mean": pytest.approx(0.2), "lo": pytest.approx(0.2), "hi": pytest.approx(0.2), "n": 7}
    # NaN cases are dropped, not counted as zero
    with_nan = bootstrap_ci([0.1, math.nan, 0.3])
    assert with_nan["n"] == 2 and with_nan["mean"] == pytest.approx(0.2)
    assert math.isnan(bootstrap_ci([math.nan])["mean"]) and bootstrap_ci([])["n"] == 0
    # large normal sample: the percentile CI approaches mean +- 1.96 sd / sqrt(n)
    d = np.random.default_rng(1).normal(0.05, 0.1, size=400)
    ci = bootstrap_ci(d, n_boot=4000)
    half = 1.96 * d.std(ddof=1) / math.sqrt(d.size)
    assert ci["mean"] == pytest.approx(d.mean())
    assert ci["lo"] == pytest.approx(d.mean() - half, abs=0.002)
    assert ci["hi"] == pytest.approx(d.mean() + half, abs=0.002)
    # two values 0 and 1: the resampled mean is k/2 with k ~ Binomial(2, 1/2) -> 2.5% and 97.5% quantiles 0 and 1
    ci = bootstrap_ci([0.0, 1.0], n_boot=4000)
    assert (ci["lo"], ci["mean"], ci["hi"]) == (0.0, 0.5, 1.0)


def test_permuted_clinical_keeps_ids_and_moves_every_row(tmp_path):
    src = tmp_path / "clinical.csv"
    table = pd.DataFrame({"case_id": [f"c{i}" for i in range(6)], "age": range(60, 66), "sex": list("MFMFMF")})
    table.to_csv(src, index=False)
    out = pd.read_csv(permuted_clinical(src, tmp_path / "p" / "clinical.csv", seed=3))
    assert list(out["case_id"]) == [f"c{i}" for i in range(6)] and list(out.columns) == ["case_id", "age", "sex"]
    assert sorted(out["age"]) == list(range(60, 66)) and (out["age"] != np.arange(60, 66)).all()
    assert all(sex == "MFMFMF"[age - 60] for age, sex in zip(out["age"], out["sex"]))  # rows move whole


def test_bad_grid_is_refused_before_any_work(tmp_path):
    from finetune.study import main

    for args, match in ((["--fusions", "film"], "fusion must be one of"), (["--models", "resnet"], "--models"),
                        (["--permuted", "none"], "--permuted"), (["--seeds", "1", "1"], "--seeds"),
                        (["--pretrained", "auto"], "--pretrained auto is gone")):
        with pytest.raises(ValueError, match=match):
            main(["--output_dir", str(tmp_path / "s"), *args])
    assert not (tmp_path / "s").exists()


def _run(arm, seed, dice_by_case, fusion="cross_attention", permuted=False, none_at_test=None):
    cases = {"clinical": {c: {"liver": 0.9, "tumor": t} for c, t in dice_by_case.items()}}
    if none_at_test is not None:
        cases["none at test"] = {c: {"liver": 0.9, "tumor": t} for c, t in none_at_test.items()}
    return {"model": "nnynet", "arm": arm, "fusion": fusion, "permuted": permuted, "seed": seed, "cases": cases}


def test_report_table_and_paired_differences(tmp_path):
    runs = []
    for seed, shift in ((0, 0.0), (1, 0.1)):
        runs.append(_run("none", seed, {"a": 0.2 + shift, "b": 0.4 + shift}, fusion="none"))
        runs.append(_run("cross_attention", seed, {"a": 0.5 + shift, "b": 0.5 + shift},
                         none_at_test={"a": 0.3 + shift, "b": math.nan}))
        runs.append(_run("cross_attention_permuted", seed, {"a": 0.3 + shift, "b": 0.3 + shift}, permuted=True))
    summary = summarize_runs(runs, n_boot=500)
    row = next(r for r in summary["rows"] if r["arm"] == "none")
    assert row["classes"]["tumor"]["mean"] == pytest.approx(0.35)  # seeds: 0.3 and 0.4
    assert row["classes"]["tumor"]["std"] == pytest.approx(np.std([0.3, 0.4], ddof=1))
    comp = {c["comparison"]: c for c in summary["comparisons"]}
    # per case (seeds averaged): a: 0.55 - 0.25 = 0.3, b: 0.55 - 0.45 = 0.1
    assert comp["cross_attention - none"]["mean"] == pytest.approx(0.2) and comp["cross_attention - none"]["n"] == 2
    assert comp["cross_attention - cross_attention_permuted"]["mean"] == pytest.approx(0.2)
    assert comp["cross_attention: clinical - none at test"]["n"] == 1  # case b has no defined Dice without clinical

    text = write_report(runs, tmp_path, "Budget: 2 steps.", n_boot=500)
    lines = text.splitlines()
    assert lines[2] == "| model | arm | test clinical | seeds | liver | tumor |"
    assert "| nnynet | none | n/a | 2 | 0.900 ± 0.000 | 0.350 ± 0.071 |" in lines
    assert "| nnynet | cross_attention | none | 2 | 0.900 ± 0.000 | 0.350 ± 0.071 |" in lines
    assert any(line.startswith("| nnynet | cross_attention - none | 2 | +0.200 | [+0.100, +0.300] |") for line in lines)
    saved = json.loads((tmp_path / "study.json").read_text())  # strict JSON
    assert {c["comparison"] for c in saved["comparisons"]} == set(comp)


@pytest.mark.slow
def test_two_step_study_resumes(tmp_path):
    """The whole command at a tiny budget: phantoms, 3 arms x 1 seed fine-tuned as subprocesses (through accelerate
    launch where the batch splits over the cores), report; a rerun trains nothing."""
    from nny_models.phantoms import write_dataset

    train = write_dataset(tmp_path / "train", cases=5, seed=5, preset="test")  # 4 train / 1 val rows
    test = write_dataset(tmp_path / "test", cases=2, seed=6, preset="test")
    args = [sys.executable, "-m", "finetune.study", "--output_dir", str(tmp_path / "study"), "--models", "unet",
            "--seeds", "0", "--steps", "2", "--pretrained", "none", "--data_dir", str(train), "--test_dir", str(test),
            "--patch_size", "32", "32", "32", "--spacing", "6", "6", "6", "--num_workers", "0", "--bootstrap", "200",
            "--batch_size", "2"]  # two DDP processes of one patch each where there are 2 cores (finetune_processes)
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TQDM_DISABLE": "1"}
    first = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert first.stdout.count("$ ") == 3  # none, cross_attention, cross_attention_permuted
    assert first.stdout.count("--size tiny") == 3 and first.stdout.count("--folds 5") == 3  # from scratch; 1 of 5 validates
    from finetune.pipeline import finetune_processes

    assert (first.stdout.count("accelerate.commands.launch --multi_gpu --num_processes 2") == 3) == (
        finetune_processes(None, 2) == 2)  # DDP fine-tuning where the cores allow it
    md = (tmp_path / "study" / "study.md").read_text()
    for row in ("| unet | none | n/a | 1 |", "| unet | cross_attention | patient's | 1 |",
                "| unet | cross_attention | none | 1 |", "| unet | cross_attention_permuted | permuted | 1 |",
                "| unet | cross_attention - none | 2 |", "| unet | cross_attention - cross_attention_permuted | 2 |"):
        assert row in md, (row, md)
    run = tmp_path / "study" / "runs" / "unet_cross_attention_permuted_s0"
    permuted = pd.read_csv(run / "clinical_train_permuted.csv")
    original = pd.read_csv(train / "clinical.csv")
    assert list(permuted["case_id"]) == list(original["case_id"]) and not permuted["age"].equals(original["age"])
    again = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "$ " not in again.stdout


def test_study_defaults_are_the_pipeline_finetune_budget():
    from finetune.pipeline import PipelineConfig, stage_configs
    from finetune.study import StudyConfig

    study, pipe = StudyConfig(), PipelineConfig()
    assert (study.steps, study.patch_size, study.batch_size) == (pipe.finetune_steps, pipe.finetune_patch_size,
                                                                 pipe.finetune_batch)
    assert study.train_cases == pipe.finetune_cases  # generated phantoms: the pipeline's count
    assert study.processes == pipe.finetune_processes  # both pick DDP over the CPU cores alike
    assert (study.fg_class_weights, study.class_weights) == (pipe.fg_class_weights, pipe.class_weights)
    finetune = stage_configs(pipe, Path("out"))["finetune"]
    assert (study.lr, study.encoder_lr_scale) == (finetune["lr"], finetune["encoder_lr_scale"])
    assert study.finetune_precision == pipe.finetune_precision
    assert study.spacing is None and study.hu_window is None  # planned, as the pipeline's fine-tuning does
