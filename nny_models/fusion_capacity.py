"""Capacity test of the clinical fusion: can the pathway carry information the image does not hold?

    python -m nny_models.fusion_capacity [--models unet mednext_s] [--modes none cross_attention ...] [--steps 300]

Task: a noisy volume holds two identical spherical lesions, one in each half along x; a clinical flag says
which one is the target. The image alone cannot tell them apart, so an image-only model can at best mark
both (Dice 2/3 ~ 0.67) or guess one (expected Dice 0.5). A fusion that carries the flag reaches Dice ~1,
and flipping the flag at test time moves the prediction to the other lesion.

Prints a table mode x model -> Dice with the informative flag, and Dice against the other lesion when the
flag is flipped (high = the prediction followed the flag). ``run_capacity`` is what the test suite calls.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import torch
from monai.losses import DiceCELoss

from nny_models.fusion import FUSION_MODES
from nny_models.zoo import create_model, list_models

# Zoo overrides that keep the models small enough for a few hundred CPU steps.
SMALL = {
    "unet": {"channels": (8, 16, 32, 64), "strides": (2, 2, 2), "num_res_units": 1},
    "unetr": {"img_size": 32},
    "nnynet": {"fusion_position": "after_bottleneck"},  # what fine-tuning builds (the default erases FiLM)
    "swinunetr": {"fusion_position": "after_bottleneck"},  # likewise: InstanceNorm erases FiLM before encoder10
}
# Models whose stride-32 bottleneck would be one voxel at 32^3 (nnynet refuses to train on it) run on 64 x 32 x 32:
# two bottleneck cells along x, the axis that separates the lesions, at a quarter of 64^3's cost.
STRIDE_32_MODELS = ("nnynet", "swinunetr")
WIDE_SHAPE = (64, 32, 32)


@dataclass
class CapacityResult:
    model: str
    mode: str
    dice: float  # Dice against the flagged lesion, informative clinical data
    dice_flipped: float  # flag flipped at test time: Dice against the *other* lesion (follows the flag)
    dice_none: float  # clinical=None at test time, Dice against the flagged lesion
    seconds: float


def make_batch(rng: np.random.Generator, batch: int, size: int | tuple[int, int, int] = 32, radius: float = 4.0):
    """(image (B,1,X,Y,Z), clinical (B,2), label (B,1,X,Y,Z), other (B,1,X,Y,Z)): label = flagged lesion.
    ``size``: S for an S^3 volume, or the shape (X, Y, Z).

    Two identical spheres at random positions, one in each x half; flag -1: the target is the one in the low-x
    half, +1: the one in the high-x half. The image alone cannot tell which is the target."""
    shape = (size,) * 3 if isinstance(size, int) else tuple(int(s) for s in size)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=0).astype(np.float32)
    images, labels, others, clinical = [], [], [], []
    margin = int(radius) + 2
    sx = shape[0]
    for _ in range(batch):
        # integer centres: the two voxelised spheres are exact translates of each other
        yz = [[rng.integers(margin, s - margin, endpoint=True) for s in shape[1:]] for _ in range(2)]
        low = np.array([rng.integers(margin, sx // 2 - 2, endpoint=True), *yz[0]], dtype=np.float32)
        high = np.array([rng.integers(sx // 2 + 2, sx - margin, endpoint=True), *yz[1]], dtype=np.float32)
        spheres = [((grid - c[:, None, None, None]) ** 2).sum(0) <= radius**2 for c in (low, high)]
        flag = int(rng.integers(2))
        img = rng.normal(0.0, 0.3, size=shape).astype(np.float32) + 1.0 * (spheres[0] | spheres[1])
        images.append(img[None])
        labels.append(spheres[flag][None])
        others.append(spheres[1 - flag][None])
        clinical.append([2.0 * flag - 1.0, rng.normal()])  # the flag, and one uninformative feature
    as_t = lambda a, dt: torch.from_numpy(np.asarray(a, dtype=dt))  # noqa: E731
    return as_t(images, np.float32), as_t(clinical, np.float32), as_t(labels, np.int64), as_t(others, np.int64)


def dice(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean Dice over the batch of binary masks (B, 1, ...)."""
    p, t = pred.flatten(1).float(), target.flatten(1).float()
    return float((2 * (p * t).sum(1) / (p.sum(1) + t.sum(1)).clamp_min(1)).mean())


def run_capacity(model_name: str, mode: str, *, steps: int = 300, batch: int = 4, lr: float = 3e-3,
                 seed: int = 0, size: int | tuple[int, int, int] | None = None,
                 test_cases: int = 16) -> CapacityResult:
    """Train a tiny ``model_name`` with fusion ``mode`` on the two-lesion task and evaluate it.
    ``size``: S (an S^3 volume) or (X, Y, Z); default 32^3, or WIDE_SHAPE for the stride-32 models."""
    size = size or (WIDE_SHAPE if model_name in STRIDE_32_MODELS else 32)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    overrides = dict(SMALL.get(model_name, {}), out_channels=2)
    if model_name == "unetr":
        overrides["img_size"] = size
    if mode != "none":
        overrides.update(fusion=mode, clinical_features=2)
    model = create_model(model_name, "tiny", **overrides)
    if hasattr(model, "deep_supervision"):
        model.deep_supervision = False
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    start = time.perf_counter()
    model.train()
    for _ in range(steps):
        image, clinical, label, _ = make_batch(rng, batch, size)
        out = model(image, clinical if mode != "none" else None)
        loss = loss_fn(out[0] if isinstance(out, (list, tuple)) else out, label)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    image, clinical, label, other = make_batch(np.random.default_rng(10_000 + seed), test_cases, size)
    flipped = clinical.clone()
    flipped[:, 0] = -flipped[:, 0]
    with torch.no_grad():
        use = mode != "none"
        pred = model(image, clinical if use else None).argmax(1, keepdim=True)
        pred_flip = model(image, flipped if use else None).argmax(1, keepdim=True)
        pred_none = model(image, None).argmax(1, keepdim=True)
    return CapacityResult(model_name, mode, dice(pred, label), dice(pred_flip, other), dice(pred_none, label),
                          time.perf_counter() - start)


def format_table(results: list[CapacityResult]) -> str:
    lines = ["| model | fusion | Dice (flag) | Dice flipped flag vs other lesion | Dice clinical=None | s |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.model} | {r.mode} | {r.dice:.3f} | {r.dice_flipped:.3f} | {r.dice_none:.3f} "
                     f"| {r.seconds:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list_models(), help="zoo names (every zoo model supports fusion)")
    p.add_argument("--modes", nargs="+", default=list(FUSION_MODES), choices=FUSION_MODES)
    p.add_argument("--steps", type=int, default=300, help="training steps per run")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    results = []
    for model in args.models:
        for mode in args.modes:
            results.append(run_capacity(model, mode, steps=args.steps, seed=args.seed))
            print(format_table(results[-1:]).splitlines()[-1], flush=True)
    print(format_table(results))


if __name__ == "__main__":
    main()
