"""3D UX-Net (Lee et al., ICLR 2023), written from the paper; it is not part of MONAI.

Encoder (``encoder.*``): stem = 7^3 conv, stride 2 + LayerNorm; four stages of UX blocks with
downsampling (LayerNorm + 2^3 conv, stride 2) between them. A UX block is ConvNeXt-like:
depthwise 7^3 conv -> LayerNorm (channels) -> "depthwise convolution scaling" (DCS): two 1x1x1 convs
with groups=C (C -> 4C -> C, GELU between) instead of a dense MLP -> layer scale -> DropPath + residual.

Decoder: UNETR-like, as in the paper's code: MONAI ``UnetrBasicBlock`` on the input and on every
stage output (the deepest one is widened to ``hidden_size``), then ``UnetrUpBlock``s back to full
resolution, a final ``UnetrBasicBlock`` and a 1x1x1 ``UnetOutBlock`` (``head.*``). Clinical fusion acts
on the widened stride-16 bottleneck.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrUpBlock
from monai.networks.layers import DropPath, trunc_normal_

from nny_models.fusion import apply_fusion, check_image, make_fusion


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel dim of a (B, C, D, H, W) tensor."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.movedim(1, -1), x.shape[1:2], self.weight, self.bias, self.eps)
        return x.movedim(-1, 1)


class UXBlock(nn.Module):
    """Depthwise 7^3 conv + LayerNorm + DCS pointwise convs (groups=C) + layer scale + DropPath."""

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init: float = 1e-6) -> None:
        super().__init__()
        self.dwconv = nn.Conv3d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = ChannelLayerNorm(dim)
        self.pwconv1 = nn.Conv3d(dim, 4 * dim, kernel_size=1, groups=dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Conv3d(4 * dim, dim, kernel_size=1, groups=dim)
        self.gamma = nn.Parameter(torch.full((dim, 1, 1, 1), layer_scale_init))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pwconv2(self.act(self.pwconv1(self.norm(self.dwconv(x)))))
        return x + self.drop_path(self.gamma * y)


class UXNetEncoder(nn.Module):
    """Stem (stride 2) + four UX stages; returns the maps at strides 2, 4, 8, 16."""

    def __init__(self, in_channels: int, dims: Sequence[int], depths: Sequence[int], drop_path_rate: float) -> None:
        super().__init__()
        stem = nn.Sequential(nn.Conv3d(in_channels, dims[0], 7, stride=2, padding=3), ChannelLayerNorm(dims[0]))
        self.downsample = nn.ModuleList([stem])
        for i in range(len(dims) - 1):
            down = nn.Sequential(ChannelLayerNorm(dims[i]), nn.Conv3d(dims[i], dims[i + 1], 2, stride=2))
            self.downsample.append(down)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.stages = nn.ModuleList()
        for i, depth in enumerate(depths):
            start = sum(depths[:i])
            self.stages.append(nn.Sequential(*[UXBlock(dims[i], rates[start + j]) for j in range(depth)]))
        self.norms = nn.ModuleList(ChannelLayerNorm(d) for d in dims)  # per-stage output norms
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Conv3d):
            trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for down, stage, norm in zip(self.downsample, self.stages, self.norms):
            x = stage(down(x))
            outs.append(norm(x))
        return outs


class UXNet3D(nn.Module):
    """3D UX-Net; ``forward(image, clinical=None)``."""

    size_divisor = 16
    encoder_prefixes = ("encoder.",)
    head_prefixes = ("head.",)

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 5,
        feature_size: int = 48,
        depths: Sequence[int] = (2, 2, 2, 2),
        hidden_size: int = 768,
        drop_path_rate: float = 0.0,
        use_checkpoint: bool = False,
        fusion: str = "none",
        clinical_features: int = 0,
    ) -> None:
        super().__init__()
        dims = [feature_size * 2**i for i in range(4)]
        self.use_checkpoint = use_checkpoint
        self.encoder = UXNetEncoder(in_channels, dims, depths, drop_path_rate)
        kw = dict(spatial_dims=3, kernel_size=3, norm_name="instance", res_block=True)
        # enc[0] on the image (full res), enc[i] widens stage i-1 output (stride 2**i) to dims[i] / hidden.
        self.enc = nn.ModuleList(
            [UnetrBasicBlock(in_channels=in_channels, out_channels=dims[0], stride=1, **kw)]
            + [UnetrBasicBlock(in_channels=dims[i - 1], out_channels=dims[i], stride=1, **kw) for i in range(1, 4)]
            + [UnetrBasicBlock(in_channels=dims[3], out_channels=hidden_size, stride=1, **kw)]
        )
        self.fusion = make_fusion(hidden_size, clinical_features, fusion)
        up_in = [hidden_size] + dims[:0:-1]  # hidden, dims[3], dims[2], dims[1]
        up_out = dims[::-1]  # dims[3], dims[2], dims[1], dims[0]
        self.dec = nn.ModuleList(
            UnetrUpBlock(in_channels=i, out_channels=o, upsample_kernel_size=2, **kw) for i, o in zip(up_in, up_out)
        )
        self.dec_out = UnetrBasicBlock(in_channels=dims[0], out_channels=dims[0], stride=1, **kw)
        self.head = UnetOutBlock(spatial_dims=3, in_channels=dims[0], out_channels=out_channels)

    def forward(self, image: torch.Tensor, clinical: torch.Tensor | None = None) -> torch.Tensor:
        check_image(image, self.size_divisor, "uxnet3d")
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            outs = torch.utils.checkpoint.checkpoint(self.encoder, image, use_reentrant=False)
        else:
            outs = self.encoder(image)
        skips = [self.enc[0](image)] + [self.enc[i](outs[i - 1]) for i in range(1, 4)]
        y = apply_fusion(self.fusion, self.enc[4](outs[3]), clinical)
        for dec, skip in zip(self.dec, skips[::-1]):
            y = dec(y, skip)
        return self.head(self.dec_out(y))
