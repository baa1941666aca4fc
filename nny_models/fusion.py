"""Clinical fusion at the bottleneck (the "Y" of nnY-Net), shared by every network of the zoo.

``ClinicalFusion(channels, clinical_features, mode)`` takes the deepest feature map (B, C, D, H, W)
and a clinical vector (B, F) and returns a feature map of the same shape. Modes (``FUSION_MODES``, validated
in ``check_fusion_args`` only; every zoo model builds its fusion through ``make_fusion``):

- "add": the clinical vector is projected to C channels and added to every voxel.
- "concat": the projection is broadcast, concatenated to the features, and a 1x1x1 conv maps 2C -> C.
- "cross_attention": **the nnY-Net paper's design** (the default of finetune/run.py). The projected clinical
  vector is the Query, the flattened deepest encoder map gives Keys/Values (scaled_dot_product_attention);
  the attended vector is broadcast back onto the map through a residual path scaled by a learnable
  per-channel gate (initialised at 0.1). Weak by construction: one query yields one vector per patient, a
  convex combination of the image's own values, added alike to every voxel.
- "cross_attention_film": the same Query/Key/Value attention, but the query token is updated residually
  (token + attended, so the clinical vector itself reaches the output) and gives a FiLM per-channel scale
  and shift, ``feat * (1 + gamma) + beta``. The FiLM layer starts at zero (exact identity) and gets gradient.
- "cross_attention_tokens": ``num_queries`` (default 4) clinical query tokens attend over the voxels as in
  the paper (residual update as above), then a second attention projects them back onto the voxels (each
  voxel queries the clinical tokens) and gives a per-voxel FiLM scale and shift, so the fused signal differs
  from voxel to voxel. Its output projection starts at zero (exact identity), gate 1.

Capacity test (``python -m nny_models.fusion_capacity``: two identical lesions, a clinical flag names the
target; image-only models cannot exceed about 0.67 Dice). Measured on UNet tiny (channels 8-64), 32^3, batch 4,
500 AdamW steps, seed 0 (Dice with the flag / Dice against the other lesion with the flag flipped):

- none 0.635 / 0.640, add 0.636 / 0.639, cross_attention (paper) 0.635 / 0.639, cross_attention_tokens
  0.636 / 0.639: these do NOT pass (they learn "mark both lesions"; the flag changes nothing).
- concat 0.945 / 0.962 and cross_attention_film 0.958 / 0.962 pass: the prediction follows the flag.
  cross_attention_film passed with seeds 0, 1, 2 at 500 steps (0.968, 0.967, 0.970, with float lesion centres)
  but only 1 of 3 seeds at 300 steps; the test suite checks it (>= 0.9, flipped >= 0.9) and none (<= 0.7).
- Other zoo models (500 steps, seed 0; none / cross_attention / _film / _tokens): mednext_s 0.663 / 0.995 /
  0.995 / 0.996 (all fusion modes pass, flipped 0.995); unetr 0.659 / 0.660 / 0.919 / 0.973 (film and tokens
  pass, flipped 0.955 / 0.978); pctnet 0.664 / 0.578 / 0.562 / 0.602 (nothing passes in 500 steps). Not run
  (CPU time): nnynet and swinunetr (need 64^3, ~10 s/step here), uxnet3d, mednext_b/m/l.
Why additive modes fail: a per-channel constant added to the bottleneck is largely removed by the next
normalisation (instance / per-channel group norm subtract each channel's spatial mean); a per-channel scale
(FiLM) or a learned channel mix (concat's 1x1 conv) is not.

Missing values: NaN / inf entries are missing. They are zeroed and a missingness mask is appended, so
the projection sees (values, mask) of size 2F; no NaN can reach the features. ``clinical=None`` (or a
row that is entirely missing) uses a learned "no clinical data" embedding instead.

Attention maps: set ``fusion.capture_attention = True`` and the attention modes store the weights of the
clinical query over the bottleneck in ``fusion.last_attention`` (B, heads, tokens, D, H, W), computed
explicitly (SDPA does not return them); see ``nny_models.attention``.

Also holds ``check_image``, the input validation every zoo model calls first.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.layers import trunc_normal_

FUSION_MODES = ("none", "add", "concat", "cross_attention", "cross_attention_film", "cross_attention_tokens")
ATTENTION_MODES = ("cross_attention", "cross_attention_film", "cross_attention_tokens")
DEFAULT_QUERIES = {"cross_attention": 1, "cross_attention_film": 1, "cross_attention_tokens": 4}


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
    """The one place fusion names are validated."""
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
        num_queries: int | None = None,
        gate_init: float | None = None,
    ) -> None:
        super().__init__()
        check_fusion_args(mode, clinical_features)
        self.mode = mode
        self.channels = channels
        self.clinical_features = clinical_features
        self.capture_attention = False  # set True to keep the attention weights in last_attention
        self.last_attention: torch.Tensor | None = None
        if mode == "none":
            return
        # Tokens the clinical vector is mapped to: num_queries for attention, one vector otherwise.
        if mode in ATTENTION_MODES:
            self.num_tokens = int(num_queries or DEFAULT_QUERIES[mode])
        else:
            self.num_tokens = 1
        if self.num_tokens < 1:
            raise ValueError(f"ClinicalFusion: num_queries must be >= 1, got {num_queries}")
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
        elif mode in ATTENTION_MODES:
            num_heads = num_heads or next(h for h in (8, 4, 2, 1) if channels % h == 0)
            if channels % num_heads:
                raise ValueError(f"ClinicalFusion: channels ({channels}) must be divisible by num_heads ({num_heads})")
            self.num_heads = num_heads
            self.norm_q = nn.LayerNorm(channels)
            self.norm_kv = nn.LayerNorm(channels)
            self.q = nn.Linear(channels, channels)
            self.kv = nn.Linear(channels, 2 * channels)
            self.out = nn.Linear(channels, channels)
            if mode == "cross_attention":
                # The paper's block: small but non-zero gate, near identity at the start, all parameters get gradient.
                gate = 0.1 if gate_init is None else gate_init
            else:
                # Last layers start at zero (exact identity) but get gradient; the gate then passes the signal whole.
                gate = 1.0 if gate_init is None else gate_init
            self.gate = nn.Parameter(torch.full((channels,), float(gate)))
            if mode == "cross_attention_film":
                self.film_norm = nn.LayerNorm(channels)
                self.film = nn.Linear(channels, 2 * channels)  # -> (gamma, beta)
            elif mode == "cross_attention_tokens":
                # Second attention: voxels (queries) over the updated clinical tokens (keys/values).
                self.norm_vox = nn.LayerNorm(channels)
                self.norm_tok = nn.LayerNorm(channels)
                self.q2 = nn.Linear(channels, channels)
                self.kv2 = nn.Linear(channels, 2 * channels)
                self.out2 = nn.Linear(channels, 2 * channels)  # -> per-voxel (gamma, beta)
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
        if self.mode in ATTENTION_MODES and self.mode != "cross_attention":
            # A clinical projection with unit-scale output: std 0.02 weights on both layers would shrink the
            # clinical signal ~1000x before the attention sees it.
            for m in self.clinical_proj:
                if isinstance(m, nn.Linear):
                    nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5))
            if self.mode == "cross_attention_tokens":
                for m in (self.q2, self.kv2):  # unit-scale values, so the zero-initialised out2 gets real gradient
                    nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5))
            last = self.film if self.mode == "cross_attention_film" else self.out2
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

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
        voxels = feat.flatten(2).transpose(1, 2)  # (B, N, C)
        attended = self._attend(self.q(self.norm_q(tokens)), self.kv(self.norm_kv(voxels)), feat.shape[2:])
        attended = self.out(attended)  # (B, T, C): what each clinical query read from the image
        if self.mode == "cross_attention":
            return feat + (self.gate * attended.mean(dim=1))[:, :, None, None, None]
        updated = tokens + attended  # residual query update: the clinical vector itself reaches the output
        if self.mode == "cross_attention_film":
            gamma, beta = self.film(self.film_norm(updated.mean(dim=1))).chunk(2, dim=-1)  # (B, C) each
            fused = feat * (1 + gamma[:, :, None, None, None]) + beta[:, :, None, None, None]
            return feat + self.gate[:, None, None, None] * (fused - feat)
        # cross_attention_tokens: every voxel reads the clinical tokens.
        per_voxel = self._attend(self.q2(self.norm_vox(voxels)), self.kv2(self.norm_tok(updated)), None)
        gamma, beta = ((self.gate * x).transpose(1, 2).reshape(feat.shape) for x in self.out2(per_voxel).chunk(2, -1))
        return feat * (1 + gamma) + beta

    def _attend(self, q: torch.Tensor, kv: torch.Tensor, grid: torch.Size | None) -> torch.Tensor:
        """Multi-head attention of q (B, Tq, C) over kv (B, Tk, 2C) -> (B, Tq, C).

        grid: the bottleneck's spatial shape when the keys are its voxels; with capture_attention on, the
        weights (B, heads, Tq, *grid) are then kept in last_attention."""
        b, tq, c = q.shape
        h = self.num_heads
        k, v = kv.chunk(2, dim=-1)

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(b, x.shape[1], h, c // h).transpose(1, 2)

        q, k, v = heads(q), heads(k), heads(v)
        if self.capture_attention and grid is not None:
            # SDPA does not return its weights: compute them explicitly (same maths: softmax(q k^T / sqrt(d))),
            # for the record only, so that a forward that captures them segments exactly like one that does not
            weights = (q @ k.transpose(-2, -1) / math.sqrt(c // h)).softmax(dim=-1)
            self.last_attention = weights.detach().reshape(b, h, tq, *grid)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, Tq, C/h)
        return out.transpose(1, 2).reshape(b, tq, c)


def make_fusion(channels: int, clinical_features: int, mode: str, **kwargs) -> ClinicalFusion | None:
    """The fusion module a model stores as ``model.fusion``: None when mode is "none"."""
    check_fusion_args(mode, clinical_features)
    if mode == "none":
        return None
    return ClinicalFusion(channels, clinical_features, mode, **kwargs)


def apply_fusion(fusion: ClinicalFusion | None, feat: torch.Tensor, clinical: torch.Tensor | None) -> torch.Tensor:
    """feat unchanged when the model has no fusion (a clinical vector is then ignored)."""
    return feat if fusion is None else fusion(feat, clinical)
