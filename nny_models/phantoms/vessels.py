"""Branching intrahepatic vessel trees (portal and hepatic veins) grown inside a liver mask."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .fields import Grid


class LiverDepth:
    """Distance (mm) from a point to the liver surface, from an EDT on a ~4 mm coarse copy of the mask."""

    def __init__(self, grid: Grid, liver: np.ndarray):
        self.step = tuple(max(1, int(round(4.0 / s))) for s in grid.spacing)
        coarse = liver[:: self.step[0], :: self.step[1], :: self.step[2]]
        self.csp = np.array([grid.spacing[d] * self.step[d] for d in range(3)])
        self.origin = np.asarray(grid.origin, np.float64)
        self.edt = np.zeros(coarse.shape, np.float32)
        box = ndimage.find_objects(coarse.astype(np.uint8))
        if box:  # EDT only over the liver's bounding box (+1 voxel of background)
            box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box[0])
            self.edt[box] = ndimage.distance_transform_edt(coarse[box], sampling=self.csp)
        self._idx = np.argwhere(self.edt > 0)
        self._val = self.edt[tuple(self._idx.T)]

    def __call__(self, p) -> float:
        i = np.round((np.asarray(p) - self.origin) / self.csp).astype(int)
        if np.any(i < 0) or np.any(i >= self.edt.shape):
            return 0.0
        return float(self.edt[tuple(i)])

    def points(self, min_depth: float) -> np.ndarray:
        """World coordinates of coarse voxels at least ``min_depth`` mm inside the liver."""
        return self.origin + self._idx[self._val >= min_depth] * self.csp

    def nearest_inside(self, p, min_depth: float) -> np.ndarray:
        pts = self.points(min_depth)
        if len(pts) == 0:
            pts = self.points(0.5)
        return pts[np.argmin(((pts - np.asarray(p)) ** 2).sum(1))]


def _rotate_away(rng: np.random.Generator, d: np.ndarray, angle: float) -> np.ndarray:
    """Unit vector at ``angle`` (radians) from d, around a random perpendicular axis."""
    v = rng.standard_normal(3)
    v -= v.dot(d) * d
    v /= np.linalg.norm(v) + 1e-9
    return np.cos(angle) * d + np.sin(angle) * v


def grow_tree(rng: np.random.Generator, depth: LiverDepth, start, direction, length: float, radius: float,
              r_min: float, max_level: int = 6) -> list[tuple[np.ndarray, np.ndarray, float, float]]:
    """Grow a bifurcating vessel tree from ``start``; branches stop before leaving the liver.
    Returns capsules (p0, p1, r0, r1) in world mm."""
    segs = []
    stack = [(np.asarray(start, np.float64), np.asarray(direction, np.float64), length, radius, 0)]
    while stack:
        p, d, ln, r, level = stack.pop()
        d = d / (np.linalg.norm(d) + 1e-9)
        end, t = p, 0.0
        while t < ln:
            t += 2.0
            q = p + d * t
            if depth(q) < max(r, 2.0):
                break
            end = q
        if np.linalg.norm(end - p) < 4.0:
            continue
        segs.append((p, end, r, r * 0.92))
        if level >= max_level or r * 0.8 < r_min:
            continue
        for sign in (1, -1):
            ang = np.deg2rad(rng.uniform(20, 45))
            nd = _rotate_away(rng, d, ang) if sign > 0 else _rotate_away(rng, d, -ang)
            stack.append((end, nd, ln * rng.uniform(0.65, 0.85), r * rng.uniform(0.68, 0.82), level + 1))
    return segs
