"""The whole nnynet job on the embedded phantom data, end to end, on one machine.

    python -m finetune.pipeline [--output_dir runs/pipeline] [--quick]

1. generate phantoms: unlabeled CT for pretraining, labeled CT + clinical.csv for fine-tuning, held-out test cases;
2. pretrain Swin-NeXt with Volume Fusion (pretrain/run.py);
3. fine-tune it with the clinical cross-attention bottleneck and Dice + Focal + CE (finetune/run.py);
4. reload the export with NnyNet.from_pretrained, predict the held-out cases, evaluate (Dice, IoU, HD95,
   accuracy, precision, recall), write JSON/CSV/Markdown reports and overlay PNGs;
5. save_pretrained the final model with the held-out metrics in its model card, reload it, and run
   nnynet-predict on one held-out CT.

Each stage runs as its own process, exactly as a user would launch it (``accelerate launch`` works too), from
a run-config JSON (OUT/configs/{pretrain,finetune}.json) that holds only the pipeline's own choices below; every
other value is the stage's dataclass default, and each stage saves its complete config as run_config.json.
A re-run retrains both stages (their earlier checkpoints are deleted: --overwrite); --resume continues them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nny_models.training import parse_config, run_main

REPO = Path(__file__).resolve().parents[1]


@dataclass
class PipelineConfig:
    output_dir: str = "runs/pipeline"  # everything goes under here: data/, pretrain/, finetune/, eval/, model/
    pretrain_cases: int = 24  # unlabeled phantoms for Volume Fusion pretraining
    finetune_cases: int = 96  # labeled phantoms (with clinical.csv) for fine-tuning: with 24 the model fit its
    # training lesions (tumor Dice 0.47 there) and missed held-out ones (0.13); 96 take about 20 s to generate
    test_cases: int = 6  # held-out labeled phantoms for the final evaluation (and as many shifted ones)
    pretrain_steps: int = 80  # Volume Fusion optimizer steps
    finetune_steps: int = 1800  # fine-tuning optimizer steps (about 0.23 s each on 2 idle cores at the 64 x 64 x 32
    # patch: the randomized phantom world needs this many before tumors appear; 1000 steps of 96 x 96 x 32 found none)
    val_every: int = 600  # fine-tuning validates (and may export a new best model) every N steps: each pass over
    # the 5 validation cases costs several seconds here (about 7 s: the stage's time less its steps, an estimate),
    # and under the cosine schedule the best model was the last one in every default run so far (validating every
    # 300 steps, 2026-12-02: mean Dice 0.39 0.53 0.63 0.64 0.65 0.66)
    spacing: tuple[float, float, float] = (3.0, 3.0, 4.0)  # pretraining spacing (mm); fine-tuning plans its own
    hu_window: tuple[float, float] = (-200.0, 300.0)  # pretraining's soft-tissue HU window; fine-tuning plans a
    # foreground z-score normalization (nny_models.planning)
    patch_size: tuple[int, int, int] = (96, 96, 32)  # pretraining patch (288 x 288 mm in-plane: wide context)
    finetune_patch_size: tuple[int, int, int] = (64, 64, 32)  # fine-tuning patch / sliding-window ROI: half the cost
    # of 96 x 96 x 32 per step, so twice the steps in the same time (validation tumor Dice 0.18 after 2000 steps at
    # 64 x 64 x 32 with the weights below; 0.00 after 1000 at 96 x 96 x 32 without them, and after 600 with them)
    batch_size: int = 1  # pretraining patches per step
    finetune_batch: int = 1  # fine-tuning patches per optimizer step, all processes together (the recipe: the same
    # on every machine; finetune_processes only splits it). 2, over two single-thread DDP processes, trains 1.2x
    # (bf16) to 1.4x (fp32) the samples per second of one two-thread process here (bench/cpu_processes.py), but each
    # step is 1.3x slower: at equal wall time (1500 steps of 2 vs 1800 of 1) held-out Dice was level (liver / tumor /
    # portal vein / aorta 0.914 / 0.087 / 0.573 / 0.897 vs 0.908 / 0.098 / 0.565 / 0.897; shifted 0.768 / 0.047 /
    # 0.399 / 0.885 vs 0.741 / 0.065 / 0.432 / 0.860) and the pipeline took 13.4 min instead of 12.3
    finetune_processes: int | None = None  # fine-tuning DDP processes (accelerate launch; gloo on a CPU), each with
    # finetune_batch / N patches; None = 2 on a CPU-only machine with >= 2 cores when the batch splits evenly, else 1
    finetune_lr: float = 4e-3  # fine-tuning peak AdamW LR, encoder included (encoder_lr_scale 1): after 1800 steps
    # validation Dice liver / tumor / portal vein / aorta 0.899 / 0.202 / 0.552 / 0.920, against 0.887 / 0.152 /
    # 0.439 / 0.897 at run.py's defaults (2e-3, encoder at half); 80 Volume Fusion steps teach the encoder little
    # that a slower encoder LR should protect (from scratch at the defaults: 0.895 / 0.171 / 0.535 / 0.914)
    fg_class_weights: tuple[float, ...] = (1.0, 4.0, 1.5, 1.0)  # fine-tuning: foreground patches centre on liver,
    # tumor, portal vein, aorta with these relative chances (the tumor is the rare class)
    class_weights: tuple[float, ...] = (1.0, 1.0, 5.0, 2.0, 1.0)  # fine-tuning focal + CE weights per label
    # (background first): they and the tumor-centred patches raise the rare tumor's share of the gradient
    finetune_precision: str = "auto"  # fine-tuning autocast: "auto" = bf16 where the hardware runs it fast (CUDA, CPUs
    # with AMX / AVX512-BF16: nny_models.inference.bf16_is_fast), else fp32; "bf16" or "no" to choose. On this 2-core
    # AMX CPU a bf16 fine-tuning ran 1.17x faster (3.59 vs 3.07 samples/s; 1.05x inside the pipeline run) to
    # validation Dice 0.911 / 0.214 / 0.608 / 0.936 against fp32's 0.904 / 0.196 / 0.599 / 0.928 (liver / tumor /
    # portal vein / aorta, same run otherwise)
    pretrain_precision: str = "auto"  # pretraining autocast, chosen like finetune_precision: on a 2-core AMX Xeon
    # (2026-12-02) 80 Volume Fusion steps ran 1.13x the samples per second in bf16 (0.751 vs 0.664) to the same
    # losses (mean of the first / last 20 steps 1.225 / 1.056 in both); the one full pipeline run after the change
    # pretrained in 120 s against an earlier fp32 run's 121 s, on a host whose speed fell ~1.6x between the two
    model: str = "nnynet"  # zoo name
    size: str = "tiny"  # zoo size preset (tiny: CPU-sized, 4^3 attention windows)
    feature_size: int | None = 24  # the network's first-stage channels, instead of the tiny preset's 12: with
    # finetune_cases 96 the tiny model no longer memorised its training lesions but underfit them (tumor Dice 0.28
    # on training cases, 0.18 held-out); at 24, over 2 seeds on 20 held-out cases, tumor Dice 0.161 against the
    # 24-case recipe's 0.120, liver, portal vein and aorta level or better (README); 1.4x the fine-tuning time
    fusion: str = "cross_attention_film"  # clinical fusion used for fine-tuning: the paper's cross-attention with a FiLM
    # read-out (per-channel scale and shift); the plain paper mode is inert by construction (nny_models/fusion.py)
    seed: int = 0  # seeds data generation (test cases use seed + 1000) and both trainings
    quick: bool = False  # a smoke run of a few minutes (tiny step counts); metrics are then meaningless
    resume: bool = False  # continue interrupted trainings from their checkpoints instead of starting them again


def run(cmd: list[str]) -> None:
    print("\n$ " + " ".join(cmd), flush=True)
    code = subprocess.run(cmd, cwd=REPO).returncode
    if code:  # the stage printed its own error; no pipeline traceback under it
        print(f"finetune.pipeline: error: this stage exited with code {code} (its error is above): {' '.join(cmd)}",
              file=sys.stderr, flush=True)
        sys.exit(code)


def finetune_precision(choice: str, flag: str = "--finetune_precision") -> str:
    """A stage's --mixed_precision for the pipeline's finetune_precision or pretrain_precision ("auto", "bf16" or
    "no"); ``flag`` names the option in the error."""
    if choice not in ("auto", "bf16", "no"):
        raise ValueError(f"{flag}: expected 'auto', 'bf16' or 'no', got {choice!r}")
    if choice != "auto":
        return choice
    import torch

    from nny_models.inference import bf16_is_fast

    return "bf16" if bf16_is_fast("cuda" if torch.cuda.is_available() else "cpu") else "no"


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def finetune_processes(choice: int | None, batch: int) -> int:
    """How many DDP processes fine-tune (see PipelineConfig.finetune_processes); each must get whole patches."""
    if choice is None:
        import torch

        choice = 2 if not torch.cuda.is_available() and _cores() >= 2 and batch % 2 == 0 else 1
    if choice < 1 or batch % choice:
        raise ValueError(f"--finetune_processes {choice}: expected a divisor of --finetune_batch {batch}")
    return choice


def finetune_workers(processes: int) -> int:
    """DataLoader workers of each fine-tuning process: 2 beside one process, 1 beside each of several."""
    return 2 if processes == 1 else 1


def prepare_phantoms(folder: Path, cases: int, seed: int, unlabeled: bool, world: str) -> bool:
    """Generate the phantoms of one data set into ``folder`` unless the ones there are the same (world, generator
    version, seed and count); returns whether it generated them. Phantoms of another world, an older generator
    (e.g. v2's mirror image), seed or count are replaced: --finetune_cases 96 must not train on the 24 cases an
    earlier run left there, nor 24 on an earlier 96. A folder that is not a pipeline phantom set is refused."""
    from nny_models.phantoms import write_dataset
    from nny_models.phantoms.dataset import GENERATOR_VERSION

    meta = folder / "dataset.json"
    found = json.loads(meta.read_text()) if meta.is_file() else {}
    wanted = {"generator_version": GENERATOR_VERSION, "numTraining": cases, "seed": seed}
    if found.get("randomization", {}).get("name") == world and all(found.get(k) == v for k, v in wanted.items()):
        return False
    if folder.exists() and any(folder.iterdir()):
        if not _holds_only_phantoms(folder, found):
            raise ValueError(f"{folder}: expected the pipeline's phantoms (a dataset.json named 'nnynet-phantoms', "
                             "or the phantom files of an interrupted generation) or an empty folder; refusing to "
                             "replace it. Choose another --output_dir")
        shutil.rmtree(folder)
    write_dataset(folder, cases=cases, seed=seed, unlabeled=unlabeled, workers=2, randomization=world)
    return True


_PHANTOM_ENTRIES = {"imagesTr", "labelsTr", "dataset.json", "clinical.csv", "clinical.types.json", "appearance.csv"}


def _holds_only_phantoms(folder: Path, meta: dict) -> bool:
    """Whether ``folder`` is write_dataset's output: a complete set (its dataset.json) or one whose generation was
    interrupted (dataset.json is written last), holding nothing but phantom files."""
    if meta:
        return meta.get("name") == "nnynet-phantoms"
    if not {p.name for p in folder.iterdir()} <= _PHANTOM_ENTRIES:
        return False
    cases = [p for sub in ("imagesTr", "labelsTr") if (folder / sub).is_dir() for p in (folder / sub).iterdir()]
    return all(p.is_file() and p.name.startswith("phantom_") and p.name.endswith(".nii.gz") for p in cases)


def validation_folds(cases: int, val_cases: int = 5) -> int:
    """The k of fine-tuning's k-fold split that validates on about ``val_cases`` cases (never fewer than 5 folds):
    a pass over the validation fold costs seconds per case, and 20 % of 96 cases would be 19 of them."""
    return max(5, round(cases / val_cases))


def stage_configs(cfg: PipelineConfig, out: Path) -> dict[str, dict[str, Any]]:
    """The pipeline's choices for each stage's run config (FinetuneConfig / PretrainConfig fields).

    Fine-tuning takes the architecture from the pretrained export and plans its spacing and CT normalization
    from the labeled data (--plan auto); its patch is narrower than pretraining's, to afford more steps."""
    data = out / "data"
    restart = {"resume": True} if cfg.resume else {"overwrite": True}
    shared = {"seed": cfg.seed, **restart}
    processes = finetune_processes(cfg.finetune_processes, cfg.finetune_batch)
    return {
        "pretrain": {**shared, "data_dir": str(data / "unlabeled"), "output_dir": str(out / "pretrain"),
                     "model": cfg.model, "size": cfg.size, "feature_size": cfg.feature_size,
                     "max_steps": cfg.pretrain_steps, "batch_size": cfg.batch_size,
                     "patch_size": list(cfg.patch_size),
                     "spacing": list(cfg.spacing), "hu_window": list(cfg.hu_window),
                     "mixed_precision": finetune_precision(cfg.pretrain_precision, "--pretrain_precision")},
        "finetune": {**shared, "data_dir": str(data / "train"), "output_dir": str(out / "finetune"),
                     "pretrained": str(out / "pretrain" / "model"), "fusion": cfg.fusion,
                     "max_steps": cfg.finetune_steps, "val_every": cfg.val_every,
                     "folds": validation_folds(cfg.finetune_cases),
                     "batch_size": cfg.finetune_batch // processes,
                     "num_workers": finetune_workers(processes),
                     "lr": cfg.finetune_lr, "encoder_lr_scale": 1.0,
                     "mixed_precision": finetune_precision(cfg.finetune_precision),
                     "patch_size": list(cfg.finetune_patch_size), "fg_prob": 0.8,
                     "fg_class_weights": list(cfg.fg_class_weights), "class_weights": list(cfg.class_weights)},
    }  # fmt: skip


def stage_command(script: list[str], processes: int = 1, mixed_precision: str = "no") -> list[str]:
    """The command that runs a stage script (``[path, args...]``): plain Python for one process, else ``accelerate
    launch`` (DDP; on a CPU-only machine over gloo, with the cores shared out between the processes)."""
    if processes == 1:
        return [sys.executable, *script]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", mixed_precision, "--dynamo_backend", "no",
            "--num_cpu_threads_per_process", str(max(1, _cores() // processes)), *script]  # fmt: skip


def run_stage(name: str, values: dict[str, Any], out: Path, processes: int = 1) -> None:
    """Write the stage's run config and launch ``<name>/run.py --config FILE`` (the stage validates it)."""
    path = out / "configs" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(values, indent=2))
    run(stage_command([f"{name}/run.py", "--config", str(path)], processes, values.get("mixed_precision", "no")))


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(PipelineConfig, argv, description=__doc__.splitlines()[0])
    finetune_precision(cfg.finetune_precision)  # wrong values fail now, not after the phantoms are written
    finetune_precision(cfg.pretrain_precision, "--pretrain_precision")
    finetune_processes(cfg.finetune_processes, cfg.finetune_batch)
    if cfg.quick:
        cfg.pretrain_cases, cfg.finetune_cases, cfg.test_cases = 4, 6, 2
        cfg.pretrain_steps, cfg.finetune_steps = 4, 6
    out = Path(cfg.output_dir).resolve()
    started = time.perf_counter()
    py = sys.executable

    # 1. data
    data = out / "data"
    t0 = time.perf_counter()
    for name, cases, seed, unlabeled, world in (
        ("unlabeled", cfg.pretrain_cases, cfg.seed + 2000, True, "train"),
        ("train", cfg.finetune_cases, cfg.seed, False, "train"),
        ("test", cfg.test_cases, cfg.seed + 1000, False, "train"),
        # the shifted held-out set: appearance at or beyond the edges of the training ranges (thick slices,
        # arterial/delayed phases, mostly hyperdense lesions, more noise; nny_models/phantoms/randomization.py)
        ("test_ood", cfg.test_cases, cfg.seed + 3000, False, "ood"),
    ):
        prepare_phantoms(data / name, cases, seed, unlabeled, world)
    seconds = {"data": time.perf_counter() - t0}  # wall time per stage, printed at the end
    print(f"phantoms ready in {seconds['data']:.0f}s under {data}", flush=True)

    # 2. pretraining (Volume Fusion), 3. fine-tuning (clinical cross-attention, Dice + Focal + CE)
    configs = stage_configs(cfg, out)
    from finetune.run import FinetuneConfig
    from nny_models.training import build_config

    build_config(FinetuneConfig, configs["finetune"], "pipeline: finetune config")  # fail before pretraining
    t0 = time.perf_counter()
    run_stage("pretrain", configs["pretrain"], out)
    seconds["pretrain"], t0 = time.perf_counter() - t0, time.perf_counter()
    run_stage("finetune", configs["finetune"], out, finetune_processes(cfg.finetune_processes, cfg.finetune_batch))
    seconds["finetune"], t0 = time.perf_counter() - t0, time.perf_counter()

    # 4. + 5. held-out evaluation, publishing, reload, CLI prediction
    from finetune.publish import evaluate_and_publish

    result = evaluate_and_publish(out / "finetune" / "model", data / "test", out)
    from finetune.publish import evaluate_dataset
    from nny_models.hub import NnyNet

    seconds["evaluate + publish"], t0 = time.perf_counter() - t0, time.perf_counter()
    _, shifted = evaluate_dataset(NnyNet.from_pretrained(out / "model"), data / "test_ood", out / "eval_ood")
    seconds["shifted evaluation"], t0 = time.perf_counter() - t0, time.perf_counter()
    case = result["example_input"]
    run([py, "-m", "nny_models.cli", "--model", str(out / "model"), "--input", str(case),
         "--clinical", str(result["example_clinical"]), "--output", str(out / "prediction" / "mask.nii.gz")])  # fmt: skip
    seconds["nnynet-predict"] = time.perf_counter() - t0

    minutes = (time.perf_counter() - started) / 60
    print(
        f"\nnnynet pipeline finished in {minutes:.1f} min ("
        + ", ".join(f"{name} {s:.0f} s" for name, s in seconds.items()) + ")\n"
        f"  held-out metrics : {result['report_md']}\n"
        f"  figures          : {result['figures_dir']}\n"
        f"  model            : {out / 'model'} (save_pretrained layout; NnyNet.from_pretrained reloads it)\n"
        f"  predicted mask   : {out / 'prediction' / 'mask.nii.gz'} (for {case.name})\n"
        f"  mean Dice        : "
        + ", ".join(f"{k} {v:.3f}" for k, v in result["dice"].items())
        + f"\n  shifted held-out : {out / 'eval_ood' / 'metrics.md'}\n  shifted Dice     : "
        + ", ".join(f"{k} {v['dice_mean']:.3f}" for k, v in shifted["per_class"].items())
        + "".join(f"\n  tumor lesions {k}: {v['detected']}/{v['n_lesions']} detected, lesion Dice "
                  f"{v['dice_mean']:.3f} (held-out)" for k, v in result["summary"].get("lesions", {}).items())
    )
    fp = result["summary"].get("false_positives")
    if fp:
        print(f"  tumor false alarms: {fp['n_false_positive']} of {fp['n_predicted']} predicted lesions touch no real one "
              f"({fp['false_positive_ml_per_case']:.1f} mL per case); tumor-free cases called tumor-free: "
              f"{fp['tumor_free_cases_clean']}/{fp['tumor_free_cases']} (held-out)")


if __name__ == "__main__":
    run_main(main, "finetune.pipeline")  # bad input: one line "finetune.pipeline: error: ...", exit code 2
