"""Tests of the procedural CT phantoms: anatomy labels, HU ranges, determinism, clinical rows, writer, CLI."""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from nny_models.phantoms import generate_phantom, write_dataset
from nny_models.phantoms.clinical import COLUMNS, bclc, child_pugh
from nny_models.phantoms.dataset import case_seed

SEEDS = list(range(10))


@pytest.fixture(scope="module")
def cases():
    return [generate_phantom(s) for s in SEEDS]


def test_all_labels_present_and_shapes(cases):
    for c in cases:
        assert c.image.dtype == np.float32 and c.label.dtype == np.uint8
        assert c.image.shape == c.label.shape and max(c.image.shape) <= 160 and c.image.shape[2] <= 80
        assert set(np.unique(c.label)) == {0, 1, 2, 3, 4}, c.case_id
        assert 2.0 <= c.spacing[0] <= 3.0 and 3.0 <= c.spacing[2] <= 5.0
        np.testing.assert_allclose(np.diag(c.affine)[:3], c.spacing)


@pytest.mark.parametrize("label,lo,hi,erode", [(1, 90, 130, True), (2, 30, 80, False), (3, 150, 200, False),
                                               (4, 150, 200, True)])
def test_hu_median_per_label(cases, label, lo, hi, erode):
    for c in cases:
        m = c.label == label
        if erode and ndimage.binary_erosion(m).sum() > 20:
            m = ndimage.binary_erosion(m)
        med = float(np.median(c.image[m]))
        assert lo <= med <= hi, (c.case_id, label, med)


def test_air_fat_bone_present(cases):
    c = cases[0]
    assert abs(float(np.median(c.image[:3, :3, :])) + 1000) < 40  # corners are air
    body = np.stack([ndimage.binary_fill_holes(m) for m in np.moveaxis(c.image > -500, 2, 0)], axis=2)
    assert ((c.image > -140) & (c.image < -60))[body].mean() > 0.1  # plenty of fat
    assert (c.image > 300).sum() > 500 and c.image.max() > 600  # cortical bone
    assert ((c.image < -700) & body).sum() > 1000  # lung bases and bowel gas inside the body


def test_tumors_inside_liver(cases):
    fractions = []
    for c in cases:
        tumor = c.label == 2
        comp, n = ndimage.label(tumor)
        for i in range(1, n + 1):
            t = comp == i
            shell = ndimage.binary_dilation(t) & ~t
            in_liver = np.isin(c.label[shell], (1, 2, 3)).mean()
            assert in_liver > 0.4, (c.case_id, i, in_liver)  # some lesions bulge from the surface
            fractions.append(in_liver)
    assert np.mean(fractions) > 0.75


def test_determinism():
    a, b, other = generate_phantom(7), generate_phantom(7), generate_phantom(8)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    assert a.clinical_complete == b.clinical_complete
    assert a.image.shape != other.image.shape or not np.array_equal(a.image, other.image)
    unlabeled = generate_phantom(7, labeled=False)
    assert unlabeled.label is None and np.array_equal(unlabeled.image, a.image)


def test_clinical_rows_match_anatomy(cases):
    rows = [c.clinical_complete for c in cases]
    for c, r in zip(cases, rows):
        assert list(r) == COLUMNS and r["case_id"] == c.case_id
        n = ndimage.label(c.label == 2)[1]
        assert r["tumor_count"] == n
        assert 8 <= r["largest_tumor_mm"] <= 130
        liver_ml = np.isin(c.label, (1, 2)).sum() * np.prod(c.spacing) / 1000
        assert 0.8 * r["liver_volume_ml"] < liver_ml <= r["liver_volume_ml"] * 1.01
        assert r["child_pugh"] == child_pugh(r["bilirubin_mg_dl"], r["albumin_g_dl"], r["inr"], r["ascites"],
                                             r["encephalopathy"])
        assert r["bclc_stage"] == bclc(r["tumor_count"], r["largest_tumor_mm"], r["child_pugh"], r["ecog_ps"])
    vol = np.array([r["liver_volume_ml"] for r in rows])
    cirr = np.array([r["cirrhosis"] for r in rows]) == 1
    assert 0 < cirr.sum() < len(rows) and vol[cirr].mean() < vol[~cirr].mean()
    # AFP rises with tumor burden (rank correlation over the cases).
    afp = pd.Series([r["afp_ng_ml"] for r in rows])
    burden = pd.Series([r["tumor_count"] * r["largest_tumor_mm"] for r in rows])
    assert afp.corr(burden, method="spearman") > 0
    # Missing values: some, never the case id.
    blank = [pd.isna(c.clinical[k]) for c in cases for k in COLUMNS[1:]]
    assert 0.03 < np.mean(blank) < 0.25 and not any(pd.isna(c.clinical["case_id"]) for c in cases)


def test_rules():
    assert child_pugh(1.0, 4.0, 1.0, "none", "none") == "A"
    assert child_pugh(2.5, 3.0, 1.8, "mild", "none") == "B"
    assert child_pugh(4.0, 2.5, 2.5, "moderate", "grade 1-2") == "C"
    assert bclc(1, 15, "A", 0) == "0" and bclc(3, 25, "B", 0) == "A" and bclc(4, 50, "A", 0) == "B"
    assert bclc(1, 30, "A", 1) == "C" and bclc(1, 30, "C", 0) == "D"


def test_write_dataset_layout(tmp_path):
    out = write_dataset(tmp_path / "ds", cases=2, seed=3, workers=2)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["labels"]["1"] == "liver" and meta["labels"]["4"] == "aorta" and meta["numTraining"] == 2
    assert meta["clinical"] == "clinical.csv"
    assert meta["training"][0] == {"image": "./imagesTr/phantom_000.nii.gz", "label": "./labelsTr/phantom_000.nii.gz"}
    ref = generate_phantom(case_seed(3, 1), case_id="phantom_001")
    img = nib.load(out / meta["training"][1]["image"])
    lab = nib.load(out / meta["training"][1]["label"])
    assert img.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
    np.testing.assert_allclose(np.sqrt((img.affine[:3, :3] ** 2).sum(0)), ref.spacing, rtol=1e-5)
    np.testing.assert_allclose(img.header.get_zooms(), ref.spacing, rtol=1e-5)
    assert np.array_equal(np.asarray(img.dataobj), ref.image.astype(np.int16))  # workers=2 is deterministic too
    assert np.array_equal(np.asarray(lab.dataobj), ref.label)
    df = pd.read_csv(out / "clinical.csv", index_col="case_id")
    assert list(df.index) == ["phantom_000", "phantom_001"] and list(df.columns) == COLUMNS[1:]


def test_unlabeled_and_cli(tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "nny_models.phantoms", "--out", str(out), "--cases", "1", "--seed", "1",
           "--unlabeled", "--preview"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["training"] == [{"image": "./imagesTr/phantom_000.nii.gz"}]
    assert not (out / "labelsTr").exists() and (out / "imagesTr" / "phantom_000.nii.gz").exists()
    assert (out / "preview.png").stat().st_size > 10_000
    bad = subprocess.run([sys.executable, "-m", "nny_models.phantoms", "--out", str(out), "--preset", "huge"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "huge" in bad.stderr
