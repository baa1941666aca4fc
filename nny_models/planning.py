"""Experiment planning from a dataset fingerprint, following nnU-Net v2's rules.

    from nny_models.planning import plan_dataset, normalize_ct
    plan = plan_dataset("data/train")                        # Plan: spacing, CT normalization, patch, batch
    x = normalize_ct(volume_hu, plan.normalization)          # clip to foreground percentiles, z-score

CLI: ``nnynet-plan DATA_DIR [--task segmentation|pretraining] [--output plan.json] [--skip_hu_check]``; --output is
checked before any work (never an input, never inside the data set, never a file that is not a plan).

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
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nny_models.config import SPACING_RANGE_MM
from nny_models.paths import same_file

PLAN_VERSION = 1
ANISOTROPY_THRESHOLD = 3.0  # nnU-Net's threshold for the anisotropy rule (spacing ratio and voxel ratio)
BODY_THRESHOLD_HU = -500.0  # voxels above this are body (the same threshold as preprocessing's body crop)
TASKS = ("segmentation", "pretraining")
FOREGROUND = {"segmentation": "label > 0", "pretraining": f"body (HU > {BODY_THRESHOLD_HU:g})"}
SPACING_OUTLIER_RATIO = 10.0  # a case this many times finer / coarser than the median on an axis: a unit or header error?


@dataclass
class CTNormalization:
    """Clip to [clip_low, clip_high] HU, then (x - mean) / std. JSON-able, replayed exactly by predict."""

    clip_low: float  # HU, 0.5th percentile of the foreground samples
    clip_high: float  # HU, 99.5th percentile of the foreground samples
    mean: float  # HU, mean of the foreground samples (before clipping, as nnU-Net)
    std: float  # HU, standard deviation of the foreground samples
    foreground: str  # which voxels the statistics describe: "label > 0" or "body (HU > -500)"
    scheme: str = "ct_foreground_zscore"  # the one scheme implemented by normalize_ct

    def __post_init__(self) -> None:
        for name in ("clip_low", "clip_high", "mean", "std"):
            setattr(self, name, _number(getattr(self, name), f"normalization.{name}"))
        if not isinstance(self.foreground, str) or not self.foreground:
            raise ValueError(f"normalization.foreground: expected a text naming the voxels, got {self.foreground!r}")
        if self.scheme != "ct_foreground_zscore":
            raise ValueError(f"normalization.scheme: expected 'ct_foreground_zscore', got {self.scheme!r}")
        if not self.std > 0:
            raise ValueError(f"normalization.std: expected a positive finite number, got {self.std}")
        if not self.clip_low < self.clip_high:  # equal bounds would map every voxel to one value
            raise ValueError(f"normalization: clip_low {self.clip_low} >= clip_high {self.clip_high}; "
                             "expected clip_low < clip_high")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CTNormalization":
        _check_keys(cls, d, "normalization")
        return cls(**d)


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

    def __post_init__(self) -> None:
        # strict types, no coercion: a "32" or 32.7 in a hand-edited plan is an error, not a silently different plan
        _check_version(self.version)
        if self.task not in TASKS:
            raise ValueError(f"plan.task: expected one of {list(TASKS)}, got {self.task!r}")
        lo, hi = SPACING_RANGE_MM
        self.spacing = tuple(_number(v, "plan.spacing") for v in _triple(self.spacing, "plan.spacing"))
        if not all(lo <= v <= hi for v in self.spacing):
            raise ValueError(f"plan.spacing: expected 3 voxel sizes in [{lo}, {hi}] mm, got {list(self.spacing)}")
        for name in ("divisor", "batch_size", "memory_budget_voxels"):
            setattr(self, name, _positive_int(getattr(self, name), f"plan.{name}"))
        self.patch_size = tuple(_positive_int(v, "plan.patch_size") for v in _triple(self.patch_size, "plan.patch_size"))
        if any(p % self.divisor for p in self.patch_size):
            raise ValueError(f"plan.patch_size: expected multiples of plan.divisor {self.divisor}, "
                             f"got {list(self.patch_size)}")
        self.median_shape = tuple(_positive_int(v, "plan.median_shape")
                                  for v in _triple(self.median_shape, "plan.median_shape"))
        if not isinstance(self.anisotropic, bool):
            raise ValueError(f"plan.anisotropic: expected true or false, got {self.anisotropic!r}")
        if not isinstance(self.normalization, CTNormalization):
            raise ValueError(f"plan.normalization: expected a CTNormalization, got {type(self.normalization).__name__}")
        if self.normalization.foreground != FOREGROUND[self.task]:  # statistics of other voxels than the task's
            raise ValueError(f"plan.normalization.foreground: a {self.task!r} plan describes {FOREGROUND[self.task]!r}, "
                             f"got {self.normalization.foreground!r}")
        if not isinstance(self.fingerprint, dict):
            raise ValueError(f"plan.fingerprint: expected an object, got {type(self.fingerprint).__name__}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["normalization"] = self.normalization.to_dict()
        return json.loads(json.dumps(d, allow_nan=False))  # tuples -> lists, numpy scalars and NaN refused early

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        if isinstance(d, dict) and "version" in d:  # a newer format first: its fields may differ
            _check_version(d["version"])
        _check_keys(cls, d, "plan")
        d = dict(d)
        if not isinstance(d["normalization"], dict):
            raise ValueError(f"plan.normalization: expected a JSON object, got {d['normalization']!r}")
        d["normalization"] = CTNormalization.from_dict(d["normalization"])
        return cls(**d)

    def preprocessing_fields(self) -> dict[str, Any]:
        """What this plan sets in PreprocessConfig: the target spacing and the CT normalization."""
        return {"spacing": list(self.spacing), "normalization": self.normalization.to_dict()}

    def save(self, path: str | Path) -> Path:
        """Write the plan JSON atomically: an interrupted save never leaves a truncated plan.json behind."""
        path = Path(path)
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:  # ValueError: JSON and UTF-8 decoding errors
            raise ValueError(f"{path}: could not read the plan JSON ({e})") from e
        except RecursionError:
            raise ValueError(f"{path}: could not read the plan JSON (nested too deeply); expected a JSON object") from None
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


def _check_version(version: Any) -> None:
    if isinstance(version, bool) or version != PLAN_VERSION:
        raise ValueError(f"plan.version: this nnynet reads plan version {PLAN_VERSION}, got {version!r}")


def _triple(v: Any, what: str) -> tuple:
    if not isinstance(v, (list, tuple)) or len(v) != 3:
        raise ValueError(f"{what}: expected 3 numbers, got {v!r}")
    return tuple(v)


def _number(v: Any, what: str) -> float:
    """A finite float from an int or float (bools and strings are errors, not numbers)."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise ValueError(f"{what}: expected a number, got {v!r}")
    if not math.isfinite(float(v)):
        raise ValueError(f"{what}: expected a finite number, got {v!r}")
    return float(v)


def _positive_int(v: Any, what: str) -> int:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{what}: expected a positive integer, got {v!r}")
    return int(v)


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
                        seed: int = 1234, records: list | None = None, check_hu: bool = False) -> dict[str, Any]:
    """Spacings, body-cropped shapes (RAS order) and sampled foreground HU statistics of every case.

    records: the cases of ``data_dir`` when the caller already listed them (nny_models.io.discover_cases).
    check_hu: refuse an image that does not look like a CT in HU (nny_models.hu_check), as training's cache does:
    statistics of stored values (HU + 1024) or of an MR would give a plan that exits 0 and normalizes wrongly."""
    from nny_models.io import discover_cases, load_volume
    from nny_models.preprocessing import check_label_grid

    if task not in TASKS:
        raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
    _positive_int(samples_per_case, "samples_per_case")
    records = discover_cases(data_dir) if records is None else list(records)
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
        if check_hu:
            from nny_models.hu_check import check_ct_volume

            check_ct_volume(image, str(rec.image), affine=affine, remedy=PLAN_HU_REMEDY)
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
    if empty:  # they still count for spacing and shape, but not for the intensity statistics
        warnings.warn(f"{data_dir}: {len(empty)} of {len(ids)} case(s) have no foreground voxels ({FOREGROUND[task]}): "
                      f"{_few(empty)}; the CT normalization comes from the other cases", stacklevel=2)
    _warn_spacing_outliers(data_dir, ids, np.asarray(spacings))
    v = np.concatenate(samples).astype(np.float64)
    stats = {
        "mean": float(v.mean()), "std": float(v.std()), "median": float(np.median(v)),
        "min": float(v.min()), "max": float(v.max()),
        "percentile_00_5": float(np.percentile(v, 0.5)), "percentile_99_5": float(np.percentile(v, 99.5)),
        "samples": int(v.size),
    }
    if not stats["percentile_00_5"] < stats["percentile_99_5"]:  # the z-score would map every voxel to one value
        raise ValueError(f"{data_dir}: the foreground voxels ({FOREGROUND[task]}) of the {len(ids) - len(empty)} "
                         f"case(s) with foreground have a single HU value ({stats['median']:g}); expected CT tissue with "
                         "varying intensities (are the labels on the right images, and are the images CTs in HU?)")
    return {"task": task, "foreground": FOREGROUND[task], "num_cases": len(ids), "case_ids": ids,
            "spacings": spacings, "shapes": shapes, "intensity": stats, "cases_without_foreground": empty}


PLAN_HU_REMEDY = ("If it is a CT in HU, plan with --skip_hu_check (plan_dataset(..., check_hu=False)); else convert it "
                  "to HU (rescale slope / intercept) or leave it out of the data set.")


def _few(names: list[str], n: int = 5) -> str:
    return ", ".join(map(repr, names[:n])) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def _warn_spacing_outliers(data_dir: str | Path, ids: list[str], spacings: np.ndarray) -> None:
    """Name the cases whose spacing is SPACING_OUTLIER_RATIO times off the median on an axis: the median is robust
    to them, but they are resampled by that factor (often a header in cm or m, or a wrong pixdim)."""
    ratio = spacings / np.median(spacings, axis=0)
    odd = [f"{ids[i]} {np.round(spacings[i], 3).tolist()} mm" for i in range(len(ids))
           if (ratio[i] >= SPACING_OUTLIER_RATIO).any() or (ratio[i] <= 1 / SPACING_OUTLIER_RATIO).any()]
    if odd:
        median = np.round(np.median(spacings, axis=0), 3).tolist()
        warnings.warn(f"{data_dir}: {len(odd)} case(s) have a voxel spacing {SPACING_OUTLIER_RATIO:g}x or more off the "
                      f"median {median} mm on an axis: {_few(odd)}; check their headers", stacklevel=3)


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


def _check_budget(memory_budget_voxels: int, divisor: int, min_batch_size: int) -> None:
    for name, value in (("memory_budget_voxels", memory_budget_voxels), ("divisor", divisor),
                        ("min_batch_size", min_batch_size)):  # 0 was divided by; a negative divisor gave negative patches
        _positive_int(value, name)
    if memory_budget_voxels < min_batch_size * divisor**3:
        raise ValueError(f"memory_budget_voxels: {memory_budget_voxels} cannot hold {min_batch_size} patch(es) of "
                         f"{divisor}^3 voxels; expected at least {min_batch_size * divisor ** 3}")


def patch_and_batch(median_shape, spacing, memory_budget_voxels: int, *, divisor: int = 32, min_batch_size: int = 2,
                    dataset_voxels: float | None = None, max_dataset_covered: float = 0.05) -> tuple[list[int], int]:
    """Patch size (multiples of ``divisor``) and batch size for ``memory_budget_voxels`` per micro-batch."""
    _check_budget(memory_budget_voxels, divisor, min_batch_size)
    median_shape = np.maximum(np.asarray(median_shape, float), 1.0)  # a side of 0 voxels would divide by 0
    spacing = np.asarray(spacing, float)
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
                 divisor: int = 32, min_batch_size: int = 2, samples_per_case: int = 10_000,
                 records: list | None = None, check_hu: bool = False) -> Plan:
    """Fingerprint ``data_dir`` and derive spacing, CT normalization, patch size and batch size.

    memory_budget_voxels: voxels of one micro-batch (batch_size * patch voxels); the default is nnU-Net's
    3d_fullres reference (batch 2 of 128^3) for a ~10 GB GPU. The CPU pipeline uses 96 * 96 * 32 with
    min_batch_size=1. records / check_hu: see fingerprint_dataset."""
    _check_budget(memory_budget_voxels, divisor, min_batch_size)  # before reading any volume
    fp = fingerprint_dataset(data_dir, task=task, samples_per_case=samples_per_case, records=records, check_hu=check_hu)
    spacings, shapes = np.asarray(fp["spacings"]), np.asarray(fp["shapes"])
    spacing, aniso = target_spacing(spacings, shapes)
    resampled = shapes * spacings / spacing
    median_shape = np.maximum(np.round(np.median(resampled, axis=0)), 1).astype(int)
    patch, batch = patch_and_batch(median_shape, spacing, memory_budget_voxels, divisor=divisor,
                                   min_batch_size=min_batch_size, dataset_voxels=float(np.prod(resampled, 1).sum()))
    st = fp["intensity"]
    try:  # the plan checks itself: a target spacing outside PreprocessConfig's range fails here, not in training
        norm = CTNormalization(clip_low=st["percentile_00_5"], clip_high=st["percentile_99_5"], mean=st["mean"],
                               std=max(st["std"], 1e-8), foreground=fp["foreground"])
        return Plan(task=task, spacing=tuple(round(float(s), 5) for s in spacing), normalization=norm,
                    patch_size=tuple(patch), batch_size=batch, median_shape=tuple(int(s) for s in median_shape),
                    anisotropic=bool(aniso), memory_budget_voxels=int(memory_budget_voxels), divisor=int(divisor),
                    fingerprint=fp)
    except ValueError as e:
        raise ValueError(f"{data_dir}: the planned {e}") from e


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
    path = Path(option).expanduser()
    if not path.is_file():  # "Auto", "None" or a typo: say what --plan accepts, not only "no such file"
        state = "is not a file" if path.exists() else "no such file"
        raise ValueError(f"--plan {option!r}: {state}; expected 'auto', 'none' or the path of a plan.json written by "
                         f"nnynet-plan DATA_DIR --task {task}")
    plan = Plan.load(path)
    if plan.task != task:
        raise ValueError(f"--plan {option}: a {plan.task!r} plan; this stage needs a {task!r} plan "
                         f"(nnynet-plan DATA_DIR --task {task})")
    return plan


# ----------------------------------------------------------------------------- CLI


def _is_plan_file(path: Path) -> bool:
    """Whether an existing file is a plan.json (which a new plan may replace); anything else is never overwritten."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    names = {f.name for f in dataclasses.fields(Plan)}
    return isinstance(d, dict) and {"task", "spacing", "normalization"} <= set(d) <= names


def output_path(value: str, data_dir: str | Path, records: list) -> Path:
    """The file ``--output`` names (a folder -> FOLDER/plan.json), checked before any planning: never an input of the
    data set, never inside the data set's folder, never an existing file that is not a plan."""
    path = Path(value).expanduser()
    if path.is_dir() or value.endswith(("/", os.sep)):
        path = path / "plan.json"
    if path.suffix.lower() != ".json":
        raise ValueError(f"--output {value!r}: expected a file name ending in .json (or a folder for plan.json)")
    target, source = path.resolve(), Path(data_dir).expanduser().resolve()
    if source.is_dir() and (target == source or source in target.parents):
        raise ValueError(f"--output {value!r}: {target} is inside the data set folder {source}; write the plan "
                         "elsewhere (nnynet-plan never modifies its input)")
    for rec in records:
        for item in (rec.image, rec.label):
            item = Path(item).expanduser().resolve() if item else None
            if item is not None and (same_file(path, item) or item in target.parents):
                raise ValueError(f"--output {value!r}: {target} is an input of the data set (case {rec.case_id!r}: "
                                 f"{item}); write the plan elsewhere (nnynet-plan never modifies its input)")
    if same_file(path, source):
        raise ValueError(f"--output {value!r}: {target} is the data set's manifest; write the plan elsewhere")
    if path.exists() and (not path.is_file() or not _is_plan_file(path)):
        raise ValueError(f"--output {value!r}: {path} exists and is not a plan.json written by nnynet-plan; "
                         "choose another path (it is left untouched)")
    parent = path.parent
    while not parent.exists():  # the folders Plan.save creates
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"--output {value!r}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"--output {value!r}: not writable")
    return path


def _one_line(err: object) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="nnynet-plan", description=__doc__.splitlines()[0])
    ap.add_argument("data_dir", help="CT data set in any layout nny_models.io reads (MSD, nnU-Net raw, folder, manifest)")
    ap.add_argument("--task", default="segmentation", choices=TASKS,
                    help="segmentation: statistics of labelled voxels; pretraining: of body voxels, images only")
    ap.add_argument("--output", help="write the plan JSON here (a .json file outside the data set, or a folder for "
                                     "plan.json); it is always printed")
    ap.add_argument("--memory_budget_voxels", type=int, default=2 * 128**3,
                    help="voxels per micro-batch (batch_size * patch voxels)")
    ap.add_argument("--divisor", type=int, default=32, help="patch sides are multiples of this")
    ap.add_argument("--min_batch_size", type=int, default=2, help="the patch is sized so this many fit the budget")
    ap.add_argument("--skip_hu_check", action="store_true",
                    help="plan on images that do not look like a CT in HU (nny_models.hu_check); by default they are "
                         "refused, as training refuses them")
    args = ap.parse_args(argv)
    for flag in ("memory_budget_voxels", "divisor", "min_batch_size"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag}: expected a positive integer, got {getattr(args, flag)}")
    from nny_models.io import discover_cases

    with warnings.catch_warnings(record=True) as caught:  # printed as "warning: ..." lines, once each
        warnings.simplefilter("always")
        try:
            records = discover_cases(args.data_dir)
            output = output_path(args.output, args.data_dir, records) if args.output else None  # before the work
            plan = plan_dataset(args.data_dir, memory_budget_voxels=args.memory_budget_voxels, task=args.task,
                                divisor=args.divisor, min_batch_size=args.min_batch_size, records=records,
                                check_hu=not args.skip_hu_check)
            if output is not None:
                plan.save(output)
            failure = None
        except (ValueError, OSError, ImportError) as e:  # bad input, unreadable files, pydicom missing
            failure = e
    # what the user can act on (ours and the readers' UserWarnings), not libraries' deprecation notices
    shown = [w for w in caught if issubclass(w.category, (UserWarning, RuntimeWarning))]
    for message in dict.fromkeys(str(w.message) for w in shown):
        print(f"warning: {_one_line(message)}", file=sys.stderr)
    if failure is not None:
        raise SystemExit(f"nnynet-plan: error: {_one_line(failure)}") from failure
    print(json.dumps(plan.to_dict(), indent=2))


if __name__ == "__main__":
    main()
