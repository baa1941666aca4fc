"""Volume Fusion label maps and fused images (pretrain/volume_fusion.py) and the pretext pipeline (pretrain/data.py)."""

from __future__ import annotations

import pytest
import torch

from pretrain.data import PretextConfig, contrast_gamma_curve, intensity_augment, pretext_batch, random_resized_crop, source_patch_size
from pretrain.volume_fusion import fusion_coefficients, volume_fusion

SHAPE = (3, 1, 32, 40, 48)
VARIANTS = ["grid", "boxes"]


def _pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g) + 3.0


def _fuse(variant: str, seed: int, **kw):
    x_fg, x_bg = _pair()
    fused, label = volume_fusion(x_fg, x_bg, generator=torch.Generator().manual_seed(seed), variant=variant, **kw)
    return x_fg, x_bg, fused, label


@pytest.mark.parametrize("variant", VARIANTS)
def test_label_range_shape_and_exact_endpoints(variant):
    small_blocks = {"block_range": ((4, 4, 4), (8, 8, 8))} if variant == "grid" else {}
    x_fg, x_bg, fused, label = _fuse(variant, seed=1, **small_blocks)
    assert label.shape == (SHAPE[0], 1, *SHAPE[2:]) and label.dtype == torch.long
    assert label.min() >= 0 and label.max() <= 4
    assert set(label.unique().tolist()) == {0, 1, 2, 3, 4}  # many blocks/boxes: every class occurs
    bg, fg = label == 0, label == 4
    assert torch.equal(fused[bg], x_bg[bg])  # exact, not allclose
    assert torch.equal(fused[fg], x_fg[fg])
    mid = label == 2
    assert torch.allclose(fused[mid], 0.5 * x_fg[mid] + 0.5 * x_bg[mid], atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_same_seed_same_output_different_seed_differs(variant):
    _, _, f1, l1 = _fuse(variant, seed=7)
    _, _, f2, l2 = _fuse(variant, seed=7)
    _, _, f3, l3 = _fuse(variant, seed=8)
    assert torch.equal(l1, l2) and torch.equal(f1, f2)
    assert not torch.equal(l1, l3)


@pytest.mark.parametrize("variant", VARIANTS)
def test_batch_samples_differ(variant):
    _, _, _, label = _fuse(variant, seed=3)
    assert not torch.equal(label[0], label[1]) and not torch.equal(label[1], label[2])


def test_grid_foreground_fraction_matches_ratio():
    # Blocks that tile the volume exactly: the fraction is int(ratio * n_blocks) / n_blocks.
    g = torch.Generator().manual_seed(0)
    for ratio in (0.3, 0.7):
        label = fusion_coefficients((4, 1, 32, 32, 32), generator=g, fg_ratio=ratio, block_range=((8, 8, 8), (8, 8, 8)))
        frac = (label > 0).float().mean(dim=(1, 2, 3, 4))
        assert torch.allclose(frac, torch.full_like(frac, int(64 * ratio) / 64))
        # a grid label is constant on each block
        blocks = label[:, 0].reshape(4, 4, 8, 4, 8, 4, 8)
        assert (blocks == blocks[:, :, :1, :, :1, :, :1]).all()
    # Default block range on a 96^3 patch: uncovered grid margins lower the fraction, never raise it.
    label = fusion_coefficients((8, 1, 96, 96, 96), generator=g)
    frac = (label > 0).float().mean(dim=(1, 2, 3, 4))
    assert (frac <= 0.7 + 1e-6).all() and frac.mean() > 0.35


def test_boxes_cover_part_of_the_volume():
    g = torch.Generator().manual_seed(0)
    label = fusion_coefficients((4, 1, 48, 48, 48), generator=g, variant="boxes")
    frac = (label > 0).float().mean(dim=(1, 2, 3, 4))
    assert ((frac > 0.1) & (frac < 0.95)).all()
    none = fusion_coefficients((2, 1, 16, 16, 16), generator=g, variant="boxes", boxes_range=(0, 0))
    assert none.max() == 0


def test_bad_arguments_raise():
    g = torch.Generator()
    x = torch.zeros(1, 1, 8, 8, 8)
    with pytest.raises(ValueError, match="variant"):
        volume_fusion(x, x, generator=g, variant="stripes")
    with pytest.raises(ValueError, match="same|shape"):
        volume_fusion(x, torch.zeros(1, 1, 8, 8, 4), generator=g)
    with pytest.raises(ValueError, match="fg_ratio"):
        fusion_coefficients(x.shape, generator=g, fg_ratio=1.5)


def test_resized_crop_identity_and_flip():
    x = torch.arange(4 * 5 * 6, dtype=torch.float32).reshape(1, 1, 4, 5, 6)
    g = torch.Generator().manual_seed(0)
    same = random_resized_crop(x, (4, 5, 6), generator=g, scale_range=(1.0, 1.0), flip_prob=0.0)
    flipped = random_resized_crop(x, (4, 5, 6), generator=g, scale_range=(1.0, 1.0), flip_prob=1.0)
    assert torch.allclose(same, x, atol=1e-4)
    assert torch.allclose(flipped, x.flip(2, 3, 4), atol=1e-4)


def test_intensity_augment_matches_piecewise_contrast_reference():
    x = torch.randn(2, 1, 16, 16, 16)
    y = intensity_augment(
        x, generator=torch.Generator(), contrast_low=(1.0, 1.0), contrast_high=(99.0, 99.0),
        gamma_range=(1.0, 1.0), invert_prob=0.0, out_range=(0.0, 1.0),
    )
    for i in range(2):
        v = x[i].flatten()
        vmin, vmax = v.min(), v.max()
        v0, v1 = v.sort().values[[round(0.01 * (v.numel() - 1)), round(0.99 * (v.numel() - 1))]]
        ref = torch.where(
            x[i] < v0, (x[i] - vmin) * 0.1 / (v0 - vmin),
            torch.where(x[i] <= v1, (x[i] - v0) / (v1 - v0) * 0.8 + 0.1, 0.9 + 0.1 * (x[i] - v1) / (vmax - v1)),
        )
        # the curve is applied through a lookup table: error <= steepest slope * half a table step
        slope = max(0.1 / (v0 - vmin), 0.8 / (v1 - v0), 0.1 / (vmax - v1))
        assert torch.allclose(y[i], ref, atol=float(slope * (vmax - vmin) / (1 << 14) / 2) + 1e-6)
        assert torch.allclose(contrast_gamma_curve(x[i], vmin, v0, v1, vmax, torch.tensor(1.0)), ref, atol=1e-6)
    inv = intensity_augment(x, generator=torch.Generator(), invert_prob=1.0, gamma_range=(1.0, 1.0))
    keep = intensity_augment(x, generator=torch.Generator(), invert_prob=0.0, gamma_range=(1.0, 1.0))
    assert torch.allclose(inv, -keep, atol=1e-5)  # inversion in [-1, 1] is a sign flip


@pytest.mark.parametrize("pairing", ["same_volume", "roll"])
def test_pretext_batch_deterministic_and_in_range(pairing):
    cfg = PretextConfig(pairing=pairing)
    patch = (32, 32, 32)
    src = torch.randn(2, 1, *source_patch_size(patch, cfg))
    a = pretext_batch(src, patch, cfg, torch.Generator().manual_seed(5))
    b = pretext_batch(src, patch, cfg, torch.Generator().manual_seed(5))
    c = pretext_batch(src, patch, cfg, torch.Generator().manual_seed(6))
    assert a[0].shape == (2, 1, *patch) and a[1].shape == (2, 1, *patch)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].min() >= -1.0 - 1e-5 and a[0].max() <= 1.0 + 1e-5
