"""Fine-tune a segmentation network with patient clinical data fused at the bottleneck (nnY-Net).

    accelerate launch finetune/run.py                        # embedded phantoms, CPU-sized, a few minutes
    accelerate launch finetune/run.py --data_dir DIR --clinical_csv clinical.csv \\
        --pretrained runs/pretrain/model --fusion cross_attention
    accelerate launch finetune/run.py --output_dir runs/finetune --resume   # continue after a crash

Reads like accelerate's examples: get_data -> build_model -> training_function -> main. The transfer report
(tensors loaded / missing / unexpected / shape-mismatched) is printed and logged, and a run whose encoder
did not load from the pretrained export stops instead of silently training from scratch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import KFold

if __package__ in (None, ""):  # `accelerate launch finetune/run.py` from a checkout, installed or not
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune.augment import AugmentedPatches
from finetune.clinical import fit_clinical_schema
from finetune.evaluate import evaluate_case, summarize
from finetune.loss import DiceFocalCELoss
from nny_models.cache import build_cache
from nny_models.config import DEFAULT_LABELS, NnyNetConfig, PreprocessConfig
from nny_models.hub import NnyNet, load_config, load_state_dict
from nny_models.inference import sliding_window_probs
from nny_models.io import discover_cases, read_clinical_csv
from nny_models.phantoms import embedded_dataset
from nny_models.postprocess import keep_largest_component, label_indices
from nny_models.sampling import PatchDataset
from nny_models.transfer import transfer_weights
from nny_models.zoo import accepted_kwargs
from pretrain.training import (
    CheckpointManager,
    MetricsLog,
    batches_from,
    make_accelerator,
    parse_config,
    progress,
    read_metrics,
    tracker_config,
    warmup_cosine,
)

DEFAULT_PRETRAINED = "runs/pretrain/model"  # where `accelerate launch pretrain/run.py` exports by default


@dataclass
class FinetuneConfig:
    data_dir: str | None = None  # labeled CT in any layout nny_models.io reads; None = embedded phantoms
    clinical_csv: str | None = None  # clinical table keyed by case_id; None = DATA_DIR/clinical.csv if present
    output_dir: str = "runs/finetune"  # checkpoints/, logs/, model/, eval/, metrics.jsonl go here
    pretrained: str | None = "auto"  # export dir or Hub repo id; "auto" = runs/pretrain/model if present; "none" = scratch
    model: str = "nnynet"  # zoo name when training from scratch (a pretrained export brings its own)
    size: str = "tiny"  # zoo size preset when training from scratch: tiny | small | base
    fusion: str = "cross_attention"  # clinical fusion at the bottleneck: none | add | concat | cross_attention
    deep_supervision: bool = True  # extra loss on lower-resolution decoder outputs (models that have them)
    spacing: tuple[float, float, float] | None = None  # target spacing (mm); None = the pretrained export's, else (2, 2, 3)
    hu_window: tuple[float, float] | None = None  # HU window; None = the pretrained export's, else (-1000, 1000)
    patch_size: tuple[int, int, int] = (64, 64, 64)  # training patch and sliding-window ROI, voxels
    batch_size: int = 2  # patches per process per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 300  # optimizer steps
    lr: float = 2e-3  # peak AdamW learning rate of the decoder, head and fusion
    encoder_lr_scale: float = 0.5  # layer-wise LR: the pretrained encoder learns at lr * this
    freeze_encoder_steps: int = 0  # encoder LR held at 0 for this many steps (frozen-encoder warmup)
    weight_decay: float = 1e-4  # AdamW weight decay
    warmup_steps: int = 20  # linear LR warmup, then cosine decay
    grad_clip: float = 1.0  # max gradient norm
    dice_weight: float = 1.0  # loss = dice_weight * Dice + focal_weight * Focal + ce_weight * CE
    focal_weight: float = 1.0  # weight of the softmax focal term
    ce_weight: float = 1.0  # weight of the cross-entropy term
    fg_prob: float = 0.67  # probability that a patch is centred on a (rare-class-balanced) foreground voxel
    augment: bool = True  # rotation, scaling, intensity jitter (and flips, see flip_axes) on training patches
    flip_axes: tuple[int, ...] = ()  # RAS axes mirrored at random (p=0.5 each). None by default: volumes are in RAS,
    # and a left-right mirror hides the side, the one cue between liver and spleen (same HU); e.g. 0 1 2 for other organs
    clinical_dropout: float = 0.1  # probability of hiding a sample's whole clinical vector (robustness to missing data)
    folds: int = 5  # k-fold split by patient; the validation fold is held out of training
    fold: int = 0  # which fold validates
    val_every: int = 100  # validate (sliding window, Gaussian blending) every N steps; 0 = only at the end
    val_overlap: float = 0.25  # sliding-window overlap during validation
    keep_largest: tuple[str, ...] = ("liver", "tumor")  # labels forming one organ whose largest connected
    # component validation and predict keep; a bare flag turns it off (the default skips names the label map lacks)
    min_encoder_loaded: float = 0.9  # fail if a smaller fraction of encoder tensors loads from --pretrained
    phantom_cases: int = 24  # number of labeled phantoms generated when data_dir is None
    cache_dir: str | None = None  # preprocessed-case cache; None = OUTPUT_DIR/cache
    num_workers: int = 2  # DataLoader workers per process
    mixed_precision: str = "no"  # no | bf16 | fp16 (GPU)
    grad_checkpointing: bool = False  # trade compute for memory in the encoder
    seed: int = 0  # seeds the model init, the split, patch sampling and augmentation
    checkpoint_every: int = 100  # save_state every N steps (a crash loses at most this many)
    resume: bool = False  # continue from OUTPUT_DIR/checkpoints/latest


# ----------------------------------------------------------------------------- data


def get_data(cfg: FinetuneConfig, preprocess: PreprocessConfig, accelerator) -> dict[str, Any]:
    """Cases, k-fold split, clinical schema fitted on the training fold, cache and the training loader."""
    data_dir = Path(cfg.data_dir) if cfg.data_dir else None
    if data_dir is None:
        with accelerator.main_process_first():
            data_dir = embedded_dataset(cfg.phantom_cases, seed=cfg.seed)
    records = [r for r in discover_cases(data_dir) if r.label is not None]
    if len(records) < 2:
        raise ValueError(f"{data_dir}: found {len(records)} labeled case(s); fine-tuning needs at least 2")
    labels = _label_names(data_dir)

    ids = sorted(r.case_id for r in records)
    folds = min(cfg.folds, len(ids))
    train_idx, val_idx = list(KFold(folds, shuffle=True, random_state=cfg.seed).split(ids))[cfg.fold % folds]
    train_ids, val_ids = [ids[i] for i in train_idx], [ids[i] for i in val_idx]

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
    cache = build_cache(records, preprocess, cache_dir, num_workers=cfg.num_workers)

    world = cfg.batch_size * cfg.grad_accum * accelerator.num_processes
    patches = PatchDataset(
        cache,
        train_ids,
        cfg.patch_size,
        length=cfg.max_steps * world,  # one pass covers the run, so resume replays the same order
        seed=cfg.seed,
        fg_prob=cfg.fg_prob,
        extras=vectors or None,
    )
    dataset = AugmentedPatches(patches, cfg.seed, cfg.clinical_dropout, cfg.flip_axes) if cfg.augment else patches
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
        train_ids=train_ids, val_ids=val_ids, records=records,
    )  # fmt: skip


def _label_names(data_dir: Path) -> list[str]:
    """Label names from an MSD dataset.json ("labels": {"0": "background", ...}); the default 5 otherwise."""
    meta = data_dir / "dataset.json"
    if meta.is_file():
        labels = json.loads(meta.read_text()).get("labels")
        if isinstance(labels, dict) and labels:
            # MSD maps index -> name; nnU-Net v2 maps name -> index
            pairs = [(int(k), v) if str(k).isdigit() else (int(v), k) for k, v in labels.items()]
            return [name for _, name in sorted(pairs)]
    return list(DEFAULT_LABELS)


# ----------------------------------------------------------------------------- model


def resolve_pretrained(cfg: FinetuneConfig) -> str | None:
    if cfg.pretrained in (None, "", "none"):
        return None
    if cfg.pretrained == "auto":
        return DEFAULT_PRETRAINED if (Path(DEFAULT_PRETRAINED) / "config.json").is_file() else None
    return cfg.pretrained


def _keep_largest(cfg: FinetuneConfig, labels: list[str]) -> list[str]:
    """cfg.keep_largest as stored in config.json: the default adapts to the label map, a name the user gave
    that is not a label is an error (a typo must not silently turn post-processing off)."""
    default = next(f.default for f in dataclasses.fields(FinetuneConfig) if f.name == "keep_largest")
    unknown = [n for n in cfg.keep_largest if n not in labels]
    if unknown and tuple(cfg.keep_largest) != default:
        raise ValueError(f"--keep_largest: {unknown} are not labels of this dataset; expected some of {labels}")
    return [n for n in cfg.keep_largest if n in labels]


def build_model(cfg: FinetuneConfig, pretrained: str | None, data: dict, preprocess: PreprocessConfig, accelerator):
    """NnyNet for the task's labels and clinical schema; encoder and decoder transferred from the export."""
    source = load_config(pretrained) if pretrained else None
    name = source.model if source else cfg.model
    kwargs = dict(source.model_kwargs) if source else {"size": cfg.size}
    schema = data["schema"]
    kwargs.update(out_channels=len(data["labels"]), fusion=cfg.fusion, clinical_features=schema.num_features if schema else 0)
    optional = {"deep_supervision": cfg.deep_supervision, "use_checkpoint": cfg.grad_checkpointing}
    kwargs.update({k: v for k, v in optional.items() if k in accepted_kwargs(name)})  # not every zoo model has them
    config = NnyNetConfig(
        model=name,
        model_kwargs=kwargs,
        label_names=data["labels"],
        preprocessing=preprocess.to_dict(),
        patch_size=cfg.patch_size,
        clinical_schema=schema.to_dict() if schema else None,
        keep_largest=_keep_largest(cfg, data["labels"]),
    )
    model = NnyNet(config)
    report = None
    if pretrained:
        state = {k.removeprefix("net."): v for k, v in load_state_dict(pretrained).items()}
        report = transfer_weights(model.net, state, exclude_prefixes=tuple(model.net.head_prefixes))
        loaded = report.fraction_loaded(tuple(model.net.encoder_prefixes))
        accelerator.print(f"weights from {pretrained}:\n{report.summary()}\nencoder tensors loaded: {loaded:.1%}")
        if loaded < cfg.min_encoder_loaded:
            raise RuntimeError(
                f"only {loaded:.1%} of the encoder tensors of '{name}' loaded from {pretrained} "
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
            cval=preprocess.out_range[0],  # pad with air, as predict does
        )  # fmt: skip
        pred = probs.argmax(1)[0].cpu().numpy()
        if model.config.keep_largest:  # the same post-processing predict applies
            pred = keep_largest_component(pred, label_indices(data["labels"], model.config.keep_largest))
        gt = np.asarray(data["cache"].label(cid))[0]
        per_case.append(evaluate_case(pred, gt, preprocess.spacing, data["labels"], case_id=cid))
    model.train()
    return summarize(per_case)


# ----------------------------------------------------------------------------- training


def training_function(cfg: FinetuneConfig) -> Path:
    output_dir = Path(cfg.output_dir)
    accelerator = make_accelerator(
        output_dir, mixed_precision=cfg.mixed_precision, grad_accum=cfg.grad_accum, seed=cfg.seed
    )
    pretrained = resolve_pretrained(cfg)
    source = load_config(pretrained).preprocess if pretrained else PreprocessConfig(spacing=(2.0, 2.0, 3.0))
    preprocess = dataclasses.replace(
        source,
        spacing=tuple(cfg.spacing) if cfg.spacing else source.spacing,
        hu_window=tuple(cfg.hu_window) if cfg.hu_window else source.hu_window,
    )
    data = get_data(cfg, preprocess, accelerator)
    model, report = build_model(cfg, pretrained, data, preprocess, accelerator)
    accelerator.print(
        f"{len(data['train_ids'])} training / {len(data['val_ids'])} validation cases, labels {data['labels']}, "
        f"post-processing: largest component of {model.config.keep_largest or 'nothing'}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, from "
        f"{pretrained or 'scratch'}"
    )

    optimizer = torch.optim.AdamW(param_groups(model, cfg), weight_decay=cfg.weight_decay)
    scheduler = warmup_cosine(optimizer, cfg.warmup_steps, cfg.max_steps)  # stepped by hand, see training.py
    loss_fn = DiceFocalCELoss(
        dice_weight=cfg.dice_weight, focal_weight=cfg.focal_weight, ce_weight=cfg.ce_weight, include_background=False
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, data["loader"])
    accelerator.register_for_checkpointing(scheduler)
    checkpoints = CheckpointManager(accelerator, output_dir)
    start = checkpoints.resume() if cfg.resume else 0
    best_path = output_dir / "best.json"
    best = json.loads(best_path.read_text())["val_dice"] if cfg.resume and best_path.is_file() else -math.inf

    accelerator.init_trackers("finetune", config=tracker_config(cfg))
    metrics = MetricsLog(accelerator, output_dir / "metrics.jsonl", resume_step=start)
    if report is not None and start == 0:
        metrics.log({"step": 0, "transfer_loaded": len(report.loaded), "transfer_missing": len(report.missing)})
    batches = batches_from(loader, start, accelerator)
    bar = progress(accelerator, cfg.max_steps, start, desc="finetune")
    model.train()
    for step in range(start, cfg.max_steps):
        for _ in range(cfg.grad_accum):
            batch = next(batches)
            with accelerator.accumulate(model):
                outputs = model(batch["image"], batch.get("clinical"))
                loss = loss_fn(outputs, batch["label"])
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if step + 1 < cfg.freeze_encoder_steps:
            optimizer.param_groups[0]["lr"] = 0.0  # frozen-encoder warmup

        row = {"step": step + 1, "loss": accelerator.reduce(loss.detach(), "mean").item(), "lr": scheduler.get_last_lr()[1]}
        last = step + 1 == cfg.max_steps
        if (cfg.val_every and (step + 1) % cfg.val_every == 0) or last:
            if accelerator.is_main_process:
                summary = validate(accelerator.unwrap_model(model), data, cfg, preprocess, accelerator.device)
                row["val_dice"] = summary["mean_dice"]  # mean over foreground classes
                row.update({f"val_dice_{k}": v["dice_mean"] for k, v in summary["per_class"].items()})
                if row["val_dice"] > best:
                    best = row["val_dice"]
                    export(accelerator.unwrap_model(model), output_dir / "model", cfg, summary, step + 1)
                    best_path.write_text(json.dumps({"val_dice": best, "step": step + 1}))
            accelerator.wait_for_everyone()
        accelerator.log(row, step=step + 1)
        metrics.log(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.3f}", **({"val_dice": f"{row['val_dice']:.3f}"} if "val_dice" in row else {}))
        if (step + 1) % cfg.checkpoint_every == 0 or last:
            checkpoints.save(step + 1)
    bar.close()

    if accelerator.is_main_process:
        from finetune.figures import plot_training_curves

        plot_training_curves(read_metrics(output_dir / "metrics.jsonl"), output_dir / "figures" / "training_curves.png")
        accelerator.print(f"best validation mean foreground Dice {best:.3f}; model in {output_dir / 'model'}")
    accelerator.end_training()
    return output_dir / "model"


def export(model: NnyNet, path: Path, cfg: FinetuneConfig, summary: dict, step: int) -> None:
    """save_pretrained with the validation metrics and the training setup for the model card."""
    model.config.metrics = {
        "split": f"validation fold {cfg.fold} of {cfg.folds} (preprocessed grid)",
        "step": step,
        **card_metrics(summary),
    }
    training = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "resume"}
    model.save_pretrained(path, model_card_kwargs={"training": training})


def card_metrics(summary: dict) -> dict:
    """The model card's view of an evaluation summary: mean Dice, mIoU and a compact per-class table."""
    columns = {"dice": "Dice", "iou": "IoU", "hd95": "HD95 (mm)", "precision": "precision", "recall": "recall"}
    return {
        "mean_foreground_dice": summary["mean_dice"],
        "miou": summary["miou"],
        "per_class": {
            name: {label: stats[f"{key}_mean"] for key, label in columns.items()}
            for name, stats in summary["per_class"].items()
        },
    }


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(FinetuneConfig, argv, description=__doc__.splitlines()[0])
    training_function(cfg)


if __name__ == "__main__":
    main()
