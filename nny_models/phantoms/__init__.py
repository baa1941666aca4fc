"""Procedural abdominal CT phantoms with liver / tumor / portal vein / aorta labels and a clinical row.

    from nny_models.phantoms import generate_phantom, write_dataset
    case = generate_phantom(0)                      # PhantomCase: image (HU), label, spacing, affine, clinical
    write_dataset("data/phantoms", cases=20, seed=0)  # MSD layout + clinical.csv
    write_dataset("data/shifted", cases=6, seed=1, randomization="ood")  # shifted held-out set

CLI: ``python -m nny_models.phantoms --out DIR --cases N --seed S [--unlabeled] [--preset demo|ct|test]
[--randomization train|ood] [--preview]``. Randomization ranges: nny_models.phantoms.randomization.
"""

from .generate import PhantomCase, generate_phantom
from .presets import PRESETS
from .randomization import PHASE_HU, RANDOMIZATIONS, Randomization
from .dataset import embedded_dataset, save_preview, write_dataset

__all__ = ["PhantomCase", "generate_phantom", "write_dataset", "embedded_dataset", "save_preview", "PRESETS",
           "Randomization", "RANDOMIZATIONS", "PHASE_HU"]
