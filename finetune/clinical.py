"""Fit the clinical table preprocessing on the training fold (pandas + scikit-learn) and export it.

nnY-Net fills the missing clinical values with a learned, model-based imputer. Here:

    numeric columns:             IterativeImputer(BayesianRidge, max_iter=10, clipped to the training
                                 range, fixed random_state) -> StandardScaler
    categorical/boolean columns: SimpleImputer("most_frequent") -> OneHotEncoder(handle_unknown="ignore")

Fit on the training cases only (never on validation/test rows), then ship the parameters as JSON in
``nny_models.clinical.ClinicalSchema`` so inference needs neither sklearn nor pickle.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.exceptions import ConvergenceWarning
from sklearn.experimental import enable_iterative_imputer  # noqa: F401  (registers IterativeImputer)
from sklearn.impute import IterativeImputer, SimpleImputer
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from nny_models.clinical import KINDS, SCHEMA_VERSION, ClinicalSchema, infer_column_type, is_missing, load_rows

__all__ = ["fit_clinical_pipeline", "fit_clinical_schema", "infer_column_type", "prepared_frame"]


def _where(df: pd.DataFrame, id_column: str):
    """Row index -> "clinical table: row for case 'x'" (the DataFrame's index or id column names the case)."""
    ids = df[id_column].tolist() if id_column in df.columns else df.index.tolist()
    source = df.attrs.get("source", "clinical table")
    return lambda i: f"{source}: row for case {str(ids[i])!r}"


def prepared_frame(schema: ClinicalSchema, rows, where=None) -> pd.DataFrame:
    """The canonical frame sklearn sees: float64 numeric columns (NaN = missing) and object categorical
    columns of canonical strings (NaN = missing), built by the same code the schema uses at inference."""
    numeric, categorical = schema.arrays(load_rows(rows), where)
    frame = pd.DataFrame(numeric, columns=schema.numeric_columns)
    for j, col in enumerate(schema.categorical_columns):
        frame[col] = pd.Series([np.nan if v is None else v for v in categorical[:, j]], dtype=object)
    return frame


def build_pipeline(
    numeric_columns: list[str], categorical_columns: list[str], clip_min, clip_max, seed: int = 0
) -> ColumnTransformer:
    """The unfitted sklearn pipeline; clip_min/clip_max bound the imputed numeric values."""
    parts = []
    if numeric_columns:
        imputer = IterativeImputer(
            max_iter=10, sample_posterior=False, random_state=seed,
            min_value=np.asarray(clip_min, dtype=float), max_value=np.asarray(clip_max, dtype=float),
        )  # fmt: skip
        parts.append(("num", Pipeline([("impute", imputer), ("scale", StandardScaler())]), numeric_columns))
    if categorical_columns:
        onehot = OneHotEncoder(handle_unknown="ignore", sparse_output=False)
        impute = SimpleImputer(strategy="most_frequent")
        parts.append(("cat", Pipeline([("impute", impute), ("onehot", onehot)]), categorical_columns))
    if not parts:
        raise ValueError("fit_clinical_schema: no clinical columns left to fit")
    return ColumnTransformer(parts, remainder="drop", sparse_threshold=0.0)


def fit_clinical_pipeline(
    df: pd.DataFrame,
    columns: list[str] | None = None,
    column_types: dict[str, str] | None = None,
    seed: int = 0,
    id_column: str = "case_id",
) -> tuple[ColumnTransformer, ClinicalSchema]:
    """Fit the sklearn pipeline on ``df`` (training rows only) -> (fitted pipeline, exported schema)."""
    column_types = dict(column_types or {})
    columns = [c for c in (columns if columns is not None else df.columns) if c != id_column]
    absent = [c for c in columns if c not in df.columns]
    if absent:
        raise ValueError(f"fit_clinical_schema: column(s) {absent} not in the clinical table (has {list(df.columns)})")
    bad = {c: t for c, t in column_types.items() if t not in KINDS or c not in columns}
    if bad:
        raise ValueError(f"fit_clinical_schema: bad column_types {bad}; keys must be table columns, values in {KINDS}")
    if len(df) < 2:
        raise ValueError(f"fit_clinical_schema: need at least 2 training rows, got {len(df)}")

    # Declared types win; then the types read_clinical_csv settled on; else inferred from the values.
    table_types = df.attrs.get("column_types", {})
    where = _where(df, id_column)
    kinds, dropped = {}, []
    for col in columns:
        if all(is_missing(v) for v in df[col].tolist()):
            dropped.append(col)  # nothing to learn from; sklearn would drop it silently
            warnings.warn(f"clinical column {col!r} is missing in every training row; it is ignored")
            continue
        kinds[col] = column_types.get(col) or table_types.get(col) or infer_column_type(df[col].tolist(), col, where)
    numeric = [c for c in kinds if kinds[c] == "numeric"]
    categorical = [c for c in kinds if kinds[c] != "numeric"]

    # Imputed values are clipped to the observed training range (constant columns stay unclipped,
    # since sklearn needs min < max).
    schema = ClinicalSchema(
        numeric_columns=numeric, categorical_columns=categorical, kinds=kinds,
        initial_fill=[0.0] * len(numeric), imputation_steps=[], n_iter=0,
        clip_min=[None] * len(numeric), clip_max=[None] * len(numeric),
        scaler_mean=[0.0] * len(numeric), scaler_scale=[1.0] * len(numeric),
        category_fill=[""] * len(categorical), categories=[[] for _ in categorical],
        dropped_columns=dropped, id_column=id_column, version=SCHEMA_VERSION,
    )  # fmt: skip
    frame = prepared_frame(schema, df, where)
    for j, col in enumerate(numeric):
        _check_finite_statistics(frame[col], col, where)
        lo, hi = float(np.nanmin(frame[col])), float(np.nanmax(frame[col]))
        schema.clip_min[j], schema.clip_max[j] = (lo, hi) if hi > lo else (None, None)
    clip_min = [-np.inf if v is None else v for v in schema.clip_min]
    clip_max = [np.inf if v is None else v for v in schema.clip_max]

    pipeline = build_pipeline(numeric, categorical, clip_min, clip_max, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # early stopping not reached in 10 rounds is fine
        pipeline.fit(frame)

    if numeric:
        imputer = pipeline.named_transformers_["num"].named_steps["impute"]
        scaler = pipeline.named_transformers_["num"].named_steps["scale"]
        schema.initial_fill = [float(v) for v in imputer.initial_imputer_.statistics_]
        schema.n_iter = int(imputer.n_iter_)
        schema.imputation_steps = [
            {
                "feature": int(t.feat_idx),
                "neighbors": [int(i) for i in t.neighbor_feat_idx],
                "coef": [float(c) for c in t.estimator.coef_],
                "intercept": float(t.estimator.intercept_),
            }
            for t in imputer.imputation_sequence_
        ]
        schema.scaler_mean = [float(v) for v in scaler.mean_]
        schema.scaler_scale = [float(v) for v in scaler.scale_]
    if categorical:
        cat = pipeline.named_transformers_["cat"]
        schema.category_fill = [str(v) for v in cat.named_steps["impute"].statistics_]
        schema.categories = [[str(v) for v in c] for c in cat.named_steps["onehot"].categories_]
    return pipeline, schema


def _check_finite_statistics(values: pd.Series, col: str, where) -> None:
    """A value so large that the column's mean or variance overflows (1e308) is named, not fitted."""
    x = values.to_numpy(dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        ok = np.isfinite(np.nanmean(x)) and np.isfinite(np.nanvar(x))
    if not ok:
        i = int(np.nanargmax(np.abs(x)))
        raise ValueError(
            f"{where(i)}, column {col!r}: value {x[i]:g} is too large to fit (the column's mean or variance "
            "overflows); a unit or typing error?"
        )


def fit_clinical_schema(
    df: pd.DataFrame, columns: list[str] | None = None, column_types: dict[str, str] | None = None, seed: int = 0
) -> ClinicalSchema:
    """Fit on the training rows of ``df`` and return the JSON-able schema used by training and inference."""
    return fit_clinical_pipeline(df, columns, column_types, seed)[1]
