"""Evaluate a fine-tuned export on held-out cases, then publish it with the results in its model card.

    python -m finetune.publish --model runs/finetune/model --test_dir DIR --output_dir runs/publish \\
        [--repo_id org/nnynet --push]

Evaluation runs the same path a user runs: ``NnyNet.from_pretrained`` -> ``nny_models.predict`` on the
original CT (preprocessing from config.json, sliding window, restored to the input grid) -> metrics in mm
on the original spacing. Reports: metrics.json, metrics_per_case.csv, metrics.md, overlay PNGs.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune.evaluate import card_metrics, evaluate_case, summarize, write_reports
from finetune.figures import radiological, save_attention_overlay, save_overlays
from nny_models.attention import uses_attention
from nny_models.hub import NnyNet
from nny_models.inference import predict
from nny_models.clinical import is_missing
from nny_models.config import LABEL_RESAMPLING, check_lesion_in_organ
from nny_models.io import discover_cases, load_volume, read_clinical_csv
from nny_models.preprocessing import check_label_grid
from nny_models.training import parse_config, run_main


def evaluate_dataset(model: NnyNet, test_dir: Path, out_dir: Path, *, overlays: int = 3) -> tuple[list[dict], dict]:
    """Per-case metrics of ``model`` on every labeled case of ``test_dir``; reports and overlays (plus attention
    overlays for cross-attention models) in out_dir.
    Predictions are post-processed as the model's config says (keep_largest, lesion_in_organ), exactly as predict
    does."""
    cases = discover_cases(test_dir)
    records = [r for r in cases if r.label is not None]
    if not records:
        raise ValueError(f"{test_dir}: no labeled cases to evaluate")
    _check_label_map(test_dir, model.config.label_names)
    table = None
    if model.config.clinical_schema and (test_dir / "clinical.csv").is_file():
        # every case of the folder may have a row (an unlabeled one too); the labeled ones are looked up
        table = read_clinical_csv(test_dir / "clinical.csv", case_ids=[r.case_id for r in cases])
    labels = model.config.label_names
    per_case = []
    for i, record in enumerate(records):
        clinical = table.loc[record.case_id].to_dict() if table is not None else None
        drawn = i < overlays and uses_attention(model)  # its attention map comes from the same forward passes
        image, image_affine = load_volume(record.image)  # read once: predict gets the array
        gt, affine = load_volume(record.label)
        # the prediction is on the image's grid: a label on another grid (shape, voxel size, origin, axes), with
        # fractional values or with classes the model does not have would be scored voxel by voxel against the
        # wrong anatomy; refused, naming both files (the check fine-tuning's data loading makes), before predicting
        gt = check_label_grid(gt, affine, image.shape, image_affine, record.label, record.image,
                              num_classes=len(labels)).astype(np.int64)
        pred = predict(model, image, affine=image_affine, clinical=clinical, return_attention=drawn,
                       case_id=record.case_id, source=record.image)
        pred, amap = pred if drawn else (pred, None)
        spacing = tuple(float(s) for s in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0)))
        per_case.append(evaluate_case(pred, gt, spacing, labels, case_id=record.case_id))
        if i < overlays:
            shown = [radiological(a, image_affine) for a in (image, gt, pred)]
            save_overlays(*shown, out_dir / "figures" / f"{record.case_id}_overlay.png", label_names=labels)
            if amap is not None:  # where the clinical query looks, on the CT (nny_models.attention)
                save_attention_overlay(shown[0], radiological(amap, image_affine),
                                       out_dir / "figures" / f"{record.case_id}_attention.png", labels=shown[1])
    summary = summarize(per_case)
    write_reports(per_case, summary, out_dir)
    return per_case, summary


def evaluate_and_publish(
    model_dir: Path,
    test_dir: Path,
    out: Path,
    repo_id: str | None = None,
    keep_largest: Sequence[str] | None = None,
    lesion_min_contact: float | None = None,
    single_component: Sequence[str] | None = None,
    label_resampling: str | None = None,
) -> dict[str, Any]:
    """Held-out evaluation, then save_pretrained to OUT/model with the metrics, reload it and check it.

    keep_largest: None keeps the post-processing the model was trained with; a list replaces it (in the
    evaluation and in the published config alike). lesion_min_contact likewise: None keeps the model's
    lesion_in_organ, 0 removes it, a share in (0, 1] sets it (tumor in liver unless the model names others).
    single_component: None keeps the model's, a list replaces it. label_resampling: None keeps the model's,
    "probabilities" or "nearest" replaces it."""
    model_dir, test_dir, out = Path(model_dir), Path(test_dir), Path(out)
    _check_output_dir(model_dir, out)
    model = NnyNet.from_pretrained(model_dir)
    trained_metrics = model.config.metrics  # as config.json holds them, before the evaluation replaces them
    for name, names in (("keep_largest", keep_largest), ("single_component", single_component)):
        if names is not None:
            unknown = sorted(set(names) - set(model.config.label_names))
            if unknown:
                raise ValueError(f"{name}: {unknown} not among the model's labels {model.config.label_names}")
            setattr(model.config, name, list(names))
    if lesion_min_contact is not None:
        model.config.lesion_in_organ = _lesion_rule(model.config, float(lesion_min_contact))
    if label_resampling is not None:
        if label_resampling not in LABEL_RESAMPLING:
            raise ValueError(f"label_resampling: expected one of {list(LABEL_RESAMPLING)}, got {label_resampling!r}")
        model.config.label_resampling = label_resampling
    eval_dir = out / "eval"
    without_clinical = bool(model.config.clinical_schema) and not (test_dir / "clinical.csv").is_file()
    if without_clinical:  # the metrics are then those of the model's "no clinical data" query: said, never silent
        warnings.warn(f"{test_dir}: no clinical.csv, so the clinical-fusion model {model_dir} is evaluated without "
                      "clinical data (every value missing); the model card says so", stacklevel=2)
    per_case, summary = evaluate_dataset(model, test_dir, eval_dir)
    curves = model_dir.parent / "figures" / "training_curves.png"
    if curves.is_file():
        shutil.copy(curves, eval_dir / "figures" / "training_curves.png")

    side = f" on the patient's {model.config.keep_side}" if model.config.keep_side else ""
    model.config.metrics = {
        "split": f"held-out cases of {_test_set_name(test_dir)} ({len(per_case)} cases), original voxel grid"
        + (", without clinical data (no clinical.csv)" if without_clinical else "")
        + (f", largest connected {' + '.join(model.config.keep_largest)} component{side} kept"
           if model.config.keep_largest else "")
        + "".join(f", largest {name} component kept" for name in model.config.single_component)
        + (", {lesion} components touching the {organ} on under {min_contact:.0%} of their surface dropped".format(
            **model.config.lesion_in_organ) if model.config.lesion_in_organ else "")
        + ("; labels from the probabilities resampled to that grid" if model.config.label_resampling == "probabilities"
           else ""),
        **card_metrics(summary),
    }
    # the fine-tuning run's validation Dice, when config.json holds it; a folder published before holds the metrics of
    # its own held-out set instead, which are no validation figure
    training = trained_metrics or {}
    validation = None if str(training.get("split", "")).startswith("held-out") else training.get("mean_foreground_dice")
    card = {"training": {"validation (during fine-tuning)": validation}} if validation is not None else {}
    final = out / "model"
    model.save_pretrained(final, model_card_kwargs=card)

    # The published files must give back the same network, bit for bit.
    reloaded = NnyNet.from_pretrained(final)
    x = torch.randn(1, 1, *model.config.patch_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if not torch.equal(model.eval()(x), reloaded(x)):
            raise RuntimeError(f"{final}: reloaded model gives different outputs than the saved one")
    if repo_id:
        model.push_to_hub(repo_id, model_card_kwargs=card)

    example = discover_cases(test_dir)[0]
    row = out / "prediction" / f"{example.case_id}_clinical.json"
    row.parent.mkdir(parents=True, exist_ok=True)
    if (test_dir / "clinical.csv").is_file():  # a case without a row gets every value missing, as in evaluation
        table = read_clinical_csv(test_dir / "clinical.csv")
        clinical = table.reindex([example.case_id]).iloc[0].to_dict()
        clinical = {"case_id": example.case_id, **{k: (None if is_missing(v) else v) for k, v in clinical.items()}}
        row.write_text(json.dumps(clinical, default=str))  # with its case_id, so predict checks the match
    return {
        "summary": summary,
        "dice": {name: stats["dice_mean"] for name, stats in summary["per_class"].items()},
        "report_md": eval_dir / "metrics.md",
        "figures_dir": eval_dir / "figures",
        "example_input": Path(example.image),
        "example_clinical": row,
    }


def _check_label_map(test_dir: Path, label_names: Sequence[str]) -> None:
    """A test set whose dataset.json names its label values ("labels", as fine-tuning reads them) must name them as
    the model does: scored as they are, liver = 2 in the files against the model's liver = 1 would swap the classes'
    metrics. A folder without a "labels" entry is taken to use the model's map."""
    meta = test_dir / "dataset.json"
    if not meta.is_file():
        return
    try:
        stated = "labels" in json.loads(meta.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError):
        stated = True  # let the reader below name what is wrong
    if not stated:
        return
    from finetune.run import _label_names  # the one reader of dataset.json's labels (lazy: run.py is heavy)

    names = _label_names(test_dir)
    if names != list(label_names):
        raise ValueError(f"{meta}: field \"labels\" names the label values {dict(enumerate(names))}, but the model "
                         f"predicts {dict(enumerate(label_names))}; expected the model's label map (relabel the test "
                         "set, or evaluate a model trained with these labels)")


def _check_output_dir(model_dir: Path, out: Path) -> None:
    """Publish writes OUT/eval, OUT/model and OUT/prediction: none of them may land in the model folder being
    evaluated (OUT/model = that folder would overwrite its config.json and card with the held-out metrics and any
    post-processing override, and lose its validation figures; OUT inside it would mix reports into the model's
    files). Refused before any work, naming both paths."""
    if not model_dir.is_dir():
        return  # from_pretrained names what is wrong with it
    model, target = model_dir.resolve(), out.expanduser().resolve()
    if (target / "model").resolve() == model:
        raise ValueError(f"--output_dir {out}: its model/ sub-folder is the model being published ({model_dir}), "
                         "which would be overwritten; choose another --output_dir")
    if target == model or model in target.parents:
        raise ValueError(f"--output_dir {out} lies inside the model folder {model_dir}; reports and the published "
                         "model would be written among its files; choose a folder outside it")


def _test_set_name(test_dir: Path) -> str:
    """The test set as the card names it: its folder (or manifest) name and its parent, e.g. 'runs/test20'."""
    path = test_dir.expanduser().resolve()
    return "/".join(part for part in (path.parent.name, path.name) if part)


def _lesion_rule(config: Any, min_contact: float) -> dict[str, Any] | None:
    """config.lesion_in_organ with ``min_contact`` (0 = no rule), checked against the model's labels."""
    if min_contact == 0:
        return None
    rule = dict(config.lesion_in_organ or {"lesion": "tumor", "organ": "liver"}, min_contact=min_contact)
    try:
        return check_lesion_in_organ(rule, list(config.label_names))
    except ValueError as e:
        raise ValueError(f"--lesion_min_contact {min_contact}: {e}") from e


@dataclass
class PublishConfig:
    model: str = "runs/finetune/model"  # fine-tuned export (save_pretrained directory)
    test_dir: str = "runs/pipeline/data/test"  # held-out labeled cases (any layout nny_models.io reads)
    output_dir: str = "runs/publish"  # eval/ reports and figures, model/ for the published files
    repo_id: str | None = None  # Hub repo to push to (needs a token); None = local only
    keep_largest: tuple[str, ...] | None = None  # labels forming one organ whose largest component predict keeps;
    # None = as the model was trained, a bare flag = no post-processing
    lesion_min_contact: float | None = None  # drop tumor components touching the liver on less than this share of
    # their surface (config.json lesion_in_organ); None = as the model was trained, 0 = keep every component
    single_component: tuple[str, ...] | None = None  # labels each kept as its largest component (e.g. aorta);
    # None = as the model was trained, a bare flag = none
    label_resampling: str | None = None  # "probabilities" (the softmax resampled to the CT's grid, then argmax) or
    # "nearest" (the model grid's labels); None = as the model was trained


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(PublishConfig, argv, description=__doc__.splitlines()[0])
    result = evaluate_and_publish(
        Path(cfg.model), Path(cfg.test_dir), Path(cfg.output_dir), cfg.repo_id, keep_largest=cfg.keep_largest,
        lesion_min_contact=cfg.lesion_min_contact, single_component=cfg.single_component,
        label_resampling=cfg.label_resampling,
    )
    print(result["report_md"].read_text())


if __name__ == "__main__":
    run_main(main, "finetune.publish")  # bad input: one line "finetune.publish: error: ...", exit code 2
