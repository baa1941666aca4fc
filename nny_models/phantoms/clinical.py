"""HCC-TACE-Seg-like clinical rows. The history (etiology, cirrhosis, ascites, tumor count) is drawn
first and steers the anatomy; labs, Child-Pugh and BCLC are then derived from what was drawn.

What a row carries that can honestly inform segmentation, and what it promises (measured on the 24
embedded fine-tuning phantoms, seed 0; checked in tests/nny_models/test_clinical_phantoms.py):

- tumor_count: the number of tumor components in the label (equal on every case);
- largest_tumor_mm: the largest lesion's longest diameter (Spearman 0.997 with the equivalent-sphere
  diameter of the largest tumor component, 1.04-1.24 times it);
- afp_ng_ml: log-normal, rising with tumor count and burden (Spearman 0.77 with the tumor volume),
  with the wide scatter real AFP has;
- bclc_stage: from count, size, Child-Pugh and ECOG, as BCLC does; where ECOG 0 and Child-Pugh A/B leave
  the tumors to decide, the stage order 0 < A < B follows the tumor count (Spearman 0.91, 12 cases); over
  all cases, ECOG >= 1 (stage C) weakens its link to tumor volume (0.27). Missing when no tumor is visible;
- cirrhosis: the liver is smaller (median 607 vs 1118 ml) and nodular (sphericity 0.40 vs 0.48) when
  cirrhotic (15 of 24), and liver_volume_ml states the volume.

Missing values are kept (about MISSING_RATE of the cells blanked, never case_id), as in HCC-TACE-Seg.
Categories are written as words ("none" = no ascites), never as missing.
"""

from __future__ import annotations

import math

import numpy as np

# Column order of clinical.csv (case_id first). Categorical columns hold strings, the rest numbers.
COLUMNS = [
    "case_id", "age", "sex", "hepatitis_b", "hepatitis_c", "alcohol", "cirrhosis", "ascites", "encephalopathy",
    "ecog_ps", "afp_ng_ml", "bilirubin_mg_dl", "albumin_g_dl", "inr", "child_pugh", "bclc_stage", "tumor_count",
    "largest_tumor_mm", "liver_volume_ml", "tace_sessions", "sorafenib",
]
CATEGORICAL = ["sex", "ascites", "encephalopathy", "child_pugh", "bclc_stage"]
# Declared types of clinical.csv (nny_models.clinical reads them from clinical.types.json): the 0/1 history
# flags stay numeric, as the type inference reads them, and bclc_stage ("0", "A"-"D") is a category.
COLUMN_TYPES = {c: "categorical" if c in CATEGORICAL else "numeric" for c in COLUMNS[1:]}
MISSING_RATE = 0.12


def sample_history(rng: np.random.Generator) -> dict:
    hbv = rng.random() < 0.4
    hcv = (not hbv and rng.random() < 0.4) or rng.random() < 0.05
    alcohol = rng.random() < 0.3
    cirrhosis = rng.random() < min(0.9, 0.25 + 0.3 * hbv + 0.35 * hcv + 0.25 * alcohol)
    # Severity of liver disease drives ascites and labs (0 = none).
    severity = float(rng.beta(2, 3)) if cirrhosis else float(rng.uniform(0, 0.1))
    ascites = "none"
    if cirrhosis and rng.random() < 0.2 + severity:
        ascites = "moderate" if rng.random() < severity else "mild"
    count = int(rng.choice([1, 2, 3, 4, 5, 6], p=[0.4, 0.2, 0.15, 0.1, 0.08, 0.07]))
    return dict(
        age=int(np.clip(rng.normal(63, 10), 30, 88)), sex="M" if rng.random() < 0.78 else "F",
        hepatitis_b=int(hbv), hepatitis_c=int(hcv), alcohol=int(alcohol), cirrhosis=int(cirrhosis),
        severity=severity, ascites=ascites, tumor_count_target=count,
        obesity=float(rng.beta(2, 3)),
    )


def child_pugh(bilirubin: float, albumin: float, inr: float, ascites: str, encephalopathy: str) -> str:
    """Child-Pugh class from the five standard criteria (bilirubin in mg/dL, albumin in g/dL)."""
    pts = 1 + (bilirubin >= 2) + (bilirubin > 3)
    pts += 1 + (albumin <= 3.5) + (albumin < 2.8)
    pts += 1 + (inr >= 1.7) + (inr > 2.3)
    pts += {"none": 1, "mild": 2, "moderate": 3}[ascites]
    pts += {"none": 1, "grade 1-2": 2, "grade 3-4": 3}[encephalopathy]
    return "A" if pts <= 6 else "B" if pts <= 9 else "C"


def bclc(count: int, largest_mm: float, cp: str, ecog: int) -> str | None:
    """Barcelona Clinic Liver Cancer stage from tumor burden, liver function and performance status;
    None (not staged) when no tumor is visible: a stage would claim a tumor the image does not have."""
    if count == 0:
        return None
    if cp == "C" or ecog > 2:
        return "D"
    if ecog >= 1:
        return "C"
    if count == 1 and largest_mm < 20 and cp == "A":
        return "0"
    if count == 1 or (count <= 3 and largest_mm <= 30):
        return "A"
    return "B"


def clinical_row(rng: np.random.Generator, case_id: str, hist: dict, tumor_count: int, diameters: list[float],
                 liver_volume_ml: float) -> dict:
    """Complete (no missing values) clinical row consistent with the drawn anatomy."""
    s = hist["severity"]
    largest = diameters[0] if diameters else 0.0
    burden = sum((d / 10.0) ** 3 for d in diameters)  # ~ tumor volume in cm^3 (x 0.52)
    bilirubin = float(np.clip(rng.lognormal(np.log(0.7 + 2.8 * s**1.5), 0.35), 0.2, 15))
    albumin = float(np.clip(rng.normal(4.1 - 1.5 * s, 0.3), 1.8, 5.2))
    inr = float(np.clip(rng.normal(1.02 + 0.9 * s**1.5, 0.07), 0.85, 3.5))
    enceph = "none"
    if hist["cirrhosis"] and rng.random() < 0.4 * s:
        enceph = "grade 3-4" if rng.random() < 0.15 else "grade 1-2"
    ecog = int(rng.choice([0, 1, 2, 3], p=[0.62, 0.26, 0.09, 0.03]))
    cp = child_pugh(bilirubin, albumin, inr, hist["ascites"], enceph)
    stage = bclc(tumor_count, largest, cp, ecog)
    afp = float(np.clip(rng.lognormal(1.6 + 0.45 * tumor_count + 0.55 * math.log1p(burden), 1.0), 1.0, 1e5))
    tace = int(max(1, rng.poisson(0.8 + 0.35 * tumor_count + largest / 60.0)))
    sorafenib = int(rng.random() < {None: 0.0, "0": 0.02, "A": 0.05, "B": 0.2, "C": 0.6, "D": 0.1}[stage])
    return {
        "case_id": case_id, "age": hist["age"], "sex": hist["sex"], "hepatitis_b": hist["hepatitis_b"],
        "hepatitis_c": hist["hepatitis_c"], "alcohol": hist["alcohol"], "cirrhosis": hist["cirrhosis"],
        "ascites": hist["ascites"], "encephalopathy": enceph, "ecog_ps": ecog, "afp_ng_ml": round(afp, 1),
        "bilirubin_mg_dl": round(bilirubin, 2), "albumin_g_dl": round(albumin, 2), "inr": round(inr, 2),
        "child_pugh": cp, "bclc_stage": stage, "tumor_count": tumor_count, "largest_tumor_mm": round(largest, 1),
        "liver_volume_ml": round(liver_volume_ml, 1), "tace_sessions": tace, "sorafenib": sorafenib,
    }


def with_missing(rng: np.random.Generator, row: dict, rate: float = MISSING_RATE) -> dict:
    """Blank ~rate of the values at random (never case_id): None for categorical, NaN for numeric."""
    out = dict(row)
    for k in COLUMNS[1:]:
        if rng.random() < rate:
            out[k] = None if k in CATEGORICAL else float("nan")
    return out
