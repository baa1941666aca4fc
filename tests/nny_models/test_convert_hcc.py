"""nnynet-convert hcc-tace-seg on a CT DICOM series + DICOM-SEG written here from a phantom.

Voxels, labels, spacing and orientation must come back exactly; a SEG referencing a CT series that is not
in the source folder must stop the conversion with a clear error.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.sr.codedict import codes  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

from nny_models.convert import main as convert_main  # noqa: E402
from nny_models.convert.hcc_tace_seg import DEFAULT_COLUMNS, ConversionError, convert  # noqa: E402
from nny_models.io import discover_cases, read_clinical_csv  # noqa: E402
from nny_models.phantoms import generate_phantom  # noqa: E402

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
# Segment labels as TCIA spells them, in mixed case: matching must ignore case.
SEGMENTS = [("LIVER", (1, 2)), ("Mass", (2,)), ("Portal vein", (3,)), ("abdominal aorta", (4,))]


@pytest.fixture(scope="module")
def phantom():
    case = generate_phantom(7, preset="test")
    volume = np.rint(case.image).astype(np.int16)  # DICOM stores integers (slope 1, intercept -1024)
    label = np.asarray(case.label, dtype=np.uint8)
    # An anisotropic RAS affine with a round spacing (DICOM DS holds 16 characters) and an off-centre origin.
    affine = np.array([[0.75, 0, 0, -24.5], [0, 0.8125, 0, 13.25], [0, 0, 2.5, -60.0], [0, 0, 0, 1]])
    assert set(np.unique(label)) >= {1, 2, 3, 4}
    return volume, label, affine


def ct_datasets(volume: np.ndarray, affine: np.ndarray, patient: str, series_uid: str | None = None) -> list[Dataset]:
    """One CT slice per z, geometry from the RAS affine (converted to DICOM's LPS)."""
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    sx, sy = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    study, series, frame = generate_uid(), series_uid or generate_uid(), generate_uid()
    out = []
    for k in range(volume.shape[2]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = patient, "Test^Patient", "19500101", "M"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20200101", "120000", "1", "A1"
        ds.ReferringPhysicianName, ds.Manufacturer, ds.Modality = "", "test", "CT"
        ds.SeriesNumber, ds.InstanceNumber = 2, k + 1
        ds.ImageOrientationPatient = [*(lps[:3, 0] / sx).tolist(), *(lps[:3, 1] / sy).tolist()]
        ds.ImagePositionPatient = (lps[:3, 3] + k * lps[:3, 2]).tolist()
        ds.PixelSpacing = [float(sy), float(sx)]  # between rows, between columns
        ds.SliceThickness = float(np.linalg.norm(lps[:3, 2]))
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = (volume[:, :, k].T.astype(np.int32) + 1024).astype(np.int16).tobytes()
        out.append(ds)
    return out


def seg_dataset(sources: list[Dataset], label: np.ndarray) -> Dataset:
    masks = np.stack([np.isin(label, values) for _, values in SEGMENTS], axis=-1).transpose(2, 1, 0, 3)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i + 1, segment_label=name,
            segmented_property_category=codes.SCT.Tissue, segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for i, (name, _) in enumerate(SEGMENTS)
    ]  # fmt: skip
    return hd.seg.Segmentation(
        source_images=sources, pixel_array=masks, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=generate_uid(), series_number=300,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="test", manufacturer_model_name="test",
        software_versions="0", device_serial_number="0",
    )  # fmt: skip


def clinical_sheet(path: Path, patients: list[str]) -> None:
    """A spreadsheet with the published headers the default mapping reads (valid values for every column)."""
    spec = json.loads(DEFAULT_COLUMNS.read_text())
    row = {spec["id_column"]: None}
    for col in spec["columns"].values():
        row[col["source"]] = next(iter(col["values"])) if col.get("values") else "7"
    row["hepatitis"], row["Sex"], row["BCLC"], row["AFP"] = "HBV only", "2", "Stage-B", "1431.8"
    row["OS"] = "350.2"  # an outcome column: must not reach clinical.csv
    import pandas as pd

    pd.DataFrame([{**row, spec["id_column"]: p} for p in patients]).to_csv(path, index=False)


def write_source(root: Path, phantom, *, seg_refers_elsewhere: bool = False) -> None:
    volume, label, affine = phantom
    ct = ct_datasets(volume, affine, "HCC_001")
    # Series order on disk is shuffled: the converter must sort slices by position.
    for i, ds in enumerate(ct[::-1]):
        (root / "HCC_001" / "CT").mkdir(parents=True, exist_ok=True)
        ds.save_as(root / "HCC_001" / "CT" / f"{i:03d}.dcm", enforce_file_format=True)
    # A second, unrelated CT series of the patient (another phase) that the SEG does not reference.
    other = ct_datasets(volume[:, :, :8], affine, "HCC_001")
    (root / "HCC_001" / "CT_other").mkdir(parents=True)
    for i, ds in enumerate(other):
        ds.save_as(root / "HCC_001" / "CT_other" / f"{i:03d}.dcm", enforce_file_format=True)
    sources = ct_datasets(volume, affine, "HCC_001") if seg_refers_elsewhere else ct
    (root / "HCC_001" / "SEG").mkdir(parents=True)
    seg_dataset(sources, label).save_as(root / "HCC_001" / "SEG" / "1-1.dcm")
    clinical_sheet(root / "HCC-TACE-Seg_clinical_data-V2.csv", ["HCC_001", "HCC_002"])


def test_round_trip_is_exact(tmp_path, phantom, capsys):
    volume, label, affine = phantom
    write_source(tmp_path / "src", phantom)
    assert convert_main(["hcc-tace-seg", str(tmp_path / "src"), str(tmp_path / "dst")]) == 0

    image_nii = nib.load(tmp_path / "dst" / "imagesTr" / "HCC_001.nii.gz")
    label_nii = nib.load(tmp_path / "dst" / "labelsTr" / "HCC_001.nii.gz")
    np.testing.assert_array_equal(np.asarray(image_nii.dataobj), volume)
    # Liver segment = liver + tumor (overlapping, as drawn here); the tumor label wins the overlap.
    np.testing.assert_array_equal(np.asarray(label_nii.dataobj), label)
    for img in (image_nii, label_nii):
        np.testing.assert_allclose(img.affine, affine, atol=1e-6)
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    assert image_nii.get_data_dtype() == np.int16 and label_nii.get_data_dtype() == np.uint8

    meta = json.loads((tmp_path / "dst" / "dataset.json").read_text())
    assert meta["labels"] == {"0": "background", "1": "liver", "2": "tumor", "3": "portal_vein", "4": "aorta"}
    records = discover_cases(tmp_path / "dst")  # the stages read the result
    assert [(r.case_id, Path(r.label).name) for r in records] == [("HCC_001", "HCC_001.nii.gz")]
    table = read_clinical_csv(tmp_path / "dst" / "clinical.csv", case_ids=["HCC_001"])
    row = table.loc["HCC_001"]
    assert row["sex"] == "F" and row["hepatitis_b"] == 1 and row["hepatitis_c"] == 0 and row["bclc_stage"] == "B"
    assert row["afp_ng_ml"] == pytest.approx(1431.8) and "OS" not in table.columns


def test_seg_referencing_another_series_is_an_error(tmp_path, phantom, capsys):
    write_source(tmp_path / "src", phantom, seg_refers_elsewhere=True)
    with pytest.raises(ConversionError, match=r"1-1\.dcm: references CT series .* which is not under"):
        convert(tmp_path / "src", tmp_path / "dst")
    assert convert_main(["hcc-tace-seg", str(tmp_path / "src"), str(tmp_path / "dst2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "references CT series" in err[0]


def test_unknown_segment_and_bad_cells_are_errors(tmp_path, phantom):
    write_source(tmp_path / "src", phantom)
    mapping = tmp_path / "segments.json"
    mapping.write_text(json.dumps({"labels": ["background", "liver", "tumor", "portal_vein", "aorta"],
                                   "segments": {"liver": ["liver"], "tumor": ["mass"], "aorta": ["abdominal aorta"]}}))
    with pytest.raises(ConversionError, match=r"segment 3 \('Portal vein'\) matches no label"):
        convert(tmp_path / "src", tmp_path / "dst", segments=mapping)
    mapping.write_text(json.dumps({"labels": ["background", "liver", "tumor", "portal_vein", "aorta"],
                                   "segments": {"liver": ["liver"], "tumor": ["mass"], "aorta": ["abdominal aorta"]},
                                   "ignore": ["portal vein"]}))
    convert(tmp_path / "src", tmp_path / "dst_ok", segments=mapping)
    label = np.asarray(nib.load(tmp_path / "dst_ok" / "labelsTr" / "HCC_001.nii.gz").dataobj)
    assert 3 not in np.unique(label) and 4 in np.unique(label)

    sheet = tmp_path / "src" / "HCC-TACE-Seg_clinical_data-V2.csv"
    sheet.write_text(sheet.read_text().replace("Stage-B", "Stage-Q"))
    with pytest.raises(ConversionError, match=r"patient HCC_001, column 'BCLC': value 'Stage-Q'"):
        convert(tmp_path / "src", tmp_path / "dst_bad")
    assert not list((tmp_path / "dst_bad").rglob("*.*"))  # nothing half-converted left behind
