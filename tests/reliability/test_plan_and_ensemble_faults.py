"""Planning (nnynet-plan, --plan auto|FILE) and ensembles (nnynet-predict --model A --model B, save_ensemble) fed
inputs nobody planned for.

Planning:
- ``--output`` naming an input image wrote the plan JSON over the NIfTI (exit 0); into the data folder it changed
  the data set. Both are refused before any work, as is an existing file that is not a plan; a folder gets plan.json.
- ``--divisor 0`` / ``--min_batch_size 0`` ended in a ZeroDivisionError traceback; ``--divisor -32`` printed a plan
  with patch sides -32 (exit 0). They are one-line errors now.
- Labels drawn on voxels of one HU value (labels on the wrong image, all air) gave clip_low == clip_high and a
  std of 1e-8: a plan that maps every voxel to one value, exit 0. Refused, naming the foreground.
- plan.json: NaN, bool, 1e9 or string spacings, a patch of 32.7 (silently 32), "32", a patch not divisible by the
  divisor, batch "2" or 2.5, divisor 0, a non-bool anisotropic, a null fingerprint, equal clip bounds, an infinite
  mean and a foreground that is not the task's all loaded. Each is refused naming the file and the field.
  version "1" said "expected 1, got 1"; --plan Auto said "could not read the plan JSON ([Errno 2] ...)".
- nnynet-plan made a plan from stored values (HU + 1024), which training refuses: refused unless --skip_hu_check.
- Cases without foreground and cases 10x off the median spacing (a header in cm) were silent: now warnings.

Ensembles:
- ``--model A --model A`` (or a copied fold folder) predicted with exit 0, weighing A double: refused.
- save_ensemble into an existing ensemble overwrote its member folders, leaving stale ones: refused.
- With member 0 without clinical fusion, the ensemble's config had no clinical_schema, so nnynet-predict's check of
  the clinical row's columns was skipped and the fusion member imputed them: the fusion member's schema is used.
- A nested ensemble and a differing preprocessing field are named precisely (member index, sub-field).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from nny_models import NnyNet, NnyNetConfig
from nny_models.config import PreprocessConfig
from nny_models.ensemble import Ensemble, save_ensemble
from nny_models.planning import Plan, main as plan_main, plan_dataset, resolve_plan

BUDGET = 2 * 32**3  # two 32^3 patches: the smallest budget the default divisor allows


def ct(shape=(24, 24, 16), seed: int = 0) -> np.ndarray:
    """A CT in HU: air around a body of soft tissue (40 HU) with a fat rim, with noise."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    hu = np.full(shape[:2], -1000.0)
    hu[(x / 0.85) ** 2 + (y / 0.7) ** 2 <= 1] = -100.0
    hu[(x / 0.75) ** 2 + (y / 0.6) ** 2 <= 1] = 40.0
    return (np.repeat(hu[..., None], shape[2], axis=2) + rng.normal(0, 10, shape)).astype(np.float32)


def write_case(root: Path, i: int, spacing=(1.0, 1.0, 1.0), image=None, label=None, affine=None) -> Path:
    image = ct(seed=i) if image is None else image
    if label is None:
        label = np.zeros(image.shape[:3], np.uint8)
        label[8:16, 8:16, 5:11] = 1
    affine = np.diag([*spacing, 1.0]) if affine is None else affine
    for sub, arr in (("imagesTr", image), ("labelsTr", label)):
        (root / sub).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(arr, affine), root / sub / f"case_{i:03d}.nii.gz")
    return root


def run_plan(capsys, *args: str) -> subprocess.CompletedProcess:
    try:
        plan_main(list(args))
        code = 0
    except SystemExit as e:  # argparse exits 2; a refusal's message is the exit value (code 1)
        code = e.code if isinstance(e.code, int) else 1
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)  # what the interpreter prints for an uncaught SystemExit
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> str:
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines()
             if not line.startswith(("warning: ", "usage: ", "  "))]
    assert len(lines) == 1 and lines[0].startswith("nnynet-plan: error: "), result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.fixture()
def data(tmp_path) -> Path:
    root = tmp_path / "data"
    write_case(root, 0)
    write_case(root, 1, spacing=(1.0, 1.0, 2.0))
    return root


# ----------------------------------------------------------------------------- nnynet-plan --output


def test_output_onto_an_input_or_into_the_data_set_is_refused_before_any_work(data, tmp_path, capsys):
    image, label = data / "imagesTr" / "case_000.nii.gz", data / "labelsTr" / "case_000.nii.gz"
    before = {p: p.read_bytes() for p in (image, label)}
    link = tmp_path / "plan.json"
    link.symlink_to(image)  # a .json name that is the image itself
    stranger = tmp_path / "config.json"
    stranger.write_text('{"model": "nnynet"}')
    manifest = tmp_path / "cases.csv"  # the same cases through a manifest: their folder is not "the data set"
    manifest.write_text(f"case_id,image,label\nc0,{image},{label}\n")
    manifest_link = tmp_path / "manifest.json"
    manifest_link.symlink_to(manifest)
    cases = [(data, str(image), "ending in .json"), (data, str(link), "inside the data set folder"),
             (data, str(data / "plan.json"), "inside the data set folder"),
             (data, str(data / "labelsTr") + "/", "inside the data set folder"),
             (data, str(stranger), "not a plan.json"),
             (manifest, str(link), "is an input of the data set (case 'c0'"),
             (manifest, str(manifest_link), "is the data set's manifest")]
    for source, output, words in cases:
        result = run_plan(capsys, str(source), "--output", output, "--memory_budget_voxels", str(BUDGET))
        assert_one_line_error(result, "--output", words)
        assert result.stdout == ""  # refused before planning: no plan printed
    assert manifest.read_text().startswith("case_id,image,label")
    assert {p: p.read_bytes() for p in (image, label)} == before
    assert stranger.read_text() == '{"model": "nnynet"}' and not (data / "plan.json").exists()
    assert sorted(p.name for p in (data / "labelsTr").iterdir()) == ["case_000.nii.gz", "case_001.nii.gz"]


def test_output_folder_gets_plan_json_and_an_old_plan_is_replaced(data, tmp_path, capsys):
    out = tmp_path / "plans"
    out.mkdir()
    result = run_plan(capsys, str(data), "--output", str(out), "--memory_budget_voxels", str(BUDGET))
    assert result.returncode == 0, result.stderr
    first = Plan.load(out / "plan.json")
    assert json.loads(result.stdout) == first.to_dict()
    result = run_plan(capsys, str(data), "--output", str(out / "plan.json"), "--memory_budget_voxels", str(4 * 32**3))
    assert result.returncode == 0, result.stderr
    assert Plan.load(out / "plan.json").memory_budget_voxels == 4 * 32**3
    assert [p.name for p in out.iterdir()] == ["plan.json"]  # the atomic write leaves no temporary file


# ----------------------------------------------------------------------------- planner arguments and data


@pytest.mark.parametrize("flag", ["--divisor", "--min_batch_size", "--memory_budget_voxels"])
@pytest.mark.parametrize("value", ["0", "-32"])
def test_non_positive_planner_arguments_are_one_line_errors(data, capsys, flag, value):
    result = run_plan(capsys, str(data), flag, value)
    assert result.returncode == 2 and "Traceback" not in result.stderr and result.stdout == ""
    assert f"{flag}: expected a positive integer, got {value}" in result.stderr


@pytest.mark.parametrize("kwargs", [{"divisor": 0}, {"divisor": -32}, {"min_batch_size": 0}])
def test_plan_dataset_refuses_non_positive_arguments(data, kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"^{name}: expected a positive integer"):
        plan_dataset(data, memory_budget_voxels=BUDGET, **kwargs)


def test_labels_on_voxels_of_one_value_are_refused(tmp_path):
    air = np.full((24, 24, 16), -1000.0, np.float32)  # the labels lie on air: wrong image, or a blank one
    data = write_case(tmp_path / "air", 0, image=air)
    with pytest.raises(ValueError, match=r"air: the foreground voxels \(label > 0\).*single HU value \(-1000\)"):
        plan_dataset(data, memory_budget_voxels=BUDGET)


def test_one_case_and_a_permuted_orientation_give_a_valid_plan(tmp_path):
    one = plan_dataset(write_case(tmp_path / "one", 0, spacing=(0.8, 0.9, 2.5)), memory_budget_voxels=BUDGET)
    assert one.spacing == pytest.approx((0.8, 0.9, 2.5)) and one.batch_size == 2
    assert Plan.from_dict(one.to_dict()) == one  # a one-case plan is a valid plan file
    # the same spacing stored z-first (file axes z, x, y): the plan is in RAS order whatever the file's axis order
    affine = np.zeros((4, 4))
    affine[2, 0], affine[0, 1], affine[1, 2], affine[3, 3] = 2.5, 0.8, 0.9, 1.0
    image = np.ascontiguousarray(np.transpose(ct(shape=(24, 24, 16), seed=1), (2, 0, 1)))
    label = np.zeros(image.shape, np.uint8)
    label[5:11, 8:16, 8:16] = 1
    write_case(tmp_path / "one", 1, image=image, label=label, affine=affine)
    both = plan_dataset(tmp_path / "one", memory_budget_voxels=BUDGET)
    assert both.spacing == pytest.approx((0.8, 0.9, 2.5))
    assert both.fingerprint["shapes"][0] == both.fingerprint["shapes"][1]  # the same body, in RAS order


def test_spacing_outliers_and_cases_without_foreground_are_named(tmp_path, capsys):
    data = tmp_path / "data"
    for i in range(3):
        write_case(data, i)
    write_case(data, 3, spacing=(10.0, 10.0, 10.0))  # a header in cm?
    write_case(data, 4, label=np.zeros((24, 24, 16), np.uint8))
    result = run_plan(capsys, str(data), "--memory_budget_voxels", str(BUDGET))
    assert result.returncode == 0, result.stderr
    warned = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert any("'case_003 [10.0, 10.0, 10.0] mm'" in w and "10x or more off the median" in w for w in warned), warned
    assert any("1 of 5 case(s) have no foreground voxels (label > 0): 'case_004'" in w for w in warned), warned
    assert json.loads(result.stdout)["spacing"] == [1.0, 1.0, 1.0]  # the median is unmoved


@pytest.mark.parametrize("shape", [(24, 24), (24, 24, 16, 2)])
def test_2d_and_4d_images_are_named(tmp_path, capsys, shape):
    image = np.full(shape, 40.0, np.float32)
    data = write_case(tmp_path / "d", 0, image=image, label=np.zeros(shape[:3], np.uint8))
    result = run_plan(capsys, str(data), "--memory_budget_voxels", str(BUDGET))
    assert_one_line_error(result, "case_000.nii.gz", "expected a 3D volume", str(shape))


def test_stored_values_are_refused_unless_skipped(tmp_path, capsys):
    data = tmp_path / "raw"
    for i in range(2):  # HU + 1024, as a converter that drops the rescale intercept writes
        write_case(data, i, image=ct(seed=i) + 1024.0)
    result = run_plan(capsys, str(data), "--memory_budget_voxels", str(BUDGET))
    assert_one_line_error(result, "case_000.nii.gz", "does not look like a CT", "--skip_hu_check")
    result = run_plan(capsys, str(data), "--memory_budget_voxels", str(BUDGET), "--skip_hu_check")
    assert result.returncode == 0 and json.loads(result.stdout)["normalization"]["mean"] > 1000


# ----------------------------------------------------------------------------- plan.json files


@pytest.fixture(scope="module")
def good_plan(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("plan") / "data"
    write_case(root, 0)
    return plan_dataset(root, memory_budget_voxels=BUDGET).to_dict()


def _edit(plan: dict, key: str, value) -> dict:
    plan = json.loads(json.dumps(plan))
    target, key = (plan["normalization"], key[5:]) if key.startswith("norm.") else (plan, key)
    if value is KeyError:
        del target[key]
    else:
        target[key] = value
    return plan


BAD_PLANS = [  # (field, value, words of the error)
    ("spacing", [float("nan"), 1, 1], "plan.spacing: expected a finite number"),
    ("spacing", [True, 1, 1], "plan.spacing: expected a number, got True"),
    ("spacing", [1, 1, -1], "plan.spacing: expected 3 voxel sizes in [0.05, 50.0] mm"),
    ("spacing", [1e9, 1, 1], "plan.spacing: expected 3 voxel sizes"),
    ("spacing", ["1", 1, 1], "plan.spacing: expected a number, got '1'"),
    ("patch_size", [32.7, 32, 32], "plan.patch_size: expected a positive integer, got 32.7"),
    ("patch_size", ["32", 32, 32], "plan.patch_size: expected a positive integer, got '32'"),
    ("patch_size", [48, 32, 32], "plan.patch_size: expected multiples of plan.divisor 32, got [48, 32, 32]"),
    ("batch_size", "2", "plan.batch_size: expected a positive integer, got '2'"),
    ("batch_size", 2.5, "plan.batch_size: expected a positive integer, got 2.5"),
    ("divisor", 0, "plan.divisor: expected a positive integer, got 0"),
    ("memory_budget_voxels", -1, "plan.memory_budget_voxels: expected a positive integer"),
    ("median_shape", [-1, 5, 5], "plan.median_shape: expected a positive integer, got -1"),
    ("anisotropic", "no", "plan.anisotropic: expected true or false"),
    ("fingerprint", None, "plan.fingerprint: expected an object"),
    ("version", 2, "plan.version: this nnynet reads plan version 1, got 2"),
    ("version", "1", "plan.version: this nnynet reads plan version 1, got '1'"),
    ("task", "volume_fusion_pretext", "plan.task: expected one of ['segmentation', 'pretraining']"),
    ("extra", 1, "plan: unknown field(s) ['extra']"),
    ("divisor", KeyError, "missing field(s) ['divisor']"),
    ("norm.clip_low", "norm.clip_high", "normalization: clip_low"),
    ("norm.mean", float("inf"), "normalization.mean: expected a finite number"),
    ("norm.std", 0, "normalization.std: expected a positive finite number"),
    ("norm.mean", "abc", "normalization.mean: expected a number, got 'abc'"),
    ("norm.foreground", "body (HU > -500)", "plan.normalization.foreground: a 'segmentation' plan describes"),
    ("normalization", None, "plan.normalization: expected a JSON object"),
]


@pytest.mark.parametrize("key, value, words", BAD_PLANS, ids=[f"{k}={v!r}" for k, v, _ in BAD_PLANS])
def test_bad_plan_files_name_the_file_and_the_field(good_plan, tmp_path, key, value, words):
    if value == "norm.clip_high":  # equal bounds: every voxel would map to one value
        value = good_plan["normalization"]["clip_high"]
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(_edit(good_plan, key, value)))
    with pytest.raises(ValueError) as err:
        resolve_plan(str(path), tmp_path, task="segmentation", cuda=False)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and words in message and "\n" not in message, message


@pytest.mark.parametrize("text", ['{"task": "segmentation", "spac', "", "[]", "[" * 100_000])
def test_truncated_or_foreign_plan_files_are_named(tmp_path, text):
    path = tmp_path / "plan.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"^{path}: "):
        Plan.load(path)


def test_plan_option_names_what_it_accepts_and_the_task(good_plan, tmp_path):
    for option in ("Auto", "None", str(tmp_path)):
        with pytest.raises(ValueError, match=rf"--plan '{option}': .*expected 'auto', 'none' or the path of a plan"):
            resolve_plan(option, tmp_path, task="segmentation", cuda=False)
    pretext = tmp_path / "pretext.json"
    pretext.write_text(json.dumps(_edit(_edit(good_plan, "task", "pretraining"), "norm.foreground", "body (HU > -500)")))
    with pytest.raises(ValueError, match="a 'pretraining' plan; this stage needs a 'segmentation' plan"):
        resolve_plan(str(pretext), tmp_path, task="segmentation", cuda=False)
    assert resolve_plan(str(pretext), tmp_path, task="pretraining", cuda=False).task == "pretraining"


# ----------------------------------------------------------------------------- ensembles


def _model(seed: int, **overrides) -> NnyNet:
    torch.manual_seed(seed)
    kwargs = {"model": "unet", "model_kwargs": {"size": "tiny"}, "patch_size": (32, 32, 32), **overrides}
    return NnyNet(NnyNetConfig(**kwargs)).eval()


def _predict(capsys, *args: str) -> subprocess.CompletedProcess:
    from nny_models.cli import main

    code = main(["--device", "cpu", "--force", *args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


@pytest.fixture()
def ct_file(tmp_path) -> Path:
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(ct(shape=(24, 24, 12)), np.diag([3.0, 3.0, 4.0, 1.0])), path)
    return path


def test_the_same_model_twice_is_refused(model_dir, tmp_path, ct_file, capsys):
    a = _model(0)
    with pytest.raises(ValueError, match="member 2 has the same weights as member 0"):
        Ensemble([a, _model(1), a])  # one object twice
    with pytest.raises(ValueError, match="member 2 has the same weights as member 0"):
        Ensemble([_model(0), _model(1), _model(0)])  # two loads of one model (distinct objects)
    copy = tmp_path / "fold1"
    shutil.copytree(model_dir, copy)  # a fold folder copied instead of trained
    for second in (model_dir, copy):
        out = tmp_path / "mask.nii.gz"
        result = _predict(capsys, "--model", str(model_dir), "--model", str(second), "--input", str(ct_file),
                          "--output", str(out))
        assert result.returncode == 2 and "same weights as member 0" in result.stderr, result.stderr
        assert not out.exists()


def test_nested_ensembles_and_differing_fields_are_named(model_dir, tmp_path, ct_file, capsys):
    inner = Ensemble([_model(0), _model(1)])
    with pytest.raises(ValueError, match=r"member 1 is itself an Ensemble \(of 2 models\); pass its members"):
        Ensemble([_model(2), inner])
    folder = save_ensemble(list(inner.members), tmp_path / "ens")  # an ensemble folder as one --model
    result = _predict(capsys, "--model", str(folder), "--model", str(model_dir), "--input", str(ct_file),
                      "--output", str(tmp_path / "mask.nii.gz"))
    assert result.returncode == 2 and "member 0 is itself an Ensemble (of 2 models)" in result.stderr, result.stderr
    lps = PreprocessConfig(orientation="LPS").to_dict()
    with pytest.raises(ValueError, match=r"field 'preprocessing.orientation' \('LPS' vs 'RAS'\)"):
        Ensemble([_model(0), _model(1, preprocessing=lps)])
    spacing = PreprocessConfig(spacing=(1.0, 1.0, 1.0)).to_dict()
    with pytest.raises(ValueError, match=r"'preprocessing.spacing' \(\[1.0, 1.0, 1.0\] vs \[1.5, 1.5, 2.0\]\)"):
        Ensemble([_model(0), _model(1, preprocessing=spacing)])


def test_window_divisor_suits_every_member():
    a, b = _model(0), _model(1)
    a.net.size_divisor, b.net.size_divisor = 16, 24
    assert Ensemble([a, b]).size_divisor == 48  # the largest (24) would give windows member a cannot take


def test_save_ensemble_never_overwrites_an_existing_ensemble_or_folder(tmp_path):
    folder = save_ensemble([_model(0), _model(1)], tmp_path / "ens")
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"already holds \['config.json', 'member_0', 'member_1'\]"):
        save_ensemble([_model(2), _model(3), _model(4)], folder)
    (tmp_path / "mine" / "fold_a").mkdir(parents=True)  # a folder a member name would land on
    with pytest.raises(ValueError, match=r"already holds \['fold_a'\]"):
        save_ensemble([_model(0), _model(1)], tmp_path / "mine", names=["fold_a", "fold_b"])
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "member_0", "member_1"]
    assert not (tmp_path / "mine" / "fold_b").exists()


def test_a_fusion_member_after_a_plain_one_still_checks_the_clinical_columns(tmp_path, ct_file, capsys):
    from finetune.clinical import fit_clinical_schema
    from nny_models.clinical import read_clinical_csv

    table = tmp_path / "table.csv"
    table.write_text("case_id,age,afp\n" + "".join(f"p{i},{50 + i},{10 * i}\n" for i in range(8)))
    schema = fit_clinical_schema(read_clinical_csv(table), seed=0)
    fused_kwargs = {"size": "tiny", "fusion": "add", "clinical_features": schema.num_features}
    plain = _model(0, model="nnynet", patch_size=(64, 64, 64))
    fused = _model(1, model="nnynet", model_kwargs=fused_kwargs, patch_size=(64, 64, 64),
                   clinical_schema=schema.to_dict())
    ensemble = Ensemble([plain, fused])
    assert ensemble.config.clinical_schema == fused.config.clinical_schema and ensemble.feature_sizes == [0, 2]
    plain.save_pretrained(tmp_path / "plain")
    fused.save_pretrained(tmp_path / "fused")
    row = tmp_path / "ct.json"
    row.write_text(json.dumps({"case_id": "ct", "age": 61}))  # lacks afp
    out = tmp_path / "mask.nii.gz"
    result = _predict(capsys, "--model", str(tmp_path / "plain"), "--model", str(tmp_path / "fused"), "--input",
                      str(ct_file), "--output", str(out), "--clinical", str(row))
    assert result.returncode == 2 and "lacks column(s) ['afp']" in result.stderr, result.stderr
    assert not out.exists()


def test_a_member_folder_without_weights_is_named(model_dir, tmp_path, ct_file, capsys):
    broken = tmp_path / "fold1"
    broken.mkdir()
    shutil.copy(model_dir / "config.json", broken / "config.json")
    result = _predict(capsys, "--model", str(model_dir), "--model", str(broken), "--input", str(ct_file),
                      "--output", str(tmp_path / "mask.nii.gz"))
    assert result.returncode == 2 and f"--model '{broken}': folder lacks model.safetensors" in result.stderr


def test_every_fusion_member_s_clinical_columns_are_checked(tmp_path, ct_file, capsys):
    from finetune.clinical import fit_clinical_schema
    from nny_models.clinical import read_clinical_csv

    members = []
    for seed, column in enumerate(("afp", "bilirubin")):
        table = tmp_path / f"{column}.csv"
        table.write_text(f"case_id,age,{column}\n" + "".join(f"p{i},{50 + i},{10 * i}\n" for i in range(8)))
        schema = fit_clinical_schema(read_clinical_csv(table), seed=0)
        kwargs = {"size": "tiny", "fusion": "add", "clinical_features": schema.num_features}
        members.append(_model(seed, model="nnynet", model_kwargs=kwargs, patch_size=(64, 64, 64),
                              clinical_schema=schema.to_dict()))
        members[-1].save_pretrained(tmp_path / column)
    row = tmp_path / "ct.json"
    row.write_text(json.dumps({"case_id": "ct", "age": 61, "afp": 12}))  # the first member's columns only
    out = tmp_path / "mask.nii.gz"
    result = _predict(capsys, "--model", str(tmp_path / "afp"), "--model", str(tmp_path / "bilirubin"), "--input",
                      str(ct_file), "--output", str(out), "--clinical", str(row))
    assert result.returncode == 2 and "lacks column(s) ['bilirubin']" in result.stderr, result.stderr
    assert not out.exists()
