"""The nnY-Net fusion ablation: fusion none / add / concat / cross_attention on swinunetr, mednext and nnynet.

    python -m finetune.ablation [--output_dir runs/ablation] [--steps 200] [--models swinunetr mednext_s nnynet]

Every run gets the same budget (steps, patch, batch, data, seed), trains from scratch (the pretrained export
exists only for nnynet, and giving one arm a head start would confound the fusion comparison), and is
evaluated on the same held-out phantoms through ``nny_models.predict``. Writes ablation.md and ablation.json.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pretrain.training import parse_config

REPO = Path(__file__).resolve().parents[1]
FUSIONS = ("none", "add", "concat", "cross_attention")


@dataclass
class AblationConfig:
    output_dir: str = "runs/ablation"  # one sub-folder per (model, fusion) run, plus ablation.md / ablation.json
    models: tuple[str, ...] = ("swinunetr", "mednext_s", "nnynet")  # zoo names to compare
    fusions: tuple[str, ...] = FUSIONS  # fusion modes to compare
    size: str = "tiny"  # zoo size preset for every model
    steps: int = 200  # fine-tuning steps per run (the fixed budget; the 12-run grid took 39.5 min on 2 CPU cores)
    spacing: tuple[float, float, float] = (3.0, 3.0, 4.0)  # preprocessing spacing (mm), as in the pipeline
    hu_window: tuple[float, float] = (-200.0, 300.0)  # soft-tissue HU window, as in the pipeline
    patch_size: tuple[int, int, int] = (96, 96, 32)  # training patch / sliding-window ROI, as in the pipeline
    batch_size: int = 1  # patches per step, as in the pipeline
    train_cases: int = 24  # labeled phantoms for training (shared by all runs)
    test_cases: int = 6  # held-out phantoms for the table (shared by all runs)
    seed: int = 0  # same seed for every run


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(AblationConfig, argv, description=__doc__.splitlines()[0])
    from finetune.publish import evaluate_dataset
    from nny_models.hub import NnyNet
    from nny_models.phantoms import write_dataset

    out = Path(cfg.output_dir).resolve()
    train, test = out / "data" / "train", out / "data" / "test"
    for path, cases, seed in ((train, cfg.train_cases, cfg.seed), (test, cfg.test_cases, cfg.seed + 1000)):
        if not (path / "dataset.json").is_file():
            write_dataset(path, cases=cases, seed=seed, workers=2)

    rows = []
    for model in cfg.models:
        for fusion in cfg.fusions:
            run_dir = out / f"{model}_{fusion}"
            if not (run_dir / "model" / "config.json").is_file():
                cmd = [sys.executable, "finetune/run.py", "--data_dir", str(train), "--output_dir", str(run_dir),
                       "--pretrained", "none", "--model", model, "--size", cfg.size, "--fusion", fusion,
                       "--max_steps", str(cfg.steps), "--val_every", "0", "--seed", str(cfg.seed),
                       "--cache_dir", str(out / "cache"), "--spacing", *map(str, cfg.spacing),
                       "--hu_window", *map(str, cfg.hu_window), "--patch_size", *map(str, cfg.patch_size),
                       "--batch_size", str(cfg.batch_size)]  # fmt: skip
                print("\n$ " + " ".join(cmd), flush=True)
                subprocess.run(cmd, check=True, cwd=REPO)
            _, summary = evaluate_dataset(NnyNet.from_pretrained(run_dir / "model"), test, run_dir / "eval", overlays=0)
            per_class = summary["per_class"]
            rows.append({
                "model": model, "fusion": fusion, "mean_dice": summary["mean_dice"], "miou": summary["miou"],
                "mean_hd95": _nanmean([c["hd95_mean"] for name, c in per_class.items() if name != "background"]),
                **{f"dice_{name}": c["dice_mean"] for name, c in per_class.items() if name != "background"},
            })  # fmt: skip

    note = (f"Budget per run: {cfg.steps} steps, size '{cfg.size}', from scratch, seed {cfg.seed}; "
            f"{cfg.train_cases} training / {cfg.test_cases} held-out phantoms. One seed: differences of a few "
            "Dice points are within run-to-run noise.")  # fmt: skip
    print(write_table(rows, out, note))


def write_table(rows: list[dict], out: Path, note: str) -> str:
    """ablation.json (the rows) and ablation.md (one line per run, the best mean Dice in bold); returns the Markdown."""
    plain = [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()} for r in rows]
    (out / "ablation.json").write_text(json.dumps({"note": note, "runs": plain}, indent=2, allow_nan=False))
    classes = [k for k in rows[0] if k.startswith("dice_")]
    header = ["model", "fusion", "mean Dice", "mIoU", "mean HD95 (mm)", *[c.removeprefix("dice_") for c in classes]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    best = max(rows, key=lambda r: -math.inf if math.isnan(r["mean_dice"]) else r["mean_dice"])
    for r in rows:
        values = [_fmt(v) for v in (r["mean_dice"], r["miou"], r["mean_hd95"], *[r[c] for c in classes])]
        if r is best:
            values[0] = f"**{values[0]}**"
        lines.append(f"| {r['model']} | {r['fusion']} | " + " | ".join(values) + " |")
    text = "\n".join(lines) + "\n\n" + note + "\n"
    (out / "ablation.md").write_text(text)
    return text


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _fmt(v: float) -> str:
    return "n/a" if v is None or math.isnan(v) else f"{v:.3f}"


if __name__ == "__main__":
    main()
