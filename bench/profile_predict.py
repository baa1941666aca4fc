"""Where predict's time goes: seconds per stage for one CT, before and after the issue-14 speed changes.

Stages (``predict(..., timings=dict)``): load (NIfTI read), check (HU check), preprocess (reorient, resample,
HU window, body crop; split further below), network (forward passes + softmax), windows (the whole
sliding-window call: the network plus cropping, padding and Gaussian blending), argmax, postprocess
(largest component), restore (back to the input grid), and write (nibabel save of the mask, timed here).

Settings compared on the same volume and the same weights:
- before: MONAI's WindowAttention (score matrix materialised), fp32, 2 windows per batch (the old defaults);
- after:  nnynet's fused window attention, precision "auto" (bf16 on AMX / AVX512-BF16 CPUs), predict's
          default window batch.

    python bench/profile_predict.py --shape 256 256 60          # ~1 min on 2 cores
    python bench/profile_predict.py --shape 512 512 100 --overlap 0.25

Prints one JSON object per setting (stage -> seconds, plus process CPU seconds of the whole call).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.inference import ct_volume  # noqa: E402
from nny_models.config import NnyNetConfig, PreprocessConfig  # noqa: E402
from nny_models.hub import NnyNet  # noqa: E402
from nny_models.inference import predict  # noqa: E402


def set_attention(model: torch.nn.Module, fused: bool) -> None:
    """Switch nnynet's encoder between MONAI's WindowAttention and the fused FastWindowAttention."""
    from monai.networks.nets.swin_unetr import WindowAttention

    from nny_models.swin_next import FastWindowAttention

    for m in model.modules():
        if isinstance(m, WindowAttention):
            m.__class__ = FastWindowAttention if fused else WindowAttention


def preprocess_breakdown(vol: np.ndarray, affine: np.ndarray, cfg: PreprocessConfig) -> dict[str, float]:
    """Seconds of each step of preprocess_volume, run one by one (same transforms, same order): MONAI's
    resampling transforms, then the body crop (a bounding box, as nny_models.preprocessing crops)."""
    from monai.data import MetaTensor

    from nny_models.preprocessing import CROP_MARGIN, _box, _resample_transforms, _scaled_threshold

    out: dict[str, float] = {}
    data = {"image": MetaTensor(torch.as_tensor(vol, dtype=torch.float32), affine=torch.as_tensor(affine))}
    for t in _resample_transforms(cfg, ["image"]).transforms:
        start = time.perf_counter()
        data = t(data)
        out[type(t).__name__] = time.perf_counter() - start
    start = time.perf_counter()
    box = _box(data["image"][0] > _scaled_threshold(cfg))
    if box is not None:
        shape = data["image"].shape[1:]
        lo = [max(a - CROP_MARGIN, 0) for a in box[0]]
        hi = [min(b + CROP_MARGIN, n) for b, n in zip(box[1], shape)]
        data["image"][:, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].clone()
    out["body_crop"] = time.perf_counter() - start
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=3, default=(256, 256, 60))
    p.add_argument("--spacing", type=float, nargs=3, default=(0.75, 0.75, 2.5))
    p.add_argument("--feature-size", type=int, default=12)
    p.add_argument("--roi", type=int, default=64)
    p.add_argument("--overlap", type=float, default=0.25)
    p.add_argument("--sw-batch-size", type=int, default=None, help="'after' window batch (default: predict's)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--settings", nargs="+", default=["before", "after"], choices=["before", "after"])
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vol, affine, source = ct_volume(tuple(args.shape), tuple(args.spacing))
    if tuple(vol.shape[:2]) != tuple(args.shape[:2]):  # the phantom is 512^2: take the centre for smaller runs
        x0, y0 = ((n - s) // 2 for n, s in zip(vol.shape[:2], args.shape[:2]))
        vol = np.ascontiguousarray(vol[x0 : x0 + args.shape[0], y0 : y0 + args.shape[1]])
        affine = affine.copy()
        affine[:3, 3] += affine[:3, 0] * x0 + affine[:3, 1] * y0
    cfg = PreprocessConfig()
    model = NnyNet(NnyNetConfig(model_kwargs={"feature_size": args.feature_size}, patch_size=(args.roi,) * 3,
                                preprocessing=cfg.to_dict()))  # fmt: skip
    model.eval()
    with torch.inference_mode():  # one-time initialisation (oneDNN kernels) stays out of the timings
        model(torch.zeros(1, 1, *(args.roi,) * 3))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ct.nii.gz"
        nib.save(nib.Nifti1Image(vol, affine), path)
        common = {"volume_shape": list(vol.shape), "volume": source, "roi": args.roi, "overlap": args.overlap,
                  "feature_size": args.feature_size, "threads": torch.get_num_threads(),
                  "preprocess_breakdown": preprocess_breakdown(vol, affine, cfg)}  # fmt: skip
        for setting in args.settings:
            set_attention(model, fused=setting == "after")
            kwargs = dict(precision="fp32", sw_batch_size=2) if setting == "before" else dict(precision="auto")
            if setting == "after" and args.sw_batch_size:
                kwargs["sw_batch_size"] = args.sw_batch_size
            timings: dict[str, float] = {}
            start, cpu = time.perf_counter(), time.process_time()
            mask = predict(model, path, overlap=args.overlap, device="cpu", timings=timings, **kwargs)
            t0 = time.perf_counter()
            nib.save(nib.Nifti1Image(mask, affine), Path(tmp) / "mask.nii.gz")
            timings["write"] = time.perf_counter() - t0
            total, cpu = time.perf_counter() - start, time.process_time() - cpu
            timings["blending_and_padding"] = timings["windows"] - timings["network"]
            print(json.dumps({"setting": setting, **kwargs, "total_s": round(total, 3), "process_cpu_s": round(cpu, 3),
                              "stages_s": {k: round(v, 3) for k, v in timings.items()}, **common}), flush=True)


if __name__ == "__main__":
    main()
