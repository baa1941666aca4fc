"""Pretraining faults from the third audit (pretrain/run.py on tiny CT folders): each one trained on other data than
asked, on garbage, or into the data folder with exit 0, or crashed mid-run with a traceback. Each now ends as one
line naming the flag or the file and what was expected, before the cache is built, or as a warning naming what is
skipped.

- Volume Fusion options out of range (--pretext.*): probabilities above 1 or percentiles above 100 ran (the
  latter crashed at the first step, "selected index k out of range"), gamma 0 or out_range 1 1 made every view
  constant (exit 0), a fg_ratio of 1.5 failed only after the cache, without naming the flag.
- --pretext.pairing roll with one patch per process silently paired two views of one volume; a huge
  --pretext.scale_range died with numpy's MemoryError traceback.
- --cache_dir inside --data_dir wrote the cache into the data.
- --resume after cases were added to, removed from or replaced in --data_dir trained on the new set, exit 0.
- A plain folder's nested sub-folders (a patient/study/series DICOM tree) and broken links were skipped silently.
- --export_every -1 exported after every step; --seed -1 and --phantom_cases 0 failed without naming the flag.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

AFFINE = np.diag([1.5, 1.5, 3.0, 1.0])


def ct(seed: int = 0, shape=(40, 40, 20)) -> np.ndarray:
    """Air, a body of soft tissue with a fat rim and a bone core: passes the HU check."""
    rng = np.random.default_rng(seed)
    x = np.full(shape, -1000.0, np.float32)
    xx, yy = np.ogrid[: shape[0], : shape[1]]
    r = np.hypot(xx - shape[0] / 2, yy - shape[1] / 2)
    x[r < shape[0] * 0.42] = -100.0
    x[r < shape[0] * 0.36] = 50.0
    x[r < shape[0] * 0.08] = 700.0
    return x + rng.normal(0, 5, shape).astype(np.float32) * (x > -500)


def write_ct(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(ct(seed), AFFINE), str(path))
    return path


def data_folder(root: Path, n: int = 2) -> Path:
    for i in range(n):
        write_ct(root / f"case{i}.nii.gz", seed=i)
    return root


def pretrain(tmp_path: Path, data: Path, *extra: str, out: str = "out") -> Path:
    """pretrain/run.py's main in this process: a tiny UNet, 2 steps of one 32^3 patch."""
    from pretrain.run import main

    out_dir = tmp_path / out
    main(["--data_dir", str(data), "--output_dir", str(out_dir), "--model", "unet", "--size", "tiny",
          "--patch_size", "32", "32", "32", "--spacing", "3", "3", "4", "--plan", "none", "--batch_size", "1",
          "--num_workers", "0", "--max_steps", "2", "--warmup_steps", "1", "--checkpoint_every", "0", *extra])
    return out_dir


# ----------------------------------------------------------------------------- 1. --pretext.* ranges


@pytest.mark.parametrize("options, flag", [
    (dict(fg_ratio=1.5), "--pretext.fg_ratio"),
    (dict(fg_ratio=float("nan")), "--pretext.fg_ratio"),
    (dict(flip_prob=2.0), "--pretext.flip_prob"),
    (dict(invert_prob=-1.0), "--pretext.invert_prob"),
    (dict(contrast_high=(98.0, 150.0)), "--pretext.contrast_high"),  # crashed: "selected index k out of range"
    (dict(contrast_low=(-5.0, 2.0)), "--pretext.contrast_low"),
    (dict(contrast_low=(99.0, 99.5), contrast_high=(1.0, 2.0)), "--pretext.contrast_low"),  # a backwards curve
    (dict(gamma_range=(0.0, 0.0)), "--pretext.gamma_range"),  # every view constant, exit 0
    (dict(gamma_range=(-1.0, 0.5)), "--pretext.gamma_range"),  # Inf views: reported as a diverged lr
    (dict(out_range=(1.0, 1.0)), "--pretext.out_range"),  # every view constant, exit 0
    (dict(out_range=(1.0, -1.0)), "--pretext.out_range"),
])
def test_pretext_option_out_of_range_is_refused_naming_the_flag(options, flag):
    from pretrain.data import PretextConfig

    with pytest.raises(ValueError, match=rf"^{flag} "):
        PretextConfig(**options)
    PretextConfig(contrast_low=(0.0, 5.0), contrast_high=(95.0, 100.0), invert_prob=0.0, flip_prob=1.0)  # edges fit


@pytest.mark.parametrize("extra, words", [
    (("--pretext.pairing", "roll"), ["--pretext.pairing roll", "--batch_size >= 2", "got 1"]),
    (("--pretext.scale_range", "0.7", "100"), ["--pretext.scale_range", "[3200, 3200, 3200]", "GiB"]),
    (("--pretext.fg_ratio", "1.5"), ["--pretext.fg_ratio", "[0, 1]"]),
    (("--export_every", "-1"), ["--export_every must be >= 0"]),
    (("--seed", "-1"), ["--seed must be in 0 .. 2**32 - 1"]),
])
def test_bad_pretraining_option_stops_before_the_cache(tmp_path, extra, words):
    data = data_folder(tmp_path / "data")
    with pytest.raises(ValueError) as err:
        pretrain(tmp_path, data, *extra)
    for word in words:
        assert word in str(err.value), (word, str(err.value))
    assert not (tmp_path / "out" / "cache").exists()  # refused before any case was preprocessed


def test_phantom_cases_below_one_names_the_flag():
    from pretrain.run import PretrainConfig

    with pytest.raises(ValueError, match="--phantom_cases must be >= 1"):
        PretrainConfig(phantom_cases=0)


# ----------------------------------------------------------------------------- 2. writing into the data


@pytest.mark.parametrize("where", ["data/cache", "data"])
def test_cache_dir_inside_the_data_is_refused(tmp_path, where):
    data = data_folder(tmp_path / "data")
    before = sorted(p.name for p in data.iterdir())
    with pytest.raises(ValueError, match=r"--cache_dir .* lies inside --data_dir"):
        pretrain(tmp_path, data, "--cache_dir", str(tmp_path / where))
    assert sorted(p.name for p in data.iterdir()) == before  # nothing written into the data


# ----------------------------------------------------------------------------- 3. --resume on other cases


def test_resume_check_names_cases_added_removed_and_changed(tmp_path):
    from nny_models.training.checkpoints import check_resume_data

    (tmp_path / "checkpoints" / "step_0000002").mkdir(parents=True)
    # o: saved by an older nnynet as bytes alone, compared by size
    (tmp_path / "data_cases.json").write_text('{"cases": {"a": "10:0a", "b": "20:0b", "c": "30:0c", "o": 40}}')
    check_resume_data(tmp_path, {"a": "10:0a", "b": "20:0b", "c": "30:0c", "o": "40:0d"}, resume=True)
    check_resume_data(tmp_path, {"z": "1:00"}, resume=False)  # no --resume: nothing to check
    with pytest.raises(ValueError) as err:  # b: the same size, other content
        check_resume_data(tmp_path, {"a": "10:0a", "b": "20:ff", "d": "5:0d", "o": "40:ee"}, resume=True)
    message = str(err.value)
    for part in ("1 case(s) added (d)", "1 case(s) removed (c)", "1 case(s) whose files changed (b)",
                 "data_cases.json"):
        assert part in message, (part, message)
    (tmp_path / "data_cases.json").unlink()  # a run saved before the file existed resumes as before
    check_resume_data(tmp_path, {"z": "1:00"}, resume=True)


def test_resume_after_the_data_folder_changed_is_refused(tmp_path):
    data = data_folder(tmp_path / "data", n=3)
    out = pretrain(tmp_path, data, "--checkpoint_every", "1")
    shutil.rmtree(out / "checkpoints" / "step_0000002")  # as if killed after step 1
    (data / "case2.nii.gz").unlink()
    write_ct(data / "new.nii.gz", seed=9)
    with pytest.raises(ValueError, match=r"--resume: the training data differ .*added \(new\).*removed \(case2\)"):
        pretrain(tmp_path, data, "--checkpoint_every", "1", "--resume")
    assert not (out / "checkpoints" / "step_0000002").exists()  # nothing trained on the other set


# ----------------------------------------------------------------------------- 4. what a plain folder skips


def test_nested_folders_and_broken_links_are_named(tmp_path):
    data = data_folder(tmp_path / "data")
    write_ct(data / "patient7" / "study" / "ct.nii.gz", seed=7)  # a nested case: not used
    (data / "missing.nii.gz").symlink_to(tmp_path / "gone.nii.gz")  # a broken link: not used
    write_ct(data / "._case0.nii.gz")  # a macOS resource fork name: skipped without a word
    (data / "notes").mkdir()
    (data / "notes" / "readme.txt").write_text("not an image")
    with pytest.warns(UserWarning) as record:
        pretrain(tmp_path, data)
    messages = [str(w.message) for w in record if "not used as case" in str(w.message)]
    assert len(messages) == 1, [str(w.message) for w in record]
    assert "patient7/ (holds patient7/study/ct.nii.gz)" in messages[0], messages[0]
    assert "missing.nii.gz (a broken symbolic link)" in messages[0], messages[0]
    assert "._case0" not in messages[0] and "notes" not in messages[0], messages[0]


def test_a_folder_of_nested_cases_says_where_they_are(tmp_path):
    write_ct(tmp_path / "data" / "p1" / "ct.nii.gz")
    with pytest.raises(ValueError, match=r"no cases found.*p1/ \(holds p1/ct\.nii\.gz\).*CSV manifest"):
        pretrain(tmp_path, tmp_path / "data")


def test_case_fingerprint_sees_a_label_repainted_in_place_and_not_a_copy(tmp_path):
    import shutil

    from nny_models.io import CaseRecord
    from nny_models import paths
    from nny_models.training.checkpoints import data_cases

    label = np.zeros((16, 16, 16), np.uint8)
    label[4:8, 4:8, 4:8] = 1
    nib.save(nib.Nifti1Image(np.full((16, 16, 16), 40.0, np.float32), np.eye(4)), tmp_path / "a.nii")
    nib.save(nib.Nifti1Image(label, np.eye(4)), tmp_path / "a_label.nii")
    before = data_cases([CaseRecord("a", str(tmp_path / "a.nii"), str(tmp_path / "a_label.nii"))])
    shutil.copytree(tmp_path, tmp_path.parent / f"{tmp_path.name}_copy")  # another copy: other paths, times
    copy = tmp_path.parent / f"{tmp_path.name}_copy"
    assert data_cases([CaseRecord("a", str(copy / "a.nii"), str(copy / "a_label.nii"))]) == before
    label[9, 9, 9] = 2  # one voxel repainted: an uncompressed .nii keeps its size
    nib.save(nib.Nifti1Image(label, np.eye(4)), tmp_path / "a_label.nii")
    after = data_cases([CaseRecord("a", str(tmp_path / "a.nii"), str(tmp_path / "a_label.nii"))])
    assert after["a"].split(":")[0] == before["a"].split(":")[0] and after != before

    big = tmp_path / "big.nii"  # above the whole-file limit: sampled, still the same on a copy, and a tail edit seen
    big.write_bytes(bytes(range(256)) * (paths.WHOLE_FILE_BYTES // 256 + 4096))
    first = data_cases([CaseRecord("b", str(big))])
    with big.open("r+b") as f:
        f.seek(-10, 2)
        f.write(b"x")
    assert data_cases([CaseRecord("b", str(big))]) != first


def test_case_fingerprint_of_a_gzip_volume_sees_an_edit_in_the_middle(tmp_path):
    from nny_models.io import CaseRecord
    from nny_models.training.checkpoints import data_cases

    rng = np.random.default_rng(0)
    image = rng.normal(0, 100, (160, 160, 80)).astype(np.float32)  # ~7 MB compressed: only head and tail read
    path = tmp_path / "a.nii.gz"
    nib.save(nib.Nifti1Image(image, np.eye(4)), path)
    before = data_cases([CaseRecord("a", str(path))])
    image[80, 80, 40] += 1.0
    nib.save(nib.Nifti1Image(image, np.eye(4)), path)
    assert data_cases([CaseRecord("a", str(path))]) != before
