"""The generic training engine, on a toy regression model (fast; the flow recipe has its own tests)."""

import csv
import math
import sys

import pytest
import torch
from torch import nn

from maisi2.checkpoint import load_checkpoint
from maisi2.config import get_config
from maisi2.training import (EMA, LAST, LOG, BatchSource, BatchStream, TrainSettings, lr_at, shuffled_batches,
                             train)

CFG = get_config("tiny")
TRUE_W = torch.tensor([[1.0], [2.0], [-1.0]])


pytestmark = pytest.mark.usefixtures("one_thread")


def _dataset(n=10):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g)
    return [{"x": x[i], "y": x[i] @ TRUE_W} for i in range(n)]


def noisy_mse(model, batch, generator):
    """Regression with a little target noise drawn from the engine's RNG (so resume must restore it)."""
    noise = 0.01 * torch.randn(batch["y"].shape, generator=generator)
    loss = (model(batch["x"]) - batch["y"] - noise).pow(2).mean()
    return loss, {"abs_err": (model(batch["x"]) - batch["y"]).abs().mean().detach()}


def _settings(**kw):
    base = dict(steps=9, lr=0.05, warmup=2, ckpt_every=5, log_every=2, device="cpu", progress=False,
                ema_decay=0.9, tensorboard=False)
    return TrainSettings(**{**base, **kw})


def _run(out, settings=None, loss_fn=noisy_mse, resume=False, on_batch=None, batch_size=3, **kw):
    torch.manual_seed(1)
    model = nn.Linear(3, 1)
    data = _dataset()
    source = BatchSource(data, plan=lambda g: shuffled_batches(len(data), batch_size, g))
    return train(model, loss_fn, source, settings or _settings(), out, kind="unet", config=CFG, resume=resume,
                 on_batch=on_batch, **kw)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# -- schedule and settings -----------------------------------------------------------------

def test_lr_schedule_warmup_then_cosine_or_constant():
    s = TrainSettings(steps=12, lr=1.0, warmup=2, schedule="cosine", min_lr_ratio=0.1)
    lrs = [lr_at(i, s) for i in range(12)]
    assert lrs[:3] == [0.5, 1.0, 1.0]
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))  # decays monotonically
    assert lrs[-1] == pytest.approx(0.1) and lrs[7] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 5 / 9)))
    constant = TrainSettings(steps=12, lr=1.0, warmup=4, schedule="constant")
    assert [lr_at(i, constant) for i in (0, 3, 4, 11)] == [0.25, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("kw, message", [
    ({"steps": 0}, "steps must be at least 1"),
    ({"schedule": "linear"}, "schedule must be one of"),
    ({"amp": "fp8"}, "amp must be one of"),
    ({"ema_decay": 1.0}, "ema_decay must lie in"),
    ({"max_nonfinite": 0}, "max_nonfinite"),
])
def test_bad_settings_are_explained(kw, message):
    with pytest.raises(ValueError, match=message):
        TrainSettings(**kw)


def test_fp16_needs_cuda(tmp_path):
    with pytest.raises(ValueError, match="fp16.*CUDA"):
        _run(tmp_path, _settings(amp="fp16"))


def test_bf16_autocast_runs_on_cpu(tmp_path):
    result = _run(tmp_path, _settings(amp="bf16", steps=2))
    assert result.step == 2 and result.skipped == 0


# -- learning, logs, checkpoints -----------------------------------------------------------

def test_learns_and_writes_log_and_checkpoint(tmp_path):
    result = _run(tmp_path, _settings(steps=60, lr=0.1, warmup=0, schedule="constant", log_every=10, ckpt_every=25))
    rows = _rows(tmp_path / LOG)
    assert list(rows[0]) == ["step", "lr", "loss", "skipped", "seconds", "abs_err"]
    assert [int(r["step"]) for r in rows] == [10, 20, 30, 40, 50, 60]
    assert float(rows[-1]["loss"]) < 0.01 * float(rows[0]["loss"])
    assert result.rows[-1]["step"] == 60 and result.checkpoint == tmp_path / LAST
    # Weights-only loadable, with the trainer state an exact resume needs.
    raw = torch.load(tmp_path / LAST, weights_only=True)
    assert raw["step"] == 60 and raw["kind"] == "unet"
    trainer = raw["extra"]["trainer"]
    assert {"optimizer", "scaler", "ranks", "settings", "skipped", "nonfinite_run", "elapsed"} <= set(trainer)
    assert trainer["ranks"][0]["noise_rng"].dtype == torch.uint8
    assert torch.allclose(result.model.weight.detach().T, TRUE_W, atol=0.05)


def test_grad_clip_bounds_the_gradient_norm(tmp_path):
    norms = []

    def grad_norm(step, batch):  # grads of the previous step are still there at the next batch
        if step:
            norms.append(torch.cat([p.grad.flatten() for p in model_ref[0].parameters()]).norm().item())

    model_ref = []

    def loss_fn(model, batch, g):
        model_ref[:] = [model]
        return 100 * noisy_mse(model, batch, g)[0], {}

    _run(tmp_path, _settings(steps=5, grad_clip=0.5), loss_fn=loss_fn, on_batch=grad_norm)
    assert norms and max(norms) <= 0.5 + 1e-5


def test_ema_is_what_the_checkpoint_serves(tmp_path):
    torch.manual_seed(1)
    start = nn.Linear(3, 1).state_dict()
    result = _run(tmp_path, _settings(steps=1, ema_decay=0.75, warmup=0))
    raw = result.model.state_dict()
    for key in raw:  # one good step: ema = d * w0 + (1 - d) * w1
        assert torch.allclose(result.ema_state_dict[key], 0.75 * start[key] + 0.25 * raw[key])
        assert not torch.equal(result.ema_state_dict[key], raw[key])
    ckpt = load_checkpoint(tmp_path / LAST)
    assert all(torch.equal(ckpt.weights()[k], result.ema_state_dict[k]) for k in raw)
    assert all(torch.equal(ckpt.weights(prefer_ema=False)[k], raw[k]) for k in raw)
    no_ema = _run(tmp_path / "b", _settings(steps=1, ema_decay=0.0))
    assert no_ema.ema_state_dict is None and load_checkpoint(tmp_path / "b" / LAST).ema_state_dict is None


def test_ema_update_rule_and_key_check():
    model = nn.Linear(2, 1)
    ema = EMA(model, decay=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(2.0)
    ema.update(model)
    assert torch.allclose(ema.state["weight"], before["weight"] + 1.0)
    with pytest.raises(ValueError, match="keys"):
        EMA(model, 0.5, state={"weight": model.weight})


class _Crash(Exception):
    pass


def test_resume_is_exact(tmp_path):
    """K steps straight == K/2 steps, a crash, and a resume: bit-identical weights, EMA and optimizer."""
    straight = _run(tmp_path / "a")  # 9 steps, batches of 3 from 10 items: crosses epoch boundaries

    def crash(step, batch):
        if step == 5:  # the checkpoint of step 5 exists, step 6 never finishes
            raise _Crash

    with pytest.raises(_Crash):
        _run(tmp_path / "b", on_batch=crash)
    assert load_checkpoint(tmp_path / "b" / LAST).step == 5
    resumed = _run(tmp_path / "b", resume=True)
    assert resumed.step == 9
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key])
        assert torch.equal(straight.ema_state_dict[key], resumed.ema_state_dict[key])
    opt_a = load_checkpoint(tmp_path / "a" / LAST).extra["trainer"]["optimizer"]["state"]
    opt_b = load_checkpoint(tmp_path / "b" / LAST).extra["trainer"]["optimizer"]["state"]
    assert all(torch.equal(opt_a[i]["exp_avg_sq"], opt_b[i]["exp_avg_sq"]) for i in opt_a)
    # The log keeps the rows up to the checkpoint and continues after it, without duplicates.
    assert [r["step"] for r in _rows(tmp_path / "b" / LOG)] == ["2", "4", "6", "8", "9"]


def test_a_resumed_run_keeps_the_origin_keys_of_its_extra(tmp_path):
    def crash(step, batch):
        if step == 5:
            raise _Crash

    with pytest.raises(_Crash):
        _run(tmp_path, on_batch=crash, extra={"origin": "first", "note": "old"}, keep_on_resume=("origin",))
    _run(tmp_path, resume=True, extra={"origin": "second", "note": "new"}, keep_on_resume=("origin",))
    extra = load_checkpoint(tmp_path / LAST).extra
    assert extra["origin"] == "first" and extra["note"] == "new"


def test_existing_run_needs_resume_and_the_same_config(tmp_path):
    _run(tmp_path, _settings(steps=2))
    with pytest.raises(FileExistsError, match="resume"):
        _run(tmp_path, _settings(steps=2))
    again = _run(tmp_path, _settings(steps=2), resume=True)  # finished: nothing left to do
    assert again.step == 2 and again.rows == []
    model = nn.Linear(3, 1)
    source = BatchSource(_dataset(), plan=lambda g: shuffled_batches(10, 3, g))
    with pytest.raises(ValueError, match="another network config"):
        train(model, noisy_mse, source, _settings(steps=3), tmp_path, kind="unet", config=get_config("small"), resume=True)
    with pytest.raises(ValueError, match="vae"):
        train(model, noisy_mse, source, _settings(steps=3), tmp_path, kind="vae", config=CFG, resume=True)


# -- non-finite guard --------------------------------------------------------------------------

def _nan_at(bad_steps):
    calls = []

    def loss_fn(model, batch, g):
        loss, logs = noisy_mse(model, batch, g)
        step = len(calls)
        calls.append(step)
        return (loss * float("nan") if step in bad_steps else loss), logs

    return loss_fn


def test_nonfinite_loss_skips_the_update(tmp_path):
    snapshots = []  # the weights entering each step
    nan_at_2_and_3 = _nan_at({2, 3})

    def loss_fn(model, batch, g):
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return nan_at_2_and_3(model, batch, g)

    result = _run(tmp_path, _settings(steps=6, log_every=1), loss_fn=loss_fn)
    assert result.skipped == 2
    # Steps 2 and 3 changed nothing: the weights entering steps 2, 3 and 4 are equal.
    for key in snapshots[0]:
        assert torch.equal(snapshots[2][key], snapshots[3][key]) and torch.equal(snapshots[3][key], snapshots[4][key])
        assert not torch.equal(snapshots[1][key], snapshots[2][key])
    rows = _rows(tmp_path / LOG)
    assert [r["skipped"] for r in rows] == ["0", "0", "1", "2", "2", "2"]
    assert rows[2]["loss"] == "nan" and all(math.isfinite(float(r["loss"])) for i, r in enumerate(rows) if i not in (2, 3))


def test_nonfinite_gradient_with_finite_loss_is_skipped(tmp_path):
    def nan_grad(model, batch, g):
        # sqrt at 0: the loss is 0, its gradient 0 * inf = nan.
        return torch.sqrt((model.weight * 0).abs()).sum() + 0 * model.bias.sum(), {}

    torch.manual_seed(1)
    start = nn.Linear(3, 1).state_dict()
    result = _run(tmp_path, _settings(steps=3), loss_fn=nan_grad)
    assert result.skipped == 3
    assert all(torch.equal(result.model.state_dict()[k], start[k]) for k in start)
    assert all(torch.equal(result.ema_state_dict[k], start[k]) for k in start)


def test_too_many_nonfinite_in_a_row_abort_with_advice(tmp_path):
    with pytest.raises(RuntimeError, match="3 training steps in a row.*lower learning rate.*fp32.*NaN/inf"):
        _run(tmp_path, _settings(steps=20, max_nonfinite=3, ckpt_every=0), loss_fn=_nan_at(set(range(100))))
    assert not (tmp_path / LAST).exists()
    # Non-consecutive failures never add up to an abort.
    ok = _run(tmp_path / "b", _settings(steps=8, max_nonfinite=2), loss_fn=_nan_at({1, 3, 5}))
    assert ok.skipped == 3 and ok.step == 8


# -- data stream -----------------------------------------------------------------------------

@pytest.mark.parametrize("workers", [0, 1])
def test_batch_stream_restores_its_position(workers):
    data = list(range(7))
    source = BatchSource(data, plan=lambda g: shuffled_batches(len(data), 3, g), collate=list, num_workers=workers)
    stream = BatchStream(source, torch.Generator().manual_seed(5))
    first = [next(stream) for _ in range(4)]  # 3 batches per epoch: into the second epoch
    state = stream.state_dict()
    rest = [next(stream) for _ in range(5)]
    assert sorted(sum(first[:3], [])) == data and first[3] != first[0]
    again = BatchStream(source, torch.Generator().manual_seed(999))
    again.load_state_dict(state)
    assert [next(again) for _ in range(5)] == rest


def test_shuffled_batches_shard_by_rank():
    g0, g1 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    rank0 = shuffled_batches(9, 2, g0, rank=0, world_size=2)
    rank1 = shuffled_batches(9, 2, g1, rank=1, world_size=2)
    assert sorted(sum(rank0 + rank1, [])) == list(range(9))
    assert shuffled_batches(1, 2, torch.Generator(), rank=1, world_size=2) == [[0]]


# -- tensorboard -------------------------------------------------------------------------------

def test_tensorboard_events_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    _run(tmp_path, _settings(steps=2, tensorboard=True))
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_missing_tensorboard_is_one_notice(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    _run(tmp_path, _settings(steps=2, tensorboard=True))
    err = capsys.readouterr().err
    assert err.count("tensorboard is not installed") == 1
    assert (tmp_path / LOG).is_file() and not (tmp_path / "tensorboard").exists()
