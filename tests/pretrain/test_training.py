"""The shared Accelerate helpers: schedule shape, atomic checkpoints, exact resume of the data order."""

import torch
from torch.utils.data import DataLoader, TensorDataset

from pretrain.training import CheckpointManager, MetricsLog, batches_from, make_accelerator, read_metrics, warmup_cosine


def test_warmup_cosine_shape():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, warmup_steps=4, max_steps=20, min_lr_ratio=0.1)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.25 and lrs[3] == 1.0  # linear warmup reaches the base LR
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))  # then decays monotonically
    assert abs(lrs[-1] - 0.1) < 0.02  # towards min_lr_ratio


def _train(tmp_path, steps, stop_after=None, resume=False):
    acc = make_accelerator(tmp_path, log_with=None, seed=0)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = warmup_cosine(opt, 2, steps)
    data = TensorDataset(torch.arange(40, dtype=torch.float32).view(10, 4) / 40, torch.arange(10.0).view(10, 1))
    loader = DataLoader(data, batch_size=2, shuffle=False)
    model, opt, loader = acc.prepare(model, opt, loader)
    acc.register_for_checkpointing(sched)
    ckpt = CheckpointManager(acc, tmp_path, keep_last=2)
    start = ckpt.resume() if resume else 0
    seen = []
    batches = batches_from(loader, start, acc)
    for step in range(start, steps):
        x, y = next(batches)
        seen.append(float(y[0, 0]))
        loss = torch.nn.functional.mse_loss(model(x), y)
        acc.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad()
        if (step + 1) % 3 == 0:
            ckpt.save(step + 1)
        if stop_after is not None and step + 1 == stop_after:
            break
    return acc.unwrap_model(model).weight.detach().clone(), seen, ckpt


def test_resume_matches_uninterrupted_run(tmp_path):
    full, seen_full, _ = _train(tmp_path / "a", steps=13)
    # stop after step 7: the last checkpoint is at 6, so step 7 is lost and redone after resume
    _, seen_first, ckpt = _train(tmp_path / "b", steps=13, stop_after=7)
    assert ckpt.latest().name == "step_0000006"
    resumed, seen_rest, _ = _train(tmp_path / "b", steps=13, resume=True)
    assert seen_first[:6] + seen_rest == seen_full  # same data order across epochs
    assert torch.equal(resumed, full)
    kept = sorted(p.name for p in (tmp_path / "b" / "checkpoints").glob("step_*"))
    assert kept == ["step_0000009", "step_0000012"]  # keep_last=2 prunes the older ones


def test_metrics_log_drops_rows_after_resume_step(tmp_path):
    acc = make_accelerator(tmp_path, log_with=None)
    log = MetricsLog(acc, tmp_path / "metrics.jsonl")
    for step in range(1, 6):
        log.log({"step": step, "loss": 1.0 / step})
    MetricsLog(acc, tmp_path / "metrics.jsonl", resume_step=3)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_parse_config_precedence_and_types(tmp_path):
    import dataclasses
    import json

    import pytest

    from pretrain.training import parse_config

    @dataclasses.dataclass
    class Cfg:
        data_dir: str | None = None  # where the data lives
        max_steps: int = 10  # optimizer steps
        patch_size: tuple[int, int, int] = (32, 32, 32)  # patch
        amp: bool = False  # mixed precision
        lr: float = 1e-3  # learning rate
        names: tuple[str, ...] = ("a", "b")  # any number of names

    cfg = parse_config(Cfg, ["--max_steps", "5", "--patch_size", "16", "16", "16", "--amp"])
    assert cfg == Cfg(max_steps=5, patch_size=(16, 16, 16), amp=True)
    assert parse_config(Cfg, ["--names"]).names == ()  # a bare flag empties a variable-length tuple
    assert parse_config(Cfg, ["--names", "c"]).names == ("c",)
    with pytest.raises(SystemExit):  # a fixed-length tuple still needs values
        parse_config(Cfg, ["--patch_size"])
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"lr": 0.5, "max_steps": 7, "data_dir": "x"}))
    assert parse_config(Cfg, ["--config", str(path), "--max_steps", "3"]) == Cfg(data_dir="x", max_steps=3, lr=0.5)
    path.write_text(json.dumps({"learning_rate": 0.5}))
    with pytest.raises(ValueError, match="learning_rate"):
        parse_config(Cfg, ["--config", str(path)])
