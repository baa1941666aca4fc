"""Does a volume look like a CT in Hounsfield units? A histogram test of the tissue modes, with margins.

HU put every tissue at a fixed place on one scale: air -1000, fat about -100, soft tissue and enhanced
organs 0 to 150, bone above 300. A min/max test cannot tell a real HU crop without air (min -132 HU) from
an MR whose intensities were shifted into the HU range; the shape of the histogram can:

- tissue (voxels above -400 HU) forms a soft-tissue peak in [-30, 150] HU holding >= 15 % of the tissue,
  at least 6x denser per HU than the sparse band [-400, -200] (between lung / air and fat) and 1.2x
  denser than [200, 300] (the foot of the bone tail), and the most common tissue value lies in
  [-150, 150] (fat or soft tissue);
- and at least one more CT landmark: air (>= 0.5 % of the voxels at or below -900 HU), a fat peak
  (>= 0.5 % of the tissue in [-150, -50] HU, 4x denser than [-400, -200]), or bone (>= 0.1 % of the
  tissue above 300 HU) in an image that also has something below -50 HU but at most 5 % of its voxels in
  (-900, -150) HU, where CT has only lung (and then air). A positive-valued image, such as a raw MR, has
  "bright" voxels but nothing dark; an MR shifted down has its dark tissue spread through that gap.

An MR shifted or scaled into [-1000, 3000] has a smooth histogram, so it fails the peak tests, the mode
or the landmarks (the MR-like volumes of tests/reliability/test_image_inputs.py fail one to four of them),
while phantoms (all contrast phases, partial fields of view, +40 HU noise, liver crops without air) pass
every test with a margin of 2x or more. ``force=True`` turns a failed test into a warning (nnynet-predict --force).

A second test looks for missing slices: an axial slice with no tissue, or one exact value throughout, between
slices that hold tissue. The body does not vanish for one slice, so such a slice is a gap in the series filled
with air or a fill value (a failed slice in a reconstruction or a conversion); the network would cut every organ
there, and the mask would come out with stripes and exit code 0. Only the axial axis is tested: a sagittal plane
between an arm and the trunk is legitimately all air.
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np

MIN_AXIS_VOXELS = 8  # a volume, not a 2D image (H, W, 1) or an RGB image (H, W, 3)
CT_AIR_HU = -900.0  # at or below: air (outside the body, bowel gas, trachea)
CT_TISSUE_HU = -400.0  # above: tissue (air and aerated lung lie below)
CT_FAT_HU = (-150.0, -50.0)  # fat
CT_SOFT_HU = (-30.0, 150.0)  # soft tissue, blood, parenchyma from non-contrast to portal-venous phase
CT_BONE_HU = 300.0  # above: bone (and dense arterial contrast)
CT_LOW_FLANK_HU = (-400.0, -200.0)  # sparse in CT: between aerated lung and fat
CT_HIGH_FLANK_HU = (200.0, 300.0)  # foot of the bone tail (cancellous bone, kidney cortex in arterial phase)
CT_MODE_HU = (-150.0, 150.0)  # the most common tissue value is fat or soft tissue
CT_MIN_TISSUE_FRACTION = 0.01  # of all voxels: not an empty (all-air) scan
CT_MIN_SOFT_FRACTION = 0.15  # of the tissue voxels
CT_MIN_LOW_PEAK = 6.0  # soft-tissue density per HU over the low flank's (phantoms >= 12, MR-like 0.05-5)
CT_MIN_HIGH_PEAK = 1.2  # ... over the high flank's (phantoms >= 2.6, MR-like 0.25-1.4)
CT_MIN_AIR_FRACTION = 0.005  # of all voxels
CT_MIN_FAT_FRACTION = 0.005  # of the tissue voxels
CT_MIN_FAT_PEAK = 4.0  # fat density per HU over the low flank's
CT_MIN_BONE_FRACTION = 0.001  # of the tissue voxels
CT_MIN_BELOW_FAT_FRACTION = 0.001  # of all voxels below -50 HU, for bone to count ...
CT_GAP_HU = (-900.0, -150.0)  # ... and at most CT_MAX_GAP_FRACTION of all voxels here (only lung, with air)
CT_MAX_GAP_FRACTION = 0.05
CT_BLANK_SLICE_TISSUE = 0.002  # an axial slice with a smaller share of tissue voxels is blank ...
CT_BODY_SLICE_TISSUE = 0.05  # ... and is a gap when the slices on both sides of its run hold at least this share
CT_FILL_HU = -1100.0  # below: no material (air is -1000 HU) but the fill a scanner writes outside its reconstruction
# circle (-2000, -2048, -3024 in HU or in stored values), left out of the statistics: in stored values without the
# rescale intercept (HU + 1024: air at +24, soft tissue above 1000) that fill counted as "air" and let them pass
CT_RAW_OFFSET = 1024.0  # the usual DICOM RescaleIntercept is -1024: stored value = HU + 1024
CT_SAMPLE_VOXELS = 4_000_000  # a regular subsample of bigger volumes is enough for the histogram
NON_HU_DTYPES = (np.uint8, np.int8, np.bool_)  # cannot hold -1000..3000


def hu_evidence(volume: np.ndarray) -> dict[str, float]:
    """The histogram statistics the check uses (fractions, per-HU density ratios, the tissue mode)."""
    flat = np.asarray(volume).reshape(-1)
    if flat.size > CT_SAMPLE_VOXELS:
        flat = flat[:: int(np.ceil(flat.size / CT_SAMPLE_VOXELS))]
    flat = flat.astype(np.float32, copy=False)
    flat = flat[flat >= CT_FILL_HU]  # the fill outside the field of view is no measurement
    tissue = flat[flat > CT_TISSUE_HU]
    n_all, n_tissue = max(flat.size, 1), max(tissue.size, 1)

    def density(lo: float, hi: float) -> float:  # fraction of the tissue per HU in [lo, hi)
        return np.count_nonzero((tissue >= lo) & (tissue < hi)) / n_tissue / (hi - lo)

    def ratio(a: float, b: float) -> float:
        return a / b if b > 0 else (np.inf if a > 0 else 0.0)

    soft = density(*CT_SOFT_HU)
    hist, edges = np.histogram(np.clip(tissue, CT_TISSUE_HU, 3000.0), bins=np.arange(CT_TISSUE_HU, 3020.0, 20.0))
    return {
        "tissue": tissue.size / n_all,
        "soft": soft * (CT_SOFT_HU[1] - CT_SOFT_HU[0]),
        "low_peak": ratio(soft, density(*CT_LOW_FLANK_HU)),
        "high_peak": ratio(soft, density(*CT_HIGH_FLANK_HU)),
        "mode": float(edges[np.argmax(hist)] + 10.0) if tissue.size else float("nan"),
        "air": np.count_nonzero(flat <= CT_AIR_HU) / n_all,
        "fat": density(*CT_FAT_HU) * (CT_FAT_HU[1] - CT_FAT_HU[0]),
        "fat_peak": ratio(density(*CT_FAT_HU), density(*CT_LOW_FLANK_HU)),
        "bone": np.count_nonzero(tissue > CT_BONE_HU) / n_tissue,
        "below_fat": np.count_nonzero(flat < CT_FAT_HU[1]) / n_all,
        "gap": np.count_nonzero((flat > CT_GAP_HU[0]) & (flat < CT_GAP_HU[1])) / n_all,
    }


def hu_problems(volume: np.ndarray) -> list[str]:
    """Why ``volume`` does not look like a CT in HU; empty when it does."""
    if np.dtype(volume.dtype).type in NON_HU_DTYPES:
        return [f"dtype {volume.dtype} cannot hold Hounsfield units (-1000 to 3000)"]
    e = hu_evidence(volume)
    if e["tissue"] < CT_MIN_TISSUE_FRACTION:
        return [f"only {e['tissue']:.1%} of the voxels are above {CT_TISSUE_HU:g} HU (no tissue)"]
    out = []
    lo, hi = CT_SOFT_HU
    if e["soft"] < CT_MIN_SOFT_FRACTION:
        out.append(f"{e['soft']:.0%} of the tissue is soft tissue [{lo:g}, {hi:g}] HU (expected >= {CT_MIN_SOFT_FRACTION:.0%})")
    if e["low_peak"] < CT_MIN_LOW_PEAK or e["high_peak"] < CT_MIN_HIGH_PEAK:
        out.append(
            f"no soft-tissue peak: [{lo:g}, {hi:g}] HU is {e['low_peak']:.1f}x / {e['high_peak']:.1f}x as dense as "
            f"{list(CT_LOW_FLANK_HU)} / {list(CT_HIGH_FLANK_HU)} HU (expected >= {CT_MIN_LOW_PEAK:g}x / {CT_MIN_HIGH_PEAK:g}x)"
        )
    if not CT_MODE_HU[0] <= e["mode"] <= CT_MODE_HU[1]:
        out.append(f"the most common tissue value is {e['mode']:g} (expected fat or soft tissue, {list(CT_MODE_HU)} HU)")
    air = e["air"] >= CT_MIN_AIR_FRACTION
    fat = e["fat"] >= CT_MIN_FAT_FRACTION and e["fat_peak"] >= CT_MIN_FAT_PEAK
    bone = (e["bone"] >= CT_MIN_BONE_FRACTION and e["below_fat"] >= CT_MIN_BELOW_FAT_FRACTION
            and e["gap"] <= CT_MAX_GAP_FRACTION)
    if not (air or fat or bone):
        out.append(f"no air (<= {CT_AIR_HU:g}), fat peak ({list(CT_FAT_HU)}) or bone (> {CT_BONE_HU:g} HU)")
    return out


def axial_axis(affine: np.ndarray | None) -> int:
    """The array axis closest to the patient's superior-inferior direction (2 when there is no affine)."""
    if affine is None:
        return 2
    directions = np.asarray(affine, dtype=np.float64)[:3, :3]
    norms = np.linalg.norm(directions, axis=0)
    return int(np.argmax(np.abs(directions[2]) / np.where(norms > 0, norms, 1.0)))


def blank_slice_runs(volume: np.ndarray, axis: int = 2) -> list[tuple[int, int]]:
    """Runs [start, stop) of blank slices along ``axis`` (no tissue, or a single value) inside the body: the
    slices just before and after the run are not blank and hold at least CT_BODY_SLICE_TISSUE tissue."""
    planes = np.moveaxis(np.asarray(volume), axis, 0)
    step = max(1, int(np.ceil(np.sqrt(planes[0].size / 65_536))))  # ~256^2 voxels per slice are enough
    planes = planes[:, ::step, ::step]
    tissue = (planes > CT_TISSUE_HU).mean(axis=(1, 2))
    flat = planes.reshape(len(planes), -1)
    constant = flat.min(axis=1) == flat.max(axis=1)
    blank = (tissue < CT_BLANK_SLICE_TISSUE) | constant
    runs, start = [], 0
    for is_blank, group in itertools.groupby(blank):
        stop = start + len(list(group))
        inside = start > 0 and stop < len(blank) and min(tissue[start - 1], tissue[stop]) >= CT_BODY_SLICE_TISSUE
        if is_blank and inside:
            runs.append((start, stop))
        start = stop
    return runs


def _describe_runs(runs: list[tuple[int, int]]) -> str:
    parts = [str(a) if b == a + 1 else f"{a}-{b - 1}" for a, b in runs[:5]]
    return ", ".join(parts) + (f" and {len(runs) - 5} more runs" if len(runs) > 5 else "")


def _raw_values_hint(volume: np.ndarray) -> str:
    """The likely cause when ``volume`` minus CT_RAW_OFFSET passes the intensity test: stored values without the
    DICOM rescale intercept (a converter that dropped RescaleIntercept -1024); else ""."""
    if np.dtype(volume.dtype).type in NON_HU_DTYPES or hu_problems(volume.astype(np.float32) - CT_RAW_OFFSET):
        return ""
    return (f"Its values minus {CT_RAW_OFFSET:g} would look like a CT in HU: stored values without the rescale "
            f"intercept (DICOM RescaleIntercept -{CT_RAW_OFFSET:g})? Convert it to HU (dcm2niix applies the intercept).")


PREDICT_REMEDY = "If it is a CT in HU, rerun with --force (predict(..., force=True))."


def check_ct_volume(volume: np.ndarray, name: str = "input", *, force: bool = False,
                    remedy: str = PREDICT_REMEDY, affine: np.ndarray | None = None) -> None:
    """Raise ValueError unless ``volume`` is a 3D array of finite values that looks like a CT in HU, without
    blank slices inside the body.

    Shape, dtype and NaN problems always raise. The intensity and missing-slice tests (module docstring) raise
    too, unless ``force``: then they warn and return, for a real CT a test misjudges. ``remedy`` ends the
    refusal: how the caller's user overrides the test. ``affine`` tells which array axis is axial (default 2).
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"{name}: expected a 3D CT volume (X, Y, Z), got an array of shape {tuple(volume.shape)}")
    if min(volume.shape) < MIN_AXIS_VOXELS:
        raise ValueError(
            f"{name}: expected a 3D CT volume with at least {MIN_AXIS_VOXELS} voxels along each axis, "
            f"got shape {tuple(volume.shape)} (a 2D or RGB image?)"
        )
    if volume.dtype != np.bool_ and (
        not np.issubdtype(volume.dtype, np.number) or np.issubdtype(volume.dtype, np.complexfloating)
    ):
        raise ValueError(f"{name}: expected real-valued intensities, got dtype {volume.dtype}")
    if not np.isfinite(volume).all():
        raise ValueError(f"{name}: the volume contains NaN or infinite values")
    problems = hu_problems(volume)
    if not problems:
        axis = axial_axis(affine)
        runs = blank_slice_runs(volume, axis)
        if runs:
            message = (
                f"{name}: {sum(b - a for a, b in runs)} axial slice(s) inside the body are blank (no tissue above "
                f"{CT_TISSUE_HU:g} HU, or one value throughout) between slices with tissue: array axis {axis}, "
                f"index {_describe_runs(runs)}. Slices missing from the series, filled with air or a fill value? "
                "Every organ would be cut there; re-export the series complete."
            )
            if not force:  # the caller's override, without its "if it is a CT in HU" condition
                override = remedy.removeprefix("If it is a CT in HU, ").split("; ")[0].rstrip(".")
                raise ValueError(f"{message} To use it as it is, {override}.")
            warnings.warn(message + " Running anyway (--force): check the mask.", stacklevel=2)
        return
    lo, hi = float(volume.min()), float(volume.max())
    message = (
        f"{name}: does not look like a CT in Hounsfield units (values in [{lo:g}, {hi:g}]): {'; '.join(problems)}. "
        + (_raw_values_hint(volume) or
           "An MR, an image in [0, 1] / [0, 255], or a CT missing its rescale slope/intercept?")
    )
    if not force:
        raise ValueError(f"{message} {remedy}")
    warnings.warn(message + " Running anyway (--force): check the mask.", stacklevel=2)
