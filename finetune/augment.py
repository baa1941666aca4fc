"""Training-time augmentation of fine-tuning patches (MONAI dictionary transforms, seeded per sample index)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import monai.transforms as mt
import numpy as np
import torch

from nny_models.sampling import PatchDataset


class AugmentedPatches(torch.utils.data.Dataset):
    """MONAI dictionary augmentation on top of a PatchDataset, seeded per index so resume stays exact."""

    def __init__(self, patches: PatchDataset, seed: int, clinical_dropout: float, flip_axes: Sequence[int] = ()):
        self.patches, self.seed, self.clinical_dropout = patches, seed, clinical_dropout
        if not set(flip_axes) <= {0, 1, 2}:
            raise ValueError(f"flip_axes: expected spatial axes among 0, 1, 2 (RAS x, y, z), got {list(flip_axes)}")
        keys = ("image", "label")
        self.transform = mt.Compose(
            [
                *[mt.RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in flip_axes],
                mt.RandAffined(
                    keys,
                    prob=0.3,
                    rotate_range=(0.26, 0.26, 0.26),  # +-15 degrees
                    scale_range=(0.15, 0.15, 0.15),
                    mode=("bilinear", "nearest"),
                    padding_mode="border",
                ),
                mt.RandScaleIntensityd("image", factors=0.1, prob=0.5),
                mt.RandShiftIntensityd("image", offsets=0.05, prob=0.5),
                mt.RandGaussianNoised("image", prob=0.15, std=0.02),
            ]
        )

    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.patches[index]
        seed = (self.seed * 1_000_003 + index) % (2**32)
        self.transform.set_random_state(seed=seed)
        out = self.transform({"image": sample["image"], "label": sample["label"]})
        sample["image"] = torch.as_tensor(out["image"]).float().contiguous()
        sample["label"] = torch.as_tensor(out["label"]).long().contiguous()
        if "clinical" in sample and np.random.default_rng(seed).random() < self.clinical_dropout:
            sample["clinical"] = torch.full_like(sample["clinical"], float("nan"))  # all missing
        return sample
