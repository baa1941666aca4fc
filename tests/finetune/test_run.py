"""finetune/run.py end to end: a 2-step fine-tune from a 2-step Volume Fusion export, the transfer report,
the refusal to train from a checkpoint whose encoder does not load, and --resume continuing the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
# Coarse spacing keeps the volumes (and the end-of-run sliding-window validation) small.
PATCH = ["--patch_size", "64", "64", "32", "--batch_size", "1", "--num_workers", "0", "--seed", "3", "--spacing", "5", "5", "6"]


def _run(script: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, f"{script} {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    from nny_models.phantoms import write_dataset

    return write_dataset(tmp_path_factory.mktemp("ft") / "labeled", cases=4, seed=5)


@pytest.fixture(scope="module")
def pretrained(phantoms, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pre") / "run"
    _run("pretrain/run.py", "--data_dir", str(phantoms), "--output_dir", str(out), "--max_steps", "2",
         "--checkpoint_every", "0", *PATCH)  # fmt: skip
    return out / "model"


def _finetune(phantoms: Path, out: Path, pretrained: Path | str, *extra: str, check: bool = True):
    return _run("finetune/run.py", "--data_dir", str(phantoms), "--output_dir", str(out), "--pretrained",
                str(pretrained), "--folds", "4", "--val_every", "0", "--cache_dir", str(out.parent / "cache"),
                *PATCH, *extra, check=check)  # fmt: skip


@pytest.fixture(scope="module")
def finetuned(phantoms, pretrained, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("ft2") / "ft"
    proc = _finetune(phantoms, out, pretrained, "--max_steps", "2", "--fusion", "cross_attention")
    return out, proc.stdout


def test_two_step_finetune_from_two_step_pretrain_export(finetuned, pretrained):
    from nny_models.hub import NnyNet

    out, stdout = finetuned
    assert "encoder tensors loaded: 100.0%" in stdout, stdout[-2000:]

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["transfer_loaded"] > 0 and rows[0]["transfer_missing"] > 0  # new head and fusion are missing
    assert [r["step"] for r in rows[1:]] == [1, 2] and "val_dice" in rows[-1]

    model = NnyNet.from_pretrained(out / "model")
    assert model.config.task == "segmentation" and model.config.label_names[1] == "liver"
    assert model.config.model_kwargs["fusion"] == "cross_attention"
    assert model.config.clinical_schema and model.config.model_kwargs["clinical_features"] > 0
    assert model.config.metrics["per_class"]["liver"].keys() >= {"Dice", "IoU", "HD95 (mm)"}
    assert (out / "figures" / "training_curves.png").is_file()
    card = (out / "model" / "README.md").read_text()  # a real export's card lists its clinical inputs
    assert "## Clinical inputs" in card and "- age (" in card

    # The encoder started from the export: two small steps later it is still close to the pretrained one.
    before = load_file(pretrained / "model.safetensors")
    after = model.state_dict()
    key = next(k for k in before if k.startswith("net.encoder.") and k.endswith("weight") and before[k].dim() > 1)
    fresh = NnyNet(model.config).state_dict()[key]
    assert (after[key] - before[key]).abs().mean() < 0.5 * (fresh - before[key]).abs().mean()


def test_checkpoint_whose_encoder_does_not_load_is_refused(phantoms, pretrained, tmp_path):
    bad = tmp_path / "renamed"
    bad.mkdir()
    (bad / "config.json").write_text((pretrained / "config.json").read_text())
    state = load_file(pretrained / "model.safetensors")
    save_file({k.replace("net.encoder.", "net.backbone."): v for k, v in state.items()}, bad / "model.safetensors")
    proc = _finetune(phantoms, tmp_path / "ft", bad, "--max_steps", "1", check=False)
    assert proc.returncode != 0
    assert "encoder tensors" in proc.stderr and "0.0%" in proc.stderr


def test_a_training_image_that_is_not_in_hu_stops_the_run_unless_skipped(phantoms, pretrained, tmp_path):
    """One case saved as HU + 1024 without its intercept trained silently; now the run stops before training and
    names the file, and --skip_hu_check trains anyway."""
    import shutil

    import nibabel as nib
    import numpy as np

    data = tmp_path / "data"
    shutil.copytree(phantoms, data)
    image = sorted((data / "imagesTr").glob("*.nii.gz"))[1]
    nii = nib.load(image)
    nib.save(nib.Nifti1Image((np.asarray(nii.dataobj) + 1024).astype(np.uint16), nii.affine), str(image))
    proc = _finetune(data, tmp_path / "ft", pretrained, "--max_steps", "1", check=False)
    assert proc.returncode != 0
    assert f"{image}: does not look like a CT in Hounsfield units" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "ft" / "model").exists()
    _finetune(data, tmp_path / "ft", pretrained, "--max_steps", "1", "--skip_hu_check", "--overwrite")
    assert (tmp_path / "ft" / "model" / "config.json").is_file()


def test_resume_after_a_crash_continues_the_same_run(phantoms, pretrained, tmp_path):
    import shutil

    args = ("--max_steps", "3", "--checkpoint_every", "2", "--fusion", "add", "--augment")
    _finetune(phantoms, tmp_path / "full", pretrained, *args)
    # A crash right after the step-2 checkpoint: everything written later never happened.
    out = tmp_path / "crashed"
    _finetune(phantoms, out, pretrained, *args)
    shutil.rmtree(out / "checkpoints" / "step_0000003")
    shutil.rmtree(out / "model")
    (out / "checkpoints" / "latest").write_text("step_0000002")  # the best-so-far lives in trainer_state.json

    _finetune(phantoms, out, pretrained, *args, "--resume")
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3]
    a = load_file(out / "model" / "model.safetensors")
    b = load_file(tmp_path / "full" / "model" / "model.safetensors")
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_evaluate_and_publish_writes_reports_and_a_reloadable_model(finetuned, phantoms, tmp_path):
    from finetune.publish import evaluate_and_publish
    from nny_models.hub import NnyNet

    out, _ = finetuned
    trained = NnyNet.from_pretrained(out / "model").config
    assert trained.keep_largest == ["liver", "tumor"]  # fine-tuning's defaults
    assert trained.single_component == ["aorta"]
    assert trained.lesion_in_organ == {"lesion": "tumor", "organ": "liver", "min_contact": 0.5}
    assert trained.label_resampling == "probabilities"
    assert "argmax of the probabilities resampled linearly" in (out / "model" / "README.md").read_text()
    with pytest.raises(ValueError, match="label_resampling: expected one of"):
        evaluate_and_publish(out / "model", phantoms, tmp_path / "bad", label_resampling="linear")
    with pytest.raises(ValueError, match="spleen"):
        evaluate_and_publish(out / "model", phantoms, tmp_path / "bad", keep_largest=["spleen"])
    with pytest.raises(ValueError, match="single_component: \\['aorte'\\]"):
        evaluate_and_publish(out / "model", phantoms, tmp_path / "bad", single_component=["aorte"])
    with pytest.raises(ValueError, match="--lesion_min_contact 1.5"):
        evaluate_and_publish(out / "model", phantoms, tmp_path / "bad", lesion_min_contact=1.5)
    result = evaluate_and_publish(out / "model", phantoms, tmp_path / "pub", keep_largest=["liver"],
                                  lesion_min_contact=0.7, label_resampling="nearest")
    summary = json.loads((tmp_path / "pub" / "eval" / "metrics.json").read_text())
    assert len(summary["per_case"]) == 4  # every labeled case, evaluated on its original grid
    assert set(result["dice"]) == {"liver", "tumor", "portal_vein", "aorta"}
    assert "| liver |" in (tmp_path / "pub" / "eval" / "metrics.md").read_text()
    assert len(list((tmp_path / "pub" / "eval" / "figures").glob("*_overlay.png"))) == 3
    published = NnyNet.from_pretrained(tmp_path / "pub" / "model")
    assert published.config.keep_largest == ["liver"]  # the override is what users of the export get
    assert "largest connected liver component" in published.config.metrics["split"]
    assert published.config.lesion_in_organ["min_contact"] == 0.7
    assert published.config.label_resampling == "nearest" and "resampled" not in published.config.metrics["split"]
    assert "by nearest neighbour from the model grid" in (tmp_path / "pub" / "model" / "README.md").read_text()
    assert "tumor components touching the liver on under 70% of their surface dropped" in published.config.metrics["split"]
    assert "on under 70 % of its voxels is set to background" in (tmp_path / "pub" / "model" / "README.md").read_text()
    assert published.config.metrics["per_class"]["liver"]["Dice"] == pytest.approx(result["dice"]["liver"])
    assert "Dice" in (tmp_path / "pub" / "model" / "README.md").read_text()  # the card shows the table
    def no_nan(token: str):
        raise AssertionError(f"{token} in the clinical row JSON: missing values must be null")

    row = json.loads(result["example_clinical"].read_text(), parse_constant=no_nan)
    assert {"age", "afp_ng_ml", "child_pugh"} <= row.keys()  # a row nnynet-predict --clinical accepts
