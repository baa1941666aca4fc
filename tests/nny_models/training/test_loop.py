"""The shared step skeleton: schedule shape, frozen-encoder steps, gradient clipping, the logged loss,
autocast, and a resume that ends bit-equal to an uninterrupted run."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from nny_models.training import (
    CheckpointManager,
    DivergedError,
    MetricsLog,
    adamw,
    batches_from,
    make_accelerator,
    read_metrics,
    train_loop,
    warmup_cosine,
)


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


def test_zero_lr_steps_finds_groups_by_name():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a], "name": "decoder"}, {"params": [b], "name": "encoder"}], lr=1.0)
    sched = warmup_cosine(opt, 0, 10, zero_lr_steps={"encoder": 2})
    seen = []
    for _ in range(4):
        seen.append({g["name"]: g["lr"] for g in opt.param_groups})
        opt.step()
        sched.step()
    assert [s["encoder"] for s in seen[:2]] == [0.0, 0.0] and seen[2]["encoder"] > 0  # position 1, found by name
    assert all(s["decoder"] > 0 for s in seen)
    with pytest.raises(ValueError, match="backbone"):
        warmup_cosine(opt, 0, 10, zero_lr_steps={"backbone": 2})


def _loader(n: int = 10) -> DataLoader:
    data = TensorDataset(torch.arange(4.0 * n).view(n, 4) / (4 * n), torch.arange(float(n)).view(n, 1))
    return DataLoader(data, batch_size=2, shuffle=False)


def _mse(model):
    def loss_fn(batch, step, micro):
        x, y = batch
        return torch.nn.functional.mse_loss(model(x), y)

    return loss_fn


def _run(tmp_path, steps, *, model=None, opt=None, sched=None, grad_clip=1.0, grad_accum=1, stop_after=None,
         resume=False, loss_fn=None, mixed_precision="no", checkpoint_every=3):
    acc = make_accelerator(tmp_path, log_with=None, seed=0, grad_accum=grad_accum, mixed_precision=mixed_precision)
    torch.manual_seed(0)
    model = model or torch.nn.Linear(4, 1)
    opt = opt or adamw(model.parameters(), lr=0.1)  # the stages' optimizer: a fused one must resume exactly
    sched = sched or warmup_cosine(opt, 2, steps)
    model, opt, loader = acc.prepare(model, opt, _loader())
    ckpt = CheckpointManager(acc, tmp_path, model, opt, sched, keep_last=2)
    start, _ = ckpt.resume() if resume else (0, {})
    metrics = MetricsLog(acc, tmp_path / "metrics.jsonl", resume_step=start)
    seen = []

    def record(batch, step, micro):
        seen.append(float(batch[1][0, 0]))
        return (loss_fn or _mse(model))(batch, step, micro)

    def after(done):
        if done % checkpoint_every == 0:
            ckpt.save(done)

    train_loop(acc, model, opt, sched, batches_from(loader, start, acc), loss_fn=record, start_step=start,
               max_steps=stop_after or steps, grad_clip=grad_clip, seed=0, metrics=metrics, samples_per_step=2,
               after_step=after)  # fmt: skip
    return acc.unwrap_model(model), seen, ckpt


def test_resume_matches_uninterrupted_run(tmp_path):
    full, seen_full, _ = _run(tmp_path / "a", steps=13)
    # a crash after step 7: the last checkpoint is at 6, so step 7 is lost and redone after resume
    _, seen_first, ckpt = _run(tmp_path / "b", steps=13, stop_after=7)
    assert ckpt.latest().name == "step_0000006"
    resumed, seen_rest, _ = _run(tmp_path / "b", steps=13, resume=True)
    assert seen_first[:6] + seen_rest == seen_full  # same data order across epochs
    assert torch.equal(resumed.weight, full.weight)
    kept = sorted(p.name for p in (tmp_path / "b" / "checkpoints").glob("step_*"))
    assert kept == ["step_0000009", "step_0000012"]  # keep_last=2 prunes the older ones
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints" / "step_0000012").iterdir()) == [
        "model.safetensors", "optimizer.bin", "trainer_state.json"]  # no RNG or scheduler pickles
    assert [r["step"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl")] == list(range(1, 14))


def test_dropout_draws_survive_a_resume(tmp_path):
    """The global RNG is reseeded from (seed, step, rank) every step: no RNG state needs saving."""
    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Linear(4, 1))

    full, _, _ = _run(tmp_path / "a", steps=8, model=model())
    _run(tmp_path / "b", steps=8, model=model(), stop_after=4)
    torch.manual_seed(123)  # whatever the global RNG holds when the resumed process starts
    resumed, _, _ = _run(tmp_path / "b", steps=8, model=model(), resume=True)
    assert torch.equal(resumed[1].weight, full[1].weight)


def test_grad_clip_zero_means_no_clipping_and_negative_is_refused(tmp_path):
    def step_size(clip):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        before = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        loss = lambda batch, step, micro: (model(batch[0]) * 1000).sum()  # noqa: E731  a huge gradient
        _run(tmp_path / f"c{clip}", 1, model=model, opt=opt, sched=warmup_cosine(opt, 0, 1), grad_clip=clip, loss_fn=loss)
        return (torch.nn.utils.parameters_to_vector(model.parameters()).detach() - before).norm().item()

    unclipped = step_size(0.0)
    assert unclipped > 100  # 0 = the raw gradient: the weights move (clip 0 used to zero every gradient)
    assert step_size(0.5) == pytest.approx(0.5, rel=1e-4)  # a positive value clips to that norm
    with pytest.raises(ValueError, match="grad_clip"):
        step_size(-1.0)


def test_logged_loss_is_the_mean_over_micro_batches(tmp_path):
    model = torch.nn.Linear(4, 1)
    losses = {0: 1.0, 1: 3.0}
    loss = lambda batch, step, micro: model(batch[0]).sum() * 0 + losses[micro] + step  # noqa: E731
    _run(tmp_path, 2, model=model, grad_accum=2, loss_fn=loss)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["loss"] for r in rows] == [2.0, 3.0]  # mean of the two micro-batches, not the last one


def test_forward_runs_under_autocast(tmp_path):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # the state is a process-wide singleton
    model = torch.nn.Linear(4, 1)
    dtypes = []

    def loss(batch, step, micro):
        # (a prepared model's outputs come back in fp32; what matters is that the forward ran under autocast)
        dtypes.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return model(batch[0]).float().square().mean()

    try:
        _run(tmp_path, 1, model=model, loss_fn=loss, mixed_precision="bf16")
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert dtypes == [torch.bfloat16]


def test_frozen_encoder_is_bitwise_unchanged_for_exactly_n_steps(tmp_path, one_thread):
    """finetune's own param groups and schedule: N frozen steps, the encoder moves at step N + 1."""
    from finetune.run import FinetuneConfig, param_groups
    from nny_models.config import NnyNetConfig
    from nny_models.hub import NnyNet
    from nny_models.zoo import resolve_model_kwargs

    n = 2
    torch.manual_seed(0)
    model = NnyNet(NnyNetConfig(model="unet", model_kwargs=resolve_model_kwargs("unet", "tiny", out_channels=2),
                                patch_size=(32, 32, 32), label_names=["background", "x"]))
    cfg = FinetuneConfig(lr=1e-2, weight_decay=0.1, warmup_steps=0, freeze_encoder_steps=n, max_steps=n + 2)
    opt = torch.optim.AdamW(param_groups(model, cfg), weight_decay=cfg.weight_decay)
    sched = warmup_cosine(opt, cfg.warmup_steps, cfg.max_steps, zero_lr_steps={"encoder": n})
    encoder = [p for g in opt.param_groups if g["name"] == "encoder" for p in g["params"]]
    decoder = [p for g in opt.param_groups if g["name"] == "decoder" for p in g["params"]]
    assert encoder and decoder
    snapshots = [[p.detach().clone() for p in encoder + decoder]]
    acc = make_accelerator(tmp_path, log_with=None)
    x = torch.randn(1, 1, 32, 32, 32)
    train_loop(acc, model, opt, sched, iter([x] * 8), loss_fn=lambda b, s, m: model(b).square().mean(), start_step=0,
               max_steps=n + 2, grad_clip=0.0, seed=0, metrics=MetricsLog(acc, tmp_path / "m.jsonl"),
               samples_per_step=2, after_step=lambda done: snapshots.append([p.detach().clone() for p in encoder + decoder]))  # fmt: skip
    k = len(encoder)
    enc_same = [all(torch.equal(a, b) for a, b in zip(snapshots[0][:k], s[:k])) for s in snapshots[1:]]
    dec_same = [all(torch.equal(a, b) for a, b in zip(snapshots[0][k:], s[k:])) for s in snapshots[1:]]
    assert enc_same == [True] * n + [False, False]  # steps 1..N frozen (weight decay too), step N + 1 moves
    assert dec_same == [False] * (n + 2)
    rows = read_metrics(tmp_path / "m.jsonl")
    assert [r["lr_encoder"] for r in rows[:n]] == [0.0] * n and rows[n]["lr_encoder"] > 0


def test_adamw_is_fused_on_this_torch_and_updates_as_the_unfused_one():
    """adamw picks torch's fused kernel where torch has one (>= 2.4 on the CPU, or CUDA) and makes the unfused
    update to rounding."""
    torch.manual_seed(0)
    a = torch.nn.Linear(16, 8)
    b = torch.nn.Linear(16, 8)
    b.load_state_dict(a.state_dict())
    start = [p.detach().clone() for p in a.parameters()]
    fused, plain = adamw(a.parameters(), lr=0.01, weight_decay=0.1), torch.optim.AdamW(b.parameters(), lr=0.01, weight_decay=0.1)
    version = tuple(int(v) for v in torch.__version__.split(".")[:2])
    assert bool(fused.param_groups[0]["fused"]) == (version >= (2, 4) or torch.cuda.is_available())
    assert not plain.param_groups[0]["fused"]
    for _ in range(5):
        x = torch.randn(4, 16)
        for model, opt in ((a, fused), (b, plain)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for p, q, p0 in zip(a.parameters(), b.parameters(), start):
        assert (p - p0).abs().max() > 1e-3  # the parameters moved
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_a_diverged_run_stops_and_keeps_its_last_good_checkpoints(tmp_path):
    """A NaN loss from step 8 on (fp32: no GradScaler to skip it) poisons the weights: the run stops at that
    step with DivergedError, and the good checkpoints (3 and 6) are neither pruned nor joined by a NaN one."""

    def loss_fn(batch, step, micro):
        loss = _mse(model)(batch, step, micro)
        return loss * float("nan") if step >= 7 else loss

    model = torch.nn.Linear(4, 1)
    with pytest.raises(DivergedError, match="step 8: the training loss is nan"):
        _run(tmp_path, steps=13, model=model, loss_fn=loss_fn)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert kept == ["step_0000003", "step_0000006"]
    resumed, _, _ = _run(tmp_path, steps=13, resume=True, stop_after=7)  # the good checkpoint still resumes
    assert torch.isfinite(resumed.weight).all()


def test_checkpoint_and_export_refuse_nan_weights(tmp_path):
    acc = make_accelerator(tmp_path, log_with=None, seed=0)
    model = torch.nn.Linear(4, 1)
    opt = adamw(model.parameters(), lr=0.1)
    ckpt = CheckpointManager(acc, tmp_path, model, opt, warmup_cosine(opt, 0, 10), keep_last=1)
    good = ckpt.save(1)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(DivergedError, match=r"step 2: the model's weights hold NaN / Inf in 1 tensor\(s\), e\.g\. "
                                            r"\['weight'\].*the last good one, .*step_0000001, is kept"):
        ckpt.save(2)
    assert ckpt.latest() == good and sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == [good.name]

    from nny_models.hub import NnyNet
    from nny_models.config import NnyNetConfig

    net = NnyNet(NnyNetConfig(model_kwargs={"feature_size": 12, "window_size": 4}, patch_size=(64, 32, 32)))
    with torch.no_grad():
        next(net.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match="NaN / Inf in 1 weight tensor.*nothing was written"):
        net.save_pretrained(tmp_path / "export")
    assert not (tmp_path / "export").exists()
