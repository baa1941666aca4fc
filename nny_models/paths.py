"""Small file-system helpers the CLIs share: one file under two names, a file flushed to disk, a live writer."""

from __future__ import annotations

import os
from pathlib import Path


def same_file(a: Path, b: Path) -> bool:
    """True when a and b are one file: equal resolved paths (symlinks, "..", spellings) or one inode (hard links)."""
    if Path(a).resolve() == Path(b).resolve():
        return True
    try:
        return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


def fsync_file(path: Path) -> None:
    """Flush a written file to disk, so that a rename after it never publishes an empty file after a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def process_running(pid: int) -> bool:
    """Whether process ``pid`` still runs (then its temporary files are not leftovers). Our own pid counts as not
    running: a temporary name with it is a leftover of an earlier attempt (or of a killed process whose pid we got)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process: it runs
        return True
    return True
