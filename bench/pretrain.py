"""Volume Fusion pretraining benchmarks (one JSON line per comparison, ratio = ours / peer).

(a) cost of Volume Fusion (label map + fusion) on a batch 2 x 1 x 96^3 against the training step it feeds
    (nnynet, size "tiny" on the CPU / "base" on CUDA; forward + backward + AdamW step);
(b) end-to-end pretext-sample throughput (crop + augment + fuse) of our pipeline (PatchDataset source
    patches from the preprocessed cache, then pretrain.data.pretext_batch on the batch) against PyMIC's
    own Crop4VolumeFusion + VolumeFusion transforms applied per sample to the same preprocessed volumes
    (same output size, scale range, augmentations and fusion settings);
(c) CUDA only: training throughput (samples/s) and TFLOP/s at 96^3 in bf16.

PyMIC is optional (``pip install pymic --no-deps``); its modules import SimpleITK, scikit-image, h5py and
imops at the top, none of which the timed transforms call, so missing ones are replaced by inert stubs.
Run: python bench/pretrain.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import device_name, emit, sync, time_it  # noqa: E402
from pretrain.data import PretextConfig, pretext_batch, source_patch_size, step_generator  # noqa: E402
from pretrain.volume_fusion import volume_fusion  # noqa: E402

PATCH = (96, 96, 96)


def synthetic_ct_volumes(out_dir: Path, n: int, shape=(192, 176, 150), seed: int = 0) -> Path:
    """CT-like NIfTI volumes in HU (body ellipse, organs, bone, noise), written as a plain folder."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    for i in range(n):
        hu = np.full(shape, -1000.0, np.float32)
        body = (grid[0] / 0.9) ** 2 + (grid[1] / 0.7) ** 2 < 1
        hu[body] = -100 + 20 * rng.standard_normal()
        for _ in range(6):  # organs and vessels as random ellipsoids
            c, r = rng.uniform(-0.5, 0.5, 3), rng.uniform(0.08, 0.35, 3)
            blob = (((grid - c[:, None, None, None]) / r[:, None, None, None]) ** 2).sum(0) < 1
            hu[blob & body] = rng.uniform(20, 200)
        spine = (grid[0] ** 2 + (grid[1] + 0.5) ** 2) < 0.01
        hu[spine] = 700
        hu += rng.normal(0, 15, shape).astype(np.float32)
        nib.save(nib.Nifti1Image(hu, np.diag([1.5, 1.5, 2.0, 1.0])), str(out_dir / f"case_{i:03d}.nii.gz"))
    return out_dir


def import_pymic():
    """PyMIC's transform module, or None (with a message) when PyMIC is not installed."""
    stubbed = []
    for _ in range(12):
        try:
            from pymic.transform import crop4vf

            if stubbed:
                print(f"# pymic: stubbed import-only modules not used by the timed transforms: {stubbed}", file=sys.stderr)
            return crop4vf
        except ModuleNotFoundError as e:
            if e.name is None or e.name.split(".")[0] == "pymic":
                break
            _stub_module(e.name)
            stubbed.append(e.name)
    print("# pymic is not importable (pip install pymic --no-deps): skipping the PyMIC peer row", file=sys.stderr)
    return None


def _stub_module(name: str) -> None:
    class _Stub(types.ModuleType):
        def __getattr__(self, attr):
            if attr.startswith("__"):
                raise AttributeError(attr)
            return _stub_object(f"{self.__name__}.{attr}")

    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        sys.modules.setdefault(".".join(parts[:i]), _Stub(".".join(parts[:i])))


def _stub_object(name: str):
    def missing(*args, **kwargs):
        raise RuntimeError(f"{name} is a stub (optional PyMIC dependency not installed)")

    return missing


def ours_sampler(cache, device: torch.device, batch: int):
    """One call = one batch of our pretext samples: PatchDataset source patches (as the DataLoader yields
    them) + pretext_batch on the device."""
    from nny_models.sampling import PatchDataset

    cfg = PretextConfig()
    ds = PatchDataset(cache, None, source_patch_size(PATCH, cfg), 10**6, seed=0, fg_prob=0.0, with_label=False)
    state = {"step": 0}

    def one():
        step = state["step"] = state["step"] + 1
        images = torch.stack([ds[step * batch + j]["image"] for j in range(batch)]).to(device)
        out = pretext_batch(images, PATCH, cfg, step_generator(0, step))
        sync(device)
        return out

    return one


def pymic_sampler(crop4vf, volumes: list[np.ndarray]):
    """One call = one PyMIC sample: Crop4VolumeFusion + VolumeFusion, numpy, same settings as ours."""
    cfg = PretextConfig()
    crop = crop4vf.Crop4VolumeFusion({
        "crop4volumefusion_output_size": list(PATCH),
        "crop4volumefusion_rescale_lower_bound": [cfg.scale_range[0]] * 3,
        "crop4volumefusion_rescale_upper_bound": [cfg.scale_range[1]] * 3,
        "task": "segmentation",
    })
    fuse = crop4vf.VolumeFusion({
        "volumefusion_cls_num": cfg.num_classes,
        "volumefusion_foreground_ratio": cfg.fg_ratio,
        "volumefusion_patchsize_min": [cfg.block_min] * 3,
        "volumefusion_patchsize_max": [cfg.block_max] * 3,
        "task": "segmentation",
    })
    rng = np.random.default_rng(0)

    def one():
        sample = {"image": volumes[int(rng.integers(len(volumes)))].copy()}
        return fuse(crop(sample))

    return one


def interleaved_rates(runs: dict, samples_per_call: dict, rounds: int) -> dict:
    """samples/s of each runner, timed in alternating rounds so both see the same machine load."""
    for fn in runs.values():
        fn()  # warm-up
    spent = {name: 0.0 for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            spent[name] += time.perf_counter() - start
    return {name: samples_per_call[name] * rounds / spent[name] for name in runs}


def training_step_fn(size: str, device: torch.device, batch: int, bf16: bool):
    """A closure running one pretext training step (forward, Dice+CE, backward, AdamW) and its FLOPs."""
    from monai.losses import DiceCELoss

    from nny_models import create_model

    model = create_model("nnynet", size=size, out_channels=5).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = DiceCELoss(softmax=True, to_onehot_y=True, lambda_dice=0.5, lambda_ce=0.5)
    x = torch.randn(batch, 1, *PATCH, device=device)
    y = torch.randint(0, 5, (batch, 1, *PATCH), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
            out = out[0] if isinstance(out, (list, tuple)) else out
            loss = loss_fn(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, model


def count_flops(step) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def section_a(device, dev, repeats):
    g = torch.Generator().manual_seed(0)
    x_fg = torch.rand(2, 1, *PATCH, device=device) * 2 - 1
    x_bg = torch.rand(2, 1, *PATCH, device=device) * 2 - 1
    t_fusion = time_it(lambda: volume_fusion(x_fg, x_bg, generator=g), device, warmup=2, repeats=5)
    cfg = PretextConfig()
    source = torch.rand(2, 1, *source_patch_size(PATCH, cfg), device=device) * 2 - 1
    t_pretext = time_it(lambda: pretext_batch(source, PATCH, cfg, g), device, warmup=1, repeats=repeats)
    size = "base" if device.type == "cuda" else "tiny"
    try:
        step, model = training_step_fn(size, device, 2, bf16=device.type == "cuda")
    except ImportError as e:
        print(f"# nny_models.create_model not available ({e}): skipping the training-step rows", file=sys.stderr)
        return None, None
    t_step = time_it(step, device, warmup=1, repeats=repeats if device.type == "cuda" else 1)
    name = f"training step (nnynet {size}, batch 2 x 1 x 96^3, fwd+bwd+AdamW{', bf16' if device.type == 'cuda' else ''})"
    emit("pretrain", "volume fusion time / step (2x1x96^3)", t_fusion, t_step, name, "lower", "< 0.02", dev,
         fusion_s=t_fusion, step_s=t_step)
    emit("pretrain", "whole pretext batch time / step (crop+augment+fuse)", t_pretext, t_step, name, "lower", None, dev,
         pretext_s=t_pretext, step_s=t_step)
    return step, model


def section_b(device, dev, repeats):
    # numpy runs PyMIC's transforms on one thread; on the CPU we give ours one thread too, so the
    # comparison is per core (and does not suffer from OpenMP oversubscription on a busy machine).
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    crop4vf = import_pymic()
    from nny_models.cache import build_cache
    from nny_models.config import PreprocessConfig
    from nny_models.io import discover_cases

    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        raw.mkdir()
        synthetic_ct_volumes(raw, 4)
        # check_hu off: these fat-bodied ellipsoid volumes time the pipeline, they are not meant to pass as CT
        cache = build_cache(discover_cases(raw), PreprocessConfig(), Path(tmp) / "cache", check_hu=False)
        runs = {"ours": ours_sampler(cache, device, batch=4)}
        per_call = {"ours": 4, "pymic": 1}
        if crop4vf is not None:
            volumes = [np.asarray(cache.image(cid)) for cid in cache.case_ids]
            runs["pymic"] = pymic_sampler(crop4vf, volumes)
        rates = interleaved_rates(runs, per_call, rounds=repeats + 1)
        ours = rates["ours"]
        if crop4vf is not None:
            emit("pretrain", "pretext samples/s (crop+augment+fuse, 96^3)", ours, rates["pymic"],
                 "PyMIC Crop4VolumeFusion+VolumeFusion (numpy, per sample)", "higher", ">= 5", device_name(device),
                 ours_batch=4, threads=torch.get_num_threads(), volumes=[list(v.shape) for v in volumes])
        else:
            print(json.dumps({"bench": "pretrain", "metric": "pretext samples/s (crop+augment+fuse, 96^3)",
                              "ours": ours, "peer": None, "device": dev}))
    torch.set_num_threads(threads)
    return ours


def section_c(step, model, dev, ours):
    flops = count_flops(step)
    t = time_it(step, "cuda", warmup=2, repeats=10)
    peak = 989e12  # H100/H200 SXM dense bf16
    emit("pretrain", "training TFLOP/s (nnynet base, 96^3, bf16, batch 2)", flops / t / 1e12, peak / 1e12,
         "GPU dense bf16 peak (989 TFLOP/s)", "higher", None, dev, samples_per_s=2 / t,
         params_m=sum(p.numel() for p in model.parameters()) / 1e6)
    emit("pretrain", "training samples/s vs pretext pipeline samples/s (96^3)", 2 / t, ours,
         "our pretext pipeline on the same GPU", "lower", "< 1 (pipeline keeps up)", dev)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--only", choices=["a", "b", "c"], default=None, help="run one section only")
    args = parser.parse_args()
    run = lambda section: args.only in (None, section)  # noqa: E731
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = device_name(device)
    repeats = 2 if args.quick else 3

    # (a) Volume Fusion vs the training step it feeds.
    step = model = None
    if run("a") or run("c"):
        step, model = section_a(device, dev, repeats)

    # (b) End-to-end pretext samples/s vs PyMIC, same preprocessed volumes.
    ours = section_b(device, dev, repeats) if run("b") or run("c") else None

    # (c) CUDA: training throughput and TFLOP/s at 96^3 bf16.
    if run("c") and device.type == "cuda" and step is not None:
        section_c(step, model, dev, ours)


if __name__ == "__main__":
    main()
