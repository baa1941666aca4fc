"""The stage scripts end on bad input with one line "PROG: error: ..." and exit code 2, as nnynet-predict does;
bugs keep their traceback, and NNYNET_DEBUG=1 shows it for input errors too."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nny_models.training import OutputDirInUse, run_main

ROOT = Path(__file__).resolve().parents[3]


def _stage(*args: str, debug: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "NNYNET_DEBUG"}
    if debug:
        env["NNYNET_DEBUG"] = "1"
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("script, args, words", [
    ("finetune/run.py", ["--data_dir", "/no/such/ct"], "/no/such/ct: no such file or directory"),
    ("pretrain/run.py", ["--max_steps", "0"], "--max_steps must be >= 1, got 0"),
])  # fmt: skip
def test_a_stage_refuses_bad_input_in_one_line_with_exit_code_2(tmp_path, script, args, words):
    proc = _stage(script, *args, "--output_dir", str(tmp_path / "run"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith(f"{script}: error: ") and words in lines[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr

    debug = _stage(script, *args, "--output_dir", str(tmp_path / "run"), debug=True)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and words in debug.stderr


def test_user_errors_exit_2_and_bugs_keep_their_traceback(capsys):
    def missing() -> None:
        raise FileNotFoundError("/data/ct.nii.gz: no such file or directory")

    def busy() -> None:
        raise OutputDirInUse("runs/x is in use by another run (pid 7 holds runs/x/.lock)")

    for main, words in ((missing, "/data/ct.nii.gz: no such file"), (busy, "in use by another run")):
        with pytest.raises(SystemExit) as done:
            run_main(main, "finetune/run.py")
        assert done.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("finetune/run.py: error: ") and words in err and err.count("\n") == 1

    def bug() -> None:
        raise KeyError("a bug, not bad input")

    with pytest.raises(KeyError):
        run_main(bug, "finetune/run.py")


def test_a_failed_pipeline_stage_is_one_line_with_its_exit_code(capsys):
    from finetune.pipeline import run

    with pytest.raises(SystemExit) as done:
        run([sys.executable, "-c", "import sys; sys.exit(3)"])
    assert done.value.code == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("finetune.pipeline: error: this stage exited with code 3")
