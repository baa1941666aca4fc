"""Sliding-window inference on a whole CT volume, returned on the input's own voxel grid.

    mask = predict(model, "ct.nii.gz")                         # path: loaded with nny_models.io
    mask = predict(model, volume_hu, spacing=(0.8, 0.8, 3.0))  # array in HU + spacing (+ affine)

Steps: check the input looks like a CT in HU -> preprocess exactly as in training
(``model.config.preprocess``: reorient, resample, HU window, body crop) -> clinical row -> vector
(``model.config.clinical_schema``) -> MONAI ``sliding_window_inference`` with Gaussian blending of
softmax probabilities -> argmax -> back to the original grid (same shape, same affine).
"""

from __future__ import annotations

import contextlib
import functools
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from nny_models.postprocess import label_indices, postprocess_labels, rightward_offset
from nny_models.config import NnyNetConfig

# The CT intensity check (air / fat / soft-tissue / bone modes of the histogram) lives in hu_check.
from nny_models.hu_check import MIN_AXIS_VOXELS, check_ct_volume  # noqa: F401  (re-exported)


def _config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(
            "predict: the model has no .config (NnyNetConfig); load it with NnyNet.from_pretrained "
            "or wrap the network in NnyNet(config)"
        )
    return config


def _uses_fusion(model: nn.Module) -> bool:
    """True when the network has a clinical fusion module (NnyNet keeps the network in .net)."""
    net = getattr(model, "net", model)
    return getattr(net, "fusion", None) is not None


def read_clinical(
    clinical: Any, case_id: str | list[str] | None = None, image: str | None = None
) -> dict[str, Any] | np.ndarray:
    """The image's clinical row as a dict (nny_models.clinical.read_clinical_row: a dict, a pandas row /
    DataFrame, or a .json / .csv file), checked against the image's ``case_id`` when the rows carry one.

    A numeric array is passed through (an already encoded feature vector).
    """
    if isinstance(clinical, (np.ndarray, torch.Tensor, list, tuple)) and not (
        isinstance(clinical, list) and clinical and isinstance(clinical[0], dict)
    ):
        return np.asarray(clinical, dtype=np.float32).reshape(-1)
    from nny_models.clinical import read_clinical_row

    return read_clinical_row(clinical, case_id, image=image)


def missing_clinical_columns(schema: dict[str, Any] | None, row: dict[str, Any]) -> list[str]:
    """Schema columns absent from ``row`` (present-but-empty values are ordinary missing values)."""
    if schema is None:
        return []
    from nny_models.clinical import ClinicalSchema

    columns = ClinicalSchema.from_dict(schema).columns
    return [c for c in columns if c not in row]


def clinical_vector(
    model: nn.Module, clinical: Any, case_id: str | list[str] | None = None, image: str | None = None
) -> torch.Tensor | None:
    """The (1, F) float tensor handed to the network, or None (no clinical input / no fusion).

    case_id: the image's case id(s) (nny_models.clinical.image_case_ids); a row for another case is refused."""
    if clinical is None:
        return None  # a fusion model uses its learned "no clinical data" embedding
    if hasattr(model, "encode_clinical"):  # an Ensemble encodes the row once per member (nny_models.ensemble)
        return model.encode_clinical(clinical, case_id, image)
    if not _uses_fusion(model):
        warnings.warn("predict: the model was trained without clinical fusion; the clinical data is ignored")
        return None
    row = read_clinical(clinical, case_id, image)
    if isinstance(row, np.ndarray):
        vector = row[None]
    else:
        schema = _config(model).clinical_schema
        if schema is None:
            raise ValueError(
                "predict: the model's config has no clinical_schema, so a clinical row cannot be encoded; "
                "pass an encoded feature vector instead"
            )
        from nny_models.clinical import ClinicalSchema

        # the schema warns about absent columns / unknown categories and imputes them
        source = str(clinical) if isinstance(clinical, (str, Path)) else None  # named in value errors
        vector = np.asarray(ClinicalSchema.from_dict(schema).transform(row, source=source), dtype=np.float32)
        vector = vector.reshape(1, -1)
    expected = getattr(getattr(model, "net", model).fusion, "clinical_features", None)
    if expected is not None and vector.shape[1] != expected:
        raise ValueError(f"clinical: the model expects {expected} features, got {vector.shape[1]}")
    return torch.from_numpy(vector)


def check_device(device: str | torch.device | None, name: str = "predict: device") -> torch.device:
    """The torch.device to run on (None: cuda if available, else cpu), or a ValueError naming ``name`` for a device
    this machine cannot run: a misspelt one, CUDA (or cuda:N) where there is none, MPS off a Mac, or a type predict
    does not run on (meta, xpu, ...). Checked before any work: torch would fail only when the model moves."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{name} {str(device)!r}: expected cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name} {str(device)!r}: CUDA is not available on this machine (use cpu)")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"{name} {str(device)!r}: this machine has {count} CUDA device(s); expected cuda:0 to "
                             f"cuda:{count - 1}")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"{name} {str(device)!r}: MPS (Apple GPU) is not available on this machine (use cpu)")
    elif dev.type != "cpu":
        raise ValueError(f"{name} {str(device)!r}: expected cpu, cuda, cuda:N or mps (predict does not run on "
                         f"{dev.type} devices)")
    return dev


def warn_if_bf16_is_slow(precision: str, device: torch.device, amp: bool) -> None:
    """An explicit precision "bf16" where bf16_is_fast(device) is False runs, but emulated: slower than fp32 (a CPU
    without AMX / AVX512-BF16, a GPU before Ampere), and "auto" would have chosen fp32. Say so instead of silently
    running slower."""
    if amp and precision == "bf16" and not bf16_is_fast(device):
        where = "this CPU has no AMX or AVX512-BF16" if device.type == "cpu" else f"{device} has no native bf16"
        warnings.warn(f"predict: precision 'bf16' on {device.type}: {where}, so bf16 is emulated and slower than "
                      "fp32; precision 'auto' (the default) or 'fp32' runs fp32 here", stacklevel=3)


PRECISIONS = ("auto", "bf16", "fp32")


def bf16_is_fast(device: torch.device | str) -> bool:
    """True where bf16 autocast runs convolutions and matmuls faster than fp32.

    CUDA (tensor cores since Ampere; older GPUs emulate bf16 slowly) and x86 CPUs with AMX or AVX512-BF16
    (Sapphire Rapids and later Xeons, Zen 4+); measured here (AMX): the tiny nnynet forward 3.2x faster.
    Plain AVX2 / AVX-512 CPUs convert bf16 in software and run it slower than fp32.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu":
        return False
    try:  # torch's own CPUID checks (private, but present since 2.1)
        if torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported():
            return True
    except AttributeError:
        pass
    try:  # Linux: the kernel lists the ISA extensions it enabled
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("amx_bf16", "avx512_bf16"))


def resolve_precision(precision: str, device: torch.device | str) -> bool:
    """True for bf16 autocast: precision "bf16", or "auto" where bf16_is_fast(device); False for "fp32"."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return bf16_is_fast(device)
    return precision == "bf16"


@functools.lru_cache(maxsize=8)
def gaussian_importance_map(patch_size: tuple[int, int, int], device: str, sigma_scale: float = 0.125) -> torch.Tensor:
    """MONAI's Gaussian window weights (sliding_window_inference's mode="gaussian"), computed once per
    (patch size, device) instead of once per volume."""
    from monai.data.utils import compute_importance_map

    weights = compute_importance_map(tuple(patch_size), mode="gaussian", sigma_scale=sigma_scale, device=device)
    return weights[None, None]  # (1, 1, *patch_size), as sliding_window_inference uses its own


class _StageTimer:
    """Wall-clock seconds per stage into ``timings`` (a dict, or None = do nothing)."""

    def __init__(self, timings: dict[str, float] | None, device: torch.device) -> None:
        self.timings, self.device = timings, device

    @contextlib.contextmanager
    def __call__(self, stage: str):
        if self.timings is None:
            yield
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start


@contextlib.contextmanager
def channels_last_on_cpu(model: nn.Module, device: torch.device):
    """Run ``model`` with channels-last (NDHWC) weights on a CPU, then put it back in PyTorch's default layout.

    oneDNN then runs the 3D convs without a layout reorder around each one (bench/inference.py, Intel Xeon with
    AMX: sliding windows 24.0 -> 17.1 s in fp32, 17.1 -> 15.5 s in bf16). Training steps were slower in this layout
    in a one-off timing, so the default layout comes back for a model that goes on training (fine-tuning
    validates through predict). Elsewhere (CUDA) nothing changes."""
    if device.type != "cpu":
        yield
        return
    model.to(memory_format=torch.channels_last_3d)
    try:
        yield
    finally:
        model.to(memory_format=torch.contiguous_format)


def check_memory(grid_shape: tuple[int, ...], original_shape: tuple[int, ...], num_classes: int,
                 device: torch.device, name: str, *, smooth: bool = False, probabilities: bool = False,
                 extra_maps: int = 0) -> None:
    """Refuse, before the sliding window starts, a volume whose float32 maps would not fit in the memory that
    is free now: the kernel's OOM killer ends the process with no message (exit 137), which a user cannot tell
    from a crash. Counted, as maps of the model grid: on ``device`` the blended probabilities (one per class),
    MONAI's count map, ``extra_maps`` (the attention map) and, on CUDA, the input moved there (on the CPU it is
    already allocated); on the CPU the probabilities brought back from CUDA when they are needed and the copy
    that restoring the labels edits (``smooth``: config.label_resampling "probabilities"); with
    ``probabilities`` the classes on the original grid too. Free memory is psutil's ``available`` (page cache
    counts as free) or, on CUDA, torch.cuda.mem_get_info."""
    import psutil

    grid, original = float(np.prod(grid_shape)), float(np.prod(original_shape))
    cuda = device.type == "cuda"
    on_device = 4 * grid * (num_classes + 1 + extra_maps + int(cuda))
    host_maps = num_classes * (int(cuda and (smooth or probabilities)) + int(smooth))
    on_host = 4 * grid * host_maps + (4 * original * num_classes if probabilities else 0)
    needs = [("host", on_host if cuda else on_device + on_host, psutil.virtual_memory().available)]
    if cuda:
        needs.append((str(device), on_device, torch.cuda.mem_get_info(device)[0]))
    for where, need, free in needs:
        if need > free:
            raise ValueError(
                f"{name}: segmenting it on the model grid {tuple(int(s) for s in grid_shape)} with {num_classes} "
                f"classes needs about {need / 1024**3:.1f} GiB of {where} memory for the probability maps, but only "
                f"{free / 1024**3:.1f} GiB is free; nothing was written. Crop the CT to the abdomen, free memory, "
                "or run on a machine with more" + (" (or leave out --probabilities)" if probabilities else ""))


def sliding_window_probs(
    model: nn.Module,
    x: torch.Tensor,
    patch_size: tuple[int, int, int],
    clinical: torch.Tensor | None = None,
    *,
    overlap: float = 0.5,
    sw_batch_size: int = 4,  # 4 windows per forward: less CPU time per window (bench/RESULTS.md)
    device: torch.device | str = "cpu",
    amp: bool = False,
    cval: float = -1.0,
    timings: dict[str, float] | None = None,
    attention: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities (B, C, X, Y, Z) of a preprocessed volume x (B, 1, X, Y, Z), Gaussian-blended.

    Windows of ``patch_size`` run through ``model(patch, clinical=...)`` under bf16 autocast when
    ``amp``; the clinical row (1, F) is repeated for every window in a batch. ``timings`` (a dict) gets
    "network" (forward passes + softmax) and "windows" (the whole call: cropping, padding, blending too).
    attention: also return the clinical query's attention map (B, 1, X, Y, Z), captured in the same forward
    passes and blended like the probabilities (nny_models.attention; the model needs an attention fusion).
    """
    device = torch.device(device)
    stage = _StageTimer(timings, device)
    if attention:
        from nny_models.attention import attention_fusion, capturing, upsampled_map

        fusion = attention_fusion(model)

    def window_probs(patch: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        with stage("network"):
            c = None if clinical is None else clinical.to(patch.device).expand(patch.shape[0], -1)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                if not attention:
                    return model(patch, clinical=c).float().softmax(dim=1)
                with capturing(fusion):
                    logits = model(patch, clinical=c)
            return logits.float().softmax(dim=1), upsampled_map(fusion, tuple(patch.shape[2:]))

    model.eval().to(device)
    with stage("windows"), channels_last_on_cpu(model, device):
        return sliding_window_inference(
            x.to(device),
            roi_size=tuple(patch_size),
            sw_batch_size=sw_batch_size,
            predictor=window_probs,
            overlap=overlap,
            mode="gaussian",
            cval=cval,
            sw_device=device,
            device=device,
            roi_weight_map=gaussian_importance_map(tuple(int(p) for p in patch_size), str(device)),
        )


def read_ct_input(image: np.ndarray | str | Path, spacing: Any = None, affine: np.ndarray | None = None,
                  caller: str = "predict") -> tuple[np.ndarray, np.ndarray, str]:
    """(HU volume, 4x4 affine, name for messages) of predict's image argument: a path read with
    nny_models.io.load_volume, or an array with its ``spacing`` (mm) or ``affine``."""
    if isinstance(image, (str, Path)):
        from nny_models.io import load_volume

        volume, affine = load_volume(image)
        return np.asarray(volume), np.asarray(affine, dtype=np.float64), str(image)
    volume = np.asarray(image)
    if affine is None:
        if spacing is None:
            raise ValueError(f"{caller}: an array input needs its voxel spacing (mm) or an affine")
        if len(spacing) != 3 or min(float(s) for s in spacing) <= 0:
            raise ValueError(f"{caller}: spacing must be 3 positive numbers (mm), got {spacing}")
        affine = np.diag([float(s) for s in spacing] + [1.0])
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"{caller}: affine must be 4x4, got shape {affine.shape}")
    return volume, affine, "input array"


MAX_OVERLAP = 0.9  # sliding-window overlap; the window count grows as 1 / (1 - overlap)^3


def check_overlap(overlap: float, name: str) -> None:
    """A ValueError naming ``name`` unless 0 <= overlap <= MAX_OVERLAP: at 0.99 a 64-voxel window steps by one voxel,
    a million times the windows of 0, and predict would run for days instead of failing."""
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float, np.floating)) \
            or not 0.0 <= float(overlap) <= MAX_OVERLAP:
        raise ValueError(f"{name} must be in [0, {MAX_OVERLAP}], got {overlap!r} (0.5 is nnU-Net's; each step from 0.5 "
                         "to 0.75 to 0.875 multiplies the windows by about 8)")


def _check_predict_args(model: nn.Module, config: Any, overlap: float, sw_batch_size: int) -> None:
    """Bad arguments or a patch_size the network cannot take: a ValueError naming the argument / config field."""
    task = getattr(config, "task", "segmentation")
    if task != "segmentation":  # its classes are the pretext's, not anatomy: a mask of them would look plausible
        raise ValueError(
            f"model config (config.json) task {task!r}: this is a pretraining export, whose output classes "
            f"({', '.join(map(str, config.label_names))}) are the pretext task's, not anatomy; fine-tune it first "
            "(finetune/run.py --pretrained THIS_FOLDER) and predict with the fine-tuned model"
        )
    if isinstance(sw_batch_size, bool) or not isinstance(sw_batch_size, (int, np.integer)) or sw_batch_size < 1:
        raise ValueError(f"predict: sw_batch_size must be an integer >= 1, got {sw_batch_size!r}")
    check_overlap(overlap, "predict: overlap")
    patch = tuple(config.patch_size)
    divisor = int(getattr(getattr(model, "net", model), "size_divisor", 1) or 1)
    if len(patch) != 3 or any(int(p) != p or p < 1 for p in patch) or any(int(p) % divisor for p in patch):
        raise ValueError(
            f"model config (config.json) patch_size {list(patch)}: expected 3 positive integers divisible by "
            f"{divisor} (the network's size divisor)"
        )


MIN_LIVER_ML = 50.0  # a whole adult liver holds 1000-2500 mL: less is the liver's edge at a scan's end, or a miss


def _warn_if_liver_missing(labels: np.ndarray, config: NnyNetConfig, name: str, shape: tuple[int, ...],
                      affine: np.ndarray) -> None:
    """An empty liver is the one result a liver model cannot mean for a CT sent to it: the scan misses the
    liver, or its header's voxel size is wrong (a 10x error shrinks the body to a few centimetres on the
    model's grid, and the network finds nothing). A liver of a few mL is most often a liver the network did not
    recognise (on the phantoms: fatty livers 10-40 HU darker than the training livers, README). The mask is
    written either way; this says to look."""
    if "liver" not in config.label_names:
        return
    liver_voxels = int((labels == config.label_names.index("liver")).sum())
    if liver_voxels:  # labels are on the model grid, whose voxel size is the config's
        ml = liver_voxels * float(np.prod(config.preprocess.spacing)) / 1000.0
        if ml < MIN_LIVER_ML:
            warnings.warn(f"predict: {name}: only {ml:.0f} mL of liver found (a whole adult liver holds 1000-2500 "
                          "mL). Unless the scan catches just the edge of the liver, the network has probably missed "
                          "it (for instance a fatty or unusually dark liver); check the mask before using it")
        return
    extent = " x ".join(f"{n * s:.0f}" for n, s in zip(shape, np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)))
    warnings.warn(f"predict: {name}: no liver found. The scan spans {extent} mm by its header's voxel size; if it "
                  "covers the liver, check that voxel size (a body is 250-450 mm wide) and the mask before using it")


def _warn_if_liver_on_left(labels: np.ndarray, config: NnyNetConfig, name: str) -> None:
    """A liver mask on the patient's left is almost never a liver (situs inversus is ~1 in 10,000): it is the
    spleen called liver, or an image whose affine mirrors it. The mask is kept as it is; this says to look."""
    if "liver" not in config.label_names:
        return
    offset = rightward_offset(labels, label_indices(config.label_names, ["liver"]), config.preprocess.orientation)
    if offset is not None and offset < -0.05:
        warnings.warn(f"predict: {name}: the liver of this mask lies on the patient's left (its centroid "
                      f"{-offset:.0%} of the body's width left of the midline): it may be the spleen called liver, "
                      "or the file's orientation (affine) may be mirrored; check the mask before using it")


def predict(
    model: nn.Module,
    image: np.ndarray | str | Path,
    spacing: tuple[float, float, float] | None = None,
    clinical: Any = None,
    *,
    affine: np.ndarray | None = None,
    overlap: float = 0.5,
    sw_batch_size: int = 4,
    device: str | torch.device | None = None,
    amp: bool | None = None,
    return_probabilities: bool = False,
    case_id: str | None = None,
    force: bool = False,
    precision: str = "auto",
    timings: dict[str, float] | None = None,
    tta: bool | None = None,
    source: str | None = None,
    return_attention: bool = False,
) -> np.ndarray | tuple[np.ndarray, ...]:
    """Segment one CT; the uint8 label volume has the input's shape (and, for a file, its affine).

    image: a path (.nii/.nii.gz/.nrrd/DICOM dir, read with nny_models.io.load_volume) or an array in HU
        (X, Y, Z) with ``spacing`` in mm and optionally its ``affine`` (default diag(spacing)).
    clinical: None, a dict, a pandas row, or a .json / one-row .csv path; encoded with the model's
        clinical schema (absent columns are imputed and reported with a warning). When the rows have a
        case_id column, the row must be this image's: ``case_id``, or for a path its file name as
        nny_models.io derives case ids (another patient's row is a ValueError).
    precision: "auto" (bf16 autocast where the hardware runs it fast: CUDA, CPUs with AMX / AVX512-BF16; see
        bf16_is_fast), "bf16" or "fp32". A network that cannot run bf16 (the ONNX Runtime backend,
        ``supports_bf16 = False``) runs fp32 under "auto" and refuses "bf16".
    amp: the older switch, overrides ``precision`` when given: True = bf16, False = fp32.
    timings: a dict that gets the wall-clock seconds of each stage (load, check, preprocess, network,
        windows, argmax, postprocess, restore); see bench/profile_predict.py.
    return_probabilities: also return softmax probabilities (C, X, Y, Z) float32 on the original grid
        (resampled linearly). The label volume is post-processed as config.json says (keep_largest,
        single_component, lesion_in_organ); the probabilities are not. It reaches the original grid as
        config.label_resampling says: the argmax of these probabilities with post-processing's removals kept
        ("probabilities"), or the model grid's labels by nearest neighbour ("nearest", files without the field).
    force: run on an image the HU intensity check refuses, with a warning (see nny_models.hu_check).
    source: the name that messages give an array input (e.g. the file it was read from); default "input array".
    tta: mirror test-time augmentation (nny_models.tta; 2^k passes per window): None = as config.json says
        (mirror along ``tta_mirror_axes``, the axes the model was trained mirrored on, when there are any),
        False = off, True = on (a ValueError when config.json lists no such axes).
    return_attention: also return the clinical query's attention map over the bottleneck (X, Y, Z) float32 on
        the original grid (1 = uniform; nny_models.attention), last: (mask, map) or (mask, probabilities, map).
        It is captured in the same forward passes as the mask (the mask is the same as without it); under TTA
        it comes from a second, un-mirrored pass, as predict_attention computes it. Needs an attention fusion.
    The model is put in eval mode and moved to ``device``. Raises ValueError for an input that is not
    a 3D CT in HU (see check_ct_volume) or a clinical row the schema cannot read.
    """
    from nny_models.preprocessing import preprocess_volume, restore_labels_from_probabilities, restore_to_original

    config = _config(model)
    _check_predict_args(model, config, overlap, sw_batch_size)
    from nny_models.tta import with_tta

    network = with_tta(model, tta)  # before any work: tta=True on a model without safe axes fails here
    if return_attention:
        from nny_models.attention import attention_fusion

        attention_fusion(model)  # a model without attention fusion fails before any work
    fused_attention = return_attention and network is model  # else a second pass, un-mirrored
    device = check_device(device)  # before any work: "cuda" on a machine without one fails here, not at .to()
    stage = _StageTimer(timings, device)
    if amp is not None:
        precision = "bf16" if amp else "fp32"
    if getattr(model, "supports_bf16", True):
        amp = resolve_precision(precision, device)
        warn_if_bf16_is_slow(precision, device, amp)
    elif precision == "bf16":
        raise ValueError(f"predict: precision 'bf16' is not available for {type(model).__name__} (fp32 only)")
    else:
        resolve_precision(precision, device)  # still reject a misspelt precision
        amp = False
    with stage("load"):
        volume, affine, name = read_ct_input(image, spacing, affine, "predict")
        name = source or name
    with stage("check"):
        check_ct_volume(volume, name, force=force, affine=affine)

    cfg = config.preprocess
    if case_id is None and isinstance(image, (str, Path)):
        from nny_models.clinical import image_case_ids

        case_id = image_case_ids(image)
    clin = clinical_vector(model, clinical, case_id, name)
    with stage("preprocess"):
        x, state = preprocess_volume(volume.astype(np.float32, copy=False), affine, cfg, name)
        x = x.as_tensor() if hasattr(x, "as_tensor") else x  # a MONAI MetaTensor -> plain tensor
        x = torch.as_tensor(x, dtype=torch.float32)[None]  # (1, 1, X, Y, Z)
    smooth = getattr(config, "label_resampling", "nearest") == "probabilities"
    check_memory(tuple(x.shape[2:]), volume.shape, len(config.label_names), device, name, smooth=smooth,
                 probabilities=return_probabilities, extra_maps=int(return_attention))
    with torch.inference_mode():
        out = sliding_window_probs(
            network, x, config.patch_size, clin, overlap=overlap, sw_batch_size=sw_batch_size,
            device=device, amp=amp, cval=float(cfg.air_value),  # pad with "air", not mid-window grey
            timings=timings, attention=fused_attention,
        )
        probs, amap = (out[0][0], out[1][0]) if fused_attention else (out[0], None)
        if not torch.isfinite(probs).all():  # argmax would call NaN voxels class 0: a silent empty mask
            raise RuntimeError(f"predict: the network's probabilities for {name} hold NaN / Inf "
                               f"(precision {'bf16' if amp else 'fp32'}); no mask was written. Try --precision fp32")
        with stage("argmax"):
            labels = probs.argmax(dim=0, keepdim=True).to(torch.uint8).cpu().numpy()
            probs = probs.float().cpu().numpy() if return_probabilities or smooth else None
    with stage("postprocess"):  # on the model grid, where the network decided
        labels[0] = postprocess_labels(labels[0], config)
    _warn_if_liver_on_left(labels[0], config, name)
    _warn_if_liver_missing(labels[0], config, name, volume.shape, affine)

    with stage("restore"):  # config.label_resampling: the labels' nearest neighbour, or the argmax of the
        # probabilities resampled linearly (post-processing's decisions kept)
        mask = (restore_labels_from_probabilities(probs, labels[0], state) if smooth
                else np.asarray(restore_to_original(labels, state))[0].astype(np.uint8))
    if mask.shape != volume.shape:
        raise RuntimeError(f"predict: restored mask has shape {mask.shape}, input has {volume.shape}")
    outputs = [mask]
    if return_probabilities:
        with stage("restore"):
            outputs.append(np.asarray(restore_to_original(probs, state), dtype=np.float32))
    if return_attention:
        if amap is not None:
            with stage("restore"):
                outputs.append(np.asarray(restore_to_original(amap.float().cpu().numpy(), state))[0].astype(np.float32))
        else:
            from nny_models.attention import predict_attention

            outputs.append(predict_attention(model, volume, None if clin is None else clin.numpy(), affine=affine,
                                             overlap=overlap, sw_batch_size=sw_batch_size, device=device,
                                             force=True))  # the CT check already ran (and warned) above
    return outputs[0] if len(outputs) == 1 else tuple(outputs)
