"""nnynet beside nnU-Net v2 trained at the same budget on the same phantoms, both scored with nnynet's metrics.

Matched budget: the same number of optimizer steps, the same patch size (voxels) and the same batch size as the
nnynet fine-tuning run (read from its run_config.json), on CPU, with the same torch thread count. nnU-Net keeps
everything else of its own: its target spacing (unless --match_spacing), CT normalization, 3D U-Net, loss,
augmentation, poly LR schedule and 33 % foreground oversampling. It trains on the same cases as ours: nnynet's
fold (KFold over the sorted case ids, shuffled with the run's seed, as finetune/run.py splits) is written as
nnU-Net's splits_final.json, and nnU-Net trains that fold. Both sides predict the held-out test/ and test_ood/
folders of the pipeline's data/ on the original grid, and both are scored with finetune.evaluate (evaluate_case,
summarize): ours through finetune.publish.evaluate_dataset, the peer from its NIfTI predictions.

nnU-Net v2 is never a project dependency: it lives in a benchmark venv (see bench/plan_vs_nnunet.py's docstring to
create one), and this script calls its command-line tools by path. nnU-Net finds trainers by class name inside its
package, so this script writes its trainer (nnUNetTrainer_nnynetBudget, see TRAINER_SOURCE) into that venv's
site-packages/nnunetv2/training/nnUNetTrainer/: the venv is a benchmark environment, and that file is the only
change made to it. The trainer takes its budget from NNYNET_PEER_* environment variables, times every train step
(wall clock from one step's start to the next, data loading included, as nnynet's samples_per_s) and skips
nnU-Net's final fold validation (the held-out sets are scored here instead). Everything else (raw data, plans,
preprocessed data, results) goes to a work directory of this script; nothing of nnynet's run is written to.

    python bench/nnunet_peer.py --data /tmp/pf/data --ours /tmp/pf/model [--steps N] [--train_cases N]
        [--test_cases N] [--n_proc_da 1] [--threads 2] [--match_spacing] [--ours_no_postprocess] [--work_dir DIR]

--steps / --train_cases below the nnynet run's are for smoke tests: the JSON then says budget_matched false and
why. On 2 CPU cores nnU-Net's U-Net takes about 5-6 s per step at 96x96x32, batch 1 (loaded machine), so the
matched 1000-step run takes roughly 1.5-2 hours, most of it training.

Prints one JSON object per line (bench/_common.py's fields, ratio = ours / peer): Dice per class and held-out set,
mean Dice, small / large lesion detection, and seconds per training step, then one "setup" line that says whether
the budget was matched and how each side was run. If nnU-Net cannot be run here, it prints one JSON line with the
stage and the error instead, and exits 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.plan_vs_nnunet import DATASET_ID, label_map, nnunet_plan, ras_axes  # noqa: E402

BENCH = "nnunet_peer"
PEER_NAME = "nnU-Net v2 3d_fullres (PlainConvUNet), matched steps / patch / batch"
TRAINER_NAME = "nnUNetTrainer_nnynetBudget"
PLANS_NAME = "nnUNetPlans_nnynetBudget"
CONFIGURATION = "3d_fullres"
DATASET_NAME = f"Dataset{DATASET_ID:03d}_Phantoms"  # what plan_vs_nnunet.to_nnunet_raw writes
HELD_OUT = ("test", "test_ood")  # the pipeline's held-out sets under data/
STEP_TIMES = "nnynet_step_times.json"  # written by the trainer into its fold folder

TRAINER_SOURCE = '''"""nnU-Net trainer at nnynet's training budget (written by nnynet's bench/nnunet_peer.py).

This file lives in a benchmark venv only. The budget comes from environment variables set by the bench:
NNYNET_PEER_STEPS (total train iterations), NNYNET_PEER_ITERS_PER_EPOCH, NNYNET_PEER_VAL_ITERS and
NNYNET_PEER_THREADS (torch threads).
"""

import json
import os
import time

import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


def _env_int(name, minimum):
    value = os.environ.get(name, "")
    if not value.isdigit() or int(value) < minimum:
        raise RuntimeError(f"{name} must be an integer >= {minimum} (set by nnynet's bench/nnunet_peer.py), "
                           f"got {value!r}")
    return int(value)


class nnUNetTrainer_nnynetBudget(nnUNetTrainer):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        steps = _env_int("NNYNET_PEER_STEPS", 1)
        per_epoch = _env_int("NNYNET_PEER_ITERS_PER_EPOCH", 1)
        if steps % per_epoch:
            raise RuntimeError(f"NNYNET_PEER_STEPS={steps} is not a multiple of "
                               f"NNYNET_PEER_ITERS_PER_EPOCH={per_epoch}")
        self.num_iterations_per_epoch = per_epoch
        self.num_epochs = steps // per_epoch
        self.num_val_iterations_per_epoch = _env_int("NNYNET_PEER_VAL_ITERS", 1)
        torch.set_num_threads(_env_int("NNYNET_PEER_THREADS", 1))
        self._nnynet_steps = []  # [epoch, start, end] of every train step (perf_counter seconds)

    def train_step(self, batch):
        start = time.perf_counter()
        out = super().train_step(batch)
        self._nnynet_steps.append([self.current_epoch, start, time.perf_counter()])
        return out

    def on_train_end(self):
        super().on_train_end()
        record = {"trainer": type(self).__name__, "torch_threads": torch.get_num_threads(),
                  "num_epochs": self.num_epochs, "num_iterations_per_epoch": self.num_iterations_per_epoch,
                  "num_val_iterations_per_epoch": self.num_val_iterations_per_epoch,
                  "batch_size": self.configuration_manager.batch_size,
                  "patch_size": list(self.configuration_manager.patch_size), "steps": self._nnynet_steps}
        with open(os.path.join(self.output_folder, "nnynet_step_times.json"), "w") as f:
            json.dump(record, f)

    def perform_actual_validation(self, save_probabilities=False):
        # The bench scores the held-out sets itself with nnynet's metrics; the fold's sliding-window
        # validation would only spend CPU time here.
        self.print_to_log_file("nnUNetTrainer_nnynetBudget: final fold validation skipped (scored by the bench)")
'''

# Run inside the nnU-Net venv: the network topology nnU-Net's default planner derives for a given patch and
# spacing (the same calls as ExperimentPlanner.get_plans_for_configuration). Reads and prints JSON.
TOPOLOGY_SNIPPET = """
import json, sys
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
req = json.load(sys.stdin)
p = ExperimentPlanner(req["dataset"])
_, strides, kernels, patch, _ = get_pool_and_conv_props(req["spacing"], req["patch_size"],
                                                        p.UNet_featuremap_min_edge_length, 999999)
n = len(strides)
print(json.dumps({
    "patch_size": [int(v) for v in patch],
    "n_stages": n,
    "features_per_stage": [min(p.UNet_max_features_3d, p.UNet_base_num_features * 2 ** i) for i in range(n)],
    "kernel_sizes": [[int(v) for v in k] for k in kernels],
    "strides": [[int(v) for v in s] for s in strides],
    "n_conv_per_stage": list(p.UNet_blocks_per_stage_encoder[:n]),
    "n_conv_per_stage_decoder": list(p.UNet_blocks_per_stage_decoder[:n - 1]),
}))
"""


class StageError(RuntimeError):
    """A step of the nnU-Net run failed; ``stage`` names it in the error JSON."""

    def __init__(self, stage: str, message: str):
        super().__init__(message)
        self.stage = stage


# ---------------------------------------------------------------- pure parts (tested without nnU-Net)


def find_run_dir(model_dir: Path, run_dir: Path | None = None) -> Path:
    """The fine-tuning run folder (run_config.json + metrics.jsonl) of an exported model: given, the model's
    own folder, its parent (finetune/model), or a finetune/ sibling (the pipeline's published model/)."""
    candidates = [run_dir] if run_dir else [model_dir, model_dir.parent, model_dir.parent / "finetune"]
    for c in candidates:
        if c is not None and (c / "run_config.json").is_file() and (c / "metrics.jsonl").is_file():
            return c
    looked = ", ".join(str(c) for c in candidates if c is not None)
    raise FileNotFoundError(f"no fine-tuning run (run_config.json + metrics.jsonl) for {model_dir}; looked in {looked} "
                            "(pass --ours_run)")


def ours_budget(run_dir: Path) -> dict[str, Any]:
    """Steps, patch, batch, split and seconds per step of a nnynet fine-tuning run, from its own files.

    Seconds per step = batch / samples_per_s of each logged row (wall clock between log rows, data loading
    included), median over the rows after the first (warm-up); rows right after a validation or checkpoint
    carry that time too, which the median discards."""
    cfg = json.loads((run_dir / "run_config.json").read_text())
    for key in ("max_steps", "patch_size", "batch_size"):
        if cfg.get(key) is None:
            raise ValueError(f"{run_dir / 'run_config.json'}: field {key!r} missing or null")
    batch = int(cfg["batch_size"]) * int(cfg.get("grad_accum") or 1)
    rates = []
    for n, line in enumerate((run_dir / "metrics.jsonl").read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{run_dir / 'metrics.jsonl'}: line {n} is not JSON ({e})") from e
        if row.get("samples_per_s") and row.get("step", 0) > 1:
            rates.append(float(row["samples_per_s"]))
    if not rates:
        raise ValueError(f"{run_dir / 'metrics.jsonl'}: no samples_per_s rows after step 1")
    return {
        "run_dir": str(run_dir),
        "steps": int(cfg["max_steps"]),
        "patch_size": [int(v) for v in cfg["patch_size"]],
        "batch_size": batch,
        "folds": int(cfg.get("folds", 5)),
        "fold": int(cfg.get("fold", 0)),
        "seed": int(cfg.get("seed", 0)),
        "num_workers": cfg.get("num_workers"),
        "fusion": cfg.get("fusion"),
        "augment": cfg.get("augment"),
        "s_per_step": statistics.median(batch / r for r in rates),
        "s_per_step_rows": len(rates),
    }


def ours_split(case_ids: list[str], folds: int, fold: int, seed: int) -> tuple[list[str], list[str]]:
    """(train ids, validation ids) exactly as finetune/run.py's get_data splits the training cases."""
    from sklearn.model_selection import KFold

    ids = sorted(case_ids)
    k = min(folds, len(ids))
    train_idx, val_idx = list(KFold(k, shuffle=True, random_state=seed).split(ids))[fold % k]
    return [ids[i] for i in train_idx], [ids[i] for i in val_idx]


def epoch_layout(steps: int, max_per_epoch: int = 50) -> tuple[int, int]:
    """(epochs, iterations per epoch) with epochs * iterations == steps exactly: the largest divisor of
    ``steps`` up to ``max_per_epoch``. nnU-Net's poly LR decays per epoch, so short epochs keep it smooth."""
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    per_epoch = max(d for d in range(1, min(steps, max_per_epoch) + 1) if steps % d == 0)
    return steps // per_epoch, per_epoch


def subset_dataset(src: Path, dst: Path, n: int) -> Path:
    """An MSD folder at ``dst`` listing the first ``n`` labelled cases of ``src`` (by case id) with absolute paths,
    and the matching rows of clinical.csv (+ its .types.json), so that every reader sees only those cases."""
    import pandas as pd

    from nny_models.io import discover_cases

    records = sorted((r for r in discover_cases(src) if r.label is not None), key=lambda r: r.case_id)[:n]
    if not records:
        raise ValueError(f"{src}: no labelled cases")
    dst.mkdir(parents=True, exist_ok=True)
    meta = json.loads((src / "dataset.json").read_text()) if (src / "dataset.json").is_file() else {}
    meta.update(numTraining=len(records), test=[],
                training=[{"image": str(Path(r.image).resolve()), "label": str(Path(r.label).resolve())}
                          for r in records])
    (dst / "dataset.json").write_text(json.dumps(meta, indent=2))
    if (src / "clinical.csv").is_file():
        table = pd.read_csv(src / "clinical.csv", dtype=str, keep_default_na=False, na_filter=False)
        table[table["case_id"].isin({r.case_id for r in records})].to_csv(dst / "clinical.csv", index=False)
        if (src / "clinical.types.json").is_file():
            shutil.copy(src / "clinical.types.json", dst / "clinical.types.json")
    return dst


def to_plan_axes(values_ras: list[float], transpose_forward: list[int]) -> list[float]:
    """RAS (x, y, z) values -> nnU-Net plan axes (inverse of plan_vs_nnunet's mapping)."""
    return [values_ras[axis] for axis in ras_axes(transpose_forward)]


def budget_plans(plans: dict[str, Any], patch_plan: list[int], batch_size: int, topology: dict[str, Any],
                 spacing_plan: list[float] | None = None) -> dict[str, Any]:
    """A copy of nnU-Net's plans as plans identifier PLANS_NAME with one 3d_fullres configuration: our patch and
    batch, the network topology nnU-Net derives for that patch (``topology``, see TOPOLOGY_SNIPPET), and
    optionally our spacing. The input dict is not modified."""
    import copy

    if list(topology["patch_size"]) != list(patch_plan):
        raise ValueError(f"nnU-Net's topology needs patch {topology['patch_size']} (plan axes) for a U-Net at this "
                         f"spacing, not {patch_plan}: the patches would differ")
    out = copy.deepcopy(plans)
    if CONFIGURATION not in out.get("configurations", {}):
        raise ValueError(f"nnU-Net plans have no {CONFIGURATION} configuration: "
                         f"{sorted(out.get('configurations', {}))}")
    cfg = out["configurations"][CONFIGURATION]
    cfg.update(patch_size=list(patch_plan), batch_size=int(batch_size), data_identifier=f"{PLANS_NAME}_{CONFIGURATION}")
    if spacing_plan is not None:
        cfg["spacing"] = [float(s) for s in spacing_plan]
    arch = cfg["architecture"]["arch_kwargs"]
    for key in ("n_stages", "features_per_stage", "kernel_sizes", "strides", "n_conv_per_stage",
                "n_conv_per_stage_decoder"):
        arch[key] = topology[key]
    out["plans_name"] = PLANS_NAME
    out["configurations"] = {CONFIGURATION: cfg}
    return out


def peer_step_seconds(record: dict[str, Any]) -> dict[str, Any]:
    """Median seconds per train step from the trainer's step times: wall clock from one step's start to the next
    within an epoch (data loading included, like nnynet's samples_per_s), and the step's own compute."""
    steps = record["steps"]
    if not steps:
        raise ValueError(f"{STEP_TIMES}: no train steps recorded")
    walls = [b[1] - a[1] for a, b in zip(steps, steps[1:]) if a[0] == b[0]]
    compute = [end - start for _, start, end in steps[1:]] or [steps[0][2] - steps[0][1]]
    return {"s_per_step": statistics.median(walls) if walls else statistics.median(compute),
            "compute_s_per_step": statistics.median(compute), "timed_steps": len(walls) or len(compute),
            "torch_threads": record.get("torch_threads")}


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def comparison_row(metric: str, ours: Any, peer: Any, better: str, target: str | None, device: str,
                   **extra: Any) -> dict[str, Any]:
    """One row with bench/_common.emit's fields; NaN (class absent everywhere) becomes null, ratio null then."""
    o, p = _finite(ours), _finite(peer)
    return {"bench": BENCH, "metric": metric, "ours": o, "peer": p, "peer_name": PEER_NAME,
            "ratio": (o / p) if (o is not None and p) else None, "better": better, "target": target,
            "device": device, **extra}


def assemble_rows(scores: dict[str, dict[str, dict[str, Any]]], ours_step: float, peer_step: float,
                  setup: dict[str, Any], device: str) -> list[dict[str, Any]]:
    """JSON rows: per held-out set, Dice per class, mean Dice and lesion detection (small / large), ours vs peer;
    then seconds per training step; then the setup row. ``scores[set] = {"ours": summary, "peer": summary}``
    with finetune.evaluate.summarize's summaries."""
    common = {"budget_matched": setup["budget_matched"], "steps": setup["steps"],
              "patch_size": setup["patch_size"], "batch_size": setup["batch_size"]}
    rows = []
    for name, pair in scores.items():
        ours, peer = pair["ours"], pair["peer"]
        if set(ours["per_class"]) != set(peer["per_class"]):
            raise ValueError(f"{name}: classes differ, ours {sorted(ours['per_class'])} vs {sorted(peer['per_class'])}")
        n = {"n_cases": ours["n_cases"], "set": name}
        for cls in ours["per_class"]:
            rows.append(comparison_row(f"dice_{cls}_{name}", ours["per_class"][cls]["dice_mean"],
                                       peer["per_class"][cls]["dice_mean"], "higher", ">= 1 (ratio)", device,
                                       **n, **common))
        rows.append(comparison_row(f"mean_dice_{name}", ours["mean_dice"], peer["mean_dice"], "higher",
                                   ">= 1 (ratio)", device, **n, **common))
        for group in ours.get("lesions", {}):
            size = group.split(" ")[0]  # "small" / "large"
            lo, lp = ours["lesions"][group], peer.get("lesions", {}).get(group, {})
            rows.append(comparison_row(f"lesion_detection_rate_{size}_{name}", lo["detection_rate"],
                                       lp.get("detection_rate"), "higher", None, device, lesions=group,
                                       n_lesions=lo["n_lesions"], **n, **common))
    rows.append(comparison_row("train_step_s", ours_step, peer_step, "lower", None, device,
                               ours_source=setup["ours"]["timing_source"], **common))
    rows.append({"bench": BENCH, "metric": "setup", **setup})
    return rows


# ---------------------------------------------------------------- the nnU-Net run


def _run(stage: str, args: list[str], env: dict[str, str], log: Path) -> float:
    """Run one nnU-Net tool, its output into ``log``; seconds taken. A failure is a StageError with the log tail."""
    start = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(args, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise StageError(stage, f"{Path(args[0]).name} exited {proc.returncode}; last output:\n{tail}")
    return time.perf_counter() - start


def check_nnunet(bin_dir: Path) -> None:
    """The venv's tools exist (checked before anything slow runs)."""
    for tool in ("python", "nnUNetv2_extract_fingerprint", "nnUNetv2_plan_experiment", "nnUNetv2_preprocess",
                 "nnUNetv2_train", "nnUNetv2_predict"):
        if not (bin_dir / tool).is_file():
            raise StageError("find nnU-Net", f"{bin_dir / tool} not found: install nnunetv2 in its own venv (see "
                                             "bench/plan_vs_nnunet.py's docstring) or pass --nnunet_bin")


def install_trainer(nnunet_python: Path) -> Path:
    """Write TRAINER_SOURCE into the nnU-Net venv's nnunetv2/training/nnUNetTrainer/ (where nnU-Net looks
    trainers up by class name); rewritten only when its content differs."""
    proc = subprocess.run([str(nnunet_python), "-c", "import nnunetv2, os; print(os.path.dirname(nnunetv2.__file__))"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise StageError("import nnunetv2", proc.stderr[-2000:])
    path = Path(proc.stdout.strip()) / "training" / "nnUNetTrainer" / f"{TRAINER_NAME}.py"
    if not path.is_file() or path.read_text() != TRAINER_SOURCE:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(TRAINER_SOURCE)
        tmp.replace(path)
    return path


def nnunet_env(work: Path, threads: int, n_proc_da: int, steps: int, per_epoch: int, val_iters: int) -> dict[str, str]:
    return dict(os.environ, nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "preprocessed"),
                nnUNet_results=str(work / "results"), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                nnUNet_n_proc_DA=str(n_proc_da), nnUNet_compile="f", NNYNET_PEER_STEPS=str(steps),
                NNYNET_PEER_ITERS_PER_EPOCH=str(per_epoch), NNYNET_PEER_VAL_ITERS=str(val_iters),
                NNYNET_PEER_THREADS=str(threads))


def score_peer(pred_dir: Path, test_dir: Path, label_names: list[str]) -> tuple[list[dict], dict]:
    """nnU-Net's NIfTI predictions scored like ours: same loader, same grid check, finetune.evaluate."""
    import numpy as np

    from finetune.evaluate import evaluate_case, summarize
    from nny_models.io import discover_cases, load_volume

    per_case = []
    for r in (r for r in discover_cases(test_dir) if r.label is not None):
        path = pred_dir / f"{r.case_id}.nii.gz"
        if not path.is_file():
            raise StageError("score peer", f"{path}: nnU-Net wrote no prediction for case {r.case_id}")
        pred, pred_affine = load_volume(path)
        gt, affine = load_volume(r.label)
        if pred.shape != gt.shape or not np.allclose(pred_affine, affine, atol=1e-3):
            raise StageError("score peer", f"{path}: prediction grid {pred.shape} / affine differs from the label "
                                           f"{r.label} {gt.shape}; refusing to score misaligned masks")
        spacing = tuple(float(s) for s in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0)))
        per_case.append(evaluate_case(np.rint(pred).astype(np.int64), np.rint(gt).astype(np.int64), spacing,
                                      label_names, case_id=r.case_id))
    return per_case, summarize(per_case)


def run_peer(args: argparse.Namespace, work: Path, train_dir: Path, held_out: dict[str, Path], budget: dict[str, Any],
             ours_tta: bool, label_names: list[str]) -> dict[str, Any]:
    """Plan, preprocess, train and predict with nnU-Net; returns its summaries, timing and setup."""
    from nny_models.io import discover_cases

    bin_dir = Path(args.nnunet_bin)
    python = bin_dir / "python"
    trainer_file = install_trainer(python)
    epochs, per_epoch = epoch_layout(args.steps)
    env = nnunet_env(work, args.threads, args.n_proc_da, args.steps, per_epoch, args.val_iters)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    timing: dict[str, float] = {}

    start = time.perf_counter()
    try:  # raw layout, fingerprint, nnU-Net's own plan (bench/plan_vs_nnunet.py)
        default_plan = nnunet_plan(train_dir, work, bin_dir, label_map(train_dir))
    except Exception as e:
        raise StageError("plan (nnUNetv2_extract_fingerprint / plan_experiment)", str(e)) from e
    timing["plan_s"] = time.perf_counter() - start
    pre = work / "preprocessed" / DATASET_NAME
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    tf = plans["transpose_forward"]
    patch_plan = [int(v) for v in to_plan_axes(budget["patch_size"], tf)]
    spacing_plan = to_plan_axes(args.ours_spacing, tf) if args.match_spacing else None
    spacing_used = spacing_plan or plans["configurations"][CONFIGURATION]["spacing"]
    proc = subprocess.run([str(python), "-c", TOPOLOGY_SNIPPET], env=env, capture_output=True, text=True,
                          input=json.dumps({"dataset": DATASET_ID, "spacing": spacing_used, "patch_size": patch_plan}))
    if proc.returncode != 0:
        raise StageError("network topology", proc.stderr[-3000:])
    topology = json.loads(proc.stdout.strip().splitlines()[-1])
    new_plans = budget_plans(plans, patch_plan, budget["batch_size"], topology, spacing_plan)
    (pre / f"{PLANS_NAME}.json").write_text(json.dumps(new_plans, indent=2))

    # nnynet's training fold, as nnU-Net's split file (fold index = nnynet's fold)
    ids = sorted(r.case_id for r in discover_cases(train_dir) if r.label is not None)
    k = min(budget["folds"], len(ids))
    splits = [dict(zip(("train", "val"), ours_split(ids, budget["folds"], f, budget["seed"]))) for f in range(k)]
    (pre / "splits_final.json").write_text(json.dumps(splits, indent=2))
    fold = budget["fold"] % k

    preprocess = [str(bin_dir / "nnUNetv2_preprocess"), "-d", str(DATASET_ID), "-plans_name", PLANS_NAME,
                  "-c", CONFIGURATION, "-np", "1"]
    timing["preprocess_s"] = _run("nnUNetv2_preprocess", preprocess, env, logs / "preprocess.log")
    train = [str(bin_dir / "nnUNetv2_train"), str(DATASET_ID), CONFIGURATION, str(fold), "-tr", TRAINER_NAME,
             "-p", PLANS_NAME, "-device", "cpu"]
    timing["train_s"] = _run("nnUNetv2_train", train, env, logs / "train.log")
    fold_dir = work / "results" / DATASET_NAME / f"{TRAINER_NAME}__{PLANS_NAME}__{CONFIGURATION}" / f"fold_{fold}"
    if not (fold_dir / STEP_TIMES).is_file():
        raise StageError("nnUNetv2_train", f"{fold_dir / STEP_TIMES} missing: the trainer did not finish")
    record = json.loads((fold_dir / STEP_TIMES).read_text())
    if len(record["steps"]) != args.steps:
        raise StageError("nnUNetv2_train", f"nnU-Net ran {len(record['steps'])} train steps, expected {args.steps}")

    summaries, per_case = {}, {}
    timing["predict_s"] = 0.0
    for name, test_dir in held_out.items():
        images = work / "held_out" / name / "imagesTs"
        images.mkdir(parents=True, exist_ok=True)
        for r in discover_cases(test_dir):
            if r.label is not None:
                shutil.copy(r.image, images / f"{r.case_id}_0000.nii.gz")
        out = work / "predictions" / name
        cmd = [str(bin_dir / "nnUNetv2_predict"), "-i", str(images), "-o", str(out), "-d", str(DATASET_ID),
               "-p", PLANS_NAME, "-tr", TRAINER_NAME, "-c", CONFIGURATION, "-f", str(fold),
               "-chk", "checkpoint_final.pth", "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_progress_bar"]
        if not ours_tta:
            cmd.append("--disable_tta")
        timing["predict_s"] += _run("nnUNetv2_predict", cmd, env, logs / f"predict_{name}.log")
        per_case[name], summaries[name] = score_peer(out, test_dir, label_names)

    version = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('nnunetv2'))"],
                             capture_output=True, text=True).stdout.strip()
    setup = {
        "nnunetv2_version": version,
        "trainer": TRAINER_NAME, "trainer_file": str(trainer_file), "plans": PLANS_NAME,
        "configuration": CONFIGURATION,
        "fold": f"nnynet's fold {fold} of {k} (splits_final.json from nnynet's KFold split)",
        "train_cases": len(splits[fold]["train"]), "val_cases": len(splits[fold]["val"]),
        "epochs": epochs, "iterations_per_epoch": per_epoch, "val_iterations_per_epoch": args.val_iters,
        "n_proc_DA": args.n_proc_da, "torch_threads": record.get("torch_threads"),
        "tta": "nnU-Net mirroring (all axes it trained on)" if ours_tta else "off (--disable_tta), as ours",
        "postprocessing": "none (nnU-Net's is chosen by cross-validation, not run here)",
        "spacing_ras": [float(v) for v in [spacing_used[ras_axes(tf).index(a)] for a in range(3)]],
        "spacing_source": "nnynet's plan (--match_spacing)" if args.match_spacing else "nnU-Net's own plan",
        "patch_size_plan_axes": patch_plan, "transpose_forward": tf,
        "network": {k2: topology[k2] for k2 in ("n_stages", "features_per_stage", "strides")},
        "default_plan_ras": default_plan,
        "timing_s": timing,
    }
    return {"summaries": summaries, "per_case": per_case, "step": peer_step_seconds(record), "setup": setup}


def score_ours(model_dir: Path, held_out: dict[str, Path], work: Path,
               postprocess: bool = True) -> tuple[dict[str, dict], bool, dict[str, Any]]:
    """Our model on each held-out set through finetune.publish.evaluate_dataset (the published model's own path);
    postprocess=False drops config.keep_largest, single_component and lesion_in_organ, like the peer, which runs no
    post-processing here."""
    from finetune.publish import evaluate_dataset
    from nny_models.hub import NnyNet

    model = NnyNet.from_pretrained(model_dir)
    if not postprocess:
        model.config.keep_largest, model.config.single_component, model.config.lesion_in_organ = [], [], None
    tta = bool(getattr(model.config, "tta_mirror_axes", None))
    summaries = {}
    start = time.perf_counter()
    for name, test_dir in held_out.items():
        _, summaries[name] = evaluate_dataset(model, test_dir, work / "ours_eval" / name, overlays=0)
    info = {"label_names": list(model.config.label_names), "keep_largest": list(model.config.keep_largest or []),
            "lesion_in_organ": model.config.lesion_in_organ, "single_component": list(model.config.single_component),
            "spacing_ras": list(model.config.plan["spacing"]) if getattr(model.config, "plan", None) else None,
            "predict_s": time.perf_counter() - start}
    return summaries, tta, info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="a pipeline's data/ folder (train/, test/, test_ood/)")
    ap.add_argument("--ours", required=True, help="the nnynet model folder (save_pretrained export) to compare")
    ap.add_argument("--ours_run", help="its fine-tuning run folder (run_config.json, metrics.jsonl); default: found "
                                       "next to --ours")
    ap.add_argument("--steps", type=int, help="nnU-Net train steps; default: the nnynet run's max_steps (matched)")
    ap.add_argument("--train_cases", type=int, help="train on the first N training cases only (smoke test)")
    ap.add_argument("--test_cases", type=int, help="score the first N cases of each held-out set only (smoke test)")
    ap.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads for both sides")
    ap.add_argument("--n_proc_da", type=int, default=1, help="nnU-Net's data augmentation worker processes "
                                                              "(nnUNet_n_proc_DA; 0 = in the main process)")
    ap.add_argument("--val_iters", type=int, default=2, help="nnU-Net validation iterations per epoch (>= 1)")
    ap.add_argument("--match_spacing", action="store_true", help="resample for nnU-Net at nnynet's target spacing "
                                                                 "instead of nnU-Net's own")
    ap.add_argument("--ours_no_postprocess", action="store_true", help="score ours without its keep_largest "
                                                                       "post-processing (the peer runs none)")
    ap.add_argument("--nnunet_bin", default="/tmp/nnunet-venv/bin", help="bin/ of the venv holding nnunetv2")
    ap.add_argument("--work_dir", help="keep nnU-Net's files here (default: a temporary folder, removed)")
    args = ap.parse_args(argv)
    stage = "setup"
    try:
        import torch

        from bench._common import device_name

        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        data, model_dir = Path(args.data), Path(args.ours)
        stage = "read nnynet's run"
        budget = ours_budget(find_run_dir(model_dir, Path(args.ours_run) if args.ours_run else None))
        matched_steps = args.steps is None or args.steps == budget["steps"]
        args.steps = args.steps or budget["steps"]
        if args.val_iters < 1:
            raise ValueError(f"--val_iters must be >= 1, got {args.val_iters}")
        for d in ("train", "test"):  # test_ood/ is scored when present
            if not (data / d).is_dir():
                raise FileNotFoundError(f"{data / d}: missing (expected a pipeline's data/ folder)")
        with tempfile.TemporaryDirectory(prefix="nnunet_peer_") as tmp:
            work = Path(args.work_dir) if args.work_dir else Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            train_dir = data / "train"
            if args.train_cases:
                train_dir = subset_dataset(train_dir, work / "subsets" / "train", args.train_cases)
            held_out = {name: data / name for name in HELD_OUT if (data / name).is_dir()}
            if args.test_cases:
                held_out = {n: subset_dataset(d, work / "subsets" / n, args.test_cases) for n, d in held_out.items()}
            stage = "find nnU-Net"
            check_nnunet(Path(args.nnunet_bin))
            stage = "score ours"
            ours, ours_tta, ours_info = score_ours(model_dir, held_out, work, postprocess=not args.ours_no_postprocess)
            args.ours_spacing = ours_info["spacing_ras"]
            if args.match_spacing and not args.ours_spacing:
                raise ValueError(f"{model_dir}/config.json: no plan spacing for --match_spacing")
            labels_data = [n for n, _ in sorted(((n, v) for n, v in label_map(train_dir).items()), key=lambda t: t[1])]
            if labels_data != ours_info["label_names"]:
                raise ValueError(f"labels differ: {train_dir}/dataset.json {labels_data} vs model "
                                 f"{ours_info['label_names']}")
            stage = "nnU-Net"
            peer = run_peer(args, work, train_dir, held_out, budget, ours_tta, ours_info["label_names"])
        stage = "assemble"
        matched = matched_steps and not args.train_cases
        reasons = ([] if matched_steps else [f"--steps {args.steps} != nnynet's {budget['steps']}"]) + (
            [f"--train_cases {args.train_cases}: nnU-Net trained on a subset"] if args.train_cases else [])
        setup = {
            "budget_matched": matched, "not_matched_because": reasons, "steps": args.steps,
            "patch_size": budget["patch_size"], "batch_size": budget["batch_size"],
            "held_out_sets": {n: str(d) for n, d in held_out.items()},
            "test_cases_limited_to": args.test_cases,
            "threads": args.threads,
            "load_average": os.getloadavg(),
            "ours": {"model": str(model_dir), "run_dir": budget["run_dir"], "steps": budget["steps"],
                     "fold": f"{budget['fold']} of {budget['folds']}", "tta": ours_tta,
                     "postprocessing": (f"largest connected component of {ours_info['keep_largest']}"
                                        if ours_info["keep_largest"] else "none")
                     + "".join(f"; largest {name} component" for name in ours_info["single_component"])
                     + (f"; lesion_in_organ {ours_info['lesion_in_organ']}" if ours_info["lesion_in_organ"] else ""),
                     "fusion": budget["fusion"], "loader_workers": budget["num_workers"],
                     "spacing_ras": ours_info["spacing_ras"],
                     "timing_source": f"run's metrics.jsonl: median batch / samples_per_s over "
                                      f"{budget['s_per_step_rows']} rows (measured when that run trained)",
                     "predict_s": ours_info["predict_s"]},
            "peer": {**peer["setup"], "timing_source": f"measured here: median step-to-step wall clock over "
                                                       f"{peer['step']['timed_steps']} steps",
                     "compute_s_per_step": peer["step"]["compute_s_per_step"]},
            "scoring": "finetune.evaluate evaluate_case + summarize on the original grid, both sides",
        }
        scores = {n: {"ours": ours[n], "peer": peer["summaries"][n]} for n in held_out}
        rows = assemble_rows(scores, budget["s_per_step"], peer["step"]["s_per_step"], setup,
                             device_name("cpu"))
    except Exception as e:  # one JSON line that says why, never numbers
        where = e.stage if isinstance(e, StageError) else stage
        print(json.dumps({"bench": BENCH, "metric": "error", "stage": where, "error": f"{type(e).__name__}: {e}",
                          "traceback_tail": traceback.format_exc()[-1500:]}), flush=True)
        return 1
    for row in rows:
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
