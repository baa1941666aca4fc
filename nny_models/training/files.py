"""Crash-safe file operations of a run: the OUTPUT_DIR lock and atomic directory replacement.

A kill -9 may land at any instruction. Everything a later run or a user reads (checkpoints, the exported
model with its card) is therefore written under a temporary name and swapped in by one rename, so the
path holds either the complete old content or the complete new content, never a mix.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import glob
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from nny_models.paths import process_running

LOCK_NAME = ".lock"

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h
try:
    _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
except (AttributeError, OSError):  # not glibc / not Linux
    _renameat2 = None


def _is_rank_zero() -> bool:
    """Rank from the launcher's environment (torchrun / accelerate launch set RANK before the process group)."""
    return os.environ.get("RANK", "0") == "0"


class OutputDirInUse(RuntimeError):
    """Another run holds the output folder's lock."""


@contextmanager
def lock_output_dir(output_dir: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on OUTPUT_DIR/.lock for the duration of a run (rank 0 of a launch only).

    Two runs into one folder would interleave metrics.jsonl and overwrite each other's checkpoints and model;
    the second one fails here instead. The lock is an ``fcntl.flock`` on an open file: the kernel releases it
    when the process ends, so a kill -9 never leaves a stale lock behind.
    """
    if not _is_rank_zero():  # the other ranks of the same launch share rank 0's lock
        yield
        return
    path = Path(output_dir).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    handle: IO[str] = (path / LOCK_NAME).open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise OutputDirInUse(
            f"{path} is in use by another run (pid {holder} holds {path / LOCK_NAME}); "
            "wait for it to finish or choose another --output_dir"
        ) from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def exchange_dirs(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux renameat2 RENAME_EXCHANGE). False if the OS/FS cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"exchanging {a} and {b}: {os.strerror(err)}")


def replace_dir(src: Path, dst: Path) -> None:
    """Make ``dst`` hold what ``src`` holds, atomically; ``src`` is consumed.

    First write: one rename. Later writes: an atomic exchange, then the old content (now at src) is deleted.
    Where the file system cannot exchange (not Linux, or e.g. NFS), dst is moved aside and src renamed in: two
    renames, so a kill in the instant between them leaves no ``dst`` but both complete copies, the old one at
    ``.<name>.old`` and the new one at ``src``.
    """
    src, dst = Path(src), Path(dst)
    if not dst.exists():
        os.replace(src, dst)
        return
    if exchange_dirs(src, dst):
        shutil.rmtree(src)
        return
    old = dst.with_name(f".{dst.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def writing_dir(dst: str | Path) -> Iterator[Path]:
    """``with writing_dir(out) as tmp: write files into tmp`` -> out is replaced by tmp atomically on success.

    If the body raises (or the process dies), ``out`` is untouched. The temporary folder is named by process, so
    two writers never delete each other's; one left by a killed writer is removed by the next one.
    """
    dst = Path(dst)
    _remove_dead_writers(dst)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, dst)


def _remove_dead_writers(dst: Path) -> None:
    """Delete the temporary folders of writers of ``dst`` that no longer run (and the unnamed one of older
    nnynet versions)."""
    if not dst.parent.is_dir():
        return
    for old in dst.parent.glob(f".{glob.escape(dst.name)}.*tmp"):
        middle = old.name[len(dst.name) + 2 : -len("tmp")].rstrip(".")
        if middle and not middle.isdigit():
            continue  # another file's temporary name (".a.b.tmp" for "a")
        if middle and process_running(int(middle)):
            continue
        shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a small file under a temporary name, then rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
