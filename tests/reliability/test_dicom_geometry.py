"""DICOM geometry as the headers state it, and image paths that are not regular files.

A DICOM series whose decimal-string (DS) values are longer than DICOM's 16 characters (Python float reprs such as
'0.9999999999999998', which scripts writing DICOM from computed floats produce) loaded with a made-up identity
affine (1 mm voxels, origin 0, x and y swapped), and nnynet-predict wrote a wrong mask with exit code 0: MONAI's
PydicomReader reads its metadata through ``to_json_dict(suppress_invalid_tags=True)``, which drops the over-long
ImageOrientationPatient / ImagePositionPatient, and the reader's warning was silenced. Such a series now loads with
the geometry its headers state (as the same series with rounded values loads), and an affine from the reader that
disagrees with the headers is refused, naming the folder and the tag.

A named pipe (FIFO) given as the image hung forever (opening it waits for a writer); it is now refused at once.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

from nny_models.io import load_volume, read_header

pydicom = pytest.importorskip("pydicom")
cli = pytest.importorskip("nny_models.cli")
monai_data = pytest.importorskip("monai.data")

from pydicom.uid import generate_uid  # noqa: E402

from tests.reliability.test_fault_catalogue import ct_slice  # noqa: E402

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
SHAPE = (24, 20, 8)  # (columns, rows, slices)
ROW_SP, COL_SP, DZ = 0.9, 0.7, 2.5  # between rows, between columns, between slices (mm)
IPP0 = np.array([-30.0, -40.0, 12.0])  # first slice, LPS
LONG_AXIAL_IOP = ["0.9999999999999998", "0.0", "1.2246467991473532e-16", "0.0", "1.0", "0.0"]


def ct(shape=SHAPE) -> np.ndarray:
    """Air around a soft-tissue body with an off-centre bone block, so a flip or a swap changes the array."""
    v = np.full(shape, -1000.0, np.float32)
    v[3:-3, 3:-3, 1:-1] = 50.0
    v[5:11, 4:8, 2:5] = 300.0
    return v


def write_series(folder: Path, volume: np.ndarray, iop: list, *, fmt=lambda v: round(float(v), 6),
                 pixel_spacing=(ROW_SP, COL_SP)) -> Path:
    """One CT slice per z, slice k at IPP0 + k * DZ * normal (as in test_fault_catalogue.write_series). ``fmt``
    writes each position value: a rounded float, or ``repr`` for a DS longer than 16 characters. ``iop`` values
    are written as given (strings keep their length)."""
    folder.mkdir(parents=True)
    row, col = (np.asarray([float(v) for v in iop[i:i + 3]]) for i in (0, 3))
    normal = np.cross(row, col)
    uids = generate_uid(), generate_uid(), generate_uid()  # study, series, frame of reference
    for k in range(volume.shape[2]):
        ds = ct_slice(*uids)
        ds.InstanceNumber = k + 1
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.PixelSpacing, ds.SliceThickness = list(pixel_spacing), DZ
        with warnings.catch_warnings():  # pydicom warns about DS values over 16 characters: they are the point
            warnings.simplefilter("ignore")
            ds.ImageOrientationPatient = list(iop)
            ds.ImagePositionPatient = [str(fmt(p)) for p in IPP0 + normal * DZ * k]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = (volume[:, :, k].T + 1024).astype(np.int16).tobytes()
        ds.save_as(str(folder / f"IM{k:04d}.dcm"), enforce_file_format=True)
    return folder


def dicom_affine(iop) -> np.ndarray:
    """The RAS affine of write_series' voxel (column i, row j, slice k) by the DICOM definition:
    LPS = IPP0 + i * COL_SP * row_cosine + j * ROW_SP * column_cosine + k * DZ * normal."""
    row, col = (np.asarray([float(v) for v in iop[i:i + 3]]) for i in (0, 3))
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ np.column_stack([row * COL_SP, col * ROW_SP, np.cross(row, col) * DZ])
    affine[:3, 3] = LPS_TO_RAS @ IPP0
    return affine


def load_quietly(path: Path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        array, affine = load_volume(path)
    return array, affine, [str(w.message) for w in caught]


# ----------------------------------------------------------------------------- DS values over 16 characters


def test_long_ds_axial_series_loads_like_the_rounded_one(tmp_path):
    assert max(len(v) for v in LONG_AXIAL_IOP) > 16
    rounded = write_series(tmp_path / "rounded", ct(), [1, 0, 0, 0, 1, 0])
    long = write_series(tmp_path / "long", ct(), LONG_AXIAL_IOP, fmt=lambda v: repr(float(v) + 1e-9 / 3))
    assert max(len(str(v)) for v in pydicom.dcmread(long / "IM0003.dcm").ImagePositionPatient) > 16

    array_r, affine_r, warned_r = load_quietly(rounded)
    array_l, affine_l, warned_l = load_quietly(long)
    assert warned_r == [] and warned_l == [], (warned_r, warned_l)
    np.testing.assert_allclose(affine_r, dicom_affine([1, 0, 0, 0, 1, 0]), atol=1e-6)
    np.testing.assert_allclose(affine_l, affine_r, atol=1e-3)  # it was the identity: 1 mm, origin 0, x/y swapped
    np.testing.assert_array_equal(array_l, array_r)
    np.testing.assert_array_equal(array_l, ct())
    (shape_l, spacing_l), (shape_r, spacing_r) = read_header(long), read_header(rounded)
    assert shape_l == shape_r == SHAPE
    np.testing.assert_allclose(spacing_l, spacing_r, atol=1e-6)


def test_long_ds_oblique_series_loads_like_the_rounded_one(tmp_path):
    t = np.radians(20)
    iop = [np.cos(t), np.sin(t), 0.0, -np.sin(t), np.cos(t), 0.0]
    rounded = write_series(tmp_path / "rounded", ct(), [round(float(v), 6) for v in iop])
    long = write_series(tmp_path / "long", ct(), [repr(float(v)) for v in iop], fmt=lambda v: repr(float(v)))
    assert max(len(str(v)) for v in pydicom.dcmread(long / "IM0000.dcm").ImageOrientationPatient) > 16

    array_r, affine_r, _ = load_quietly(rounded)
    array_l, affine_l, _ = load_quietly(long)
    np.testing.assert_allclose(affine_r, dicom_affine(iop), atol=1e-4)
    np.testing.assert_allclose(affine_l, dicom_affine(iop), atol=1e-6)
    np.testing.assert_allclose(affine_l, affine_r, atol=1e-3)
    np.testing.assert_array_equal(array_l, array_r)
    np.testing.assert_array_equal(array_l, ct())


def _perturb(kind: str):
    """A PydicomReader._get_affine that returns a wrong affine (columns before MONAI's i/j swap: 0 = along the
    rows' column cosine, 1 = along the row cosine, 2 = the slice step, 3 = the origin)."""
    original = monai_data.PydicomReader._get_affine

    def get_affine(self, metadata, lps_to_ras=True):
        affine = original(self, metadata, lps_to_ras).copy()
        if kind == "identity":  # what the reader returns when it lost the orientation or position tags
            warnings.warn("PydicomReader: ImageOrientationPatient (0020,0037) and/or ImagePositionPatient "
                          "(0020,0032) tags are missing, so the affine matrix cannot be derived and defaults to "
                          "the identity.")
            return np.eye(4)
        if kind == "rotated":
            affine[:3, :2] = affine[[1, 0, 2], :2]
        elif kind == "spacing":
            affine[:3, 0] *= 1.25
        elif kind == "origin":
            affine[:3, 3] += [0.0, 0.0, 2.0]
        elif kind == "step":
            affine[:3, 2] *= 0.9
        return affine

    return get_affine


@pytest.mark.parametrize("kind, tag", [("identity", "ImageOrientationPatient"), ("rotated", "ImageOrientationPatient"),
                                       ("spacing", "PixelSpacing"), ("origin", "ImagePositionPatient"),
                                       ("step", "ImagePositionPatient")])
def test_reader_affine_that_disagrees_with_the_headers_is_refused_naming_the_tag(tmp_path, monkeypatch, kind, tag):
    series = write_series(tmp_path / "s", ct(), [1, 0, 0, 0, 1, 0])
    monkeypatch.setattr(monai_data.PydicomReader, "_get_affine", _perturb(kind))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError) as err:
            load_volume(series)
    message = str(err.value)
    assert message.startswith(f"{series}: ") and "\n" not in message, message
    assert tag in message, message


def test_reader_warnings_other_than_the_decoder_notice_reach_the_caller(tmp_path, monkeypatch):
    series = write_series(tmp_path / "s", ct(), [1, 0, 0, 0, 1, 0])
    original = monai_data.PydicomReader._get_affine

    def get_affine(self, metadata, lps_to_ras=True):
        warnings.warn("PydicomReader: something the user should see")
        return original(self, metadata, lps_to_ras)

    monkeypatch.setattr(monai_data.PydicomReader, "_get_affine", get_affine)
    _, affine, warned = load_quietly(series)
    np.testing.assert_allclose(affine, dicom_affine([1, 0, 0, 0, 1, 0]), atol=1e-6)
    assert any("something the user should see" in w for w in warned), warned
    assert not any("nvImageCodec" in w for w in warned), warned


# ----------------------------------------------------------------------------- paths that are not regular files


def call_with_timeout(fifo: Path, fn, *args, timeout: float = 20.0):
    """fn(*args) in a thread; fails (instead of hanging the run) if it has not returned within ``timeout``, after
    unblocking a reader stuck opening ``fifo`` by opening its write end."""
    result: dict = {}

    def target():
        try:
            result["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        try:  # a reader blocked in open(fifo) returns once a writer opens it; closing gives it end-of-file
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
        thread.join(5)
        pytest.fail(f"{fn.__name__}{args} did not return within {timeout:g} s (blocked on the named pipe {fifo})")
    return result


needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes need os.mkfifo (POSIX)")


@needs_fifo
@pytest.mark.parametrize("name", ["ct.nii.gz", "ct.nii", "ct.nrrd"])
def test_named_pipe_as_the_image_is_refused_at_once(tmp_path, name):
    fifo = tmp_path / name
    os.mkfifo(fifo)
    for fn in (load_volume, read_header):
        result = call_with_timeout(fifo, fn, fifo)
        error = result.get("error")
        assert isinstance(error, ValueError), result
        message = str(error)
        assert message.startswith(f"{fifo}: ") and "\n" not in message, message
        assert "regular file" in message and "named pipe" in message, message


@needs_fifo
def test_named_pipe_inside_a_dicom_folder_is_refused_at_once(tmp_path):
    series = write_series(tmp_path / "s", ct(), [1, 0, 0, 0, 1, 0])
    fifo = series / "IM9999"
    os.mkfifo(fifo)
    result = call_with_timeout(fifo, load_volume, series)
    error = result.get("error")
    assert isinstance(error, ValueError), result
    assert str(error).startswith(f"{series}: ") and "IM9999" in str(error) and "regular file" in str(error), error


@needs_fifo
def test_predict_on_a_named_pipe_is_one_line_with_exit_code_2(model_dir, tmp_path, capsys):
    fifo = tmp_path / "ct.nii.gz"
    os.mkfifo(fifo)
    out = tmp_path / "ct_mask.nii.gz"
    result = call_with_timeout(fifo, cli.main, ["--device", "cpu", "--model", str(model_dir), "--input", str(fifo),
                                                "--output", str(out)])
    stderr = capsys.readouterr().err
    lines = stderr.strip().splitlines()
    assert result.get("value") == 2 and len(lines) == 1, (result, stderr)
    assert lines[0].startswith(f"nnynet-predict: error: --input '{fifo}'") and "regular file" in lines[0], lines
    assert not out.exists()
