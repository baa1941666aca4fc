"""The embedded phantoms' clinical table: categories kept as written through training's reader and schema
(issue 11: "none" ascites was imputed as "moderate"), and clinical rows that carry what can inform
segmentation, with the correlations nny_models/phantoms/clinical.py promises (issue 12).

The 24 cases are the pipeline's fine-tuning set: write_dataset(seed=0) generates case i from
case_seed(0, i) with case id phantom_{i:03d}. Generating them takes ~20 s, once for this module.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage, stats

from finetune.clinical import fit_clinical_schema
from nny_models.clinical import read_clinical_csv
from nny_models.phantoms import generate_phantom
from nny_models.phantoms.clinical import COLUMN_TYPES, COLUMNS, MISSING_RATE
from nny_models.phantoms.dataset import case_seed

N_CASES = 24
STAGE_ORDER = {"0": 0, "A": 1, "B": 2, "C": 3, "D": 4}


@pytest.fixture(scope="module")
def cases():
    return [generate_phantom(case_seed(0, i), case_id=f"phantom_{i:03d}") for i in range(N_CASES)]


@pytest.fixture(scope="module")
def measured(cases) -> pd.DataFrame:
    return measure(cases)


def measure(cases) -> pd.DataFrame:
    """Each case's complete clinical row beside what its label map says."""
    rows = []
    for c in cases:
        voxel_ml = float(np.prod(c.spacing)) / 1000.0
        comp, n = ndimage.label(c.label == 2)
        sizes = np.bincount(comp.ravel())[1:]
        liver = ndimage.binary_fill_holes(np.isin(c.label, (1, 2, 3)))
        rows.append({
            **c.clinical_complete,
            "true_count": n,
            "true_tumor_ml": float((c.label == 2).sum() * voxel_ml),
            # equivalent-sphere diameter of the largest tumor component (an independent size measure)
            "true_largest_mm": float(np.cbrt(6 * sizes.max() * voxel_ml * 1000 / np.pi)) if n else 0.0,
            "sphericity": _sphericity(liver, np.asarray(c.spacing)),
        })
    return pd.DataFrame(rows)


def _sphericity(mask: np.ndarray, spacing: np.ndarray) -> float:
    """pi^(1/3) (6 V)^(2/3) / A: 1 for a ball, lower for a nodular surface (A from voxel faces)."""
    volume = mask.sum() * spacing.prod()
    area = sum((np.diff(mask.astype(np.int8), axis=ax) != 0).sum() * spacing.prod() / spacing[ax] for ax in range(3))
    return float(np.pi ** (1 / 3) * (6 * volume) ** (2 / 3) / area)


def test_embedded_table_keeps_categories_as_written(cases, tmp_path):
    """clinical.csv as write_dataset writes it -> read_clinical_csv -> fit: "none" stays "none"."""
    csv = tmp_path / "clinical.csv"
    pd.DataFrame([c.clinical for c in cases], columns=COLUMNS).to_csv(csv, index=False)
    table = read_clinical_csv(csv)
    assert table.attrs["column_types"] == COLUMN_TYPES  # inference agrees with the declared types
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning-free, but keep the test quiet either way
        schema = fit_clinical_schema(table, seed=0)
    ascites = [c.clinical["ascites"] for c in cases]
    n_none = sum(a == "none" for a in ascites)
    assert n_none >= N_CASES // 3  # most patients have no ascites (12 of 24 cells today)
    j = schema.categorical_columns.index("ascites")
    assert schema.categories[j] == ["mild", "moderate", "none"]
    assert schema.category_fill[j] == "none"  # a blank cell is imputed with the most frequent: "no ascites"
    e = schema.categorical_columns.index("encephalopathy")
    assert "none" in schema.categories[e] and schema.category_fill[e] == "none"

    vectors = schema.transform(table)
    names = schema.feature_names
    for i, a in enumerate(ascites):
        expected = "none" if a is None else a  # None: a blanked cell, imputed with the mode
        assert vectors[i, names.index(f"ascites={expected}")] == 1.0, (cases[i].case_id, a)
    assert vectors[:, names.index("ascites=none")].sum() == n_none + sum(a is None for a in ascites)
    enceph = [c.clinical["encephalopathy"] for c in cases]
    for i, value in enumerate(enceph):
        if value is not None:
            assert vectors[i, names.index(f"encephalopathy={value}")] == 1.0, (cases[i].case_id, value)


def test_missing_values_are_kept_like_hcc_tace_seg(cases):
    blank = [pd.isna(c.clinical[k]) for c in cases for k in COLUMNS[1:]]
    assert 0.4 * MISSING_RATE < np.mean(blank) < 2 * MISSING_RATE
    assert not any(pd.isna(c.clinical["case_id"]) for c in cases)


def test_rows_carry_tumor_count_and_largest_diameter(measured):
    assert (measured["tumor_count"] == measured["true_count"]).all()
    rho = stats.spearmanr(measured["largest_tumor_mm"], measured["true_largest_mm"]).correlation
    assert rho > 0.9, rho  # measured 0.997
    has = measured["true_count"] > 0
    ratio = measured.loc[has, "largest_tumor_mm"] / measured.loc[has, "true_largest_mm"]
    assert ratio.between(0.8, 2.0).all()  # longest extent >= equivalent-sphere diameter, same scale


def test_afp_rises_with_tumor_burden(measured):
    rho = stats.spearmanr(measured["afp_ng_ml"], measured["true_tumor_ml"]).correlation
    assert rho > 0.4, rho  # measured 0.77


def test_bclc_stage_follows_tumor_burden(measured):
    staged = measured["bclc_stage"].notna()
    assert (staged == (measured["true_count"] > 0)).all()  # no stage without a visible tumor
    # Where performance status and liver function do not decide the stage (ECOG 0, Child-Pugh A/B), the
    # tumors do: 0/A for a single or up to 3 small lesions, B for multinodular disease.
    burden_decides = staged & (measured["ecog_ps"] == 0) & (measured["child_pugh"] != "C")
    assert burden_decides.sum() >= 6
    order = measured.loc[burden_decides, "bclc_stage"].map(STAGE_ORDER)
    rho = stats.spearmanr(order, measured.loc[burden_decides, "true_count"]).correlation
    assert rho > 0.6, rho  # measured 0.91 (12 cases)


def test_cirrhosis_shows_in_liver_shape(measured):
    cirr = measured["cirrhosis"] == 1
    assert 3 <= cirr.sum() <= N_CASES - 3
    volume = measured["liver_volume_ml"]
    assert volume[cirr].median() < 0.85 * volume[~cirr].median()  # measured 607 vs 1118 ml
    assert measured["sphericity"][cirr].median() < measured["sphericity"][~cirr].median()  # 0.40 vs 0.48
