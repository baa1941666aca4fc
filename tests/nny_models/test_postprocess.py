import numpy as np
import pytest
import torch

from nny_models.postprocess import keep_largest_component, label_indices


def _volume():
    pred = np.zeros((16, 16, 16), np.uint8)
    pred[1:8, 1:8, 1:8] = 1  # the liver
    pred[3:5, 3:5, 3:5] = 2  # a tumor inside it
    pred[7:9, 1:3, 1:3] = 2  # a tumor on the liver border, touching it
    pred[12:14, 12:14, 12:14] = 1  # a liver island (e.g. the spleen called liver)
    pred[14:16, 0:2, 0:2] = 2  # a tumor outside the liver
    pred[0:2, 14:16, 14:16] = 4  # another class, far away
    return pred


def test_liver_and_tumor_form_one_organ():
    pred = _volume()
    out = keep_largest_component(pred, [1, 2])
    assert out.dtype == pred.dtype and out.shape == pred.shape
    assert (out[12:14, 12:14, 12:14] == 0).all()  # island removed
    assert (out[14:16, 0:2, 0:2] == 0).all()  # tumor outside the liver removed
    assert (out[3:5, 3:5, 3:5] == 2).all() and (out[8, 1:3, 1:3] == 2).all()  # tumors in / on the liver kept
    assert (out == 4).sum() == 8  # other labels untouched
    assert (out == 1).sum() == (pred[:9, :9, :9] == 1).sum()
    t = keep_largest_component(torch.as_tensor(pred), [1, 2])
    assert isinstance(t, torch.Tensor) and torch.equal(t, torch.as_tensor(out))


def test_one_label_and_diagonal_connectivity():
    pred = np.zeros((8, 8, 8), np.uint8)
    pred[0:2, 0:2, 0:2] = 1
    pred[2, 2, 2] = 1  # touches the cube at a corner only: still one 26-connected component
    pred[5:8, 5:8, 5:8] = 1  # the largest
    out = keep_largest_component(pred, 1)
    assert (out == 1).sum() == 27 and out[0, 0, 0] == 0 and out[2, 2, 2] == 0
    assert np.array_equal(keep_largest_component(np.zeros((4, 4, 4), np.uint8), 1), np.zeros((4, 4, 4)))


def test_bad_shape_and_label_names():
    with pytest.raises(ValueError, match="X, Y, Z"):
        keep_largest_component(np.zeros((1, 4, 4, 4)), 1)
    assert label_indices(["background", "liver", "aorta"], ["liver", "tumor"]) == [1]


def test_rightward_offset_follows_the_grid_orientation():
    from nny_models.postprocess import rightward_offset

    pred = np.zeros((20, 8, 8), np.uint8)
    pred[13:17] = 1  # voxels 13-16 of 20: centroid 14.5, i.e. 0.25 of the axis past its centre
    assert rightward_offset(pred, [1], "RAS") == pytest.approx(0.25)  # RAS: the index grows to the right
    assert rightward_offset(pred, [1], "LPS") == pytest.approx(-0.25)
    assert rightward_offset(np.moveaxis(pred, 0, 1), [1], "ARS") == pytest.approx(0.25)  # found by its L/R code
    assert rightward_offset(pred, [2], "RAS") is None  # absent label


def test_predict_warns_when_the_liver_lies_on_the_patients_left():
    from nny_models.config import NnyNetConfig
    from nny_models.inference import _warn_if_liver_on_left

    config = NnyNetConfig()  # RAS grid, labels background, liver, ...
    pred = np.zeros((20, 8, 8), np.uint8)
    pred[2:6] = 1  # on the patient's left: the spleen called liver, or a mirrored affine
    with pytest.warns(UserWarning, match="ct.nii.gz: the liver of this mask lies on the patient's left"):
        _warn_if_liver_on_left(pred, config, "ct.nii.gz")
    pred = np.flip(pred, 0)  # on the right, where a liver is
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_if_liver_on_left(pred, config, "ct.nii.gz")
