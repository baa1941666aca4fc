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


def _liver_and_bigger_spleen(right_size: int = 6):
    """RAS grid (x grows to the patient's right): a liver block of right_size^3 on the right, a larger 'spleen
    called liver' block of 7^3 on the left."""
    pred = np.zeros((32, 16, 16), np.uint8)
    pred[24:24 + right_size, 2:2 + right_size, 2:2 + right_size] = 1
    pred[2:9, 2:9, 2:9] = 1
    pred[25, 3, 3] = 2  # a tumor inside the liver
    return pred


def test_side_keeps_the_liver_when_the_spleen_called_liver_is_larger():
    pred = _liver_and_bigger_spleen()
    assert (keep_largest_component(pred, [1, 2])[24:, :, :] == 0).all()  # the largest: the spleen, liver dropped
    out = keep_largest_component(pred, [1, 2], side="right")
    assert (out[:16] == 0).all() and (out[24:30, 2:8, 2:8] > 0).all() and out[25, 3, 3] == 2
    # the same volume written x-flipped in an LAS grid: the liver is still the one on the patient's right
    flipped = keep_largest_component(pred[::-1].copy(), [1, 2], side="right", orientation="LAS")
    assert np.array_equal(flipped[::-1], out)
    assert np.array_equal(keep_largest_component(pred, [1, 2], side="left"), keep_largest_component(pred, [1, 2]))


def test_side_ignores_a_small_cluster_on_that_side():
    """Situs inversus: the liver on the left and a stray cluster under a quarter of its size on the right."""
    pred = _liver_and_bigger_spleen(right_size=3)  # 27 voxels vs 343
    assert np.array_equal(keep_largest_component(pred, [1, 2], side="right"), keep_largest_component(pred, [1, 2]))
    with pytest.raises(ValueError, match="side"):
        keep_largest_component(pred, [1, 2], side="up")


def test_keep_side_is_checked_and_older_configs_keep_the_largest():
    from nny_models.config import NnyNetConfig

    kwargs = {"model_kwargs": {"size": "tiny", "out_channels": 5}, "keep_largest": ["liver", "tumor"]}
    assert NnyNetConfig(**kwargs).keep_side is None  # a config.json without the field
    assert NnyNetConfig(**kwargs, keep_side="right").to_dict()["keep_side"] == "right"
    with pytest.raises(ValueError, match="keep_side"):
        NnyNetConfig(**kwargs, keep_side="up")


@pytest.mark.parametrize("option, labels, expected", [
    ("auto", ["liver", "tumor"], "right"), ("auto", ["kidney"], None), ("none", ["liver"], None),
    ("left", ["liver"], "left"), ("right", [], None)])
def test_fine_tuning_stores_the_liver_side(option, labels, expected):
    from finetune.run import FinetuneConfig, _keep_side

    assert _keep_side(FinetuneConfig(keep_side=option), labels) == expected


def _liver_with_lesions():
    """A liver block with a tumor inside, a tumor on its capsule (half its surface on the liver) and a 'tumor' in a
    neighbour organ that only touches the liver at one face."""
    pred = np.zeros((24, 16, 16), np.uint8)
    pred[2:14, 2:14, 2:14] = 1  # the liver
    pred[5:8, 5:8, 5:8] = 2  # inside: every shell voxel is liver
    pred[12:15, 5:8, 5:8] = 2  # on the capsule, bulging out: 57 of its 98 shell voxels are liver
    pred[15:20, 9:13, 9:13] = 2  # outside, its face against the liver's corner region
    pred[14, 9:13, 9:13] = 4  # a vessel beside it
    return pred


def test_lesions_outside_the_organ_become_background():
    from nny_models.postprocess import drop_lesions_outside

    pred = _liver_with_lesions()
    out = drop_lesions_outside(pred, lesion=2, organ=1, min_contact=0.5)
    assert (out[5:8, 5:8, 5:8] == 2).all()  # inside the liver: kept
    assert (out[15:20, 9:13, 9:13] == 0).all()  # in the neighbour: background
    assert np.array_equal(out[pred != 2], pred[pred != 2])  # no other voxel changes
    assert (out[12:15, 5:8, 5:8] == 2).all()  # on the capsule: 57 of its 98 shell voxels are liver, kept at 0.5 ...
    assert (drop_lesions_outside(pred, 2, 1, 0.6)[12:15, 5:8, 5:8] == 0).all()  # ... dropped at 0.6
    assert (drop_lesions_outside(pred, 2, 1, 1.0) == 2).sum() == 27  # only the lesion wholly inside stays
    t = drop_lesions_outside(torch.as_tensor(pred), 2, 1, 0.5)
    assert isinstance(t, torch.Tensor) and torch.equal(t, torch.as_tensor(out))
    assert pred[16, 10, 10] == 2  # the input is not modified
    with pytest.raises(ValueError, match="min_contact"):
        drop_lesions_outside(pred, 2, 1, 0.0)
    with pytest.raises(ValueError, match="different labels"):
        drop_lesions_outside(pred, 1, 1, 0.5)


def test_predict_applies_the_config_rule_and_older_configs_skip_it():
    from nny_models.config import NnyNetConfig
    from nny_models.postprocess import postprocess_labels

    kwargs = {"model_kwargs": {"size": "tiny", "out_channels": 5}, "keep_largest": ["liver", "tumor"]}
    old = NnyNetConfig(**kwargs)  # a config.json written before the field existed
    assert old.lesion_in_organ is None
    pred = _liver_with_lesions()
    assert np.array_equal(postprocess_labels(pred, old), keep_largest_component(pred, [1, 2]))
    rule = {"lesion": "tumor", "organ": "liver", "min_contact": 0.5}
    new = NnyNetConfig(**kwargs, lesion_in_organ=rule)
    assert NnyNetConfig.from_dict(new.to_dict()).lesion_in_organ == rule  # round trip through config.json
    out = postprocess_labels(pred, new)
    assert (out[15:20, 9:13, 9:13] == 0).all() and (out[5:8, 5:8, 5:8] == 2).all()
    for bad, match in [({"lesion": "tumour", "organ": "liver", "min_contact": 0.5}, "lesion_in_organ.lesion"),
                       ({"lesion": "tumor", "organ": "background", "min_contact": 0.5}, "two different foreground"),
                       ({"lesion": "tumor", "organ": "liver", "min_contact": 0}, "min_contact"),
                       ({"lesion": "tumor", "organ": "liver"}, "lesion, organ and min_contact")]:
        with pytest.raises(ValueError, match=match):
            NnyNetConfig(**kwargs, lesion_in_organ=bad)


def test_single_component_keeps_the_largest_of_each_label_on_its_own():
    """The aorta is one tube: a predicted 'aorta' in an arm's bone or on the table goes, the liver is untouched,
    and an aorta touching the liver is not merged with it (each label is its own component)."""
    from finetune.run import FinetuneConfig, _label_list
    from nny_models.config import NnyNetConfig
    from nny_models.postprocess import postprocess_labels

    pred = np.zeros((20, 16, 16), np.uint8)
    pred[2:10, 2:12, 2:14] = 1  # the liver
    pred[10:12, 6:8, :] = 4  # the aorta: a tube through every slice, touching the liver
    pred[17:19, 1:3, 4:7] = 4  # 'aorta' far away (an arm's bone)
    pred[14:16, 12:14, 12:14] = 1  # a liver island (keep_largest's business)
    kwargs = {"model_kwargs": {"size": "tiny", "out_channels": 5}, "keep_largest": ["liver", "tumor"]}
    old = NnyNetConfig(**kwargs)  # a config.json written before the field existed: unchanged behaviour
    assert old.single_component == [] and (postprocess_labels(pred, old)[17:19, 1:3, 4:7] == 4).all()
    new = NnyNetConfig(**kwargs, single_component=["aorta"])
    assert NnyNetConfig.from_dict(new.to_dict()).single_component == ["aorta"]  # round trip through config.json
    out = postprocess_labels(pred, new)
    assert (out[17:19, 1:3, 4:7] == 0).all() and (out[10:12, 6:8, :] == 4).all()
    assert np.array_equal(out[pred != 4], postprocess_labels(pred, old)[pred != 4])  # other labels as before
    with pytest.raises(ValueError, match="single_component"):
        NnyNetConfig(**kwargs, single_component=["aorte"])
    # fine-tuning stores it: the default adapts to the label map, a name the user typed must exist
    assert _label_list(FinetuneConfig(), "single_component", ["background", "liver", "aorta"]) == ["aorta"]
    assert _label_list(FinetuneConfig(), "single_component", ["background", "kidney"]) == []
    with pytest.raises(ValueError, match="--single_component"):
        _label_list(FinetuneConfig(single_component=("aorte",)), "single_component", ["background", "aorta"])
