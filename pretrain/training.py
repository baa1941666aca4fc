"""Accelerate plumbing shared by pretrain/run.py and finetune/run.py.

Both stages need the same few things around their training loop: an Accelerator that also works on a
CPU-only machine, a warmup + cosine schedule, step-based checkpoints that survive a kill -9, and a way to
continue the exact same data order after a resume. They live here so each run.py stays a flat loop.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import re
import shutil
import types
import typing
from pathlib import Path
from typing import Any, Iterator, TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from tqdm.auto import tqdm

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"  # a file holding the name of the newest complete checkpoint folder


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
        raise ValueError("mixed_precision='fp16' needs a GPU; use 'bf16' or 'no' on the CPU")
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=grad_accum,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    set_seed(seed)
    return accelerator


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.01
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup then cosine decay to ``min_lr_ratio`` of the base LR, in optimizer steps.

    Do not pass it to ``accelerator.prepare``: a prepared scheduler steps once per process per optimizer
    step. Step it yourself after each optimizer step and ``register_for_checkpointing`` it.
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class CheckpointManager:
    """Step-numbered ``save_state`` folders under OUTPUT_DIR/checkpoints with an atomic ``latest`` pointer.

    A folder is written under a temporary name and renamed only when every rank has finished, and ``latest``
    is replaced with ``os.replace``: a kill at any moment leaves the previous checkpoint usable.
    """

    def __init__(self, accelerator: Accelerator, output_dir: str | Path, keep_last: int = 2):
        self.accelerator = accelerator
        self.root = Path(output_dir) / CHECKPOINT_DIR
        self.keep_last = keep_last

    def save(self, step: int, extra: dict[str, Any] | None = None) -> Path:
        acc = self.accelerator
        final = self.root / f"step_{step:07d}"
        tmp = self.root / f".step_{step:07d}.tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)
        acc.wait_for_everyone()
        if acc.is_main_process:
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **(extra or {})}))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            pointer = self.root / f".{LATEST}.tmp"
            pointer.write_text(final.name)
            os.replace(pointer, self.root / LATEST)
            self._prune()
        acc.wait_for_everyone()
        return final

    def latest(self) -> Path | None:
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        return path if (path / "trainer_state.json").is_file() else None

    def resume(self) -> int:
        """Load the newest checkpoint into the prepared objects; return the step to continue from."""
        path = self.latest()
        if path is None:
            return 0
        self.accelerator.load_state(str(path))
        state = json.loads((path / "trainer_state.json").read_text())
        self.accelerator.print(f"resumed from {path} at step {state['step']}")
        return int(state["step"])

    def _prune(self) -> None:
        done = sorted(p for p in self.root.glob("step_*") if p.is_dir())
        for old in done[: max(0, len(done) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)


def batches_from(dataloader, start_step: int, accelerator: Accelerator) -> Iterator[Any]:
    """Endless batches from a prepared dataloader, starting after ``start_step`` optimizer steps.

    The patch datasets are deterministic in (seed, index), so skipping the batches already consumed
    reproduces the data order of an uninterrupted run.
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


def progress(accelerator: Accelerator, total: int, initial: int = 0, desc: str = "train") -> tqdm:
    """A progress bar on the local main process only."""
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, disable=not accelerator.is_local_main_process)


def tracker_config(config: Any) -> dict[str, Any]:
    """Flatten a dataclass config to the scalar types TensorBoard's hparams accept."""
    import dataclasses

    out = {}
    for key, value in dataclasses.asdict(config).items():
        out[key] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    return out


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
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


C = TypeVar("C")


def parse_config(cls: type[C], argv: list[str] | None = None, description: str | None = None) -> C:
    """Build a run-config dataclass from ``--config file.json`` and command-line flags.

    Every field becomes ``--field`` (booleans also get ``--no-field``) with the field's comment as help.
    Precedence: dataclass default < JSON file < flag, so the dataclass stays the single source of truth.
    """
    hints = typing.get_type_hints(cls)
    try:  # the comment after each field is its --help text
        source = inspect.getsource(cls)
    except OSError:
        source = ""
    comments = dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.+)$", source, flags=re.M))
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="JSON file with any of the fields below; flags override it")
    for f in dataclasses.fields(cls):
        kind = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f"{comments.get(f.name, '')} (default: {default})".replace("%", "%%")  # argparse formats help
        kw: dict[str, Any] = {"help": help_text, "default": argparse.SUPPRESS}
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) in (tuple, list):
            # tuple[str, ...] may be empty (a bare flag); fixed-length tuples need their values
            kw.update(nargs="*" if Ellipsis in typing.get_args(kind) else "+", type=typing.get_args(kind)[0])
        else:
            kw["type"] = kind
        parser.add_argument(f"--{f.name}", **kw)
    flags = vars(parser.parse_args(argv))
    config_file = flags.pop("config", None)
    values: dict[str, Any] = json.loads(Path(config_file).read_text()) if config_file else {}
    names = {f.name for f in dataclasses.fields(cls)}
    if set(values) - names:
        raise ValueError(f"{config_file}: unknown field(s) {sorted(set(values) - names)}; expected some of {sorted(names)}")
    values.update(flags)
    for name, value in values.items():
        if typing.get_origin(_unwrap_optional(hints[name])) is tuple and value is not None:
            values[name] = tuple(value)
    return cls(**values)


def _unwrap_optional(kind: Any) -> Any:
    """``X | None`` -> ``X``; anything else unchanged."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    is_union = typing.get_origin(kind) in (typing.Union, types.UnionType)
    return args[0] if is_union and len(args) == 1 else kind
