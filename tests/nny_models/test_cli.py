"""nnynet-predict end to end: a saved tiny NnyNet, a synthetic CT, and bad inputs.

The success case and one bad input run as real subprocesses (`python -m nny_models.cli`); the other
bad inputs call ``main(argv)`` in-process (the same code path, minus ~10 s of imports per case).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from nny_models.config import NnyNetConfig, PreprocessConfig

hub = pytest.importorskip("nny_models.hub")
pytest.importorskip("nny_models.preprocessing")

REPO = Path(__file__).resolve().parents[2]
# A non-RAS (LPS-like), anisotropic affine: the mask must come back with exactly this header geometry.
AFFINE = np.array([[-1.2, 0, 0, 30.0], [0, -1.2, 0, 20.0], [0, 0, 4.0, -50.0], [0, 0, 0, 1]])


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nny_models.cli", "--device", "cpu", *args],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )


def main(capsys, *args: str) -> subprocess.CompletedProcess:
    """In-process run with the same result shape as cli()."""
    from nny_models.cli import main as cli_main

    code = cli_main(["--device", "cpu", *args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def assert_bad_input(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nnynet-predict: error: "), result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


def save_model(path: Path, clinical_schema: dict | None = None) -> Path:
    torch.manual_seed(0)
    kwargs = {"size": "tiny"}
    if clinical_schema is not None:
        kwargs.update(fusion="add", clinical_features=_num_features(clinical_schema))
    config = NnyNetConfig(
        model_kwargs=kwargs,
        patch_size=(64, 64, 64),  # a 32^3 ROI leaves a 1^3 bottleneck that GroupNorm rejects
        preprocessing=PreprocessConfig(spacing=(3.0, 3.0, 4.0)).to_dict(),
        clinical_schema=clinical_schema,
    )
    hub.NnyNet(config).save_pretrained(path)
    return path


def _num_features(schema: dict) -> int:
    from nny_models.clinical import ClinicalSchema

    return ClinicalSchema.from_dict(schema).num_features


def write_ct(path: Path, shape=(40, 36, 12), values=None) -> Path:
    if values is None:
        values = np.full(shape, -1000.0, np.float32)
        values[4:-4, 4:-4, 2:-2] = 50.0
        values[12:24, 10:20, 4:8] = 250.0
    nib.save(nib.Nifti1Image(np.asarray(values), AFFINE), path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("model") / "tiny")


def test_writes_mask_with_input_shape_and_affine(model_dir, tmp_path):
    ct = write_ct(tmp_path / "ct.nii.gz")
    out, probs = tmp_path / "out" / "mask.nii.gz", tmp_path / "probs.nii.gz"
    result = cli("--model", str(model_dir), "--input", str(ct), "--output", str(out),
                 "--probabilities", str(probs), "--overlap", "0.25")
    assert result.returncode == 0, result.stderr
    mask = nib.load(out)
    assert mask.shape == (40, 36, 12) and mask.get_data_dtype() == np.uint8
    np.testing.assert_allclose(mask.affine, AFFINE)
    assert nib.load(probs).shape == (40, 36, 12, 5)
    assert "liver" in result.stdout and "voxels" in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.endswith(" voxels")]
    assert sum(int(line.split()[-2]) for line in rows) == 40 * 36 * 12
    assert f"wrote {out}" in result.stdout and f"wrote {probs}" in result.stdout


def test_bad_inputs_exit_2(model_dir, tmp_path, capsys):
    out = tmp_path / "mask.nii.gz"
    not_ct = write_ct(tmp_path / "photo.nii.gz", values=np.random.default_rng(0).random((32, 32, 16)).astype(np.float32))
    assert_bad_input(main(capsys, "--model", str(model_dir), "--input", str(not_ct), "--output", str(out)), "Hounsfield")

    flat = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.full((64, 64), -1000.0, np.float32), np.eye(4)), flat)
    assert_bad_input(main(capsys, "--model", str(model_dir), "--input", str(flat), "--output", str(out)), "3D")

    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b\x08\x00not really a gzip stream")
    assert_bad_input(cli("--model", str(model_dir), "--input", str(corrupt), "--output", str(out)), "corrupt.nii.gz")

    ct = write_ct(tmp_path / "ct.nii.gz")
    empty = tmp_path / "empty_model"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(NnyNetConfig().to_dict()))
    assert_bad_input(main(capsys, "--model", str(empty), "--input", str(ct), "--output", str(out)), "model.safetensors")
    assert_bad_input(main(capsys, "--model", str(tmp_path / "nowhere"), "--input", str(ct), "--output", str(out)),
                     "no such folder")
    if not torch.cuda.is_available():
        result = main(capsys, "--model", str(model_dir), "--input", str(ct), "--output", str(out), "--device", "cuda")
        assert_bad_input(result, "CUDA is not available")
    assert not out.exists(), "no mask may be written for a bad input"


def test_missing_clinical_columns_exit_2(tmp_path, capsys):
    import pandas as pd

    clinical = pytest.importorskip("finetune.clinical")
    df = pd.DataFrame({"case_id": ["a", "b", "c", "d"], "age": [50.0, 61.0, None, 70.0],
                       "afp": [10.0, 400.0, 25.0, None], "sex": ["M", "F", "M", "M"]}).set_index("case_id")
    schema = clinical.fit_clinical_schema(df).to_dict()
    model_dir = save_model(tmp_path / "fused", schema)
    ct, out = write_ct(tmp_path / "ct.nii.gz"), tmp_path / "mask.nii.gz"

    row = tmp_path / "row.json"
    row.write_text(json.dumps({"age": 55}))  # afp and sex absent
    assert_bad_input(main(capsys, "--model", str(model_dir), "--input", str(ct), "--output", str(out), "--clinical", str(row)),
                     "afp", "sex")
    assert not out.exists()

    csv = tmp_path / "row.csv"
    csv.write_text("age,afp,sex\n55,,F\n")  # an empty value is an ordinary missing value: imputed
    result = main(capsys, "--model", str(model_dir), "--input", str(ct), "--output", str(out), "--clinical", str(csv))
    assert result.returncode == 0, result.stderr
    assert nib.load(out).shape == (40, 36, 12)


def test_keep_all_lesions_skips_the_lesion_rule_for_this_run_only(tmp_path, capsys, monkeypatch):
    import nny_models.inference as inference

    model = save_model(tmp_path / "lio")
    config_file = model / "config.json"
    data = json.loads(config_file.read_text())
    data["lesion_in_organ"] = {"lesion": "tumor", "organ": "liver", "min_contact": 0.5}
    config_file.write_text(json.dumps(data))
    before = config_file.read_bytes()
    seen = []

    def fake_predict(model, volume, **kwargs):  # records the rule predict would apply
        seen.append(model.config.lesion_in_organ)
        return np.zeros(np.shape(volume), np.uint8)

    monkeypatch.setattr(inference, "predict", fake_predict)
    ct = write_ct(tmp_path / "ct.nii.gz")
    for extra in ([], ["--keep-all-lesions"]):
        result = main(capsys, "--model", str(model), "--input", str(ct), "--output", str(tmp_path / "m.nii.gz"),
                      "--force", *extra)
        assert result.returncode == 0, result.stderr
    assert seen == [{"lesion": "tumor", "organ": "liver", "min_contact": 0.5}, None]
    assert config_file.read_bytes() == before  # the model folder is an input: never rewritten
