"""Two runs into one OUTPUT_DIR: the second fails at once with an error naming the folder and the holder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nny_models.training import lock_output_dir

ROOT = Path(__file__).resolve().parents[2]


def test_second_lock_on_a_folder_is_refused_and_released_after(tmp_path):
    with lock_output_dir(tmp_path):
        with pytest.raises(RuntimeError, match=rf"{tmp_path} is in use by another run \(pid {os.getpid()}"):
            with lock_output_dir(tmp_path):
                pass
    with lock_output_dir(tmp_path):  # released when the first run ends
        pass


@pytest.mark.parametrize("script", ["pretrain/run.py", "finetune/run.py"])
def test_a_second_run_into_a_busy_output_dir_fails_clearly(tmp_path, script):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with lock_output_dir(tmp_path):  # a first run holds the folder
        proc = subprocess.run([sys.executable, script, "--output_dir", str(tmp_path)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode != 0
    assert f"{tmp_path} is in use by another run" in proc.stderr
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_lock_is_released_by_kill9(tmp_path):
    code = f"from nny_models.training import lock_output_dir\nwith lock_output_dir({str(tmp_path)!r}):\n" \
           "    print('locked', flush=True)\n    import time; time.sleep(60)\n"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert proc.stdout.readline().strip() == "locked"
    with pytest.raises(RuntimeError, match="in use"):
        with lock_output_dir(tmp_path):
            pass
    proc.kill()
    proc.wait()
    with lock_output_dir(tmp_path):  # no stale lock after a crash
        pass
