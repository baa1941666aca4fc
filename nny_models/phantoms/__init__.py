"""Procedural abdominal CT phantoms with liver / tumor / portal vein / aorta labels and a clinical row.

    from nny_models.phantoms import generate_phantom, write_dataset
    case = generate_phantom(0)                      # PhantomCase: image (HU), label, spacing, affine, clinical
    write_dataset("data/phantoms", cases=20, seed=0)  # MSD layout + clinical.csv

CLI: ``python -m nny_models.phantoms --out DIR --cases N --seed S [--unlabeled] [--preset demo|ct] [--preview]``.
"""

from .generate import PhantomCase, generate_phantom
from .presets import PRESETS
from .dataset import embedded_dataset, save_preview, write_dataset

__all__ = ["PhantomCase", "generate_phantom", "write_dataset", "embedded_dataset", "save_preview", "PRESETS"]
