import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from nny_models.cache import build_cache
from nny_models.config import PreprocessConfig
from nny_models.io import CaseRecord
from nny_models.sampling import PatchDataset

CFG = PreprocessConfig(spacing=(1.0, 1.0, 1.0), crop_foreground=False)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Two 48^3 labeled cases (big liver, 2^3 tumor, 3x3x6 vessel) and one small 12x12x8 case."""
    root = tmp_path_factory.mktemp("sampling")
    records = []
    for i, shape in enumerate([(48, 48, 48), (48, 40, 44), (12, 12, 8)]):
        rng = np.random.default_rng(i)
        image = rng.normal(0, 200, shape).astype(np.float32)
        label = np.zeros(shape, np.uint8)
        if i < 2:
            label[8:40, 8:32, 8:40] = 1
            label[20 + i : 22 + i, 12:14, 30:32] = 2  # tiny tumor: 8 voxels
            label[30:33, 26:29, 10:16] = 3  # a vessel inside the liver
        else:
            label[2:5, 2:5, 2:5] = 1
        nib.save(nib.Nifti1Image(image, np.eye(4)), str(root / f"c{i}.nii.gz"))
        nib.save(nib.Nifti1Image(label, np.eye(4)), str(root / f"c{i}_seg.nii.gz"))
        records.append(CaseRecord(f"c{i}", str(root / f"c{i}.nii.gz"), str(root / f"c{i}_seg.nii.gz")))
    return build_cache(records, CFG, root / "cache", check_hu=False)  # noise images: sampling, not intensities


def test_patches_are_deterministic_and_match_the_cache(cache):
    ds = PatchDataset(cache, ["c0", "c1"], (16, 16, 16), length=50, seed=3)
    again = PatchDataset(cache, ["c0", "c1"], (16, 16, 16), length=50, seed=3)
    other = PatchDataset(cache, ["c0", "c1"], (16, 16, 16), length=50, seed=4)
    a, b = ds[7], again[7]
    assert a["image"].shape == (1, 16, 16, 16) and a["image"].dtype == torch.float32
    assert a["label"].shape == (1, 16, 16, 16) and a["label"].dtype == torch.long
    assert a["case_id"] == b["case_id"]
    torch.testing.assert_close(a["image"], b["image"])
    torch.testing.assert_close(a["label"], b["label"])
    assert any(not torch.equal(ds[i]["image"], other[i]["image"]) for i in range(5))
    # the patch is a window of the cached volume: find it and compare labels too
    img, lab = np.asarray(cache.image(a["case_id"])), np.asarray(cache.label(a["case_id"]))
    patch = a["image"].numpy()
    hits = np.argwhere(np.isclose(img[0], patch[0, 0, 0, 0]))
    ok = [h for h in hits if np.array_equal(img[0, h[0] : h[0] + 16, h[1] : h[1] + 16, h[2] : h[2] + 16], patch[0])]
    assert len(ok) == 1
    x, y, z = ok[0]
    np.testing.assert_array_equal(lab[0, x : x + 16, y : y + 16, z : z + 16], a["label"].numpy()[0])
    with pytest.raises(IndexError):
        ds[50]


def test_same_samples_with_dataloader_workers(cache):
    ds = PatchDataset(cache, None, (16, 16, 16), length=8, seed=1, with_label=False)
    serial = [ds[i]["image"] for i in range(8)]
    loader = DataLoader(ds, batch_size=2, num_workers=2)
    batches = list(loader)
    assert "label" not in batches[0] and len(batches[0]["case_id"]) == 2
    torch.testing.assert_close(torch.cat([b["image"] for b in batches]), torch.stack(serial))


def test_foreground_oversampling_picks_rare_classes(cache):
    n, p = 1200, (16, 16, 16)

    def centre_classes(fg_prob, fg_classes=None):
        ds = PatchDataset(cache, ["c0", "c1"], p, length=n, seed=0, fg_prob=fg_prob, fg_classes=fg_classes)
        return np.array([int(ds[i]["label"][0, 8, 8, 8]) for i in range(n)])

    centres = centre_classes(0.6)
    # the 8-voxel tumor and the small vessel are chosen as often as the big liver: ~0.6 / 3 each
    for c in (2, 3):
        assert abs((centres == c).mean() - 0.2) < 0.05, (c, (centres == c).mean())
    assert (centres == 1).mean() > 0.2  # liver: its forced share plus random hits
    assert (centre_classes(0.0) == 2).mean() < 0.01  # without oversampling the tumor is almost never hit
    only_tumor = centre_classes(0.5, fg_classes=[2])
    assert abs((only_tumor == 2).mean() - 0.5) < 0.06 and (only_tumor == 3).mean() < 0.03


def test_fg_class_weights_shift_the_class_choice(cache):
    n, p = 1200, (16, 16, 16)
    ds = PatchDataset(cache, ["c0", "c1"], p, length=n, seed=0, fg_prob=1.0, fg_class_weights={2: 4.0})
    centres = np.array([int(ds[i]["label"][0, 8, 8, 8]) for i in range(n)])
    # weights liver 1, tumor 4, vessel 1: the tumor is picked 4/6 of the time, the vessel 1/6
    assert abs((centres == 2).mean() - 4 / 6) < 0.05, (centres == 2).mean()
    assert abs((centres == 3).mean() - 1 / 6) < 0.05, (centres == 3).mean()
    with pytest.raises(ValueError, match="fg_class_weights must be > 0"):
        PatchDataset(cache, ["c0"], p, 4, fg_class_weights={2: 0.0})


def test_small_volume_is_padded_and_extras(cache):
    extras = {"c2": {"clinical": np.array([1.0, np.nan, 3.0]), "stage": 2}}
    ds = PatchDataset(cache, ["c2"], (16, 16, 16), length=4, fg_prob=1.0, extras=extras)
    s = ds[0]
    assert s["image"].shape == (1, 16, 16, 16) and s["label"].shape == (1, 16, 16, 16)
    # 12x12x8 volume centred in a 16^3 patch, padded with the "air" value and label 0
    assert (s["image"][0, :2] == -1.0).all() and (s["image"][0, :, :, :4] == -1.0).all()
    assert (s["label"][0, :2] == 0).all() and int(s["label"].sum()) == 27
    assert s["clinical"].dtype == torch.float32 and torch.isnan(s["clinical"][1]) and s["stage"] == 2


def test_bad_arguments(cache):
    with pytest.raises(ValueError, match="'zz' is not in the cache"):
        PatchDataset(cache, ["zz"], (8, 8, 8), 4)
    with pytest.raises(ValueError, match="patch_size must be 3 positive ints"):
        PatchDataset(cache, None, (8, 8), 4)
    with pytest.raises(ValueError, match="extras has no entry for case 'c1'"):
        PatchDataset(cache, ["c0", "c1"], (8, 8, 8), 4, extras={"c0": {}})


def test_lesion_classes_centre_small_lesions_as_often_as_large_ones(tmp_path):
    """One 512-voxel and one 8-voxel tumor: a voxel draw centres on the small one ~1.5 % of the time, a lesion
    draw half of the time; other classes keep the voxel draw."""
    shape = (48, 48, 48)
    label = np.zeros(shape, np.uint8)
    label[4:44, 4:44, 4:44] = 1
    label[10:18, 10:18, 10:18] = 2  # large lesion
    label[34:36, 34:36, 34:36] = 2  # small lesion, far from the large one
    image = np.random.default_rng(0).normal(0, 100, shape).astype(np.float32)
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(tmp_path / "t.nii.gz"))
    nib.save(nib.Nifti1Image(label, np.eye(4)), str(tmp_path / "t_seg.nii.gz"))
    cache = build_cache([CaseRecord("t", str(tmp_path / "t.nii.gz"), str(tmp_path / "t_seg.nii.gz"))], CFG,
                        tmp_path / "cache", check_hu=False)  # a noise image: sampling, not intensities
    n, p = 600, (8, 8, 8)

    def small_share(lesion_classes):
        ds = PatchDataset(cache, ["t"], p, length=n, seed=0, fg_prob=1.0, fg_classes=[2],
                          lesion_classes=lesion_classes)
        patches = [ds[i]["label"][0] for i in range(n)]
        assert all(int(t[4, 4, 4]) == 2 for t in patches)  # every patch is centred on a tumor voxel
        # centred on the small lesion, the window holds its 8 tumor voxels; on the large one, at least 4^3
        return np.mean([int((t == 2).sum()) <= 8 for t in patches])

    assert small_share(()) < 0.05
    assert abs(small_share([2]) - 0.5) < 0.07
    ds = PatchDataset(cache, ["t"], p, length=4, lesion_classes=[2])
    assert [len(v) for v in ds.lesions("t", 2)] == [512, 8]
    with pytest.raises(ValueError, match="lesion_classes must be foreground"):
        PatchDataset(cache, ["t"], p, 4, lesion_classes=[0])
