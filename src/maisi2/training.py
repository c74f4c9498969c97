"""The training engine shared by every maisi2 trainer (flow UNet, VAE, ControlNet).

A trainer supplies three things and the engine does the rest:

* a model (an `nn.Module`, already initialised),
* ``loss_fn(model, batch, generator) -> (loss, logs)``: a scalar loss tensor and a dict of floats
  (or 0-d tensors) to log; all its randomness must come from ``generator`` (noise, timesteps,
  crops), the engine's per-rank noise RNG;
* a `BatchSource`: a dataset plus a planner that lays out one epoch of batches from the engine's
  data RNG.

The engine adds: AdamW with a warmup + cosine/constant learning-rate schedule (`lr_at`), mixed
precision (bf16 autocast; fp16 with a GradScaler on CUDA only), gradient clipping, a guard that
skips steps with a non-finite loss or gradient (and stops after ``max_nonfinite`` in a row), an
EMA of the weights, atomic checkpoints (``out_dir/last.pt``, every ``ckpt_every`` steps and at the
end) that hold everything needed to resume *exactly* (optimizer, scaler, EMA, RNG states, data
position), a CSV log (``out_dir/log.csv``), TensorBoard when installed, a tqdm progress bar, and
data parallelism under ``torchrun`` (gloo on CPU, NCCL on CUDA; only rank 0 writes files).

Usage::

    settings = TrainSettings(steps=1000, lr=1e-4, warmup=50)
    source = BatchSource(dataset, plan=lambda g: shuffled_batches(len(dataset), 4, g))
    with distributed():
        result = train(model, loss_fn, source, settings, "runs/x", kind="unet", config=cfg)

Exact resume (checked on CPU by a test): a run stopped at step k and resumed reaches bit-identical
weights to an uninterrupted run, because the data order and the noise both come from generators
owned by the engine whose states are checkpointed, and the learning rate is a pure function of
the step.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from maisi2 import allocator, compute, nets
from maisi2.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from maisi2.config import Config, JsonDataclass, dataclass_from_dict, set_dotted
from maisi2.errors import CannotRun, InvalidInput, OutputExists

__all__ = [
    "TrainSettings",
    "Recipe",
    "say",
    "lr_at",
    "EMA",
    "BatchSource",
    "BatchStream",
    "shuffled_batches",
    "DistInfo",
    "distributed",
    "dist_info",
    "TrainResult",
    "train",
    "LAST",
    "LOG",
]

LAST = "last.pt"  # newest checkpoint of a run; at the end of training, the final one
LOG = "log.csv"
AMP_MODES = ("auto", "fp32", "bf16", "fp16")
SCHEDULES = ("cosine", "constant")

LossFn = Callable[[nn.Module, Any, torch.Generator], "tuple[torch.Tensor, dict]"]


@dataclass(frozen=True)
class TrainSettings:
    """How to optimise; what to optimise and on which data is the trainer's business.

    steps: optimiser iterations (skipped non-finite steps count too).
    warmup: steps of linear warmup from lr/warmup to lr; then `schedule`: "cosine" decays to
      ``min_lr_ratio * lr`` at the last step, "constant" stays at lr.
    grad_clip: maximum global gradient norm (0: no clipping).
    ema_decay: EMA of the weights, ``ema <- decay*ema + (1-decay)*w`` per good step (0: no EMA).
    amp: "fp32", "bf16" (autocast), "fp16" (autocast + GradScaler, CUDA only) or "auto"
      (bf16 on a CUDA device that supports it and on CPUs where `compute.bf16_pays`, else fp32).
    ckpt_every: write out_dir/last.pt every this many steps (0: only at the end).
    log_every: write a log row (means over the window) every this many steps.
    max_nonfinite: stop after this many non-finite steps in a row.
    seed: seeds the engine's data RNG (same on every rank) and noise RNG (differs per rank).
    device: "auto" (CUDA when present), "cpu", "cuda".
    progress: show a progress bar; None lets tqdm decide (off when stderr is not a terminal).
    """

    steps: int = 1000
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    amp: str = "auto"
    ckpt_every: int = 500
    log_every: int = 10
    max_nonfinite: int = 10
    seed: int = 0
    device: str = "auto"
    progress: bool | None = None
    tensorboard: bool = True

    def __post_init__(self) -> None:
        checks = [
            (self.steps >= 1, f"steps must be at least 1, got {self.steps}"),
            (self.lr >= 0 and math.isfinite(self.lr), f"lr must be a finite number >= 0, got {self.lr}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.warmup >= 0, f"warmup must be >= 0 steps, got {self.warmup}"),
            (self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"),
            (0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}"),
            (self.grad_clip >= 0, f"grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip}"),
            (0 <= self.ema_decay < 1, f"ema_decay must lie in [0, 1) (0 disables the EMA), got {self.ema_decay}"),
            (self.amp in AMP_MODES, f"amp must be one of {', '.join(AMP_MODES)}, got {self.amp!r}"),
            (self.ckpt_every >= 0, f"ckpt_every must be >= 0 (0: only a final checkpoint), got {self.ckpt_every}"),
            (self.log_every >= 1, f"log_every must be at least 1, got {self.log_every}"),
            (self.max_nonfinite >= 1, f"max_nonfinite must be at least 1, got {self.max_nonfinite}"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidInput(message)


ENGINE_KEYS = frozenset(f.name for f in dataclasses.fields(TrainSettings))


class Recipe(JsonDataclass):
    """What every training recipe shares (the flow, ControlNet and mask generator recipes mix it in).

    A recipe is a frozen dataclass whose field ``train`` holds its `TrainSettings`; its other fields
    say what to train on. It is stored as JSON in every checkpoint, with the engine settings under
    "train". Engine keys may also be given flat, as recipes were written before they held a
    `TrainSettings` (checkpoints of that time, ``--recipe-set ema_decay=0.995``): a key that is an
    engine setting and not a field of the recipe itself goes into ``train``.

    A recipe whose stages set their own steps or learning rate names them in ``PER_STAGE`` (engine
    key -> where to set it instead); ``train`` must leave those at the engine's default, so that no
    value in a recipe is silently unused.
    """

    PER_STAGE: dict[str, str] = {}

    @classmethod
    def of(cls, **values: Any):
        """The recipe built from keyword values, engine settings given flat (``steps=2000``) and
        applied over the recipe's own defaults (its ``train`` default, not the engine's)."""
        own = {f.name for f in dataclasses.fields(cls)}
        engine = {k: values.pop(k) for k in list(values) if k in ENGINE_KEYS and k not in own}
        recipe = cls(**values)
        return dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, **engine)) if engine else recipe

    def check_per_stage(self) -> None:
        """Refuse an engine value that this recipe's stages set themselves (called by __post_init__)."""
        default = TrainSettings()
        for key, where in self.PER_STAGE.items():
            if getattr(self.train, key) != getattr(default, key):
                raise InvalidInput(f"this recipe sets {key} per stage: use {where}, not train.{key}")

    @classmethod
    def from_dict(cls, data: dict):
        return dataclass_from_dict(cls, _engine_keys_nested(cls, data))

    def with_overrides(self, overrides: Sequence[str]):
        """Dotted ``key=value`` overrides (value parsed as JSON): ``train.ema_decay=0.995``, or flat
        ``ema_decay=0.995`` for an engine setting."""
        own = {f.name for f in dataclasses.fields(self)}
        items = []
        for item in overrides:
            key = item.split("=", 1)[0].strip()
            items.append(f"train.{item.strip()}" if key in ENGINE_KEYS and key not in own else item)
        return self.from_dict(set_dotted(self.to_dict(), items, what="recipe"))


def _engine_keys_nested(cls: type, data: Any) -> Any:
    """Recipe JSON with flat engine keys moved under "train", on top of the recipe's default
    settings, so that a partial "train" keeps the recipe's own defaults (e.g. a ControlNet's lr)."""
    if not isinstance(data, dict) or not isinstance(data.get("train", {}), dict):
        return data  # dataclass_from_dict says what is wrong with it
    own = {f.name for f in dataclasses.fields(cls)}
    flat = {k: v for k, v in data.items() if k in ENGINE_KEYS and k not in own}
    default = next(f for f in dataclasses.fields(cls) if f.name == "train").default_factory()
    nested = {k: v for k, v in data.items() if k not in flat}
    nested["train"] = {**dataclasses.asdict(default), **data.get("train", {}), **flat}
    return nested


def lr_at(step: int, settings: TrainSettings) -> float:
    """Learning rate of (0-based) `step`: linear warmup, then cosine decay or constant."""
    s = settings
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    if s.schedule == "constant":
        return s.lr
    span = max(s.steps - s.warmup - 1, 1)
    progress = min((step - s.warmup) / span, 1.0)
    floor = s.min_lr_ratio
    return s.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


class EMA:
    """Exponential moving average of a model's state dict (non-float buffers are copied)."""

    def __init__(self, model: nn.Module, decay: float, state: dict[str, torch.Tensor] | None = None):
        current = model.state_dict()
        source = current if state is None else state
        if set(source) != set(current):
            raise InvalidInput("the EMA weights to start from do not have the model's keys")
        self.decay = decay
        self.state = {k: source[k].detach().clone().to(current[k].device, current[k].dtype) for k in current}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, value in model.state_dict().items():
            ema = self.state[name]
            if ema.is_floating_point():
                ema.lerp_(value.detach(), 1.0 - self.decay)
            else:
                ema.copy_(value)


# -- data: an endless, resumable stream of batches ------------------------------------------

@dataclass
class BatchSource:
    """A dataset plus a planner that lays out one epoch of batches as lists of dataset indices.

    ``plan(generator)`` must take all its randomness from `generator`: the engine's data RNG,
    seeded identically on every rank (so rank-aware samplers shard one shared shuffle). Replaying
    a saved generator state then replays the epoch, which is what makes resuming exact.
    ``collate`` turns a list of dataset items into the batch that ``loss_fn`` receives.
    ``num_workers`` > 0 loads batches in background processes (the order stays the same).
    """

    dataset: Dataset
    plan: Callable[[torch.Generator], Sequence[Sequence[int]]]
    collate: Callable[[list], Any] = default_collate
    num_workers: int = 0


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator, rank: int = 0,
                     world_size: int = 1) -> list[list[int]]:
    """One epoch of a shuffle of range(n) in batches; each rank takes every world_size-th item.

    With fewer items than ranks every rank uses all items (tiny datasets still train).
    """
    order = torch.randperm(n, generator=generator).tolist()
    shard = order[rank::world_size] if n >= world_size else order
    return [shard[i:i + batch_size] for i in range(0, len(shard), batch_size)]


class BatchStream:
    """Batches from a `BatchSource`, epoch after epoch, without end.

    Its state is (epoch, position in the epoch, data-RNG state at the epoch's start): restoring it
    re-plans the same epoch and continues at the same batch.
    """

    def __init__(self, source: BatchSource, generator: torch.Generator):
        self.source = source
        self.generator = generator
        self.epoch, self.position = 0, 0
        self._epoch_rng: torch.Tensor | None = None
        self._batches: Iterator | None = None

    def _begin(self, epoch: int, rng_state: torch.Tensor, position: int) -> None:
        self.generator.set_state(rng_state)
        plan = [list(b) for b in self.source.plan(self.generator)]
        if not plan or not all(plan):
            raise InvalidInput("the batch planner returned an empty epoch (or an empty batch): is the dataset empty?")
        self.epoch, self.position, self._epoch_rng = epoch, position, rng_state
        self._batches = self._load(plan[position:])

    def _load(self, plan: list[list[int]]) -> Iterator:
        src = self.source
        if src.num_workers > 0:
            # A private generator: DataLoader would otherwise draw its worker seed from the global RNG.
            loader = DataLoader(src.dataset, batch_sampler=plan, collate_fn=src.collate, num_workers=src.num_workers,
                                generator=torch.Generator().manual_seed(self.epoch))
            return iter(loader)
        return (src.collate([src.dataset[i] for i in batch]) for batch in plan)

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> Any:
        if self._batches is None:
            self._begin(0, self.generator.get_state(), 0)
        try:
            batch = next(self._batches)
        except StopIteration:
            self._begin(self.epoch + 1, self.generator.get_state(), 0)
            batch = next(self._batches)
        self.position += 1
        return batch

    def state_dict(self) -> dict:
        rng = self._epoch_rng if self._epoch_rng is not None else self.generator.get_state()
        return {"epoch": self.epoch, "position": self.position, "epoch_rng": rng.clone()}

    def load_state_dict(self, state: dict) -> None:
        self._begin(int(state["epoch"]), state["epoch_rng"], int(state["position"]))


# -- data parallelism -----------------------------------------------------------------------

@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    """This process's place in the process group (rank 0 of 1 when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


@contextlib.contextmanager
def distributed(device: str = "auto") -> Iterator[DistInfo]:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU); leave it after.

    A no-op for a single process, or when the caller already initialised the group.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield dist_info()
        return
    use_cuda = nets.resolve_device(device).type == "cuda"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    try:
        yield dist_info()
    finally:
        dist.destroy_process_group()


def _training_device(name: str, info: DistInfo) -> torch.device:
    device = nets.resolve_device(name)
    if device.type == "cuda" and info.world_size > 1:
        return torch.device("cuda", info.local_rank)
    return device


def _amp_mode(amp: str, device: torch.device) -> str:
    if amp == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        # CPUs: bf16 autocast where bf16 hardware makes it pay (`compute.bf16_pays`: AMX, or a
        # measured probe); one small-preset flow UNet step (16^3, forward + backward) took 0.10
        # instead of 0.26 CPU s on a Xeon with AMX.
        from maisi2.compute import bf16_pays

        return "bf16" if bf16_pays()[0] else "fp32"
    if amp == "fp16" and device.type != "cuda":
        raise InvalidInput("amp='fp16' needs a CUDA device (its GradScaler is CUDA-only); use amp='fp32' or 'bf16' on CPU")
    return amp


def say(info: DistInfo, message: str) -> None:
    """A one-line status message on stderr, from the main process only (every recipe's voice)."""
    if info.is_main:
        print(f"maisi2: {message}", file=sys.stderr, flush=True)


# -- one run's state ------------------------------------------------------------------------

class _Trainer:
    """What a run owns and checkpoints: model, optimiser, scaler, EMA, RNGs, data position, counters."""

    def __init__(self, model: nn.Module, source: BatchSource, settings: TrainSettings, info: DistInfo,
                 device: torch.device):
        self.model, self.settings, self.info, self.device = model, settings, info, device
        self.amp = _amp_mode(settings.amp, device)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise InvalidInput("the model has no trainable parameters")
        self.optimizer = torch.optim.AdamW(self.params, lr=settings.lr, weight_decay=settings.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp == "fp16" else None
        self.ema: EMA | None = None
        # Data RNG: the same on all ranks (rank-aware planners shard one shuffle). Noise RNG:
        # different per rank, or every rank would draw the same noise for its batch.
        self.data_rng = torch.Generator().manual_seed(settings.seed)
        self.noise_rng = torch.Generator(device).manual_seed(settings.seed * 1_000_003 + 7919 * info.rank + 1)
        self.stream = BatchStream(source, self.data_rng)
        self.step, self.skipped, self.nonfinite_run, self.elapsed_before = 0, 0, 0, 0.0

    def start_ema(self, state: dict[str, torch.Tensor] | None) -> None:
        if self.ema is None and self.settings.ema_decay > 0:
            self.ema = EMA(self.model, self.settings.ema_decay, state)

    def _rank_state(self) -> dict:
        return {"noise_rng": self.noise_rng.get_state(), "torch_rng": torch.get_rng_state(),
                "data": self.stream.state_dict()}

    def state(self, elapsed: float) -> dict:
        """Trainer state for the checkpoint's extra (a collective call under torchrun)."""
        ranks = [self._rank_state()]
        if self.info.world_size > 1:
            ranks = [None] * self.info.world_size
            dist.all_gather_object(ranks, self._rank_state())
        return {
            "settings": asdict(self.settings), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else {}, "skipped": self.skipped,
            "nonfinite_run": self.nonfinite_run, "elapsed": elapsed, "ranks": ranks,
        }

    def restore(self, ckpt: Checkpoint) -> None:
        state = ckpt.extra.get("trainer")
        if not state:
            raise InvalidInput("the checkpoint holds no trainer state (was it written by another tool?); "
                             "start a new run from it as an initialisation instead")
        self.model.load_state_dict(ckpt.state_dict)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        if self.settings.ema_decay > 0:
            self.ema = EMA(self.model, self.settings.ema_decay, ckpt.ema_state_dict)  # None: restart from weights
        self.step, self.skipped = ckpt.step, int(state["skipped"])
        self.nonfinite_run, self.elapsed_before = int(state["nonfinite_run"]), float(state["elapsed"])
        ranks = state["ranks"]
        if len(ranks) != self.info.world_size:
            say(self.info, f"the checkpoint was written by {len(ranks)} process(es), this run has "
                            f"{self.info.world_size}: data order and noise restart from fresh seeds")
            return
        mine = ranks[self.info.rank]
        self.noise_rng.set_state(mine["noise_rng"])
        torch.set_rng_state(mine["torch_rng"])
        self.stream.load_state_dict(mine["data"])

    # -- one optimiser step --
    def train_step(self, net: nn.Module, loss_fn: LossFn, batch: Any) -> tuple[bool, float, dict]:
        """Forward, backward, clip, and update unless the loss or a gradient is non-finite."""
        lr = lr_at(self.step, self.settings)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        with compute.autocast(self.device, self.amp):
            loss, logs = loss_fn(net, batch, self.noise_rng)
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.settings.grad_clip or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        ok, mean_loss = self._agree(loss, grad_norm)
        if ok:
            (self.scaler.step(self.optimizer) if self.scaler else self.optimizer.step())
            if self.ema is not None:
                self.ema.update(self.model)
        if self.scaler:
            self.scaler.update()
        self.step += 1
        self._count(ok, mean_loss)
        return ok, mean_loss, logs

    def _agree(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> tuple[bool, float]:
        """(all ranks finite, loss averaged over ranks): one all-reduce, so every rank decides alike."""
        bad = ~(torch.isfinite(loss.detach()) & torch.isfinite(grad_norm))
        summary = torch.stack([loss.detach().float(), bad.float()])
        if self.info.world_size > 1:
            dist.all_reduce(summary)
            summary[0] /= self.info.world_size
        return bool(summary[1].item() == 0), float(summary[0].item())

    def _count(self, ok: bool, loss: float) -> None:
        if ok:
            self.nonfinite_run = 0
            return
        self.skipped += 1
        self.nonfinite_run += 1
        if self.nonfinite_run >= self.settings.max_nonfinite:
            raise CannotRun(
                f"{self.nonfinite_run} training steps in a row had a non-finite loss or gradient "
                f"(step {self.step}, loss {loss}); stopped without updating the weights. Try a lower learning "
                "rate, full precision (amp='fp32', --amp fp32), a smaller grad_clip, or check the data for "
                "NaN/inf values. Resume from the last checkpoint once fixed."
            )


# -- logs -----------------------------------------------------------------------------------

class _RunLog:
    """Means over each window of `log_every` steps -> log.csv, TensorBoard and the progress bar."""

    BASE = ("step", "lr", "loss", "skipped", "seconds")

    def __init__(self, out_dir: Path, settings: TrainSettings, info: DistInfo, start: int):
        self.settings, self.write = settings, info.is_main
        self.path = out_dir / LOG
        self.rows: list[dict] = []
        self._window: list[tuple[float, dict]] = []
        self.header: list[str] | None = None
        self.tb = None
        if self.write:
            self._keep_rows_up_to(start)
            self.tb = _tensorboard(out_dir, start, info) if settings.tensorboard else None
        from tqdm.auto import tqdm

        disable = True if not self.write else (None if settings.progress is None else not settings.progress)
        self.bar = tqdm(total=settings.steps, initial=start, disable=disable, desc="train", dynamic_ncols=True)

    def _keep_rows_up_to(self, step: int) -> None:
        """On resume drop rows logged after the checkpoint (they will be trained again); else start afresh."""
        if step == 0 or not self.path.is_file():
            self.path.unlink(missing_ok=True)
            return
        with open(self.path, newline="") as f:
            reader = csv.DictReader(f)
            self.header = list(reader.fieldnames or [])
            kept = [row for row in reader if int(row["step"]) <= step]
        if not self.header:
            self.path.unlink()
            self.header = None
            return
        self._write_rows(kept, mode="w")

    def _write_rows(self, rows: list[dict], mode: str = "a") -> None:
        new = not self.path.is_file() or mode == "w"
        with open(self.path, mode, newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.header, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerows(rows)

    def record(self, trainer: _Trainer, ok: bool, loss: float, logs: dict, elapsed: float) -> None:
        self.bar.update(1)
        if ok:
            self._window.append((loss, {k: float(v) for k, v in logs.items()}))
        step = trainer.step
        if step % self.settings.log_every and step != self.settings.steps:
            return
        row = {"step": step, "lr": lr_at(step - 1, self.settings), "loss": _mean([w[0] for w in self._window]),
               "skipped": trainer.skipped, "seconds": round(elapsed, 3)}
        for key in sorted({k for _, terms in self._window for k in terms}):
            row[key] = _mean([terms[key] for _, terms in self._window if key in terms])
        self._window = []
        self.rows.append(row)
        self.bar.set_postfix(loss=f"{row['loss']:.4g}", skipped=trainer.skipped)
        if self.write:
            self._emit(row)

    def _emit(self, row: dict) -> None:
        if self.header is None:
            self.header = list(row)
        self._write_rows([row])
        if self.tb is not None:
            for key, value in row.items():
                if key != "step":
                    self.tb.add_scalar(f"train/{key}", value, row["step"])

    def close(self) -> None:
        self.bar.close()
        if self.tb is not None:
            self.tb.close()


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _tensorboard(out_dir: Path, start: int, info: DistInfo):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        say(info, "tensorboard is not installed, logging to log.csv only (pip install tensorboard)")
        return None
    # purge_step drops events a resumed run is about to log again.
    return SummaryWriter(log_dir=str(out_dir / "tensorboard"), purge_step=start or None)


# -- the loop -------------------------------------------------------------------------------

@dataclass
class TrainResult:
    checkpoint: Path  # out_dir/last.pt, the final state
    step: int
    skipped: int
    model: nn.Module  # the trained model (not the DDP wrapper), raw weights
    ema_state_dict: dict[str, torch.Tensor] | None
    rows: list[dict] = field(default_factory=list)  # log rows of this call


def train(model: nn.Module, loss_fn: LossFn, data: BatchSource, settings: TrainSettings, out_dir: str | Path, *,
          kind: str, config: Config, scale_factor: float | None = None, resume: bool = False,
          extra: dict | None = None, keep_on_resume: tuple[str, ...] = (),
          ema_init: dict[str, torch.Tensor] | None = None,
          on_batch: Callable[[int, Any], None] | None = None) -> TrainResult:
    """Train `model` for ``settings.steps`` steps, writing checkpoints and logs to `out_dir`.

    kind, config, scale_factor, extra: stored in every checkpoint (extra must hold only tensors,
      numbers, strings, lists and dicts; the engine adds its state under extra["trainer"]).
    keep_on_resume: keys of `extra` that describe where the run started (e.g. its initial weights):
      a resumed run keeps the checkpoint's values for them instead of the caller's.
    resume: continue from out_dir/last.pt when it exists (else start afresh); without it an
      existing last.pt is an error, never silently overwritten.
    ema_init: weights the EMA starts from (e.g. the previous stage's EMA); default the model's.
    on_batch(step, batch): called with each batch before its (0-based) step, also after a resume:
      where a loss that depends on the step (e.g. a weight schedule) learns it; also for tests.
    Under torchrun call it inside `distributed()`; every rank must call it.
    """
    out_dir = Path(out_dir)
    info = dist_info()
    device = _training_device(settings.device, info)
    trainer = _Trainer(model.to(device), data, settings, info, device)
    last = out_dir / LAST
    resumed = resume and last.is_file()
    extra = dict(extra or {})
    if resumed:
        ckpt = load_checkpoint(last)
        _check_resumable(ckpt, last, kind, config)
        trainer.restore(ckpt)
        extra.update({k: ckpt.extra[k] for k in keep_on_resume if k in ckpt.extra})
        say(info, f"resuming {last} at step {trainer.step}")
    elif last.is_file():
        raise OutputExists(f"{last} exists: pass resume=True (--resume) to continue that run, or choose another output folder")
    elif resume:
        origin = f"from {extra['init']}" if extra.get("init") else "from scratch"
        say(info, f"no checkpoint in {out_dir}; starting {origin}")
    net = _wrap(model, info, device)
    trainer.start_ema(ema_init)  # after DDP's broadcast, so every rank starts from rank 0's weights
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    _barrier(info)
    record = {"kind": kind, "config": config, "scale_factor": scale_factor, "extra": extra, "path": last,
              "resumed": resumed}
    allocator.reuse_freed_memory()  # every step makes and drops the same activations
    try:
        return _loop(trainer, net, loss_fn, out_dir, record, on_batch)
    finally:
        allocator.give_back_freed_memory()


def _check_resumable(ckpt: Checkpoint, path: Path, kind: str, config: Config) -> None:
    if ckpt.kind != kind:
        raise InvalidInput(f"{path} holds a {ckpt.kind} checkpoint, this run trains a {kind}; choose another output folder")
    if ckpt.config != config:
        raise InvalidInput(f"{path} was trained with another network config (preset {ckpt.config.preset!r}); "
                         "resume with the same --preset/--set options, or choose another output folder")


def _wrap(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    if info.world_size <= 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, output_device=device.index if ids else None)


def _barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier()


def _loop(trainer: _Trainer, net: nn.Module, loss_fn: LossFn, out_dir: Path, record: dict,
          on_batch: Callable | None) -> TrainResult:
    settings, info = trainer.settings, trainer.info
    start, started = trainer.step, time.monotonic()

    def elapsed() -> float:
        return trainer.elapsed_before + time.monotonic() - started

    log = _RunLog(out_dir, settings, info, start)
    saved = start if record["resumed"] else -1  # a fresh run always ends with a checkpoint
    try:
        net.train()
        while trainer.step < settings.steps:
            batch = next(trainer.stream)
            if on_batch is not None:
                on_batch(trainer.step, batch)
            ok, loss, logs = trainer.train_step(net, loss_fn, batch)
            log.record(trainer, ok, loss, logs, elapsed())
            if settings.ckpt_every and trainer.step % settings.ckpt_every == 0:
                _save(trainer, record, elapsed())
                saved = trainer.step
        if saved != trainer.step:
            _save(trainer, record, elapsed())
    finally:
        log.close()
    _barrier(info)
    ema = trainer.ema.state if trainer.ema is not None else None
    return TrainResult(record["path"], trainer.step, trainer.skipped, trainer.model, ema, log.rows)


def _save(trainer: _Trainer, record: dict, elapsed: float) -> None:
    state = trainer.state(elapsed)  # collective: every rank takes part
    if trainer.info.is_main:
        ckpt = Checkpoint(
            kind=record["kind"], config=record["config"], state_dict=trainer.model.state_dict(),
            ema_state_dict=trainer.ema.state if trainer.ema is not None else None,
            scale_factor=record["scale_factor"], step=trainer.step, extra={**record["extra"], "trainer": state},
        )
        save_checkpoint(record["path"], ckpt, overwrite=True)
    _barrier(trainer.info)
