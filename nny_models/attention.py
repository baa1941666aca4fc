"""Attention maps of the clinical cross-attention: where on the bottleneck the clinical query looks.

    amap = attention_map(model, patch, clinical)            # (X, Y, Z) on a network input (a patch)
    amap = predict_attention(model, "ct.nii.gz", clinical)  # whole CT, on the input's own voxel grid

Works for the attention fusion modes (``nny_models.fusion.ATTENTION_MODES``): the fusion module computes the
softmax(q k^T / sqrt(d)) weights explicitly while ``capture_attention`` is on (SDPA does not return them),
the weights are averaged over tokens and heads (or one head is picked), scaled by the number of bottleneck
voxels (1.0 = uniform attention, 4.0 = four times the uniform weight) and upsampled trilinearly to the image.
Whole volumes go through the same sliding window (Gaussian blending) and restoration to the original grid as
``nny_models.predict``, the map being resampled linearly where the mask is resampled nearest.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nny_models.fusion import ATTENTION_MODES, ClinicalFusion


def attention_fusion(model: nn.Module) -> ClinicalFusion:
    """The model's attention fusion module (NnyNet keeps its network in .net); ValueError if it has none."""
    net = getattr(model, "net", model)
    fusion = getattr(net, "fusion", None)
    mode = getattr(fusion, "mode", "none")
    if not isinstance(fusion, ClinicalFusion) or mode not in ATTENTION_MODES:
        raise ValueError(
            f"attention maps need a model with an attention fusion ({', '.join(ATTENTION_MODES)}); "
            f"this model's fusion is {mode!r}"
        )
    return fusion


def uses_attention(model: nn.Module) -> bool:
    """True when the model has an attention fusion (attention maps can be drawn)."""
    fusion = getattr(getattr(model, "net", model), "fusion", None)
    return isinstance(fusion, ClinicalFusion) and fusion.mode in ATTENTION_MODES


@contextmanager
def capturing(fusion: ClinicalFusion) -> Iterator[ClinicalFusion]:
    """Turn on weight capture for the duration of the block."""
    fusion.capture_attention, fusion.last_attention = True, None
    try:
        yield fusion
    finally:
        fusion.capture_attention = False


def _reduce(weights: torch.Tensor, head: int | None) -> torch.Tensor:
    """(B, heads, T, d, h, w) attention -> (B, 1, d, h, w), scaled so that uniform attention is 1."""
    if head is not None:
        if not 0 <= head < weights.shape[1]:
            raise ValueError(f"head must be in [0, {weights.shape[1]}), got {head}")
        weights = weights[:, head : head + 1]
    n = weights[0, 0, 0].numel()
    return weights.float().mean(dim=(1, 2)).unsqueeze(1) * n


def _clinical_tensor(model: nn.Module, clinical: Any) -> torch.Tensor | None:
    if clinical is None or isinstance(clinical, torch.Tensor):
        return clinical
    if isinstance(clinical, np.ndarray) and clinical.ndim == 2:
        return torch.from_numpy(clinical.astype(np.float32))
    from nny_models.inference import clinical_vector  # a dict / pandas row / file, encoded by the model's schema

    return clinical_vector(model, clinical)


def upsampled_map(fusion: ClinicalFusion, size: tuple[int, ...], head: int | None = None) -> torch.Tensor:
    """(B, 1, *size) map of the weights ``fusion`` captured in the forward just run (inside ``capturing``)."""
    weights = fusion.last_attention
    if weights is None:
        raise RuntimeError("attention map: the fusion module did not run (is it on the model's forward path?)")
    return F.interpolate(_reduce(weights, head), size=size, mode="trilinear", align_corners=False)


def attention_maps(
    model: nn.Module, image: torch.Tensor, clinical: torch.Tensor | None, head: int | None = None
) -> torch.Tensor:
    """Batched: (B, 1, X, Y, Z) maps for a network input batch (B, C, X, Y, Z)."""
    fusion = attention_fusion(model)
    with capturing(fusion):
        model(image, clinical)
        return upsampled_map(fusion, tuple(image.shape[2:]), head)


def attention_map(model: nn.Module, image: np.ndarray | torch.Tensor, clinical: Any = None, *,
                  head: int | None = None) -> np.ndarray:
    """Attention of the clinical query over the bottleneck, upsampled to ``image``'s grid: float32 (X, Y, Z).

    image: one network input, (X, Y, Z), (1, X, Y, Z) or (1, 1, X, Y, Z), already preprocessed and of a size
    the network accepts. clinical: an encoded (1, F) tensor/array, a clinical row the model's schema encodes,
    or None (the learned "no clinical data" query). head: one attention head, or None for their mean."""
    x = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image, dtype=torch.float32)
    while x.ndim < 5:
        x = x[None]
    if x.ndim != 5 or x.shape[0] != 1:
        raise ValueError(f"attention_map: expected one image (X, Y, Z) or (1, 1, X, Y, Z), got {tuple(x.shape)}")
    clin = _clinical_tensor(model, clinical)
    model.eval()
    device = next(model.parameters()).device
    with torch.inference_mode():
        out = attention_maps(model, x.to(device), None if clin is None else clin.to(device), head)
    return out[0, 0].cpu().numpy().astype(np.float32)


def predict_attention(model: nn.Module, image: np.ndarray | str | Path, clinical: Any = None, *,
                      spacing: tuple[float, float, float] | None = None, affine: np.ndarray | None = None,
                      overlap: float = 0.5, sw_batch_size: int = 2, device: str | torch.device | None = None,
                      head: int | None = None, case_id: str | None = None, force: bool = False) -> np.ndarray:
    """The attention map of a whole CT on its original voxel grid (same shape as predict's mask), float32.

    Inputs as ``nny_models.predict``: a path or an HU array with spacing / affine; the CT is preprocessed
    with the model's config, the map computed window by window and blended, then restored to the input grid.
    case_id / force: as in predict (the clinical row's case check; run on an input that fails the CT check)."""
    from monai.inferers import sliding_window_inference

    from nny_models.inference import _config, check_ct_volume, clinical_vector, read_ct_input
    from nny_models.preprocessing import preprocess_volume, restore_to_original

    attention_fusion(model)  # fail before any work for a model without attention
    config = _config(model)
    volume, affine, name = read_ct_input(image, spacing, affine, "predict_attention")
    check_ct_volume(volume, name, force=force, affine=affine)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if case_id is None and isinstance(image, (str, Path)):
        from nny_models.clinical import image_case_ids

        case_id = image_case_ids(image)
    clin = clinical_vector(model, clinical, case_id, name)
    x, state = preprocess_volume(volume.astype(np.float32, copy=False), np.asarray(affine, dtype=np.float64),
                                 config.preprocess, name)
    x = torch.as_tensor(x.as_tensor() if hasattr(x, "as_tensor") else x, dtype=torch.float32)[None]

    def window_maps(patch: torch.Tensor) -> torch.Tensor:
        c = None if clin is None else clin.to(patch.device).expand(patch.shape[0], -1)
        return attention_maps(model, patch, c, head)

    model.eval().to(device)
    with torch.inference_mode():
        amap = sliding_window_inference(
            x.to(device), roi_size=tuple(config.patch_size), sw_batch_size=sw_batch_size, predictor=window_maps,
            overlap=overlap, mode="gaussian", cval=float(config.preprocess.air_value), sw_device=device,
            device=device,
        )[0]
    out = np.asarray(restore_to_original(amap.float().cpu().numpy(), state))[0].astype(np.float32)
    if out.shape != volume.shape:
        raise RuntimeError(f"predict_attention: restored map has shape {out.shape}, input has {volume.shape}")
    return out
