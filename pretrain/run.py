"""Volume Fusion pretraining (MIS-FM) of a zoo network on unannotated CT, with Hugging Face Accelerate.

    accelerate launch pretrain/run.py                                    # CPU demo on generated phantoms
    accelerate launch pretrain/run.py --preset paper --data_dir /data/ct --output_dir runs/vf
    accelerate launch --multi_gpu --num_processes 2 pretrain/run.py ...   # DDP (gloo on a CPU-only box)
    python pretrain/run.py --config run.json --resume                   # continue from the latest checkpoint

Pretext task: two augmented crops are fused voxel-wise with alpha = k / K, k in 0..K, and the network
segments k (K + 1 classes) with Dice + CE (0.5 / 0.5). The dataloader cuts source patches from the
preprocessed cache; crops, augmentation and fusion run batched on the training device (pretrain/data.py).
Every pretext option is a flag (--pretext.variant boxes, --pretext.fg_ratio 0.5, ...; see --help).
Outputs in OUTPUT_DIR: run_config.json (every option of the run), checkpoints/ (resumable, pickle-free,
validated on --resume), logs/ (TensorBoard), metrics.jsonl (one row per step) and model/
(NnyNet.save_pretrained, swapped in atomically at the end and every --export_every steps; fine-tuning loads
its encoder). OUTPUT_DIR is locked while a run writes to it.

The loop itself (accumulation, autocast, clipping, schedule, logging) is nny_models.training.train_loop;
this file supplies the pretext loss and what to save after each step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python pretrain/run.py` from a checkout

from nny_models.config import PreprocessConfig  # noqa: E402
from nny_models.training.checkpoints import (  # noqa: E402
    check_output_paths,
    check_resume_config,
    check_resume_data,
    data_cases,
    write_data_cases,
)
from nny_models.training.config import CONFIG_FILE_ATTR  # noqa: E402
from nny_models.training import (  # noqa: E402
    CheckpointManager,
    MetricsLog,
    adamw,
    batches_from,
    check_output_dir,
    check_run_config,
    lock_output_dir,
    make_accelerator,
    parse_config,
    run_main,
    run_plan,
    save_plan,
    tracker_config,
    train_loop,
    warmup_cosine,
    write_text_atomic,
    writing_dir,
)
from pretrain.data import (  # noqa: E402
    PretextConfig,
    check_pretext_for,
    describe_skipped,
    pretext_batch,
    skipped_inputs,
    source_patch_size,
    step_generator,
)


@dataclass
class PretrainConfig:
    """Everything a pretraining run reads; CLI flags and --config JSON fill it (flags win). Saved as
    OUTPUT_DIR/run_config.json."""

    preset: str | None = None  # "paper" = MIS-FM scale (96^3, base size, bf16); the defaults are a CPU demo. Flags
    # and --config values override the preset's
    data_dir: str | None = None  # unannotated CT: MSD / nnU-Net raw / plain folder / CSV or JSONL manifest; None = phantoms
    output_dir: str = "runs/pretrain"  # checkpoints/, logs/, metrics.jsonl and the exported model/
    cache_dir: str | None = None  # preprocessed-volume cache (default OUTPUT_DIR/cache); share it between runs
    phantom_dir: str | None = None  # where phantoms are generated without --data_dir (default ~/.cache/nnynet)
    phantom_cases: int = 8  # number of unlabeled phantoms generated without --data_dir
    model: str = "nnynet"  # zoo name (nny_models.list_models())
    size: str = "tiny"  # zoo size preset: tiny | small | base (expanded into explicit arguments in config.json)
    feature_size: int | None = None  # replaces the preset's feature_size (networks that have one, e.g. nnynet:
    # channels of the first stage, doubled per stage); None = the preset's. Fine-tuning inherits it from the export
    plan: str = "auto"  # "auto" = plan spacing, patch and batch from the data (nny_models.planning, whole-body
    # statistics); a plan.json from nnynet-plan --task pretraining; "none" = the defaults below. Flags win over the plan
    spacing: tuple[float, float, float] | None = None  # target voxel spacing (mm); None = the plan's, else
    # the PreprocessConfig default
    hu_window: tuple[float, float] = PreprocessConfig.hu_window  # HU clip range mapped to [-1, 1]. Volume Fusion
    # mixes intensities on this bounded range, so pretraining keeps the window (the plan's statistics are recorded)
    patch_size: tuple[int, int, int] | None = None  # network input patch (voxels), divisible by the model's
    # size_divisor; None = the plan's, else 64 64 64
    batch_size: int | None = None  # patches per process per micro-step; None = the plan's, else 2
    grad_accum: int = 1  # micro-steps per optimizer step
    max_steps: int = 150  # optimizer steps
    lr: float = 2e-3  # peak AdamW learning rate
    weight_decay: float = 1e-5  # AdamW weight decay
    warmup_steps: int = 10  # linear warmup steps, then cosine decay to 0.01 x lr
    grad_clip: float = 1.0  # max gradient norm (0 = no clipping; negative is refused)
    mixed_precision: str = "no"  # no | bf16 | fp16
    grad_checkpointing: bool = False  # recompute activations in backward (less memory, about 30 percent slower)
    compile: bool = False  # torch.compile the model
    skip_hu_check: bool = False  # pretrain on images that do not look like a CT in HU (nny_models.hu_check); by
    # default such a case stops the run, naming its file
    num_workers: int = 1  # DataLoader worker processes per rank
    seed: int = 0  # seeds weights, patch sampling, the pretext draws and dropout
    checkpoint_every: int = 50  # save a resumable checkpoint every N steps (0 = only at the end)
    export_every: int = 0  # also export OUTPUT_DIR/model every N steps (0 = only at the end)
    resume: bool = False  # continue from the newest intact checkpoint in OUTPUT_DIR/checkpoints
    overwrite: bool = False  # delete an earlier run's checkpoints, metrics and model in OUTPUT_DIR and start again
    log_every: int = 1  # log loss / lr every N steps
    pretext: PretextConfig = field(default_factory=PretextConfig)  # Volume Fusion pretext task: --pretext.<option>
    debug_dump: bool = False  # write per-rank case ids, patch checksums and a parameter checksum to OUTPUT_DIR/debug/

    def __post_init__(self) -> None:
        check_run_config(self)
        if self.feature_size is not None and self.feature_size < 1:
            raise ValueError(f"--feature_size: expected a positive channel count or None, got {self.feature_size}")
        if self.data_dir is None and self.phantom_cases < 1:
            raise ValueError(f"--phantom_cases must be >= 1 (phantoms generated without --data_dir), got {self.phantom_cases}")


PRESETS = {
    # MIS-FM scale: 96^3 patches, feature_size 48 (base), bf16, 2 patches per GPU, the default spacing. The
    # dataclass defaults above are the CPU demo (tiny network, 64^3 patches, a few minutes on 2 cores).
    "paper": dict(size="base", patch_size=(96, 96, 96), batch_size=2, mixed_precision="bf16",
                  lr=1e-4, warmup_steps=1000, max_steps=100_000, checkpoint_every=1000, export_every=10_000,
                  num_workers=4),
}


def load_config(argv: list[str] | None = None) -> PretrainConfig:
    """Dataclass defaults < --preset < --config JSON < flags."""
    return parse_config(PretrainConfig, argv, description=__doc__.splitlines()[0], presets=PRESETS)


FALLBACK_PATCH, FALLBACK_BATCH = (64, 64, 64), 2  # without a plan (--plan none) and without the flags


def resolve_data_dir(cfg: PretrainConfig, accelerator) -> Path:
    """--data_dir, or the embedded unlabeled phantoms (generated once)."""
    if cfg.data_dir is not None:
        return Path(cfg.data_dir).expanduser()
    from nny_models.phantoms import embedded_dataset

    with accelerator.main_process_first():
        return Path(embedded_dataset(cfg.phantom_cases, seed=cfg.seed, unlabeled=True, root=cfg.phantom_dir))


def apply_plan(cfg: PretrainConfig, data_dir: Path, accelerator):
    """Fill spacing / patch / batch left unset from the plan (flags win); returns (resolved cfg, plan or None).

    On --resume the run's saved plan.json is reused, so a continued run trains on exactly the same grid."""
    plan = run_plan(cfg.plan, data_dir, cfg.output_dir, task="pretraining", resume=cfg.resume, accelerator=accelerator)
    resolved = dataclasses.replace(
        cfg,
        spacing=tuple(cfg.spacing or (plan.spacing if plan else PreprocessConfig.spacing)),
        patch_size=tuple(cfg.patch_size or (plan.patch_size if plan else FALLBACK_PATCH)),
        batch_size=cfg.batch_size or (plan.batch_size if plan else FALLBACK_BATCH),
    )
    return resolved, plan


def preprocess_config(cfg: PretrainConfig) -> PreprocessConfig:
    """The CT preprocessing of this run (stored in the export's config.json; fine-tuning reuses it)."""
    return PreprocessConfig(spacing=tuple(cfg.spacing or PreprocessConfig.spacing), hu_window=tuple(cfg.hu_window))


def discover_images(data_dir: Path) -> list:
    """The cases of ``data_dir`` without their labels (pretraining ignores labels). What a plain folder holds but
    discovery leaves out (nested folders, broken links) is named: in the error when no case is found, else in a
    warning."""
    from nny_models.io import discover_cases

    try:
        records = discover_cases(data_dir)
    except ValueError as err:
        skipped = skipped_inputs(data_dir, [])
        if skipped and "no cases found" in str(err):
            raise ValueError(f"{err}; {describe_skipped(data_dir, skipped)}") from None
        raise
    skipped = skipped_inputs(data_dir, records)
    if skipped:
        warnings.warn(describe_skipped(data_dir, skipped), stacklevel=2)
    return [dataclasses.replace(r, label=None) for r in records]


def prepare_cache(cfg: PretrainConfig, prep: PreprocessConfig, records: list, accelerator):
    """Preprocess the CT volumes of ``records`` once into the cache."""
    from nny_models.cache import build_cache

    cache_dir = cfg.cache_dir or str(Path(cfg.output_dir) / "cache")
    with accelerator.main_process_first():
        return build_cache(records, prep, cache_dir, check_hu=not cfg.skip_hu_check)


def build_model(cfg: PretrainConfig, pretext: PretextConfig, prep: PreprocessConfig, plan=None):
    """NnyNet whose config.json describes the pretext task (K + 1 fusion classes) with explicit arguments."""
    from nny_models.config import NnyNetConfig
    from nny_models.hub import NnyNet, check_patch_for
    from nny_models.zoo import resolve_model_kwargs

    try:  # a patch the network cannot take fails here, before the cache is built, naming the flag
        model = NnyNet(
            NnyNetConfig(
                model=cfg.model,
                model_kwargs=resolve_model_kwargs(cfg.model, cfg.size, out_channels=pretext.num_classes, **(
                    {} if cfg.feature_size is None else {"feature_size": cfg.feature_size})),
                label_names=["background"] + [f"fusion_{k}" for k in range(1, pretext.num_classes)],
                preprocessing=prep.to_dict(),
                patch_size=tuple(cfg.patch_size),
                task="volume_fusion_pretext",
                plan=plan.to_dict() if plan is not None else None,
            ),
            grad_checkpointing=cfg.grad_checkpointing,  # a training switch: not part of config.json
        )
        check_patch_for(model.net, cfg.model, cfg.patch_size, training=True)
    except ValueError as err:
        if "patch_size" not in str(err):
            raise
        raise ValueError(f"--patch_size {list(cfg.patch_size)}: {err}") from err
    return model


def export(model, cfg: PretrainConfig, pretext: PretextConfig, step: int, accelerator) -> None:
    """save_pretrained into OUTPUT_DIR/model atomically: written aside, then swapped in, card included."""
    if accelerator.is_main_process:
        training = {"task": "Volume Fusion pretext (MIS-FM)", "steps": step, "patch_size": list(cfg.patch_size),
                    "batch_size": cfg.batch_size * cfg.grad_accum * accelerator.num_processes, "lr": cfg.lr,
                    "loss": "Dice + CE (0.5 / 0.5)", "pretext": pretext.to_dict()}
        with writing_dir(Path(cfg.output_dir) / "model") as tmp:
            model.save_pretrained(tmp, model_card_kwargs={"training": training,
                                                          "trained_on": cfg.data_dir or "synthetic CT phantoms"})
    accelerator.wait_for_everyone()


def param_checksum(model: torch.nn.Module) -> str:
    """sha256 of all parameters' bytes, in state-dict order: equal iff bitwise equal."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> None:
    cfg = load_config(argv)
    with lock_output_dir(cfg.output_dir):  # a second run into the same folder fails here
        train(cfg)


def train(cfg: PretrainConfig) -> None:
    out_dir = Path(cfg.output_dir)
    # before anything is deleted or written: no input inside OUTPUT_DIR, no OUTPUT_DIR inside the data
    check_output_paths(out_dir, {"--data_dir": cfg.data_dir, "--config": getattr(cfg, CONFIG_FILE_ATTR, None)},
                       cfg.data_dir, written={"--cache_dir": cfg.cache_dir})
    accelerator = make_accelerator(out_dir, mixed_precision=cfg.mixed_precision, grad_accum=cfg.grad_accum, seed=cfg.seed)
    data_dir = resolve_data_dir(cfg, accelerator)
    records = discover_images(data_dir)  # before the plan: what a plain folder skips is named first
    cfg, plan = apply_plan(cfg, data_dir, accelerator)
    write_run_config = check_resume_config(out_dir, cfg, cfg.resume)  # a resume must train as the run started
    cases = data_cases(records)
    check_resume_data(out_dir, cases, cfg.resume)  # ... on the same cases (run_config.json holds only the path)
    prep = preprocess_config(cfg)
    pretext = cfg.pretext if cfg.pretext.out_range is not None else dataclasses.replace(cfg.pretext, out_range=prep.out_range)
    check_pretext_for(cfg.patch_size, cfg.batch_size, pretext)  # before the cache: fails in seconds

    # Model, loss, optimizer, schedule (before the data: a wrong --patch_size fails in seconds).
    from monai.losses import DiceCELoss
    from nny_models.sampling import PatchDataset

    model = build_model(cfg, pretext, prep, plan)
    criterion = DiceCELoss(softmax=True, to_onehot_y=True, lambda_dice=0.5, lambda_ce=0.5)
    optimizer = adamw(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = warmup_cosine(optimizer, cfg.warmup_steps, cfg.max_steps)  # stepped by train_loop: not prepared
    check_output_dir(accelerator, out_dir, cfg.resume, cfg.overwrite)  # before the cache: never over an earlier run

    # Data: source patches big enough for the largest random-resized crop; one pass covers the run.
    cache = prepare_cache(cfg, prep, records, accelerator)
    save_plan(plan, out_dir, accelerator)
    length = cfg.max_steps * cfg.batch_size * cfg.grad_accum * accelerator.num_processes
    dataset = PatchDataset(cache, None, source_patch_size(cfg.patch_size, pretext), length,
                           seed=cfg.seed, fg_prob=0.0, with_label=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers,
                                         persistent_workers=cfg.num_workers > 0, pin_memory=torch.cuda.is_available())

    train_model = torch.compile(model) if cfg.compile else model
    train_model, optimizer, loader = accelerator.prepare(train_model, optimizer, loader)
    checkpoints = CheckpointManager(accelerator, out_dir, train_model, optimizer, scheduler)
    start, _ = checkpoints.resume() if cfg.resume else (0, {})
    metrics = MetricsLog(accelerator, out_dir / "metrics.jsonl", resume_step=start)
    accelerator.init_trackers("pretrain", config=tracker_config(cfg))
    if accelerator.is_main_process and write_run_config:
        write_text_atomic(out_dir / "run_config.json", json.dumps(dataclasses.asdict(cfg), indent=2))
        write_data_cases(out_dir, cases)
    debug = None
    if cfg.debug_dump:
        (out_dir / "debug").mkdir(parents=True, exist_ok=True)
        debug = (out_dir / "debug" / f"rank{accelerator.process_index}.jsonl").open("a" if start else "w")

    def pretext_loss(batch, step: int, micro: int) -> torch.Tensor:
        # Pretext draws depend on (seed, micro-step, rank) only: identical after a resume. They are data
        # preparation, so they run outside autocast (in fp32) and only the network sees mixed precision.
        gen = step_generator(cfg.seed, step * cfg.grad_accum + micro, accelerator.process_index)
        with torch.autocast(accelerator.device.type, enabled=False):
            image, label = pretext_batch(batch["image"], cfg.patch_size, pretext, gen)
        logits = train_model(image)
        logits = logits[0] if isinstance(logits, (list, tuple)) else logits
        if debug is not None:
            debug.write(json.dumps({"step": step, "micro": micro, "case_ids": list(batch["case_id"]),
                                    "patch_sum": float(batch["image"].double().sum())}) + "\n")
        return criterion(logits.float(), label)

    def after_step(done: int) -> None:
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.max_steps:
            checkpoints.save(done)
        if cfg.export_every and done % cfg.export_every == 0 and done < cfg.max_steps:
            export(model, cfg, pretext, done, accelerator)

    width = "" if cfg.feature_size is None else f" (feature_size {cfg.feature_size})"
    accelerator.print(f"pretraining {cfg.model}/{cfg.size}{width} on {len(cache)} volumes, "
                      f"{accelerator.num_processes} process(es), steps {start}..{cfg.max_steps}")
    train_loop(
        accelerator, train_model, optimizer, scheduler, batches_from(loader, start, accelerator),
        loss_fn=pretext_loss, start_step=start, max_steps=cfg.max_steps, grad_clip=cfg.grad_clip, seed=cfg.seed,
        metrics=metrics, samples_per_step=cfg.batch_size * cfg.grad_accum * accelerator.num_processes,
        log_every=cfg.log_every, after_step=after_step, desc="pretrain",
    )  # fmt: skip
    checkpoints.save(cfg.max_steps)
    export(model, cfg, pretext, cfg.max_steps, accelerator)
    if debug is not None:
        debug.write(json.dumps({"final_param_sha256": param_checksum(model)}) + "\n")
        debug.close()
    accelerator.end_training()
    accelerator.print(f"done: model exported to {out_dir / 'model'}")


if __name__ == "__main__":
    run_main(main, "pretrain/run.py")  # bad input: one line "pretrain/run.py: error: ...", exit code 2
