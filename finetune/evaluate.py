"""Segmentation metrics per case and class (MONAI), summaries and report files.

Per foreground class (label_names[1:]): Dice, IoU, HD95 (mm, using the voxel spacing), voxel
accuracy, precision and recall, computed with ``monai.metrics`` on one-hot volumes.

Empty-class conventions (the paper does not fix them; ours, applied everywhere):
- class absent from both ground truth and prediction: nothing to score. Dice, IoU, precision,
  recall and HD95 are NaN ("absent"), accuracy is 1. The class is skipped in every mean and counted
  as ``n_absent`` in the summary, so true negatives neither help nor hurt.
- class in the prediction only (false positive case): Dice = IoU = precision = 0, recall NaN (0/0).
- class in the ground truth only (missed): Dice = IoU = recall = 0, precision NaN (0/0).
- HD95 is defined only when both sides are non-empty; otherwise it is NaN, excluded from the HD95
  mean and counted as ``hd95_undefined`` (so a missed tumor is visible, not silently averaged away).
  It is MONAI's: the larger of the two directed 95th percentiles of surface distances, in mm (spacing).
- Every per-class mean over cases skips the cases where that metric is NaN (0/0 or absent); accuracy, defined
  even for an absent class, is skipped in exactly the absent cases too. Stds are over cases (ddof = 0).
- Summary ``mean_dice`` / ``miou``: each case's mean over its scored classes, then the mean over the cases where
  that is defined (``n_cases_scored``); not the mean of the per-class means when classes are absent in some cases.
NaN (and Inf) is written as ``null`` in metrics.json and as an empty cell in the CSV.

Inputs: pred and gt are (X, Y, Z) integer label volumes of one shape (any integer, bool or integral float dtype,
numpy or torch, either byte order); a label outside 0..len(label_names)-1, a NaN / non-integral value or a
shape mismatch is refused with ValueError rather than scored.

Tumors are also scored lesion by lesion: each ground-truth lesion (detected? its Dice; small ones apart) and each
predicted lesion (does it touch a real one?), which gives lesion precision and the false-alarm volume per case.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from monai.metrics import (
    compute_confusion_matrix_metric,
    compute_dice,
    compute_hausdorff_distance,
    compute_iou,
    get_confusion_matrix,
)

METRICS = ("dice", "iou", "hd95", "accuracy", "precision", "recall")
SMALL_LESION_ML = 7.0  # lesions below this volume are reported apart: they are where tumor Dice breaks down
LESION_LABEL = "tumor"  # the class scored lesion by lesion (connected components of the ground truth)


def _as_labels(x: Any, name: str, n_labels: int, label_names: Sequence[str]) -> torch.Tensor:
    """An int64 (X, Y, Z) tensor of labels 0..n_labels-1 (a copy), or ValueError naming what is wrong."""
    if isinstance(x, torch.Tensor):  # a CUDA, bf16 or grad-tracking tensor has no direct numpy view
        x = x.detach().cpu()
        x = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
        x = x.numpy()
    a = np.asarray(x)
    if a.ndim != 3:
        raise ValueError(f"evaluate_case: {name} must be a (X, Y, Z) label volume, got shape {a.shape}")
    if a.dtype == bool:
        a = a.astype(np.int64)
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all() or not np.array_equal(a, np.round(a)):
            raise ValueError(f"evaluate_case: {name} must hold integer labels, got non-integer, NaN or Inf values")
    elif not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"evaluate_case: {name} must hold integer labels, got dtype {a.dtype}")
    # checked before the cast: a uint64 / huge float label must not wrap around into the label range
    if a.size and (a.min() < 0 or a.max() >= n_labels):
        raise ValueError(f"evaluate_case: {name} has labels outside 0..{n_labels - 1} ({list(label_names)}), "
                         f"found {np.unique(a[(a < 0) | (a >= n_labels)])[:5].tolist()}")
    # astype copies (a read-only mmap cannot back a tensor) and makes the byte order native (nibabel can return
    # big-endian arrays, which torch refuses)
    return torch.from_numpy(a.astype(np.int64))


def evaluate_case(
    pred: np.ndarray | torch.Tensor,
    gt: np.ndarray | torch.Tensor,
    spacing: Sequence[float],
    label_names: Sequence[str],
    case_id: str | None = None,
) -> dict[str, Any]:
    """Metrics of one case -> {["case_id" if given], "classes": {name: {metric: value, "gt_voxels", "pred_voxels"}},
    "mean_dice", "miou"} where the means run over the foreground classes that are not absent."""
    n = len(label_names)
    if n < 2:
        raise ValueError(f"evaluate_case: label_names needs background + at least one class, got {list(label_names)}")
    if len(set(label_names)) != n:  # classes are keyed by name: a duplicate would overwrite another's row
        raise ValueError(f"evaluate_case: label_names must be distinct, got {list(label_names)}")
    spacing = [float(s) for s in spacing]
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):  # NaN passes a "<= 0" test
        raise ValueError(f"evaluate_case: spacing must be 3 positive finite numbers (mm), got {spacing}")
    if tuple(np.shape(pred)) != tuple(np.shape(gt)):
        raise ValueError(f"evaluate_case: pred shape {tuple(np.shape(pred))} != gt shape {tuple(np.shape(gt))}")
    pred_t, gt_t = _as_labels(pred, "pred", n, label_names), _as_labels(gt, "gt", n, label_names)

    # one-hot (1, n, X, Y, Z) with background dropped below by include_background=False
    p1 = torch.nn.functional.one_hot(pred_t, n).permute(3, 0, 1, 2)[None].float()
    g1 = torch.nn.functional.one_hot(gt_t, n).permute(3, 0, 1, 2)[None].float()
    dice = compute_dice(p1, g1, include_background=False, ignore_empty=False)[0]
    iou = compute_iou(p1, g1, include_background=False, ignore_empty=False)[0]
    cm = get_confusion_matrix(p1, g1, include_background=False)
    acc = compute_confusion_matrix_metric("accuracy", cm)[0]
    precision = compute_confusion_matrix_metric("precision", cm)[0]
    recall = compute_confusion_matrix_metric("recall", cm)[0]

    gt_vox = g1[0, 1:].flatten(1).sum(1)
    pred_vox = p1[0, 1:].flatten(1).sum(1)
    both = (gt_vox > 0) & (pred_vox > 0)
    hd95 = torch.full((n - 1,), math.nan)
    if both.any():  # only classes present on both sides; MONAI warns and returns inf/nan otherwise
        idx = torch.nonzero(both)[:, 0] + 1
        with warnings.catch_warnings():  # MONAI's own internal deprecation notice (get_mask_edges)
            warnings.simplefilter("ignore", FutureWarning)
            hd95[both] = compute_hausdorff_distance(
                p1[:, idx], g1[:, idx], include_background=True, percentile=95, spacing=spacing
            )[0].float()

    classes = {}
    for c in range(n - 1):
        absent = gt_vox[c] == 0 and pred_vox[c] == 0
        values = {
            "dice": dice[c], "iou": iou[c], "hd95": hd95[c],
            "accuracy": acc[c], "precision": precision[c], "recall": recall[c],
        }  # fmt: skip
        row = {k: (math.nan if absent and k != "accuracy" else float(v)) for k, v in values.items()}
        row.update(gt_voxels=int(gt_vox[c]), pred_voxels=int(pred_vox[c]))
        classes[label_names[c + 1]] = row
    dices = [r["dice"] for r in classes.values() if not math.isnan(r["dice"])]
    ious = [r["iou"] for r in classes.values() if not math.isnan(r["iou"])]
    result: dict[str, Any] = {} if case_id is None else {"case_id": case_id}
    result |= {
        "classes": classes,
        "mean_dice": float(np.mean(dices)) if dices else math.nan,
        "miou": float(np.mean(ious)) if ious else math.nan,
    }
    if LESION_LABEL in label_names:
        label = list(label_names).index(LESION_LABEL)
        result["lesions"], result["predicted_lesions"] = lesion_metrics(pred_t.numpy(), gt_t.numpy(), spacing, label)
    return result


def lesion_volume_ml(voxels: int, spacing: Sequence[float]) -> float:
    """Volume in mL (1 mL = 1000 mm^3) of ``voxels`` voxels of ``spacing`` mm, rounded to 1e-9 mL: without the
    rounding, 12500 voxels of 0.8 x 0.7 x 1 mm (exactly 7 mL) come out 6.999999999999999 and count as small."""
    return round(float(voxels) * float(np.prod([float(s) for s in spacing])) / 1000.0, 9)


def lesion_metrics(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float],
                   label: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Lesions (26-connected components of ``label``: lesions touching at a face, edge or corner are one) from
    both sides, each side labelled once:

    - one row per ground-truth lesion: its volume (mL), whether any predicted voxel of the class overlaps it
      (detected), and its Dice against the union of the predicted components that overlap it (a predicted blob
      merging two lesions counts whole for each); these rows let small lesions be reported apart from the
      per-class mean;
    - one row per predicted lesion: its volume (mL) and whether it overlaps a ground-truth lesion. One overlapping
      none is a false-positive lesion: voxel Dice mixes such false alarms with misses, and in a tumor-free case
      any of them makes the Dice 0."""
    from scipy import ndimage

    structure = np.ones((3, 3, 3), dtype=bool)
    gt_cc, n_gt = ndimage.label(np.asarray(gt) == label, structure=structure)
    pred_cc, n_pred = ndimage.label(np.asarray(pred) == label, structure=structure)
    gt_sizes = np.bincount(gt_cc.ravel(), minlength=n_gt + 1)
    pred_sizes = np.bincount(pred_cc.ravel(), minlength=n_pred + 1)
    # overlap[k, j] = voxels of gt lesion k in predicted lesion j, from one pass over the overlapping voxels
    # (a full-volume mask per lesion is O(lesions x volume): minutes on a 512^2 CT with many lesions)
    both = (gt_cc > 0) & (pred_cc > 0)
    overlap = np.zeros((n_gt + 1, n_pred + 1), dtype=np.int64)
    np.add.at(overlap, (gt_cc[both], pred_cc[both]), 1)
    truth = []
    for k in range(1, n_gt + 1):
        touching = np.nonzero(overlap[k])[0]
        inter = float(overlap[k, touching].sum())  # predicted components are disjoint: the overlaps add up
        dice = 2.0 * inter / (float(gt_sizes[k]) + float(pred_sizes[touching].sum()))
        truth.append({"volume_ml": lesion_volume_ml(gt_sizes[k], spacing), "detected": bool(len(touching)),
                      "dice": dice})
    hits = overlap[1:].sum(axis=0) > 0
    predicted = [{"volume_ml": lesion_volume_ml(pred_sizes[j], spacing), "true_positive": bool(hits[j])}
                 for j in range(1, n_pred + 1)]
    return truth, predicted


def summarize_false_positives(per_case: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Lesion-level precision and false alarms over the cases' predicted lesions (lesion_metrics): predicted lesions, the
    share of them that touch a real lesion (lesion precision), false-positive lesions and their volume (total
    and per case), and how many tumor-free cases came out tumor-free."""
    scored = [case for case in per_case if "predicted_lesions" in case]
    rows = [row for case in scored for row in case["predicted_lesions"]]
    false = [row for row in rows if not row["true_positive"]]
    false_ml = float(sum(row["volume_ml"] for row in false))
    free = [case for case in scored if not case.get("lesions")]
    return {
        "n_predicted": len(rows),
        "lesion_precision": (len(rows) - len(false)) / len(rows) if rows else math.nan,
        "n_false_positive": len(false),
        "false_positive_ml": false_ml,
        "false_positive_ml_per_case": false_ml / len(scored) if scored else math.nan,
        "tumor_free_cases": len(free),
        "tumor_free_cases_clean": sum(not case["predicted_lesions"] for case in free),
    }


def summarize_lesions(per_case: Sequence[dict[str, Any]], small_ml: float = SMALL_LESION_ML) -> dict[str, Any]:
    """Lesion counts, detection rate and mean lesion Dice for lesions below / at or above ``small_ml`` mL."""
    lesions = [row for case in per_case for row in case.get("lesions", [])]
    out = {}
    # rounded as lesion_volume_ml does, so a lesion of exactly small_ml (read back from any file) is large
    for name, keep in ((f"small (< {small_ml:g} mL)", lambda v: round(v, 9) < small_ml),
                       (f"large (>= {small_ml:g} mL)", lambda v: round(v, 9) >= small_ml)):
        rows = [r for r in lesions if keep(r["volume_ml"])]
        out[name] = {
            "n_lesions": len(rows),
            "detected": sum(r["detected"] for r in rows),
            "detection_rate": float(np.mean([r["detected"] for r in rows])) if rows else math.nan,
            "dice_mean": float(np.mean([r["dice"] for r in rows])) if rows else math.nan,
        }
    return out


def _absent(row: dict[str, Any]) -> bool:
    """The class is in neither the ground truth nor the prediction of this case (nothing to score)."""
    if "gt_voxels" in row and "pred_voxels" in row:
        return row["gt_voxels"] == 0 and row["pred_voxels"] == 0
    return _nan(row["dice"])


def _nan(x: Any) -> bool:
    return x is None or math.isnan(float(x))  # None: a value read back from metrics.json


def summarize(per_case: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per-class mean/std over cases (NaN skipped, counted) plus mean foreground Dice and mIoU (module docstring:
    each case's mean over its scored classes, then over the cases)."""
    if not per_case:
        raise ValueError("summarize: no cases")
    names = list(per_case[0]["classes"])
    for i, case in enumerate(per_case):  # one label map for all cases, or the per-class means mix classes
        if list(case["classes"]) != names:
            raise ValueError(f"summarize: case {case.get('case_id', i)} has classes {list(case['classes'])}, "
                             f"the first case {names}")
    per_class = {}
    for name in names:
        rows = [case["classes"][name] for case in per_case]
        absent = [_absent(r) for r in rows]
        stats: dict[str, Any] = {}
        for m in METRICS:
            # an absent class is skipped in every mean: its accuracy of 1 is the one value that is not NaN there
            v = np.array([math.nan if a or r[m] is None else r[m] for r, a in zip(rows, absent)], dtype=float)
            v = v[np.isfinite(v)]
            stats[f"{m}_mean"] = float(v.mean()) if len(v) else math.nan
            stats[f"{m}_std"] = float(v.std()) if len(v) else math.nan
        stats["n_evaluated"] = sum(not a for a in absent)
        stats["n_absent"] = sum(absent)
        stats["hd95_undefined"] = sum(_nan(r["hd95"]) and not a for r, a in zip(rows, absent))
        per_class[name] = stats
    mean_dice = np.array([math.nan if _nan(c["mean_dice"]) else c["mean_dice"] for c in per_case], dtype=float)
    miou = np.array([math.nan if _nan(c["miou"]) else c["miou"] for c in per_case], dtype=float)
    summary = {
        "n_cases": len(per_case),
        "n_cases_scored": int((~np.isnan(mean_dice)).sum()),  # cases with at least one class not absent
        "mean_dice": float(np.nanmean(mean_dice)) if (~np.isnan(mean_dice)).any() else math.nan,
        "miou": float(np.nanmean(miou)) if (~np.isnan(miou)).any() else math.nan,
        "per_class": per_class,
    }
    if any("lesions" in case for case in per_case):
        summary["lesions"] = summarize_lesions(per_case)
    if any("predicted_lesions" in case for case in per_case):
        summary["false_positives"] = summarize_false_positives(per_case)
    return summary


def _json_safe(obj: Any) -> Any:
    """Plain JSON types with NaN / Inf as None: numpy and torch scalars (np.float32 is no float subclass and
    json.dumps refuses it) and arrays become Python numbers and lists."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        obj = obj.tolist()
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _write_atomic(path: Path, text: str) -> None:
    """A killed evaluation leaves the old report or the new one, never a truncated metrics.json."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _fmt(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def write_reports(per_case: Sequence[dict[str, Any]], summary: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """metrics.json (summary + per case), metrics_per_case.csv (one row per case and class), metrics.md."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "metrics.json", "csv": out / "metrics_per_case.csv", "md": out / "metrics.md"}
    # allow_nan=False: a NaN that escaped _json_safe fails here instead of writing invalid JSON
    _write_atomic(paths["json"], json.dumps(_json_safe({"summary": summary, "per_case": list(per_case)}), indent=2,
                                            allow_nan=False))

    rows = [
        {"case_id": case.get("case_id", str(i)), "class": name, **values}
        for i, case in enumerate(per_case)
        for name, values in case["classes"].items()
    ]
    table = pd.DataFrame(rows, columns=["case_id", "class", *METRICS, "gt_voxels", "pred_voxels"])
    table.to_csv(paths["csv"], index=False)

    lines = [
        f"# Segmentation metrics ({summary['n_cases']} cases)",
        "",
        f"Mean foreground Dice: **{_fmt(summary['mean_dice'])}**, mIoU: **{_fmt(summary['miou'])}** (each case's "
        f"mean over its classes that are not absent, then the mean over the "
        f"{summary.get('n_cases_scored', summary['n_cases'])} cases with any)",
        "",
        "| Class | Dice | IoU | HD95 (mm) | Accuracy | Precision | Recall | cases (absent, HD95 n/a) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary["per_class"].items():
        digits = {m: 2 if m == "hd95" else 4 for m in METRICS}
        cells = [f"{_fmt(s[f'{m}_mean'], digits[m])} ± {_fmt(s[f'{m}_std'], digits[m])}" for m in METRICS]
        counts = f"{s['n_evaluated']} ({s['n_absent']}, {s['hd95_undefined']})"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {counts} |")
    lines += ["", "Mean ± std (population) over cases. Means skip cases where the class is absent from both ground",
              "truth and prediction, and cases where the metric is undefined: precision with an empty prediction,",
              "recall with an empty ground truth, HD95 when one side is empty (see finetune/evaluate.py)."]  # fmt: skip
    if "lesions" in summary:
        lines += ["", f"## {LESION_LABEL.capitalize()} lesions (26-connected components of the ground truth)", "",
                  "| Lesions | count | detected | detection rate | mean lesion Dice |", "|---|---|---|---|---|"]
        for name, s in summary["lesions"].items():
            lines.append(f"| {name} | {s['n_lesions']} | {s['detected']} | {_fmt(s['detection_rate'], 3)} | "
                         f"{_fmt(s['dice_mean'], 3)} |")
    if "false_positives" in summary:
        fp = summary["false_positives"]
        lines += ["", f"Predicted {LESION_LABEL} lesions: {fp['n_predicted']}, lesion precision "
                  f"{_fmt(fp['lesion_precision'], 3)} (share touching a real lesion); false-positive lesions: "
                  f"{fp['n_false_positive']}, {fp['false_positive_ml']:.1f} mL in all "
                  f"({_fmt(fp['false_positive_ml_per_case'], 1)} mL per case); tumor-free cases predicted "
                  f"tumor-free: {fp['tumor_free_cases_clean']} of {fp['tumor_free_cases']}."]
    _write_atomic(paths["md"], "\n".join(lines) + "\n")
    return paths



def card_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """The model card's view of an evaluation summary: mean Dice, mIoU and a compact per-class table.

    Used by fine-tuning's best-model export and by publish's held-out evaluation, so both cards agree. An undefined
    value (NaN: a class absent from every case, HD95 with one side empty everywhere, no predicted lesion) is None, so
    config.json stays valid JSON (null; the card shows n/a) instead of holding the bare token NaN."""
    columns = {"dice": "Dice", "iou": "IoU", "hd95": "HD95 (mm)", "precision": "precision", "recall": "recall"}
    card: dict[str, Any] = {"mean_foreground_dice": summary["mean_dice"], "miou": summary["miou"]}
    # lesion-level figures: detection by size, and the false alarms that voxel Dice folds into one number
    for group, stats in summary.get("lesions", {}).items():
        card[f"{LESION_LABEL} lesions detected, {group}"] = f"{stats['detected']}/{stats['n_lesions']}"
    if "false_positives" in summary:
        fp = summary["false_positives"]
        card[f"{LESION_LABEL} lesion precision"] = fp["lesion_precision"]
        card[f"{LESION_LABEL} false-positive mL per case"] = fp["false_positive_ml_per_case"]
    card["per_class"] = {
        name: {label: stats[f"{key}_mean"] for key, label in columns.items()}
        for name, stats in summary["per_class"].items()
    }
    return _json_safe(card)
