"""Random training patches from the preprocessed cache, with nnU-Net-style foreground oversampling.

Every sample is a pure function of (seed, index): ``np.random.default_rng([seed, index])`` picks the
case, whether to force foreground, the class and the position. So DataLoader workers, DDP sharding
and resuming with skip_first_batches all see the same patches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from nny_models.cache import PreprocessedCache


class PatchDataset(Dataset):
    """Map-style dataset of ``length`` random patches over ``case_ids`` of a PreprocessedCache.

    fg_prob: probability of centring the patch on a voxel of a foreground class chosen uniformly
        among the classes present in the case (so a small tumor is picked as often as the liver).
    fg_classes: classes eligible for that (default: every class > 0).
    fg_class_weights: {class: relative weight} of that choice (default 1 each, nnU-Net's uniform choice); a
        weight > 1 centres more patches on a rare class such as a tumor.
    lesion_classes: classes whose forced patches centre on one of the class's connected components (26-connected,
        in the preprocessed label) drawn uniformly, then on a voxel of it. nnU-Net draws a voxel of the class
        uniformly, so a 3 mm lesion next to a 40 mm one is the centre once in ~2000 draws; here, once in two.
    extras: {case_id: {name: array-like}} returned as extra tensors (e.g. "clinical").
    """

    def __init__(
        self,
        cache: PreprocessedCache | str | Path,
        case_ids: Sequence[str] | None,
        patch_size: Sequence[int],
        length: int,
        *,
        seed: int = 0,
        fg_prob: float = 0.33,
        fg_classes: Sequence[int] | None = None,
        fg_class_weights: Mapping[int, float] | None = None,
        with_label: bool = True,
        extras: Mapping[str, Mapping[str, Any]] | None = None,
        lesion_classes: Sequence[int] = (),
    ):
        self.cache = cache if isinstance(cache, PreprocessedCache) else PreprocessedCache(cache)
        self.case_ids = list(self.cache.case_ids if case_ids is None else case_ids)
        self.patch_size = tuple(int(p) for p in patch_size)
        if not self.case_ids:
            raise ValueError("PatchDataset: case_ids is empty")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"PatchDataset: patch_size must be 3 positive ints, got {tuple(patch_size)}")
        if int(length) < 0:
            raise ValueError(f"PatchDataset: length must be >= 0, got {length}")
        if not 0.0 <= fg_prob <= 1.0:
            raise ValueError(f"PatchDataset: fg_prob must be in [0, 1], got {fg_prob}")
        for cid in self.case_ids:
            if cid not in self.cache:
                raise ValueError(f"PatchDataset: case {cid!r} is not in the cache {self.cache.cache_dir}")
            if with_label and not self.cache.meta(cid)["has_label"]:
                raise ValueError(f"PatchDataset: case {cid!r} has no label but with_label=True")
            if extras is not None and cid not in extras:
                raise ValueError(f"PatchDataset: extras has no entry for case {cid!r}")
        self.length, self.seed, self.fg_prob, self.with_label = int(length), int(seed), float(fg_prob), with_label
        self.fg_classes = None if fg_classes is None else {int(c) for c in fg_classes}
        self.fg_class_weights = {int(c): float(w) for c, w in (fg_class_weights or {}).items()}
        if any(not w > 0 for w in self.fg_class_weights.values()):
            raise ValueError(f"PatchDataset: fg_class_weights must be > 0, got {dict(fg_class_weights)}")
        self.extras = extras
        self.lesion_classes = {int(c) for c in lesion_classes}
        if any(c < 1 for c in self.lesion_classes):
            raise ValueError(f"PatchDataset: lesion_classes must be foreground classes (> 0), got {list(lesion_classes)}")
        self._lesions: dict[tuple[str, int], list[np.ndarray]] = {}  # per worker, filled on first use
        self.pad_value = float(self.cache.preprocess.air_value)  # "air" after intensity scaling

    def lesions(self, case_id: str, cls: int) -> list[np.ndarray]:
        """Flat voxel indices of each 26-connected component of class ``cls`` in the case's preprocessed label."""
        key = (case_id, int(cls))
        if key not in self._lesions:
            from scipy import ndimage

            label = np.asarray(self.cache.label(case_id))[0]
            components, n = ndimage.label(label == cls, structure=np.ones((3, 3, 3), bool))
            flat = np.flatnonzero(components)
            ids = components.ravel()[flat]
            order = np.argsort(ids, kind="stable")
            self._lesions[key] = np.split(flat[order], np.cumsum(np.bincount(ids, minlength=n + 1)[1:])[:-1])
        return self._lesions[key]

    def __len__(self) -> int:
        return self.length

    def _start(self, shape: Sequence[int], centre: np.ndarray | None, rng: np.random.Generator) -> list[int]:
        starts = []
        for s, p, axis in zip(shape, self.patch_size, range(3)):
            if s <= p:
                starts.append(0)  # the whole axis fits; padded below
            elif centre is None:
                starts.append(int(rng.integers(0, s - p + 1)))
            else:
                starts.append(int(np.clip(int(centre[axis]) - p // 2, 0, s - p)))
        return starts

    def _read(self, volume: np.ndarray, window: tuple, target: tuple, dtype, fill: float) -> torch.Tensor:
        """Copy a memmap window into a fresh patch array (one copy, converting dtype on the way)."""
        patch = np.empty((volume.shape[0], *self.patch_size), dtype=dtype)
        if any(t.stop - t.start != p for t, p in zip(target[1:], self.patch_size)):
            patch.fill(fill)
        patch[target] = volume[window]
        return torch.from_numpy(patch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.length:
            raise IndexError(f"PatchDataset index {index} out of range [0, {self.length})")
        rng = np.random.default_rng([self.seed, int(index)])
        cid = self.case_ids[int(rng.integers(len(self.case_ids)))]
        image = self.cache.image(cid)
        shape = image.shape[1:]

        centre = None
        if rng.random() < self.fg_prob:
            classes = [c for c in self.cache.classes(cid) if self.fg_classes is None or c in self.fg_classes]
            if classes:
                if self.fg_class_weights:
                    w = np.array([self.fg_class_weights.get(int(c), 1.0) for c in classes])
                    pick = int(rng.choice(len(classes), p=w / w.sum()))
                else:
                    pick = int(rng.integers(len(classes)))  # the same draw as before weights existed
                if classes[pick] in self.lesion_classes:
                    lesions = self.lesions(cid, classes[pick])
                    voxels = lesions[int(rng.integers(len(lesions)))]
                    centre = np.array(np.unravel_index(int(voxels[int(rng.integers(len(voxels)))]), shape))
                else:
                    locations = self.cache.fg_locations(cid, classes[pick])
                    centre = locations[int(rng.integers(len(locations)))]
        start = self._start(shape, centre, rng)
        window = (slice(None),) + tuple(slice(a, a + min(s, p)) for a, s, p in zip(start, shape, self.patch_size))
        # where the window lands in the patch: centred when the volume is smaller than the patch
        offset = [(p - min(s, p)) // 2 for s, p in zip(shape, self.patch_size)]
        target = (slice(None),) + tuple(slice(o, o + min(s, p)) for o, s, p in zip(offset, shape, self.patch_size))

        out: dict[str, Any] = {"image": self._read(image, window, target, np.float32, self.pad_value), "case_id": cid}
        if self.with_label:
            out["label"] = self._read(self.cache.label(cid), window, target, np.int64, 0)
        if self.extras is not None:
            for name, value in self.extras[cid].items():
                t = torch.as_tensor(np.asarray(value))
                out[name] = t.float() if t.is_floating_point() else t
        return out
