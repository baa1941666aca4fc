"""The training engine both stages share (pretrain/run.py and finetune/run.py import it; inference never does).

    config.py       parse_config (dataclass -> flags, --config JSON, presets), tracker_config, check_run_config
    loop.py         make_accelerator, warmup_cosine, batches_from, MetricsLog, train_loop (the one step skeleton)
    checkpoints.py  CheckpointManager: atomic, validated, pickle-free resumable checkpoints
    files.py        lock_output_dir, writing_dir (atomic folder replacement for exports)
    plan.py         run_plan / save_plan: the --plan a run trains with (nny_models.planning)
    errors.py       run_main: a stage script's user errors as one line "PROG: error: ..." and exit code 2

Importing this package imports accelerate; ``import nny_models`` and ``nny_models.predict`` never import it.
"""

from nny_models.training.checkpoints import (
    CheckpointError,
    CheckpointManager,
    DivergedError,
    check_output_dir,
    checkpoint_dirs,
    read_checkpoint,
)
from nny_models.training.config import build_config, check_run_config, field_comments, parse_config, tracker_config
from nny_models.training.plan import run_plan, save_plan
from nny_models.training.files import OutputDirInUse, lock_output_dir, replace_dir, write_text_atomic, writing_dir
from nny_models.training.errors import run_main
from nny_models.training.loop import (
    MetricsLog,
    adamw,
    batches_from,
    learning_rates,
    make_accelerator,
    progress,
    read_metrics,
    step_seed,
    train_loop,
    warmup_cosine,
)

__all__ = [
    "CheckpointError", "CheckpointManager", "DivergedError", "MetricsLog", "OutputDirInUse", "adamw", "batches_from", "build_config", "check_output_dir", "check_run_config",
    "checkpoint_dirs", "field_comments", "learning_rates", "lock_output_dir", "make_accelerator", "parse_config",
    "progress", "read_checkpoint", "read_metrics", "replace_dir", "run_main", "run_plan", "save_plan", "step_seed", "tracker_config", "train_loop",
    "warmup_cosine", "write_text_atomic", "writing_dir",
]  # fmt: skip
