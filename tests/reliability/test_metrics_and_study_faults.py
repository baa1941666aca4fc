"""Evaluation metrics and the study's tools on hand-made volumes whose answers are known.

finetune/evaluate.py against MONAI's metric classes and the field's definitions (HD95 in mm on anisotropic
grids, empty sides, absent classes, one-voxel and touching lesions, the 7 mL line, bad labels / dtypes, strict
JSON, the Markdown matching the summary); finetune/study.py's bootstrap edge cases, a missing seed, a crashed
run's folder and a truncated study_eval.json; finetune/figures.py on NaN images and numpy scalars.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from finetune.evaluate import evaluate_case, lesion_metrics, summarize, summarize_lesions, write_reports
from finetune.study import (
    NO_CLINICAL,
    bootstrap_ci,
    load_eval,
    run_state,
    summarize_runs,
    write_report,
)

NAMES = ["background", "liver", "tumor", "portal_vein"]
TUMOR = ["background", "liver", "tumor"]


def _strict_json(text: str):
    """json.loads that fails on the NaN / Infinity tokens Python's json writes by default."""
    def refuse(token: str):
        raise AssertionError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def _blobs() -> tuple[np.ndarray, np.ndarray]:
    """Irregular liver / tumor / portal-vein shapes, a prediction that disagrees on every class."""
    rng = np.random.default_rng(0)
    x, y, z = np.meshgrid(np.arange(24), np.arange(20), np.arange(12), indexing="ij")
    gt = np.zeros((24, 20, 12), np.int64)
    gt[((x - 12) / 9) ** 2 + ((y - 10) / 7) ** 2 + ((z - 6) / 4) ** 2 < 1] = 1
    gt[(x - 14) ** 2 + (y - 9) ** 2 + 4 * (z - 6) ** 2 < 10] = 2
    gt[3:6, 15:18, 2:9] = 3
    pred = np.roll(gt, (1, -1, 1), axis=(0, 1, 2))
    flip = rng.random(gt.shape) < 0.03
    pred[flip] = rng.integers(0, 4, flip.sum())
    return pred, gt


# ----------------------------------------------------------------------------- per-case metrics


def test_per_case_metrics_equal_monai_metric_classes_on_an_anisotropic_grid():
    from monai.metrics import ConfusionMatrixMetric, DiceMetric, HausdorffDistanceMetric, MeanIoU

    pred, gt = _blobs()
    spacing = (0.7, 0.9, 2.5)
    m = evaluate_case(pred, gt, spacing, NAMES)
    p, g = (torch.nn.functional.one_hot(torch.as_tensor(a), 4).permute(3, 0, 1, 2)[None].float() for a in (pred, gt))
    dice = DiceMetric(include_background=False, reduction="none")(p, g)[0]
    iou = MeanIoU(include_background=False, reduction="none")(p, g)[0]
    hd = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")(p, g, spacing=spacing)[0]
    cm = ConfusionMatrixMetric(include_background=False, metric_name=["accuracy", "precision", "recall"],
                               reduction="none")
    cm(p, g)
    acc, prec, rec = (t[0] for t in cm.aggregate())
    for c, name in enumerate(NAMES[1:]):
        row = m["classes"][name]
        assert row["dice"] == pytest.approx(float(dice[c]), abs=1e-6)
        assert row["iou"] == pytest.approx(float(iou[c]), abs=1e-6)
        assert row["hd95"] == pytest.approx(float(hd[c]), rel=1e-5)
        assert row["accuracy"] == pytest.approx(float(acc[c]), abs=1e-6)
        assert row["precision"] == pytest.approx(float(prec[c]), abs=1e-6)
        assert row["recall"] == pytest.approx(float(rec[c]), abs=1e-6)
        assert (row["gt_voxels"], row["pred_voxels"]) == (int((gt == c + 1).sum()), int((pred == c + 1).sum()))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_hd95_is_in_mm_along_each_axis(axis: int):
    spacing = (0.7, 0.9, 2.5)
    gt = np.zeros((16, 16, 16), np.int64)
    gt[4:9, 4:9, 4:9] = 1
    pred = np.roll(gt, 2, axis=axis)  # every surface voxel moves 2 voxels along one axis
    row = evaluate_case(pred, gt, spacing, TUMOR)["classes"]["liver"]
    assert row["hd95"] == pytest.approx(2 * spacing[axis], rel=1e-5)  # mm, not 2 voxels


def test_one_voxel_lesions_hd95_dice_and_volume():
    spacing = (1.0, 2.0, 3.0)
    gt = np.zeros((8, 8, 8), np.int64)
    gt[2, 2, 2] = 2
    pred = np.zeros_like(gt)
    pred[3, 3, 3] = 2  # one voxel diagonally off: no overlap, corner-adjacent
    m = evaluate_case(pred, gt, spacing, TUMOR)
    tumor = m["classes"]["tumor"]
    assert tumor["hd95"] == pytest.approx(math.sqrt(1 + 4 + 9), rel=1e-6)
    assert (tumor["dice"], tumor["precision"], tumor["recall"]) == (0.0, 0.0, 0.0)
    # 1 voxel of 6 mm^3 = 0.006 mL; overlap (not adjacency) decides detection
    assert m["lesions"] == [{"volume_ml": pytest.approx(0.006), "detected": False, "dice": 0.0}]
    assert m["predicted_lesions"] == [{"volume_ml": pytest.approx(0.006), "true_positive": False}]
    hit = evaluate_case(gt, gt, spacing, TUMOR)
    assert hit["classes"]["tumor"]["hd95"] == 0.0 and hit["lesions"][0] == {"volume_ml": pytest.approx(0.006),
                                                                            "detected": True, "dice": 1.0}
    # a one-voxel lesion on the volume's corner is its own surface
    corner = np.zeros_like(gt)
    corner[0, 0, 0] = 2
    assert evaluate_case(corner, corner, spacing, TUMOR)["classes"]["tumor"]["hd95"] == 0.0


def test_empty_sides_absent_classes_and_how_the_means_treat_them(tmp_path):
    base = np.zeros((12, 12, 12), np.int64)
    base[1:7, 1:7, 1:7] = 1  # liver everywhere, identical
    gt_only, pred_only = base.copy(), base.copy()
    gt_only[8:10, 8:10, 8:10] = 2  # a tumor the prediction misses
    pred_only[8:10, 8:10, 8:10] = 2  # a tumor that is not there
    missed = evaluate_case(base, gt_only, (1, 1, 1), NAMES, case_id="missed")
    alarm = evaluate_case(pred_only, base, (1, 1, 1), NAMES, case_id="alarm")
    clean = evaluate_case(base, base, (1, 1, 1), NAMES, case_id="clean")
    nothing = evaluate_case(np.zeros_like(base), np.zeros_like(base), (1, 1, 1), NAMES, case_id="empty")

    t = missed["classes"]["tumor"]  # ground truth only: nothing predicted, so precision is 0/0
    assert (t["dice"], t["iou"], t["recall"]) == (0.0, 0.0, 0.0) and math.isnan(t["precision"])
    assert math.isnan(t["hd95"])
    t = alarm["classes"]["tumor"]  # prediction only: recall 0/0
    assert (t["dice"], t["iou"], t["precision"]) == (0.0, 0.0, 0.0) and math.isnan(t["recall"])
    assert math.isnan(t["hd95"])
    for case in (clean, nothing):  # absent from both: NaN everywhere but accuracy (all true negatives)
        t = case["classes"]["tumor"]
        assert all(math.isnan(t[k]) for k in ("dice", "iou", "hd95", "precision", "recall")) and t["accuracy"] == 1.0
    # per case: the mean skips absent classes; a case with nothing at all has no mean
    assert missed["mean_dice"] == pytest.approx(0.5) and clean["mean_dice"] == 1.0
    assert math.isnan(nothing["mean_dice"]) and math.isnan(nothing["miou"])

    s = summarize([missed, alarm, clean, nothing])
    tumor, vein = s["per_class"]["tumor"], s["per_class"]["portal_vein"]
    assert (tumor["n_evaluated"], tumor["n_absent"], tumor["hd95_undefined"]) == (2, 2, 2)
    assert tumor["dice_mean"] == 0.0 and tumor["precision_mean"] == 0.0 and tumor["recall_mean"] == 0.0
    assert math.isnan(tumor["hd95_mean"])
    # absent cases are skipped in the accuracy mean too (it used to average in their accuracy of 1)
    acc = 1 - 8 / base.size
    assert tumor["accuracy_mean"] == pytest.approx(acc)
    assert vein["n_absent"] == 4 and math.isnan(vein["accuracy_mean"]) and math.isnan(vein["dice_mean"])
    # summary mean Dice: per case over its scored classes, then over the 3 cases that have any
    assert s["n_cases_scored"] == 3 and s["mean_dice"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)

    paths = write_reports([missed, alarm, clean, nothing], s, tmp_path)
    data = _strict_json(paths["json"].read_text())
    assert data["summary"]["per_class"]["portal_vein"]["accuracy_mean"] is None
    assert data["per_case"][3]["mean_dice"] is None
    csv = pd.read_csv(paths["csv"])
    assert csv.query("case_id == 'missed' and `class` == 'tumor'")["precision"].isna().item()


def test_lesions_touching_at_a_corner_are_one_26_connected_lesion():
    gt = np.zeros((12, 12, 12), np.int64)
    gt[1:4, 1:4, 1:4] = 2
    gt[4:6, 4:6, 4:6] = 2  # shares only the corner (3,3,3)-(4,4,4) with the first cube
    gt[8:10, 8:10, 8:10] = 2  # two voxels apart from the second: a lesion of its own
    truth, predicted = lesion_metrics(gt, gt, (1.0, 1.0, 1.0), 2)
    assert sorted(r["volume_ml"] for r in truth) == [pytest.approx(0.008), pytest.approx(0.035)]
    assert len(predicted) == 2 and all(r["true_positive"] for r in predicted)

    # one predicted blob covering two separate lesions counts whole against each of them
    gt = np.zeros((12, 12, 12), np.int64)
    gt[1:3, 1:3, 1:3] = 2
    gt[5:7, 1:3, 1:3] = 2
    pred = np.zeros_like(gt)
    pred[1:7, 1:3, 1:3] = 2  # 24 voxels bridging both 8-voxel lesions
    truth, predicted = lesion_metrics(pred, gt, (1.0, 1.0, 1.0), 2)
    assert [r["dice"] for r in truth] == [pytest.approx(2 * 8 / (8 + 24))] * 2
    assert all(r["detected"] for r in truth) and len(predicted) == 1


def test_the_7_ml_line_is_exact_for_any_voxel_size():
    spacing = (0.8, 0.7, 1.0)  # 0.56 mm^3: 12500 voxels are exactly 7000 mm^3 = 7 mL
    gt = np.zeros((50, 25, 12), np.int64)
    gt[:50, :25, :10] = 2  # 12500 voxels
    (row,), _ = lesion_metrics(gt, gt, spacing, 2)
    assert row["volume_ml"] == 7.0  # float products alone give 6.999999999999999, a "small" lesion
    smaller = gt.copy()
    smaller[0, 0, 0] = 0
    (small,), _ = lesion_metrics(smaller, smaller, spacing, 2)
    groups = summarize_lesions([{"lesions": [row, small]}])
    assert groups["large (>= 7 mL)"]["n_lesions"] == 1 and groups["small (< 7 mL)"]["n_lesions"] == 1
    # rows read back from an older metrics.json with the rounding error are classed alike
    old = summarize_lesions([{"lesions": [{"volume_ml": 6.999999999999999, "detected": True, "dice": 1.0}]}])
    assert old["large (>= 7 mL)"]["n_lesions"] == 1


def test_labels_beyond_the_label_map_and_non_integer_labels_are_refused():
    gt = np.zeros((6, 6, 6), np.int64)
    gt[1:3, 1:3, 1:3] = 1
    bad = gt.copy()
    bad[4, 4, 4] = 4  # the map has 3 labels (0..2)
    with pytest.raises(ValueError, match=r"labels outside 0\.\.2.*found \[4\]"):
        evaluate_case(bad, gt, (1, 1, 1), TUMOR)
    with pytest.raises(ValueError, match="gt has labels outside"):
        evaluate_case(gt, bad, (1, 1, 1), TUMOR)
    huge = gt.astype(np.uint64)
    huge[0, 0, 0] = 2**63 + 1  # would wrap to a negative int64 (or a valid label) after a blind cast
    with pytest.raises(ValueError, match="labels outside"):
        evaluate_case(huge, gt, (1, 1, 1), TUMOR)
    for value, match in ((np.nan, "NaN"), (1.5, "integer labels"), (np.inf, "NaN or Inf")):
        f = gt.astype(np.float32)
        f[0, 0, 0] = value
        with pytest.raises(ValueError, match=match):
            evaluate_case(f, gt, (1, 1, 1), TUMOR)
    with pytest.raises(ValueError, match="integer labels"):
        evaluate_case(gt.astype(str), gt, (1, 1, 1), TUMOR)
    with pytest.raises(ValueError, match="labels outside"):
        evaluate_case(-gt.astype(np.int8), gt, (1, 1, 1), TUMOR)


def test_prediction_dtype_and_container_do_not_change_the_metrics():
    pred, gt = _blobs()
    pred = np.minimum(pred, 2)
    gt = np.minimum(gt, 2)
    want = evaluate_case(pred, gt, (0.7, 0.9, 2.5), TUMOR)
    variants = [pred.astype(np.uint8), pred.astype(np.uint16), pred.astype(">i2"), pred.astype(np.float32),
                pred.astype(np.float16), torch.as_tensor(pred, dtype=torch.int8),
                torch.as_tensor(pred, dtype=torch.float32).requires_grad_(), torch.as_tensor(pred).bfloat16()]
    for variant in variants:
        got = evaluate_case(variant, gt.astype(np.uint8), (0.7, 0.9, 2.5), TUMOR)
        assert got == want, type(variant)
    mask = (gt == 1)
    assert evaluate_case(mask, mask.astype(np.int64), (1, 1, 1), ["background", "liver"])["mean_dice"] == 1.0
    for shape_bad in (pred[:, :, :-1], pred[None], pred.transpose(1, 0, 2)):
        with pytest.raises(ValueError, match="shape"):
            evaluate_case(shape_bad, gt, (1, 1, 1), TUMOR)


def test_spacing_and_label_names_are_checked():
    gt = np.zeros((4, 4, 4), np.int64)
    for spacing in ((1.0, math.nan, 1.0), (1.0, 0.0, 1.0), (1.0, -1.0, 1.0), (1.0, math.inf, 1.0), (1.0, 1.0)):
        with pytest.raises(ValueError, match="spacing"):
            evaluate_case(gt, gt, spacing, TUMOR)
    with pytest.raises(ValueError, match="distinct"):
        evaluate_case(gt, gt, (1, 1, 1), ["background", "tumor", "tumor"])


def test_markdown_prints_the_summary_means_and_json_stays_strict(tmp_path):
    pred, gt = _blobs()
    cases = [evaluate_case(pred, gt, (0.7, 0.9, 2.5), NAMES, case_id="a"),
             evaluate_case(gt, gt, (0.7, 0.9, 2.5), NAMES, case_id="b"),
             evaluate_case(np.where(pred == 3, 0, pred), np.where(gt == 3, 0, gt), (1, 1, 1), NAMES, case_id="c")]
    cases[0]["classes"]["liver"]["dice"] = np.float32(cases[0]["classes"]["liver"]["dice"])  # a numpy scalar
    s = summarize(cases)
    paths = write_reports(cases, s, tmp_path)
    md = paths["md"].read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in md.splitlines() if re.match(r"\| (liver|tumor|portal_vein) \|", line)}
    metrics = ["dice", "iou", "hd95", "accuracy", "precision", "recall"]
    for name, cells in rows.items():
        stats = s["per_class"][name]
        for metric, cell in zip(metrics, cells):
            d = 2 if metric == "hd95" else 4
            assert cell == f"{stats[f'{metric}_mean']:.{d}f} ± {stats[f'{metric}_std']:.{d}f}", (name, metric)
        assert cells[-1] == f"{stats['n_evaluated']} ({stats['n_absent']}, {stats['hd95_undefined']})"
    assert rows["portal_vein"][-1] == "2 (1, 0)"
    assert f"Mean foreground Dice: **{s['mean_dice']:.4f}**, mIoU: **{s['miou']:.4f}**" in md
    data = _strict_json(paths["json"].read_text())
    assert data["summary"]["mean_dice"] == pytest.approx(s["mean_dice"])
    assert not list(tmp_path.glob(".*.tmp"))  # written aside and renamed


def test_summarize_refuses_cases_with_other_classes():
    gt = np.zeros((4, 4, 4), np.int64)
    a = evaluate_case(gt, gt, (1, 1, 1), TUMOR)
    b = evaluate_case(gt, gt, (1, 1, 1), ["background", "liver"])
    with pytest.raises(ValueError, match="classes"):
        summarize([a, b])


# ----------------------------------------------------------------------------- the study


def test_bootstrap_ci_with_one_case_identical_values_and_bad_arguments():
    one = bootstrap_ci([0.3])
    assert one["mean"] == 0.3 and one["n"] == 1 and math.isnan(one["lo"]) and math.isnan(one["hi"])
    same = bootstrap_ci([0.1] * 3)  # the mean of three 0.1 is 0.10000000000000002
    assert same["lo"] == same["mean"] == same["hi"] and same["n"] == 3
    assert bootstrap_ci([0.1, None, 0.3, math.inf])["n"] == 2  # None (JSON null) and Inf are undefined cases
    for kwargs, match in (({"n_boot": 0}, "n_boot"), ({"n_boot": 2.5}, "n_boot"), ({"level": 1.0}, "level")):
        with pytest.raises(ValueError, match=match):
            bootstrap_ci([0.1, 0.2], **kwargs)
    ci = bootstrap_ci([0.0, 0.2, 0.4, 0.9], n_boot=500)
    assert ci["lo"] <= ci["mean"] <= ci["hi"]


def test_bootstrap_zero_is_refused_before_any_work(tmp_path):
    from finetune.study import main

    with pytest.raises(ValueError, match="--bootstrap"):
        main(["--output_dir", str(tmp_path / "s"), "--bootstrap", "0"])
    assert not (tmp_path / "s").exists()


def _run(arm: str, seed: int, tumor: dict[str, float | None], fusion: str = "cross_attention",
         permuted: bool = False) -> dict:
    return {"model": "unet", "arm": arm, "fusion": fusion, "permuted": permuted, "seed": seed,
            "cases": {"clinical": {c: {"liver": 0.9, "tumor": t} for c, t in tumor.items()}}}


def test_a_missing_seed_is_paired_out_and_reported(tmp_path):
    runs = [_run("none", 0, {"a": 0.2, "b": 0.4}, fusion="none"),
            _run("none", 1, {"a": 0.3, "b": 0.5}, fusion="none"),
            _run("cross_attention", 0, {"a": 0.5, "b": None})]  # seed 1 crashed; case b undefined (JSON null)
    summary = summarize_runs(runs, n_boot=200)
    seeds = {r["arm"]: r["seeds"] for r in summary["rows"]}
    assert seeds == {"none": 2, "cross_attention": 1}
    (comp,) = summary["comparisons"]
    # only seed 0 is on both sides, only case a is defined there: one case, no CI
    assert comp["seeds"] == 1 and comp["n"] == 1 and comp["mean"] == pytest.approx(0.3)
    assert math.isnan(comp["lo"]) and math.isnan(comp["hi"])
    text = write_report(runs, tmp_path, "note")
    assert "| unet | cross_attention - none | 1 | +0.300 | [n/a, n/a] | 1 |" in text
    assert "| unet | cross_attention | patient's | 1 | 0.900 | 0.500 |" in text  # one seed: no std
    saved = _strict_json((tmp_path / "study.json").read_text())
    assert saved["comparisons"][0]["lo"] is None


def test_run_state_tells_finished_crashed_and_fresh_runs_apart(tmp_path):
    want = {"model": "unet", "fusion": "none", "seed": 0, "max_steps": 100}
    run = tmp_path / "run"
    assert run_state(run, want) == "fresh"
    (run / "checkpoints" / "step_0000050").mkdir(parents=True)
    assert run_state(run, want) == "resume"  # crashed before any export
    (run / "model").mkdir()
    (run / "model" / "config.json").write_text("{}")  # an intermediate best export (--val_every)
    (run / "metrics.jsonl").write_text('{"step": 50, "loss": 1.0}\n{"step": 60, "lo')  # truncated last line
    assert run_state(run, want) == "resume"
    (run / "checkpoints" / "step_0000100").mkdir()
    assert run_state(run, want) == "done"
    for path in sorted((run / "checkpoints").iterdir()):
        path.rmdir()
    assert run_state(run, want) == "fresh"  # exported at step 50, no checkpoint left: train again
    (run / "metrics.jsonl").write_text('{"step": 100, "loss": 0.5, "val_dice": 0.4}\n')
    assert run_state(run, want) == "done"  # the last step's row is logged after the final export
    (run / "run_config.json").write_text(json.dumps({**want, "max_steps": 300}))
    with pytest.raises(ValueError, match="max_steps 300 \\(asked 100\\)"):
        run_state(run, want)
    orphan = tmp_path / "orphan"  # finished checkpoints, export deleted: --resume would export nothing
    (orphan / "checkpoints" / "step_0000100").mkdir(parents=True)
    with pytest.raises(ValueError, match="no model/ export"):
        run_state(orphan, want)


def test_load_eval_rejects_truncated_stale_and_foreign_files(tmp_path):
    path = tmp_path / "study_eval.json"
    good = {"clinical": {"a": {"tumor": 0.5}, "b": {"tumor": None}}, NO_CLINICAL: {"a": {"tumor": 0.4},
                                                                                   "b": {"tumor": 0.1}}}
    conditions, ids = {"clinical", NO_CLINICAL}, {"a", "b"}
    assert load_eval(path, conditions, ids) is None  # missing
    path.write_text(json.dumps(good)[:40])
    assert load_eval(path, conditions, ids) is None  # truncated by a kill
    path.write_text(json.dumps(good))
    assert load_eval(path, conditions, ids) == good
    assert load_eval(path, {"clinical"}, ids) is None  # made for another arm
    assert load_eval(path, conditions, {"a", "b", "c"}) is None  # another test set
    path.write_text(json.dumps({**good, "clinical": {"a": {"tumor": "x"}, "b": {"tumor": 1}}}))
    assert load_eval(path, conditions, ids) is None


def _fake_study(tmp_path: Path, monkeypatch, fail_on: str | None = None) -> tuple[list[list[str]], list[str]]:
    """finetune.study.main with the fine-tunes and evaluations replaced by fakes that write what they would."""
    import finetune.study as study
    import nny_models.io
    from nny_models.io import CaseRecord

    for part in ("train", "test"):
        (tmp_path / part).mkdir(exist_ok=True)
        pd.DataFrame({"case_id": ["a", "b", "c"], "age": [50, 60, 70]}).to_csv(tmp_path / part / "clinical.csv",
                                                                              index=False)
    records = [CaseRecord(c, f"/x/{c}.nii.gz", f"/x/{c}_seg.nii.gz") for c in ("a", "b", "c")]
    monkeypatch.setattr(nny_models.io, "discover_cases", lambda source: records)
    commands: list[list[str]] = []
    evaluated: list[str] = []

    def fake_run(cmd, check, cwd):
        commands.append(cmd)
        out = Path(cmd[cmd.index("--output_dir") + 1])
        if fail_on and out.name == fail_on:
            raise subprocess.CalledProcessError(1, cmd)
        (out / "model").mkdir(parents=True, exist_ok=True)
        (out / "model" / "config.json").write_text("{}")
        (out / "checkpoints" / "step_0000004").mkdir(parents=True, exist_ok=True)

    def fake_eval(model_dir, test_dir, clinical_csv, *, no_clinical):
        evaluated.append(model_dir.parent.name)
        fused = "_none_" not in model_dir.parent.name
        conditions = ["clinical"] + ([NO_CLINICAL] if fused and no_clinical else [])
        return {c: {case: {"liver": 0.9, "tumor": 0.5 + 0.1 * i} for i, case in enumerate("abc")}
                for c in conditions}

    monkeypatch.setattr(study.subprocess, "run", fake_run)
    monkeypatch.setattr(study, "evaluate_run", fake_eval)
    args = ["--output_dir", str(tmp_path / "study"), "--models", "unet", "--seeds", "0", "1", "--steps", "4",
            "--data_dir", str(tmp_path / "train"), "--test_dir", str(tmp_path / "test"), "--bootstrap", "50",
            "--batch_size", "1", "--processes", "1", "--num_workers", "0"]
    study.main(args)
    return commands, evaluated


def test_a_crashed_runs_folder_is_resumed_and_a_truncated_eval_redone(tmp_path, monkeypatch):
    crashed = tmp_path / "study" / "runs" / "unet_cross_attention_s1"
    (crashed / "checkpoints" / "step_0000002").mkdir(parents=True)
    (crashed / "model").mkdir()
    (crashed / "model" / "config.json").write_text("{}")  # exported at an intermediate best
    (crashed / "study_eval.json").write_text('{"clinical": {"a": {"tum')  # killed while writing
    commands, evaluated = _fake_study(tmp_path, monkeypatch)
    assert len(commands) == 6  # 3 arms x 2 seeds, the crashed one included
    resumed = [c for c in commands if "--resume" in c]
    assert len(resumed) == 1 and resumed[0][resumed[0].index("--output_dir") + 1] == str(crashed)
    assert len(evaluated) == 6
    assert load_eval(crashed / "study_eval.json", {"clinical", NO_CLINICAL}, {"a", "b", "c"}) is not None
    md = (tmp_path / "study" / "study.md").read_text()
    assert "| unet | cross_attention - none | 3 | +0.000 | [+0.000, +0.000] | 2 |" in md

    commands, evaluated = _fake_study(tmp_path, monkeypatch)  # a rerun: nothing to train or evaluate
    assert commands == [] and evaluated == []


def test_a_failing_run_leaves_a_partial_report_and_raises(tmp_path, monkeypatch):
    with pytest.raises(subprocess.CalledProcessError):
        _fake_study(tmp_path, monkeypatch, fail_on="unet_cross_attention_permuted_s1")
    md = (tmp_path / "study" / "study.md").read_text()
    assert "INCOMPLETE" in md and "| unet | none | n/a | 2 |" in md
    assert "| unet | cross_attention_permuted | permuted | 1 |" in md
    _strict_json((tmp_path / "study" / "study.json").read_text())


# ----------------------------------------------------------------------------- figures


def test_figures_take_nan_images_numpy_scalars_and_other_tumor_labels(tmp_path):
    import matplotlib.image as mpimg

    from finetune.figures import _pick_slices, plot_training_curves, save_overlays

    history = [{"step": s, "loss": np.float32(1.0 / (s + 1)), "val_dice": np.float64(s / 10)} for s in range(5)]
    png = mpimg.imread(plot_training_curves(history, tmp_path / "curves.png"))
    assert png.shape[1] > png.shape[0]  # two panels: numpy floats are numbers too

    image = np.random.default_rng(0).normal(0, 1, (16, 16, 8)).astype(np.float32)
    image[0, 0, :] = np.nan  # one NaN used to make the grey window NaN
    gt = np.zeros((16, 16, 8), np.int64)
    gt[4:8, 4:8, 5] = 1
    png = mpimg.imread(save_overlays(image, gt, gt, tmp_path / "o.png", label_names=["background", "tumor"],
                                     n_slices=1))
    top = png[: png.shape[0] // 3, :, :3]
    assert top.std() > 0.05  # the image row is drawn, not blank
    assert _pick_slices(gt, gt, 1, tumor=1) == [5]
    with pytest.raises(ValueError, match="labels >= 0"):
        save_overlays(image, gt - 1, gt, tmp_path / "bad.png")
