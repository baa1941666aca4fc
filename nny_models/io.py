"""Reading CT volumes, discovering cases in common data set layouts, and the case manifest.

Volumes come back as float32 arrays in the file's own voxel order plus a 4x4 RAS affine (the
NIfTI convention, which MONAI's readers also use); preprocessing reorients them.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

NIFTI_SUFFIXES = (".nii.gz", ".nii")
IMAGE_SUFFIXES = (*NIFTI_SUFFIXES, ".nrrd", ".nhdr")


@dataclass
class CaseRecord:
    """One case: an image file (or DICOM series folder) and an optional label file."""

    case_id: str  # unique id, also the join key of the clinical table
    image: str  # absolute path to the image (.nii/.nii.gz/.nrrd or a DICOM series folder)
    label: str | None = None  # absolute path to the label volume, or None for unlabeled cases


# ----------------------------------------------------------------------------- reading volumes

# Geometry a CT header may claim. Outside this range the header is broken (pixdim 0, a unit mix-up), and
# resampling with it would give a wrong mask, so it is refused instead of guessed.
MIN_SPACING_MM = 0.01  # finer than any clinical or micro-CT voxel
MAX_SPACING_MM = 50.0  # coarser than any CT slice (thick slices are 5-10 mm)
# Largest volume decoded at once, as float32 bytes (2 GiB = 512 x 512 x 2048). A header claiming more is
# checked before any allocation, so a corrupt header gives a clear error instead of a MemoryError.
MAX_VOLUME_BYTES = 2 * 1024**3


def _strip_suffix(name: str) -> str:
    for suffix in (*IMAGE_SUFFIXES, ".dcm"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _is_dicom_file(path: Path) -> bool:
    """.dcm suffix, or the DICOM part-10 preamble ("DICM" at byte 128); needs no pydicom."""
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _is_dicom_dir(path: Path) -> bool:
    return path.is_dir() and any(_is_dicom_file(f) for f in path.iterdir() if f.is_file())


def _file_kind(path: Path) -> str:
    """What a path that is neither a regular file nor a folder is, in words (for an error message)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return "a broken symbolic link" if path.is_symlink() else "unreadable"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device file"
    return "not a regular file"


def _check_regular(path: Path) -> None:
    """ValueError naming ``path`` unless it is a regular file or a folder (a DICOM series), following symlinks.
    Opening a named pipe waits for a writer, forever; a device or socket is no image either. A missing path
    passes: the callers say "not found" themselves."""
    if path.is_file() or path.is_dir() or not (path.exists() or path.is_symlink()):
        return
    raise ValueError(f"{path}: is {_file_kind(path)}; expected a regular file (a .nii, .nii.gz or .nrrd image) or "
                     "a DICOM series folder")


def _need_pydicom(path: Path) -> None:
    try:
        import pydicom  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"{path}: reading a DICOM series needs pydicom, which is not installed: pip install 'nnynet[dicom]'"
        ) from e


def check_spacing(affine: np.ndarray, path: str | Path, source: str = "affine") -> tuple[float, ...]:
    """Voxel spacing (mm) of a 4x4 affine; ValueError naming ``path`` and ``source`` unless it is plausible."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise ValueError(f"{path}: the {source} is not a finite 4x4 matrix: {np.round(affine, 4).tolist()}")
    spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
    if not all(MIN_SPACING_MM <= s <= MAX_SPACING_MM for s in spacing):
        raise ValueError(
            f"{path}: voxel spacing {tuple(round(s, 6) for s in spacing)} mm from the {source} is implausible; "
            f"expected {MIN_SPACING_MM:g} to {MAX_SPACING_MM:g} mm per axis (fix the header's pixdim / sform / qform)"
        )
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ValueError(f"{path}: the {source} is singular (axes collinear): {np.round(affine, 4).tolist()}")
    return spacing


def check_size(path: str | Path, shape: Sequence[int], max_bytes: int = MAX_VOLUME_BYTES) -> None:
    """Refuse a header whose voxel count (decoded as float32) exceeds ``max_bytes``, before allocating it."""
    shape = tuple(int(s) for s in shape)
    voxels = int(np.prod(shape, dtype=np.float64)) if shape else 0
    if min(shape, default=0) < 0 or voxels * 4 > max_bytes:
        raise ValueError(
            f"{path}: the header claims shape {shape} ({voxels:,} voxels, {voxels * 4 / 1024**3:.1f} GiB as float32), "
            f"above the limit of {max_bytes / 1024**3:.1f} GiB (nny_models.io.MAX_VOLUME_BYTES); is the header corrupt?"
        )


def _open_nifti(path: Path, max_bytes: int = MAX_VOLUME_BYTES):
    """nib.load, refusing geometry nibabel would silently repair (pixdim 0 -> 1 mm) and oversized headers."""
    import nibabel as nib
    from nibabel.openers import ImageOpener

    try:
        if _misnamed_gzip(path):
            img, raw = _load_misnamed_nifti(path, max_bytes)
        else:
            img = nib.load(str(path))
            with ImageOpener(str(path)) as f:  # the header as written: nib.load has already "fixed" pixdim
                raw = type(img.header).from_fileobj(f, check=False)
    except ValueError as err:
        _explain_bad_quaternion(path, err)
        raise
    check_size(path, raw.get_data_shape(), max_bytes)
    dtype = raw.get_data_dtype()
    if dtype.fields is not None or dtype.kind not in "biuf":  # nibabel would drop the imaginary part / fail
        raise ValueError(f"{path}: voxel type {dtype} (NIfTI datatype {int(raw['datatype'])}) is not a grayscale "
                         "intensity; expected real-valued CT voxels (integer or float)")
    sform, qform = int(raw["sform_code"]), int(raw["qform_code"])
    if sform == 0:  # the affine comes from pixdim (qform or the bare pixdim scaling)
        pixdim = [float(f"{v:.6g}") for v in raw["pixdim"][1:4]]  # float32 -> readable
        if not all(np.isfinite(v) and v > 0 for v in pixdim):
            missing = "no sform" if qform else "no sform or qform"
            raise ValueError(
                f"{path}: header pixdim[1:4] = {pixdim} with {missing}, so the voxel spacing is unknown "
                "(nibabel would silently use 1 mm); expected positive spacings in mm"
            )
    source = "sform" if sform else "qform" if qform else "pixdim"
    check_spacing(img.affine, path, f"NIfTI header ({source})")
    if not sform and not qform:  # Analyze-style: tools disagree on the axes, and the liver's side depends on them
        codes = "".join(nib.aff2axcodes(img.affine))
        warnings.warn(f"{path}: the NIfTI header has neither an sform nor a qform (both codes 0), so the patient's "
                      f"orientation is not stated; nnynet reads the axes as nibabel does ({codes}), other tools may "
                      "differ: check that the mask's liver lies on the patient's right", stacklevel=3)
    if sform and qform:
        _warn_if_forms_disagree(raw, path)
    _warn_if_intercept_ignored(raw, path)
    return img


def _explain_bad_quaternion(path: Path, err: Exception) -> None:
    """nibabel fails on a qform-only header whose quaternion is not a rotation (quatern_b^2 + c^2 + d^2 > 1) with
    "w2 should be positive", which names neither the file nor the field: raise a ValueError that names both.
    Returns quietly for any other error (the caller re-raises it)."""
    import nibabel as nib

    try:
        with open(path, "rb") as f:
            head = f.read(348)
        if head[:2] == b"\x1f\x8b":
            import gzip

            with gzip.open(path, "rb") as f:
                head = f.read(348)
        raw = nib.Nifti1Header.from_fileobj(io.BytesIO(head), check=False)
        if int(raw["sizeof_hdr"]) != 348 or int(raw["sform_code"]) or not int(raw["qform_code"]):
            return  # the qform is not the affine nibabel builds
        bcd = [float(raw[k]) for k in ("quatern_b", "quatern_c", "quatern_d")]
    except Exception:
        return
    if 1.0 - sum(v * v for v in bcd) >= raw.quaternion_threshold:
        return
    raise ValueError(f"{path}: the NIfTI qform quaternion (quatern_b, quatern_c, quatern_d) = "
                     f"({', '.join(f'{v:.6g}' for v in bcd)}) is not a rotation (b^2 + c^2 + d^2 = "
                     f"{sum(v * v for v in bcd):.4g} > 1) and there is no sform, so the orientation is undefined; "
                     "expected b^2 + c^2 + d^2 <= 1 (fix the qform or write an sform)") from err


def _misnamed_gzip(path: Path) -> bool:
    """Whether the name and the content disagree on gzip: a plain NIfTI saved as .nii.gz, or a compressed one as
    .nii. ITK-based tools (SimpleITK, 3D Slicer, nnU-Net's reader) open both by content; nibabel goes by the name."""
    _check_regular(path)  # open() on a named pipe would wait for a writer forever
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    return gzipped != path.name.lower().endswith(".gz")


def _load_misnamed_nifti(path: Path, max_bytes: int):
    """(image, raw header) of a NIfTI whose compression its name misstates, read by content, with a warning."""
    import gzip
    import io

    import nibabel as nib

    gzipped = not path.name.lower().endswith(".gz")
    opener = gzip.open if gzipped else open
    with opener(path, "rb") as f:
        head = f.read(540)
        klass = nib.Nifti2Image if int.from_bytes(head[:4], "little") == 540 or int.from_bytes(head[:4], "big") == 540 \
            else nib.Nifti1Image
        raw = klass.header_class.from_fileobj(io.BytesIO(head), check=False)
        check_size(path, raw.get_data_shape(), max_bytes)  # before decompressing the voxels
        data = head + f.read()
    warnings.warn(f"{path}: the file is {'gzip-compressed' if gzipped else 'not compressed'} although its name "
                  f"ends in {'.nii' if gzipped else '.nii.gz'}; read by its content (rename it to "
                  f"{'.nii.gz' if gzipped else '.nii'})", stacklevel=4)
    return klass.from_bytes(data), raw


def _warn_if_intercept_ignored(raw, path: Path) -> None:
    """scl_slope 0 (or NaN / inf) means "no scaling" in NIfTI, so nibabel reads the voxels as stored and drops
    scl_inter too; a writer that meant slope 1 with intercept -1024 leaves stored values (HU + 1024), which the
    CT check then refuses without naming the field. Name it, with the values, so the header can be fixed."""
    slope, inter = float(raw["scl_slope"]), float(raw["scl_inter"])
    if (slope == 0 or not np.isfinite(slope)) and np.isfinite(inter) and inter != 0:
        warnings.warn(f"{path}: the NIfTI header's scl_slope is {slope:g}, which means no scaling, so its scl_inter "
                      f"{inter:g} is not applied either (as nibabel and the NIfTI standard read it): the voxels are "
                      "used as stored; if scl_inter was meant, set scl_slope to 1", stacklevel=3)


def _warn_if_forms_disagree(raw, path: Path) -> None:
    """A header whose sform and qform place the voxels differently is read by its sform (as nibabel does), but
    ITK-based viewers may show the qform: say so, above all when the two disagree on an axis direction (which
    side is the patient's right decides the liver post-processing)."""
    import nibabel as nib

    try:
        s_aff, q_aff = raw.get_sform(), raw.get_qform()
    except Exception:  # an invalid quaternion: nibabel itself ignores the qform then
        return
    if np.allclose(s_aff, q_aff, rtol=1e-3, atol=1e-2):
        return
    s_codes, q_codes = "".join(nib.aff2axcodes(s_aff)), "".join(nib.aff2axcodes(q_aff))
    detail = (f"they disagree on the axis directions ({s_codes} vs {q_codes})" if s_codes != q_codes
              else f"both {s_codes}, with other origins or spacings")
    warnings.warn(f"{path}: the NIfTI sform and qform differ ({detail}); nnynet reads the sform, as nibabel does, "
                  "while some viewers use the qform: check that the mask lies on the anatomy", stacklevel=3)


def _as_3d(array: np.ndarray, path: Path) -> np.ndarray:
    """Accept (X,Y,Z) or (X,Y,Z,1); anything else is not a CT volume."""
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3 or min(array.shape) < 2:
        raise ValueError(
            f"{path}: expected a 3D volume (X, Y, Z) with at least 2 voxels per axis, got shape {tuple(array.shape)}"
        )
    return array


def load_volume(path: str | Path, *, max_bytes: int = MAX_VOLUME_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """Read a .nii/.nii.gz/.nrrd file or a DICOM series folder -> (float32 (X,Y,Z), 4x4 RAS affine).

    The header is checked before the voxels are decoded: a shape above ``max_bytes`` (as float32) or a
    voxel spacing outside [MIN_SPACING_MM, MAX_SPACING_MM] is a ValueError naming the file.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    _check_regular(path)
    name = path.name.lower()
    try:
        if name.endswith(NIFTI_SUFFIXES):
            img = _open_nifti(path, max_bytes)
            array, affine = img.get_fdata(dtype=np.float32), np.asarray(img.affine, dtype=np.float64)
        elif name.endswith((".nrrd", ".nhdr")):
            array, affine = _load_with_monai(path, max_bytes)
        elif path.is_dir():
            if not _is_dicom_dir(path):
                raise ValueError(
                    f"{path}: a folder without DICOM files (.dcm or files with the DICM preamble); expected a "
                    "DICOM series folder or a .nii, .nii.gz or .nrrd file"
                )
            _need_pydicom(path)
            array, affine = _load_with_monai(path, max_bytes)
        else:
            raise ValueError(f"{path}: unsupported format; expected .nii, .nii.gz, .nrrd or a DICOM series folder")
    except ImportError:
        raise
    except ValueError as e:
        if str(path) in str(e):  # ours: already names the file
            raise
        raise ValueError(f"{path}: could not read the volume ({type(e).__name__}: {e}); is the file complete?") from e
    except Exception as e:  # truncated gzip, bad header, unreadable DICOM, ...
        raise ValueError(f"{path}: could not read the volume ({type(e).__name__}: {e}); is the file complete?") from e
    if not name.endswith(NIFTI_SUFFIXES):
        check_spacing(affine, path, "image affine")
    return np.ascontiguousarray(_as_3d(array, path), dtype=np.float32), affine


# MONAI warnings that say nothing about the input: its optional GPU decoder is missing (on every DICOM read), and a
# file that _renumber unnumbered on purpose (a DICOMDIR index) is skipped. Any other warning of the reader (such as
# its identity-affine fallback when it lost ImageOrientationPatient / ImagePositionPatient) reaches the caller.
_MONAI_DICOM_NOISE = ("nvImageCodec", "NvImgCodec", "does not have InstanceNumber tag, skip it")
# The DICOM tags of the geometry, as keys of MONAI's metadata dict (pydicom's to_json_dict keys)
_GEOMETRY_TAGS = {"00200037": "ImageOrientationPatient", "00200032": "ImagePositionPatient", "00280030": "PixelSpacing"}


def _load_with_monai(path: Path, max_bytes: int = MAX_VOLUME_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """NRRD (pynrrd) and DICOM series (MONAI PydicomReader), both with RAS affines. A DICOM series' affine is
    checked against the geometry _dicom_stack read from the headers (_check_dicom_affine)."""
    if not path.is_dir():
        return _load_nrrd(path, max_bytes)
    from monai.data import PydicomReader
    from monai.transforms import LoadImage

    shape, _, order, header_affine = _dicom_stack(path)
    check_size(path, shape, max_bytes)

    class StackOrderReader(PydicomReader):
        def read(self, data, **kwargs):
            img = super().read(data, **kwargs)
            if self.has_series:
                _renumber(img, self.filenames[0], order)
            return img

        def _get_meta_dict(self, img):
            return _restore_geometry_tags(super()._get_meta_dict(img), img)

    # MONAI warns (and logs, on stderr) about its optional GPU decoder on every DICOM read
    codec_log = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
    level = codec_log.level
    codec_log.setLevel(logging.ERROR)
    caught: list = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            img = LoadImage(reader=StackOrderReader(), image_only=True)(str(path))
    finally:
        codec_log.setLevel(level)
        for w in caught:
            if not any(noise in str(w.message) for noise in _MONAI_DICOM_NOISE):
                warnings.warn(f"{path}: {w.message}", w.category, stacklevel=3)
    affine = np.asarray(img.affine, dtype=np.float64)
    _check_dicom_affine(path, affine, header_affine)
    return np.asarray(img, dtype=np.float32), affine


def _restore_geometry_tags(metadata: dict, ds) -> dict:
    """MONAI's PydicomReader takes its metadata from ``ds.to_json_dict(suppress_invalid_tags=True)``, which drops a
    decimal string longer than DICOM's 16 characters (a float repr such as '0.9999999999999998', as scripts
    writing DICOM from computed floats produce), and then falls back to an identity affine. pydicom reads such
    values (and _dicom_stack checked them): put the geometry tags it dropped back, as numbers. A value that is not
    numbers stays out, so the reader's affine falls back and _check_dicom_affine refuses it, naming the tag."""
    for key, keyword in _GEOMETRY_TAGS.items():
        if key not in metadata and ds.get(keyword) is not None:
            try:
                values = [float(v) for v in np.atleast_1d(np.asarray(ds[keyword].value, dtype=np.float64))]
            except (TypeError, ValueError):
                continue
            metadata[key] = {"vr": "DS", "Value": values}
    return metadata


def _check_dicom_affine(path: Path, affine: np.ndarray, expected: np.ndarray) -> None:
    """ValueError naming ``path`` and the tag unless the reader's RAS ``affine`` places the voxels where the
    DICOM headers do (``expected``, from _dicom_stack): the same in-plane directions (ImageOrientationPatient)
    and spacings (PixelSpacing), slice step and origin (ImagePositionPatient)."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"{path}: the DICOM reader returned a {affine.shape} affine; expected a 4x4 matrix")
    with np.errstate(divide="ignore", invalid="ignore"):
        spacing, want_spacing = (np.linalg.norm(a[:3, :2], axis=0) for a in (affine, expected))
        checks = (  # tag, what, reader's, headers', tolerance (unit vectors, mm)
            ("ImageOrientationPatient", "in-plane axis directions (RAS)", affine[:3, :2] / spacing,
             expected[:3, :2] / want_spacing, 1e-4),
            ("PixelSpacing", "in-plane voxel spacing (mm)", spacing, want_spacing, 1e-4),
            ("ImagePositionPatient", "slice step (mm, RAS)", affine[:3, 2], expected[:3, 2], 1e-3),
            ("ImagePositionPatient", "origin (mm, RAS)", affine[:3, 3], expected[:3, 3], 1e-3),
        )
    for tag, what, got, want, atol in checks:
        if not np.allclose(got, want, rtol=0.0, atol=atol):  # a NaN never passes
            raise ValueError(
                f"{path}: the image affine from MONAI's DICOM reader disagrees with the series' {tag}: {what} "
                f"{np.round(got, 4).T.tolist()} instead of {np.round(want, 4).T.tolist()}; expected the affine to "
                "match the headers (a header value the reader could not parse?)"
            )


def _renumber(datasets: list, filenames: Sequence[str], order: dict[str, int]) -> None:
    """Set each slice's InstanceNumber, in memory (the files are untouched), to its place in ``order`` (file name
    -> stack index, from _dicom_stack), so that MONAI's PydicomReader, which stacks by InstanceNumber, stacks in the
    order that was checked. A file outside ``order`` (a DICOMDIR index) loses its number, so the reader skips it."""
    for ds, name in zip(datasets, filenames):
        rank = order.get(Path(name).name)
        if rank is not None:
            ds.InstanceNumber = rank + 1
        elif "InstanceNumber" in ds:
            del ds.InstanceNumber


_NRRD_TO_RAS = {"left-posterior-superior": (-1, -1, 1), "lps": (-1, -1, 1),
                "right-anterior-superior": (1, 1, 1), "ras": (1, 1, 1),
                "left-anterior-superior": (-1, 1, 1), "las": (-1, 1, 1)}


def _load_nrrd(path: Path, max_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """NRRD with pynrrd: "space directions" (rows = axis vectors) + optional "space origin" -> RAS affine."""
    try:
        import nrrd
    except ImportError as e:
        raise ImportError(f"{path}: reading NRRD needs pynrrd, which is not installed: pip install pynrrd") from e
    header = nrrd.read_header(str(path))
    check_size(path, header.get("sizes", ()), max_bytes)
    data, header = nrrd.read(str(path), index_order="F")  # (X, Y, Z), like NIfTI
    if "space directions" in header:
        spatial = [d is not None and np.isfinite(d).all() for d in header["space directions"]]
        if data.ndim == len(spatial) == 4 and not spatial[0] and data.shape[0] == 1:
            data = data[0]  # a one-element list axis first, e.g. (1, X, Y, Z) from a vector-image writer
        dirs = np.asarray([d for d, ok in zip(header["space directions"], spatial) if ok], float)
    elif "spacings" in header:
        dirs = np.diag([float(s) for s in header["spacings"]][:3])
    else:
        raise ValueError(f"{path}: NRRD header has neither 'space directions' nor 'spacings'; the voxel spacing is unknown")
    ndim = data.ndim
    if dirs.shape != (3, 3) or ndim < 3:
        raise ValueError(f"{path}: expected a 3D NRRD with 3 spatial 'space directions', got {dirs.tolist()}")
    space = str(header.get("space", "left-posterior-superior")).lower()
    if space not in _NRRD_TO_RAS:
        raise ValueError(f"{path}: NRRD 'space' {space!r} is not supported; expected one of {sorted(_NRRD_TO_RAS)}")
    flip = np.diag([*_NRRD_TO_RAS[space], 1.0])
    affine = np.eye(4)
    affine[:3, :3] = dirs.T
    affine[:3, 3] = np.asarray(header.get("space origin", np.zeros(3)), float)[:3]
    return np.asarray(data, dtype=np.float32), flip @ affine


def read_header(path: str | Path) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Shape (X,Y,Z) and voxel spacing in mm from the header only, without decoding voxel data."""
    path = Path(path).expanduser()
    _check_regular(path)
    name = path.name.lower()
    try:
        if name.endswith(NIFTI_SUFFIXES):
            img = _open_nifti(path)
            shape = img.header.get_data_shape()
            return tuple(int(s) for s in shape[:3]), check_spacing(img.affine, path, "NIfTI header")
        if path.is_dir():
            _need_pydicom(path)
            shape, spacing, _, _ = _dicom_stack(path)
            check_spacing(np.diag([*spacing, 1.0]), path, "DICOM PixelSpacing / slice positions")
            return shape, spacing
    except (ValueError, ImportError):
        raise
    except Exception as e:
        raise ValueError(f"{path}: could not read the header ({type(e).__name__}: {e})") from e
    # NRRD and anything else: decode once (pynrrd headers are cheap, but keep one code path)
    array, affine = load_volume(path)
    return tuple(array.shape), tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))


# A DICOM series is stacked in InstanceNumber order with one slice step (MONAI's PydicomReader), so anything
# else (a missing slice, uneven steps, two series in one folder, a gantry tilt) would give a wrong grid: refused.
# The reader places slice k at first + k * (last - first) / (n - 1). A slice further than this fraction of the
# spacing from that place is refused: a missing slice puts the middle ones about 0.5 off, and rounded positions
# (0.01 mm on 0.6 mm slices) stay far below.
DICOM_GRID_TOLERANCE = 0.2
DICOM_TILT_TOLERANCE_DEG = 0.5  # the stack runs further off the slice normal than this: gantry tilt (sheared grid)
NON_CT_MODALITIES = ("MR", "PT", "NM", "US")  # volumetric DICOM modalities whose voxels are not HU


def _dicom_stack(path: Path) -> tuple[tuple[int, ...], tuple[float, ...], dict[str, int], np.ndarray]:
    """Shape (X, Y, Z), spacing, stack order (file name -> slice index) and 4x4 RAS affine (in the voxel order of
    MONAI's PydicomReader) of a DICOM series folder, from the headers; ValueError naming the folder, the tag and
    what was expected unless the slices form one evenly spaced, untilted stack. The slices stack in
    InstanceNumber order where it runs along the slice positions (either way), else, with a warning, in the order
    of their positions along the slice normal."""
    import pydicom
    from pydicom.misc import is_dicom

    entries = sorted(path.iterdir())
    odd = [f for f in entries if not (f.is_file() or f.is_dir())]
    if odd:  # PydicomReader opens every file of the folder: a named pipe would block it forever
        raise ValueError(f"{path}: {odd[0].name} is {_file_kind(odd[0])}; expected a DICOM series folder holding "
                         "only regular files (remove it)")
    files = [f for f in entries if f.is_file() and is_dicom(str(f))]  # what PydicomReader reads
    slices = []
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        if "DirectoryRecordSequence" not in ds:  # a DICOMDIR index file, not a slice
            slices.append((f.name, ds))
    if len(slices) < 2:
        frames = int(slices[0][1].get("NumberOfFrames", 1) or 1) if slices else 1
        hint = (f" ({slices[0][0]} is one multi-frame object of {frames} frames, which is not supported: "
                "convert it to NIfTI first, e.g. with dcm2niix)") if frames > 1 else ""
        raise ValueError(f"{path}: expected a DICOM series with at least 2 slices, found {len(slices)}{hint}")
    series: dict[tuple[str, str], int] = {}
    for _, s in slices:
        key = (str(s.get("SeriesInstanceUID", "?")), str(s.get("Modality", "?")))
        series[key] = series.get(key, 0) + 1
    if len(series) > 1:
        found = ", ".join(f"{uid} ({modality}, {n} files)" for (uid, modality), n in series.items())
        raise ValueError(f"{path}: the folder mixes {len(series)} series (SeriesInstanceUID {found}); "
                         "expected one series per folder: move each series to its own folder")
    modality = str(slices[0][1].get("Modality", ""))
    if modality in NON_CT_MODALITIES:  # their intensities are not Hounsfield units
        raise ValueError(f"{path}: the series has Modality {modality!r}; expected a CT series (Modality 'CT')")
    for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns"):
        lacking = [name for name, s in slices if s.get(tag) is None]
        if lacking:
            raise ValueError(f"{path}: {len(lacking)} slice(s) lack {tag} (e.g. {lacking[0]}); "
                             "expected every slice of the series to have it")
    for tag in ("ImageOrientationPatient", "PixelSpacing", "Rows", "Columns"):
        first_name, first = slices[0]
        ref = np.asarray(first.get(tag), dtype=float)
        for name, s in slices[1:]:
            other = np.asarray(s.get(tag), dtype=float)
            if other.shape != ref.shape or not np.allclose(other, ref, atol=1e-4):
                raise ValueError(f"{path}: {tag} differs between slices ({first_name}: {ref.tolist()}, {name}: "
                                 f"{other.tolist()}); expected one value for the series")
    row, col = np.asarray(slices[0][1].ImageOrientationPatient, dtype=float).reshape(2, 3)
    normal = np.cross(row, col)
    slices = _stack_order(path, slices, normal)
    positions = np.asarray([s.ImagePositionPatient for _, s in slices], dtype=float)
    along = np.diff(positions, axis=0) @ normal
    dz = float(np.median(np.abs(along)))
    same = np.flatnonzero(np.abs(along) <= 1e-3 * max(dz, 1e-3))
    if same.size:
        a, b = slices[same[0]][0], slices[same[0] + 1][0]
        raise ValueError(f"{path}: slices {a} and {b} share one position along the slice normal (a duplicate or "
                         "a second acquisition?); expected one slice per position")
    depth = (positions - positions[0]) @ normal
    grid = np.linspace(0.0, depth[-1], len(depth))  # where the reader puts each slice
    if np.max(np.abs(depth - grid)) > DICOM_GRID_TOLERANCE * dz:
        worst = int(np.argmax(np.abs(np.abs(along) - dz)))
        raise ValueError(
            f"{path}: uneven slice spacing: {abs(along[worst]):.4g} mm between {slices[worst][0]} and "
            f"{slices[worst + 1][0]}, {dz:.4g} mm elsewhere (a missing slice?); expected a constant spacing"
        )
    span = positions[-1] - positions[0]
    tilt = float(np.degrees(np.arctan2(np.linalg.norm(span - depth[-1] * normal), abs(depth[-1]))))
    if tilt > DICOM_TILT_TOLERANCE_DEG:
        raise ValueError(f"{path}: the slices step {tilt:.1f} degrees off the slice normal (gantry tilt); expected "
                         "an untilted stack: resample it first (e.g. dcm2niix corrects gantry tilt)")
    row_spacing, col_spacing = (float(v) for v in slices[0][1].PixelSpacing)
    # MONAI's PydicomReader swaps i/j so that X runs along columns, like the other readers
    slice_spacing = abs(float(depth[-1])) / (len(slices) - 1)  # the reader's
    shape = (int(slices[0][1].Columns), int(slices[0][1].Rows), len(slices))
    # where the reader puts voxel (X, Y, Z): X along the row direction, one slice step from the first slice to the
    # last, the first slice's position as origin; then LPS -> RAS
    affine = np.eye(4)
    affine[:3, :4] = np.column_stack([row * col_spacing, col * row_spacing, span / (len(slices) - 1), positions[0]])
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    order = {name: k for k, (name, _) in enumerate(slices)}
    return shape, (col_spacing, row_spacing, slice_spacing), order, affine


def _stack_order(path: Path, slices: list, normal: np.ndarray) -> list:
    """The (name, dataset) slices in stack order: by InstanceNumber where the numbers are unique and run along the
    slice positions (either way, as the scanner wrote them), else by position along the slice ``normal``, with a
    warning (numbers missing, repeated or out of position order: a re-export or an anonymizer renumbered them)."""
    depth = np.asarray([s.ImagePositionPatient for _, s in slices], dtype=float) @ normal
    numbers = [s.get("InstanceNumber") for _, s in slices]
    if None not in numbers and len({int(n) for n in numbers}) == len(numbers):
        by_number = np.argsort([int(n) for n in numbers], kind="stable")
        steps = np.diff(depth[by_number])
        if np.all(steps > 0) or np.all(steps < 0):
            return [slices[i] for i in by_number]
        why = "InstanceNumber order is not the order of the slice positions"
    else:
        lacking = sum(n is None for n in numbers)
        why = f"{lacking} slice(s) lack InstanceNumber" if lacking else "InstanceNumber repeats across slices"
    warnings.warn(f"{path}: {why}; the slices are stacked by their position along the slice normal "
                  "(ImagePositionPatient), as dcm2niix and ITK stack them", stacklevel=4)
    return [slices[i] for i in np.argsort(depth, kind="stable")]


# ----------------------------------------------------------------------------- layouts


def discover_cases(source: str | Path) -> list[CaseRecord]:
    """Find the cases of an MSD folder, an nnU-Net raw folder, a plain image folder or a CSV/JSONL manifest."""
    source = Path(source).expanduser()
    if source.is_file():
        if source.suffix.lower() in (".csv", ".jsonl"):
            records = _from_manifest(source)
        else:
            raise ValueError(f"{source}: expected a folder or a .csv/.jsonl manifest (columns case_id,image[,label])")
    elif not source.is_dir():
        raise FileNotFoundError(f"{source}: no such file or directory")
    elif (source / "dataset.json").exists() and "training" in _read_json(source / "dataset.json"):
        records = _from_msd(source)
    elif (source / "imagesTr").is_dir() or (source / "imagesTs").is_dir():
        records = _from_images_tr(source)
    else:
        records = _from_plain_folder(source)
    if not records:
        raise ValueError(f"{source}: no cases found (looked for {', '.join(IMAGE_SUFFIXES)} files or DICOM folders)")
    _check_records(records, source)
    return records


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e


def _from_msd(root: Path) -> list[CaseRecord]:
    """Medical Segmentation Decathlon: dataset.json lists training {image, label} dicts and test image paths."""
    meta = _read_json(root / "dataset.json")
    records, unlabeled = [], []
    for i, entry in enumerate(meta.get("training", [])):
        if not isinstance(entry, dict) or "image" not in entry:
            raise ValueError(f"{root / 'dataset.json'}: training[{i}] should be {{'image': ..., 'label': ...}}")
        image = (root / entry["image"]).resolve()
        label = (root / entry["label"]).resolve() if entry.get("label") else None
        records.append(CaseRecord(_strip_suffix(image.name), str(image), str(label) if label else None))
        if label is None:
            unlabeled.append(f"training[{i}] {records[-1].case_id}")
    n = len(records)
    if unlabeled and len(unlabeled) < n:  # as _warn_unmatched: none labeled at all is an unlabeled set
        warnings.warn(f"{root / 'dataset.json'}: no label for {len(unlabeled)} of the {n} training entries "
                      f"({', '.join(unlabeled[:5])}{', ...' if len(unlabeled) > 5 else ''}: 'label' missing or "
                      "null); they are unlabeled cases, left out of fine-tuning", stacklevel=3)
    for entry in meta.get("test", []):
        image = (root / (entry["image"] if isinstance(entry, dict) else entry)).resolve()
        records.append(CaseRecord(_strip_suffix(image.name), str(image), None))
    return records


def _from_images_tr(root: Path) -> list[CaseRecord]:
    """nnU-Net raw (imagesTr/CASE_0000.nii.gz + labelsTr/CASE.nii.gz) or an MSD-style folder without dataset.json."""
    records = []
    for images_dir, labels_dir in (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs")):
        names, label_files = _by_stem(root / images_dir), _by_stem(root / labels_dir)
        channels: dict[str, list[str]] = {}
        for stem in names:
            m = re.fullmatch(r"(.+)_(\d{4})", stem)
            case, channel = (m.group(1), m.group(2)) if m else (stem, None)
            channels.setdefault(case, []).append(channel or "")
        for case, chans in sorted(channels.items()):
            if chans != [""] and sorted(chans) != ["0000"]:
                raise ValueError(
                    f"{root / images_dir}: case {case!r} has channels {sorted(chans)}; "
                    "nnynet expects exactly one CT channel per case (_0000)"
                )
            image = names[case + ("_0000" if chans == ["0000"] else "")]
            label = label_files.get(case)
            records.append(CaseRecord(case, str(image.resolve()), str(label.resolve()) if label else None))
        labels = set(label_files)
        _warn_unmatched(root / images_dir, root / labels_dir, set(channels), labels)
    return records


def _warn_unmatched(images_dir: Path, labels_dir: Path, cases: set[str], labels: set[str]) -> None:
    """Some cases labeled and some not is usually a misnamed file: say which, since training silently uses
    only the labeled ones."""
    if not labels:
        return  # no labels at all: an unlabeled set (imagesTs, pretraining data)
    unlabeled, orphans = sorted(cases - labels), sorted(labels - cases)
    if unlabeled:
        warnings.warn(f"{labels_dir}: no label for {len(unlabeled)} of the {len(cases)} image(s) in {images_dir} "
                      f"({', '.join(unlabeled[:5])}{', ...' if len(unlabeled) > 5 else ''}); they are unlabeled cases, "
                      "left out of fine-tuning", stacklevel=3)
    if orphans:
        warnings.warn(f"{labels_dir}: {len(orphans)} label(s) without an image in {images_dir} "
                      f"({', '.join(orphans[:5])}{', ...' if len(orphans) > 5 else ''}); they are ignored",
                      stacklevel=3)


def _from_plain_folder(root: Path) -> list[CaseRecord]:
    """Every image file (and every DICOM series sub-folder) is one unlabeled case."""
    records = [CaseRecord(stem, str(f.resolve())) for stem, f in _by_stem(root).items()]
    records += [CaseRecord(d.name, str(d.resolve())) for d in sorted(root.iterdir()) if _is_dicom_dir(d)]
    return records


def _from_manifest(path: Path) -> list[CaseRecord]:
    """CSV or JSONL rows with case_id, image[, label]; relative paths are relative to the manifest."""
    if path.suffix.lower() == ".csv":
        try:  # utf-8-sig: a spreadsheet's byte-order mark would otherwise become part of the first column name
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e}); expected a UTF-8 CSV") from e
        header = text.split("\n", 1)[0]
        delimiter = max(",;\t", key=header.count)  # spreadsheets in many locales save with ";"
        rows = list(csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter))
    else:
        rows = []
        for i, line in enumerate(path.read_text().splitlines()):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {i + 1} is not valid JSON ({e})") from e
    records = []
    for i, row in enumerate(rows):
        # stripped: " 007" would never match the clinical table, which strips its ids
        row = {k: "" if v is None else str(v).strip() for k, v in row.items() if k is not None}
        if not row.get("case_id") or not row.get("image"):
            raise ValueError(f"{path}: row {i + 1} needs non-empty 'case_id' and 'image' columns, got {row}")
        image = (path.parent / row["image"]).resolve()
        label = (path.parent / row["label"]).resolve() if row.get("label") else None
        records.append(CaseRecord(row["case_id"], str(image), str(label) if label else None))
    return records


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    # hidden files are skipped: macOS "._case.nii.gz" resource forks (shipped in the MSD archives) are not images
    return sorted(f for f in folder.iterdir()
                  if f.is_file() and not f.name.startswith(".") and f.name.lower().endswith(IMAGE_SUFFIXES))


def _by_stem(folder: Path) -> dict[str, Path]:
    """The folder's image files by case name (suffix stripped). Two files with one name ("c0.nii" beside
    "c0.nii.gz", a half-finished conversion) are refused by name: silently taking either could train on the
    stale copy."""
    out: dict[str, Path] = {}
    for f in _image_files(folder):
        stem = _strip_suffix(f.name)
        if stem in out:
            raise ValueError(f"{folder}: {out[stem].name} and {f.name} are both case {stem!r}; "
                             "expected one image file per case (remove or rename one)")
        out[stem] = f
    return out


def _file_key(path: str) -> tuple[int, int] | str:
    """Identity of a file: (device, inode), so that links and other spellings of one path compare equal."""
    try:
        st = os.stat(path)
        return (st.st_dev, st.st_ino)
    except OSError:
        return os.path.realpath(path)


def _check_records(records: Sequence[CaseRecord], source: Path) -> None:
    seen: set[str] = set()
    owners: dict[tuple[str, tuple[int, int] | str], str] = {}
    for r in records:
        if r.case_id in seen:
            raise ValueError(f"{source}: case id {r.case_id!r} appears more than once")
        seen.add(r.case_id)
        for kind, p in (("image", r.image), ("label", r.label)):
            if p is not None and not Path(p).exists():
                raise FileNotFoundError(f"{source}: {kind} of case {r.case_id!r} not found: {p}")
        if r.label is not None and Path(r.label).resolve() == Path(r.image).resolve():
            raise ValueError(f"{source}: case {r.case_id!r} has the same file as image and label ({r.image}); "
                             "expected a separate label volume")
        for kind, p in (("image", r.image), ("label", r.label)):
            if p is None:
                continue
            other = owners.setdefault((kind, _file_key(p)), r.case_id)
            if other != r.case_id:  # one scan under two ids lands in training and validation at once
                raise ValueError(f"{source}: cases {other!r} and {r.case_id!r} have the same {kind} file ({p}); "
                                 f"expected one {kind} per case (a duplicated row?)")


# ----------------------------------------------------------------------------- clinical table

# The clinical table is read by nny_models.clinical (one vocabulary for training and inference).
from nny_models.clinical import KINDS as COLUMN_TYPES, read_clinical_csv  # noqa: E402,F401  (re-export)
