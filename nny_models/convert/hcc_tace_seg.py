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
  label volume is on the CT grid by construction; the NIfTI affine is the DICOM geometry in RAS. A SEG whose
  own geometry disagrees with those slices (frame of reference, rows / columns, pixel spacing, orientation or a
  frame's position) is an error: placed by reference, it would land on the CT shifted or scaled;
- one SEG per CT series, and every SOP instance once: a second SEG of a series, or a second copy of a file,
  would make two training cases of one scan (the same patient on both sides of a validation split).

DST is written as a whole into a hidden sibling folder and swapped in when every case converted: an error or a
kill leaves DST as it was (empty, absent, or the previous conversion), never a mix. DST must lie outside SRC;
``--overwrite`` replaces a previous conversion (a folder holding only imagesTr/, labelsTr/, dataset.json,
clinical.csv), never a folder with other files.

The clinical spreadsheet's published headers are mapped through a column-mapping JSON (default
``hcc_tace_seg_columns.json``: pre-treatment variables only, no outcome leaks into the inputs).
Needs the optional extra ``nnynet[dicom]`` (pydicom, highdicom, openpyxl).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nny_models.paths import fsync_file

HERE = Path(__file__).resolve().parent
DEFAULT_SEGMENTS = HERE / "hcc_tace_seg_segments.json"
DEFAULT_COLUMNS = HERE / "hcc_tace_seg_columns.json"
CT_STORAGE = ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1")  # CT / Enhanced CT Image Storage
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
OUTPUTS = ("imagesTr", "labelsTr", "dataset.json", "clinical.csv")  # everything convert writes into DST
ORIENTATION_ATOL = 1e-3  # direction cosines: a SEG frame on its CT slice agrees to DS precision
SPACING_RTOL = 1e-3  # pixel spacing, relative
POSITION_VOXELS = 0.5  # a SEG frame half a pixel or more from its CT slice is on another grid (less is rounding)


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
    frame_of_reference: str = ""
    geometry: dict[str, dict[str, Any]] = field(default_factory=dict)  # SOPInstanceUID -> slice plane (CT)


def _floats(value: Any) -> list[float] | None:
    try:
        return [float(v) for v in value]
    except (TypeError, ValueError):
        return None


def _has_preamble(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


def scan_dicom(src: Path) -> dict[str, Series]:
    """All DICOM series under src, keyed by SeriesInstanceUID (headers only; non-DICOM files are skipped).

    A file with the DICOM preamble that cannot be read, and a SOPInstanceUID found in two files (a second copy
    of the download), are ConversionErrors naming the files."""
    pydicom = _need("pydicom")
    series: dict[str, Series] = {}
    seen: dict[str, Path] = {}  # SOPInstanceUID -> file
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (pydicom.errors.InvalidDicomError, OSError):
            continue
        except Exception as err:  # a truncated or malformed header: pydicom raises many types
            if _has_preamble(path):
                raise ConversionError(f"{path}: unreadable DICOM header ({_first_line(err)})") from None
            continue
        if "SeriesInstanceUID" not in ds or "SOPInstanceUID" not in ds:
            continue
        sop = str(ds.SOPInstanceUID)
        if sop in seen:
            raise ConversionError(f"{path}: SOPInstanceUID {sop} is also in {seen[sop]} (two copies of one DICOM "
                                  "instance, e.g. a collection downloaded twice); keep one copy under SRC")
        seen[sop] = path
        s = series.setdefault(ds.SeriesInstanceUID, Series(ds.SeriesInstanceUID, str(ds.get("Modality", "")),
                                                           str(ds.get("PatientID", "")),
                                                           frame_of_reference=str(ds.get("FrameOfReferenceUID", ""))))
        s.files.append(path)
        s.sop_uids.append(sop)
        if s.modality == "CT":  # what check_seg_geometry compares a SEG frame with
            s.geometry[sop] = {"path": path, "ImagePositionPatient": _floats(ds.get("ImagePositionPatient")),
                               "ImageOrientationPatient": _floats(ds.get("ImageOrientationPatient")),
                               "PixelSpacing": _floats(ds.get("PixelSpacing")),
                               "Rows": ds.get("Rows"), "Columns": ds.get("Columns")}  # fmt: skip
    return series


def _first_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text[:300]


# ----------------------------------------------------------------------------- CT


def read_ct_series(series: Series) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(HU volume (X=columns, Y=rows, Z=slices), 4x4 RAS affine, SOPInstanceUIDs in slice order)."""
    pydicom = _need("pydicom")
    slices = []
    for path in series.files:
        try:
            slices.append(pydicom.dcmread(path))
        except Exception as err:  # read the headers once already: the file changed or is corrupt
            raise ConversionError(f"{path}: unreadable CT slice ({_first_line(err)})") from None
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
    pixels = []
    for ds, path in zip(slices, files):
        try:
            pixels.append(ds.pixel_array)
        except Exception as err:  # truncated pixel data, an unsupported transfer syntax, a missing decoder
            raise ConversionError(f"{path}: cannot decode the CT pixel data ({_first_line(err)})") from None
        if pixels[-1].shape != (int(ds.Rows), int(ds.Columns)):
            raise ConversionError(f"{path}: pixel data of shape {pixels[-1].shape}, expected Rows x Columns "
                                  f"{int(ds.Rows)} x {int(ds.Columns)} (a single-frame CT slice)")
    stack = np.stack(pixels, axis=-1)  # (rows, cols, Z)
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
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConversionError(f"{path}: cannot read the segment mapping: {err}") from None
    shape = "expected {'labels': [background, ...], 'segments': {label: [names]}, 'ignore': [names]}"
    if not isinstance(spec, dict):
        raise ConversionError(f"{path}: {shape}, got a JSON {type(spec).__name__}")
    labels, segments, ignore = spec.get("labels"), spec.get("segments"), spec.get("ignore", [])
    if not isinstance(labels, list) or len(labels) < 2 or not isinstance(segments, dict):
        raise ConversionError(f"{path}: {shape}")
    if not all(isinstance(n, str) and n.strip() for n in labels) or len(set(labels)) != len(labels):
        raise ConversionError(f"{path}: labels: expected unique non-empty names, got {labels}")
    if not isinstance(ignore, list) or not all(isinstance(n, str) for n in ignore):
        raise ConversionError(f"{path}: ignore: expected a list of segment names, got {ignore!r}")
    aliases = {}
    for label, names in segments.items():
        if label not in labels[1:]:
            raise ConversionError(f"{path}: segments.{label}: not one of the labels {labels[1:]}")
        names = [names] if isinstance(names, str) else names
        if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names):
            raise ConversionError(f"{path}: segments.{label}: expected a list of segment names, got {names!r}")
        for name in names:
            if _norm(name) in aliases and aliases[_norm(name)] != label:
                raise ConversionError(f"{path}: segment name {name!r} maps to both {aliases[_norm(name)]} and {label}")
            aliases[_norm(name)] = label
    return labels, aliases, {_norm(n) for n in ignore}


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
    refs = list(getattr(seg, "ReferencedSeriesSequence", None) or [])
    if len(refs) != 1 or "SeriesInstanceUID" not in refs[0]:
        raise ConversionError(f"{seg_path}: expected the SEG to reference exactly one CT series "
                              f"(ReferencedSeriesSequence with a SeriesInstanceUID), found {len(refs)}")
    items = list(getattr(refs[0], "ReferencedInstanceSequence", None) or [])
    if not all("ReferencedSOPInstanceUID" in i for i in items):
        raise ConversionError(f"{seg_path}: ReferencedInstanceSequence: an item lacks ReferencedSOPInstanceUID")
    return str(refs[0].SeriesInstanceUID), {str(i.ReferencedSOPInstanceUID) for i in items}


def _functional_item(frame: Any, shared: Any, sequence: str) -> Any:
    """The first item of a functional group for one frame: its own (per-frame) or the shared one; None if neither."""
    for group in (frame, shared):
        if group is not None and sequence in group and len(group[sequence].value):
            return group[sequence].value[0]
    return None


def check_seg_geometry(seg: Any, seg_path: Path, ct: Series) -> None:
    """ConversionError unless the SEG lies on the grid of ``ct``: the same frame of reference, rows and columns,
    and every frame with the pixel spacing, orientation and position of the CT slice it was derived from.

    read_seg_labels places frames by referenced SOP instance, whatever geometry the SEG states; a SEG drawn on
    another grid (resampled, shifted, another reconstruction) would be placed on the CT silently misaligned."""
    if seg.get("FrameOfReferenceUID") and ct.frame_of_reference and \
            str(seg.FrameOfReferenceUID) != ct.frame_of_reference:  # fmt: skip
        raise ConversionError(f"{seg_path}: FrameOfReferenceUID {seg.FrameOfReferenceUID} differs from the CT "
                              f"series' {ct.frame_of_reference} ({ct.files[0].parent}); expected a SEG drawn on it")
    first = ct.geometry.get(ct.sop_uids[0], {})
    size = (seg.get("Rows"), seg.get("Columns"))
    if None not in size and first.get("Rows") is not None and \
            (int(size[0]), int(size[1])) != (int(first["Rows"]), int(first["Columns"])):  # fmt: skip
        raise ConversionError(f"{seg_path}: Rows x Columns {int(size[0])} x {int(size[1])} differ from the CT's "
                              f"{int(first['Rows'])} x {int(first['Columns'])} ({first['path']})")
    shared_items = seg.get("SharedFunctionalGroupsSequence") or []
    shared = shared_items[0] if len(shared_items) else None
    for number, frame in enumerate(seg.get("PerFrameFunctionalGroupsSequence") or [], start=1):
        stated = {
            "ImageOrientationPatient": _functional_item(frame, shared, "PlaneOrientationSequence"),
            "PixelSpacing": _functional_item(frame, shared, "PixelMeasuresSequence"),
            "ImagePositionPatient": _functional_item(frame, shared, "PlanePositionSequence"),
        }
        stated = {tag: _floats(item.get(tag)) if item is not None else None for tag, item in stated.items()}
        sources = [str(src.ReferencedSOPInstanceUID) for d in frame.get("DerivationImageSequence") or []
                   for src in d.get("SourceImageSequence") or [] if "ReferencedSOPInstanceUID" in src]
        for sop in sources:
            plane = ct.geometry.get(sop)
            if plane is None:  # not in this series: referenced_series_uid / the instance check report it
                continue
            spacing = plane["PixelSpacing"] or [1.0, 1.0]
            tolerance = {"ImageOrientationPatient": ORIENTATION_ATOL,
                         "PixelSpacing": SPACING_RTOL * max(spacing),
                         "ImagePositionPatient": POSITION_VOXELS * min(spacing)}  # fmt: skip
            for tag, atol in tolerance.items():
                ours, theirs = stated[tag], plane[tag]
                if ours is None or theirs is None:  # absent: nothing to compare (the CT check names a missing tag)
                    continue
                if len(ours) != len(theirs) or not np.allclose(ours, theirs, rtol=0, atol=atol):
                    raise ConversionError(
                        f"{seg_path}: frame {number}: {tag} {[round(v, 4) for v in ours]} differs from "
                        f"{[round(v, 4) for v in theirs]} of the CT slice it was derived from ({plane['path']}); "
                        "expected the SEG on the CT's grid (placed by reference it would be misaligned)"
                    )


def read_seg_labels(seg_path: Path, ct: Series, sop_order: list[str], shape: tuple[int, int, int],
                    labels: list[str], aliases: dict[str, str], ignored: set[str]) -> np.ndarray:
    """uint8 label volume (X, Y, Z) on the CT grid; overlapping segments: the later label in ``labels`` wins."""
    hd = _need("highdicom")
    pydicom = _need("pydicom")
    try:
        seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(seg_path))
    except Exception as err:  # truncated pixel data, a malformed functional group: highdicom raises many types
        raise ConversionError(f"{seg_path}: not a readable DICOM-SEG ({_first_line(err)})") from None
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
    try:
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=sop_order, segment_numbers=[n for _, n in wanted],
            assert_missing_frames_are_empty=True,  # SEGs omit empty frames: those CT slices have no segment
        )  # (Z, rows, cols, segments)
    except Exception as err:  # corrupt pixel data, frames without a source reference
        raise ConversionError(f"{seg_path}: cannot place the SEG frames on the CT slices ({_first_line(err)})") \
            from None  # fmt: skip
    if pixels.shape[:3] != (shape[2], shape[1], shape[0]):
        raise ConversionError(f"{seg_path}: frames of {pixels.shape[1:3]} do not match the CT's {shape[1::-1]}")
    out = np.zeros(shape, dtype=np.uint8)
    for i, (value, _) in enumerate(wanted):
        out[pixels[..., i].transpose(2, 1, 0) >= 0.5] = value
    return out


# ----------------------------------------------------------------------------- clinical


COLUMN_TYPES = ("number", "text")  # a column map's optional "type" of a column without "values"


def load_column_map(path: Path | None) -> dict[str, Any]:
    path = Path(path) if path else DEFAULT_COLUMNS
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConversionError(f"{path}: cannot read the column mapping: {err}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("id_column"), str) or \
            not isinstance(spec.get("columns"), dict):  # fmt: skip
        raise ConversionError(f"{path}: expected {{'id_column': header, 'columns': {{name: {{'source': header}}}}}}")
    for name, col in spec["columns"].items():
        if not isinstance(col, dict) or not isinstance(col.get("source"), str):
            raise ConversionError(f"{path}: columns.{name}: expected {{'source': header, 'values': {{...}}}}")
        values, kind = col.get("values"), col.get("type")
        if values is not None and (not isinstance(values, dict) or
                                   not all(isinstance(v, (str, int, float)) for v in values.values())):  # fmt: skip
            raise ConversionError(f"{path}: columns.{name}.values: expected {{cell text: output value}}, "
                                  f"got {values!r}")
        if kind is not None and (kind not in COLUMN_TYPES or values):
            raise ConversionError(f"{path}: columns.{name}.type: expected one of {list(COLUMN_TYPES)} on a column "
                                  f"without 'values', got {kind!r}")
    spec["_path"] = str(path)
    return spec


def read_spreadsheet(path: Path):
    """The sheet as text cells (empty / NA -> missing)."""
    import pandas as pd

    if path.suffix.lower() not in (".xlsx", ".xlsm", ".csv"):
        raise ConversionError(f"{path}: expected the clinical spreadsheet as .xlsx or .csv")
    if path.suffix.lower() != ".csv":
        _need("openpyxl")
    try:
        return pd.read_excel(path, dtype=str) if path.suffix.lower() != ".csv" else pd.read_csv(path, dtype=str)
    except Exception as err:  # a corrupt .xlsx (BadZipFile), an empty or undecodable .csv: pandas raises many types
        raise ConversionError(f"{path}: cannot read the clinical spreadsheet ({_first_line(err)})") from None


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
    ids = sheet[headers[spec["id_column"]]].fillna("").astype(str).str.strip()
    blank = ids == ""
    # Rows without an ID cannot be matched to a scan: blank rows (spreadsheet padding) are dropped quietly, rows
    # with values are named.
    orphans = [i + 2 for i in np.flatnonzero(blank.to_numpy()) if sheet.iloc[i].notna().any()]
    if orphans:
        warnings.warn(f"{sheet_path}: row(s) {orphans[:10]} have values but no {spec['id_column']}; skipped")
    sheet, ids = sheet[~blank.to_numpy()], ids[~blank]
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
        if col.get("type") == "number" and not _is_finite_number(text):  # "abc" would turn the column categorical
            raise ConversionError(f"{path}: patient {patient}, column {col['source']!r}: value {text!r} is not a "
                                  f"number (expected a finite number for {name}; empty = missing)")
        return text
    lookup = {str(k).strip().lower(): v for k, v in values.items()}
    if text.lower() not in lookup:
        raise ConversionError(f"{path}: patient {patient}, column {col['source']!r}: value {text!r} is not in the "
                              f"mapping for {name} (expected one of {list(values)})")
    return lookup[text.lower()]


def _is_finite_number(text: str) -> bool:
    try:
        return bool(np.isfinite(float(text)))
    except ValueError:
        return False


# ----------------------------------------------------------------------------- driver


def find_spreadsheet(src: Path) -> Path | None:
    candidates = sorted(p for p in src.rglob("*")
                        if p.suffix.lower() in (".xlsx", ".csv") and "clinical" in p.name.lower())
    if len(candidates) > 1:
        raise ConversionError(f"{src}: several clinical spreadsheets {[str(c) for c in candidates]}; pass --clinical")
    return candidates[0] if candidates else None


def check_destination(src: Path, dst: Path, overwrite: bool, inputs: dict[str, Path]) -> None:
    """ConversionError unless DST may be replaced by the conversion: not a file, outside SRC (and SRC not inside
    it), holding none of the ``inputs`` (flag -> file), and empty or (with overwrite) a previous conversion."""
    if dst.exists() and not dst.is_dir():
        raise ConversionError(f"{dst}: is a file; expected the output folder")
    s, d = src.resolve(), dst.resolve()
    if d == s or d.is_relative_to(s) or s.is_relative_to(d):
        raise ConversionError(f"{dst}: the output folder overlaps the source folder {src}; choose a folder outside "
                              "it (the output would be scanned as input, or an input replaced by an output)")
    for flag, path in inputs.items():
        if path.resolve().is_relative_to(d):
            raise ConversionError(f"{flag} {path}: is inside the output folder {dst}, which the conversion "
                                  "replaces; move it out")
    if not dst.exists():
        return
    entries = sorted(p.name for p in dst.iterdir())
    if entries and not overwrite:
        raise ConversionError(f"{dst}: exists and is not empty (pass --overwrite to replace a previous conversion)")
    foreign = [e for e in entries if e not in OUTPUTS]
    if foreign:
        raise ConversionError(f"{dst}: holds {foreign[:5]}, which nnynet-convert does not write; --overwrite "
                              "replaces the whole folder, so choose an empty or new one")


def convert(src: str | Path, dst: str | Path, *, clinical: str | Path | None = None, segments: str | Path | None = None,
            columns: str | Path | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Convert SRC to the MSD layout in DST; returns the dataset.json content. DST is written aside and swapped in
    once complete: an error (or a kill) leaves it as it was."""
    src, dst = Path(src).expanduser(), Path(os.path.abspath(Path(dst).expanduser()))
    if dst.is_symlink():  # swap the folder it points to: exchanging the link itself would leave the old data behind
        dst = dst.resolve()
    if not src.is_dir():
        raise ConversionError(f"{src}: not a folder (expected the downloaded HCC-TACE-Seg collection)")
    given = {flag: Path(p).expanduser() for flag, p in (("--clinical", clinical), ("--segments", segments),
                                                         ("--columns", columns)) if p}  # fmt: skip
    check_destination(src, dst, overwrite, given)
    labels, aliases, ignored = load_segment_map(given.get("--segments"))
    spec = load_column_map(given.get("--columns"))
    sheet = given.get("--clinical") or find_spreadsheet(src)
    if clinical and not sheet.is_file():
        raise ConversionError(f"--clinical {sheet}: no such file" if not sheet.exists() else
                              f"--clinical {sheet}: not a file (expected the .xlsx or .csv spreadsheet)")

    series = scan_dicom(src)
    segs = [s for s in series.values() if s.modality == "SEG"]
    if not segs:
        raise ConversionError(f"{src}: found {len(series)} DICOM series and no DICOM-SEG (Modality SEG)")
    pydicom = _need("pydicom")
    # Check every SEG's references, geometry and segment names from the headers before writing anything.
    jobs, patient_of_case, seg_of_ct = [], {}, {}
    for seg_series in sorted(segs, key=lambda s: (s.patient_id, s.uid)):
        for seg_path in seg_series.files:
            try:
                header = pydicom.dcmread(seg_path, stop_before_pixels=True)
            except Exception as err:
                raise ConversionError(f"{seg_path}: unreadable DICOM-SEG header ({_first_line(err)})") from None
            uid, instances = referenced_series_uid(header, seg_path)
            ct = series.get(uid)
            if ct is None or ct.modality != "CT":
                found = sorted(f"{s.uid} ({s.modality})" for s in series.values()
                               if s.patient_id == seg_series.patient_id and s.modality != "SEG")
                raise ConversionError(f"{seg_path}: references CT series {uid}, which is not under {src} "
                                      f"(series of patient {seg_series.patient_id!r} found: {found or 'none'})")
            if uid in seg_of_ct:  # two cases of one scan: the same patient in training and validation
                raise ConversionError(f"{seg_path}: references CT series {uid}, as {seg_of_ct[uid]} does; expected "
                                      "one SEG per CT series (keep one of them under SRC)")
            seg_of_ct[uid] = seg_path
            if seg_series.patient_id and ct.patient_id and seg_series.patient_id != ct.patient_id:
                raise ConversionError(f"{seg_path}: SEG of patient {seg_series.patient_id!r} references CT series "
                                      f"{uid} of patient {ct.patient_id!r}")
            missing = instances - set(ct.sop_uids)
            if missing:
                raise ConversionError(f"{seg_path}: references {len(missing)} CT instance(s) missing from series {uid} "
                                      f"under {ct.files[0].parent} (e.g. {sorted(missing)[0]})")
            if "SegmentSequence" not in header:
                raise ConversionError(f"{seg_path}: no SegmentSequence; expected a DICOM-SEG with segments")
            for desc in header.SegmentSequence:
                _segment_label(desc, aliases, ignored, seg_path)
            check_seg_geometry(header, seg_path, ct)
            case_id = _case_id(ct.patient_id or seg_series.patient_id, patient_of_case)
            patient_of_case[case_id] = ct.patient_id or seg_series.patient_id
            jobs.append((case_id, seg_path, ct))
    # The spreadsheet too, before the long part: a bad cell stops the conversion before any pixel is read.
    table = convert_clinical(sheet, spec, patient_of_case) if sheet is not None else None
    if sheet is None:
        warnings.warn(f"{src}: no clinical spreadsheet found (pass --clinical); clinical.csv not written")

    from nny_models.training.files import writing_dir

    # Into a hidden sibling, swapped in whole: never a half-converted data set (imagesTr/ alone reads as one).
    with writing_dir(dst) as tmp:
        return _write(jobs, tmp, table, labels, aliases, ignored)


def _write(jobs, out: Path, table, labels: list[str], aliases: dict[str, str], ignored: set[str]) -> dict[str, Any]:
    import nibabel as nib

    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    training = []
    for case_id, seg_path, ct in jobs:
        volume, affine, order = read_ct_series(ct)
        label = read_seg_labels(seg_path, ct, order, volume.shape, labels, aliases, ignored)
        image_rel, label_rel = f"imagesTr/{case_id}.nii.gz", f"labelsTr/{case_id}.nii.gz"
        for array, rel in ((volume, image_rel), (label, label_rel)):
            img = nib.Nifti1Image(array, affine)
            img.set_qform(affine, code=1)
            img.set_sform(affine, code=1)
            nib.save(img, out / rel)
            fsync_file(out / rel)
        training.append({"image": f"./{image_rel}", "label": f"./{label_rel}"})
        print(f"{case_id}: CT {volume.shape} from series {ct.uid}, labels "
              f"{ {labels[v]: int(n) for v, n in zip(*np.unique(label, return_counts=True)) if v} }")
    meta = {
        "name": "HCC-TACE-Seg", "description": "TCIA HCC-TACE-Seg converted by nnynet-convert",
        "tensorImageSize": "3D", "modality": {"0": "CT"}, "labels": {str(i): n for i, n in enumerate(labels)},
        "numTraining": len(training), "numTest": 0, "training": training, "test": [],
    }  # fmt: skip
    if table is not None:
        table.to_csv(out / "clinical.csv")
        fsync_file(out / "clinical.csv")
    (out / "dataset.json").write_text(json.dumps(meta, indent=2))
    fsync_file(out / "dataset.json")
    return meta


def _case_id(patient: str, taken: dict[str, str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", patient.strip()).lstrip(".") or "case"  # no hidden / "..": names
    if base not in taken:
        return base
    k = 2
    while f"{base}_{k}" in taken:
        k += 1
    return f"{base}_{k}"
