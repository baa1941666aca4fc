"""Volume Fusion (MIS-FM, Wang et al., arXiv 2306.16925) as pure, batched torch functions.

A pretext sample fuses two sub-volumes voxel-wise with a discrete coefficient alpha = k / K:

    fused = (k / K) * x_fg + (1 - k / K) * x_bg,    k in {0, ..., K},  K = num_classes - 1

and the network learns to segment k (a (K+1)-class segmentation task). Label-0 voxels are exactly
x_bg and label-K voxels exactly x_fg. Two ways to draw the label map k:

- "grid" (current PyMIC): one block size per sample in ``block_range``, a grid of blocks with a
  random offset, int(fg_ratio * n_blocks) random blocks get a class k ~ U{1..K}, the rest (and the
  margin the grid does not cover) stay 0.
- "boxes" (the paper): 20-40 axis-aligned boxes of random size and position, each with k ~ U{1..K};
  later boxes overwrite earlier ones.

Everything runs on the tensors' device; all randomness comes from the ``generator`` argument (drawn
on the generator's device, then moved: the random tables are tiny compared to the volumes).
"""

from __future__ import annotations

from typing import Sequence

import torch

VARIANTS = ("grid", "boxes")


def _uniform_int(low: torch.Tensor, high: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Integers uniform in [low, high] (inclusive, elementwise; low/high broadcast)."""
    low, high = torch.broadcast_tensors(low, high)
    u = torch.rand(low.shape, generator=generator, device=generator.device).to(low.device)
    return low + torch.floor(u * (high - low + 1).to(u.dtype)).long().clamp_max(high - low)


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) == 5:
        shape = (shape[0],) + shape[2:]
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"fusion_coefficients: shape must be (B, C, D, H, W) or (B, D, H, W), got {shape}")
    return shape  # type: ignore[return-value]


def _grid_labels(
    b: int, dims: torch.Tensor, K: int, fg_ratio: float, block_range, generator: torch.Generator, device
) -> torch.Tensor:
    lo = torch.tensor(block_range[0], dtype=torch.long).clamp_min(1)
    hi = torch.maximum(torch.tensor(block_range[1], dtype=torch.long), lo)
    lo, hi = torch.minimum(lo, dims), torch.minimum(hi, dims)  # a block never exceeds the patch
    size = _uniform_int(lo.expand(b, 3), hi.expand(b, 3), generator)  # (B, 3) block size per sample
    n = dims // size  # (B, 3) blocks per axis
    offset = _uniform_int(torch.zeros_like(size), dims % size, generator)  # grid offset per axis
    n_blocks = n.prod(dim=1)  # (B,)
    n_fg = (n_blocks.double() * fg_ratio).long()  # int(ratio * n_blocks), as PyMIC
    n_max = int(n_blocks.max())

    # Choose exactly n_fg[b] of the n_blocks[b] blocks: rank blocks by a random score.
    score = torch.rand(b, n_max, generator=generator, device=generator.device).to("cpu")
    index = torch.arange(n_max)
    score = torch.where(index[None] < n_blocks[:, None], score, torch.full_like(score, 2.0))
    rank = score.argsort(dim=1).argsort(dim=1)
    cls = _uniform_int(torch.ones(b, n_max, dtype=torch.long), torch.full((b, n_max), K), generator)
    table = torch.where(rank < n_fg[:, None], cls, torch.zeros_like(cls))

    # Paint each sample's grid with slices: a block table upsampled by its block size.
    label = torch.zeros(b, 1, *dims.tolist(), dtype=torch.long, device=device)
    for i, ((sd, sh, sw), (nd, nh, nw), (od, oh, ow)) in enumerate(zip(size.tolist(), n.tolist(), offset.tolist())):
        blocks = table[i, : nd * nh * nw].reshape(nd, nh, nw).to(device)
        blocks = blocks.repeat_interleave(sd, 0).repeat_interleave(sh, 1).repeat_interleave(sw, 2)
        label[i, 0, od : od + nd * sd, oh : oh + nh * sh, ow : ow + nw * sw] = blocks
    return label


def _box_labels(
    b: int, dims: torch.Tensor, K: int, boxes_range, box_size_range, generator: torch.Generator, device
) -> torch.Tensor:
    if box_size_range is None:  # default: each side between 1/8 and 1/2 of the patch side
        box_size_range = ((dims // 8).clamp_min(1).tolist(), (dims // 2).clamp_min(1).tolist())
    lo = torch.minimum(torch.tensor(box_size_range[0], dtype=torch.long).clamp_min(1), dims)
    hi = torch.minimum(torch.maximum(torch.tensor(box_size_range[1], dtype=torch.long), lo), dims)
    n_lo, n_hi = int(boxes_range[0]), int(boxes_range[1])
    if not 0 <= n_lo <= n_hi:
        raise ValueError(f"volume fusion: boxes_range must be (min, max) with 0 <= min <= max, got {boxes_range}")
    n_boxes = _uniform_int(torch.full((b,), n_lo), torch.full((b,), n_hi), generator)
    size = _uniform_int(lo.expand(b, n_hi, 3), hi.expand(b, n_hi, 3), generator)  # (B, N, 3)
    start = _uniform_int(torch.zeros_like(size), dims - size, generator)
    cls = _uniform_int(torch.ones(b, n_hi, dtype=torch.long), torch.full((b, n_hi), K), generator)
    cls = torch.where(torch.arange(n_hi)[None] < n_boxes[:, None], cls, torch.full_like(cls, -1))  # -1: unused
    # Paint the boxes with slices, in order, so later boxes overwrite earlier ones.
    label = torch.zeros(b, 1, *dims.tolist(), dtype=torch.long, device=device)
    for i, (sizes, starts, classes) in enumerate(zip(size.tolist(), start.tolist(), cls.tolist())):
        for (sd, sh, sw), (d0, h0, w0), k in zip(sizes, starts, classes):
            if k > 0:
                label[i, 0, d0 : d0 + sd, h0 : h0 + sh, w0 : w0 + sw] = k
    return label


def fusion_coefficients(
    shape: Sequence[int],
    *,
    generator: torch.Generator,
    num_classes: int = 5,
    fg_ratio: float = 0.7,
    block_range: tuple[Sequence[int], Sequence[int]] = ((8, 8, 8), (32, 32, 32)),
    variant: str = "grid",
    boxes_range: tuple[int, int] = (20, 40),
    box_size_range: tuple[Sequence[int], Sequence[int]] | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Random Volume Fusion label map k, a long tensor (B, 1, D, H, W) with values in 0..num_classes-1.

    shape: (B, C, D, H, W) or (B, D, H, W) of the volumes to fuse. ``fg_ratio`` and ``block_range``
    (min and max block side per axis) apply to the "grid" variant; ``boxes_range`` (min/max box count)
    and ``box_size_range`` (min/max box side per axis; default 1/8..1/2 of the patch) to "boxes".
    """
    if variant not in VARIANTS:
        raise ValueError(f"volume fusion: variant must be one of {VARIANTS}, got {variant!r}")
    if num_classes < 2:
        raise ValueError(f"volume fusion: num_classes must be >= 2, got {num_classes}")
    if not 0.0 <= fg_ratio <= 1.0:
        raise ValueError(f"volume fusion: fg_ratio must be in [0, 1], got {fg_ratio}")
    b, *spatial = _check_shape(shape)
    dims = torch.tensor(spatial, dtype=torch.long)
    device = torch.device(device) if device is not None else generator.device
    K = num_classes - 1
    if variant == "grid":
        return _grid_labels(b, dims, K, fg_ratio, block_range, generator, device)
    return _box_labels(b, dims, K, boxes_range, box_size_range, generator, device)


def fuse(x_fg: torch.Tensor, x_bg: torch.Tensor, label: torch.Tensor, num_classes: int = 5) -> torch.Tensor:
    """(k/K) x_fg + (1 - k/K) x_bg; exact at k = 0 (x_bg) and k = K (x_fg).

    torch.lerp computes start + w (end - start) for w < 0.5 and end - (1 - w) (end - start) otherwise, so
    it returns x_bg exactly at w = 0 and x_fg exactly at w = 1, in one pass.
    """
    alphas = torch.arange(num_classes, dtype=x_fg.dtype, device=x_fg.device) / (num_classes - 1)
    alpha = torch.index_select(alphas, 0, label.reshape(-1)).reshape(label.shape)  # alphas[K] == 1.0 exactly
    return torch.lerp(x_bg, x_fg, alpha)


def volume_fusion(
    x_fg: torch.Tensor, x_bg: torch.Tensor, *, generator: torch.Generator, num_classes: int = 5, **options
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fuse two batches (B, C, D, H, W) into a pretext sample: returns (fused, label (B, 1, D, H, W) long).

    ``options`` go to :func:`fusion_coefficients` (fg_ratio, block_range, variant, boxes_range, ...).
    """
    if x_fg.shape != x_bg.shape or x_fg.ndim != 5:
        raise ValueError(
            f"volume_fusion: x_fg and x_bg must both be (B, C, D, H, W) of one shape, got "
            f"{tuple(x_fg.shape)} and {tuple(x_bg.shape)}"
        )
    label = fusion_coefficients(
        x_fg.shape, generator=generator, num_classes=num_classes, device=x_fg.device, **options
    )
    return fuse(x_fg, x_bg, label, num_classes), label
