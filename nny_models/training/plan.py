"""--plan for both stages: the plan a run trains with, made once and reused on resume."""

from __future__ import annotations

from pathlib import Path

import torch

from nny_models.planning import Plan, resolve_plan

PLAN_FILE = "plan.json"  # saved in OUTPUT_DIR beside run_config.json


def run_plan(option: str | None, data_dir: Path, output_dir: str | Path, *, task: str, resume: bool,
             accelerator) -> Plan | None:
    """The run's plan: on --resume the saved OUTPUT_DIR/plan.json (a continued run keeps exactly its grid), else
    ``resolve_plan(option, ...)`` ("auto" = planned from ``data_dir`` for this device, a path, or "none")."""
    saved = Path(output_dir) / PLAN_FILE
    with accelerator.main_process_first():
        if resume and saved.is_file():
            plan = Plan.load(saved)
            if plan.task != task:  # another stage's run folder: its grid and statistics are not this stage's
                raise ValueError(f"--resume: {saved} is a {plan.task!r} plan; this stage trains with a {task!r} "
                                 "plan (is --output_dir another stage's run?)")
            return plan
        return resolve_plan(option, data_dir, task=task, cuda=torch.cuda.is_available())


def save_plan(plan: Plan | None, output_dir: str | Path, accelerator) -> None:
    if plan is not None and accelerator.is_main_process:
        plan.save(Path(output_dir) / PLAN_FILE)
