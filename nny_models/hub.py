"""Hugging Face Hub glue: ``NnyNet`` = a zoo network + its ``NnyNetConfig``, saved as safetensors.

A saved model (local directory or Hub repo) holds three files:
    model.safetensors  weights of ``NnyNet`` (keys start with "net.")
    config.json        ``NnyNetConfig.to_dict()``: everything inference needs, never a pickle
    README.md          model card rendered from model_cards/nnynet.md.j2

``PyTorchModelHubMixin`` does the Hub plumbing (push_to_hub, hf_hub_download, caching, revisions).
We override the parts whose defaults do not suit medical weights: loading is strict by default,
safetensors only (no pytorch_model.bin fallback), and a mismatch names the offending keys.
No ``from __future__ import annotations`` here: the mixin inspects the ``__init__`` annotations.
"""

import json
import logging
import math
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import safetensors.torch
from huggingface_hub import ModelCard, ModelCardData, PyTorchModelHubMixin, hf_hub_download
from huggingface_hub.errors import RemoteEntryNotFoundError
from torch import Tensor, nn

from nny_models.config import NnyNetConfig
from nny_models.zoo import create_model

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# model_cards/ at the top of the repository is the template's one source. A wheel ships it as the package data
# nny_models/model_cards/ (pyproject maps the folder there); a checkout or an editable install reads it in place.
_CARD_FILE = "nnynet.md.j2"
MODEL_CARD_TEMPLATE = next(
    (p for p in (Path(__file__).resolve().parent / "model_cards" / _CARD_FILE,
                 Path(__file__).resolve().parents[1] / "model_cards" / _CARD_FILE) if p.is_file()),
    Path(__file__).resolve().parent / "model_cards" / _CARD_FILE,
)
CARD_TAGS = ["medical-imaging", "segmentation", "3d", "ct", "nnynet"]


class WeightsMismatchError(ValueError):
    """Checkpoint tensors do not match the network built from the config."""


class NnyNet(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="nnynet",
    license="apache-2.0",
    pipeline_tag="image-segmentation",
    tags=CARD_TAGS,
    paper_url="https://arxiv.org/abs/2501.01406",
):
    """A zoo network (``.net``) plus the config (``.config``) that rebuilds and preprocesses for it."""

    def __init__(self, config: NnyNetConfig | dict) -> None:
        super().__init__()
        if isinstance(config, dict):
            config = NnyNetConfig.from_dict(config)
        elif not isinstance(config, NnyNetConfig):
            raise ValueError(f"NnyNet: config must be an NnyNetConfig or a dict, got {type(config).__name__}")
        # Normalise through JSON form (tuples -> lists) so a model behaves the same before and after a
        # save/load round trip and ``loaded.config == model.config`` holds.
        self.config = NnyNetConfig.from_dict(config.to_dict())
        self._hub_mixin_config = self.config  # what the mixin falls back to; we always pass ours explicitly
        self.net = create_model(self.config.model, **self.config.model_kwargs)

    def forward(self, image: Tensor, clinical: Tensor | None = None) -> Tensor | list[Tensor]:
        return self.net(image, clinical)

    # ---- saving -------------------------------------------------------------------------------

    def save_pretrained(
        self,
        save_directory: str | Path,
        *,
        config: NnyNetConfig | dict | None = None,
        repo_id: str | None = None,
        push_to_hub: bool = False,
        model_card_kwargs: dict[str, Any] | None = None,
        **push_to_hub_kwargs: Any,
    ) -> str | None:
        """Write model.safetensors, config.json (= ``self.config.to_dict()``) and README.md.

        ``model_card_kwargs`` go to the card template: ``training`` (dict of training settings),
        ``trained_on`` (data description; default: synthetic phantoms), ``notes`` (free text).
        """
        if config is not None and _as_config(config).to_dict() != self.config.to_dict():
            raise ValueError("NnyNet.save_pretrained: config.json always mirrors model.config; "
                             "set model.config instead of passing a different config")
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        # The mixin never overwrites an existing README.md: write ours first so a re-save refreshes it.
        self.generate_model_card(**(model_card_kwargs or {})).save(save_directory / "README.md")
        return super().save_pretrained(
            save_directory,
            config=self.config.to_dict(),
            repo_id=repo_id,
            push_to_hub=push_to_hub,
            model_card_kwargs=model_card_kwargs,
            **push_to_hub_kwargs,
        )

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        """Render model_cards/nnynet.md.j2 with the config, metrics and citations."""
        return render_model_card(self.config, **kwargs)

    # ---- loading ------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        revision: str | None = None,
        strict: bool = True,
        config: NnyNetConfig | dict | None = None,
        map_location: str = "cpu",
        force_download: bool = False,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
    ) -> "NnyNet":
        """Load from a save_pretrained directory or a Hub repo id (optionally at ``revision``).

        ``config`` overrides the stored config.json (the weights must still fit it).
        ``strict=False`` loads only the tensors whose names and shapes match, with a warning.
        """
        extra = {} if config is None else {"config": _as_config(config)}
        return super().from_pretrained(
            pretrained_model_name_or_path,
            revision=revision,
            strict=strict,
            map_location=map_location,
            force_download=force_download,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            **extra,
        )

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        config: NnyNetConfig | dict | None = None,
        map_location: str = "cpu",
        strict: bool = True,
        **unused: Any,
    ) -> "NnyNet":
        # Called by the mixin with config = parsed config.json (or None when the file is missing).
        if unused:
            raise TypeError(f"NnyNet.from_pretrained: unexpected argument(s) {sorted(unused)}")
        if config is None:
            raise FileNotFoundError(f"{model_id}: no {CONFIG_NAME} found (revision={revision}); "
                                    "expected a directory or repo written by NnyNet.save_pretrained")
        model = cls(config)
        state = load_state_dict(model_id, revision=revision, cache_dir=cache_dir, force_download=force_download,
                                token=token, local_files_only=local_files_only)
        model.load_weights(state, strict=strict, source=f"{model_id}/{WEIGHTS_NAME}")
        return model.to(map_location).eval()

    def load_weights(self, state: dict[str, Tensor], *, strict: bool = True, source: str = "state dict") -> None:
        """Load an NnyNet state dict; with strict, any missing/unexpected/mis-shaped key is an error."""
        missing, unexpected, mismatched = _compare_state_dict(self, state)
        if missing or unexpected or mismatched:
            msg = _mismatch_message(source, self.config, missing, unexpected, mismatched)
            if strict:
                raise WeightsMismatchError(msg + "\nPass the config these weights were saved with, "
                                           "or strict=False to load only the matching tensors.")
            logger.warning(msg)
        bad = set(unexpected) | {k for k, _, _ in mismatched}
        self.load_state_dict({k: v for k, v in state.items() if k not in bad}, strict=False)


# ---- helpers usable without building a model (fine-tuning transfers weights with these) ----------


def load_config(repo_or_dir: str | Path, revision: str | None = None, **hub_kwargs: Any) -> NnyNetConfig:
    """Read config.json of a save_pretrained directory or Hub repo into an NnyNetConfig."""
    path = _resolve_file(repo_or_dir, CONFIG_NAME, revision=revision, **hub_kwargs)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object with NnyNetConfig fields, got {type(data).__name__}")
    return NnyNetConfig.from_dict(data)


def load_state_dict(repo_or_dir: str | Path, revision: str | None = None, **hub_kwargs: Any) -> dict[str, Tensor]:
    """Read model.safetensors (never a pickle) of a directory or Hub repo; keys are NnyNet keys ("net.")."""
    path = _resolve_file(repo_or_dir, WEIGHTS_NAME, revision=revision, **hub_kwargs)
    return safetensors.torch.load_file(str(path), device="cpu")


def render_model_card(config: NnyNetConfig, *, training: dict[str, Any] | None = None,
                      trained_on: str | None = None, notes: str | None = None) -> ModelCard:
    """Model card (YAML front matter + markdown) for ``config``, from model_cards/nnynet.md.j2."""
    if not MODEL_CARD_TEMPLATE.is_file():
        raise FileNotFoundError(f"model card template {MODEL_CARD_TEMPLATE} not found: the nnynet installation is "
                                "incomplete (the wheel ships it as nny_models/model_cards/); reinstall nnynet")
    card_data = ModelCardData(
        library_name="nnynet",
        license="apache-2.0",
        pipeline_tag="image-segmentation",
        tags=sorted(set(CARD_TAGS + ["pytorch_model_hub_mixin", "model_hub_mixin"])),
    )
    columns, rows, scalars = _metrics_table(config.metrics, config.label_names)
    card = ModelCard.from_template(
        card_data,
        template_path=str(MODEL_CARD_TEMPLATE),
        cfg=config,
        pre=config.preprocess,
        model_kwargs_json=json.dumps(config.model_kwargs, sort_keys=True),
        clinical_columns=_clinical_columns(config.clinical_schema),
        metric_columns=columns,
        metric_rows=rows,
        metric_scalars=scalars,
        training=training or {},
        trained_on=trained_on,
        notes=notes,
    )
    # Optional sections leave runs of blank lines behind; markdown needs at most one.
    return ModelCard(re.sub(r"\n{3,}", "\n\n", card.content))


def _as_config(config: NnyNetConfig | dict) -> NnyNetConfig:
    return config if isinstance(config, NnyNetConfig) else NnyNetConfig.from_dict(config)


def _looks_like_path(name: str) -> bool:
    # A Hub repo id is "name" or "namespace/name"; anything else is meant as a local path.
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def _resolve_file(repo_or_dir: str | Path, filename: str, *, revision: str | None = None, **hub_kwargs: Any) -> Path:
    """Local path of ``filename`` in a directory, or downloaded (cached) from a Hub repo."""
    local = Path(repo_or_dir).expanduser()
    hint = " (nnynet reads safetensors only; pickled pytorch_model.bin files are refused)" \
        if filename == WEIGHTS_NAME else ""
    if local.is_dir():
        path = local / filename
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found{hint}")
        return path
    if local.exists():
        raise ValueError(f"{local} is a file; expected a save_pretrained directory or a Hub repo id")
    if isinstance(repo_or_dir, Path) or _looks_like_path(str(repo_or_dir)):
        raise FileNotFoundError(f"model directory {local} does not exist")
    try:
        return Path(hf_hub_download(repo_id=str(repo_or_dir), filename=filename, revision=revision, **hub_kwargs))
    except RemoteEntryNotFoundError as e:
        raise FileNotFoundError(f"Hub repo {repo_or_dir} (revision {revision or 'main'}) has no {filename}{hint}") from e


def _compare_state_dict(model: nn.Module, state: dict[str, Tensor]):
    """(missing, unexpected, [(key, checkpoint_shape, model_shape)]) of ``state`` against ``model``."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        # safetensors stores tied tensors once: a key is not missing if a tensor sharing its memory was saved.
        groups: dict[tuple, set[str]] = defaultdict(set)
        for k, v in own.items():
            groups[(v.data_ptr(), tuple(v.shape))].add(k)
        missing = [k for k in missing
                   if own[k].numel() == 0 or not (groups[(own[k].data_ptr(), tuple(own[k].shape))] & state.keys())]
    unexpected = [k for k in state if k not in own]
    mismatched = [(k, tuple(state[k].shape), tuple(v.shape))
                  for k, v in own.items() if k in state and state[k].shape != v.shape]
    return missing, unexpected, mismatched


def _mismatch_message(source: str, config: NnyNetConfig, missing, unexpected, mismatched, show: int = 8) -> str:
    def listing(keys: list[str]) -> str:
        more = f" ... (+{len(keys) - show} more)" if len(keys) > show else ""
        return ", ".join(keys[:show]) + more

    lines = [f"{source} does not fit model '{config.model}' (model_kwargs={config.model_kwargs}): "
             f"{len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} shape-mismatched tensor(s)"]
    if missing:
        lines.append(f"  missing in checkpoint: {listing(missing)}")
    if unexpected:
        lines.append(f"  unexpected in checkpoint: {listing(unexpected)}")
    if mismatched:
        shapes = [f"{k} checkpoint {list(a)} vs model {list(b)}" for k, a, b in mismatched]
        lines.append(f"  shape mismatch: {listing(shapes)}")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None or isinstance(value, float) and math.isnan(value):
        return "n/a"
    if isinstance(value, (bool, int)):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, dict) and "mean" in value:
        return _fmt(value["mean"]) + (f" ± {_fmt(value['std'])}" if "std" in value else "")
    return str(value)


def _metrics_table(metrics: dict[str, Any] | None, label_names: list[str]):
    """Split config.metrics into a per-class table (columns, rows) and other scalar entries.

    Accepts {class: {metric: value}} at the top level or under "per_class", and also the transposed
    {metric: {class: value}}; values may be numbers or {"mean", "std"} dicts.
    """
    if not metrics:
        return [], [], []
    per_class = metrics.get("per_class", metrics)
    table = {k: v for k, v in per_class.items() if isinstance(v, dict) and "mean" not in v}
    if table and not set(table) & set(label_names) and any(set(v) & set(label_names) for v in table.values()):
        transposed: dict[str, dict[str, Any]] = defaultdict(dict)
        for metric, by_class in table.items():
            for name, value in by_class.items():
                transposed[name][metric] = value
        table = dict(transposed)
    columns = list(dict.fromkeys(m for row in table.values() for m in row))  # first-seen order
    order = [n for n in label_names if n in table] + [n for n in table if n not in label_names]
    rows = [(name, [_fmt(table[name].get(m, "")) for m in columns]) for name in order]
    scalars = [(k, _fmt(v)) for k, v in metrics.items() if k != "per_class" and k not in table
               and (not isinstance(v, dict) or "mean" in v)]
    return columns, rows, scalars


def _clinical_columns(schema: dict[str, Any] | None) -> list[str]:
    """Column names (with type when known) of a fitted clinical schema, for the card."""
    if not schema:
        return []
    columns = schema.get("columns", [])
    if isinstance(columns, dict):
        columns = [{"name": k, **(v if isinstance(v, dict) else {"type": v})} for k, v in columns.items()]
    out = []
    for col in columns:
        if isinstance(col, dict):
            kind = col.get("type") or col.get("kind")
            out.append(f"{col.get('name', '?')} ({kind})" if kind else str(col.get("name", "?")))
        else:
            out.append(str(col))
    return out


__all__ = ["NnyNet", "WeightsMismatchError", "load_config", "load_state_dict", "render_model_card"]
