"""The phantoms' surroundings: patient table, mattress and arms (nny_models.phantoms.surroundings)."""

import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from nny_models.phantoms import RANDOMIZATIONS, Randomization, generate_phantom
from nny_models.phantoms.body import draw_body, sample_body
from nny_models.phantoms.fields import Canvas, Grid
from nny_models.phantoms.surroundings import AIR_HU, draw_surroundings, sample_surroundings

NONE = dataclasses.replace(RANDOMIZATIONS["train"], table_prob=0.0, arms_prob=0.0)
TABLE = dataclasses.replace(RANDOMIZATIONS["train"], table_prob=1.0, arms_prob=0.0)


def _body_canvas(seed: int = 0):
    rng = np.random.default_rng(seed)
    body = sample_body(rng, 0.3)
    grid = Grid((200, 170, 12), (2.5, 2.5, 5.0), (-248.75, -230.0, -120.0))  # room for arms and table
    canvas = Canvas(grid)
    draw_body(canvas, body, rng)
    return body, canvas


def test_table_and_arms_are_drawn_into_air_only():
    body, canvas = _body_canvas()
    before = canvas.img.copy()
    s = sample_surroundings(np.random.default_rng(1), 1.0, 1.0, 0.3)
    s = dataclasses.replace(s, arm_gap=10.0, mattress_mm=30.0, shell_hu=400.0, cortex_hu=1200.0, marrow_hu=20.0)
    draw_surroundings(canvas, body, s, np.random.default_rng(2))
    inside = before > AIR_HU
    np.testing.assert_array_equal(canvas.img[inside], before[inside])  # the body is never overwritten
    assert not canvas.lab.any()  # nothing around the patient is labeled

    x, y, _ = canvas.grid.coords(tuple(slice(None) for _ in range(3)))
    back = y.ravel()[np.nonzero((before > -500).any(axis=(0, 2)))[0][0]]
    added = canvas.img != before
    # The table: dense shells below the back, across more than the body's width.
    shells = added & (canvas.img > 250) & (y < back - 30)
    assert shells.sum() > 500 and np.ptp(np.broadcast_to(x, shells.shape)[shells]) > 2 * body.a
    # Arms: cortical bone beside the body on both sides, with fatty marrow and muscle around it.
    bone = added & (canvas.img > 900)
    bx = np.broadcast_to(x, bone.shape)[bone]
    assert (bx < -body.a).sum() > 50 and (bx > body.a).sum() > 50
    arm = added & (np.abs(x) > body.a) & (y > back - 5)  # beside the body, above the pad
    assert ((canvas.img > -70) & (canvas.img < 90) & arm).sum() > 200  # marrow and muscle, not 300 HU
    rings = np.stack([ndimage.binary_fill_holes(m) for m in np.moveaxis((canvas.img > 600) & arm, 2, 0)], axis=2)
    core = rings & (canvas.img < 300)
    assert core.sum() > 100 and np.median(canvas.img[core]) < 100  # a cortical shell around fatty marrow


def test_a_table_changes_no_other_draw_of_the_case():
    """The surroundings have their own random generator: the same seed with and without a table gives the same
    labels and the same image inside the patient, so the two can be compared case by case."""
    for seed in (3, 4):
        bare, tabled = generate_phantom(seed, randomization=NONE), generate_phantom(seed, randomization=TABLE)
        assert not bare.appearance["table"] and tabled.appearance["table"]
        np.testing.assert_array_equal(bare.label, tabled.label)
        changed = np.abs(tabled.image - bare.image) > 0.5
        body = np.stack([ndimage.binary_fill_holes(m) for m in np.moveaxis(bare.image > -500, 2, 0)], axis=2)
        body = ndimage.binary_erosion(body, np.ones((7, 7, 1), bool))  # in-plane blur reaches at most 2 voxels
        assert changed.any() and not changed[body].any()
        back = np.nonzero((bare.image > -500).any(axis=(0, 2)))[0][0]
        solid = (tabled.image > -300) & (bare.image < -900)  # table shells (partial volume dims the thin ones)
        assert solid[:, :back].sum() > 100 and not tabled.label[solid].any()


def test_randomization_sets_how_often_and_is_validated():
    flags = [generate_phantom(s, preset="test").appearance for s in range(12)]
    assert sum(f["table"] for f in flags) >= 8 and all("arms" in f and "mattress_mm" in f for f in flags)
    arms = generate_phantom(5, preset="test", randomization=dataclasses.replace(NONE, arms_prob=1.0))
    assert arms.appearance["arms"] and not arms.appearance["table"]
    train, ood = RANDOMIZATIONS["train"], RANDOMIZATIONS["ood"]
    assert ood.table_prob == 1.0 and ood.arms_prob > train.arms_prob
    with pytest.raises(ValueError, match="arms_prob"):
        Randomization(arms_prob=1.5)
    a, b = generate_phantom(9, preset="test"), generate_phantom(9, preset="test")
    assert np.array_equal(a.image, b.image) and a.appearance == b.appearance
