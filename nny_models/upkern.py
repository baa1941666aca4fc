"""UpKern (MedNeXt, Roy et al. 2023): initialise a large-kernel network from a small-kernel one.

Tensors that match are copied; conv kernels whose shapes differ only in their spatial size (e.g. a
depthwise 3^3 kernel into a 5^3 or 7^3 one, also transposed-conv kernels) are trilinearly
interpolated to the new size, as in MedNeXt's ``upkern_load_weights``. Used for MedNeXt and for the
Swin-NeXt decoder (kernel 3 -> 5 -> 7).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from nny_models.transfer import TransferReport, transfer_weights


def interpolate_kernel(key: str, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor | None:
    """src (O, I, k, k, k) -> dst's spatial size, or None if the shapes differ elsewhere."""
    if src.ndim != 5 or dst.ndim != 5 or src.shape[:2] != dst.shape[:2]:
        return None
    return F.interpolate(src.float(), size=tuple(dst.shape[2:]), mode="trilinear").to(src.dtype)


def upkern_load(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> TransferReport:
    """Like transfer_weights, but resizes conv kernels that differ only in spatial kernel size."""
    return transfer_weights(model, state_dict, resize=interpolate_kernel)
