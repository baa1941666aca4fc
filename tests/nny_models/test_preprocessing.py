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
