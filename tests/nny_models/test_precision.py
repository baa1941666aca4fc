"""predict in bf16 vs fp32: the choice of precision, and that a trained model's Dice holds in bf16.

The Dice test trains the tiny nnynet for 30 steps on phantoms (liver vs background, ~10-20 s on one core) so
that its masks follow the anatomy (liver Dice well above chance), then segments a held-out phantom both ways.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.precision_training import liver_patch, load_cases
from nny_models import inference
from nny_models.config import NnyNetConfig, PreprocessConfig
from nny_models.inference import bf16_is_fast, predict, resolve_precision

pytestmark = pytest.mark.usefixtures("one_thread")

PATCH = (64, 32, 32)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum()))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny nnynet (background / liver) trained 30 AdamW steps on three phantoms, and a held-out phantom."""
    from monai.losses import DiceCELoss

    from nny_models.hub import NnyNet
    from nny_models.phantoms import generate_phantom

    tmp = tmp_path_factory.mktemp("phantoms")
    cfg = PreprocessConfig(spacing=(4.0, 4.0, 4.0))
    cases = load_cases(range(3), cfg, tmp)
    torch.manual_seed(0)
    config = NnyNetConfig(model_kwargs={"size": "tiny", "out_channels": 2}, label_names=["background", "liver"],
                          patch_size=PATCH, preprocessing=cfg.to_dict())  # fmt: skip
    model = NnyNet(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    rng = np.random.default_rng(0)

    model.train()
    for step in range(30):
        batch = [liver_patch(cases[(2 * step + i) % 3], PATCH, rng) for i in range(2)]
        loss = loss_fn(model(torch.stack([b[0] for b in batch])), torch.stack([b[1] for b in batch]))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, generate_phantom(50, preset="test")


def test_trained_model_dice_in_bf16_within_0005_of_fp32(trained):
    model, case = trained
    liver = case.label == 1
    out = {}
    for precision in ("fp32", "bf16"):
        out[precision] = predict(model, case.image, affine=case.affine, precision=precision, device="cpu",
                                 return_probabilities=True)  # fmt: skip
    d32, d16 = (dice(out[p][0] == 1, liver) for p in ("fp32", "bf16"))
    assert d32 > 0.3, f"the briefly trained model did not learn the liver (Dice {d32:.3f}): the test would be empty"
    assert abs(d16 - d32) < 0.005, (d32, d16)
    # bf16 really ran: the probabilities differ by bf16 rounding, yet the masks almost all agree
    diff = np.abs(out["bf16"][1] - out["fp32"][1]).max()
    assert 1e-4 < diff < 0.2, diff
    assert np.mean(out["bf16"][0] == out["fp32"][0]) > 0.995


def test_auto_precision_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(inference, "bf16_is_fast", lambda device: True)
    assert resolve_precision("auto", "cpu") is True
    monkeypatch.setattr(inference, "bf16_is_fast", lambda device: False)
    assert resolve_precision("auto", "cpu") is False
    assert resolve_precision("bf16", "cpu") is True and resolve_precision("fp32", "cpu") is False
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp16", "cpu")


def test_bf16_detection_reads_cpu_flags(monkeypatch, tmp_path):
    """Without torch's CPUID helpers, /proc/cpuinfo's amx_bf16 / avx512_bf16 flags decide."""
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    cpuinfo = tmp_path / "cpuinfo"
    real_path = inference.Path

    def fake_path(p):
        return real_path(cpuinfo) if str(p) == "/proc/cpuinfo" else real_path(p)

    monkeypatch.setattr(inference, "Path", fake_path)
    cpuinfo.write_text("flags\t\t: fpu sse avx2 avx512f\n")
    assert bf16_is_fast("cpu") is False
    cpuinfo.write_text("flags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n")
    assert bf16_is_fast("cpu") is True
    assert bf16_is_fast("meta") is False


def test_predict_rejects_unknown_precision():
    from tests.nny_models.test_inference import ThresholdNet, make_config, synthetic_ct

    vol, _ = synthetic_ct()
    with pytest.raises(ValueError, match="precision"):
        predict(ThresholdNet(make_config()), vol, spacing=(0.9, 0.9, 3.0), device="cpu", precision="half")
