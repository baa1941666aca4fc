import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from finetune.evaluate import evaluate_case, summarize, write_reports

NAMES = ["background", "liver", "tumor", "portal_vein", "aorta"]


def two_cubes():
    """liver: two 8^3 cubes overlapping in 6x8x8 voxels; tumor: an 8^3 cube shifted 2 slices in z;
    portal vein absent everywhere; aorta only in the prediction."""
    gt = np.zeros((24, 24, 24), np.uint8)
    pred = np.zeros_like(gt)
    gt[2:10, 2:10, 2:10] = 1
    pred[4:12, 2:10, 2:10] = 1
    gt[13:21, 13:21, 12:20] = 2
    pred[13:21, 13:21, 14:22] = 2
    pred[0:2, 20:22, 0:3] = 4
    return pred, gt


def test_overlap_metrics_exact():
    pred, gt = two_cubes()
    m = evaluate_case(pred, gt, (0.7, 0.9, 2.5), NAMES, case_id="c0")
    liver = m["classes"]["liver"]
    n = gt.size
    assert liver["dice"] == pytest.approx(2 * 384 / 1024)
    assert liver["iou"] == pytest.approx(384 / 640)
    assert liver["precision"] == pytest.approx(384 / 512)
    assert liver["recall"] == pytest.approx(384 / 512)
    assert liver["accuracy"] == pytest.approx((n - 256) / n)
    assert (liver["gt_voxels"], liver["pred_voxels"]) == (512, 512)
    assert m["case_id"] == "c0" and "case_id" not in evaluate_case(pred, gt, (1, 1, 1), NAMES)


def test_hd95_uses_anisotropic_spacing():
    pred, gt = two_cubes()
    for spacing in [(0.7, 0.9, 2.5), (1.0, 1.0, 1.0), (0.5, 0.5, 4.0)]:
        m = evaluate_case(pred, gt, spacing, NAMES)
        assert m["classes"]["tumor"]["hd95"] == pytest.approx(2 * spacing[2], rel=1e-5)  # 2 slices shift
        assert m["classes"]["tumor"]["dice"] == pytest.approx(6 / 8)
    m = evaluate_case(gt, gt, (0.7, 0.9, 2.5), NAMES)
    assert m["classes"]["tumor"]["hd95"] == 0.0 and m["classes"]["liver"]["dice"] == 1.0


def test_empty_class_conventions():
    pred, gt = two_cubes()
    m = evaluate_case(torch.as_tensor(pred), torch.as_tensor(gt), (1, 1, 1), NAMES)
    pv, aorta = m["classes"]["portal_vein"], m["classes"]["aorta"]
    # absent from both: skipped
    assert all(math.isnan(pv[k]) for k in ("dice", "iou", "hd95", "precision", "recall")) and pv["accuracy"] == 1.0
    # prediction only: zero overlap, recall and HD95 undefined
    assert aorta["dice"] == 0 and aorta["iou"] == 0 and aorta["precision"] == 0
    assert math.isnan(aorta["recall"]) and math.isnan(aorta["hd95"])
    # means over classes that are not absent: liver, tumor, aorta
    assert m["mean_dice"] == pytest.approx((0.75 + 0.75 + 0.0) / 3)
    assert m["miou"] == pytest.approx((0.6 + 0.6 + 0.0) / 3)
    # ground truth only: precision undefined
    missed = evaluate_case(np.zeros_like(gt), gt, (1, 1, 1), NAMES)["classes"]["liver"]
    assert missed["dice"] == 0 and missed["recall"] == 0
    assert math.isnan(missed["precision"]) and math.isnan(missed["hd95"])


def test_summary_and_reports(tmp_path):
    pred, gt = two_cubes()
    spacing = (0.7, 0.9, 2.5)
    cases = [evaluate_case(pred, gt, spacing, NAMES, case_id="a"), evaluate_case(gt, gt, spacing, NAMES, case_id="b")]
    s = summarize(cases)
    assert s["n_cases"] == 2
    liver = s["per_class"]["liver"]
    assert liver["dice_mean"] == pytest.approx((0.75 + 1.0) / 2) and liver["dice_std"] == pytest.approx(0.125)
    assert s["per_class"]["portal_vein"]["n_absent"] == 2 and math.isnan(s["per_class"]["portal_vein"]["dice_mean"])
    aorta = s["per_class"]["aorta"]
    assert (aorta["n_evaluated"], aorta["n_absent"], aorta["hd95_undefined"]) == (1, 1, 1)
    assert s["mean_dice"] == pytest.approx((0.5 + 1.0) / 2)

    paths = write_reports(cases, s, tmp_path / "reports")
    data = json.loads(paths["json"].read_text())  # strict JSON: NaN written as null
    assert data["summary"]["per_class"]["portal_vein"]["dice_mean"] is None
    assert data["per_case"][0]["classes"]["liver"]["dice"] == pytest.approx(0.75)
    df = pd.read_csv(paths["csv"])
    assert len(df) == 2 * 4 and set(df["class"]) == set(NAMES[1:])
    assert df.query("case_id == 'a' and `class` == 'tumor'")["hd95"].item() == pytest.approx(5.0)
    md = paths["md"].read_text()
    assert "| liver | 0.8750 ± 0.1250 |" in md and "Mean foreground Dice: **0.7500**" in md


def test_bad_inputs():
    pred, gt = two_cubes()
    with pytest.raises(ValueError, match="shape"):
        evaluate_case(pred[:-1], gt, (1, 1, 1), NAMES)
    with pytest.raises(ValueError, match="labels outside"):
        evaluate_case(pred, gt, (1, 1, 1), NAMES[:3])
    with pytest.raises(ValueError, match="spacing"):
        evaluate_case(pred, gt, (1, 1), NAMES)



def test_lesions_are_scored_one_by_one_and_small_ones_apart(tmp_path):
    from finetune.evaluate import evaluate_case, summarize, write_reports

    gt = np.zeros((40, 40, 20), dtype=np.int64)
    gt[2:20, 2:20, 2:18] = 1  # liver
    gt[4:16, 4:16, 4:14] = 2  # a large lesion: 1440 voxels of 8 mm^3 = 11.5 mL
    gt[25:28, 25:28, 5:8] = 2  # a small one: 27 voxels = 0.2 mL, missed below
    pred = gt.copy()
    pred[25:28, 25:28, 5:8] = 0
    pred[4:16, 4:10, 4:14] = 1  # half the large lesion found
    case = evaluate_case(pred, gt, (2.0, 2.0, 2.0), ["background", "liver", "tumor"], case_id="c")
    small, large = sorted(case["lesions"], key=lambda r: r["volume_ml"])
    assert small == {"volume_ml": pytest.approx(0.216), "detected": False, "dice": 0.0}
    assert large["detected"] and large["volume_ml"] == pytest.approx(11.52) and large["dice"] == pytest.approx(2 / 3)
    summary = summarize([case])
    assert summary["lesions"]["small (< 7 mL)"] == {"n_lesions": 1, "detected": 0, "detection_rate": 0.0, "dice_mean": 0.0}
    assert summary["lesions"][">= 7 mL".join(["large (", ")"])]["detection_rate"] == 1.0
    md = write_reports([case], summary, tmp_path)["md"].read_text()
    assert "| small (< 7 mL) | 1 | 0 | 0.000 | 0.000 |" in md


def test_false_positive_lesions_and_tumor_free_cases_are_counted(tmp_path):
    """A predicted lesion touching no real one is a false alarm: counted with its volume, it lowers lesion
    precision, and a tumor-free case with one is not 'clean'."""
    from finetune.evaluate import evaluate_case, summarize, write_reports

    labels = ["background", "liver", "tumor"]
    gt = np.zeros((40, 40, 20), dtype=np.int64)
    gt[2:30, 2:30, 2:18] = 1
    gt[4:10, 4:10, 4:10] = 2  # one real lesion, 216 voxels
    pred = gt.copy()
    pred[20:25, 20:25, 5:9] = 2  # a false alarm of 100 voxels of 8 mm^3 = 0.8 mL, apart from the real one
    with_lesion = evaluate_case(pred, gt, (2.0, 2.0, 2.0), labels, case_id="a")
    assert sorted(r["true_positive"] for r in with_lesion["predicted_lesions"]) == [False, True]
    assert [r["volume_ml"] for r in with_lesion["predicted_lesions"] if not r["true_positive"]] == [pytest.approx(0.8)]

    free_gt = np.where(gt == 2, 1, gt)  # the same liver without a lesion
    clean = evaluate_case(free_gt, free_gt, (2.0, 2.0, 2.0), labels, case_id="b")
    alarm = evaluate_case(np.where(pred == 2, 2, free_gt), free_gt, (2.0, 2.0, 2.0), labels, case_id="c")
    assert clean["predicted_lesions"] == [] and len(alarm["predicted_lesions"]) == 2

    fp = summarize([with_lesion, clean, alarm])["false_positives"]
    assert fp["n_predicted"] == 4 and fp["n_false_positive"] == 3
    assert fp["lesion_precision"] == pytest.approx(0.25)
    assert fp["false_positive_ml"] == pytest.approx(0.8 + 1.728 + 0.8)
    assert fp["false_positive_ml_per_case"] == pytest.approx((0.8 + 1.728 + 0.8) / 3)
    assert (fp["tumor_free_cases"], fp["tumor_free_cases_clean"]) == (2, 1)
    md = write_reports([with_lesion, clean, alarm], summarize([with_lesion, clean, alarm]), tmp_path)["md"].read_text()
    assert "lesion precision 0.250" in md and "tumor-free: 1 of 2" in md


def test_model_card_metrics_carry_lesion_detection_and_false_alarms():
    from finetune.evaluate import card_metrics, evaluate_case, summarize
    from nny_models.hub import _metrics_table

    labels = ["background", "liver", "tumor"]
    gt = np.zeros((40, 40, 20), dtype=np.int64)
    gt[2:30, 2:30, 2:18] = 1
    gt[4:10, 4:10, 4:10] = 2  # 216 voxels of 8 mm^3 = 1.7 mL: a small lesion, found
    pred = gt.copy()
    pred[20:25, 20:25, 5:9] = 2  # a 0.8 mL false alarm
    card = card_metrics(summarize([evaluate_case(pred, gt, (2.0, 2.0, 2.0), labels)]))
    assert card["tumor lesions detected, small (< 7 mL)"] == "1/1"
    assert card["tumor lesions detected, large (>= 7 mL)"] == "0/0"
    assert card["tumor lesion precision"] == pytest.approx(0.5)
    assert card["tumor false-positive mL per case"] == pytest.approx(0.8)
    json.dumps(card)  # stored in config.json
    _, rows, scalars = _metrics_table(card, labels)
    assert ("tumor lesion precision", "0.5000") in scalars and [name for name, _ in rows] == ["liver", "tumor"]
