"""Swin-NeXt: MONAI's 3D Swin Transformer encoder with a MedNeXt decoder (the nnY-Net backbone).

Encoder (``encoder.*``): ``monai.networks.nets.swin_unetr.SwinTransformer``, patch size 2, four stages;
it returns five layer-normed maps at strides 2, 4, 8, 16, 32 with feature_size * (1, 2, 4, 8, 16)
channels. The tensors are the same as SwinUNETR's ``swinViT.*`` so encoder weights move between them
by renaming the prefix.

Decoder: clinical fusion on the stride-32 map, a MedNeXt block as bottleneck, then per level a residual
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

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks.mednext_block import MedNeXtBlock, MedNeXtOutBlock, MedNeXtUpBlock
from monai.networks.nets.swin_unetr import SwinTransformer
from torch.utils.checkpoint import checkpoint

from nny_models.fusion import apply_fusion, check_image, make_fusion


class _DepthwiseConv3dFn(torch.autograd.Function):
    """Depthwise 3D conv (stride 1, 'same' padding) with a fast CPU backward.

    PyTorch's CPU weight gradient for grouped 3D convs is a slow fallback (about 25 s for 24 channels
    at 64^3 on 2 cores, 100x the forward). Here grad_input is a depthwise conv with the flipped kernel,
    and grad_weight is a single grouped conv that uses the output gradient as a (huge) kernel.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.conv3d(x, weight, bias, padding=weight.shape[-1] // 2, groups=x.shape[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        b, c = x.shape[:2]
        k = weight.shape[-1]
        p = k // 2
        grad = grad.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.conv3d(grad, weight.flip(2, 3, 4), padding=p, groups=c)
        if ctx.needs_input_grad[1]:
            # grad_w[c, o] = sum_{b, n} grad[b, c, n] * x_pad[b, c, n + o]: a correlation of x_pad with grad.
            x_pad = F.pad(x, (p,) * 6).transpose(0, 1).reshape(1, c * b, *(s + 2 * p for s in x.shape[2:]))
            grad_w = F.conv3d(x_pad, grad.transpose(0, 1), groups=c).view_as(weight)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3, 4))
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
        if x.device.type != "cpu" or output_size is not None:
            return super().forward(x, output_size)
        s = self.stride
        b, c, *size = x.shape
        z = x.new_zeros(b, c, *((n - 1) * st + 1 for n, st in zip(size, s)))
        z[:, :, :: s[0], :: s[1], :: s[2]] = x
        weight = self.weight.flip(2, 3, 4)
        if torch.is_grad_enabled():
            return _DepthwiseConv3dFn.apply(z, weight, self.bias)
        return F.conv3d(z, weight, self.bias, padding=self.padding, groups=c)


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
    """Swap depthwise 'same'-padded Conv3d / ConvTranspose3d layers for their fast CPU versions (in place)."""
    for parent in list(model.modules()):
        for name, m in list(parent.named_children()):
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


class SwinNeXt(nn.Module):
    """Swin Transformer encoder + MedNeXt decoder; ``forward(image, clinical=None)``."""

    size_divisor = 32  # patch size 2 and four patch mergings
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
    ) -> None:
        super().__init__()
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
