"""Ensembles of saved models (e.g. the k fold models of one task): probabilities averaged window by window.

    from nny_models import NnyNet, predict
    from nny_models.ensemble import Ensemble
    models = [NnyNet.from_pretrained(f"runs/fold{k}/model") for k in range(5)]
    mask = predict(Ensemble(models), "ct.nii.gz", clinical="row.json")

``nnynet-predict --model A --model B ...`` does the same. Members must agree on everything predict reads
from config.json around the network (preprocessing, patch size, label names, post-processing): one
preprocessing and one sliding window serve them all. Each member keeps its own clinical schema (k fold models
fit their imputation on different folds), so the clinical row is encoded once per member.

Publishing: ``save_ensemble(models, "ens")`` writes one save_pretrained folder per member (ens/member_0, ...), a
top-level ens/config.json stating the ensemble (its "ensemble" field: format, member folders, how they are
combined; the shared fields; the TTA axes) and a model card. ``load_model("ens")`` (a folder or Hub repo id)
returns an NnyNet or an Ensemble, as config.json says; ``NnyNet.from_pretrained("ens")`` refuses the folder.

Test-time mirroring (nny_models.tta): an Ensemble's ``config.tta_mirror_axes`` are the axes every member was
trained mirrored on (or a subset given to the constructor), so ``predict(ensemble)`` mirrors only where all
members allow it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nny_models.config import check_mirror_axes

SHARED_FIELDS = ("preprocessing", "patch_size", "label_names", "keep_largest", "keep_side", "single_component",
                 "lesion_in_organ", "label_resampling", "task")  # config.json fields
# shared fields newer than ensembles' files: absent = this value
OPTIONAL_SHARED = {"lesion_in_organ": None, "single_component": [], "label_resampling": "nearest"}
ENSEMBLE_FORMAT = 1  # the "ensemble" section of an ensemble's config.json that this code writes and reads
COMBINE = "mean_softmax"  # members' softmax probabilities averaged window by window (the only rule there is)
_MEMBER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # a plain sub-folder name: no "/", "..", "~"


class Ensemble(nn.Module):
    """Members run on the same windows; forward returns the log of their mean softmax probability, so the
    softmax that sliding-window inference applies gives back exactly the average."""

    def __init__(self, members: Sequence[nn.Module], tta_mirror_axes: Sequence[int] | None = None) -> None:
        """tta_mirror_axes: the ensemble's test-time mirroring axes; None = those every member allows (the
        intersection of their config.json tta_mirror_axes); a list must be a subset of that intersection."""
        super().__init__()
        if len(members) < 1:
            raise ValueError("Ensemble: needs at least one model")
        for i, m in enumerate(members):  # nested: members would no longer weigh the same
            if isinstance(m, Ensemble):
                raise ValueError(f"Ensemble: member {i} is itself an Ensemble (of {len(m.members)} models); pass its "
                                 "members instead (their folders, or Ensemble.members)")
        configs = [getattr(m, "config", None) for m in members]
        if any(c is None for c in configs):
            raise ValueError("Ensemble: every member must be an NnyNet (with a .config)")
        first = configs[0].to_dict()
        for i, config in enumerate(configs[1:], start=1):
            other = config.to_dict()
            for name in SHARED_FIELDS:
                if other[name] != first[name]:
                    differs = _difference(name, other[name], first[name])
                    raise ValueError(f"Ensemble: member {i} differs from member 0 in config.json field {differs}; "
                                     f"an ensemble needs the same {name}")
        _check_distinct(members)
        safe = sorted(set.intersection(*(set(c.tta_mirror_axes) for c in configs)))
        axes = safe if tta_mirror_axes is None else check_mirror_axes(list(tta_mirror_axes), "Ensemble tta_mirror_axes")
        if not set(axes) <= set(safe):
            unsafe = {i: c.tta_mirror_axes for i, c in enumerate(configs) if not set(axes) <= set(c.tta_mirror_axes)}
            raise ValueError(f"Ensemble: tta_mirror_axes {axes} are not all safe for every member (members' "
                             f"config.json tta_mirror_axes: {unsafe}); the safe common axes are {safe}")
        self.members = nn.ModuleList(members)
        # the shared fields are what predict reads; tta_mirror_axes is the ensemble's own. The first member that fuses
        # clinical data lends the rest (its clinical_schema is what nnynet-predict checks a clinical row against: with
        # member 0's None, a row lacking that member's columns was imputed without the CLI's refusal)
        lender = next((c for m, c in zip(members, configs) if _clinical_features(m)), configs[0])
        self.config = dataclasses.replace(lender, tta_mirror_axes=axes)
        # every window must suit every member: the least common multiple, not the largest (16 and 24 need 48)
        self.size_divisor = math.lcm(*(int(getattr(getattr(m, "net", m), "size_divisor", 1) or 1) for m in members))
        self.supports_bf16 = all(getattr(m, "supports_bf16", True) for m in members)
        self.feature_sizes = [_clinical_features(m) for m in members]

    @property
    def fusion(self) -> Any:
        """Truthy when any member fuses clinical data (predict encodes a clinical row only then)."""
        return next((f for f in (getattr(getattr(m, "net", m), "fusion", None) for m in self.members) if f), None)

    def encode_clinical(self, clinical: Any, case_id: Any = None, image: str | None = None) -> torch.Tensor | None:
        """The members' clinical vectors side by side (1, sum of their feature counts), or None."""
        from nny_models.inference import clinical_vector, read_clinical

        if clinical is None:
            return None
        if isinstance(clinical, (np.ndarray, torch.Tensor, list, tuple)):
            row = read_clinical(clinical, case_id, image)
            if isinstance(row, np.ndarray):  # already encoded: it must be this method's own output
                if row.size != sum(self.feature_sizes):
                    raise ValueError(f"clinical: an encoded vector for this ensemble holds its members' vectors side "
                                     f"by side ({self.feature_sizes} features, {sum(self.feature_sizes)} in all); "
                                     f"got {row.size}")
                return torch.from_numpy(row.reshape(1, -1)) if row.size else None
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


def _difference(name: str, value: Any, reference: Any) -> str:
    """The field and both values, narrowed to the differing keys of an object field such as preprocessing."""
    if isinstance(value, dict) and isinstance(reference, dict):
        keys = sorted(k for k in set(value) | set(reference) if value.get(k) != reference.get(k))
        return ", ".join(f"'{name}.{k}' ({value.get(k)!r} vs {reference.get(k)!r})" for k in keys)
    return f"{name!r} ({value!r} vs {reference!r})"


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    if a is b:
        return True
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and sa[k].device == sb[k].device and torch.equal(sa[k], sb[k]) for k in sa)


def _check_distinct(members: Sequence[nn.Module]) -> None:
    """The same model twice (--model A --model A, a copied fold folder) would silently weigh it double, and a
    "5-fold ensemble" of one model repeated looks like five: refused."""
    for i in range(1, len(members)):
        for j in range(i):
            if _same_weights(members[i], members[j]):
                raise ValueError(f"Ensemble: member {i} has the same weights as member {j} (the same model passed "
                                 "twice?); each member must be a different model")


def _clinical_features(model: nn.Module) -> int:
    fusion = getattr(getattr(model, "net", model), "fusion", None)
    return int(getattr(fusion, "clinical_features", 0) or 0) if fusion is not None else 0


# ---- publishing: one folder holding k save_pretrained members ------------------------------------------------


def save_ensemble(
    members: "Ensemble | Sequence[nn.Module]",
    directory: str | Path,
    *,
    names: Sequence[str] | None = None,
    tta_mirror_axes: Sequence[int] | None = None,
    metrics: dict[str, Any] | None = None,
    trained_on: str | None = None,
    notes: str | None = None,
) -> Path:
    """Write an ensemble folder: <directory>/<name>/ per member (save_pretrained: safetensors, config.json, card),
    <directory>/config.json stating the ensemble and the fields members share, <directory>/README.md (its card).

    members: an Ensemble or NnyNet models (not MirrorTTA wrappers: TTA is stated by tta_mirror_axes).
    names: member folder names (default member_0, member_1, ...). tta_mirror_axes: None = the Ensemble's (the axes
    every member allows). metrics: the ensemble's own evaluation summary for its card and config.json (member
    cards keep their own). Push the folder with huggingface_hub.upload_folder; load it with load_model.
    """
    from nny_models.hub import CONFIG_NAME, WEIGHTS_NAME, NnyNet, render_model_card

    if isinstance(members, Ensemble):
        axes = members.config.tta_mirror_axes if tta_mirror_axes is None else tta_mirror_axes
        members = list(members.members)
    else:
        members, axes = list(members), tta_mirror_axes
    for i, member in enumerate(members):
        if not isinstance(member, NnyNet):
            raise ValueError(f"save_ensemble: member {i} is a {type(member).__name__}; expected NnyNet models (TTA is "
                             "stated by tta_mirror_axes, not saved as a wrapper)")
    ensemble = Ensemble(members, tta_mirror_axes=axes)  # the same checks as in memory: shared fields, safe axes
    names = [f"member_{i}" for i in range(len(members))] if names is None else list(names)
    _check_member_names(names, len(members), "save_ensemble names")
    directory = Path(directory).expanduser()
    if (directory / WEIGHTS_NAME).exists():
        raise ValueError(f"save_ensemble: {directory} holds a single model ({WEIGHTS_NAME}); write the ensemble to "
                         "a new folder")
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"save_ensemble: {directory} is a file; expected a new folder")
    # an existing ensemble (or any folder a member name would land on) is an input, perhaps these members' own:
    # overwriting member_0 while member_3 of the old ensemble stays would mix two ensembles in one folder
    taken = [p.name for p in [directory / CONFIG_NAME, *(directory / n for n in names)] if p.exists() or p.is_symlink()]
    if taken:
        raise ValueError(f"save_ensemble: {directory} already holds {taken}; write the ensemble to a new folder "
                         "(an existing model or ensemble is never overwritten)")
    directory.mkdir(parents=True, exist_ok=True)
    for name, member in zip(names, members):
        member.save_pretrained(directory / name)
    shared = {k: v for k, v in ensemble.config.to_dict().items() if k in SHARED_FIELDS}
    config = {"ensemble": {"format_version": ENSEMBLE_FORMAT, "members": names, "combine": COMBINE},
              "tta_mirror_axes": list(ensemble.config.tta_mirror_axes), **shared, "metrics": metrics}
    json.dumps(config, allow_nan=False)  # a non-JSON metric fails before anything is written
    card_config = dataclasses.replace(ensemble.config, metrics=metrics)
    described = [{"name": n, "model": m.config.model, "model_kwargs_json": json.dumps(m.config.model_kwargs,
                  sort_keys=True), "tta_mirror_axes": m.config.tta_mirror_axes} for n, m in zip(names, members)]
    card = render_model_card(card_config, trained_on=trained_on, notes=notes, ensemble=described)
    card.save(directory / "README.md")
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return directory


def load_model(path_or_repo: str | Path, *, revision: str | None = None, map_location: str = "cpu") -> nn.Module:
    """An NnyNet or an Ensemble, as the config.json of a local folder or Hub repo id says; strict, safetensors only.

    An ensemble's members are loaded with NnyNet.from_pretrained(strict=True) from its sub-folders (a Hub repo is
    fetched with snapshot_download, restricted to the listed members' config.json and model.safetensors). A member
    folder that is missing or broken, or that differs from the top-level config.json in a shared field, is a
    ValueError / FileNotFoundError naming the folder and the field.
    """
    from nny_models.hub import CONFIG_NAME, NnyNet, _resolve_file

    path = _resolve_file(path_or_repo, CONFIG_NAME, revision=revision)
    data = _read_json(path)
    if not (isinstance(data, dict) and "ensemble" in data):
        return NnyNet.from_pretrained(path_or_repo, revision=revision, map_location=map_location)
    names = _ensemble_section(data, path)
    local = Path(path_or_repo).expanduser()
    if local.is_dir():
        root = local
    else:  # a Hub repo: one snapshot (one commit) holding exactly the listed members' two files each
        from huggingface_hub import snapshot_download

        from nny_models.hub import WEIGHTS_NAME

        patterns = [CONFIG_NAME, "README.md"] + [f"{n}/{f}" for n in names for f in (CONFIG_NAME, WEIGHTS_NAME)]
        root = Path(snapshot_download(repo_id=str(path_or_repo), revision=revision, allow_patterns=patterns))
        path = root / CONFIG_NAME
        data = _read_json(path)
        if _ensemble_section(data, path) != names:
            raise ValueError(f"Hub repo {path_or_repo}: config.json changed while downloading (revision "
                             f"{revision or 'main'}); pin a commit with revision=")
    members = []
    for name in names:
        folder = root / name
        if not folder.is_dir():
            raise FileNotFoundError(f"{path}: ensemble member folder {name!r} (field 'ensemble.members') not found "
                                    f"at {folder}")
        try:
            member = NnyNet.from_pretrained(folder, strict=True, map_location=map_location)
        except Exception as e:  # a broken member names itself: the message says which file and why
            raise ValueError(f"ensemble {root}: member {name!r} cannot be loaded: {e}") from e
        own = member.config.to_dict()
        for field in SHARED_FIELDS:
            theirs = data.get(field, OPTIONAL_SHARED.get(field))
            if own[field] != theirs:
                raise ValueError(f"{folder / CONFIG_NAME}: field {field!r} is {own[field]!r} but the ensemble's "
                                 f"{path} says {theirs!r}; every member must share it")
        members.append(member)
    try:
        return Ensemble(members, tta_mirror_axes=data["tta_mirror_axes"]).eval()
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    except RecursionError:  # nested thousands deep: Python's parser gives up
        raise ValueError(f"{path}: not valid config JSON (nested too deeply to read); expected a JSON object") from None


def _ensemble_section(data: dict[str, Any], path: Path) -> list[str]:
    """The member folder names of an ensemble config.json, after checking every field it holds (strict)."""
    allowed = {"ensemble", "tta_mirror_axes", "metrics", *SHARED_FIELDS}
    unknown, missing = sorted(set(data) - allowed), sorted(allowed - {"metrics", *OPTIONAL_SHARED} - set(data))
    if unknown or missing:
        raise ValueError(f"{path}: ensemble config.json " + (f"has unknown field(s) {unknown}" if unknown else "")
                         + ("; " if unknown and missing else "") + (f"lacks field(s) {missing}" if missing else ""))
    section = data["ensemble"]
    if not isinstance(section, dict) or set(section) != {"format_version", "members", "combine"}:
        raise ValueError(f"{path}: field 'ensemble': expected an object with format_version, members and combine, "
                         f"got {section!r}")
    if section["format_version"] != ENSEMBLE_FORMAT:
        raise ValueError(f"{path}: field 'ensemble.format_version': this nnynet reads {ENSEMBLE_FORMAT}, got "
                         f"{section['format_version']!r}; upgrade nnynet")
    if section["combine"] != COMBINE:
        raise ValueError(f"{path}: field 'ensemble.combine': expected {COMBINE!r}, got {section['combine']!r}")
    try:
        check_mirror_axes(data["tta_mirror_axes"], "tta_mirror_axes")
        names = section["members"]
        _check_member_names(names, None, "ensemble.members")
    except ValueError as e:
        raise ValueError(f"{path}: field {e}") from e
    return list(names)


def _check_member_names(names: Any, count: int | None, field: str) -> None:
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{field}: expected a non-empty list of folder names, got {names!r}")
    if count is not None and len(names) != count:
        raise ValueError(f"{field}: {len(names)} names for {count} members")
    bad = [n for n in names if not _MEMBER_NAME.fullmatch(n)]
    if bad or len(set(names)) != len(names):
        raise ValueError(f"{field}: expected unique plain folder names (letters, digits, '.', '_', '-'; not starting "
                         f"with '.'), got {names!r}")
