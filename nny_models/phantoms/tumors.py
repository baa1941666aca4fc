"""Liver tumors: lobulated noise-deformed spheres, hypo-, iso- or hyperdense relative to the liver, with
internal texture and optionally a necrotic core, an enhancing rim and a fibrous capsule, clipped to the liver;
plus their measurement (count, diameters)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .fields import Canvas, SmoothField, occupancy, smin
from .randomization import Randomization, log_uniform, uniform
from .vessels import LiverDepth

TUMOR = 2


@dataclass
class Tumor:
    center: np.ndarray  # world mm
    radius: float  # mm of the main sphere
    lobes: list  # (offset vector mm, radius mm) of extra spheres (lobulation)
    roughness: float  # surface displacement amplitude (fraction of radius)
    hu: float  # mean HU of the viable tumor
    rim_hu: float  # extra HU in an enhancing rim (0 = none)
    necrosis: bool  # hypodense necrotic core in large lesions
    kind: str = "hypo"  # hypo | iso | hyper (viable tumor relative to the liver)
    capsule_hu: float = 0.0  # HU offset of a thin fibrous capsule (0 = none)
    capsule_mm: float = 0.0  # capsule thickness
    tex_hu: float = 7.0  # amplitude of the internal texture (iso lesions are mosaic)


def sample_count(rng: np.random.Generator, history_count: int, rand: Randomization) -> int:
    """Lesions in the case: none with no_tumor_prob, else the clinical history's count, sometimes more."""
    if rand.max_tumors < 1 or rng.random() < rand.no_tumor_prob:
        return 0
    extra = int(rng.integers(1, 6)) if rng.random() < 0.15 else 0  # multifocal disease beyond the history
    return int(min(rand.max_tumors, max(1, history_count + extra)))


def sample_diameters(rng: np.random.Generator, count: int, rand: Randomization) -> list[float]:
    """Log-uniform diameters in the randomization's range; the largest lesion from the upper part of it
    (at least max(2 * low, high / 5)), satellites anywhere below the largest."""
    lo, hi = rand.tumor_diameter_mm
    if count < 1:
        return []
    d1 = log_uniform(rng, min(max(2 * lo, hi / 5), hi), hi)
    rest = [log_uniform(rng, lo, d1) for _ in range(count - 1)]
    return [d1] + sorted(rest, reverse=True)


def place_tumors(rng: np.random.Generator, depth: LiverDepth, diameters: list[float], liver_hu: float,
                 rand: Randomization, phase: str) -> list[Tumor]:
    tumors: list[Tumor] = []
    for d in diameters:
        r = d / 2
        for attempt in range(40):
            shrink = 1.0 - attempt / 60.0  # retry smaller when the liver has no room
            rr = r * shrink
            cand = depth.points(max(0.75 * rr, 4.0))
            if len(cand) == 0:
                continue
            c = cand[rng.integers(len(cand))] + rng.uniform(-2, 2, 3)
            if all(np.linalg.norm(c - t.center) > 1.3 * (rr + t.radius) + 6 for t in tumors):
                break
        else:
            continue
        lobes = []
        for _ in range(rng.integers(0, 4)):
            v = rng.standard_normal(3)
            lobes.append((v / np.linalg.norm(v) * rr * rng.uniform(0.35, 0.6), rr * rng.uniform(0.45, 0.7)))
        kind = str(rng.choice(rand.tumor_kinds, p=rand.tumor_kind_probs))
        contrast = uniform(rng, rand.tumor_contrast_hu)
        if phase == "unenhanced":
            contrast *= 0.6  # without contrast medium a lesion differs less from the parenchyma
        # Hypodense lesions bottom out at fluid (10 HU), or 10 HU under a fatty liver that is itself near it.
        hu = {"hypo": max(liver_hu - contrast, min(10.0, liver_hu - 10.0)), "iso": liver_hu + float(rng.uniform(-8, 8)),
              "hyper": liver_hu + contrast}[kind]
        rim = float(rng.uniform(30, 60)) if rng.random() < rand.rim_prob else 0.0
        if phase == "unenhanced":
            rim = 0.0  # an enhancing rim needs contrast medium (drawn all the same: later draws stay in step)
        capsule = rng.random() < rand.capsule_prob
        if kind == "iso" and not rim and not capsule:
            capsule = True  # an iso-dense lesion without rim or capsule would be an invisible label
        cap_hu = (float(rng.uniform(20, 45)) if phase == "delayed" else -float(rng.uniform(15, 35))) if capsule else 0.0
        tumors.append(Tumor(c, rr, lobes, float(rng.uniform(0.05, 0.15)), hu, rim,
                            bool(rr > 8 and rng.random() < rand.necrosis_prob), kind, cap_hu,
                            float(rng.uniform(1.0, 2.5)) if capsule else 0.0, 12.0 if kind == "iso" else 7.0))
    return tumors


def draw_tumors(canvas: Canvas, tumors: list[Tumor], liver: np.ndarray, rng: np.random.Generator) -> None:
    """Paint tumors (label 2) inside the liver mask; each keeps only its largest connected part."""
    for t in tumors:
        ext = t.radius * 1.8 + 6
        lo, hi = t.center - ext, t.center + ext
        rough = SmoothField(rng, lo, hi, max(t.radius * 0.5, 3.0))
        tex = SmoothField(rng, lo, hi, 4.0)

        def sdf_fn(x, y, z, t=t, rough=rough):
            d = np.sqrt((x - t.center[0]) ** 2 + (y - t.center[1]) ** 2 + (z - t.center[2]) ** 2) - t.radius
            for off, r in t.lobes:
                c = t.center + off
                d = smin(d, np.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) - r, 0.3 * t.radius)
            return d + t.roughness * t.radius * rough(x, y, z)

        got = canvas.field(lo, hi, sdf_fn)
        if got is None:
            continue
        region, sdf = got
        inside = (sdf < 0) & liver[region]
        lab, n = ndimage.label(inside)
        if n == 0:
            continue
        if n > 1:
            sizes = ndimage.sum_labels(inside, lab, index=np.arange(1, n + 1))
            inside = lab == (1 + int(np.argmax(sizes)))
        _, hu = canvas.field(lo, hi, lambda x, y, z, tex=tex, t=t: t.hu + t.tex_hu * tex(x, y, z))
        if t.necrosis:
            hu = np.where(sdf < -0.45 * t.radius + 3.0 * (hu - t.hu) / t.tex_hu, np.float32(rng.uniform(10, 30)), hu)
        if t.rim_hu > 0:
            width = max(2.0, 0.12 * t.radius)
            hu = hu + t.rim_hu * np.clip(1.0 + sdf / width, 0, 1) * (sdf < 0.5 * canvas.width)
        if t.capsule_hu != 0:  # thin shell just inside the boundary
            hu = hu + t.capsule_hu * np.clip(1.0 + sdf / t.capsule_mm, 0, 1) * (sdf < 0.5 * canvas.width)
        alpha = occupancy(sdf, canvas.width) * ndimage.binary_dilation(inside) * liver[region]
        view = canvas.img[region]
        view += alpha * (hu - view)
        canvas.lab[region][inside] = TUMOR


def measure_tumors(label: np.ndarray, spacing) -> tuple[int, list[float]]:
    """Number of connected tumor components and each one's longest diameter (mm, principal axis extent)."""
    comp, n = ndimage.label(label == TUMOR)
    diams = []
    for i, sl in enumerate(ndimage.find_objects(comp), start=1):
        pts = np.argwhere(comp[sl] == i).astype(np.float64) * np.asarray(spacing)
        if len(pts) > 20000:
            pts = pts[:: len(pts) // 20000 + 1]
        pts -= pts.mean(0)
        if len(pts) < 2:
            diams.append(float(min(spacing)))
            continue
        axis = np.linalg.svd(pts, full_matrices=False)[2][0]
        proj = pts @ axis
        diams.append(float(proj.max() - proj.min() + min(spacing)))
    return n, sorted(diams, reverse=True)
