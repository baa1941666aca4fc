"""Training-side faults from the second audit: a --resume with other data or settings, --config values of the
wrong JSON type, inputs inside --output_dir (and --output_dir inside the data), a full disk while a checkpoint
is written, a truncated metrics.jsonl. Each ends as one line naming the file, the field and what was expected,
before anything is trained, deleted or overwritten."""

from __future__ import annotations

import dataclasses
import errno
import json
import warnings

import pytest

from tests.reliability.test_resume_security import _tiny_run


# ----------------------------------------------------------------------------- 1. --resume with other settings


def _finetune_cfg(out, **kw):
    from finetune.run import FinetuneConfig

    base = dict(output_dir=str(out), data_dir=str(out.parent / "data"), plan="none", patch_size=(64, 32, 32),
                batch_size=1, max_steps=4, num_workers=0, fusion="none")
    return FinetuneConfig(**{**base, **kw})


def _saved_run(out, cfg):
    """OUTPUT_DIR as a run leaves it: run_config.json and one checkpoint folder."""
    (out / "checkpoints" / "step_0000002").mkdir(parents=True)
    (out / "run_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))


def test_resume_with_other_data_and_settings_is_refused_naming_each_field(tmp_path):
    from finetune.run import training_function

    out = tmp_path / "run"
    _saved_run(out, _finetune_cfg(out))
    before = (out / "run_config.json").read_text()
    other = _finetune_cfg(out, data_dir=str(tmp_path / "data2"), resume=True, max_steps=8, lr=0.05, seed=3)
    with pytest.raises(ValueError) as err:
        training_function(other)
    msg = str(err.value)
    assert "\n" not in msg and "run_config.json" in msg
    for field, old, new in [("data_dir", "data", "data2"), ("max_steps", "4", "8"), ("lr", "0.002", "0.05"),
                            ("seed", "0", "3")]:
        assert field in msg and old in msg and new in msg, (field, msg)
    assert (out / "run_config.json").read_text() == before


def test_resume_check_allows_operational_fields_and_does_not_rewrite(tmp_path):
    from nny_models.training.checkpoints import check_resume_config

    out = tmp_path / "run"
    cfg = _finetune_cfg(out)
    assert check_resume_config(out, cfg, resume=False) is True  # fresh run: write it
    _saved_run(out, cfg)
    same = dataclasses.replace(cfg, resume=True, num_workers=3, checkpoint_every=7, grad_checkpointing=True)
    assert check_resume_config(out, same, resume=True) is False  # resume: keep the saved record
    with pytest.raises(ValueError, match=r"augmentation\.p_flip: 0\.5 -> 0\.1"):
        from finetune.augment import AugmentConfig

        check_resume_config(out, dataclasses.replace(same, augmentation=AugmentConfig(p_flip=0.1)), resume=True)
    (out / "run_config.json").write_text("{broken")
    with pytest.raises(ValueError, match="run_config.json is not readable JSON"):
        check_resume_config(out, same, resume=True)


def test_resume_check_accepts_another_spelling_of_a_path_and_fields_newer_than_the_run(tmp_path, monkeypatch):
    """A run started by an older nnynet lacks today's fields; a relative --data_dir is the same folder."""
    from nny_models.training.checkpoints import check_resume_config

    out = tmp_path / "run"
    (tmp_path / "data").mkdir()
    cfg = _finetune_cfg(out)
    _saved_run(out, cfg)
    saved = json.loads((out / "run_config.json").read_text())
    del saved["label_resampling"]  # a field added after the run started
    (out / "run_config.json").write_text(json.dumps(saved))
    monkeypatch.chdir(tmp_path)
    relative = dataclasses.replace(cfg, resume=True, data_dir="data")
    assert check_resume_config(out, relative, resume=True) is False
    with pytest.raises(ValueError, match='data_dir: ".*data" -> "elsewhere"'):
        check_resume_config(out, dataclasses.replace(relative, data_dir="elsewhere"), resume=True)


# ----------------------------------------------------------------------------- 2. --config JSON types


@pytest.mark.parametrize("values, message", [
    ({"overwrite": "false"}, "overwrite must be true or false"),
    ({"augment": "false"}, "augment must be true or false"),
    ({"lr": "1e-3"}, "lr must be a number"),
    ({"max_steps": "2"}, "max_steps must be an integer"),
    ({"max_steps": True}, "max_steps must be an integer"),
    ({"patch_size": 64}, "patch_size must be a list of 3 integers"),
    ({"fold": 1.5}, "fold must be an integer"),
    ({"augmentation": {"p_flip": "0.5"}}, "augmentation.p_flip must be a number"),
])
def test_config_json_of_the_wrong_type_is_one_line(tmp_path, values, message):
    from finetune.run import FinetuneConfig
    from nny_models.training import parse_config

    path = tmp_path / "c.json"
    path.write_text(json.dumps(values))
    with pytest.raises(ValueError) as err:
        parse_config(FinetuneConfig, ["--config", str(path)])
    assert str(err.value).startswith(f"--config {path}: {message}") and "\n" not in str(err.value)


def test_config_json_of_the_right_type_and_flags_still_parse(tmp_path):
    from finetune.run import FinetuneConfig
    from nny_models.training import parse_config

    path = tmp_path / "c.json"
    path.write_text(json.dumps({"overwrite": False, "lr": 1, "patch_size": [64, 32, 32], "spacing": None,
                                "augmentation": {"p_flip": 0}}))
    cfg = parse_config(FinetuneConfig, ["--config", str(path), "--max_steps", "7", "--no-augment", "--flip_axes", "0"])
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.patch_size == (64, 32, 32) and cfg.max_steps == 7
    assert cfg.augment is False and cfg.overwrite is False and cfg.flip_axes == (0,) and cfg.augmentation.p_flip == 0.0


# ----------------------------------------------------------------------------- 3. inputs inside --output_dir


def test_overwrite_never_deletes_a_pretrained_model_inside_output_dir(tmp_path):
    from finetune.run import training_function

    out = tmp_path / "run"
    pretrained = out / "model"  # e.g. an earlier export in the same folder
    pretrained.mkdir(parents=True)
    (pretrained / "config.json").write_text("{}")
    (out / "checkpoints" / "step_0000002").mkdir(parents=True)
    with pytest.raises(ValueError, match="--pretrained .* lies inside --output_dir"):
        training_function(_finetune_cfg(out, pretrained=str(pretrained), overwrite=True))
    assert (pretrained / "config.json").is_file() and (out / "checkpoints" / "step_0000002").is_dir()


def test_output_dir_equal_to_or_inside_the_data_is_refused(tmp_path):
    from finetune.run import training_function

    data = tmp_path / "data"
    (data / "imagesTr").mkdir(parents=True)
    for out in (data, data / "runs" / "a"):
        with pytest.raises(ValueError, match="lies inside --data_dir"):
            training_function(_finetune_cfg(out, data_dir=str(data)))
    assert sorted(p.name for p in data.iterdir()) == ["imagesTr"]


def test_config_file_inside_output_dir_is_refused_and_cache_inside_is_fine(tmp_path):
    from nny_models.training.checkpoints import check_output_paths

    out = tmp_path / "run"
    check_output_paths(out, {"--data_dir": tmp_path / "data", "--pretrained": "org/hub-model"}, tmp_path / "data")
    with pytest.raises(ValueError, match="--config .* lies inside --output_dir"):
        check_output_paths(out, {"--config": out / "checkpoints" / "c.json"}, None)
    with pytest.raises(ValueError, match="--config .* lies inside --output_dir"):
        check_output_paths(out, {"--config": out / "run_config.json"}, None)  # the run rewrites it
    # a file the run does not own (finetune.study writes each arm's permuted clinical table there)
    check_output_paths(out, {"--clinical_csv": out / "clinical_train_permuted.csv"}, None)


# ----------------------------------------------------------------------------- 4. disk full while checkpointing


def test_disk_full_while_saving_a_checkpoint_is_one_line_and_leaves_no_temp_folder(tmp_path, monkeypatch):
    from nny_models.training import CheckpointError

    ckpt, _ = _tiny_run(tmp_path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.accelerator, "save", full)
    with pytest.raises(CheckpointError) as err:
        ckpt.save(3)
    msg = str(err.value)
    assert "step_0000003" in msg and "no space left" in msg.lower() and "\n" not in msg
    assert not list(ckpt.root.glob(".*.tmp")) and not (ckpt.root / "step_0000003").exists()
    assert ckpt.latest().name == "step_0000002"  # the last good checkpoint is still the one to resume


# ----------------------------------------------------------------------------- 5. damaged metrics.jsonl


def test_truncated_last_metrics_line_is_dropped_with_a_warning(tmp_path):
    from nny_models.training import MetricsLog, make_accelerator

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n{"step": 3, "lo')
    with pytest.warns(UserWarning, match=f"{path}: line 3 is incomplete"):
        MetricsLog(make_accelerator(tmp_path, log_with=None), path, resume_step=2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


def test_damaged_metrics_line_in_the_middle_names_file_and_line(tmp_path):
    from nny_models.training import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ValueError, match=rf"{path}: line 2 is not a JSON object"), warnings.catch_warnings():
        warnings.simplefilter("error")
        read_metrics(path)


# ----------------------------------------------------------------------------- 6. fine-tuning's data on --resume


def _labeled_folder(data, ids):
    import nibabel as nib
    import numpy as np

    for sub in ("imagesTr", "labelsTr"):
        (data / sub).mkdir(parents=True, exist_ok=True)
    for i, cid in enumerate(ids):
        image = np.full((8, 8, 8), 40.0 + i, np.float32)
        nib.save(nib.Nifti1Image(image, np.eye(4)), data / "imagesTr" / f"{cid}.nii.gz")
        nib.save(nib.Nifti1Image((image > 0).astype(np.uint8), np.eye(4)), data / "labelsTr" / f"{cid}.nii.gz")


def test_finetune_resume_after_the_data_folder_changed_is_refused_before_the_cache(tmp_path):
    from finetune.run import training_function
    from nny_models.io import discover_cases
    from nny_models.training.checkpoints import data_cases, write_data_cases

    data, out = tmp_path / "data", tmp_path / "run"
    _labeled_folder(data, ["a", "b", "c"])
    cfg = _finetune_cfg(out, data_dir=str(data), resume=True)
    _saved_run(out, cfg)
    write_data_cases(out, data_cases(discover_cases(data)))  # as the run left it
    for sub in ("imagesTr", "labelsTr"):
        (data / sub / "c.nii.gz").unlink()
    _labeled_folder(data, ["d"])
    with pytest.raises(ValueError, match=r"--resume: the training data differ .*added \(d\).*removed \(c\)"):
        training_function(cfg)
    assert not (out / "cache").exists()  # refused before the cache was built


def test_finetune_cache_dir_inside_the_data_is_refused(tmp_path):
    from finetune.run import training_function

    data = tmp_path / "data"
    _labeled_folder(data, ["a", "b"])
    with pytest.raises(ValueError, match=r"--cache_dir .* lies inside --data_dir"):
        training_function(_finetune_cfg(tmp_path / "run", data_dir=str(data), cache_dir=str(data / "cache")))
    assert not (data / "cache").exists()
