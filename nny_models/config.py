"""Configuration dataclasses shared by the library, both training stages and the Hub.

Data flows one way: CLI -> run config (in pretrain/ or finetune/) -> ``NnyNetConfig`` ->
config.json on the Hub -> ``NnyNet.from_pretrained``. Everything here is plain JSON-able.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

DEFAULT_LABELS = ("background", "liver", "tumor", "portal_vein", "aorta")


@dataclass
class PreprocessConfig:
    """Deterministic CT preprocessing, used in training and stored in config.json for inference."""

    spacing: tuple[float, float, float] = (1.5, 1.5, 2.0)  # target voxel spacing in mm (RAS x, y, z)
    hu_window: tuple[float, float] = (-1000.0, 1000.0)  # HU clip range before scaling (MIS-FM default)
    out_range: tuple[float, float] = (-1.0, 1.0)  # the HU window is mapped linearly onto this range
    orientation: str = "RAS"  # axcodes every volume is reoriented to
    crop_foreground: bool = True  # crop to the body (voxels above body_threshold_hu) before training
    body_threshold_hu: float = -500.0  # HU above which a voxel counts as body for the crop

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "PreprocessConfig":
        d = dict(d or {})
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"PreprocessConfig: unknown field(s) {sorted(unknown)}")
        for key in ("spacing", "hu_window", "out_range"):
            if key in d:
                d[key] = tuple(float(v) for v in d[key])
        return cls(**d)


@dataclass
class NnyNetConfig:
    """Everything inference needs, saved as config.json next to model.safetensors."""

    model: str = "nnynet"  # zoo name passed to nny_models.create_model
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # create_model overrides (sizes, fusion, ...)
    label_names: list[str] = field(default_factory=lambda: list(DEFAULT_LABELS))  # index -> class name
    preprocessing: dict[str, Any] = field(default_factory=lambda: PreprocessConfig().to_dict())  # PreprocessConfig
    patch_size: tuple[int, int, int] = (96, 96, 96)  # sliding-window ROI in voxels after preprocessing
    clinical_schema: dict[str, Any] | None = None  # fitted clinical preprocessing (nny_models.clinical), or None
    task: str = "segmentation"  # "segmentation" or "volume_fusion_pretext"
    metrics: dict[str, Any] | None = None  # evaluation summary shown in the model card, or None
    keep_largest: list[str] = field(default_factory=list)  # labels forming one organ (e.g. liver, tumor): predict
    # keeps only its largest connected component (nny_models.postprocess); empty = raw argmax

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "NnyNetConfig":
        d = dict(d)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"NnyNetConfig: unknown field(s) {sorted(unknown)} in config.json")
        if "patch_size" in d:
            d["patch_size"] = tuple(int(v) for v in d["patch_size"])
        config = cls(**d)
        unknown = sorted(set(config.keep_largest) - set(config.label_names))
        if unknown:
            raise ValueError(f"NnyNetConfig: keep_largest names {unknown} are not labels {config.label_names}")
        return config

    @property
    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.preprocessing)


def _plain(obj: Any) -> Any:
    """Tuples -> lists, recursively, so that a dict round-trips through JSON unchanged."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
