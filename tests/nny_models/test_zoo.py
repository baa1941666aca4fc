"""Every zoo network: forward + backward on CPU at tiny size, with and without clinical fusion."""

import copy

import pytest
import torch
import torch.nn as nn

from nny_models.swin_next import FastDepthwiseConv3d, FastDepthwiseConvTranspose3d, use_fast_depthwise
from nny_models.zoo import create_model, list_models

F = 4  # clinical features


pytestmark = pytest.mark.usefixtures("one_thread")


def _input(model: torch.nn.Module, batch: int = 1) -> torch.Tensor:
    # The smallest input with a 2-voxel bottleneck (norm layers need > 1 value): 2d x d x d, d = size_divisor.
    # CPU depthwise-conv backward is slow, so this keeps the whole file fast.
    d = model.size_divisor
    shape = getattr(model, "img_size", None) or (2 * d, d, d)
    return torch.randn(batch, 1, *shape)


@pytest.mark.parametrize("fusion", ["none", "cross_attention"])
@pytest.mark.parametrize("name", list_models())
def test_forward_backward(name, fusion):
    torch.manual_seed(0)
    model = create_model(name, "tiny", out_channels=3, fusion=fusion, clinical_features=F).train()
    x = _input(model)
    out = model(x, torch.randn(1, F) if fusion != "none" else None)
    assert out.shape == (1, 3, *x.shape[2:])
    out.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)
    # MONAI's ViT blocks own a norm_cross_attn that UNETR never calls; everything else must get gradient.
    assert all("norm_cross_attn" in n for n, g in grads.items() if g is None)
    assert isinstance(model.size_divisor, int) and model.encoder_prefixes and model.head_prefixes
    keys = model.state_dict().keys()
    for prefixes in (model.encoder_prefixes, model.head_prefixes):
        assert any(k.startswith(prefixes) for k in keys)
    assert (model.fusion is None) == (fusion == "none")


@pytest.mark.parametrize("name", ["nnynet", "mednext_s"])
def test_deep_supervision_returns_list_in_train_mode(name):
    model = create_model(name, "tiny", deep_supervision=True).train()
    x = _input(model)
    outs = model(x)
    assert isinstance(outs, list) and len(outs) == 5
    assert outs[0].shape[2:] == x.shape[2:]
    for hi, lo in zip(outs, outs[1:]):  # full resolution first, then halving
        assert tuple(lo.shape[2:]) == tuple(s // 2 for s in hi.shape[2:])
    model.eval()
    with torch.no_grad():
        assert model(x).shape == outs[0].shape


def test_user_errors_raise_value_error():
    with pytest.raises(ValueError, match="valid names"):
        create_model("resnet")
    with pytest.raises(ValueError, match="valid sizes"):
        create_model("unet", size="huge")
    with pytest.raises(ValueError, match="fusion"):
        create_model("unet", "tiny", fusion="multiply", clinical_features=3)
    with pytest.raises(ValueError, match="clinical_features"):
        create_model("unet", "tiny", fusion="add")
    with pytest.raises(ValueError, match="unsupported option"):
        create_model("unet", "tiny", deep_supervision=True)
    with pytest.raises(ValueError, match="kernel_size"):
        create_model("mednext_s", "tiny", kernel_size=4)
    model = create_model("unet", "tiny").eval()
    with pytest.raises(ValueError, match=r"\(B, C, D, H, W\)"):
        model(torch.randn(1, 32, 32, 32))
    with pytest.raises(ValueError, match="divisible by 16"):
        model(torch.randn(1, 1, 32, 32, 40))
    with pytest.raises(ValueError, match="divisible by 32"):
        create_model("nnynet", "tiny")(torch.randn(1, 1, 48, 32, 32))
    with pytest.raises(ValueError, match="at least 64 voxels along one axis"):  # not GroupNorm's own error
        create_model("nnynet", "tiny").train()(torch.randn(1, 1, 32, 32, 32))


def test_presets_and_overrides():
    assert create_model("nnynet", "base").encoder.embed_dim == 48
    assert create_model("nnynet", "tiny", feature_size=24).encoder.embed_dim == 24
    assert len(list_models()) == 10


@pytest.mark.parametrize("k", [3, 7])
@pytest.mark.parametrize("transposed", [False, True])
def test_fast_depthwise_conv_matches_native_gradients(k, transposed):
    torch.manual_seed(0)
    if transposed:  # MedNeXtUpBlock's upsampling conv
        ref = nn.ConvTranspose3d(4, 4, k, stride=2, padding=k // 2, groups=4).double()
    else:
        ref = nn.Conv3d(4, 4, k, padding=k // 2, groups=4).double()
    fast = use_fast_depthwise(nn.Sequential(copy.deepcopy(ref)))[0]
    assert isinstance(fast, FastDepthwiseConvTranspose3d if transposed else FastDepthwiseConv3d)
    x = torch.randn(2, 4, 9, 8, 7, dtype=torch.double)
    grads = []
    for conv in (ref, fast):
        xi = x.clone().requires_grad_()
        out = conv(xi)
        (out * torch.linspace(-1, 1, out.numel(), dtype=torch.double).view_as(out)).sum().backward()
        grads.append((out, xi.grad, conv.weight.grad, conv.bias.grad))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-10)
    with torch.no_grad():  # the inference path too
        assert torch.allclose(ref(x), fast(x), atol=1e-10)


def test_unet_fusion_hook_follows_deepcopy():
    # EMA (torch.optim.swa_utils.AveragedModel) deep-copies the model: the copy must use its own fusion.
    model = create_model("unet", "tiny", fusion="add", clinical_features=2).eval()
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in ema.fusion.parameters():
            p.add_(1.0)
        x, c = torch.randn(1, 1, 32, 16, 16), torch.randn(1, 2)
        assert not torch.allclose(model(x, c), ema(x, c))


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    plain = create_model("nnynet", "tiny").train()
    torch.manual_seed(0)
    ckpt = create_model("nnynet", "tiny", use_checkpoint=True).train()
    x = _input(plain)
    for m in (plain, ckpt):
        m(x).square().mean().backward()
    for (n, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), n
