"""Issue 11, labels outside the label map: build_cache(num_classes=N) refuses a label value >= N, naming the case.

Before, a 7 in a 5-class data set trained silently when rare and crashed with "index 7 is out of bounds" (no
file named) when common. The check runs on the label as read (the original grid), so even one voxel that
resampling would erase is reported.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from nny_models.cache import build_cache
from nny_models.config import PreprocessConfig
from nny_models.io import CaseRecord
from nny_models.preprocessing import preprocess_case

AFFINE = np.diag([1.2, 1.2, 2.5, 1.0])
CFG = PreprocessConfig(spacing=(2.4, 2.4, 5.0))  # coarse: a single voxel of the label can vanish


def write_case(root, case_id: str, stray: int | None = None, stray_voxels: str = "one", shape=(32, 32, 12)):
    image = np.full(shape, -1000.0, np.float32)
    image[4:28, 4:28, 1:11] = 40.0
    label = np.zeros(shape, np.uint8)
    label[8:20, 8:20, 3:9] = 1
    label[10:13, 10:13, 4:6] = 2
    if stray is not None:
        if stray_voxels == "one":
            label[25, 25, 7] = stray  # rare: one voxel, finer than the 2.4 mm target grid
        else:
            label[8:20, 8:20, 3:9] = stray  # common: the whole organ
    nib.save(nib.Nifti1Image(image, AFFINE), str(root / f"{case_id}.nii.gz"))
    nib.save(nib.Nifti1Image(label, AFFINE), str(root / f"{case_id}_seg.nii.gz"))
    return CaseRecord(case_id, str(root / f"{case_id}.nii.gz"), str(root / f"{case_id}_seg.nii.gz"))


def test_rare_label_outside_map_names_case_file_and_value(tmp_path):
    records = [write_case(tmp_path, "ok"), write_case(tmp_path, "liver_007", stray=7)]
    with pytest.raises(ValueError) as err:
        build_cache(records, CFG, tmp_path / "cache", num_classes=5)
    message = str(err.value)
    assert "case 'liver_007'" in message and "liver_007_seg.nii.gz" in message
    assert "7 (1 voxel)" in message and "label map of 5 classes (expected 0..4)" in message


def test_common_label_outside_map_is_refused_too(tmp_path):
    records = [write_case(tmp_path, "big7", stray=7, stray_voxels="organ")]
    with pytest.raises(ValueError, match=r"case 'big7'.*7 \(864 voxels\).*expected 0\.\.4"):
        build_cache(records, CFG, tmp_path / "cache", num_classes=5)


def test_labels_inside_map_and_no_check_build(tmp_path):
    records = [write_case(tmp_path, "a"), write_case(tmp_path, "b", stray=4)]
    cache = build_cache(records, CFG, tmp_path / "cache", num_classes=5)  # 4 is the last class of 5: fine
    assert cache.case_ids == ["a", "b"]
    assert cache.meta("b")["label_values"] == {"0": 12 * 32 * 32 - 864 - 1, "1": 864 - 18, "2": 18, "4": 1}
    # num_classes=None (pretraining) does not look at label values
    build_cache([write_case(tmp_path, "c", stray=7)], CFG, tmp_path / "other", num_classes=None)


def test_cases_cached_without_the_check_are_checked_later(tmp_path):
    records = [write_case(tmp_path, "old", stray=9)]
    build_cache(records, CFG, tmp_path / "cache")  # an earlier run without num_classes cached it
    with pytest.raises(ValueError, match=r"case 'old'.*9 \(1 voxel\).*label map of 5 classes"):
        build_cache(records, CFG, tmp_path / "cache", num_classes=5)  # fast path: nothing to rebuild, still checked


def test_preprocess_case_checks_the_original_grid(tmp_path):
    record = write_case(tmp_path, "x", stray=5)
    out = preprocess_case(record.image, record.label, CFG)  # without num_classes: allowed ...
    assert 5 not in np.unique(out["label"])  # ... and resampling erased the stray voxel
    with pytest.raises(ValueError, match=r"x_seg\.nii\.gz: label value\(s\) 5 \(1 voxel\)"):
        preprocess_case(record.image, record.label, CFG, num_classes=5)
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        build_cache([record], CFG, tmp_path / "cache", num_classes=0)
