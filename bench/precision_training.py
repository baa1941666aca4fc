"""Tiny nnynet training on CPU, fp32 vs bf16 autocast: seconds per step, and whether a short training converges alike.

Both runs start from the same weights and see the same patches (phantoms, liver vs background, Dice + CE,
AdamW lr 1e-2, patch 64x64x32, batch 2); after --steps steps both segment the same held-out phantoms with
predict (in the precision they were trained in) and report the liver Dice. ours = bf16, peer = fp32.

    python bench/precision_training.py --steps 60
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import device_name, emit  # noqa: E402
from nny_models.config import NnyNetConfig, PreprocessConfig  # noqa: E402
from nny_models.hub import NnyNet  # noqa: E402
from nny_models.inference import predict  # noqa: E402
from nny_models.phantoms import generate_phantom  # noqa: E402
from nny_models.preprocessing import preprocess_case  # noqa: E402


def load_cases(seeds, cfg: PreprocessConfig, tmp: Path) -> list[dict]:
    cases = []
    for seed in seeds:
        case = generate_phantom(seed, preset="test")
        nib.save(nib.Nifti1Image(case.image.astype(np.float32), case.affine), tmp / f"ct{seed}.nii.gz")
        nib.save(nib.Nifti1Image((case.label == 1).astype(np.uint8), case.affine), tmp / f"liver{seed}.nii.gz")
        cases.append(preprocess_case(tmp / f"ct{seed}.nii.gz", tmp / f"liver{seed}.nii.gz", cfg))
    return cases


def liver_patch(case: dict, patch, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, label) patch around a random liver voxel of a preprocessed case (the liver is ~3% of the volume),
    padded with -1 / 0 where the case is smaller than the patch."""
    pad = [(0, 0)] + [(0, max(0, p - s)) for p, s in zip(patch, case["image"].shape[1:])]
    img, lab = np.pad(case["image"], pad, constant_values=-1.0), np.pad(case["label"], pad)
    centre = np.argwhere(lab[0] > 0)[rng.integers((lab[0] > 0).sum())]
    start = [int(np.clip(c - p // 2 + rng.integers(-8, 9), 0, s - p)) for c, p, s in zip(centre, patch, img.shape[1:])]
    sl = (slice(None), *(slice(a, a + p) for a, p in zip(start, patch)))
    return torch.from_numpy(img[sl].copy()), torch.from_numpy(lab[sl].astype(np.int64))


def train(bf16: bool, cases: list[dict], cfg: PreprocessConfig, patch, steps: int) -> tuple[NnyNet, list[float], float]:
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    config = NnyNetConfig(model_kwargs={"size": "tiny", "out_channels": 2}, label_names=["background", "liver"],
                          patch_size=patch, preprocessing=cfg.to_dict())  # fmt: skip
    model = NnyNet(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    rng = np.random.default_rng(0)

    losses, times = [], []
    for step in range(steps):
        batch = [liver_patch(cases[(2 * step + i) % len(cases)], patch, rng) for i in range(2)]
        x, y = torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        loss = loss_fn(logits.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    return model, losses, float(np.median(times[1:]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = PreprocessConfig(spacing=(4.0, 4.0, 4.0))
    patch = (64, 64, 32)
    with tempfile.TemporaryDirectory() as tmp:
        cases = load_cases(range(4), cfg, Path(tmp))
    held_out = [generate_phantom(s, preset="test") for s in (50, 51, 52)]
    res = {}
    for name, bf16 in (("bf16", True), ("fp32", False)):
        model, losses, s_step = train(bf16, cases, cfg, patch, args.steps)
        dices = []
        for case in held_out:
            mask = predict(model, case.image, affine=case.affine, precision=name, device="cpu")
            liver = case.label == 1
            dices.append(2 * np.logical_and(mask == 1, liver).sum() / max(1, (mask == 1).sum() + liver.sum()))
        res[name] = {"s_step": s_step, "dice": float(np.mean(dices)), "loss_last10": float(np.mean(losses[-10:])),
                     "loss_first10": float(np.mean(losses[:10]))}  # fmt: skip
    dev = device_name("cpu")
    tag = {"steps": args.steps, "patch": list(patch), "batch": 2, "model": "nnynet tiny (fs12, 4^3 windows)",
           "threads": torch.get_num_threads()}  # fmt: skip
    emit("precision", "tiny_train_step_s", res["bf16"]["s_step"], res["fp32"]["s_step"], "the same step in fp32",
         "lower", None, dev, **tag)  # fmt: skip
    emit("precision", "short_training_heldout_liver_dice", res["bf16"]["dice"], res["fp32"]["dice"],
         "the same training in fp32", "higher", "|bf16 - fp32| < 0.005", dev, **tag,
         loss={k: {"first10": v["loss_first10"], "last10": v["loss_last10"]} for k, v in res.items()})  # fmt: skip


if __name__ == "__main__":
    main()
