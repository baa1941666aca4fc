"""Ensembles of saved models (e.g. the k fold models of one task): probabilities averaged window by window.

    from nny_models import NnyNet, predict
    from nny_models.ensemble import Ensemble
    models = [NnyNet.from_pretrained(f"runs/fold{k}/model") for k in range(5)]
    mask = predict(Ensemble(models), "ct.nii.gz", clinical="row.json")

``nnynet-predict --model A --model B ...`` does the same. Members must agree on everything predict reads
from config.json around the network (preprocessing, patch size, label names, post-processing): one
preprocessing and one sliding window serve them all. Each member keeps its own clinical schema (k fold models
fit their imputation on different folds), so the clinical row is encoded once per member.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

SHARED_FIELDS = ("preprocessing", "patch_size", "label_names", "keep_largest", "task")  # config.json fields


class Ensemble(nn.Module):
    """Members run on the same windows; forward returns the log of their mean softmax probability, so the
    softmax that sliding-window inference applies gives back exactly the average."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(members) < 1:
            raise ValueError("Ensemble: needs at least one model")
        configs = [getattr(m, "config", None) for m in members]
        if any(c is None for c in configs):
            raise ValueError("Ensemble: every member must be an NnyNet (with a .config)")
        first = configs[0].to_dict()
        for i, config in enumerate(configs[1:], start=1):
            other = config.to_dict()
            for name in SHARED_FIELDS:
                if other[name] != first[name]:
                    raise ValueError(f"Ensemble: member {i} differs from member 0 in config.json field {name!r} "
                                     f"({other[name]!r} vs {first[name]!r}); an ensemble needs the same {name}")
        self.members = nn.ModuleList(members)
        self.config = configs[0]  # the shared fields are what predict reads
        self.size_divisor = max(int(getattr(getattr(m, "net", m), "size_divisor", 1) or 1) for m in members)
        self.supports_bf16 = all(getattr(m, "supports_bf16", True) for m in members)
        self.feature_sizes = [_clinical_features(m) for m in members]

    @property
    def fusion(self) -> Any:
        """Truthy when any member fuses clinical data (predict encodes a clinical row only then)."""
        return next((f for f in (getattr(getattr(m, "net", m), "fusion", None) for m in self.members) if f), None)

    def encode_clinical(self, clinical: Any, case_id: Any = None, image: str | None = None) -> torch.Tensor | None:
        """The members' clinical vectors side by side (1, sum of their feature counts), or None."""
        from nny_models.inference import clinical_vector

        if clinical is None:
            return None
        parts = [clinical_vector(m, clinical, case_id, image) for m, f in zip(self.members, self.feature_sizes) if f]
        return torch.cat(parts, dim=1) if parts else None

    def forward(self, image: torch.Tensor, clinical: torch.Tensor | None = None) -> torch.Tensor:
        total, offset = None, 0
        for member, features in zip(self.members, self.feature_sizes):
            part = None
            if clinical is not None and features:
                part, offset = clinical[:, offset : offset + features], offset + features
            logits = member(image, part)
            logits = logits[0] if isinstance(logits, (list, tuple)) else logits
            probs = logits.float().softmax(dim=1)
            total = probs if total is None else total + probs
        return (total / len(self.members)).clamp_min(1e-12).log()


def _clinical_features(model: nn.Module) -> int:
    fusion = getattr(getattr(model, "net", model), "fusion", None)
    return int(getattr(fusion, "clinical_features", 0) or 0) if fusion is not None else 0
