"""nnynet: Swin-NeXt networks, clinical fusion, CT preprocessing and Hub glue.

Names are imported lazily so that ``import nny_models`` (and the CLI's --help) stays fast.
This package never imports accelerate or training code.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "create_model": "nny_models.zoo",
    "Ensemble": "nny_models.ensemble",
    "load_model": "nny_models.ensemble",
    "MirrorTTA": "nny_models.tta",
    "save_ensemble": "nny_models.ensemble",
    "list_models": "nny_models.zoo",
    "NnyNet": "nny_models.hub",
    "NnyNetConfig": "nny_models.config",
    "PreprocessConfig": "nny_models.config",
    "predict": "nny_models.inference",
    "transfer_weights": "nny_models.transfer",
    "upkern_load": "nny_models.upkern",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'nny_models' has no attribute {name!r}")
