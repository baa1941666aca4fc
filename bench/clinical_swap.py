"""Does a saved model use the clinical row? Predict each held-out case with its own row, with another
patient's row (case i gets case i+1's) and with no clinical data, and compare.

    python bench/clinical_swap.py --model runs/pipeline/model --data runs/pipeline/data/test

Prints one JSON line per case (voxels whose label changes, largest class-probability change, Dice per
class of each variant) and summary lines in bench/_common.py's format: mean Dice with the own row
(ours) against the swapped row and against no row (peer), ratio = own / other. A model whose fusion is
inert changes no voxel; one that uses the clinical data changes voxels, and its Dice should drop with a
wrong row.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import device_name, emit  # noqa: E402
from finetune.evaluate import evaluate_case  # noqa: E402
from nny_models import NnyNet, predict  # noqa: E402
from nny_models.io import discover_cases, load_volume, read_clinical_csv  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="save_pretrained folder of a model with clinical fusion")
    p.add_argument("--data", required=True, help="labeled held-out cases with clinical.csv")
    args = p.parse_args(argv)

    model = NnyNet.from_pretrained(args.model)
    if not model.config.clinical_schema:
        raise SystemExit(f"{args.model}: the model has no clinical schema (fusion none); nothing to swap")
    data = Path(args.data)
    records = [r for r in discover_cases(data) if r.label is not None]
    if len(records) < 2:
        raise SystemExit(f"{data}: needs at least 2 labeled cases to swap rows")
    table = read_clinical_csv(data / "clinical.csv", case_ids=[r.case_id for r in records])
    labels = model.config.label_names
    dice = {v: {n: [] for n in labels[1:]} for v in ("own", "swapped", "none")}
    for i, record in enumerate(records):
        other = records[(i + 1) % len(records)].case_id
        rows = {"own": table.loc[record.case_id].to_dict(), "swapped": table.loc[other].to_dict(), "none": None}
        gt, affine = load_volume(record.label)
        gt = np.rint(gt).astype(np.int64)
        spacing = tuple(float(s) for s in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0)))
        out, probs = {}, {}
        for variant, row in rows.items():
            if row is not None:
                row = {k: v for k, v in row.items() if k != "case_id"}  # another patient's row on purpose
            out[variant], probs[variant] = predict(model, record.image, clinical=row, return_probabilities=True)
            case = evaluate_case(out[variant], gt, spacing, labels)
            for n in labels[1:]:
                dice[variant][n].append(case["classes"][n]["dice"])
        print(json.dumps({
            "case": record.case_id, "swapped_with": other,
            **{f"{v}_voxels_changed": int((out[v] != out["own"]).sum()) for v in ("swapped", "none")},
            **{f"{v}_max_prob_change": float(np.abs(probs[v] - probs["own"]).max()) for v in ("swapped", "none")},
            "dice": {v: {n: dice[v][n][-1] for n in labels[1:]} for v in dice},
        }), flush=True)
    device = device_name("cpu")
    for variant in ("swapped", "none"):
        for n in labels[1:]:
            ours, peer = np.nanmean(dice["own"][n]), np.nanmean(dice[variant][n])
            emit("clinical_swap", f"dice_{n}_own_vs_{variant}", float(ours), float(peer),
                 f"the same model with {'another patient' if variant == 'swapped' else 'no'} clinical row", "higher",
                 None, device, cases=len(records), model=str(args.model), fusion=model.config.model_kwargs.get("fusion"))


if __name__ == "__main__":
    main()
