"""Post-processing of predicted label volumes.

The one step the field agrees on for liver CT: the liver is a single organ, so keep only the largest connected
component of (liver + liver tumors) and drop the rest. That removes spleen voxels called liver and tumor
voxels outside the liver (both are the usual false positives), and keeps a tumor on the liver border joined to
its liver.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage


def keep_largest_component(
    pred: np.ndarray | torch.Tensor, labels: int | Sequence[int]
) -> np.ndarray | torch.Tensor:
    """Keep the largest 26-connected component of the union of ``labels`` (one organ, e.g. liver + tumor) in
    a (X, Y, Z) label volume; voxels of those labels outside it become background. Other labels are untouched.
    Returns the same type (and device) as ``pred``.

    Same result as ``monai.transforms.KeepLargestConnectedComponent(applied_labels, independent=False,
    connectivity=3)``, which needs scikit-image (not a dependency here), so scipy.ndimage.label does the
    labelling."""
    if np.ndim(pred) != 3:
        raise ValueError(
            f"keep_largest_component: expected a (X, Y, Z) label volume, got shape {tuple(np.shape(pred))}"
        )
    labels = [labels] if isinstance(labels, int) else [int(v) for v in labels]
    is_tensor = isinstance(pred, torch.Tensor)
    out = pred.detach().cpu().numpy().copy() if is_tensor else np.array(pred, copy=True)
    organ = np.isin(out, labels)
    components, n = ndimage.label(organ, structure=np.ones((3, 3, 3), bool))
    if n > 1:
        largest = 1 + int(np.argmax(np.bincount(components.ravel())[1:]))
        out[organ & (components != largest)] = 0
    return torch.as_tensor(out, device=pred.device) if is_tensor else out


def label_indices(label_names: Sequence[str], names: Sequence[str]) -> list[int]:
    """Indices of ``names`` in ``label_names``; names the label map does not have are skipped (a model
    without a tumor class still gets its liver cleaned)."""
    return [list(label_names).index(n) for n in names if n in label_names]


def rightward_offset(pred: np.ndarray, labels: Sequence[int], orientation: str = "RAS") -> float | None:
    """Where the union of ``labels`` lies across the volume: its centroid's offset from the centre of the x
    axis as a fraction of the axis length, positive towards the patient's right; None when the labels are
    absent. ``pred`` is (X, Y, Z) on a grid reoriented to ``orientation`` (preprocessing's axcodes) and cropped
    to the body, so the axis centre is close to the body's midline; the liver's centroid lies well right of it
    (about +0.15 to +0.3), the spleen's well left."""
    axis = [i for i, code in enumerate(orientation.upper()) if code in "LR"][0]
    where = np.nonzero(np.isin(np.asarray(pred), list(labels)))[axis]
    if where.size == 0:
        return None
    offset = (where.mean() + 0.5) / pred.shape[axis] - 0.5
    return float(offset if orientation.upper()[axis] == "R" else -offset)
