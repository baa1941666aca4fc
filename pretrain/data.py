"""The pretext sample pipeline of Volume Fusion pretraining, batched on the training device.

The dataloader only cuts "source" patches out of the preprocessed cache (PatchDataset, no labels). Each
step then turns a batch of source patches into pretext samples on the GPU (or CPU), as MIS-FM does:

1. two views per source patch: random resized crop (scale 0.7-1.5 per axis) + random flips, done as one
   ``affine_grid`` / ``grid_sample`` call per view for the whole batch;
2. intensity augmentation of each view independently: adaptive contrast (random low/high percentiles
   mapped to 0.1/0.9), gamma in [0.7, 1.5], sometimes inversion;
3. foreground/background pairing: the two views of one volume (PyMIC's Crop4VolumeFusion) or the
   foreground taken from the next volume of the batch (``torch.roll``, the older MIS-FM variant);
4. :func:`pretrain.volume_fusion.volume_fusion`.

All randomness comes from one ``torch.Generator``; run.py seeds a fresh one from (seed, step, rank) so a
resumed run draws the same samples as an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from pretrain.volume_fusion import volume_fusion


@dataclass
class PretextConfig:
    """Options of the pretext pipeline (defaults follow PyMIC's Crop4VolumeFusion + VolumeFusion)."""

    num_classes: int = 5  # K + 1 fusion classes, alpha = k / K
    variant: str = "grid"  # "grid" (current PyMIC) or "boxes" (the paper's 20-40 random boxes)
    fg_ratio: float = 0.7  # grid variant: fraction of blocks that receive a foreground class
    block_min: int = 8  # grid variant: smallest block side in voxels
    block_max: int = 32  # grid variant: largest block side in voxels
    pairing: str = "same_volume"  # "same_volume": two crops of one volume; "roll": fg from another volume
    scale_range: tuple[float, float] = (0.7, 1.5)  # random resized crop: crop side / output side, per axis
    flip_prob: float = 0.5  # probability of flipping each axis of each view
    contrast_low: tuple[float, float] = (0.1, 2.0)  # range of the low percentile mapped to 0.1
    contrast_high: tuple[float, float] = (98.0, 99.9)  # range of the high percentile mapped to 0.9
    gamma_range: tuple[float, float] = (0.7, 1.5)  # gamma correction range
    invert_prob: float = 0.25  # probability of inverting a view's intensities
    out_range: tuple[float, float] = (-1.0, 1.0)  # augmented views are mapped back onto this range

    def __post_init__(self) -> None:
        if self.pairing not in ("same_volume", "roll"):
            raise ValueError(f"PretextConfig.pairing must be 'same_volume' or 'roll', got {self.pairing!r}")
        if not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ValueError(f"PretextConfig.scale_range must be (min, max) with 0 < min <= max, got {self.scale_range}")

    def fusion_options(self) -> dict:
        return dict(
            num_classes=self.num_classes,
            variant=self.variant,
            fg_ratio=self.fg_ratio,
            block_range=((self.block_min,) * 3, (self.block_max,) * 3),
        )

    def to_dict(self) -> dict:
        return asdict(self)


def source_patch_size(patch_size: Sequence[int], cfg: PretextConfig) -> tuple[int, int, int]:
    """Size of the patch to read from the cache so that the largest crop scale still fits."""
    return tuple(int(math.ceil(p * max(1.0, cfg.scale_range[1]))) for p in patch_size)  # type: ignore[return-value]


def _rand(shape: Sequence[int], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(tuple(shape), generator=generator, device=generator.device).to(device)


def random_resized_crop(
    x: torch.Tensor,
    out_size: Sequence[int],
    *,
    generator: torch.Generator,
    scale_range: tuple[float, float] = (0.7, 1.5),
    flip_prob: float = 0.5,
) -> torch.Tensor:
    """Per sample: crop a box of side out_size * U(scale_range) (at most the input side), resize it to
    out_size with trilinear interpolation and flip each axis with ``flip_prob``. x: (B, C, D, H, W)."""
    b, c = x.shape[:2]
    src = torch.tensor(x.shape[2:], dtype=torch.float32, device=x.device)
    out = torch.tensor(out_size, dtype=torch.float32, device=x.device)
    lo, hi = scale_range
    crop = torch.minimum(out * (lo + (hi - lo) * _rand((b, 3), generator, x.device)), src)  # (B, 3) voxels
    start = (src - crop) * _rand((b, 3), generator, x.device)
    flip = torch.where(_rand((b, 3), generator, x.device) < flip_prob, -1.0, 1.0)
    # Normalised coordinates (align_corners=False): the crop spans [-1 + 2 p / S, -1 + 2 (p + c) / S].
    half = crop / src * flip
    center = -1.0 + (2.0 * start + crop) / src
    theta = torch.zeros(b, 3, 4, device=x.device)
    for row, axis in enumerate((2, 1, 0)):  # affine_grid's x, y, z are W, H, D
        theta[:, row, row] = half[:, axis]
        theta[:, row, 3] = center[:, axis]
    grid = F.affine_grid(theta.to(x.dtype), [b, c, *out_size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def intensity_augment(
    x: torch.Tensor,
    *,
    generator: torch.Generator,
    contrast_low: tuple[float, float] = (0.1, 2.0),
    contrast_high: tuple[float, float] = (98.0, 99.9),
    gamma_range: tuple[float, float] = (0.7, 1.5),
    invert_prob: float = 0.25,
    out_range: tuple[float, float] = (-1.0, 1.0),
    max_quantile_samples: int = 1 << 15,
) -> torch.Tensor:
    """MIS-FM intensity augmentation, independently per sample of x (B, C, D, H, W).

    Adaptive contrast maps [min, p_low] -> [0, 0.1], [p_low, p_high] -> [0.1, 0.9], [p_high, max] -> [0.9, 1],
    then gamma, then 1 - x with ``invert_prob``; the result is mapped onto ``out_range`` (PyMIC leaves it
    in [0, 1]; we keep the range fine-tuning sees). Percentiles come from at most ``max_quantile_samples``
    evenly strided voxels per sample, which keeps the sort cheap at 96^3 and more.
    """
    b = x.shape[0]
    device = x.device
    flat = x.reshape(b, -1)
    stride = max(1, flat.shape[1] // max_quantile_samples)
    sub = flat[:, ::stride]
    n = sub.shape[1]

    def uniform(r: tuple[float, float]) -> torch.Tensor:
        return r[0] + (r[1] - r[0]) * _rand((b, 1), generator, device)

    # Only the tails matter: two top-k calls are much cheaper than a full sort on the CPU.
    rank0 = (uniform(contrast_low) / 100.0 * (n - 1)).round().long()  # (B, 1) rank of the low percentile
    rank1 = (uniform(contrast_high) / 100.0 * (n - 1)).round().long()
    k0, k1 = int(rank0.max()) + 1, n - int(rank1.min())
    v0 = sub.topk(k0, dim=1, largest=False).values.gather(1, rank0)  # ascending
    v1 = sub.topk(k1, dim=1, largest=True).values.gather(1, (n - 1) - rank1)  # descending
    vmin, vmax = flat.aminmax(dim=1, keepdim=True)
    gamma = uniform(gamma_range).to(x.dtype)
    invert = _rand((b, 1), generator, device) < invert_prob

    shape = (b,) + (1,) * (x.ndim - 1)
    v0, v1, vmin, vmax, gamma, invert = (t.reshape(shape) for t in (v0, v1, vmin, vmax, gamma, invert))
    eps = 1e-6
    # Piecewise linear: [vmin, v0] -> [0, 0.1], [v0, v1] -> [0.1, 0.9], [v1, vmax] -> [0.9, 1].
    y = (x - vmin).mul_(0.1 / (v0 - vmin).clamp_min(eps)).clamp_(max=0.1)
    y += (x - v0).mul_(0.8 / (v1 - v0).clamp_min(eps)).clamp_(0.0, 0.8)
    y += (x - v1).mul_(0.1 / (vmax - v1).clamp_min(eps)).clamp_(0.0, 0.1)
    y = y.clamp_(0.0, 1.0).pow_(gamma)
    sign = torch.where(invert, -1.0, 1.0)  # inversion 1 - y folded into the final affine map
    lo, hi = out_range
    return y.mul_(sign * (hi - lo)).add_(torch.where(invert, hi, lo))


def make_views(
    source: torch.Tensor, patch_size: Sequence[int], cfg: PretextConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independently cropped, flipped and intensity-augmented views (x_fg, x_bg) of a source batch."""
    views = []
    for _ in range(2):
        v = random_resized_crop(
            source, patch_size, generator=generator, scale_range=cfg.scale_range, flip_prob=cfg.flip_prob
        )
        v = intensity_augment(
            v,
            generator=generator,
            contrast_low=cfg.contrast_low,
            contrast_high=cfg.contrast_high,
            gamma_range=cfg.gamma_range,
            invert_prob=cfg.invert_prob,
            out_range=cfg.out_range,
        )
        views.append(v)
    x_fg, x_bg = views
    if cfg.pairing == "roll" and x_fg.shape[0] > 1:
        x_fg = torch.roll(x_fg, shifts=1, dims=0)  # foreground from another volume of the batch
    return x_fg, x_bg


def pretext_batch(
    source: torch.Tensor, patch_size: Sequence[int], cfg: PretextConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Source patches (B, 1, *source_patch) -> (fused image (B, 1, *patch_size), label (B, 1, *patch_size) long)."""
    if source.ndim != 5:
        raise ValueError(f"pretext_batch: expected source patches (B, C, D, H, W), got shape {tuple(source.shape)}")
    x_fg, x_bg = make_views(source.float(), patch_size, cfg, generator)
    return volume_fusion(x_fg, x_bg, generator=generator, **cfg.fusion_options())


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """A CPU generator seeded from (seed, step, rank): the same draws after a resume, different per rank."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + rank)
