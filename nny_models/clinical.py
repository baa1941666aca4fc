"""Clinical values, one vocabulary for training and inference: cell parsing, the clinical table, predict's
row reader, and the fitted preprocessing replayed from plain JSON (no sklearn, no pickle).

What a cell means (the same rules for the training table, a prediction's row and the schema):

- **missing**: only an empty cell, NaN, and null/None (``is_missing``). The text spellings "nan" and
  "null" also mean missing. Every other text is a value: "none", "no", "n/a" and "na" are categories
  kept as written (ascites "none" is "no ascites", not an unknown).
- **boolean**: true/false, yes/no, t/f, y/n (any case), 1/0 and Python/numpy booleans (``parse_boolean``).
- **numeric**: a finite number (text such as "12.5" is parsed); anything else in a numeric column is an
  error naming the file, the row (case id) and the column.
- **categorical**: the value as written (stripped); numbers become "1" / "2.5" (``category_key``).

Column types are inferred from the values (``infer_column_type``): booleans when every value is a boolean
word, numeric when every value is a number, categorical when most values are not numbers. A column whose
values are mostly numbers with some that are not (``"abc"`` among AFP values) is an error, unless its type
was declared: ``column_types={"afp_ng_ml": "numeric"}`` or a sidecar JSON next to the table
(``clinical.types.json`` beside ``clinical.csv``: ``{"bclc_stage": "categorical"}``).

``finetune.clinical.fit_clinical_schema`` fits, on the training fold only, the scikit-learn pipeline

    numeric columns:             IterativeImputer(BayesianRidge) -> StandardScaler
    categorical/boolean columns: SimpleImputer("most_frequent")  -> OneHotEncoder(handle_unknown="ignore")

and exports its fitted parameters into a :class:`ClinicalSchema`, which is stored in config.json.
``ClinicalSchema.transform`` replays that pipeline with numpy only; it reproduces sklearn's output
(``IterativeImputer.transform`` replays the fitted round-robin regressions, and BayesianRidge.predict
is linear: ``X @ coef + intercept``). Output features, in order: the scaled numeric columns, then one
one-hot block per categorical column.

Schema versions (``ClinicalSchema.version``): 2 is written today. A schema without a version (1) was
fitted by code that also read "none", "na" and "n/a" as missing; its model was trained that way, so such
a schema keeps reading them as missing (with a warning) and gives the vectors it always gave.

Input problems at inference:
- a known column absent from the input -> its values are treated as missing, imputed, and a warning
  names the column;
- a category never seen in training -> all-zero one-hot block (sklearn's handle_unknown="ignore") and a
  warning naming the column and value;
- a column the schema does not know -> ``ValueError`` naming it: a typo ("afp " for "afp") must not be
  silently dropped while its values are imputed. The id column (``case_id``) and columns that were
  dropped at fit time (all missing in training) are accepted and ignored;
- a non-numeric, infinite or absurd value (more than ``MAX_ABS_Z`` training standard deviations from the
  training mean, e.g. 1e308) in a numeric column, or a non-boolean in a boolean column -> ``ValueError``
  naming the column and the value (and the file and row when known).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np

if TYPE_CHECKING:  # pandas is imported where it is used: `import nny_models` stays light
    import pandas as pd

KINDS = ("numeric", "categorical", "boolean")
SCHEMA_VERSION = 2  # version written by fit_clinical_schema (see the module docstring)
MISSING_STRINGS = frozenset({"", "nan", "null"})  # text cells that mean "no value" (compared lower-cased)
# Version-1 schemas were fitted by code that also read these as missing; replayed for them only.
LEGACY_MISSING_STRINGS = frozenset({"", "na", "n/a", "nan", "none", "null"})
TRUE_STRINGS = frozenset({"true", "t", "yes", "y", "1", "1.0"})
FALSE_STRINGS = frozenset({"false", "f", "no", "n", "0", "0.0"})
BOOLEAN_HELP = "true/false, yes/no, t/f, y/n or 1/0"
# A numeric value this many "training scales" from the training mean is a typing error (1e308 would also overflow
# float32); it is refused rather than fed to the network. The scale is the largest of the training std, |mean|,
# the training range and 1, so that a column that barely varied in a small training set (std 0.3) does not refuse
# ordinary values, while heavy-tailed labs (AFP of 1e5 ng/ml beside a mean of 500) still pass.
MAX_ABS_Z = 1e5
# A value this many training scales (as above) beyond the training range, or negative in a column whose training
# values were all >= 0, is still used but warned about: the usual unit slips (age in months, albumin in g/L for
# g/dL) land there, and the network would read them as an extreme patient.
WARN_BEYOND_RANGE = 2.0
TYPES_HELP = "column_types={{{col!r}: 'categorical'}}, or a sidecar {{{col!r}: 'categorical'}} in <table>.types.json"

Where = Callable[[int], str]  # row index -> "clinical.csv: row 5 (case 'c3')" for error messages


# ----------------------------------------------------------------------------- cells


def is_missing(value: Any, missing_strings: frozenset[str] = MISSING_STRINGS) -> bool:
    """True for None, NaN, pandas NA/NaT and empty (or "nan"/"null") text; any other text is a value."""
    if value is None:
        return True
    if isinstance(value, str):
        return value.strip().lower() in missing_strings
    if type(value).__name__ in ("NAType", "NaTType"):  # pandas.NA / NaT, without importing pandas
        return True
    try:
        return bool(value != value)  # NaN is not equal to itself
    except (TypeError, ValueError):  # arrays and other non-scalars: not "missing", rejected later
        return False


def parse_boolean(value: Any) -> bool:
    """A boolean cell (see BOOLEAN_HELP) as bool; anything else is a ValueError."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, float, np.integer, np.floating)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        low = value.strip().lower()
        if low in TRUE_STRINGS:
            return True
        if low in FALSE_STRINGS:
            return False
    raise ValueError(f"expected a boolean ({BOOLEAN_HELP}), got {value!r}")


def parse_number(value: Any) -> float:
    """A numeric cell as a finite float; anything else is a ValueError (the caller names the column)."""
    if isinstance(value, (bool, np.bool_)):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if "_" in text:  # float() accepts "1_000"; a clinical table does not mean that
            raise ValueError(f"expected a number, got {value!r}")
        value = text
    try:
        x = float(value)
    except OverflowError:  # a JSON integer beyond float's range, e.g. 10**400
        raise ValueError(f"expected a finite number, got an integer of {len(str(abs(int(value))))} digits") from None
    except (TypeError, ValueError):
        raise ValueError(f"expected a number, got {value!r}") from None
    if not math.isfinite(x):
        raise ValueError(f"expected a finite number, got {value!r}")
    return x


def numeric_value(value: Any, column: str, missing_strings: frozenset[str] = MISSING_STRINGS) -> float:
    """A numeric cell as float (NaN if missing); anything else is a ValueError naming the column."""
    if is_missing(value, missing_strings):
        return math.nan
    try:
        return parse_number(value)
    except ValueError as err:
        raise ValueError(f"clinical column {column!r}: {err}") from None


def category_key(value: Any, kind: str = "categorical", missing_strings: frozenset[str] = MISSING_STRINGS) -> str | None:
    """The canonical string for a categorical or boolean cell (None if missing), shared by fit and transform.

    Numbers become "1" / "2.5" whatever their Python type (pandas turns int columns with gaps into
    floats); booleans become "true" / "false", and for boolean columns so does every spelling of
    BOOLEAN_HELP (any other value in a boolean column is a ValueError).
    """
    if is_missing(value, missing_strings):
        return None
    if kind == "boolean":
        return "true" if parse_boolean(value) else "false"
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    return str(value).strip()


def _is_number(value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return False
    try:
        parse_number(value)
    except ValueError:
        return isinstance(value, (int, float, np.integer, np.floating))  # inf is a (bad) number
    return True


def infer_column_type(
    values: Sequence[Any], column: str, where: Where | None = None, sidecar: str | Path | None = None
) -> str:
    """"boolean", "numeric" or "categorical" from a column's cells (missing cells ignored).

    boolean: every value is a boolean word or bool, with a word of 2+ letters or both truth values present
    (a column of only "F" is a category). A 0/1 column is numeric (it may be a count or a score).
    numeric: every value is a number. categorical: at most half of the values are numbers ("0" among
    BCLC stages A-D). Mostly numbers with some that are not: ValueError naming the row and the column
    (and ``sidecar``, the types file that would declare it).
    """
    present = [(i, v) for i, v in enumerate(values) if not is_missing(v)]
    if not present:
        return "numeric"  # all missing: fit drops such a column
    words = [v.strip().lower() if isinstance(v, str) else v for _, v in present]
    bool_words = (TRUE_STRINGS | FALSE_STRINGS) - {"1", "0", "1.0", "0.0"}
    if all(isinstance(w, (bool, np.bool_)) or (isinstance(w, str) and w in bool_words) for w in words):
        truths = {w if isinstance(w, (bool, np.bool_)) else w in TRUE_STRINGS for w in words}
        if len(truths) == 2 or any(isinstance(w, (bool, np.bool_)) or len(w) > 1 for w in words):
            return "boolean"
    numeric = [_is_number(v) for _, v in present]
    if all(numeric):
        return "numeric"
    if 2 * sum(numeric) >= len(present):  # mostly numbers and a few strings: a typo, not a category
        i, value = next(p for p, ok in zip(present, numeric) if not ok)
        place = where(i) if where else f"row {i + 1}"
        raise ValueError(
            f"{place}, column {column!r}: value {value!r} is not a number, but {sum(numeric)} of the column's "
            f"{len(present)} values are; fix the value, or declare the column's type: "
            + TYPES_HELP.format(col=column).replace("<table>.types.json", str(sidecar or "<table>.types.json"))
        )
    return "categorical"


# ----------------------------------------------------------------------------- reading rows


DECIMAL_COMMA = r"^\s*([+-]?\d+),(\d+)\s*$"  # a whole cell such as "12,5" in a ";"-separated file


def read_csv_text(path: Path) -> pd.DataFrame:
    """A clinical CSV as a DataFrame of text cells, exactly as written (no pandas NA guessing: "none" stays
    "none"). A spreadsheet's byte-order mark is dropped and ";" or tab separators (many locales save so) are
    detected from the header: read as commas, such a file is one column, and every clinical value would be
    imputed as missing. In a ";" file, decimal commas ("12,5") are read as numbers. Repeated column names are
    refused (pandas would rename the second to "age.1")."""
    import csv

    import pandas as pd

    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"clinical file {str(path)!r} is not UTF-8 text: {err}") from None
    header = text.split("\n", 1)[0]
    delimiter = max(",;\t", key=header.count)
    names = next(csv.reader([header], delimiter=delimiter), [])
    repeated = sorted({n.strip() for n in names if [m.strip() for m in names].count(n.strip()) > 1})
    if repeated:
        raise ValueError(f"clinical file {str(path)!r}: column(s) {repeated} appear more than once in the header; "
                         "expected one column per variable")
    try:
        df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, na_filter=False, sep=delimiter)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise ValueError(f"clinical file {str(path)!r} is not a readable CSV: {err}") from None
    if delimiter == ";":  # the locales that save ";" write decimal commas: "12,5" is 12.5, not a category
        df = df.apply(lambda col: col.str.replace(DECIMAL_COMMA, r"\1.\2", regex=True))
    return df


def _read_csv_cells(path: Path) -> list[dict[str, str]]:
    """A CSV as rows of text cells (read_csv_text)."""
    df = read_csv_text(path)
    return [{str(k): v for k, v in r.items()} for r in df.to_dict(orient="records")]


def _load(rows: Any) -> tuple[list[dict[str, Any]], str | None, int]:
    """(records, source file or None, number of the first data row as a user counts it)."""
    if isinstance(rows, (str, Path)):
        path = Path(rows).expanduser()
        name = str(path)
        if not path.is_file():
            raise ValueError(f"clinical file {name!r} does not exist")
        if path.suffix.lower() == ".json":
            try:
                data = json.loads(path.read_text(encoding="utf-8-sig"))  # an editor's byte-order mark is not JSON
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ValueError(f"clinical file {name!r} is not valid JSON: {err}") from None
            data = [data] if isinstance(data, dict) else data
            if not isinstance(data, list) or not data or not all(isinstance(r, dict) for r in data):
                raise ValueError(f"clinical file {name!r}: expected one JSON object (column -> value) or a list of them")
            return [{str(k): v for k, v in r.items()} for r in data], name, 1
        if path.suffix.lower() == ".csv":
            return _read_csv_cells(path), name, 2  # row 1 is the header
        raise ValueError(f"clinical file {name!r}: expected a .json or .csv file")
    if hasattr(rows, "to_dict") and hasattr(rows, "index") and not hasattr(rows, "columns"):  # pandas Series: one row
        rows = rows.to_dict()
    if hasattr(rows, "to_dict") and hasattr(rows, "columns"):  # pandas DataFrame (its index is ignored)
        return [{str(k): v for k, v in r.items()} for r in rows.to_dict(orient="records")], None, 1
    if isinstance(rows, dict):
        rows = [rows]
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"clinical input: expected a DataFrame, a dict or a list of dicts, got {type(rows).__name__}")
    return [{str(k): v for k, v in r.items()} for r in rows], None, 1


def load_rows(rows: Any) -> list[dict[str, Any]]:
    """Normalise clinical input to a list of {column: value} dicts.

    Accepts a pandas DataFrame (its index is ignored) or Series (one row), a dict (one row), a list of
    dicts, or a path to a .json file (an object or a list of objects) or a .csv file (header + rows,
    read as text: only empty cells are missing)."""
    return _load(rows)[0]


def _where(source: str | None, first: int | None, records: Sequence[dict[str, Any]], id_column: str) -> Where:
    """Row labels for errors; ``first`` = None when the row number in ``source`` is not known."""

    def where(i: int) -> str:
        cid = records[i].get(id_column) if i < len(records) else None
        case = f"case {str(cid).strip()!r}" if not is_missing(cid) else ""
        row = f"row {i + first}" if first is not None else ""
        detail = " ".join(p for p in (row, f"({case})" if row and case else case) if p)
        return f"{source or 'clinical input'}: {detail}" if detail else (source or "clinical input")

    return where


def image_case_ids(path: str | Path) -> list[str]:
    """The case ids an image path can stand for, derived as nny_models.io derives them: the file name
    without its image suffix (a DICOM folder: its name), and for nnU-Net's CASE_0000 also CASE."""
    from nny_models.io import IMAGE_SUFFIXES

    name = Path(path).expanduser().name
    for suffix in (*IMAGE_SUFFIXES, ".dcm"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    ids = [name]
    m = re.fullmatch(r"(.+)_\d{4}", name)
    if m:
        ids.append(m.group(1))
    return ids


def read_clinical_row(
    clinical: Any, case_id: str | Sequence[str] | None = None, id_column: str = "case_id", image: str | None = None
) -> dict[str, Any]:
    """The one clinical row that belongs to the image being segmented.

    ``case_id``: the image's case id (or the ids it may stand for, see image_case_ids); ``image`` only
    names the image in messages. When the rows carry ``id_column``, the row must match the case id:
    another patient's row is a ValueError, and so is a file with several rows and no way to tell
    which one is this image's. A single row without an id is accepted; for a file, a warning says the
    match could not be checked.
    """
    records, source, first = _load(clinical)
    name = f"clinical file {source!r}" if source else "clinical input"
    image = image or (f"case {case_id!r}" if isinstance(case_id, str) else "the image")
    if not records:
        raise ValueError(f"{name} has no data row")
    ids = [None if is_missing(r.get(id_column)) else str(r[id_column]).strip() for r in records]
    wanted = [case_id] if isinstance(case_id, str) else list(case_id or [])
    if any(i is not None for i in ids):
        if wanted:
            matches = [k for k, i in enumerate(ids) if i in wanted]
            if len(matches) > 1:
                raise ValueError(f"{name}: case {ids[matches[0]]!r} has {len(matches)} rows; expected one")
            if matches:
                return dict(records[matches[0]])
            if len(records) == 1:
                raise ValueError(
                    f"{name}: the row is for case {ids[0]!r}, but {image} is case {wanted[0]!r}; "
                    "pass this patient's row (the case_id must match the image file name)"
                )
            shown = [i for i in ids if i is not None][:5]
            raise ValueError(f"{name}: no row for case {wanted[0]!r} ({image}); its {id_column!r} values are {shown}...")
        if len(records) == 1:
            warnings.warn(f"{name}: the row is for case {ids[0]!r}; no case id is known for {image}, so the match "
                          "could not be checked")
            return dict(records[0])
        raise ValueError(f"{name} has {len(records)} rows and no case id is known for {image} to pick one; "
                         "give one data row")
    if len(records) > 1:
        raise ValueError(
            f"{name} has {len(records)} data rows and no {id_column!r} column to pick the row of {image}; "
            f"give one data row, or add a {id_column!r} column"
        )
    if source is not None:
        warnings.warn(f"{name} has no {id_column!r} column: could not check that its row belongs to {image}")
    return dict(records[0])


# ----------------------------------------------------------------------------- the clinical table


def types_sidecar(path: str | Path) -> Path:
    """Where declared column types of a clinical table live: clinical.csv -> clinical.types.json."""
    path = Path(path)
    return path.with_name(path.stem + ".types.json")


def _declared_types(path: Path, column_types: dict[str, str] | None) -> dict[str, str]:
    """Sidecar types overridden by the explicit ones; each checked against KINDS."""
    declared: dict[str, str] = {}
    sidecar = types_sidecar(path)
    if sidecar.is_file():
        try:
            data = json.loads(sidecar.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{sidecar}: invalid JSON ({err})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{sidecar}: expected an object {{column: type}}, got {type(data).__name__}")
        for col, kind in data.items():
            if kind not in KINDS:
                raise ValueError(f"{sidecar}: column {col!r} has type {kind!r}; expected one of {KINDS}")
        declared.update(data)
    for col, kind in (column_types or {}).items():
        if kind not in KINDS:
            raise ValueError(f"{path}: column_types[{col!r}] = {kind!r}; expected one of {KINDS}")
        declared[col] = kind
    return declared


def read_clinical_csv(
    path: str | Path,
    case_ids: Iterable[str] | None = None,
    id_column: str = "case_id",
    column_types: dict[str, str] | None = None,
):
    """Read the clinical table indexed by case id, with numeric/categorical/boolean columns.

    Types are inferred per column (see infer_column_type) unless declared in ``column_types``
    ({"afp": "numeric"}) or in the sidecar ``<table>.types.json`` (explicit ones win). Numeric ->
    float64, boolean -> pandas "boolean", categorical -> pandas "category" (values as written); only
    empty cells are missing. The final types are in ``df.attrs["column_types"]``. With ``case_ids``,
    every row must belong to a known case and cases without a row get all-missing values. Errors name
    the file, the row (as counted in a text editor, header = row 1), its case id and the column.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: clinical table not found")
    try:
        raw = read_csv_text(path)
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"{path}: could not read the CSV ({type(e).__name__}: {e})") from e
    if id_column not in raw.columns:
        raise ValueError(f"{path}: no id column {id_column!r}; columns are {list(raw.columns)}")
    declared = _declared_types(path, column_types)
    for col in declared:
        if col not in raw.columns or col == id_column:
            raise ValueError(f"{path}: column types name {col!r}, which is not a data column of the CSV")

    ids = [str(v).strip() for v in raw[id_column]]
    for row, cid in enumerate(ids):
        if not cid:
            raise ValueError(f"{path}: row {row + 2} has an empty {id_column!r}")
    seen: set[str] = set()
    for cid in ids:
        if cid in seen:
            raise ValueError(f"{path}: case id {cid!r} appears more than once in column {id_column!r}")
        seen.add(cid)
    records = [{id_column: cid} for cid in ids]
    where = _where(str(path), 2, records, id_column)

    out, types = {}, {}
    for col in raw.columns:
        if col == id_column:
            continue
        values = [v.strip() for v in raw[col]]
        kind = declared.get(col) or infer_column_type(values, col, where, types_sidecar(path))
        types[col] = kind
        out[col] = _convert(values, kind, col, where)
    df = pd.DataFrame(out, index=pd.Index(ids, name=id_column))

    if case_ids is not None:
        case_ids = [str(c) for c in case_ids]
        known = set(case_ids)
        for row, cid in enumerate(df.index):
            if cid not in known:
                raise ValueError(
                    f"{path}: row {row + 2} has case id {cid!r}, which is not one of the {len(known)} cases of the data set"
                )
        absent = [cid for cid in case_ids if cid not in set(df.index)]
        if absent:  # allowed (fusion learns a "no clinical data" query), but never silently
            shown = ", ".join(map(repr, absent[:5])) + (", ..." if len(absent) > 5 else "")
            warnings.warn(f"{path}: no row for {len(absent)} of the {len(case_ids)} case(s) ({shown}); their "
                          "clinical values are all missing and will be imputed", stacklevel=2)
        df = df.reindex(case_ids)  # cases without a row: all values missing
    df.attrs["column_types"] = types
    df.attrs["source"] = str(path)  # named in the errors of fit_clinical_schema
    return df


def _convert(values: list[str], kind: str, col: str, where: Where):
    import pandas as pd

    out: list[Any] = []
    for row, v in enumerate(values):
        if is_missing(v):
            out.append(None)
            continue
        try:
            out.append(parse_number(v) if kind == "numeric" else parse_boolean(v) if kind == "boolean" else v)
        except ValueError as err:
            raise ValueError(f"{where(row)}, column {col!r}: {err}") from None
    if kind == "numeric":
        return np.array([np.nan if v is None else v for v in out], dtype=np.float64)
    if kind == "boolean":
        return pd.array([pd.NA if v is None else v for v in out], dtype="boolean")
    return pd.Categorical(out)


# ----------------------------------------------------------------------------- the fitted schema


@dataclass
class ClinicalReport:
    """What transform had to repair in its input."""

    missing_columns: list[str] = field(default_factory=list)  # known columns absent from the input (imputed)
    unknown_categories: list[tuple[str, str]] = field(default_factory=list)  # (column, value) never seen in training
    unusual_values: list[tuple[str, float]] = field(default_factory=list)  # (column, value) far outside training
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
    version: int = 1  # 2 = written today; 1 (absent in the JSON) = fitted when "none"/"na"/"n/a" were missing

    def __post_init__(self) -> None:
        if self.version not in (1, SCHEMA_VERSION):
            raise ValueError(f"ClinicalSchema: version {self.version!r} is not supported (expected 1 or {SCHEMA_VERSION})")
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

    @property
    def missing_strings(self) -> frozenset[str]:
        """Text cells this schema reads as missing (version 1 replays the old, wider set)."""
        return LEGACY_MISSING_STRINGS if self.version == 1 else MISSING_STRINGS

    # ---- transform -----------------------------------------------------------------------------
    def transform(
        self, rows: Any, *, return_report: bool = False, source: str | None = None
    ) -> np.ndarray | tuple[np.ndarray, ClinicalReport]:
        """rows: DataFrame, dict (one row), list of dicts, or a .json / .csv path -> float32 (N, num_features).

        ``source`` names the input in error messages when ``rows`` is not a path (e.g. the file a dict
        was read from)."""
        records, path, first = _load(rows)
        if not records:
            raise ValueError("ClinicalSchema.transform: no rows given")
        # rows read here from a file: name it and its row numbers; rows read elsewhere: ``source`` only
        where = _where(path, first, records, self.id_column) if path else _where(
            source, None if source else first, records, self.id_column)
        report = ClinicalReport()
        self._check_columns(records, report)
        numeric, categorical = self.arrays(records, where)
        report.imputed_values = int(np.isnan(numeric).sum() + sum(v is None for v in categorical.ravel()))
        self._check_magnitude(numeric, records, where)
        self._warn_unusual(numeric, where, report)

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

    def arrays(self, records: list[dict[str, Any]], where: Where | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Canonical arrays: numeric float64 (N, n_num) with NaN for missing, categorical object (N, n_cat)
        of canonical strings or None. finetune.clinical feeds the same arrays to sklearn."""
        where = where or _where(None, 1, records, self.id_column)
        missing = self.missing_strings
        numeric = np.empty((len(records), len(self.numeric_columns)), dtype=np.float64)
        categorical = np.empty((len(records), len(self.categorical_columns)), dtype=object)
        for i, r in enumerate(records):
            for j, c in enumerate(self.numeric_columns):
                numeric[i, j] = self._cell(r.get(c), c, "numeric", missing, where, i)
            for j, c in enumerate(self.categorical_columns):
                categorical[i, j] = self._cell(r.get(c), c, self.kinds[c], missing, where, i)
        return numeric, categorical

    def _cell(self, value: Any, col: str, kind: str, missing: frozenset[str], where: Where, i: int) -> Any:
        if missing is not MISSING_STRINGS and not is_missing(value) and is_missing(value, missing):
            warnings.warn(
                f"clinical column {col!r}: {value!r} is read as missing, because this model's clinical schema "
                "(version 1) was fitted by code that read 'none'/'na'/'n/a' as missing; re-train for it to be a value"
            )
        try:
            if kind == "numeric":
                return math.nan if is_missing(value, missing) else parse_number(value)
            return category_key(value, kind, missing)
        except ValueError as err:
            raise ValueError(f"{where(i)}, column {col!r}: {err}") from None

    def _check_magnitude(self, numeric: np.ndarray, records: list[dict[str, Any]], where: Where) -> None:
        """Refuse observed values absurdly far from the training data (see MAX_ABS_Z), naming them."""
        mean, scale = np.asarray(self.scaler_mean, dtype=float), np.asarray(self.scaler_scale, dtype=float)
        span = np.asarray([(hi - lo) if lo is not None and hi is not None else 0.0
                           for lo, hi in zip(self.clip_min, self.clip_max)], dtype=float)
        scale = np.maximum.reduce([scale, np.abs(mean), span, np.ones_like(scale)])
        with np.errstate(over="ignore", invalid="ignore"):
            z = np.abs((numeric - mean) / scale)
        for i, j in zip(*np.nonzero(z > MAX_ABS_Z)):  # NaN (missing) compares False
            col = self.numeric_columns[j]
            lo, hi = self.clip_min[j], self.clip_max[j]
            seen = f"{lo:g} to {hi:g}" if lo is not None and hi is not None else f"about {mean[j]:g}"
            raise ValueError(
                f"{where(int(i))}, column {col!r}: value {records[i].get(col)!r} is {z[i, j]:.3g} training scales "
                f"(std, |mean| or range) from the training mean {mean[j]:g} (training values {seen}); more than {MAX_ABS_Z:g} is refused "
                "as a unit or typing error"
            )

    def _warn_unusual(self, numeric: np.ndarray, where: Where, report: ClinicalReport) -> None:
        """Warn about observed values far outside the training range (see WARN_BEYOND_RANGE), naming them."""
        for j, col in enumerate(self.numeric_columns):
            lo, hi = self.clip_min[j], self.clip_max[j]
            if lo is None or hi is None:  # a constant training column: no range to compare with
                continue
            scale = max(float(self.scaler_scale[j]), abs(float(self.scaler_mean[j])), hi - lo, 1.0)
            for i in np.flatnonzero(np.isfinite(numeric[:, j])):
                value = float(numeric[i, j])
                negative = value < 0 <= lo
                if negative or not lo - WARN_BEYOND_RANGE * scale <= value <= hi + WARN_BEYOND_RANGE * scale:
                    report.unusual_values.append((col, value))
                    why = ("negative, but every training value was >= 0" if negative
                           else "far outside the training values")
                    warnings.warn(f"{where(int(i))}, column {col!r}: value {value:g} is {why} ({lo:g} to {hi:g}); "
                                  "it is used as given: check its unit and typing")

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
