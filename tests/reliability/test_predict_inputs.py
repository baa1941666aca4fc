"""Issue 11, nnynet-predict: output paths checked before any work, and every error one line, exit 2 (or 1).

Output rules: --output / --probabilities end in .nii.gz or .nii, or name an existing folder, which receives
<input name>_mask.nii.gz / _probabilities.nii.gz (the printed path is the file written); neither may be an
input file (compared after resolving symlinks and spellings, and by inode) or lie inside a DICOM input
folder; they must differ from each other. "~" is expanded in every path. Bad input: exit 2 and one line
"nnynet-predict: error: ..."; an internal error: exit 1, one line too.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest


hub = pytest.importorskip("nny_models.hub")
cli = pytest.importorskip("nny_models.cli")

AFFINE = np.diag([1.5, 1.5, 4.0, 1.0])


def run_main(capsys, *args: str) -> subprocess.CompletedProcess:
    code = cli.main(["--device", "cpu", *args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str, code: int = 2) -> str:
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nnynet-predict: error: "), result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def write_ct(path: Path) -> Path:
    values = np.full((40, 36, 12), -1000.0, np.float32)
    values[4:-4, 4:-4, 2:-2] = 50.0
    values[12:24, 10:20, 4:8] = 250.0
    nib.save(nib.Nifti1Image(values, AFFINE), str(path))
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the CLI reads the CT or loads the model (errors must come first)."""
    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the output paths were validated")

    monkeypatch.setattr(cli, "load_input", forbidden)
    monkeypatch.setattr(cli, "load_model", forbidden)


def test_output_equal_to_input_is_refused_in_every_spelling(model_dir, tmp_path, capsys, no_work):
    ct = write_ct(tmp_path / "ct.nii.gz")
    before = digest(ct)
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.nii.gz").symlink_to(ct)
    os.link(ct, tmp_path / "hard.nii.gz")
    for output in (str(ct), str(tmp_path / "sub" / ".." / "ct.nii.gz"), str(tmp_path / "link.nii.gz"),
                   str(tmp_path / "hard.nii.gz")):
        result = run_main(capsys, "--model", str(model_dir), "--input", str(ct), "--output", output)
        assert_one_line_error(result, "--output", "is the same file as --input", "refusing to overwrite an input")
        result = run_main(capsys, "--model", str(model_dir), "--input", str(ct), "--output",
                          str(tmp_path / "mask.nii.gz"), "--probabilities", output)
        assert_one_line_error(result, "--probabilities", "is the same file as --input")
    assert digest(ct) == before


def test_outputs_never_replace_the_clinical_row_or_the_model(model_dir, tmp_path, capsys, no_work):
    ct, row = write_ct(tmp_path / "ct.nii.gz"), tmp_path / "row.nii"
    row.write_text("{}")
    result = run_main(capsys, "--model", str(model_dir), "--input", str(ct), "--clinical", str(row), "--output", str(row))
    assert_one_line_error(result, "same file as --clinical")
    result = run_main(capsys, "--model", str(model_dir), "--input", str(ct), "--output", str(tmp_path / "m.nii"),
                      "--probabilities", str(model_dir / "config.json"))
    assert_one_line_error(result, "--probabilities", "unsupported file type")


def test_probabilities_equal_to_output_is_refused(model_dir, tmp_path, capsys, no_work):
    ct = write_ct(tmp_path / "ct.nii.gz")
    result = run_main(capsys, "--model", str(model_dir), "--input", str(ct), "--output", str(tmp_path / "a.nii.gz"),
                      "--probabilities", str(tmp_path / "." / "a.nii.gz"))
    assert_one_line_error(result, "--probabilities", "same file as --output", "would replace the mask")


def test_unsupported_extension_is_refused_before_inference(model_dir, tmp_path, capsys, no_work):
    ct = write_ct(tmp_path / "ct.nii.gz")
    for name in ("mask.png", "mask", "mask.nii.gz.bak"):
        result = run_main(capsys, "--model", str(model_dir), "--input", str(ct), "--output", str(tmp_path / name))
        assert_one_line_error(result, f"--output '{tmp_path / name}'", "unsupported file type", ".nii.gz or .nii")
    assert not list(tmp_path.glob("mask*"))


def test_unwritable_or_impossible_output_folders(model_dir, tmp_path, capsys, no_work):
    ct = write_ct(tmp_path / "ct.nii.gz")
    result = run_main(capsys, "--model", str(model_dir), "--input", str(ct), "--output", str(ct / "mask.nii.gz"))
    assert_one_line_error(result, "is a file, not a folder")
    series = tmp_path / "series"
    series.mkdir()
    (series / "IM1.dcm").write_bytes(b"\0" * 132)
    result = run_main(capsys, "--model", str(model_dir), "--input", str(series), "--output", str(series / "m.nii.gz"))
    assert_one_line_error(result, "inside the --input folder")
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        result = run_main(capsys, "--model", str(model_dir), "--input", str(ct), "--output", str(locked / "m.nii.gz"))
        assert_one_line_error(result, "not writable")


@pytest.mark.parametrize("value", ["0", "-3"])
def test_sw_batch_size_must_be_positive(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--model", "m", "--input", "ct.nii.gz", "--output", "m.nii.gz", "--sw-batch-size", value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"nnynet-predict: error: --sw-batch-size must be >= 1, got {value} (see --help)"]


@pytest.mark.parametrize("value", ["0.99", "1", "-0.1"])
def test_overlap_that_would_run_for_days_or_fail_is_refused_before_any_work(capsys, value, no_work):
    """0.99 was accepted: a 64-voxel window stepping by one voxel, about a million windows on a CT."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--model", "m", "--input", "ct.nii.gz", "--output", "m.nii.gz", "--overlap", value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"nnynet-predict: error: --overlap must be in [0, 0.9], got {float(value)}")


def test_predict_checks_its_arguments(model_dir):
    from nny_models.inference import predict

    model = hub.NnyNet.from_pretrained(model_dir)
    volume = np.zeros((16, 16, 16), np.float32)
    for kwargs, match in [({"sw_batch_size": 0}, "sw_batch_size must be an integer >= 1, got 0"),
                          ({"overlap": 1.0}, r"overlap must be in \[0, 0\.9\], got 1\.0"),
                          ({"overlap": 0.99}, r"overlap must be in \[0, 0\.9\]")]:  # 0.99: a million windows
        with pytest.raises(ValueError, match=match):
            predict(model, volume, spacing=(1, 1, 1), **kwargs)
    model.config.patch_size = (60, 64, 64)
    with pytest.raises(ValueError, match=r"config.json\) patch_size \[60, 64, 64\]: .* divisible by 32"):
        predict(model, volume, spacing=(1, 1, 1))


def test_missing_required_flag_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--input", "ct.nii.gz"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nnynet-predict: error: the following arguments are required")


def test_relative_missing_model_path_is_not_sent_to_the_hub(tmp_path, capsys, monkeypatch):
    def no_hub(*args, **kwargs):
        raise AssertionError("a local path was sent to the Hub")

    monkeypatch.setattr(hub, "hf_hub_download", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    ct = write_ct(tmp_path / "ct.nii.gz")
    for model in ("runs/finetune", "./missing", "~/no-such-model-dir-nnynet"):
        result = run_main(capsys, "--model", model, "--input", str(ct), "--output", "m.nii.gz")
        assert_one_line_error(result, "--model", "no such folder", "not found")
    with pytest.raises(FileNotFoundError, match=r"runs/finetune not found \(a local path, so not looked up on the Hub\)"):
        hub._resolve_file("runs/finetune", "config.json")


def test_input_folder_that_is_not_dicom_and_missing_pydicom(model_dir, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "scans"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    result = run_main(capsys, "--model", str(model_dir), "--input", str(folder), "--output", str(tmp_path / "m.nii.gz"))
    assert_one_line_error(result, "--input", "a folder without DICOM files")
    (folder / "IM1.dcm").write_bytes(b"\0" * 132)
    monkeypatch.setitem(sys.modules, "pydicom", None)
    result = run_main(capsys, "--model", str(model_dir), "--input", str(folder), "--output", str(tmp_path / "m.nii.gz"))
    assert_one_line_error(result, "needs pydicom", "pip install 'nnynet[dicom]'")
    result = run_main(capsys, "--model", str(model_dir), "--input", str(tmp_path / "nope.nii.gz"), "--output", "m.nii")
    assert_one_line_error(result, f"--input '{tmp_path / 'nope.nii.gz'}': not found")


def test_invalid_config_json_is_named(model_dir, tmp_path, capsys):
    ct = write_ct(tmp_path / "ct.nii.gz")
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "config.json").write_text('{"model": "nnynet", ')
    result = run_main(capsys, "--model", str(broken), "--input", str(ct), "--output", str(tmp_path / "m.nii.gz"))
    assert_one_line_error(result, str(broken / "config.json"), "not valid JSON")
    config = json.loads((model_dir / "config.json").read_text())
    for change, words in [({"patch_size": [60, 64, 64]}, ("config.json", "patch_size", "[60, 64, 64]")),
                          ({"colour": "red"}, ("config.json", "colour"))]:
        (broken / "config.json").write_text(json.dumps({**config, **change}))
        result = run_main(capsys, "--model", str(broken), "--input", str(ct), "--output", str(tmp_path / "m.nii.gz"))
        assert_one_line_error(result, "--model", *words)
    assert not (tmp_path / "m.nii.gz").exists()


def test_internal_error_is_one_line_exit_1(model_dir, tmp_path, capsys, monkeypatch):
    import nny_models.inference

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(nny_models.inference, "predict", broken)
    ct = write_ct(tmp_path / "ct.nii.gz")
    result = run_main(capsys, "--model", str(model_dir), "--input", str(ct), "--output", str(tmp_path / "m.nii.gz"))
    assert_one_line_error(result, "unexpected RuntimeError: boom", "--debug", code=1)


def test_folder_output_and_tilde_paths_write_the_reported_file(model_dir, tmp_path, capsys, monkeypatch):
    home = tmp_path / "home"
    (home / "out").mkdir(parents=True)
    shutil.copytree(model_dir, home / "model")
    write_ct(home / "case_07.nii.gz")
    monkeypatch.setenv("HOME", str(home))
    result = run_main(capsys, "--model", "~/model", "--input", "~/case_07.nii.gz", "--output", "~/out",
                      "--probabilities", "~/out", "--overlap", "0.25")
    assert result.returncode == 0, result.stderr
    mask, probs = home / "out" / "case_07_mask.nii.gz", home / "out" / "case_07_probabilities.nii.gz"
    assert f"wrote {mask}  shape (40, 36, 12)" in result.stdout and f"wrote {probs}" in result.stdout
    assert nib.load(mask).shape == (40, 36, 12) and nib.load(probs).shape == (40, 36, 12, 5)
    assert sorted(p.name for p in (home / "out").iterdir()) == [mask.name, probs.name]  # no temporary left


def test_force_runs_a_refused_input_with_a_warning(model_dir, tmp_path, capsys):
    ct = write_ct(tmp_path / "ct.nii.gz")
    crop = tmp_path / "soft_only.nii.gz"  # soft tissue only: no air, fat or bone, so the check refuses it
    nib.save(nib.Nifti1Image(np.asarray(nib.load(ct).dataobj)[8:32, 8:28, 3:11] * 0 + 50.0, AFFINE), str(crop))
    out = tmp_path / "m.nii.gz"
    result = run_main(capsys, "--model", str(model_dir), "--input", str(crop), "--output", str(out))
    assert_one_line_error(result, "does not look like a CT in Hounsfield units", "--force")
    assert not out.exists()
    result = run_main(capsys, "--model", str(model_dir), "--input", str(crop), "--output", str(out), "--force")
    assert result.returncode == 0, result.stderr
    warned = [line for line in result.stderr.splitlines() if "Running anyway (--force)" in line]
    assert len(warned) == 1 and warned[0].startswith("warning: --input "), result.stderr
    assert nib.load(out).shape == (24, 20, 8)


def test_uint8_image_file_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded for an image that is not a CT")

    monkeypatch.setattr(cli, "load_model", forbidden)
    photo = tmp_path / "photo.nii.gz"
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 16)).astype(np.uint8)
    nib.save(nib.Nifti1Image(pixels, AFFINE), str(photo))
    result = run_main(capsys, "--model", "m", "--input", str(photo), "--output", str(tmp_path / "m.nii.gz"))
    assert_one_line_error(result, f"--input '{photo}': does not look like a CT in Hounsfield units", "--force")


def test_voxel_size_in_cm_is_refused_not_an_internal_error(model_dir, tmp_path, capsys):
    """A header with 50 mm voxels (cm for mm) passes the HU check; resampling it to the model's grid would need
    tens of GiB. It used to end as "unexpected RuntimeError" (exit 1) from MONAI's allocator."""
    values = np.full((80, 80, 40), -1000.0, np.float32)
    values[10:-10, 10:-10, 5:-5] = 50.0
    values[30:50, 30:50, 10:30] = 400.0
    scan = tmp_path / "cm.nii.gz"
    nib.save(nib.Nifti1Image(values, np.diag([50.0, 50.0, 50.0, 1.0])), str(scan))
    result = run_main(capsys, "--model", str(model_dir), "--input", str(scan), "--output", str(tmp_path / "m.nii.gz"),
                      "--allow-missing-clinical")
    assert_one_line_error(result, str(scan), "voxel size (50.0, 50.0, 50.0) mm", "above the limit")
    assert not (tmp_path / "m.nii.gz").exists()


def test_a_pretraining_export_is_refused_not_segmented(tmp_path, capsys):
    """A Volume Fusion export predicted "fusion_1..4" masks with exit code 0: plausible-looking, meaningless."""
    from nny_models.config import NnyNetConfig, PreprocessConfig
    from nny_models.inference import predict

    config = NnyNetConfig(model_kwargs={"size": "tiny"}, patch_size=(64, 64, 64), task="volume_fusion_pretext",
                          label_names=["background", "fusion_1", "fusion_2", "fusion_3", "fusion_4"],
                          preprocessing=PreprocessConfig(spacing=(3.0, 3.0, 4.0)).to_dict())
    hub.NnyNet(config).save_pretrained(tmp_path / "pretrained")
    ct = write_ct(tmp_path / "ct.nii.gz")
    with pytest.raises(ValueError, match=r"task 'volume_fusion_pretext': this is a pretraining export"):
        predict(hub.NnyNet.from_pretrained(tmp_path / "pretrained"), ct)
    out = tmp_path / "mask.nii.gz"
    result = run_main(capsys, "--model", str(tmp_path / "pretrained"), "--input", str(ct), "--output", str(out))
    assert_one_line_error(result, "pretraining export", "fine-tune it first")
    assert not out.exists()


def test_blank_slices_are_refused_with_the_file_and_the_slices(model_dir, tmp_path, capsys):
    values = np.full((40, 36, 12), -1000.0, np.float32)
    values[4:-4, 4:-4, :] = 50.0  # the body runs through every slice ...
    values[12:24, 10:20, :] = 250.0
    values[:, :, 6] = -1000.0  # ... but slice 6 was lost and filled with air
    scan = tmp_path / "gap.nii.gz"
    nib.save(nib.Nifti1Image(values, AFFINE), str(scan))
    out = tmp_path / "m.nii.gz"
    result = run_main(capsys, "--model", str(model_dir), "--input", str(scan), "--output", str(out),
                      "--allow-missing-clinical")
    assert_one_line_error(result, str(scan), "1 axial slice(s) inside the body are blank", "index 6.", "--force")
    assert not out.exists()


def test_an_empty_liver_is_written_with_a_warning_naming_the_scan_extent(model_dir, tmp_path, monkeypatch):
    """A header whose voxel size is 10x too small shrinks the body to centimetres on the model's grid; the
    network then finds no liver, and the empty mask used to come with no word."""
    from nny_models import inference

    monkeypatch.setattr(inference, "postprocess_labels", lambda labels, config: np.zeros_like(labels))
    model = hub.NnyNet.from_pretrained(model_dir)
    values = np.full((40, 36, 12), -1000.0, np.float32)
    values[4:-4, 4:-4, 2:-2] = 50.0
    values[12:24, 10:20, 4:8] = 250.0
    with pytest.warns(UserWarning, match=r"ct\.nii\.gz: no liver found\. The scan spans 6 x 5 x 5 mm"):
        mask = inference.predict(model, values, affine=np.diag([0.15, 0.15, 0.4, 1.0]), source="ct.nii.gz",
                                 device="cpu", force=True)
    assert mask.shape == values.shape and not mask.any()


def test_a_liver_of_a_few_ml_is_written_with_a_warning_and_a_plausible_one_without(model_dir, monkeypatch):
    """On the phantoms a fatty liver the network did not recognise came out as a few mL of liver, exit code 0."""
    import warnings

    from nny_models import inference

    model = hub.NnyNet.from_pretrained(model_dir)
    values = np.full((40, 36, 24), -1000.0, np.float32)
    values[4:-4, 4:-4, 2:-2] = 50.0
    values[12:24, 10:20, 4:8] = 250.0
    affine = np.diag([4.0, 4.0, 4.0, 1.0])  # a 160 x 144 x 96 mm box

    def liver_of(n_voxels):
        def fake(labels, config):
            out = np.zeros_like(labels)
            out.reshape(-1)[-n_voxels:] = config.label_names.index("liver")  # the high x: the patient's right
            return out
        return fake

    spacing = np.prod(model.config.preprocess.spacing)
    monkeypatch.setattr(inference, "postprocess_labels", liver_of(max(1, int(10_000 / spacing))))  # ~10 mL
    with pytest.warns(UserWarning, match=r"ct\.nii\.gz: only 1\d mL of liver found"):
        mask = inference.predict(model, values, affine=affine, source="ct.nii.gz", device="cpu", force=True)
    assert (mask == 1).any()
    monkeypatch.setattr(inference, "postprocess_labels", liver_of(int(400_000 / spacing)))  # ~400 mL
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        inference.predict(model, values, affine=affine, source="ct.nii.gz", device="cpu", force=True)
    assert not [w for w in caught if "liver" in str(w.message)], [str(w.message) for w in caught]


def test_a_symlinked_input_names_its_mask_after_the_link(model_dir, tmp_path, capsys):
    """The clinical row is matched to the name given (the link's); the mask must carry that name too."""
    (tmp_path / "store").mkdir()
    (tmp_path / "cases").mkdir()
    (tmp_path / "out").mkdir()
    target = write_ct(tmp_path / "store" / "9f3a1c.nii.gz")
    link = tmp_path / "cases" / "patient_17.nii.gz"
    link.symlink_to(target)
    result = run_main(capsys, "--model", str(model_dir), "--input", str(link), "--output", str(tmp_path / "out"),
                      "--overlap", "0.25")
    assert result.returncode == 0, result.stderr
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["patient_17_mask.nii.gz"]


def test_a_folder_output_warns_before_replacing_a_mask_of_the_same_name(model_dir, tmp_path, capsys):
    """Two patients' ct.nii.gz into one folder: the second replaces the first's mask, so say so."""
    out = tmp_path / "out"
    out.mkdir()
    for patient in ("patA", "patB"):
        (tmp_path / patient).mkdir()
        write_ct(tmp_path / patient / "ct.nii.gz")
    first = run_main(capsys, "--model", str(model_dir), "--input", str(tmp_path / "patA" / "ct.nii.gz"),
                     "--output", str(out), "--overlap", "0.25")
    assert first.returncode == 0 and "will be replaced" not in first.stderr
    second = run_main(capsys, "--model", str(model_dir), "--input", str(tmp_path / "patB" / "ct.nii.gz"),
                      "--output", str(out), "--overlap", "0.25")
    assert second.returncode == 0
    assert f"warning: --output '{out / 'ct_mask.nii.gz'}' exists and will be replaced" in second.stderr
    named = run_main(capsys, "--model", str(model_dir), "--input", str(tmp_path / "patB" / "ct.nii.gz"),
                     "--output", str(out / "ct_mask.nii.gz"), "--overlap", "0.25")
    assert named.returncode == 0 and "will be replaced" not in named.stderr  # a name given is the user's choice
