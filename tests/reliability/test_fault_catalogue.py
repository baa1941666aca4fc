"""Fault-injection catalogue of user inputs: each test is one input that used to fail badly.

DICOM series (MONAI's PydicomReader stacks every DICOM file of the folder in InstanceNumber order and takes
one slice step from the first and last positions): a missing slice, uneven steps, two series in one folder,
slices numbered out of position order, a slice without InstanceNumber (skipped silently) and a gantry tilt
all loaded with a wrong grid and predicted with exit code 0, and so did a series with Modality MR. They are
now refused by nny_models.io, naming the folder, the slice files and the tag (rounded positions still load),
except the numbering faults: slices numbered out of position order, twice or not at all stack by position.
A README next to the slices is ignored, as the reader ignores it (it was a refusal), an enhanced multi-frame
file is named as such, and MONAI's GPU-decoder log line no longer precedes the one-line error on stderr.

NIfTI voxel types: a complex NIfTI lost its imaginary part silently (exit 0); an RGB one failed with a numpy
dtype error. Both are refused by name. A ValueError from a third-party reader (a corrupt NRRD header) now
names the file. A NIfTI whose name misstates its compression (plain as .nii.gz, gzipped as .nii) was refused as
incomplete; it is read by its content with a warning, as ITK-based tools read it.

Case discovery: a manifest with a byte-order mark, ";" separators or padded ids, a case whose label is its
own image, macOS "._" resource forks in imagesTr (in the MSD archives), and images without labels (left out
of fine-tuning without a word) in an nnU-Net folder. A label of 0.9999s says that its voxels are not whole
numbers (it said "expected integer class labels in 0..255, got values in [0.0, 0.9999]").
"""

from __future__ import annotations

import logging
import re
import subprocess
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from nny_models.config import PreprocessConfig
from nny_models.io import discover_cases, load_volume

pydicom = pytest.importorskip("pydicom")
hub = pytest.importorskip("nny_models.hub")
cli = pytest.importorskip("nny_models.cli")

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid  # noqa: E402

AFFINE = np.diag([1.5, 1.5, 4.0, 1.0])
SPACING = (1.5, 1.5, 4.0)


def ct(shape=(40, 36, 12)) -> np.ndarray:
    """Air around a soft-tissue body with a bone block: passes the HU check."""
    v = np.full(shape, -1000.0, np.float32)
    v[4:-4, 4:-4, 2:-2] = 50.0
    v[12:24, 10:20, 4:8] = 250.0
    return v


def ct_slice(study: str, series: str, frame: str) -> "Dataset":
    """The header every CT slice of a test series shares: file meta, SOP class and instance, the series' UIDs."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
    ds.Modality, ds.PatientID = "CT", "p"
    return ds


def write_series(folder: Path, volume: np.ndarray, *, z=None, shift=None, orientation=None, numbers=None,
                 prefix: str = "IM", drop: tuple[str, int] | None = None) -> Path:
    """One CT slice per z. z: each slice's position along the normal (mm); shift: each slice's in-plane
    offset (mm, a gantry tilt); orientation: each slice's ImageOrientationPatient; numbers: InstanceNumbers;
    drop: (tag, slice) removed from that slice."""
    folder.mkdir(parents=True, exist_ok=True)
    nz = volume.shape[2]
    z = [k * SPACING[2] for k in range(nz)] if z is None else z
    uids = generate_uid(), generate_uid(), generate_uid()  # study, series, frame of reference
    for k in range(nz):
        ds = ct_slice(*uids)
        ds.InstanceNumber = (numbers or range(1, nz + 1))[k]
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.PixelSpacing, ds.SliceThickness = [SPACING[1], SPACING[0]], SPACING[2]
        iop = orientation[k] if orientation else [1, 0, 0, 0, 1, 0]
        ds.ImageOrientationPatient = list(iop)
        normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
        dx, dy = shift[k] if shift else (0.0, 0.0)
        ds.ImagePositionPatient = [float(p) for p in np.array([-30.0 + dx, -30.0 + dy, 0.0]) + normal * z[k]]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = (volume[:, :, k].T + 1024).astype(np.int16).tobytes()
        if drop is not None and drop[1] == k:
            delattr(ds, drop[0])
        ds.save_as(str(folder / f"{prefix}{k:04d}.dcm"), enforce_file_format=True)
    return folder


def refused(path: Path, *words: str) -> str:
    with pytest.raises(ValueError) as err:
        load_volume(path)
    message = str(err.value)
    assert message.startswith(f"{path}: "), message
    for word in words:
        assert word in message, (word, message)
    return message


# ----------------------------------------------------------------------------- DICOM series


def test_dicom_missing_slice_is_refused_naming_the_gap(tmp_path):
    z = [k * 4.0 for k in range(6)] + [k * 4.0 for k in range(7, 13)]  # the slice at 24 mm is missing
    series = write_series(tmp_path / "s", ct(), z=z)
    refused(series, "uneven slice spacing", "8 mm between IM0005.dcm and IM0006.dcm", "4 mm elsewhere")


def test_dicom_uneven_steps_are_refused(tmp_path):
    z = [0.0, 4.0, 8.0, 12.0, 15.0, 18.0, 21.0, 24.0, 27.0, 30.0, 33.0, 36.0]
    refused(write_series(tmp_path / "s", ct(), z=z), "uneven slice spacing", "expected a constant spacing")


def test_dicom_two_series_in_one_folder_are_refused(tmp_path):
    folder = write_series(tmp_path / "s", ct())
    write_series(folder, ct((40, 36, 10)), prefix="B")
    refused(folder, "mixes 2 series", "(CT, 12 files)", "(CT, 10 files)", "own folder")


def test_dicom_gantry_tilt_is_refused(tmp_path):
    tilt = np.tan(np.radians(20.0)) * 4.0
    series = write_series(tmp_path / "s", ct(), shift=[(0.0, k * tilt) for k in range(12)])
    refused(series, "20.0 degrees off the slice normal", "gantry tilt")


@pytest.mark.parametrize("numbers, drop, why", [
    ([3, 1, 2, *range(4, 13)], None, "InstanceNumber order is not the order of the slice positions"),
    ([5, 1, 12, 2, 9, 3, 11, 4, 10, 6, 8, 7], None, "InstanceNumber order is not the order of the slice positions"),
    ([1, 2, 2, *range(4, 13)], None, "InstanceNumber repeats across slices"),
    (None, ("InstanceNumber", 4), "1 slice(s) lack InstanceNumber"),
])
def test_dicom_slices_numbered_out_of_position_order_stack_by_position(tmp_path, numbers, drop, why):
    """The reader stacks by InstanceNumber, so these used to load scrambled (exit 0), then were refused; they now
    stack by position along the slice normal, as dcm2niix does, with a warning that says why."""
    volume = ct()
    volume[:, :, 5] = 400.0  # one slice that must land at its own position
    series = write_series(tmp_path / "s", volume, numbers=numbers, drop=drop)
    with pytest.warns(UserWarning, match=re.escape(why)):
        array, affine = load_volume(series)
    np.testing.assert_array_equal(array, volume)
    expected = load_volume(write_series(tmp_path / "ordered", volume))[1]
    np.testing.assert_allclose(affine, expected, atol=1e-6)


def test_dicom_slice_without_a_position_is_refused(tmp_path):
    series = write_series(tmp_path / "s", ct(), drop=("ImagePositionPatient", 4))
    refused(series, "1 slice(s) lack ImagePositionPatient (e.g. IM0004.dcm)")


def test_dicom_mixed_orientations_name_the_tag(tmp_path):
    coronal = [1, 0, 0, 0, 0, -1]
    series = write_series(tmp_path / "s", ct(), orientation=[[1, 0, 0, 0, 1, 0]] * 6 + [coronal] * 6)
    refused(series, "ImageOrientationPatient differs between slices", "IM0006.dcm")


def test_dicom_folder_with_a_readme_and_sagittal_or_reversed_stacks_load(tmp_path):
    series = write_series(tmp_path / "s", ct())
    (series / "README.txt").write_text("exported by the PACS\n")
    array, affine = load_volume(series)
    np.testing.assert_array_equal(array, ct())
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), SPACING)
    # a sagittal stack (slices along x) keeps its geometry; slices numbered against the position also load
    sagittal = write_series(tmp_path / "sag", ct(), orientation=[[0, 1, 0, 0, 0, -1]] * 12)
    np.testing.assert_allclose(load_volume(sagittal)[1][:3, 2], [4.0, 0.0, 0.0], atol=1e-6)
    reverse = write_series(tmp_path / "rev", ct(), z=[-4.0 * k for k in range(12)])
    np.testing.assert_allclose(load_volume(reverse)[1][:3, 2], [0.0, 0.0, -4.0], atol=1e-6)


def test_dicom_positions_rounded_to_a_hundredth_load(tmp_path):
    z = [round(k * 0.625, 2) for k in range(12)]  # 0.62, 1.25, 1.88, ...: steps of 0.62 and 0.63 mm
    array, affine = load_volume(write_series(tmp_path / "s", ct(), z=z))
    np.testing.assert_allclose(affine[2, 2], 6.88 / 11, atol=1e-6)


def run_main(capsys, *args: str) -> subprocess.CompletedProcess:
    code = cli.main(["--device", "cpu", *args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def input_warnings(stderr: str) -> str:
    """stderr without predict's warning about the size of the liver it found: the untrained model_dir finds a few
    mL of 'liver' in these toy scans, which says nothing about the input handling tested here."""
    return "\n".join(line for line in stderr.splitlines() if "mL of liver found" not in line)


def test_predict_on_dicom_is_one_line_and_refuses_a_missing_slice(model_dir, tmp_path, capsys, caplog):
    good = write_series(tmp_path / "good", ct())
    out = tmp_path / "good_mask.nii.gz"
    with caplog.at_level(logging.WARNING):
        result = run_main(capsys, "--model", str(model_dir), "--input", str(good), "--output", str(out))
    assert result.returncode == 0 and input_warnings(result.stderr) == "", result.stderr
    assert not [r for r in caplog.records if "nvImageCodec" in r.getMessage()]  # printed before every error line
    assert nib.load(out).shape == (40, 36, 12)

    z = [k * 4.0 for k in range(6)] + [k * 4.0 for k in range(7, 13)]
    gap = write_series(tmp_path / "gap", ct(), z=z)
    out = tmp_path / "gap_mask.nii.gz"
    result = run_main(capsys, "--model", str(model_dir), "--input", str(gap), "--output", str(out))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"nnynet-predict: error: --input '{gap}'") and "uneven slice spacing" in lines[0]
    assert not out.exists()


# ----------------------------------------------------------------------------- NIfTI / NRRD files


def test_complex_and_rgb_nifti_are_refused(tmp_path):
    path = tmp_path / "complex.nii.gz"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nib.save(nib.Nifti1Image(ct().astype(np.complex64) + 1j, AFFINE, dtype=np.complex64), str(path))
    refused(path, "voxel type complex64", "expected real-valued CT voxels")
    rgb = np.zeros((40, 36, 12), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    path = tmp_path / "rgb.nii.gz"
    nib.save(nib.Nifti1Image(rgb, AFFINE), str(path))
    refused(path, "NIfTI datatype 128", "is not a grayscale intensity")


def test_nifti_whose_name_misstates_its_compression_is_read_by_content(model_dir, tmp_path, capsys):
    """A plain NIfTI named .nii.gz was refused as "not a gzip file; is the file complete?", and a gzipped one named
    .nii failed as a bad header; ITK-based tools open both by content. They now load, with a warning naming the
    file and the right suffix."""
    import gzip

    good = tmp_path / "good.nii"
    nib.save(nib.Nifti1Image(ct(), AFFINE), str(good))
    plain_as_gz, gz_as_plain = tmp_path / "plain.nii.gz", tmp_path / "packed.nii"
    plain_as_gz.write_bytes(good.read_bytes())
    gz_as_plain.write_bytes(gzip.compress(good.read_bytes()))
    for path, words in ((plain_as_gz, "not compressed although its name ends in .nii.gz"),
                        (gz_as_plain, "gzip-compressed although its name ends in .nii;")):
        with pytest.warns(UserWarning, match=re.escape(f"{path}: the file is {words}")):
            array, affine = load_volume(path)
        np.testing.assert_array_equal(array, ct())
        np.testing.assert_allclose(affine, AFFINE)
    truncated = tmp_path / "truncated.nii"  # a truncated gzip still says what it is
    truncated.write_bytes(gzip.compress(good.read_bytes())[:200])
    refused(truncated, "could not read the volume", "is the file complete?")

    out = tmp_path / "mask.nii.gz"
    result = run_main(capsys, "--model", str(model_dir), "--input", str(plain_as_gz), "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert input_warnings(result.stderr).strip() == (
        f"warning: {plain_as_gz}: the file is not compressed although its name ends in .nii.gz; read by its content "
        "(rename it to .nii)")
    assert nib.load(out).shape == ct().shape


def test_corrupt_nrrd_header_names_the_file(tmp_path):
    pytest.importorskip("nrrd")
    path = tmp_path / "ct.nrrd"
    path.write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes 40 36 12\n\n")  # "sizes" lost its colon
    refused(path, "could not read the volume (ValueError")


def test_nrrd_with_a_one_element_list_axis_first_loads(tmp_path):
    nrrd = pytest.importorskip("nrrd")
    directions = np.array([[np.nan] * 3, [1.5, 0, 0], [0, 1.5, 0], [0, 0, 4.0]])
    header = {"space": "left-posterior-superior", "space directions": directions,
              "kinds": ["list", "domain", "domain", "domain"]}
    path = tmp_path / "ct.nrrd"
    nrrd.write(str(path), ct()[None], header, index_order="F")  # (1, X, Y, Z): 3D, like NIfTI's (X, Y, Z, 1)
    array, affine = load_volume(path)
    np.testing.assert_array_equal(array, ct())
    np.testing.assert_allclose(np.diag(affine), [-1.5, -1.5, 4.0, 1.0])
    nrrd.write(str(path), np.stack([ct(), ct()]), header, index_order="F")  # two images: still refused
    refused(path, "expected a 3D volume", "got shape (2, 40, 36, 12)")


# ----------------------------------------------------------------------------- case discovery


def write_nifti(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, AFFINE), str(path))
    return path


def test_manifest_with_bom_semicolons_and_padded_ids(tmp_path):
    write_nifti(tmp_path / "img" / "007.nii.gz", ct((16, 16, 8)))
    write_nifti(tmp_path / "lab" / "007.nii.gz", np.zeros((16, 16, 8), np.uint8))
    manifest = tmp_path / "cases.csv"
    manifest.write_bytes("\ufeffcase_id;image;label\r\n 007 ;img/007.nii.gz; lab/007.nii.gz\r\n".encode())
    [record] = discover_cases(manifest)
    assert record.case_id == "007"
    assert record.image == str((tmp_path / "img" / "007.nii.gz").resolve())
    assert record.label == str((tmp_path / "lab" / "007.nii.gz").resolve())


def test_label_that_is_its_own_image_is_refused(tmp_path):
    write_nifti(tmp_path / "a.nii.gz", ct((16, 16, 8)))
    manifest = tmp_path / "cases.csv"
    manifest.write_text("case_id,image,label\na,a.nii.gz,./a.nii.gz\n")
    with pytest.raises(ValueError, match="case 'a' has the same file as image and label"):
        discover_cases(manifest)


def test_nnunet_folder_resource_forks_and_unlabeled_images(tmp_path):
    for case in ("c0", "c1", "c2"):
        write_nifti(tmp_path / "imagesTr" / f"{case}_0000.nii.gz", ct((16, 16, 8)))
    for case in ("c0", "c2", "c9"):  # c1 unlabeled (misnamed?), c9 has no image
        write_nifti(tmp_path / "labelsTr" / f"{case}.nii.gz", np.zeros((16, 16, 8), np.uint8))
    (tmp_path / "imagesTr" / "._c0_0000.nii.gz").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    (tmp_path / "labelsTr" / "._c0.nii.gz").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    with pytest.warns(UserWarning) as caught:
        records = discover_cases(tmp_path)
    assert [(r.case_id, r.label is not None) for r in records] == [("c0", True), ("c1", False), ("c2", True)]
    messages = [str(w.message) for w in caught]
    assert any("no label for 1 of the 3 image(s)" in m and "(c1)" in m for m in messages), messages
    assert any("1 label(s) without an image" in m and "(c9)" in m for m in messages), messages


def test_dicom_series_that_is_not_a_ct_or_is_multi_frame_is_named(tmp_path):
    series = write_series(tmp_path / "mr", ct())
    for f in series.iterdir():
        ds = pydicom.dcmread(f)
        ds.Modality = "MR"
        ds.save_as(f)
    refused(series, "Modality 'MR'", "expected a CT series")
    frames = write_series(tmp_path / "enhanced", ct()[:, :, :1])
    ds = pydicom.dcmread(frames / "IM0000.dcm")
    ds.NumberOfFrames = 12
    ds.save_as(frames / "IM0000.dcm")
    refused(frames, "found 1 (IM0000.dcm is one multi-frame object of 12 frames", "dcm2niix")


def test_fractional_label_names_the_voxels(tmp_path):
    from nny_models.preprocessing import preprocess_case

    image = write_nifti(tmp_path / "ct.nii.gz", ct((32, 32, 12)))
    label = np.zeros((32, 32, 12), np.float32)
    label[8:20, 8:20, 3:9] = 0.9999  # a label resampled with linear interpolation
    label_path = write_nifti(tmp_path / "seg.nii.gz", label)
    with pytest.raises(ValueError, match=r"seg.nii.gz: 864 voxel\(s\) are not whole numbers \(e.g. 0.9999\)"):
        preprocess_case(image, label_path, PreprocessConfig(spacing=(3.0, 3.0, 4.0)), num_classes=2)


# ----------------------------------------------------------------------------- clinical files and planning


def test_clinical_csv_with_semicolons_or_a_bom_reads_its_columns(tmp_path):
    """A ';' CSV read as commas was one column: every value imputed as missing, with only a warning."""
    from nny_models.clinical import read_clinical_csv, read_clinical_row

    row = tmp_path / "row.csv"
    row.write_text("\ufeffcase_id;age;sex\nc0;61;M\n", encoding="utf-8")
    assert read_clinical_row(str(row), case_id="c0") == {"case_id": "c0", "age": "61", "sex": "M"}
    table = tmp_path / "clinical.csv"
    table.write_text("case_id\tage\nc0\t61\nc1\t70\n")
    df = read_clinical_csv(table)
    assert list(df.columns) == ["age"] and df.loc["c1", "age"] == 70.0
    js = tmp_path / "row.json"
    js.write_text('\ufeff{"case_id": "c0", "age": 61}', encoding="utf-8")
    assert read_clinical_row(str(js), case_id="c0")["age"] == 61


def test_semicolon_clinical_csv_reads_decimal_commas_as_numbers(tmp_path):
    """The locales that save ";" write 12,5 for 12.5: read as text, AFP became a categorical column."""
    from nny_models.clinical import read_clinical_csv, read_clinical_row

    path = tmp_path / "clinical.csv"
    path.write_text("case_id;afp;note\nc0;12,5;a,b\nc1;-3,25;x\n")
    df = read_clinical_csv(path)
    assert df.attrs["column_types"]["afp"] == "numeric" and df.loc["c1", "afp"] == -3.25
    assert df.loc["c0", "note"] == "a,b"  # only whole-cell numbers change
    assert read_clinical_row(str(path), case_id="c0")["afp"] == "12.5"


def test_clinical_csv_with_a_repeated_column_is_refused(tmp_path):
    from nny_models.clinical import read_clinical_csv, read_clinical_row

    path = tmp_path / "clinical.csv"
    path.write_text("case_id,age,age\nc0,61,62\n")
    for read in (lambda: read_clinical_csv(path), lambda: read_clinical_row(str(path), case_id="c0")):
        with pytest.raises(ValueError, match=r"\['age'\] appear more than once"):
            read()


@pytest.mark.parametrize("fault", ["affine", "fractional"])
def test_planning_checks_each_label_against_its_image(tmp_path, fault):
    """nnynet-plan sampled foreground HU through a label on another grid, or of interpolated values."""
    from nny_models.planning import plan_dataset

    for d in ("imagesTr", "labelsTr"):
        (tmp_path / d).mkdir()
    image = ct()
    label = (image > 0).astype(np.float32)
    label_affine = AFFINE.copy()
    if fault == "affine":
        label_affine[0, 3] = 12.0  # shifted by 8 voxels
    else:
        label[label > 0] = 0.9999
    nib.save(nib.Nifti1Image(image, AFFINE), tmp_path / "imagesTr" / "c0_0000.nii.gz")
    nib.save(nib.Nifti1Image(label, label_affine), tmp_path / "labelsTr" / "c0.nii.gz")
    with pytest.raises(ValueError, match="label affine differs" if fault == "affine" else "not whole numbers") as err:
        plan_dataset(tmp_path)
    assert "c0.nii.gz" in str(err.value)
    assert "\n" not in str(err.value)  # one line, naming both grids
    if fault == "affine":
        assert "image RAS 1.5x1.5x4 mm at (0, 0, 0), label RAS 1.5x1.5x4 mm at (12, 0, 0)" in str(err.value)


@pytest.mark.parametrize("flip", [True, False])
def test_nifti_whose_sform_and_qform_disagree_is_read_by_its_sform_with_a_warning(tmp_path, flip):
    img = nib.Nifti1Image(ct(), AFFINE)
    qform = AFFINE.copy()
    if flip:
        qform[0, 0] = -qform[0, 0]  # the qform mirrors left and right
    else:
        qform[:3, 3] = (5.0, 0.0, 0.0)  # the qform moves the origin
    img.set_qform(qform, code=1)
    img.set_sform(AFFINE, code=1)
    path = tmp_path / "forms.nii.gz"
    nib.save(img, path)
    with pytest.warns(UserWarning, match="axis directions" if flip else "other origins") as record:
        _, affine = load_volume(path)
    assert str(path) in str(record[0].message)
    np.testing.assert_allclose(affine, AFFINE)
    with warnings.catch_warnings():  # agreeing forms: no warning
        warnings.simplefilter("error")
        nib.save(nib.Nifti1Image(ct(), AFFINE), tmp_path / "ok.nii.gz")
        load_volume(tmp_path / "ok.nii.gz")
