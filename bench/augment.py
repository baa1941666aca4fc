"""Cost of the nnU-Net-level augmentation (finetune/augment.py) per training step, against the step itself.

One step of the default pipeline: the tiny nnynet (deep supervision, clinical cross-attention off), batch 1 of
96 x 96 x 32, Dice + Focal + CE, AdamW. The augmentation of one patch runs in a DataLoader worker, beside the
step; it must stay well below the step time (ratio aug / step << 1), or it becomes the bottleneck.

Prints JSON lines: per-step cost with the default probabilities (mean over many indices, so over the mix of
transforms that fire), the cost of each transform forced to fire (p = 1), and the training step.

    python bench/augment.py [--samples 60] [--steps 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import device_name, emit, time_it  # noqa: E402

from finetune.augment import AugmentConfig, AugmentedPatches  # noqa: E402
from finetune.loss import DiceFocalCELoss  # noqa: E402
from nny_models.zoo import create_model  # noqa: E402

PATCH = (96, 96, 32)


def phantom_patches(n: int, patch: tuple[int, int, int] = PATCH) -> list[dict]:
    """n copies of a phantom patch (default 96 x 96 x 32) around the liver (HU window -200..300 -> [-1, 1])."""
    from nny_models.phantoms import generate_phantom

    c = generate_phantom(0)
    cx, cy, cz = (int(v.mean()) for v in np.nonzero(c.label == 1))
    start = [min(max(0, m - p // 2), s - p) for m, p, s in zip((cx, cy, cz), patch, c.image.shape)]
    sl = tuple(slice(a, a + p) for a, p in zip(start, patch))
    img = torch.from_numpy(np.clip((c.image[sl] + 200) / 250 - 1, -1, 1).astype(np.float32))[None]
    lab = torch.from_numpy(c.label[sl].astype(np.int64))[None]
    assert img.shape[1:] == tuple(patch), img.shape
    return [{"image": img.clone(), "label": lab.clone()} for _ in range(n)]


def seconds_per_sample(ds: AugmentedPatches, n: int) -> float:
    ds[0]  # warm-up (MONAI lazily builds kernels)
    t0 = time.perf_counter()
    for i in range(1, n + 1):
        ds[i]
    return (time.perf_counter() - t0) / n


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=60, help="indices augmented for the default-probability mean")
    ap.add_argument("--steps", type=int, default=5, help="timed training steps (median)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a DataLoader worker uses 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = device_name("cpu")

    if args.samples < 1:
        ap.error(f"--samples must be >= 1, got {args.samples}")
    forced_samples = 6  # indices timed per transform forced to fire
    patches = phantom_patches(max(args.samples, forced_samples) + 2)
    z_mm = 3.33  # the pipeline plan's z step, so that the thick-slice simulation is in the pipeline
    aug = seconds_per_sample(AugmentedPatches(patches, seed=0, clinical_dropout=0.0, z_spacing_mm=z_mm), args.samples)

    off = AugmentConfig(**{f.name: 0.0 for f in dataclasses.fields(AugmentConfig) if f.name.startswith("p_")})
    forced = {}
    for name in ("rotation", "scaling", "noise", "blur", "brightness", "contrast", "low_res", "thick_slices",
                 "ct_noise", "gamma_inverted", "gamma"):
        cfg = dataclasses.replace(off, **{f"p_{name}": 1.0})
        forced[name] = seconds_per_sample(AugmentedPatches(patches, seed=0, clinical_dropout=0.0, config=cfg,
                                                           z_spacing_mm=z_mm), forced_samples)

    model = create_model("nnynet", "tiny", deep_supervision=True)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = DiceFocalCELoss()
    x, y = patches[0]["image"][None], patches[0]["label"][None]

    def step():
        opt.zero_grad(set_to_none=True)
        out = model(x)
        loss = loss_fn(out, y)
        loss.backward()
        opt.step()

    t_step = time_it(step, "cpu", warmup=1, repeats=args.steps)
    return emit("augment", "augmentation s / step (default probabilities, batch 1, 96x96x32) vs training step s",
         aug, t_step, "tiny nnynet training step", "lower", "ratio < 0.25", dev,
         forced_s={k: round(v, 4) for k, v in forced.items()}, threads=args.threads)


if __name__ == "__main__":
    main()
