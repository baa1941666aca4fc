"""The training step both stages share, and the Accelerate plumbing around it.

``train_loop`` is the whole optimizer-step skeleton: gradient accumulation under ``accelerator.accumulate``,
the forward under ``accelerator.autocast()``, optional gradient clipping, a hand-stepped LR schedule, the
mean loss over micro-batches reduced across ranks, and the per-step seeding that makes a resumed run draw
what an uninterrupted one draws. What differs between the stages is passed in as functions: the loss of
one micro-batch, the validation, and what to save after a step (checkpoints, exports).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from nny_models.training.checkpoints import DivergedError


def make_accelerator(
    output_dir: str | Path,
    *,
    mixed_precision: str = "no",
    grad_accum: int = 1,
    log_with: str | None = "tensorboard",
    seed: int = 0,
) -> Accelerator:
    """An Accelerator for one GPU, many GPUs/nodes, or the CPU (then DDP runs over gloo).

    ``cpu=not cuda`` matters: with it, ``accelerate launch --multi_gpu --num_processes 2`` gives two synced
    CPU processes, which is how the tests check DDP without a GPU.
    """
    output_dir = Path(output_dir)
    cpu = not torch.cuda.is_available()
    if cpu and mixed_precision == "fp16":
        raise ValueError("--mixed_precision fp16 needs a GPU; use 'bf16' or 'no' on the CPU")
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=grad_accum,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    set_seed(seed)  # model initialisation: identical on every rank
    return accelerator


def adamw(params: Any, **kwargs: Any) -> torch.optim.AdamW:
    """torch's AdamW with its fused kernel where this torch has one for the CPU (>= 2.4) or CUDA: one op
    updates every parameter instead of the per-tensor loop torch picks on the CPU (the pipeline's step: 0.217
    vs 0.227 s, bench/train_step.py). Same update rule; a checkpoint from an unfused run resumes as saved."""
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    fused = torch.cuda.is_available() or (major, minor) >= (2, 4)
    return torch.optim.AdamW(params, fused=fused or None, **kwargs)


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    max_steps: int,
    min_lr_ratio: float = 0.01,
    zero_lr_steps: Mapping[str, int] | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup then cosine decay to ``min_lr_ratio`` of the base LR, in optimizer steps.

    ``zero_lr_steps={"encoder": N}`` holds the LR of the param group named "encoder" at exactly 0 for the
    first N optimizer steps (a frozen-encoder warmup): the factor is part of the schedule, so the LR is 0
    *before* those steps run, and with lr = 0 AdamW leaves the parameters bitwise unchanged (its weight
    decay is scaled by lr too). Groups are found by their "name", never by position.

    Do not pass it to ``accelerator.prepare``: a prepared scheduler steps once per process per optimizer
    step. train_loop steps it after each optimizer step; its state is saved as JSON in trainer_state.json.
    """
    zero_lr_steps = dict(zero_lr_steps or {})
    names = [group.get("name") for group in optimizer.param_groups]
    unknown = sorted(set(zero_lr_steps) - set(names))
    if unknown:
        raise ValueError(f"warmup_cosine: no param group named {unknown}; the groups are {names}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def held(frozen: int) -> Callable[[int], float]:
        return lambda step: 0.0 if step < frozen else factor(step)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [held(zero_lr_steps.get(n, 0)) for n in names])


def batches_from(dataloader, start_step: int, accelerator: Accelerator) -> Iterator[Any]:
    """Endless batches from a prepared dataloader, starting after ``start_step`` optimizer steps.

    The patch datasets are deterministic in (seed, index), so skipping the batches already consumed
    reproduces the data order of an uninterrupted run; no sampler or RNG state needs to be saved.
    """
    per_epoch = len(dataloader)
    if per_epoch == 0:
        raise ValueError("the training dataloader is empty: check --data_dir and --batch_size")
    consumed = start_step * accelerator.gradient_accumulation_steps
    epoch, skip = divmod(consumed, per_epoch)
    while True:
        if hasattr(dataloader, "set_epoch"):
            dataloader.set_epoch(epoch)
        loader = accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
        yield from loader
        skip, epoch = 0, epoch + 1


def step_seed(seed: int, micro_step: int, rank: int) -> int:
    """The global RNG seed of one micro-batch on ``rank`` (dropout, drop-path): a pure function of
    (seed, micro-step, rank), so a resumed run needs no saved RNG state (and no pickle) to continue identically."""
    return int(np.random.SeedSequence([seed, micro_step, rank, 0x5EED]).generate_state(1)[0])


def progress(accelerator: Accelerator, total: int, initial: int = 0, desc: str = "train") -> tqdm:
    """A progress bar on the local main process only."""
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, disable=not accelerator.is_local_main_process)


class MetricsLog:
    """Append-only JSON-lines metrics file (OUTPUT_DIR/metrics.jsonl) written by the main process.

    TensorBoard holds the same numbers; this file is what tests, figures and reports read. On resume it
    drops rows from steps after the checkpoint so the history stays that of one run.
    """

    def __init__(self, accelerator: Accelerator, path: str | Path, resume_step: int = 0):
        self.accelerator = accelerator
        self.path = Path(path)
        if accelerator.is_main_process:
            kept = [row for row in read_metrics(self.path) if row.get("step", 0) <= resume_step] if resume_step else []
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("".join(json.dumps(row) + "\n" for row in kept))

    def log(self, row: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl file (empty list if it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    numbered = [(i, line) for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    rows = []
    for k, (number, line) in enumerate(numbered):
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"a JSON object, got {type(row).__name__}")
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            if k == len(numbered) - 1:  # a crash mid-write leaves a truncated last line: that row is lost, no more
                warnings.warn(f"{path}: line {number} is incomplete (a crash while writing it?); it is dropped",
                              stacklevel=2)
                break
            raise ValueError(f"{path}: line {number} is not a JSON object of metrics ({e}); repair or delete that line") from None
        rows.append(row)
    return rows


def learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The LR each param group uses now: {"lr": largest} plus {"lr_<name>": ...} when there are named groups."""
    groups = optimizer.param_groups
    out = {"lr": max(float(g["lr"]) for g in groups)}
    if len(groups) > 1:
        out.update({f"lr_{g.get('name', i)}": float(g["lr"]) for i, g in enumerate(groups)})
    return out


def train_loop(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batches: Iterator[Any],
    *,
    loss_fn: Callable[[Any, int, int], torch.Tensor],
    start_step: int,
    max_steps: int,
    grad_clip: float,
    seed: int,
    metrics: MetricsLog,
    samples_per_step: int,
    log_every: int = 1,
    validate: Callable[[int], dict[str, float]] | None = None,
    after_step: Callable[[int], None] | None = None,
    desc: str = "train",
) -> None:
    """Optimizer steps ``start_step`` .. ``max_steps`` - 1.

    loss_fn(batch, step, micro) -> the loss of one micro-batch (run under autocast; cast logits to float
        for the loss if the stage wants an fp32 loss).
    validate(done) -> metrics added to that step's row, or {} (called on every rank after every step; it
        decides itself when to run and on which rank).
    after_step(done): checkpoints and exports, after the row of step ``done`` is logged.
    grad_clip: max gradient norm; 0 = no clipping (negative is refused).
    """
    if grad_clip < 0:
        raise ValueError(f"--grad_clip must be >= 0 (0 = no clipping), got {grad_clip}")
    accum = accelerator.gradient_accumulation_steps
    bar = progress(accelerator, max_steps, start_step, desc=desc)
    model.train()
    tic, logged = time.perf_counter(), start_step
    for step in range(start_step, max_steps):
        lrs = learning_rates(optimizer)  # the LRs this step uses (the schedule was stepped after the last one)
        total = torch.zeros((), device=accelerator.device)
        for micro in range(accum):
            batch = next(batches)
            # After the fetch: creating a DataLoader iterator (at a resume, at each epoch) draws from the RNG.
            set_seed(step_seed(seed, step * accum + micro, accelerator.process_index))
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    loss = loss_fn(batch, step, micro)
                accelerator.backward(loss)
                if accelerator.sync_gradients and grad_clip > 0:
                    accelerator.clip_grad_norm_(model.parameters(), grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            total += loss.detach().float() / accum
        scheduler.step()
        done = step + 1
        bar.update(1)

        last = done == max_steps
        row: dict[str, Any] = {}
        if done % log_every == 0 or last:
            row = {"step": done, "loss": accelerator.reduce(total, reduction="mean").item(), **lrs,
                   "samples_per_s": samples_per_step * (done - logged) / max(time.perf_counter() - tic, 1e-9)}
            if not math.isfinite(row["loss"]) and accelerator.scaler is None:
                # fp16's GradScaler skips such a step; in fp32 / bf16 the optimizer has already applied it
                raise DivergedError(f"step {done}: the training loss is {row['loss']}: the run diverged (lower --lr, "
                                    f"or check the training data); checkpoints written before this step are kept")
            tic, logged = time.perf_counter(), done
        if validate is not None:
            extra = validate(done)
            if extra:
                row = {"step": done, **row, **extra}
        if row:
            accelerator.log({k: v for k, v in row.items() if k != "step"}, step=done)
            metrics.log(row)
            bar.set_postfix({k: f"{row[k]:.4f}" for k in ("loss", "val_dice") if k in row})
        if after_step is not None:
            after_step(done)
    bar.close()
