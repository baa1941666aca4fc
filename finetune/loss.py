"""Dice + Focal + cross-entropy loss on softmax outputs, with optional deep supervision.

nnY-Net trains with "DiceFocalCE". MONAI's ``DiceFocalLoss`` builds its focal term with a
sigmoid, which is wrong for mutually exclusive classes, so we compose the three terms here:

    loss = dice_weight * Dice(softmax(logits)) + focal_weight * Focal(softmax) + ce_weight * CE

- Dice: ``monai.losses.DiceLoss(softmax=True, to_onehot_y=True)``, 1 - (2TP + 1e-5) / (2TP + FP + FN + 1e-5)
  per class, averaged over classes (and over the batch unless ``batch_dice``, which pools the batch
  first as nnU-Net does, so that patches without tumor do not dominate the tumor term).
- Focal: ``monai.losses.FocalLoss(use_softmax=True, to_onehot_y=True)``: -(1 - p_t)^gamma * log(p_t),
  averaged over all (batch, class, voxel) elements, i.e. the voxel mean divided by the class count.
  It always uses every class: MONAI drops the background channel *before* its softmax when
  include_background=False, which would normalise over foreground classes only.
- CE: ``torch.nn.functional.cross_entropy`` averaged over voxels.
- class_weights (optional, one per class, background first): weigh the focal and CE terms per class
  (``FocalLoss(weight=...)``, ``cross_entropy(weight=...)``, the weighted voxel mean). A rare class such as a
  small tumor otherwise gets a vanishing share of the voxel-averaged gradient; the Dice term is class-balanced
  already but saturates once the softmax has pushed that class to ~0 everywhere.

Deep supervision: pass a list of logits, full resolution first. The target is downsampled to each
scale with nearest-neighbour interpolation and the per-scale losses are weighted 1, 1/2, 1/4, ...
normalised to sum to one (nnU-Net), unless ``ds_weights`` is given.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss, FocalLoss
from torch import nn


class DiceFocalCELoss(nn.Module):
    def __init__(
        self,
        dice_weight: float = 1.0,
        focal_weight: float = 1.0,
        ce_weight: float = 1.0,
        gamma: float = 2.0,
        include_background: bool = False,
        ds_weights: Sequence[float] | None = None,
        batch_dice: bool = True,
        class_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        for name, w in (("dice_weight", dice_weight), ("focal_weight", focal_weight), ("ce_weight", ce_weight)):
            if w < 0:
                raise ValueError(f"DiceFocalCELoss: {name} must be >= 0, got {w}")
        if ds_weights is not None and (len(ds_weights) == 0 or any(w < 0 for w in ds_weights)):
            raise ValueError(f"DiceFocalCELoss: ds_weights must be a non-empty list of weights >= 0, got {ds_weights}")
        if class_weights is not None and (len(class_weights) < 2 or any(not w > 0 for w in class_weights)):
            raise ValueError(f"DiceFocalCELoss: class_weights must be one weight > 0 per class (background "
                             f"first), got {list(class_weights)}")
        self.dice_weight, self.focal_weight, self.ce_weight = dice_weight, focal_weight, ce_weight
        self.ds_weights = None if ds_weights is None else [float(w) for w in ds_weights]
        self.dice = DiceLoss(softmax=True, to_onehot_y=True, include_background=include_background, batch=batch_dice)
        weights = None if class_weights is None else torch.tensor([float(w) for w in class_weights])
        self.register_buffer("class_weights", weights, persistent=False)
        self.focal = FocalLoss(use_softmax=True, to_onehot_y=True, include_background=True, gamma=gamma,
                               weight=None if weights is None else weights.tolist())

    def single_scale(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss for one (B, C, ...) logits tensor and a (B, 1, ...) integer target of the same spatial size."""
        if target.ndim != logits.ndim or target.shape[1] != 1 or target.shape[2:] != logits.shape[2:]:
            raise ValueError(
                f"DiceFocalCELoss: expected target (B, 1, {tuple(logits.shape[2:])}) for logits {tuple(logits.shape)}, "
                f"got {tuple(target.shape)}"
            )
        target = target.long()
        logits = logits.float()  # the loss in fp32 even under autocast
        if self.class_weights is not None and len(self.class_weights) != logits.shape[1]:
            raise ValueError(f"DiceFocalCELoss: {len(self.class_weights)} class_weights for {logits.shape[1]} classes")
        loss = logits.new_zeros(())
        if self.dice_weight:
            loss = loss + self.dice_weight * self.dice(logits, target)
        if self.focal_weight:
            loss = loss + self.focal_weight * self.focal(logits, target)
        if self.ce_weight:
            w = None if self.class_weights is None else self.class_weights.to(logits.device)
            loss = loss + self.ce_weight * F.cross_entropy(logits, target[:, 0], weight=w)
        return loss

    def scale_weights(self, n: int) -> list[float]:
        """Normalised per-scale weights for ``n`` deep-supervision outputs."""
        if self.ds_weights is not None:
            if len(self.ds_weights) != n:
                raise ValueError(f"DiceFocalCELoss: {n} deep-supervision outputs but {len(self.ds_weights)} ds_weights")
            w = self.ds_weights
        else:
            w = [0.5**i for i in range(n)]
        total = sum(w)
        if total <= 0:
            raise ValueError("DiceFocalCELoss: ds_weights sum to zero")
        return [x / total for x in w]

    def forward(self, logits: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(logits, torch.Tensor):
            return self.single_scale(logits, target)
        outputs = list(logits)
        loss = outputs[0].new_zeros((), dtype=torch.float32)
        for w, out in zip(self.scale_weights(len(outputs)), outputs):
            if w == 0:
                continue
            t = target
            if out.shape[2:] != target.shape[2:]:
                # nearest keeps labels integral; float is needed by interpolate
                t = F.interpolate(target.float(), size=out.shape[2:], mode="nearest").long()
            loss = loss + w * self.single_scale(out, t)
        return loss
