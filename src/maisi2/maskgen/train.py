"""Training our mask generator: the mask autoencoder, then the latent UNet with rectified flow.

Both stages run through the project's one training engine (`maisi2.training.train`: resumable
exactly, checkpoints atomic, data parallel under torchrun) with their own loss:

1. ``autoencoder``: 8 bit-planes of the mask in, 125 class logits out; cross-entropy plus a soft
   Dice over the classes present (small organs would otherwise drown in body and background),
   plus ``kl_weight`` x KL. The latent is sampled with the engine's noise generator. The
   training log's ``dice`` is that soft Dice on the batch; what the exported autoencoder gives
   back (hard Dice of its argmax, `autoencoder_dice`) is printed when the UNet stage starts.
2. ``unet``: every training mask encoded once (posterior mean, EMA autoencoder) and scaled to unit
   variance (``scale_factor = 1 / std``); the UNet learns the rectified-flow velocity
   (`maisi2.flow`; L1 as the official code, or ``flow.loss=l2``) -- or, with ``objective=ddpm`` in
   the config, the release's DDPM noise prediction -- conditioned on each mask's own size vector.
3. ``export``: a mask-generator folder (`files.save_mask_generator`) with the EMA weights, the size
   scale (largest volume of each slot in the training masks) and the training masks' size vectors
   as the table that completes requests.

The masks: a datalist (the ``label`` of every row; `maisi2 phantom --count` writes one, imported
real masks can be added) brought to the generator's grid (nearest resampling to
``spacing_mm``, centre pad/crop to the mask shape). Rows of fold ``holdout_fold`` are held out
for measuring the generator and never trained on.

Usage::

    train_mask_generator("phantoms/datalist.jsonl", "runs/maskgen", get_mask_config("small"))
    # -> runs/maskgen/autoencoder/last.pt, runs/maskgen/unet/last.pt, runs/maskgen/model/
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from maisi2 import ddpm, flow, losses, volume_io
from maisi2 import labels as L
from maisi2.checkpoint import load_checkpoint
from maisi2.errors import InvalidInput
from maisi2.maskgen import networks
from maisi2.maskgen.config import MaskGenConfig
from maisi2.maskgen.files import save_mask_generator
from maisi2.maskgen.sizes import SizeScale, SizeTable, slot_volumes_ml
from maisi2.nets import mask_to_bitplanes
from maisi2.training import (LAST, BatchSource, Recipe, TrainSettings, dist_info, distributed, say, shuffled_batches,
                             train)

__all__ = ["MaskRecipe", "MaskLibrary", "load_library", "mask_on_grid", "autoencoder_loss", "autoencoder_dice",
           "ema_decay_for", "train_mask_generator", "STAGES"]

STAGES = ("autoencoder", "unet", "export")


@dataclass(frozen=True)
class MaskRecipe(Recipe):
    """How to train the two networks (serialised into every checkpoint). ``train`` holds the
    engine settings both stages share (warmup, ema_decay, ckpt_every, seed, ...; flat
    ``--recipe-set ckpt_every=100`` still works); each stage sets its own steps and lr."""

    PER_STAGE = {"steps": "autoencoder_steps, unet_steps", "lr": "autoencoder_lr, unet_lr"}

    autoencoder_steps: int = 2000
    # 1e-3, not the 2e-4 of the CT networks: these autoencoders are small (tiny 85 k, small 0.8 M
    # parameters) and must separate ~60 classes; overfitting one phantom mask at the tiny preset
    # reached a hard Dice of 0.89 in 400 steps at 1e-3 but 0.28 at 2e-4
    # (experiments/mask_autoencoder_overfit.py, docs/notes.md session 13).
    autoencoder_lr: float = 1e-3
    autoencoder_batch: int = 2
    autoencoder_crop: int = 0  # >0: train on random cubes of this side (the network is convolutional; CPU-sized steps)
    kl_weight: float = 1e-6
    dice_weight: float = 1.0
    unet_steps: int = 4000
    unet_lr: float = 2e-4
    unet_batch: int = 4
    holdout_fold: int = 0  # -1: train on every row
    train: TrainSettings = field(default_factory=lambda: TrainSettings(warmup=50, ckpt_every=250))

    def __post_init__(self) -> None:
        self.check_per_stage()

    @classmethod
    def from_overrides(cls, overrides: Sequence[str] = ()) -> "MaskRecipe":
        return cls().with_overrides(overrides)

    def settings(self, stage: str, device: str, progress: bool | None) -> TrainSettings:
        steps, lr = ((self.autoencoder_steps, self.autoencoder_lr) if stage == "autoencoder"
                     else (self.unet_steps, self.unet_lr))
        # the EMA decay capped for short runs (`ema_decay_for`)
        return dataclasses.replace(self.train, steps=steps, lr=lr, warmup=min(self.train.warmup, steps - 1),
                                   ema_decay=ema_decay_for(self.train.ema_decay, steps),
                                   seed=self.train.seed * 31 + STAGES.index(stage), device=device, progress=progress)


def ema_decay_for(decay: float, steps: int) -> float:
    """The EMA decay a run of `steps` uses: `decay`, at most 1 - 10/steps.

    The engine's EMA starts from the initial (random) weights, which still weigh decay**steps at
    the end: 0.999**1500 = 22 % in the first tiny run, whose exported autoencoder and UNet were a
    fifth untrained. With the cap they weigh at most e**-10.
    """
    return 0.0 if decay <= 0 else min(decay, max(1.0 - 10.0 / max(steps, 1), 0.0))


# -- the masks ----------------------------------------------------------------------------------

@dataclass
class MaskLibrary:
    """Masks on the generator's grid with their slot volumes (mL)."""

    masks: list[np.ndarray]  # (X, Y, Z) int16 MAISI ids each
    volumes_ml: np.ndarray  # (N, 10)
    paths: list[str]

    def __len__(self) -> int:
        return len(self.masks)


def mask_on_grid(volume: volume_io.Volume, cfg: MaskGenConfig) -> np.ndarray:
    """A label map resampled (nearest) to the generator's spacing and centre-padded/cropped to its shape."""
    from maisi2.data import center_pad_or_crop

    volume = volume_io.resample_to_spacing(volume, [cfg.spacing_mm] * 3, order=0)
    return center_pad_or_crop(volume.array, cfg.mask_shape, fill=L.BACKGROUND).astype(np.int16)


def load_library(datalist: str | Path, cfg: MaskGenConfig, folds: str = "train", holdout_fold: int = 0) -> MaskLibrary:
    """The datalist's label maps on the generator's grid; `folds` "train" (all but the held-out
    fold), "holdout" (only it) or "all"."""
    from maisi2.data import read_datalist

    items = [it for it in read_datalist(datalist) if it.label is not None]
    if folds == "train":
        items = [it for it in items if it.fold != holdout_fold]
    elif folds == "holdout":
        items = [it for it in items if it.fold == holdout_fold]
    elif folds != "all":
        raise InvalidInput(f"folds must be 'train', 'holdout' or 'all', got {folds!r}")
    if not items:
        raise InvalidInput(f"{datalist} has no label maps in the {folds!r} folds (holdout fold {holdout_fold}); "
                         "the mask generator trains on label maps (`maisi2 phantom --count N` writes a set)")
    masks = [mask_on_grid(volume_io.load_label_map(it.label), cfg) for it in items]
    spacing = [cfg.spacing_mm] * 3
    volumes = np.stack([slot_volumes_ml(m, spacing) for m in masks])
    return MaskLibrary(masks, volumes, [str(it.label) for it in items])


class _Masks(torch.utils.data.Dataset):
    def __init__(self, masks: list[np.ndarray]):
        self.masks = masks

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.masks[i].astype(np.int64))[None]


class _Latents(torch.utils.data.Dataset):
    def __init__(self, latents: torch.Tensor, sizes: torch.Tensor):
        self.latents, self.sizes = latents, sizes

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.latents[i], self.sizes[i]


# -- losses -------------------------------------------------------------------------------------

def autoencoder_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Cross-entropy + dice_weight x (1 - mean soft Dice over the classes present in the batch).

    logits: (B, 125, X, Y, Z); target: (B, X, Y, Z) class indices.
    """
    ce = F.cross_entropy(logits.float(), target)
    probs = logits.float().softmax(dim=1)
    present = torch.unique(target)
    onehot = (target[:, None] == present.view(1, -1, 1, 1, 1)).float()
    p = probs[:, present]
    dims = (0, 2, 3, 4)
    dice = (2 * (p * onehot).sum(dims) + 1e-5) / (p.sum(dims) + onehot.sum(dims) + 1e-5)
    loss = ce + dice_weight * (1 - dice.mean())
    return loss, {"ce": float(ce.detach()), "dice": float(dice.mean().detach())}


def _random_crop(labels: torch.Tensor, side: int, generator: torch.Generator) -> torch.Tensor:
    """One random cube of `side` voxels (the same for the batch; offsets from `generator`), or all."""
    if side <= 0 or all(n <= side for n in labels.shape[2:]):
        return labels
    starts = [int(torch.randint(0, max(n - side, 0) + 1, (1,), generator=generator, device=generator.device))
              for n in labels.shape[2:]]
    return labels[(slice(None), slice(None), *(slice(s, s + side) for s in starts))]


def _training_forward(self, bits: torch.Tensor, eps: torch.Tensor):
    """(8 bit-planes, latent noise) -> (class logits, z_mu, z_sigma): encode, sample with the given
    noise (drawn from the engine's generator, so resuming stays exact), decode."""
    z_mu, z_sigma = self.encode(bits)
    return self.decode(z_mu + z_sigma * eps), z_mu, z_sigma


@functools.lru_cache(maxsize=None)
def _training_class(base: type) -> type:
    return type(f"{base.__name__}Training", (base,), {"forward": _training_forward})


def with_training_forward(autoencoder: nn.Module) -> nn.Module:
    """The autoencoder with `_training_forward` as its forward (its class swapped in place, as
    `fastops.accelerate` does: same parameters and keys), so a training step is one forward call,
    which DistributedDataParallel needs to synchronise the gradients."""
    autoencoder.__class__ = _training_class(type(autoencoder))
    return autoencoder


class _AutoencoderStep:
    def __init__(self, recipe: MaskRecipe, cfg: MaskGenConfig):
        self.recipe, self.factor = recipe, cfg.autoencoder.downsample_factor
        self.channels = cfg.autoencoder.latent_channels

    def latent_shape(self, labels: torch.Tensor) -> tuple[int, ...]:
        return (labels.shape[0], self.channels, *(n // self.factor for n in labels.shape[2:]))

    def __call__(self, model: nn.Module, labels: torch.Tensor, generator: torch.Generator):
        from maisi2.train_vae import kl_loss

        device = next(model.parameters()).device
        labels = _random_crop(labels, self.recipe.autoencoder_crop, generator).to(device)
        eps = torch.randn(self.latent_shape(labels), generator=generator, device=generator.device).to(device)
        logits, z_mu, z_sigma = model(mask_to_bitplanes(labels), eps)  # one forward call: DDP syncs there
        target = torch.from_numpy(L.ids_to_channels(labels[:, 0].cpu().numpy())).to(device)
        loss, logs = autoencoder_loss(logits, target, self.recipe.dice_weight)
        kl = kl_loss(z_mu, z_sigma)
        return loss + self.recipe.kl_weight * kl, {**logs, "kl": float(kl.detach())}


class _UNetStep:
    def __init__(self, cfg: MaskGenConfig):
        self.cfg = cfg

    def __call__(self, model: nn.Module, batch, generator: torch.Generator):
        x0, sizes = batch
        device = next(model.parameters()).device
        x0, sizes = x0.to(device), sizes.to(device)
        noise = torch.randn(x0.shape, generator=generator, device=generator.device).to(device)
        if self.cfg.objective == "ddpm":
            t = ddpm.sample_ddpm_training_t(x0.shape[0], generator=generator)
            x_t = ddpm.ddpm_add_noise(x0, noise, t.to(device))
            out = networks.predict(model, x_t, t.float(), sizes)
            return losses.flow_loss(out, ddpm.ddpm_training_target(x0, noise, t), form=self.cfg.flow.loss), {}
        t = flow.sample_training_t(x0.shape[0], x0.shape[2:], self.cfg.flow, generator=generator)
        x_t = flow.add_noise(x0, noise, t.to(device), self.cfg.flow.num_train_timesteps)
        v = networks.predict(model, x_t, t, sizes)
        return losses.flow_loss(v, flow.velocity_target(x0, noise), form=self.cfg.flow.loss), {}


# -- the stages ---------------------------------------------------------------------------------

def _ema_network(kind: str, cfg: MaskGenConfig, path: Path, device) -> nn.Module:
    ckpt = load_checkpoint(path)
    if ckpt.kind != kind or ckpt.config != cfg:
        raise InvalidInput(f"{path} is not a {kind} checkpoint of this mask-generator config; "
                         "train with the same --preset/--set options, or choose another output folder")
    build = networks.build_mask_autoencoder if kind == "mask_autoencoder" else networks.build_mask_unet
    net = build(cfg, device=device)
    net.load_state_dict(ckpt.weights(prefer_ema=True))
    return net.eval()


def autoencoder_dice(autoencoder: nn.Module, masks: Sequence[np.ndarray], device="cpu") -> dict[str, float]:
    """How well the autoencoder gives masks back (posterior mean, argmax), in hard Dice over the
    generator's classes: ``mean`` over every (mask, non-background class present) pair, and per
    organ slot and the body averaged over the masks holding them."""
    from maisi2.maskgen.measure import label_dice
    from maisi2.maskgen.sizes import ORGAN_SLOTS

    named = {name: L.MASK_GENERATOR_CHANNEL_IDS.index(L.label_id(name)) for name in (*ORGAN_SLOTS, "body")}
    every, per_name = [], {name: [] for name in named}
    for mask in masks:
        labels = torch.from_numpy(np.asarray(mask, dtype=np.int64))[None, None].to(device)
        got = networks.reconstruct_classes(autoencoder, labels).numpy()
        dice = label_dice(got, L.ids_to_channels(mask))
        every.extend(dice.values())
        for name, channel in named.items():
            if channel in dice:
                per_name[name].append(dice[channel])
    out = {"mean": float(np.mean(every)) if every else float("nan")}
    out.update({name: float(np.mean(v)) for name, v in per_name.items() if v})
    return out


@torch.no_grad()
def _encode_library(autoencoder: nn.Module, library: MaskLibrary, device) -> tuple[torch.Tensor, float]:
    latents = torch.cat([networks.encode_masks(autoencoder, torch.from_numpy(m.astype(np.int64))[None, None].to(device))
                         for m in library.masks]).cpu()
    return latents, float(1.0 / latents.std().clamp_min(1e-6))


def train_mask_generator(datalist: str | Path, out_dir: str | Path, cfg: MaskGenConfig,
                         recipe: MaskRecipe = MaskRecipe(), stages: Sequence[str] = STAGES, resume: bool = False,
                         device: str = "auto", progress: bool | None = None) -> dict[str, Path]:
    """Run the stages (see the module docstring) into ``out_dir``; returns what each wrote."""
    from maisi2.nets import resolve_device

    unknown = set(stages) - set(STAGES)
    if unknown or not stages:
        raise InvalidInput(f"stages must be a non-empty subset of {', '.join(STAGES)}; got {list(stages)}")
    if cfg.objective == "ddpm" and cfg.preset == "maisi-v2":
        say(dist_info(), "training the release-size mask generator: expect days on a GPU, not a CPU run")
    if recipe.autoencoder_crop % cfg.autoencoder.downsample_factor:
        raise InvalidInput(f"autoencoder_crop must be a multiple of {cfg.autoencoder.downsample_factor} (the "
                         f"autoencoder's downsampling), got {recipe.autoencoder_crop}")
    out_dir = Path(out_dir)
    library = load_library(datalist, cfg, "train", recipe.holdout_fold)
    scale = SizeScale.from_volumes(library.volumes_ml)
    sizes = torch.from_numpy(scale.sizes(library.volumes_ml))
    extra = {"recipe": recipe.to_json(), "datalist": str(datalist), "masks": len(library)}
    done: dict[str, Path] = {}
    with distributed(device):
        if "autoencoder" in stages:
            say(dist_info(), f"mask autoencoder: {len(library)} masks on a {cfg.mask_shape} grid of {cfg.spacing_mm} mm")
            torch.manual_seed(recipe.train.seed)
            source = BatchSource(_Masks(library.masks),
                                 plan=lambda g: shuffled_batches(len(library), recipe.autoencoder_batch, g,
                                                                 dist_info().rank, dist_info().world_size))
            autoencoder = with_training_forward(networks.build_mask_autoencoder(cfg))
            result = train(autoencoder, _AutoencoderStep(recipe, cfg), source,
                           recipe.settings("autoencoder", device, progress), out_dir / "autoencoder",
                           kind="mask_autoencoder", config=cfg, resume=resume, extra=extra)
            done["autoencoder"] = result.checkpoint
        if "unet" in stages or "export" in stages:
            ae = _ema_network("mask_autoencoder", cfg, out_dir / "autoencoder" / LAST, resolve_device(device))
        if "unet" in stages:
            latents, scale_factor = _encode_library(ae, library, resolve_device(device))
            dice = autoencoder_dice(ae, library.masks, resolve_device(device))
            say(dist_info(), "mask autoencoder (EMA) gives the training masks back with a hard Dice of "
                f"{dice['mean']:.3f} (mean over classes present); " + ", ".join(
                    f"{k} {v:.2f}" for k, v in dice.items() if k != "mean"))
            say(dist_info(), f"mask UNet ({cfg.objective}): {len(library)} latents of {tuple(latents.shape[1:])}, "
                 f"scale factor {scale_factor:.4g}")
            torch.manual_seed(recipe.train.seed + 1)
            source = BatchSource(_Latents(latents * scale_factor, sizes),
                                 plan=lambda g: shuffled_batches(len(library), recipe.unet_batch, g,
                                                                 dist_info().rank, dist_info().world_size))
            result = train(networks.build_mask_unet(cfg), _UNetStep(cfg), source,
                           recipe.settings("unet", device, progress), out_dir / "unet", kind="mask_unet", config=cfg,
                           scale_factor=scale_factor, resume=resume, extra=extra)
            done["unet"] = result.checkpoint
        if "export" in stages and dist_info().is_main:
            unet = _ema_network("mask_unet", cfg, out_dir / "unet" / LAST, "cpu")
            scale_factor = load_checkpoint(out_dir / "unet" / LAST).scale_factor
            metadata = {"trained_on": library.paths, "recipe": recipe.to_dict()}
            done["export"] = save_mask_generator(out_dir / "model", cfg, ae.cpu(), unet, scale_factor, scale,
                                                 SizeTable(sizes.numpy(), "training masks"), metadata, overwrite=True)
    return done
