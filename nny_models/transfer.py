"""Weight loading and transfer between networks with an honest report of what loaded: the one loader.

Pretrained weights fail silently all the time (key prefixes, a different head, a changed kernel size).
``transfer_weights`` loads every tensor whose name and shape match, leaves the rest at their current
values, and returns a ``TransferReport`` listing loaded / missing / unexpected / mismatched keys, so
callers can check e.g. ``report.fraction_loaded(model.encoder_prefixes) == 1.0``.

Strict loading (``strict=True``, what ``NnyNet.from_pretrained`` uses) is the same pass with one rule more:
the report must be clean (nothing missing, unexpected, mismatched or excluded), else ``WeightsMismatchError``
names the keys and shapes, and the model is left untouched. Non-finite tensors (NaN / inf) are refused in
both modes: such a network predicts background everywhere, with exit code 0. So are finite values that become
inf in the model's dtype (e.g. 1e300 in a float64 file, 7e4 into float16), integer / boolean / complex data for
floating-point weights (or the reverse), non-tensor values, and a ``resize`` result of another shape than the
model's tensor (``copy_`` would broadcast it silently). A load in which no tensor at all matched warns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn


class WeightsMismatchError(ValueError):
    """Checkpoint tensors do not match the network they are loaded into (strict loading)."""


class NonFiniteWeightsError(ValueError):
    """Checkpoint tensors contain NaN or inf (or values that overflow the model's dtype)."""


class WeightsDtypeError(ValueError):
    """Checkpoint tensors hold data of another kind (integer, boolean, complex, floating point) than the model's."""


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

    @property
    def clean(self) -> bool:
        """True when every model tensor received a source tensor of its shape and nothing was left over."""
        return not (self.missing or self.unexpected or self.mismatched or self.excluded)

    def mismatch_message(self, source: str, max_keys: int = 8) -> str:
        """Why a strict load failed: key names and shapes first, one kind per line, counts in full."""
        lines = []
        if self.mismatched:
            shown = [f"{k} {list(s)} in checkpoint vs {list(d)} in model" for k, s, d in self.mismatched]
            lines.append(f"{len(self.mismatched)} shape mismatch(es): {_some(shown, max_keys)}")
        if self.missing:
            lines.append(f"{len(self.missing)} missing in checkpoint: {_some(self.missing, max_keys)}")
        if self.unexpected:
            lines.append(f"{len(self.unexpected)} unexpected in checkpoint: {_some(self.unexpected, max_keys)}")
        if self.excluded:
            lines.append(f"{len(self.excluded)} excluded: {_some(self.excluded, max_keys)}")
        return f"{source}: weights do not fit the model: " + "; ".join(lines)

    def fraction_loaded(self, prefixes: str | Iterable[str] = ("",)) -> float:
        """Fraction of model tensors under ``prefixes`` that were loaded (0.0 if none are under them)."""
        prefixes = (prefixes,) if isinstance(prefixes, str) else tuple(prefixes)
        keys = self.loaded + self.missing + self.excluded + [k for k, _, _ in self.mismatched]
        under = [k for k in keys if k.startswith(prefixes)]
        if not under:
            return 0.0
        return sum(k.startswith(prefixes) for k in self.loaded) / len(under)

    def summary(self, max_keys: int = 5) -> str:
        lines = [f"loaded {len(self.loaded)}/{self.total} tensors"]
        if self.interpolated:
            lines.append(f"interpolated kernels {len(self.interpolated)}: {_some(self.interpolated, max_keys)}")
        if self.missing:
            lines.append(f"missing {len(self.missing)} (kept initialised): {_some(self.missing, max_keys)}")
        if self.unexpected:
            lines.append(f"unexpected {len(self.unexpected)} (ignored): {_some(self.unexpected, max_keys)}")
        if self.mismatched:
            shown = [f"{k} {tuple(s)}->{tuple(d)}" for k, s, d in self.mismatched]
            lines.append(f"shape mismatch {len(self.mismatched)} (not loaded): {_some(shown, max_keys)}")
        if self.excluded:
            lines.append(f"excluded {len(self.excluded)}: {_some(self.excluded, max_keys)}")
        return "; ".join(lines)


def _some(keys: list, max_keys: int) -> str:
    """The first ``max_keys`` keys, comma-separated, and how many more there are."""
    shown = ", ".join(str(k) for k in keys[:max_keys])
    return shown + (f", ... (+{len(keys) - max_keys} more)" if len(keys) > max_keys else "")


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
    strict: bool = False,
    source: str = "state dict",
) -> TransferReport:
    """Copy matching tensors of ``state_dict`` into ``model`` in place and report what happened.

    ``resize(key, src, dst)`` may return a tensor of dst's shape for a shape mismatch (UpKern uses it).
    ``strict``: the report must be clean, else WeightsMismatchError and nothing is copied. Tensors that
    would be loaded must be finite, also once cast to the model's dtype, else NonFiniteWeightsError; of the
    model's kind (floating point, integer, boolean, complex), else WeightsDtypeError; in both cases nothing is
    copied. ``source`` names the weights (e.g. the file) in those errors. Nothing matching at all warns.
    """
    exclude = tuple(exclude_prefixes)
    target = model.state_dict()
    report = TransferReport(total=len(target))
    report.unexpected = [k for k in state_dict if k not in target]
    plan: list[tuple[torch.Tensor, torch.Tensor]] = []  # (dst, src): copied only once every check passed
    for key, dst in target.items():
        if exclude and key.startswith(exclude):
            report.excluded.append(key)
            continue
        if key not in state_dict:
            report.missing.append(key)
            continue
        src = state_dict[key]
        if not isinstance(src, torch.Tensor):
            raise TypeError(f"{source}: {key!r} is a {type(src).__name__}, not a tensor; expected a state dict "
                            "of tensors (e.g. safetensors.torch.load_file)")
        if src.shape != dst.shape:
            resized = resize(key, src, dst) if resize is not None else None
            if resized is None:
                report.mismatched.append((key, tuple(src.shape), tuple(dst.shape)))
                continue
            if not isinstance(resized, torch.Tensor) or resized.shape != dst.shape:
                got = tuple(resized.shape) if isinstance(resized, torch.Tensor) else type(resized).__name__
                raise ValueError(f"{source}: resize returned {got} for {key!r} {tuple(src.shape)}; expected the "
                                 f"model's shape {tuple(dst.shape)} or None (copying would broadcast it)")
            src = resized
            report.interpolated.append(key)
        plan.append((dst, src))
        report.loaded.append(key)
    if strict and not report.clean:
        raise WeightsMismatchError(report.mismatch_message(source))
    kind = [f"{k} ({_dtype(src)}, expected {_dtype(dst)})" for k, (dst, src) in zip(report.loaded, plan)
            if src.is_floating_point() != dst.is_floating_point() or src.is_complex() != dst.is_complex()
            or (src.dtype == torch.bool) != (dst.dtype == torch.bool)]
    if kind:
        raise WeightsDtypeError(f"{source}: {len(kind)} tensor(s) hold data of another kind than the model's: "
                                f"{_some(kind, 8)}; copying would cast them into a different network")
    bad = [k for k, (_, src) in zip(report.loaded, plan) if _non_finite(src)]
    if bad:
        raise NonFiniteWeightsError(f"{source}: {len(bad)} tensor(s) contain NaN or inf: {_some(bad, 8)}; "
                                    "the checkpoint is corrupt (diverged training or a damaged file)")
    cast = [(dst, src.to(dtype=dst.dtype)) for dst, src in plan]  # what the model would hold
    over = [f"{k} ({_dtype(src)} -> {_dtype(dst)})" for k, (dst, src), (_, c) in zip(report.loaded, plan, cast)
            if _non_finite(c)]
    if over:
        raise NonFiniteWeightsError(f"{source}: {len(over)} tensor(s) hold finite values that overflow to inf in "
                                    f"the model's dtype: {_some(over, 8)}; the checkpoint is corrupt or not "
                                    "weights of this network")
    with torch.no_grad():
        for dst, src in cast:
            dst.copy_(src.to(device=dst.device))  # state_dict tensors share storage
    if not report.loaded and (report.missing or report.mismatched):  # not merely all excluded on purpose
        warnings.warn(f"{source}: none of the model's {report.total} tensors loaded ({report.summary()}); are these "
                      "weights of this architecture, with these key names?", stacklevel=2)
    return report


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _non_finite(t: torch.Tensor) -> bool:
    return (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all())
