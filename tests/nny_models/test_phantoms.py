"""Tests of the procedural CT phantoms: anatomy labels, HU ranges, determinism, clinical rows, writer, CLI."""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

import dataclasses

from nny_models.phantoms import PHASE_HU, RANDOMIZATIONS, Randomization, generate_phantom, write_dataset
from nny_models.phantoms.clinical import COLUMNS, bclc, child_pugh
from nny_models.phantoms.dataset import case_seed

SEEDS = list(range(10))


@pytest.fixture(scope="module")
def cases():
    return [generate_phantom(s) for s in SEEDS]


def test_all_labels_present_and_shapes(cases):
    for c in cases:
        assert c.image.dtype == np.float32 and c.label.dtype == np.uint8
        assert c.image.shape == c.label.shape and max(c.image.shape) <= 160 and c.image.shape[2] <= 120
        tumors = c.appearance["tumor_kinds"]
        assert set(np.unique(c.label)) == ({0, 1, 2, 3, 4} if tumors else {0, 1, 3, 4}), c.case_id
        assert 2.0 <= c.spacing[0] <= 3.0 and 2.5 <= c.spacing[2] <= 6.0
        assert c.spacing[2] == pytest.approx(max(2.5, c.appearance["slice_thickness_mm"]), abs=0.01)
        np.testing.assert_allclose(np.abs(np.diag(c.affine)[:3]), c.spacing)
    phases = {c.appearance["phase"] for c in cases}
    assert len(phases) >= 3 and phases <= set(PHASE_HU)  # 10 cases span at least 3 of the 4 phases


def test_anatomy_is_on_the_patients_sides_in_ras(cases, tmp_path):
    """The liver lies on the patient's right and the aorta just left of the midline, in the files' RAS world
    and on the RAS grid the models train on (the phantoms were once a mirror image of a patient: a model trained
    on them looked for the liver where a real CT has the spleen)."""
    from nny_models.config import PreprocessConfig
    from nny_models.preprocessing import preprocess_case

    for c in cases[:4]:
        assert nib.aff2axcodes(c.affine) == ("L", "A", "S")  # x runs towards the patient's left, like a DICOM
        world = {lab: nib.affines.apply_affine(c.affine, np.argwhere(c.label == lab).mean(0)) for lab in (1, 4)}
        assert world[1][0] > 20 and world[4][0] < 0, (c.case_id, world)  # RAS: +x = the patient's right
    write_dataset(tmp_path / "ds", 1, seed=3)
    case = preprocess_case(tmp_path / "ds/imagesTr/phantom_000.nii.gz", tmp_path / "ds/labelsTr/phantom_000.nii.gz",
                           PreprocessConfig())
    label = case["label"][0]
    x_liver, x_aorta = (np.argwhere(label == lab)[:, 0].mean() for lab in (1, 4))
    assert x_liver > x_aorta + 10  # on the RAS grid the index grows towards the patient's right


def test_lesion_count_and_size_ranges():
    from nny_models.phantoms.tumors import sample_count, sample_diameters

    rng, rand = np.random.default_rng(0), RANDOMIZATIONS["train"]
    counts = np.array([sample_count(rng, int(rng.integers(1, 7)), rand) for _ in range(2000)])
    assert 0.07 < (counts == 0).mean() < 0.13 and counts.max() == 10 and (counts > 6).any()  # 0-10, some none
    d = np.concatenate([sample_diameters(rng, 5, rand) for _ in range(400)])
    assert 3.0 <= d.min() < 4.0 and 55 < d.max() <= 60.0 and (d < 10).mean() > 0.15


@pytest.mark.parametrize("label,key,margin,erode", [(1, "liver", 12, True), (3, "pv", 20, False), (4, "aorta", 20, True)])
def test_hu_median_per_label_matches_the_phase(cases, label, key, margin, erode):
    for c in cases:
        m = c.label == label
        if erode and ndimage.binary_erosion(m).sum() > 20:
            m = ndimage.binary_erosion(m)
        lo, hi = PHASE_HU[c.appearance["phase"]][key]
        if key == "liver":  # a fatty liver sits lower by the HU it lost
            lo, hi = lo - c.appearance["steatosis_hu"], hi - c.appearance["steatosis_hu"]
        med = float(np.median(c.image[m]))
        assert lo - margin - (10 if key == "liver" else 0) <= med <= hi + margin, (c.case_id, label, med)


def test_tumor_density_relative_to_liver():
    """hypo / hyper lesions are darker / brighter than the liver around them."""
    rand = dataclasses.replace(RANDOMIZATIONS["train"], no_tumor_prob=0.0, tumor_diameter_mm=(25.0, 50.0),
                               rim_prob=0.0, capsule_prob=0.0, necrosis_prob=0.0, noise_hu=(8.0, 8.0))
    for kind, sign in (("hypo", -1), ("hyper", 1)):
        c = generate_phantom(3, randomization=dataclasses.replace(rand, tumor_kinds=(kind,), tumor_kind_probs=(1.0,)))
        assert set(c.appearance["tumor_kinds"]) == {kind}
        tumor = ndimage.binary_erosion(c.label == 2)
        liver = ndimage.binary_erosion(c.label == 1, iterations=2)
        diff = float(np.median(c.image[tumor]) - np.median(c.image[liver]))
        assert sign * diff > 12, (kind, diff)


def test_a_fatty_liver_changes_only_the_liver_and_what_is_drawn_relative_to_it():
    normal, fatty = (generate_phantom(4, preset="test", randomization=dataclasses.replace(
        RANDOMIZATIONS["train"], steatosis_prob=p, steatosis_hu=(30.0, 30.0))) for p in (0.0, 1.0))
    assert normal.appearance["steatosis_hu"] == 0.0 and fatty.appearance["steatosis_hu"] == 30.0
    assert np.array_equal(normal.label, fatty.label)  # the same anatomy, lesions and field of view
    liver = ndimage.binary_erosion(normal.label == 1, iterations=2)
    aorta = ndimage.binary_erosion(normal.label == 4)
    assert float(np.median(normal.image[liver]) - np.median(fatty.image[liver])) == pytest.approx(30.0, abs=4.0)
    assert np.median(normal.image[aorta]) == np.median(fatty.image[aorta])


def test_unenhanced_scans_have_blood_at_35_to_50_hu_and_lesions_without_a_rim():
    rims = {}
    for phase in ("portal_venous", "unenhanced"):
        rand = dataclasses.replace(RANDOMIZATIONS["unenhanced"], phases=(phase,), phase_probs=(1.0,),
                                   steatosis_prob=0.0, no_tumor_prob=0.0, tumor_diameter_mm=(30.0, 45.0),
                                   tumor_kinds=("hypo",), tumor_kind_probs=(1.0,), rim_prob=1.0,
                                   capsule_prob=0.0, necrosis_prob=0.0, noise_hu=(8.0, 8.0))
        c = generate_phantom(3, randomization=rand)
        assert c.appearance["phase"] == phase
        tumor = c.label == 2
        core, shell = ndimage.binary_erosion(tumor, iterations=3), tumor & ~ndimage.binary_erosion(tumor)
        rims[phase] = float(np.mean(c.image[shell]) - np.mean(c.image[core]))
        if phase == "unenhanced":
            assert 25 <= float(np.median(c.image[ndimage.binary_erosion(c.label == 4)])) <= 60
    assert rims["portal_venous"] > 10 and rims["unenhanced"] < 5, rims  # an enhancing rim needs contrast medium
    world = [generate_phantom(case_seed(5000, i), preset="test", randomization="unenhanced").appearance
             for i in range(8)]
    assert {a["phase"] for a in world} == {"unenhanced"} and any(a["steatosis_hu"] > 0 for a in world)
    assert not any("hyper" in a["tumor_kinds"] for a in world)
    assert RANDOMIZATIONS["ood"].steatosis_prob == 0.0  # the shifted world stays as scored before generator v5


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
    assert a.clinical_complete == b.clinical_complete and a.appearance == b.appearance
    ood, ood2 = generate_phantom(7, randomization="ood"), generate_phantom(7, randomization="ood")
    assert np.array_equal(ood.image, ood2.image) and ood.appearance == ood2.appearance
    assert a.image.shape != other.image.shape or not np.array_equal(a.image, other.image)
    unlabeled = generate_phantom(7, labeled=False)
    assert unlabeled.label is None and np.array_equal(unlabeled.image, a.image)


def test_clinical_rows_match_anatomy(cases):
    rows = [c.clinical_complete for c in cases]
    for c, r in zip(cases, rows):
        assert list(r) == COLUMNS and r["case_id"] == c.case_id
        n = ndimage.label(c.label == 2)[1]
        assert r["tumor_count"] == n
        assert 2 <= r["largest_tumor_mm"] <= 70 if n else r["largest_tumor_mm"] == 0  # 3-60 mm lesions
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
    from nny_models.phantoms.dataset import GENERATOR_VERSION

    assert meta["generator_version"] == GENERATOR_VERSION  # the pipeline regenerates data of an older generator
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
    assert meta["randomization"]["name"] == "train"
    app = pd.read_csv(out / "appearance.csv")
    assert list(app["case_id"]) == ["phantom_000", "phantom_001"] and set(app["phase"]) <= set(PHASE_HU)


def test_unlabeled_and_cli(tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "nny_models.phantoms", "--out", str(out), "--cases", "1", "--seed", "1",
           "--unlabeled", "--preview", "--randomization", "ood"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["training"] == [{"image": "./imagesTr/phantom_000.nii.gz"}]
    assert meta["randomization"]["name"] == "ood"
    assert not (out / "labelsTr").exists() and (out / "imagesTr" / "phantom_000.nii.gz").exists()
    assert (out / "preview.png").stat().st_size > 10_000
    bad = subprocess.run([sys.executable, "-m", "nny_models.phantoms", "--out", str(out), "--preset", "huge"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "huge" in bad.stderr


def test_restricted_randomization_is_obeyed():
    rand = Randomization(phases=("delayed",), phase_probs=(1.0,), slice_thickness_mm=(5.0, 5.0), partial_fov_prob=1.0,
                         noise_hu=(30.0, 30.0), no_tumor_prob=1.0)
    for seed in (0, 1, 2):
        c = generate_phantom(seed, randomization=rand)
        assert c.appearance["phase"] == "delayed" and c.spacing[2] == 5.0 and c.appearance["tumor_kinds"] == []
        assert not (c.label == 2).any()
        liver_z = np.flatnonzero((c.label == 1).any((0, 1)))
        # the liver is cut off: it touches the first (bottom) or the last (top) slice
        assert liver_z[0] == 0 or liver_z[-1] == c.label.shape[2] - 1, (c.appearance["fov"], liver_z)
    with pytest.raises(ValueError, match="phases"):
        Randomization(phases=("venous",), phase_probs=(1.0,))
    with pytest.raises(ValueError, match="tumor_kind_probs"):
        Randomization(tumor_kind_probs=(0.5, 0.5))
    with pytest.raises(ValueError, match="huge"):
        generate_phantom(0, randomization="huge")


def test_ood_lies_at_the_edges_of_or_outside_training():
    train, ood = RANDOMIZATIONS["train"], RANDOMIZATIONS["ood"]
    assert ood.slice_thickness_mm[0] >= 0.8 * train.slice_thickness_mm[1] < ood.slice_thickness_mm[1]
    assert ood.noise_hu[0] >= 0.8 * train.noise_hu[1] and ood.noise_hu[1] > train.noise_hu[1]
    assert ood.blur_mm[1] > train.blur_mm[1] and ood.noise_grain_vox[1] > train.noise_grain_vox[1]
    assert ood.body_scale[1] > train.body_scale[1] and ood.liver_scale[0] < train.liver_scale[0]
    p_hyper = lambda r: r.tumor_kind_probs[r.tumor_kinds.index("hyper")]  # noqa: E731
    assert p_hyper(ood) > 2 * p_hyper(train) and ood.tumor_diameter_mm[1] < train.tumor_diameter_mm[1]
    c = generate_phantom(case_seed(1000, 0), randomization="ood")
    assert c.appearance["randomization"] == "ood" and c.appearance["slice_thickness_mm"] >= 5.0
    assert c.spacing[2] >= 5.0 and c.appearance["phase"] in ("arterial", "delayed")


def test_ct_preset_keeps_thin_slices():
    rand = dataclasses.replace(RANDOMIZATIONS["train"], slice_thickness_mm=(0.7, 0.7))
    from nny_models.phantoms.presets import get_preset, sample_acquisition

    spacing, shape = sample_acquisition(np.random.default_rng(0), get_preset("ct"), 320.0, 0.7)
    assert spacing[2] == 0.7 and shape[0] == 512 and shape[2] <= 320
    c = generate_phantom(0, preset="test", randomization=rand)
    assert c.spacing[2] == 5.0 and max(c.image.shape) <= 64  # a coarse preset keeps its minimum spacing
