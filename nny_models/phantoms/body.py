"""Body wall, thorax and skeleton: skin, subcutaneous/visceral fat, abdominal wall and back muscles,
diaphragm, lung bases, heart, spine (cortical shell, trabecular core, discs, arches) and ribs.

Coordinates are the generator's frame in mm (+x patient left, +y anterior, +z superior; fields.Grid.affine
maps it to RAS); the body axis is x = y = 0
and z = 0 is the top of the liver (the right hemidiaphragm sits just above)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .fields import Canvas, SmoothField, capsule, ellipsoid, smin


@dataclass
class Body:
    a: float  # half width (mm)
    b_ant: float  # anterior half depth (mm)
    b_post: float  # posterior half depth (mm)
    p: float  # superellipse exponent of the cross-section (2 = ellipse, larger = boxier)
    harm: np.ndarray  # (k, amplitude, phase) rows: low-order wobble of the outline
    z_slope: float  # relative change of the outline per 100 mm of z
    t_sc: float  # subcutaneous fat thickness (mm)
    t_mw: float  # abdominal wall muscle thickness (mm)
    fat_hu: float  # subcutaneous fat HU
    visc_fat_hu: float  # visceral fat HU
    muscle_hu: float  # skeletal muscle HU
    dome_r: tuple[float, float, float]  # apex of the right hemidiaphragm (x, y, z)
    dome_l: tuple[float, float, float]  # apex of the left hemidiaphragm
    dome_w: tuple[float, float]  # dome half-widths in x, y (mm)
    # spine
    y_vb: float  # y of the vertebral body centre
    rx_vb: float  # vertebral body half width at z = 0 (grows caudally)
    ry_vb: float  # vertebral body half depth
    period: float  # vertebra + disc height (mm)
    disc: float  # disc height (mm)
    z_phase: float  # z offset of the vertebra pattern
    cortical_hu: float
    trabecular_hu: float
    rib_z12: float  # z where the 12th rib leaves the spine
    rib_step: float  # z distance between consecutive ribs at the spine
    rib_drop: float  # how far a rib descends from spine to its anterior end (mm)
    heart_hu: float = 125.0  # blood pool (contrast phase)
    heart_wall_hu: float = 110.0  # myocardium (liver-like in many scans)


def sample_body(rng: np.random.Generator, obesity: float, scale: float = 1.0) -> Body:
    """``obesity`` in [0, 1] scales body size and fat; ``scale`` multiplies width and depth (habitus)."""
    a = (rng.uniform(135, 165) + 25 * obesity) * scale
    b = a * rng.uniform(0.66, 0.8)
    t_sc = rng.uniform(8, 18) + 25 * obesity
    period = rng.uniform(30, 36)
    return Body(
        a=a, b_ant=b * rng.uniform(1.0, 1.12), b_post=b * rng.uniform(0.82, 0.92), p=rng.uniform(2.1, 2.6),
        harm=np.stack([np.arange(2, 6), rng.uniform(0, 0.025, 4), rng.uniform(0, 2 * np.pi, 4)], 1),
        z_slope=rng.uniform(-0.04, 0.03), t_sc=t_sc, t_mw=rng.uniform(10, 16),
        fat_hu=rng.uniform(-115, -90), visc_fat_hu=rng.uniform(-105, -85), muscle_hu=rng.uniform(42, 58),
        dome_r=(-0.45 * a, rng.uniform(-20, 10), 4.0), dome_l=(0.45 * a, rng.uniform(-20, 10), -rng.uniform(8, 25)),
        dome_w=(0.55 * a, 0.85 * b),
        y_vb=-b * 0.88 + t_sc * 0.6 + rng.uniform(62, 72), rx_vb=rng.uniform(20, 24), ry_vb=rng.uniform(15, 18),
        period=period, disc=rng.uniform(6, 9), z_phase=rng.uniform(0, period),
        cortical_hu=rng.uniform(750, 1100), trabecular_hu=rng.uniform(220, 330),
        rib_z12=rng.uniform(-125, -95), rib_step=rng.uniform(30, 36), rib_drop=rng.uniform(110, 150),
    )


def outline(body: Body, x, y, z):
    """(depth below the skin in mm, angle theta) for points; depth < 0 outside the body."""
    theta = np.arctan2(y, x)
    c, s = np.cos(theta), np.sin(theta)
    bb = np.where(s > 0, body.b_ant, body.b_post)
    r = 1.0 / ((np.abs(c) / body.a) ** body.p + (np.abs(s) / bb) ** body.p) ** (1.0 / body.p)
    for k, amp, ph in body.harm:
        r = r * (1 + amp * np.cos(k * theta + ph))
    scale = 1.0 + body.z_slope * z / 100.0
    return r * scale - np.sqrt(x * x + y * y), theta


def sc_thickness(body: Body, theta):
    # Subcutaneous fat is thickest anterolaterally and thinnest over the back.
    return body.t_sc * (0.8 + 0.35 * np.sin(theta) + 0.15 * np.cos(2 * theta) ** 2)


def wall_depth(body: Body, theta):
    """Depth (mm) at which the peritoneal / pleural cavity starts."""
    return sc_thickness(body, theta) + body.t_mw


def cavity_sdf(body: Body, x, y, z, margin: float = 0.0):
    """SDF of the inner cavity (negative inside the muscle wall)."""
    depth, theta = outline(body, x, y, z)
    return wall_depth(body, theta) + margin - depth


def diaphragm_z(body: Body, x, y):
    """Height of the diaphragm surface; lungs above, abdomen below."""
    wx, wy = body.dome_w
    domes = []
    for cx, cy, cz in (body.dome_r, body.dome_l):
        domes.append(cz - 75.0 * (((x - cx) / wx) ** 2 + ((y - cy) / wy) ** 2))
    # Posterior costophrenic recesses reach lower.
    return np.maximum(domes[0], domes[1]) - 45.0 * np.clip(-y / body.b_post - 0.1, 0, 1)


def spine_center_y(body: Body, z):
    return body.y_vb + 6.0 * np.sin(z / 180.0)  # mild lordosis


def draw_body(canvas: Canvas, body: Body, rng: np.random.Generator) -> None:
    grid = canvas.grid
    ext = [grid.origin[d] + (grid.shape[d] - 1) * grid.spacing[d] for d in range(3)]
    lo, hi = np.array(grid.origin) - 5, np.array(ext) + 5
    body_lo = (-1.12 * body.a - 5, -1.12 * body.b_post - 5, lo[2])
    body_hi = (1.12 * body.a + 5, 1.12 * body.b_ant + 5, hi[2])
    # Lowest point the diaphragm can reach (posterior recess): lungs are only computed above it.
    z_chest = min(body.dome_r[2], body.dome_l[2]) - 75.0 * 1.6 - 50.0
    chest_lo = (body_lo[0], body_lo[1], max(z_chest, lo[2]))
    fat_tex = SmoothField(rng, body_lo, body_hi, 12.0)
    lung_tex = SmoothField(rng, chest_lo, body_hi, 15.0)
    lung_ves = SmoothField(rng, chest_lo, body_hi, 3.5)
    t_dia = 4.0

    region = grid.region(body_lo, body_hi)
    for ch in canvas.chunks(region) if region else []:
        x, y, z = grid.coords(ch)
        depth, theta = outline(body, x, y, z)
        tsc = sc_thickness(body, theta)
        wall = tsc + body.t_mw
        depth = np.broadcast_to(depth, canvas.img[ch].shape)
        tex = fat_tex(x, y, z)
        canvas.paint(ch, -depth, body.fat_hu + 6 * tex)  # body outline filled with fat
        canvas.paint(ch, np.maximum(-depth, depth - 2.0), 30.0)  # skin
        canvas.paint(ch, np.maximum(tsc - depth, depth - wall), body.muscle_hu + 3 * tex)  # muscle wall
        canvas.paint(ch, wall - depth, body.visc_fat_hu + 6 * tex)  # visceral / retroperitoneal fat

    region = grid.region(chest_lo, body_hi)
    for ch in canvas.chunks(region) if region else []:
        x, y, z = grid.coords(ch)
        depth, theta = outline(body, x, y, z)
        wall = sc_thickness(body, theta) + body.t_mw
        zd = diaphragm_z(body, x, y)
        # Diaphragm: a muscle sheet under the lungs.
        canvas.paint(ch, np.maximum(np.maximum(z - zd, zd - t_dia - z), wall - 1 - depth), body.muscle_hu)
        # Lung bases: above the diaphragm, inside the chest wall, outside the mediastinum.
        medi = ellipsoid(x, y, 0.0, (12.0, 0.2 * body.b_ant, 0.0), (48.0, body.b_ant, 1e4))
        lung = np.maximum(np.maximum(zd - z, wall + 1 - depth), -medi)
        lung_hu = -860 + 25 * lung_tex(x, y, z) + 700 * np.clip(lung_ves(x, y, z) - 2.1, 0, 1.2)
        canvas.paint(ch, lung, lung_hu)

    # Heart sitting on the central tendon (only its inferior wall reaches the top slices).
    hc, hr = (25.0, 0.3 * body.b_ant, body.dome_r[2] + 45), (62.0, 48.0, 55.0)
    canvas.draw(np.subtract(hc, hr) - 6, np.add(hc, hr) + 6,
                lambda x, y, z: np.maximum(ellipsoid(x, y, z, hc, (r + 4 for r in hr)), diaphragm_z(body, x, y) - z),
                -70.0)  # pericardial fat
    canvas.draw(np.subtract(hc, hr), np.add(hc, hr),
                lambda x, y, z: np.maximum(ellipsoid(x, y, z, hc, hr), diaphragm_z(body, x, y) + 2 - z), body.heart_wall_hu)
    inner = tuple(r - 11.0 for r in hr)  # blood pool inside a ~1 cm myocardium
    canvas.draw(np.subtract(hc, inner), np.add(hc, inner),
                lambda x, y, z: np.maximum(ellipsoid(x, y, z, hc, inner), diaphragm_z(body, x, y) + 12 - z),
                body.heart_hu)

    draw_back_muscles(canvas, body)
    draw_ribs(canvas, body)
    draw_spine(canvas, body)


def draw_back_muscles(canvas: Canvas, body: Body) -> None:
    lo_z, hi_z = canvas.grid.origin[2] - 5, canvas.grid.origin[2] + canvas.grid.shape[2] * canvas.grid.spacing[2] + 5
    yc = body.y_vb - body.ry_vb - 12.0  # spinal canal centre
    back = -body.b_post + body.t_sc * 0.6
    for side in (-1, 1):
        # Paraspinal (erector spinae) muscles: fill the gutter beside the spinous processes.
        c = (side * (body.rx_vb + 12.0), (yc + back) / 2 + 4, 0.0)
        r = (body.rx_vb + 6.0, (yc - back) / 2 + 10, 1e4)
        canvas.draw((c[0] - r[0] - 3, c[1] - r[1] - 3, lo_z), (c[0] + r[0] + 3, c[1] + r[1] + 3, hi_z),
                    lambda x, y, z, c=c, r=r: np.maximum(ellipsoid(x, y, 0.0, c, r), outline(body, x, y, z)[0] * -1 + 8),
                    body.muscle_hu)

        # Psoas: appears around the first lumbar vertebra and thickens caudally.
        def psoas(x, y, z, side=side):
            rad = np.clip((-115.0 - z) / 90.0, 0.0, 1.0) * 22.0 + 1.0
            cx = side * (body.rx_vb + 0.7 * rad + 2)
            return np.sqrt((x - cx) ** 2 + ((y - spine_center_y(body, z)) * 1.1) ** 2) - rad

        canvas.draw((side * body.rx_vb - 60, body.y_vb - 40, lo_z), (side * body.rx_vb + 60, body.y_vb + 40, -110),
                    psoas, body.muscle_hu + 2)


def draw_spine(canvas: Canvas, body: Body) -> None:
    g = canvas.grid
    lo = (-70.0, body.y_vb - 95, g.origin[2] - 5)
    hi = (70.0, body.y_vb + body.ry_vb + 10, g.origin[2] + g.shape[2] * g.spacing[2] + 5)
    rc = 10.0  # spinal canal radius

    def parts(x, y, z):
        yv = spine_center_y(body, z)
        grow = 1.0 + np.clip(-z, 0, 300) / 1200.0  # lumbar vertebrae are bigger
        rx, ry = body.rx_vb * grow, body.ry_vb * grow
        zl = np.mod(z - body.z_phase, body.period) - body.period / 2  # 0 at the vertebra middle
        h = (body.period - body.disc) / 2
        body2d = np.sqrt((x / rx) ** 2 + ((y - yv) / ry) ** 2) * np.minimum(rx, ry) - np.minimum(rx, ry)
        vb = np.maximum(body2d, np.abs(zl) - h)
        disc = np.maximum(body2d - 1.0, np.abs(zl) - h - 1.0)
        yc = yv - ry - rc - 1
        dcan = np.sqrt(x**2 + (y - yc) ** 2)
        arch = np.maximum(np.maximum(dcan - rc - 6.0, rc - dcan), np.abs(zl + 2) - h * 0.8)
        arch = np.maximum(arch, y - (yv - ry + 3))
        spinous = np.maximum(np.maximum(np.abs(x) - 3.5, np.abs(y - (yc - rc - 20)) - 20), np.abs(zl + 5) - h * 0.6)
        transverse = np.maximum(np.maximum(np.abs(np.abs(x) - rc - 18) - 18, np.abs(y - yc - 3) - 5), np.abs(zl + 3) - 6)
        posterior = np.minimum(np.minimum(arch, spinous), transverse)
        return vb, disc, posterior, dcan - rc

    canvas.draw_layers(lo, hi, parts, [
        (1, 0.0, 85.0),  # intervertebral discs
        (0, 0.0, body.cortical_hu),  # vertebral body: cortical shell ...
        (0, 2.0, body.trabecular_hu),  # ... around a trabecular core
        (2, 0.0, body.cortical_hu * 0.8),  # posterior elements
        (2, 1.5, body.trabecular_hu),
        (3, 0.0, 20.0),  # spinal canal (CSF / cord)
    ])


def draw_ribs(canvas: Canvas, body: Body) -> None:
    """Ribs 12 (lowest) upwards: bands in the chest wall that descend from the spine towards the front,
    so an axial slice cuts each one obliquely, as on CT. All ribs are evaluated in one pass."""
    g = canvas.grid
    z_top = g.origin[2] + g.shape[2] * g.spacing[2]
    ends = [0.33, 0.5, 0.72, 0.85, 0.9, 0.92, 0.92, 0.92, 0.92, 0.92]  # rib 12, 11, 10, ... (fraction of pi)
    ribs = [(body.rib_z12 + i * body.rib_step, e * np.pi) for i, e in enumerate(ends)]
    ribs = [(z0, pe) for z0, pe in ribs if z0 - body.rib_drop < z_top + 20]
    phi0, height, thick = 0.13 * np.pi, 8.0, 6.0

    def sdf(x, y, z):
        depth, theta = outline(body, x, y, z)
        phi = np.abs(np.mod(theta + np.pi / 2 + np.pi, 2 * np.pi) - np.pi)  # 0 at the back, pi at the front
        t = np.clip((phi - phi0) / (np.pi - phi0), 0, 1)
        drop = body.rib_drop * (1.6 * t - 0.6 * t**2)  # steepest near the spine, flatter in front
        radius = np.sqrt(x * x + y * y)
        d_c = sc_thickness(body, theta) + 0.55 * body.t_mw + 18.0 * np.clip(1 - phi / (2.2 * phi0), 0, 1)
        radial = np.maximum(np.abs(depth - d_c) - thick / 2, (phi0 - phi) * radius)
        out = None
        for z0, phi_end in ribs:
            d = np.maximum(np.abs(z - (z0 - drop)) - height / 2, (phi - phi_end) * radius)
            out = d if out is None else np.minimum(out, d)
        return (np.maximum(out, radial),)

    if ribs:
        lo = (-1.12 * body.a - 5, -1.12 * body.b_post - 5, ribs[0][0] - body.rib_drop - 10)
        hi = (1.12 * body.a + 5, 1.12 * body.b_ant + 5, ribs[-1][0] + 10)
        canvas.draw_layers(lo, hi, sdf, [(0, 0.0, body.cortical_hu * 0.75), (0, 1.5, body.trabecular_hu * 0.9)])


__all__ = ["Body", "sample_body", "outline", "cavity_sdf", "diaphragm_z", "draw_body", "spine_center_y",
           "wall_depth", "capsule", "smin"]
