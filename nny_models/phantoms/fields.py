"""Geometry helpers for the phantoms: a voxel grid in mm, approximate signed distance functions
(SDFs, negative inside, in mm), smooth random fields and CT noise. All randomness comes from a
passed ``numpy.random.Generator``; nothing here touches global random state."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass
class Grid:
    """Axis-aligned voxel grid in the generator's frame: position (mm) = origin + index * spacing, with +x towards
    the patient's left (as DICOM's x), +y anterior, +z superior. ``affine`` maps it to NIfTI's RAS world, where
    +x is the patient's *right*: its x column is negated, so the liver the generator draws at -x lands on the
    patient's right in every file, as in a real CT."""

    shape: tuple[int, int, int]  # voxels along x, y, z
    spacing: tuple[float, float, float]  # mm per voxel
    origin: tuple[float, float, float]  # world position (mm) of voxel (0, 0, 0)

    def axis(self, d: int, sl: slice = slice(None)) -> np.ndarray:
        i = np.arange(self.shape[d], dtype=np.float32)[sl]
        return (self.origin[d] + i * self.spacing[d]).astype(np.float32)

    def coords(self, region: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable world coordinates (x[:,1,1], y[1,:,1], z[1,1,:]) of a region."""
        x, y, z = (self.axis(d, region[d]) for d in range(3))
        return x[:, None, None], y[None, :, None], z[None, None, :]

    def region(self, lo_mm, hi_mm) -> tuple[slice, slice, slice] | None:
        """Voxel slices covering the world box [lo, hi] (clipped); None when it misses the grid."""
        out = []
        for d in range(3):
            a = int(np.floor((lo_mm[d] - self.origin[d]) / self.spacing[d]))
            b = int(np.ceil((hi_mm[d] - self.origin[d]) / self.spacing[d])) + 1
            a, b = max(a, 0), min(b, self.shape[d])
            if a >= b:
                return None
            out.append(slice(a, b))
        return tuple(out)

    def index_of(self, p) -> tuple[int, int, int]:
        return tuple(int(round((p[d] - self.origin[d]) / self.spacing[d])) for d in range(3))

    @property
    def affine(self) -> np.ndarray:
        """Voxel index -> RAS world (mm): RAS x = -(generator x), y and z as they are."""
        a = np.diag([-self.spacing[0], self.spacing[1], self.spacing[2], 1.0])
        a[:3, 3] = (-self.origin[0], self.origin[1], self.origin[2])
        return a


class SmoothField:
    """Gaussian random field with unit std, defined on a coarse lattice over a world box and
    sampled anywhere by trilinear interpolation (cheap smooth noise for displacing surfaces)."""

    def __init__(self, rng: np.random.Generator, lo_mm, hi_mm, cell_mm: float):
        self.lo = np.asarray(lo_mm, np.float32)
        self.cell = float(cell_mm)
        n = np.ceil((np.asarray(hi_mm) - self.lo) / self.cell).astype(int) + 4
        g = ndimage.gaussian_filter(rng.standard_normal(tuple(n)).astype(np.float32), 1.0, mode="wrap")
        self.values = g / (g.std() + 1e-6)
        self.lo = self.lo - self.cell  # one cell of margin so edge samples stay inside

    def __call__(self, x, y, z) -> np.ndarray:
        shape = np.broadcast_shapes(np.shape(x), np.shape(y), np.shape(z))
        if shape and all(np.ndim(a) == len(shape) for a in (x, y, z)) and _is_separable(x, y, z):
            return self._sample_separable(x, y, z, shape)
        pts = [np.broadcast_to((c - self.lo[d]) / self.cell, shape).ravel() for d, c in enumerate((x, y, z))]
        return ndimage.map_coordinates(self.values, pts, order=1, mode="nearest").reshape(shape)

    def _sample_separable(self, x, y, z, shape) -> np.ndarray:
        # Coordinates from Grid.coords: interpolate axis by axis (much cheaper than map_coordinates).
        out = self.values
        for d, c in enumerate((x, y, z)):
            t = np.clip((np.asarray(c).ravel() - self.lo[d]) / self.cell, 0, self.values.shape[d] - 1.001)
            i0 = np.floor(t).astype(int)
            w = (t - i0).astype(np.float32)
            a, b = np.take(out, i0, axis=d), np.take(out, i0 + 1, axis=d)
            wshape = [1, 1, 1]
            wshape[d] = -1
            out = a + (b - a) * w.reshape(wshape)
        return out.reshape(shape)


def _is_separable(x, y, z) -> bool:
    return (
        np.shape(x)[1:] == (1, 1)
        and np.shape(y)[0] == 1
        and np.shape(y)[2] == 1
        and np.shape(z)[:2] == (1, 1)
    )


def ellipsoid(x, y, z, center, radii) -> np.ndarray:
    """Approximate SDF (mm) of an axis-aligned ellipsoid (Inigo Quilez's bound)."""
    px, py, pz = x - center[0], y - center[1], z - center[2]
    rx, ry, rz = radii
    k0 = np.sqrt((px / rx) ** 2 + (py / ry) ** 2 + (pz / rz) ** 2)
    k1 = np.sqrt((px / rx**2) ** 2 + (py / ry**2) ** 2 + (pz / rz**2) ** 2)
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)


def rotated_ellipsoid(x, y, z, center, radii, yaw: float = 0.0, pitch: float = 0.0) -> np.ndarray:
    """Ellipsoid rotated by ``yaw`` about z then ``pitch`` about the (rotated) x axis (radians)."""
    px, py, pz = x - center[0], y - center[1], z - center[2]
    c, s = np.cos(yaw), np.sin(yaw)
    u, v = c * px + s * py, -s * px + c * py
    c, s = np.cos(pitch), np.sin(pitch)
    v, w = c * v + s * pz, -s * v + c * pz
    return ellipsoid(u, v, w, (0, 0, 0), radii)


def capsule(x, y, z, a, b, r0: float, r1: float | None = None) -> np.ndarray:
    """SDF of a segment a->b with radius tapering r0 -> r1."""
    a = np.asarray(a, np.float32)
    ab = np.asarray(b, np.float32) - a
    px, py, pz = x - a[0], y - a[1], z - a[2]
    t = np.clip((px * ab[0] + py * ab[1] + pz * ab[2]) / max(float(ab @ ab), 1e-6), 0.0, 1.0)
    d = np.sqrt((px - t * ab[0]) ** 2 + (py - t * ab[1]) ** 2 + (pz - t * ab[2]) ** 2)
    r = r0 if r1 is None else r0 + (r1 - r0) * t
    return d - r


def smin(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Smooth union of two SDFs with blend radius k (mm)."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def occupancy(sdf: np.ndarray, width: float) -> np.ndarray:
    """Fraction of a voxel inside the surface (linear ramp over one voxel width): partial volume."""
    return np.clip(0.5 - sdf / width, 0.0, 1.0)


def correlated_noise(rng: np.random.Generator, shape, std: float, sigma_vox: float = 0.8) -> np.ndarray:
    """CT-like noise: white noise blurred in-plane (reconstruction kernel), rescaled to ``std`` HU."""
    n = rng.standard_normal(shape, dtype=np.float32)
    n = ndimage.gaussian_filter(n, (sigma_vox, sigma_vox, 0), truncate=3.0)
    # Variance of white noise after a 2D Gaussian of sigma s is 1 / (4 pi s^2).
    return n * np.float32(std * np.sqrt(4 * np.pi) * sigma_vox)


class Canvas:
    """HU image + label volume being painted, structure by structure (later paints override).

    Work is split into z-chunks so that the 512-matrix preset stays within a few hundred MB."""

    def __init__(self, grid: Grid, background_hu: float = -1000.0, max_chunk_voxels: int = 4_000_000):
        self.grid = grid
        self.img = np.full(grid.shape, background_hu, np.float32)
        self.lab = np.zeros(grid.shape, np.uint8)
        self.width = float(min(grid.spacing[:2]))  # partial-volume ramp width (mm)
        self.max_chunk = max_chunk_voxels

    def chunks(self, region):
        """Split a region into z-chunks of bounded size."""
        nx, ny = region[0].stop - region[0].start, region[1].stop - region[1].start
        step = max(1, self.max_chunk // max(nx * ny, 1))
        for z0 in range(region[2].start, region[2].stop, step):
            yield (region[0], region[1], slice(z0, min(z0 + step, region[2].stop)))

    def field(self, lo, hi, fn):
        """Evaluate fn(x, y, z) over the world box [lo, hi]; returns (region, float32 array) or None."""
        region = self.grid.region(lo, hi)
        if region is None:
            return None
        out = np.empty(tuple(s.stop - s.start for s in region), np.float32)
        z0 = region[2].start
        for ch in self.chunks(region):
            out[:, :, ch[2].start - z0 : ch[2].stop - z0] = fn(*self.grid.coords(ch))
        return region, out

    def paint(self, region, sdf, hu, label: int | None = None, where=None) -> None:
        """Blend ``hu`` (scalar or array over region) by the partial-volume occupancy of ``sdf``."""
        view = self.img[region]
        alpha = occupancy(sdf, self.width)
        if where is not None:
            alpha = alpha * where
        sdf = np.broadcast_to(sdf, view.shape)
        view += alpha * (np.float32(hu) - view) if np.isscalar(hu) else alpha * (hu - view)
        if label is not None:
            inside = sdf < 0 if where is None else (sdf < 0) & where
            self.lab[region][inside] = label

    def draw(self, lo, hi, sdf_fn, hu, label: int | None = None, where_fn=None) -> None:
        """Evaluate and paint one structure chunk by chunk (hu may be a callable hu(x, y, z, sdf))."""
        region = self.grid.region(lo, hi)
        if region is None:
            return
        for ch in self.chunks(region):
            x, y, z = self.grid.coords(ch)
            sdf = sdf_fn(x, y, z)
            if np.all(sdf > self.width):
                continue
            value = hu(x, y, z, sdf) if callable(hu) else hu
            where = None if where_fn is None else where_fn(ch, x, y, z)
            self.paint(ch, sdf, value, label, where)

    def draw_layers(self, lo, hi, sdfs_fn, layers) -> None:
        """Paint several layers from one evaluation: sdfs_fn returns a tuple of SDFs and each layer is
        (index, inset_mm, hu[, label]) painting sdfs[index] + inset (a positive inset shrinks the shape)."""
        region = self.grid.region(lo, hi)
        if region is None:
            return
        for ch in self.chunks(region):
            sdfs = sdfs_fn(*self.grid.coords(ch))
            for idx, inset, hu, *label in layers:
                self.paint(ch, sdfs[idx] + inset, hu, label[0] if label else None)
