"""Experiment planning from a dataset fingerprint, following nnU-Net v2's rules.

    from nny_models.planning import plan_dataset, normalize_ct
    plan = plan_dataset("data/train")                        # Plan: spacing, CT normalization, patch, batch
    x = normalize_ct(volume_hu, plan.normalization)          # clip to foreground percentiles, z-score

CLI: ``nnynet-plan DATA_DIR [--task segmentation|pretraining] [--output plan.json]``.

1. Fingerprint (read-only): each case's voxel spacing and body-cropped shape in RAS axis order (the order
   preprocessing resamples in), and foreground HU values sampled per case as nnU-Net does: labelled voxels
   (label > 0) for segmentation, body voxels (> -500 HU) for pretraining.
2. Target spacing: the per-axis median. nnU-Net's anisotropy rule: when the coarsest axis is more than 3x
   coarser than the others and has more than 3x fewer voxels, its target is the 10th percentile of that
   axis' spacings instead (fewer interpolated slices for thick-slice data).
3. CT normalization: clip to the 0.5 / 99.5 percentiles of the sampled foreground HU, then z-score with the
   foreground mean / std. The plan records which foreground the statistics describe: pretraining's
   whole-body statistics and fine-tuning's labelled-foreground ones are separate plans.
4. Patch size: isotropic in mm, no larger than the median resampled shape, each side a multiple of
   ``divisor`` (32 for the Swin models), shrunk along the axis that is largest relative to the median shape
   until ``min_batch_size`` patches fit ``memory_budget_voxels``, then grown back one divisor at a time along
   the axis smallest relative to the median shape while it still fits. The batch size fills the budget, capped
   (as in nnU-Net) so that one batch covers at most 5 % of the dataset's voxels.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

PLAN_VERSION = 1
ANISOTROPY_THRESHOLD = 3.0  # nnU-Net's threshold for the anisotropy rule (spacing ratio and voxel ratio)
BODY_THRESHOLD_HU = -500.0  # voxels above this are body (the same threshold as preprocessing's body crop)
TASKS = ("segmentation", "pretraining")
FOREGROUND = {"segmentation": "label > 0", "pretraining": f"body (HU > {BODY_THRESHOLD_HU:g})"}


@dataclass
class CTNormalization:
    """Clip to [clip_low, clip_high] HU, then (x - mean) / std. JSON-able, replayed exactly by predict."""

    clip_low: float  # HU, 0.5th percentile of the foreground samples
    clip_high: float  # HU, 99.5th percentile of the foreground samples
    mean: float  # HU, mean of the foreground samples (before clipping, as nnU-Net)
    std: float  # HU, standard deviation of the foreground samples
    foreground: str  # which voxels the statistics describe: "label > 0" or "body (HU > -500)"
    scheme: str = "ct_foreground_zscore"  # the one scheme implemented by normalize_ct

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CTNormalization":
        _check_keys(cls, d, "normalization")
        norm = cls(**{k: (v if k in ("foreground", "scheme") else float(v)) for k, v in d.items()})
        if norm.scheme != "ct_foreground_zscore":
            raise ValueError(f"normalization.scheme: expected 'ct_foreground_zscore', got {norm.scheme!r}")
        if not (math.isfinite(norm.std) and norm.std > 0):
            raise ValueError(f"normalization.std: expected a positive finite number, got {norm.std}")
        if not norm.clip_low <= norm.clip_high:
            raise ValueError(f"normalization: clip_low {norm.clip_low} > clip_high {norm.clip_high}")
        return norm


@dataclass
class Plan:
    """What preprocessing and training need, derived from the data. ``to_dict`` is plain JSON."""

    task: str  # "segmentation" (foreground = label > 0) or "pretraining" (foreground = body voxels)
    spacing: tuple[float, float, float]  # target voxel spacing in mm, RAS x, y, z (PreprocessConfig.spacing)
    normalization: CTNormalization  # CT clip + z-score (alternative to a fixed HU window)
    patch_size: tuple[int, int, int]  # training patch / sliding-window ROI in voxels after resampling
    batch_size: int  # patches per micro-batch
    median_shape: tuple[int, int, int]  # median body-cropped shape after resampling to ``spacing``
    anisotropic: bool  # whether nnU-Net's anisotropy rule changed the coarse axis' target spacing
    memory_budget_voxels: int  # budget for batch_size * prod(patch_size)
    divisor: int  # every patch side is a multiple of this (network down-sampling)
    fingerprint: dict[str, Any] = field(default_factory=dict)  # the statistics the plan came from
    version: int = PLAN_VERSION  # plan format version

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["normalization"] = self.normalization.to_dict()
        return json.loads(json.dumps(d))  # tuples -> lists, numpy scalars refused early

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        _check_keys(cls, d, "plan")
        d = dict(d)
        if d.get("version", PLAN_VERSION) != PLAN_VERSION:
            raise ValueError(f"plan.version: expected {PLAN_VERSION}, got {d['version']}")
        if d.get("task") not in TASKS:
            raise ValueError(f"plan.task: expected one of {TASKS}, got {d.get('task')!r}")
        d["spacing"] = _triple(d.get("spacing"), float, "plan.spacing")
        d["patch_size"] = _triple(d.get("patch_size"), int, "plan.patch_size")
        d["median_shape"] = _triple(d.get("median_shape"), int, "plan.median_shape")
        d["normalization"] = CTNormalization.from_dict(d.get("normalization") or {})
        if min(d["spacing"]) <= 0 or min(d["patch_size"]) < 1 or int(d.get("batch_size", 0)) < 1:
            raise ValueError(f"plan: spacing, patch_size and batch_size must be positive, got {d}")
        return cls(**d)

    def preprocessing_fields(self) -> dict[str, Any]:
        """What this plan sets in PreprocessConfig: the target spacing and the CT normalization."""
        return {"spacing": list(self.spacing), "normalization": self.normalization.to_dict()}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: could not read the plan JSON ({e})") from e
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from e


def _check_keys(cls, d: Any, what: str) -> None:
    if not isinstance(d, dict):
        raise ValueError(f"{what}: expected a JSON object, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    required = {f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    if set(d) - names or required - set(d):
        raise ValueError(f"{what}: unknown field(s) {sorted(set(d) - names)}, missing field(s) {sorted(required - set(d))}")


def _triple(v: Any, kind, what: str) -> tuple:
    if not isinstance(v, (list, tuple)) or len(v) != 3:
        raise ValueError(f"{what}: expected 3 numbers, got {v!r}")
    return tuple(kind(x) for x in v)


# ----------------------------------------------------------------------------- normalization


def normalize_ct(volume_hu, plan_norm: CTNormalization | dict[str, Any]):
    """Clip HU to the plan's foreground percentiles, then z-score: float32 numpy in -> float32 numpy out
    (a torch tensor in -> a float32 tensor out, so that it also runs inside MONAI pipelines)."""
    norm = plan_norm if isinstance(plan_norm, CTNormalization) else CTNormalization.from_dict(plan_norm)
    try:
        import torch

        if isinstance(volume_hu, torch.Tensor):
            x = volume_hu.float().clamp(norm.clip_low, norm.clip_high)
            return (x - norm.mean) / norm.std
    except ImportError:  # torch is a dependency, but this function does not need it
        pass
    x = np.clip(np.asarray(volume_hu, dtype=np.float32), norm.clip_low, norm.clip_high)
    return ((x - np.float32(norm.mean)) / np.float32(norm.std)).astype(np.float32)


# ----------------------------------------------------------------------------- fingerprint


def _ras_axes(affine: np.ndarray) -> np.ndarray:
    """For each voxel axis of the file, the RAS axis it becomes after preprocessing's reorientation."""
    import nibabel as nib

    return nib.io_orientation(affine)[:, 0].astype(int)


def _body_box(image: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of the body (> -500 HU), as preprocessing's body crop; the whole volume if none."""
    body = image > BODY_THRESHOLD_HU
    if not body.any():
        return tuple(slice(0, s) for s in image.shape)
    box = []
    for ax in range(3):
        hit = np.flatnonzero(body.any(axis=tuple(a for a in range(3) if a != ax)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def fingerprint_dataset(data_dir: str | Path, *, task: str = "segmentation", samples_per_case: int = 10_000,
                        seed: int = 1234) -> dict[str, Any]:
    """Spacings, body-cropped shapes (RAS order) and sampled foreground HU statistics of every case."""
    from nny_models.io import discover_cases, load_volume
    from nny_models.preprocessing import check_label_grid

    if task not in TASKS:
        raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
    records = discover_cases(data_dir)
    if task == "segmentation":
        records = [r for r in records if r.label is not None]
        if not records:
            raise ValueError(f"{data_dir}: no labelled case found; planning for segmentation needs labels "
                             "(use task='pretraining' for images only)")
    rng = np.random.default_rng(seed)
    spacings, shapes, samples, ids, empty = [], [], [], [], []
    for rec in records:
        image, affine = load_volume(rec.image)
        if not np.isfinite(image).all():
            raise ValueError(f"{rec.image}: NaN or Inf voxels; expected finite HU values")
        if task == "segmentation":
            label, label_affine = load_volume(rec.label)
            label = check_label_grid(label, label_affine, image.shape, affine, rec.label, rec.image)
            fg = label > 0
        else:
            fg = image > BODY_THRESHOLD_HU
        axes = _ras_axes(affine)
        spacing_file = np.linalg.norm(affine[:3, :3], axis=0)
        box = _body_box(image)
        crop_file = [s.stop - s.start for s in box]
        sp, sh = np.zeros(3), np.zeros(3, int)
        sp[axes], sh[axes] = spacing_file, crop_file  # file axis i -> RAS axis axes[i]
        values = image[fg]
        if values.size == 0:
            empty.append(rec.case_id)
        else:  # with replacement, a fixed number per case (nnU-Net's sampling), so each case weighs the same
            samples.append(rng.choice(values, samples_per_case, replace=True))
        spacings.append(sp.tolist())
        shapes.append(sh.tolist())
        ids.append(rec.case_id)
    if not samples:
        raise ValueError(f"{data_dir}: no foreground voxels ({FOREGROUND[task]}) in any of {len(ids)} case(s); "
                         "cannot derive CT normalization")
    v = np.concatenate(samples).astype(np.float64)
    stats = {
        "mean": float(v.mean()), "std": float(v.std()), "median": float(np.median(v)),
        "min": float(v.min()), "max": float(v.max()),
        "percentile_00_5": float(np.percentile(v, 0.5)), "percentile_99_5": float(np.percentile(v, 99.5)),
        "samples": int(v.size),
    }
    return {"task": task, "foreground": FOREGROUND[task], "num_cases": len(ids), "case_ids": ids,
            "spacings": spacings, "shapes": shapes, "intensity": stats, "cases_without_foreground": empty}


# ----------------------------------------------------------------------------- rules


def target_spacing(spacings: np.ndarray, shapes: np.ndarray) -> tuple[np.ndarray, bool]:
    """Median spacing per axis; nnU-Net's anisotropy rule for the coarsest axis (returns spacing, applied)."""
    spacings, shapes = np.asarray(spacings, float), np.asarray(shapes, float)
    target = np.percentile(spacings, 50, axis=0)
    size = np.percentile(shapes, 50, axis=0)
    worst = int(np.argmax(target))
    others = [i for i in range(3) if i != worst]
    aniso_spacing = target[worst] > ANISOTROPY_THRESHOLD * max(target[others])
    aniso_voxels = size[worst] * ANISOTROPY_THRESHOLD < min(size[others])
    if not (aniso_spacing and aniso_voxels):
        return target, False
    low = float(np.percentile(spacings[:, worst], 10))
    # never finer than the in-plane spacing (nnU-Net adds 1e-5 so the axis stays the coarsest)
    target[worst] = low if low >= max(target[others]) else max(target[others]) + 1e-5
    return target, True


def patch_and_batch(median_shape, spacing, memory_budget_voxels: int, *, divisor: int = 32, min_batch_size: int = 2,
                    dataset_voxels: float | None = None, max_dataset_covered: float = 0.05) -> tuple[list[int], int]:
    """Patch size (multiples of ``divisor``) and batch size for ``memory_budget_voxels`` per micro-batch."""
    median_shape, spacing = np.asarray(median_shape, float), np.asarray(spacing, float)
    if memory_budget_voxels < min_batch_size * divisor**3:
        raise ValueError(f"memory_budget_voxels: {memory_budget_voxels} cannot hold {min_batch_size} patch(es) of "
                         f"{divisor}^3 voxels; expected at least {min_batch_size * divisor ** 3}")
    # Start isotropic in mm (aspect 1 / spacing) with nnU-Net's 256^3 voxels, no larger than the median shape.
    aspect = 1.0 / spacing
    start = aspect * (256.0**3 / np.prod(aspect)) ** (1 / 3)
    cap = np.maximum(np.ceil(median_shape / divisor), 1)
    units = np.maximum(np.minimum(np.round(start / divisor), cap), 1).astype(int)
    budget_units = memory_budget_voxels / (min_batch_size * divisor**3)
    while np.prod(units) > budget_units:
        shrinkable = units > 1
        ratio = np.where(shrinkable, units * divisor / median_shape, -np.inf)
        units[int(np.argmax(ratio))] -= 1  # shrink the side that is largest relative to the data
    while True:  # steps of one divisor overshoot: grow back the side smallest relative to the data, if it fits
        grow = [(units[i] * divisor / median_shape[i], i) for i in range(3)
                if units[i] < cap[i] and np.prod(units) / units[i] * (units[i] + 1) <= budget_units]
        if not grow:
            break
        units[min(grow)[1]] += 1
    patch = [int(u * divisor) for u in units]
    batch = max(min_batch_size, int(memory_budget_voxels // np.prod(patch)))
    if dataset_voxels is not None:
        batch = max(min_batch_size, min(batch, round(dataset_voxels * max_dataset_covered / np.prod(patch))))
    return patch, int(batch)


def plan_dataset(data_dir: str | Path, *, memory_budget_voxels: int = 2 * 128**3, task: str = "segmentation",
                 divisor: int = 32, min_batch_size: int = 2, samples_per_case: int = 10_000) -> Plan:
    """Fingerprint ``data_dir`` and derive spacing, CT normalization, patch size and batch size.

    memory_budget_voxels: voxels of one micro-batch (batch_size * patch voxels); the default is nnU-Net's
    3d_fullres reference (batch 2 of 128^3) for a ~10 GB GPU. The CPU pipeline uses 96 * 96 * 32 with
    min_batch_size=1."""
    fp = fingerprint_dataset(data_dir, task=task, samples_per_case=samples_per_case)
    spacings, shapes = np.asarray(fp["spacings"]), np.asarray(fp["shapes"])
    spacing, aniso = target_spacing(spacings, shapes)
    resampled = shapes * spacings / spacing
    median_shape = np.round(np.median(resampled, axis=0)).astype(int)
    patch, batch = patch_and_batch(median_shape, spacing, memory_budget_voxels, divisor=divisor,
                                   min_batch_size=min_batch_size, dataset_voxels=float(np.prod(resampled, 1).sum()))
    st = fp["intensity"]
    norm = CTNormalization(clip_low=st["percentile_00_5"], clip_high=st["percentile_99_5"], mean=st["mean"],
                           std=max(st["std"], 1e-8), foreground=fp["foreground"])
    return Plan(task=task, spacing=tuple(round(float(s), 5) for s in spacing), normalization=norm,
                patch_size=tuple(patch), batch_size=batch, median_shape=tuple(int(s) for s in median_shape),
                anisotropic=aniso, memory_budget_voxels=int(memory_budget_voxels), divisor=divisor, fingerprint=fp)


CPU_BUDGET_VOXELS = 96 * 96 * 32  # one micro-batch on a CPU: the embedded pipeline's 96 x 96 x 32 patch, batch 1
GPU_BUDGET_VOXELS = 2 * 128**3  # nnU-Net's 3d_fullres reference: batch 2 of 128^3


def resolve_plan(option: str | None, data_dir: str | Path, *, task: str, cuda: bool,
                 divisor: int = 32) -> Plan | None:
    """The stages' ``--plan``: "none" (or None) -> no plan; "auto" -> planned from ``data_dir`` within the
    device's budget (GPU: batch 2 of 128^3; CPU: one 96 x 96 x 32 patch); anything else -> a plan.json path."""
    if option in (None, "", "none"):
        return None
    if option == "auto":
        budget, min_batch = (GPU_BUDGET_VOXELS, 2) if cuda else (CPU_BUDGET_VOXELS, 1)
        return plan_dataset(data_dir, memory_budget_voxels=budget, task=task, divisor=divisor,
                            min_batch_size=min_batch)
    plan = Plan.load(Path(option).expanduser())
    if plan.task != task:
        raise ValueError(f"--plan {option}: a {plan.task!r} plan; this stage needs a {task!r} plan "
                         f"(nnynet-plan DATA_DIR --task {task})")
    return plan


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="nnynet-plan", description=__doc__.splitlines()[0])
    ap.add_argument("data_dir", help="CT data set in any layout nny_models.io reads (MSD, nnU-Net raw, folder, manifest)")
    ap.add_argument("--task", default="segmentation", choices=TASKS,
                    help="segmentation: statistics of labelled voxels; pretraining: of body voxels, images only")
    ap.add_argument("--output", help="write the plan JSON here (it is always printed)")
    ap.add_argument("--memory_budget_voxels", type=int, default=2 * 128**3,
                    help="voxels per micro-batch (batch_size * patch voxels)")
    ap.add_argument("--divisor", type=int, default=32, help="patch sides are multiples of this")
    ap.add_argument("--min_batch_size", type=int, default=2, help="the patch is sized so this many fit the budget")
    args = ap.parse_args(argv)
    try:
        plan = plan_dataset(args.data_dir, memory_budget_voxels=args.memory_budget_voxels, task=args.task,
                            divisor=args.divisor, min_batch_size=args.min_batch_size)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"nnynet-plan: {e}") from e
    text = json.dumps(plan.to_dict(), indent=2)
    print(text)
    if args.output:
        plan.save(args.output)


if __name__ == "__main__":
    main()
