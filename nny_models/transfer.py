"""Weight transfer between networks with an honest report of what loaded.

Pretrained weights fail silently all the time (key prefixes, a different head, a changed kernel size).
``transfer_weights`` loads every tensor whose name and shape match, leaves the rest at their current
values, and returns a ``TransferReport`` listing loaded / missing / unexpected / mismatched keys, so
callers can check e.g. ``report.fraction_loaded(model.encoder_prefixes) == 1.0``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn as nn


@dataclass
class TransferReport:
    """Outcome of loading a state dict into a model (all key names are the model's)."""

    loaded: list[str] = field(default_factory=list)  # model keys that received a source tensor
    missing: list[str] = field(default_factory=list)  # model keys absent from the source (kept as initialised)
    unexpected: list[str] = field(default_factory=list)  # source keys the model does not have
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # (key, src_shape, dst_shape), not loaded
    excluded: list[str] = field(default_factory=list)  # model keys skipped on purpose (exclude_prefixes)
    interpolated: list[str] = field(default_factory=list)  # loaded keys whose kernels were resized (UpKern)
    total: int = 0  # number of tensors in the model's state dict

    def fraction_loaded(self, prefixes: str | Iterable[str] = ("",)) -> float:
        """Fraction of model tensors under ``prefixes`` that were loaded (0.0 if none are under them)."""
        prefixes = (prefixes,) if isinstance(prefixes, str) else tuple(prefixes)
        keys = self.loaded + self.missing + self.excluded + [k for k, _, _ in self.mismatched]
        under = [k for k in keys if k.startswith(prefixes)]
        if not under:
            return 0.0
        return sum(k.startswith(prefixes) for k in self.loaded) / len(under)

    def summary(self, max_keys: int = 5) -> str:
        def some(keys: list) -> str:
            shown = ", ".join(str(k) for k in keys[:max_keys])
            return shown + (f", ... (+{len(keys) - max_keys})" if len(keys) > max_keys else "")

        lines = [f"loaded {len(self.loaded)}/{self.total} tensors"]
        if self.interpolated:
            lines.append(f"interpolated kernels {len(self.interpolated)}: {some(self.interpolated)}")
        if self.missing:
            lines.append(f"missing {len(self.missing)} (kept initialised): {some(self.missing)}")
        if self.unexpected:
            lines.append(f"unexpected {len(self.unexpected)} (ignored): {some(self.unexpected)}")
        if self.mismatched:
            shown = [f"{k} {tuple(s)}->{tuple(d)}" for k, s, d in self.mismatched]
            lines.append(f"shape mismatch {len(self.mismatched)} (not loaded): {some(shown)}")
        if self.excluded:
            lines.append(f"excluded {len(self.excluded)}: {some(self.excluded)}")
        return "; ".join(lines)


Resizer = Callable[[str, torch.Tensor, torch.Tensor], "torch.Tensor | None"]


def rename_prefixes(state_dict: Mapping[str, torch.Tensor], renames: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """Keys starting with an ``old`` prefix get the ``new`` one instead, rule by rule in order; others are kept.

    For checkpoints of other code bases, e.g. a MONAI SwinUNETR's encoder into nnynet's:
    ``rename_prefixes(state, {"module.": "", "swinViT.": "encoder."})`` (DDP's ``module.`` first)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        for old, new in renames.items():  # each rule once, in order: "module.swinViT.x" -> "swinViT.x" -> "encoder.x"
            if key.startswith(old):
                key = new + key[len(old):]
        if key in out:
            raise ValueError(f"rename_prefixes: two tensors map to {key!r}")
        out[key] = value
    return out


def transfer_weights(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    exclude_prefixes: Iterable[str] = (),
    resize: Resizer | None = None,
) -> TransferReport:
    """Copy matching tensors of ``state_dict`` into ``model`` in place and report what happened.

    ``resize(key, src, dst)`` may return a tensor of dst's shape for a shape mismatch (UpKern uses it).
    """
    exclude = tuple(exclude_prefixes)
    target = model.state_dict()
    report = TransferReport(total=len(target))
    report.unexpected = [k for k in state_dict if k not in target]
    with torch.no_grad():
        for key, dst in target.items():
            if exclude and key.startswith(exclude):
                report.excluded.append(key)
                continue
            if key not in state_dict:
                report.missing.append(key)
                continue
            src = state_dict[key]
            if src.shape != dst.shape:
                resized = resize(key, src, dst) if resize is not None else None
                if resized is None:
                    report.mismatched.append((key, tuple(src.shape), tuple(dst.shape)))
                    continue
                src = resized
                report.interpolated.append(key)
            dst.copy_(src.to(device=dst.device, dtype=dst.dtype))  # state_dict tensors share storage
            report.loaded.append(key)
    return report
