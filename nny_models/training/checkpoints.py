"""Resumable checkpoints that survive a kill -9, a truncated file and a planted pickle.

A checkpoint is a folder OUTPUT_DIR/checkpoints/step_NNNNNNN holding exactly three files:

    model.safetensors   the unwrapped model's state dict (safetensors: no code can run on load)
    optimizer.bin       the optimizer's state dict (torch.save; read back with ``weights_only=True``)
    trainer_state.json  step, LR-scheduler state, GradScaler state, and the stage's own loop state (JSON)

Nothing else is read on resume: no ``accelerator.load_state`` (it unpickles ``custom_checkpoint_*.pkl``
with ``weights_only=False`` for registered objects and tries ``random_states_*.pkl``), no RNG pickles
(the data order is a function of (seed, index) and train_loop reseeds every step from (seed, step, rank)).

A folder is written under a temporary name and renamed when complete; ``latest`` (a file naming the newest
folder) is replaced atomically. Before use, a checkpoint is validated (every file present, readable and
consistent); a damaged one is reported by path and the newest intact older one is used instead. We keep our
own step-numbered names rather than ``ProjectConfiguration(automatic_checkpoint_naming=True, total_limit=N)``:
Accelerate writes checkpoint_<n> in place (not atomic), numbers folders by save count rather than step (a
resume must restore its counter, and a half-written folder makes the next save raise), and its pruning treats
every entry of checkpoints/ as a numbered checkpoint, so the ``latest`` pointer or a temporary folder breaks it.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from accelerate import Accelerator

from nny_models.paths import content_crc
from nny_models.training.files import write_text_atomic

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"  # a file holding the name of the newest complete checkpoint folder
MODEL_FILE, OPTIMIZER_FILE, STATE_FILE = "model.safetensors", "optimizer.bin", "trainer_state.json"
FORMAT = 2  # trainer_state.json "format": 1 was Accelerate's save_state layout with a pickled scheduler
_NAME = re.compile(r"^step_(\d{7,})$")


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot be used; the message names the file and what is wrong."""


class DivergedError(RuntimeError):
    """The run's loss or weights became NaN / Inf: it stops, and nothing is saved over the last good files."""


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an Inf."""
    return [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete-looking step_* folders under OUTPUT_DIR/checkpoints, newest step first."""
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """(trainer state, model tensors, optimizer state) of one folder, or CheckpointError naming the bad file.

    Reading is the validation: a truncated safetensors or torch file fails to parse, a planted pickle is
    refused by ``weights_only=True``, non-finite weights are refused (a diverged run cannot be resumed).
    """
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise CheckpointError(f"{state_file}: missing (the checkpoint was not completed)")
    try:
        state = json.loads(state_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{state_file}: not valid JSON ({e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or not isinstance(state.get("scheduler"), dict):
        raise CheckpointError(f"{state_file}: expected an object with an integer 'step' and a 'scheduler' object")
    m = _NAME.match(path.name)
    if m and int(m.group(1)) != state["step"]:
        raise CheckpointError(f"{state_file}: step {state['step']} does not match the folder name {path.name}")

    model_file = path / MODEL_FILE
    try:
        weights = safetensors.torch.load_file(model_file)
    except Exception as e:  # safetensors raises its own error types for truncated / malformed files
        raise CheckpointError(f"{model_file}: unreadable ({type(e).__name__}: {e})") from None
    bad = non_finite(weights)
    if bad:
        raise CheckpointError(f"{model_file}: non-finite values in {len(bad)} tensor(s), e.g. {bad[:3]}")

    optimizer_file = path / OPTIMIZER_FILE
    try:
        optimizer_state = torch.load(optimizer_file, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip, a planted pickle (UnpicklingError), a missing file
        raise CheckpointError(f"{optimizer_file}: unreadable ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(optimizer_state, dict) or {"state", "param_groups"} - optimizer_state.keys():
        raise CheckpointError(f"{optimizer_file}: not an optimizer state dict")
    return state, weights, optimizer_state


def check_output_dir(accelerator: Accelerator, output_dir: str | Path, resume: bool, overwrite: bool = False) -> None:
    """Refuse to start a fresh run over an earlier one; say so when --resume finds nothing to resume.

    Call it before any expensive preparation: it only looks at which checkpoint folders exist."""
    output_dir = Path(output_dir)
    root = output_dir / CHECKPOINT_DIR
    existing = checkpoint_dirs(output_dir)
    if overwrite:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(root, ignore_errors=True)
            shutil.rmtree(output_dir / "model", ignore_errors=True)
            (output_dir / "metrics.jsonl").unlink(missing_ok=True)
        accelerator.wait_for_everyone()
        if existing:
            accelerator.print(f"--overwrite: deleted the earlier run's checkpoints and model in {output_dir}")
    elif existing and not resume:
        raise FileExistsError(
            f"{output_dir} holds checkpoints of an earlier run (newest: {existing[0].name}); pass --resume "
            "to continue it, --overwrite to delete it and start again, or choose another --output_dir"
        )
    elif resume and not existing:
        accelerator.print(f"--resume: no checkpoint in {root}; starting at step 0")


RUN_CONFIG = "run_config.json"
# Fields a --resume may change: they decide how the run is executed or recorded, never what is trained (the data
# order is a function of (seed, index), so the worker count does not change it; checkpoint/export/log cadence
# only adds files; gradient checkpointing recomputes the same activations, with the same RNG state, to save memory:
# turning it on is how a run killed for lack of memory goes on). Everything else (data, labels, model, LR, schedule via max_steps / warmup_steps, seed, loss,
# precision, ...) must equal the saved run_config.json, or the resumed run would silently be another run.
RESUME_MAY_CHANGE = frozenset(
    {"resume", "overwrite", "output_dir", "num_workers", "checkpoint_every", "export_every", "log_every", "debug_dump",
     "grad_checkpointing"}
)


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix[:-1]: d}
    out: dict[str, Any] = {}
    for key, value in d.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return out


def check_resume_config(output_dir: str | Path, cfg: Any, resume: bool, may_change=RESUME_MAY_CHANGE) -> bool:
    """On --resume over existing checkpoints, refuse a config that differs from OUTPUT_DIR/run_config.json in any
    field outside ``may_change`` (one line naming each field with its saved and new value). Returns whether the
    caller should write run_config.json: True for a fresh run (or a --resume with nothing to resume), False for a
    resume, whose saved file stays the record of the run. Call it with the resolved config (after the plan)."""
    output_dir = Path(output_dir)
    path = output_dir / RUN_CONFIG
    if not resume or not checkpoint_dirs(output_dir):
        return True
    new = json.loads(json.dumps(dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)))
    if not path.is_file():
        raise ValueError(
            f"--resume: {path} is missing, so the settings the checkpoints in {output_dir / CHECKPOINT_DIR} were "
            "trained with cannot be checked; restore it or pass --overwrite to start again"
        )
    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--resume: {path} is not readable JSON ({e}); restore it or pass --overwrite") from None
    if not isinstance(saved, dict):
        raise ValueError(f"--resume: {path} must hold a JSON object of the run's settings, got {type(saved).__name__}")
    old, now = _flat(saved), _flat(new)
    # Only fields both sides know: one the saved file lacks came with a newer nnynet (its default is what the older
    # code did, or only touches the export), one it alone has was dropped since.
    diffs = [
        f"{key}: {json.dumps(old[key])} -> {json.dumps(now[key])}"
        for key in sorted(old.keys() & now.keys())
        if key.split(".")[0] not in may_change and not _same_setting(old[key], now[key])
    ]
    if diffs:
        raise ValueError(
            f"--resume: the settings differ from {path} (saved -> now): {'; '.join(diffs)}. A resumed run must "
            f"train as it started; only {', '.join(sorted(may_change))} may change. Pass the saved values, or use "
            "another --output_dir (or --overwrite) for a new run"
        )
    return False


DATA_CASES = "data_cases.json"  # the cases a run started with (id -> "bytes:crc32" of its files): a --resume checks them


def data_cases(records: Any) -> dict[str, str]:
    """{case_id: "<bytes>:<crc32>" of its image and label files} of discovered cases (``CaseRecord``s; a DICOM
    series folder counts every file in it). From the content alone, so the same on another copy of the data,
    and a label repainted in place (an uncompressed .nii keeps its size) is a changed case."""
    def files(path: str | None) -> list[Path]:
        if path is None:
            return []
        p = Path(path)
        if p.is_dir():
            return sorted(f for f in p.iterdir() if f.is_file())
        return [p] if p.exists() else []

    out = {}
    for r in records:
        paths = files(r.image) + files(r.label)
        crc = 0
        for f in paths:
            crc = content_crc(f, crc)
        out[r.case_id] = f"{sum(f.stat().st_size for f in paths)}:{crc:08x}"
    return out


def _same_case(saved: Any, now: str) -> bool:
    """A run saved by an older nnynet recorded the bytes alone (an int): those are compared."""
    if isinstance(saved, int):
        return now.split(":")[0] == str(saved)
    return saved == now


def check_resume_data(output_dir: str | Path, cases: dict[str, str], resume: bool) -> None:
    """On --resume over existing checkpoints, refuse data whose cases differ from OUTPUT_DIR/data_cases.json: a case
    added, removed or with files of other content (run_config.json records only the --data_dir path, and a changed
    case list changes which case every later patch is drawn from). A run saved before the file existed passes."""
    path = Path(output_dir) / DATA_CASES
    if not resume or not checkpoint_dirs(output_dir) or not path.is_file():
        return
    try:
        saved = json.loads(path.read_text())["cases"]
        if not isinstance(saved, dict):
            raise TypeError(type(saved).__name__)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--resume: {path} is not readable ({type(e).__name__}: {e}); restore it, or pass "
                         "--overwrite to start again") from None

    def some(ids: list[str]) -> str:
        return ", ".join(ids[:5]) + (", ..." if len(ids) > 5 else "")

    added, removed = sorted(cases.keys() - saved.keys()), sorted(saved.keys() - cases.keys())
    changed = sorted(c for c in cases.keys() & saved.keys() if not _same_case(saved[c], cases[c]))
    parts = [f"{len(ids)} case(s) {what} ({some(ids)})"
             for ids, what in ((added, "added"), (removed, "removed"), (changed, "whose files changed"))
             if ids]
    if parts:
        raise ValueError(
            f"--resume: the training data differ from the cases the run started with ({path}): {'; '.join(parts)}. "
            "A resumed run must train on the same cases: restore them, or use another --output_dir (or --overwrite) "
            "for a new run"
        )


def write_data_cases(output_dir: str | Path, cases: dict[str, str]) -> None:
    """Record the run's cases for check_resume_data (main process, with run_config.json)."""
    write_text_atomic(Path(output_dir) / DATA_CASES, json.dumps({"cases": cases}, indent=1))


def _same_setting(saved: Any, now: Any) -> bool:
    """Equal values, or two spellings of one existing path (relative and absolute, through a symlink)."""
    if saved == now:
        return True
    if isinstance(saved, str) and isinstance(now, str) and os.path.exists(saved) and os.path.exists(now):
        return os.path.realpath(saved) == os.path.realpath(now)
    return False


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


# What a run writes in OUTPUT_DIR, or --overwrite deletes there: an input may not lie in any of them.
RUN_OWNED = ("checkpoints", "model", "metrics.jsonl", "run_config.json", "plan.json", "logs", "figures", DATA_CASES)


def check_output_paths(output_dir: str | Path, inputs: dict[str, str | Path | None], data_dir: str | Path | None,
                       written: dict[str, str | Path | None] | None = None) -> None:
    """Refuse, before anything is deleted or written, an input (``inputs``: flag name -> path, e.g. --pretrained,
    --data_dir, --config) lying in what the run writes in OUTPUT_DIR or --overwrite deletes there (``RUN_OWNED``:
    checkpoints/, model/, run_config.json, ...), and an OUTPUT_DIR inside or equal to --data_dir (cache/,
    checkpoints/, model/ would be written into the data). Other files of OUTPUT_DIR (a table a study wrote there)
    are fine. A --pretrained that names no local path (a Hub repo id) is not a path here. ``written`` (flag -> path,
    e.g. --cache_dir) are other folders the run writes: they may not lie inside --data_dir either."""
    out = Path(os.path.abspath(Path(output_dir).expanduser()))
    if data_dir is not None:
        data = Path(os.path.abspath(Path(data_dir).expanduser()))
        if _inside(out, data) or _inside(Path(os.path.realpath(out)), Path(os.path.realpath(data))):
            raise ValueError(
                f"--output_dir {output_dir} lies inside --data_dir {data_dir}: the run would write cache/, "
                "checkpoints/ and model/ into the data; choose an --output_dir outside it"
            )
        for flag, value in (written or {}).items():
            if value is None:
                continue
            path = Path(os.path.abspath(Path(value).expanduser()))
            if _inside(path, data) or _inside(Path(os.path.realpath(path)), Path(os.path.realpath(data))):
                raise ValueError(f"{flag} {value} lies inside --data_dir {data_dir}: the run would write its files "
                                 f"into the data; choose a {flag} outside it")
    owned = [out / name for name in RUN_OWNED] + [Path(os.path.realpath(out)) / name for name in RUN_OWNED]
    for flag, value in inputs.items():
        if value is None or str(value).lower() == "none":
            continue
        path = Path(os.path.abspath(Path(value).expanduser()))
        if flag == "--pretrained" and not path.exists():
            continue  # a Hub repo id
        real = Path(os.path.realpath(path))
        if any(_inside(p, place) for p in (path, real) for place in owned) or real == Path(os.path.realpath(out)):
            raise ValueError(
                f"{flag} {value} lies inside --output_dir {output_dir}, in what the run writes (and --overwrite "
                "deletes): move it out or choose another --output_dir"
            )


class CheckpointManager:
    """Save / validate / resume the checkpoints of one run in OUTPUT_DIR/checkpoints."""

    def __init__(
        self,
        accelerator: Accelerator,
        output_dir: str | Path,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        keep_last: int = 2,
    ):
        self.accelerator = accelerator
        self.output_dir = Path(output_dir)
        self.root = self.output_dir / CHECKPOINT_DIR
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.keep_last = keep_last

    def save(self, step: int, extra: dict[str, Any] | None = None) -> Path:
        """Write checkpoint ``step`` (every rank calls it; the main process writes)."""
        acc = self.accelerator
        final = self.root / f"step_{step:07d}"
        acc.wait_for_everyone()
        weights = acc.get_state_dict(self.model)  # unwrapped names; gathers shards where needed
        bad = non_finite(weights)
        if bad:  # saving would prune the last good checkpoints and leave nothing to resume from
            kept = self.latest()
            raise DivergedError(
                f"step {step}: the model's weights hold NaN / Inf in {len(bad)} tensor(s), e.g. {bad[:3]}: the run "
                f"diverged. No checkpoint was written; "
                + (f"the last good one, {kept}, is kept (--resume continues from it; lower --lr or check the "
                   f"training data first)." if kept else "there is no earlier one to resume from (lower --lr or "
                   f"check the training data).")
            )
        if acc.is_main_process:
            tmp = self.root / f".{final.name}.tmp"
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                acc.save(weights, tmp / MODEL_FILE, safe_serialization=True)
                acc.save(self.optimizer.state_dict(), tmp / OPTIMIZER_FILE)
                state = {"format": FORMAT, "step": step, "scheduler": self.scheduler.state_dict(),
                         "scaler": acc.scaler.state_dict() if acc.scaler is not None else None, **(extra or {})}
                (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))  # last: its presence marks completion
            except (OSError, RuntimeError) as e:  # disk full, quota, permissions; torch wraps some as RuntimeError
                shutil.rmtree(tmp, ignore_errors=True)  # no half-written folder left behind
                kept = self.latest()
                cause = os.strerror(e.errno) if isinstance(e, OSError) and e.errno else str(e).splitlines()[0] if str(e) else type(e).__name__
                if "enospc" in str(e).lower() or "no space" in str(e).lower() or getattr(e, "errno", None) == errno.ENOSPC:
                    cause = "no space left on the device"
                raise CheckpointError(
                    f"{final}: could not write checkpoint of step {step} ({cause}); the partial folder was removed"
                    + (f" and {kept} is kept (--resume continues from it)" if kept else "")
                ) from None
            shutil.rmtree(final, ignore_errors=True)  # a re-save of a step after a resume
            tmp.rename(final)
            write_text_atomic(self.root / LATEST, final.name)
            for old in checkpoint_dirs(self.output_dir)[self.keep_last:]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def latest(self) -> Path | None:
        """The folder ``latest`` names, if it exists."""
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        try:
            name = pointer.read_bytes().decode("ascii").strip()
        except (OSError, UnicodeDecodeError):
            name = ""
        if not _NAME.match(name):  # only a sibling step_* folder, never a path elsewhere
            self.accelerator.print(f"WARNING: {pointer} does not name a checkpoint folder; looking for the newest one")
            return None
        path = self.root / name
        return path if path.is_dir() else None

    def candidates(self) -> list[Path]:
        """Checkpoint folders to try, best first: the one ``latest`` names, then the others, newest first."""
        first = self.latest()
        rest = [p for p in checkpoint_dirs(self.output_dir) if p != first]
        return ([first] if first else []) + rest

    def resume(self) -> tuple[int, dict[str, Any]]:
        """Load the newest intact checkpoint into the model, optimizer, scheduler (and GradScaler).

        Returns (step to continue from, the trainer state with the stage's own entries). Damaged checkpoints
        are reported by path and skipped; if checkpoints exist but none is intact, CheckpointError: a run is
        never silently restarted at step 0 over its own checkpoints.
        """
        candidates = self.candidates()
        if not candidates:
            return 0, {}
        problems = []
        for path in candidates:
            try:
                state, weights, optimizer_state = read_checkpoint(path)
            except CheckpointError as e:
                problems.append(str(e))
                self.accelerator.print(f"WARNING: skipping damaged checkpoint {path}: {e}")
                continue
            self._apply(path, state, weights, optimizer_state)
            note = f" (newer damaged checkpoint(s) skipped: {len(problems)})" if problems else ""
            self.accelerator.print(f"resumed from {path} at step {state['step']}{note}")
            return int(state["step"]), state
        raise CheckpointError(
            f"--resume: no intact checkpoint in {self.root}; refusing to restart at step 0 over it "
            "(pass --overwrite to start again):\n  " + "\n  ".join(problems)
        )

    def _apply(self, path: Path, state: dict, weights: dict, optimizer_state: dict) -> None:
        model = self.accelerator.unwrap_model(self.model)
        try:
            model.load_state_dict(weights, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{path / MODEL_FILE} does not fit this run's model (another --model/--size?): {e}") from None
        try:
            self.optimizer.load_state_dict(optimizer_state)
            self.scheduler.load_state_dict(state["scheduler"])
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: optimizer / scheduler state does not fit this run: {e}") from None
        if self.accelerator.scaler is not None and state.get("scaler"):
            self.accelerator.scaler.load_state_dict(state["scaler"])
