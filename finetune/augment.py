"""Training-time augmentation of fine-tuning patches at the level of nnU-Net v2's default pipeline, built from
MONAI dictionary transforms and seeded per sample index (resume replays the same patches exactly).

nnU-Net's nnUNetTrainer.get_training_transforms, in its order and with its probabilities (per sample):
rotation (p 0.2, +-30 degrees about each axis) and scaling (p 0.2, one factor 0.7-1.4) in one resampling,
Gaussian noise (p 0.1, variance 0-0.1), Gaussian blur (p 0.2 x 0.5 per channel, sigma 0.5-1 voxel per axis),
multiplicative brightness (p 0.15, 0.75-1.25), contrast around the mean (p 0.15, 0.75-1.25, range kept),
simulated low resolution (p 0.25 x 0.5 per channel, zoom 0.5-1), inverted gamma (p 0.1) and gamma (p 0.3),
both 0.7-1.5 with the mean and std retained, then mirroring, here only along the configured axes (none by
default: in RAS the side is the one cue between liver and spleen).

Two opt-in transforms are ours, not nnU-Net's, both off by default and applied last: thick slices
(RandThickSlicesd, ``--augmentation.p_thick_slices``) and CT noise (RandCTNoised, ``--augmentation.p_ct_noise``).
Clinical CT is often read at 5 mm or more while the model grid is finer; a thick axial slice averages its slab
(the slice profile) and the gaps between slices are filled by interpolation when the volume is resampled.
nnU-Net's low-resolution simulation zooms all axes alike and does not blur, so it does not produce that look. The
label stays the fine truth: the network learns the anatomy behind the thick slice. CT noise is grainy: the
reconstruction kernel correlates it over a voxel or two in plane, and a thick slice resampled to a finer grid
stretches it along z; nnU-Net's noise is white. Neither improved the pipeline's shifted held-out set over two
seeds (README), so the defaults stay nnU-Net's.

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
    p_thick_slices: float = 0.0  # probability of re-acquiring the patch with thick axial slices (ours; opt-in)
    thick_slices_mm: tuple[float, float] = (4.0, 8.0)  # slice thickness (= slice step) drawn from this, in mm
    p_ct_noise: float = 0.0  # probability of correlated (grainy) CT noise, after the thick slices (ours; opt-in)
    ct_noise_std: tuple[float, float] = (0.1, 0.8)  # its std (z-scored units: x the plan's foreground HU std)
    ct_noise_grain: tuple[float, float] = (0.5, 2.0)  # its correlation (Gaussian sigma, voxels), in plane and along z
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


def build_transforms(cfg: AugmentConfig, flip_axes: Sequence[int] = (), z_spacing_mm: float | None = None
                     ) -> tuple[list[str], mt.Compose]:
    """(names, Compose) of the pipeline, in nnU-Net's order; names[i] describes transforms[i]. Thick slices need
    the patch grid's z spacing (mm) and are left out without it."""
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
        # ours, last: Compose seeds each transform from one stream in list order, so appending keeps the seeds
        # (and the patches) of the transforms above as they were before these two existed
        *([("thick_slices", RandThickSlicesd("image", cfg, z_spacing_mm))] if z_spacing_mm else []),
        ("ct_noise", RandCTNoised("image", cfg)),
    ]
    return [n for n, _ in steps], mt.Compose([t for _, t in steps])


class _RandImageTransformd(mt.RandomizableTransform, mt.MapTransform):
    """A random image-only transform: ``randomize`` draws its parameters, ``apply`` changes one image."""

    def apply(self, image: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            d[key] = self.apply(torch.as_tensor(d[key]).as_subclass(torch.Tensor).float())
        return d


class RandThickSlicesd(_RandImageTransformd):
    """Simulates an acquisition with thick axial slices (RAS axis 2), then its resampling back to the patch grid.

    A thickness T is drawn from ``cfg.thick_slices_mm``; with the grid's z step s (mm), the patch is blurred along z
    by a Gaussian slice profile of FWHM sqrt(T^2 - s^2) (what T adds to the grid's own profile), sampled every
    T / s voxels from a random first position, and linearly interpolated back to every voxel, as resampling to the
    model grid does. Draws of T within 1.25 s of the grid's own step change nothing and are skipped."""

    def __init__(self, keys, cfg: AugmentConfig, z_spacing_mm: float):
        mt.MapTransform.__init__(self, keys)
        mt.RandomizableTransform.__init__(self, prob=cfg.p_thick_slices)
        if not z_spacing_mm > 0:
            raise ValueError(f"RandThickSlicesd: expected a positive z spacing in mm, got {z_spacing_mm}")
        self.cfg, self.z_mm = cfg, float(z_spacing_mm)
        self.thickness: float | None = None
        self.phase = 0.0

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        lo, hi = max(self.cfg.thick_slices_mm[0], 1.25 * self.z_mm), self.cfg.thick_slices_mm[1]
        self.thickness = float(self.R.uniform(lo, hi)) if hi > lo else None
        self.phase = float(self.R.random())
        self._do_transform = self._do_transform and self.thickness is not None

    def apply(self, image: torch.Tensor) -> torch.Tensor:
        return thick_slices(image, self.thickness / self.z_mm, self.phase)


class RandCTNoised(_RandImageTransformd):
    """Adds correlated Gaussian noise: white noise smoothed by a Gaussian whose sigma is drawn from
    ``cfg.ct_noise_grain`` once in plane and once along z, then scaled to a std drawn from ``cfg.ct_noise_std``."""

    def __init__(self, keys, cfg: AugmentConfig):
        mt.MapTransform.__init__(self, keys)
        mt.RandomizableTransform.__init__(self, prob=cfg.p_ct_noise)
        self.cfg = cfg
        self.std, self.grain = 0.0, (0.0, 0.0)

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        self.std = float(self.R.uniform(*self.cfg.ct_noise_std))
        self.grain = (float(self.R.uniform(*self.cfg.ct_noise_grain)), float(self.R.uniform(*self.cfg.ct_noise_grain)))

    def apply(self, image: torch.Tensor) -> torch.Tensor:
        white = torch.from_numpy(self.R.standard_normal(image.shape).astype(np.float32))
        return image + correlated(white, (self.grain[0], self.grain[0], self.grain[1])) * self.std


def correlated(white: torch.Tensor, sigma: Sequence[float]) -> torch.Tensor:
    """white (C, X, Y, Z) smoothed by a Gaussian of ``sigma`` voxels per axis, rescaled to unit std."""
    from monai.networks.layers.convutils import gaussian_1d
    from monai.networks.layers.simplelayers import separable_filtering

    kernels = [gaussian_1d(torch.tensor(float(s))) if s > 0 else torch.ones(1) for s in sigma]
    noise = separable_filtering(white[None], kernels, mode="circular")[0]
    return noise / noise.std().clamp_min(1e-6)


def thick_slices(image: torch.Tensor, step: float, phase: float) -> torch.Tensor:
    """image (C, X, Y, Z) re-sampled with slices every ``step`` voxels along Z (profile FWHM ``step`` grid voxels,
    the grid's own one voxel included), the first at ``phase * step``, then linearly interpolated back."""
    from monai.networks.layers.convutils import gaussian_1d
    from monai.networks.layers.simplelayers import separable_filtering

    x = image.as_subclass(torch.Tensor).float()
    sigma = float(np.sqrt(max(step**2 - 1.0, 0.0)) / 2.3548)
    if sigma > 0:
        one = torch.ones(1)
        x = separable_filtering(x[None], [one, one, gaussian_1d(torch.tensor(sigma))], mode="replicate")[0]
    n = x.shape[-1]
    centres = torch.arange(min(phase * step, n - 1), n - 1 + 1e-6, step)  # the acquired slices' positions (voxels)
    if len(centres) < 2:  # a patch thinner than two slices: one slice fills it
        return x[..., centres.round().long().clamp(0, n - 1)].expand_as(x).clone()
    slabs = _linear(x, centres)  # (C, X, Y, k)
    # back to every voxel: between two acquired slices linear, before the first and after the last the nearest one
    pos = torch.arange(n, dtype=torch.float32)
    return _linear(slabs, ((pos - centres[0]) / step).clamp(0, len(centres) - 1))


def _linear(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """x sampled along its last axis at fractional indices ``pos`` (within [0, len - 1])."""
    lo = pos.floor().long().clamp(0, x.shape[-1] - 1)
    hi = (lo + 1).clamp(max=x.shape[-1] - 1)
    w = (pos - lo.float()).to(x.dtype)
    return x[..., lo] * (1 - w) + x[..., hi] * w


class AugmentedPatches(torch.utils.data.Dataset):
    """MONAI dictionary augmentation on top of a PatchDataset, seeded per index so resume stays exact.

    flip_axes: RAS axes mirrored at random (none by default). config: probabilities and ranges (nnU-Net's).
    z_spacing_mm: the patches' z step in mm, for the thick-slice simulation (left out when None)."""

    def __init__(self, patches: PatchDataset, seed: int, clinical_dropout: float, flip_axes: Sequence[int] = (),
                 config: AugmentConfig | None = None, z_spacing_mm: float | None = None):
        self.patches, self.seed, self.clinical_dropout = patches, seed, clinical_dropout
        if not set(flip_axes) <= {0, 1, 2}:
            raise ValueError(f"flip_axes: expected spatial axes among 0, 1, 2 (RAS x, y, z), got {list(flip_axes)}")
        self.config = config or AugmentConfig()
        self.names, self.transform = build_transforms(self.config, flip_axes, z_spacing_mm)

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
