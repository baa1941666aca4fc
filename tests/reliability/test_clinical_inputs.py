"""Clinical inputs that used to give silently wrong results or unclear errors (issue 11), each with the exact
behaviour now expected:

- "none" / "no" / "n/a" are categories kept as written; only empty cells, NaN and null are missing;
- one boolean vocabulary (true/false, yes/no, t/f, y/n, 1/0) for training and inference;
- an unparseable cell in a numeric column is an error naming the file, the row, the case and the column,
  unless the column's type was declared (column_types= or the clinical.types.json sidecar);
- a value like 1e308 is an error naming the column and the value, at fit and at predict time;
- a clinical row from another patient is refused by predict and nnynet-predict.

The embedded phantom table ("none" ascites kept as written) is tested in
tests/nny_models/test_clinical_phantoms.py.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from finetune.clinical import fit_clinical_schema
from nny_models.clinical import (
    ClinicalSchema,
    image_case_ids,
    infer_column_type,
    is_missing,
    parse_boolean,
    read_clinical_csv,
    read_clinical_row,
)
from nny_models.config import NnyNetConfig, PreprocessConfig

TABLE = """case_id,age,afp_ng_ml,ascites,encephalopathy,cirrhosis,hbv
p1,61,12.5,none,none,yes,t
p2,70,450,mild,grade 1-2,no,f
p3,,8.5,none,none,,t
p4,55,,moderate,none,yes,
p5,66,1200,none,grade 3-4,no,f
p6,73,33,n/a,none,yes,t
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture()
def table(tmp_path) -> Path:
    return write(tmp_path / "clinical.csv", TABLE)


@pytest.fixture()
def schema(table) -> ClinicalSchema:
    return fit_clinical_schema(read_clinical_csv(table), seed=0)


# ----------------------------------------------------------------------------- missing vs. written


def test_only_empty_nan_and_null_are_missing():
    for value in (None, float("nan"), np.nan, pd.NA, "", "  ", "NaN", "null"):
        assert is_missing(value), value
    for value in ("none", "None", "no", "n/a", "NA", "na", "0", 0, False, "-"):
        assert not is_missing(value), value


def test_none_is_a_category_in_training_and_inference(table, schema):
    df = read_clinical_csv(table)
    assert df.loc["p1", "ascites"] == "none" and df.loc["p6", "ascites"] == "n/a"
    assert df["ascites"].isna().sum() == 0
    j = schema.categorical_columns.index("ascites")
    assert schema.categories[j] == ["mild", "moderate", "n/a", "none"]
    assert schema.category_fill[j] == "none"  # the most frequent category, as written
    e = schema.categorical_columns.index("encephalopathy")
    assert schema.categories[e] == ["grade 1-2", "grade 3-4", "none"]
    names = schema.feature_names
    out = schema.transform({"case_id": "x", "ascites": "none", "encephalopathy": "none", "age": 60,
                            "afp_ng_ml": 10, "cirrhosis": "no", "hbv": "f"})
    assert out[0, names.index("ascites=none")] == 1.0 and out[0, names.index("ascites=moderate")] == 0.0
    assert out[0, names.index("encephalopathy=none")] == 1.0
    # an empty cell is missing: imputed with the most frequent category, counted in the report
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, report = schema.transform({"ascites": "", "encephalopathy": None}, return_report=True)
    assert report.imputed_values == 2 + 4  # the two empty cells and the four absent columns


def test_one_boolean_vocabulary(table, schema):
    assert schema.kinds["cirrhosis"] == "boolean" and schema.kinds["hbv"] == "boolean"  # "t"/"f" is boolean too
    df = read_clinical_csv(table)
    assert df["hbv"].tolist()[:2] == [True, False] and pd.isna(df.loc["p4", "hbv"])
    names = schema.feature_names
    for spelling, truth in (("T", True), ("yes", True), ("Y", True), ("1", True), (1, True), (True, True),
                            ("f", False), ("No", False), ("0", False), (0.0, False), (False, False)):
        out = schema.transform({"case_id": "x", "age": 60, "afp_ng_ml": 10, "ascites": "none",
                                "encephalopathy": "none", "cirrhosis": spelling, "hbv": spelling})
        assert out[0, names.index("cirrhosis=true")] == float(truth), spelling
        assert out[0, names.index("hbv=false")] == float(not truth), spelling
        assert parse_boolean(spelling) is truth
    with pytest.raises(ValueError, match=r"row 1 \(case 'x'\), column 'cirrhosis': expected a boolean.*'maybe'"):
        schema.transform({"case_id": "x", "cirrhosis": "maybe"})


def test_a_column_of_only_F_is_a_category_not_false():
    assert infer_column_type(["F", "F", None], "sex") == "categorical"
    assert infer_column_type(["Y", "N", "Y"], "smoker") == "boolean"
    assert infer_column_type(["0", "1", "1"], "ecog_ps") == "numeric"  # a 0/1 column may be a score


# ----------------------------------------------------------------------------- numeric columns


def test_unparseable_cell_in_numeric_column_names_file_row_case_column(tmp_path):
    bad = write(tmp_path / "clinical.csv", TABLE.replace("p5,66,1200", "p5,66,abc"))
    with pytest.raises(ValueError) as err:
        read_clinical_csv(bad)
    msg = str(err.value)
    assert str(bad) in msg and "row 6 (case 'p5')" in msg and "column 'afp_ng_ml'" in msg and "'abc'" in msg
    assert "declare the column's type" in msg and "types.json" in msg  # says how to declare it
    # two values, one a number: not silently the categories ['1.0', 'abc'] either
    two = write(tmp_path / "two.csv", "case_id,afp_ng_ml\na,1.0\nb,abc\n")
    with pytest.raises(ValueError, match=r"two.csv: row 3 \(case 'b'\), column 'afp_ng_ml': value 'abc' is not"):
        read_clinical_csv(two)
    # a DataFrame handed to fit directly (not read from a CSV) gets the same check
    df = pd.DataFrame({"case_id": ["a", "b", "c"], "afp_ng_ml": [1.0, "abc", 3.0], "age": [50, 60, 70]})
    with pytest.raises(ValueError, match=r"row for case 'b', column 'afp_ng_ml': value 'abc' is not a number"):
        fit_clinical_schema(df.set_index("case_id"))


def test_declared_types_argument_and_sidecar(tmp_path):
    bad = write(tmp_path / "clinical.csv", TABLE.replace("p5,66,1200", "p5,66,abc"))
    df = read_clinical_csv(bad, column_types={"afp_ng_ml": "categorical"})
    assert df.attrs["column_types"]["afp_ng_ml"] == "categorical" and df.loc["p5", "afp_ng_ml"] == "abc"
    assert fit_clinical_schema(df).kinds["afp_ng_ml"] == "categorical"  # fit keeps the declared type

    sidecar = write(tmp_path / "clinical.types.json", json.dumps({"afp_ng_ml": "categorical", "hbv": "categorical"}))
    df = read_clinical_csv(bad)
    assert df.attrs["column_types"]["afp_ng_ml"] == "categorical" and df.attrs["column_types"]["hbv"] == "categorical"
    assert df.loc["p1", "hbv"] == "t"
    # declared numeric: the bad cell is an error naming file, row, case and column
    write(sidecar, json.dumps({"afp_ng_ml": "numeric"}))
    with pytest.raises(ValueError, match=r"clinical.csv: row 6 \(case 'p5'\), column 'afp_ng_ml': expected a number, "
                                         r"got 'abc'"):
        read_clinical_csv(bad)
    write(sidecar, json.dumps({"afp_ng_ml": "float"}))
    with pytest.raises(ValueError, match=r"clinical.types.json: column 'afp_ng_ml' has type 'float'"):
        read_clinical_csv(bad)
    write(sidecar, json.dumps({"afp": "numeric"}))
    with pytest.raises(ValueError, match=r"column types name 'afp', which is not a data column"):
        read_clinical_csv(bad)


def test_ordinary_values_pass_a_schema_fitted_on_a_column_that_barely_varied():
    # Two training patients with AFP 32.7 and 33.3 (std 0.3): a new patient's 560 is ordinary, not a typo.
    import pandas as pd

    from finetune.clinical import fit_clinical_schema

    small = fit_clinical_schema(pd.DataFrame({"afp_ng_ml": [32.7, 33.3], "age": [50.0, 70.0]}, index=["a", "b"]), seed=0)
    vector = small.transform({"afp_ng_ml": 560.6, "age": 61})
    assert np.isfinite(vector).all()
    with pytest.raises(ValueError, match="afp_ng_ml"):
        small.transform({"afp_ng_ml": 1e308, "age": 61})


def test_huge_value_names_column_and_value_at_predict_time(schema, tmp_path):
    row = {"case_id": "x", "age": 60, "afp_ng_ml": 1e308, "ascites": "none", "encephalopathy": "none",
           "cirrhosis": "no", "hbv": "f"}
    with pytest.raises(ValueError) as err:
        schema.transform(row)
    msg = str(err.value)
    assert "column 'afp_ng_ml'" in msg and "1e+308" in msg and "training scales" in msg
    assert "schema" not in msg  # not blamed on the schema
    path = write(tmp_path / "x.json", json.dumps(row))
    with pytest.raises(ValueError, match=r"x.json.*row 1 \(case 'x'\), column 'afp_ng_ml': value 1e\+308"):
        schema.transform(path)
    write(tmp_path / "x.csv", "case_id,afp_ng_ml\nx,1e308\n")
    with pytest.raises(ValueError, match=r"x.csv: row 2 \(case 'x'\), column 'afp_ng_ml': value '1e308'"):
        schema.transform(tmp_path / "x.csv")
    for bad in ("inf", "-inf", "1_000"):
        with pytest.raises(ValueError, match=rf"column 'afp_ng_ml': expected a (finite )?number, got '{bad}'"):
            schema.transform({"afp_ng_ml": bad})
    np.testing.assert_array_less(-1e3, schema.transform({**row, "afp_ng_ml": 5e4}))  # large but plausible: fine
    # a JSON integer beyond float's range (float() raises OverflowError, not ValueError): still the column named
    path = write(tmp_path / "big.json", json.dumps({**row, "age": 10**400}))
    with pytest.raises(ValueError, match=r"big.json.*column 'age': expected a finite number, got an integer of 401 digits"):
        schema.transform(path)


def test_huge_value_names_column_and_case_at_fit_time(tmp_path):
    csv = write(tmp_path / "clinical.csv", TABLE.replace("p5,66,1200", "p5,66,1e308"))
    with pytest.raises(ValueError, match=r"clinical.csv: row for case 'p5', column 'afp_ng_ml': value 1e\+308 is too "
                                         r"large to fit"):
        fit_clinical_schema(read_clinical_csv(csv))


# ----------------------------------------------------------------------------- the row of this patient


def test_image_case_ids_follow_nny_models_io():
    assert image_case_ids("/d/imagesTr/liver_007_0000.nii.gz") == ["liver_007_0000", "liver_007"]
    assert image_case_ids("p2.nii") == ["p2"] and image_case_ids("scan.NRRD") == ["scan"]
    assert image_case_ids("/dicom/patient_9") == ["patient_9"]


def test_read_clinical_row_matches_case_id(tmp_path, table):
    assert read_clinical_row(table, "p2")["afp_ng_ml"] == "450"
    assert read_clinical_row(table, ["liver_0000", "p3"])["age"] == ""
    with pytest.raises(ValueError, match=r"clinical.csv.*no row for case 'p9' \(ct.nii.gz\)"):
        read_clinical_row(table, "p9", image="ct.nii.gz")
    one = write(tmp_path / "one.csv", "case_id,age\np1,60\n")
    with pytest.raises(ValueError, match=r"one.csv.*the row is for case 'p1', but the image p2.nii.gz is case 'p2'"):
        read_clinical_row(one, ["p2"], image="the image p2.nii.gz")
    js = write(tmp_path / "row.json", json.dumps({"case_id": "p1", "age": 60}))
    with pytest.raises(ValueError, match=r"row.json.*the row is for case 'p1'.*is case 'p2'"):
        read_clinical_row(js, "p2")
    assert read_clinical_row(js, "p1") == {"case_id": "p1", "age": 60}
    with pytest.raises(ValueError, match="the row is for case 'p1'"):
        read_clinical_row({"case_id": "p1", "age": 60}, "p2")  # a dict is checked the same way
    two = write(tmp_path / "two.csv", "age\n60\n70\n")
    with pytest.raises(ValueError, match=r"two.csv' has 2 data rows and no 'case_id' column.*one data row"):
        read_clinical_row(two, "p2")
    with pytest.raises(ValueError, match=r"has 6 rows and no case id is known"):
        read_clinical_row(table, None)
    dup = write(tmp_path / "dup.csv", "case_id,age\np2,60\np2,70\n")
    with pytest.raises(ValueError, match="case 'p2' has 2 rows"):
        read_clinical_row(dup, "p2")
    nocase = write(tmp_path / "nocase.csv", "age\n60\n")
    with pytest.warns(UserWarning, match=r"nocase.csv' has no 'case_id' column: could not check"):
        assert read_clinical_row(nocase, "p2") == {"age": "60"}


class RecordingNet(nn.Module):
    """Segments nothing; records the clinical vector predict hands to the network."""

    size_divisor = 1

    def __init__(self, config: NnyNetConfig, clinical_features: int):
        super().__init__()
        self.config = config
        self.fusion = nn.Linear(clinical_features, 1)
        self.fusion.clinical_features = clinical_features
        self.seen: list[torch.Tensor] = []

    def forward(self, image: torch.Tensor, clinical: torch.Tensor | None = None) -> torch.Tensor:
        self.seen.append(clinical)
        logits = torch.zeros(image.shape[0], len(self.config.label_names), *image.shape[2:])
        logits[:, 0] = 1.0
        return logits


def write_ct(path: Path) -> Path:
    vol = np.full((24, 24, 12), -1000.0, np.float32)
    vol[4:-4, 4:-4, 2:-2] = 40.0
    nib.save(nib.Nifti1Image(vol, np.diag([2.0, 2.0, 3.0, 1.0])), path)
    return path


def test_predict_uses_this_patients_row_and_refuses_another(schema, table, tmp_path):
    from nny_models.inference import predict

    config = NnyNetConfig(patch_size=(16, 16, 16), preprocessing=PreprocessConfig(spacing=(2.0, 2.0, 3.0)).to_dict(),
                          clinical_schema=schema.to_dict())
    model = RecordingNet(config, schema.num_features)
    ct = write_ct(tmp_path / "p2.nii.gz")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        predict(model, ct, clinical=table, device="cpu")
    assert not [w for w in caught if "clinical" in str(w.message)]  # the row matched: nothing to warn about
    expected = schema.transform(read_clinical_csv(table).loc[["p2"]])
    np.testing.assert_allclose(model.seen[0][:1].numpy(), expected, rtol=1e-6)

    other = write(tmp_path / "other.json", json.dumps({"case_id": "p1", "age": 61}))
    with pytest.raises(ValueError, match=r"other.json.*the row is for case 'p1', but .*p2.nii.gz.* is case 'p2'"):
        predict(model, ct, clinical=other, device="cpu")
    vol = nib.load(ct).get_fdata().astype(np.float32)
    with pytest.raises(ValueError, match="the row is for case 'p1'"):  # an array input with its case id
        predict(model, vol, spacing=(2.0, 2.0, 3.0), clinical=other, case_id="p2", device="cpu")
    with pytest.warns(UserWarning, match="no case id is known for input array"):  # an array without one
        predict(model, vol, spacing=(2.0, 2.0, 3.0), clinical=other, device="cpu")


def test_cli_refuses_another_patients_row_and_a_huge_value(schema, table, tmp_path, capsys):
    hub = pytest.importorskip("nny_models.hub")
    from nny_models.cli import main

    torch.manual_seed(0)
    config = NnyNetConfig(
        model_kwargs={"size": "tiny", "fusion": "add", "clinical_features": schema.num_features},
        patch_size=(64, 64, 64), preprocessing=PreprocessConfig(spacing=(3.0, 3.0, 4.0)).to_dict(),
        clinical_schema=schema.to_dict(),
    )
    model_dir = tmp_path / "model"
    hub.NnyNet(config).save_pretrained(model_dir)
    ct, out = write_ct(tmp_path / "p2.nii.gz"), tmp_path / "mask.nii.gz"
    args = ["--device", "cpu", "--model", str(model_dir), "--input", str(ct), "--output", str(out)]

    other = write(tmp_path / "p1.csv", "case_id,age,afp_ng_ml,ascites,encephalopathy,cirrhosis,hbv\n"
                                       "p1,61,12.5,none,none,yes,t\n")
    assert main([*args, "--clinical", str(other)]) == 2
    err = capsys.readouterr().err
    assert "error: --clinical: clinical file" in err and "p1.csv" in err and "the row is for case 'p1'" in err
    assert "is case 'p2'" in err and not out.exists()

    huge = write(tmp_path / "huge.csv", "case_id,age,afp_ng_ml,ascites,encephalopathy,cirrhosis,hbv\n"
                                        "p2,61,1e308,none,none,yes,t\n")
    assert main([*args, "--clinical", str(huge)]) == 2
    err = capsys.readouterr().err
    assert "huge.csv" in err and "column 'afp_ng_ml': value '1e308'" in err and "schema" not in err
    assert not out.exists()


def test_cases_without_a_clinical_row_are_imputed_with_a_warning_naming_them(tmp_path):
    """A case missing from clinical.csv trained on an all-missing row without a word."""
    csv = tmp_path / "clinical.csv"
    csv.write_text("case_id,age\nliver_0,61\nliver_1,70\n")
    with pytest.warns(UserWarning, match=r"clinical\.csv: no row for 1 of the 3 case\(s\) \('liver_2'\); their "
                                         r"clinical values are all missing"):
        df = read_clinical_csv(csv, case_ids=["liver_0", "liver_1", "liver_2"])
    assert list(df.index) == ["liver_0", "liver_1", "liver_2"] and np.isnan(df.loc["liver_2", "age"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every case has its row: silent
        read_clinical_csv(csv, case_ids=["liver_0", "liver_1"])


def test_unit_slips_are_used_but_warned_about_naming_column_and_value(schema, tmp_path):
    """Age -5 or 500 used to reach the network without a word (only values 1e5 training scales off are refused).
    Training ages are 55-73 and AFP 8.5-1200 ng/ml (TABLE)."""
    row = {"case_id": "x", "age": 60, "afp_ng_ml": 40, "ascites": "none", "encephalopathy": "none",
           "cirrhosis": "no", "hbv": "f"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an ordinary row, and one a little outside the training range, are quiet
        schema.transform(row)
        schema.transform({**row, "age": 85, "afp_ng_ml": 3000})
    path = write(tmp_path / "x.json", json.dumps({**row, "age": -5}))
    with pytest.warns(UserWarning, match=r"x\.json: row 1 \(case 'x'\), column 'age': value -5 is negative, but "
                                         r"every training value was >= 0 \(55 to 73\); it is used as given"):
        vector, report = schema.transform(path, return_report=True)
    assert report.unusual_values == [("age", -5.0)] and np.isfinite(vector).all()
    months = {**row, "age": 61 * 12}
    with pytest.warns(UserWarning, match=r"column 'age': value 732 is far outside the training values \(55 to 73\)"):
        _, report = schema.transform(months, return_report=True)
    assert report.unusual_values == [("age", 732.0)]
