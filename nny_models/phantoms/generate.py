"""generate_phantom: one procedural abdominal CT case (HU image, labels, spacing, affine, clinical row)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .body import draw_body, sample_body
from .clinical import clinical_row, sample_history, with_missing
from .fields import Canvas, Grid, SmoothField, capsule, correlated_noise
from .organs import LIVER, PORTAL_VEIN, draw_organs, liver_box, liver_sdf_fn, sample_organs
from .presets import get_preset, sample_acquisition
from .randomization import Randomization, get_randomization, phase_hu, steatosis_drop, uniform
from .surroundings import draw_surroundings, extra_width, sample_surroundings, surroundings_rng
from .tumors import draw_tumors, measure_tumors, place_tumors, sample_count, sample_diameters
from .vessels import LiverDepth, grow_tree


@dataclass
class PhantomCase:
    case_id: str
    image: np.ndarray  # float32 HU (X, Y, Z), integer-valued
    label: np.ndarray | None  # uint8 (X, Y, Z): 0 bg, 1 liver, 2 tumor, 3 portal vein, 4 aorta; None if unlabeled
    spacing: tuple[float, float, float]  # mm
    affine: np.ndarray  # 4x4 voxel -> RAS world (mm); x flipped against the generator's frame (fields.Grid)
    clinical: dict  # clinical row as written to clinical.csv (with missing values: None / NaN)
    clinical_complete: dict = field(default_factory=dict)  # the same row before values were blanked
    appearance: dict = field(default_factory=dict)  # the randomized parameters this case was drawn with


def generate_phantom(seed: int, *, preset: str = "demo", labeled: bool = True, case_id: str | None = None,
                     randomization: str | Randomization | None = None) -> PhantomCase:
    """Generate one phantom; the same seed, preset and randomization always give identical arrays.

    randomization: "train" (default), "ood" (the shifted held-out world) or a Randomization."""
    pre = get_preset(preset)
    rand = get_randomization(randomization)
    rng = np.random.default_rng(seed)
    case_id = case_id or f"phantom_{seed}"
    hist = sample_history(rng)
    phase = str(rng.choice(rand.phases, p=rand.phase_probs))
    body = sample_body(rng, hist["obesity"], uniform(rng, rand.body_scale))
    liver_like = bool(rng.random() < rand.liver_like_neighbours_prob)
    fat = steatosis_drop(seed, rand)
    org = sample_organs(rng, body, bool(hist["cirrhosis"]), hist["ascites"], phase_hu(rng, phase),
                        liver_scale=uniform(rng, rand.liver_scale),
                        liver_shift=rng.uniform(-rand.liver_shift_mm, rand.liver_shift_mm, 2),
                        shape_jitter=rand.liver_shape_jitter, liver_like=liver_like, steatosis_hu=fat)

    # Field of view: from above the liver dome (lung bases) down; sometimes the liver is cut off at the top
    # (z_top below the dome, z = 0) or at the bottom (coverage ends inside the liver, which reaches ~ -190 mm).
    thickness = uniform(rng, rand.slice_thickness_mm)
    fov = "full"
    z_top, extent = float(rng.uniform(20, 60)), None
    if rng.random() < rand.partial_fov_prob:
        fov = str(rng.choice(["cut_top", "cut_bottom"]))
        if fov == "cut_top":
            z_top = -float(rng.uniform(15, 60))
        else:
            extent = z_top + float(rng.uniform(80, 140))
    # Table, mattress and arms come from their own generator: every other draw is the same with or without them.
    sur_rng = surroundings_rng(seed)
    sur = sample_surroundings(sur_rng, rand.table_prob, rand.arms_prob, hist["obesity"])
    spacing, shape = sample_acquisition(rng, pre, 2 * body.a + extra_width(sur), thickness, extent)
    shift = rng.uniform(-15, 15, 2)  # patient not exactly centred on the table
    origin = (-(shape[0] - 1) / 2 * spacing[0] + shift[0], -(shape[1] - 1) / 2 * spacing[1] + shift[1] - 10,
              z_top - (shape[2] - 1) * spacing[2])
    grid = Grid(shape, spacing, origin)
    canvas = Canvas(grid)

    draw_body(canvas, body, rng)
    draw_organs(canvas, body, org, rng)
    liver = _draw_liver(canvas, body, org, rng)
    depth = LiverDepth(grid, liver)
    _draw_liver_vessels(canvas, body, org, depth, liver, rng)
    count = sample_count(rng, hist["tumor_count_target"], rand)
    tumors = place_tumors(rng, depth, sample_diameters(rng, count, rand), org.liver_hu, rand, phase)
    draw_tumors(canvas, tumors, liver, rng)
    draw_surroundings(canvas, body, sur, sur_rng)

    # Slice profile along z (Gaussian, FWHM = slice thickness, at least one voxel), reconstruction blur in
    # plane, then correlated CT noise (grain = in-plane correlation of the reconstruction kernel).
    sigma_z = max(thickness, spacing[2]) / 2.355 / spacing[2]
    blur = uniform(rng, rand.blur_mm)
    img = ndimage.gaussian_filter(canvas.img, (blur / spacing[0], blur / spacing[1], sigma_z), truncate=3.0)
    noise_std = uniform(rng, rand.noise_hu) * (0.85 + 0.4 * hist["obesity"])
    grain = uniform(rng, rand.noise_grain_vox)
    img += correlated_noise(rng, shape, noise_std, grain)
    img = np.rint(np.clip(img, -1024, 3071)).astype(np.float32)

    label = canvas.lab
    count, diameters = measure_tumors(label, spacing)
    liver_ml = float(liver.sum() * np.prod(spacing) / 1000.0)
    row = clinical_row(rng, case_id, hist, count, diameters, liver_ml)
    appearance = dict(randomization=rand.name, phase=phase, slice_thickness_mm=round(thickness, 2),
                      noise_hu=round(noise_std, 1), noise_grain_vox=round(grain, 2), blur_mm=round(blur, 2), fov=fov,
                      liver_like_neighbours=liver_like, steatosis_hu=round(fat, 1), table=sur.table,
                      mattress_mm=round(sur.mattress_mm, 1) if sur.table else 0.0, arms=sur.arms,
                      tumor_kinds=[t.kind for t in tumors],
                      tumor_diameters_mm=[round(2 * t.radius, 1) for t in tumors])
    return PhantomCase(case_id, img, label if labeled else None, tuple(float(s) for s in spacing), grid.affine,
                       with_missing(rng, row), row, appearance)


def _draw_liver(canvas: Canvas, body, org, rng: np.random.Generator) -> np.ndarray:
    """Paint the liver (and perihepatic ascites); returns the full-volume liver mask."""
    lo, hi = liver_box(org)
    got = canvas.field(lo, hi, liver_sdf_fn(body, org, rng))
    liver = np.zeros(canvas.grid.shape, bool)
    if got is None:
        return liver
    region, sdf = got
    tex = SmoothField(rng, lo, hi, 6.0)
    nod = SmoothField(rng, lo, hi, 9.0)
    het = 7.0 if org.nodular > 0 else 2.5  # cirrhotic parenchyma is heterogeneous
    _, hu = canvas.field(lo, hi, lambda x, y, z: org.liver_hu + 3.0 * tex(x, y, z) + het * nod(x, y, z))
    if org.ascites_mm > 0:
        fat = canvas.img[region] < -30
        canvas.paint(region, np.maximum(-sdf, sdf - org.ascites_mm), org.hu["fluid"], where=fat)
    canvas.paint(region, sdf, hu, LIVER)
    liver[region] = sdf < 0
    return liver


def _draw_liver_vessels(canvas: Canvas, body, org, depth: LiverDepth, liver: np.ndarray, rng) -> None:
    """Hepatic veins (liver label kept) and the portal vein with its intrahepatic branches (label 3)."""
    a, bA = body.a, body.b_ant
    r_min = max(1.0, 0.55 * canvas.grid.spacing[0])
    in_liver = lambda ch, x, y, z: liver[ch]  # noqa: E731

    # Hepatic veins drain into the IVC just below the diaphragm.
    ix, iy, _ = org.ivc
    top = depth.nearest_inside((ix, iy + 12, -25.0), 6.0)
    segs = []
    for target in ((-0.75 * a, -0.1 * bA, -70.0), (-0.2 * a, 0.4 * bA, -75.0), (0.25 * a, 0.45 * bA, -45.0)):
        d = np.asarray(target) - top
        segs += grow_tree(rng, depth, top, d, 0.45 * np.linalg.norm(d), 5.0, r_min, max_level=3)
    for p0, p1, r0, r1 in segs:
        canvas.draw(np.minimum(p0, p1) - r0 - 3, np.maximum(p0, p1) + r0 + 3,
                    lambda x, y, z, p0=p0, p1=p1, r0=r0, r1=r1: capsule(x, y, z, p0, p1, r0, r1),
                    org.hu["hv"], where_fn=in_liver)

    # Portal vein: main trunk from the confluence to the hilum, then right and left trees.
    right_c, left_c = np.asarray(org.liver_parts[0][0]), np.asarray(org.liver_parts[3][0])
    hilum = depth.nearest_inside((-0.22 * a, body.y_vb + body.ry_vb + 45, -85.0), 9.0)
    r_main = float(rng.uniform(6, 8))
    trunk = [(org.confluence.astype(np.float64), hilum, r_main, r_main * 0.9)]
    branches = grow_tree(rng, depth, hilum, right_c - hilum, 40.0, 0.8 * r_main, r_min)
    branches += grow_tree(rng, depth, hilum, left_c - hilum, 45.0, 0.7 * r_main, r_min)
    for segs, where in ((trunk, None), (branches, in_liver)):
        for p0, p1, r0, r1 in segs:
            canvas.draw(np.minimum(p0, p1) - r0 - 3, np.maximum(p0, p1) + r0 + 3,
                        lambda x, y, z, p0=p0, p1=p1, r0=r0, r1=r1: capsule(x, y, z, p0, p1, r0, r1),
                        org.hu["pv"], PORTAL_VEIN, where_fn=where)
