"""Acquisition presets: voxel spacing, matrix and field of view of the simulated scans."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Preset:
    name: str
    inplane_mm: tuple[float, float]  # in-plane spacing drawn uniformly in this range
    slice_mm: tuple[float, ...]  # slice thickness (= z spacing) drawn from these values
    max_inplane: int  # largest matrix size in x and y
    max_slices: int  # largest number of slices
    z_extent_mm: tuple[float, float]  # cranio-caudal coverage drawn uniformly in this range
    fixed_matrix: bool  # True: always max_inplane (scanner 512 matrix); False: fit the FOV to the body
    noise_hu: tuple[float, float]  # CT noise std (HU) range


PRESETS = {
    # Coarse enough for a CPU demo (<= 160 x 160 x 80 voxels).
    "demo": Preset("demo", (2.0, 3.0), (3.0, 4.0, 5.0), 160, 80, (200.0, 300.0), False, (10.0, 16.0)),
    # Clinical-like: 512 matrix, 0.6-0.9 mm in-plane, 1-5 mm slices.
    "ct": Preset("ct", (0.6, 0.9), (1.0, 1.25, 2.0, 2.5, 3.0, 5.0), 512, 320, (200.0, 320.0), True, (10.0, 20.0)),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown phantom preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]


def sample_acquisition(rng: np.random.Generator, preset: Preset, body_width_mm: float):
    """Spacing (dx, dy, dz) and shape for a patient whose body is ``body_width_mm`` wide."""
    fov_needed = body_width_mm + rng.uniform(30.0, 90.0)
    if preset.fixed_matrix:
        # The technologist picks the FOV to fit the patient; the matrix stays 512.
        dx = float(np.clip(fov_needed / preset.max_inplane, *preset.inplane_mm))
        n_xy = (preset.max_inplane, preset.max_inplane)
    else:
        dx = float(rng.uniform(*preset.inplane_mm))
        n = int(min(preset.max_inplane, np.ceil(fov_needed / dx)))
        n_xy = (n, n)
    dz = float(rng.choice(preset.slice_mm))
    nz = int(min(preset.max_slices, round(rng.uniform(*preset.z_extent_mm) / dz)))
    return (dx, dx, dz), (n_xy[0], n_xy[1], nz)
