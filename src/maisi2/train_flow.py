"""The flow-model recipe: MAISI-v2's three training stages of the latent rectified-flow UNet.

One step, for a batch of cached latents ``x0`` (already times the cache's scale factor):
draw ``t`` (`flow.sample_training_t`, shifted by the latent size) and ``noise``, form
``x_t = add_noise(x0, noise, t)``, predict ``v`` with `nets.predict_velocity` (conditioned on the
image spacing and the modality id) and take `losses.flow_loss` (L1 unless ``flow.loss=l2``) against ``x0 - noise``.
With ``modality_dropout = p`` the modality is replaced by class 0 ("unknown") with probability p,
which trains the unconditional branch classifier-free guidance needs. ``objective = "ddpm"`` trains
the same network as MAISI v1 did instead (`ddpm_loss`: noise prediction on MAISI's DDPM schedule,
same L1), for the paper's steps comparison; sample such a UNet with `maisi2.ddpm`.

The stages (paper, Sec. "three-stage training"), each in its own folder under ``out_dir``:

1. ``stage_1`` low-resolution pre-training: every latent is area-downsampled (or randomly cropped)
   to one small size, so large batches fit.
2. ``stage_2`` full resolution, size-bucketed: one bucket per latent shape, each with its own
   batch size (a voxel budget per batch); under torchrun each rank serves whole buckets
   (`data.BucketBatchSampler`), a single process cycles through all of them.
3. ``stage_3`` balanced fine-tuning at batch 1, sources drawn by weight (inverse source frequency
   by default, `data.weighted_source_sampler`) to undo the bucket imbalance.

Stage k starts from ``stage_{k-1}/last.pt`` (raw weights, and its EMA for the EMA), or from
``init`` for the first stage run. The recipe (JSON) and the stage go into every checkpoint.

Usage::

    cfg = get_config("tiny")
    results = train_flow("cache/", "runs/flow", cfg, stages=(1, 2, 3))
    unet_ckpt = results[3].checkpoint          # runs/flow/stage_3/last.pt
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from maisi2 import ddpm, flow, losses, nets
from maisi2.checkpoint import load_checkpoint, load_weights
from maisi2.config import Config, FlowConfig
from maisi2.data import BucketBatchSampler, bucket_by_size, weighted_source_sampler
from maisi2.errors import InvalidInput, MissingInput
from maisi2.latents import RESIZE_MODES, LatentDataset, prepare_batch
from maisi2.training import (LAST, BatchSource, DistInfo, Recipe, TrainResult, TrainSettings, dist_info, distributed,
                             say, shuffled_batches, train)

__all__ = [
    "LowResStage",
    "BucketStage",
    "BalancedStage",
    "FlowRecipe",
    "STAGES",
    "default_recipe",
    "recipe_with_overrides",
    "stage_dir",
    "stage_settings",
    "flow_matching_loss",
    "ddpm_loss",
    "FlowStepLoss",
    "bucket_batch_sizes",
    "source_weights",
    "stage_source",
    "train_stage",
    "train_flow",
]

STAGES = (1, 2, 3)
OBJECTIVES = ("rflow", "ddpm")


@dataclass(frozen=True)
class LowResStage:
    """Stage 1: every latent brought to `latent_size` ("downsample": area average, spacing grows
    accordingly; "crop": a random crop, spacing unchanged), batches of `batch_size`."""

    steps: int = 20000
    lr: float = 1e-4
    warmup: int = 500
    schedule: str = "cosine"
    batch_size: int = 8
    latent_size: tuple[int, ...] = (32, 32, 32)
    resize: str = "downsample"


@dataclass(frozen=True)
class BucketStage:
    """Stage 2: full resolution; a bucket of latents of `voxels` voxels gets batches of
    ``clamp(voxels_per_batch // voxels, 1, max_batch_size)``."""

    steps: int = 20000
    lr: float = 5e-5
    warmup: int = 100
    schedule: str = "cosine"
    voxels_per_batch: int = 128**3
    max_batch_size: int = 16


@dataclass(frozen=True)
class BalancedStage:
    """Stage 3: batch 1; `source_weights` is "inverse" (every source equally often, i.e. inverse
    source frequency per volume), "uniform" (every volume equally often) or explicit
    "name=weight,name=weight" covering every source of the cache."""

    steps: int = 5000
    lr: float = 2e-5
    warmup: int = 0
    schedule: str = "constant"
    source_weights: str = "inverse"


@dataclass(frozen=True)
class FlowRecipe(Recipe):
    """The three stages plus what they share. Serialised to JSON into every checkpoint.

    ``train`` holds the engine settings every stage shares (grad_clip, ema_decay, amp, ckpt_every,
    seed, ...; flat ``--recipe-set ema_decay=0.995`` still works); each stage sets its own steps,
    lr, warmup and schedule.
    """

    PER_STAGE = {key: ", ".join(f"stage{k}.{key}" for k in STAGES) for key in ("steps", "lr", "warmup", "schedule")}

    stage1: LowResStage = field(default_factory=LowResStage)
    stage2: BucketStage = field(default_factory=BucketStage)
    stage3: BalancedStage = field(default_factory=BalancedStage)
    modality_dropout: float = 0.0  # classifier-free guidance: P(modality -> 0 "unknown")
    objective: str = "rflow"  # "ddpm": MAISI v1's noise-prediction objective, for the steps comparison
    num_workers: int = 0
    train: TrainSettings = field(default_factory=TrainSettings)

    def __post_init__(self) -> None:
        _check_recipe(self)

    def stage(self, k: int) -> LowResStage | BucketStage | BalancedStage:
        if k not in STAGES:
            raise InvalidInput(f"stage must be one of {STAGES}, got {k!r}")
        return (self.stage1, self.stage2, self.stage3)[k - 1]


def _check_recipe(r: FlowRecipe) -> None:
    s1, s2 = r.stage1, r.stage2
    checks = [
        (0 <= r.modality_dropout <= 1, f"modality_dropout must lie in [0, 1], got {r.modality_dropout}"),
        (s1.resize in RESIZE_MODES, f"stage1.resize must be one of {', '.join(RESIZE_MODES)}, got {s1.resize!r}"),
        (len(s1.latent_size) == 3 and min(s1.latent_size) >= 1, f"stage1.latent_size must be three positive sizes, got {s1.latent_size}"),
        (s1.batch_size >= 1, f"stage1.batch_size must be at least 1, got {s1.batch_size}"),
        (s2.voxels_per_batch >= 1 and s2.max_batch_size >= 1, "stage2.voxels_per_batch and stage2.max_batch_size must be at least 1"),
        (r.num_workers >= 0, f"num_workers must be >= 0, got {r.num_workers}"),
        (r.objective in OBJECTIVES, f"objective must be one of {', '.join(OBJECTIVES)}, got {r.objective!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise InvalidInput(message)
    r.check_per_stage()
    for k in STAGES:  # the engine's own checks (steps, lr, schedule, amp, ...), reported per stage
        try:
            stage_settings(r, k)
        except ValueError as err:
            raise InvalidInput(f"stage{k}: {err}") from None


def default_recipe(cfg: Config) -> FlowRecipe:
    """The default recipe, with stage 1 at the latent size where the config's time shift is 1
    (32^3 for maisi-v2, 16^3 for small, 8^3 for tiny)."""
    side = round(cfg.flow.base_img_size_numel ** (1 / 3))
    return FlowRecipe(stage1=LowResStage(latent_size=(side, side, side)))


def recipe_with_overrides(recipe: FlowRecipe, overrides: Sequence[str]) -> FlowRecipe:
    """Apply dotted ``key=value`` overrides (value parsed as JSON), e.g. ``stage2.lr=1e-5``."""
    return recipe.with_overrides(overrides)


def stage_dir(out_dir: str | Path, k: int) -> Path:
    return Path(out_dir) / f"stage_{k}"


def stage_settings(recipe: FlowRecipe, k: int, device: str = "auto", progress: bool | None = None) -> TrainSettings:
    """The engine settings of stage k: the recipe's shared ones with the stage's steps, lr, warmup
    and schedule, and a seed of its own."""
    stage = recipe.stage(k)
    return dataclasses.replace(recipe.train, steps=stage.steps, lr=stage.lr, warmup=stage.warmup,
                               schedule=stage.schedule, seed=recipe.train.seed * 31 + k, device=device,
                               progress=progress)


# -- batches --------------------------------------------------------------------------------

def flow_matching_loss(model: nn.Module, x0: torch.Tensor, cond: nets.Conditioning, flow_cfg: FlowConfig,
                       generator: torch.Generator) -> torch.Tensor:
    """Rectified-flow loss of one batch: |model(x_t, t | cond) - (x0 - noise)| (``flow_cfg.loss``: L1 or squared)."""
    noise = torch.randn(x0.shape, generator=generator, device=generator.device, dtype=x0.dtype).to(x0.device)
    t = flow.sample_training_t(x0.shape[0], x0.shape[2:], flow_cfg, generator=generator, device=generator.device)
    x_t = flow.add_noise(x0, noise, t.to(x0.device), flow_cfg.num_train_timesteps)
    v = nets.predict_velocity(model, x_t, t, cond)
    return losses.flow_loss(v, flow.velocity_target(x0, noise), form=flow_cfg.loss)


def ddpm_loss(model: nn.Module, x0: torch.Tensor, cond: nets.Conditioning, flow_cfg: FlowConfig,
              generator: torch.Generator) -> torch.Tensor:
    """The DDPM baseline's loss of one batch, same network call and same L1 form as the flow's:
    |model(x_t, t | cond) - noise| with integer t uniform in [0, T) and MAISI's DDPM schedule."""
    noise = torch.randn(x0.shape, generator=generator, device=generator.device, dtype=x0.dtype).to(x0.device)
    t = ddpm.sample_ddpm_training_t(x0.shape[0], flow_cfg.num_train_timesteps, generator=generator)
    x_t = ddpm.ddpm_add_noise(x0, noise, t.to(x0.device))
    eps = nets.predict_velocity(model, x_t, t.float(), cond)  # the network's output is epsilon here
    return losses.flow_loss(eps, ddpm.ddpm_training_target(x0, noise, t), form=flow_cfg.loss)


OBJECTIVE_LOSSES = {"rflow": flow_matching_loss, "ddpm": ddpm_loss}


class FlowStepLoss:
    """The engine's ``loss_fn`` for one stage: prepare the batch, then `flow_matching_loss`."""

    def __init__(self, cfg: Config, recipe: FlowRecipe, k: int):
        self.flow_cfg = cfg.flow
        self.multiple = 2 ** (len(cfg.unet.num_channels) - 1)
        self.modality_dropout = recipe.modality_dropout
        self.latent_size = tuple(recipe.stage1.latent_size) if k == 1 else None
        self.resize = recipe.stage1.resize
        self.objective_loss = OBJECTIVE_LOSSES[recipe.objective]

    def __call__(self, model: nn.Module, items: list[dict], generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        device = next(model.parameters()).device
        x0, cond = prepare_batch(items, generator, device, latent_size=self.latent_size, resize=self.resize,
                                 modality_dropout=self.modality_dropout, multiple=self.multiple)
        return self.objective_loss(model, x0, cond, self.flow_cfg, generator), {}


# -- what each stage samples ------------------------------------------------------------------

def bucket_batch_sizes(shapes: Sequence[Sequence[int]], voxels_per_batch: int, max_batch_size: int) -> dict:
    """{shape: batch size}: as many latents as fit the voxel budget, at least 1, at most the cap."""
    return {tuple(s): max(1, min(max_batch_size, voxels_per_batch // math.prod(s))) for s in shapes}


def source_weights(spec: str, sources: Sequence[str]) -> dict[str, float]:
    """Per-source weights for `data.weighted_source_sampler` from a stage-3 spec (see BalancedStage)."""
    present = sorted(set(sources))
    if spec == "inverse":  # the sampler splits a source's weight among its volumes: 1/count each
        return {s: 1.0 for s in present}
    if spec == "uniform":
        return {s: float(sources.count(s)) for s in present}
    weights = {}
    for part in spec.split(","):
        name, sep, value = part.rpartition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise InvalidInput(f"stage3.source_weights {spec!r}: use 'inverse', 'uniform' or 'name=weight,name=weight'")
    return weights


def _epoch_seed(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator))


def stage_source(k: int, dataset: LatentDataset, recipe: FlowRecipe, info: DistInfo) -> BatchSource:
    """The batches of stage k for this rank (plans take their randomness from the engine's data RNG)."""
    n = len(dataset)
    rank, world = info.rank, info.world_size
    if k == 1:
        size = recipe.stage1.batch_size

        def plan(g):
            return shuffled_batches(n, size, g, rank, world)
    elif k == 2:
        buckets = bucket_by_size([r.latent_shape[1:] for r in dataset.records])
        sizes = bucket_batch_sizes(list(buckets), recipe.stage2.voxels_per_batch, recipe.stage2.max_batch_size)

        def plan(g):
            return list(BucketBatchSampler(buckets, sizes, seed=_epoch_seed(g), rank=rank, world_size=world))
    else:
        sources = [r.source for r in dataset.records]
        weights = source_weights(recipe.stage3.source_weights, sources)
        weighted_source_sampler(sources, weights)  # fail now, not at the first batch, on a bad spec

        def plan(g):  # every rank its own draws: the seed mixes in the rank
            seed = _epoch_seed(g) * 7919 + rank
            return [[int(i)] for i in weighted_source_sampler(sources, weights, num_samples=n, seed=seed)]
    return BatchSource(dataset, plan=plan, collate=list, num_workers=recipe.num_workers)


# -- running the stages -----------------------------------------------------------------------

def _initial_unet(cfg: Config, recipe: FlowRecipe, device: str,
                  init: Path | None) -> tuple[nn.Module, dict | None, float | None, int]:
    """A fresh UNet (seeded), or one with `init`'s raw weights; returns (model, its EMA, its scale
    factor, the training steps those weights have had in all)."""
    torch.manual_seed(recipe.train.seed)  # the same start on every rank (DDP also broadcasts rank 0's)
    model = nets.build_unet(cfg, device=nets.resolve_device(device))
    if init is None:
        return model, None, None, 0
    ckpt = load_checkpoint(init)
    if ckpt.kind != "unet":
        raise InvalidInput(f"--init {init} holds a {ckpt.kind} checkpoint; the flow model needs a unet checkpoint")
    load_weights(model, ckpt.state_dict, "unet", str(init), cfg.preset)
    ema = ckpt.ema_state_dict
    if ema is not None and {k: v.shape for k, v in ema.items()} != {k: v.shape for k, v in ckpt.state_dict.items()}:
        ema = None
    return model, ema, ckpt.scale_factor, ckpt.steps_in_all


def train_stage(k: int, cache: str | Path, out_dir: str | Path, cfg: Config, recipe: FlowRecipe,
                init: str | Path | None = None, resume: bool = False, device: str = "auto",
                progress: bool | None = None, on_batch: Callable[[int, Any], None] | None = None) -> TrainResult:
    """Run stage k into ``out_dir/stage_k``, starting from `init` (a unet checkpoint) or from scratch.

    Call inside `training.distributed()` under torchrun (`train_flow` does).
    """
    info = dist_info()
    folder = stage_dir(out_dir, k)
    resuming = resume and (folder / LAST).is_file()
    init = None if resuming or init is None else Path(init)  # a resumed stage takes its weights from last.pt
    if k == 1:
        _check_low_res_size(cfg, recipe)
    dataset = LatentDataset(cache)
    model, ema, init_scale, steps_before = _initial_unet(cfg, recipe, device, init)
    if init_scale is not None and abs(init_scale - dataset.scale_factor) > 1e-3 * abs(dataset.scale_factor):
        say(info, f"{init} was trained with scale_factor {init_scale:.5g}, the cache has {dataset.scale_factor:.5g}; "
                   "using the cache's (encode with the same VAE to keep them equal)")
    say(info, f"flow stage {k}: {len(dataset)} latents, {recipe.stage(k).steps} steps -> {folder}")
    extra = {"recipe": recipe.to_json(), "stage": k, "init": "" if init is None else str(init), "cache": str(cache),
             "steps_before": steps_before}
    return train(model, FlowStepLoss(cfg, recipe, k), stage_source(k, dataset, recipe, info),
                 stage_settings(recipe, k, device, progress), folder, kind="unet", config=cfg,
                 scale_factor=dataset.scale_factor, resume=resume, extra=extra,
                 keep_on_resume=("init", "steps_before"),  # a resumed stage's origin is the interrupted run's
                 ema_init=ema, on_batch=on_batch)


def _check_low_res_size(cfg: Config, recipe: FlowRecipe) -> None:
    multiple = 2 ** (len(cfg.unet.num_channels) - 1)
    if any(s % multiple for s in recipe.stage1.latent_size):
        raise InvalidInput(f"stage1.latent_size {recipe.stage1.latent_size} must be multiples of {multiple} for this UNet")


def _init_for(k: int, stages: Sequence[int], out_dir: Path, init: str | Path | None) -> Path | None:
    """Where stage k starts: `init` for the first stage run, else the previous stage's last.pt."""
    if k == stages[0] and init is not None:
        return Path(init)
    if k == 1:
        return None
    previous = stage_dir(out_dir, k - 1) / LAST
    if not previous.is_file():
        raise MissingInput(f"stage {k} starts from {previous}, which does not exist: run stage {k - 1} "
                                "first (--stage all), or give a unet checkpoint with --init")
    return previous


def train_flow(cache: str | Path, out_dir: str | Path, cfg: Config, recipe: FlowRecipe | None = None,
               stages: Sequence[int] = STAGES, init: str | Path | None = None, resume: bool = False,
               device: str = "auto", progress: bool | None = None,
               on_batch: Callable[[int, Any], None] | None = None) -> dict[int, TrainResult]:
    """Run the given stages in order, each handing its weights to the next; {stage: result}.

    resume: finished stages are kept (their run returns at once), an interrupted one continues.
    Works as is under ``torchrun`` (joins the process group, gloo on CPU, NCCL on CUDA).
    """
    recipe = recipe if recipe is not None else default_recipe(cfg)
    stages = sorted(set(int(k) for k in stages))
    if not stages or any(k not in STAGES for k in stages):
        raise InvalidInput(f"stages must be a non-empty subset of {STAGES}, got {stages}")
    out_dir = Path(out_dir)
    results = {}
    with distributed(device):
        for k in stages:
            resuming = resume and (stage_dir(out_dir, k) / LAST).is_file()
            start = None if resuming else _init_for(k, stages, out_dir, init)
            results[k] = train_stage(k, cache, out_dir, cfg, recipe, init=start, resume=resume, device=device,
                                     progress=progress, on_batch=on_batch)
    return results
