"""Sliding-window inference on a whole CT volume, returned on the input's own voxel grid.

    mask = predict(model, "ct.nii.gz")                         # path: loaded with nny_models.io
    mask = predict(model, volume_hu, spacing=(0.8, 0.8, 3.0))  # array in HU + spacing (+ affine)

Steps: check the input looks like a CT in HU -> preprocess exactly as in training
(``model.config.preprocess``: reorient, resample, HU window, body crop) -> clinical row -> vector
(``model.config.clinical_schema``) -> MONAI ``sliding_window_inference`` with Gaussian blending of
softmax probabilities -> argmax -> back to the original grid (same shape, same affine).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from nny_models.postprocess import keep_largest_component, label_indices

# A CT in Hounsfield units has air (about -1000 HU) somewhere in the scan, or at least fat
# (about -100 HU), and spans hundreds of HU. An image in [0, 1] or [0, 255] (PNG, RGB, an MR or a CT
# stored without its rescale slope/intercept) fails at least one of these two simple checks.
CT_MAX_MIN_HU = -200.0  # the darkest voxel must be at most this (air / lung / fat)
CT_MIN_RANGE_HU = 300.0  # max - min must be at least this (soft tissue vs. air)
MIN_AXIS_VOXELS = 8  # a volume, not a 2D image (H, W, 1) or an RGB image (H, W, 3)


def check_ct_volume(volume: np.ndarray, name: str = "input") -> None:
    """Raise ValueError unless ``volume`` looks like a 3D CT in HU (see the constants above)."""
    if volume.ndim != 3:
        raise ValueError(
            f"{name}: expected a 3D CT volume (X, Y, Z), got an array of shape {tuple(volume.shape)}"
        )
    if min(volume.shape) < MIN_AXIS_VOXELS:
        raise ValueError(
            f"{name}: expected a 3D CT volume with at least {MIN_AXIS_VOXELS} voxels along each axis, "
            f"got shape {tuple(volume.shape)} (a 2D or RGB image?)"
        )
    if not np.issubdtype(volume.dtype, np.number) or np.issubdtype(volume.dtype, np.complexfloating):
        raise ValueError(f"{name}: expected real-valued intensities, got dtype {volume.dtype}")
    if not np.isfinite(volume).all():
        raise ValueError(f"{name}: the volume contains NaN or infinite values")
    lo, hi = float(volume.min()), float(volume.max())
    if lo > CT_MAX_MIN_HU or hi - lo < CT_MIN_RANGE_HU:
        raise ValueError(
            f"{name}: does not look like a CT in Hounsfield units: values span [{lo:g}, {hi:g}], expected "
            f"a minimum <= {CT_MAX_MIN_HU:g} HU (air/fat) and a range >= {CT_MIN_RANGE_HU:g} HU "
            "(an image in [0, 1] / [0, 255], an MR, or a CT missing its rescale intercept?)"
        )


def _config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(
            "predict: the model has no .config (NnyNetConfig); load it with NnyNet.from_pretrained "
            "or wrap the network in NnyNet(config)"
        )
    return config


def _uses_fusion(model: nn.Module) -> bool:
    """True when the network has a clinical fusion module (NnyNet keeps the network in .net)."""
    net = getattr(model, "net", model)
    return getattr(net, "fusion", None) is not None


def read_clinical(clinical: Any) -> dict[str, Any] | np.ndarray:
    """A clinical row as a dict: from a dict, a pandas row / one-row DataFrame, or a .json / .csv file.

    A numeric array is passed through (an already encoded feature vector).
    """
    import pandas as pd

    if isinstance(clinical, (str, Path)):
        path = Path(clinical)
        if not path.is_file():
            raise ValueError(f"clinical file {str(path)!r} does not exist")
        if path.suffix.lower() == ".json":
            try:
                row = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"clinical file {str(path)!r} is not valid JSON: {err}") from None
            if isinstance(row, list) and len(row) == 1:
                row = row[0]
            if not isinstance(row, dict):
                raise ValueError(f"clinical file {str(path)!r}: expected one JSON object (column -> value)")
            return row
        if path.suffix.lower() == ".csv":
            try:
                df = pd.read_csv(path)
            except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
                raise ValueError(f"clinical file {str(path)!r} is not a readable CSV: {err}") from None
            if len(df) != 1:
                raise ValueError(f"clinical file {str(path)!r}: expected exactly one data row, found {len(df)}")
            return _row_dict(df.iloc[0])
        raise ValueError(f"clinical file {str(path)!r}: expected a .json or .csv file")
    if isinstance(clinical, pd.DataFrame):
        if len(clinical) != 1:
            raise ValueError(f"clinical: expected a one-row DataFrame, got {len(clinical)} rows")
        return _row_dict(clinical.iloc[0])
    if isinstance(clinical, pd.Series):
        return _row_dict(clinical)
    if isinstance(clinical, Mapping):
        return dict(clinical)
    if isinstance(clinical, (np.ndarray, torch.Tensor, list, tuple)):
        return np.asarray(clinical, dtype=np.float32).reshape(-1)
    raise ValueError(f"clinical: expected a dict, a pandas row, a .json/.csv path or None, got {type(clinical).__name__}")


def _row_dict(row) -> dict[str, Any]:
    # pandas NaN/NA -> None so that the schema sees "missing" the same way for every source
    return {str(k): (None if _is_missing(v) else v) for k, v in row.items()}


def _is_missing(value: Any) -> bool:
    import pandas as pd

    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def missing_clinical_columns(schema: dict[str, Any] | None, row: dict[str, Any]) -> list[str]:
    """Schema columns absent from ``row`` (present-but-empty values are ordinary missing values)."""
    if schema is None:
        return []
    from nny_models.clinical import ClinicalSchema

    columns = ClinicalSchema.from_dict(schema).columns
    return [c for c in columns if c not in row]


def clinical_vector(model: nn.Module, clinical: Any) -> torch.Tensor | None:
    """The (1, F) float tensor handed to the network, or None (no clinical input / no fusion)."""
    if clinical is None:
        return None  # a fusion model uses its learned "no clinical data" embedding
    if not _uses_fusion(model):
        warnings.warn("predict: the model was trained without clinical fusion; the clinical data is ignored")
        return None
    row = read_clinical(clinical)
    if isinstance(row, np.ndarray):
        vector = row[None]
    else:
        schema = _config(model).clinical_schema
        if schema is None:
            raise ValueError(
                "predict: the model's config has no clinical_schema, so a clinical row cannot be encoded; "
                "pass an encoded feature vector instead"
            )
        from nny_models.clinical import ClinicalSchema

        # the schema warns about absent columns / unknown categories and imputes them
        vector = np.asarray(ClinicalSchema.from_dict(schema).transform(row), dtype=np.float32).reshape(1, -1)
    expected = getattr(getattr(model, "net", model).fusion, "clinical_features", None)
    if expected is not None and vector.shape[1] != expected:
        raise ValueError(f"clinical: the model expects {expected} features, got {vector.shape[1]}")
    return torch.from_numpy(vector)


def sliding_window_probs(
    model: nn.Module,
    x: torch.Tensor,
    patch_size: tuple[int, int, int],
    clinical: torch.Tensor | None = None,
    *,
    overlap: float = 0.5,
    sw_batch_size: int = 2,
    device: torch.device | str = "cpu",
    amp: bool = False,
    cval: float = -1.0,
) -> torch.Tensor:
    """Softmax probabilities (B, C, X, Y, Z) of a preprocessed volume x (B, 1, X, Y, Z), Gaussian-blended.

    Windows of ``patch_size`` run through ``model(patch, clinical=...)`` under bf16 autocast when
    ``amp``; the clinical row (1, F) is repeated for every window in a batch.
    """
    device = torch.device(device)

    def window_probs(patch: torch.Tensor) -> torch.Tensor:
        c = None if clinical is None else clinical.to(patch.device).expand(patch.shape[0], -1)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(patch, clinical=c)
        return logits.float().softmax(dim=1)

    model.eval().to(device)
    return sliding_window_inference(
        x.to(device),
        roi_size=tuple(patch_size),
        sw_batch_size=sw_batch_size,
        predictor=window_probs,
        overlap=overlap,
        mode="gaussian",
        cval=cval,
        sw_device=device,
        device=device,
    )


def predict(
    model: nn.Module,
    image: np.ndarray | str | Path,
    spacing: tuple[float, float, float] | None = None,
    clinical: Any = None,
    *,
    affine: np.ndarray | None = None,
    overlap: float = 0.5,
    sw_batch_size: int = 2,
    device: str | torch.device | None = None,
    amp: bool | None = None,
    return_probabilities: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Segment one CT; the uint8 label volume has the input's shape (and, for a file, its affine).

    image: a path (.nii/.nii.gz/.nrrd/DICOM dir, read with nny_models.io.load_volume) or an array in HU
        (X, Y, Z) with ``spacing`` in mm and optionally its ``affine`` (default diag(spacing)).
    clinical: None, a dict, a pandas row, or a .json / one-row .csv path; encoded with the model's
        clinical schema (absent columns are imputed and reported with a warning).
    amp: bf16 autocast; None = on for CUDA, off on CPU.
    return_probabilities: also return softmax probabilities (C, X, Y, Z) float32 on the original grid
        (resampled linearly, so their argmax can differ from the label volume at boundaries). The label
        volume is post-processed as config.keep_largest says (largest liver + tumor component); the
        probabilities are not.
    The model is put in eval mode and moved to ``device``. Raises ValueError for an input that is not
    a 3D CT in HU (see check_ct_volume) or a clinical row the schema cannot read.
    """
    from nny_models.preprocessing import preprocess_volume, restore_to_original

    config = _config(model)
    if isinstance(image, (str, Path)):
        from nny_models.io import load_volume

        name = str(image)
        volume, affine = load_volume(image)
        volume = np.asarray(volume)
    else:
        name = "input array"
        volume = np.asarray(image)
        if affine is None:
            if spacing is None:
                raise ValueError("predict: an array input needs its voxel spacing (mm) or an affine")
            if len(spacing) != 3 or min(float(s) for s in spacing) <= 0:
                raise ValueError(f"predict: spacing must be 3 positive numbers (mm), got {spacing}")
            affine = np.diag([float(s) for s in spacing] + [1.0])
        affine = np.asarray(affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise ValueError(f"predict: affine must be 4x4, got shape {affine.shape}")
    check_ct_volume(volume, name)

    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    amp = device.type == "cuda" if amp is None else amp
    cfg = config.preprocess
    clin = clinical_vector(model, clinical)
    x, state = preprocess_volume(volume.astype(np.float32, copy=False), affine, cfg)
    x = x.as_tensor() if hasattr(x, "as_tensor") else x  # a MONAI MetaTensor -> plain tensor
    x = torch.as_tensor(x, dtype=torch.float32)[None]  # (1, 1, X, Y, Z)
    with torch.inference_mode():
        probs = sliding_window_probs(
            model, x, config.patch_size, clin, overlap=overlap, sw_batch_size=sw_batch_size,
            device=device, amp=amp, cval=float(cfg.out_range[0]),  # pad with "air", not mid-window grey
        )[0]
        labels = probs.argmax(dim=0, keepdim=True).to(torch.uint8).cpu().numpy()
        probs = probs.cpu().numpy() if return_probabilities else None
    if config.keep_largest:  # on the model grid, where the network decided
        labels[0] = keep_largest_component(labels[0], label_indices(config.label_names, config.keep_largest))

    mask = np.asarray(restore_to_original(labels, state))[0].astype(np.uint8)
    if mask.shape != volume.shape:
        raise RuntimeError(f"predict: restored mask has shape {mask.shape}, input has {volume.shape}")
    if not return_probabilities:
        return mask
    return mask, np.asarray(restore_to_original(probs, state), dtype=np.float32)
