import json
import warnings

import numpy as np
import pandas as pd
import pytest

from finetune.clinical import fit_clinical_pipeline, fit_clinical_schema, prepared_frame
from nny_models.clinical import ClinicalSchema


def make_table(n: int, seed: int, missing: float = 0.25) -> pd.DataFrame:
    """A small HCC-like clinical table with correlated numeric columns and gaps everywhere."""
    rng = np.random.default_rng(seed)
    burden = rng.gamma(2.0, 2.0, n)
    df = pd.DataFrame(
        {
            "case_id": [f"case_{seed}_{i:03d}" for i in range(n)],
            "age": rng.normal(62, 9, n).round(),
            "afp": np.exp(1.5 + 0.5 * burden + rng.normal(0, 0.5, n)),
            "bilirubin": 0.8 + 0.2 * burden + rng.normal(0, 0.2, n),
            "albumin": 4.2 - 0.1 * burden + rng.normal(0, 0.2, n),
            "tumor_size_cm": 1.0 + burden,
            "sex": rng.choice(["M", "F"], n, p=[0.8, 0.2]),
            "child_pugh": rng.choice(["A", "B", "C"], n, p=[0.6, 0.3, 0.1]),
            "cirrhosis": rng.choice([True, False], n),
        }
    )
    for col in df.columns[1:]:
        holes = rng.random(n) < missing
        df[col] = df[col].astype(object) if df[col].dtype == bool or df[col].dtype == object else df[col]
        df.loc[holes, col] = np.nan
    return df


@pytest.fixture(scope="module")
def fitted():
    train = make_table(40, seed=0)
    pipeline, schema = fit_clinical_pipeline(train, seed=0)
    return train, pipeline, schema


def _roundtrip(schema: ClinicalSchema) -> ClinicalSchema:
    return ClinicalSchema.from_dict(json.loads(json.dumps(schema.to_dict())))


def test_kinds_inferred(fitted):
    _, _, schema = fitted
    assert schema.numeric_columns == ["age", "afp", "bilirubin", "albumin", "tumor_size_cm"]
    assert schema.kinds["sex"] == "categorical" and schema.kinds["cirrhosis"] == "boolean"
    assert "case_id" not in schema.columns
    assert schema.num_features == 5 + 2 + 3 + 2 == len(schema.feature_names)
    assert schema.n_iter > 0 and len(schema.imputation_steps) == 5 * schema.n_iter


def test_json_roundtrip_matches_sklearn(fitted):
    train, pipeline, schema = fitted
    schema = _roundtrip(schema)
    unseen = make_table(25, seed=1, missing=0.4)
    unseen.loc[3, ["age", "afp", "bilirubin", "albumin", "tumor_size_cm"]] = np.nan  # a row with no numeric value
    for df in (train, unseen):
        expected = pipeline.transform(prepared_frame(schema, df))
        assert (np.isnan(prepared_frame(schema, df).iloc[:, :5].to_numpy())).any()  # imputation really ran
        got = schema.transform(df)
        assert got.dtype == np.float32 and got.shape == (len(df), schema.num_features)
        np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
        assert np.isfinite(got).all()


def test_single_row_inputs_match_batch(fitted, tmp_path):
    _, pipeline, schema = fitted
    rows = make_table(6, seed=2, missing=0.5)
    batch = schema.transform(rows)
    for i, row in enumerate(rows.to_dict(orient="records")):
        np.testing.assert_allclose(schema.transform(row)[0], batch[i], atol=1e-6)
        expected = pipeline.transform(prepared_frame(schema, row))[0]
        np.testing.assert_allclose(schema.transform(row)[0], expected, atol=1e-6)
    row = rows.iloc[0].to_dict()
    (tmp_path / "row.json").write_text(json.dumps({k: (None if v != v else v) for k, v in row.items()}))
    rows.iloc[:1].to_csv(tmp_path / "row.csv", index=False)
    np.testing.assert_allclose(schema.transform(tmp_path / "row.json"), batch[:1], atol=1e-6)
    np.testing.assert_allclose(schema.transform(str(tmp_path / "row.csv")), batch[:1], atol=1e-6)
    np.testing.assert_allclose(schema.transform(rows.iloc[0]), batch[:1], atol=1e-6)  # a pandas Series


def test_all_missing_row_gets_means(fitted):
    _, pipeline, schema = fitted
    out = schema.transform({})  # every column missing: warnings, then the training means / modes
    expected = pipeline.transform(prepared_frame(schema, {}))
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert np.isfinite(out).all()


def test_unknown_category(fitted):
    _, _, schema = fitted
    row = {"age": 70, "afp": 12.0, "sex": "X", "child_pugh": "B", "cirrhosis": "yes"}
    with pytest.warns(UserWarning, match="'sex'.*unknown category 'X'"):
        out, report = schema.transform(row, return_report=True)
    sex = [i for i, n in enumerate(schema.feature_names) if n.startswith("sex=")]
    assert (out[0, sex] == 0).all()
    assert report.unknown_categories == [("sex", "X")]
    assert out[0, schema.feature_names.index("cirrhosis=true")] == 1.0  # "yes" spelled for a boolean


def test_missing_column_is_imputed_and_reported(fitted):
    _, pipeline, schema = fitted
    row = {"age": 55, "afp": 30.0, "bilirubin": 1.1, "tumor_size_cm": 4.0}
    row |= {"sex": "F", "child_pugh": "A", "cirrhosis": False}
    with pytest.warns(UserWarning, match="'albumin' missing"):
        out, report = schema.transform(row, return_report=True)
    assert report.missing_columns == ["albumin"] and report.imputed_values == 1
    np.testing.assert_allclose(out, pipeline.transform(prepared_frame(schema, row)), atol=1e-6)
    assert np.isfinite(out).all()


def test_unknown_column_is_an_error(fitted):
    _, _, schema = fitted
    with pytest.raises(ValueError, match="unknown column.*'albumn'"):
        schema.transform({"age": 50, "albumn": 3.9})
    with pytest.raises(ValueError, match="'afp'.*expected a number"):
        schema.transform({"afp": "high"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        schema.transform({"case_id": "x", "age": 50})  # the id column is fine


def test_all_missing_training_column_dropped():
    train = make_table(20, seed=3)
    train["inr"] = np.nan
    with pytest.warns(UserWarning, match="'inr' is missing in every training row"):
        schema = fit_clinical_schema(train, column_types={"child_pugh": "categorical"})
    assert schema.dropped_columns == ["inr"] and "inr" not in schema.columns
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert np.isfinite(schema.transform({"inr": 1.2, "age": 40})).all()


def test_bad_arguments():
    train = make_table(10, seed=4)
    with pytest.raises(ValueError, match="not in the clinical table"):
        fit_clinical_schema(train, columns=["age", "nope"])
    with pytest.raises(ValueError, match="bad column_types"):
        fit_clinical_schema(train, column_types={"age": "float"})
    with pytest.raises(ValueError, match="unknown field"):
        ClinicalSchema.from_dict({"bogus": 1})
