"""The model zoo: ``create_model(name, size="base", **overrides)`` and ``list_models()``.

Presets are resolved once, when a config is written: ``resolve_model_kwargs(name, size, **overrides)`` gives
the explicit arguments config.json stores, and ``build_model(name, model_kwargs, **switches)`` builds from
them without looking at PRESETS again. Training-only switches (``TRAINING_SWITCHES``: deep supervision,
gradient checkpointing) are constructor arguments and never part of model_kwargs.

MONAI's SwinUNETR, UNETR, UNet and MedNeXt are subclassed (their state-dict keys stay MONAI's, so MONAI
checkpoints still load) with a forward that calls their submodules in order and applies the clinical
fusion module on the bottleneck. Every model takes ``forward(image, clinical=None)`` and carries
``size_divisor``, ``encoder_prefixes``, ``head_prefixes`` and ``fusion`` (ClinicalFusion or None).
Networks with depthwise convs (nnynet, mednext_*, uxnet3d, pctnet) get the fast CPU depthwise layers of
``nny_models.swin_next.use_fast_depthwise`` (same parameters and state dict).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
import torch.nn as nn
from monai.networks.nets import UNETR, MedNeXt, SwinUNETR, UNet
from torch.utils.checkpoint import checkpoint

from nny_models.config import _plain
from nny_models.fusion import apply_fusion, check_fusion_args, check_image, make_fusion
from nny_models.pctnet import PCTNet
from nny_models.swin_next import FUSION_POSITIONS, SwinNeXt, use_fast_depthwise, use_safe_bf16_convs
from nny_models.uxnet import UXNet3D

SIZES = ("tiny", "small", "base")


class FusedSwinUNETR(SwinUNETR):
    """MONAI SwinUNETR with clinical fusion at the stride-32 map: on the encoder's output, before MONAI's
    bottleneck block (``encoder10``; the default, so files written before the option predict as they did), or on
    that block's output (``fusion_position="after_bottleneck"``, what fine-tuning builds). Before the block, a FiLM
    modulation meets InstanceNorm, which removes any per-channel scale > 0 and shift: the capacity test fails there."""

    size_divisor = 32
    encoder_prefixes = ("swinViT.",)
    head_prefixes = ("out.",)

    def __init__(self, fusion: str = "none", clinical_features: int = 0, fusion_position: str = "before_bottleneck",
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if fusion_position not in FUSION_POSITIONS:
            raise ValueError(f"swinunetr: fusion_position must be one of {FUSION_POSITIONS}, got {fusion_position!r}")
        self.fusion_position = fusion_position
        self.fusion = make_fusion(16 * kwargs["feature_size"], clinical_features, fusion)

    def forward(self, image: torch.Tensor, clinical: torch.Tensor | None = None) -> torch.Tensor:
        check_image(image, self.size_divisor, "swinunetr")
        hidden = self.swinViT(image, self.normalize)
        enc0 = self.encoder1(image)
        enc1 = self.encoder2(hidden[0])
        enc2 = self.encoder3(hidden[1])
        enc3 = self.encoder4(hidden[2])
        if self.fusion_position == "after_bottleneck":
            dec4 = apply_fusion(self.fusion, self.encoder10(hidden[4]), clinical)
        else:
            dec4 = self.encoder10(apply_fusion(self.fusion, hidden[4], clinical))
        dec3 = self.decoder5(dec4, hidden[3])
        dec2 = self.decoder4(dec3, enc3)
        dec1 = self.decoder3(dec2, enc2)
        dec0 = self.decoder2(dec1, enc1)
        return self.out(self.decoder1(dec0, enc0))


class FusedUNETR(UNETR):
    """MONAI UNETR with clinical fusion on the last ViT layer (reshaped to a map). Fixed input size."""

    size_divisor = 16
    encoder_prefixes = ("vit.",)
    head_prefixes = ("out.",)

    def __init__(self, fusion: str = "none", clinical_features: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        img = kwargs["img_size"]
        self.img_size = tuple(img) if isinstance(img, (tuple, list)) else (img,) * 3
        self.fusion = make_fusion(self.hidden_size, clinical_features, fusion)

    def forward(self, image: torch.Tensor, clinical: torch.Tensor | None = None) -> torch.Tensor:
        check_image(image, self.size_divisor, "unetr")
        if tuple(image.shape[2:]) != self.img_size:
            raise ValueError(
                f"unetr: input spatial size must equal img_size {self.img_size} (learned position embeddings), "
                f"got {tuple(image.shape[2:])}; pass img_size=... to create_model"
            )
        x, hidden = self.vit(image)
        enc1 = self.encoder1(image)
        enc2 = self.encoder2(self.proj_feat(hidden[3]))
        enc3 = self.encoder3(self.proj_feat(hidden[6]))
        enc4 = self.encoder4(self.proj_feat(hidden[9]))
        dec4 = apply_fusion(self.fusion, self.proj_feat(x), clinical)
        dec3 = self.decoder5(dec4, enc4)
        dec2 = self.decoder4(dec3, enc3)
        dec1 = self.decoder3(dec2, enc2)
        return self.out(self.decoder2(dec1, enc1))


class FusedUNet(UNet):
    """MONAI UNet; the fusion runs in a forward hook on the bottom (bottleneck) layer."""

    head_prefixes = ("model.2.",)  # the top up-path block, which outputs out_channels

    def __init__(self, fusion: str = "none", clinical_features: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.size_divisor = int(torch.tensor(self.strides).prod())
        self.fusion = make_fusion(self.channels[-1], clinical_features, fusion)
        # Walk the nested Sequential(down, SkipConnection(sub), up) down to the bottom layer.
        prefixes, prefix, block = [], "model.", self.model
        while isinstance(block, nn.Sequential):
            prefixes.append(prefix + "0.")
            prefix, block = prefix + "1.submodule.", block[1].submodule
        self.encoder_prefixes = tuple(prefixes)
        self._clinical: torch.Tensor | None = None
        block.register_forward_hook(self._fuse_bottleneck)  # a bound method, so deepcopy (EMA) rebinds it

    def _fuse_bottleneck(self, module: nn.Module, inputs: Any, out: torch.Tensor) -> torch.Tensor:
        return apply_fusion(self.fusion, out, self._clinical)

    def forward(self, image: torch.Tensor, clinical: torch.Tensor | None = None) -> torch.Tensor:
        check_image(image, self.size_divisor, "unet")
        self._clinical = clinical
        try:
            return self.model(image)
        finally:
            self._clinical = None


class FusedMedNeXt(MedNeXt):
    """MONAI MedNeXt with clinical fusion after the bottleneck and optional gradient checkpointing."""

    size_divisor = 16
    encoder_prefixes = ("stem.", "enc_stages.", "down_blocks.")
    head_prefixes = ("out_0.", "out_blocks.")

    def __init__(
        self, fusion: str = "none", clinical_features: int = 0, use_checkpoint: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.use_checkpoint = use_checkpoint
        bottleneck_ch = kwargs["init_filters"] * 2 ** len(self.enc_stages)
        self.fusion = make_fusion(bottleneck_ch, clinical_features, fusion)

    def _run(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(module, x, use_reentrant=False)
        return module(x)

    def forward(self, image: torch.Tensor, clinical: torch.Tensor | None = None) -> torch.Tensor | list[torch.Tensor]:
        check_image(image, self.size_divisor, "mednext")
        x = self.stem(image)
        skips = []
        for enc_stage, down in zip(self.enc_stages, self.down_blocks):
            x = self._run(enc_stage, x)
            skips.append(x)
            x = down(x)
        x = apply_fusion(self.fusion, self._run(self.bottleneck, x), clinical)
        ds = []
        for i, (up, dec) in enumerate(zip(self.up_blocks, self.dec_stages)):
            if self.do_ds and self.training:
                ds.append(self.out_blocks[i](x))
            x = self._run(dec, up(x) + skips[-(i + 1)])
        logits = self.out_0(x)
        if self.do_ds and self.training:
            return [logits] + ds[::-1]
        return logits


# MedNeXt variants of the paper (Roy et al. 2023), as in monai.networks.nets.mednext.create_mednext.
_MEDNEXT_VARIANTS = {
    "s": dict(encoder_expansion_ratio=2, decoder_expansion_ratio=2, bottleneck_expansion_ratio=2,
              blocks_down=(2, 2, 2, 2), blocks_bottleneck=2, blocks_up=(2, 2, 2, 2)),
    "b": dict(encoder_expansion_ratio=(2, 3, 4, 4), decoder_expansion_ratio=(4, 4, 3, 2), bottleneck_expansion_ratio=4,
              blocks_down=(2, 2, 2, 2), blocks_bottleneck=2, blocks_up=(2, 2, 2, 2)),
    "m": dict(encoder_expansion_ratio=(2, 3, 4, 4), decoder_expansion_ratio=(4, 4, 3, 2), bottleneck_expansion_ratio=4,
              blocks_down=(3, 4, 4, 4), blocks_bottleneck=4, blocks_up=(4, 4, 4, 3)),
    "l": dict(encoder_expansion_ratio=(3, 4, 8, 8), decoder_expansion_ratio=(8, 8, 4, 3), bottleneck_expansion_ratio=8,
              blocks_down=(3, 4, 8, 8), blocks_bottleneck=8, blocks_up=(8, 8, 4, 3)),
}  # fmt: skip


def _mednext(variant: str) -> Callable[..., nn.Module]:
    def build(kernel_size: int = 3, **kwargs: Any) -> nn.Module:
        if kernel_size not in (3, 5, 7):
            raise ValueError(f"mednext_{variant}: kernel_size must be 3, 5 or 7, got {kernel_size}")
        kwargs = {"use_residual_connection": True, "norm_type": "group", **_MEDNEXT_VARIANTS[variant], **kwargs}
        return use_fast_depthwise(FusedMedNeXt(spatial_dims=3, kernel_size=kernel_size, **kwargs))

    return build


def _unet(**kwargs: Any) -> nn.Module:
    return FusedUNet(spatial_dims=3, **kwargs)


def _swinunetr(**kwargs: Any) -> nn.Module:
    return FusedSwinUNETR(spatial_dims=3, **kwargs)


def _unetr(**kwargs: Any) -> nn.Module:
    return FusedUNETR(spatial_dims=3, **kwargs)


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "nnynet": SwinNeXt,
    "swinunetr": _swinunetr,
    "unetr": _unetr,
    "unet": _unet,
    "mednext_s": _mednext("s"),
    "mednext_b": _mednext("b"),
    "mednext_m": _mednext("m"),
    "mednext_l": _mednext("l"),
    "uxnet3d": lambda **kw: use_fast_depthwise(UXNet3D(**kw)),
    "pctnet": lambda **kw: use_fast_depthwise(PCTNet(**kw)),
}

_MEDNEXT_SIZES = {"tiny": {"init_filters": 8}, "small": {"init_filters": 16}, "base": {"init_filters": 32}}

# Preset sizes: "tiny" for CPU tests/demos, "base" = paper scale.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # tiny uses 4^3 attention windows: 7^3 windows make CPU attention ~3x slower at 64^3.
    "nnynet": {
        "tiny": {"feature_size": 12, "window_size": 4},
        "small": {"feature_size": 24},
        "base": {"feature_size": 48},
    },
    "swinunetr": {
        "tiny": {"feature_size": 12, "window_size": 4},
        "small": {"feature_size": 24},
        "base": {"feature_size": 48},
    },
    "unetr": {
        "tiny": {"feature_size": 8, "hidden_size": 96, "mlp_dim": 384, "num_heads": 4, "img_size": 32},
        "small": {"feature_size": 16, "hidden_size": 384, "mlp_dim": 1536, "num_heads": 6, "img_size": 64},
        "base": {"feature_size": 16, "hidden_size": 768, "mlp_dim": 3072, "num_heads": 12, "img_size": 96},
    },
    "unet": {
        "tiny": {"channels": (8, 16, 32, 64, 128), "strides": (2, 2, 2, 2), "num_res_units": 1, "norm": "instance"},
        "small": {"channels": (16, 32, 64, 128, 256), "strides": (2, 2, 2, 2), "num_res_units": 2, "norm": "instance"},
        "base": {"channels": (32, 64, 128, 256, 320), "strides": (2, 2, 2, 2), "num_res_units": 2, "norm": "instance"},
    },
    **{f"mednext_{v}": _MEDNEXT_SIZES for v in "sbml"},
    "uxnet3d": {
        "tiny": {"feature_size": 8, "hidden_size": 64},
        "small": {"feature_size": 24, "hidden_size": 384},
        "base": {"feature_size": 48, "hidden_size": 768},
    },
    "pctnet": {"tiny": {"feature_size": 8}, "small": {"feature_size": 16}, "base": {"feature_size": 32}},
}


# Frozen copy of PRESETS and of create_model's defaults as nnynet 0.1 wrote them into config.json format 0
# (model_kwargs {"size": ..., overrides}). NEVER edit: old checkpoints mean exactly these values.
_PRESETS_V0: dict[str, dict[str, dict[str, Any]]] = {
    "nnynet": {"tiny": {"feature_size": 12, "window_size": 4}, "small": {"feature_size": 24},
               "base": {"feature_size": 48}},
    "swinunetr": {"tiny": {"feature_size": 12, "window_size": 4}, "small": {"feature_size": 24},
                  "base": {"feature_size": 48}},
    "unetr": {
        "tiny": {"feature_size": 8, "hidden_size": 96, "mlp_dim": 384, "num_heads": 4, "img_size": 32},
        "small": {"feature_size": 16, "hidden_size": 384, "mlp_dim": 1536, "num_heads": 6, "img_size": 64},
        "base": {"feature_size": 16, "hidden_size": 768, "mlp_dim": 3072, "num_heads": 12, "img_size": 96},
    },
    "unet": {
        "tiny": {"channels": [8, 16, 32, 64, 128], "strides": [2, 2, 2, 2], "num_res_units": 1, "norm": "instance"},
        "small": {"channels": [16, 32, 64, 128, 256], "strides": [2, 2, 2, 2], "num_res_units": 2, "norm": "instance"},
        "base": {"channels": [32, 64, 128, 256, 320], "strides": [2, 2, 2, 2], "num_res_units": 2, "norm": "instance"},
    },
    **{f"mednext_{v}": {"tiny": {"init_filters": 8}, "small": {"init_filters": 16}, "base": {"init_filters": 32}}
       for v in "sbml"},
    "uxnet3d": {"tiny": {"feature_size": 8, "hidden_size": 64}, "small": {"feature_size": 24, "hidden_size": 384},
                "base": {"feature_size": 48, "hidden_size": 768}},
    "pctnet": {"tiny": {"feature_size": 8}, "small": {"feature_size": 16}, "base": {"feature_size": 32}},
}  # fmt: skip
_BASE_KWARGS_V0 = {"in_channels": 1, "out_channels": 5, "fusion": "none", "clinical_features": 0}

# Arguments every zoo network takes, with the defaults create_model fills in.
BASE_KWARGS: dict[str, Any] = {"in_channels": 1, "out_channels": 5, "fusion": "none", "clinical_features": 0}

# Training-only switches: constructor arguments that change how a network trains, never what it predicts in
# eval mode. They are NnyNet / create_model arguments and never part of config.json's model_kwargs.
TRAINING_SWITCHES = ("deep_supervision", "use_checkpoint")
_SUPPORTS = {  # which networks take which switch
    "deep_supervision": {"nnynet", "mednext_s", "mednext_b", "mednext_m", "mednext_l"},
    "use_checkpoint": {"nnynet", "swinunetr", "mednext_s", "mednext_b", "mednext_m", "mednext_l", "uxnet3d", "pctnet"},
}
# State-dict prefixes of the modules deep supervision adds (the extra 1x1x1 heads): not part of an inference model.
_DEEP_SUPERVISION_PREFIXES = {"nnynet": ("ds_heads.",), **{f"mednext_{v}": ("out_blocks.",) for v in "sbml"}}


def list_models() -> list[str]:
    """Names accepted by create_model."""
    return list(_BUILDERS)


def accepted_kwargs(name: str) -> set[str]:
    """The keyword options ``create_model(name, ...)`` accepts besides ``size`` (training switches included)."""
    _check_name(name)
    return _accepted_kwargs(name)


def training_switches(name: str) -> set[str]:
    """The training-only switches (of TRAINING_SWITCHES) that network ``name`` has."""
    _check_name(name)
    return {s for s in TRAINING_SWITCHES if name in _SUPPORTS[s]}


def deep_supervision_prefixes(name: str) -> tuple[str, ...]:
    """State-dict prefixes of the deep-supervision heads of ``name`` (empty if it has none)."""
    _check_name(name)
    return _DEEP_SUPERVISION_PREFIXES.get(name, ())


def _check_name(name: str) -> None:
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; valid names: {list_models()}")


def _accepted_kwargs(name: str) -> set[str]:
    builder = _BUILDERS[name] if name not in ("uxnet3d", "pctnet") else None
    targets = {"nnynet": SwinNeXt, "uxnet3d": UXNet3D, "pctnet": PCTNet, "swinunetr": SwinUNETR, "unetr": UNETR,
               "unet": UNet}  # fmt: skip
    keys = set()
    for fn in (builder, targets.get(name), MedNeXt if name.startswith("mednext") else None):
        if fn is not None:
            keys |= {p for p in inspect.signature(fn).parameters if p not in ("self", "kwargs", "spatial_dims")}
    if name.startswith("mednext"):
        keys |= {"use_checkpoint"}
    if name in ("swinunetr", "unetr", "unet") or name.startswith("mednext"):
        keys |= {"fusion", "clinical_features"}
    if name == "swinunetr":
        keys |= {"fusion_position"}
    return keys


def resolve_model_kwargs(name: str, size: str | None = None, **overrides: Any) -> dict[str, Any]:
    """The explicit network arguments for ``create_model(name, size, **overrides)``: what config.json stores.

    ``size`` (default "base") picks a preset of PRESETS; overrides replace its values. The result has no
    "size" key and no training switch, and builds the same network whatever later becomes of PRESETS.
    """
    _check_name(name)
    size = "base" if size is None else size
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; valid sizes: {list(SIZES)}")
    switches = sorted(set(overrides) & set(TRAINING_SWITCHES))
    if switches:
        raise ValueError(f"{name}: {switches} are training-only switches, not model arguments; pass them to "
                         "NnyNet(config, deep_supervision=..., grad_checkpointing=...) or create_model")
    kwargs = {**BASE_KWARGS, **PRESETS[name][size], **overrides}
    _check_kwargs(name, kwargs)
    return _plain(kwargs)


def upgrade_v0_model_kwargs(name: str, model_kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Format-0 model_kwargs (nnynet 0.1: a preset "size" plus overrides) -> (explicit kwargs, notes).

    The preset is read from the frozen 0.1 table, not from PRESETS; training switches are dropped."""
    _check_name(name)
    kwargs = dict(model_kwargs)
    size = kwargs.pop("size", "base")  # 0.1's create_model default
    if size not in _PRESETS_V0[name]:
        raise ValueError(f"model_kwargs.size: unknown size {size!r}; valid sizes: {list(_PRESETS_V0[name])}")
    notes = [f"preset size {size!r} of {name!r} expanded from the frozen 0.1 presets"]
    dropped = [k for k in TRAINING_SWITCHES if k in kwargs]
    for key in dropped:
        del kwargs[key]
    if dropped:
        notes.append(f"training-only switches {dropped} removed")
    kwargs = {**_BASE_KWARGS_V0, **_PRESETS_V0[name][size], **kwargs}
    _check_kwargs(name, kwargs)
    return _plain(kwargs), notes


def _check_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    check_fusion_args(kwargs.get("fusion", "none"), kwargs.get("clinical_features", 0))
    unknown = set(kwargs) - _accepted_kwargs(name)
    if unknown:
        raise ValueError(f"{name}: unsupported option(s) {sorted(unknown)}; accepted: {sorted(_accepted_kwargs(name))}")


def build_model(name: str, model_kwargs: dict[str, Any], **switches: bool) -> nn.Module:
    """The network of explicit ``model_kwargs`` (as config.json stores them; no preset is applied).

    ``switches``: training-only options the network has (``training_switches(name)``), e.g. deep_supervision.
    """
    _check_name(name)
    if "size" in model_kwargs:
        raise ValueError(f"{name}: build_model takes explicit arguments; resolve 'size' with resolve_model_kwargs")
    bad = sorted(set(model_kwargs) & set(TRAINING_SWITCHES)) + sorted(set(switches) - training_switches(name))
    if bad:
        raise ValueError(f"{name}: {bad} cannot be passed here; training switches of {name}: "
                         f"{sorted(training_switches(name))}, and never inside model_kwargs")
    kwargs = {**model_kwargs, **switches}
    _check_kwargs(name, kwargs)
    return use_safe_bf16_convs(_BUILDERS[name](**kwargs))


def create_model(name: str, size: str = "base", **overrides: Any) -> nn.Module:
    """Build a zoo network; overrides replace preset values (in_channels=1, out_channels=5 by default).

    Training switches (deep_supervision, use_checkpoint) may be passed too, where the network has them."""
    _check_name(name)
    switches = {k: overrides.pop(k) for k in TRAINING_SWITCHES if k in overrides}
    unsupported = sorted(set(switches) - training_switches(name))
    if unsupported:
        raise ValueError(f"{name}: unsupported option(s) {unsupported}; accepted: {sorted(_accepted_kwargs(name))}")
    return build_model(name, resolve_model_kwargs(name, size, **overrides), **switches)
