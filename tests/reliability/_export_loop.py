"""Child process of test_crash_export: fine-tuning's export() of exports 1, 2, 3, ..., export k holding
weights = k and step k in config.json and the card. ``KILL_POINT`` makes the process SIGKILL itself inside
export ``KILL_AT``: after the card is written, after the weights, before the swap, or right after the swap."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch
from huggingface_hub import ModelCard

import finetune.run
import nny_models.training.files as files
from finetune.run import FinetuneConfig, export
from nny_models.config import NnyNetConfig
from nny_models.hub import NnyNet
from nny_models.zoo import resolve_model_kwargs

current = {"k": 0}


def killing(fn, point: str):
    def wrapper(*args, **kwargs):
        if point == "before_swap" and current["k"] == KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)
        result = fn(*args, **kwargs)
        if point != "before_swap" and current["k"] == KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    return wrapper


def summary(k: int) -> dict:
    stats = {f"{m}_mean": k / 1000 for m in ("dice", "iou", "hd95", "precision", "recall")}
    return {"mean_dice": k / 1000, "miou": k / 1000, "per_class": {"liver": stats}}


def main(out: Path) -> None:
    model = NnyNet(NnyNetConfig(model="unet", model_kwargs=resolve_model_kwargs("unet", "tiny", out_channels=2),
                                label_names=["background", "liver"], patch_size=(32, 32, 32)))
    cfg = FinetuneConfig()
    for k in range(1, 10_000):
        current["k"] = k
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(k))
        export(model, out, cfg, summary(k), k)
        print(k, flush=True)


if __name__ == "__main__":
    POINT, KILL_AT = os.environ.get("KILL_POINT", ""), int(os.environ.get("KILL_AT", "0"))
    if POINT == "card":
        ModelCard.save = killing(ModelCard.save, POINT)
    elif POINT == "weights":
        NnyNet._save_pretrained = killing(NnyNet._save_pretrained, POINT)
    elif POINT == "before_swap":
        files.replace_dir = killing(files.replace_dir, POINT)
    elif POINT == "after_swap":
        files.exchange_dirs = killing(files.exchange_dirs, POINT)
    assert finetune.run.writing_dir.__module__ == files.__name__  # export() goes through the patched module
    main(Path(sys.argv[1]))
