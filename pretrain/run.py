"""Volume Fusion pretraining (MIS-FM) of a zoo network on unannotated CT, with Hugging Face Accelerate.

    accelerate launch pretrain/run.py                                    # CPU demo on generated phantoms
    accelerate launch pretrain/run.py --preset paper --data_dir /data/ct --output_dir runs/vf
    accelerate launch --multi_gpu --num_processes 2 pretrain/run.py ...   # DDP (gloo on a CPU-only box)
    python pretrain/run.py --config run.json --resume                   # continue from the latest checkpoint

Pretext task: two augmented crops are fused voxel-wise with alpha = k / K, k in 0..K, and the network
segments k (K + 1 classes) with Dice + CE (0.5 / 0.5). The dataloader cuts source patches from the
preprocessed cache; crops, augmentation and fusion run batched on the training device (pretrain/data.py).
Outputs in OUTPUT_DIR: checkpoints/ (accelerate save_state, resumable), logs/ (TensorBoard),
metrics.jsonl (one row per step) and model/ (NnyNet.save_pretrained, exported at the end and every
--export_every steps; fine-tuning loads its encoder).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python pretrain/run.py` from a checkout

from pretrain.data import PretextConfig, pretext_batch, source_patch_size, step_generator  # noqa: E402
from pretrain.training import (  # noqa: E402
    CheckpointManager,
    MetricsLog,
    batches_from,
    make_accelerator,
    parse_config,
    progress,
    tracker_config,
    warmup_cosine,
)


@dataclass
class PretrainConfig:
    """Everything a pretraining run reads; CLI flags and --config JSON fill it (flags win)."""

    preset: str | None = None  # "paper" = MIS-FM scale (96^3, base size, bf16); the defaults are a CPU demo. Flags override it
    data_dir: str | None = None  # unannotated CT: MSD / nnU-Net raw / plain folder / CSV or JSONL manifest; None = phantoms
    output_dir: str = "runs/pretrain"  # checkpoints/, logs/, metrics.jsonl and the exported model/
    cache_dir: str | None = None  # preprocessed-volume cache (default OUTPUT_DIR/cache); share it between runs
    phantom_dir: str | None = None  # where phantoms are generated without --data_dir (default ~/.cache/nnynet)
    phantom_cases: int = 8  # number of unlabeled phantoms generated without --data_dir
    model: str = "nnynet"  # zoo name (nny_models.list_models())
    size: str = "tiny"  # zoo size preset: tiny | small | base
    spacing: tuple[float, float, float] = (2.0, 2.0, 3.0)  # target voxel spacing (mm) of the preprocessing
    hu_window: tuple[float, float] = (-1000.0, 1000.0)  # HU clip range mapped to [-1, 1] (MIS-FM uses -1000..1000)
    patch_size: tuple[int, int, int] = (64, 64, 64)  # network input patch (voxels); divisible by the model's size_divisor
    batch_size: int = 2  # patches per process per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    max_steps: int = 150  # optimizer steps
    lr: float = 2e-3  # peak AdamW learning rate
    weight_decay: float = 1e-5  # AdamW weight decay
    warmup_steps: int = 10  # linear warmup steps, then cosine decay to 0.01 x lr
    grad_clip: float = 1.0  # max gradient norm (0 = no clipping)
    mixed_precision: str = "no"  # no | bf16 | fp16
    grad_checkpointing: bool = False  # recompute activations in backward (less memory, about 30 percent slower)
    compile: bool = False  # torch.compile the model
    num_workers: int = 1  # DataLoader worker processes per rank
    seed: int = 0  # seeds weights, patch sampling and the pretext draws
    checkpoint_every: int = 50  # save a resumable checkpoint every N steps (0 = only at the end)
    export_every: int = 0  # also export OUTPUT_DIR/model every N steps (0 = only at the end)
    resume: bool = False  # continue from OUTPUT_DIR/checkpoints/latest if it exists
    log_every: int = 1  # log loss / lr every N steps
    variant: str = "grid"  # fusion label maps: "grid" (PyMIC) or "boxes" (paper)
    pairing: str = "same_volume"  # foreground crop from the same volume or "roll" (another volume of the batch)
    fg_ratio: float = 0.7  # grid variant: fraction of fused blocks
    debug_dump: bool = False  # write per-rank case ids, patch checksums and a parameter checksum to OUTPUT_DIR/debug/


PRESETS = {
    # MIS-FM scale: 96^3 patches, feature_size 48 (base), bf16, 2 patches per GPU. The dataclass defaults
    # above are the CPU demo (tiny network, 64^3 patches, a few minutes on 2 cores).
    "paper": dict(size="base", spacing=(1.5, 1.5, 2.0), patch_size=(96, 96, 96), batch_size=2, mixed_precision="bf16",
                  lr=1e-4, warmup_steps=1000, max_steps=100_000, checkpoint_every=1000, export_every=10_000,
                  num_workers=4),
}


def load_config(argv: list[str] | None = None) -> PretrainConfig:
    """Dataclass defaults < --preset < --config JSON < flags."""
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_config(PretrainConfig, argv, description=__doc__.splitlines()[0])
    if cfg.preset is None:
        return cfg
    if cfg.preset not in PRESETS:
        raise ValueError(f"--preset must be one of {sorted(PRESETS)}, got {cfg.preset!r}")
    explicit = {a[2:].split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}
    explicit |= {name[3:] for name in explicit if name.startswith("no_")}
    config_file = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"), None)
    if config_file:
        explicit |= set(json.loads(Path(config_file).read_text()))
    preset = {k: v for k, v in PRESETS[cfg.preset].items() if k not in explicit}
    return dataclasses.replace(cfg, **preset)


def prepare_cache(cfg: PretrainConfig, accelerator):
    """Discover the CT volumes (or generate phantoms) and preprocess them once into the cache."""
    from nny_models.cache import build_cache
    from nny_models.config import PreprocessConfig
    from nny_models.io import discover_cases

    data_dir = cfg.data_dir
    if data_dir is None:
        from nny_models.phantoms import embedded_dataset

        with accelerator.main_process_first():
            data_dir = embedded_dataset(cfg.phantom_cases, seed=cfg.seed, unlabeled=True, root=cfg.phantom_dir)
    records = [dataclasses.replace(r, label=None) for r in discover_cases(data_dir)]  # pretraining ignores labels
    prep = PreprocessConfig(spacing=tuple(cfg.spacing), hu_window=tuple(cfg.hu_window))
    cache_dir = cfg.cache_dir or str(Path(cfg.output_dir) / "cache")
    with accelerator.main_process_first():
        cache = build_cache(records, prep, cache_dir)
    return cache, prep


def build_model(cfg: PretrainConfig, pretext: PretextConfig, prep):
    """NnyNet whose config.json describes the pretext task (K + 1 fusion classes)."""
    from nny_models.config import NnyNetConfig
    from nny_models.hub import NnyNet

    model_kwargs = {"size": cfg.size, "out_channels": pretext.num_classes}
    if cfg.grad_checkpointing:
        model_kwargs["use_checkpoint"] = True
    return NnyNet(NnyNetConfig(
        model=cfg.model,
        model_kwargs=model_kwargs,
        label_names=["background"] + [f"fusion_{k}" for k in range(1, pretext.num_classes)],
        preprocessing=prep.to_dict(),
        patch_size=tuple(cfg.patch_size),
        task="volume_fusion_pretext",
    ))


def export(model, cfg: PretrainConfig, step: int, accelerator) -> None:
    """save_pretrained into OUTPUT_DIR/model, atomically (written aside, then swapped in)."""
    if accelerator.is_main_process:
        out = Path(cfg.output_dir) / "model"
        tmp = out.with_name("model.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        training = {"task": "Volume Fusion pretext (MIS-FM)", "steps": step, "patch_size": list(cfg.patch_size),
                    "batch_size": cfg.batch_size * cfg.grad_accum * accelerator.num_processes, "lr": cfg.lr,
                    "loss": "Dice + CE (0.5 / 0.5)", "variant": cfg.variant}
        model.save_pretrained(tmp, model_card_kwargs={"training": training, "trained_on": cfg.data_dir or "synthetic CT phantoms"})
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
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
    out_dir = Path(cfg.output_dir)
    accelerator = make_accelerator(out_dir, mixed_precision=cfg.mixed_precision, grad_accum=cfg.grad_accum, seed=cfg.seed)
    pretext = PretextConfig(variant=cfg.variant, pairing=cfg.pairing, fg_ratio=cfg.fg_ratio)

    # Data: source patches big enough for the largest random-resized crop; one pass covers the run.
    from monai.losses import DiceCELoss
    from nny_models.sampling import PatchDataset

    cache, prep = prepare_cache(cfg, accelerator)
    length = cfg.max_steps * cfg.batch_size * cfg.grad_accum * accelerator.num_processes
    dataset = PatchDataset(cache, None, source_patch_size(cfg.patch_size, pretext), length,
                           seed=cfg.seed, fg_prob=0.0, with_label=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers,
                                         persistent_workers=cfg.num_workers > 0, pin_memory=torch.cuda.is_available())

    # Model, loss, optimizer, schedule.
    model = build_model(cfg, pretext, prep)
    divisor = getattr(model.net, "size_divisor", 1)
    if any(p % divisor for p in cfg.patch_size):
        raise ValueError(f"--patch_size {cfg.patch_size} must be divisible by {divisor} for model {cfg.model!r}")
    loss_fn = DiceCELoss(softmax=True, to_onehot_y=True, lambda_dice=0.5, lambda_ce=0.5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = warmup_cosine(optimizer, cfg.warmup_steps, cfg.max_steps)  # stepped by hand: not prepared
    train_model = torch.compile(model) if cfg.compile else model
    train_model, optimizer, loader = accelerator.prepare(train_model, optimizer, loader)
    accelerator.register_for_checkpointing(scheduler)

    ckpt = CheckpointManager(accelerator, out_dir)
    start = ckpt.resume() if cfg.resume else 0
    metrics = MetricsLog(accelerator, out_dir / "metrics.jsonl", resume_step=start)
    accelerator.init_trackers("pretrain", config=tracker_config(cfg))
    if accelerator.is_main_process:
        (out_dir / "run_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    debug = None
    if cfg.debug_dump:
        (out_dir / "debug").mkdir(parents=True, exist_ok=True)
        debug = (out_dir / "debug" / f"rank{accelerator.process_index}.jsonl").open("a" if start else "w")

    accelerator.print(f"pretraining {cfg.model}/{cfg.size} on {len(cache)} volumes, {accelerator.num_processes} "
                      f"process(es), steps {start}..{cfg.max_steps}")
    batches = batches_from(loader, start, accelerator)
    bar = progress(accelerator, cfg.max_steps, start, desc="pretrain")
    train_model.train()
    tic = time.perf_counter()
    for step in range(start, cfg.max_steps):
        total = torch.zeros((), device=accelerator.device)
        for micro in range(cfg.grad_accum):
            batch = next(batches)
            # Pretext draws depend on (seed, micro-step, rank) only: identical after a resume.
            gen = step_generator(cfg.seed, step * cfg.grad_accum + micro, accelerator.process_index)
            image, label = pretext_batch(batch["image"], cfg.patch_size, pretext, gen)
            with accelerator.accumulate(train_model):
                with accelerator.autocast():
                    logits = train_model(image)
                logits = logits[0] if isinstance(logits, (list, tuple)) else logits
                loss = loss_fn(logits.float(), label)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.grad_clip > 0:
                    accelerator.clip_grad_norm_(train_model.parameters(), cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            total += loss.detach() / cfg.grad_accum
            if debug is not None:
                debug.write(json.dumps({"step": step, "micro": micro, "case_ids": list(batch["case_id"]),
                                        "patch_sum": float(batch["image"].double().sum())}) + "\n")
        scheduler.step()
        done = step + 1
        bar.update(1)

        if done % cfg.log_every == 0 or done == cfg.max_steps:
            loss_mean = accelerator.reduce(total, reduction="mean").item()
            row = {"step": done, "loss": loss_mean, "lr": scheduler.get_last_lr()[0],
                   "samples_per_s": cfg.batch_size * cfg.grad_accum * accelerator.num_processes * cfg.log_every
                   / (time.perf_counter() - tic)}
            tic = time.perf_counter()
            accelerator.log({"train/loss": row["loss"], "train/lr": row["lr"]}, step=done)
            metrics.log(row)
            bar.set_postfix(loss=f"{loss_mean:.4f}")
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.max_steps:
            ckpt.save(done)
        if cfg.export_every and done % cfg.export_every == 0 and done < cfg.max_steps:
            export(model, cfg, done, accelerator)

    bar.close()
    ckpt.save(cfg.max_steps)
    export(model, cfg, cfg.max_steps, accelerator)
    if debug is not None:
        debug.write(json.dumps({"final_param_sha256": param_checksum(model)}) + "\n")
        debug.close()
    accelerator.end_training()
    accelerator.print(f"done: model exported to {out_dir / 'model'}")


if __name__ == "__main__":
    main()
