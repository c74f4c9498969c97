"""ControlNet training with MAISI-v2's region-specific contrastive loss, on the generic engine.

One training step (`controlnet_loss`), for a batch of cached latents x0 with their label maps:

1. Draw t and noise, form x_t and the target v = x0 - noise (`maisi2.flow`).
2. Real-mask pass: v_orig = UNet(x_t, t | spacing, modality, ControlNet(mask)) via
   `nets.predict_velocity`; L_flow = region-weighted L1 (tumour voxels weigh `label_weight`).
3. Perturbed-mask pass, only for the samples that hold a tumour: the same x_t, t and noise, with
   every tumour replaced by its parent organ (`labels.remove_tumors`), giving the contrastive
   terms L_roi and L_bg (`maisi2.losses`) either on the final velocities (`output` placement) or
   on the ControlNet's residuals (`encoder` placement, which skips the second UNet pass).
4. L = L_flow + lambda(step) * (L_roi + L_bg), lambda from a piecewise schedule over the run.

The flow UNet is frozen (eval mode, no gradients) and only the ControlNet learns; it starts from
the UNet's weights where the shapes match (`nets.controlnet_from_unet`). The engine
(`maisi2.training`) brings AMP, EMA, the non-finite guard, atomic checkpoints (kind "controlnet",
with the UNet's scale factor), exact resume, logs and torchrun data parallelism.

Placement ``auto`` rule: ``output`` while ``batch x latent voxels <= auto_output_max_voxels``
(default 64^3, one 256^3 image), else ``encoder``. The `output` placement keeps the activations of
a second full UNet forward for the backward pass (the gradient reaches the ControlNet through the
frozen UNet); `encoder` adds only a second ControlNet forward. Both placements still run the
ControlNet twice, including its mask embedding at image resolution, so the saving is the UNet's
share. Measured for the maisi-v2 networks in fp32 (activations autograd keeps, per sample): the
second pass keeps ~22 KiB per latent voxel at the output and ~8 KiB on the encoder, i.e. ~5.6 vs
~2 GiB at a 64^3 latent and ~45 vs ~16 GiB at 128^3 (`benchmarks/contrastive_memory.py`).

Usage::

    result = train_controlnet("cache/", "runs/flow/stage_3/last.pt", "runs/controlnet",
                              ControlNetRecipe.of(steps=2000))
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from maisi2 import flow, losses, nets
from maisi2.checkpoint import load_weights
from maisi2.config import Config, FlowConfig
from maisi2.data import BucketBatchSampler, bucket_by_size
from maisi2.errors import InvalidInput
from maisi2.labels import TUMOR_IDS, remove_tumors
from maisi2.latents import LatentDataset, prepare_batch, read_index, read_stats
from maisi2.models import load_network, read_network
from maisi2.training import BatchSource, DistInfo, Recipe, TrainResult, TrainSettings, dist_info, distributed, say, train

__all__ = [
    "PLACEMENTS",
    "ControlNetLossSettings",
    "ControlNetRecipe",
    "recipe_with_overrides",
    "resolve_placement",
    "perturb_labels",
    "StepOutput",
    "controlnet_loss",
    "ControlNetStepLoss",
    "crop_window",
    "load_frozen_unet",
    "train_controlnet",
]

PLACEMENTS = ("output", "encoder", "auto")


@dataclass(frozen=True)
class ControlNetLossSettings:
    """What the ControlNet's loss is made of (saved with every checkpoint).

    Defaults follow the paper; the official release is ``background_form="official"``,
    ``lambda_schedule=OFFICIAL_LAMBDA_SCHEDULE`` and ``normalise_weight=False``.
    """

    contrastive: bool = True
    delta: float = 2.0  # L_roi = -min(D_roi, delta)
    dilation: int = 1  # background = outside the ROI grown by this many latent voxels
    background_form: str = "paper"  # "paper": v_orig vs v_pert; "official": v_pert vs target
    lambda_schedule: losses.LambdaSchedule = losses.PAPER_LAMBDA_SCHEDULE
    placement: str = "auto"  # "output" | "encoder" | "auto"
    auto_output_max_voxels: int = 64**3  # auto: output placement up to this many latent voxels per batch
    weighted_labels: tuple[int, ...] = TUMOR_IDS  # flow-loss voxels that weigh more
    label_weight: float = 100.0  # 1.0 turns the region weighting off
    normalise_weight: bool = True  # weighted mean (paper); False: the official unnormalised form
    # "paper": lambda as given; "normalised": per-sample lambda giving the contrastive gradient the
    # strength relative to the flow loss that lambda has at `lambda_reference` (latent voxels, ROI
    # voxels) (`losses.normalised_lambdas`, derived in maisi2.losses)
    lambda_mode: str = "paper"
    lambda_reference: tuple[int, ...] = losses.REFERENCE_GEOMETRY

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise InvalidInput(f"placement must be one of {', '.join(PLACEMENTS)}; got {self.placement!r}")
        if self.background_form not in losses.BACKGROUND_FORMS:
            raise InvalidInput(f"background_form must be one of {', '.join(losses.BACKGROUND_FORMS)}; got {self.background_form!r}")
        if self.background_form == "official" and self.placement == "encoder":
            raise InvalidInput("background_form='official' compares with the flow target, which only exists at "
                             "the output: use placement 'output' (or 'auto') with it, or background_form='paper'")
        if self.lambda_mode not in losses.LAMBDA_MODES:
            raise InvalidInput(f"lambda_mode must be one of {', '.join(losses.LAMBDA_MODES)}; got {self.lambda_mode!r}")
        if len(self.lambda_reference) != 2 or not 0 < self.lambda_reference[1] <= self.lambda_reference[0]:
            raise InvalidInput("lambda_reference is (latent voxels, ROI voxels) with 0 < ROI voxels <= latent voxels; "
                             f"got {self.lambda_reference!r}")
        if self.delta <= 0 or self.dilation < 0 or self.label_weight <= 0 or self.auto_output_max_voxels < 1:
            raise InvalidInput("delta and label_weight must be > 0, dilation >= 0, auto_output_max_voxels >= 1")
        object.__setattr__(self, "lambda_schedule", losses.check_lambda_schedule(self.lambda_schedule))
        object.__setattr__(self, "weighted_labels", tuple(int(i) for i in self.weighted_labels))


def resolve_placement(settings: ControlNetLossSettings, batch_size: int, latent_spatial_shape: Sequence[int]) -> str:
    """`output` or `encoder` for this batch (see the module docstring for the `auto` rule)."""
    if settings.placement != "auto":
        return settings.placement
    if settings.background_form == "official":
        return "output"  # the official background term needs the final prediction
    voxels = batch_size * math.prod(int(s) for s in latent_spatial_shape)
    return "output" if voxels <= settings.auto_output_max_voxels else "encoder"


def perturb_labels(labels: torch.Tensor) -> torch.Tensor:
    """(B, 1, X, Y, Z) label maps -> the same with every tumour replaced by its parent organ.

    Runs `labels.remove_tumors` per sample on the CPU (it uses scipy); tumour-free samples come back
    unchanged without the search.
    """
    out = labels.clone()
    tumor_ids = torch.as_tensor(TUMOR_IDS, dtype=labels.dtype, device=labels.device)
    for b in range(labels.shape[0]):
        if torch.isin(labels[b], tumor_ids).any():
            clean = remove_tumors(labels[b, 0].cpu().numpy())
            out[b, 0] = torch.from_numpy(clean).to(out.device)
    return out


class _RecordResiduals(nn.Module):
    """Pass-through around the ControlNet that keeps its last residuals, so the real-mask pass of
    the `encoder` placement reuses them instead of running the ControlNet a second time."""

    def __init__(self, controlnet: nn.Module):
        super().__init__()
        self.controlnet = controlnet
        self.residuals: list[torch.Tensor] = []

    def forward(self, **kwargs):
        down, mid = self.controlnet(**kwargs)
        self.residuals = [*down, mid]
        return down, mid


# -- one training loss ----------------------------------------------------------------------

@dataclass
class StepOutput:
    """The loss to minimise and its parts (floats, for the logs)."""

    loss: torch.Tensor
    logs: dict[str, float] = field(default_factory=dict)


def controlnet_loss(
    unet: nn.Module,
    controlnet: nn.Module,
    x0: torch.Tensor,
    cond: nets.Conditioning,
    labels: torch.Tensor,
    settings: ControlNetLossSettings,
    flow_cfg: FlowConfig,
    lam: float,
    generator: torch.Generator | None = None,
    perturbed: torch.Tensor | None = None,
) -> StepOutput:
    """One ControlNet training loss.

    x0: (B, C, x, y, z) scaled latents; cond: their spacing and modality (its mask is replaced by
    `labels`); labels: (B, 1, X, Y, Z) integer label maps at image resolution; perturbed: the same
    without tumours (computed here when None). lam: the contrastive weight for this step
    (`losses.lambda_at`); 0, or ``settings.contrastive`` False, skips the perturbed pass.
    Randomness (t, noise) comes from `generator` (on x0's device), else the global RNG.
    """
    B, grid = x0.shape[0], tuple(x0.shape[2:])
    cond = nets.Conditioning(cond.spacing, cond.modality, nets.mask_to_bitplanes(labels))
    # 1. one noisy latent, time and noise, shared by both passes
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    t = flow.sample_training_t(B, grid, flow_cfg, generator=generator, device=x0.device)
    x_t = flow.add_noise(x0, noise, t, flow_cfg.num_train_timesteps)
    v_target = flow.velocity_target(x0, noise)
    # 2. real-mask pass and the region-weighted flow loss
    contrast = settings.contrastive and lam > 0
    placement = resolve_placement(settings, B, grid) if contrast else "output"
    recorder = _RecordResiduals(controlnet) if placement == "encoder" else None
    v_orig = nets.predict_velocity(unet, x_t, t, cond, controlnet=recorder or controlnet)
    weight = None
    if settings.label_weight != 1.0:
        weight = losses.region_weight_map(labels, settings.weighted_labels, grid, settings.label_weight)
    l_flow = losses.flow_loss(v_orig, v_target, weight, normalise=settings.normalise_weight, form=flow_cfg.loss)
    l_roi = l_bg = l_contrast = torch.zeros((), device=x0.device)
    d_roi, n_roi, lam_logged = 0.0, 0, float(lam)
    # 3. perturbed-mask pass, only for the samples that hold a tumour
    if contrast:
        perturbed = perturb_labels(labels) if perturbed is None else perturbed
        regions = losses.contrast_regions(labels, perturbed, grid, settings.dilation)
        index = regions.has_roi.nonzero().flatten()
        n_roi = int(index.numel())
        if n_roi:
            cond_p = nets.Conditioning(cond.spacing[index], cond.modality[index], nets.mask_to_bitplanes(perturbed[index]))
            if placement == "output":
                v_pert = nets.predict_velocity(unet, x_t[index], t[index], cond_p, controlnet=controlnet)
                terms = losses.region_contrastive_loss(v_orig[index], v_pert, regions.select(index), settings.delta,
                                                       settings.background_form, v_target[index])
            else:
                down, mid = nets.controlnet_residuals(controlnet, x_t[index], t[index], cond_p)
                feats_pert = [*down, mid]
                feats_orig = [f[index] for f in recorder.residuals]
                terms = losses.feature_contrastive_loss(feats_orig, feats_pert, regions.select(index), settings.delta)
            l_roi, l_bg = terms.batch_mean(B)
            d_roi = float(terms.distance.mean())
            if settings.lambda_mode == "paper":
                l_contrast = lam * (l_roi + l_bg)
            else:
                lam_b = _sample_lambdas(lam, settings, regions.roi[index], weight, B, grid)
                l_contrast = (lam_b * (terms.roi + terms.background)).sum() / B
                lam_logged = float(lam_b.mean())
    # 4. the total ("loss" itself is logged by the engine, averaged over ranks)
    loss = l_flow + l_contrast if contrast else l_flow
    logs = {"flow_loss": float(l_flow.detach()), "roi_loss": float(l_roi.detach()), "bg_loss": float(l_bg.detach()),
            "lambda": lam_logged if contrast else 0.0, "d_roi": d_roi, "roi_samples": float(n_roi),
            "encoder_placement": float(placement == "encoder")}
    return StepOutput(loss, logs)


def _sample_lambdas(lam: float, settings: ControlNetLossSettings, roi: torch.Tensor, weight: torch.Tensor | None,
                    batch_size: int, grid: Sequence[int]) -> torch.Tensor:
    """(n,) lambda of each tumour-holding sample in the "normalised" mode: `lam` rescaled so that the
    contrastive gradient has the reference strength relative to this batch's flow loss."""
    n_roi = roi.flatten(1).sum(dim=1)
    if weight is not None and settings.normalise_weight:
        weight_sum = weight.float().sum()  # (B, 1, x, y, z): S summed over the batch, per channel
    else:
        weight_sum = float(batch_size * math.prod(grid))
    w = settings.label_weight if weight is not None else 1.0
    return losses.normalised_lambdas(lam, n_roi, weight_sum, batch_size, w, settings.normalise_weight and weight is not None,
                                     settings.lambda_reference)


# -- the recipe -----------------------------------------------------------------------------

@dataclass(frozen=True)
class ControlNetRecipe(Recipe):
    """How to train the ControlNet (serialised to JSON into every checkpoint).

    Batches hold latents of one shape: the cache is bucketed by latent shape and a bucket of
    latents of V voxels gets batches of ``clamp(voxels_per_batch // V, 1, batch_size)``. ``train``
    holds the engine settings (steps, lr, warmup, ema_decay, ckpt_every, ...; flat keys such as
    ``--recipe-set lr=2e-5`` or ``ControlNetRecipe.of(steps=2000)`` still work). The defaults are
    the official ones where the paper is silent (lr 1e-5, batch 1).
    """

    loss: ControlNetLossSettings = field(default_factory=ControlNetLossSettings)
    batch_size: int = 1
    voxels_per_batch: int = 128**3
    num_workers: int = 0
    crop: tuple[int, ...] = ()
    tumor_crops: float = 0.0
    train: TrainSettings = field(default_factory=lambda: TrainSettings(steps=10000, lr=1e-5))

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.voxels_per_batch < 1 or self.num_workers < 0:
            raise InvalidInput("batch_size and voxels_per_batch must be at least 1 and num_workers >= 0")
        if self.crop and (len(self.crop) != 3 or min(self.crop) < 1):
            raise InvalidInput(f"crop must be three positive latent sizes (x, y, z) or empty, got {list(self.crop)}")
        if not 0 <= self.tumor_crops <= 1:
            raise InvalidInput(f"tumor_crops must be a share in [0, 1], got {self.tumor_crops}")
        if self.tumor_crops and not self.crop:
            raise InvalidInput("tumor_crops needs crop: windows can only be centred on a tumour when there are windows")

    def settings(self, device: str = "auto", progress: bool | None = None) -> TrainSettings:
        return replace(self.train, device=device, progress=progress)


def recipe_with_overrides(recipe: ControlNetRecipe, overrides: Sequence[str]) -> ControlNetRecipe:
    """Dotted ``key=value`` overrides (value parsed as JSON), e.g. ``loss.dilation=2`` or ``lr=2e-5``."""
    return recipe.with_overrides(overrides)


# -- data -----------------------------------------------------------------------------------

class _WithPerturbed(Dataset):
    """Adds "label_perturbed" (tumours -> parent organs) to each item, so the CPU-bound search runs
    in the data-loading workers rather than in the training step."""

    def __init__(self, dataset: LatentDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        item = self.dataset[i]
        item["label_perturbed"] = perturb_labels(item["label"][None])[0]
        return item


def _labelled_latents(cache, scale: float, info: DistInfo) -> LatentDataset:
    """The cache's volumes that carry a label map (a ControlNet needs one; the flow model does not)."""
    records = read_index(cache)
    keep = [i for i, r in enumerate(records) if r.label]
    if not keep:
        raise InvalidInput(f"no volume in {cache} has a label map; encode a datalist with a label column")
    if len(keep) < len(records):
        say(info, f"controlnet: skipping {len(records) - len(keep)} cached volume(s) without a label map")
    return LatentDataset(cache, scale_factor=scale, with_labels=True, indices=keep)


def _batch_source(dataset: LatentDataset, recipe: ControlNetRecipe, info: DistInfo) -> BatchSource:
    """Shape-bucketed batches, dealt to ranks by `data.BucketBatchSampler`; the epoch seed comes
    from the engine's data RNG, so resuming replays the same order."""
    buckets = bucket_by_size([r.latent_shape[1:] for r in dataset.records])
    sizes = {s: max(1, min(recipe.batch_size, recipe.voxels_per_batch // math.prod(recipe.crop or s))) for s in buckets}

    def plan(generator: torch.Generator) -> list[list[int]]:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        return list(BucketBatchSampler(buckets, sizes, seed=seed, rank=info.rank, world_size=info.world_size))

    items = _WithPerturbed(dataset) if recipe.loss.contrastive else dataset
    return BatchSource(items, plan=plan, collate=list, num_workers=recipe.num_workers)


def crop_window(item: dict, size: Sequence[int], factor: int, tumor_share: float,
                generator: torch.Generator) -> dict:
    """One item's latent cut to a window of `size` (per axis at most the latent's), its label maps
    (`factor` times finer) to the same region; spacing unchanged. With probability `tumor_share`,
    and when the map has a tumour, the window is centred on a random tumour voxel, jittered by up
    to a quarter window."""
    latent = item["latent"]
    shape = tuple(latent.shape[1:])
    size = [min(s, n) for s, n in zip(size, shape)]  # a latent thinner than the window keeps that axis whole

    def draw(high: int) -> int:  # uniform in [0, high)
        return int(torch.randint(0, high, (1,), generator=generator, device=generator.device))

    starts = [draw(n - s + 1) for n, s in zip(shape, size)]
    if tumor_share > 0 and float(torch.rand((), generator=generator, device=generator.device)) < tumor_share:
        tumor = torch.isin(item["label"][0], torch.tensor(TUMOR_IDS, dtype=item["label"].dtype)).nonzero()
        if len(tumor):
            centre = tumor[draw(len(tumor))] // factor
            starts = [min(max(int(c) - s // 2 + draw(2 * (s // 4) + 1) - s // 4, 0), n - s)
                      for c, n, s in zip(centre, shape, size)]
    out = dict(item)
    out["latent"] = latent[(slice(None), *(slice(a, a + s) for a, s in zip(starts, size)))]
    fine = (slice(None), *(slice(a * factor, (a + s) * factor) for a, s in zip(starts, size)))
    for key in ("label", "label_perturbed"):
        if key in item:
            out[key] = item[key][fine]
    return out


class ControlNetStepLoss:
    """The engine's ``loss_fn``: stack a list of `LatentDataset` items, then `controlnet_loss`.

    The frozen UNet travels to the training device on the first call. `step` is set by `on_batch`
    before every step (the engine passes its step counter there), which keeps the lambda schedule
    right after a resume.
    """

    def __init__(self, unet: nn.Module, cfg: Config, recipe: ControlNetRecipe):
        self.unet, self.cfg, self.recipe = unet, cfg, recipe
        self.multiple = 2 ** (len(cfg.unet.num_channels) - 1)
        if any(s % self.multiple for s in recipe.crop):
            raise InvalidInput(f"crop {list(recipe.crop)} must be a multiple of {self.multiple} on every axis (the UNet "
                             f"halves the grid {len(cfg.unet.num_channels) - 1} times)")
        self.step = 0

    def on_batch(self, step: int, batch: Any) -> None:
        self.step = step

    def __call__(self, model: nn.Module, items: list[dict], generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        device = next(model.parameters()).device
        self.unet.to(device)
        factor = self.cfg.vae.downsample_factor
        if self.recipe.crop:
            items = [crop_window(item, self.recipe.crop, factor, self.recipe.tumor_crops, generator) for item in items]
        x0, cond = prepare_batch(items, generator, device, multiple=self.multiple)
        labels = torch.stack([item["label"] for item in items]).to(device)
        if tuple(labels.shape[2:]) != tuple(s * factor for s in x0.shape[2:]):
            raise InvalidInput(f"label map {tuple(labels.shape[2:])} does not match latent {tuple(x0.shape[2:])} x {factor}; "
                             "re-encode the cache with labels on the image grid")
        perturbed = None
        if "label_perturbed" in items[0]:
            perturbed = torch.stack([item["label_perturbed"] for item in items]).to(device)
        lam = losses.lambda_at(self.recipe.loss.lambda_schedule, self.step, self.recipe.train.steps)
        out = controlnet_loss(self.unet, model, x0, cond, labels, self.recipe.loss, self.cfg.flow, lam,
                              generator=generator, perturbed=perturbed)
        return out.loss, out.logs


# -- running it -----------------------------------------------------------------------------

def load_frozen_unet(path: str | Path, preset: str | None = None, overrides: Sequence[str] = (),
                     device: str | torch.device | None = None) -> tuple[nn.Module, Config, float | None]:
    """The trained flow UNet, frozen: (unet in eval mode without gradients, config, scale factor).

    The config is the checkpoint's (released files: `preset`, default maisi-v2), with `overrides`
    applied (e.g. controlnet.* settings); EMA weights are preferred, as for sampling.
    """
    unet, cfg, weights = load_network(path, "unet", device=device, preset=preset, overrides=overrides)
    unet.requires_grad_(False)
    return unet, cfg, weights.scale_factor


def _initial_controlnet(unet: nn.Module, cfg: Config, seed: int, device: torch.device,
                        init: Path | None = None) -> nn.Module:
    """The UNet's weights where the shapes allow (the paper's start), or `init`'s, loaded strictly."""
    torch.manual_seed(seed)  # the same start on every rank (DDP also broadcasts rank 0's)
    controlnet = nets.build_controlnet(cfg, device=device)
    if init is None:
        nets.controlnet_from_unet(controlnet, unet)
    else:
        load_weights(controlnet, read_network(init, "controlnet").state_dict, "controlnet", str(init), cfg.preset)
    return controlnet


def train_controlnet(cache: str | Path, unet: str | Path, out_dir: str | Path, recipe: ControlNetRecipe | None = None,
                     preset: str | None = None, overrides: Sequence[str] = (), resume: bool = False,
                     device: str = "auto", progress: bool | None = None,
                     on_batch: Callable[[int, Any], None] | None = None,
                     init_controlnet: str | Path | None = None) -> TrainResult:
    """Train a ControlNet on the latent cache `cache` (stored with label maps) against the frozen
    flow UNet checkpoint `unet`; writes ``out_dir/last.pt`` (kind "controlnet") and ``log.csv``.

    The ControlNet starts from the UNet's weights, or, to fine-tune, from `init_controlnet`: the
    released ``controlnet_3d_rflow-ct.pt`` (or its folder) or one of our controlnet checkpoints,
    loaded strictly (a resumed run takes its weights from ``last.pt`` instead).

    The latents are scaled with the UNet's scale factor (the one it was trained with); the cache's
    own is used only when the UNet file has none. Works as is under ``torchrun``.
    """
    recipe = recipe if recipe is not None else ControlNetRecipe()
    with distributed(device):
        info = dist_info()
        # Built on the training device so flash attention is used where it can run (same keys).
        where = nets.resolve_device(device)
        frozen, cfg, scale = load_frozen_unet(unet, preset, overrides, device=where)
        cache_scale = float(read_stats(cache)["scale_factor"])
        if scale is None:
            scale = cache_scale
        elif abs(scale - cache_scale) > 1e-3 * abs(cache_scale):
            say(info, f"the UNet was trained with scale_factor {scale:.5g}, the cache has {cache_scale:.5g}; "
                       "using the UNet's (encode with the same VAE to keep them equal)")
        dataset = _labelled_latents(cache, scale, info)
        init = None if init_controlnet is None or (resume and (Path(out_dir) / "last.pt").is_file()) else Path(init_controlnet)
        controlnet = _initial_controlnet(frozen, cfg, recipe.train.seed, where, init)
        loss_fn = ControlNetStepLoss(frozen, cfg, recipe)

        def each_batch(step: int, batch: Any) -> None:
            loss_fn.on_batch(step, batch)
            if on_batch is not None:
                on_batch(step, batch)

        say(info, f"controlnet: {len(dataset)} latents, {recipe.train.steps} steps, contrastive "
                   f"{'on (' + recipe.loss.placement + ')' if recipe.loss.contrastive else 'off'} -> {out_dir}")
        extra = {"recipe": recipe.to_json(), "unet": str(unet), "cache": str(cache),
                 "init": "" if init is None else str(init)}
        return train(controlnet, loss_fn, _batch_source(dataset, recipe, info), recipe.settings(device, progress),
                     out_dir, kind="controlnet", config=cfg, scale_factor=scale, resume=resume, extra=extra,
                     keep_on_resume=("init",), on_batch=each_batch)
