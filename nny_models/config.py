"""Configuration dataclasses shared by the library, both training stages and the Hub.

Data flows one way: CLI -> run config (in pretrain/ or finetune/) -> ``NnyNetConfig`` ->
config.json on the Hub -> ``NnyNet.from_pretrained``. Everything here is plain JSON-able, and both
dataclasses validate themselves when built, so a bad value fails where it is read, with its field named
(``nny_models.hub.load_config`` adds the config.json path).

config.json formats (``NnyNetConfig.format_version``):
    1  model_kwargs are the explicit arguments of the network (``nny_models.zoo.resolve_model_kwargs``);
       nothing in them depends on a preset table or on training-only switches.
    0  (no format_version field; written by nnynet 0.1) model_kwargs held a preset name ("size": "tiny")
       and sometimes training switches (deep_supervision, use_checkpoint). Read through
       ``nny_models.zoo.upgrade_v0_model_kwargs``, against a frozen copy of the 0.1 presets, so that
       later preset edits never change what an old checkpoint means.

A saved config.json (``NnyNetConfig.from_saved``: what from_pretrained, load_config and the ONNX backend read)
must state every field that decides what the model predicts (``REQUIRED_FIELDS``); only fields newer than its
format, whose absence means the behaviour of the code that wrote it, may be absent. Code that builds a config
(``NnyNetConfig(...)``, ``from_dict``) may still leave fields at their defaults.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_LABELS = ("background", "liver", "tumor", "portal_vein", "aorta")
FORMAT_VERSION = 1  # the config.json format this code writes (see the module docstring)
TASKS = ("segmentation", "volume_fusion_pretext")
SPACING_RANGE_MM = (0.05, 50.0)  # a voxel spacing outside this range is a header or config error, not a CT


@dataclass
class PreprocessConfig:
    """Deterministic CT preprocessing, used in training and stored in config.json for inference."""

    spacing: tuple[float, float, float] = (1.5, 1.5, 2.0)  # target voxel spacing in mm (RAS x, y, z)
    hu_window: tuple[float, float] = (-1000.0, 1000.0)  # HU clip range before scaling (MIS-FM default)
    out_range: tuple[float, float] = (-1.0, 1.0)  # the HU window is mapped linearly onto this range
    orientation: str = "RAS"  # axcodes every volume is reoriented to
    crop_foreground: bool = True  # crop to the body (voxels above body_threshold_hu) before training
    body_threshold_hu: float = -500.0  # HU above which a voxel counts as body for the crop
    normalization: dict[str, Any] | None = None  # planned CT normalization (nny_models.planning.CTNormalization:
    # clip to foreground HU percentiles, then z-score); None = the linear hu_window -> out_range mapping

    def __post_init__(self) -> None:
        lo, hi = SPACING_RANGE_MM
        self.spacing = _floats(self.spacing, 3, "spacing")
        if not all(lo <= s <= hi for s in self.spacing):
            raise ValueError(f"PreprocessConfig.spacing: expected 3 voxel sizes in [{lo}, {hi}] mm, "
                             f"got {list(self.spacing)}")
        for name in ("hu_window", "out_range"):
            low, high = _floats(getattr(self, name), 2, name)
            if not low < high:
                raise ValueError(f"PreprocessConfig.{name}: expected [low, high] with low < high, got [{low}, {high}]")
            setattr(self, name, (low, high))
        axes = str(self.orientation).upper()
        if len(axes) != 3 or sorted(_AXIS_OF[c] for c in axes if c in _AXIS_OF) != [0, 1, 2]:
            raise ValueError(f"PreprocessConfig.orientation: expected 3 axcodes, one of L/R, A/P and S/I each "
                             f"(e.g. 'RAS'), got {self.orientation!r}")
        self.orientation = axes
        if not isinstance(self.crop_foreground, bool):
            raise ValueError(f"PreprocessConfig.crop_foreground: expected true or false, got {self.crop_foreground!r}")
        self.body_threshold_hu = _floats([self.body_threshold_hu], 1, "body_threshold_hu")[0]
        if self.normalization is not None:
            from nny_models.planning import CTNormalization  # lazy: planning reads volumes

            try:
                self.normalization = CTNormalization.from_dict(dict(self.normalization)).to_dict()
            except (TypeError, ValueError) as e:
                raise ValueError(f"PreprocessConfig.normalization: {e}") from e

    @property
    def air_value(self) -> float:
        """The intensity air (-1000 HU) has after preprocessing: what sliding windows and patches pad with."""
        if self.normalization is not None:
            n = self.normalization
            return (max(-1000.0, n["clip_low"]) - n["mean"]) / n["std"]
        a_min, a_max = self.hu_window
        b_min, b_max = self.out_range
        return b_min + (min(max(-1000.0, a_min), a_max) - a_min) / (a_max - a_min) * (b_max - b_min)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "PreprocessConfig":
        d = dict(d or {})
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"PreprocessConfig: unknown field(s) {sorted(unknown)}")
        return cls(**d)


def check_lesion_in_organ(rule: Any, label_names: list[str]) -> dict[str, Any] | None:
    """NnyNetConfig.lesion_in_organ, checked against the label map: None, or {"lesion": name, "organ": name,
    "min_contact": a share in (0, 1]}."""
    if rule is None:
        return None
    where = "NnyNetConfig.lesion_in_organ"
    if not isinstance(rule, dict) or set(rule) != {"lesion", "organ", "min_contact"}:
        raise ValueError(f"{where}: expected null or an object with lesion, organ and min_contact, got {rule!r}")
    for key in ("lesion", "organ"):
        if rule[key] not in label_names:
            raise ValueError(f"{where}.{key}: {rule[key]!r} is not a label of {label_names}")
    if rule["lesion"] == rule["organ"] or label_names[0] in (rule["lesion"], rule["organ"]):
        raise ValueError(f"{where}: lesion and organ must be two different foreground labels, got {rule!r}")
    contact = rule["min_contact"]
    if isinstance(contact, bool) or not isinstance(contact, (int, float)) or not 0.0 < contact <= 1.0:
        raise ValueError(f"{where}.min_contact: expected a share in (0, 1], got {contact!r}")
    return {"lesion": rule["lesion"], "organ": rule["organ"], "min_contact": float(contact)}


_AXIS_OF = {"L": 0, "R": 0, "A": 1, "P": 1, "S": 2, "I": 2}
LABEL_RESAMPLING = ("nearest", "probabilities")  # NnyNetConfig.label_resampling's values


@dataclass
class NnyNetConfig:
    """Everything inference needs, saved as config.json next to model.safetensors."""

    model: str = "nnynet"  # zoo name passed to nny_models.create_model
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # explicit network arguments
    # (nny_models.zoo.resolve_model_kwargs); a "size" key is resolved against the presets when the config is built
    label_names: list[str] = field(default_factory=lambda: list(DEFAULT_LABELS))  # index -> class name
    preprocessing: dict[str, Any] = field(default_factory=lambda: PreprocessConfig().to_dict())  # PreprocessConfig
    patch_size: tuple[int, int, int] = (96, 96, 96)  # sliding-window ROI in voxels after preprocessing
    clinical_schema: dict[str, Any] | None = None  # fitted clinical preprocessing (nny_models.clinical), or None
    task: str = "segmentation"  # "segmentation" or "volume_fusion_pretext"
    metrics: dict[str, Any] | None = None  # evaluation summary shown in the model card, or None
    keep_largest: list[str] = field(default_factory=list)  # labels forming one organ (e.g. liver, tumor): predict
    # keeps only its largest connected component (nny_models.postprocess); empty = raw argmax
    keep_side: str | None = None  # "right" / "left": keep_largest keeps the largest component on that side of the
    # patient (the liver's is the right) unless it is under a quarter of the largest; None = the largest (models
    # saved before 2026-12-02, whose files lack the field, predict exactly as before)
    single_component: list[str] = field(default_factory=list)  # labels that are each one connected structure (e.g.
    # the aorta, a tube through every slice): predict keeps each one's largest component on its own, after
    # keep_largest; [] = none (models saved before 2026-12-07, whose files lack the field, predict exactly as before)
    lesion_in_organ: dict[str, Any] | None = None  # {"lesion": "tumor", "organ": "liver", "min_contact": 0.5}:
    # after keep_largest, predict sets to background each lesion component whose surface touches the organ on less
    # than min_contact of its voxels (nny_models.postprocess.drop_lesions_outside); None = no such step (models
    # saved before 2026-12-06, whose files lack the field, predict exactly as before)
    label_resampling: str = "nearest"  # how predict brings the labels from the model grid back to the CT's:
    # "probabilities" = the softmax resampled linearly, then its argmax, post-processing's removals kept (nnU-Net's
    # export; nny_models.preprocessing.restore_labels_from_probabilities); "nearest" = the model grid's labels by
    # nearest neighbour, in steps of its voxels (models saved before 2026-12-07, whose files lack the field)
    plan: dict[str, Any] | None = None  # the training run's plan (nny_models.planning.Plan.to_dict()), kept for
    # provenance; inference replays `preprocessing` and `patch_size`, which already hold what the plan set
    tta_mirror_axes: list[int] = field(default_factory=list)  # axes (0, 1, 2 of the preprocessed volume, e.g.
    # RAS x, y, z) the network was trained mirrored along (finetune --flip_axes), so mirror test-time augmentation
    # (nny_models.tta) may average over them; [] = no TTA (absent in older files). Mirroring along an axis not
    # trained on (the default left-right: it hides the liver / spleen side) would blur the prediction.
    format_version: int = FORMAT_VERSION  # config.json format (module docstring); absent in a file = 0

    def __post_init__(self) -> None:
        from nny_models import zoo  # lazy: zoo imports torch and MONAI

        if self.format_version not in (0, FORMAT_VERSION):
            raise ValueError(f"NnyNetConfig.format_version: this nnynet reads formats 0 and {FORMAT_VERSION}, "
                             f"got {self.format_version!r}; upgrade nnynet")
        if not isinstance(self.model, str) or self.model not in zoo.list_models():
            raise ValueError(f"NnyNetConfig.model: unknown model {self.model!r}; expected one of {zoo.list_models()}")
        if not isinstance(self.model_kwargs, dict):
            raise ValueError(f"NnyNetConfig.model_kwargs: expected an object, got {type(self.model_kwargs).__name__}")
        if self.format_version == 0:
            self.model_kwargs, notes = zoo.upgrade_v0_model_kwargs(self.model, self.model_kwargs)
            logger.info("config format 0 (nnynet 0.1) read: %s; save the model again to write format %d",
                        "; ".join(notes), FORMAT_VERSION)
            self.format_version = FORMAT_VERSION
        else:
            self.model_kwargs = _explicit_kwargs(self.model, self.model_kwargs)
        self._check_labels()
        self.preprocessing = _section("preprocessing", PreprocessConfig.from_dict, self.preprocessing).to_dict()
        patch = self.patch_size
        if not isinstance(patch, (list, tuple)) or len(patch) != 3 or \
                not all(isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in patch):
            raise ValueError(f"NnyNetConfig.patch_size: expected 3 positive integers, got {patch!r}")
        self.patch_size = tuple(patch)
        if self.task not in TASKS:
            raise ValueError(f"NnyNetConfig.task: expected one of {list(TASKS)}, got {self.task!r}")
        self._check_clinical()
        if self.metrics is not None and not isinstance(self.metrics, dict):  # the card and publish read it as one
            raise ValueError(f"NnyNetConfig.metrics: expected an object (the evaluation summary) or null, "
                             f"got {type(self.metrics).__name__}")
        self.tta_mirror_axes = check_mirror_axes(self.tta_mirror_axes, "NnyNetConfig.tta_mirror_axes")
        if self.label_resampling not in LABEL_RESAMPLING:
            raise ValueError(f"NnyNetConfig.label_resampling: expected one of {list(LABEL_RESAMPLING)}, "
                             f"got {self.label_resampling!r}")

    def _check_labels(self) -> None:
        names = self.label_names
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"NnyNetConfig.label_names: expected a list of non-empty names, got {names!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"NnyNetConfig.label_names: names must be unique, got {names}")
        out = self.model_kwargs.get("out_channels")
        if out != len(names):
            raise ValueError(f"NnyNetConfig.label_names: {len(names)} names {names} for a network with "
                             f"out_channels={out} (model_kwargs); expected one name per output channel")
        if not isinstance(self.keep_largest, list) or not all(isinstance(n, str) for n in self.keep_largest):
            raise ValueError(f"NnyNetConfig.keep_largest: expected a list of label names, got {self.keep_largest!r}")
        unknown = sorted(set(self.keep_largest) - set(names))
        if unknown:
            raise ValueError(f"NnyNetConfig.keep_largest: names {unknown} are not labels {names}")
        if not isinstance(self.single_component, list) or not all(isinstance(n, str) for n in self.single_component):
            raise ValueError("NnyNetConfig.single_component: expected a list of label names, got "
                             f"{self.single_component!r}")
        unknown = sorted(set(self.single_component) - set(names))
        if unknown:
            raise ValueError(f"NnyNetConfig.single_component: names {unknown} are not labels {names}")
        if self.keep_side not in (None, "right", "left"):
            raise ValueError(f"NnyNetConfig.keep_side: expected 'right', 'left' or null, got {self.keep_side!r}")
        self.lesion_in_organ = check_lesion_in_organ(self.lesion_in_organ, names)

    def _check_clinical(self) -> None:
        schema = self.clinical_schema
        if schema is None:
            return
        from nny_models.clinical import ClinicalSchema

        parsed = _section("clinical_schema", ClinicalSchema.from_dict, schema)
        features = self.model_kwargs.get("clinical_features", 0)
        if self.model_kwargs.get("fusion", "none") != "none" and parsed.num_features != features:
            raise ValueError(f"NnyNetConfig.clinical_schema: the schema makes {parsed.num_features} features but "
                             f"model_kwargs.clinical_features is {features}")

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "NnyNetConfig":
        """From config.json's object; a dict without format_version is format 0 (nnynet 0.1)."""
        if not isinstance(d, dict):
            raise ValueError(f"NnyNetConfig: expected a JSON object, got {type(d).__name__}")
        if "ensemble" in d:  # nny_models.ensemble.save_ensemble's folder: k models, no single network here
            raise ValueError("this config.json describes an ensemble of models (field 'ensemble'); load it with "
                             "nny_models.load_model, which returns an Ensemble, not with NnyNet.from_pretrained")
        d = {"format_version": 0, **d}
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"NnyNetConfig: unknown field(s) {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_saved(cls, d: dict[str, Any]) -> "NnyNetConfig":
        """From a saved config.json's object (or an ONNX export's nnynet_config): like from_dict, but a field that
        decides the prediction (``REQUIRED_FIELDS``) must be there: no default stands in for what the model was
        trained with. ValueError "field 'preprocessing.spacing' is missing; expected ..." (callers add the path)."""
        version = d.get("format_version", 0) if isinstance(d, dict) else None
        if isinstance(version, int) and version in REQUIRED_FIELDS and "ensemble" not in d:  # else from_dict says why
            check_saved_fields(d)
        return cls.from_dict(d)

    def inference_dict(self) -> dict[str, Any]:
        """to_dict() without the descriptive fields (``DESCRIPTIVE_FIELDS``): everything predict depends on."""
        return {k: v for k, v in self.to_dict().items() if k not in DESCRIPTIVE_FIELDS}

    @property
    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.preprocessing)


# What a saved config.json must hold, by format_version (absent = 0). Each of these fields has been written by
# every nnynet since config.json existed, so a file without one was edited or truncated, and a default in its place
# (1.5 x 1.5 x 2 mm, 96-voxel windows, the default label names, ...) would predict a different mask. Fields added
# later are not here: their absence means what the older code did, and the dataclass default says exactly that
# (keep_largest, keep_side, single_component, lesion_in_organ, tta_mirror_axes, plan, preprocessing.normalization;
# tests/nny_models/test_hub.py::test_card_states_post_processing holds keep_largest to that). metrics is descriptive.
_REQUIRED = ("model", "model_kwargs", "label_names", "preprocessing", "patch_size", "clinical_schema", "task")
REQUIRED_FIELDS: dict[int, tuple[str, ...]] = {0: _REQUIRED, 1: _REQUIRED}
REQUIRED_PREPROCESSING = ("spacing", "hu_window", "out_range", "orientation", "crop_foreground", "body_threshold_hu")
# format 1 stores the explicit network arguments; these four every zoo network takes (nny_models.zoo.BASE_KWARGS)
REQUIRED_MODEL_KWARGS_V1 = ("in_channels", "out_channels", "fusion", "clinical_features")
DESCRIPTIVE_FIELDS = ("metrics", "plan")  # change no prediction: the card's metrics, the plan kept for provenance
_EXPECTED = {
    "model": "the zoo network name, e.g. \"nnynet\"",
    "model_kwargs": "the network's arguments, an object",
    "label_names": "the class name of each output channel, in order",
    "preprocessing": "the preprocessing the model was trained with, an object",
    "patch_size": "the sliding-window size in voxels the model was trained with, [x, y, z]",
    "clinical_schema": "the fitted clinical preprocessing, or null for a model without clinical inputs",
    "task": "\"segmentation\" or \"volume_fusion_pretext\"",
    "preprocessing.spacing": "the voxel spacing in mm the model was trained at, [x, y, z]",
    "preprocessing.hu_window": "the HU clip range [low, high] the model was trained with",
    "preprocessing.out_range": "the intensity range [low, high] the HU window is mapped onto",
    "preprocessing.orientation": "the axcodes volumes are reoriented to, e.g. \"RAS\"",
    "preprocessing.crop_foreground": "true or false (crop to the body before training)",
    "preprocessing.body_threshold_hu": "the HU above which a voxel counts as body",
}


def check_saved_fields(d: dict[str, Any]) -> None:
    """ValueError naming the first field of ``REQUIRED_FIELDS`` (by ``d``'s format_version) that ``d`` lacks,
    and what it should hold; also a preset "size" in format-1 model_kwargs (its meaning would follow the presets
    of the reading code, not what was trained). Values are checked later, by the dataclasses."""
    version = d.get("format_version", 0)
    missing = [name for name in REQUIRED_FIELDS[version] if name not in d]
    pre = d.get("preprocessing")
    if isinstance(pre, dict):
        missing += [f"preprocessing.{name}" for name in REQUIRED_PREPROCESSING if name not in pre]
    kwargs = d.get("model_kwargs")
    if version == 1 and isinstance(kwargs, dict):
        if "size" in kwargs:
            raise ValueError(f"field 'model_kwargs.size': a format-1 config.json holds the explicit network "
                             f"arguments, not a preset name (got size {kwargs['size']!r}); write the arguments "
                             "the model was trained with (nny_models.zoo.resolve_model_kwargs)")
        missing += [f"model_kwargs.{name}" for name in REQUIRED_MODEL_KWARGS_V1 if name not in kwargs]
    if missing:
        name = missing[0]
        expected = _EXPECTED.get(name) or f"the network argument {name.split('.', 1)[1]!r}"
        more = f" (also missing: {', '.join(missing[1:])})" if len(missing) > 1 else ""
        raise ValueError(f"field '{name}' is missing; expected {expected}{more}. A saved config.json must state "
                         "it: no default is assumed for what the model was trained with")


ABSENT = "<absent>"  # first_difference's value for a key one side lacks


def first_difference(a: Any, b: Any, where: str = "") -> tuple[str, Any, Any] | None:
    """(dotted field name, value in a, value in b) of the first place two JSON-like values differ, or None.
    Objects are walked key by key (a's order, then b's extra keys; a missing key's value is ``ABSENT``); other
    values are compared whole."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in [*a, *(k for k in b if k not in a)]:
            name = f"{where}.{key}" if where else str(key)
            if key not in a or key not in b:
                return name, a.get(key, ABSENT), b.get(key, ABSENT)
            found = first_difference(a[key], b[key], name)
            if found is not None:
                return found
        return None
    same = a == b and isinstance(a, bool) == isinstance(b, bool)  # true is not 1 here
    return None if same else (where or "<value>", a, b)


def check_mirror_axes(axes: Any, name: str) -> list[int]:
    """``axes`` as a sorted list of unique spatial axes among 0, 1, 2, or a ValueError naming ``name``."""
    ok = isinstance(axes, (list, tuple)) and all(isinstance(a, int) and not isinstance(a, bool) for a in axes)
    if not ok or not set(axes) <= {0, 1, 2} or len(set(axes)) != len(axes):
        raise ValueError(f"{name}: expected a list of unique spatial axes among 0, 1, 2 (e.g. [] or [0, 2]), "
                         f"got {axes!r}")
    return sorted(axes)


def _explicit_kwargs(model: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Format-1 model_kwargs, made complete: a "size" is resolved now (code may pass one for convenience),
    training switches are dropped with a warning, the zoo-wide defaults fill what is absent."""
    from nny_models import zoo

    kwargs = dict(kwargs)
    switches = sorted(set(kwargs) & set(zoo.TRAINING_SWITCHES))
    if switches:
        warnings.warn(f"NnyNetConfig.model_kwargs: {switches} are training-only switches and are not stored in "
                      "config.json; pass NnyNet(config, deep_supervision=..., grad_checkpointing=...) instead",
                      stacklevel=4)
        for key in switches:
            del kwargs[key]
    if "size" in kwargs:
        return _plain(zoo.resolve_model_kwargs(model, kwargs.pop("size"), **kwargs))
    return _plain({**zoo.BASE_KWARGS, **kwargs})


def _section(name: str, parse, value: Any):
    """parse(value), with errors prefixed by the NnyNetConfig field they come from."""
    if not isinstance(value, dict):
        raise ValueError(f"NnyNetConfig.{name}: expected an object, got {type(value).__name__}")
    try:
        return parse(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"NnyNetConfig.{name}: {e}") from e


def _floats(value: Any, n: int, name: str) -> tuple[float, ...]:
    """``value`` as n finite floats, or a ValueError naming the PreprocessConfig field."""
    try:
        out = tuple(float(v) for v in value)
        ok = len(out) == n and all(math.isfinite(v) for v in out) and not any(isinstance(v, bool) for v in value)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"PreprocessConfig.{name}: expected {n} finite number(s), got {value!r}")
    return out


def _plain(obj: Any) -> Any:
    """Tuples -> lists, recursively, so that a dict round-trips through JSON unchanged."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
