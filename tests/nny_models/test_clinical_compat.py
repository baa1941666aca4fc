"""A clinical schema written by the code of commit 8b0d24d (version 1, no "version" key) keeps giving the
vectors that code gave (fixture: fixtures/clinical_schema_v1.json, made by make_clinical_schema_v1.py)."""

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nny_models.clinical import SCHEMA_VERSION, ClinicalSchema

FIXTURE = Path(__file__).parent / "fixtures" / "clinical_schema_v1.json"


@pytest.fixture(scope="module")
def fixture():
    return json.loads(FIXTURE.read_text())


def test_v1_schema_gives_the_same_vectors(fixture):
    assert "version" not in fixture["schema"]
    schema = ClinicalSchema.from_dict(fixture["schema"])
    assert schema.version == 1 and schema.categories[1] == ["mild", "moderate"]  # the old "none" bug, frozen
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = schema.transform(fixture["rows"])
    np.testing.assert_array_equal(got, np.asarray(fixture["vectors"], dtype=np.float32))


def test_v1_schema_same_vectors_from_csv_files(fixture, tmp_path):
    schema = ClinicalSchema.from_dict(fixture["schema"])
    for i, (row, expected) in enumerate(zip(fixture["rows"], fixture["csv_vectors"])):
        path = tmp_path / f"row{i}.csv"
        pd.DataFrame([row]).to_csv(path, index=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = schema.transform(path)
        np.testing.assert_array_equal(got[0], np.asarray(expected, dtype=np.float32), err_msg=str(row))


def test_v1_schema_says_none_is_read_as_missing(fixture):
    """The model was trained with "none" imputed; the v1 schema replays that, and says so."""
    schema = ClinicalSchema.from_dict(fixture["schema"])
    row = dict(fixture["rows"][4])
    assert row["ascites"] == "none"
    with pytest.warns(UserWarning, match=r"'ascites': 'none' is read as missing.*version 1"):
        schema.transform(row)


def test_to_dict_is_versioned_and_round_trips(fixture):
    old = ClinicalSchema.from_dict(fixture["schema"])
    assert old.to_dict() == {**fixture["schema"], "version": 1}  # re-saved: same content, version explicit
    again = ClinicalSchema.from_dict(json.loads(json.dumps(old.to_dict())))
    assert again == old
    new = ClinicalSchema.from_dict({**fixture["schema"], "version": SCHEMA_VERSION})
    assert new.missing_strings != old.missing_strings
    with pytest.raises(ValueError, match="version 3 is not supported"):
        ClinicalSchema.from_dict({**fixture["schema"], "version": 3})
