"""nnU-Net-level augmentation: determinism per (seed, index), integral labels aligned with the image after
rotation, every transform firing at some index with the default probabilities."""

import dataclasses

import numpy as np
import pytest
import torch
from scipy import ndimage

from finetune.augment import AugmentConfig, AugmentedPatches, correlated, thick_slices

OFF = AugmentConfig(**{f.name: 0.0 for f in dataclasses.fields(AugmentConfig) if f.name.startswith("p_")})


@pytest.fixture(scope="module")
def phantom_patch():
    """A 64 x 64 x 16 patch of a phantom around the liver, HU window -200..300 -> [-1, 1], with its labels."""
    from nny_models.phantoms import generate_phantom

    c = generate_phantom(0, preset="test")
    lab = c.label
    cx, cy, cz = (int(v.mean()) for v in np.nonzero(lab == 1))
    sl = tuple(slice(max(0, m - h), max(0, m - h) + 2 * h) for m, h in zip((cx, cy, cz), (32, 32, 8)))
    img = np.zeros((64, 64, 16), np.float32) - 1
    lb = np.zeros((64, 64, 16), np.int64)
    src_img, src_lab = c.image[sl], lab[sl]
    region = tuple(slice(0, s) for s in src_img.shape)
    img[region] = np.clip((src_img + 200) / 250 - 1, -1, 1)
    lb[region] = src_lab
    return {"image": torch.from_numpy(img)[None], "label": torch.from_numpy(lb)[None]}


def _patches(patch, n):
    return [{"image": patch["image"].clone(), "label": patch["label"].clone(), "clinical": torch.zeros(3)}
            for _ in range(n)]


def test_deterministic_per_seed_and_index(phantom_patch):
    a = AugmentedPatches(_patches(phantom_patch, 6), seed=3, clinical_dropout=0.5)
    b = AugmentedPatches(_patches(phantom_patch, 6), seed=3, clinical_dropout=0.5)
    for i in (5, 0, 2):  # any order: a resumed run asks for later indices first
        x, y = a[i], b[i]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
        assert torch.equal(torch.isnan(x["clinical"]), torch.isnan(y["clinical"]))
    assert torch.equal(a[4]["image"], a[4]["image"])  # the same index again gives the same patch
    # plain tensors, not MONAI MetaTensors (their __torch_function__ would slow every op of the training step)
    assert all(type(a[i][k]) is torch.Tensor for i in range(6) for k in ("image", "label"))
    other = AugmentedPatches(_patches(phantom_patch, 6), seed=4, clinical_dropout=0.5)
    assert any(not torch.equal(a[i]["image"], other[i]["image"]) for i in range(6))


def test_rotation_keeps_labels_integral_and_on_the_organ(phantom_patch):
    cfg = dataclasses.replace(OFF, p_rotation=1.0, p_scaling=1.0)
    ds = AugmentedPatches(_patches(phantom_patch, 4), seed=0, clinical_dropout=0.0, config=cfg)
    liver_in = phantom_patch["image"][0].numpy()[ndimage.binary_erosion(phantom_patch["label"][0].numpy() == 1)]
    for i in range(4):
        out = ds[i]
        assert ds.fired() == ["rotate_scale"]
        lab, img = out["label"], out["image"]
        assert lab.dtype == torch.long and set(lab.unique().tolist()) <= {0, 1, 2, 3, 4}
        assert not torch.equal(lab, phantom_patch["label"])  # it moved
        # the label follows the organ: the image under the rotated liver label still has the liver's intensity
        liver = ndimage.binary_erosion(lab[0].numpy() == 1)
        assert liver.sum() > 100
        # (a label shifted by 2 voxels against the image is off by 0.04 and 1.7x as spread)
        assert abs(float(img[0].numpy()[liver].mean()) - float(liver_in.mean())) < 0.03
        assert float(img[0].numpy()[liver].std()) < 1.3 * float(liver_in.std())


def test_each_transform_fires_at_some_index_with_default_probabilities(phantom_patch):
    ds = AugmentedPatches(_patches(phantom_patch, 120), seed=0, clinical_dropout=0.0, flip_axes=(1,), z_spacing_mm=3.0,
                          config=AugmentConfig(p_thick_slices=0.25, p_ct_noise=0.3))  # both opt-in (p 0 by default)
    assert "thick_slices" in ds.names
    fired = {}
    for i in range(120):
        ds[i]
        for name in ds.fired():
            fired[name] = fired.get(name, 0) + 1
    assert set(fired) == set(ds.names), fired
    # rates close to the configured probabilities (120 draws)
    cfg = ds.config
    for name, p in (("gamma", cfg.p_gamma), ("rotate_scale", 1 - (1 - cfg.p_rotation) * (1 - cfg.p_scaling)),
                    ("flip_1", cfg.p_flip), ("noise", cfg.p_noise), ("thick_slices", cfg.p_thick_slices)):
        assert abs(fired[name] / 120 - p) < 0.12, (name, fired[name])


@pytest.mark.parametrize("name", ["noise", "blur", "brightness", "contrast", "low_res", "thick_slices", "ct_noise",
                                  "gamma_inverted", "gamma"])
def test_intensity_transforms_change_only_the_image(phantom_patch, name):
    cfg = dataclasses.replace(OFF, **{f"p_{name}": 1.0})
    out = AugmentedPatches(_patches(phantom_patch, 1), seed=1, clinical_dropout=0.0, config=cfg, z_spacing_mm=2.0)[0]
    assert torch.equal(out["label"], phantom_patch["label"])
    assert not torch.allclose(out["image"], phantom_patch["image"], atol=1e-4)
    assert torch.isfinite(out["image"]).all() and out["image"].shape == phantom_patch["image"].shape


def test_all_off_is_identity_and_bad_config_is_refused(phantom_patch):
    out = AugmentedPatches(_patches(phantom_patch, 1), seed=0, clinical_dropout=0.0, config=OFF)[0]
    assert torch.equal(out["image"], phantom_patch["image"]) and torch.equal(out["label"], phantom_patch["label"])
    with pytest.raises(ValueError, match="p_gamma"):
        AugmentConfig(p_gamma=1.5)
    with pytest.raises(ValueError, match="scaling"):
        AugmentConfig(scaling=(1.4, 0.7))


def test_thick_slices_blur_and_sample_along_z_only():
    """A thick slice averages its slab: a one-voxel sheet spreads over about one slice step and loses contrast; what
    does not vary along z is untouched, in-plane structure included."""
    sheet = torch.zeros(1, 8, 8, 40)
    sheet[..., 20] = 1.0
    out = thick_slices(sheet, step=4.0, phase=0.0)
    profile = out[0, 0, 0]
    assert float(profile.max()) < 0.4  # partial volume: about 1 / step of the sheet's contrast is left
    assert float(profile.sum()) == pytest.approx(1.0, abs=0.15)  # the signal is spread, not lost
    assert int((profile > 0.02).sum()) >= 5  # over about one slice step and more
    assert torch.equal(out[..., 0], out[..., 1])  # in-plane constant stays constant
    inplane = torch.arange(8.0).view(1, 8, 1, 1).expand(1, 8, 8, 40).contiguous()  # varies along x only
    assert torch.allclose(thick_slices(inplane, 3.0, 0.5), inplane, atol=1e-5)
    # between acquired slices the values are interpolated linearly: a ramp along z stays a ramp inside the patch
    ramp = torch.arange(40.0).view(1, 1, 1, 40).expand(1, 2, 2, 40).contiguous()
    assert torch.allclose(thick_slices(ramp, 2.5, 0.0)[..., 8:32], ramp[..., 8:32], atol=1e-3)
    # the slices' first position moves them: another phase, another sampling of the sheet
    assert not torch.allclose(thick_slices(sheet, 4.0, 0.5), out)
    # a patch thinner than one slice step is one slice, whatever the phase
    thin = torch.rand(1, 4, 4, 2)
    for phase in (0.0, 0.9):
        got = thick_slices(thin, 4.0, phase)
        assert got.shape == thin.shape and torch.isfinite(got).all() and torch.equal(got[..., 0], got[..., 1])


def test_thick_slices_keep_the_label_and_skip_thicknesses_below_the_grid(phantom_patch):
    cfg = dataclasses.replace(OFF, p_thick_slices=1.0, thick_slices_mm=(5.0, 8.0))
    ds = AugmentedPatches(_patches(phantom_patch, 3), seed=0, clinical_dropout=0.0, config=cfg, z_spacing_mm=2.0)
    for i in range(3):
        out = ds[i]
        assert ds.fired() == ["thick_slices"]
        assert torch.equal(out["label"], phantom_patch["label"])  # the label stays the fine truth
        assert not torch.allclose(out["image"], phantom_patch["image"], atol=1e-3)
    assert 5.0 <= ds.transform.transforms[ds.names.index("thick_slices")].thickness <= 8.0
    # slices no thicker than 1.25x the grid's own z step would change nothing: the transform does not fire
    coarse = AugmentedPatches(_patches(phantom_patch, 2), seed=0, clinical_dropout=0.0, config=cfg, z_spacing_mm=7.0)
    out = coarse[0]
    assert coarse.fired() == [] and torch.equal(out["image"], phantom_patch["image"])
    # without the grid's spacing the transform is not built at all
    assert "thick_slices" not in AugmentedPatches(_patches(phantom_patch, 1), seed=0, clinical_dropout=0.0).names


def test_ct_noise_is_grainy_at_the_drawn_std(phantom_patch):
    """Neighbouring voxels of CT noise are correlated (white noise's are not) and its std is the drawn one."""
    white = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 64, 64, 32)).astype(np.float32))
    for sigma in (0.7, 1.5):
        n = correlated(white, (sigma, sigma, 0.5))
        lag1 = float((n[:, 1:] * n[:, :-1]).mean())  # along x
        assert float(n.std()) == pytest.approx(1.0, abs=1e-3)
        assert lag1 == pytest.approx(float(np.exp(-1 / (4 * sigma**2))), abs=0.05)  # a Gaussian's autocorrelation
    assert abs(float((white[:, 1:] * white[:, :-1]).mean())) < 0.02
    cfg = dataclasses.replace(OFF, p_ct_noise=1.0, ct_noise_std=(0.4, 0.4))
    ds = AugmentedPatches(_patches(phantom_patch, 2), seed=0, clinical_dropout=0.0, config=cfg)
    out = ds[0]
    assert ds.fired() == ["ct_noise"] and torch.equal(out["label"], phantom_patch["label"])
    assert float((out["image"] - phantom_patch["image"]).std()) == pytest.approx(0.4, rel=0.02)
    assert not torch.equal(ds[1]["image"], out["image"])  # another index, another noise


def test_opt_in_transforms_off_leave_nnunets_chain_bit_identical(phantom_patch):
    """Off by default and last in the chain, the two transforms of ours do not move the seeds of nnU-Net's: every
    patch is the one the chain without them makes, so runs of the default recipe stay reproducible."""
    import monai.transforms as mt

    ds = AugmentedPatches(_patches(phantom_patch, 30), seed=7, clinical_dropout=0.0, flip_axes=(1,), z_spacing_mm=3.0)
    assert ds.names[-2:] == ["thick_slices", "ct_noise"]
    nnunet = mt.Compose(ds.transform.transforms[:-2])
    for i in range(30):
        out = ds[i]
        nnunet.set_random_state(seed=(7 * 1_000_003 + i) % (2**32))
        ref = nnunet({"image": phantom_patch["image"].clone(), "label": phantom_patch["label"].clone()})
        assert torch.equal(out["image"], torch.as_tensor(ref["image"]).as_subclass(torch.Tensor).float())
        assert torch.equal(out["label"], torch.as_tensor(ref["label"]).as_subclass(torch.Tensor).round().long())
