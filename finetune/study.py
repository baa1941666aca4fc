"""The nnY-Net study: does the clinical fusion help, measured against controls, over seeds, with paired CIs.

    python -m finetune.study [--output_dir runs/study] [--models nnynet] [--fusions none cross_attention] \\
        [--permuted cross_attention] [--seeds 0 1 2] [--steps 1000] [--pretrained runs/pipeline/pretrain/model]

Arms per model and seed: every fusion in --fusions, plus every fusion in --permuted trained AND tested with the
clinical rows permuted across patients (a permuted clinical.csv passed through --clinical_csv: the image-label
pairs are intact, the clinical data carries no patient information). Every fusion arm is also tested with
clinical=None. Each fine-tune is a subprocess of finetune/run.py; a finished run (model/ exported and, where its
checkpoints are kept, the last one at --steps) is not retrained, and a run whose study_eval.json covers the current
held-out cases is not re-evaluated, so a long grid can run in parts (rerun the command). A run that crashed is
continued from its newest checkpoint (finetune/run.py --resume); a finished run trained with other settings
(steps, seed, fusion, model) is refused rather than mixed into the table. If a run fails, the report is written
for the runs finished so far before the error is raised.

Writes study.json (every run, every case) and study.md: per class mean +- std over seeds (each seed's value is
the mean over the held-out cases), and paired per-case comparisons of tumor Dice (cross_attention - none,
cross_attention - permuted, clinical - no clinical at test) with percentile-bootstrap 95% CIs over cases.
``python -m finetune.ablation`` is the same command (the former fusion ablation; its grid is --fusions none add
concat cross_attention --permuted with no value --models swinunetr mednext_s nnynet --seeds 0).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from finetune.pipeline import finetune_precision, finetune_processes, finetune_workers, stage_command, validation_folds
from nny_models.training import checkpoint_dirs, parse_config, run_main, write_text_atomic

REPO = Path(__file__).resolve().parents[1]
PERMUTED = "_permuted"  # arm suffix of the permuted-clinical control
NO_CLINICAL = "none at test"  # test condition of the clinical=None control


@dataclass
class StudyConfig:
    output_dir: str = "runs/study"  # runs/<model>_<arm>_s<seed>/, data/, study.md, study.json
    models: tuple[str, ...] = ("nnynet",)  # zoo names to compare
    fusions: tuple[str, ...] = ("none", "cross_attention")  # fusion modes trained with the true clinical rows
    permuted: tuple[str, ...] = ("cross_attention",)  # fusion modes also trained+tested with permuted clinical rows
    seeds: tuple[int, ...] = (0, 1, 2)  # one run per seed and arm (model init, split, sampling, permutation)
    steps: int = 1800  # fine-tuning steps per run (the pipeline's budget)
    pretrained: str = "none"  # nnynet runs start from this export (e.g. runs/pipeline/pretrain/model); "none" =
    # scratch. Other models always train from scratch. Nothing is looked up implicitly
    size: str = "tiny"  # zoo size preset when training from scratch (a pretrained export brings its own network)
    data_dir: str | None = None  # labeled training cases + clinical.csv; None = generated phantoms
    test_dir: str | None = None  # labeled held-out cases + clinical.csv; None = generated phantoms
    train_cases: int = 96  # phantoms generated for training when data_dir is None (the pipeline's count)
    test_cases: int = 8  # phantoms generated for testing when test_dir is None
    data_seed: int = 0  # phantom seed (the test set uses data_seed + 1000)
    spacing: tuple[float, float, float] | None = None  # preprocessing spacing (mm); None = planned from the data,
    # as in the pipeline
    hu_window: tuple[float, float] | None = None  # a fixed HU window; None = the planned foreground z-score, as in
    # the pipeline
    patch_size: tuple[int, int, int] = (64, 64, 32)  # training patch / sliding-window ROI, as in the pipeline
    batch_size: int = 1  # patches per step (all processes together), as in the pipeline
    processes: int | None = None  # DDP processes per fine-tune; None = as the pipeline picks (2 on a CPU-only
    # machine with >= 2 cores and an even batch, else 1)
    fg_prob: float = 0.8  # foreground-centred patches, as in the pipeline
    fg_class_weights: tuple[float, ...] | None = (1.0, 4.0, 1.5, 1.0)  # per foreground label, as in the pipeline
    class_weights: tuple[float, ...] | None = (1.0, 1.0, 5.0, 2.0, 1.0)  # focal/CE per label, as in the pipeline
    lr: float = 4e-3  # fine-tuning peak LR, as in the pipeline
    encoder_lr_scale: float = 1.0  # the encoder's LR factor, as in the pipeline
    finetune_precision: str = "auto"  # autocast of each fine-tune, as in the pipeline: "auto" (bf16 where fast), "bf16"
    # or "no" (fp32; the README's study table was measured so)
    val_every: int = 0  # validation during fine-tuning (0 = only at the end)
    bootstrap: int = 2000  # bootstrap resamples for the CIs
    num_workers: int | None = None  # DataLoader workers of each fine-tune process; None = as the pipeline (2 for one
    # process, 1 for each of several)


def bootstrap_ci(diffs: Any, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> dict[str, float]:
    """Mean of paired differences and its percentile-bootstrap CI (resampling cases with replacement).

    NaN / None entries (a case where the metric is undefined) are dropped; returns {mean, lo, hi, n}. With one
    case there is no spread to resample: lo and hi are NaN (a zero-width CI would claim certainty). Identical
    values give lo = hi = mean exactly."""
    if not 0 < level < 1:
        raise ValueError(f"bootstrap_ci: level must be in (0, 1), got {level}")
    if int(n_boot) != n_boot or n_boot < 1:  # 0 resamples used to fail with an IndexError after the whole study
        raise ValueError(f"bootstrap_ci: n_boot must be a positive integer, got {n_boot}")
    d = np.asarray([math.nan if v is None else v for v in np.asarray(diffs, dtype=object).ravel()], dtype=np.float64)
    d = d[np.isfinite(d)]
    if d.size == 0:
        return {"mean": math.nan, "lo": math.nan, "hi": math.nan, "n": 0}
    mean = float(d.mean())
    if d.size == 1:
        return {"mean": mean, "lo": math.nan, "hi": math.nan, "n": 1}
    if np.all(d == d[0]):  # every resample has the same mean; without this, rounding can put lo above the mean
        return {"mean": mean, "lo": mean, "hi": mean, "n": int(d.size)}
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(int(n_boot), d.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {"mean": mean, "lo": float(lo), "hi": float(hi), "n": int(d.size)}


def permuted_clinical(src: Path, dst: Path, seed: int) -> Path:
    """clinical.csv with its rows shuffled across patients (case_id kept in place); a derangement when possible."""
    import pandas as pd

    table = pd.read_csv(src, dtype=str, keep_default_na=False)
    if "case_id" not in table.columns:
        raise ValueError(f"{src}: expected a case_id column")
    rng = np.random.default_rng(seed)
    n = len(table)
    order = rng.permutation(n)
    for _ in range(100):  # no patient keeps its own row (n >= 2)
        if n < 2 or not (order == np.arange(n)).any():
            break
        order = rng.permutation(n)
    values = table.drop(columns="case_id").iloc[order].reset_index(drop=True)
    out = pd.concat([table[["case_id"]], values], axis=1)[table.columns]
    dst.parent.mkdir(parents=True, exist_ok=True)
    out.to_csv(dst, index=False)
    return dst


def arms(cfg: StudyConfig) -> list[tuple[str, str, bool]]:
    """(arm name, fusion, permuted) in table order."""
    return [(f, f, False) for f in cfg.fusions] + [(f + PERMUTED, f, True) for f in cfg.permuted]


def evaluate_run(model_dir: Path, test_dir: Path, clinical_csv: Path | None, *, no_clinical: bool) -> dict[str, dict]:
    """{condition: {case_id: {class: dice}}} on the held-out cases; conditions "clinical" (+ NO_CLINICAL)."""
    from finetune.evaluate import evaluate_case
    from nny_models.hub import NnyNet
    from nny_models.inference import predict
    from nny_models.io import discover_cases, load_volume, read_clinical_csv

    model = NnyNet.from_pretrained(model_dir)
    records = [r for r in discover_cases(test_dir) if r.label is not None]
    if not records:
        raise ValueError(f"{test_dir}: no labeled cases to evaluate")
    fused = getattr(model.net, "fusion", None) is not None
    table = read_clinical_csv(clinical_csv, case_ids=[r.case_id for r in records]) if fused and clinical_csv else None
    conditions = {"clinical": True} | ({NO_CLINICAL: False} if fused and no_clinical else {})
    out: dict[str, dict] = {c: {} for c in conditions}
    for r in records:
        gt, affine = load_volume(r.label)
        spacing = tuple(float(s) for s in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))
        for condition, use in conditions.items():
            row = table.loc[r.case_id].to_dict() if (use and table is not None) else None
            pred = predict(model, r.image, clinical=row)
            metrics = evaluate_case(pred, np.rint(gt).astype(np.int64), spacing, model.config.label_names)
            out[condition][r.case_id] = {name: c["dice"] for name, c in metrics["classes"].items()}
    return out


def check_config(cfg: StudyConfig) -> None:
    """Refuse a bad grid before any data is generated or any run starts."""
    from nny_models.fusion import check_fusion_args
    from nny_models.zoo import list_models

    unknown = [m for m in cfg.models if m not in list_models()]
    if unknown or not cfg.models:
        raise ValueError(f"--models: unknown {unknown or 'empty list'}; expected names from {list_models()}")
    for f in (*cfg.fusions, *cfg.permuted):
        check_fusion_args(f, 1)
    if "none" in cfg.permuted:
        raise ValueError("--permuted: 'none' uses no clinical data, so permuting it is meaningless")
    finetune_precision(cfg.finetune_precision)  # 'auto', 'bf16' or 'no'
    finetune_processes(cfg.processes, cfg.batch_size)
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds):
        raise ValueError(f"--seeds: expected distinct seeds, got {list(cfg.seeds)}")
    if cfg.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {cfg.steps}")
    if cfg.bootstrap < 1:  # checked now, not after hours of training when the report is written
        raise ValueError(f"--bootstrap must be >= 1 resamples, got {cfg.bootstrap}")
    if cfg.pretrained == "auto":  # it used to mean runs/pretrain/model, which fine-tuning no longer accepts
        raise ValueError("--pretrained auto is gone: pass the export directory (e.g. runs/pipeline/pretrain/model) "
                         "or none")


RUN_SETTINGS = ("model", "fusion", "seed", "max_steps")  # what a finished run must have been trained with


def _last_logged_step(run_dir: Path) -> int | None:
    """The highest step in run_dir/metrics.jsonl (None without the file); unreadable lines (a crash mid-write) are
    skipped. The row of the last step is logged after the final validation and export."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    steps = [0]
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            steps.append(row["step"])
    return max(steps)


def run_state(run_dir: Path, expected: dict[str, Any]) -> str:
    """"done" (exported and finished), "resume" (checkpoints of an unfinished run) or "fresh" (nothing to keep).

    A crash leaves checkpoints/ and, with --val_every, a model/ exported at an intermediate best: such a model is
    not the run's result. finetune/run.py validates (and exports a new best) at max_steps, logs that step's row in
    metrics.jsonl and then saves the last checkpoint, so a run is finished when either reached max_steps. A model/
    with neither file beside it (cleaned up after the run) is taken as finished.
    ``expected``: the RUN_SETTINGS a finished run's run_config.json must match (ValueError otherwise)."""
    exported = (run_dir / "model" / "config.json").is_file()
    newest = checkpoint_dirs(run_dir)
    seen = [s for s in (int(newest[0].name.split("_")[1]) if newest else None, _last_logged_step(run_dir))
            if s is not None]
    if exported and (not seen or max(seen) >= expected["max_steps"]):
        try:
            saved = json.loads((run_dir / "run_config.json").read_text())
        except (OSError, UnicodeDecodeError, ValueError):
            saved = {}
        diffs = [f"{k} {saved[k]!r} (asked {expected[k]!r})" for k in RUN_SETTINGS
                 if isinstance(saved, dict) and k in saved and saved[k] != expected[k]]
        if diffs:  # e.g. --steps changed between two invocations: the table would mix budgets
            raise ValueError(f"{run_dir} holds a run trained with other settings ({'; '.join(diffs)}); delete it or "
                             "choose another --output_dir")
        return "done"
    if not exported and seen and max(seen) >= expected["max_steps"] and newest:
        # finished training without model/ (deleted?): a --resume at max_steps trains nothing and exports nothing
        raise ValueError(f"{run_dir} holds a finished run's checkpoints but no model/ export; delete its "
                         f"{newest[0].parent.name}/ folder to train it again")
    return "resume" if newest else "fresh"


def expected_conditions(fusion: str, permuted: bool) -> set[str]:
    """The test conditions evaluate_run gives a run of ``fusion``."""
    return {"clinical"} | ({NO_CLINICAL} if fusion != "none" and not permuted else set())


def load_eval(eval_file: Path, conditions: set[str], case_ids: set[str]) -> dict[str, dict] | None:
    """study_eval.json when it is complete for these conditions and exactly these held-out cases, else None
    (then the run is evaluated again): a truncated file from a killed evaluation, or one made on another test set,
    must neither stop the study nor enter its table."""
    try:
        result = json.loads(eval_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(result, dict) or set(result) != conditions:
        return None
    for cases in result.values():
        if not isinstance(cases, dict) or set(cases) != case_ids:
            return None
        for row in cases.values():
            if not isinstance(row, dict) or not all(v is None or isinstance(v, (int, float)) for v in row.values()):
                return None
    return result


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(StudyConfig, argv, description=__doc__.splitlines()[0])
    check_config(cfg)
    from nny_models.io import discover_cases
    from nny_models.phantoms import write_dataset

    out = Path(cfg.output_dir).resolve()
    train = Path(cfg.data_dir).resolve() if cfg.data_dir else out / "data" / "train"
    test = Path(cfg.test_dir).resolve() if cfg.test_dir else out / "data" / "test"
    for path, given, cases, seed in ((train, cfg.data_dir, cfg.train_cases, cfg.data_seed),
                                     (test, cfg.test_dir, cfg.test_cases, cfg.data_seed + 1000)):  # fmt: skip
        if not given and not (path / "dataset.json").is_file():
            write_dataset(path, cases=cases, seed=seed, workers=2)
    folds = validation_folds(sum(r.label is not None for r in discover_cases(train)))  # ~5 validate, as the pipeline
    needs_clinical = [a for a, f, _ in arms(cfg) if f != "none"]
    for path in (train, test):
        if needs_clinical and not (path / "clinical.csv").is_file():
            raise ValueError(f"{path}: arms {needs_clinical} need a clinical.csv there")

    command = "python -m finetune.study " + " ".join(argv if argv is not None else sys.argv[1:])
    note = (f"Budget per run: {cfg.steps} steps, batch {cfg.batch_size}, patch {cfg.patch_size}; nnynet from "
            f"pretrained={cfg.pretrained!r}, others from scratch (size {cfg.size}); seeds {list(cfg.seeds)}; "
            f"held-out cases: {test}. Command: `{command.strip()}`")  # fmt: skip
    test_ids = {r.case_id for r in discover_cases(test) if r.label is not None}
    runs: list[dict] = []
    try:
        _run_grid(cfg, out, train, test, folds, test_ids, runs)
    except BaseException as e:  # a failed or interrupted run: keep what finished readable, then fail as before
        if runs:
            try:
                write_report(runs, out, note + f"\n\nINCOMPLETE: the study stopped ({type(e).__name__}: {e}); "
                             f"{len(runs)} run(s) reported. Rerun the command to continue.", n_boot=cfg.bootstrap)
            except Exception as report_error:  # never hide the run's own error behind the report's
                print(f"finetune.study: could not write the partial report: {report_error}", file=sys.stderr)
        raise
    print(write_report(runs, out, note, n_boot=cfg.bootstrap))


def _run_grid(cfg: StudyConfig, out: Path, train: Path, test: Path, folds: int, test_ids: set[str],
              runs: list[dict]) -> None:
    """Train (or continue) and evaluate every run of the grid, appending each finished one to ``runs``."""
    for model in cfg.models:
        for seed in cfg.seeds:
            for arm, fusion, permuted in arms(cfg):
                run_dir = out / "runs" / f"{model}_{arm}_s{seed}"
                train_csv, test_csv = train / "clinical.csv", test / "clinical.csv"
                if permuted:
                    train_csv = permuted_clinical(train_csv, run_dir / "clinical_train_permuted.csv", seed)
                    test_csv = permuted_clinical(test_csv, run_dir / "clinical_test_permuted.csv", seed + 1)
                eval_file = run_dir / "study_eval.json"
                state = run_state(run_dir, {"model": model, "fusion": fusion, "seed": seed, "max_steps": cfg.steps})
                if state != "done":
                    pretrained = cfg.pretrained if model == "nnynet" else "none"
                    processes = finetune_processes(cfg.processes, cfg.batch_size)
                    precision = finetune_precision(cfg.finetune_precision)
                    workers = cfg.num_workers if cfg.num_workers is not None else finetune_workers(processes)
                    cmd = ["finetune/run.py", "--data_dir", str(train), "--output_dir", str(run_dir),
                           "--pretrained", pretrained, "--model", model, "--fusion", fusion, "--folds", str(folds),
                           "--max_steps", str(cfg.steps), "--val_every", str(cfg.val_every), "--seed", str(seed),
                           "--patch_size", *map(str, cfg.patch_size), "--batch_size", str(cfg.batch_size // processes),
                           "--fg_prob", str(cfg.fg_prob), "--lr", str(cfg.lr),
                           "--encoder_lr_scale", str(cfg.encoder_lr_scale),
                           "--mixed_precision", precision, "--num_workers", str(workers),
                           "--cache_dir", str(out / "cache")]  # fmt: skip
                    if pretrained == "none":  # an export's network (e.g. the pipeline's feature_size 24) is its own
                        cmd += ["--size", cfg.size]
                    for flag in ("spacing", "hu_window", "fg_class_weights", "class_weights"):
                        if getattr(cfg, flag) is not None:
                            cmd += [f"--{flag}", *map(str, getattr(cfg, flag))]
                    if fusion != "none":
                        cmd += ["--clinical_csv", str(train_csv)]
                    if state == "resume":  # a crashed run: without --resume, run.py refuses its checkpoints
                        cmd += ["--resume"]
                    cmd = stage_command(cmd, processes, precision)
                    eval_file.unlink(missing_ok=True)  # it scored the model this training replaces
                    print("\n$ " + " ".join(cmd), flush=True)
                    subprocess.run(cmd, check=True, cwd=REPO)
                result = load_eval(eval_file, expected_conditions(fusion, permuted), test_ids)
                if result is None:
                    result = evaluate_run(run_dir / "model", test, test_csv if fusion != "none" else None,
                                          no_clinical=not permuted)
                    # atomic: a kill while writing must not leave a truncated file that a rerun trips over
                    write_text_atomic(eval_file, json.dumps(_plain(result), indent=1, allow_nan=False))
                runs.append({"model": model, "arm": arm, "fusion": fusion, "permuted": permuted, "seed": seed,
                             "cases": result})  # fmt: skip


def summarize_runs(runs: list[dict], n_boot: int = 2000) -> dict[str, Any]:
    """Per (model, arm, condition): per class mean/std over seeds; paired tumor-Dice comparisons with CIs."""
    rows, groups = [], {}
    for r in runs:
        for condition, cases in _as_nan(r["cases"]).items():
            groups.setdefault((r["model"], r["arm"], condition), []).append((r["seed"], cases))
    for (model, arm, condition), seeds in groups.items():
        classes = sorted({c for _, cases in seeds for row in cases.values() for c in row}, key=_class_order)
        per_seed = {c: [_nanmean([row.get(c, math.nan) for row in cases.values()]) for _, cases in seeds]
                    for c in classes}  # fmt: skip
        stats = {c: {"mean": _nanmean(v), "std": _nanstd(v)} for c, v in per_seed.items()}
        rows.append({"model": model, "arm": arm, "condition": condition, "seeds": len(seeds), "classes": stats})

    comparisons = []
    models = list(dict.fromkeys(r["model"] for r in runs))
    arm_names = list(dict.fromkeys(r["arm"] for r in runs))
    for model in models:
        for a in [x for x in arm_names if x != "none" and not x.endswith(PERMUTED)]:
            pairs = [((a, "clinical"), ("none", "clinical")), ((a, "clinical"), (a + PERMUTED, "clinical")),
                     ((a, "clinical"), (a, NO_CLINICAL))]  # fmt: skip
            for left, right in pairs:
                paired = _paired(groups.get((model, *left)), groups.get((model, *right)), "tumor")
                if paired is None:
                    continue
                diff, seeds = paired
                name = f"{left[0]} - {right[0]}" if left[1] == right[1] else f"{a}: clinical - {right[1]}"
                # seeds: how many both sides share (a missing run drops its seed from the pairing, not silently)
                comparisons.append({"model": model, "comparison": name, "seeds": len(seeds),
                                    **bootstrap_ci(diff, n_boot)})
    return {"rows": rows, "comparisons": comparisons}


def _paired(left, right, cls: str) -> tuple[list[float], list[int]] | None:
    """(per-case differences of ``cls`` Dice, the seeds used): each case's value averaged over the seeds both
    sides share, on the cases every one of those seeds scored on both sides."""
    if not left or not right:
        return None
    lseeds, rseeds = dict(left), dict(right)
    shared = sorted(set(lseeds) & set(rseeds))
    if not shared:
        return None
    cases = sorted(set.intersection(*[set(lseeds[s]) & set(rseeds[s]) for s in shared]))
    out = []
    for case in cases:
        d = [_num(lseeds[s][case].get(cls)) - _num(rseeds[s][case].get(cls)) for s in shared]
        out.append(_nanmean(d))
    return out, shared


def write_report(runs: list[dict], out: Path, note: str, n_boot: int = 2000) -> str:
    """study.json (runs + summary) and study.md; returns the Markdown."""
    summary = summarize_runs(runs, n_boot)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(_plain({"note": note, "runs": runs, **summary}), indent=1,
                                               allow_nan=False))
    classes = sorted({c for r in summary["rows"] for c in r["classes"]}, key=_class_order)
    head = ["model", "arm", "test clinical", "seeds", *classes]
    lines = ["Dice per class, mean ± std over seeds (each seed: mean over the held-out cases).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
    for r in summary["rows"]:
        if r["arm"].endswith(PERMUTED):
            cond = "permuted"
        elif r["arm"] == "none":
            cond = "n/a"
        else:
            cond = "patient's" if r["condition"] == "clinical" else "none"
        cells = [_pm(r["classes"].get(c)) for c in classes]
        lines.append(f"| {r['model']} | {r['arm']} | {cond} | {r['seeds']} | " + " | ".join(cells) + " |")
    lines += ["", "Paired per-case differences of tumor Dice (seeds averaged per case), percentile bootstrap 95% CI "
              "(n/a with one case).", "", "| model | comparison | cases | mean Δ tumor Dice | 95% CI | seeds paired |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for c in summary["comparisons"]:
        lines.append(f"| {c['model']} | {c['comparison']} | {c['n']} | {_fmt(c['mean'], '+.3f')} | "
                     f"[{_fmt(c['lo'], '+.3f')}, {_fmt(c['hi'], '+.3f')}] | {c.get('seeds', 'n/a')} |")
    text = "\n".join(lines) + "\n\n" + note + "\n"
    (out / "study.md").write_text(text)
    return text


def _class_order(name: str) -> tuple[int, str]:
    order = ["liver", "tumor", "portal_vein", "aorta"]
    return (order.index(name) if name in order else len(order), name)


def _pm(stats: dict | None) -> str:
    if not stats or math.isnan(_num(stats["mean"])):
        return "n/a"
    std = _num(stats.get("std"))
    return f"{stats['mean']:.3f} ± {std:.3f}" if not math.isnan(std) else f"{stats['mean']:.3f}"


def _fmt(v: float | None, spec: str) -> str:
    if v is None or not math.isfinite(v):
        return "n/a"
    return format(round(v, 3) + 0.0, spec)  # + 0.0: no "-0.000"


def _num(x: Any) -> float:
    """A Dice value as float, None (JSON null) and non-finite values as NaN."""
    if x is None:
        return math.nan
    x = float(x)
    return x if math.isfinite(x) else math.nan


def _nanmean(values) -> float:
    v = [x for x in map(_num, values) if not math.isnan(x)]
    return float(np.mean(v)) if v else math.nan


def _nanstd(values) -> float:
    v = [x for x in map(_num, values) if not math.isnan(x)]
    return float(np.std(v, ddof=1)) if len(v) > 1 else math.nan


def _plain(obj):
    """NaN / Inf -> None and numpy scalars -> Python numbers, so the JSON is strict."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _as_nan(obj):
    """None -> NaN (the inverse of _plain for per-case Dice read back from study_eval.json)."""
    if isinstance(obj, dict):
        return {k: _as_nan(v) for k, v in obj.items()}
    return math.nan if obj is None else obj


if __name__ == "__main__":
    run_main(main, "finetune.study")  # bad input: one line "finetune.study: error: ...", exit code 2
