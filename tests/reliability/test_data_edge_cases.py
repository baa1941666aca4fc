"""Unusual but legal data through preprocessing, the cache and patch sampling.

Geometry: oblique and non-RAS (LPS, PIL) affines, extreme anisotropy, volumes smaller than the patch, a body on the
volume's border: a structure at a known world position must come back at that position on the input's own grid.
Intensities: int16 padding (-32768) outside the scanner circle, an all-air volume. Labels: a class in one case only,
an all-background label, a single-voxel class, a class that resampling loses, labels outside the body. Cache: a
source replaced by another of the same size, a truncated .npy, a damaged index, a read-only cache folder, two
processes building one cache.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import shutil
import subprocess
import zlib
from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np
import pytest
import torch

from nny_models.cache import PreprocessedCache, build_cache, case_fingerprint
from nny_models.config import PreprocessConfig
from nny_models.io import CaseRecord
from nny_models.preprocessing import (
    preprocess_case,
    preprocess_volume,
    restore_labels_from_probabilities,
    restore_to_original,
)
from nny_models.sampling import PatchDataset

ISO = PreprocessConfig(spacing=(1.0, 1.0, 1.0))


def rotation(axis: int, degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    i, j = [(1, 2), (0, 2), (0, 1)][axis]
    r = np.eye(3)
    r[i, i] = r[j, j] = np.cos(t)
    r[i, j], r[j, i] = -np.sin(t), np.sin(t)
    return r


def affine_of(matrix: np.ndarray, origin: tuple[float, float, float]) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3], a[:3, 3] = matrix, origin
    return a


def world(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """(X, Y, Z, 3) world coordinates (mm) of every voxel centre of a grid."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float64)
    return grid @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float(np.logical_and(a, b).sum()) / max(float(a.sum() + b.sum()), 1.0)


# ----------------------------------------------------------------------------- geometry

OBLIQUE = affine_of(rotation(2, 30) @ rotation(0, 15), (10.0, -20.0, 5.0))
LPS = affine_of(np.diag([-1.0, -1.0, 1.0]), (40.0, 30.0, -5.0))
PIL = affine_of(np.array([[0, 0, -1.0], [-1.0, 0, 0], [0, -1.0, 0]]), (10.0, 5.0, 3.0))  # axes P, I, L


@pytest.mark.parametrize("affine", [OBLIQUE, LPS, PIL], ids=["oblique", "LPS", "PIL"])
def test_a_structure_comes_back_at_its_world_position_after_crop_and_restore(affine):
    # the body sits in a corner and touches three faces, so the crop moves the grid's origin along every axis
    shape = (48, 48, 48)
    image = np.full(shape, -1000.0, np.float32)
    image[:14, 18:32, 34:] = 40.0
    centre = affine[:3, :3] @ np.array([6.0, 25.0, 41.0]) + affine[:3, 3]
    x, state = preprocess_volume(image, affine, ISO)
    assert state["shape"] != state["resampled_shape"]  # cropped
    assert nib.aff2axcodes(np.array(state["affine"])) == ("R", "A", "S") or affine is OBLIQUE

    # the model grid's affine is the resampled one moved by the crop: MONAI's CropForegroundd used to drop the z
    # offset, so the model-grid affine pointed 28 mm away from the voxels it described
    expected = np.array(state["resampled_affine"])
    expected[:3, 3] += expected[:3, :3] @ np.array(state["crop_start"])
    np.testing.assert_allclose(state["affine"], expected, atol=1e-9)
    # and it really locates the voxels: the body's HU are where that affine says
    assert float(x[0][tuple(np.round(np.linalg.solve(expected[:3, :3], centre - expected[:3, 3])).astype(int))]) > 0

    # a sphere the network "finds" on the model grid, at the world position read from state["affine"]
    sphere = (np.linalg.norm(world(state["affine"], tuple(state["shape"])) - centre, axis=-1) < 4.0).astype(np.uint8)
    truth = np.linalg.norm(world(affine, shape) - centre, axis=-1) < 4.0
    back = restore_to_original(sphere[None], state)[0]
    smooth = restore_labels_from_probabilities(np.stack([1.0 - sphere, sphere]).astype(np.float32), sphere, state)
    for mask in (back, smooth):
        assert mask.shape == shape
        assert dice(mask > 0, truth) > 0.95
        found = world(affine, shape)[mask > 0].mean(0)
        np.testing.assert_allclose(found, centre, atol=0.25)


def test_a_label_at_a_known_world_position_survives_preprocess_case_and_restore(tmp_path):
    affine = affine_of(rotation(1, 20) @ np.diag([0.8, 0.8, 2.5]), (-30.0, 12.0, 40.0))  # oblique and anisotropic
    shape = (40, 40, 16)
    image = np.full(shape, -1000.0, np.float32)
    image[4:36, 6:34, 2:14] = 40.0
    label = np.zeros(shape, np.uint8)
    label[14:22, 16:24, 6:10] = 1
    nib.save(nib.Nifti1Image(image, affine), str(tmp_path / "ct.nii.gz"))
    nib.save(nib.Nifti1Image(label, affine), str(tmp_path / "seg.nii.gz"))
    cfg = PreprocessConfig(spacing=(1.0, 1.0, 1.5))
    out = preprocess_case(tmp_path / "ct.nii.gz", tmp_path / "seg.nii.gz", cfg)
    meta = json.loads(json.dumps(out["meta"]))  # as the cache stores it
    on_model = world(meta["affine"], tuple(meta["shape"]))[out["label"][0] == 1].mean(0)
    np.testing.assert_allclose(on_model, world(affine, shape)[label == 1].mean(0), atol=0.5)
    back = restore_to_original(out["label"], meta)[0]
    assert back.shape == shape and dice(back == 1, label == 1) > 0.9


def test_volumes_smaller_than_the_patch_give_a_mask_of_their_own_shape_and_affine(model_dir, tmp_path):
    from nny_models import hub, predict
    from nny_models.cli import main

    model = hub.NnyNet.from_pretrained(model_dir)  # 64^3 windows on a 3 x 3 x 4 mm grid
    thin = affine_of(np.diag([-0.5, -0.5, 10.0]), (60.0, 40.0, -20.0))  # LPS, 0.5 x 0.5 x 10 mm
    for shape, affine in [((8, 8, 8), np.eye(4)), ((48, 48, 8), thin), ((8, 40, 12), OBLIQUE)]:
        image = np.full(shape, -1000.0, np.float32)
        image[tuple(slice(s // 6, s - s // 6) for s in shape)] = 40.0
        mask = predict(model, image, affine=affine, device="cpu", precision="fp32")
        assert mask.shape == shape and mask.dtype == np.uint8

    image = np.full((48, 48, 8), -1000, np.int16)  # through the CLI: the written mask keeps the header geometry
    image[8:40, 8:40, 1:7] = 40
    nib.save(nib.Nifti1Image(image, thin), str(tmp_path / "ct.nii.gz"))
    assert main(["--model", str(model_dir), "--input", str(tmp_path / "ct.nii.gz"),
                 "--output", str(tmp_path / "mask.nii.gz"), "--device", "cpu"]) == 0
    written = nib.load(str(tmp_path / "mask.nii.gz"))
    assert written.shape == (48, 48, 8)
    np.testing.assert_allclose(written.affine, thin)


def test_extreme_anisotropy_round_trips_and_slivers_are_refused(tmp_path):
    thick = np.diag([0.5, 0.5, 10.0, 1.0])
    image = np.full((48, 48, 4), 40.0, np.float32)
    label = np.zeros((48, 48, 4), np.uint8)
    label[10:30, 12:20, 1:3] = 1
    from nny_models.preprocessing import _run

    _, lab, state = _run(image, label, thick, PreprocessConfig(spacing=(1.5, 1.5, 2.0)))
    assert state["resampled_shape"] == [17, 17, 16]
    back = restore_to_original(lab.numpy(), state)[0]
    assert back.shape == (48, 48, 4) and dice(back == 1, label == 1) > 0.85  # 0.5 mm edges on a 1.5 mm grid
    assert np.array_equal(np.unique(np.nonzero(back)[2]), [1, 2])  # the 10 mm slices come back as they were

    # a single axial slice, and a slab thinner than one model voxel (two 0.5 mm slices on a 2 mm grid), name the
    # input and what was expected instead of segmenting a sliver
    nib.save(nib.Nifti1Image(image[:, :, :1], thick), str(tmp_path / "slice.nii.gz"))
    with pytest.raises(ValueError, match=r"slice\.nii\.gz.*at least 2 voxels per axis.*\(48, 48, 1\)"):
        preprocess_case(tmp_path / "slice.nii.gz", None, ISO, check_hu=False)
    with pytest.raises(ValueError, match=r"ct\.nii\.gz: resampled to the model's .*\(17, 17, 1\) voxels.*"
                                         r"a single model voxel thick along the model's axis S \(2 mm\)"):
        preprocess_volume(image[:, :, :2], np.diag([0.5, 0.5, 0.5, 1.0]), PreprocessConfig(spacing=(1.5, 1.5, 2.0)),
                          name="ct.nii.gz")
    with pytest.raises(ValueError, match=r"\(1, 1, 1\) voxels.*axis R \(1 mm\), A \(1 mm\), S \(1 mm\).*mm, not cm"):
        preprocess_volume(np.full((40, 40, 40), 40.0, np.float32), np.diag([0.01, 0.01, 0.01, 1.0]), ISO)


def test_all_air_and_a_body_on_the_border():
    air = np.full((24, 20, 10), -1000.0, np.float32)
    x, state = preprocess_volume(air, LPS, ISO)
    assert state["shape"] == state["resampled_shape"] and state["crop_start"] == [0, 0, 0]  # nothing to crop to
    back = restore_to_original(np.ones((1, *state["shape"]), np.uint8), state)
    assert back.shape == (1, 24, 20, 10) and back.min() == 1

    body = air.copy()
    body[:, :, :6] = 40.0  # the body fills the volume up to its first faces: the crop may not go past them
    x, state = preprocess_volume(body, LPS, ISO)
    assert state["crop_start"] == [0, 0, 0] and state["crop_end"][:2] == state["resampled_shape"][:2]
    label = (np.asarray(x[0]) > 0).astype(np.uint8)
    np.testing.assert_array_equal(restore_to_original(label[None], state)[0], (body > 0).astype(np.uint8))


def test_int16_padding_outside_the_scanner_circle_resamples_as_air():
    n = 48
    yy, xx = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    outside = np.hypot(xx - 23.5, yy - 23.5) >= 22
    air = np.full((n, n, 12), 60, np.int16)  # a body that fills the reconstruction circle
    air[outside] = -1000
    padded = air.copy()
    padded[outside] = -32768
    kept = padded.copy()
    spacing = np.diag([0.7, 0.7, 2.5, 1.0])
    norm = {"clip_low": -200.0, "clip_high": 300.0, "mean": 60.0, "std": 50.0, "foreground": "label > 0"}
    for cfg in (PreprocessConfig(spacing=(1.5, 1.5, 2.5)),
                PreprocessConfig(spacing=(1.5, 1.5, 2.5), normalization=norm)):
        a, sa = preprocess_volume(air.astype(np.float32), spacing, cfg)
        b, sb = preprocess_volume(padded.astype(np.float32), spacing, cfg)
        # before: -32768 blended into the skin by the linear resampling, eroding it by up to 0.9 of the window
        assert sa["crop_start"] == sb["crop_start"] and sa["shape"] == sb["shape"]
        assert float((a - b).abs().max()) < 0.11 * (cfg.out_range[1] - cfg.out_range[0])
    np.testing.assert_array_equal(padded, kept)  # the caller's array is not changed
    flt = padded.astype(np.float32)
    preprocess_volume(flt, spacing, ISO)
    assert flt.min() == -32768  # not even a float32 array that torch could share


# ----------------------------------------------------------------------------- labels and sampling


def write_case(root: Path, case_id: str, paint, shape=(40, 12, 20), affine=np.eye(4)) -> CaseRecord:
    """A body of soft tissue (noisy, 2 voxels of air around it) and the label ``paint`` draws, as NIfTI files."""
    rng = np.random.default_rng(zlib.crc32(case_id.encode()))
    image = np.full(shape, -1000.0, np.float32)
    image[2:-2, 2:-2, 2:-2] = 40.0 + rng.normal(0, 10, tuple(s - 4 for s in shape))
    label = np.zeros(shape, np.uint8)
    paint(label)
    nib.save(nib.Nifti1Image(image, affine), str(root / f"{case_id}.nii.gz"))
    nib.save(nib.Nifti1Image(label, affine), str(root / f"{case_id}_seg.nii.gz"))
    return CaseRecord(case_id, str(root / f"{case_id}.nii.gz"), str(root / f"{case_id}_seg.nii.gz"))


def test_oversampling_with_an_empty_label_a_single_voxel_class_and_a_class_of_one_case(tmp_path):
    def nothing(label: np.ndarray) -> None:
        pass

    def one_voxel(label: np.ndarray) -> None:
        label[30, 5, 17] = 2

    def liver(label: np.ndarray) -> None:
        label[4:20, 3:9, 3:12] = 1

    records = [write_case(tmp_path, "empty", nothing), write_case(tmp_path, "dot", one_voxel),
               write_case(tmp_path, "liver", liver, shape=(24, 24, 14))]
    cache = build_cache(records, PreprocessConfig(spacing=(1.0, 1.0, 1.0), crop_foreground=False),
                        tmp_path / "cache", num_classes=3)
    assert [cache.classes(r.case_id) for r in records] == [[], [2], [1]]
    np.testing.assert_array_equal(cache.fg_locations("dot", 2), [[30, 5, 17]])
    for lesions in ((), (2,)):
        ds = PatchDataset(cache, None, (16, 16, 16), 40, fg_prob=1.0, lesion_classes=lesions, seed=1)
        seen = {r.case_id: 0 for r in records}
        for i in range(len(ds)):
            s = ds[i]
            assert s["image"].shape == s["label"].shape == (1, 16, 16, 16)
            seen[s["case_id"]] += 1
            if s["case_id"] == "dot":  # every forced patch holds the single voxel
                assert int((s["label"] == 2).sum()) == 1
            if s["case_id"] == "empty":  # no class to force: a random patch, background only
                assert int(s["label"].sum()) == 0
        assert min(seen.values()) > 0
    # a patch larger than the volume on every axis: the volume centred, air and background around it
    s = PatchDataset(cache, ["liver"], (32, 32, 32), 1, fg_prob=1.0)[0]
    assert s["image"].shape == (1, 32, 32, 32) and int((s["label"] == 1).sum()) == 16 * 6 * 9
    assert float(s["image"][0, 0, 0, 0]) == cache.preprocess.air_value


def test_a_class_that_resampling_loses_is_named(tmp_path):
    def speck(label: np.ndarray) -> None:
        label[10:16, 10:16, 10:16] = 1
        label[20, 20, 20] = 2  # 10 mm: between the 1.5 mm grid's samples at 9 and 10.5 mm

    record = write_case(tmp_path, "speck", speck, shape=(32, 32, 32), affine=np.diag([0.5, 0.5, 0.5, 1.0]))
    with pytest.warns(UserWarning, match=r"speck_seg\.nii\.gz: label value\(s\) 2 \(1 voxel\) vanish when the label "
                                         r"is resampled"):
        out = preprocess_case(record.image, record.label, PreprocessConfig(spacing=(1.5, 1.5, 1.5)), check_hu=False)
    assert set(np.unique(out["label"])) == {0, 1} and out["meta"]["label_values"]["2"] == 1


def test_labelled_voxels_outside_the_body_are_kept_and_named(tmp_path):
    def stray(label: np.ndarray) -> None:
        label[10:14, 10:14, 10:14] = 1
        label[44:47, 44:47, 44:47] = 1  # in the air, 16 voxels beyond the body and past the crop margin

    shape = (48, 48, 48)
    image = np.full(shape, -1000.0, np.float32)
    image[4:24, 4:24, 4:24] = 40.0
    label = np.zeros(shape, np.uint8)
    stray(label)
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(tmp_path / "ct.nii.gz"))
    nib.save(nib.Nifti1Image(label, np.eye(4)), str(tmp_path / "seg.nii.gz"))
    with pytest.warns(UserWarning, match=r"ct\.nii\.gz: labelled voxels lie outside the body"):
        out = preprocess_case(tmp_path / "ct.nii.gz", tmp_path / "seg.nii.gz", ISO, check_hu=False)
    assert int(out["label"].sum()) == int(label.sum())  # before: the 27 stray voxels were cropped away
    _, state = preprocess_volume(image, np.eye(4), ISO)  # inference crops to the body alone
    assert state["crop_end"] == [32, 32, 32] and out["meta"]["crop_end"] == [47, 47, 47]


# ----------------------------------------------------------------------------- cache


def plain_records(root: Path, n: int = 2) -> list[CaseRecord]:
    def liver(label: np.ndarray) -> None:
        label[6:14, 4:8, 6:12] = 1

    return [write_case(root, f"c{i}", liver, shape=(20, 12, 16)) for i in range(n)]


def built_count(caplog) -> int:
    return sum("build_cache: preprocessing" in r.getMessage() for r in caplog.records)


def test_a_source_replaced_by_another_of_the_same_size_is_rebuilt(tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="nny_models.cache")
    root = tmp_path / "data"
    root.mkdir()
    image = np.full((20, 12, 16), -1000.0, np.float32)
    image[3:17, 2:10, 2:14] = 40.0
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(root / "c0.nii"))  # uncompressed: any content, same size
    record = CaseRecord("c0", str(root / "c0.nii"))
    build_cache([record], ISO, tmp_path / "cache", check_hu=False)
    st = os.stat(record.image)
    image[3:17, 2:10, 2:14] = 90.0  # another scan in the same file: same size, mtime put back (cp -p, rsync -t)
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(root / "c0.nii"))
    os.utime(record.image, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(record.image).st_size == st.st_size
    caplog.clear()
    cache = build_cache([record], ISO, tmp_path / "cache", check_hu=False)
    assert built_count(caplog) == 1
    np.testing.assert_array_equal(cache.image("c0"), preprocess_case(record.image, None, ISO, check_hu=False)["image"])

    # where the file system keeps no ctime or inode of its own (sshfs, FAT): the content sample still tells
    old = case_fingerprint(record, ISO)
    frozen = os.stat(record.image)
    monkeypatch.setattr(Path, "stat", lambda self, **kw: frozen if str(self) == record.image else os.stat(self, **kw))
    image[3:17, 2:10, 2:14] = 20.0
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(root / "c0.nii"))
    assert case_fingerprint(record, ISO) != old


def test_a_truncated_npy_is_named_when_read_and_rebuilt_by_build_cache(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="nny_models.cache")
    records = plain_records(tmp_path)
    cache = build_cache(records, ISO, tmp_path / "cache")
    path = tmp_path / "cache" / "cases" / f"{cache.meta('c0')['stem']}.image.npy"
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) - 100])  # a copy or a disk that stopped short
    with pytest.raises(ValueError, match=rf"{path.name}: cached image of case 'c0' is damaged: .*cut short.*"
                                         r"run build_cache again"):
        PreprocessedCache(tmp_path / "cache").image("c0")
    path.write_bytes(whole[:40])  # the header itself cut
    with pytest.raises(ValueError, match=rf"{path.name}: .*damaged: not a readable \.npy file"):
        PreprocessedCache(tmp_path / "cache").image("c0")
    caplog.clear()
    cache = build_cache(records, ISO, tmp_path / "cache")  # before: reused as it was
    assert "preprocessing 1 of 2" in caplog.text
    assert path.read_bytes() == whole
    np.testing.assert_array_equal(cache.image("c0"), preprocess_case(records[0].image, records[0].label, ISO)["image"])



@pytest.mark.parametrize("content", [b"\xff\xfe\x00garbage", b'{"name": "my data set", "cases": 2}', b"[1, 2]"])
def test_an_index_json_the_cache_did_not_write_is_never_overwritten(tmp_path, content):
    records = plain_records(tmp_path)  # e.g. the data folder itself passed as cache_dir, with an index.json of its own
    (tmp_path / "index.json").write_bytes(content)
    with pytest.raises(ValueError, match=r"index\.json: not an nnynet cache index .*does not overwrite"):
        build_cache(records, ISO, tmp_path)
    assert (tmp_path / "index.json").read_bytes() == content


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """The folder and everything in it made unwritable: chmod for a user, the immutable flag for root."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")]}
        for p in modes:
            p.chmod(modes[p] & ~0o222)
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "-R", "+i", str(folder)],
                                                        capture_output=True).returncode != 0:
        pytest.skip("running as root without chattr +i: cannot make a folder read-only")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-R", "-i", str(folder)], check=True)


def test_a_read_only_cache_is_used_when_current_and_named_when_not(tmp_path):
    records = plain_records(tmp_path, n=3)
    build_cache(records[:2], ISO, tmp_path / "cache")
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "cache").rglob("*"))
    with read_only(tmp_path / "cache"):
        cache = build_cache(records[:2], ISO, tmp_path / "cache")  # before: PermissionError on its .lock file
        np.testing.assert_array_equal(cache.image("c1"), preprocess_case(records[1].image, records[1].label, ISO)["image"])
        ds = PatchDataset(cache, None, (8, 8, 8), 4, fg_prob=1.0)
        assert all(int(ds[i]["label"].sum()) > 0 for i in range(4))
        subset = build_cache(records[1:2], ISO, tmp_path / "cache")  # fewer cases than its index: read as they are
        assert subset.case_ids == ["c1"] and len(subset) == 1
        with pytest.raises(PermissionError, match=r"cache: the cache folder is not writable .* 1 of 3 case\(s\) "
                                                  r"are not in it .*\('c2'\).*writable cache_dir"):
            build_cache(records, ISO, tmp_path / "cache")
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "cache").rglob("*")) == before


def _build_in_child(records: list[CaseRecord], cache_dir: Path, barrier, results) -> None:
    torch.set_num_threads(1)
    built: list[str] = []

    class Count(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            built.append(record.getMessage())

    logger = logging.getLogger("nny_models.cache")
    logger.setLevel(logging.INFO)
    logger.addHandler(Count())
    barrier.wait()
    cache = build_cache(records, ISO, cache_dir)
    results.put((sum("preprocessing" in m for m in built), np.asarray(cache.image("c0")).sum()))


def test_two_processes_repair_one_damaged_cache_once(tmp_path):
    records = plain_records(tmp_path)
    cache = build_cache(records, ISO, tmp_path / "cache")
    reference = float(np.asarray(cache.image("c0")).sum())
    path = tmp_path / "cache" / "cases" / f"{cache.meta('c0')['stem']}.image.npy"
    path.write_bytes(path.read_bytes()[:-64])
    ctx = multiprocessing.get_context("fork")  # both children share the parent's imports: no 10 s of MONAI each
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(records, tmp_path / "cache", barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    try:
        got = [results.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
    finally:
        for p in procs:  # a child stuck on the lock must not outlive the test
            if p.is_alive():
                p.kill()
    assert sorted(n for n, _ in got) == [0, 1]  # one repaired it under the lock, the other found it repaired
    assert all(float(total) == pytest.approx(reference) for _, total in got)
    assert not [p.name for p in (tmp_path / "cache").rglob("*.tmp")]
