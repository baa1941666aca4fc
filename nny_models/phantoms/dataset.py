"""Write phantoms as an MSD-style dataset (NIfTI + dataset.json + clinical.csv) and preview them."""

from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from .clinical import COLUMN_TYPES, COLUMNS
from .generate import PhantomCase, generate_phantom
from .randomization import Randomization, get_randomization

GENERATOR_VERSION = 5  # bump when the generated world changes: the embedded cache folder name carries it
# (3: the x axis is no longer mirrored, see fields.Grid.affine; 4: patient table, mattress and arms, surroundings.py;
# 5: unenhanced scans and fatty livers, randomization.py)
LABELS = {"0": "background", "1": "liver", "2": "tumor", "3": "portal_vein", "4": "aorta"}


def case_seed(seed: int, index: int) -> int:
    """Independent per-case seed, so case i does not depend on how many cases are written."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _write_case(args) -> dict:
    out, index, seed, preset, unlabeled, rand = args
    import nibabel as nib

    case_id = f"phantom_{index:03d}"
    case = generate_phantom(case_seed(seed, index), preset=preset, labeled=not unlabeled, case_id=case_id,
                            randomization=rand)
    entry = {"image": f"./imagesTr/{case_id}.nii.gz"}
    nib.save(_nifti(case.image.astype(np.int16), case), out / entry["image"])
    if not unlabeled:
        entry["label"] = f"./labelsTr/{case_id}.nii.gz"
        nib.save(_nifti(case.label, case), out / entry["label"])
    return {"entry": entry, "clinical": case.clinical, "appearance": {"case_id": case_id, **case.appearance}}


def _nifti(array: np.ndarray, case: PhantomCase):
    import nibabel as nib

    img = nib.Nifti1Image(array, case.affine)
    img.header.set_zooms(case.spacing)
    img.header.set_xyzt_units("mm")
    img.set_qform(case.affine, code=1)
    img.set_sform(case.affine, code=1)
    return img


def write_dataset(out_dir, cases: int, seed: int, *, unlabeled: bool = False, preset: str = "demo",
                  workers: int = 1, randomization: str | Randomization | None = None) -> Path:
    """Generate ``cases`` phantoms into ``out_dir`` (imagesTr/, labelsTr/ unless unlabeled, dataset.json,
    clinical.csv keyed by case_id, appearance.csv with each case's randomized parameters).

    randomization: "train" (default), "ood" (a shifted held-out set: appearance at the edges of or outside
    the training ranges, nny_models.phantoms.randomization), "unenhanced" (non-contrast scans, half of them of
    fatty livers) or a Randomization. Returns the output directory."""
    import pandas as pd

    if cases < 1:
        raise ValueError(f"write_dataset: cases must be >= 1, got {cases}")
    rand = get_randomization(randomization)
    out = Path(out_dir)
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    if not unlabeled:
        (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    jobs = [(out, i, seed, preset, unlabeled, rand) for i in range(cases)]
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(_write_case, jobs))
    else:
        results = [_write_case(j) for j in jobs]
    pd.DataFrame([r["clinical"] for r in results], columns=COLUMNS).to_csv(out / "clinical.csv", index=False)
    # Declared column types (nny_models.clinical reads this sidecar), so that a small table whose categorical
    # codes look numeric (BCLC "0") is never typed by guesswork.
    (out / "clinical.types.json").write_text(json.dumps(COLUMN_TYPES, indent=2) + "\n")
    pd.DataFrame([r["appearance"] for r in results]).to_csv(out / "appearance.csv", index=False)
    meta = {
        "name": "nnynet-phantoms",
        "description": f"Procedural abdominal CT phantoms (preset {preset}, randomization {rand.name}, seed {seed}, "
                       f"generator v{GENERATOR_VERSION})",
        "generator_version": GENERATOR_VERSION, "seed": seed,
        "randomization": rand.to_dict(),
        "tensorImageSize": "3D", "modality": {"0": "CT"}, "labels": dict(LABELS),
        "numTraining": cases, "numTest": 0, "training": [r["entry"] for r in results], "test": [],
        "clinical": "clinical.csv",
    }
    (out / "dataset.json").write_text(json.dumps(meta, indent=2))
    return out


def embedded_dataset(cases: int, seed: int, *, unlabeled: bool = False, root: str | Path | None = None) -> Path:
    """The embedded default data set: phantoms generated once into ROOT (default ~/.cache/nnynet or $NNYNET_CACHE).

    Both training scripts fall back to it when no --data_dir is given; a second call reuses the files.
    """
    import os

    root = Path(root or os.environ.get("NNYNET_CACHE") or Path.home() / ".cache" / "nnynet")
    out = root / f"phantoms_v{GENERATOR_VERSION}_{'unlabeled' if unlabeled else 'labeled'}_{cases}_seed{seed}"
    if not (out / "dataset.json").is_file():  # dataset.json is written last: its presence means complete
        write_dataset(out, cases=cases, seed=seed, unlabeled=unlabeled, workers=min(2, os.cpu_count() or 1))
    return out


def save_preview(case: PhantomCase, path) -> Path:
    """A few axial slices and one coronal slice with label overlays (W400/L40)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    img, lab, sp = case.image, case.label, case.spacing
    colors = ListedColormap([(0, 0, 0, 0), (0.2, 0.8, 0.2, 0.35), (1, 0.1, 0.1, 0.6), (0.2, 0.4, 1, 0.7), (1, 0.8, 0, 0.7)])
    nz = img.shape[2]
    if lab is not None and (lab == 2).any():
        zt = int(np.argmax((lab == 2).sum((0, 1))))
    else:
        zt = nz // 2
    zs = sorted({int(0.92 * nz), int(0.72 * nz), zt, int(0.35 * nz)}, reverse=True)
    fig, axes = plt.subplots(2, len(zs) + 1, figsize=(4 * (len(zs) + 1), 8))
    kw = dict(cmap="gray", vmin=-160, vmax=240, origin="lower", interpolation="nearest")
    for col, k in enumerate(zs):
        for row in range(2):
            ax = axes[row, col]
            ax.imshow(img[:, :, k].T, **kw)
            if row == 1 and lab is not None:
                ax.imshow(lab[:, :, k].T, cmap=colors, vmin=0, vmax=4, origin="lower", interpolation="nearest")
            ax.set_title(f"axial z={k}")
            ax.axis("off")
    liver_y = int(np.argmax((lab == 1).sum((0, 2)))) if lab is not None and (lab == 1).any() else img.shape[1] // 2
    for row in range(2):
        ax = axes[row, -1]
        ax.imshow(img[:, liver_y, :].T, aspect=sp[2] / sp[0], **kw)
        if row == 1 and lab is not None:
            ax.imshow(lab[:, liver_y, :].T, cmap=colors, vmin=0, vmax=4, origin="lower", aspect=sp[2] / sp[0],
                      interpolation="nearest")
        ax.set_title(f"coronal y={liver_y}")
        ax.axis("off")
    fig.suptitle(f"{case.case_id}  spacing {tuple(round(s, 2) for s in sp)}  shape {img.shape}")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=70)
    plt.close(fig)
    return path
