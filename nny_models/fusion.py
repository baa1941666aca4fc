"""Clinical fusion at the bottleneck (the "Y" of nnY-Net), shared by every network of the zoo.

``ClinicalFusion(channels, clinical_features, mode)`` takes the deepest feature map (B, C, D, H, W)
and a clinical vector (B, F) and returns a feature map of the same shape:

- "add": the clinical vector is projected to C channels and added to every voxel.
- "concat": the projection is broadcast, concatenated to the features, and a 1x1x1 conv maps 2C -> C.
- "cross_attention": the projected clinical vector gives query token(s), the flattened bottleneck voxels
  are keys/values (scaled_dot_product_attention); the attended vector is broadcast back onto the map
  through a residual path scaled by a learnable per-channel gate.

Missing values: NaN / inf entries are missing. They are zeroed and a missingness mask is appended, so
the projection sees (values, mask) of size 2F; no NaN can reach the features. ``clinical=None`` (or a
row that is entirely missing) uses a learned "no clinical data" embedding instead.

Also holds ``check_image``, the input validation every zoo model calls first.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.layers import trunc_normal_

FUSION_MODES = ("none", "add", "concat", "cross_attention")


def check_image(image: torch.Tensor, size_divisor: int, model_name: str) -> None:
    """Raise ValueError unless ``image`` is (B, C, D, H, W) with spatial sizes divisible by size_divisor."""
    if not isinstance(image, torch.Tensor) or image.ndim != 5:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"{model_name}: expected an image tensor of shape (B, C, D, H, W), got {shape}")
    bad = [s for s in image.shape[2:] if s % size_divisor]
    if bad:
        raise ValueError(
            f"{model_name}: spatial size {tuple(image.shape[2:])} must be divisible by {size_divisor} "
            f"in every dimension (pad or crop the input, e.g. with monai DivisiblePad)"
        )


def check_fusion_args(fusion: str, clinical_features: int) -> None:
    if fusion not in FUSION_MODES:
        raise ValueError(f"fusion must be one of {list(FUSION_MODES)}, got {fusion!r}")
    if fusion != "none" and int(clinical_features) < 1:
        raise ValueError(f"fusion={fusion!r} needs clinical_features >= 1, got {clinical_features}")


class ClinicalFusion(nn.Module):
    """Fuse a clinical vector (B, F) into a bottleneck feature map (B, C, D, H, W)."""

    def __init__(
        self,
        channels: int,
        clinical_features: int,
        mode: str = "cross_attention",
        num_heads: int | None = None,
        num_queries: int = 1,
        gate_init: float = 0.1,
    ) -> None:
        super().__init__()
        check_fusion_args(mode, clinical_features)
        self.mode = mode
        self.channels = channels
        self.clinical_features = clinical_features
        if mode == "none":
            return
        # Tokens the clinical vector is mapped to: num_queries for attention, one vector otherwise.
        self.num_tokens = num_queries if mode == "cross_attention" else 1
        hidden = max(channels, 2 * clinical_features)
        self.clinical_proj = nn.Sequential(
            nn.Linear(2 * clinical_features, hidden),  # input: (values with missing zeroed, missingness mask)
            nn.GELU(),
            nn.Linear(hidden, self.num_tokens * channels),
        )
        # Used for clinical=None and for rows in which every entry is missing.
        self.no_clinical = nn.Parameter(torch.zeros(self.num_tokens, channels))

        if mode == "concat":
            self.mix = nn.Conv3d(2 * channels, channels, kernel_size=1)
        elif mode == "cross_attention":
            num_heads = num_heads or next(h for h in (8, 4, 2, 1) if channels % h == 0)
            if channels % num_heads:
                raise ValueError(f"ClinicalFusion: channels ({channels}) must be divisible by num_heads ({num_heads})")
            self.num_heads = num_heads
            self.norm_q = nn.LayerNorm(channels)
            self.norm_kv = nn.LayerNorm(channels)
            self.q = nn.Linear(channels, channels)
            self.kv = nn.Linear(channels, 2 * channels)
            self.out = nn.Linear(channels, channels)
            # Small but non-zero gate: the block starts near identity, yet every parameter gets gradient.
            self.gate = nn.Parameter(torch.full((channels,), float(gate_init)))
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        trunc_normal_(self.no_clinical, std=0.02)
        if self.mode == "concat":
            # Start as "pass the image features through" plus a small clinical contribution, so that
            # pretrained encoder/decoder weights are not scrambled by a random 1x1 conv.
            with torch.no_grad():
                c = self.channels
                self.mix.weight.zero_()
                self.mix.weight[:, :c, 0, 0, 0] = torch.eye(c)
                trunc_normal_(self.mix.weight[:, c:], std=0.02)
                self.mix.bias.zero_()

    def embed_clinical(self, clinical: torch.Tensor | None, batch: int, ref: torch.Tensor) -> torch.Tensor:
        """(B, F) with NaN for missing, or None -> (B, num_tokens, C) clinical tokens."""
        null = self.no_clinical.to(ref.dtype).unsqueeze(0).expand(batch, -1, -1)
        if clinical is None:
            return null
        if clinical.ndim != 2 or clinical.shape != (batch, self.clinical_features):
            raise ValueError(
                f"clinical must have shape (batch={batch}, clinical_features={self.clinical_features}), "
                f"got {tuple(clinical.shape)}"
            )
        clinical = clinical.to(device=ref.device, dtype=ref.dtype)
        missing = ~torch.isfinite(clinical)
        values = torch.where(missing, torch.zeros_like(clinical), clinical)
        tokens = self.clinical_proj(torch.cat([values, missing.to(ref.dtype)], dim=1))
        tokens = tokens.view(batch, self.num_tokens, self.channels)
        all_missing = missing.all(dim=1)[:, None, None]
        return torch.where(all_missing, null, tokens)

    def forward(self, feat: torch.Tensor, clinical: torch.Tensor | None = None) -> torch.Tensor:
        if self.mode == "none":
            return feat
        b, c = feat.shape[:2]
        if c != self.channels:
            raise ValueError(f"ClinicalFusion: expected {self.channels} feature channels, got {c}")
        tokens = self.embed_clinical(clinical, b, feat)  # (B, T, C)
        if self.mode == "add":
            return feat + tokens[:, 0, :, None, None, None]
        if self.mode == "concat":
            broadcast = tokens[:, 0, :, None, None, None].expand_as(feat)
            return self.mix(torch.cat([feat, broadcast], dim=1))
        return feat + self._cross_attend(feat, tokens)

    def _cross_attend(self, feat: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        b, c = feat.shape[:2]
        h = self.num_heads
        voxels = self.norm_kv(feat.flatten(2).transpose(1, 2))  # (B, N, C): keys/values
        q = self.q(self.norm_q(tokens))  # (B, T, C): queries from the clinical vector
        k, v = self.kv(voxels).chunk(2, dim=-1)

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, x.shape[1], h, c // h).transpose(1, 2)

        attended = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))  # (B, h, T, C/h)
        attended = self.out(attended.transpose(1, 2).reshape(b, -1, c)).mean(dim=1)  # (B, C)
        return (self.gate * attended)[:, :, None, None, None]


def make_fusion(channels: int, clinical_features: int, mode: str, **kwargs) -> ClinicalFusion | None:
    """The fusion module a model stores as ``model.fusion``: None when mode is "none"."""
    check_fusion_args(mode, clinical_features)
    if mode == "none":
        return None
    return ClinicalFusion(channels, clinical_features, mode, **kwargs)


def apply_fusion(fusion: ClinicalFusion | None, feat: torch.Tensor, clinical: torch.Tensor | None) -> torch.Tensor:
    """feat unchanged when the model has no fusion (a clinical vector is then ignored)."""
    return feat if fusion is None else fusion(feat, clinical)
