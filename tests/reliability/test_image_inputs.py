"""Issue 11, image geometry and the CT intensity check.

- A NIfTI with pixdim 0 and no sform/qform used to run at 1 mm (nibabel "fixes" the header silently; liver
  Dice 0.24). Zero, negative or absurd spacings are now a ValueError naming the file and the header field.
- A header claiming 4000^3 voxels is refused from the header, before allocation (was "MemoryError: ").
- The CT check looks at the histogram modes (nny_models.hu_check): a real HU crop without air passes, an MR
  shifted or scaled into the HU range and uint8 images are refused, and force=True (--force) runs anyway
  with a warning.
"""

from __future__ import annotations

import inspect
import struct
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from nny_models.config import PreprocessConfig
from nny_models.hu_check import check_ct_volume, hu_problems
from nny_models.io import MAX_VOLUME_BYTES, load_volume, read_header
from nny_models.phantoms import generate_phantom
from nny_models.preprocessing import preprocess_volume

# byte offsets in a NIfTI-1 header
DIM, PIXDIM, QFORM_CODE, SFORM_CODE = 40, 76, 252, 254


def write_nifti(path: Path, *, pixdim=None, sform=None, qform=None, dims=None, affine=None) -> Path:
    """A small CT-like .nii whose raw header fields are then overwritten as given (what nibabel won't write)."""
    volume = np.full((16, 16, 12), -1000.0, np.float32)
    volume[3:13, 3:13, 2:10] = 40.0
    nib.save(nib.Nifti1Image(volume, np.diag([0.8, 0.8, 2.5, 1.0]) if affine is None else affine), str(path))
    raw = bytearray(path.read_bytes())
    if pixdim is not None:
        raw[PIXDIM + 4 : PIXDIM + 16] = struct.pack("<3f", *pixdim)
    if qform is not None:
        raw[QFORM_CODE : QFORM_CODE + 2] = struct.pack("<h", qform)
    if sform is not None:
        raw[SFORM_CODE : SFORM_CODE + 2] = struct.pack("<h", sform)
    if dims is not None:
        raw[DIM + 2 : DIM + 8] = struct.pack("<3h", *dims)
    path.write_bytes(bytes(raw))
    return path


# ----------------------------------------------------------------------------- geometry


def test_pixdim_zero_without_sform_or_qform_is_refused(tmp_path):
    path = write_nifti(tmp_path / "p0.nii", pixdim=(0, 0, 0), sform=0, qform=0)
    assert np.allclose(np.diag(nib.load(path).affine)[:3], [-1, 1, 1]), "nibabel turns pixdim 0 into 1 mm"
    for read in (load_volume, read_header):
        with pytest.raises(ValueError, match=r"p0\.nii: header pixdim\[1:4\] = \[0\.0, 0\.0, 0\.0\] with no sform or qform"):
            read(path)


def test_pixdim_zero_with_qform_only_and_negative_pixdim_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"q0\.nii: header pixdim\[1:4\] = \[0\.0, 0\.8, 2\.5\] with no sform"):
        load_volume(write_nifti(tmp_path / "q0.nii", pixdim=(0, 0.8, 2.5), sform=0, qform=1))
    with pytest.raises(ValueError, match=r"neg\.nii: header pixdim\[1:4\] = \[-0\.8, 0\.8, 2\.5\]"):
        load_volume(write_nifti(tmp_path / "neg.nii", pixdim=(-0.8, 0.8, 2.5), sform=0, qform=0))


@pytest.mark.parametrize("diag, why", [((1e-5, 0.8, 2.5), "1e-05"), ((0.8, 0.8, 500.0), "500.0")])
def test_absurd_sform_spacing_is_refused(tmp_path, diag, why):
    path = write_nifti(tmp_path / "absurd.nii", affine=np.diag([*diag, 1.0]))
    with pytest.raises(ValueError, match=rf"absurd\.nii: voxel spacing \(.*{why}.*\) mm from the NIfTI header \(sform\)"):
        load_volume(path)


def test_plausible_headers_still_load(tmp_path):
    volume, affine = load_volume(write_nifti(tmp_path / "ok.nii"))  # sform written by nibabel
    assert volume.shape == (16, 16, 12) and np.allclose(np.diag(affine)[:3], [0.8, 0.8, 2.5])
    # no sform (nibabel writes no qform either), but positive pixdim: the spacing is known, so it is accepted
    with pytest.warns(UserWarning, match="neither an sform nor a qform"):  # with a word on the orientation
        _, affine = load_volume(write_nifti(tmp_path / "qform.nii", sform=0))
    assert np.allclose(np.abs(np.diag(affine)[:3]), [0.8, 0.8, 2.5])


def test_a_header_without_sform_and_qform_loads_with_an_orientation_warning(tmp_path):
    """Analyze-style headers (both codes 0) loaded silently; tools disagree on their axes, and keep_side decides
    the liver by the patient's right."""
    import warnings

    path = write_nifti(tmp_path / "analyze.nii", sform=0, qform=0)
    with pytest.warns(UserWarning, match=r"analyze\.nii: the NIfTI header has neither an sform nor a qform .* "
                                         r"reads the axes as nibabel does \(LAS\)"):
        volume, affine = load_volume(path)
    assert volume.shape == (16, 16, 12) and np.allclose(np.abs(np.diag(affine)[:3]), [0.8, 0.8, 2.5])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an sform, or a qform alone, states the orientation: silent
        load_volume(write_nifti(tmp_path / "ok.nii"))
        load_volume(write_nifti(tmp_path / "qform.nii", sform=0, qform=1))


def test_array_input_with_absurd_affine_is_refused():
    volume = np.full((16, 16, 12), 40.0, np.float32)
    with pytest.raises(ValueError, match=r"input image \(affine\): voxel spacing .* implausible"):
        preprocess_volume(volume, np.diag([1e-4, 1.0, 1.0, 1.0]), PreprocessConfig())


def test_volume_too_large_once_resampled_is_refused_before_allocation():
    """50 mm voxels (cm taken for mm) at a 2.5 mm model spacing: MONAI's resampling asked for 44 GiB and the
    allocator's RuntimeError reached the user as an internal error."""
    volume = np.full((80, 80, 40), 40.0, np.float32)
    cfg = PreprocessConfig(spacing=(2.5, 2.5, 3.0))
    with pytest.raises(ValueError, match=r"scan\.nii: resampling shape \(80, 80, 40\) at voxel size \(50\.0, 50\.0, "
                                         r"50\.0\) mm .* 4000 x 4000 x 2000 mm\) .* GiB as float32\), above the limit"):
        preprocess_volume(volume, np.diag([50.0, 50.0, 50.0, 1.0]), cfg, "scan.nii")
    x, _ = preprocess_volume(volume, np.diag([5.0, 5.0, 5.0, 1.0]), cfg, "scan.nii")  # 400 x 400 x 200 mm: fine
    assert x.shape[1:] == (159, 159, 66)  # MONAI keeps the first and last voxel centres


def test_huge_header_is_refused_before_allocation(tmp_path):
    path = write_nifti(tmp_path / "huge.nii", dims=(4000, 4000, 4000))
    with pytest.raises(ValueError, match=r"huge\.nii: the header claims shape \(4000, 4000, 4000\) .* 238\.4 GiB"):
        load_volume(path)
    assert MAX_VOLUME_BYTES == 2 * 1024**3
    with pytest.raises(ValueError, match=r"ok\.nii: the header claims shape \(16, 16, 12\)"):
        load_volume(write_nifti(tmp_path / "ok.nii"), max_bytes=1000)  # the limit is a parameter


def test_nrrd_with_zero_spacing_is_refused(tmp_path):
    nrrd = pytest.importorskip("nrrd")
    path = tmp_path / "flat.nrrd"
    nrrd.write(str(path), np.zeros((8, 8, 8), np.float32),
               {"space": "left-posterior-superior", "space directions": np.diag([0.8, 0.0, 2.5])})
    with pytest.raises(ValueError, match=r"flat\.nrrd: .*(spacing|singular)"):
        load_volume(path)


def test_plain_folder_and_missing_pydicom(tmp_path, monkeypatch):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"notes: a folder without DICOM files"):
        load_volume(folder)
    series = tmp_path / "series"
    series.mkdir()
    (series / "IM0001.dcm").write_bytes(b"\0" * 132)
    monkeypatch.setitem(__import__("sys").modules, "pydicom", None)  # "import pydicom" now fails
    with pytest.raises(ImportError, match=r"series: reading a DICOM series needs pydicom.*pip install 'nnynet\[dicom\]'"):
        load_volume(series)


# ----------------------------------------------------------------------------- the CT check


def _phantoms():
    kinds = [{}]
    if "randomization" in inspect.signature(generate_phantom).parameters:
        kinds.append({"randomization": "ood"})  # arterial / delayed phases, more noise, cut-off FOVs
        kinds.append({"randomization": "unenhanced"})  # non-contrast scans, fatty livers down to 10 HU
    return [generate_phantom(seed, **kw) for kw in kinds for seed in range(3)]


@pytest.fixture(scope="module")
def phantoms():
    return _phantoms()


def no_air_liver_crop(case) -> np.ndarray:
    """A box around liver voxels with no voxel below -200 HU but some fat (like the issue's min -132 HU crop)."""
    liver = np.argwhere(case.label == 1)
    shape = np.array(case.image.shape)
    for size in ((48, 48, 16), (40, 40, 12), (32, 32, 10), (24, 24, 10), (16, 16, 8)):
        size = np.minimum(size, shape)
        for centre in liver[:: max(len(liver) // 400, 1)]:
            lo = np.clip(centre - size // 2, 0, shape - size)
            crop = case.image[tuple(slice(a, a + n) for a, n in zip(lo, size))]
            if -200 < crop.min() < -50:
                return crop
    raise AssertionError(f"{case.case_id}: no air-free crop found")


def mr_like(seed: int = 0, shape=(64, 64, 48)) -> np.ndarray:
    """Smooth positive MR-like intensities: body 100-1400 with a bias field, Rician background near 0."""
    rng = np.random.default_rng(seed)
    x, y, _ = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    body = (x / 0.85) ** 2 + (y / 0.7) ** 2 < 1
    smooth = ndimage.gaussian_filter(rng.normal(size=shape), 4)
    tissue = 100 + 1100 * (smooth - smooth.min()) / np.ptp(smooth)
    image = ndimage.gaussian_filter(np.where(body, tissue * (1 + 0.3 * x), 0.0), 1.0)
    return (image + np.abs(rng.normal(0, 15, shape) + 1j * rng.normal(0, 15, shape))).astype(np.float32)


def test_phantoms_and_their_crops_pass(phantoms):
    for case in phantoms:
        image, (nx, ny, nz) = case.image, case.image.shape
        crop = no_air_liver_crop(case)
        assert -200 < crop.min() < -50, crop.min()  # fat but no air, as in the issue
        variants = {
            "full": image,
            "liver crop without air": crop,
            "partial FOV (centre, upper half)": image[nx // 4 : 3 * nx // 4, ny // 4 : 3 * ny // 4, nz // 2 :],
            "10 slices at the top": image[:, :, -10:],
            "non-contrast (enhancement halved)": np.where((image > 0) & (image < 300), image * 0.5 + 10, image),
            "arterial (vessels to 300-500 HU)": np.where((image > 150) & (image < 300), image * 1.8, image),
            "low dose (+40 HU noise)": image + np.random.default_rng(0).normal(0, 40, image.shape).astype(np.float32),
        }
        for name, volume in variants.items():
            assert hu_problems(volume) == [], (case.case_id, name, hu_problems(volume))
            check_ct_volume(volume, name)


@pytest.mark.parametrize("seed", [0, 2])
@pytest.mark.parametrize("transform", [
    "raw", "minus 1000", "minus 800", "minus 500", "minus 300", "into [-1000, 3000]", "2x minus 1024",
    "1.5x minus 900",
])
def test_mr_shifted_or_scaled_into_hu_is_refused(transform, seed):
    mr = mr_like(seed)
    volume = {
        "raw": mr,
        "minus 1000": mr - 1000,
        "minus 800": mr - 800,
        "minus 500": mr - 500,
        "minus 300": mr - 300,
        "into [-1000, 3000]": (mr - mr.min()) / np.ptp(mr) * 4000 - 1000,
        "2x minus 1024": 2 * mr - 1024,
        "1.5x minus 900": 1.5 * mr - 900,
    }[transform]
    with pytest.raises(ValueError, match=r"mr\.nii\.gz: does not look like a CT in Hounsfield units .*--force"):
        check_ct_volume(volume, "mr.nii.gz")


def test_uint8_and_other_non_hu_images_are_refused():
    rng = np.random.default_rng(0)
    for volume, why in [
        (rng.integers(0, 256, (32, 32, 32)).astype(np.uint8), "dtype uint8 cannot hold Hounsfield units"),
        (rng.integers(0, 256, (32, 32, 32)).astype(np.float32), "no air"),  # a uint8 file read as float
        (rng.random((32, 32, 32)).astype(np.float32), "no air"),  # [0, 1]
        (np.full((32, 32, 32), -1000.0, np.float32), "no tissue"),
    ]:
        with pytest.raises(ValueError, match=why):
            check_ct_volume(volume, "scan")


def test_force_turns_the_refusal_into_a_warning(phantoms):
    mr = mr_like() - 1000
    with pytest.warns(UserWarning, match=r"mr: does not look like a CT .*Running anyway \(--force\)"):
        check_ct_volume(mr, "mr", force=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a CT gives no warning with force either
        check_ct_volume(phantoms[0].image, "ct", force=True)
    with pytest.raises(ValueError, match="NaN"):  # force covers the intensity test only
        check_ct_volume(np.full((16, 16, 16), np.nan, np.float32), "nan", force=True)


# ----------------------------------------------------------------------------- missing slices

@pytest.mark.parametrize("fill, where", [
    (-1000.0, [20]),  # one slice of air
    (-3024.0, [18, 19, 20]),  # three slices of a scanner's padding value
    (0.0, [25]),  # a slice of zeros: all "tissue", but one value throughout
])
def test_blank_slices_inside_the_body_are_refused(phantoms, fill, where):
    """A slice missing from a series and filled in used to run: the network cut every organ there (a held-out
    phantom with every 7th slice set to air kept 58 % of its liver voxels, exit code 0)."""
    volume = phantoms[0].image.copy()
    volume[:, :, where] = fill
    first, last = where[0], where[-1]
    span = str(first) if first == last else f"{first}-{last}"
    with pytest.raises(ValueError, match=rf"scan: {len(where)} axial slice\(s\) inside the body are blank .*axis 2, "
                                         rf"index {span}\. .*To use it as it is, rerun with --force"):
        check_ct_volume(volume, "scan")
    with pytest.warns(UserWarning, match=r"inside the body are blank .*Running anyway \(--force\)"):
        check_ct_volume(volume, "scan", force=True)


def test_the_axial_axis_comes_from_the_affine_and_other_planes_may_be_air(phantoms):
    image = phantoms[0].image
    lying = np.moveaxis(image, 2, 0).copy()  # stored z-first; the affine says so
    lying[30] = -1000.0
    affine = np.array([[0, 0, 1.5, 0], [0, 1.5, 0, 0], [2.5, 0, 0, 0], [0, 0, 0, 1.0]])
    with pytest.raises(ValueError, match=r"axis 0, index 30\."):
        check_ct_volume(lying, "scan", affine=affine)
    # a sagittal or coronal plane of air inside the body's extent (between an arm and the trunk) is anatomy
    sagittal = image.copy()
    sagittal[image.shape[0] // 2] = -1000.0
    check_ct_volume(sagittal, "scan", affine=np.diag([1.5, 1.5, 2.5, 1.0]))
    # air above the head or below the feet lies at the ends, not inside
    ends = image.copy()
    ends[:, :, :3] = -1000.0
    ends[:, :, -2:] = -3024.0
    check_ct_volume(ends, "scan")
