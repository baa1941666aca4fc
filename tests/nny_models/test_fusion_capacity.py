"""The clinical pathway carries information: a task only the clinical flag can solve (nny_models.fusion_capacity).

Two identical lesions, the flag names the target. An image-only model cannot exceed ~0.67 Dice; a working
fusion reaches >= 0.9 and, with the flag flipped at test time, segments the other lesion instead. The full
table (every mode x every zoo model) is ``python -m nny_models.fusion_capacity``; this is the fast version.
"""

import pytest

from nny_models.fusion_capacity import make_batch, run_capacity

pytestmark = pytest.mark.usefixtures("one_thread")


def test_task_cannot_be_solved_from_the_image():
    import numpy as np

    image, clinical, label, other = make_batch(np.random.default_rng(0), 6)
    # both lesions are the same voxelised sphere, translated; only the flag says which is the target
    assert (label * other).sum() == 0 and (label.sum((1, 2, 3, 4)) == other.sum((1, 2, 3, 4))).all()
    low_half = label[..., :16, :, :].sum((1, 2, 3, 4)) > 0
    assert ((clinical[:, 0] < 0) == low_half).all()  # flag -1: the target is the low-x lesion
    assert set(clinical[:, 0].tolist()) <= {-1.0, 1.0}


def test_film_fusion_follows_the_flag_and_image_only_cannot():
    film = run_capacity("unet", "cross_attention_film", steps=500)
    assert film.dice >= 0.9, film
    assert film.dice_flipped >= 0.9, film  # flipped flag: the prediction moved to the other lesion
    none = run_capacity("unet", "none", steps=200)
    assert none.dice <= 0.7, none
