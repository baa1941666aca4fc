import numpy as np
import pytest
import torch

from finetune.augment import AugmentedPatches


def _patches(n: int = 16) -> list[dict]:
    """Patches with a 'liver' block on the low-x side (RAS: the patient's right)."""
    label = torch.zeros(1, 24, 16, 8, dtype=torch.long)
    label[:, 2:9, 4:12, 2:6] = 1
    image = label.float() * 0.5 - 0.2
    return [{"image": image.clone(), "label": label.clone()} for _ in range(n)]


def _x_centroids(dataset) -> np.ndarray:
    return np.array([torch.nonzero(dataset[i]["label"][0] == 1)[:, 0].float().mean().item() for i in range(len(dataset))])


def test_default_keeps_the_side_and_flip_axes_mirrors_it():
    kept = _x_centroids(AugmentedPatches(_patches(), seed=0, clinical_dropout=0.0))
    assert (kept < 12).all()  # rotation / scaling move the block, never across the midline
    mirrored = _x_centroids(AugmentedPatches(_patches(), seed=0, clinical_dropout=0.0, flip_axes=(0,)))
    assert (mirrored > 12).any() and (mirrored < 12).any()
    again = _x_centroids(AugmentedPatches(_patches(), seed=0, clinical_dropout=0.0, flip_axes=(0,)))
    np.testing.assert_array_equal(mirrored, again)  # seeded per index: resume replays the same patches


def test_bad_flip_axis_is_refused():
    with pytest.raises(ValueError, match="flip_axes"):
        AugmentedPatches(_patches(1), seed=0, clinical_dropout=0.0, flip_axes=(3,))


def test_keep_largest_default_adapts_but_a_typo_is_an_error():
    from finetune.run import FinetuneConfig, _keep_largest

    assert _keep_largest(FinetuneConfig(), ["background", "liver", "tumor"]) == ["liver", "tumor"]
    assert _keep_largest(FinetuneConfig(), ["background", "liver", "spleen"]) == ["liver"]  # no tumor class
    assert _keep_largest(FinetuneConfig(keep_largest=()), ["background", "liver"]) == []
    with pytest.raises(ValueError, match="livr"):
        _keep_largest(FinetuneConfig(keep_largest=("livr",)), ["background", "liver"])
