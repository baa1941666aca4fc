"""Every zoo network: forward + backward on CPU at tiny size, with and without clinical fusion; explicit
model arguments (presets resolved when a config is written) and a save/load round trip of every network."""

import copy
import json

import pytest
import torch
import torch.nn as nn

from nny_models import zoo
from nny_models.config import NnyNetConfig
from nny_models.hub import NnyNet
from nny_models.swin_next import (
    FastDepthwiseConv3d,
    FastDepthwiseConvTranspose3d,
    PointwiseConv3d,
    PointwiseConvTranspose3d,
    SafeBf16Conv3d,
    SafeBf16ConvTranspose3d,
    use_fast_depthwise,
    use_safe_bf16_convs,
)
from nny_models.zoo import (TRAINING_SWITCHES, build_model, create_model, list_models, resolve_model_kwargs,
                            training_switches)

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


def assert_same_outputs_and_gradients(ref: nn.Module, fast: nn.Module, x: torch.Tensor) -> None:
    """Output and the gradients of input, weight and bias agree (fp64) under a non-uniform output gradient."""
    grads = []
    for conv in (ref, fast):
        xi = x.clone().requires_grad_()
        out = conv(xi)
        (out * torch.linspace(-1, 1, out.numel(), dtype=torch.double).view_as(out)).sum().backward()
        grads.append((out, xi.grad, conv.weight.grad, conv.bias.grad))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-10)


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
    assert_same_outputs_and_gradients(ref, fast, x)
    with torch.no_grad():  # the inference path too
        assert torch.allclose(ref(x), fast(x), atol=1e-10)


@pytest.mark.parametrize("stride", [1, 2])
def test_pointwise_transposed_conv_matches_native_gradients_and_keeps_its_state_dict(stride):
    torch.manual_seed(0)
    # MedNeXtOutBlock's head (stride 1) and MedNeXtUpBlock's residual path (stride 2)
    ref = nn.ConvTranspose3d(6, 5, kernel_size=1, stride=stride).double()
    fast = use_fast_depthwise(nn.Sequential(copy.deepcopy(ref)))[0]
    assert isinstance(fast, PointwiseConvTranspose3d)
    assert fast.state_dict().keys() == ref.state_dict().keys() and fast.weight.shape == (6, 5, 1, 1, 1)
    padded = use_fast_depthwise(nn.Sequential(nn.ConvTranspose3d(6, 5, 1, stride=2, output_padding=1)))[0]
    assert type(padded) is nn.ConvTranspose3d  # output padding is left to PyTorch
    x = torch.randn(2, 6, 9, 8, 7, dtype=torch.double)
    assert_same_outputs_and_gradients(ref, fast, x)
    heads = [m for m in create_model("nnynet", "tiny").modules() if isinstance(m, nn.ConvTranspose3d)
             and m.kernel_size == (1, 1, 1)]
    assert heads and all(type(m) is PointwiseConvTranspose3d for m in heads)


@pytest.mark.parametrize("batch", [1, 3])
def test_pointwise_conv_matches_native_gradients_and_keeps_its_state_dict(batch):
    torch.manual_seed(0)
    ref = nn.Conv3d(6, 5, kernel_size=1).double()  # MedNeXt's expand / compress layers
    fast = use_fast_depthwise(nn.Sequential(copy.deepcopy(ref)))[0]
    assert isinstance(fast, PointwiseConv3d)
    assert fast.state_dict().keys() == ref.state_dict().keys()
    for other in (nn.Conv3d(6, 5, 1, stride=2), nn.Conv3d(6, 5, 1, padding=1), nn.Conv3d(6, 6, 1, groups=2)):
        assert type(use_fast_depthwise(nn.Sequential(other))[0]) is nn.Conv3d  # left to PyTorch
    x = torch.randn(batch, 6, 9, 8, 7, dtype=torch.double)
    assert_same_outputs_and_gradients(ref, fast, x)
    assert_same_outputs_and_gradients(ref, fast, x.contiguous(memory_format=torch.channels_last_3d))  # conv
    assert_same_outputs_and_gradients(ref, fast, x.transpose(2, 4))  # neither layout: PyTorch's own conv
    layers = [m for m in create_model("nnynet", "tiny").modules() if isinstance(m, nn.Conv3d)
              and m.kernel_size == (1, 1, 1)]
    assert layers and all(type(m) is PointwiseConv3d for m in layers)


def test_pointwise_conv_under_bf16_autocast_matches_the_native_one():
    # The matrix product adds the bias before its one rounding to bf16, as oneDNN's conv does: bit-equal outputs.
    torch.manual_seed(0)
    ref = nn.Conv3d(12, 24, kernel_size=1)
    fast = use_fast_depthwise(nn.Sequential(copy.deepcopy(ref)))[0]
    x = torch.randn(2, 12, 9, 8, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = ref(x), fast(x)
    assert a.dtype == b.dtype == torch.bfloat16
    assert torch.equal(a, b)
    # Gradients at a 64^3 patch: each in its tensor's dtype, as the conv's. (A bf16 weight gradient, a matmul with an
    # inner size of 2^18, died of SIGFPE in oneDNN in a one-thread process; tests/bench/test_gpu_bench.py met it.)
    ref = nn.Conv3d(6, 6, kernel_size=1)
    fast = use_fast_depthwise(nn.Sequential(copy.deepcopy(ref)))[0]
    x = torch.randn(1, 6, 64, 64, 64)
    grads = []
    for conv in (ref, fast):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv(xi)
        (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append((xi.grad, conv.weight.grad, conv.bias.grad))
    for g_ref, g_fast in zip(*grads):
        assert g_fast.dtype == g_ref.dtype == torch.float32
        assert torch.allclose(g_fast, g_ref, rtol=2e-2, atol=2e-2 * g_ref.abs().max().item())


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 4), (2, 2, 1), (2, 16, 16)])
def test_cpu_bf16_conv_weight_gradients_are_right_on_thin_inputs(transposed, shape):
    """torch 2.13's CPU bf16 weight gradient of a 3x3x3 conv on a 2-voxel-deep input was off by 100 % to 1e36 on an
    AMD EPYC (NaN fine-tuning of unet, flaky tests/finetune/test_study.py); the zoo's convs take fp32 there."""
    torch.manual_seed(0)
    kind = nn.ConvTranspose3d if transposed else nn.Conv3d
    conv = use_safe_bf16_convs(nn.Sequential(kind(16, 32, 3, padding=1)))[0]
    assert type(conv) is (SafeBf16ConvTranspose3d if transposed else SafeBf16Conv3d)
    ref = copy.deepcopy(conv).double()
    x, g = torch.randn(2, 16, *shape), torch.randn(2, 32, *shape)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    y.backward(g.to(y.dtype))
    ref(x.double()).backward(g.double())
    err = (conv.weight.grad.double() - ref.weight.grad).abs().max() / ref.weight.grad.abs().max()
    assert err < 0.02, float(err)


@pytest.mark.parametrize("name", ["unet", "swinunetr", "nnynet"])
def test_zoo_models_keep_no_plain_dense_conv(name):
    model = create_model(name, "tiny")
    plain = [n for n, m in model.named_modules() if type(m) in (nn.Conv3d, nn.ConvTranspose3d)
             and m.groups == 1 and max(m.kernel_size) > 1]
    assert not plain, plain


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


def test_resolve_model_kwargs_gives_explicit_arguments():
    tiny = resolve_model_kwargs("nnynet", "tiny", out_channels=3)
    assert tiny == {"in_channels": 1, "out_channels": 3, "fusion": "none", "clinical_features": 0,
                    "feature_size": 12, "window_size": 4}
    assert resolve_model_kwargs("nnynet")["feature_size"] == 48  # size=None is create_model's default, "base"
    assert resolve_model_kwargs("unet", "tiny")["channels"] == [8, 16, 32, 64, 128]  # JSON form, as stored
    with pytest.raises(ValueError, match="training-only"):
        resolve_model_kwargs("nnynet", "tiny", deep_supervision=True)
    with pytest.raises(ValueError, match="unsupported option"):
        resolve_model_kwargs("unet", "tiny", feature_size=8)
    with pytest.raises(ValueError, match="valid sizes"):
        resolve_model_kwargs("unet", "huge")
    with pytest.raises(ValueError, match="explicit arguments"):
        build_model("unet", {"size": "tiny"})
    torch.manual_seed(0)
    made = create_model("nnynet", "tiny", out_channels=3)
    torch.manual_seed(0)
    built = build_model("nnynet", tiny)
    assert all(torch.equal(a, b) for a, b in zip(made.state_dict().values(), built.state_dict().values()))
    assert training_switches("unet") == set() and training_switches("nnynet") == set(TRAINING_SWITCHES)


def test_preset_edits_never_change_a_written_config(monkeypatch):
    explicit = NnyNetConfig(model_kwargs=resolve_model_kwargs("nnynet", "tiny"), patch_size=(64, 64, 64))
    old = {"model": "nnynet", "model_kwargs": {"size": "tiny"}, "patch_size": [64, 64, 64]}  # format 0 (0.1)
    old_kwargs = NnyNetConfig.from_dict(old).model_kwargs
    monkeypatch.setitem(zoo.PRESETS["nnynet"], "tiny", {"feature_size": 24, "kernel_size": 5})
    assert NnyNet(explicit).net.encoder.embed_dim == 12  # the written config keeps its meaning
    assert NnyNetConfig.from_dict(old).model_kwargs == old_kwargs  # 0.1 configs: the frozen 0.1 presets
    assert resolve_model_kwargs("nnynet", "tiny")["feature_size"] == 24  # new configs see the edit


@pytest.mark.parametrize("name", list_models())
def test_every_model_round_trips_through_save_pretrained(name, tmp_path):
    """Trained with every training switch on, saved, reloaded strictly: the same outputs, bit for bit."""
    kwargs = resolve_model_kwargs(name, "tiny", fusion="cross_attention", clinical_features=F)
    probe = build_model(name, kwargs)
    x = _input(probe)
    config = NnyNetConfig(model=name, model_kwargs=kwargs, patch_size=tuple(x.shape[2:]))
    torch.manual_seed(0)
    model = NnyNet(config, deep_supervision=True, grad_checkpointing=True)
    with torch.no_grad():  # make the fusion matter: its residual gate starts small
        for p in model.net.fusion.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    assert not set(TRAINING_SWITCHES) & set(json.loads((tmp_path / "config.json").read_text())["model_kwargs"])
    loaded = NnyNet.from_pretrained(tmp_path, strict=True)
    assert loaded.config == model.config
    heads = tuple("net." + p for p in zoo.deep_supervision_prefixes(name))  # trained with, saved without
    if heads:
        assert any(k.startswith(heads) for k in model.state_dict())
        assert not any(k.startswith(heads) for k in loaded.state_dict())
    clinical = torch.randn(1, F)
    with torch.no_grad():
        assert torch.equal(loaded(x, clinical), model.eval()(x, clinical))
