"""The fast CPU depthwise conv / transposed conv (nny_models.swin_next) against PyTorch's own, fp32 and bf16.

Reference: the same layer computed by PyTorch's nn.Conv3d / nn.ConvTranspose3d in float64 (the exact answer).
fp32 must match it to ~1e-5; under bf16 autocast both our layer and PyTorch's native bf16 conv carry bf16
rounding (8 mantissa bits, relative error ~4e-3 per value), so both are held to the same relative bound
against the exact answer, and the dtypes (output bf16, gradients in each parameter's own fp32) must be
those of the native layer under autocast.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from nny_models.swin_next import FastDepthwiseConv3d, FastDepthwiseConvTranspose3d, use_fast_depthwise
from nny_models.zoo import create_model

pytestmark = pytest.mark.usefixtures("one_thread")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference relative to the reference's max magnitude (robust to values near 0)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


def make_layer(transposed: bool, channels: int = 6, k: int = 3) -> nn.Module:
    torch.manual_seed(0)
    if transposed:  # MedNeXt's up block: stride 2, padding k // 2, output 2n - 1
        return nn.ConvTranspose3d(channels, channels, k, stride=2, padding=k // 2, groups=channels)
    return nn.Conv3d(channels, channels, k, padding=k // 2, groups=channels)


def run(layer: nn.Module, x: torch.Tensor, bf16: bool):
    """Output, and grads of (input, weight, bias) for a fixed random upstream gradient."""
    x = x.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = layer(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (y.double() * g).sum().backward()
    return y, x.grad, layer.weight.grad, layer.bias.grad


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
@pytest.mark.parametrize("k", [3, 5])
def test_fast_depthwise_matches_pytorch_fp32_and_bf16(transposed, k):
    native = make_layer(transposed, k=k)
    fast = use_fast_depthwise(nn.Sequential(copy.deepcopy(native)))[0]
    assert isinstance(fast, FastDepthwiseConvTranspose3d if transposed else FastDepthwiseConv3d)
    x = torch.randn(2, 6, 9, 10, 11, generator=torch.Generator().manual_seed(2))
    exact = run(copy.deepcopy(native).double(), x.double(), bf16=False)

    ours32 = run(fast, x, bf16=False)
    for ours, ref, name in zip(ours32, exact, ("output", "grad_input", "grad_weight", "grad_bias")):
        assert ours.dtype == torch.float32, name
        assert rel_err(ours, ref) < 1e-5, (name, rel_err(ours, ref))

    ours16 = run(fast, x, bf16=True)
    native16 = run(native, x, bf16=True)
    for ours, nat, ref, name in zip(ours16, native16, exact, ("output", "grad_input", "grad_weight", "grad_bias")):
        assert ours.dtype == nat.dtype, (name, ours.dtype, nat.dtype)  # bf16 output, fp32 grads of fp32 leaves
        bound = max(2e-2, 2 * rel_err(nat, ref))  # bf16 inputs: a few ulps of 2^-8 after summation
        assert rel_err(ours, ref) < bound, (name, rel_err(ours, ref), rel_err(nat, ref))
    assert ours16[0].dtype == torch.bfloat16
    assert ours16[2].dtype == torch.float32 and ours16[3].dtype == torch.float32
    # bf16 is really used: the result differs from fp32 by bf16 rounding, not by nothing
    assert rel_err(ours16[0], exact[0]) > 1e-5


def test_bf16_input_without_autocast_stays_bf16():
    """A bf16 model (weights cast with .to(bfloat16)) gets bf16 gradients, as with nn.Conv3d."""
    native = make_layer(False).to(torch.bfloat16)
    fast = use_fast_depthwise(nn.Sequential(copy.deepcopy(native)))[0]
    x = torch.randn(1, 6, 8, 8, 8).to(torch.bfloat16)
    y, gx, gw, gb = run(fast, x, bf16=False)
    assert y.dtype == gx.dtype == gw.dtype == gb.dtype == torch.bfloat16
    ref = run(copy.deepcopy(native).double(), x.double(), bf16=False)
    assert rel_err(gw, ref[2]) < 2e-2


def test_tiny_nnynet_trains_two_steps_under_cpu_bf16_autocast():
    torch.manual_seed(0)
    model = create_model("nnynet", "tiny")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(1, 1, 64, 64, 32)
    target = torch.randint(0, 5, (1, 64, 64, 32))
    before = copy.deepcopy(model.state_dict())
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
            loss = nn.functional.cross_entropy(logits.float(), target)
        assert logits.dtype == torch.bfloat16
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) > 0.9 * len(before)  # (nearly) every tensor was updated


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_fast_window_attention_matches_monai(bf16):
    """nnynet's fused inference attention gives MONAI's WindowAttention result (shifted and plain windows)."""
    from monai.networks.nets.swin_unetr import WindowAttention

    from nny_models.swin_next import FastWindowAttention

    torch.manual_seed(0)
    net = create_model("nnynet", "tiny", window_size=3).eval()  # 3^3 windows: 24^3 -> padding and shifts
    attn = [m for m in net.modules() if isinstance(m, WindowAttention)]
    assert attn and all(type(m) is FastWindowAttention for m in attn)
    with torch.no_grad():  # non-zero relative position bias, so a dropped bias would show
        for m in attn:
            m.relative_position_bias_table.normal_(0, 1.0)
    reference = copy.deepcopy(net)
    for m in reference.modules():
        if type(m) is FastWindowAttention:
            m.__class__ = WindowAttention
    assert net.state_dict().keys() == reference.state_dict().keys()
    x = torch.randn(2, 1, 64, 64, 32)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        ours, ref = net(x).float(), reference(x).float()
    assert rel_err(ours, ref) < (3e-2 if bf16 else 1e-5), rel_err(ours, ref)


def test_cached_window_masks_match_monai_in_training():
    """The cached shifted-window mask gives MONAI's BasicLayer result, loss and gradients, at two shapes (the
    cache is keyed by shape) and again on a repeat call (the cached mask is only read)."""
    from monai.networks.nets.swin_unetr import BasicLayer

    from nny_models.swin_next import CachedMaskBasicLayer

    torch.manual_seed(0)
    net = create_model("nnynet", "tiny", window_size=3, deep_supervision=False).train()
    assert all(type(m) is CachedMaskBasicLayer for m in net.modules() if isinstance(m, BasicLayer))
    reference = copy.deepcopy(net)
    for m in reference.modules():
        if type(m) is CachedMaskBasicLayer:
            m.__class__ = BasicLayer
    for shape in [(64, 64, 32), (64, 96, 64), (64, 64, 32)]:
        x = torch.randn(1, 1, *shape)
        ours, ref = net(x), reference(x)
        assert torch.equal(ours, ref)
        ours.square().mean().backward()
        ref.square().mean().backward()
        for (name, a), b in zip(net.named_parameters(), reference.parameters()):
            assert torch.equal(a.grad, b.grad), name
        net.zero_grad(), reference.zero_grad()


def test_a_mask_cached_under_inference_mode_serves_training():
    from nny_models.swin_next import _shifted_window_mask

    _shifted_window_mask.cache_clear()
    with torch.inference_mode():
        assert not _shifted_window_mask((8, 8, 8), (4, 4, 4), (2, 2, 2), "cpu").is_inference()
    net = create_model("nnynet", "tiny", window_size=3, deep_supervision=False)
    x = torch.randn(1, 1, 64, 64, 32)
    with torch.inference_mode():  # predict fills the cache first
        net.eval()(x)
    cached = _shifted_window_mask.cache_info().currsize
    net.train()(x).square().mean().backward()
    assert _shifted_window_mask.cache_info().currsize == cached  # training reused the masks predict built
