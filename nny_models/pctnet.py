"""PCT-Net: parallel convolution + transformer network, after MIS-FM (Wang et al., arXiv 2306.16925).

MIS-FM pairs Volume Fusion pretraining with a hybrid CNN-Transformer segmentation network whose
deep stages run a convolution branch (local detail) and a self-attention branch (long-range context)
in parallel on the same features and add them. This module follows that idea; it was written from the
paper's description, not from its code, and is simplified:

- Shallow levels (strides 1, 2, 4) are plain conv blocks (two 3^3 conv -> InstanceNorm -> LeakyReLU);
  only the deep levels (strides 8 and 16) use parallel blocks.
- Parallel block: x + conv_branch(x) + attn_branch(x), then x + MLP(x). The conv branch is a depthwise
  3^3 conv + pointwise conv; the attention branch is *global* multi-head self-attention over all voxels of
  the level (scaled_dot_product_attention) with no positional embedding: the conv branch and the
  zero-padded convolutions supply position. The paper's exact windowing, embeddings and block counts
  are not reproduced.
- Downsampling is a strided 2^3 conv; the decoder is a plain U-Net decoder (transposed conv x2, concat
  skip, conv block) with a 1x1x1 head; no deep supervision.

Clinical fusion acts on the stride-16 bottleneck. Encoder tensors live under ``encoder.``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.layers import DropPath, trunc_normal_

from nny_models.fusion import apply_fusion, check_image, make_fusion


def conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, padding=1, bias=False),
        nn.InstanceNorm3d(cout, affine=True),
        nn.LeakyReLU(0.01, inplace=True),
        nn.Conv3d(cout, cout, 3, padding=1, bias=False),
        nn.InstanceNorm3d(cout, affine=True),
        nn.LeakyReLU(0.01, inplace=True),
    )


class ParallelBlock(nn.Module):
    """Conv branch and global self-attention branch side by side, then a pointwise MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int = 4, drop_path: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.GroupNorm(1, dim)
        self.conv = nn.Sequential(nn.Conv3d(dim, dim, 3, padding=1, groups=dim), nn.Conv3d(dim, dim, 1))
        self.qkv = nn.Conv3d(dim, 3 * dim, 1)
        self.proj = nn.Conv3d(dim, dim, 1)
        self.norm2 = nn.GroupNorm(1, dim)
        self.mlp = nn.Sequential(nn.Conv3d(dim, mlp_ratio * dim, 1), nn.GELU(), nn.Conv3d(mlp_ratio * dim, dim, 1))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        q, k, v = self.qkv(x).flatten(2).view(b, 3, self.num_heads, c // self.num_heads, -1).transpose(-1, -2).unbind(1)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, C/heads)
        return self.proj(y.transpose(-1, -2).reshape(x.shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.drop_path(self.conv(h) + self.attention(h))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PCTEncoder(nn.Module):
    """Five levels (strides 1..16); returns every level's output."""

    def __init__(
        self, in_channels: int, dims: Sequence[int], deep_blocks: int, num_heads: int, drop_path: float
    ) -> None:
        super().__init__()
        self.levels = nn.ModuleList([conv_block(in_channels, dims[0])])
        for i in range(1, len(dims)):
            down = nn.Conv3d(dims[i - 1], dims[i], 2, stride=2)
            if i < 3:
                self.levels.append(nn.Sequential(down, conv_block(dims[i], dims[i])))
            else:
                blocks = [ParallelBlock(dims[i], num_heads, drop_path=drop_path) for _ in range(deep_blocks)]
                self.levels.append(nn.Sequential(down, *blocks))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for level in self.levels:
            x = level(x)
            outs.append(x)
        return outs


class PCTNet(nn.Module):
    """Simplified PCT-Net; ``forward(image, clinical=None)``."""

    size_divisor = 16
    encoder_prefixes = ("encoder.",)
    head_prefixes = ("head.",)

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 5,
        feature_size: int = 32,
        deep_blocks: int = 2,
        num_heads: int = 8,
        drop_path_rate: float = 0.0,
        use_checkpoint: bool = False,
        fusion: str = "none",
        clinical_features: int = 0,
    ) -> None:
        super().__init__()
        dims = [feature_size * 2**i for i in range(5)]
        if dims[3] % num_heads:
            raise ValueError(f"pctnet: feature_size * 8 ({dims[3]}) must be divisible by num_heads ({num_heads})")
        self.use_checkpoint = use_checkpoint
        self.encoder = PCTEncoder(in_channels, dims, deep_blocks, num_heads, drop_path_rate)
        self.fusion = make_fusion(dims[4], clinical_features, fusion)
        self.ups = nn.ModuleList(nn.ConvTranspose3d(dims[i], dims[i - 1], 2, stride=2) for i in range(4, 0, -1))
        self.decoder = nn.ModuleList(conv_block(2 * dims[i - 1], dims[i - 1]) for i in range(4, 0, -1))
        self.head = nn.Conv3d(dims[0], out_channels, 1)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, image: torch.Tensor, clinical: torch.Tensor | None = None) -> torch.Tensor:
        check_image(image, self.size_divisor, "pctnet")
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            feats = torch.utils.checkpoint.checkpoint(self.encoder, image, use_reentrant=False)
        else:
            feats = self.encoder(image)
        y = apply_fusion(self.fusion, feats[4], clinical)
        for up, dec, skip in zip(self.ups, self.decoder, feats[3::-1]):
            y = dec(torch.cat([up(y), skip], dim=1))
        return self.head(y)
