"""Swin-NeXt: MONAI's 3D Swin Transformer encoder with a MedNeXt decoder (the nnY-Net backbone).

Encoder (``encoder.*``): ``monai.networks.nets.swin_unetr.SwinTransformer``, patch size 2, four stages;
it returns five layer-normed maps at strides 2, 4, 8, 16, 32 with feature_size * (1, 2, 4, 8, 16)
channels. The tensors are the same as SwinUNETR's ``swinViT.*`` so encoder weights move between them
by renaming the prefix.

Decoder: clinical fusion on the stride-32 map, before or after (fusion_position) a MedNeXt block as
bottleneck, then per level a residual
``MedNeXtUpBlock`` (transposed depthwise conv, x2) whose output is *added* to the encoder skip of that
level, followed by ``decoder_blocks`` MedNeXt blocks (depthwise k^3 -> GroupNorm -> 1x1x1 expand -> GELU
-> 1x1x1 compress). The last up block goes to full resolution with feature_size // 2 channels and adds a
cheap stem skip (one 3^3 conv of the input). Why this is cheap: SwinUNETR runs dense 3^3 convolutions
with feature_size channels at full and half resolution (its encoder1/decoder1/decoder2), which dominate
its cost at 96^3; here full resolution only sees depthwise and pointwise convs on feature_size // 2
channels.

Deep supervision (``ds_heads.*``): 1x1x1 heads at strides 2, 4, 8, 16; in training mode the forward
returns [full_res, /2, /4, /8, /16] logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks.mednext_block import MedNeXtBlock, MedNeXtOutBlock, MedNeXtUpBlock
from monai.networks.nets.swin_unetr import BasicLayer, SwinTransformer, WindowAttention, compute_mask, get_window_size
from torch.utils.checkpoint import checkpoint

from nny_models.fusion import apply_fusion, check_image, make_fusion


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The lower-precision dtype autocast would run a conv in on ``device_type``, or None when it is off."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


class _DepthwiseConv3dFn(torch.autograd.Function):
    """Depthwise 3D conv (stride 1, 'same' padding) with a fast CPU backward.

    PyTorch's CPU weight gradient for grouped 3D convs is a slow fallback (about 25 s for 24 channels
    at 64^3 on 2 cores, 100x the forward). Here grad_input is a depthwise conv with the flipped kernel,
    and grad_weight is a single grouped conv that uses the output gradient as a (huge) kernel.

    Dtypes follow autocast as a native conv would: under autocast (e.g. bf16 on CPU) input, weight and bias
    are cast to the autocast dtype and the forward and grad_input convs run in it (grad_weight in fp32, see
    backward); each gradient is returned
    in the dtype of the tensor it belongs to (fp32 master weights get fp32 gradients). Backward runs outside
    autocast, so it must cast by itself.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        dtype = _autocast_dtype(x.device.type) or x.dtype
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        with torch.autocast(x.device.type, enabled=False):
            return F.conv3d(x, weight, bias, padding=weight.shape[-1] // 2, groups=x.shape[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors  # both in the compute dtype of the forward
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        b, c = x.shape[:2]
        k = weight.shape[-1]
        p = k // 2
        grad = grad.to(x.dtype).contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.conv3d(grad, weight.flip(2, 3, 4), padding=p, groups=c).to(x_dtype)
        if ctx.needs_input_grad[1]:
            # grad_w[c, o] = sum_{b, n} grad[b, c, n] * x_pad[b, c, n + o]: a correlation of x_pad with grad.
            # In fp32 even under bf16 autocast: oneDNN's bf16 conv with this huge kernel is 10x slower than fp32
            # (0.97 s vs 0.10 s for 2 x 12 x 64x64x32, one thread), and fp32 accumulation is more accurate.
            wide = torch.promote_types(x.dtype, torch.float32)  # bf16/fp16 -> fp32; fp32 and fp64 stay as they are
            xf, gf = x.to(wide), grad.to(wide)
            x_pad = F.pad(xf, (p,) * 6).transpose(0, 1).reshape(1, c * b, *(s + 2 * p for s in x.shape[2:]))
            grad_w = F.conv3d(x_pad, gf.transpose(0, 1), groups=c).view_as(weight).to(w_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3, 4), dtype=torch.promote_types(grad.dtype, torch.float32)).to(b_dtype)  # >= fp32
        return grad_x, grad_w, grad_b


class FastDepthwiseConv3d(nn.Conv3d):
    """nn.Conv3d (same parameters and state dict) that uses _DepthwiseConv3dFn when training on CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and torch.is_grad_enabled():
            return _DepthwiseConv3dFn.apply(x, self.weight, self.bias)
        return super().forward(x)


class FastDepthwiseConvTranspose3d(nn.ConvTranspose3d):
    """Depthwise nn.ConvTranspose3d (padding k // 2) computed on CPU as zero insertion + depthwise conv.

    PyTorch's CPU transposed grouped conv loops over groups: 6 s for 768 channels at 2^3 (MedNeXt's
    bottleneck up block). A transposed conv with stride s equals a conv of the input with s - 1 zeros
    inserted between voxels, using the flipped kernel and the same padding; same parameters and state dict.
    """

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if x.device.type != "cpu" or output_size is not None or torch.onnx.is_in_onnx_export():
            return super().forward(x, output_size)  # ONNX has a native ConvTranspose: export that
        s = self.stride
        b, c, *size = x.shape
        z = x.new_zeros(b, c, *((n - 1) * st + 1 for n, st in zip(size, s)))
        z[:, :, :: s[0], :: s[1], :: s[2]] = x
        weight = self.weight.flip(2, 3, 4)
        if torch.is_grad_enabled():
            return _DepthwiseConv3dFn.apply(z, weight, self.bias)
        return F.conv3d(z, weight, self.bias, padding=self.padding, groups=c)


class _PointwiseConv3dFn(torch.autograd.Function):
    """1x1x1 conv of an NCDHW-contiguous CPU input as a batched matrix product over the channels (see
    pointwise_conv3d). Dtypes follow autocast as a native conv would, like _DepthwiseConv3dFn. The weight gradient,
    a product over all D*H*W voxels, runs in fp32: oneDNN's bf16 matmul with an inner size of exactly 2^18 (a
    64^3 patch) died of SIGFPE on one thread (torch 2.13, this Xeon), and fp32 accumulates such sums better."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.x_shape = x.shape
        dtype = _autocast_dtype("cpu") or x.dtype
        x = x.to(dtype).flatten(2)  # (B, in, N), a view of the contiguous input
        w = weight.reshape(weight.shape[0], weight.shape[1]).to(dtype)
        ctx.save_for_backward(x, w)
        ctx.has_bias = bias is not None
        with torch.autocast("cpu", enabled=False):
            wb = w.expand(x.shape[0], -1, -1)
            # baddbmm adds the bias before the one rounding to the compute dtype, as oneDNN's conv does
            return torch.bmm(wb, x) if bias is None else torch.baddbmm(bias.to(dtype).view(1, -1, 1), wb, x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        grad = grad.to(x.dtype).reshape(x.shape[0], -1, x.shape[2])  # (B, out, N)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.matmul(w.t(), grad).to(x_dtype).view(ctx.x_shape)  # (in, out) @ (B, out, N)
        if ctx.needs_input_grad[1]:
            wide = torch.promote_types(x.dtype, torch.float32)
            grad_w = torch.matmul(grad.to(wide), x.to(wide).transpose(1, 2)).sum(0).to(w_dtype)
            grad_w = grad_w.view(*grad_w.shape, 1, 1, 1)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2), dtype=torch.promote_types(grad.dtype, torch.float32)).to(b_dtype)
        return grad_x, grad_w, grad_b


def pointwise_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.conv3d(x, weight, bias)`` for a 1x1x1 ``weight`` (out, in, 1, 1, 1). On CPU, an NCDHW input (training's
    layout) goes through _PointwiseConv3dFn, a batched (B, out, in) @ (B, in, N) product: oneDNN's conv converts
    the input, output and gradients of each such layer between NCDHW and its blocked format, copies that dominated
    MedNeXt's wide 1x1x1 layers at full resolution (torch.profiler over the pipeline's training step:
    ``aten::copy_`` 23 % of it). A channels-last input (CPU inference) keeps oneDNN's conv, which needs no reorder
    there and was faster (5.4 vs 5.7 s of network time for a held-out phantom, a one-off probe). The same sum over
    channels in the same dtypes: bit-equal to the conv under bf16 autocast here (tests/nny_models/test_zoo.py)."""
    if x.device.type != "cpu" or x.dim() != 5 or not x.is_contiguous() or torch.onnx.is_in_onnx_export():
        return F.conv3d(x, weight, bias)  # cuDNN has no such reorders; ONNX has a native Conv
    y = _PointwiseConv3dFn.apply(x, weight, bias)
    return y.view(x.shape[0], weight.shape[0], *x.shape[2:])


class PointwiseConv3d(nn.Conv3d):
    """A 1x1x1 nn.Conv3d (stride 1, no padding; same parameters and state dict) computed by pointwise_conv3d:
    MedNeXt's expand / compress layers. The fine-tuning step of the pipeline's network (feature_size 24) takes
    less time with it (bench/train_step.py, row train_step_s_without_pointwise_matmul)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pointwise_conv3d(x, self.weight, self.bias)


class PointwiseConvTranspose3d(nn.ConvTranspose3d):
    """A 1x1x1 nn.ConvTranspose3d (MedNeXt's output heads, stride 1, and its up blocks' residual path, stride 2;
    same parameters and state dict) computed as the equal nn.Conv3d with the in/out axes of the weight swapped,
    its output placed on every stride-th voxel of a grid that holds the bias elsewhere. PyTorch's transposed conv
    takes a slow path for these on CPU: the tiny nnynet training step takes 0.149 s with this and 0.195 s without
    (bench/train_step.py, row train_step_s_without_pointwise_transposed)."""

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if output_size is not None or torch.onnx.is_in_onnx_export():
            return super().forward(x, output_size)  # ONNX has a native ConvTranspose: export that
        if self.stride == (1, 1, 1):
            return pointwise_conv3d(x, self.weight.transpose(0, 1), self.bias)
        y = pointwise_conv3d(x, self.weight.transpose(0, 1), None)
        s = self.stride
        out = y.new_zeros(*y.shape[:2], *((n - 1) * k + 1 for n, k in zip(y.shape[2:], s)))
        out[:, :, :: s[0], :: s[1], :: s[2]] = y
        return out if self.bias is None else out + self.bias.to(out.dtype).view(1, -1, 1, 1, 1)


def _bf16_weight_grad_unsafe(conv: nn.Module, x: torch.Tensor) -> bool:
    """True where PyTorch's CPU bf16 weight gradient of a dense 3D conv is wrong: a kernel wider than 1 on an input
    with a side of at most 2 voxels, under bf16 autocast while gradients are kept. On an AMD EPYC (AVX512-BF16, no
    AMX) with torch 2.13 a 3x3x3 conv, stride 1, on a (2, ...) input returned weight gradients off by 100 % to
    1e36 (NaN training) and different in every process; input gradients and the forward were right, and so was
    every shape with all sides >= 3 that was tried (tests/nny_models/test_zoo.py checks it on the machine at hand)."""
    return (x.device.type == "cpu" and torch.is_grad_enabled() and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16 and max(conv.kernel_size) > 1
            and min(x.shape[2:]) <= 2)


class SafeBf16Conv3d(nn.Conv3d):
    """nn.Conv3d (same parameters and state dict) that runs in fp32 where _bf16_weight_grad_unsafe: such inputs
    are a few voxels, so it costs nothing measurable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _bf16_weight_grad_unsafe(self, x):
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
        return super().forward(x)


class SafeBf16ConvTranspose3d(nn.ConvTranspose3d):
    """nn.ConvTranspose3d counterpart of SafeBf16Conv3d (its weight gradient has the same fault)."""

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if _bf16_weight_grad_unsafe(self, x):
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float(), output_size)
        return super().forward(x, output_size)


def use_safe_bf16_convs(model: nn.Module) -> nn.Module:
    """Give every plain dense nn.Conv3d / nn.ConvTranspose3d with a kernel wider than 1 the fp32 fallback of
    SafeBf16Conv3d where CPU bf16 training would get a wrong weight gradient (in place; same parameters)."""
    for m in model.modules():
        if type(m) in (nn.Conv3d, nn.ConvTranspose3d) and m.groups == 1 and max(m.kernel_size) > 1:
            m.__class__ = SafeBf16Conv3d if type(m) is nn.Conv3d else SafeBf16ConvTranspose3d
    return model


def _is_pointwise_transposed(m: nn.Module) -> bool:
    return (m.kernel_size == (1, 1, 1) and m.padding == (0, 0, 0) and m.groups == 1 and m.dilation == (1, 1, 1)
            and m.output_padding == (0, 0, 0) and m.padding_mode == "zeros")


def _is_pointwise(m: nn.Module) -> bool:
    return _is_pointwise_transposed(m) and m.stride == (1, 1, 1)


def _is_depthwise(m: nn.Module, transposed: bool) -> bool:
    k = m.kernel_size[0]
    return (
        k % 2 == 1
        and m.groups == m.in_channels == m.out_channels
        and m.kernel_size == (k, k, k)
        and m.dilation == (1, 1, 1)
        and m.padding == (k // 2,) * 3
        and m.padding_mode == "zeros"
        and (m.output_padding == (0, 0, 0) if transposed else m.stride == (1, 1, 1))
    )


def use_fast_depthwise(model: nn.Module) -> nn.Module:
    """Swap depthwise 'same'-padded Conv3d / ConvTranspose3d layers for their fast CPU versions, and 1x1x1
    Conv3d / ConvTranspose3d layers for PointwiseConv3d / PointwiseConvTranspose3d (in place; the parameters
    stay the same tensors)."""
    for parent in list(model.modules()):
        for name, m in list(parent.named_children()):
            if type(m) is nn.ConvTranspose3d and _is_pointwise_transposed(m):
                m.__class__ = PointwiseConvTranspose3d  # no new parameters or buffers: only forward changes
                continue
            if type(m) is nn.Conv3d and _is_pointwise(m):
                m.__class__ = PointwiseConv3d
                continue
            if type(m) is nn.ConvTranspose3d and _is_depthwise(m, transposed=True):
                fast = FastDepthwiseConvTranspose3d(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride,
                                                    padding=m.padding, groups=m.groups, bias=m.bias is not None,
                                                    device=m.weight.device, dtype=m.weight.dtype)  # fmt: skip
                fast.weight, fast.bias = m.weight, m.bias
                setattr(parent, name, fast)
            if type(m) is nn.Conv3d and _is_depthwise(m, transposed=False):
                k = m.kernel_size[0]
                fast = FastDepthwiseConv3d(m.in_channels, m.out_channels, k, padding=k // 2, groups=m.groups,
                                           bias=m.bias is not None, device=m.weight.device,
                                           dtype=m.weight.dtype)  # fmt: skip
                fast.weight, fast.bias = m.weight, m.bias
                setattr(parent, name, fast)
    return model


class FastWindowAttention(WindowAttention):
    """MONAI's WindowAttention (same parameters and state dict) with a fused attention kernel for inference.

    Without gradients it calls ``F.scaled_dot_product_attention`` (a flash kernel on CPU and CUDA) instead of
    materialising the (windows x heads x N x N) score matrix twice: 3x less CPU time for the encoder of a
    feature_size-12 net at 64^3 (window 7). The relative position bias and the shifted-window mask are combined
    once per call into (windows x heads) bias planes that broadcast over the batch of windows, unlike MONAI's own
    ``use_flash_attention``, which expands them to every window of the batch. Training keeps MONAI's path (its
    math is the same; SDPA's CPU backward with a learnable bias is no faster).
    """

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if torch.is_grad_enabled() or (self.training and self.attn_drop.p > 0):
            return super().forward(x, mask)
        b, n, c = x.shape
        h, d = self.num_heads, c // self.num_heads
        q, k, v = self.qkv(x).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)  # each (b, h, n, d)
        index = self.relative_position_index[:n, :n].reshape(-1)
        bias = self.relative_position_bias_table[index].reshape(n, n, h).permute(2, 0, 1)  # (h, n, n)
        if mask is None:
            bias = bias.unsqueeze(0)
        else:  # windows are ordered (batch, window): fold the window index into the head axis
            nw = mask.shape[0]
            bias = (bias.unsqueeze(0) + mask.to(bias.dtype).unsqueeze(1)).reshape(1, nw * h, n, n)
            q, k, v = (t.reshape(b // nw, nw * h, n, d) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=self.scale)
        return self.proj(y.reshape(b, h, n, d).transpose(1, 2).reshape(b, n, c))


def use_fast_window_attention(model: nn.Module) -> nn.Module:
    """Give every MONAI WindowAttention in ``model`` the fused inference path of FastWindowAttention (in place)."""
    for m in model.modules():
        if type(m) is WindowAttention:
            m.__class__ = FastWindowAttention  # no new parameters or buffers: only forward changes
    return model


@lru_cache(maxsize=64)
def _shifted_window_mask(dims: tuple[int, int, int], window: tuple[int, ...], shift: tuple[int, ...],
                         device: str) -> torch.Tensor:
    """MONAI's compute_mask, once per (padded shape, window, shift, device): it is a constant of the shape.
    Built as a normal tensor even when first asked for under inference_mode (predict), so that training may
    use it afterwards."""
    with torch.inference_mode(False):
        return compute_mask(list(dims), window, shift, torch.device(device))


class CachedMaskBasicLayer(BasicLayer):
    """MONAI's 3D BasicLayer (same parameters and state dict) that reuses the shifted-window attention mask.

    MONAI rebuilds the mask on every forward with 27 Python-level slice assignments per stage: 5% of a tiny
    nnynet training step at 64 x 64 x 32 on CPU (0.217 vs 0.228 s, bench/train_step.py). The mask depends only on the padded shape, so it
    is cached; the attention blocks only read it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or getattr(self, "use_hyena", False):  # MONAI < 1.6 has no Hyena stages
            return super().forward(x)
        b, _, d, h, w = x.shape
        window, shift = get_window_size((d, h, w), self.window_size, self.shift_size)
        padded = tuple(int(np.ceil(s / k)) * k for s, k in zip((d, h, w), window))
        mask = _shifted_window_mask(padded, tuple(window), tuple(shift), str(x.device))
        x = x.permute(0, 2, 3, 4, 1)  # b c d h w -> b d h w c
        for blk in self.blocks:
            x = blk(x, mask)
        x = x.reshape(b, d, h, w, -1)
        if self.downsample is not None:
            x = self.downsample(x)
        return x.permute(0, 4, 1, 2, 3)  # b d h w c -> b c d h w


def use_cached_window_masks(model: nn.Module) -> nn.Module:
    """Give every MONAI 3D BasicLayer in ``model`` the cached shifted-window mask of CachedMaskBasicLayer."""
    for m in model.modules():
        if type(m) is BasicLayer:
            m.__class__ = CachedMaskBasicLayer  # no new parameters or buffers: only forward changes
    return model


FUSION_POSITIONS = ("before_bottleneck", "after_bottleneck")  # where SwinNeXt applies the clinical fusion


class SwinNeXt(nn.Module):
    """Swin Transformer encoder + MedNeXt decoder; ``forward(image, clinical=None)``."""

    size_divisor = 32  # patch size 2 and four patch mergings
    needs_bottleneck_context = True  # training on a 1-voxel bottleneck leaves its GroupNorm one value per channel
    encoder_prefixes = ("encoder.",)
    head_prefixes = ("head.", "ds_heads.")

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 5,
        feature_size: int = 48,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        use_v2: bool = False,
        use_checkpoint: bool = False,
        kernel_size: int = 3,
        expansion_ratio: int = 2,
        decoder_blocks: int = 1,
        global_resp_norm: bool = False,
        deep_supervision: bool = False,
        drop_path_rate: float = 0.0,
        fusion: str = "none",
        clinical_features: int = 0,
        fusion_position: str = "before_bottleneck",
    ) -> None:
        super().__init__()
        if fusion_position not in FUSION_POSITIONS:
            raise ValueError(f"SwinNeXt: fusion_position must be one of {FUSION_POSITIONS}, got {fusion_position!r}")
        # "before_bottleneck" (what every model fine-tuned before 2026-12-01 does, hence the default) feeds the fused
        # map into the bottleneck's per-channel GroupNorm, which divides a FiLM scale and removes a shift: the
        # capacity test fails (nny_models.fusion_capacity). "after_bottleneck" fuses the bottleneck's output,
        # which reaches the decoder unnormalised; fine-tuning chooses it for new models.
        self.fusion_position = fusion_position
        if len(depths) != 4 or len(num_heads) != 4:
            raise ValueError(f"SwinNeXt: depths and num_heads need 4 stages, got {depths} and {num_heads}")
        if kernel_size not in (3, 5, 7):
            raise ValueError(f"SwinNeXt: kernel_size must be 3, 5 or 7, got {kernel_size}")
        self.deep_supervision = deep_supervision
        self.use_checkpoint = use_checkpoint
        chans = [feature_size * 2**i for i in range(5)]  # strides 2, 4, 8, 16, 32
        stem_ch = feature_size // 2

        self.encoder = SwinTransformer(
            in_chans=in_channels,
            embed_dim=feature_size,
            window_size=(window_size,) * 3,
            patch_size=(2, 2, 2),
            depths=depths,
            num_heads=num_heads,
            drop_path_rate=drop_path_rate,
            use_checkpoint=use_checkpoint,
            spatial_dims=3,
            downsample="merging",  # same as SwinUNETR, so its swinViT weights load
            use_v2=use_v2,
        )
        self.stem = nn.Sequential(
            nn.Conv3d(in_channels, stem_ch, kernel_size=3, padding=1),
            nn.GroupNorm(stem_ch, stem_ch),
        )
        self.fusion = make_fusion(chans[4], clinical_features, fusion)

        def block(ch: int) -> MedNeXtBlock:
            return MedNeXtBlock(ch, ch, expansion_ratio, kernel_size, True, "group", "3d", global_resp_norm)

        self.bottleneck = block(chans[4])
        # Level order: stride 16, 8, 4, 2, then full resolution (stem skip).
        dec_in = chans[4:0:-1] + [chans[0]]
        dec_out = chans[3::-1] + [stem_ch]
        self.ups = nn.ModuleList(
            MedNeXtUpBlock(i, o, expansion_ratio, kernel_size, True, "group", "3d", global_resp_norm)
            for i, o in zip(dec_in, dec_out)
        )
        self.decoder = nn.ModuleList(nn.Sequential(*[block(o) for _ in range(decoder_blocks)]) for o in dec_out)
        self.head = MedNeXtOutBlock(stem_ch, out_channels, dim="3d")
        if deep_supervision:  # ds_heads[i] sits at stride 2 ** (i + 1)
            self.ds_heads = nn.ModuleList(MedNeXtOutBlock(c, out_channels, dim="3d") for c in chans[:4])
        use_fast_depthwise(self)
        use_fast_window_attention(self.encoder)
        use_cached_window_masks(self.encoder)

    def _run(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(module, x, use_reentrant=False)
        return module(x)

    def forward_features(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Encoder maps at strides 2, 4, 8, 16, 32 (layer-normed, as SwinUNETR uses them)."""
        return self.encoder(image, normalize=True)

    def forward(self, image: torch.Tensor, clinical: torch.Tensor | None = None) -> torch.Tensor | list[torch.Tensor]:
        check_image(image, self.size_divisor, "nnynet")
        if self.training and all(s == self.size_divisor for s in image.shape[2:]):
            # the 1-voxel bottleneck leaves GroupNorm one value per channel: nothing to normalise
            raise ValueError(
                f"nnynet: training needs a bottleneck of more than one voxel, i.e. at least "
                f"{2 * self.size_divisor} voxels along one axis; got {tuple(image.shape[2:])}"
            )
        hidden = self.forward_features(image)
        skips = [hidden[3], hidden[2], hidden[1], hidden[0], self.stem(image)]
        if self.fusion_position == "after_bottleneck":
            y = apply_fusion(self.fusion, self._run(self.bottleneck, hidden[4]), clinical)
        else:
            y = self._run(self.bottleneck, apply_fusion(self.fusion, hidden[4], clinical))
        ds = []
        for level, (up, dec, skip) in enumerate(zip(self.ups, self.decoder, skips)):
            y = self._run(dec, up(y) + skip)
            if self.deep_supervision and self.training and level < 4:
                ds.append(self.ds_heads[3 - level](y))
        logits = self.head(y)
        if self.deep_supervision and self.training:
            return [logits] + ds[::-1]
        return logits
