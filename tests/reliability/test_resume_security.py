"""--resume loads no pickle: a payload planted in each file a resume reads, and in every file Accelerate would
read, never runs, in the shared checkpoint code and in both stages' run.py.

A damaged checkpoint is skipped with a message naming the file, and the run resumes from the newest intact one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.reliability._payload import ACCELERATE_FILES, check_payload_works, plant

ROOT = Path(__file__).resolve().parents[2]


def _tiny_run(out: Path, steps: int = 2):
    """A Linear model trained `steps` steps with a checkpoint after each; returns (manager, weights per step)."""
    from nny_models.training import CheckpointManager, make_accelerator, warmup_cosine

    acc = make_accelerator(out, log_with=None)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = warmup_cosine(opt, 1, 10)
    model, opt = acc.prepare(model, opt)
    ckpt = CheckpointManager(acc, out, model, opt, sched, keep_last=5)
    weights = {}
    for step in range(1, steps + 1):
        model(torch.ones(2, 3)).sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        ckpt.save(step, extra={"best_val_dice": 0.1 * step})
        weights[step] = acc.unwrap_model(model).weight.detach().clone()
    with torch.no_grad():
        acc.unwrap_model(model).weight.zero_()  # what resume restores must come from the files
    return ckpt, weights


@pytest.mark.parametrize("name", ["latest", "trainer_state.json", "model.safetensors", "optimizer.bin"])
def test_payload_in_each_file_a_resume_reads_never_runs(tmp_path, capsys, name):
    check_payload_works(tmp_path)
    ckpt, weights = _tiny_run(tmp_path / "run")
    newest = ckpt.root / "step_0000002"
    marker = tmp_path / "pwned"
    plant(ckpt.root / "latest" if name == "latest" else newest / name, marker)
    for folder in (newest, ckpt.root / "step_0000001"):  # and everything Accelerate would have read
        for extra in ACCELERATE_FILES:
            plant(folder / extra, marker)

    step, state = ckpt.resume()
    assert not marker.exists()
    out = capsys.readouterr().out
    if name == "latest":  # a pointer that names no folder: the newest intact checkpoint is found anyway
        assert step == 2 and "does not name a checkpoint folder" in out
    else:
        assert step == 1 and state["best_val_dice"] == pytest.approx(0.1)
        assert f"skipping damaged checkpoint {newest}" in out and name in out
    assert torch.equal(ckpt.accelerator.unwrap_model(ckpt.model).weight, weights[step])


# ---------------------------------------------------------------------------------------------- both stages


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, script, *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=400)  # fmt: skip
    assert proc.returncode == 0, f"{script} {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def labeled(tmp_path_factory) -> Path:
    from nny_models.phantoms import write_dataset

    return write_dataset(tmp_path_factory.mktemp("sec") / "labeled", cases=3, seed=7)


STAGES = {
    "pretrain": ["pretrain/run.py", "--model", "unet", "--size", "tiny", "--patch_size", "32", "32", "32",
                 "--batch_size", "1", "--num_workers", "0", "--spacing", "5", "5", "6"],
    "finetune": ["finetune/run.py", "--model", "unet", "--size", "tiny", "--patch_size", "32", "32", "32",
                 "--batch_size", "1", "--num_workers", "0", "--spacing", "5", "5", "6", "--fusion", "none",
                 "--folds", "3", "--val_every", "0", "--no-deep_supervision"],
}  # fmt: skip


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_resume_skips_a_planted_payload_and_runs_none(stage, labeled, tmp_path):
    script, *args = STAGES[stage]
    out = tmp_path / "run"
    common = [*args, "--data_dir", str(labeled), "--output_dir", str(out), "--cache_dir", str(tmp_path / "cache"),
              "--checkpoint_every", "1"]  # fmt: skip
    proc = _run(script, *common, "--max_steps", "2", "--resume")  # --resume on an empty folder says so
    assert "--resume: no checkpoint" in proc.stdout
    marker = tmp_path / "pwned"
    for folder in (out / "checkpoints").glob("step_*"):
        for extra in ACCELERATE_FILES:
            plant(folder / extra, marker)
    plant(out / "checkpoints" / "step_0000002" / "optimizer.bin", marker)
    shutil.rmtree(out / "model")

    # the same --max_steps: a resume must train as the run started (another one changes the LR schedule and is
    # refused, tests/reliability/test_resume_and_config_faults.py)
    proc = _run(script, *common, "--max_steps", "2", "--resume")
    assert not marker.exists()
    assert "skipping damaged checkpoint" in proc.stdout and "step_0000002/optimizer.bin" in proc.stdout
    assert "at step 1" in proc.stdout
    steps = [row["step"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert [s for s in steps if s] == [1, 2]  # step 2 redone from the intact step-1 checkpoint
    assert (out / "model" / "model.safetensors").is_file()
