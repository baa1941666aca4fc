"""The project as a user installs it: every package folder in the wheel, and a real (non-editable) install that
works from a directory outside the checkout (nnynet-predict, save_pretrained with its full model card, the
phantoms CLI)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_every_package_folder_is_listed():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(init.parent.relative_to(REPO).parts)
        for top in ("nny_models", "pretrain", "finetune")
        for init in (REPO / top).rglob("__init__.py")
    }
    assert on_disk - listed == set(), "add these packages to [tool.setuptools] packages in pyproject.toml"
    assert "nny_models.model_cards" in listed  # the card template, mapped from model_cards/


def test_einops_is_declared():
    # MONAI's SwinTransformer reaches einops through optional_import: nothing else installs it.
    deps = " ".join(_pyproject()["project"]["dependencies"])
    assert "einops" in deps


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel built from this checkout, installed (without dependencies: they are this venv's) into a folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    # Build from a copy: setuptools reuses an in-tree build/ folder, which can hold modules deleted since.
    source = tmp / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "runs", "*.egg-info",
                                                                  "__pycache__", ".pytest_cache"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist"),
         str(source)],
        check=True, cwd=tmp, timeout=300,
    )  # fmt: skip
    wheel = next((tmp / "dist").glob("nnynet-*.whl"))
    target = tmp / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True, cwd=tmp, timeout=300,
    )  # fmt: skip
    return target


def _run_outside(installed: Path, tmp_path: Path, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(installed), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def test_wheel_ships_the_card_template(installed: Path):
    assert (installed / "nny_models" / "model_cards" / "nnynet.md.j2").is_file()
    assert not (installed / "model_cards").exists()  # mapped into nny_models, not a top-level package


def test_installed_package_works_outside_the_checkout(installed: Path, tmp_path: Path):
    script = textwrap.dedent(
        """
        import json, sys
        from pathlib import Path
        import pandas as pd
        import nny_models
        from nny_models import NnyNet, NnyNetConfig
        from finetune.clinical import fit_clinical_schema

        assert nny_models.__file__.startswith(sys.argv[1]), nny_models.__file__  # not the checkout
        table = pd.DataFrame({"age": [50.0, 61.0, 72.0], "afp_ng_ml": [3.0, 400.0, None],
                              "cirrhosis": ["yes", "no", "yes"]}, index=["a", "b", "c"])
        schema = fit_clinical_schema(table, seed=0)
        config = NnyNetConfig(model="nnynet", model_kwargs={"size": "tiny", "fusion": "cross_attention",
                                                            "clinical_features": schema.num_features},
                              patch_size=(64, 64, 64), clinical_schema=schema.to_dict(),
                              metrics={"mean_foreground_dice": 0.5, "miou": 0.4,
                                       "per_class": {"liver": {"Dice": 0.9}, "tumor": {"Dice": 0.1}}})
        NnyNet(config).save_pretrained("model")
        print(Path("model/README.md").read_text())
        """
    )
    result = _run_outside(installed, tmp_path, [sys.executable, "-c", script, str(installed)])
    assert result.returncode == 0, result.stderr
    card = result.stdout
    assert (tmp_path / "model" / "model.safetensors").is_file() and (tmp_path / "model" / "config.json").is_file()
    assert "| liver |" in card and "0.9000" in card  # the metrics table
    for column in ("age", "afp_ng_ml", "cirrhosis"):  # the clinical-inputs section of a real fitted schema
        assert column in card



def test_installed_nnynet_predict_segments_a_phantom(installed: Path, tmp_path: Path):
    phantoms = _run_outside(installed, tmp_path, [sys.executable, "-m", "nny_models.phantoms", "--out", "data",
                                                   "--cases", "1", "--seed", "3"])  # fmt: skip
    assert phantoms.returncode == 0, phantoms.stderr
    script = (
        "from nny_models import NnyNet, NnyNetConfig\n"
        "NnyNet(NnyNetConfig(model='nnynet', model_kwargs={'size': 'tiny'}, patch_size=(64, 64, 32)))"
        ".save_pretrained('m')\n"
    )
    made = _run_outside(installed, tmp_path, [sys.executable, "-c", script])
    assert made.returncode == 0, made.stderr
    image = next((tmp_path / "data" / "imagesTr").glob("*.nii.gz"))
    predict = installed / "bin" / "nnynet-predict"
    result = _run_outside(installed, tmp_path, [sys.executable, str(predict), "--model", "m", "--input", str(image),
                                                 "--output", "mask.nii.gz"])  # fmt: skip
    assert result.returncode == 0, result.stderr
    import nibabel as nib

    mask = nib.load(tmp_path / "mask.nii.gz")
    assert mask.shape == nib.load(image).shape
