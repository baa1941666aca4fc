"""Reading CT volumes, discovering cases in common data set layouts, and the case manifest.

Volumes come back as float32 arrays in the file's own voxel order plus a 4x4 RAS affine (the
NIfTI convention, which MONAI's readers also use); preprocessing reorients them.
"""

from __future__ import annotations

import csv
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

NIFTI_SUFFIXES = (".nii.gz", ".nii")
IMAGE_SUFFIXES = (*NIFTI_SUFFIXES, ".nrrd", ".nhdr")
COLUMN_TYPES = ("numeric", "categorical", "boolean")
_TRUE = {"true", "yes", "y", "t", "1", "1.0"}
_FALSE = {"false", "no", "n", "f", "0", "0.0"}


@dataclass
class CaseRecord:
    """One case: an image file (or DICOM series folder) and an optional label file."""

    case_id: str  # unique id, also the join key of the clinical table
    image: str  # absolute path to the image (.nii/.nii.gz/.nrrd or a DICOM series folder)
    label: str | None = None  # absolute path to the label volume, or None for unlabeled cases


# ----------------------------------------------------------------------------- reading volumes


def _strip_suffix(name: str) -> str:
    for suffix in (*IMAGE_SUFFIXES, ".dcm"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _is_dicom_dir(path: Path) -> bool:
    if not path.is_dir():
        return False
    from pydicom.misc import is_dicom

    return any(f.suffix.lower() == ".dcm" or (f.is_file() and is_dicom(f)) for f in path.iterdir() if f.is_file())


def _as_3d(array: np.ndarray, path: Path) -> np.ndarray:
    """Accept (X,Y,Z) or (X,Y,Z,1); anything else is not a CT volume."""
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3 or min(array.shape) < 2:
        raise ValueError(
            f"{path}: expected a 3D volume (X, Y, Z) with at least 2 voxels per axis, got shape {tuple(array.shape)}"
        )
    return array


def load_volume(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a .nii/.nii.gz/.nrrd file or a DICOM series folder -> (float32 (X,Y,Z), 4x4 RAS affine)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    name = path.name.lower()
    try:
        if name.endswith(NIFTI_SUFFIXES):
            import nibabel as nib

            img = nib.load(str(path))
            array, affine = img.get_fdata(dtype=np.float32), np.asarray(img.affine, dtype=np.float64)
        elif name.endswith((".nrrd", ".nhdr")) or _is_dicom_dir(path):
            array, affine = _load_with_monai(path)
        else:
            raise ValueError(f"{path}: unsupported format; expected .nii, .nii.gz, .nrrd or a DICOM series folder")
    except (ValueError, ImportError):
        raise
    except Exception as e:  # truncated gzip, bad header, unreadable DICOM, ...
        raise ValueError(f"{path}: could not read the volume ({type(e).__name__}: {e}); is the file complete?") from e
    return np.ascontiguousarray(_as_3d(array, path), dtype=np.float32), affine


def _load_with_monai(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """NRRD (MONAI NrrdReader, needs pynrrd) and DICOM series (MONAI PydicomReader), both with RAS affines."""
    from monai.transforms import LoadImage

    if path.is_dir():
        from monai.data import PydicomReader

        reader = PydicomReader()
    else:
        try:
            import nrrd  # noqa: F401
        except ImportError as e:
            raise ImportError(f"{path}: reading NRRD needs pynrrd, which is not installed: pip install pynrrd") from e
        from monai.data import NrrdReader

        reader = NrrdReader()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns about optional GPU decoders on every DICOM read
        img = LoadImage(reader=reader, image_only=True)(str(path))
    return np.asarray(img, dtype=np.float32), np.asarray(img.affine, dtype=np.float64)


def read_header(path: str | Path) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Shape (X,Y,Z) and voxel spacing in mm from the header only, without decoding voxel data."""
    path = Path(path)
    name = path.name.lower()
    try:
        if name.endswith(NIFTI_SUFFIXES):
            import nibabel as nib

            header = nib.load(str(path)).header
            shape, zooms = header.get_data_shape(), header.get_zooms()
            return tuple(int(s) for s in shape[:3]), tuple(float(z) for z in zooms[:3])
        if path.is_dir():
            return _dicom_header(path)
    except Exception as e:
        raise ValueError(f"{path}: could not read the header ({type(e).__name__}: {e})") from e
    # NRRD and anything else: decode once (pynrrd headers are cheap, but keep one code path)
    array, affine = load_volume(path)
    return tuple(array.shape), tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))


def _dicom_header(path: Path) -> tuple[tuple[int, ...], tuple[float, ...]]:
    import pydicom

    slices = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(path.iterdir()) if f.is_file()]
    slices = [s for s in slices if "ImagePositionPatient" in s]
    if len(slices) < 2:
        raise ValueError("expected a DICOM series with at least 2 slices")
    normal = np.cross(*np.asarray(slices[0].ImageOrientationPatient, dtype=float).reshape(2, 3))
    positions = np.sort([float(np.dot(normal, s.ImagePositionPatient)) for s in slices])
    dz = float(np.median(np.diff(positions)))
    row_spacing, col_spacing = (float(v) for v in slices[0].PixelSpacing)
    # MONAI's PydicomReader swaps i/j so that X runs along columns, like the other readers
    return (int(slices[0].Columns), int(slices[0].Rows), len(slices)), (col_spacing, row_spacing, dz)


# ----------------------------------------------------------------------------- layouts


def discover_cases(source: str | Path) -> list[CaseRecord]:
    """Find the cases of an MSD folder, an nnU-Net raw folder, a plain image folder or a CSV/JSONL manifest."""
    source = Path(source)
    if source.is_file():
        if source.suffix.lower() in (".csv", ".jsonl"):
            records = _from_manifest(source)
        else:
            raise ValueError(f"{source}: expected a folder or a .csv/.jsonl manifest (columns case_id,image[,label])")
    elif not source.is_dir():
        raise FileNotFoundError(f"{source}: no such file or directory")
    elif (source / "dataset.json").exists() and "training" in _read_json(source / "dataset.json"):
        records = _from_msd(source)
    elif (source / "imagesTr").is_dir() or (source / "imagesTs").is_dir():
        records = _from_images_tr(source)
    else:
        records = _from_plain_folder(source)
    if not records:
        raise ValueError(f"{source}: no cases found (looked for {', '.join(IMAGE_SUFFIXES)} files or DICOM folders)")
    _check_records(records, source)
    return records


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e


def _from_msd(root: Path) -> list[CaseRecord]:
    """Medical Segmentation Decathlon: dataset.json lists training {image, label} dicts and test image paths."""
    meta = _read_json(root / "dataset.json")
    records = []
    for i, entry in enumerate(meta.get("training", [])):
        if not isinstance(entry, dict) or "image" not in entry:
            raise ValueError(f"{root / 'dataset.json'}: training[{i}] should be {{'image': ..., 'label': ...}}")
        image = (root / entry["image"]).resolve()
        label = (root / entry["label"]).resolve() if entry.get("label") else None
        records.append(CaseRecord(_strip_suffix(image.name), str(image), str(label) if label else None))
    for entry in meta.get("test", []):
        image = (root / (entry["image"] if isinstance(entry, dict) else entry)).resolve()
        records.append(CaseRecord(_strip_suffix(image.name), str(image), None))
    return records


def _from_images_tr(root: Path) -> list[CaseRecord]:
    """nnU-Net raw (imagesTr/CASE_0000.nii.gz + labelsTr/CASE.nii.gz) or an MSD-style folder without dataset.json."""
    records = []
    for images_dir, labels_dir in (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs")):
        files = _image_files(root / images_dir)
        names = {_strip_suffix(f.name): f for f in files}
        channels: dict[str, list[str]] = {}
        for stem in names:
            m = re.fullmatch(r"(.+)_(\d{4})", stem)
            case, channel = (m.group(1), m.group(2)) if m else (stem, None)
            channels.setdefault(case, []).append(channel or "")
        for case, chans in sorted(channels.items()):
            if chans != [""] and sorted(chans) != ["0000"]:
                raise ValueError(
                    f"{root / images_dir}: case {case!r} has channels {sorted(chans)}; "
                    "nnynet expects exactly one CT channel per case (_0000)"
                )
            image = names[case + ("_0000" if chans == ["0000"] else "")]
            label = _find_image(root / labels_dir, case)
            records.append(CaseRecord(case, str(image.resolve()), str(label.resolve()) if label else None))
    return records


def _from_plain_folder(root: Path) -> list[CaseRecord]:
    """Every image file (and every DICOM series sub-folder) is one unlabeled case."""
    records = [CaseRecord(_strip_suffix(f.name), str(f.resolve())) for f in _image_files(root)]
    records += [CaseRecord(d.name, str(d.resolve())) for d in sorted(root.iterdir()) if _is_dicom_dir(d)]
    return records


def _from_manifest(path: Path) -> list[CaseRecord]:
    """CSV or JSONL rows with case_id, image[, label]; relative paths are relative to the manifest."""
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        rows = []
        for i, line in enumerate(path.read_text().splitlines()):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {i + 1} is not valid JSON ({e})") from e
    records = []
    for i, row in enumerate(rows):
        if not row.get("case_id") or not row.get("image"):
            raise ValueError(f"{path}: row {i + 1} needs non-empty 'case_id' and 'image' columns, got {dict(row)}")
        image = (path.parent / str(row["image"])).resolve()
        label = (path.parent / str(row["label"])).resolve() if row.get("label") else None
        records.append(CaseRecord(str(row["case_id"]), str(image), str(label) if label else None))
    return records


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(f for f in folder.iterdir() if f.is_file() and f.name.lower().endswith(IMAGE_SUFFIXES))


def _find_image(folder: Path, stem: str) -> Path | None:
    for f in _image_files(folder):
        if _strip_suffix(f.name) == stem:
            return f
    return None


def _check_records(records: Sequence[CaseRecord], source: Path) -> None:
    seen: set[str] = set()
    for r in records:
        if r.case_id in seen:
            raise ValueError(f"{source}: case id {r.case_id!r} appears more than once")
        seen.add(r.case_id)
        for kind, p in (("image", r.image), ("label", r.label)):
            if p is not None and not Path(p).exists():
                raise FileNotFoundError(f"{source}: {kind} of case {r.case_id!r} not found: {p}")


# ----------------------------------------------------------------------------- clinical table


def read_clinical_csv(
    path: str | Path,
    case_ids: Iterable[str] | None = None,
    id_column: str = "case_id",
    column_types: dict[str, str] | None = None,
):
    """Read the clinical table indexed by case id, with numeric/categorical/boolean columns.

    Types are inferred per column and can be overridden with ``column_types`` ({"afp": "numeric"}).
    Numeric -> float64, boolean -> pandas "boolean", categorical -> pandas "category"; the final types
    are in ``df.attrs["column_types"]``. With ``case_ids``, every row must belong to a known case and
    cases without a row get all-missing values.
    """
    import pandas as pd

    path = Path(path)
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=True)
    except Exception as e:
        raise ValueError(f"{path}: could not read the CSV ({type(e).__name__}: {e})") from e
    if id_column not in raw.columns:
        raise ValueError(f"{path}: no id column {id_column!r}; columns are {list(raw.columns)}")
    column_types = dict(column_types or {})
    for col, kind in column_types.items():
        if col not in raw.columns or col == id_column:
            raise ValueError(f"{path}: column_types names {col!r}, which is not a data column of the CSV")
        if kind not in COLUMN_TYPES:
            raise ValueError(f"{path}: column_types[{col!r}] = {kind!r}; expected one of {COLUMN_TYPES}")

    ids = raw[id_column]
    for row, cid in enumerate(ids):
        if pd.isna(cid) or not str(cid).strip():
            raise ValueError(f"{path}: row {row + 2} has an empty {id_column!r}")
    duplicated = ids[ids.duplicated()]
    if len(duplicated):
        raise ValueError(f"{path}: case id {duplicated.iloc[0]!r} appears more than once in column {id_column!r}")

    out, types = {}, {}
    for col in raw.columns:
        if col == id_column:
            continue
        values = raw[col].str.strip()
        kind = column_types.get(col) or _infer_type(values, path, col, ids)
        types[col] = kind
        out[col] = _convert(values, kind, path, col, ids)
    df = pd.DataFrame(out, index=pd.Index(ids.str.strip(), name=id_column))

    if case_ids is not None:
        case_ids = [str(c) for c in case_ids]
        known = set(case_ids)
        for row, cid in enumerate(df.index):
            if cid not in known:
                raise ValueError(
                    f"{path}: row {row + 2} has case id {cid!r}, which is not one of the {len(known)} cases of the data set"
                )
        df = df.reindex(case_ids)  # cases without a row: all values missing
    df.attrs["column_types"] = types
    return df


def _infer_type(values, path: Path, col: str, ids) -> str:
    import pandas as pd

    present = values.dropna()
    if len(present) == 0:
        return "numeric"
    lowered = set(present.str.lower())
    # words only: a 0/1 column may be a count or a score that happens to be small (override it if boolean)
    if lowered <= (_TRUE | _FALSE) - {"0", "1", "0.0", "1.0"}:
        return "boolean"
    parsed = pd.to_numeric(present, errors="coerce")
    if parsed.notna().all():
        return "numeric"
    if parsed.notna().mean() >= 0.8:  # mostly numbers and a few strings: a typo, not a category
        bad = parsed.isna().idxmax()
        raise ValueError(
            f"{path}: row {bad + 2} (case {ids[bad]!r}), column {col!r}: value {values[bad]!r} is not a number, "
            f"but the other values of the column are; fix it or pass column_types={{{col!r}: 'categorical'}}"
        )
    return "categorical"


def _convert(values, kind: str, path: Path, col: str, ids):
    import pandas as pd

    if kind == "numeric":
        parsed = pd.to_numeric(values, errors="coerce")
        bad = values.notna() & parsed.isna()
        if bad.any():
            row = bad.idxmax()
            raise ValueError(
                f"{path}: row {row + 2} (case {ids[row]!r}), column {col!r}: expected a number, got {values[row]!r}"
            )
        return parsed.astype("float64").to_numpy()
    if kind == "boolean":
        out = []
        for row, v in enumerate(values):
            if pd.isna(v):
                out.append(pd.NA)
            elif v.lower() in _TRUE:
                out.append(True)
            elif v.lower() in _FALSE:
                out.append(False)
            else:
                raise ValueError(
                    f"{path}: row {row + 2} (case {ids[row]!r}), column {col!r}: expected a boolean "
                    f"(true/false, yes/no, 1/0), got {v!r}"
                )
        return pd.array(out, dtype="boolean")
    return pd.Categorical(values)


# ----------------------------------------------------------------------------- manifest


def build_manifest(records: Sequence[CaseRecord], clinical=None):
    """A datasets.Dataset with one row per case: case_id, image, label, spacing, shape and clinical columns.

    Shapes and spacings come from the headers (no voxel data is decoded). Shard it per rank with
    ``manifest.shard(num_shards=world_size, index=rank)``.
    """
    import datasets
    import pandas as pd

    columns: dict[str, list[Any]] = {"case_id": [], "image": [], "label": [], "spacing": [], "shape": []}
    for r in records:
        shape, spacing = read_header(r.image)
        columns["case_id"].append(r.case_id)
        columns["image"].append(r.image)
        columns["label"].append(r.label)
        columns["spacing"].append([float(s) for s in spacing])
        columns["shape"].append([int(s) for s in shape])
    features = {
        "case_id": datasets.Value("string"),
        "image": datasets.Value("string"),
        "label": datasets.Value("string"),
        "spacing": datasets.Sequence(datasets.Value("float64"), length=3),
        "shape": datasets.Sequence(datasets.Value("int64"), length=3),
    }
    if clinical is not None:
        table = clinical.reindex(columns["case_id"])
        for col in table.columns:
            if col in columns:
                raise ValueError(f"clinical column {col!r} clashes with a manifest column; rename it")
            series = table[col]
            if isinstance(series.dtype, pd.CategoricalDtype) or series.dtype == object:
                columns[col] = [None if pd.isna(v) else str(v) for v in series]
                features[col] = datasets.Value("string")
            elif pd.api.types.is_bool_dtype(series.dtype):
                columns[col] = [None if pd.isna(v) else bool(v) for v in series]
                features[col] = datasets.Value("bool")
            else:
                columns[col] = [float(v) for v in series.astype("float64")]  # NaN = missing
                features[col] = datasets.Value("float64")
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))
