"""Abdominal organs and vessels: colon and small bowel, kidneys, spleen, stomach, pancreas, gallbladder,
aorta, IVC, splenic/mesenteric veins and the liver (irregular lobes, nodular when cirrhotic).

Painting order matters: later structures override earlier ones; organs that must keep their shape
next to the liver (kidney, IVC, gallbladder, aorta, spine) are carved out of the liver SDF instead."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .body import Body, cavity_sdf, diaphragm_z, spine_center_y
from .fields import Canvas, SmoothField, capsule, ellipsoid, rotated_ellipsoid, smin

LIVER, TUMOR, PORTAL_VEIN, AORTA = 1, 2, 3, 4


@dataclass
class Organs:
    liver_parts: list  # (center, radii) ellipsoids smoothly unioned into the liver
    liver_hu: float
    liver_noise: float  # low-frequency surface displacement (mm)
    nodular: float  # nodular surface amplitude (mm), > 0 when cirrhotic
    ao: tuple  # aorta centre (x, y) and radius
    ivc: tuple  # IVC centre (x, y) and radii (rx, ry)
    kidneys: list  # (center, radii, yaw) for right, left
    spleen: tuple  # center, radii, yaw
    stomach: list  # capsule chain points with radii
    gallbladder: tuple | None  # center, radii or None after cholecystectomy
    confluence: np.ndarray  # portal / splenic / mesenteric venous confluence
    hu: dict = field(default_factory=dict)  # tissue HU values
    ascites_mm: float = 0.0  # thickness of perihepatic fluid (0 = none)
    stomach_wall_mm: float = 4.0  # gastric wall thickness (thick, liver-like walls confuse liver models)


def sample_organs(rng: np.random.Generator, body: Body, cirrhosis: bool, ascites: str, phase_hu: dict,
                  liver_scale: float = 1.0, liver_shift=(0.0, 0.0, 0.0), shape_jitter: float = 0.0,
                  liver_like: bool = False, steatosis_hu: float = 0.0) -> Organs:
    """Organ geometry and HU. ``phase_hu``: tissue HU of the contrast phase (randomization.phase_hu);
    steatosis_hu: HU the liver loses to fat (randomization.steatosis_drop);
    liver_scale / liver_shift (x, y in mm; z is ignored) / shape_jitter (relative radius change per lobe)
    vary the liver;
    liver_like: spleen, stomach wall and myocardium get HU close to the liver's."""
    a, bA, bP = body.a, body.b_ant, body.b_post
    s = rng.uniform(0.88, 1.1) * (0.92 if cirrhosis else 1.0) * liver_scale  # overall liver size
    r_scale = rng.uniform(0.66, 0.8) if cirrhosis else 1.0  # cirrhosis shrinks the right lobe ...
    l_scale = rng.uniform(1.1, 1.3) if cirrhosis else 1.0  # ... and enlarges left lobe and caudate
    yv = body.y_vb
    u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
    parts = [
        ((-0.42 * a + u(-8, 8), u(-15, 5), -62 + u(-8, 8)), np.array((u(72, 88), u(80, 100), u(78, 95))) * s * r_scale),
        ((-0.56 * a, u(-20, 10), -125 + u(-10, 10)), np.array((u(30, 40), u(40, 50), u(25, 40))) * s * r_scale),
        ((-0.08 * a, 0.3 * bA, -55 + u(-8, 8)), np.array((u(35, 45), u(35, 45), u(38, 48))) * s),
        ((0.12 * a + u(-10, 10), 0.45 * bA, -45 + u(-10, 10)), np.array((u(45, 62), u(24, 34), u(28, 38))) * s * l_scale),
        ((0.3 * a + u(0, 20), 0.4 * bA, -35 + u(-8, 8)), np.array((u(30, 45), u(14, 20), u(18, 24))) * s * l_scale),
        ((-0.1 * a, yv + body.ry_vb + 30, -62), np.array((u(18, 24), u(16, 22), u(28, 36))) * s * l_scale),  # caudate
    ]
    # The liver stays under the diaphragm: a shift moves it in x and y only, and a smaller liver is lifted so
    # that its dome still fills the right hemidiaphragm (a fat-filled dome would be a world no CT shows).
    shift = np.array([liver_shift[0], liver_shift[1], 70.0 * (1.0 - liver_scale)], np.float64)
    parts = [(tuple(np.add(c, shift)), r * (1.0 + rng.uniform(-shape_jitter, shape_jitter, 3))) for c, r in parts]
    r_ao = u(10, 13)
    ao = (u(10, 18), yv + body.ry_vb + r_ao + 3, r_ao)
    ivc = (-(body.rx_vb + u(2, 8)), yv + body.ry_vb + u(8, 14), (u(11, 15), u(8, 11)))
    zk = u(-150, -120)
    kidneys = [
        ((-(body.rx_vb + u(42, 52)), yv + u(0, 10), zk), (u(26, 31), u(22, 26), u(50, 60)), u(0.4, 0.8)),
        ((body.rx_vb + u(42, 52), yv + u(3, 13), zk + u(10, 25)), (u(26, 31), u(22, 26), u(50, 60)), -u(0.4, 0.8)),
    ]
    sp = u(1.25, 1.6) if cirrhosis else u(0.9, 1.1)  # splenomegaly from portal hypertension
    spleen = ((0.6 * a - 10, -0.35 * bP, -60 + u(-10, 10)), np.array((u(18, 24), u(45, 60), u(45, 60))) * sp, u(-1.0, -0.6))
    st = u(0.55, 1.05)  # gastric distension
    stomach = [
        ((0.33 * a, 0.0, -40.0), 34 * st), ((0.3 * a, 0.35 * bA, -80.0), 30 * st),
        ((0.0, 0.55 * bA, -100.0), 20 * st), ((-0.15 * a, 0.4 * bA, -100.0), 12.0),
    ]
    gb = ((-0.22 * a, 0.35 * bA, -110 + u(-10, 10)), (u(14, 20), u(16, 22), u(30, 42))) if rng.random() < 0.85 else None
    confluence = np.array((u(-5, 10), ao[1] + r_ao + u(18, 26), zk + u(10, 25)), np.float32)
    hu = {k: v for k, v in phase_hu.items() if k != "heart"}
    liver_hu = hu["liver"] - (u(0, 10) if cirrhosis else 0.0)  # fibrotic parenchyma enhances less
    liver_hu -= steatosis_hu  # fat lowers the parenchyma's attenuation in every phase
    hu.update(liver=liver_hu, wall=u(55, 80), fluid=u(0, 20))
    wall_mm = 4.0
    if liver_like:
        hu.update(spleen=liver_hu + u(-8, 8), wall=liver_hu + u(-15, 5))
        wall_mm = u(6, 12)
    body.heart_hu = phase_hu.get("heart", body.heart_hu)
    body.heart_wall_hu = liver_hu + u(-10, 10) if liver_like else u(85, 120)
    asc = {"none": 0.0, "mild": u(3, 8), "moderate": u(8, 18)}[ascites]
    return Organs(parts, liver_hu, u(4, 7), u(2.5, 4.0) if cirrhosis else 0.0, ao, ivc, kidneys, spleen, stomach,
                  gb, confluence, hu, asc, wall_mm)


def _chain_sdf(x, y, z, pts):
    """Smooth union of tapered capsules through a list of (point, radius)."""
    d = None
    for (p0, r0), (p1, r1) in zip(pts[:-1], pts[1:]):
        c = capsule(x, y, z, p0, p1, r0, r1)
        d = c if d is None else smin(d, c, 8.0)
    return d


def _box(points, radius):
    pts = np.asarray(points, np.float32)
    return pts.min(0) - radius, pts.max(0) + radius


def draw_organs(canvas: Canvas, body: Body, org: Organs, rng: np.random.Generator) -> None:
    """Everything except liver, portal vein and tumors."""
    g = canvas.grid
    z_lo = g.origin[2] - 30
    z_hi = g.origin[2] + g.shape[2] * g.spacing[2] + 30
    a, bA = body.a, body.b_ant
    full_lo, full_hi = (-a - 20, -body.b_post - 20, z_lo), (a + 20, bA + 20, z_hi)
    tex = SmoothField(rng, full_lo, full_hi, 8.0)
    gas = SmoothField(rng, full_lo, full_hi, 10.0)
    hu = org.hu
    cav = lambda x, y, z: cavity_sdf(body, x, y, z, 1.0)  # noqa: E731

    # Colon: ascending, transverse (sagging), descending, with mottled feces and gas.
    flex_r, flex_l = (-0.6 * a, 0.05 * bA, -125.0), (0.6 * a, 0.2 * bA, -95.0)
    rc = float(rng.uniform(16, 22))
    colon = [((-0.62 * a, 0.0, z_lo), rc), (flex_r, rc), ((0.0, 0.6 * bA, -165.0), rc * 0.9), (flex_l, rc),
             ((0.68 * a, -0.05 * bA, z_lo), rc * 0.9)]
    lo, hi = _box([p for p, _ in colon], rc + 5)

    def colon_sdf(x, y, z):
        return np.maximum(_chain_sdf(x, y, z, colon), cav(x, y, z))

    canvas.draw(lo, hi, colon_sdf, hu["wall"])
    canvas.draw(lo, hi, lambda x, y, z: colon_sdf(x, y, z) + 2.5,
                lambda x, y, z, d: np.where(gas(x, y, z) > 0.3, -950.0, -40 + 50 * tex(x, y, z)).astype(np.float32))

    # Small bowel: loops from a thresholded smooth field in the lower central abdomen.
    loops = SmoothField(rng, full_lo, full_hi, 9.0)
    c, r = (0.05 * a, 0.2 * bA, -215.0), (0.62 * a, 0.6 * bA, 100.0)

    def bowel_sdf(x, y, z):
        return np.maximum(np.maximum((0.3 - loops(x, y, z)) * 9.0, ellipsoid(x, y, z, c, r)), cav(x, y, z))

    lo, hi = np.subtract(c, r) - 5, np.add(c, r) + 5
    fluid_hu = float(rng.uniform(10, 35))
    canvas.draw(lo, hi, bowel_sdf, hu["wall"])
    canvas.draw(lo, hi, lambda x, y, z: bowel_sdf(x, y, z) + 2.5,
                lambda x, y, z, d: np.where(gas(x, y, z) > 1.4, -950.0, fluid_hu + 10 * tex(x, y, z)).astype(np.float32))

    # Kidneys: cortex, medulla (pyramids), sinus fat; renal veins to the IVC.
    pyr = SmoothField(rng, full_lo, full_hi, 7.0)
    for side, (kc, kr, yaw) in zip((-1, 1), org.kidneys):
        lo, hi = np.subtract(kc, max(kr) + 15), np.add(kc, max(kr) + 15)
        sinus_c = (kc[0] - side * 0.55 * kr[0], kc[1] + 0.3 * kr[1], kc[2])
        kid = lambda x, y, z, kc=kc, kr=kr, yaw=yaw: rotated_ellipsoid(x, y, z, kc, kr, yaw)  # noqa: E731
        canvas.draw(lo, hi, kid, hu["cortex"])
        canvas.draw(lo, hi, lambda x, y, z, k=kid: np.maximum(k(x, y, z) + 6.0, (-0.1 - pyr(x, y, z)) * 6.0),
                    hu["medulla"])
        canvas.draw(lo, hi, lambda x, y, z, sc=sinus_c, kr=kr: ellipsoid(x, y, z, sc, (0.5 * kr[0], 0.45 * kr[1], 0.5 * kr[2])),
                    -60.0)
        vein_end = (org.ivc[0], org.ivc[1], kc[2] + 10)
        canvas.draw(*_box([sinus_c, vein_end], 8), lambda x, y, z, sc=sinus_c, e=vein_end: capsule(x, y, z, sc, e, 5.0),
                    hu["ivc"])

    # Spleen: a crescent against the left posterolateral wall.
    (sc, sr, syaw) = org.spleen
    lo, hi = np.subtract(sc, max(sr) + 10), np.add(sc, max(sr) + 10)

    def spleen_sdf(x, y, z):
        d = rotated_ellipsoid(x, y, z, sc, sr, syaw) + 3.0 * tex(x, y, z)
        hollow = rotated_ellipsoid(x, y, z, (sc[0] - 0.9 * sr[0] * 2, sc[1] + 10, sc[2]), np.multiply(sr, (1.5, 0.8, 0.9)), syaw)
        return np.maximum(np.maximum(d, -hollow), cav(x, y, z))

    canvas.draw(lo, hi, spleen_sdf, lambda x, y, z, d: hu["spleen"] + 4 * tex(x, y, z))

    # Stomach: J-shaped chain; enhancing wall, fluid content and an anterior air-fluid level.
    lo, hi = _box([p for p, _ in org.stomach], 40)

    def stomach_sdf(x, y, z):
        return np.maximum(_chain_sdf(x, y, z, org.stomach) + 2.0 * tex(x, y, z), cav(x, y, z))

    y_level = org.stomach[0][0][1] + float(rng.uniform(-5, 25))
    canvas.draw(lo, hi, stomach_sdf, hu["wall"])
    canvas.draw(lo, hi, lambda x, y, z: stomach_sdf(x, y, z) + org.stomach_wall_mm,
                lambda x, y, z, d: np.where(y > y_level, -980.0, 15 + 5 * tex(x, y, z)).astype(np.float32))

    # Pancreas along the splenic vein, then the veins: SMV, splenic vein.
    cf = org.confluence
    hilum = np.array((sc[0] - 20, sc[1] + 25, sc[2] - 10), np.float32)
    mid = np.array((cf[0] + 0.45 * (hilum[0] - cf[0]), cf[1] - 5, cf[2] + 8), np.float32)
    panc = [((cf[0] - 30, cf[1] + 8, cf[2] - 20), 17.0), ((cf[0], cf[1] + 10, cf[2]), 12.0), (tuple(mid + (0, 12, 0)), 11.0),
            (tuple(hilum + (0, 10, 0)), 8.0)]
    lo, hi = _box([p for p, _ in panc], 25)
    canvas.draw(lo, hi, lambda x, y, z: _chain_sdf(x, y, z, panc) + 3.0 * tex(x, y, z),
                lambda x, y, z, d: hu["pancreas"] + 8 * pyr(x, y, z))
    veins = [(cf, mid, 5.0, 4.5), (mid, hilum, 4.5, 4.0), ((cf[0] - 5, cf[1] + 10, cf[2] - 120), cf, 5.0, 6.0)]
    for p0, p1, r0, r1 in veins:
        canvas.draw(*_box([p0, p1], r0 + 4), lambda x, y, z, p0=p0, p1=p1, r0=r0, r1=r1: capsule(x, y, z, p0, p1, r0, r1),
                    hu["pv"])

    # Gallbladder (fluid), IVC and aorta (labelled).
    if org.gallbladder is not None:
        gc, gr = org.gallbladder
        canvas.draw(np.subtract(gc, max(gr) + 5), np.add(gc, max(gr) + 5),
                    lambda x, y, z: rotated_ellipsoid(x, y, z, gc, gr, 0.5, 0.5), hu["fluid"])
    (ix, iy, (irx, iry)) = org.ivc
    canvas.draw((ix - irx - 5, iy - iry - 5, z_lo), (ix + irx + 5, iy + iry + 5, z_hi),
                lambda x, y, z: ellipsoid(x, y, 0.0, (ix, iy, 0), (irx, iry, 1e5)), hu["ivc"])
    ax, ay, ar = org.ao
    canvas.draw((ax - ar - 5, ay - ar - 5, z_lo), (ax + ar + 5, ay + ar + 5, z_hi),
                lambda x, y, z: np.sqrt((x - ax) ** 2 + (y - ay) ** 2) - ar, hu["aorta"], AORTA)


def liver_sdf_fn(body: Body, org: Organs, rng: np.random.Generator):
    """Build the liver SDF: smooth union of lobes, noise-displaced, clipped to the cavity and under the
    diaphragm, with kidney, IVC, gallbladder, aorta and spine carved out."""
    lo, hi = liver_box(org)
    low = SmoothField(rng, lo, hi, 35.0)
    mid = SmoothField(rng, lo, hi, 14.0)
    nod = SmoothField(rng, lo, hi, 8.0)
    kc, kr, kyaw = org.kidneys[0]
    ix, iy, (irx, iry) = org.ivc
    ax, ay, ar = org.ao

    def sdf(x, y, z):
        d = None
        for c, r in org.liver_parts:
            e = ellipsoid(x, y, z, c, r)
            d = e if d is None else smin(d, e, 22.0)
        d = d + org.liver_noise * low(x, y, z) + 1.5 * mid(x, y, z)
        if org.nodular > 0:
            d = d - org.nodular * (np.abs(nod(x, y, z)) - 0.6)  # bumps separated by sharp fibrous grooves
        d = np.maximum(d, cavity_sdf(body, x, y, z, 2.0))
        d = np.maximum(d, z - (diaphragm_z(body, x, y) - 4.0))
        d = np.maximum(d, -(rotated_ellipsoid(x, y, z, kc, kr, kyaw) - 4.0))
        d = np.maximum(d, -(ellipsoid(x, y, 0.0, (ix, iy, 0), (irx + 2, iry + 2, 1e5))))
        d = np.maximum(d, -(np.sqrt((x - ax) ** 2 + (y - ay) ** 2) - ar - 4))
        spine = np.sqrt((x / (body.rx_vb + 14)) ** 2 + ((y - spine_center_y(body, z)) / (body.ry_vb + 16)) ** 2) - 1
        d = np.maximum(d, -spine * 20.0)
        if org.gallbladder is not None:
            gc, gr = org.gallbladder
            d = np.maximum(d, -(rotated_ellipsoid(x, y, z, gc, gr, 0.5, 0.5) - 1.5))
        return d

    return sdf


def liver_box(org: Organs):
    lo = np.min([np.subtract(c, r) for c, r in org.liver_parts], 0) - 20
    hi = np.max([np.add(c, r) for c, r in org.liver_parts], 0) + 20
    return lo, hi
