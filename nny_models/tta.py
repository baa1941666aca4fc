"""Mirror test-time augmentation (nnU-Net's): every window is also predicted mirrored, and the softmax
probabilities of all 2^k mirror combinations of the k axes are averaged, each un-mirrored first.

    from nny_models import NnyNet, predict
    model = NnyNet.from_pretrained("runs/model")
    mask = predict(model, "ct.nii.gz")             # TTA as config.json says (tta_mirror_axes; [] = none)
    mask = predict(model, "ct.nii.gz", tta=False)  # off
    probs = MirrorTTA(model, (1, 2))(patches)      # the wrapper itself, on network inputs (B, C, X, Y, Z)

A model is only mirrored along the axes it was trained mirrored on (``NnyNetConfig.tta_mirror_axes``, set from
finetune's ``--flip_axes``): a network that never saw a left-right mirror uses the side to tell liver from
spleen, and its mirrored prediction is wrong, not a second opinion. ``MirrorTTA`` refuses other axes unless
``unsafe=True``. It wraps an NnyNet, an ONNX Runtime network or an ``Ensemble`` (nny_models.ensemble); an
Ensemble of ``MirrorTTA`` members works too and gives the same average when the axes agree.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from nny_models.config import check_mirror_axes


def mirror_combinations(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """All 2^k subsets of ``axes`` (the identity () first): the mirrorings TTA averages over."""
    axes = list(axes)
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


class MirrorTTA(nn.Module):
    """``model`` run on each of the 2^k mirrorings of its input; forward returns the log of the mean softmax
    probability (each pass mirrored back), so the softmax sliding-window inference applies gives the average.

    axes: spatial axes 0, 1, 2 of the network input (B, C, X, Y, Z) -> tensor dims 2, 3, 4. None = the model's
    ``config.tta_mirror_axes``. Axes outside that list are a ValueError unless ``unsafe=True``.
    """

    def __init__(self, model: nn.Module, axes: Sequence[int] | None = None, *, unsafe: bool = False) -> None:
        super().__init__()
        if isinstance(model, MirrorTTA):
            raise ValueError("MirrorTTA: the model already mirrors (a MirrorTTA); wrap its .model instead")
        config = getattr(model, "config", None)
        if config is None:
            raise ValueError("MirrorTTA: the model has no .config (NnyNetConfig); load it with NnyNet.from_pretrained")
        # checked here too: a config changed in memory after loading would flip a dimension that is not spatial
        safe = check_mirror_axes(list(config.tta_mirror_axes or []), "MirrorTTA: config.json tta_mirror_axes")
        axes = safe if axes is None else check_mirror_axes(list(axes), "MirrorTTA axes")
        if not axes:
            raise ValueError("MirrorTTA: no axes to mirror; the model's config.json lists no tta_mirror_axes (the "
                             "axes it was trained mirrored on), so test-time mirroring is not safe for it")
        if not unsafe and not set(axes) <= set(safe):
            raise ValueError(f"MirrorTTA: axes {sorted(set(axes) - set(safe))} are not in the model's config.json "
                             f"tta_mirror_axes {safe} (the axes it was trained mirrored on); pass unsafe=True to "
                             "mirror anyway")
        self.model = model
        self.axes = tuple(axes)
        self.combinations = mirror_combinations(self.axes)
        self.config = config  # predict reads preprocessing, patch size and labels from the wrapped model's config
        self.size_divisor = int(getattr(getattr(model, "net", model), "size_divisor", 1) or 1)
        self.supports_bf16 = bool(getattr(model, "supports_bf16", True))

    @property
    def fusion(self) -> Any:
        """The wrapped model's clinical fusion (predict encodes a clinical row only when it is truthy)."""
        return getattr(getattr(self.model, "net", self.model), "fusion", None)

    def encode_clinical(self, clinical: Any, case_id: Any = None, image: str | None = None) -> torch.Tensor | None:
        """The wrapped model's clinical vector: every mirrored pass gets the same one."""
        from nny_models.inference import clinical_vector

        return clinical_vector(self.model, clinical, case_id, image)

    def forward(self, image: torch.Tensor, clinical: torch.Tensor | None = None) -> torch.Tensor:
        total = None
        for axes in self.combinations:
            dims = [a + 2 for a in axes]
            x = image.flip(dims) if dims else image
            logits = self.model(x, clinical)
            logits = logits[0] if isinstance(logits, (list, tuple)) else logits  # deep supervision: full resolution
            probs = logits.float().softmax(dim=1)
            probs = probs.flip(dims) if dims else probs
            total = probs if total is None else total + probs
        return (total / len(self.combinations)).clamp_min(1e-12).log()


def mirrors(model: nn.Module) -> bool:
    """True when ``model`` is or holds a MirrorTTA (e.g. an Ensemble of MirrorTTA members)."""
    return any(isinstance(m, MirrorTTA) for m in model.modules())


def with_tta(model: nn.Module, tta: bool | None) -> nn.Module:
    """What predict runs for its ``tta`` argument: None = as config.json says (mirror along tta_mirror_axes when
    there are any), True = mirror (ValueError if config.json lists no safe axes), False = no mirroring.

    A model that already mirrors (a MirrorTTA, or an Ensemble with one) is run as it is under None and True,
    and refused under False (the caller asked for no TTA on a model built to do it)."""
    if tta is not None and not isinstance(tta, bool):
        raise ValueError(f"predict: tta must be None, True or False, got {tta!r}")
    if mirrors(model):
        if tta is False:
            raise ValueError("predict: tta=False, but the model already mirrors (it is or holds a MirrorTTA); "
                             "pass the unwrapped model (MirrorTTA.model) instead")
        return model
    axes = check_mirror_axes(list(getattr(model.config, "tta_mirror_axes", []) or []), "config.json tta_mirror_axes")
    if tta is False or (tta is None and not axes):
        return model
    if not axes:
        raise ValueError("predict: tta=True, but the model's config.json lists no tta_mirror_axes (the axes it was "
                         "trained mirrored on, finetune --flip_axes); mirroring along other axes is not safe. "
                         "Run without TTA")
    return MirrorTTA(model, axes)
