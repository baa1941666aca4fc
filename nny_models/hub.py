"""Hugging Face Hub glue: ``NnyNet`` = a zoo network + its ``NnyNetConfig``, saved as safetensors.

A saved model (local directory or Hub repo) holds three files:
    model.safetensors  weights of ``NnyNet`` (keys start with "net.")
    config.json        ``NnyNetConfig.to_dict()``: everything inference needs, never a pickle
    README.md          model card rendered from model_cards/nnynet.md.j2

``PyTorchModelHubMixin`` does the Hub plumbing (push_to_hub, hf_hub_download, caching, revisions).
We override the parts whose defaults do not suit medical weights: loading is strict by default,
safetensors only (no pytorch_model.bin fallback), and a mismatch names the offending keys. Loading reads
config.json and model.safetensors itself (so every error names its file) and goes through the one loader,
``nny_models.transfer.transfer_weights``: ``from_pretrained`` strictly, ``NnyNet.transfer_from`` (fine-tuning
from a pretrained export) leniently, both with the same file checks and one report type, TransferReport.
No ``from __future__ import annotations`` here: the mixin inspects the ``__init__`` annotations.
"""

import json
import logging
import math
import os
import re
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from huggingface_hub import ModelCard, ModelCardData, PyTorchModelHubMixin, hf_hub_download
from huggingface_hub.errors import RemoteEntryNotFoundError
from safetensors import SafetensorError
from torch import Tensor, nn

from nny_models import zoo
from nny_models.config import NnyNetConfig
from nny_models.transfer import Resizer, TransferReport, WeightsMismatchError, transfer_weights

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
ONNX_NAME = "model.onnx"  # nny_models.export.ONNX_FILENAME (not imported: export needs the optional onnx packages)
# model_cards/ at the top of the repository is the template's one source. A wheel ships it as the package data
# nny_models/model_cards/ (pyproject maps the folder there); a checkout or an editable install reads it in place.
_CARD_FILE = "nnynet.md.j2"
MODEL_CARD_TEMPLATE = next(
    (p for p in (Path(__file__).resolve().parent / "model_cards" / _CARD_FILE,
                 Path(__file__).resolve().parents[1] / "model_cards" / _CARD_FILE) if p.is_file()),
    Path(__file__).resolve().parent / "model_cards" / _CARD_FILE,
)
CARD_TAGS = ["medical-imaging", "segmentation", "3d", "ct", "nnynet"]


class NnyNet(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="nnynet",
    license="apache-2.0",
    pipeline_tag="image-segmentation",
    tags=CARD_TAGS,
    paper_url="https://arxiv.org/abs/2501.01406",
):
    """A zoo network (``.net``) plus the config (``.config``) that rebuilds and preprocesses for it.

    ``deep_supervision`` / ``grad_checkpointing`` are training-only switches: they apply where the network
    has them (``nny_models.zoo.training_switches``; ``self.deep_supervision`` / ``self.grad_checkpointing``
    say what is on), are never written to config.json, and save_pretrained leaves the deep-supervision
    heads out of model.safetensors, so the saved model is exactly the inference model.
    """

    def __init__(self, config: NnyNetConfig | dict, *, deep_supervision: bool = False,
                 grad_checkpointing: bool = False) -> None:
        super().__init__()
        if isinstance(config, dict):
            config = NnyNetConfig.from_dict(config)
        elif not isinstance(config, NnyNetConfig):
            raise ValueError(f"NnyNet: config must be an NnyNetConfig or a dict, got {type(config).__name__}")
        # Normalise through JSON form (tuples -> lists) so a model behaves the same before and after a
        # save/load round trip and ``loaded.config == model.config`` holds.
        self.config = NnyNetConfig.from_dict(config.to_dict())
        self._hub_mixin_config = self.config  # what the mixin falls back to; we always pass ours explicitly
        name, has = self.config.model, zoo.training_switches(self.config.model)
        self.deep_supervision = bool(deep_supervision) and "deep_supervision" in has
        self.grad_checkpointing = bool(grad_checkpointing) and "use_checkpoint" in has
        switches = {"deep_supervision": self.deep_supervision, "use_checkpoint": self.grad_checkpointing}
        self.net = zoo.build_model(name, self.config.model_kwargs, **{k: v for k, v in switches.items() if k in has})
        _check_patch_size(self.net, self.config)

    def forward(self, image: Tensor, clinical: Tensor | None = None) -> Tensor | list[Tensor]:
        return self.net(image, clinical)

    def inference_state_dict(self) -> dict[str, Tensor]:
        """The state dict without training-only tensors (deep-supervision heads): what model.safetensors holds."""
        drop = tuple("net." + p for p in zoo.deep_supervision_prefixes(self.config.model))
        return {k: v for k, v in self.state_dict().items() if not (drop and k.startswith(drop))}

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
        """Write model.safetensors (``inference_state_dict()``), config.json (= ``self.config.to_dict()``)
        and README.md. A model.onnx already in ``save_directory`` is deleted (it holds the replaced weights).

        ``model_card_kwargs`` go to the card template: ``training`` (dict of training settings),
        ``trained_on`` (data description; default: synthetic phantoms), ``notes`` (free text).
        """
        if config is not None and _as_config(config).to_dict() != self.config.to_dict():
            raise ValueError("NnyNet.save_pretrained: config.json always mirrors model.config; "
                             "set model.config instead of passing a different config")
        bad = [k for k, t in self.inference_state_dict().items()
               if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:  # such a model predicts garbage (from_pretrained refuses the file): write nothing
            raise ValueError(f"NnyNet.save_pretrained({save_directory}): NaN / Inf in {len(bad)} weight tensor(s), "
                             f"e.g. {bad[:3]}; nothing was written (did the training diverge?)")
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        _remove_stale_onnx(save_directory)
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

    def _save_pretrained(self, save_directory: Path) -> None:
        # Called by the mixin's save_pretrained: the inference tensors only, so from_pretrained loads strictly.
        state = {k: v.detach().cpu().contiguous() for k, v in self.inference_state_dict().items()}
        safetensors.torch.save_file(state, str(Path(save_directory) / WEIGHTS_NAME), metadata={"format": "pt"})

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
        """Load from a save_pretrained directory or a Hub repo id (optionally at ``revision``), in eval mode.

        ``config`` overrides the stored config.json (the weights must still fit it).
        ``strict=False`` loads only the tensors whose names and shapes match, with a warning.
        Errors name the file: an invalid config.json, weights that do not fit, NaN / inf weights.
        """
        hub_kwargs = dict(revision=revision, force_download=force_download, token=token, cache_dir=cache_dir,
                          local_files_only=local_files_only)
        where = str(pretrained_model_name_or_path)
        if config is None:
            config, path = _read_config(pretrained_model_name_or_path, **hub_kwargs)
            where = str(path)
        try:
            model = cls(_as_config(config))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: cannot build the model it describes: {e}") from e
        state, path = _read_weights(pretrained_model_name_or_path, **hub_kwargs)
        model.load_weights(state, strict=strict, source=str(path))
        return model.to(map_location).eval()

    def load_weights(self, state: dict[str, Tensor], *, strict: bool = True, source: str = "state dict"
                     ) -> TransferReport:
        """Load an NnyNet state dict (keys "net.*") through the one loader, ``transfer_weights``.

        strict: the report must be clean, else WeightsMismatchError naming keys and shapes (model untouched).
        Deep-supervision heads in ``state`` that this model does not have are dropped (0.1 saved them).
        """
        drop = tuple("net." + p for p in zoo.deep_supervision_prefixes(self.config.model))
        own = self.state_dict()
        extra = [k for k in state if drop and k.startswith(drop) and k not in own]
        if extra:
            logger.info("%s: %d deep-supervision tensor(s) not used by the inference model dropped", source, len(extra))
            state = {k: v for k, v in state.items() if k not in set(extra)}
        check_weight_dtypes(state, own, source)
        try:
            report = transfer_weights(self, state, strict=strict, source=source)
        except WeightsMismatchError as e:
            raise WeightsMismatchError(
                f"{e}. The model is '{self.config.model}' with model_kwargs {self.config.model_kwargs}: pass the "
                "config these weights were saved with, or strict=False to load only the matching tensors"
            ) from None
        if not report.clean:
            logger.warning("%s; loaded the %d matching tensor(s)", report.mismatch_message(source), len(report.loaded))
        return report

    def transfer_from(
        self,
        source: str | Path,
        *,
        exclude_prefixes: Iterable[str] = (),
        revision: str | None = None,
        resize: Resizer | None = None,
    ) -> TransferReport:
        """Copy the matching tensors of a saved model (directory or Hub repo) into ``self.net``; never strict.

        The source is read as from_pretrained reads it (config.json checked, safetensors only, NaN / inf
        refused). Report keys are ``self.net`` keys, e.g. ``report.fraction_loaded(self.net.encoder_prefixes)``.
        ``exclude_prefixes`` are net keys left as initialised (e.g. ``self.net.head_prefixes``); ``resize``
        may map a mismatched tensor to the target shape (``nny_models.upkern.interpolate_kernel``).
        """
        load_config(source, revision=revision)  # a broken or foreign config.json fails here, named
        state, path = _read_weights(source, revision=revision)
        net_state = {k.removeprefix("net."): v for k, v in state.items()}
        check_weight_dtypes(net_state, self.net.state_dict(), str(path))
        return transfer_weights(self.net, net_state, exclude_prefixes=tuple(exclude_prefixes), resize=resize,
                                source=str(path))


# ---- helpers usable without building a model ------------------------------------------------------


def load_config(repo_or_dir: str | Path, revision: str | None = None, **hub_kwargs: Any) -> NnyNetConfig:
    """Read config.json of a save_pretrained directory or Hub repo into an NnyNetConfig (errors name the file)."""
    return _read_config(repo_or_dir, revision=revision, **hub_kwargs)[0]


def load_state_dict(repo_or_dir: str | Path, revision: str | None = None, **hub_kwargs: Any) -> dict[str, Tensor]:
    """Read model.safetensors (never a pickle) of a directory or Hub repo; keys are NnyNet keys ("net.")."""
    return _read_weights(repo_or_dir, revision=revision, **hub_kwargs)[0]


def check_weight_dtypes(state: dict[str, Tensor], own: dict[str, Tensor], source: str) -> None:
    """Stored dtypes against the model's. Copying casts silently, so integer or boolean data where the model holds
    floating-point weights (or the reverse) would load as a different network: ValueError naming the file and the
    tensors. Floating point of lower precision (fp16 / bf16 weights in the file, fp32 in the model) loads upcast, with
    a warning: the network then differs from the one trained in full precision by the rounding. Tensors the model
    lacks, or whose shapes differ, are left to transfer_weights' report."""
    kind, lower = [], []
    for key, tensor in state.items():
        mine = own.get(key)
        if mine is None or tuple(mine.shape) != tuple(tensor.shape):
            continue
        if tensor.is_floating_point() != mine.is_floating_point() or tensor.is_complex() != mine.is_complex():
            kind.append(f"{key} ({str(tensor.dtype).removeprefix('torch.')}, expected "
                        f"{str(mine.dtype).removeprefix('torch.')})")
        elif tensor.is_floating_point() and torch.finfo(tensor.dtype).bits < torch.finfo(mine.dtype).bits:
            lower.append(key)
    if kind:
        raise ValueError(f"{source}: {len(kind)} tensor(s) stored with a dtype of another kind than the model's, e.g. "
                         f"{', '.join(kind[:3])}; expected the floating-point weights save_pretrained writes")
    if lower:
        dtypes = sorted({str(state[k].dtype).removeprefix("torch.") for k in lower})
        warnings.warn(f"{source}: {len(lower)} tensor(s) stored in lower precision ({', '.join(dtypes)}, e.g. "
                      f"{lower[0]}) than the model's; loaded upcast, so predictions differ slightly from the "
                      "full-precision model's", stacklevel=4)


def _read_config(repo_or_dir: str | Path, **hub_kwargs: Any) -> tuple[NnyNetConfig, Path]:
    path = _resolve_file(repo_or_dir, CONFIG_NAME, **hub_kwargs)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    except RecursionError:  # e.g. [[[[...]]]] nested thousands deep: Python's parser gives up
        raise ValueError(f"{path}: not valid config JSON (nested too deeply to read); expected a JSON object") from None
    try:
        return NnyNetConfig.from_saved(data), path  # every field that decides a prediction must be there
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: invalid config: {e}") from e


def _read_weights(repo_or_dir: str | Path, **hub_kwargs: Any) -> tuple[dict[str, Tensor], Path]:
    path = _resolve_file(repo_or_dir, WEIGHTS_NAME, **hub_kwargs)
    try:
        return safetensors.torch.load_file(str(path), device="cpu"), path
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e


def render_model_card(config: NnyNetConfig, *, training: dict[str, Any] | None = None,
                      trained_on: str | None = None, notes: str | None = None,
                      ensemble: list[dict[str, Any]] | None = None) -> ModelCard:
    """Model card (YAML front matter + markdown) for ``config``, from model_cards/nnynet.md.j2.

    ensemble: for nny_models.ensemble.save_ensemble, one dict per member (name, model, model_kwargs_json,
    tta_mirror_axes); ``config`` then holds the shared fields and the ensemble's tta_mirror_axes."""
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
        trained_on=trained_on or _trained_on(config),
        notes=notes,
        ensemble=ensemble or [],
        tta_axes=_axis_names(config.tta_mirror_axes, config.preprocess.orientation),
    )
    # Optional sections leave runs of blank lines behind; markdown needs at most one.
    return ModelCard(re.sub(r"\n{3,}", "\n\n", card.content))


PHANTOM_DATA = ("synthetic CT phantoms generated by `nny_models.phantoms` (procedural anatomy with CT-like "
                "intensities and noise), not on patient scans")


def _trained_on(config: NnyNetConfig) -> str:
    """What the card says the model was trained on, from the run's plan in config.json: its fingerprint lists
    the training cases, and the embedded phantoms are the only cases named phantom_NNN."""
    fingerprint = (config.plan or {}).get("fingerprint") or {}
    ids = [str(i) for i in fingerprint.get("case_ids") or []]
    if not ids:
        return ("data that config.json does not record (no training plan in it); ask the publisher which data, "
                "and whether they were patient scans or synthetic phantoms")
    if all(re.fullmatch(r"phantom_\d+", i) for i in ids):
        return f"{len(ids)} " + PHANTOM_DATA
    return (f"{len(ids)} cases of the publisher's own data set (case ids {', '.join(ids[:3])}"
            f"{', ...' if len(ids) > 3 else ''}; all are listed in config.json's plan)")


def _axis_names(axes: list[int], orientation: str) -> list[str]:
    """Mirror axes for the card, e.g. ["0 (x, R-L)", "2 (z, S-I)"] for RAS."""
    opposite = {"R": "L", "L": "R", "A": "P", "P": "A", "S": "I", "I": "S"}
    return [f"{a} ({'xyz'[a]}, {orientation[a]}-{opposite[orientation[a]]})" for a in axes]


def _remove_stale_onnx(save_directory: Path) -> None:
    """Delete save_directory/model.onnx before new weights and config.json are written there: it is the graph of
    the weights being replaced, and ``--backend onnxruntime`` would run it with the new config.json. Removed first,
    so an interrupted save leaves no stale export either; export again (nnynet-export) for an ONNX model.
    (nnynet-export writes its file aside and swaps it in, so no half-written export is touched here.)"""
    stale = save_directory / ONNX_NAME
    if stale.is_file() or stale.is_symlink():
        stale.unlink()
        logger.warning("%s removed: it was exported from the weights now being replaced; run nnynet-export --model "
                       "%s again for the ONNX Runtime backend", stale, save_directory)


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
    if os.path.lexists(local):  # a link whose target is gone (or a loop): the local folder is meant, not the Hub
        raise FileNotFoundError(f"{local} is a broken symbolic link (or a link loop); expected a save_pretrained "
                                "directory")
    name = str(repo_or_dir)
    # "runs/model" while ./runs exists is a missing local folder, not the Hub repo "runs/model"
    if isinstance(repo_or_dir, Path) or _looks_like_path(name) or ("/" in name and Path(name.split("/")[0]).is_dir()):
        raise FileNotFoundError(f"model directory {local} not found (a local path, so not looked up on the Hub)")
    try:
        return Path(hf_hub_download(repo_id=str(repo_or_dir), filename=filename, revision=revision, **hub_kwargs))
    except RemoteEntryNotFoundError as e:
        raise FileNotFoundError(f"Hub repo {repo_or_dir} (revision {revision or 'main'}) has no {filename}{hint}") from e


def _check_patch_size(net: nn.Module, config: NnyNetConfig) -> None:
    """The sliding-window patch must suit the network, or predict fails (or pads) deep inside MONAI."""
    check_patch_for(net, config.model, config.patch_size)


def check_patch_for(net: nn.Module, model: str, patch_size: Any, training: bool = False) -> None:
    """ValueError unless ``net`` (zoo model ``model``) takes patches of ``patch_size``. A Swin-NeXt bottleneck of one
    voxel is refused for inference too (``training`` only changes the message): its GroupNorm then normalises
    single values to 0, so a batch of windows gives a mask from no bottleneck features at all, exit 0."""
    patch, div = list(patch_size), int(getattr(net, "size_divisor", 1))
    if any(p % div for p in patch):
        raise ValueError(f"NnyNetConfig.patch_size {patch}: model '{model}' needs every side to be a "
                         f"multiple of {div}")
    img = getattr(net, "img_size", None)  # UNETR's learned position embeddings fix the input size
    if img is not None and tuple(patch) != tuple(img):
        raise ValueError(f"NnyNetConfig.patch_size {patch}: model '{model}' only takes inputs of its "
                         f"img_size {list(img)}")
    if getattr(net, "needs_bottleneck_context", False) and all(p == div for p in patch):
        raise ValueError(f"NnyNetConfig.patch_size {patch}: {'training ' if training else ''}model '{model}' needs a "
                         f"bottleneck of more than one voxel, i.e. at least {2 * div} voxels along one axis")


def _fmt(value: Any) -> str:
    if value is None or isinstance(value, float) and math.isnan(value):
        return "n/a"
    if isinstance(value, (bool, int)):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _metrics_table(metrics: dict[str, Any] | None, label_names: list[str]):
    """config.metrics -> (columns, rows, scalars) of the card's evaluation section.

    One layout, the one ``finetune.run.card_metrics`` writes: scalar entries at the top level
    ("mean_foreground_dice", "miou", "split", ...) and "per_class": {class: {metric: value}}.
    """
    if not metrics:
        return [], [], []
    table = metrics.get("per_class") or {}
    if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
        raise ValueError("NnyNetConfig.metrics.per_class: expected {class: {metric: value}}, "
                         f"got {type(table).__name__}")
    columns = list(dict.fromkeys(m for row in table.values() for m in row))  # first-seen order
    order = [n for n in label_names if n in table] + [n for n in table if n not in label_names]
    rows = [(name, [_fmt(table[name].get(m)) for m in columns]) for name in order]
    scalars = [(k, _fmt(v)) for k, v in metrics.items() if k != "per_class"]
    return columns, rows, scalars


def _clinical_columns(schema: dict[str, Any] | None) -> list[str]:
    """One line per clinical input of a fitted schema: name, type, and the categories of categorical ones."""
    if not schema:
        return []
    from nny_models.clinical import ClinicalSchema

    parsed = ClinicalSchema.from_dict(schema)
    categories = dict(zip(parsed.categorical_columns, parsed.categories))
    out = []
    for name, kind in parsed.column_types.items():
        cats = categories.get(name)
        out.append(f"{name} ({kind}: {', '.join(cats)})" if kind == "categorical" and cats else f"{name} ({kind})")
    out += [f"{name} (ignored: missing in every training row)" for name in parsed.dropped_columns]
    return out


__all__ = ["NnyNet", "TransferReport", "WeightsMismatchError", "load_config", "load_state_dict",
           "render_model_card"]
