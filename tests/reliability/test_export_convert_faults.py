"""Bad inputs and faults at the edges: nnynet-export and --backend onnxruntime, nnynet-convert, post-processing, TTA.

Found (before -> now):
- ``nnynet-export --onnx MODEL/config.json`` (or model.safetensors, README.md) wrote the ONNX graph over the model's
  own file, exit 0: the model was destroyed. The output must now be named *.onnx; anything else is refused.
- --onnx naming a folder, or a path under a file: a traceback (IsADirectoryError / FileExistsError) after the whole
  export. Now one line before the model is loaded; an OSError while writing (read-only folder, full disk) too.
- --opset outside 17..20: the exporter dumped the whole TorchScript graph on stdout, then a 700-character error.
  Now refused before any work.
- An Ensemble folder exported with exit 0 into ENS/model.onnx, which --backend onnxruntime then refused (its
  config.json is an ensemble's). Ensembles and MirrorTTA wrappers are now refused, naming what to export.
- A network that cannot run one window of its patch_size (Swin tiny at 32^3: a 1-voxel bottleneck) failed with
  torch's "Expected more than 1 value per channel" alone; the error now names the patch_size and config.json.
- A killed export left its temporary file forever; the next export removes leftovers of dead processes. The file
  is flushed to disk before the rename.
- An .onnx whose nnynet_config metadata was copied onto another graph (fewer classes, no clinical input) ran:
  classes the graph lacks never appeared in the mask, clinical data were ignored, exit 0. The graph's inputs and
  output are now checked against the config.
- nnynet-convert with DST = SRC (--overwrite) wrote clinical.csv over a source spreadsheet named clinical.csv,
  exit 0; DST inside SRC was accepted and found as a second spreadsheet by the next run. Both are refused.
- A rerun with --overwrite that failed (a bad cell, a corrupt slice) deleted the previous conversion's images,
  leaving its dataset.json pointing at nothing; a rerun without a spreadsheet left the old clinical.csv beside new
  cases (exit 0). DST is now written aside and swapped in whole; --overwrite refuses a folder with other files.
- Two copies of one DICOM instance (a collection downloaded twice) and a second SEG of one CT series gave two
  training cases of one scan, exit 0 (or a misleading "two slices share one position"). Both are errors.
- A SEG whose frames state another position, pixel spacing, orientation or frame of reference than the CT slices
  they reference was placed on those slices anyway, exit 0: a label map silently shifted or scaled. Now an error.
- A truncated CT slice or SEG, a corrupt .xlsx, a mapping JSON that is not an object: tracebacks. Now one line.
- Blank rows under the spreadsheet (ID empty) stopped the conversion with "TCIA_ID ['nan'] appears twice"; they
  are now skipped. A text cell in a numeric column (age, AFP) reached clinical.csv as text; now an error.
- keep_largest_component(side=...) with an orientation without L/R, and postprocess_labels with a lesion_in_organ
  naming absent labels: IndexError / "'tumor' is not in list". MirrorTTA took config.tta_mirror_axes unchecked
  (an in-memory edit to [3] failed as an IndexError inside the sliding window). Now ValueErrors naming the field.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch

from nny_models import export, postprocess, tta
from nny_models.config import NnyNetConfig, PreprocessConfig
from nny_models.zoo import resolve_model_kwargs

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[2]
LABELS = ["background", "liver", "tumor"]


def _unet(classes: int = 3, seed: int = 0, **kwargs):
    from nny_models.hub import NnyNet

    torch.manual_seed(seed)
    return NnyNet(NnyNetConfig(model="unet", model_kwargs=resolve_model_kwargs("unet", "tiny", out_channels=classes,
                                                                                **kwargs),
                               label_names=(LABELS + ["portal_vein", "aorta"])[:classes], patch_size=(32, 32, 32),
                               preprocessing=PreprocessConfig(spacing=(4.0, 4.0, 4.0)).to_dict()))  # fmt: skip


def _one_line_error(capsys, code: int, *words: str, prefix: str = "error: ") -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning: ")]
    assert code == 2, err
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith(prefix), err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def _digest(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- nnynet-export


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    """A tiny 3-class U-Net saved and exported by the CLI (about a second)."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    folder = tmp_path_factory.mktemp("unet") / "model"
    model = _unet()
    model.save_pretrained(folder)
    assert export.main(["--model", str(folder)]) == 0
    return model.eval(), folder


@pytest.fixture(scope="module")
def ct_file(tmp_path_factory) -> Path:
    from nny_models.phantoms import generate_phantom

    case = generate_phantom(9, preset="test")
    path = tmp_path_factory.mktemp("ct") / "ct.nii.gz"
    nib.save(nib.Nifti1Image(case.image.astype(np.float32), case.affine), path)
    return path


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "README.md"])
def test_export_never_writes_over_the_models_own_files(onnx_model, tmp_path, capsys, name):
    import shutil

    _, folder = onnx_model
    folder = Path(shutil.copytree(folder, tmp_path / "m"))
    before = _digest(folder)
    code = export.main(["--model", str(folder), "--onnx", str(folder / name), "--no-verify"])
    _one_line_error(capsys, code, str(folder / name), ".onnx")
    assert _digest(folder) == before  # nothing replaced, no temporary file left


def test_export_to_a_folder_or_under_a_file_is_one_line(onnx_model, tmp_path, capsys):
    _, folder = onnx_model
    (tmp_path / "a_file").write_text("x")
    for target, words in ((tmp_path, ("is a folder", "model.onnx")), (folder, ("is a folder",)),
                          (tmp_path / "a_file" / "m.onnx", ("a_file", "is a file"))):  # fmt: skip
        code = export.main(["--model", str(folder), "--onnx", str(target)])
        _one_line_error(capsys, code, str(target), *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


@pytest.mark.parametrize("opset", ["5", "99"])
def test_export_opset_out_of_range_is_refused_before_work(onnx_model, tmp_path, capfd, opset):
    _, folder = onnx_model
    code = export.main(["--model", str(folder), "--onnx", str(tmp_path / "m.onnx"), "--opset", opset])
    out, err = capfd.readouterr()
    assert code == 2 and err.startswith(f"error: opset {opset}") and "17" in err and len(err.splitlines()) == 1
    assert out == "" and not (tmp_path / "m.onnx").exists()  # no graph dump on stdout


@pytest.mark.parametrize("damage, words", [
    ("no weights", ("model.safetensors",)),
    ("truncated weights", ("model.safetensors", "not a readable safetensors")),
    ("config not JSON", ("config.json", "not valid JSON")),
    ("config field", ("config.json", "patch_size")),
])  # fmt: skip
def test_export_of_a_broken_model_folder_is_one_line(onnx_model, tmp_path, capsys, damage, words):
    import shutil

    _, folder = onnx_model
    folder = Path(shutil.copytree(folder, tmp_path / "m"))
    (folder / "model.onnx").unlink()
    weights, config = folder / "model.safetensors", folder / "config.json"
    if damage == "no weights":
        weights.unlink()
    elif damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "config not JSON":
        config.write_text('{"model": ')
    else:
        config.write_text(json.dumps({**json.loads(config.read_text()), "patch_size": [32, 32]}))
    _one_line_error(capsys, export.main(["--model", str(folder)]), *words)
    assert not (folder / "model.onnx").exists()


def test_export_write_failure_keeps_the_previous_export(onnx_model, tmp_path, capsys, monkeypatch):
    """A folder that turns read-only (or a full disk) at the rename: one line, the old file untouched."""
    _, folder = onnx_model
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous export")

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied", str(dst))

    monkeypatch.setattr(export.os, "replace", refuse)
    code = export.main(["--model", str(folder), "--onnx", str(target), "--no-verify"])
    _one_line_error(capsys, code, str(target), "Permission denied")
    assert target.read_bytes() == b"previous export" and sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_export_into_a_read_only_folder_is_one_line(onnx_model, tmp_path, capsys):
    _, folder = onnx_model
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code = export.main(["--model", str(folder), "--onnx", str(locked / "m.onnx")])
        _one_line_error(capsys, code, str(locked), "not writable")
    finally:
        locked.chmod(0o755)
    assert list(locked.iterdir()) == []


def test_kill_before_the_rename_leaves_the_old_export_and_the_next_one_cleans_up(onnx_model, tmp_path):
    import shutil

    _, folder = onnx_model
    folder = Path(shutil.copytree(folder, tmp_path / "m"))
    old = (folder / "model.onnx").read_bytes()
    child = ("import os, signal, sys; from nny_models import export; "
             "export.fsync_file = lambda path: os.kill(os.getpid(), signal.SIGKILL); "
             "sys.exit(export.main(['--model', sys.argv[1], '--no-verify']))")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", child, str(folder)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (folder / "model.onnx").read_bytes() == old  # killed with the new file complete but not swapped in
    leftovers = list(folder.glob(".model.onnx.*.tmp.onnx"))
    assert len(leftovers) == 1
    assert export.main(["--model", str(folder), "--no-verify"]) == 0
    assert not leftovers[0].exists() and export.load_onnx_network(folder).patch_size == (32, 32, 32)


def test_a_one_voxel_bottleneck_is_refused_when_the_model_is_built(tmp_path):
    # Swin tiny at 32^3: GroupNorm over one bottleneck voxel fails at batch 1 and gives zeros at batch 4 (a mask
    # from no bottleneck features, exit 0), so config.json's patch_size is refused before any export or predict
    from nny_models.hub import NnyNet

    with pytest.raises(ValueError, match=r"patch_size \[32, 32, 32\].*more than one voxel.*at least 64"):
        NnyNet(NnyNetConfig(model_kwargs={"size": "tiny"}, patch_size=(32, 32, 32)))
    NnyNet(NnyNetConfig(model_kwargs={"size": "tiny"}, patch_size=(64, 32, 32)))  # one side of 64 is enough


def test_ensembles_and_tta_wrappers_are_not_exported(tmp_path):
    from nny_models.ensemble import Ensemble

    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    with pytest.raises(ValueError, match="ensemble.*member"):
        export.export_onnx(Ensemble([_unet(seed=0), _unet(seed=1)]), tmp_path / "e.onnx")
    with pytest.raises(ValueError, match="MirrorTTA.model"):
        export.export_onnx(tta.MirrorTTA(_unet(), [0], unsafe=True), tmp_path / "t.onnx")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- --backend onnxruntime


@pytest.fixture(scope="module")
def other_exports(onnx_model, tmp_path_factory):
    """A 2-class and a clinical (3 features) U-Net of the same patch size, each exported alone."""
    folder = tmp_path_factory.mktemp("other")
    two, clinical = folder / "two.onnx", folder / "clinical.onnx"
    export.export_onnx(_unet(classes=2), two, verify=False)
    export.export_onnx(_unet(fusion="add", clinical_features=3), clinical, verify=False)
    return two, clinical


def _with_metadata_of(graph: Path, source: Path, out: Path) -> Path:
    """``graph`` carrying ``source``'s nnynet metadata: what a hand-made or tampered file looks like."""
    import onnx

    proto, meta = onnx.load(str(graph)), onnx.load(str(source)).metadata_props
    del proto.metadata_props[:]
    for item in meta:
        entry = proto.metadata_props.add()
        entry.key, entry.value = item.key, item.value
    onnx.save(proto, str(out))
    return out


def test_onnx_of_another_model_is_refused(onnx_model, other_exports, ct_file, tmp_path, capsys):
    """Guard (passed before): another model's file, with or without the clinical input, is named and refused."""
    from nny_models import cli

    _, folder = onnx_model
    two, clinical = other_exports
    for other in (two, clinical):
        out = tmp_path / "mask.nii.gz"
        code = cli.main(["--model", str(folder), "--onnx", str(other), "--input", str(ct_file), "--output", str(out),
                         "--backend", "onnxruntime"])  # fmt: skip
        _one_line_error(capsys, code, str(other), str(folder / "config.json"), prefix="nnynet-predict: error: ")
        assert not out.exists()


@pytest.mark.parametrize("graph, words", [("two", ("2 classes", "3 label_names")),
                                          ("clinical", ("3 clinical features", "fusion 'none'"))])
def test_graph_that_does_not_match_its_metadata_is_refused(onnx_model, other_exports, tmp_path, graph, words):
    _, folder = onnx_model
    two, clinical = other_exports
    tampered = _with_metadata_of(two if graph == "two" else clinical, folder / "model.onnx", tmp_path / "t.onnx")
    with pytest.raises(ValueError) as info:
        export.load_onnx_network(None, tampered)  # config from the (copied) metadata: checks pass but the graph's
    for word in (str(tampered), *words):
        assert word in str(info.value)


def test_truncated_or_misnamed_onnx_is_one_line(onnx_model, ct_file, tmp_path, capsys):
    from nny_models import cli

    _, folder = onnx_model
    truncated = tmp_path / "t.onnx"
    truncated.write_bytes((folder / "model.onnx").read_bytes()[:100_000])
    bare = tmp_path / "bare"
    bare.mkdir()
    cases = ((folder, truncated, ("not a loadable ONNX",)), (bare, truncated, ("not a readable",)),
             (folder, folder, ("is a folder", "model.onnx")))
    for model, onnx_arg, words in cases:
        code = cli.main(["--model", str(model), "--onnx", str(onnx_arg), "--input", str(ct_file),
                         "--output", str(tmp_path / "m.nii.gz"), "--backend", "onnxruntime"])  # fmt: skip
        _one_line_error(capsys, code, str(onnx_arg), *words, prefix="nnynet-predict: error: ")
    assert not (tmp_path / "m.nii.gz").exists()


def test_onnxruntime_missing_is_one_line(onnx_model, ct_file, tmp_path, capsys, monkeypatch):
    """Guard (passed before): without the optional extra both CLIs say what to install."""
    from nny_models import cli

    _, folder = onnx_model
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    _one_line_error(capsys, export.main(["--model", str(folder), "--onnx", str(tmp_path / "m.onnx")]),
                    "onnxruntime", "nnynet[onnx]")
    code = cli.main(["--model", str(folder), "--input", str(ct_file), "--output", str(tmp_path / "m.nii.gz"),
                     "--backend", "onnxruntime"])  # fmt: skip
    _one_line_error(capsys, code, "onnxruntime", "nnynet[onnx]", prefix="nnynet-predict: error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_onnx_and_torch_masks_agree(onnx_model):
    """Guard (passed before): the U-Net without clinical input gives torch's mask through ONNX Runtime."""
    from nny_models.inference import predict
    from nny_models.phantoms import generate_phantom

    model, folder = onnx_model
    case = generate_phantom(4, preset="test")
    mask_t, probs_t = predict(model, case.image, affine=case.affine, precision="fp32", device="cpu",
                              return_probabilities=True)  # fmt: skip
    mask_o, probs_o = predict(export.load_onnx_network(folder), case.image, affine=case.affine, device="cpu",
                              return_probabilities=True)  # fmt: skip
    assert np.abs(probs_o - probs_t).max() < 1e-3
    top2 = np.sort(probs_t, axis=0)[-2:]
    decided = (top2[1] - top2[0]) > 1e-4  # equal wherever torch's choice is not a numerical tie
    assert decided.mean() > 0.99 and np.array_equal(mask_o[decided], mask_t[decided])


# ----------------------------------------------------------------------------- nnynet-convert


@pytest.fixture(scope="module")
def dicom():
    """The DICOM writers of test_convert_hcc (a CT series + DICOM-SEG of a phantom) and the phantom."""
    pytest.importorskip("pydicom")
    pytest.importorskip("highdicom")
    from nny_models.phantoms import generate_phantom
    from tests.nny_models import test_convert_hcc as helpers

    case = generate_phantom(7, preset="test")
    affine = np.array([[0.75, 0, 0, -24.5], [0, 0.8125, 0, 13.25], [0, 0, 2.5, -60.0], [0, 0, 0, 1]])
    phantom = (np.rint(case.image).astype(np.int16), np.asarray(case.label, dtype=np.uint8), affine)
    return SimpleNamespace(helpers=helpers, phantom=phantom)


def _source(dicom, root: Path) -> Path:
    dicom.helpers.write_source(root, dicom.phantom)
    return root


def _convert(capsys, *args) -> tuple[int, str]:
    from nny_models.convert import main

    code = main(["hcc-tace-seg", *map(str, args)])
    return code, capsys.readouterr().err


def _sheet(src: Path) -> Path:
    return src / "HCC-TACE-Seg_clinical_data-V2.csv"


def test_output_folder_overlapping_the_input_is_refused(dicom, tmp_path, capsys):
    src = _source(dicom, tmp_path / "src")
    _sheet(src).rename(src / "clinical.csv")  # the output's name: DST = SRC used to write over it
    before = _digest(src)
    for dst, extra in ((src, ["--overwrite"]), (src / "out", []), (tmp_path, ["--overwrite"])):
        code, err = _convert(capsys, src, dst, *extra)
        assert code == 2 and "overlaps the source folder" in err, err
    assert _digest(src) == before
    code, err = _convert(capsys, src, src, "--overwrite")
    assert code == 2 and err.count("\n") == 1 and "overlaps the source folder" in err and "Traceback" not in err
    (tmp_path / "a_file").write_text("x")
    code, err = _convert(capsys, src, tmp_path / "a_file")
    assert code == 2 and "a_file: is a file" in err and (tmp_path / "a_file").read_text() == "x"


def test_failed_rerun_keeps_the_previous_conversion(dicom, tmp_path, capsys, monkeypatch):
    from nny_models.io import discover_cases

    src, dst = _source(dicom, tmp_path / "src"), tmp_path / "dst"
    assert _convert(capsys, src, dst)[0] == 0
    first = _digest(dst)
    sheet = _sheet(src)
    good = sheet.read_text()
    sheet.write_text(good.replace("Stage-B", "Stage-Q"))  # a bad cell: found before any pixel is read
    code, err = _convert(capsys, src, dst, "--overwrite")
    assert code == 2 and "Stage-Q" in err and _digest(dst) == first
    sheet.write_text(good)
    slice_ = src / "HCC_001" / "CT" / "005.dcm"
    slice_.write_bytes(slice_.read_bytes()[:-3000])  # a corrupt slice: found while writing
    code, err = _convert(capsys, src, dst, "--overwrite")
    assert code == 2 and err.count("\n") == 1 and "005.dcm: cannot decode the CT pixel data" in err
    assert _digest(dst) == first and [r.case_id for r in discover_cases(dst)] == ["HCC_001"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]  # no temporary folder left


def test_interrupted_conversion_leaves_no_partial_output(dicom, tmp_path, capsys, monkeypatch):
    src, dst = _source(dicom, tmp_path / "src"), tmp_path / "dst"
    saved = []

    def interrupt(img, path):
        saved.append(path)
        raise KeyboardInterrupt  # as Ctrl-C after the first file

    monkeypatch.setattr(nib, "save", interrupt)
    with pytest.raises(KeyboardInterrupt):
        _convert(capsys, src, dst)
    assert saved and not dst.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_kill_during_a_rerun_keeps_the_previous_conversion(dicom, tmp_path, capsys):
    from nny_models.convert.hcc_tace_seg import DEFAULT_SEGMENTS

    src, dst = _source(dicom, tmp_path / "src"), tmp_path / "dst"
    assert _convert(capsys, src, dst)[0] == 0
    first = _digest(dst)
    mapping = tmp_path / "segments.json"  # the rerun drops the portal vein: its label map differs from the first
    spec = json.loads(DEFAULT_SEGMENTS.read_text())
    del spec["segments"]["portal_vein"]
    mapping.write_text(json.dumps({**spec, "ignore": ["portal vein"]}))
    child = ("import os, signal, sys; import nibabel as nib; from nny_models.convert import main; save = nib.save; "
             "nib.save = lambda img, path: (save(img, path), 'labelsTr' in str(path) and os.kill(os.getpid(), "
             "signal.SIGKILL)); main(['hcc-tace-seg', *sys.argv[1:], '--overwrite'])")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", child, str(src), str(dst), "--segments", str(mapping)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert _digest(dst) == first  # killed after the new label map was written: not a byte of it in DST
    mapping.unlink()
    assert _convert(capsys, src, dst, "--overwrite")[0] == 0  # the killed run's leftover is no obstacle
    assert _digest(dst) == first and sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]


def test_rerun_without_a_spreadsheet_drops_the_old_clinical_csv(dicom, tmp_path, capsys):
    src, dst = _source(dicom, tmp_path / "src"), tmp_path / "dst"
    assert _convert(capsys, src, dst)[0] == 0 and (dst / "clinical.csv").is_file()
    _sheet(src).unlink()
    code, err = _convert(capsys, src, dst, "--overwrite")
    assert code == 0 and "warning: " in err and "clinical.csv not written" in err
    assert not (dst / "clinical.csv").exists()  # not the previous run's rows beside these cases
    (dst / "notes.txt").write_text("mine")
    code, err = _convert(capsys, src, dst, "--overwrite")
    assert code == 2 and "notes.txt" in err and (dst / "notes.txt").read_text() == "mine"


def test_duplicate_instances_and_a_second_seg_are_errors(dicom, tmp_path, capsys):
    import shutil

    import pydicom
    from pydicom.uid import generate_uid

    src = _source(dicom, tmp_path / "copy")
    shutil.copytree(src / "HCC_001", src / "again" / "HCC_001")  # the collection downloaded twice
    code, err = _convert(capsys, src, tmp_path / "o1")
    assert code == 2 and "SOPInstanceUID" in err and "is also in" in err
    src = _source(dicom, tmp_path / "seg2")
    seg = pydicom.dcmread(src / "HCC_001" / "SEG" / "1-1.dcm")
    seg.SOPInstanceUID = seg.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    seg.SeriesInstanceUID = generate_uid()
    (src / "HCC_001" / "SEG2").mkdir()
    seg.save_as(src / "HCC_001" / "SEG2" / "1-1.dcm")  # a second SEG of the same CT: two cases of one scan
    code, err = _convert(capsys, src, tmp_path / "o2")
    assert code == 2 and "one SEG per CT series" in err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def _shift(ds):
    for frame in ds.PerFrameFunctionalGroupsSequence:
        plane = frame.PlanePositionSequence[0]
        plane.ImagePositionPatient = [float(plane.ImagePositionPatient[0]) + 3.0, *plane.ImagePositionPatient[1:]]


def _spacing(ds):
    ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing = [1.625, 1.5]


def _orientation(ds):
    ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient = [0, 1, 0, 1, 0, 0]


def _frame_of_reference(ds):
    ds.FrameOfReferenceUID = "1.2.3.4"


@pytest.mark.parametrize("edit, words", [
    (_shift, ("frame 1: ImagePositionPatient",)), (_spacing, ("PixelSpacing [1.625, 1.5]",)),
    (_orientation, ("ImageOrientationPatient",)), (_frame_of_reference, ("FrameOfReferenceUID 1.2.3.4",)),
])  # fmt: skip
def test_seg_on_another_grid_is_an_error(dicom, tmp_path, capsys, edit, words):
    import pydicom

    src = _source(dicom, tmp_path / "src")
    path = src / "HCC_001" / "SEG" / "1-1.dcm"
    seg = pydicom.dcmread(path)
    edit(seg)
    seg.save_as(path)
    code, err = _convert(capsys, src, tmp_path / "dst")
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: {path}")
    for word in words:
        assert word in err
    assert not (tmp_path / "dst").exists()


def test_corrupt_files_are_one_line_errors(dicom, tmp_path, capsys):
    src = _source(dicom, tmp_path / "src")
    seg = src / "HCC_001" / "SEG" / "1-1.dcm"
    seg.write_bytes(seg.read_bytes()[:-500])
    code, err = _convert(capsys, src, tmp_path / "o1")
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: {seg}")
    src = _source(dicom, tmp_path / "src2")
    (tmp_path / "bad.xlsx").write_text("not a zip")
    code, err = _convert(capsys, src, tmp_path / "o2", "--clinical", tmp_path / "bad.xlsx")
    assert code == 2 and err.count("\n") == 1 and "bad.xlsx: cannot read the clinical spreadsheet" in err
    for flag in ("--segments", "--columns"):
        (tmp_path / "map.json").write_text("[1, 2]")
        code, err = _convert(capsys, src, tmp_path / "o3", flag, tmp_path / "map.json")
        assert code == 2 and err.count("\n") == 1 and "map.json: expected {" in err
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3))


def test_spreadsheet_faults(dicom, tmp_path, capsys):
    import pandas as pd

    from nny_models.io import read_clinical_csv

    src = _source(dicom, tmp_path / "src")
    sheet = _sheet(src)
    table = pd.read_csv(sheet, dtype=str)
    padded = pd.concat([table, pd.DataFrame([{c: None for c in table.columns}] * 2)], ignore_index=True)
    padded.to_csv(sheet, index=False)  # spreadsheet padding: rows without an ID or values
    code, err = _convert(capsys, src, tmp_path / "ok")
    assert code == 0, err
    assert read_clinical_csv(tmp_path / "ok" / "clinical.csv", case_ids=["HCC_001"]).loc["HCC_001", "sex"] == "F"
    table.assign(AFP="n/a?").to_csv(sheet, index=False)
    code, err = _convert(capsys, src, tmp_path / "typed")
    assert code == 2 and "column 'AFP': value 'n/a?' is not a number" in err and "afp_ng_ml" in err
    table.drop(columns=["Sex"]).to_csv(sheet, index=False)
    code, err = _convert(capsys, src, tmp_path / "missing")
    assert code == 2 and "column(s) ['Sex']" in err and "hcc_tace_seg_columns.json" in err
    assert not (tmp_path / "typed").exists() and not (tmp_path / "missing").exists()


# ----------------------------------------------------------------------------- post-processing and TTA


def test_postprocess_edge_volumes():
    """Guard (passed before): empty, all-foreground and one-voxel volumes."""
    empty = np.zeros((6, 6, 6), np.uint8)
    for side in (None, "right"):
        assert not postprocess.keep_largest_component(empty, [1, 2], side).any()
    assert not postprocess.drop_lesions_outside(empty, 2, 1, 0.5).any()
    assert postprocess.rightward_offset(empty, [1]) is None
    full = np.full((6, 6, 6), 1, np.uint8)
    np.testing.assert_array_equal(postprocess.keep_largest_component(full, [1, 2], "right"), full)
    tumor = np.full((6, 6, 6), 2, np.uint8)  # nothing around it to measure contact with: kept
    np.testing.assert_array_equal(postprocess.drop_lesions_outside(tumor, 2, 1, 0.5), tumor)
    dots = empty.copy()
    dots[0, 0, 0] = dots[5, 5, 5] = 1
    dots[1:3, 1:3, 1:3] = 1
    dots[3, 3, 3] = 2  # one voxel diagonal to the liver block: 26-connected to it, touching it
    kept = postprocess.keep_largest_component(dots, [1, 2])
    assert kept[0, 0, 0] == 1 and kept[5, 5, 5] == 0 and kept[3, 3, 3] == 2  # (0,0,0) touches the block too
    alone = empty.copy()
    alone[5, 0, 5] = 2  # a one-voxel lesion with no liver around it
    assert not postprocess.drop_lesions_outside(alone, 2, 1, 0.5).any()


def test_postprocess_config_without_liver_and_bad_fields():
    labels = np.zeros((6, 6, 6), np.uint8)
    labels[0, 0, 0] = labels[5, 5, 5] = 1
    no_liver = SimpleNamespace(keep_largest=["liver", "tumor"], keep_side=None, single_component=[],
                               lesion_in_organ=None, label_names=["background", "spleen"],
                               preprocess=SimpleNamespace(orientation="RAS"))  # fmt: skip
    np.testing.assert_array_equal(postprocess.postprocess_labels(labels, no_liver), labels)  # nothing to clean
    no_liver.lesion_in_organ = {"lesion": "tumor", "organ": "liver", "min_contact": 0.5}
    with pytest.raises(ValueError, match=r"lesion_in_organ names \['tumor', 'liver'\].*not labels"):
        postprocess.postprocess_labels(labels, no_liver)
    with pytest.raises(ValueError, match="orientation 'AIS'.*L/R"):
        postprocess.keep_largest_component(labels, [1], "right", "AIS")


def test_tta_axes_outside_0_to_2_are_refused(tmp_path):
    from nny_models.hub import NnyNet

    model = _unet()
    model.config.tta_mirror_axes = [3]  # edited after the config's own checks
    for build in (lambda: tta.MirrorTTA(model), lambda: tta.with_tta(model, None)):
        with pytest.raises(ValueError, match=r"tta_mirror_axes: expected .* among 0, 1, 2.*\[3\]"):
            build()
    model.config.tta_mirror_axes = []
    model.save_pretrained(tmp_path / "m")
    config = tmp_path / "m" / "config.json"
    for axes in ([3], [-1], [0, 0], [True]):
        config.write_text(json.dumps({**json.loads(config.read_text()), "tta_mirror_axes": axes}))
        with pytest.raises(ValueError, match="tta_mirror_axes"):
            NnyNet.from_pretrained(tmp_path / "m")
