"""Clinical table preprocessing at inference time, from a plain-JSON schema (no sklearn, no pickle).

``finetune.clinical.fit_clinical_schema`` fits, on the training fold only, the scikit-learn pipeline

    numeric columns:             IterativeImputer(BayesianRidge) -> StandardScaler
    categorical/boolean columns: SimpleImputer("most_frequent")  -> OneHotEncoder(handle_unknown="ignore")

and exports its fitted parameters into a :class:`ClinicalSchema`, which is stored in config.json.
``ClinicalSchema.transform`` replays that pipeline with numpy only; it reproduces sklearn's output
(``IterativeImputer.transform`` replays the fitted round-robin regressions, and BayesianRidge.predict
is linear: ``X @ coef + intercept``).

Output features, in order: the scaled numeric columns, then one one-hot block per categorical column.

Input problems at inference:
- a known column absent from the input -> its values are treated as missing, imputed, and a warning
  names the column;
- a category never seen in training -> all-zero one-hot block (sklearn's handle_unknown="ignore") and a
  warning naming the column and value;
- a column the schema does not know -> ``ValueError`` naming it: a typo ("afp " for "afp") must not be
  silently dropped while its values are imputed. The id column (``case_id``) and columns that were
  dropped at fit time (all missing in training) are accepted and ignored.
- a non-numeric value in a numeric column, or an infinite one -> ``ValueError`` naming column and value.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

KINDS = ("numeric", "categorical", "boolean")
MISSING_STRINGS = {"", "na", "n/a", "nan", "none", "null"}  # spellings of "missing" in CSV/JSON cells
_TRUE = {"true", "yes", "y", "1"}
_FALSE = {"false", "no", "n", "0"}


def is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return value.strip().lower() in MISSING_STRINGS
    if type(value).__name__ == "NAType":  # pandas.NA, without importing pandas
        return True
    try:
        return bool(value != value)  # NaN and NaT are not equal to themselves
    except (TypeError, ValueError):  # arrays and other non-scalars: not "missing", rejected later
        return False


def category_key(value: Any, kind: str = "categorical") -> str | None:
    """The canonical string for a categorical cell (None if missing), shared by fit and transform.

    Numbers become "1" / "2.5" whatever their Python type (pandas turns int columns with gaps into
    floats); booleans become "true" / "false", and for boolean columns so do yes/no/1/0 spellings.
    """
    if is_missing(value):
        return None
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (int, np.integer)):
        key = str(int(value))
    elif isinstance(value, (float, np.floating)):
        key = str(int(value)) if float(value).is_integer() else repr(float(value))
    else:
        key = str(value).strip()
    if kind == "boolean":
        low = key.lower()
        if low in _TRUE:
            return "true"
        if low in _FALSE:
            return "false"
    return key


def numeric_value(value: Any, column: str) -> float:
    """A numeric cell as float (NaN if missing); anything else is a ValueError naming the column."""
    if is_missing(value):
        return math.nan
    if isinstance(value, (bool, np.bool_)):
        return float(value)
    try:
        x = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise ValueError(f"clinical column {column!r}: expected a number, got {value!r}") from None
    if not math.isfinite(x):
        raise ValueError(f"clinical column {column!r}: expected a finite number, got {value!r}")
    return x


@dataclass
class ClinicalReport:
    """What transform had to repair in its input."""

    missing_columns: list[str] = field(default_factory=list)  # known columns absent from the input (imputed)
    unknown_categories: list[tuple[str, str]] = field(default_factory=list)  # (column, value) never seen in training
    imputed_values: int = 0  # number of missing cells that were imputed


@dataclass
class ClinicalSchema:
    """Fitted clinical preprocessing as plain JSON (see the module docstring)."""

    numeric_columns: list[str]  # numeric input columns, in the imputer's feature order
    categorical_columns: list[str]  # categorical/boolean input columns, in one-hot block order
    kinds: dict[str, str]  # column -> "numeric" | "categorical" | "boolean"
    initial_fill: list[float]  # IterativeImputer's initial (mean) imputation per numeric column
    imputation_steps: list[dict[str, Any]]  # round-robin regressions: {"feature", "neighbors", "coef", "intercept"}
    n_iter: int  # imputation rounds fitted (IterativeImputer.n_iter_); 0 = initial imputation only
    clip_min: list[float | None]  # lower bound for imputed values per numeric column (None = -inf)
    clip_max: list[float | None]  # upper bound for imputed values per numeric column (None = +inf)
    scaler_mean: list[float]  # StandardScaler.mean_
    scaler_scale: list[float]  # StandardScaler.scale_
    category_fill: list[str]  # most frequent training category per categorical column
    categories: list[list[str]]  # OneHotEncoder.categories_ (canonical strings, see category_key)
    dropped_columns: list[str] = field(default_factory=list)  # all-missing in training: accepted, ignored
    id_column: str = "case_id"  # row identifier column, ignored by transform

    def __post_init__(self) -> None:
        n = len(self.numeric_columns)
        for name in ("initial_fill", "clip_min", "clip_max", "scaler_mean", "scaler_scale"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"ClinicalSchema: {name} has {len(getattr(self, name))} entries, expected {n}")
        m = len(self.categorical_columns)
        for name in ("category_fill", "categories"):
            if len(getattr(self, name)) != m:
                raise ValueError(f"ClinicalSchema: {name} has {len(getattr(self, name))} entries, expected {m}")
        for col in self.numeric_columns + self.categorical_columns:
            if self.kinds.get(col) not in KINDS:
                kind = self.kinds.get(col)
                raise ValueError(f"ClinicalSchema: column {col!r} has kind {kind!r}, expected one of {KINDS}")

    # ---- JSON ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples -> lists, plain types only

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ClinicalSchema":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"ClinicalSchema: unknown field(s) {sorted(unknown)}")
        return cls(**d)

    # ---- shape ---------------------------------------------------------------------------------
    @property
    def columns(self) -> list[str]:
        return self.numeric_columns + self.categorical_columns

    @property
    def column_types(self) -> dict[str, str]:
        return {c: self.kinds[c] for c in self.columns}

    @property
    def num_features(self) -> int:
        return len(self.numeric_columns) + sum(len(c) for c in self.categories)

    @property
    def feature_names(self) -> list[str]:
        names = list(self.numeric_columns)
        for col, cats in zip(self.categorical_columns, self.categories):
            names += [f"{col}={c}" for c in cats]
        return names

    # ---- transform -----------------------------------------------------------------------------
    def transform(self, rows: Any, *, return_report: bool = False) -> np.ndarray | tuple[np.ndarray, ClinicalReport]:
        """rows: DataFrame, dict (one row), list of dicts, or a .json / .csv path -> float32 (N, num_features)."""
        records = load_rows(rows)
        if not records:
            raise ValueError("ClinicalSchema.transform: no rows given")
        report = ClinicalReport()
        self._check_columns(records, report)
        numeric, categorical = self.arrays(records)
        report.imputed_values = int(np.isnan(numeric).sum() + sum(v is None for v in categorical.ravel()))

        x_num = (self._impute_numeric(numeric) - np.asarray(self.scaler_mean)) / np.asarray(self.scaler_scale)
        blocks = [x_num]
        for j, (col, cats) in enumerate(zip(self.categorical_columns, self.categories)):
            index = {c: k for k, c in enumerate(cats)}
            onehot = np.zeros((len(records), len(cats)))
            for i, value in enumerate(categorical[:, j]):
                value = self.category_fill[j] if value is None else value
                if value in index:
                    onehot[i, index[value]] = 1.0
                else:
                    report.unknown_categories.append((col, value))
                    warnings.warn(
                        f"clinical column {col!r}: unknown category {value!r} (known: {cats}); encoded as all zeros"
                    )
            blocks.append(onehot)
        out = np.concatenate(blocks, axis=1).astype(np.float32)
        if not np.isfinite(out).all():  # cannot happen with a valid schema; never hand NaN to the network
            raise ValueError("ClinicalSchema.transform produced non-finite features; is the schema corrupted?")
        return (out, report) if return_report else out

    def arrays(self, records: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        """Canonical arrays: numeric float64 (N, n_num) with NaN for missing, categorical object (N, n_cat)
        of canonical strings or None. finetune.clinical feeds the same arrays to sklearn."""
        numeric = np.array(
            [[numeric_value(r.get(c), c) for c in self.numeric_columns] for r in records], dtype=np.float64
        ).reshape(len(records), len(self.numeric_columns))
        categorical = np.empty((len(records), len(self.categorical_columns)), dtype=object)
        for i, r in enumerate(records):
            for j, c in enumerate(self.categorical_columns):
                categorical[i, j] = category_key(r.get(c), self.kinds[c])
        return numeric, categorical

    def _check_columns(self, records: list[dict[str, Any]], report: ClinicalReport) -> None:
        known = set(self.columns) | set(self.dropped_columns) | {self.id_column}
        present = set().union(*(r.keys() for r in records)) if records else set()
        unknown = sorted(present - known)
        if unknown:
            raise ValueError(f"clinical input has unknown column(s) {unknown}; the model expects {self.columns}")
        for col in self.columns:
            if col not in present:
                report.missing_columns.append(col)
                warnings.warn(f"clinical column {col!r} missing from the input; its values are imputed")

    def _impute_numeric(self, x: np.ndarray) -> np.ndarray:
        """sklearn IterativeImputer.transform (sample_posterior=False), step by step."""
        missing = np.isnan(x)
        filled = np.where(missing, np.asarray(self.initial_fill), x)
        if self.n_iter == 0 or missing.all():  # sklearn's shortcut: nothing observed to regress on
            return filled
        lo = np.array([-np.inf if v is None else v for v in self.clip_min])
        hi = np.array([np.inf if v is None else v for v in self.clip_max])
        for step in self.imputation_steps:
            j, rows = step["feature"], missing[:, step["feature"]]
            if not rows.any():
                continue
            pred = filled[np.ix_(rows, step["neighbors"])] @ np.asarray(step["coef"]) + step["intercept"]
            filled[rows, j] = np.clip(pred, lo[j], hi[j])
        return filled


def load_rows(rows: Any) -> list[dict[str, Any]]:
    """Normalise clinical input to a list of {column: value} dicts.

    Accepts a pandas DataFrame (its index is ignored) or Series (one row), a dict (one row), a list of
    dicts, or a path to a .json file (an object or a list of objects) or a .csv file (header + rows)."""
    if isinstance(rows, (str, Path)):
        path = Path(rows)
        if not path.is_file():
            raise ValueError(f"clinical input {path}: file not found")
        if path.suffix.lower() == ".json":
            rows = json.loads(path.read_text())
        elif path.suffix.lower() == ".csv":
            import pandas as pd

            rows = pd.read_csv(path)
        else:
            raise ValueError(f"clinical input {path}: expected a .json or .csv file")
    if hasattr(rows, "to_dict") and hasattr(rows, "index") and not hasattr(rows, "columns"):  # pandas Series: one row
        rows = rows.to_dict()
    if hasattr(rows, "to_dict") and hasattr(rows, "columns"):  # pandas DataFrame
        return [{str(k): v for k, v in r.items()} for r in rows.to_dict(orient="records")]
    if isinstance(rows, dict):
        rows = [rows]
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"clinical input: expected a DataFrame, a dict or a list of dicts, got {type(rows).__name__}")
    return [{str(k): v for k, v in r.items()} for r in rows]
