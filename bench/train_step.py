"""The fine-tuning step as the pipeline runs it, against the same step on MONAI's and torch's defaults.

Ours: the tiny nnynet at the pipeline's feature_size 24 (deep supervision; --feature_size 12 for the figures of
sessions 7-9) on an augmented 64 x 64 x 32 phantom patch (finetune/augment.py, which hands plain tensors to the
loop), Dice + Focal + CE (finetune/loss.py), backward, fused AdamW (nny_models.training.adamw), with the
shifted-window masks cached per shape (CachedMaskBasicLayer), MedNeXt's 1x1x1 transposed convs computed as convs
(PointwiseConvTranspose3d) and its 1x1x1 convs as batched matrix products (PointwiseConv3d; the transposed ones use
the same product in every variant but the peer). The peer is the same network, data and loss as MONAI and torch
give them by default: the augmented patch as the MetaTensor MONAI's transforms return, MONAI's BasicLayer (it
rebuilds the mask every forward), torch's per-tensor AdamW on the CPU, and torch's ConvTranspose3d and Conv3d for
the 1x1x1 layers. Both run in one process, interleaved in blocks, so load changes hit both alike; the ablation
rows put back one default at a time. The same update, to rounding (tests/nny_models/test_depthwise_dtype.py,
tests/nny_models/test_zoo.py, tests/nny_models/training/test_loop.py): only the time differs.

    python bench/train_step.py [--steps 30] [--precision bf16|fp32] [--threads 2] [--feature_size 24]

Prints JSON lines: train_step_s (ours vs peer, lower is better) and one ablation row per default.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import device_name, emit  # noqa: E402
from augment import phantom_patches  # noqa: E402  (bench/augment.py)

from finetune.augment import AugmentedPatches  # noqa: E402
from finetune.loss import DiceFocalCELoss  # noqa: E402
from nny_models.swin_next import CachedMaskBasicLayer, PointwiseConv3d, PointwiseConvTranspose3d  # noqa: E402
from nny_models.training import adamw  # noqa: E402
from nny_models.zoo import create_model  # noqa: E402

PATCH = (64, 64, 32)  # the pipeline's fine-tuning patch
FIXES = ("plain_tensors", "cached_masks", "fused_adamw", "pointwise_transposed", "pointwise_matmul")


class Variant:
    """One training setup: which of our fixes it has (the others are MONAI's / torch's defaults)."""

    def __init__(self, base: torch.nn.Module, fixes: set[str], data: AugmentedPatches, precision: str):
        from monai.data import MetaTensor
        from monai.networks.nets.swin_unetr import BasicLayer

        self.model = copy.deepcopy(base).train()
        if "cached_masks" not in fixes:
            for m in self.model.modules():
                if type(m) is CachedMaskBasicLayer:
                    m.__class__ = BasicLayer  # MONAI's own forward: the mask is rebuilt every call
        if "pointwise_transposed" not in fixes:
            for m in self.model.modules():
                if type(m) is PointwiseConvTranspose3d:
                    m.__class__ = torch.nn.ConvTranspose3d  # PyTorch's own (slow on CPU) 1x1x1 transposed conv
        if "pointwise_matmul" not in fixes:
            for m in self.model.modules():
                if type(m) is PointwiseConv3d:
                    m.__class__ = torch.nn.Conv3d  # oneDNN's 1x1x1 conv, with its layout reorders
        params = self.model.parameters()
        self.opt = adamw(params, lr=1e-3) if "fused_adamw" in fixes else torch.optim.AdamW(params, lr=1e-3)
        self.wrap = (lambda t: t) if "plain_tensors" in fixes else MetaTensor  # what MONAI's transforms return
        self.data, self.precision, self.index = data, precision, 0
        self.loss = DiceFocalCELoss(include_background=False)

    def step(self) -> float:
        sample = self.data[self.index]
        self.index += 1
        start = time.perf_counter()
        image, label = self.wrap(sample["image"][None]), self.wrap(sample["label"][None])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            outputs = self.model(image)
        loss = self.loss(outputs, label)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="timed steps per variant (median), after 3 warm-up steps")
    ap.add_argument("--block", type=int, default=5, help="steps per variant before the next variant's turn")
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="autocast of the forward")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the pipeline's: all cores)")
    ap.add_argument("--feature_size", type=int, default=24, help="the network's width (the pipeline's: 24)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = create_model("nnynet", "tiny", feature_size=args.feature_size, deep_supervision=True)
    data = AugmentedPatches(phantom_patches(args.steps + 3, PATCH), seed=0, clinical_dropout=0.0)
    setups = {"ours": set(FIXES), "peer": set()}
    setups.update({f"without_{fix}": set(FIXES) - {fix} for fix in FIXES})
    variants = {name: Variant(base, fixes, data, args.precision) for name, fixes in setups.items()}
    for v in variants.values():  # warm-up: oneDNN primitives, MONAI's lazy kernels
        for _ in range(3):
            v.step()
        v.index = 0
    times: dict[str, list[float]] = {name: [] for name in variants}
    while any(len(t) < args.steps for t in times.values()):
        for name, v in variants.items():
            for _ in range(min(args.block, args.steps - len(times[name]))):
                times[name].append(v.step())
    median = {name: float(np.median(t)) for name, t in times.items()}
    dev = f"{device_name('cpu')}, precision {args.precision}"
    common = {"patch": list(PATCH), "steps": args.steps,
              "model": f"nnynet tiny, feature_size {args.feature_size}, deep supervision",
              "step_s": median}
    rows = [emit("train_step", "train_step_s", median["ours"], median["peer"],
                 "the same step on MONAI's and torch's defaults (MetaTensor input, per-forward window masks, "
                 "per-tensor AdamW)", "lower", None, dev, **common)]
    for fix in FIXES:
        rows.append(emit("train_step", f"train_step_s_without_{fix}", median["ours"], median[f"without_{fix}"],
                         f"ours with {fix} taken back to the default", "lower", None, dev, **common))
    return rows


if __name__ == "__main__":
    main()
