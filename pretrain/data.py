"""The pretext sample pipeline of Volume Fusion pretraining, batched on the training device.

The dataloader only cuts "source" patches out of the preprocessed cache (PatchDataset, no labels). Each
step then turns a batch of source patches into pretext samples on the GPU (or CPU), as MIS-FM does:

1. two views per source patch: random resized crop (scale 0.7-1.5 per axis, trilinear) + random flips;
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
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from nny_models.config import PreprocessConfig
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
    out_range: tuple[float, float] | None = None  # augmented views are mapped back onto this range; None = the
    # preprocessing's out_range (what fine-tuning and inference see)

    def __post_init__(self) -> None:
        """Refuse values that would crash mid-run or train on garbage (constant or NaN views) without an error; each
        message names the flag (--pretext.<field>) and the range expected."""
        def ordered(r, lo=-math.inf, hi=math.inf, strict_low=False) -> bool:
            if len(r) != 2:
                return False
            a, b = float(r[0]), float(r[1])
            return math.isfinite(a) and math.isfinite(b) and (a > lo if strict_low else a >= lo) and a <= b <= hi

        problems = []
        if self.num_classes < 2:
            problems.append(f"num_classes must be >= 2 (K + 1 fusion classes), got {self.num_classes}")
        if self.variant not in ("grid", "boxes"):
            problems.append(f"variant must be 'grid' or 'boxes', got {self.variant!r}")
        if not 0 <= self.fg_ratio <= 1:  # NaN fails too
            problems.append(f"fg_ratio must be in [0, 1] (a fraction of the blocks), got {self.fg_ratio}")
        if not 0 < self.block_min <= self.block_max:
            problems.append(f"block_min / block_max must satisfy 0 < min <= max, got {self.block_min}, {self.block_max}")
        if self.pairing not in ("same_volume", "roll"):
            problems.append(f"pairing must be 'same_volume' or 'roll', got {self.pairing!r}")
        if not ordered(self.scale_range, lo=0, strict_low=True):
            problems.append(f"scale_range must be MIN MAX with 0 < MIN <= MAX, got {tuple(self.scale_range)}")
        for name in ("flip_prob", "invert_prob"):
            if not 0 <= getattr(self, name) <= 1:
                problems.append(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        for name in ("contrast_low", "contrast_high"):  # percentiles: outside [0, 100] the top-k rank crashes
            if not ordered(getattr(self, name), lo=0, hi=100):
                problems.append(f"{name} must be MIN MAX percentiles with 0 <= MIN <= MAX <= 100, got "
                                f"{tuple(getattr(self, name))}")
        if not problems and not self.contrast_low[1] < self.contrast_high[0]:  # else the curve runs backwards
            problems.append(f"contrast_low {tuple(self.contrast_low)} must lie below contrast_high "
                            f"{tuple(self.contrast_high)} (the low percentile maps to 0.1, the high one to 0.9)")
        if not ordered(self.gamma_range, lo=0, strict_low=True):  # gamma 0 makes every view constant, < 0 infinite
            problems.append(f"gamma_range must be MIN MAX with 0 < MIN <= MAX, got {tuple(self.gamma_range)}")
        if self.out_range is not None and not (ordered(self.out_range) and self.out_range[0] < self.out_range[1]):
            problems.append(f"out_range must be LOW HIGH with LOW < HIGH (finite), or None, got {tuple(self.out_range)}")
        if problems:
            raise ValueError("; ".join(f"--pretext.{p}" for p in problems))

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


def check_pretext_for(patch_size: Sequence[int], batch_size: int, cfg: PretextConfig) -> None:
    """Refuse pretext options that do not fit the run's --patch_size / --batch_size (called once they are known)."""
    if cfg.pairing == "roll" and batch_size < 2:  # make_views would silently pair the two views of one volume
        raise ValueError(f"--pretext.pairing roll takes the foreground from another volume of the batch, so it needs "
                         f"--batch_size >= 2 (patches per process), got {batch_size}; use --pretext.pairing same_volume")
    from nny_models.io import MAX_VOLUME_BYTES

    source = source_patch_size(patch_size, cfg)
    nbytes = 4 * batch_size * math.prod(source)  # one float32 batch of source patches, before the two views
    if nbytes > MAX_VOLUME_BYTES:
        raise ValueError(f"--pretext.scale_range {tuple(cfg.scale_range)}: with --patch_size {list(patch_size)} and "
                         f"--batch_size {batch_size} each batch reads source patches of {list(source)} voxels "
                         f"({nbytes / 1024**3:.1f} GiB as float32, above {MAX_VOLUME_BYTES / 1024**3:.0f} GiB); expected "
                         "a largest crop scale of a few times the patch (MIS-FM: 0.7 1.5)")


MAX_FILES_LOOKED_AT = 10_000  # per sub-folder of a plain data folder, when looking for images it would skip


def skipped_inputs(data_dir: Path, records: Sequence) -> list[str]:
    """What a plain data folder holds that case discovery (nny_models.io.discover_cases) silently leaves out, in words:
    an image name that is no readable file (a broken symbolic link, a folder without DICOM files, a pipe) and a
    sub-folder holding images or DICOM files further down (a patient/study/series tree: only the first level is a
    case). Hidden entries (macOS ._ files, .git) are not reported; MSD / nnU-Net layouts and manifests are not
    plain folders."""
    from nny_models.io import IMAGE_SUFFIXES, _file_kind, _is_dicom_file

    data_dir = Path(data_dir)
    if not data_dir.is_dir() or any((data_dir / n).exists() for n in ("dataset.json", "imagesTr", "imagesTs")):
        return []
    used = {os.path.realpath(r.image) for r in records}
    found = []
    for entry in sorted(data_dir.iterdir()):
        if entry.name.startswith(".") or os.path.realpath(entry) in used:
            continue
        if entry.name.lower().endswith(IMAGE_SUFFIXES):
            kind = "a folder without DICOM files" if entry.is_dir() else _file_kind(entry)
            found.append(f"{entry.name} ({kind})")
        elif entry.is_dir() and not entry.is_symlink():
            looked = 0
            for root, dirs, files in os.walk(entry):  # symbolic links are not followed: no loops
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                hit = next((f for f in sorted(files) if not f.startswith(".") and (
                    f.lower().endswith(IMAGE_SUFFIXES) or _is_dicom_file(Path(root) / f))), None)
                if hit is not None:
                    found.append(f"{entry.name}/ (holds {Path(root, hit).relative_to(data_dir)})")
                    break
                looked += len(files)
                if looked > MAX_FILES_LOOKED_AT:
                    break
    return found


def describe_skipped(data_dir: Path, skipped: Sequence[str]) -> str:
    return (f"{data_dir}: {len(skipped)} entr{'y is' if len(skipped) == 1 else 'ies are'} not used as case(s): "
            f"{', '.join(skipped[:5])}{', ...' if len(skipped) > 5 else ''}. A plain folder's cases are its image "
            "files and DICOM series folders at the first level; move nested ones up, or list every case in a CSV "
            "manifest (columns case_id,image) and pass it as --data_dir")


def _rand(shape: Sequence[int], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(tuple(shape), generator=generator, device=generator.device).to(device)


def random_resized_crop(
    x: torch.Tensor,
    out_size: Sequence[int],
    *,
    generator: torch.Generator,
    scale_range: tuple[float, float] = (0.7, 1.5),
    flip_prob: float = 0.5,
    copies: int = 1,
) -> torch.Tensor:
    """Per sample: crop a box of side int(out_size * U(scale_range)) (at most the input side) at a random
    integer position, resize it to out_size (trilinear) and flip each axis with ``flip_prob``.

    x: (B, C, D, H, W). ``copies`` independent views per sample come back as (copies * B, C, *out_size),
    row k * B + i being view k of sample i. One ``F.interpolate`` per view: the crop is axis-aligned, so
    the optimised resize kernel beats a general ``grid_sample`` several times over on the CPU.
    """
    b = x.shape[0] * copies
    src = torch.tensor(x.shape[2:], dtype=torch.float64)
    out = torch.tensor(out_size, dtype=torch.float64)
    lo, hi = scale_range
    scale = lo + (hi - lo) * torch.rand(b, 3, generator=generator, device=generator.device).cpu().double()
    crop = torch.minimum((out * scale).floor(), src).long().clamp_min(1)  # (B, 3) voxels, as PyMIC
    start = (torch.rand(b, 3, generator=generator, device=generator.device).cpu().double() * (src - crop + 1)).floor()
    start = torch.minimum(start.long(), src.long() - crop)
    flip = torch.rand(b, 3, generator=generator, device=generator.device).cpu() < flip_prob
    views = []
    for i in range(b):
        (d0, h0, w0), (cd, ch, cw) = start[i].tolist(), crop[i].tolist()
        j = i % x.shape[0]
        view = x[j : j + 1, :, d0 : d0 + cd, h0 : h0 + ch, w0 : w0 + cw]
        if tuple(view.shape[2:]) != tuple(out_size):
            view = F.interpolate(view, size=tuple(out_size), mode="trilinear", align_corners=False)
        axes = [2 + a for a in range(3) if flip[i, a]]
        views.append(view.flip(axes) if axes else view)
    return torch.cat(views)


def contrast_gamma_curve(
    u: torch.Tensor, vmin: torch.Tensor, v0: torch.Tensor, v1: torch.Tensor, vmax: torch.Tensor, gamma: torch.Tensor
) -> torch.Tensor:
    """MIS-FM's adaptive contrast then gamma, elementwise: [vmin, v0] -> [0, 0.1], [v0, v1] -> [0.1, 0.9],
    [v1, vmax] -> [0.9, 1] (piecewise linear), then y ** gamma. All arguments broadcast."""
    eps = 1e-6
    y = ((u - vmin) * (0.1 / (v0 - vmin).clamp_min(eps))).clamp(max=0.1)
    y = y + ((u - v0) * (0.8 / (v1 - v0).clamp_min(eps))).clamp(0.0, 0.8)
    y = y + ((u - v1) * (0.1 / (vmax - v1).clamp_min(eps))).clamp(0.0, 0.1)
    return y.clamp(0.0, 1.0).pow(gamma)


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
    lut_size: int = 1 << 14,
) -> torch.Tensor:
    """MIS-FM intensity augmentation, independently per sample of x (B, C, D, H, W).

    Adaptive contrast with random percentiles (:func:`contrast_gamma_curve`), gamma, then 1 - y with
    ``invert_prob``; the result is mapped onto ``out_range`` (PyMIC leaves it in [0, 1]; we keep the range
    fine-tuning sees). Percentiles, min and max come from at most ``max_quantile_samples`` evenly strided
    voxels (voxels beyond that min/max are clamped to it).
    The per-sample curve is a monotone 1-D function, so it is tabulated at ``lut_size`` points over
    [min, max] of the sample and applied by nearest lookup: 3 passes over the volume instead of ~12
    (a 2000 HU window in 16384 steps is 0.12 HU per step).
    """
    b = x.shape[0]
    device = x.device
    flat = x.reshape(b, -1)
    sub = flat[:, :: max(1, flat.shape[1] // max_quantile_samples)]
    n = sub.shape[1]

    def uniform(r: tuple[float, float]) -> torch.Tensor:
        return r[0] + (r[1] - r[0]) * _rand((b, 1), generator, device)

    # Only the tails matter: two top-k calls are much cheaper than a full sort on the CPU. Ranks are drawn
    # on the CPU so that the top-k sizes need no device sync.
    rank0 = (uniform(contrast_low).cpu() / 100.0 * (n - 1)).round().long()  # (B, 1) rank of the low percentile
    rank1 = (uniform(contrast_high).cpu() / 100.0 * (n - 1)).round().long()
    k0, k1 = int(rank0.max()) + 1, n - int(rank1.min())
    v0 = sub.topk(k0, dim=1, largest=False).values.gather(1, rank0.to(device))  # ascending
    v1 = sub.topk(k1, dim=1, largest=True).values.gather(1, ((n - 1) - rank1).to(device))  # descending
    vmin, vmax = sub.aminmax(dim=1, keepdim=True)  # of the subsample: voxels beyond are clamped below
    gamma = uniform(gamma_range)
    invert = _rand((b, 1), generator, device) < invert_prob

    span = (vmax - vmin).clamp_min(1e-6)
    grid = vmin + span * torch.linspace(0.0, 1.0, lut_size, device=device)[None]  # (B, L) sample points
    y = contrast_gamma_curve(grid, vmin, v0, v1, vmax, gamma)
    y = torch.where(invert, 1.0 - y, y)
    lut = (y * (out_range[1] - out_range[0]) + out_range[0]).to(x.dtype)
    scale = ((lut_size - 1) / span).to(x.dtype)
    shift = (0.5 - vmin * scale).to(x.dtype)
    out = torch.empty_like(flat)
    for i in range(b):  # per sample: an int32 index (index_select takes it; gather wants int64)
        index = torch.addcmul(shift[i], flat[i], scale[i]).clamp_(0, lut_size - 1).to(torch.int32)
        torch.index_select(lut[i], 0, index, out=out[i])
    return out.reshape(x.shape)


def make_views(
    source: torch.Tensor, patch_size: Sequence[int], cfg: PretextConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independently cropped, flipped and intensity-augmented views (x_fg, x_bg) of a source batch."""
    b = source.shape[0]
    # Both views in one batch (rows [0, B) and [B, 2B)); each row gets its own random parameters.
    views = random_resized_crop(
        source, patch_size, generator=generator, scale_range=cfg.scale_range, flip_prob=cfg.flip_prob, copies=2
    )
    views = intensity_augment(
        views,
        generator=generator,
        contrast_low=cfg.contrast_low,
        contrast_high=cfg.contrast_high,
        gamma_range=cfg.gamma_range,
        invert_prob=cfg.invert_prob,
        out_range=cfg.out_range if cfg.out_range is not None else PreprocessConfig.out_range,
    )
    x_fg, x_bg = views[:b], views[b:]
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
