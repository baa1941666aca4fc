import json

import nibabel as nib
import numpy as np
import pytest

from nny_models.io import CaseRecord, discover_cases, load_volume, read_clinical_csv, read_header

AFFINE = np.array([[-0.8, 0, 0, 100.0], [0, -0.7, 0, 80.0], [0, 0, 2.5, -30.0], [0, 0, 0, 1]])


def write_nifti(path, shape=(12, 10, 6), affine=AFFINE, seed=0, label=False):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 3, shape).astype(np.uint8) if label else rng.normal(0, 100, shape).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return data


def test_load_nifti_returns_float32_and_affine(tmp_path):
    data = write_nifti(tmp_path / "ct.nii.gz")
    array, affine = load_volume(tmp_path / "ct.nii.gz")
    assert array.dtype == np.float32 and array.shape == data.shape
    np.testing.assert_allclose(array, data, rtol=1e-6)
    np.testing.assert_allclose(affine, AFFINE, atol=1e-5)


def write_dicom_series(folder, volume, spacing=(0.8, 0.7, 2.5), origin=(-100.0, -120.0, 30.0)):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True)
    series, study, frame = generate_uid(), generate_uid(), generate_uid()
    for k in reversed(range(volume.shape[2])):  # written out of order on purpose
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.PatientID, ds.InstanceNumber = "CT", "p", k + 1
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.PixelSpacing, ds.SliceThickness = [spacing[1], spacing[0]], spacing[2]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + k * spacing[2]]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = (volume[:, :, k].T + 1024).astype(np.int16).tobytes()
        ds.save_as(str(folder / f"IM{k:04d}.dcm"), enforce_file_format=True)
    assert pydicom  # imported above for the skip


def test_load_dicom_series(tmp_path):
    volume = np.random.default_rng(0).integers(-1000, 1000, (6, 5, 4)).astype(np.float32)
    write_dicom_series(tmp_path / "series", volume)
    array, affine = load_volume(tmp_path / "series")
    np.testing.assert_array_equal(array, volume)
    # LPS (DICOM) -> RAS: x and y flip sign
    np.testing.assert_allclose(np.diag(affine)[:3], [-0.8, -0.7, 2.5], atol=1e-6)
    np.testing.assert_allclose(affine[:3, 3], [100.0, 120.0, 30.0], atol=1e-6)
    shape, spacing = read_header(tmp_path / "series")
    assert list(shape) == [6, 5, 4]
    np.testing.assert_allclose(spacing, [0.8, 0.7, 2.5])


def test_load_nrrd_needs_pynrrd_or_reads(tmp_path):
    path = tmp_path / "ct.nrrd"
    try:
        import nrrd
    except ImportError:
        path.write_bytes(b"NRRD0004\n")
        with pytest.raises(ImportError, match="pip install pynrrd"):
            load_volume(path)
        return
    data = np.random.default_rng(0).normal(size=(5, 4, 3)).astype(np.float32)
    nrrd.write(str(path), data, {"space": "left-posterior-superior", "space directions": np.diag([1.0, 1.0, 2.0])})
    array, affine = load_volume(path)
    np.testing.assert_allclose(array, data)
    np.testing.assert_allclose(np.diag(affine)[:3], [-1.0, -1.0, 2.0])


def test_bad_volumes(tmp_path):
    write_nifti(tmp_path / "ok.nii.gz", shape=(40, 40, 20))
    raw = (tmp_path / "ok.nii.gz").read_bytes()
    (tmp_path / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="truncated.nii.gz"):
        load_volume(tmp_path / "truncated.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.float32), np.eye(4)), str(tmp_path / "flat.nii.gz"))
    with pytest.raises(ValueError, match=r"flat.nii.gz.*expected a 3D volume"):
        load_volume(tmp_path / "flat.nii.gz")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="unsupported format"):
        load_volume(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError):
        load_volume(tmp_path / "missing.nii.gz")


def test_discover_msd(tmp_path):
    for i in range(2):
        write_nifti(tmp_path / "imagesTr" / f"liver_{i}.nii.gz")
        write_nifti(tmp_path / "labelsTr" / f"liver_{i}.nii.gz", label=True)
    write_nifti(tmp_path / "imagesTs" / "liver_9.nii.gz")
    meta = {
        "labels": {"0": "background", "1": "liver"},
        "training": [{"image": f"./imagesTr/liver_{i}.nii.gz", "label": f"./labelsTr/liver_{i}.nii.gz"} for i in range(2)],
        "test": ["./imagesTs/liver_9.nii.gz"],
    }
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    records = discover_cases(tmp_path)
    assert [r.case_id for r in records] == ["liver_0", "liver_1", "liver_9"]
    assert records[0].label == str((tmp_path / "labelsTr" / "liver_0.nii.gz").resolve())
    assert records[2].label is None


def test_discover_nnunet_raw(tmp_path):
    for case in ("ab_001", "ab_002"):
        write_nifti(tmp_path / "imagesTr" / f"{case}_0000.nii.gz")
        write_nifti(tmp_path / "labelsTr" / f"{case}.nii.gz", label=True)
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "file_ending": ".nii.gz"}))
    records = discover_cases(tmp_path)
    assert [r.case_id for r in records] == ["ab_001", "ab_002"]
    assert records[1].image.endswith("ab_002_0000.nii.gz") and records[1].label.endswith("labelsTr/ab_002.nii.gz")
    write_nifti(tmp_path / "imagesTr" / "ab_001_0001.nii.gz")
    with pytest.raises(ValueError, match="one CT channel"):
        discover_cases(tmp_path)


def test_discover_plain_folder_and_manifests(tmp_path):
    write_nifti(tmp_path / "scans" / "b.nii.gz")
    write_nifti(tmp_path / "scans" / "a.nii")
    assert [r.case_id for r in discover_cases(tmp_path / "scans")] == ["a", "b"]
    write_nifti(tmp_path / "masks" / "a.nii.gz", label=True)

    (tmp_path / "m.csv").write_text("case_id,image,label\nA,scans/a.nii,masks/a.nii.gz\nB,scans/b.nii.gz,\n")
    records = discover_cases(tmp_path / "m.csv")
    assert records == [
        CaseRecord("A", str((tmp_path / "scans/a.nii").resolve()), str((tmp_path / "masks/a.nii.gz").resolve())),
        CaseRecord("B", str((tmp_path / "scans/b.nii.gz").resolve()), None),
    ]
    (tmp_path / "m.jsonl").write_text('{"case_id": "A", "image": "scans/a.nii"}\n\n{"case_id": "B", "image": "scans/b.nii.gz"}\n')
    assert [r.case_id for r in discover_cases(tmp_path / "m.jsonl")] == ["A", "B"]
    (tmp_path / "bad.csv").write_text("case_id,image\nA,scans/nope.nii.gz\n")
    with pytest.raises(FileNotFoundError, match="nope.nii.gz"):
        discover_cases(tmp_path / "bad.csv")
    (tmp_path / "dup.csv").write_text("case_id,image\nA,scans/a.nii\nA,scans/b.nii.gz\n")
    with pytest.raises(ValueError, match="more than once"):
        discover_cases(tmp_path / "dup.csv")


def test_read_clinical_csv_types_join_and_errors(tmp_path):
    path = tmp_path / "clinical.csv"
    path.write_text("case_id,age,sex,cirrhosis,afp,ecog\nc1,61,M,yes,12.5,0\nc2,70,F,no,,1\nc3,,M,,300,0\n")
    df = read_clinical_csv(path, case_ids=["c1", "c2", "c3", "c4"])
    assert df.attrs["column_types"] == {
        "age": "numeric", "sex": "categorical", "cirrhosis": "boolean", "afp": "numeric", "ecog": "numeric",
    }
    assert list(df.index) == ["c1", "c2", "c3", "c4"]
    assert df.loc["c1", "age"] == 61.0 and np.isnan(df.loc["c3", "age"]) and df["age"].isna().loc["c4"]
    assert bool(df.loc["c1", "cirrhosis"]) is True and bool(df.loc["c2", "cirrhosis"]) is False
    assert str(df["sex"].dtype) == "category"

    # a declared type wins over the inferred one
    df2 = read_clinical_csv(path, column_types={"cirrhosis": "categorical", "ecog": "boolean"})
    assert df2.attrs["column_types"]["cirrhosis"] == "categorical" and str(df2["cirrhosis"].dtype) == "category"
    assert df2["ecog"].tolist() == [False, True, False]

    with pytest.raises(ValueError, match=r"clinical.csv.*row 4.*'c3'.*not one of the 2 cases"):
        read_clinical_csv(path, case_ids=["c1", "c2"])
    with pytest.raises(ValueError, match=r"clinical.csv.*row 2.*'c1'.*column 'sex': expected a number, got 'M'"):
        read_clinical_csv(path, column_types={"sex": "numeric"})

    typo = tmp_path / "typo.csv"
    typo.write_text("case_id,afp\n" + "".join(f"c{i},{i * 3.5}\n" for i in range(8)) + "c8,12;5\n")
    with pytest.raises(ValueError, match=r"typo.csv.*row 10.*'c8'.*column 'afp'.*'12;5' is not a number"):
        read_clinical_csv(typo)
    with pytest.raises(ValueError, match="no id column 'patient'"):
        read_clinical_csv(path, id_column="patient")


def test_read_header_does_not_decode_voxels(tmp_path, monkeypatch):
    write_nifti(tmp_path / "c.nii.gz", shape=(12, 10, 6))
    import nibabel.arrayproxy

    def boom(*a, **k):
        raise AssertionError("voxel data was decoded")

    monkeypatch.setattr(nibabel.arrayproxy.ArrayProxy, "__array__", boom)
    monkeypatch.setattr(nibabel.arrayproxy.ArrayProxy, "_get_scaled", boom)
    assert list(read_header(tmp_path / "c.nii.gz")[0]) == [12, 10, 6]


@pytest.mark.parametrize("layout", ["plain", "imagesTr", "labelsTr"])
def test_two_files_with_one_case_name_are_refused_by_name(tmp_path, layout):
    # "c0.nii" beside "c0.nii.gz" (a conversion left half done): either could be the stale copy
    if layout == "plain":
        write_nifti(tmp_path / "c0.nii.gz")
        write_nifti(tmp_path / "c0.nii", seed=1)
    else:
        write_nifti(tmp_path / "imagesTr" / "c0_0000.nii.gz")
        write_nifti(tmp_path / "labelsTr" / "c0.nii.gz", label=True)
        folder, stem = ("imagesTr", "c0_0000") if layout == "imagesTr" else ("labelsTr", "c0")
        write_nifti(tmp_path / folder / f"{stem}.nii", label=layout == "labelsTr")
    with pytest.raises(ValueError, match=r"\.nii and .*\.nii\.gz are both case"):
        discover_cases(tmp_path)
