"""A preprocessed-case cache: each case preprocessed once, stored as uncompressed .npy for mmap patch reads.

Layout of cache_dir:
    index.json              case ids, per-case meta (shape, spacing, crop, classes) and fingerprints
    cases/<stem>.image.npy  float32 (1, X, Y, Z)
    cases/<stem>.label.npy  uint8 (1, X, Y, Z) (labeled cases only)
    cases/<stem>.fg.npy     int32 (N, 4) rows [class, x, y, z]: a subsample of voxels per foreground class
    .lock                   fcntl lock held while building, so concurrent ranks build it once

<stem> is "<case id>.<first 16 hex digits of the case's fingerprint>": two data sets (two runs sharing a
cache_dir) never share a file, and a cache reads only files whose name carries its index entry's fingerprint.
A case is rebuilt when its fingerprint (PreprocessConfig + source file sizes/mtimes/ctimes/inodes + a CRC of
samples of their content) changes, or when one of its .npy files is missing or damaged (header, shape, dtype or
length not what the index says). A cache folder that is not writable is used as it is when every case in it is
current; otherwise build_cache says so instead of failing on its lock file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import multiprocessing
import os
import re
import zlib
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from nny_models.config import PreprocessConfig
from nny_models.io import CaseRecord
from nny_models.paths import content_crc

CACHE_VERSION = 2  # bump when the on-disk layout or preprocessing code changes meaning
# 2: padding below -1024 HU resampled as air, the model grid's affine fixed along z, crops keep labelled voxels,
#    fingerprints sample the source files' content
FG_SAMPLES_PER_CLASS = 10_000  # voxel coordinates kept per class for foreground oversampling
MAX_OPEN_CASES = 64  # memmaps kept open per process (each one holds a file descriptor)
READ_ONLY_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)  # what writing into a read-only cache_dir raises

log = logging.getLogger(__name__)


def _stamp(path: str | None) -> Any:
    """Size, mtime, ctime, inode and a content CRC of a file (or of every file of a DICOM folder).

    The ctime changes on every write of the content and cannot be set by a user, so on a local disk a file
    replaced by other content of the same size with its mtime kept (cp -p, rsync -t) is detected; the inode
    catches a replacement by rename. Some file systems keep no ctime of their own (sshfs, FAT/exFAT report the
    mtime): there the CRC of the content's samples (nny_models.paths.content_crc) still tells a same-size replacement apart.
    """
    if path is None:
        return None
    p = Path(path)

    def one(f: Path, whole: bool = True) -> list[int]:
        st = f.stat()
        return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, content_crc(f, whole=whole)]

    if p.is_dir():  # a DICOM series: hundreds of slices, so head and tail of each, not whole files
        return [[f.name, *one(f, whole=False)] for f in sorted(p.iterdir()) if f.is_file()]
    return one(p)


def case_fingerprint(record: CaseRecord, cfg: PreprocessConfig) -> str:
    payload = {
        "version": CACHE_VERSION,
        "preprocessing": cfg.to_dict(),
        "case_id": record.case_id,
        "image": [record.image, _stamp(record.image)],
        "label": [record.label, _stamp(record.label)],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _file_stem(case_id: str, fingerprint: str) -> str:
    """File name stem of a case's .npy files: its id (or a hash of an unusual id) and its fingerprint."""
    name = case_id if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,100}", case_id) else \
        "case-" + hashlib.sha1(case_id.encode()).hexdigest()[:16]
    return f"{name}.{fingerprint[:16]}"


CASE_FILE_KINDS = ("image", "label", "fg")


def _entry_files(entry: dict[str, Any]) -> list[str]:
    """Exact names of the files an index entry owns (as written under its stored stem)."""
    kinds = CASE_FILE_KINDS if entry.get("has_label") else CASE_FILE_KINDS[:1]
    return [f"{entry['stem']}.{k}.npy" for k in kinds] if entry.get("stem") else []


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as e:  # ENOLCK / EOPNOTSUPP: a network file system without locking
            raise OSError(e.errno, f"{path}: cannot lock the cache folder ({e.strerror}); concurrent builders could "
                                   "not be kept apart: expected a cache_dir on a file system with flock (a local "
                                   "disk)", str(path)) from e
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _atomic_save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(array))
        os.replace(tmp, path)
    except BaseException:  # disk full, interrupted: leave no half-written file behind
        tmp.unlink(missing_ok=True)
        raise


def _atomic_write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _read_index(cache_dir: Path) -> dict[str, Any] | None:
    """The index, or None when it is absent, unreadable, damaged or of another CACHE_VERSION (then rebuilt)."""
    try:
        index = json.loads((cache_dir / "index.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(index, dict) or index.get("version") != CACHE_VERSION:
        return None
    if not isinstance(index.get("cases"), dict) or not isinstance(index.get("case_ids"), list):
        return None
    return index


def _foreign_index(cache_dir: Path) -> str | None:
    """Why cache_dir/index.json is not a file build_cache wrote (so it must not be overwritten), or None when it is
    absent or a cache index of any version. The index is written atomically: a file that is not one is someone
    else's (a data folder passed as cache_dir holding its own index.json), or damaged beyond what a rebuild guesses."""
    path = cache_dir / "index.json"
    try:
        index = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"it is not JSON ({type(e).__name__}: {e})"
    if not isinstance(index, dict) or not isinstance(index.get("version"), int) or "cases" not in index:
        return "it is JSON without the cache's 'version' and 'cases'"
    return None


def foreground_locations(label: np.ndarray, case_id: str) -> tuple[np.ndarray, dict[str, list[int]]]:
    """Rows [class, x, y, z] for up to FG_SAMPLES_PER_CLASS voxels per class > 0, and row ranges per class."""
    label = label.reshape(label.shape[-3:])
    rng = np.random.default_rng(zlib.crc32(case_id.encode()))  # deterministic per case
    rows, offsets, start = [], {}, 0
    for c in np.unique(label):
        if c == 0:
            continue
        flat = np.flatnonzero(label == c)
        if len(flat) > FG_SAMPLES_PER_CLASS:
            flat = np.sort(rng.choice(flat, FG_SAMPLES_PER_CLASS, replace=False))
        coords = np.stack(np.unravel_index(flat, label.shape), axis=1)
        rows.append(np.concatenate([np.full((len(flat), 1), c), coords], axis=1).astype(np.int32))
        offsets[str(int(c))] = [start, start + len(flat)]
        start += len(flat)
    return (np.concatenate(rows) if rows else np.zeros((0, 4), np.int32)), offsets


def _build_one(
    record: CaseRecord, cfg_dict: dict[str, Any], cases_dir: str, fingerprint: str, num_classes: int | None = None,
    check_hu: bool = True,
) -> dict[str, Any]:
    """Preprocess one case and write its .npy files atomically; returns its index entry."""
    from nny_models.preprocessing import preprocess_case

    cfg = PreprocessConfig.from_dict(cfg_dict)
    try:
        out = preprocess_case(record.image, record.label, cfg, num_classes=num_classes, check_hu=check_hu)
    except ValueError as e:  # name the case: the message names the file, a data set has many
        raise ValueError(f"case {record.case_id!r}: {e}") from e
    stem, cases = _file_stem(record.case_id, fingerprint), Path(cases_dir)
    entry = dict(out["meta"], case_id=record.case_id, fingerprint=fingerprint, stem=stem, classes={}, fg_offsets={})
    _atomic_save(cases / f"{stem}.image.npy", out["image"])
    if out["label"] is not None:
        values, counts = np.unique(out["label"], return_counts=True)
        entry["classes"] = {str(int(v)): int(n) for v, n in zip(values, counts)}
        fg, entry["fg_offsets"] = foreground_locations(out["label"], record.case_id)
        _atomic_save(cases / f"{stem}.label.npy", out["label"])
        _atomic_save(cases / f"{stem}.fg.npy", fg)
    entry["has_label"] = out["label"] is not None
    entry["hu_checked"] = check_hu
    return entry


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)  # one case per process; avoid oversubscribing the cores


def _expected_arrays(entry: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{kind: (shape, dtype)} that the entry's .npy files must hold, from the index alone."""
    shape = (1, *(int(s) for s in entry["shape"]))
    out = {"image": (shape, np.dtype(np.float32))}
    if entry.get("has_label"):
        rows = max((int(span[1]) for span in entry.get("fg_offsets", {}).values()), default=0)
        out["label"] = (shape, np.dtype(np.uint8))
        out["fg"] = ((rows, 4), np.dtype(np.int32))
    return out


def _npy_problem(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> str | None:
    """Why the .npy file at ``path`` cannot be the (shape, dtype) array it should hold, or None when it can.
    Reads the header only: a file cut short (disk full, a copy interrupted) is found by its length."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in read_header:
                return f"unsupported .npy version {version}"
            found_shape, fortran, found_dtype = read_header[version](f)
            size, data_start = os.fstat(f.fileno()).st_size, f.tell()
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError, EOFError) as e:  # read_magic / the header parser on a cut or foreign file
        return f"not a readable .npy file ({e})"
    if tuple(found_shape) != tuple(shape) or np.dtype(found_dtype) != dtype or fortran:
        return f"holds {np.dtype(found_dtype)} {tuple(found_shape)}, expected {dtype} {tuple(shape)}"
    expected = data_start + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if size != expected:
        return f"{size:,} bytes, expected {expected:,} ({'cut short' if size < expected else 'extra bytes'})"
    return None


def _entry_is_current(cases_dir: Path, entry: Any, fingerprint: str, check_hu: bool) -> bool:
    """The entry is of this fingerprint and its files are intact under the name its fingerprint gives (an older
    layout's, a truncated or a foreign file are not reused: the case is built again)."""
    try:
        if entry.get("fingerprint") != fingerprint or not (entry.get("hu_checked") or not check_hu):
            return False  # other source / settings, or cached without the HU check (an older run): build it again
        if entry.get("stem") != _file_stem(entry.get("case_id", ""), entry.get("fingerprint", "")):
            return False
        expected = _expected_arrays(entry)
    except (AttributeError, KeyError, TypeError, ValueError):  # a hand-edited or damaged index entry
        return False
    return all(_npy_problem(cases_dir / f"{entry['stem']}.{kind}.npy", *expected[kind]) is None
               for kind in expected)


def _check_label_values(entry: dict[str, Any], num_classes: int) -> None:
    """A cached case's label values must lie in the label map 0..num_classes-1."""
    # label_values: counts on the original grid; caches written before it existed have only "classes"
    values = entry.get("label_values") or entry.get("classes") or {}
    bad = {int(v): int(n) for v, n in values.items() if int(v) >= num_classes}
    if bad:
        found = ", ".join(f"{v} ({n} voxel{'s' if n > 1 else ''})" for v, n in sorted(bad.items()))
        raise ValueError(
            f"case {entry['case_id']!r}: {entry.get('label_path')}: label value(s) {found} are outside the label "
            f"map of {num_classes} classes (expected 0..{num_classes - 1}); fix the label file or the label names"
        )


def build_cache(
    records: Sequence[CaseRecord],
    cfg: PreprocessConfig,
    cache_dir: str | Path,
    *,
    num_workers: int = 0,
    num_classes: int | None = None,
    check_hu: bool = True,
) -> "PreprocessedCache":
    """Preprocess every case once into cache_dir (idempotent; stale cases rebuilt; safe for concurrent ranks).

    num_classes: size of the label map (len(label_names)). Every labeled case, built now or found in the
    cache, must have label values in 0..num_classes-1, else a ValueError names the case, the file and the
    values. None: no check (e.g. pretraining, which ignores labels).
    check_hu: each case built now must look like a CT in HU (nny_models.hu_check), else a ValueError names it.
    """
    if num_classes is not None and int(num_classes) < 1:
        raise ValueError(f"build_cache: num_classes must be >= 1, got {num_classes}")
    cache_dir = Path(cache_dir)
    if len({r.case_id for r in records}) != len(records):
        raise ValueError("build_cache: case ids must be unique")
    fingerprints = {r.case_id: case_fingerprint(r, cfg) for r in records}
    overall = hashlib.sha256(json.dumps([[r.case_id, fingerprints[r.case_id]] for r in records]).encode()).hexdigest()
    try:
        return _build_locked(records, cfg, cache_dir, fingerprints, overall, num_workers, num_classes, check_hu)
    except OSError as err:
        # Only a refusal to write into cache_dir itself: an unreadable source file is the case's own error.
        inside = err.filename is not None and _is_within(Path(os.fsdecode(err.filename)), cache_dir)
        if err.errno not in READ_ONLY_ERRNOS or not inside:
            raise
        return _read_only_cache(records, cfg, cache_dir, fingerprints, overall, num_classes, check_hu, err)


def _is_within(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def _read_only_cache(
    records: Sequence[CaseRecord], cfg: PreprocessConfig, cache_dir: Path, fingerprints: dict[str, str], overall: str,
    num_classes: int | None, check_hu: bool, err: OSError,
) -> "PreprocessedCache":
    """A cache_dir this process may not write (a shared, read-only copy): used as it is when every case in it is
    current, else a PermissionError that says which cases would need building."""
    index = _read_index(cache_dir) or {"cases": {}}
    cases_dir = cache_dir / "cases"
    stale = [r.case_id for r in records
             if not _entry_is_current(cases_dir, index["cases"].get(r.case_id), fingerprints[r.case_id], check_hu)]
    if stale:
        shown = ", ".join(map(repr, stale[:5])) + (", ..." if len(stale) > 5 else "")
        raise PermissionError(
            err.errno,
            f"{cache_dir}: the cache folder is not writable ({os.strerror(err.errno)}: {err.filename}) and {len(stale)} "
            f"of {len(records)} case(s) are not in it as built from these files with these settings ({shown}); "
            "expected a writable cache_dir (pass another --cache_dir, or make this one writable)",
        ) from err
    if num_classes is not None:
        for r in records:
            _check_label_values(index["cases"][r.case_id], int(num_classes))
    log.info("build_cache: %s is read-only; all %d case(s) in it are current", cache_dir, len(records))
    return PreprocessedCache._from_index(cache_dir, {
        "version": CACHE_VERSION, "fingerprint": overall, "preprocessing": cfg.to_dict(),
        "case_ids": [r.case_id for r in records], "cases": {r.case_id: index["cases"][r.case_id] for r in records},
    })


def _build_locked(
    records: Sequence[CaseRecord], cfg: PreprocessConfig, cache_dir: Path, fingerprints: dict[str, str], overall: str,
    num_workers: int, num_classes: int | None, check_hu: bool,
) -> "PreprocessedCache":
    """build_cache's work under the cache's lock: reuse current cases, build the others, write the index."""
    cases_dir = cache_dir / "cases"
    cases_dir.mkdir(parents=True, exist_ok=True)
    with _locked(cache_dir / ".lock"):
        foreign = _foreign_index(cache_dir)
        if foreign is not None:  # never overwrite a file this code did not write
            raise ValueError(
                f"{cache_dir / 'index.json'}: not an nnynet cache index ({foreign}), and build_cache does not overwrite "
                "a file it did not write; expected a cache_dir of its own (pass another --cache_dir, or delete the "
                "file if it is a damaged cache index)"
            )
        index = _read_index(cache_dir) or {"cases": {}}
        old = {cid: e for cid, e in index["cases"].items() if isinstance(e, dict)}
        fresh = {cid: e for cid, e in old.items()
                 if cid in fingerprints and _entry_is_current(cases_dir, e, fingerprints[cid], check_hu)}
        if num_classes is not None:  # cases cached by an earlier run that did not check
            for entry in fresh.values():
                _check_label_values(entry, int(num_classes))
        if index.get("fingerprint") == overall and len(fresh) == len(records):
            return PreprocessedCache(cache_dir)
        todo = [r for r in records if r.case_id not in fresh]
        log.info("build_cache: preprocessing %d of %d case(s) into %s", len(todo), len(records), cache_dir)
        args = [(r, cfg.to_dict(), str(cases_dir), fingerprints[r.case_id], num_classes, check_hu) for r in todo]
        if num_workers > 0 and len(todo) > 1:
            # fork (cheap: no re-import of MONAI) where available; like DataLoader workers, each worker
            # drops to one torch thread, which keeps OpenMP safe after fork
            ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
            with ProcessPoolExecutor(min(num_workers, len(todo)), mp_context=ctx, initializer=_worker_init) as pool:
                built = list(pool.map(_build_one, *zip(*args)))
        else:
            built = [_build_one(*a) for a in args]
        fresh.update({e["case_id"]: e for e in built})
        index = {
            "version": CACHE_VERSION,
            "fingerprint": overall,
            "preprocessing": cfg.to_dict(),
            "case_ids": [r.case_id for r in records],
            "cases": {r.case_id: fresh[r.case_id] for r in records},
        }
        _atomic_write_json(cache_dir / "index.json", index)
        # Remove only the files of a case this index rebuilt (its old fingerprint is superseded here), by their
        # exact names. Files of cases that are not in this data set stay: another run sharing the cache_dir
        # may still read them (its index in memory names them).
        keep = {n for e in index["cases"].values() for n in _entry_files(e)}
        for cid, entry in old.items():
            if cid in index["cases"]:
                for name in _entry_files(entry):
                    if name not in keep:
                        (cases_dir / name).unlink(missing_ok=True)
    return PreprocessedCache(cache_dir)


class PreprocessedCache:
    """Read side of the cache: memory-mapped volumes and per-case meta. Cheap to pickle into workers."""

    def __init__(self, cache_dir: str | Path):
        self.cache_dir = Path(cache_dir)
        index = _read_index(self.cache_dir)
        if index is None:
            raise FileNotFoundError(f"{self.cache_dir}: no valid index.json (version {CACHE_VERSION}); run build_cache first")
        self._index = index
        self._open: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()

    @classmethod
    def _from_index(cls, cache_dir: str | Path, index: dict[str, Any]) -> "PreprocessedCache":
        """A cache read through an index held in memory (a read-only cache_dir whose index.json lists other cases)."""
        cache = cls.__new__(cls)
        cache.__setstate__({"cache_dir": Path(cache_dir), "_index": index})
        return cache

    def __getstate__(self) -> dict[str, Any]:
        return {"cache_dir": self.cache_dir, "_index": self._index}  # memmaps are reopened in each worker

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open = OrderedDict()

    @property
    def case_ids(self) -> list[str]:
        return list(self._index["case_ids"])

    @property
    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self._index["preprocessing"])

    def __len__(self) -> int:
        return len(self._index["case_ids"])

    def __contains__(self, case_id: object) -> bool:
        return case_id in self._index["cases"]

    def meta(self, case_id: str) -> dict[str, Any]:
        try:
            return self._index["cases"][case_id]
        except KeyError:
            raise KeyError(f"{self.cache_dir}: unknown case id {case_id!r}") from None

    def _load(self, case_id: str, kind: str) -> np.ndarray:
        key = (case_id, kind)
        if key in self._open:
            self._open.move_to_end(key)
            return self._open[key]
        entry = self.meta(case_id)
        stem = _file_stem(case_id, str(entry.get("fingerprint", "")))
        if entry.get("stem") != stem:  # an older layout (files named by case id only) or an edited index
            raise ValueError(
                f"{self.cache_dir / 'index.json'}: case {case_id!r}: the cached file name {entry.get('stem')!r} does "
                f"not carry the entry's fingerprint (expected {stem!r}); the cache is from an older nnynet or was "
                "edited: run build_cache again (or use a fresh cache_dir)"
            )
        path = self.cache_dir / "cases" / f"{stem}.{kind}.npy"
        # the header and length are checked before mapping: a file cut short would otherwise fail with numpy's
        # "mmap length is greater than file size", naming no file, or map an array of another shape
        try:
            shape, dtype = _expected_arrays(entry)[kind]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{self.cache_dir / 'index.json'}: case {case_id!r}: the index entry has no valid "
                             f"shape for its {kind}; run build_cache again (or use a fresh cache_dir)") from None
        problem = _npy_problem(path, shape, dtype)
        if problem == "missing":
            raise FileNotFoundError(
                f"{path}: cached {kind} of case {case_id!r} (fingerprint {stem.rsplit('.', 1)[1]}) is gone; another "
                "run sharing this cache_dir rebuilt the case from other data or removed it: give each data set its "
                "own cache_dir"
            )
        if problem is not None:
            raise ValueError(f"{path}: cached {kind} of case {case_id!r} is damaged: {problem}; run build_cache "
                             "again (it rebuilds damaged files) or use a fresh cache_dir")
        try:
            array = np.load(path, mmap_mode="r")
        except (OSError, ValueError, EOFError) as e:  # replaced or cut between the check and the mapping
            raise ValueError(f"{path}: cached {kind} of case {case_id!r} could not be read ({e}); run build_cache "
                             "again or use a fresh cache_dir") from e
        self._open[key] = array
        if len(self._open) > MAX_OPEN_CASES:
            self._open.popitem(last=False)
        return array

    def image(self, case_id: str) -> np.ndarray:
        """float32 memmap (1, X, Y, Z)."""
        return self._load(case_id, "image")

    def label(self, case_id: str) -> np.ndarray | None:
        """uint8 memmap (1, X, Y, Z), or None for an unlabeled case."""
        return self._load(case_id, "label") if self.meta(case_id)["has_label"] else None

    def classes(self, case_id: str) -> list[int]:
        """Foreground classes (> 0) present in the case's preprocessed label."""
        return sorted(int(c) for c in self.meta(case_id)["fg_offsets"])

    def fg_locations(self, case_id: str, cls: int) -> np.ndarray:
        """(N, 3) voxel coordinates of class ``cls`` (a subsample), empty if the class is absent."""
        span = self.meta(case_id)["fg_offsets"].get(str(int(cls)))
        if span is None:
            return np.zeros((0, 3), np.int32)
        return self._load(case_id, "fg")[span[0] : span[1], 1:]
