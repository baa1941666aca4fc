"""Training patches per second: our preprocessed .npy cache + PatchDataset vs MONAI's usual pipeline.

Both read the same generated phantom cases (nny_models.phantoms.write_dataset, MSD layout, .nii.gz)
and yield 96^3 patches, 2 per batch, through a torch DataLoader with the same num_workers.
- ours: build_cache once (reported separately as cache_build_s), then PatchDataset memmap reads.
- peer: monai Dataset with LoadImaged -> EnsureChannelFirstd -> Orientationd -> Spacingd ->
  ScaleIntensityRanged -> RandCropByPosNegLabeld(num_samples=2), batch_size=1, so every volume
  load is shared by the 2 patches of a batch (the setting most favourable to the peer).

    python bench/loader.py [--preset ct|demo] [--cases 4] [--num_workers 2] [--data_dir DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import device_name, emit  # noqa: E402

from nny_models.cache import build_cache  # noqa: E402
from nny_models.config import PreprocessConfig  # noqa: E402
from nny_models.io import discover_cases  # noqa: E402
from nny_models.sampling import PatchDataset  # noqa: E402

PATCH = (96, 96, 96)
BATCH = 2


def patches_per_second(loader, batches: int) -> float:
    """Throughput from the first batch to the last: worker start-up and the first load are excluded."""
    it = iter(loader)
    next(it)
    start, patches = time.perf_counter(), 0
    for _ in range(batches - 1):
        batch = next(it)
        patches += batch["image"].shape[0]
        assert tuple(batch["image"].shape[1:]) == (1, *PATCH)
    return patches / (time.perf_counter() - start)


def monai_loader(records, cfg: PreprocessConfig, num_workers: int, seed: int) -> DataLoader:
    from monai.data import Dataset, list_data_collate
    from monai.transforms import (
        Compose, EnsureChannelFirstd, LoadImaged, Orientationd, RandCropByPosNegLabeld, ScaleIntensityRanged, Spacingd,
    )

    keys = ["image", "label"]
    transform = Compose(
        [
            LoadImaged(keys),
            EnsureChannelFirstd(keys),
            Orientationd(keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            Spacingd(keys, pixdim=cfg.spacing, mode=("bilinear", "nearest")),
            ScaleIntensityRanged("image", *cfg.hu_window, *cfg.out_range, clip=True),
            RandCropByPosNegLabeld(keys, "label", spatial_size=PATCH, pos=1, neg=1, num_samples=BATCH),
        ]
    ).set_random_state(seed)
    data = [{"image": r.image, "label": r.label} for r in records] * 50  # enough items for any batch count
    return DataLoader(Dataset(data, transform), batch_size=1, shuffle=True, num_workers=num_workers,
                      collate_fn=list_data_collate, generator=torch.Generator().manual_seed(seed))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="ct", choices=["ct", "demo"], help="phantom preset (ct: 512^2 matrix)")
    p.add_argument("--cases", type=int, default=4, help="phantom cases to generate")
    p.add_argument("--num_workers", type=int, default=2, help="DataLoader workers, same for both pipelines")
    p.add_argument("--batches", type=int, default=200, help="batches timed for our loader")
    p.add_argument("--peer_batches", type=int, default=8, help="batches timed for the MONAI pipeline")
    p.add_argument("--data_dir", default=None, help="reuse / keep the generated phantoms here")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(args.data_dir or Path(tmp) / "phantoms")
        if not (data_dir / "dataset.json").exists():
            from nny_models.phantoms import write_dataset

            t = time.perf_counter()
            write_dataset(data_dir, cases=args.cases, seed=args.seed, preset=args.preset, workers=args.num_workers)
            print(f"# generated {args.cases} '{args.preset}' phantoms in {time.perf_counter() - t:.0f}s", file=sys.stderr)
        records = [r for r in discover_cases(data_dir) if r.label is not None][: args.cases]
        cfg = PreprocessConfig()

        t = time.perf_counter()
        cache = build_cache(records, cfg, Path(tmp) / "cache", num_workers=args.num_workers)
        cache_build_s = time.perf_counter() - t

        ds = PatchDataset(cache, None, PATCH, length=args.batches * BATCH + BATCH, seed=args.seed, fg_prob=0.5)
        ours = patches_per_second(DataLoader(ds, batch_size=BATCH, num_workers=args.num_workers), args.batches)
        peer = patches_per_second(monai_loader(records, cfg, args.num_workers, args.seed), args.peer_batches)

        shapes = [cache.meta(c)["original_shape"] for c in cache.case_ids]
        emit(
            "loader", "patches_per_s", ours, peer,
            "monai LoadImaged+EnsureChannelFirstd+Orientationd+Spacingd+ScaleIntensityRanged+RandCropByPosNegLabeld",
            "higher", ">=10x", device_name("cpu"),
            patch=list(PATCH), batch=BATCH, num_workers=args.num_workers, preset=args.preset, cases=len(records),
            original_shapes=shapes, cache_build_s=round(cache_build_s, 2),
            cache_build_per_case_s=round(cache_build_s / len(records), 2),
        )


if __name__ == "__main__":
    main()
