import matplotlib.image as mpimg
import numpy as np
import pytest

from finetune.figures import _pick_slices, plot_training_curves, save_overlays


def _volume():
    x, y, z = np.meshgrid(np.arange(48), np.arange(40), np.arange(24), indexing="ij")
    liver = ((x - 24) / 16) ** 2 + ((y - 20) / 12) ** 2 + ((z - 12) / 9) ** 2 < 1
    tumor = ((x - 28) ** 2 + (y - 20) ** 2 + (z - 14) ** 2) < 25
    gt = np.where(tumor, 2, np.where(liver, 1, 0)).astype(np.uint8)
    image = np.random.default_rng(0).normal(0, 15, gt.shape) - 100 + 200 * liver - 60 * tumor
    pred = np.roll(gt, 2, axis=0)
    return image.astype(np.float32), gt, pred


def _colour_fraction(rgba: np.ndarray) -> float:
    rgb = rgba[..., :3]
    return float((rgb.max(-1) - rgb.min(-1) > 0.1).mean())  # grey and black/white pixels have R = G = B


def test_overlays_png(tmp_path):
    image, gt, pred = _volume()
    path = save_overlays(image, gt, pred, tmp_path / "fig" / "overlay.png", n_slices=3)
    png = mpimg.imread(path)
    h, w = png.shape[:2]
    assert png.ndim == 3 and h > 300 and w > 300
    top, middle, bottom = png[: h // 3], png[h // 3 : 2 * h // 3], png[2 * h // 3 :]
    assert _colour_fraction(top) < 0.001  # the plain image row is grey
    assert _colour_fraction(middle) > 0.02 and _colour_fraction(bottom) > 0.02
    red = (middle[..., 0] > middle[..., 1] + 0.15) & (middle[..., 0] > middle[..., 2] + 0.15)
    assert red.sum() > 20  # the tumor colour is there


def test_slices_go_through_tumor():
    image, gt, pred = _volume()
    picks = _pick_slices(gt, pred, 3)
    assert len(picks) == 3 and all((gt[:, :, z] == 2).any() for z in picks)
    assert 14 in picks  # the slice with the largest tumor area
    empty = np.zeros_like(gt)
    assert _pick_slices(empty, empty, 3) == [12]


def test_overlay_rejects_mismatched_shapes(tmp_path):
    image, gt, pred = _volume()
    with pytest.raises(ValueError, match="one \\(X, Y, Z\\) shape"):
        save_overlays(image, gt[:-1], pred, tmp_path / "x.png")


def test_training_curves_png(tmp_path):
    history = [{"step": s, "loss": 2.0 / (1 + s), "lr": 1e-3 * min(1, (s + 1) / 5)} for s in range(40)]
    history += [{"step": s, "val_dice": 0.2 + s / 100} for s in range(0, 40, 10)]
    path = plot_training_curves(history, tmp_path / "curves.png")
    png = mpimg.imread(path)
    assert png.shape[1] > png.shape[0] > 200  # three panels side by side
    assert _colour_fraction(png) > 0.001  # the curves are drawn
    with pytest.raises(ValueError, match="step"):
        plot_training_curves([{"loss": 1.0}], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="empty"):
        plot_training_curves([], tmp_path / "bad.png")


def test_radiological_puts_the_patients_right_on_the_viewers_left():
    from finetune.figures import radiological

    volume = np.zeros((8, 6, 4), np.float32)
    volume[1, 4, 2] = 1  # index 1 along x; near the end of y
    ras = np.diag([2.0, 2.0, 3.0, 1.0])  # x index grows towards the patient's right, y towards anterior
    lps = np.diag([-2.0, -2.0, 3.0, 1.0])  # x towards the left, y towards posterior (a DICOM-like order)
    # LAS: the x index grows towards the patient's left (drawn left to right), y towards anterior (drawn upwards)
    assert np.argwhere(radiological(volume, ras) == 1).tolist() == [[6, 4, 2]]
    assert np.argwhere(radiological(volume, lps) == 1).tolist() == [[1, 1, 2]]
    las = np.diag([-2.0, 2.0, 3.0, 1.0])
    np.testing.assert_array_equal(radiological(volume, las), volume)  # already LAS: unchanged
