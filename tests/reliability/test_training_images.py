"""Training images that are not a CT in HU: build_cache refuses them, naming the case and the file, as
nnynet-predict refuses them at inference.

Before, one case stored as HU + 1024 without its rescale intercept (or an MR in a CT folder) trained silently, exit
0, and moved the planned foreground normalization; predict would then refuse the same file. --skip_hu_check
(check_hu=False) trains on them anyway, for a real CT the test misjudges.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from nny_models.cache import build_cache
from nny_models.io import CaseRecord
from tests.reliability.test_labels import AFFINE, CFG
from tests.reliability.test_labels import write_case as write_labeled_case



def write_case(root, case_id: str, offset: float = 0.0) -> CaseRecord:
    """test_labels' CT case (air around soft tissue) with ``offset`` added to every voxel."""
    record = write_labeled_case(root, case_id)
    if offset:
        nii = nib.load(record.image)
        nib.save(nib.Nifti1Image(np.asarray(nii.dataobj) + offset, nii.affine), record.image)
    return record


def test_a_case_without_its_rescale_intercept_is_refused_by_name(tmp_path):
    records = [write_case(tmp_path, "ok"), write_case(tmp_path, "raw_007", offset=1024.0)]
    with pytest.raises(ValueError) as err:
        build_cache(records, CFG, tmp_path / "cache", num_classes=3)
    message = str(err.value)
    assert message.startswith("case 'raw_007': ") and "raw_007.nii.gz" in message, message
    assert "does not look like a CT in Hounsfield units" in message and "--skip_hu_check" in message, message
    assert "--force" not in message  # predict's remedy, not a training flag

    cache = build_cache(records, CFG, tmp_path / "cache", num_classes=3, check_hu=False)  # the override
    assert cache.case_ids == ["ok", "raw_007"]


def test_cases_cached_without_the_check_are_checked_when_it_is_on(tmp_path):
    records = [write_case(tmp_path, "raw", offset=1024.0)]
    build_cache(records, CFG, tmp_path / "cache", check_hu=False)  # an earlier run (or --skip_hu_check) cached it
    with pytest.raises(ValueError, match=r"case 'raw': .*does not look like a CT"):
        build_cache(records, CFG, tmp_path / "cache")  # reused only if it was checked: built again and refused


def test_checked_cases_are_reused_without_rebuilding(tmp_path):
    records = [write_case(tmp_path, "a"), write_case(tmp_path, "b")]
    build_cache(records, CFG, tmp_path / "cache")
    index = tmp_path / "cache" / "index.json"
    assert all(e["hu_checked"] for e in json.loads(index.read_text())["cases"].values())
    before = index.stat().st_mtime_ns
    build_cache(records, CFG, tmp_path / "cache")
    assert index.stat().st_mtime_ns == before  # nothing rebuilt, index untouched


def test_labels_holding_only_background_are_named_and_all_empty_is_an_error(tmp_path):
    """Empty label files (all 0) trained silently as cases without any structure."""
    from finetune.run import check_foreground

    records = [write_case(tmp_path, "a"), write_case(tmp_path, "b"), write_case(tmp_path, "c")]
    for r in records[1:]:
        nib.save(nib.Nifti1Image(np.zeros((32, 32, 12), np.uint8), AFFINE), r.label)
    cache = build_cache(records, CFG, tmp_path / "cache", num_classes=3)
    with pytest.warns(UserWarning, match=r"data: 2 of the 3 label files hold only background \(0\): 'b', 'c'"):
        check_foreground(cache, ["a", "b", "c"], "data", ["background", "liver", "tumor"])
    with pytest.raises(ValueError, match=r"data: none of the 2 label files holds a foreground .*\['liver', 'tumor'\]"):
        check_foreground(cache, ["b", "c"], "data", ["background", "liver", "tumor"])
