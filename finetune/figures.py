"""Figures for fine-tuning runs: training curves and axial overlay grids (matplotlib, Agg backend)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

# A fixed colour per label index so every figure of every run reads the same way.
CLASS_COLORS = ["#000000", "#2ca02c", "#d62728", "#1f77b4", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2"]
DEFAULT_NAMES = ("background", "liver", "tumor", "portal_vein", "aorta")


def _number(v: Any) -> bool:
    """A plottable scalar: Python or numpy int / float (np.float32 is no float subclass), not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def _window(image: np.ndarray) -> tuple[float, float]:
    """The 1-99 percentile grey window over the finite voxels: one NaN would make np.percentile NaN and the
    image panels blank."""
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [1, 99])
    return float(lo), float(hi)


def radiological(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """``volume`` (X, Y, Z) reordered to LAS so that the overlays, drawn with x across and y up, show an axial
    slice as radiologists read it: the patient's right on the viewer's left, anterior up, whatever the file's
    voxel order (nibabel.orientations; a file in LPS or RAS order would otherwise come out mirrored)."""
    import nibabel.orientations as ornt

    transform = ornt.ornt_transform(ornt.io_orientation(np.asarray(affine)), ornt.axcodes2ornt(("L", "A", "S")))
    return np.ascontiguousarray(ornt.apply_orientation(np.asarray(volume), transform))


def plot_training_curves(history: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """One panel per numeric key of ``history`` (e.g. loss, lr, val_dice) against "step"; PNG at ``path``.

    Keys may appear only in some entries (validation every N steps): each panel plots the steps
    where its key is present."""
    if not history:
        raise ValueError("plot_training_curves: empty history")
    if any("step" not in h for h in history):
        raise ValueError("plot_training_curves: every history entry needs a 'step'")
    keys: list[str] = []
    for h in history:
        for k, v in h.items():
            if k != "step" and k not in keys and _number(v):
                keys.append(k)
    if not keys:
        raise ValueError("plot_training_curves: history has no numeric values besides 'step'")

    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(h["step"], float(h[key])) for h in history if _number(h.get(key)) and math.isfinite(h[key])]
        if pts:
            steps, values = zip(*pts)
            ax.plot(steps, values, marker="o" if len(pts) < 30 else None, markersize=3)
            spans_decades = min(values) > 0 and max(values) / min(values) > 100
            if key in ("lr", "learning_rate") or (key.endswith("loss") and spans_decades):
                ax.set_yscale("log")  # learning rates and long loss curves span decades
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (parents created) and free it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _pick_slices(gt: np.ndarray, pred: np.ndarray, n: int, tumor: int | None = 2) -> list[int]:
    """Axial (z) slices spread over the tumor extent (label ``tumor``; else any ground-truth foreground, else any
    predicted, else the middle), always including the slice where that structure is largest."""
    masks = ([gt == tumor] if tumor is not None else []) + [gt > 0, pred > 0]
    for mask in masks:
        area = mask.sum(axis=(0, 1))
        zs = np.nonzero(area)[0]
        if len(zs):
            picks = np.linspace(zs[0], zs[-1], n + 2)[1:-1].round().astype(int) if n > 1 else np.array([0])
            best = int(np.argmax(area))
            picks[np.argmin(np.abs(picks - best))] = best
            return sorted(set(picks.tolist()))
    return [gt.shape[2] // 2]


def save_overlays(
    image: np.ndarray,
    gt: np.ndarray,
    pred: np.ndarray,
    path: str | Path,
    label_names: Sequence[str] = DEFAULT_NAMES,
    n_slices: int = 3,
    alpha: float = 0.45,
) -> Path:
    """Grid of axial slices: rows = image / ground truth overlay / prediction overlay.

    image (X, Y, Z) in HU or preprocessed intensities (shown with a 1-99 percentile window);
    gt and pred (X, Y, Z) integer labels. Slices go through the largest tumor (else liver) extent."""
    image, gt, pred = (np.asarray(a) for a in (image, gt, pred))
    if image.ndim == 4 and image.shape[0] == 1:
        image = image[0]
    if image.ndim != 3 or gt.shape != image.shape or pred.shape != image.shape:
        raise ValueError(
            "save_overlays: expected image, gt and pred of one (X, Y, Z) shape, "
            f"got {image.shape}, {gt.shape}, {pred.shape}"
        )
    for name, labels in (("gt", gt), ("pred", pred)):  # colours are indexed by label: negatives / NaN have none
        if labels.size and (not np.isfinite(labels).all() or labels.min() < 0):
            raise ValueError(f"save_overlays: {name} must hold labels >= 0, got NaN or negative values")
    gt, pred = gt.astype(np.int64), pred.astype(np.int64)
    n_labels = max(len(label_names), int(max(gt.max(), pred.max())) + 1)
    colors = [CLASS_COLORS[i % len(CLASS_COLORS)] for i in range(n_labels)]
    cmap = ListedColormap(colors)
    lo, hi = _window(image)
    tumor = list(label_names).index("tumor") if "tumor" in label_names else None  # not always label 2
    slices = _pick_slices(gt, pred, n_slices, tumor)

    fig, axes = plt.subplots(3, len(slices), figsize=(3.2 * len(slices), 3.3 * 3), squeeze=False)
    for col, z in enumerate(slices):
        # transpose so x runs left-right and y up-down (RAS: anterior up)
        img = image[:, :, z].T
        for row, (title, labels) in enumerate((("image", None), ("ground truth", gt), ("prediction", pred))):
            ax = axes[row, col]
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, origin="lower", interpolation="nearest")
            if labels is not None:
                lab = labels[:, :, z].T
                ax.imshow(np.ma.masked_equal(lab, 0), cmap=cmap, vmin=0, vmax=n_labels - 1, alpha=alpha,
                          origin="lower", interpolation="nearest")  # fmt: skip
            ax.set_title(f"{title}, z={z}", fontsize=9)
            ax.axis("off")
    present = sorted((set(np.unique(gt).tolist()) | set(np.unique(pred).tolist())) - {0})
    names = list(label_names) + [f"label {i}" for i in range(len(label_names), n_labels)]
    handles = [Patch(color=colors[i], label=names[i]) for i in present]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return _save(fig, path)


def save_attention_overlay(
    image: np.ndarray,
    attention: np.ndarray,
    path: str | Path,
    labels: np.ndarray | None = None,
    z: int | None = None,
    title: str = "clinical-query attention",
    alpha: float = 0.5,
) -> Path:
    """Axial slice through the liver: CT, and the attention map (``nny_models.attention``) over it.

    image, attention and labels (optional, label 1 = liver) are (X, Y, Z) on one grid. The slice is ``z``,
    else the one with the most liver (labels == 1, else any label), else the middle. The attention colour
    scale spans 0 .. the map's 99th percentile (1.0 = uniform attention); label outlines are drawn in white."""
    image, attention = np.asarray(image), np.asarray(attention, dtype=np.float32)
    labels = None if labels is None else np.asarray(labels)  # a list / tensor is indexed as an array below
    if image.ndim != 3 or attention.shape != image.shape or (labels is not None and np.shape(labels) != image.shape):
        raise ValueError(
            "save_attention_overlay: expected image, attention (and labels) of one (X, Y, Z) shape, got "
            f"{image.shape}, {attention.shape}" + ("" if labels is None else f", {np.shape(labels)}")
        )
    if not np.isfinite(attention).all():
        raise ValueError("save_attention_overlay: the attention map contains NaN or infinite values")
    if z is None:
        z = image.shape[2] // 2
        if labels is not None:
            for mask in (labels == 1, labels > 0):
                area = mask.sum(axis=(0, 1))
                if area.any():
                    z = int(np.argmax(area))
                    break
    lo, hi = _window(image)
    top = float(np.percentile(attention, 99)) or 1.0
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 4.4))
    for ax, overlay in zip(axes, (False, True)):
        ax.imshow(image[:, :, z].T, cmap="gray", vmin=lo, vmax=hi, origin="lower", interpolation="nearest")
        if overlay:
            # 0 exactly = outside the body crop, where no attention was computed: left uncoloured
            shown = ax.imshow(np.ma.masked_equal(attention[:, :, z].T, 0), cmap="inferno", vmin=0, vmax=top,
                              alpha=alpha, origin="lower", interpolation="bilinear")  # fmt: skip
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="attention (1 = uniform)")
        if labels is not None and labels[:, :, z].any():
            ax.contour(labels[:, :, z].T, levels=np.arange(0.5, labels.max() + 1), colors="white", linewidths=0.6,
                       origin="lower")  # fmt: skip
        ax.set_title(f"{title}, z={z}" if overlay else f"CT, z={z}", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)
