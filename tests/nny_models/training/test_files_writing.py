"""writing_dir: per-process temporary folders, leftovers of dead writers removed, live writers' kept."""

from __future__ import annotations

import os
import subprocess
import sys

from nny_models.training.files import writing_dir


def test_writing_dir_keeps_a_live_writer_s_folder_and_removes_dead_ones(tmp_path):
    dst = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_tmp = tmp_path / f".out.{int(dead.stdout)}.tmp"  # a writer killed mid-write
    legacy = tmp_path / ".out.tmp"  # an older nnynet's unnamed one
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        live_tmp = tmp_path / f".out.{live.pid}.tmp"  # another writer, still running
        other = tmp_path / ".out.b.tmp"  # the temporary name of another file ("out.b")
        for folder in (dead_tmp, legacy, live_tmp, other):
            folder.mkdir()
        with writing_dir(dst) as tmp:
            assert tmp.name == f".out.{os.getpid()}.tmp"
            (tmp / "a.txt").write_text("new")
        assert (dst / "a.txt").read_text() == "new" and not tmp.exists()
        assert not dead_tmp.exists() and not legacy.exists() and live_tmp.exists() and other.exists()
    finally:
        live.kill()
        live.wait()
