"""UpKern (MedNeXt, Roy et al. 2023): initialise a large-kernel network from a small-kernel one.

Tensors that match are copied; conv kernels whose shapes differ only in their spatial size (e.g. a
depthwise 3^3 kernel into a 5^3 or 7^3 one, also transposed-conv kernels) are trilinearly
interpolated to the new size, as in MedNeXt's ``upkern_load_weights``. Used for MedNeXt and for the
Swin-NeXt decoder (kernel 3 -> 5 -> 7).

Only upsampling: a kernel larger than the model's along any axis (shrinking would drop what the source
learned), an empty one, or one that is not floating point (integer data is no kernel, and interpolating it
would round) is not resized; it stays in the report's ``mismatched`` list and is not loaded.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from nny_models.transfer import TransferReport, transfer_weights


def interpolate_kernel(key: str, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor | None:
    """src (O, I, k, k, k) -> dst's spatial size, or None if the shapes differ elsewhere, a kernel would
    shrink or is empty, or either tensor is not floating point. Interpolated in (at least) float32, without
    rounding back to src's dtype; transfer_weights casts to the model's dtype."""
    if src.ndim != 5 or dst.ndim != 5 or src.shape[:2] != dst.shape[:2]:
        return None
    if not (src.is_floating_point() and dst.is_floating_point()):
        return None
    if src.numel() == 0 or any(s > d for s, d in zip(src.shape[2:], dst.shape[2:])):
        return None
    work = src.to(torch.promote_types(src.dtype, torch.float32))
    return F.interpolate(work, size=tuple(dst.shape[2:]), mode="trilinear")


def upkern_load(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> TransferReport:
    """Like transfer_weights, but resizes conv kernels that differ only in spatial kernel size (upwards)."""
    return transfer_weights(model, state_dict, resize=interpolate_kernel)
