import nibabel as nib
import numpy as np
import pytest

from nny_models.config import PreprocessConfig
from nny_models.preprocessing import preprocess_case, preprocess_volume, restore_to_original

# A non-RAS (P, L, S), anisotropic grid: voxel axis 0 runs posterior at 0.8 mm, axis 1 left at 1.5 mm.
AFFINE = np.array([[0, -1.5, 0, 30.0], [-0.8, 0, 0, 20.0], [0, 0, 3.0, -10.0], [0, 0, 0, 1]])
SHAPE = (64, 48, 20)


def body_phantom(seed=0):
    """Air around a box of soft tissue with a liver-ish block and a small tumor."""
    rng = np.random.default_rng(seed)
    image = np.full(SHAPE, -1000.0, np.float32)
    image[12:52, 12:36, 3:17] = 40 + rng.normal(0, 10, (40, 24, 14))
    label = np.zeros(SHAPE, np.uint8)
    label[18:36, 16:30, 5:13] = 1
    label[21:25, 18:22, 7:10] = 2
    image[label == 1] += 60
    return image, label


def test_roundtrip_exact_when_spacing_unchanged():
    image, label = body_phantom()
    cfg = PreprocessConfig(spacing=(1.5, 0.8, 3.0))  # the RAS spacing of AFFINE: only reorient + crop
    x, state = preprocess_volume(image, AFFINE, cfg)
    assert tuple(x.shape[1:]) == tuple(state["shape"]) and state["resampled_shape"] == [48, 64, 20]
    assert state["original_axcodes"] == "PLS"
    # crop happened (the body is smaller than the volume + margin on at least one axis)
    assert state["shape"] != state["resampled_shape"]
    affine_ras = np.array(state["affine"])
    assert np.all(np.diag(affine_ras)[:3] > 0)  # RAS: positive diagonal

    # a label on the preprocessed grid (made by running the case through the same path) comes back exactly
    from nny_models.preprocessing import _run

    _, lab, st = _run(image, label, AFFINE, cfg)
    assert st["shape"] == state["shape"]
    back = restore_to_original(lab.numpy(), st)
    assert back.shape == (1, *SHAPE) and back.dtype == np.uint8
    np.testing.assert_array_equal(back[0], label)
    # the preprocessed image itself, restored linearly, matches the windowed original
    restored = restore_to_original(x.numpy(), state)[0]
    expected = np.clip(image, -1000, 1000) / 1000.0
    body = label > 0
    np.testing.assert_allclose(restored[body], expected[body], atol=1e-4)


def test_roundtrip_nearly_when_resampled():
    image, label = body_phantom()
    cfg = PreprocessConfig(spacing=(1.0, 1.0, 2.0))
    from nny_models.preprocessing import _run

    x, lab, state = _run(image, label, AFFINE, cfg)
    assert state["spacing"] == [1.0, 1.0, 2.0]
    np.testing.assert_allclose(np.linalg.norm(np.array(state["affine"])[:3, :3], axis=0), [1.0, 1.0, 2.0])
    back = restore_to_original(lab.numpy(), state)[0]
    assert back.shape == SHAPE
    assert (back == label).mean() > 0.99
    for c, min_dice in ((1, 0.95), (2, 0.85)):  # nearest-neighbour there and back: within a voxel
        a, b = label == c, back == c
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > min_dice
        assert np.abs(np.argwhere(a).mean(0) - np.argwhere(b).mean(0)).max() < 1.0

    # probabilities (C, ...) come back as floats on the original grid, background outside the crop
    probs = np.stack([(lab[0] == c).numpy().astype(np.float32) for c in range(3)])
    p = restore_to_original(probs, state)
    assert p.shape == (3, *SHAPE) and p.dtype == np.float32
    np.testing.assert_allclose(p.sum(0), 1.0, atol=1e-5)
    assert (p.argmax(0) == label).mean() > 0.99


def test_preprocess_case_matches_preprocess_volume(tmp_path):
    image, label = body_phantom()
    nib.save(nib.Nifti1Image(image, AFFINE), str(tmp_path / "ct.nii.gz"))
    nib.save(nib.Nifti1Image(label, AFFINE), str(tmp_path / "seg.nii.gz"))
    cfg = PreprocessConfig(spacing=(1.2, 1.2, 2.5))
    out = preprocess_case(tmp_path / "ct.nii.gz", tmp_path / "seg.nii.gz", cfg)
    x, state = preprocess_volume(image, AFFINE, cfg)
    assert out["image"].dtype == np.float32 and out["label"].dtype == np.uint8
    assert out["image"].shape == out["label"].shape == tuple(x.shape)
    np.testing.assert_allclose(out["image"], x.numpy(), atol=1e-6)
    assert out["image"].min() >= -1.0 and out["image"].max() <= 1.0
    assert set(np.unique(out["label"])) == {0, 1, 2}
    assert out["meta"]["crop_start"] == state["crop_start"]
    import json

    json.dumps(out["meta"])  # JSON-able


def test_no_crop_when_disabled_or_all_air():
    image, _ = body_phantom()
    _, state = preprocess_volume(image, AFFINE, PreprocessConfig(spacing=(1.5, 0.8, 3.0), crop_foreground=False))
    assert state["shape"] == state["resampled_shape"]
    air = np.full(SHAPE, -1000.0, np.float32)
    _, state = preprocess_volume(air, AFFINE, PreprocessConfig(spacing=(1.5, 0.8, 3.0)))
    assert state["shape"] == state["resampled_shape"]


def test_bad_inputs(tmp_path):
    image, label = body_phantom()
    cfg = PreprocessConfig()
    nib.save(nib.Nifti1Image(image, AFFINE), str(tmp_path / "ct.nii.gz"))
    nib.save(nib.Nifti1Image(label[:, :, :10], AFFINE), str(tmp_path / "short.nii.gz"))
    with pytest.raises(ValueError, match=r"short.nii.gz.*label shape \(64, 48, 10\) differs from image shape"):
        preprocess_case(tmp_path / "ct.nii.gz", tmp_path / "short.nii.gz", cfg)
    shifted = AFFINE.copy()
    shifted[0, 3] += 5
    nib.save(nib.Nifti1Image(label, shifted), str(tmp_path / "moved.nii.gz"))
    with pytest.raises(ValueError, match=r"moved.nii.gz.*label affine differs"):
        preprocess_case(tmp_path / "ct.nii.gz", tmp_path / "moved.nii.gz", cfg)
    nib.save(nib.Nifti1Image(label.astype(np.float32) + 0.5, AFFINE), str(tmp_path / "soft.nii.gz"))
    with pytest.raises(ValueError, match=r"soft.nii.gz.*integer class labels"):
        preprocess_case(tmp_path / "ct.nii.gz", tmp_path / "soft.nii.gz", cfg)

    nan = image.copy()
    nan[3, 3, 3] = np.nan
    nan[4, 4, 4] = np.inf
    nib.save(nib.Nifti1Image(nan, AFFINE), str(tmp_path / "nan.nii.gz"))
    with pytest.raises(ValueError, match=r"nan.nii.gz: 2 voxel\(s\) are NaN or Inf"):
        preprocess_case(tmp_path / "nan.nii.gz", None, cfg)

    raw = (tmp_path / "ct.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(raw[: len(raw) // 3])
    with pytest.raises(ValueError, match=r"cut.nii.gz: could not read"):
        preprocess_case(tmp_path / "cut.nii.gz", None, cfg)

    with pytest.raises(ValueError, match=r"expected a 3D volume"):
        preprocess_volume(image[:, :, 0], AFFINE, cfg)
    with pytest.raises(ValueError, match=r"4x4 affine"):
        preprocess_volume(image, np.eye(3), cfg)
    x, state = preprocess_volume(image, AFFINE, cfg)
    with pytest.raises(ValueError, match=r"restore_to_original: expected an array"):
        restore_to_original(np.zeros((1, 4, 4, 4), np.uint8), state)


def _sphere_case(original_mm=1.0, model_mm=3.0, n=48, radius=10.0):
    """A 1 mm CT grid, its 3 mm model grid, and on the model grid a soft sphere's 2-class softmax and argmax."""
    from nny_models.preprocessing import restore_labels_from_probabilities  # noqa: F401 (fails early if absent)

    affine = np.diag([original_mm, original_mm, original_mm, 1.0])
    image = np.full((n, n, n), 40.0, np.float32)  # all body: no crop
    cfg = PreprocessConfig(spacing=(model_mm,) * 3, crop_foreground=False)
    x, state = preprocess_volume(image, affine, cfg)
    model_affine = np.asarray(state["affine"])
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in x.shape[1:]], indexing="ij"), -1)
    world = grid @ model_affine[:3, :3].T + model_affine[:3, 3]
    centre = (n - 1) / 2 * original_mm
    distance = np.linalg.norm(world - centre, axis=-1)
    inside = 1.0 / (1.0 + np.exp((distance - radius) / 1.5))  # the network's soft edge
    probs = np.stack([1.0 - inside, inside]).astype(np.float32)
    fine = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"), -1) * original_mm
    truth = np.linalg.norm(fine - centre, axis=-1) < radius
    return probs, probs.argmax(0).astype(np.uint8), state, truth


def _dice(a, b):
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_labels_from_probabilities_follow_the_edge_that_nearest_neighbour_steps_over():
    from nny_models.preprocessing import restore_labels_from_probabilities

    probs, labels, state, truth = _sphere_case()
    nearest = restore_to_original(labels[None], state)[0]
    smooth = restore_labels_from_probabilities(probs, labels, state)
    assert smooth.shape == truth.shape and smooth.dtype == np.uint8
    # a 3 mm staircase on a 1 mm grid, against the argmax of linear interpolation (nnU-Net's export)
    assert _dice(smooth == 1, truth) > _dice(nearest == 1, truth) + 0.02
    assert _dice(smooth == 1, truth) > 0.95


def test_labels_from_probabilities_keep_what_post_processing_removed():
    """A component post-processing dropped (its probabilities still say 'organ') must not come back."""
    from nny_models.preprocessing import restore_labels_from_probabilities

    probs, labels, state, _ = _sphere_case()
    blob = np.zeros_like(labels, bool)
    blob[1:3, 1:3, 1:3] = True  # a second, far-away component of class 1
    probs[:, blob] = np.array([0.1, 0.9], np.float32)[:, None]
    raw = probs.argmax(0).astype(np.uint8)
    kept = raw.copy()
    kept[blob] = 0  # what keep_largest does
    out = restore_labels_from_probabilities(probs, kept, state)
    assert not (out[:12, :12, :12] == 1).any()  # the blob's region on the 1 mm grid (model voxels 0-3)
    assert (out == 1).sum() > 3000  # the sphere is still there (4/3 pi 10^3 = 4189 mm^3)
    assert (restore_to_original(probs, state).argmax(0)[:12, :12, :12] == 1).any()  # the plain argmax brings it back


def test_labels_from_probabilities_add_no_class_the_model_grid_did_not_have_there():
    """Between a voxel of class 1 and one of class 3, class 2 may win the interpolated probabilities although it is
    nowhere the argmax: resampling must not paint an island of it."""
    from nny_models.preprocessing import restore_labels_from_probabilities

    _, _, state, _ = _sphere_case()
    shape = tuple(state["shape"])
    checker = (np.indices(shape).sum(0) % 2).astype(bool)
    probs = np.zeros((4, *shape), np.float32)
    probs[1] = np.where(checker, 0.40, 0.25)
    probs[3] = np.where(checker, 0.25, 0.40)
    probs[2] = 0.35
    labels = probs.argmax(0).astype(np.uint8)
    assert not (labels == 2).any()
    from nny_models.preprocessing import restore_to_original as restore

    assert (restore(probs, state).argmax(0) == 2).any()  # the unguarded argmax would paint class 2
    out = restore_labels_from_probabilities(probs, labels, state)
    assert not (out == 2).any() and set(np.unique(out)) <= {1, 3}


def test_labels_from_probabilities_in_slabs_equal_one_box(monkeypatch):
    """A whole-body CT is resampled slab by slab (bounded memory); the slabs must join without a seam."""
    import nny_models.preprocessing as pp

    probs, labels, state, _ = _sphere_case()
    whole = pp.restore_labels_from_probabilities(probs, labels, state)
    monkeypatch.setattr(pp, "RESTORE_SLAB_VOXELS", 48 * 48 * 3)  # slabs of 3 slices
    np.testing.assert_array_equal(pp.restore_labels_from_probabilities(probs, labels, state), whole)
    assert (whole == 1).sum() > 3000
