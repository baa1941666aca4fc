"""Faults of held-out evaluation / publishing (finetune.publish) and of model loading (nny_models.hub), each with the
behaviour now expected: no wrong metrics or silently different model with exit 0, no traceback for bad input, and
errors that name the file, the field and what was expected.

Evaluation: a label on another grid than its image (origin, voxel size, axes, shape), a fractional label, a label
value the model does not have, and a dataset.json label map other than the model's are refused naming the files;
clinical.csv may hold rows for unlabeled cases and may lack a row for any case; a clinical-fusion model evaluated
without clinical.csv is warned about and its card says so. Publishing: config.json stays strict JSON when a metric
is undefined (null, not NaN), the card names the test set actually used and never shows an earlier held-out Dice as
the validation Dice, and an --output_dir that would overwrite (or write into) the model folder is refused.
Loading: integer / boolean weights where the model holds floats are refused, lower-precision floats warn;
config.json fields of the wrong type (metrics, keep_largest entries) and JSON nested too deeply are named errors.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import safetensors.torch
import torch

from finetune.evaluate import card_metrics
from finetune.publish import evaluate_and_publish, main as publish_main
from nny_models.config import NnyNetConfig, PreprocessConfig
from nny_models.ensemble import load_model
from nny_models.hub import NnyNet
from nny_models.training import run_main
from nny_models.zoo import resolve_model_kwargs

LABELS = ["background", "liver", "tumor"]
AFFINE = np.diag([3.0, 3.0, 4.0, 1.0])
SHAPE = (40, 36, 20)


def _config(**extra) -> NnyNetConfig:
    kwargs = extra.pop("model_kwargs", {})
    return NnyNetConfig(model="unet", model_kwargs=resolve_model_kwargs("unet", "tiny", out_channels=3, **kwargs),
                        label_names=LABELS, patch_size=(32, 32, 32),
                        preprocessing=PreprocessConfig(spacing=(3.0, 3.0, 4.0)).to_dict(), **extra)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A tiny untrained 3-class UNet saved with save_pretrained (3 x 3 x 4 mm grid, 32^3 windows)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "model"
    NnyNet(_config()).save_pretrained(path)
    return path


def ct() -> np.ndarray:
    v = np.full(SHAPE, -1000.0, np.float32)
    v[4:-4, 4:-4, 2:-2] = 50.0
    v[12:24, 10:20, 4:12] = 250.0
    return v


def label() -> np.ndarray:
    lab = np.zeros(SHAPE, np.uint8)
    lab[8:30, 8:28, 4:16] = 1
    lab[12:18, 12:18, 6:10] = 2
    return lab


def make_test_set(root: Path, n: int = 2, lab=None, label_affine=AFFINE) -> Path:
    """An nnU-Net style test folder: imagesTs/c{i}_0000.nii.gz + labelsTs/c{i}.nii.gz."""
    (root / "imagesTs").mkdir(parents=True)
    (root / "labelsTs").mkdir()
    for i in range(n):
        nib.save(nib.Nifti1Image(ct(), AFFINE), str(root / "imagesTs" / f"c{i}_0000.nii.gz"))
        values = label() if lab is None else lab
        nib.save(nib.Nifti1Image(values, label_affine), str(root / "labelsTs" / f"c{i}.nii.gz"))
    return root


def digests(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir()) if f.is_file()}


def strict_json(path: Path):
    def refuse(token: str):
        raise AssertionError(f"{path}: {token} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


# ---- evaluation: labels that do not pair with their images -------------------------------------------------------


@pytest.mark.parametrize("label_affine, words", [
    (AFFINE @ np.array([[1, 0, 0, 5], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]), "label RAS 3x3x4 mm at (15, 0, 0)"),
    (np.diag([1.5, 1.5, 2.0, 1.0]), "label RAS 1.5x1.5x2 mm"),
    (np.diag([-3.0, 3.0, 4.0, 1.0]), "label LAS 3x3x4 mm"),
], ids=["shifted", "other-spacing", "flipped"])
def test_label_on_another_grid_than_its_image_is_refused(model, tmp_path, label_affine, words):
    """Before: scored voxel by voxel against the image's grid, exit 0 with wrong metrics."""
    data = make_test_set(tmp_path / "t", n=1, label_affine=label_affine)
    with pytest.raises(ValueError, match="label affine differs from the image affine") as info:
        evaluate_and_publish(model, data, tmp_path / "out")
    message = str(info.value)
    assert str(data / "labelsTs" / "c0.nii.gz") in message and str(data / "imagesTs" / "c0_0000.nii.gz") in message
    assert words in message
    assert not (tmp_path / "out" / "model").exists()


def test_label_of_another_shape_names_both_files(model, tmp_path):
    data = make_test_set(tmp_path / "t", n=1, lab=label()[:, :, :18])
    with pytest.raises(ValueError, match=r"label shape \(40, 36, 18\) differs from image shape \(40, 36, 20\)") as info:
        evaluate_and_publish(model, data, tmp_path / "out")
    assert str(data / "labelsTs" / "c0.nii.gz") in str(info.value)


def test_fractional_label_is_refused_not_rounded(model, tmp_path):
    """Before: np.rint turned 0.5 into 0 and 1.0 stayed 1, so half the classes vanished and exit was 0."""
    data = make_test_set(tmp_path / "t", n=1, lab=label().astype(np.float32) * 0.5)
    with pytest.raises(ValueError, match=r"c0\.nii\.gz: \d+ voxel\(s\) are not whole numbers \(e\.g\. 0\.5\)"):
        evaluate_and_publish(model, data, tmp_path / "out")


def test_label_value_outside_the_models_classes_names_file_and_value(model, tmp_path):
    lab = label()
    lab[1, 1, 1] = 7
    data = make_test_set(tmp_path / "t", n=1, lab=lab)
    with pytest.raises(ValueError, match=r"labelsTs/c0\.nii\.gz: label value\(s\) 7 \(1 voxel\) are outside the "
                                         r"label map of 3 classes \(expected 0\.\.2\)"):
        evaluate_and_publish(model, data, tmp_path / "out")


def test_test_set_whose_dataset_json_maps_labels_otherwise_is_refused(model, tmp_path):
    """Before: liver and tumor scored against each other's voxels, exit 0."""
    data = make_test_set(tmp_path / "t", n=1)
    entries = [{"image": "./imagesTs/c0_0000.nii.gz", "label": "./labelsTs/c0.nii.gz"}]
    (data / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "tumor", "2": "liver"},
                                                   "training": entries}))
    with pytest.raises(ValueError, match=r"dataset\.json: field \"labels\" names the label values .*1: 'tumor'.* but "
                                         r"the model predicts .*1: 'liver'"):
        evaluate_and_publish(model, data, tmp_path / "out")


# ---- evaluation: clinical table -----------------------------------------------------------------------------------


def test_clinical_csv_without_a_row_for_the_example_case_is_one_line(model, tmp_path, capsys):
    """Before: KeyError 'c0' traceback after the model had been published. Now the example row is all missing."""
    data = make_test_set(tmp_path / "t")
    (data / "clinical.csv").write_text("case_id,age\nc1,50\n")
    out = tmp_path / "out"
    run_main(lambda: publish_main(["--model", str(model), "--test_dir", str(data), "--output_dir", str(out)]),
             "finetune.publish")
    row = strict_json(out / "prediction" / "c0_clinical.json")
    assert row == {"case_id": "c0", "age": None}
    capsys.readouterr()


@pytest.fixture(scope="module")
def clinical_model(tmp_path_factory) -> Path:
    from finetune.clinical import fit_clinical_schema
    from nny_models.clinical import read_clinical_csv

    root = tmp_path_factory.mktemp("clinical")
    (root / "fit.csv").write_text("case_id,age,sex\nc0,50,m\nc1,70,f\nc2,60,m\n")
    schema = fit_clinical_schema(read_clinical_csv(root / "fit.csv"), seed=0)
    torch.manual_seed(0)
    config = _config(model_kwargs={"fusion": "add", "clinical_features": schema.num_features},
                     clinical_schema=schema.to_dict())
    NnyNet(config).save_pretrained(root / "model")
    return root / "model"


def test_clinical_rows_for_unlabeled_cases_are_accepted(clinical_model, tmp_path):
    """Before: 'row 4 has case id c2, which is not one of the 2 cases of the data set', though c2 is one."""
    data = make_test_set(tmp_path / "t", n=3)
    (data / "labelsTs" / "c2.nii.gz").unlink()
    (data / "clinical.csv").write_text("case_id,age,sex\nc0,50,m\nc1,70,f\nc2,60,m\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # c2 has no label: io warns
        result = evaluate_and_publish(clinical_model, data, tmp_path / "out")
    assert result["summary"]["n_cases"] == 2


def test_clinical_model_without_clinical_csv_warns_and_the_card_says_so(clinical_model, tmp_path):
    """Before: evaluated with every clinical value missing, silently; the card did not say so."""
    data = make_test_set(tmp_path / "t", n=1)
    with pytest.warns(UserWarning, match="no clinical.csv, so the clinical-fusion model .* is evaluated without"):
        evaluate_and_publish(clinical_model, data, tmp_path / "out")
    split = NnyNet.from_pretrained(tmp_path / "out" / "model").config.metrics["split"]
    assert "without clinical data (no clinical.csv)" in split


# ---- publishing: what the card and config.json state, and where they are written ----------------------------------


def test_undefined_metrics_are_null_in_config_json_and_the_card_names_its_test_set(model, tmp_path):
    """Labels without any foreground: HD95 and recall are undefined (NaN). Before: config.json held the bare token NaN
    (invalid JSON) and the card's split said 'held-out synthetic phantoms' whatever the test set was."""
    data = make_test_set(tmp_path / "liver_test", n=1, lab=np.zeros(SHAPE, np.uint8))
    evaluate_and_publish(model, data, tmp_path / "out")
    config = strict_json(tmp_path / "out" / "model" / "config.json")
    assert config["metrics"]["per_class"]["liver"]["HD95 (mm)"] is None
    assert config["metrics"]["split"].startswith(f"held-out cases of {tmp_path.name}/liver_test (1 cases)")
    assert "synthetic" not in config["metrics"]["split"]
    assert strict_json(tmp_path / "out" / "eval" / "metrics.json")["summary"]["per_class"]["liver"]["hd95_mean"] is None
    assert card_metrics({"mean_dice": float("nan"), "miou": 0.5, "per_class": {}})["mean_foreground_dice"] is None


def test_a_published_folders_held_out_dice_is_not_called_validation(model, tmp_path):
    """Before: re-publishing OUT/model showed the first test set's Dice as 'validation (during fine-tuning)'."""
    trained = tmp_path / "trained"
    shutil.copytree(model, trained)
    config = json.loads((trained / "config.json").read_text())
    config["metrics"] = {"split": "validation fold 0 of 5 (preprocessed grid)", "mean_foreground_dice": 0.777}
    (trained / "config.json").write_text(json.dumps(config))
    data = make_test_set(tmp_path / "t", n=1)
    evaluate_and_publish(trained, data, tmp_path / "pub1")
    assert "- validation (during fine-tuning): 0.777" in (tmp_path / "pub1" / "model" / "README.md").read_text()
    evaluate_and_publish(tmp_path / "pub1" / "model", data, tmp_path / "pub2")
    assert "validation (during fine-tuning)" not in (tmp_path / "pub2" / "model" / "README.md").read_text()


def test_output_dir_that_would_overwrite_or_fill_the_model_folder_is_refused(model, tmp_path):
    """Before: --output_dir = the model's parent rewrote the input model's config.json (post-processing override,
    metrics) and README.md in place, exit 0; an --output_dir inside the model folder wrote reports among its files."""
    run = tmp_path / "run"
    shutil.copytree(model, run / "model")
    before = digests(run / "model")
    data = make_test_set(tmp_path / "t", n=1)
    with pytest.raises(ValueError, match=r"--output_dir .*run: its model/ sub-folder is the model being published"):
        evaluate_and_publish(run / "model", data, run, keep_largest=["liver"])
    for out in (run / "model", run / "model" / "pub"):
        with pytest.raises(ValueError, match="lies inside the model folder"):
            evaluate_and_publish(run / "model", data, out)
    assert digests(run / "model") == before and sorted(p.name for p in (run / "model").iterdir()) == sorted(before)


# ---- loading ------------------------------------------------------------------------------------------------------


def _rewrite_weights(folder: Path, change) -> None:
    state = safetensors.torch.load_file(folder / "model.safetensors")
    safetensors.torch.save_file({k: change(v) if v.is_floating_point() else v for k, v in state.items()},
                                folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("change, stored", [(lambda t: (t * 1000).long(), "int64"), (lambda t: t > 0, "bool")],
                         ids=["int64", "bool"])
def test_weights_stored_as_integers_are_refused(model, tmp_path, change, stored):
    """Before: cast to float on copy and loaded as a different network, exit 0."""
    folder = tmp_path / "m"
    shutil.copytree(model, folder)
    _rewrite_weights(folder, change)
    with pytest.raises(ValueError, match=rf"model\.safetensors: \d+ tensor\(s\) stored with a dtype of another kind "
                                         rf"than the model's, e\.g\. net\.\S+ \({stored}, expected float32\)"):
        NnyNet.from_pretrained(folder)
    with pytest.raises(ValueError, match="dtype of another kind"):
        NnyNet(NnyNet.from_pretrained(model).config).transfer_from(folder)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_weights_stored_in_lower_precision_load_with_a_warning(model, tmp_path, dtype):
    folder = tmp_path / "m"
    shutil.copytree(model, folder)
    _rewrite_weights(folder, lambda t: t.to(dtype))
    name = str(dtype).removeprefix("torch.")
    with pytest.warns(UserWarning, match=rf"model\.safetensors: \d+ tensor\(s\) stored in lower precision \({name}"):
        NnyNet.from_pretrained(folder)


@pytest.mark.parametrize("field, value, words", [
    ("metrics", "0.9", "NnyNetConfig.metrics: expected an object (the evaluation summary) or null, got str"),
    ("metrics", [0.9], "NnyNetConfig.metrics: expected an object (the evaluation summary) or null, got list"),
    ("keep_largest", [["liver"]], "NnyNetConfig.keep_largest: expected a list of label names, got [['liver']]"),
    ("single_component", [{"name": "liver"}], "NnyNetConfig.single_component: expected a list of label names"),
])
def test_config_fields_of_the_wrong_type_are_named(model, tmp_path, field, value, words):
    """Before: metrics "0.9" loaded and publish then failed with AttributeError ('str' has no attribute 'get');
    keep_largest [["liver"]] said only "unhashable type: 'list'"."""
    folder = tmp_path / "m"
    shutil.copytree(model, folder)
    config = json.loads((folder / "config.json").read_text())
    config[field] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as info:
        NnyNet.from_pretrained(folder)
    assert str(info.value).startswith(f"{folder / 'config.json'}: invalid config: ") and words in str(info.value)


def test_config_json_nested_too_deeply_is_a_named_error(model, tmp_path):
    """Before: RecursionError traceback from the JSON parser."""
    folder = tmp_path / "m"
    shutil.copytree(model, folder)
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    for load in (NnyNet.from_pretrained, load_model):
        with pytest.raises(ValueError, match=r"config\.json: not valid config JSON \(nested too deeply to read\)"):
            load(folder)
