"""Deterministic CT preprocessing shared by training (preprocess_case) and inference (preprocess_volume).

HU below any physical value (scanner padding such as -32768 outside the reconstruction circle) is set to
air first -> MONAI dictionary transforms: EnsureChannelFirstd -> Orientationd -> Spacingd (image bilinear, label
nearest) -> ScaleIntensityRanged (HU window -> out_range, clipped) -> crop to the body's bounding box (plus
CROP_MARGIN, and for training the label's box too). ``restore_to_original`` inverts crop, spacing and
orientation so that a prediction lands on the original voxel grid (same shape and affine as the input).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nny_models.config import PreprocessConfig

CROP_MARGIN = 8  # voxels kept around the body bounding box, so the skin is not on the patch border
AIR_FLOOR_HU = -1024.0  # nothing real is below air; lower values are padding (-2048, -3024, -32768) and mean air


def _scaled_threshold(cfg: PreprocessConfig) -> float:
    """body_threshold_hu mapped through the same linear HU window as the image (HU itself when a planned
    normalization follows the crop)."""
    if cfg.normalization is not None:
        return cfg.body_threshold_hu
    (a_min, a_max), (b_min, b_max) = cfg.hu_window, cfg.out_range
    hu = min(max(cfg.body_threshold_hu, a_min), a_max)
    return b_min + (hu - a_min) / (a_max - a_min) * (b_max - b_min)


def _resample_transforms(cfg: PreprocessConfig, keys: list[str]):
    """Reorient, resample and (for the fixed HU window) scale intensities. A planned CT normalization is applied
    after the body crop instead, because the crop thresholds HU and the z-scored image is no longer in HU."""
    from monai.transforms import Compose, EnsureChannelFirstd, Orientationd, ScaleIntensityRanged, Spacingd

    window = [] if cfg.normalization is not None else [
        ScaleIntensityRanged(
            "image", a_min=cfg.hu_window[0], a_max=cfg.hu_window[1],
            b_min=cfg.out_range[0], b_max=cfg.out_range[1], clip=True,
        )
    ]  # fmt: skip
    return Compose(
        [
            EnsureChannelFirstd(keys, channel_dim="no_channel"),
            Orientationd(keys, axcodes=cfg.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S"))),  # RAS world
            Spacingd(
                keys,
                pixdim=cfg.spacing,
                mode=["bilinear", "nearest"][: len(keys)],
                padding_mode=["border", "zeros"][: len(keys)],
            ),
            *window,
        ]
    )


def _check_volume(array: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3 or min(array.shape) < 2:
        raise ValueError(f"{name}: expected a 3D volume (X, Y, Z) with at least 2 voxels per axis, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.number) and array.dtype != bool:
        raise ValueError(f"{name}: expected a numeric volume, got dtype {array.dtype}")
    if not np.isfinite(array).all():
        n = int(np.size(array) - np.isfinite(array).sum())
        raise ValueError(f"{name}: {n} voxel(s) are NaN or Inf; expected finite HU values")
    return array


def _check_affine(affine: Any, name: str) -> np.ndarray:
    from nny_models.io import check_spacing

    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ValueError(f"{name}: expected a finite, invertible 4x4 affine, got {affine.tolist()}")
    check_spacing(affine, name)  # zero / absurd voxel sizes would resample to a wrong grid
    return affine


def check_resampled_size(shape: tuple[int, ...], affine: np.ndarray, spacing: Any, name: str) -> None:
    """Refuse a volume whose resampling to ``spacing`` would not fit in memory, before allocating it: a header whose
    voxel size is 10-100x too large (cm for mm, a slice thickness typed into pixdim) asks MONAI for tens of GiB and
    used to end in an allocator error. The count is the field of view's volume over the target voxel's volume,
    which holds for any orientation."""
    from nny_models.io import MAX_VOLUME_BYTES

    voxel_mm = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    fov_mm = np.asarray(shape[:3], dtype=np.float64) * voxel_mm
    voxels = float(np.prod(fov_mm) / np.prod(np.asarray(spacing, dtype=np.float64)))
    if voxels * 4 > MAX_VOLUME_BYTES:
        raise ValueError(
            f"{name}: resampling shape {tuple(int(s) for s in shape[:3])} at voxel size "
            f"{tuple(round(float(v), 3) for v in voxel_mm)} mm (a field of view of "
            f"{' x '.join(f'{v:.0f}' for v in fov_mm)} mm) to the model's spacing {tuple(float(v) for v in spacing)} mm "
            f"gives about {voxels:,.0f} voxels ({voxels * 4 / 1024**3:.1f} GiB as float32), above the limit of "
            f"{MAX_VOLUME_BYTES / 1024**3:.1f} GiB; expected a CT field of view of at most a few hundred mm per axis. "
            "Is the voxel size in the header right (pixdim / sform / qform in mm)?"
        )


def _check_label(label: np.ndarray, name: str, num_classes: int | None = None) -> np.ndarray:
    """Integer labels in 0..255 and, with ``num_classes``, inside the label map 0..num_classes-1."""
    label = _check_volume(label, name)
    fractional = label != np.round(label)
    if fractional.any():  # e.g. 0.9999 from a resampled or rescaled label: rounding would guess the class
        example = float(label[fractional].flat[0])
        raise ValueError(f"{name}: {int(fractional.sum())} voxel(s) are not whole numbers (e.g. {example:.6g}); "
                         "expected integer class labels in 0..255 (was the label interpolated or saved with a scale?)")
    if label.size and (label.min() < 0 or label.max() > 255):
        raise ValueError(f"{name}: expected integer class labels in 0..255, "
                         f"got values in [{label.min():g}, {label.max():g}]")
    if num_classes is not None and label.size and label.max() >= num_classes:
        values, counts = np.unique(label[label >= num_classes], return_counts=True)
        found = ", ".join(f"{int(v)} ({int(n)} voxel{'s' if n > 1 else ''})" for v, n in zip(values, counts))
        raise ValueError(
            f"{name}: label value(s) {found} are outside the label map of {num_classes} classes "
            f"(expected 0..{num_classes - 1}); fix the label file or the label names"
        )
    return label


def check_label_grid(label: np.ndarray, label_affine: Any, image_shape: tuple[int, ...], affine: Any,
                     label_path: Any, image_path: Any, num_classes: int | None = None) -> np.ndarray:
    """The label as integers on its image's voxel grid (same shape, same affine), else a ValueError naming
    both files: a label on another grid would pair every voxel with the wrong HU."""
    label = _check_label(label, str(label_path), num_classes)
    if label.shape != tuple(image_shape):
        raise ValueError(
            f"{label_path}: label shape {label.shape} differs from image shape {tuple(image_shape)} ({image_path}); "
            "expected the same voxel grid"
        )
    if not np.allclose(label_affine, affine, rtol=1e-4, atol=1e-3):
        import nibabel as nib

        def grid(a: Any) -> str:  # one line: axis codes, voxel size and origin
            a = np.asarray(a, dtype=float)
            size = "x".join(f"{v:.4g}" for v in np.linalg.norm(a[:3, :3], axis=0))
            return f"{''.join(nib.aff2axcodes(a))} {size} mm at ({', '.join(f'{v:.4g}' for v in a[:3, 3])})"

        raise ValueError(
            f"{label_path}: label affine differs from the image affine of {image_path}; expected the same "
            f"voxel grid (image {grid(affine)}, label {grid(label_affine)})"
        )
    return label


def _air_floor(cfg: PreprocessConfig) -> float:
    """The lowest HU kept before resampling: air, or the window's / normalization's own lower bound if lower."""
    low = cfg.normalization["clip_low"] if cfg.normalization is not None else cfg.hu_window[0]
    return min(AIR_FLOOR_HU, float(low))


def _box(mask: torch.Tensor) -> tuple[list[int], list[int]] | None:
    """[start, end) voxel bounds of the True voxels of a (X, Y, Z) mask, or None when there are none."""
    if not bool(mask.any()):
        return None
    bounds = []
    for axis in range(3):
        hit = torch.nonzero(mask.any(dim=tuple(a for a in range(3) if a != axis))).flatten()
        bounds.append((int(hit[0]), int(hit[-1]) + 1))
    return [b[0] for b in bounds], [b[1] for b in bounds]


def _check_resampled_grid(shape: list[int], affine: np.ndarray, cfg: PreprocessConfig, name: str) -> None:
    """A field of view that resamples to a single voxel along an axis (thinner than about half a model voxel) gives
    the network a sliver it was never trained on, and it would return a mask for it without a word: refused."""
    if min(shape) >= 2:
        return
    voxel_mm = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    thin = ", ".join(f"{cfg.orientation[i]} ({cfg.spacing[i]:g} mm)" for i, n in enumerate(shape) if n < 2)
    raise ValueError(
        f"{name}: resampled to the model's {tuple(cfg.spacing)} mm grid the volume is {tuple(shape)} voxels: at "
        f"voxel size {tuple(round(float(v), 4) for v in voxel_mm)} mm its field of view is a single model voxel "
        f"thick along the model's axis {thin}; expected at least two model voxels per axis. Is the voxel size in "
        "the header right (mm, not cm or m)?"
    )


def _run(image: np.ndarray, label: np.ndarray | None, affine: np.ndarray, cfg: PreprocessConfig,
         name: str = "input image"):
    """The one code path: returns (image (1,X,Y,Z) tensor, label tensor | None, JSON-able state)."""
    import nibabel as nib
    from monai.data import MetaTensor

    keys = ["image"] if label is None else ["image", "label"]
    aff = torch.as_tensor(affine, dtype=torch.float64)
    voxels = torch.as_tensor(image, dtype=torch.float32)  # may share the caller's memory: never changed in place
    floor = _air_floor(cfg)
    if voxels.numel() and float(voxels.min()) < floor:
        # Padding (-32768 outside the scanner circle) would be blended into the body's edge by the linear
        # resampling and erode it (clipped to air afterwards); as air it blends like air.
        voxels = voxels.clamp(min=floor)
    data = {"image": MetaTensor(voxels, affine=aff)}
    if label is not None:
        data["label"] = MetaTensor(torch.as_tensor(label, dtype=torch.float32), affine=aff.clone())
    data = _resample_transforms(cfg, keys)(data)
    resampled_shape = list(data["image"].shape[1:])
    resampled_affine = np.asarray(data["image"].affine, dtype=np.float64)
    _check_resampled_grid(resampled_shape, affine, cfg, name)

    start, end = [0, 0, 0], list(resampled_shape)
    if cfg.crop_foreground:
        # The crop is done here, not with MONAI's CropForegroundd: on a MetaTensor made channel-first by
        # EnsureChannelFirstd, MONAI 1.6 takes it as 2D and leaves the z offset out of the cropped affine.
        body = _box(data["image"][0] > _scaled_threshold(cfg))  # None: an all-air volume stays uncropped
        if body is not None:
            start = [max(a - CROP_MARGIN, 0) for a in body[0]]
            end = [min(b + CROP_MARGIN, n) for b, n in zip(body[1], resampled_shape)]
            labelled = None if label is None else _box(data["label"][0] > 0.5)
            if labelled is not None and (any(a < s for a, s in zip(labelled[0], start))
                                         or any(b > e for b, e in zip(labelled[1], end))):
                # cropping them away would drop labelled voxels from training without a word
                warnings.warn(f"{name}: labelled voxels lie outside the body (voxels above "
                              f"{cfg.body_threshold_hu:g} HU) and its {CROP_MARGIN}-voxel margin; the crop keeps them. "
                              "Check that the label belongs to this image.", stacklevel=3)
                start = [min(a, s) for a, s in zip(labelled[0], start)]
                end = [max(b, e) for b, e in zip(labelled[1], end)]
            window = (slice(None),) + tuple(slice(a, b) for a, b in zip(start, end))
            for k in keys:
                data[k] = data[k][window]
    cropped_affine = resampled_affine.copy()
    cropped_affine[:3, 3] += resampled_affine[:3, :3] @ np.asarray(start, dtype=np.float64)

    state = {
        "original_shape": [int(s) for s in image.shape],
        "original_affine": np.asarray(affine, dtype=np.float64).tolist(),
        "original_axcodes": "".join(nib.aff2axcodes(affine)),
        "original_spacing": np.linalg.norm(affine[:3, :3], axis=0).tolist(),
        "resampled_shape": [int(s) for s in resampled_shape],
        "resampled_affine": resampled_affine.tolist(),
        "crop_start": start,
        "crop_end": end,
        "shape": [int(s) for s in data["image"].shape[1:]],
        "affine": cropped_affine.tolist(),  # the model grid: the resampled one, moved by the crop
        "spacing": [float(s) for s in cfg.spacing],
        "preprocessing": cfg.to_dict(),
    }
    if cfg.normalization is not None:
        from nny_models.planning import normalize_ct

        data["image"] = normalize_ct(data["image"], cfg.normalization)
    img = data["image"].as_tensor().float().contiguous()
    lab = None if label is None else data["label"].as_tensor().round().to(torch.uint8).contiguous()
    return img, lab, state


def preprocess_volume(image: np.ndarray, affine: np.ndarray, cfg: PreprocessConfig,
                      name: str = "input image") -> tuple[torch.Tensor, dict]:
    """HU array (X,Y,Z) + its 4x4 affine -> (float32 tensor (1,X',Y',Z'), state for restore_to_original).
    ``name`` is what error messages call the input (e.g. its file)."""
    image = _check_volume(image, name)
    affine = _check_affine(affine, f"{name} (affine)")
    check_resampled_size(image.shape, affine, cfg.spacing, name)
    img, _, state = _run(image, None, affine, cfg, name)
    return img, state


TRAINING_HU_REMEDY = ("If it is a CT in HU, train with --skip_hu_check (build_cache(..., check_hu=False)); else "
                      "convert it to HU (rescale slope / intercept) or leave it out of the data set.")


def preprocess_case(
    image_path: str | Path, label_path: str | Path | None, cfg: PreprocessConfig, *, num_classes: int | None = None,
    check_hu: bool = True,
) -> dict[str, Any]:
    """Read and preprocess one case -> {image: float32 (1,X,Y,Z), label: uint8 (1,X,Y,Z) | None, meta: dict}.

    num_classes: size of the label map; a label value >= num_classes is a ValueError naming the label file
    (checked on the original grid, before resampling could hide a rare value). None: no check.
    check_hu: refuse an image that does not look like a CT in HU (nny_models.hu_check), as predict does: one
    case stored as HU + 1024 or an MR in a CT data set would train the network, and the planned normalization,
    on values it will never see at inference.
    meta["label_values"] holds {value: voxel count} of the original label.
    """
    from nny_models.hu_check import check_ct_volume
    from nny_models.io import load_volume

    image, affine = load_volume(image_path)
    image = _check_volume(image, str(image_path))
    if check_hu:
        check_ct_volume(image, str(image_path), remedy=TRAINING_HU_REMEDY, affine=affine)
    affine = _check_affine(affine, str(image_path))
    check_resampled_size(image.shape, affine, cfg.spacing, str(image_path))
    label = None
    if label_path is not None:
        label, label_affine = load_volume(label_path)
        label = check_label_grid(label, label_affine, image.shape, affine, label_path, image_path, num_classes)
    img, lab, meta = _run(image, label, affine, cfg, str(image_path))
    meta["image_path"] = str(image_path)
    meta["label_path"] = None if label_path is None else str(label_path)
    if label is not None:
        values, counts = np.unique(label, return_counts=True)
        meta["label_values"] = {str(int(v)): int(n) for v, n in zip(values, counts)}
        kept = {int(v) for v in torch.unique(lab).tolist()}
        lost = {int(v): int(n) for v, n in zip(values, counts) if v > 0 and int(v) not in kept}
        if lost:  # nearest-neighbour resampling can miss a structure smaller than a model voxel
            found = ", ".join(f"{v} ({n} voxel{'s' if n > 1 else ''})" for v, n in sorted(lost.items()))
            warnings.warn(f"{label_path}: label value(s) {found} vanish when the label is resampled to the model's "
                          f"{tuple(cfg.spacing)} mm grid; this case trains without them", stacklevel=2)
    return {"image": img.numpy(), "label": None if lab is None else lab.numpy(), "meta": meta}


def restore_to_original(pred: np.ndarray | torch.Tensor, state: dict) -> np.ndarray:
    """Map a prediction on the preprocessed grid (C,X',Y',Z') back to the original grid (C,X,Y,Z).

    Integer/bool inputs are labels (nearest neighbour, 0 outside the body crop); float inputs are
    probabilities or scores (linear; outside the crop channel 0 = 1 when C > 1, else 0).
    """
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    pred = pred.detach().cpu().numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred)
    if pred.ndim != 4 or list(pred.shape[1:]) != list(state["shape"]):
        raise ValueError(f"restore_to_original: expected an array (C, {', '.join(map(str, state['shape']))}), got {pred.shape}")
    is_label = pred.dtype == bool or np.issubdtype(pred.dtype, np.integer)

    # undo the body crop: the region outside it is background
    full = np.zeros((pred.shape[0], *state["resampled_shape"]), dtype=np.float32)
    if not is_label and pred.shape[0] > 1:
        full[0] = 1.0
    (x0, y0, z0), (x1, y1, z1) = state["crop_start"], state["crop_end"]
    full[:, x0:x1, y0:y1, z0:z1] = pred

    # undo orientation and spacing in one resampling from the resampled grid to the original one
    src = MetaTensor(torch.from_numpy(full), affine=torch.as_tensor(state["resampled_affine"], dtype=torch.float64))
    resample = SpatialResample(mode="nearest" if is_label else "bilinear", padding_mode="border", dtype=torch.float32)
    out = resample(
        src,
        dst_affine=torch.as_tensor(state["original_affine"], dtype=torch.float64),
        spatial_size=tuple(state["original_shape"]),
    )
    out = np.asarray(out.as_tensor().numpy())
    return np.round(out).astype(pred.dtype) if is_label else out.astype(np.float32, copy=False)


RESTORE_SLAB_VOXELS = 16_000_000  # original voxels resampled at once by restore_labels_from_probabilities


def restore_labels_from_probabilities(probs: np.ndarray | torch.Tensor, labels: np.ndarray, state: dict) -> np.ndarray:
    """Labels on the original grid from the model grid's softmax, as nnU-Net exports them: the probabilities are
    resampled linearly and the argmax taken there, so boundaries follow the network's transitions instead of
    the model grid's voxel steps (nearest neighbour gives 2.5 mm stairs on a 0.7 mm CT).

    probs: (C, X', Y', Z') softmax on the model grid; labels: (X', Y', Z') the decision there after
    post-processing. Where post-processing changed a voxel, its probabilities become one-hot of the label kept,
    so every component it removed stays removed. A class gets no probability where neither the voxel nor one of
    its 26 neighbours has it as label: resampling moves a boundary between two classes, it does not paint a third
    one between them. Returns uint8 (X, Y, Z)."""
    from scipy import ndimage

    probs = probs.detach().float().cpu().numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs, np.float32)
    labels = np.asarray(labels)
    if probs.ndim != 4 or probs.shape[1:] != labels.shape:
        raise ValueError(f"restore_labels_from_probabilities: probabilities {probs.shape} and labels "
                         f"{labels.shape} are not (C, X, Y, Z) and (X, Y, Z) of one grid")
    out = np.zeros(state["original_shape"], dtype=np.uint8)
    found = np.nonzero(labels)
    if not found[0].size:
        return out
    probs = probs.copy()
    changed = np.nonzero(labels != probs.argmax(0))
    probs[(slice(None), *changed)] = 0.0
    probs[(labels[changed].astype(np.intp), *changed)] = 1.0
    for c in range(probs.shape[0]):
        probs[c][~ndimage.maximum_filter(labels == c, size=3)] = 0.0
    # Only the box around the labelled voxels, one model voxel wider, can hold a label: on a whole CT it is a
    # fraction of the grid, so the probabilities are resampled into that box alone.
    low = np.array([max(int(i.min()) - 1, 0) for i in found]) + np.asarray(state["crop_start"])
    high = np.array([min(int(i.max()) + 1, n - 1) for i, n in zip(found, labels.shape)]) + np.asarray(state["crop_start"])
    corners = np.array([[h if bit else l for bit, l, h in zip(bits, low, high)] + [1.0]
                        for bits in np.ndindex(2, 2, 2)])
    world = corners @ np.asarray(state["resampled_affine"]).T
    voxels = (world @ np.linalg.inv(np.asarray(state["original_affine"])).T)[:, :3]
    start = np.clip(np.floor(voxels.min(0)).astype(int) - 1, 0, out.shape)
    stop = np.clip(np.ceil(voxels.max(0)).astype(int) + 2, 0, out.shape)
    if (stop <= start).any():
        return out
    # in slabs along the last axis, so that C float32 channels of a whole-body CT never sit in memory at once
    step = max(1, RESTORE_SLAB_VOXELS // int(np.prod(stop[:2] - start[:2])))
    for z0 in range(int(start[2]), int(stop[2]), step):
        z1 = min(z0 + step, int(stop[2]))
        shift = np.eye(4)
        shift[:3, 3] = (start[0], start[1], z0)
        slab = {**state, "original_affine": (np.asarray(state["original_affine"]) @ shift).tolist(),
                "original_shape": [int(stop[0] - start[0]), int(stop[1] - start[1]), z1 - z0]}
        out[start[0]:stop[0], start[1]:stop[1], z0:z1] = restore_to_original(probs, slab).argmax(0)
    return out
