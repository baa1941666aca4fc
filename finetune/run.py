"""Fine-tune a segmentation network with patient clinical data fused at the bottleneck (nnY-Net).

    accelerate launch finetune/run.py                        # embedded phantoms, CPU-sized, a few minutes
    accelerate launch finetune/run.py --data_dir DIR --clinical_csv clinical.csv \\
        --pretrained runs/pretrain/model --fusion cross_attention
    accelerate launch finetune/run.py --output_dir runs/finetune --resume   # continue after a crash

Reads like accelerate's examples: get_data -> build_model -> training_function -> main. The transfer report
(tensors loaded / missing / unexpected / shape-mismatched) is printed and logged, and a run whose encoder
did not load from the pretrained export stops instead of silently training from scratch. Without
--pretrained the run trains from scratch (and says so); with it, the export's architecture is used and a
conflicting --model / --size is an error.

The loop itself (accumulation, autocast, clipping, schedule, logging, seeding) is
nny_models.training.train_loop; this file supplies the segmentation loss, the validation with the atomic
best-model export, and the checkpoint hook. OUTPUT_DIR is locked while a run writes to it; --resume uses
the newest intact checkpoint (no pickle is loaded), and an earlier run is never overwritten without
--overwrite.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import KFold

if __package__ in (None, ""):  # `accelerate launch finetune/run.py` from a checkout, installed or not
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune.augment import AugmentConfig, AugmentedPatches
from finetune.clinical import fit_clinical_schema
from finetune.evaluate import card_metrics, evaluate_case, summarize
from finetune.loss import DiceFocalCELoss
from nny_models.cache import build_cache
from nny_models.config import DEFAULT_LABELS, NnyNetConfig, PreprocessConfig
from nny_models.hub import NnyNet, check_patch_for, load_config
from nny_models.inference import check_overlap, sliding_window_probs
from nny_models.io import discover_cases, read_clinical_csv
from nny_models.phantoms import embedded_dataset
from nny_models.postprocess import postprocess_labels
from nny_models.sampling import PatchDataset
from nny_models.swin_next import FUSION_POSITIONS
from nny_models.training.checkpoints import check_resume_data, data_cases
from nny_models.training import (
    CheckpointManager,
    MetricsLog,
    adamw,
    batches_from,
    check_output_dir,
    check_run_config,
    lock_output_dir,
    make_accelerator,
    parse_config,
    read_metrics,
    run_main,
    run_plan,
    save_plan,
    tracker_config,
    train_loop,
    warmup_cosine,
    write_text_atomic,
    writing_dir,
)
from nny_models.planning import Plan
from nny_models.zoo import build_model as build_network, resolve_model_kwargs

FALLBACK_PATCH, FALLBACK_BATCH = (64, 64, 64), 2  # without a plan (--plan none) and without the flags
SCRATCH_MODEL, SCRATCH_SIZE = "nnynet", "tiny"  # the architecture when neither --pretrained nor --model names one
# network arguments fine-tuning sets for its task
TASK_KWARGS = ("out_channels", "fusion", "clinical_features", "fusion_position")


@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run reads; CLI flags and --config JSON fill it (flags win). Saved as
    OUTPUT_DIR/run_config.json."""

    data_dir: str | None = None  # labeled CT in any layout nny_models.io reads; None = embedded phantoms
    clinical_csv: str | None = None  # clinical table keyed by case_id; None = DATA_DIR/clinical.csv if present
    output_dir: str = "runs/finetune"  # checkpoints/, logs/, model/, eval/, metrics.jsonl go here
    pretrained: str | None = None  # export dir or Hub repo id to start from (e.g. runs/pretrain/model); None or
    # "none" = train from scratch. Nothing is looked up implicitly
    model: str | None = None  # zoo name; None = the pretrained export's architecture (or nnynet from scratch).
    # With --pretrained it must match the export: a different one is an error, never a silent override
    size: str | None = None  # zoo size preset tiny | small | base; None = the export's (or tiny from scratch).
    # With --pretrained it must match the export's network arguments, else an error
    fusion: str = "cross_attention"  # clinical fusion at the bottleneck: none | add | concat | cross_attention (the
    # paper's design) | cross_attention_film | cross_attention_tokens (nny_models/fusion.py says which carry information)
    fusion_position: str | None = None  # nnynet and swinunetr: "after_bottleneck" (None picks it: the fusion acts on
    # the bottleneck's output and passes the capacity test) or "before_bottleneck" (models fine-tuned before
    # 2026-12-01; the bottleneck's GroupNorm / InstanceNorm erases a FiLM modulation there). The export's value is
    # never reused: fusion is new
    deep_supervision: bool = True  # extra loss on lower-resolution decoder outputs (models that have them)
    plan: str = "auto"  # "auto" = plan spacing, CT normalization, patch and batch from the labeled data
    # (nny_models.planning, nnU-Net's rules); a plan.json from nnynet-plan; "none" = no plan. Flags win over the plan
    spacing: tuple[float, float, float] | None = None  # target spacing (mm); None = the plan's, else the pretrained
    # export's, else the PreprocessConfig default
    hu_window: tuple[float, float] | None = None  # a fixed HU window instead of the plan's foreground z-score
    # normalization; None = the plan's normalization, else the pretrained export's window
    patch_size: tuple[int, int, int] | None = None  # training patch and sliding-window ROI, voxels; None = the
    # plan's, else 64 64 64
    batch_size: int | None = None  # patches per process per micro-batch; None = the plan's, else 2
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 300  # optimizer steps
    lr: float = 2e-3  # peak AdamW learning rate of the decoder, head and fusion
    encoder_lr_scale: float = 0.5  # layer-wise LR: the pretrained encoder learns at lr * this
    freeze_encoder_steps: int = 0  # the encoder's LR is exactly 0 for the first N optimizer steps (frozen warmup)
    weight_decay: float = 1e-4  # AdamW weight decay
    warmup_steps: int = 20  # linear LR warmup, then cosine decay
    grad_clip: float = 1.0  # max gradient norm (0 = no clipping; negative is refused)
    dice_weight: float = 1.0  # loss = dice_weight * Dice + focal_weight * Focal + ce_weight * CE
    focal_weight: float = 1.0  # weight of the softmax focal term
    ce_weight: float = 1.0  # weight of the cross-entropy term
    fg_prob: float = 0.67  # probability that a patch is centred on a (rare-class-balanced) foreground voxel
    fg_class_weights: tuple[float, ...] | None = None  # one per foreground label (label order): relative chance
    # that a foreground-centred patch picks it among the labels the case holds; None = equal (nnU-Net)
    class_weights: tuple[float, ...] | None = None  # one per label, background first: weights of the focal and CE
    # terms (a rare tumor class otherwise gets a vanishing share of the voxel-averaged gradient); None = equal
    balance_lesions: tuple[str, ...] = ()  # labels whose foreground-centred patches pick one of the label's connected
    # components (lesions) uniformly, then a voxel of it, instead of a voxel uniformly: small lesions are seen as often
    # as large ones (nny_models.sampling); () = nnU-Net's voxel draw
    augment: bool = True  # nnU-Net's default augmentation on training patches (see augmentation; flips: flip_axes)
    augmentation: AugmentConfig = field(default_factory=AugmentConfig)  # probabilities and ranges:
    # --augmentation.<field> (finetune/augment.py)
    flip_axes: tuple[int, ...] = ()  # RAS axes mirrored at random (p=0.5 each). None by default: volumes are in RAS,
    # and a left-right mirror hides the side, the one cue between liver and spleen (same HU); e.g. 0 1 2 for other organs
    clinical_dropout: float = 0.1  # probability of hiding a sample's whole clinical vector (robustness to missing data)
    folds: int = 5  # k-fold split by patient; the validation fold is held out of training
    fold: int = 0  # which fold validates
    val_every: int = 100  # validate (sliding window, Gaussian blending) every N steps; 0 = only at the end
    val_overlap: float = 0.25  # sliding-window overlap during validation
    keep_largest: tuple[str, ...] = ("liver", "tumor")  # labels forming one organ whose largest connected
    # component validation and predict keep; a bare flag turns it off (the default skips names the label map lacks)
    keep_side: str = "auto"  # right | left | none: keep the largest such component on that side of the patient
    # (nny_models.postprocess; a spleen called liver can be the larger one); "auto" = right when the organ is the liver
    single_component: tuple[str, ...] = ("aorta",)  # labels that are each one connected structure: validation and
    # predict keep each one's largest component (a bare flag turns it off; the default skips names the label map lacks)
    lesion_in_organ: tuple[str, str] = ("tumor", "liver")  # a lesion label and the organ it lies in: validation
    # and predict drop each lesion component whose surface touches the organ on less than lesion_min_contact of its
    # voxels (nny_models.postprocess.drop_lesions_outside); skipped when the label map lacks either name
    lesion_min_contact: float = 0.5  # that share; 0 = keep every lesion component
    label_resampling: str = "probabilities"  # config.json: predict's labels on the CT's grid from the softmax
    # resampled linearly (nnU-Net's export) or "nearest" (the model grid's labels, in steps of its voxels)
    min_encoder_loaded: float = 0.9  # fail if a smaller fraction of encoder tensors loads from --pretrained
    phantom_cases: int = 24  # number of labeled phantoms generated when data_dir is None
    cache_dir: str | None = None  # preprocessed-case cache; None = OUTPUT_DIR/cache
    skip_hu_check: bool = False  # train on images that do not look like a CT in HU (nny_models.hu_check); by
    # default such a case stops the run, naming its file, as nnynet-predict refuses it
    num_workers: int = 2  # DataLoader workers per process
    mixed_precision: str = "no"  # no | bf16 | fp16 (GPU)
    grad_checkpointing: bool = False  # trade compute for memory in the encoder
    seed: int = 0  # seeds the model init, the split, patch sampling, augmentation and dropout
    checkpoint_every: int = 100  # save a resumable checkpoint every N steps (a crash loses at most this many); 0 = only at the end
    resume: bool = False  # continue from the newest intact checkpoint in OUTPUT_DIR/checkpoints
    overwrite: bool = False  # delete an earlier run's checkpoints, metrics and model in OUTPUT_DIR and start again

    def __post_init__(self) -> None:
        check_run_config(self)
        check_overlap(self.val_overlap, "--val_overlap")  # now, not after the training
        shares = ("fg_prob", "clinical_dropout", "min_encoder_loaded", "lesion_min_contact")
        for name in shares:  # probabilities and shares: outside [0, 1] they would act as 0 or 1 without a word
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"--{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("encoder_lr_scale", "dice_weight", "focal_weight", "ce_weight", "val_every"):
            if getattr(self, name) < 0:  # a negative LR scale or loss weight trains towards the wrong answer
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.dice_weight + self.focal_weight + self.ce_weight == 0:
            raise ValueError("--dice_weight, --focal_weight and --ce_weight are all 0: there is no loss to train on")
        if self.folds < 2 or not 0 <= self.fold < self.folds:
            raise ValueError(f"--folds must be >= 2 and --fold in 0..folds-1, got --folds {self.folds} --fold {self.fold}")
        if self.freeze_encoder_steps < 0:
            raise ValueError(f"--freeze_encoder_steps must be >= 0, got {self.freeze_encoder_steps}")
        if self.fusion_position is not None and self.fusion_position not in FUSION_POSITIONS:
            raise ValueError(f"--fusion_position: expected one of {FUSION_POSITIONS}, got {self.fusion_position!r}")
        if self.pretrained in ("", "none"):
            self.pretrained = None
        if self.pretrained == "auto":
            raise ValueError("--pretrained auto is gone: pass the export directory (e.g. runs/pretrain/model) or "
                             "a Hub repo id, or leave it out to train from scratch")


# ----------------------------------------------------------------------------- data


def resolve_data_dir(cfg: FinetuneConfig, accelerator) -> Path:
    """--data_dir, or the embedded labeled phantoms (generated once)."""
    if cfg.data_dir:
        return Path(cfg.data_dir).expanduser()
    with accelerator.main_process_first():
        return Path(embedded_dataset(cfg.phantom_cases, seed=cfg.seed))


def apply_plan(cfg: FinetuneConfig, data_dir: Path, accelerator):
    """Fill patch / batch left unset from the plan (flags win); returns (resolved cfg, plan or None).
    On --resume the run's saved plan.json is reused, so a continued run trains on exactly the same grid."""
    plan = run_plan(cfg.plan, data_dir, cfg.output_dir, task="segmentation", resume=cfg.resume, accelerator=accelerator)
    resolved = dataclasses.replace(
        cfg,
        patch_size=tuple(cfg.patch_size or (plan.patch_size if plan else FALLBACK_PATCH)),
        batch_size=cfg.batch_size or (plan.batch_size if plan else FALLBACK_BATCH),
    )
    return resolved, plan


def get_data(cfg: FinetuneConfig, preprocess: PreprocessConfig, data_dir: Path, accelerator) -> dict[str, Any]:
    """Cases, k-fold split, clinical schema fitted on the training fold, cache and the training loader."""
    records = [r for r in discover_cases(data_dir) if r.label is not None]
    if len(records) < 2:
        raise ValueError(f"{data_dir}: found {len(records)} labeled case(s); fine-tuning needs at least 2")
    cases = data_cases(records)
    check_resume_data(cfg.output_dir, cases, cfg.resume)  # a resume must train on the cases the run started with
    labels = _label_names(data_dir)
    class_weights = _per_label(cfg.class_weights, labels, "class_weights")  # checked before the slow cache build

    ids = sorted(r.case_id for r in records)
    train_ids, val_ids, folds = split_cases(ids, cfg, data_dir)

    schema, vectors = None, {}
    if cfg.fusion != "none":
        csv = Path(cfg.clinical_csv) if cfg.clinical_csv else data_dir / "clinical.csv"
        if not csv.is_file():
            raise ValueError(f"--fusion {cfg.fusion} needs a clinical table: {csv} not found (pass --clinical_csv)")
        table = read_clinical_csv(csv, case_ids=ids)
        schema = fit_clinical_schema(table.loc[train_ids], seed=cfg.seed)  # fitted on the training fold only
        matrix = schema.transform(table.loc[ids])
        vectors = {cid: {"clinical": matrix[i]} for i, cid in enumerate(ids)}

    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.output_dir) / "cache"
    cache = build_cache(records, preprocess, cache_dir, num_workers=cfg.num_workers, num_classes=len(labels),
                        check_hu=not cfg.skip_hu_check)
    check_foreground(cache, ids, data_dir, labels)

    world = cfg.batch_size * cfg.grad_accum * accelerator.num_processes
    patches = PatchDataset(
        cache,
        train_ids,
        cfg.patch_size,
        length=cfg.max_steps * world,  # one pass covers the run, so resume replays the same order
        seed=cfg.seed,
        fg_prob=cfg.fg_prob,
        fg_class_weights=_per_label(cfg.fg_class_weights, labels[1:], "fg_class_weights", first=1),
        extras=vectors or None,
        lesion_classes=_label_index(cfg.balance_lesions, labels, "balance_lesions"),
    )
    dataset = (AugmentedPatches(patches, cfg.seed, cfg.clinical_dropout, cfg.flip_axes, config=cfg.augmentation,
                                z_spacing_mm=preprocess.spacing[2]) if cfg.augment else patches)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=False,
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,
        drop_last=True,
    )
    return dict(
        loader=loader, cache=cache, labels=labels, schema=schema, vectors=vectors,
        train_ids=train_ids, val_ids=val_ids, folds=folds, records=records, cases=cases,
        class_weights=None if class_weights is None else list(class_weights.values()),
    )  # fmt: skip


def split_cases(ids: list[str], cfg: FinetuneConfig, data_dir: Path) -> tuple[list[str], list[str], int]:
    """(training, validation) case ids and the number of folds: fold ``cfg.fold`` of a seeded k-fold split by
    case. With fewer cases than --folds, one fold per case, with a warning (the model card states the folds used);
    a --fold beyond them is a ValueError, not a wrap-around onto another fold (a k-fold ensemble would hold a
    duplicate)."""
    folds = cfg.folds
    if folds > len(ids):
        if cfg.fold >= len(ids):
            raise ValueError(f"--fold {cfg.fold}: {data_dir} has {len(ids)} labeled cases, so at most {len(ids)} "
                             f"folds; expected --fold 0..{len(ids) - 1} (or more cases)")
        warnings.warn(f"--folds {cfg.folds}: {data_dir} has {len(ids)} labeled cases; the split uses {len(ids)} "
                      "folds (the model card says so)", stacklevel=2)
        folds = len(ids)
    train_idx, val_idx = list(KFold(folds, shuffle=True, random_state=cfg.seed).split(ids))[cfg.fold]
    return [ids[i] for i in train_idx], [ids[i] for i in val_idx], folds


def _per_label(values: tuple[float, ...] | None, labels: list[str], flag: str, first: int = 0) -> dict | None:
    """--flag's values as {label index: value}, one per label of ``labels`` (indices from ``first``), or None."""
    if values is None:
        return None
    if len(values) != len(labels) or any(not v > 0 for v in values):
        raise ValueError(f"--{flag}: expected {len(labels)} values > 0, one per label {labels}, got {list(values)}")
    return {first + i: float(v) for i, v in enumerate(values)}


def _label_index(names: tuple[str, ...], labels: list[str], flag: str) -> list[int]:
    """--flag's label names as indices into ``labels``; background and unknown names are refused."""
    bad = [n for n in names if n not in labels[1:]]
    if bad:
        raise ValueError(f"--{flag}: {bad} are not foreground labels of this dataset; expected some of {labels[1:]}")
    return [labels.index(n) for n in names]


def _label_names(data_dir: Path) -> list[str]:
    """Label names from an MSD dataset.json ("labels": {"0": "background", ...}) or an nnU-Net v2 one
    ({"background": 0, ...}); the default 5 without a dataset.json or a "labels" entry. Any other form is a
    ValueError naming the file: the names decide what each label value is called and post-processed as."""
    meta = data_dir / "dataset.json"
    if not meta.is_file():
        return list(DEFAULT_LABELS)
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{meta}: not valid JSON ({err})") from None
    labels = data.get("labels") if isinstance(data, dict) else None
    if labels is None:
        return list(DEFAULT_LABELS)
    expected = 'expected an object {"0": "background", "1": "liver", ...} (MSD) or {"background": 0, ...} (nnU-Net v2)'
    if not isinstance(labels, dict) or not labels:
        raise ValueError(f"{meta}: \"labels\" is {json.dumps(labels)[:80]}; {expected}")
    pairs = []
    for key, value in labels.items():  # MSD maps index -> name; nnU-Net v2 maps name -> index
        if str(key).strip().isdigit() and isinstance(value, str) and value:
            pairs.append((int(key), value))
        elif isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            pairs.append((value, str(key)))
        else:  # e.g. nnU-Net v2's region-based labels, "liver": [1, 2]
            raise ValueError(f"{meta}: \"labels\" entry {json.dumps(key)}: {json.dumps(value)[:60]}; {expected}, "
                             "one label value per name (region-based labels are not supported)")
    pairs.sort()
    if [index for index, _ in pairs] != list(range(len(pairs))) or len({n for _, n in pairs}) != len(pairs):
        raise ValueError(f"{meta}: \"labels\" must name each value 0..{len(pairs) - 1} once, with distinct names; "
                         f"got {dict(pairs)}")
    return [name for _, name in pairs]


# ----------------------------------------------------------------------------- model


def preprocess_config(cfg: FinetuneConfig, source: NnyNetConfig | None, plan: Plan | None = None) -> PreprocessConfig:
    """The CT preprocessing of this run, stored in the export's config.json. Each field, first found wins:
    the flag (--spacing; --hu_window = a fixed window), the plan (spacing, foreground z-score normalization),
    the pretrained export's (what its encoder saw), the library default."""
    base = source.preprocess if source is not None else PreprocessConfig()
    if plan is not None:
        base = dataclasses.replace(base, **plan.preprocessing_fields())
    if cfg.hu_window:
        base = dataclasses.replace(base, hu_window=tuple(cfg.hu_window), normalization=None)
    return dataclasses.replace(base, spacing=tuple(cfg.spacing) if cfg.spacing else base.spacing)


def architecture(cfg: FinetuneConfig, source: NnyNetConfig | None) -> tuple[str, dict[str, Any]]:
    """Zoo name and explicit network arguments: the pretrained export's, or --model / --size from scratch.

    With --pretrained, --model / --size may only confirm the export's architecture: a conflicting one is an
    error (a silent override would train a network the user did not ask for)."""
    if source is None:
        name = cfg.model or SCRATCH_MODEL
        return name, resolve_model_kwargs(name, cfg.size or SCRATCH_SIZE)
    if cfg.model and cfg.model != source.model:
        raise ValueError(f"--model {cfg.model} conflicts with --pretrained {cfg.pretrained}, a {source.model!r} "
                         "export; leave --model out to fine-tune the export's architecture")
    exported = resolve_model_kwargs(source.model, **source.model_kwargs)
    if cfg.size:
        wanted = json.loads(json.dumps(resolve_model_kwargs(source.model, cfg.size)))
        have = json.loads(json.dumps(exported))
        conflicts = {k: (v, have.get(k)) for k, v in wanted.items() if k not in TASK_KWARGS and have.get(k) != v}
        if conflicts:
            shown = ", ".join(f"{k}: {a} (--size) vs {b} (export)" for k, (a, b) in sorted(conflicts.items()))
            raise ValueError(f"--size {cfg.size} conflicts with --pretrained {cfg.pretrained}: {shown}; "
                             "leave --size out to fine-tune the export's architecture")
    return source.model, exported


def _label_list(cfg: FinetuneConfig, name: str, labels: list[str]) -> list[str]:
    """cfg.<name> (keep_largest, single_component) as stored in config.json: the default adapts to the label
    map, a name the user gave that is not a label is an error (a typo must not silently turn post-processing off)."""
    default = next(f.default for f in dataclasses.fields(FinetuneConfig) if f.name == name)
    given = tuple(getattr(cfg, name))
    unknown = [n for n in given if n not in labels]
    if unknown and given != default:
        raise ValueError(f"--{name}: {unknown} are not labels of this dataset; expected some of {labels}")
    return [n for n in given if n in labels]


def _keep_side(cfg: FinetuneConfig, keep_largest: list[str]) -> str | None:
    """cfg.keep_side as stored in config.json (None = the largest component wherever it lies)."""
    if cfg.keep_side not in ("auto", "right", "left", "none"):
        raise ValueError(f"--keep_side: expected auto, right, left or none, got {cfg.keep_side!r}")
    if cfg.keep_side == "auto":
        return "right" if "liver" in keep_largest else None
    return None if cfg.keep_side == "none" or not keep_largest else cfg.keep_side


def _lesion_in_organ(cfg: FinetuneConfig, labels: list[str]) -> dict | None:
    """cfg.lesion_in_organ / lesion_min_contact as stored in config.json (None = no such step)."""
    if len(cfg.lesion_in_organ) != 2:
        raise ValueError(f"--lesion_in_organ: expected two label names (lesion, organ), got {list(cfg.lesion_in_organ)}")
    lesion, organ = cfg.lesion_in_organ
    missing = [n for n in (lesion, organ) if n not in labels]
    if missing and tuple(cfg.lesion_in_organ) != FinetuneConfig.lesion_in_organ:  # a typo must not turn it off
        raise ValueError(f"--lesion_in_organ: {missing} are not labels of this dataset; expected two of {labels}")
    if missing or cfg.lesion_min_contact == 0:
        return None
    return {"lesion": lesion, "organ": organ, "min_contact": float(cfg.lesion_min_contact)}


def check_foreground(cache, ids: list[str], data_dir: Path, labels: list[str]) -> None:
    """A label file holding only background is allowed (a case without the organ) but said, naming the cases: it is
    more often a wrong or empty file. If every label is empty there is nothing to learn: a ValueError."""
    empty = []
    for cid in ids:
        values = cache.meta(cid).get("label_values")  # counts on the original grid (older caches: resampled)
        if not (any(int(v) > 0 for v in values) if values is not None else cache.classes(cid)):
            empty.append(cid)
    if len(empty) == len(ids):
        raise ValueError(f"{data_dir}: none of the {len(ids)} label files holds a foreground voxel (all are 0); "
                         f"expected labels with {labels[1:]} as values 1..{len(labels) - 1}")
    if empty:
        shown = ", ".join(map(repr, empty[:5])) + (", ..." if len(empty) > 5 else "")
        warnings.warn(f"{data_dir}: {len(empty)} of the {len(ids)} label files hold only background (0): {shown}; "
                      "they train as cases without any labelled structure; check them if that is not so")


def check_patch(cfg: FinetuneConfig, source: NnyNetConfig | None, plan: Plan | None) -> None:
    """The patch must suit the network: checked on a bare copy of it before the cache is built (minutes on a real
    dataset), not at the first training step. The error names where the patch came from."""
    name, kwargs = architecture(cfg, source)
    kwargs = {k: v for k, v in kwargs.items() if k not in ("fusion", "clinical_features", "fusion_position")}
    try:
        check_patch_for(build_network(name, {**kwargs, "out_channels": 2}), name, cfg.patch_size, training=True)
    except ValueError as err:
        raise _patch_error(cfg, plan, err) from err


def _patch_error(cfg: FinetuneConfig, plan: Plan | None, err: ValueError) -> ValueError:
    """err, naming the flag (or the plan) the patch size came from, not only the config field."""
    from_plan = plan is not None and tuple(cfg.patch_size) == tuple(plan.patch_size)
    source = "the plan's patch size; pass --patch_size" if from_plan else "from --patch_size"
    return ValueError(f"--patch_size {list(cfg.patch_size)} ({source}): {err}")


def build_model(cfg: FinetuneConfig, source: NnyNetConfig | None, data: dict, preprocess: PreprocessConfig, accelerator,
                plan: Plan | None = None):
    """NnyNet for the task's labels and clinical schema; encoder and decoder transferred from the export."""
    name, kwargs = architecture(cfg, source)
    schema = data["schema"]
    kwargs.update(out_channels=len(data["labels"]), fusion=cfg.fusion, clinical_features=schema.num_features if schema else 0)
    kwargs.pop("fusion_position", None)
    if name in ("nnynet", "swinunetr"):
        kwargs["fusion_position"] = cfg.fusion_position or "after_bottleneck"
    elif cfg.fusion_position:
        raise ValueError(f"--fusion_position applies to nnynet and swinunetr only; {name!r} has one fusion position")
    keep_largest = _label_list(cfg, "keep_largest", data["labels"])
    try:
        config = NnyNetConfig(
            model=name,
            model_kwargs=kwargs,
            label_names=data["labels"],
            preprocessing=preprocess.to_dict(),
            patch_size=cfg.patch_size,
            clinical_schema=schema.to_dict() if schema else None,
            keep_largest=keep_largest,
            keep_side=_keep_side(cfg, keep_largest),
            single_component=_label_list(cfg, "single_component", data["labels"]),
            lesion_in_organ=_lesion_in_organ(cfg, data["labels"]),
            label_resampling=cfg.label_resampling,
            plan=plan.to_dict() if plan is not None else None,
            # mirror TTA (nny_models.tta) only along the axes training really mirrored
            tta_mirror_axes=list(cfg.flip_axes) if cfg.augment and cfg.augmentation.p_flip > 0 else [],
        )
        # Training-only switches are constructor arguments (never in config.json); models without them ignore them.
        model = NnyNet(config, deep_supervision=cfg.deep_supervision, grad_checkpointing=cfg.grad_checkpointing)
    except ValueError as err:
        if "patch_size" not in str(err):
            raise
        raise _patch_error(cfg, plan, err) from err
    report = None
    if cfg.pretrained:
        report = model.transfer_from(cfg.pretrained, exclude_prefixes=tuple(model.net.head_prefixes))
        loaded = report.fraction_loaded(tuple(model.net.encoder_prefixes))
        accelerator.print(f"weights from {cfg.pretrained}:\n{report.summary()}\nencoder tensors loaded: {loaded:.1%}")
        if loaded < cfg.min_encoder_loaded:
            raise RuntimeError(
                f"only {loaded:.1%} of the encoder tensors of '{name}' loaded from {cfg.pretrained} "
                f"(min_encoder_loaded={cfg.min_encoder_loaded}); is it an export of the same architecture?"
            )
    return model, report


def param_groups(model: NnyNet, cfg: FinetuneConfig) -> list[dict]:
    """Two LR groups: the (pretrained) encoder at lr * encoder_lr_scale, everything else at lr."""
    prefixes = tuple(model.net.encoder_prefixes)
    encoder, rest = [], []
    for name, p in model.net.named_parameters():
        (encoder if name.startswith(prefixes) else rest).append(p)
    return [
        {"params": encoder, "lr": cfg.lr * cfg.encoder_lr_scale, "name": "encoder"},
        {"params": rest, "lr": cfg.lr, "name": "decoder"},
    ]


# ----------------------------------------------------------------------------- validation


@torch.no_grad()
def validate(model: NnyNet, data: dict, cfg: FinetuneConfig, preprocess: PreprocessConfig, device) -> dict[str, Any]:
    """Sliding-window (Gaussian) inference on the preprocessed validation cases, the same code path as predict."""
    per_case = []
    for cid in data["val_ids"]:
        image = torch.from_numpy(np.array(data["cache"].image(cid)))[None]  # copy out of the mmap
        clinical = data["vectors"].get(cid, {}).get("clinical")
        clinical = torch.as_tensor(clinical)[None] if clinical is not None else None
        probs = sliding_window_probs(
            model, image, cfg.patch_size, clinical, overlap=cfg.val_overlap, device=device,
            cval=preprocess.air_value,  # pad with air, as predict does
            amp=cfg.mixed_precision == "bf16",  # a bf16 run is validated as predict runs it on such hardware
        )  # fmt: skip
        pred = probs.argmax(1)[0].cpu().numpy()
        pred = postprocess_labels(pred, model.config)  # the same post-processing predict applies
        gt = np.asarray(data["cache"].label(cid))[0]
        per_case.append(evaluate_case(pred, gt, preprocess.spacing, data["labels"], case_id=cid))
    model.train()
    return summarize(per_case)


# ----------------------------------------------------------------------------- training


def training_function(cfg: FinetuneConfig) -> Path:
    from nny_models.training.checkpoints import check_output_paths, check_resume_config, write_data_cases
    from nny_models.training.config import CONFIG_FILE_ATTR

    output_dir = Path(cfg.output_dir)
    # before anything is deleted or written: no input inside OUTPUT_DIR, no OUTPUT_DIR inside the data
    inputs = {"--pretrained": cfg.pretrained, "--data_dir": cfg.data_dir, "--clinical_csv": cfg.clinical_csv,
              "--config": getattr(cfg, CONFIG_FILE_ATTR, None)}
    check_output_paths(output_dir, inputs, cfg.data_dir, written={"--cache_dir": cfg.cache_dir})
    accelerator = make_accelerator(
        output_dir, mixed_precision=cfg.mixed_precision, grad_accum=cfg.grad_accum, seed=cfg.seed
    )
    check_output_dir(accelerator, output_dir, cfg.resume, cfg.overwrite)  # before any work: never over an earlier run
    source = load_config(cfg.pretrained) if cfg.pretrained else None
    data_dir = resolve_data_dir(cfg, accelerator)
    cfg, plan = apply_plan(cfg, data_dir, accelerator)
    write_run_config = check_resume_config(output_dir, cfg, cfg.resume)  # a resume must train as the run started
    preprocess = preprocess_config(cfg, source, plan)
    check_patch(cfg, source, plan)
    data = get_data(cfg, preprocess, data_dir, accelerator)
    model, report = build_model(cfg, source, data, preprocess, accelerator, plan)
    save_plan(plan, output_dir, accelerator)
    accelerator.print(
        f"{len(data['train_ids'])} training / {len(data['val_ids'])} validation cases, labels {data['labels']}, "
        f"post-processing: largest component of {model.config.keep_largest or 'nothing'}"
        + (f" on the patient's {model.config.keep_side}" if model.config.keep_side else "")
        + "".join(f", largest {name} component" for name in model.config.single_component)
        + (", {lesion} components touching the {organ} on under {min_contact:.0%} of their surface dropped".format(
            **model.config.lesion_in_organ) if model.config.lesion_in_organ else "") + ", "
        + f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"{model.config.model} from {cfg.pretrained or 'scratch'}"
    )

    optimizer = adamw(param_groups(model, cfg), weight_decay=cfg.weight_decay)
    # The encoder group's LR is 0 for the first freeze_encoder_steps steps, by name, inside the schedule.
    scheduler = warmup_cosine(optimizer, cfg.warmup_steps, cfg.max_steps, zero_lr_steps={"encoder": cfg.freeze_encoder_steps})
    loss_fn = DiceFocalCELoss(
        dice_weight=cfg.dice_weight, focal_weight=cfg.focal_weight, ce_weight=cfg.ce_weight, include_background=False,
        class_weights=data["class_weights"],
    )
    train_model, optimizer, loader = accelerator.prepare(model, optimizer, data["loader"])
    checkpoints = CheckpointManager(accelerator, output_dir, train_model, optimizer, scheduler)
    start, state = checkpoints.resume() if cfg.resume else (0, {})
    best = {"val_dice": state.get("best_val_dice"), "step": state.get("best_step")}  # loop state, kept in trainer_state.json

    accelerator.init_trackers("finetune", config=tracker_config(cfg))
    metrics = MetricsLog(accelerator, output_dir / "metrics.jsonl", resume_step=start)
    if accelerator.is_main_process and write_run_config:
        write_text_atomic(output_dir / "run_config.json", json.dumps(dataclasses.asdict(cfg), indent=2))
        write_data_cases(output_dir, data["cases"])
    if report is not None and start == 0:
        metrics.log({"step": 0, "transfer_loaded": len(report.loaded), "transfer_missing": len(report.missing)})

    def segmentation_loss(batch, step: int, micro: int) -> torch.Tensor:
        return loss_fn(train_model(batch["image"], batch.get("clinical")), batch["label"])

    def validate_and_export(done: int) -> dict[str, float]:
        """Validation on the main process at val_every and at the end; a new best is exported."""
        row: dict[str, float] = {}
        if not ((cfg.val_every and done % cfg.val_every == 0) or done == cfg.max_steps):
            return row
        if accelerator.is_main_process:
            summary = validate(model, data, cfg, preprocess, accelerator.device)
            row["val_dice"] = summary["mean_dice"]  # mean over foreground classes
            row.update({f"val_dice_{k}": v["dice_mean"] for k, v in summary["per_class"].items()})
            if best["val_dice"] is None or row["val_dice"] > best["val_dice"]:
                best.update(val_dice=row["val_dice"], step=done)
                export(model, output_dir / "model", cfg, summary, done, folds=data["folds"])
        accelerator.wait_for_everyone()
        return row

    def save_checkpoint(done: int) -> None:
        if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == cfg.max_steps:
            checkpoints.save(done, extra={"best_val_dice": best["val_dice"], "best_step": best["step"]})

    train_loop(
        accelerator, train_model, optimizer, scheduler, batches_from(loader, start, accelerator),
        loss_fn=segmentation_loss, start_step=start, max_steps=cfg.max_steps, grad_clip=cfg.grad_clip, seed=cfg.seed,
        metrics=metrics, samples_per_step=cfg.batch_size * cfg.grad_accum * accelerator.num_processes,
        validate=validate_and_export, after_step=save_checkpoint, desc="finetune",
    )  # fmt: skip

    if accelerator.is_main_process:
        from finetune.figures import plot_training_curves

        plot_training_curves(read_metrics(output_dir / "metrics.jsonl"), output_dir / "figures" / "training_curves.png")
        shown = f"{best['val_dice']:.3f} at step {best['step']}" if best["val_dice"] is not None else "n/a"
        accelerator.print(f"best validation mean foreground Dice {shown}; model in {output_dir / 'model'}")
    accelerator.end_training()
    return output_dir / "model"


def export(model: NnyNet, path: Path, cfg: FinetuneConfig, summary: dict, step: int, folds: int | None = None) -> None:
    """save_pretrained with the validation metrics and the training setup for the model card, atomically:
    weights, config.json and README.md are written aside and swapped in together (a kill leaves the old or
    the new export, complete)."""
    model.config.metrics = {
        "split": f"validation fold {cfg.fold} of {folds or cfg.folds} (preprocessed grid)",  # the folds split_cases used
        "step": step,
        **card_metrics(summary),
    }
    training = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("resume", "overwrite")}
    with writing_dir(path) as tmp:
        model.save_pretrained(tmp, model_card_kwargs={"training": training})


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(FinetuneConfig, argv, description=__doc__.splitlines()[0])
    with lock_output_dir(cfg.output_dir):  # a second run into the same folder fails here
        training_function(cfg)


if __name__ == "__main__":
    run_main(main, "finetune/run.py")  # bad input: one line "finetune/run.py: error: ...", exit code 2
