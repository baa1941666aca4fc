"""Sliding-window inference on one CT-sized volume: nnynet (Swin-NeXt) vs MONAI SwinUNETR.

Both networks run through the same MONAI ``sliding_window_inference`` (Gaussian blending, softmax)
at the same ROI, overlap, window batch and feature_size, on the same preprocessed grid: the
"sliding_window" rows compare the networks. The "predict" rows time the whole pipeline on the raw
volume: ours = ``nny_models.predict`` (reorient/resample/window/crop -> windows -> labels restored
to the input grid); peer = the usual MONAI recipe (Orientation, Spacing, ScaleIntensityRange,
CropForeground -> windows -> inverse transforms on the probabilities -> argmax).

Precision: fp32 and bf16 rows for both (the peer gets bf16 autocast too), and the peer also with MONAI's own
``use_flash_attention=True`` (SDPA at inference), so that our fused window attention is not the only SDPA user,
and with channels-last (NDHWC) weights, the layout ours runs in on a CPU (nny_models.inference.channels_last_on_cpu),
so that neither trick is ours alone.
An ONNX Runtime row runs our nnynet-export graph. The predict row uses predict's precision="auto" (bf16 on
CUDA and AMX / AVX512-BF16 CPUs) and the MONAI recipe at the same precision.

    python bench/inference.py                 # CPU: feature_size 12, ROI 64, overlap 0.25 (minutes on 2 cores)
    python bench/inference.py --device cuda   # feature_size 48, ROI 96, overlap 0.5
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.networks.nets import SwinUNETR
from monai.transforms import Compose, CropForeground, Orientation, ScaleIntensityRange, Spacing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import device_name, emit, time_it  # noqa: E402
from nny_models.config import NnyNetConfig, PreprocessConfig  # noqa: E402
from nny_models.hub import NnyNet  # noqa: E402
from nny_models.inference import bf16_is_fast, predict, sliding_window_probs  # noqa: E402
from nny_models.preprocessing import preprocess_volume  # noqa: E402


def ct_volume(shape: tuple[int, int, int], spacing: tuple[float, float, float], seed: int = 0):
    """A CT-like abdomen in HU: a phantom from nny_models.phantoms ("ct" preset, its central shape[2]
    slices) if available, else a body ellipse with fat, muscle, liver, spine and noise of ``shape``."""
    try:
        from nny_models.phantoms import generate_phantom

        case = generate_phantom(seed, preset="ct", labeled=False)
    except ImportError:  # phantoms not available: fall back to the procedural stand-in below
        case = None
    if case is not None:
        z0 = max(0, (case.image.shape[2] - shape[2]) // 2)
        image = np.ascontiguousarray(case.image[:, :, z0 : z0 + shape[2]], dtype=np.float32)
        affine = np.asarray(case.affine, dtype=np.float64).copy()
        affine[:3, 3] += affine[:3, 2] * z0  # the cropped grid starts at slice z0
        return image, affine, f"phantom preset ct, slices {z0}..{z0 + image.shape[2] - 1} of {case.image.shape[2]}"
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    r = (x / 0.85) ** 2 + (y / 0.6) ** 2
    slice_hu = np.full(shape[:2], -1000.0, np.float32)
    slice_hu[r < 1.0] = -100.0  # subcutaneous fat
    slice_hu[r < 0.8] = 45.0  # muscle / soft tissue
    slice_hu[((x + 0.3) / 0.45) ** 2 + ((y + 0.1) / 0.35) ** 2 < 1.0] = 110.0  # liver
    slice_hu[(x / 0.08) ** 2 + ((y - 0.4) / 0.08) ** 2 < 1.0] = 700.0  # vertebra
    vol = np.repeat(slice_hu[..., None], shape[2], axis=2)
    vol += rng.normal(0.0, 15.0, shape).astype(np.float32)
    affine = np.diag([*spacing, 1.0])
    return vol, affine, f"synthetic ellipse {shape}"


def monai_pipeline(vol: np.ndarray, affine: np.ndarray, net: torch.nn.Module, cfg: PreprocessConfig, roi, args, device, amp):
    """The MONAI recipe for the same job, returning labels on the input grid."""
    lo, hi = cfg.hu_window
    threshold = cfg.out_range[0] + (cfg.body_threshold_hu - lo) / (hi - lo) * (cfg.out_range[1] - cfg.out_range[0])
    pre = Compose([
        Orientation(axcodes=cfg.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacing(pixdim=cfg.spacing, mode="bilinear"),
        ScaleIntensityRange(a_min=lo, a_max=hi, b_min=cfg.out_range[0], b_max=cfg.out_range[1], clip=True),
        CropForeground(select_fn=lambda t: t > threshold, allow_smaller=True),
    ])
    x = pre(MetaTensor(torch.from_numpy(vol)[None], affine=torch.as_tensor(affine)))

    def predictor(patch):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            return net(patch).float().softmax(1)

    with torch.inference_mode():
        probs = sliding_window_inference(x[None].to(device), roi, args.sw_batch_size, predictor, overlap=args.overlap,
                                         mode="gaussian", cval=cfg.out_range[0], sw_device=device, device=device)[0]
        probs = pre.inverse(probs.cpu())  # undo crop, spacing, orientation with the recorded operations
    return probs.argmax(0).to(torch.uint8).numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", type=int, nargs=3, default=(512, 512, 100), help="volume size; with phantoms only the slice count applies")
    p.add_argument("--spacing", type=float, nargs=3, default=(0.75, 0.75, 2.5))
    p.add_argument("--feature-size", type=int, default=None, help="default: 48 on CUDA, 12 on CPU")
    p.add_argument("--roi", type=int, default=None, help="default: 96 on CUDA, 64 on CPU")
    p.add_argument("--overlap", type=float, default=None, help="default: 0.5 on CUDA, 0.25 on CPU")
    p.add_argument("--sw-batch-size", type=int, default=None, help="default: 4 (predict's default)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs (median); default 3 on CUDA, 1 on CPU")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime row")
    args = p.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    fs = args.feature_size or (48 if cuda else 12)
    roi = (args.roi or (96 if cuda else 64),) * 3
    args.overlap = args.overlap if args.overlap is not None else (0.5 if cuda else 0.25)
    args.sw_batch_size = args.sw_batch_size or 4
    repeats = args.repeats or (3 if cuda else 1)
    warmup = 1 if cuda else 0
    torch.manual_seed(0)

    vol, affine, source = ct_volume(tuple(args.shape), tuple(args.spacing))
    cfg = PreprocessConfig()
    # labels from the probabilities resampled to the input grid: what fine-tuning writes, and what the peer's
    # pre.inverse(probs).argmax does
    ours = NnyNet(NnyNetConfig(model_kwargs={"feature_size": fs}, patch_size=roi, preprocessing=cfg.to_dict(),
                               label_resampling="probabilities"))
    peer = SwinUNETR(in_channels=1, out_channels=5, feature_size=fs)
    peer_flash = SwinUNETR(in_channels=1, out_channels=5, feature_size=fs, use_flash_attention=True)
    peer_flash.load_state_dict(peer.state_dict())
    peer_cl = SwinUNETR(in_channels=1, out_channels=5, feature_size=fs)
    peer_cl.load_state_dict(peer.state_dict())
    for m in (ours, peer, peer_flash, peer_cl):
        m.eval().to(device)
    peer_cl.to(memory_format=torch.channels_last_3d)
    with torch.inference_mode():  # one window each: one-time initialisation stays out of the timings
        for m in (ours, peer, peer_flash, peer_cl):
            m(torch.zeros(1, 1, *roi, device=device))
    x, _ = preprocess_volume(vol, affine, cfg)
    x = torch.as_tensor(x.as_tensor() if hasattr(x, "as_tensor") else x, dtype=torch.float32)[None].to(device)
    windows = math.prod(
        1 if n <= r else math.ceil((n - r) / (r * (1 - args.overlap))) + 1 for n, r in zip(x.shape[2:], roi)
    )
    best = "bf16" if bf16_is_fast(device) else "fp32"  # predict's precision="auto" on this machine
    common = dict(
        device=device_name(device), volume_shape=list(vol.shape), volume=source, preprocessed_grid=list(x.shape[2:]),
        roi=list(roi), overlap=args.overlap, sw_batch_size=args.sw_batch_size, feature_size=fs, windows=windows,
        repeats=repeats, params_ours=sum(t.numel() for t in ours.parameters()),
        params_peer=sum(t.numel() for t in peer.parameters()), bf16_is_fast=best == "bf16",
    )

    def peer_probs(net, amp: bool):
        def predictor(patch):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                return net(patch).float().softmax(1)

        with torch.inference_mode():
            return sliding_window_inference(x, roi, args.sw_batch_size, predictor, overlap=args.overlap,
                                            mode="gaussian", cval=-1.0, sw_device=device, device=device)

    def ours_probs(net, amp: bool):
        with torch.inference_mode():
            return sliding_window_probs(net, x, roi, None, overlap=args.overlap, sw_batch_size=args.sw_batch_size,
                                        device=device, amp=amp, cval=-1.0)

    peer_label = f"monai SwinUNETR(feature_size={fs}) + sliding_window_inference"
    note = "network part only, same preprocessed grid, Gaussian blending + softmax"
    seconds: dict[str, float] = {}
    for precision in ("fp32", "bf16"):
        amp = precision == "bf16"
        t_ours = time_it(lambda: ours_probs(ours, amp), device, warmup=warmup, repeats=repeats)
        t_peer = time_it(lambda: peer_probs(peer, amp), device, warmup=warmup, repeats=repeats)
        t_flash = time_it(lambda: peer_probs(peer_flash, amp), device, warmup=warmup, repeats=repeats)
        t_cl = time_it(lambda: peer_probs(peer_cl, amp), device, warmup=warmup, repeats=repeats)
        seconds[precision] = t_ours
        emit("inference", f"sliding_window_seconds_per_volume_{precision}", t_ours, t_peer, peer_label, "lower",
             "<= 0.5 (ratio)", **common, precision=precision, note=note,
             peer_use_flash_attention_s=t_flash)  # fmt: skip
        emit("inference", f"sliding_window_seconds_per_volume_{precision}_vs_flash", t_ours, t_flash,
             f"monai SwinUNETR(feature_size={fs}, use_flash_attention=True) + sliding_window_inference", "lower",
             None, **common, precision=precision, note=note + "; the peer with MONAI's own SDPA option")  # fmt: skip
        emit("inference", f"sliding_window_seconds_per_volume_{precision}_vs_channels_last", t_ours, t_cl,
             f"monai SwinUNETR(feature_size={fs}), channels-last weights, + sliding_window_inference", "lower",
             None, **common, precision=precision, note=note + "; the peer in the layout ours runs in on a CPU")  # fmt: skip

    if not args.no_onnx:
        import tempfile

        from nny_models.export import export_onnx, load_onnx_network

        with tempfile.TemporaryDirectory() as tmp:
            ours.save_pretrained(tmp)
            export_onnx(ours, Path(tmp) / "model.onnx")
            ort_net = load_onnx_network(tmp)
            t_ort = time_it(lambda: ours_probs(ort_net, False), device, warmup=warmup, repeats=repeats)
            t_peer = time_it(lambda: peer_probs(peer, False), device, warmup=warmup, repeats=repeats)
        emit("inference", "sliding_window_seconds_per_volume_onnxruntime_fp32", t_ort, t_peer, peer_label, "lower",
             None, **common, precision="fp32", ours_torch_fp32_s=seconds["fp32"],
             note="ours: the nnynet-export graph in ONNX Runtime (CPUExecutionProvider, as many threads as torch)")

    amp = best == "bf16"  # predict's precision="auto"; the peer pipeline runs at the same precision
    t_ours = time_it(lambda: predict(ours, vol, affine=affine, overlap=args.overlap, sw_batch_size=args.sw_batch_size,
                                     device=device), device, warmup=0, repeats=repeats)
    t_peer = time_it(lambda: monai_pipeline(vol, affine, peer, cfg, roi, args, device, amp), device,
                     warmup=0, repeats=repeats)
    emit("inference", "predict_seconds_per_volume", t_ours, t_peer,
         f"monai transforms + SwinUNETR(feature_size={fs}) sliding_window_inference + inverse", "lower",
         "<= 0.5 (ratio)", **common, precision=best,
         note="full pipeline from the raw HU volume to labels on the input grid; ours = predict(precision='auto')")


if __name__ == "__main__":
    main()
