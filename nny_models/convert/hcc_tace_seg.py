"""HCC-TACE-Seg (TCIA) -> MSD layout (imagesTr/, labelsTr/, dataset.json) plus clinical.csv.

    nnynet-convert hcc-tace-seg SRC DST [--clinical FILE.xlsx|.csv] [--segments MAP.json] [--columns MAP.json]

SRC is the collection as TCIA's downloader writes it (per patient: CT DICOM series and one DICOM-SEG whose
segments are Liver, Mass, Portal vein and Abdominal aorta) plus the clinical spreadsheet; any folder nesting
works, files are grouped by their DICOM UIDs. For every SEG:

- the CT series is the one the SEG references (ReferencedSeriesSequence); a SEG referencing a series that is
  not under SRC, or instances missing from it, is an error, never a guess;
- segments map to labels by SegmentLabel / SegmentDescription through a JSON mapping (default
  ``hcc_tace_seg_segments.json`` beside this module), case-insensitively; an unknown segment is an error;
- frames are placed on the CT slices they were derived from (highdicom, by referenced SOP instance), so the
  label volume is on the CT grid by construction; the NIfTI affine is the DICOM geometry in RAS.

The clinical spreadsheet's published headers are mapped through a column-mapping JSON (default
``hcc_tace_seg_columns.json``: pre-treatment variables only, no outcome leaks into the inputs).
Needs the optional extra ``nnynet[dicom]`` (pydicom, highdicom, openpyxl).
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_SEGMENTS = HERE / "hcc_tace_seg_segments.json"
DEFAULT_COLUMNS = HERE / "hcc_tace_seg_columns.json"
CT_STORAGE = ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1")  # CT / Enhanced CT Image Storage
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class ConversionError(ValueError):
    """The source data cannot be converted as it is (the message names the file and what was expected)."""


def _need(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"nnynet-convert needs {module}, which is not installed: "
                          "pip install 'nnynet[dicom]'") from err


# ----------------------------------------------------------------------------- scanning


@dataclass
class Series:
    uid: str
    modality: str
    patient_id: str
    files: list[Path] = field(default_factory=list)
    sop_uids: list[str] = field(default_factory=list)


def scan_dicom(src: Path) -> dict[str, Series]:
    """All DICOM series under src, keyed by SeriesInstanceUID (headers only; non-DICOM files are skipped)."""
    pydicom = _need("pydicom")
    series: dict[str, Series] = {}
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (pydicom.errors.InvalidDicomError, OSError):
            continue
        if "SeriesInstanceUID" not in ds or "SOPInstanceUID" not in ds:
            continue
        s = series.setdefault(ds.SeriesInstanceUID, Series(ds.SeriesInstanceUID, str(ds.get("Modality", "")),
                                                           str(ds.get("PatientID", ""))))
        s.files.append(path)
        s.sop_uids.append(str(ds.SOPInstanceUID))
    return series


# ----------------------------------------------------------------------------- CT


def read_ct_series(series: Series) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(HU volume (X=columns, Y=rows, Z=slices), 4x4 RAS affine, SOPInstanceUIDs in slice order)."""
    pydicom = _need("pydicom")
    slices = [pydicom.dcmread(p) for p in series.files]
    first = slices[0]
    where = f"CT series {series.uid} ({series.files[0].parent})"
    for ds, path in zip(slices, series.files):
        for tag in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "Rows", "Columns"):
            if tag not in ds:
                raise ConversionError(f"{path}: CT slice lacks {tag}; expected a single-frame CT image")
        same = (ds.Rows, ds.Columns) == (first.Rows, first.Columns) and np.allclose(
            [float(v) for v in ds.ImageOrientationPatient], [float(v) for v in first.ImageOrientationPatient], atol=1e-4
        ) and np.allclose([float(v) for v in ds.PixelSpacing], [float(v) for v in first.PixelSpacing], atol=1e-4)
        if not same:
            raise ConversionError(f"{path}: size, orientation or pixel spacing differs from {series.files[0]} "
                                  f"in {where}")
    iop = np.array([float(v) for v in first.ImageOrientationPatient])
    row_dir, col_dir = iop[:3], iop[3:]  # directions of increasing column index / increasing row index
    normal = np.cross(row_dir, col_dir)
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in slices])
    order = np.argsort(positions @ normal, kind="stable")
    positions = positions[order]
    slices = [slices[i] for i in order]
    files = [series.files[i] for i in order]
    if len(slices) > 1:
        steps = np.diff(positions, axis=0)
        gaps = np.linalg.norm(steps, axis=1)
        if gaps.min() < 1e-3:
            raise ConversionError(f"{where}: two slices share one position ({files[int(np.argmin(gaps))]}); "
                                  "expected one slice per position")
        if gaps.max() - gaps.min() > 1e-3 * max(1.0, gaps.mean()):
            raise ConversionError(f"{where}: uneven slice spacing ({gaps.min():.4f} to {gaps.max():.4f} mm); "
                                  "expected a regularly spaced axial series")
        slice_vec = (positions[-1] - positions[0]) / (len(slices) - 1)
    else:
        slice_vec = normal * float(first.get("SliceThickness", 1.0) or 1.0)
    dr, dc = (float(v) for v in first.PixelSpacing)  # spacing between rows, between columns
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row_dir * dc, col_dir * dr, slice_vec, positions[0]

    slopes = [float(ds.get("RescaleSlope", 1) or 1) for ds in slices]
    intercepts = [float(ds.get("RescaleIntercept", 0) or 0) for ds in slices]
    stack = np.stack([ds.pixel_array for ds in slices], axis=-1)  # (rows, cols, Z)
    hu = stack.astype(np.float64) * np.array(slopes) + np.array(intercepts)
    integral = all(s.is_integer() for s in slopes + intercepts) and -32768 <= hu.min() and hu.max() <= 32767
    volume = hu.astype(np.int16 if integral else np.float32).transpose(1, 0, 2)  # (cols, rows, Z) = (X, Y, Z)
    return volume, LPS_TO_RAS @ lps, [str(ds.SOPInstanceUID) for ds in slices]


# ----------------------------------------------------------------------------- SEG


def _norm(text: str) -> str:
    return " ".join(re.split(r"[\s_\-/]+", str(text).strip().lower())).strip()


def load_segment_map(path: Path | None) -> tuple[list[str], dict[str, str], set[str]]:
    """(label names, normalised alias -> label name, normalised ignored names) from a segment-mapping JSON."""
    path = Path(path) if path else DEFAULT_SEGMENTS
    try:
        spec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConversionError(f"{path}: cannot read the segment mapping: {err}") from None
    labels, segments = spec.get("labels"), spec.get("segments")
    if not isinstance(labels, list) or len(labels) < 2 or not isinstance(segments, dict):
        raise ConversionError(f"{path}: expected {{'labels': [background, ...], 'segments': {{label: [names]}}}}")
    aliases = {}
    for label, names in segments.items():
        if label not in labels[1:]:
            raise ConversionError(f"{path}: segments.{label}: not one of the labels {labels[1:]}")
        for name in [names] if isinstance(names, str) else names:
            if _norm(name) in aliases and aliases[_norm(name)] != label:
                raise ConversionError(f"{path}: segment name {name!r} maps to both {aliases[_norm(name)]} and {label}")
            aliases[_norm(name)] = label
    return labels, aliases, {_norm(n) for n in spec.get("ignore", [])}


def _segment_label(desc, aliases: dict[str, str], ignored: set[str], seg_path: Path) -> str | None:
    names = [str(desc.get("SegmentLabel", "")), str(desc.get("SegmentDescription", ""))]
    for name in names:
        key = _norm(name)
        for candidate in (key, re.sub(r"\s*\d+$", "", key)):  # "Mass 2" is a second mass
            if candidate in aliases:
                return aliases[candidate]
            if candidate and candidate in ignored:
                return None
    raise ConversionError(
        f"{seg_path}: segment {int(desc.SegmentNumber)} ({' / '.join(n for n in names if n)!r}) matches no label of "
        f"the segment mapping (known names: {sorted(aliases)}); add it to a --segments JSON (or to its 'ignore' list)"
    )


def referenced_series_uid(seg, seg_path: Path) -> tuple[str, set[str]]:
    """The CT series a SEG was drawn on and the SOP instances it references."""
    refs = list(getattr(seg, "ReferencedSeriesSequence", []))
    if len(refs) != 1:
        raise ConversionError(f"{seg_path}: expected the SEG to reference exactly one CT series "
                              f"(ReferencedSeriesSequence), found {len(refs)}")
    instances = {str(i.ReferencedSOPInstanceUID) for i in getattr(refs[0], "ReferencedInstanceSequence", [])}
    return str(refs[0].SeriesInstanceUID), instances


def read_seg_labels(seg_path: Path, ct: Series, sop_order: list[str], shape: tuple[int, int, int],
                    labels: list[str], aliases: dict[str, str], ignored: set[str]) -> np.ndarray:
    """uint8 label volume (X, Y, Z) on the CT grid; overlapping segments: the later label in ``labels`` wins."""
    hd = _need("highdicom")
    pydicom = _need("pydicom")
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(seg_path))
    uid, instances = referenced_series_uid(seg, seg_path)
    if uid != ct.uid:
        raise ConversionError(f"{seg_path}: references CT series {uid}, not {ct.uid}")
    missing = instances - set(sop_order)
    if missing:
        raise ConversionError(f"{seg_path}: references {len(missing)} CT instance(s) that are not in series {uid} "
                              f"under {ct.files[0].parent} (e.g. {sorted(missing)[0]})")
    wanted = []  # (label value, segment number)
    for desc in seg.SegmentSequence:
        name = _segment_label(desc, aliases, ignored, seg_path)
        if name is not None:
            wanted.append((labels.index(name), int(desc.SegmentNumber)))
    if not wanted:
        raise ConversionError(f"{seg_path}: no segment maps to a label")
    wanted.sort()
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=sop_order, segment_numbers=[n for _, n in wanted],
        assert_missing_frames_are_empty=True,  # SEGs omit empty frames: those CT slices have no segment
    )  # (Z, rows, cols, segments)
    if pixels.shape[:3] != (shape[2], shape[1], shape[0]):
        raise ConversionError(f"{seg_path}: frames of {pixels.shape[1:3]} do not match the CT's {shape[1::-1]}")
    out = np.zeros(shape, dtype=np.uint8)
    for i, (value, _) in enumerate(wanted):
        out[pixels[..., i].transpose(2, 1, 0) >= 0.5] = value
    return out


# ----------------------------------------------------------------------------- clinical


def load_column_map(path: Path | None) -> dict[str, Any]:
    path = Path(path) if path else DEFAULT_COLUMNS
    try:
        spec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConversionError(f"{path}: cannot read the column mapping: {err}") from None
    if not isinstance(spec.get("id_column"), str) or not isinstance(spec.get("columns"), dict):
        raise ConversionError(f"{path}: expected {{'id_column': header, 'columns': {{name: {{'source': header}}}}}}")
    for name, col in spec["columns"].items():
        if not isinstance(col, dict) or not isinstance(col.get("source"), str):
            raise ConversionError(f"{path}: columns.{name}: expected {{'source': header, 'values': {{...}}}}")
    spec["_path"] = str(path)
    return spec


def read_spreadsheet(path: Path):
    """The sheet as text cells (empty / NA -> missing)."""
    import pandas as pd

    if path.suffix.lower() in (".xlsx", ".xlsm"):
        _need("openpyxl")
        return pd.read_excel(path, dtype=str)
    if path.suffix.lower() == ".csv":
        return pd.read_csv(path, dtype=str)
    raise ConversionError(f"{path}: expected the clinical spreadsheet as .xlsx or .csv")


def convert_clinical(sheet_path: Path, spec: dict[str, Any], patient_of_case: dict[str, str]):
    """clinical.csv rows (a DataFrame indexed like patient_of_case) from the spreadsheet and the column mapping."""
    import pandas as pd

    sheet = read_spreadsheet(sheet_path)
    headers = {str(h).strip(): h for h in sheet.columns}
    need = [spec["id_column"]] + sorted({c["source"] for c in spec["columns"].values()})
    absent = [h for h in need if h not in headers]
    if absent:
        raise ConversionError(f"{sheet_path}: column(s) {absent} of the mapping {spec['_path']} are not in the "
                              f"spreadsheet (its headers: {list(headers)})")
    ids = sheet[headers[spec["id_column"]]].astype(str).str.strip()
    if ids.duplicated().any():
        raise ConversionError(f"{sheet_path}: {spec['id_column']} {sorted(set(ids[ids.duplicated()]))} appears twice")
    rows_by_id = dict(zip(ids, range(len(sheet))))
    unknown = sorted({p for p in patient_of_case.values() if p not in rows_by_id})
    if len(unknown) == len(set(patient_of_case.values())):
        raise ConversionError(f"{sheet_path}: none of the imaged patients ({sorted(set(patient_of_case.values()))[:5]}"
                              f"...) is in column {spec['id_column']} (e.g. {list(rows_by_id)[:3]})")
    if unknown:
        warnings.warn(f"{sheet_path}: no clinical row for patient(s) {unknown}; their clinical values are missing")
    out = {}
    for case_id, patient in patient_of_case.items():
        row = {}
        for name, col in spec["columns"].items():
            cell = sheet.iloc[rows_by_id[patient]][headers[col["source"]]] if patient in rows_by_id else None
            row[name] = _map_cell(cell, col, sheet_path, patient, name)
        out[case_id] = row
    frame = pd.DataFrame.from_dict(out, orient="index", columns=list(spec["columns"]))
    frame.index.name = "case_id"
    return frame


def _map_cell(cell: Any, col: dict[str, Any], path: Path, patient: str, name: str) -> Any:
    if cell is None or (isinstance(cell, float) and np.isnan(cell)) or str(cell).strip() == "":
        return None
    text = str(cell).strip()
    values = col.get("values")
    if not values:
        return text
    lookup = {str(k).strip().lower(): v for k, v in values.items()}
    if text.lower() not in lookup:
        raise ConversionError(f"{path}: patient {patient}, column {col['source']!r}: value {text!r} is not in the "
                              f"mapping for {name} (expected one of {list(values)})")
    return lookup[text.lower()]


# ----------------------------------------------------------------------------- driver


def find_spreadsheet(src: Path) -> Path | None:
    candidates = sorted(p for p in src.rglob("*")
                        if p.suffix.lower() in (".xlsx", ".csv") and "clinical" in p.name.lower())
    if len(candidates) > 1:
        raise ConversionError(f"{src}: several clinical spreadsheets {[str(c) for c in candidates]}; pass --clinical")
    return candidates[0] if candidates else None


def convert(src: str | Path, dst: str | Path, *, clinical: str | Path | None = None, segments: str | Path | None = None,
            columns: str | Path | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Convert SRC to the MSD layout in DST; returns the dataset.json content. Nothing is left in DST when the
    conversion stops on an error."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise ConversionError(f"{src}: not a folder (expected the downloaded HCC-TACE-Seg collection)")
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise ConversionError(f"{dst}: exists and is not empty (pass --overwrite to write into it)")
    labels, aliases, ignored = load_segment_map(Path(segments) if segments else None)
    spec = load_column_map(Path(columns) if columns else None)
    sheet = Path(clinical) if clinical else find_spreadsheet(src)
    if clinical and not sheet.is_file():
        raise ConversionError(f"--clinical {sheet}: no such file")

    series = scan_dicom(src)
    segs = [s for s in series.values() if s.modality == "SEG"]
    if not segs:
        raise ConversionError(f"{src}: found {len(series)} DICOM series and no DICOM-SEG (Modality SEG)")
    pydicom = _need("pydicom")
    # Check every SEG's references and segment names from the headers before writing anything.
    jobs = []
    for seg_series in sorted(segs, key=lambda s: (s.patient_id, s.uid)):
        for seg_path in seg_series.files:
            header = pydicom.dcmread(seg_path, stop_before_pixels=True)
            uid, instances = referenced_series_uid(header, seg_path)
            ct = series.get(uid)
            if ct is None or ct.modality != "CT":
                found = sorted(f"{s.uid} ({s.modality})" for s in series.values()
                               if s.patient_id == seg_series.patient_id and s.modality != "SEG")
                raise ConversionError(f"{seg_path}: references CT series {uid}, which is not under {src} "
                                      f"(series of patient {seg_series.patient_id!r} found: {found or 'none'})")
            missing = instances - set(ct.sop_uids)
            if missing:
                raise ConversionError(f"{seg_path}: references {len(missing)} CT instance(s) missing from series {uid} "
                                      f"under {ct.files[0].parent} (e.g. {sorted(missing)[0]})")
            for desc in header.SegmentSequence:
                _segment_label(desc, aliases, ignored, seg_path)
            jobs.append((seg_series, seg_path, ct))
    written: list[Path] = []
    try:
        return _write(jobs, dst, src, sheet, spec, labels, aliases, ignored, written)
    except BaseException:
        for path in written:  # never leave a half-converted data set that a stage could read as complete
            path.unlink(missing_ok=True)
        raise


def _write(jobs, dst: Path, src: Path, sheet: Path | None, spec: dict[str, Any], labels: list[str],
           aliases: dict[str, str], ignored: set[str], written: list[Path]) -> dict[str, Any]:
    import nibabel as nib

    (dst / "imagesTr").mkdir(parents=True, exist_ok=True)
    (dst / "labelsTr").mkdir(parents=True, exist_ok=True)
    training, patient_of_case = [], {}
    for seg_series, seg_path, ct in jobs:
        volume, affine, order = read_ct_series(ct)
        label = read_seg_labels(seg_path, ct, order, volume.shape, labels, aliases, ignored)
        case_id = _case_id(ct.patient_id or seg_series.patient_id, patient_of_case)
        patient_of_case[case_id] = ct.patient_id or seg_series.patient_id
        image_rel, label_rel = f"imagesTr/{case_id}.nii.gz", f"labelsTr/{case_id}.nii.gz"
        for array, rel in ((volume, image_rel), (label, label_rel)):
            img = nib.Nifti1Image(array, affine)
            img.set_qform(affine, code=1)
            img.set_sform(affine, code=1)
            written.append(dst / rel)
            nib.save(img, dst / rel)
        training.append({"image": f"./{image_rel}", "label": f"./{label_rel}"})
        print(f"{case_id}: CT {volume.shape} from series {ct.uid}, labels "
              f"{ {labels[v]: int(n) for v, n in zip(*np.unique(label, return_counts=True)) if v} }")
    meta = {
        "name": "HCC-TACE-Seg", "description": "TCIA HCC-TACE-Seg converted by nnynet-convert",
        "tensorImageSize": "3D", "modality": {"0": "CT"}, "labels": {str(i): n for i, n in enumerate(labels)},
        "numTraining": len(training), "numTest": 0, "training": training, "test": [],
    }  # fmt: skip
    if sheet is not None:  # before dataset.json: a bad cell stops the conversion with nothing left behind
        table = convert_clinical(sheet, spec, patient_of_case)
        written.append(dst / "clinical.csv")
        table.to_csv(dst / "clinical.csv")
    written.append(dst / "dataset.json")
    (dst / "dataset.json").write_text(json.dumps(meta, indent=2))
    if sheet is None:
        warnings.warn(f"{src}: no clinical spreadsheet found (pass --clinical); clinical.csv not written")
    return meta


def _case_id(patient: str, taken: dict[str, str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", patient.strip()) or "case"
    if base not in taken:
        return base
    k = 2
    while f"{base}_{k}" in taken:
        k += 1
    return f"{base}_{k}"
