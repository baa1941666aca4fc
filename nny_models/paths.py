"""Small file-system helpers: one file under two names, a file flushed to disk, a live writer, a content CRC."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np


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


WHOLE_FILE_BYTES = 8 * 1024**2  # content_crc reads files up to this size whole (labels, small volumes)
SAMPLE_BYTES = 256 * 1024  # larger ones: 16 evenly spaced blocks of this size (a .nii.gz: its head and its tail)


def content_crc(path: Path, crc: int = 0, whole: bool = True) -> int:
    """CRC32 of a file's content (continuing ``crc``), cheap on big files: a gzip stream (.nii.gz) ends with the
    CRC32 and length of all it holds, and any change rewrites the stream after it, so its head and tail see any
    change; other files are read whole up to WHOLE_FILE_BYTES, else 16 evenly spaced blocks (an edit between
    them goes unseen; callers add the size). ``whole=False``: head and tail only (each slice of a DICOM series)."""
    size = os.stat(path).st_size
    with open(path, "rb") as f:
        gzip = f.read(2) == b"\x1f\x8b"
        f.seek(0)
        if whole and not gzip and size <= WHOLE_FILE_BYTES:
            while block := f.read(8 * 1024**2):
                crc = zlib.crc32(block, crc)
            return crc
        blocks = 16 if whole and not gzip else 2
        for offset in np.linspace(0, max(size - SAMPLE_BYTES, 0), blocks).astype(np.int64):
            f.seek(int(offset))
            crc = zlib.crc32(f.read(SAMPLE_BYTES), crc)
    return crc
