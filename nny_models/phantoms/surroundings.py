"""What lies around the patient in a real scan: the CT table with its mattress, and arms down at the sides.

Every clinical abdominal CT shows the patient table: a curved carbon-fibre sandwich (two thin dense shells around
a foam core) under a foam mattress. Patients who cannot raise their arms are scanned with the arms beside the
trunk, where the humerus is as dense as the spine and the arm muscles look like the body wall. None of this is
labeled, and a model that never saw it is free to call it anything (the surroundings probe in the README).

Everything here is drawn from its own random generator (``surroundings_rng``), so a case's anatomy, contrast and
noise draws do not depend on whether it has a table or arms. Structures are painted only into air: the table and
arms never overwrite the body, and their label stays 0 (background).

Frame: the generator's (+x patient left, +y anterior, +z superior, mm); see fields.Grid."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .body import Body, outline
from .fields import Canvas, SmoothField, ellipsoid

AIR_HU = -990.0  # voxels below this are still background air (the canvas starts at -1000)


@dataclass
class Surroundings:
    table: bool  # a patient table under the back
    table_half_width: float  # mm; the table is usually wider than the body and often cut off by the FOV
    table_thickness: float  # mm, shell to shell
    table_sag: float  # mm the table edges rise above its centre line (curved couch tops)
    shell_mm: float  # thickness of each carbon-fibre shell
    shell_hu: float  # carbon-fibre shells
    core_hu: float  # foam core between the shells
    mattress_mm: float  # foam pad between table and back (0: none)
    mattress_hu: float
    cover_hu: float  # the pad's vinyl cover (a thin line on CT)
    gap_mm: float  # air between the lowest point of the back and the pad
    arms: bool  # arms down at the sides
    arm_radii: tuple[float, float]  # half width and half depth of an arm's cross-section (mm)
    arm_gap: float  # air between the flank and the arm (mm; 0 = touching)
    arm_fat_mm: float  # subcutaneous fat of the arm
    elbow_z: float  # the elbow's height: humerus above, radius + ulna below (mm, z = 0 is the liver top)
    cortex_hu: float  # cortical bone of the arm
    marrow_hu: float  # fatty marrow of adult long bones


def surroundings_rng(seed: int) -> np.random.Generator:
    """The surroundings' own generator: independent of, and not advancing, the case's main one."""
    return np.random.default_rng([int(seed), 0x7AB1E])


def sample_surroundings(rng: np.random.Generator, table_prob: float, arms_prob: float, obesity: float) -> Surroundings:
    """One draw; ``table_prob`` / ``arms_prob`` from the Randomization, ``obesity`` in [0, 1]."""
    table = bool(rng.random() < table_prob)
    arms = bool(rng.random() < arms_prob)
    mattress = float(rng.uniform(15, 50)) if rng.random() < 0.8 else 0.0
    r_arm = float(rng.uniform(36, 46) + 10 * obesity)
    return Surroundings(
        table=table, table_half_width=float(rng.uniform(200, 260)), table_thickness=float(rng.uniform(25, 55)),
        table_sag=float(rng.uniform(0, 35)), shell_mm=float(rng.uniform(1.5, 4.0)),
        shell_hu=float(rng.uniform(150, 600)), core_hu=float(rng.uniform(-980, -850)),
        mattress_mm=mattress, mattress_hu=float(rng.uniform(-920, -650)), cover_hu=float(rng.uniform(-250, 50)),
        gap_mm=float(rng.uniform(0, 4)),
        arms=arms, arm_radii=(r_arm, r_arm * float(rng.uniform(1.0, 1.25))), arm_gap=float(rng.uniform(0, 20)),
        arm_fat_mm=float(rng.uniform(4, 10) + 15 * obesity), elbow_z=float(rng.uniform(-220, -60)),
        cortex_hu=float(rng.uniform(1000, 1400)), marrow_hu=float(rng.uniform(-60, 80)),
    )


def extra_width(s: Surroundings) -> float:
    """How much wider (mm, both sides together) the field of view should be to show the arms."""
    return 2 * (s.arm_gap + 2 * s.arm_radii[0]) if s.arms else 0.0


def draw_surroundings(canvas: Canvas, body: Body, s: Surroundings, rng: np.random.Generator) -> None:
    """Paint the table, mattress and arms into the air around an already drawn body."""
    grid = canvas.grid
    tissue = canvas.img > -500
    if not tissue.any() or not (s.table or s.arms):
        return
    ys = grid.axis(1)
    back = float(ys[np.nonzero(tissue.any(axis=(0, 2)))[0][0]])  # lowest point of the back, over all slices
    pad_top = back - s.gap_mm  # the pad's upper surface at x = 0
    table_top = pad_top - s.mattress_mm
    hw = s.table_half_width
    z_lo, z_hi = grid.origin[2] - 5, grid.origin[2] + grid.shape[2] * grid.spacing[2] + 5

    def curve(x):  # curved couch: the surface rises towards the edges
        return s.table_sag * np.clip(np.abs(x) / hw, 0, 1) ** 2

    def slab(top, thickness, half_width):
        def sdf(x, y, z):
            d = np.maximum(np.abs(y - (top - thickness / 2 + curve(x))) - thickness / 2, np.abs(x) - half_width)
            return np.broadcast_to(d, np.broadcast_shapes(d.shape, np.shape(z)))
        return sdf

    if s.table:
        free = _outside_air(canvas)  # only air around the patient is painted: the body is never overwritten
        layers = []
        if s.mattress_mm > 0:
            box = ((-hw, table_top - 5, z_lo), (hw, pad_top + s.table_sag + 5, z_hi))
            layers += [(box, slab(pad_top, s.mattress_mm, hw - 15), 0.0, s.cover_hu),
                       (box, slab(pad_top, s.mattress_mm, hw - 15), 1.5, s.mattress_hu)]
        box = ((-hw - 5, table_top - s.table_thickness - 5, z_lo), (hw + 5, table_top + s.table_sag + 5, z_hi))
        layers += [(box, slab(table_top, s.table_thickness, hw), 0.0, s.shell_hu),
                   (box, slab(table_top, s.table_thickness, hw), s.shell_mm, s.core_hu)]
        for (lo, hi), sdf, inset, hu in layers:
            _paint_free(canvas, free, lo, hi, lambda x, y, z, f=sdf, i=inset: f(x, y, z) + i, hu)

    if s.arms:
        _draw_arms(canvas, body, s, pad_top if s.table else back, curve, (z_lo, z_hi), rng)


def _outside_air(canvas: Canvas) -> np.ndarray:
    """Air voxels outside the patient (bowel gas and lungs inside the body outline excluded)."""
    inside = np.stack([ndimage.binary_fill_holes(m) for m in np.moveaxis(canvas.img > -500, 2, 0)], axis=2)
    return (canvas.img < AIR_HU) & ~inside


def _paint_free(canvas: Canvas, free: np.ndarray, lo, hi, sdf_fn, hu) -> None:
    canvas.draw(lo, hi, sdf_fn, hu, where_fn=lambda ch, x, y, z: free[ch])


def _draw_arms(canvas: Canvas, body: Body, s: Surroundings, rest_y: float, curve, z_range, rng) -> None:
    """Both arms beside the trunk, resting on the pad: skin and fat, muscle, and the long bones
    (humerus above the elbow, radius and ulna below), each a cortical shell around fatty marrow."""
    rx, ry = s.arm_radii
    z_lo, z_hi = z_range
    free = _outside_air(canvas)
    for side in (-1, 1):
        # The flank's outermost point at the arm's centre height, from the body outline.
        xs = np.linspace(0, 1.5 * body.a, 600, dtype=np.float32)
        depth, _ = outline(body, side * xs, np.float32(rest_y + ry), np.float32(0.5 * (z_lo + z_hi)))
        flank = float(xs[depth >= 0].max()) if (depth >= 0).any() else body.a
        xc = side * (flank + s.arm_gap + rx)
        cy = rest_y + float(curve(np.float32(abs(xc)))) + ry
        tex = SmoothField(rng, (xc - rx - 5, cy - ry - 5, z_lo), (xc + rx + 5, cy + ry + 5, z_hi), 10.0)
        lo, hi = (xc - rx - 3, cy - ry - 3, z_lo), (xc + rx + 3, cy + ry + 3, z_hi)

        def arm(x, y, z, xc=xc, cy=cy):
            d = ellipsoid(x, y, 0.0, (xc, cy, 0.0), (rx, ry, 1e4))
            return np.broadcast_to(d, np.broadcast_shapes(np.shape(d), np.shape(z)))

        _paint_free(canvas, free, lo, hi, arm, lambda x, y, z, d, t=tex: body.fat_hu + 6 * t(x, y, z))
        _paint_free(canvas, free, lo, hi, lambda x, y, z, f=arm: np.maximum(-f(x, y, z), f(x, y, z) + 2.0), 30.0)
        _paint_free(canvas, free, lo, hi, lambda x, y, z, f=arm: f(x, y, z) + s.arm_fat_mm,
                    lambda x, y, z, d, t=tex: body.muscle_hu + 4 * t(x, y, z))

        # Bones: the humerus (one, ~12 mm radius) above the elbow; radius and ulna (two, ~7 mm) below it.
        bx, by = xc - side * 0.15 * rx, cy - 0.1 * ry

        def bones(x, y, z, bx=bx, by=by):
            hum = np.maximum(np.sqrt((x - bx) ** 2 + (y - by) ** 2) - 12.0, s.elbow_z - z)
            fore = np.minimum(np.sqrt((x - bx + 10) ** 2 + (y - by) ** 2) - 7.0,
                              np.sqrt((x - bx - 9) ** 2 + (y - by + 4) ** 2) - 6.5)
            return np.minimum(hum, np.maximum(fore, z - s.elbow_z))

        for inset, hu in ((0.0, s.cortex_hu), (3.0, s.marrow_hu)):
            _paint_free(canvas, free, (bx - 25, by - 20, z_lo), (bx + 25, by + 20, z_hi),
                        lambda x, y, z, i=inset: bones(x, y, z) + i, hu)
