"""Training-data faults from the second audit: each one trained on the wrong data, or could not train, without a
clear word.

1. A dotted case id (``pt.1``) had its cache files deleted right after they were built (the stale-file cleanup
   cut the name at its first dot), and the run failed at its first step.
2. Two runs sharing a cache_dir with the same case ids from different data shared the .npy files: the second run
   replaced the first run's volumes, which the first then read as its own. Each file's name now carries the case's
   fingerprint; a cache refuses (one line) to read a case whose files are not its own.
3. A source file replaced by other content of the same size with its mtime kept (``cp -p``) was not detected: the
   fingerprint now includes the inode and the ctime.
4. One image (or label) listed under two case ids put the same scan in training and validation.
5. MSD dataset.json training entries without a label were dropped without a word.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings

import nibabel as nib
import numpy as np
import pytest

from nny_models.cache import PreprocessedCache, build_cache
from nny_models.io import CaseRecord, discover_cases
from nny_models.preprocessing import preprocess_case
from tests.reliability.test_labels import AFFINE, CFG, write_case


def test_dotted_case_id_keeps_its_cache_files(tmp_path):
    records = [write_case(tmp_path, "pt.1"), write_case(tmp_path, "pt.2.x")]
    cache = build_cache(records, CFG, tmp_path / "cache", num_classes=3)
    for r in records:
        np.testing.assert_array_equal(cache.image(r.case_id), preprocess_case(r.image, r.label, CFG)["image"])
        assert cache.label(r.case_id) is not None
    cache = build_cache(records, CFG, tmp_path / "cache", num_classes=3)  # the cached files are reused, not lost
    assert cache.image("pt.1").shape == cache.image("pt.2.x").shape


def _other_data(root, case_id):
    """A case with the same id as write_case's but other content."""
    root.mkdir(exist_ok=True)
    record = write_case(root, case_id)
    nii = nib.load(record.label)
    label = np.zeros(nii.shape, np.uint8)
    label[2:30, 2:30, 2:10] = 1
    nib.save(nib.Nifti1Image(label, nii.affine), record.label)
    return record


def test_shared_cache_dir_never_serves_another_runs_data(tmp_path):
    shared = tmp_path / "cache"
    run_a = build_cache([write_case(tmp_path, "c0")], CFG, shared, num_classes=3)
    label_a = np.asarray(run_a.label("c0")).copy()
    run_a = PreprocessedCache(shared)  # nothing opened yet, as a run that reads a case only later
    record_b = _other_data(tmp_path / "b", "c0")
    run_b = build_cache([record_b], CFG, shared, num_classes=3)
    label_b = preprocess_case(record_b.image, record_b.label, CFG)["label"]
    assert not np.array_equal(label_a, label_b)
    np.testing.assert_array_equal(run_b.label("c0"), label_b)
    # run A gets its own data back or a clear refusal, never run B's volumes
    try:
        got = np.asarray(run_a.label("c0"))
    except (FileNotFoundError, ValueError) as e:
        assert "c0" in str(e) and "cache_dir" in str(e) and "\n" not in str(e)
    else:
        np.testing.assert_array_equal(got, label_a)
    # the two data sets never share a file name
    names = {p.name for p in (shared / "cases").glob("*.npy")}
    assert names == {f"{run_b.meta('c0')['stem']}.{k}.npy" for k in ("image", "label", "fg")}
    assert run_a.meta("c0")["stem"] != run_b.meta("c0")["stem"]


def test_index_entry_and_file_must_match(tmp_path):
    """An index entry whose files do not carry its fingerprint (an older cache, or a tampered index) is refused."""
    record = write_case(tmp_path, "c0")
    build_cache([record], CFG, tmp_path / "cache", num_classes=3)
    index_path = tmp_path / "cache" / "index.json"
    index = json.loads(index_path.read_text())
    index["cases"]["c0"]["fingerprint"] = "0" * 64
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"'c0'.*fingerprint"):
        PreprocessedCache(tmp_path / "cache").image("c0")
    # build_cache rebuilds it rather than reading it
    cache = build_cache([record], CFG, tmp_path / "cache", num_classes=3)
    np.testing.assert_array_equal(cache.image("c0"), preprocess_case(record.image, record.label, CFG)["image"])


def test_old_layout_cache_is_rebuilt_not_misread(tmp_path):
    """A cache written before file names carried the fingerprint (cases/<id>.image.npy) is rebuilt."""
    record = write_case(tmp_path, "c0")
    cache = build_cache([record], CFG, tmp_path / "cache", num_classes=3)
    cases = tmp_path / "cache" / "cases"
    stem = cache.meta("c0")["stem"]
    for k in ("image", "label", "fg"):  # rewrite it as the old layout did, with a wrong image
        (cases / f"{stem}.{k}.npy").rename(cases / f"c0.{k}.npy")
    np.save(cases / "c0.image.npy", np.zeros_like(np.load(cases / "c0.image.npy")))
    index_path = tmp_path / "cache" / "index.json"
    index = json.loads(index_path.read_text())
    index["cases"]["c0"]["stem"] = "c0"
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="'c0'"):
        PreprocessedCache(tmp_path / "cache").image("c0")
    cache = build_cache([record], CFG, tmp_path / "cache", num_classes=3)
    np.testing.assert_array_equal(cache.image("c0"), preprocess_case(record.image, record.label, CFG)["image"])
    assert sorted(p.name for p in cases.glob("*.npy")) == sorted(f"{stem}.{k}.npy" for k in ("fg", "image", "label"))


def test_same_size_label_copied_with_kept_mtime_is_rebuilt(tmp_path):
    record = write_case(tmp_path, "c0")
    label = tmp_path / "c0_seg.nii"  # uncompressed: other content, the same size
    nib.save(nib.load(record.label), str(label))
    record = CaseRecord("c0", record.image, str(label))
    first = build_cache([record], CFG, tmp_path / "cache", num_classes=3)
    before = np.asarray(first.label("c0")).copy()
    replacement = tmp_path / "other" / "c0_seg.nii"
    replacement.parent.mkdir()
    data = np.asarray(nib.load(str(label)).dataobj).copy()
    data[data == 2] = 1  # class 2 relabeled as 1
    nib.save(nib.Nifti1Image(data, AFFINE), str(replacement))
    assert replacement.stat().st_size == label.stat().st_size
    st = label.stat()
    time.sleep(0.05)
    shutil.copyfile(replacement, label)  # as cp -p: new content ...
    os.utime(label, ns=(st.st_atime_ns, st.st_mtime_ns))  # ... with the old mtime and the same size
    assert label.stat().st_size == st.st_size and label.stat().st_mtime_ns == st.st_mtime_ns
    cache = build_cache([record], CFG, tmp_path / "cache", num_classes=3)
    np.testing.assert_array_equal(cache.label("c0"), preprocess_case(record.image, str(label), CFG)["label"])
    assert not np.array_equal(np.asarray(cache.label("c0")), before)


def test_one_image_under_two_case_ids_is_refused(tmp_path):
    for i in range(3):
        write_case(tmp_path, f"p{i}")
    rows = ["case_id,image,label"] + [f"c{i},p{i}.nii.gz,p{i}_seg.nii.gz" for i in range(3)]
    manifest = tmp_path / "dup.csv"
    manifest.write_text("\n".join(rows + ["c4,./p1.nii.gz,p1_seg.nii.gz"]) + "\n")
    with pytest.raises(ValueError, match=r"dup\.csv.*'c1'.*'c4'.*image") as e:
        discover_cases(manifest)
    assert "\n" not in str(e.value)
    (tmp_path / "link.nii.gz").symlink_to(tmp_path / "p2.nii.gz")  # the same file by another name
    manifest.write_text("\n".join(rows + ["c4,link.nii.gz,"]) + "\n")
    with pytest.raises(ValueError, match=r"'c2'.*'c4'.*image"):
        discover_cases(manifest)
    manifest.write_text("\n".join(rows + ["c4,p1.nii.gz,p0_seg.nii.gz"]).replace("c1,p1", "c1,p0") + "\n")
    with pytest.raises(ValueError, match=r"'c0'.*'c1'"):
        discover_cases(manifest)
    write_case(tmp_path, "p3")
    manifest.write_text("\n".join(rows + ["c4,p3.nii.gz,p0_seg.nii.gz"]) + "\n")
    with pytest.raises(ValueError, match=r"'c0'.*'c4'.*label"):
        discover_cases(manifest)
    manifest.write_text("\n".join(rows) + "\n")
    assert [r.case_id for r in discover_cases(manifest)] == ["c0", "c1", "c2"]


def test_msd_training_entry_without_label_warns(tmp_path):
    for i in range(3):
        write_case(tmp_path, f"liver_{i}")
    training = [{"image": f"./liver_{i}.nii.gz", "label": f"./liver_{i}_seg.nii.gz"} for i in range(3)]
    training[1] = {"image": "./liver_1.nii.gz"}
    training[2]["label"] = None
    (tmp_path / "dataset.json").write_text(json.dumps({"training": training, "test": []}))
    with pytest.warns(UserWarning, match=r"dataset\.json.*2 of the 3.*liver_1.*liver_2") as caught:
        records = discover_cases(tmp_path)
    assert [r.label is None for r in records] == [False, True, True]
    assert len([w for w in caught if "dataset.json" in str(w.message)]) == 1
    # all labeled, or none labeled (an unlabeled set): no warning, as for the nnU-Net layout
    for label in (True, False):
        entries = [{"image": f"./liver_{i}.nii.gz", "label": f"./liver_{i}_seg.nii.gz" if label else None}
                   for i in range(3)]
        (tmp_path / "dataset.json").write_text(json.dumps({"training": entries}))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            discover_cases(tmp_path)
