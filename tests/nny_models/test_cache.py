import json
import logging
import multiprocessing
import os
import pickle

import nibabel as nib
import numpy as np
import pytest

from nny_models.cache import PreprocessedCache, build_cache
from nny_models.config import PreprocessConfig
from nny_models.io import CaseRecord
from nny_models.preprocessing import preprocess_case

AFFINE = np.diag([1.2, 1.2, 2.5, 1.0])
CFG = PreprocessConfig(spacing=(1.5, 1.5, 2.5))


def write_cases(root, n=2, unlabeled=1, shape=(40, 36, 16)):
    records = []
    for i in range(n + unlabeled):
        rng = np.random.default_rng(i)
        image = np.full(shape, -1000.0, np.float32)
        image[8:32, 6:30, 2:14] = 40 + rng.normal(0, 10, (24, 24, 12))
        label = np.zeros(shape, np.uint8)
        label[12:26, 10:24, 4:12] = 1
        label[14 + i : 17 + i, 12:15, 6:8] = 2
        nib.save(nib.Nifti1Image(image, AFFINE), str(root / f"c{i}.nii.gz"))
        label_path = None
        if i < n:
            label_path = str(root / f"c{i}_seg.nii.gz")
            nib.save(nib.Nifti1Image(label, AFFINE), label_path)
        records.append(CaseRecord(f"c{i}", str(root / f"c{i}.nii.gz"), label_path))
    return records


def built_count(caplog):
    return sum("build_cache: preprocessing" in r.getMessage() for r in caplog.records)


def test_cache_matches_preprocessing_and_is_memory_mapped(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="nny_models.cache")
    records = write_cases(tmp_path)
    cache = build_cache(records, CFG, tmp_path / "cache")
    assert cache.case_ids == ["c0", "c1", "c2"]
    for r in records:
        ref = preprocess_case(r.image, r.label, CFG)
        image = cache.image(r.case_id)
        assert isinstance(image, np.memmap) and image.dtype == np.float32
        np.testing.assert_array_equal(np.asarray(image), ref["image"])
        if r.label is None:
            assert cache.label(r.case_id) is None and cache.classes(r.case_id) == []
            continue
        np.testing.assert_array_equal(np.asarray(cache.label(r.case_id)), ref["label"])
        assert cache.classes(r.case_id) == [1, 2]
        meta = cache.meta(r.case_id)
        assert meta["shape"] == list(ref["image"].shape[1:]) and meta["crop_start"] == ref["meta"]["crop_start"]
        for c in (1, 2):  # stored foreground coordinates really are voxels of that class
            loc = cache.fg_locations(r.case_id, c)
            assert len(loc) == meta["classes"][str(c)]  # small classes are stored completely
            assert (ref["label"][0][tuple(loc.T)] == c).all()
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert index["preprocessing"] == CFG.to_dict()

    # idempotent: a second call preprocesses nothing and leaves the files alone
    c0_image = tmp_path / "cache" / "cases" / f"{cache.meta('c0')['stem']}.image.npy"
    stamp = os.stat(c0_image).st_mtime_ns
    build_cache(records, CFG, tmp_path / "cache")
    assert built_count(caplog) == 1
    assert os.stat(c0_image).st_mtime_ns == stamp

    # a pickled cache (DataLoader worker) reopens its memmaps instead of copying arrays
    cache.image("c0")
    clone = pickle.loads(pickle.dumps(cache))
    assert len(pickle.dumps(cache)) < 100_000
    np.testing.assert_array_equal(clone.image("c1"), cache.image("c1"))


def test_cache_rebuilds_on_config_or_source_change(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="nny_models.cache")
    records = write_cases(tmp_path, n=2, unlabeled=0)
    first = build_cache(records, CFG, tmp_path / "cache")
    shape = first.meta("c0")["shape"]
    other = PreprocessConfig(spacing=(3.0, 3.0, 5.0))
    cache = build_cache(records, other, tmp_path / "cache")
    assert cache.preprocess == other
    assert cache.meta("c0")["shape"] != shape
    np.testing.assert_array_equal(cache.image("c0"), preprocess_case(records[0].image, records[0].label, other)["image"])
    assert "preprocessing 2 of 2" in caplog.text

    # a changed source file: only that case is preprocessed again
    caplog.clear()
    st = os.stat(records[1].image)
    os.utime(records[1].image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    build_cache(records, other, tmp_path / "cache")
    assert "preprocessing 1 of 2" in caplog.text

    # a rebuilt case's superseded files are removed (by exact name); a case that left the data set leaves the
    # index, but its files stay: another run sharing the cache_dir may still read them
    c1_stem = build_cache(records, other, tmp_path / "cache").meta("c1")["stem"]
    cache = build_cache(records[:1], other, tmp_path / "cache")
    assert cache.case_ids == ["c0"]
    assert sorted(p.name for p in (tmp_path / "cache" / "cases").glob("*.npy")) == sorted(
        f"{stem}.{k}.npy" for stem in (cache.meta("c0")["stem"], c1_stem) for k in ("fg", "image", "label")
    )
    with pytest.raises(KeyError, match="unknown case id 'c1'"):
        cache.meta("c1")
    with pytest.raises(FileNotFoundError, match="run build_cache first"):
        PreprocessedCache(tmp_path / "nowhere")


def _build_in_child(records, cache_dir, barrier, num_workers, results):
    records_built = []

    class Count(logging.Handler):
        def emit(self, record):
            records_built.append(record.getMessage())

    logger = logging.getLogger("nny_models.cache")
    logger.setLevel(logging.INFO)
    logger.addHandler(Count())
    barrier.wait()
    cache = build_cache(records, CFG, cache_dir, num_workers=num_workers)
    results.put((len(records_built), cache.case_ids))


def test_two_processes_build_the_same_cache(tmp_path):
    records = write_cases(tmp_path, n=2, unlabeled=0)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    # both ask for a process pool, so whichever wins the lock builds with num_workers > 0
    procs = [ctx.Process(target=_build_in_child, args=(records, tmp_path / "cache", barrier, 2, results)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sorted(n for n, _ in results) == [0, 1]  # exactly one of them preprocessed, the other waited
    assert all(ids == ["c0", "c1"] for _, ids in results)
    cache = PreprocessedCache(tmp_path / "cache")
    for r in records:
        np.testing.assert_array_equal(cache.image(r.case_id), preprocess_case(r.image, r.label, CFG)["image"])
    leftovers = [p.name for p in (tmp_path / "cache").rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
