"""Training-time augmentation of fine-tuning patches at the level of nnU-Net v2's default pipeline, built from
MONAI dictionary transforms and seeded per sample index (resume replays the same patches exactly).

nnU-Net's nnUNetTrainer.get_training_transforms, in its order and with its probabilities (per sample):
rotation (p 0.2, +-30 degrees about each axis) and scaling (p 0.2, one factor 0.7-1.4) in one resampling,
Gaussian noise (p 0.1, variance 0-0.1), Gaussian blur (p 0.2 x 0.5 per channel, sigma 0.5-1 voxel per axis),
multiplicative brightness (p 0.15, 0.75-1.25), contrast around the mean (p 0.15, 0.75-1.25, range kept),
simulated low resolution (p 0.25 x 0.5 per channel, zoom 0.5-1), inverted gamma (p 0.1) and gamma (p 0.3),
both 0.7-1.5 with the mean and std retained, then mirroring, here only along the configured axes (none by
default: in RAS the side is the one cue between liver and spleen).

The intensity ranges are nnU-Net's, meant for z-scored input (nny_models.planning.normalize_ct); with a
fixed HU window mapped to [-1, 1] they are relatively stronger.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import monai.transforms as mt
import numpy as np
import torch

from nny_models.sampling import PatchDataset


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities (per sample) and ranges; the defaults are nnU-Net v2's."""

    p_rotation: float = 0.2  # probability of a random rotation
    rotation_deg: float = 30.0  # each axis rotated by U(-this, this) degrees
    p_scaling: float = 0.2  # probability of a random isotropic zoom
    scaling: tuple[float, float] = (0.7, 1.4)  # zoom factor range (MONAI affine convention)
    p_noise: float = 0.1  # probability of additive Gaussian noise
    noise_variance: tuple[float, float] = (0.0, 0.1)  # noise variance range (z-scored intensities)
    p_blur: float = 0.1  # nnU-Net: p 0.2 per sample x 0.5 per channel
    blur_sigma: tuple[float, float] = (0.5, 1.0)  # Gaussian sigma in voxels, drawn per axis
    p_brightness: float = 0.15  # probability of a multiplicative brightness change
    brightness: tuple[float, float] = (0.75, 1.25)  # multiplier range
    p_contrast: float = 0.15  # probability of a contrast change around the mean (value range preserved)
    contrast: tuple[float, float] = (0.75, 1.25)  # contrast factor range
    p_low_res: float = 0.125  # nnU-Net: p 0.25 per sample x 0.5 per channel
    low_res_zoom: tuple[float, float] = (0.5, 1.0)  # downsampling factor of the simulated low resolution
    p_gamma_inverted: float = 0.1  # probability of a gamma on the inverted image (mean and std retained)
    p_gamma: float = 0.3  # probability of a gamma (mean and std retained)
    gamma: tuple[float, float] = (0.7, 1.5)  # gamma range of both
    p_flip: float = 0.5  # per configured flip axis

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name.startswith("p_") and not 0.0 <= v <= 1.0:
                raise ValueError(f"AugmentConfig.{f.name}: expected a probability in [0, 1], got {v}")
            if isinstance(v, tuple) and (len(v) != 2 or v[0] > v[1] or v[0] < 0):
                raise ValueError(f"AugmentConfig.{f.name}: expected (low, high) with 0 <= low <= high, got {v}")


class RandRotateScaled(mt.RandomizableTransform, mt.MapTransform):
    """nnU-Net's spatial transform without elastic deformation: rotation and scaling decided independently
    (each with its own probability) and applied in one resampling; image bilinear, label nearest."""

    def __init__(self, keys, cfg: AugmentConfig, mode: Sequence[str] = ("bilinear", "nearest")):
        mt.MapTransform.__init__(self, keys)
        mt.RandomizableTransform.__init__(self, prob=1.0)
        self.cfg, self.mode = cfg, tuple(mode)
        self.rotate: list[float] | None = None
        self.scale: float | None = None

    def randomize(self, data: Any = None) -> None:
        rot, scale = self.R.random() < self.cfg.p_rotation, self.R.random() < self.cfg.p_scaling
        r = np.deg2rad(self.cfg.rotation_deg)
        self.rotate = [float(a) for a in self.R.uniform(-r, r, 3)] if rot else None
        self.scale = float(self.R.uniform(*self.cfg.scaling)) if scale else None
        self._do_transform = rot or scale

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        affine = mt.Affine(rotate_params=self.rotate, scale_params=None if self.scale is None else [self.scale] * 3,
                           padding_mode="border", image_only=True)
        for key, mode in zip(self.key_iterator(d), self.mode):
            d[key] = affine(d[key], mode=mode)
        return d


def build_transforms(cfg: AugmentConfig, flip_axes: Sequence[int] = ()) -> tuple[list[str], mt.Compose]:
    """(names, Compose) of the pipeline, in nnU-Net's order; names[i] describes transforms[i]."""
    keys = ("image", "label")
    steps = [
        ("rotate_scale", RandRotateScaled(keys, cfg)),
        ("noise", mt.RandGaussianNoised("image", prob=cfg.p_noise, std=float(np.sqrt(cfg.noise_variance[1])))),
        ("blur", mt.RandGaussianSmoothd("image", sigma_x=cfg.blur_sigma, sigma_y=cfg.blur_sigma,
                                        sigma_z=cfg.blur_sigma, prob=cfg.p_blur)),
        ("brightness", mt.RandScaleIntensityd("image", factors=(cfg.brightness[0] - 1, cfg.brightness[1] - 1),
                                              prob=cfg.p_brightness)),
        ("contrast", mt.RandScaleIntensityFixedMeand("image", factors=(cfg.contrast[0] - 1, cfg.contrast[1] - 1),
                                                     fixed_mean=True, preserve_range=True, prob=cfg.p_contrast)),
        ("low_res", mt.RandSimulateLowResolutiond("image", prob=cfg.p_low_res, zoom_range=cfg.low_res_zoom)),
        ("gamma_inverted", mt.RandAdjustContrastd("image", prob=cfg.p_gamma_inverted, gamma=cfg.gamma,
                                                  invert_image=True, retain_stats=True)),
        ("gamma", mt.RandAdjustContrastd("image", prob=cfg.p_gamma, gamma=cfg.gamma, retain_stats=True)),
        *[(f"flip_{axis}", mt.RandFlipd(keys, prob=cfg.p_flip, spatial_axis=axis)) for axis in flip_axes],
    ]
    return [n for n, _ in steps], mt.Compose([t for _, t in steps])


class AugmentedPatches(torch.utils.data.Dataset):
    """MONAI dictionary augmentation on top of a PatchDataset, seeded per index so resume stays exact.

    flip_axes: RAS axes mirrored at random (none by default). config: probabilities and ranges (nnU-Net's)."""

    def __init__(self, patches: PatchDataset, seed: int, clinical_dropout: float, flip_axes: Sequence[int] = (),
                 config: AugmentConfig | None = None):
        self.patches, self.seed, self.clinical_dropout = patches, seed, clinical_dropout
        if not set(flip_axes) <= {0, 1, 2}:
            raise ValueError(f"flip_axes: expected spatial axes among 0, 1, 2 (RAS x, y, z), got {list(flip_axes)}")
        self.config = config or AugmentConfig()
        self.names, self.transform = build_transforms(self.config, flip_axes)

    def __len__(self) -> int:
        return len(self.patches)

    def fired(self) -> list[str]:
        """Names of the transforms that changed the last sample (in this process)."""
        return [n for n, t in zip(self.names, self.transform.transforms) if getattr(t, "_do_transform", False)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.patches[index]
        seed = (self.seed * 1_000_003 + index) % (2**32)
        self.transform.set_random_state(seed=seed)
        out = self.transform({"image": sample["image"], "label": sample["label"]})
        # plain tensors: MONAI hands back MetaTensors, whose Python-level __torch_function__ then wraps every op of
        # the forward, the loss and the backward (0.217 vs 0.246 s a CPU step, bench/train_step.py)
        sample["image"] = torch.as_tensor(out["image"]).as_subclass(torch.Tensor).float().contiguous()
        sample["label"] = torch.as_tensor(out["label"]).as_subclass(torch.Tensor).round().long().contiguous()
        if "clinical" in sample and np.random.default_rng(seed).random() < self.clinical_dropout:
            sample["clinical"] = torch.full_like(sample["clinical"], float("nan"))  # all missing
        return sample
