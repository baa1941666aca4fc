"""Damaged checkpoints: a truncated model.safetensors or optimizer.bin, an empty or missing trainer_state.json.
Each is reported by path and the newest intact checkpoint is used; with none intact the run stops instead of
restarting at step 0 over its own checkpoints; a fresh run never starts over an earlier one."""

from __future__ import annotations

import pytest
import torch

from nny_models.training import CheckpointError, check_output_dir
from tests.reliability.test_resume_security import _tiny_run


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGE = {
    "truncated model.safetensors": ("model.safetensors", _truncate),
    "truncated optimizer.bin": ("optimizer.bin", _truncate),
    "empty trainer_state.json": ("trainer_state.json", lambda p: p.write_text("")),
    "missing trainer_state.json": ("trainer_state.json", lambda p: p.unlink()),
    "missing optimizer.bin": ("optimizer.bin", lambda p: p.unlink()),
    "non-finite weights": ("model.safetensors", None),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_the_intact_one(tmp_path, capsys, case):
    ckpt, weights = _tiny_run(tmp_path)
    name, damage = DAMAGE[case]
    bad = ckpt.root / "step_0000002" / name
    if damage is None:
        from safetensors.torch import load_file, save_file

        state = load_file(bad)
        state["weight"][0, 0] = float("nan")
        save_file(state, bad)
    else:
        damage(bad)
    step, _ = ckpt.resume()
    assert step == 1
    assert torch.equal(ckpt.accelerator.unwrap_model(ckpt.model).weight, weights[1])
    out = capsys.readouterr().out
    assert f"skipping damaged checkpoint {bad.parent}" in out and str(bad) in out
    assert "resumed from" in out and "step_0000001" in out


def test_no_intact_checkpoint_is_an_error_not_a_restart(tmp_path):
    ckpt, _ = _tiny_run(tmp_path)
    for folder in ckpt.root.glob("step_*"):
        (folder / "trainer_state.json").unlink()  # e.g. deleted by hand
    with pytest.raises(CheckpointError, match="refusing to restart at step 0") as err:
        ckpt.resume()
    assert "step_0000001/trainer_state.json: missing" in str(err.value)
    assert "step_0000002/trainer_state.json: missing" in str(err.value)


def test_a_checkpoint_of_another_model_is_named(tmp_path):
    from nny_models.training import CheckpointManager, warmup_cosine

    ckpt, _ = _tiny_run(tmp_path)
    other = torch.nn.Linear(5, 1)
    opt = torch.optim.AdamW(other.parameters(), lr=0.1)
    with pytest.raises(CheckpointError, match="does not fit this run's model"):
        CheckpointManager(ckpt.accelerator, tmp_path, other, opt, warmup_cosine(opt, 1, 10)).resume()


def test_fresh_run_over_an_earlier_one_is_refused_and_overwrite_is_explicit(tmp_path, capsys):
    ckpt, _ = _tiny_run(tmp_path)
    acc = ckpt.accelerator
    with pytest.raises(FileExistsError, match="--resume"):
        check_output_dir(acc, tmp_path, resume=False)
    check_output_dir(acc, tmp_path, resume=True)  # continuing is fine
    check_output_dir(acc, tmp_path, resume=False, overwrite=True)
    assert not ckpt.root.exists() and "--overwrite: deleted" in capsys.readouterr().out
    check_output_dir(acc, tmp_path, resume=True)
    assert "--resume: no checkpoint" in capsys.readouterr().out


def test_resume_and_overwrite_together_are_refused():
    from finetune.run import FinetuneConfig

    with pytest.raises(ValueError, match="--resume.*--overwrite"):
        FinetuneConfig(resume=True, overwrite=True)
