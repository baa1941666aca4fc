"""Acquisition presets: voxel spacing, matrix and field of view of the simulated scans."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Preset:
    name: str
    inplane_mm: tuple[float, float]  # in-plane spacing drawn uniformly in this range
    min_slice_mm: float  # z spacing = max(slice thickness, this): thin slices on a coarse grid keep their thin
    # slice profile (a thin-slice scan resampled to this spacing), so the CPU presets stay small
    max_inplane: int  # largest matrix size in x and y
    max_slices: int  # largest number of slices
    z_extent_mm: tuple[float, float]  # cranio-caudal coverage drawn uniformly in this range
    fixed_matrix: bool  # True: always max_inplane (scanner 512 matrix); False: fit the FOV to the body


PRESETS = {
    # Coarse enough for a CPU demo (<= 160 x 160 x 120 voxels, typically 150 x 150 x 65).
    "demo": Preset("demo", (2.0, 3.0), 2.5, 160, 120, (200.0, 300.0), False),
    # Clinical-like: 512 matrix, 0.6-0.9 mm in-plane, slices as thin as the randomization asks.
    "ct": Preset("ct", (0.6, 0.9), 0.5, 512, 320, (200.0, 320.0), True),
    # Tiny volumes (<= 64 x 64 x 48) for unit tests of code that reads phantoms.
    "test": Preset("test", (5.0, 6.0), 5.0, 64, 48, (200.0, 300.0), False),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown phantom preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]


def sample_acquisition(rng: np.random.Generator, preset: Preset, body_width_mm: float, slice_mm: float,
                       z_extent_mm: float | None = None):
    """Spacing (dx, dy, dz) and shape for a patient whose body is ``body_width_mm`` wide, scanned with
    ``slice_mm`` slices over ``z_extent_mm`` (default: the preset's range)."""
    fov_needed = body_width_mm + rng.uniform(30.0, 90.0)
    if preset.fixed_matrix:
        # The technologist picks the FOV to fit the patient; the matrix stays 512.
        dx = float(np.clip(fov_needed / preset.max_inplane, *preset.inplane_mm))
        n_xy = (preset.max_inplane, preset.max_inplane)
    else:
        dx = float(rng.uniform(*preset.inplane_mm))
        n = int(min(preset.max_inplane, np.ceil(fov_needed / dx)))
        n_xy = (n, n)
    dz = float(max(slice_mm, preset.min_slice_mm))
    extent = float(rng.uniform(*preset.z_extent_mm)) if z_extent_mm is None else float(z_extent_mm)
    nz = int(max(8, min(preset.max_slices, round(extent / dz))))
    return (dx, dx, dz), (n_xy[0], n_xy[1], nz)
