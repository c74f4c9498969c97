"""Training a VAE (``tiny`` / ``small`` presets) on random crops, on the generic engine.

One step, for a batch of random crops x in [0, 1] (`data.hu_to_unit`):

1. Encode to (z_mu, z_sigma), draw z = z_mu + eps * z_sigma with eps from the engine's noise RNG
   (so resuming is exact), decode to the reconstruction.
2. L = L1(recon, x) + kl_weight * KL  (`reconstruction_l1`, `kl_loss`).
3. Optional patch-adversarial term (off by default; ``adv_weight > 0`` turns it on): a small 3D
   PatchGAN scores patches of x and of the reconstruction. From step ``adv_start`` on,
   L += adv_weight * L_G + L_D, where L_G is the VAE's adversarial loss computed through a
   *frozen copy* of the discriminator's weights and L_D the discriminator's loss on a *detached*
   reconstruction. Each term therefore moves only its own network, so one optimiser and one
   backward pass (what the engine does) train the pair as two alternating optimisers would.

Outputs in the run folder: ``last.pt`` (the engine's resumable state; its weights are the
training module's, i.e. ``vae.*`` and ``discriminator.*`` keys), ``vae.pt`` (a plain "vae"
checkpoint: VAE weights and their EMA only, what `maisi2 encode --vae` and generation take) and
``log.csv``.

The ``maisi-v2`` preset is refused unless forced: the paper reuses the released VAE unchanged
(`maisi2 encode --vae autoencoder_v1.pt`), and training one that size needs GPUs and real data.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from maisi2.checkpoint import Checkpoint, load_checkpoint, load_weights, save_checkpoint
from maisi2.config import Config
from maisi2.data import HU_MIN, CTDataset, DataItem, center_pad_or_crop, hu_to_unit, read_datalist
from maisi2.errors import InvalidInput
from maisi2.labels import TUMOR_IDS
from maisi2.losses import mask_weights
from maisi2.training import LAST, BatchSource, TrainSettings, dist_info, train
from maisi2.autoencoder import downsample_factor
from maisi2.models import read_network, vae_state_only

__all__ = ["reconstruction_l1", "kl_loss", "generator_adversarial_loss", "discriminator_loss", "build_discriminator",
           "discriminator_logits", "freeze_encoder", "ADVERSARIAL_KINDS", "VAETrainOptions", "RandomCrops", "crop_plan",
           "VAETrainingModel", "StepClock", "make_vae_loss",
           "export_vae", "TrainVAEResult", "train_vae", "VAE_FILE"]

VAE_FILE = "vae.pt"
ADVERSARIAL_KINDS = ("hinge", "lsgan")


# -- the training terms (pure functions of tensors) and the discriminator ------------------------
# L1 reconstruction and KL; the patch-adversarial pair (hinge or least-squares). No perceptual
# loss: MAISI's uses pretrained feature networks whose weights cannot be downloaded here.

def reconstruction_l1(recon: torch.Tensor, image: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean absolute error between reconstruction and input (both in [0, 1] units); with a per-voxel
    `weight` (broadcastable to the image), the weighted mean sum(w |r - x|) / sum(w)."""
    err = (recon.float() - image.float()).abs()
    if weight is None:
        return err.mean()
    weight = weight.float().expand_as(err)
    return (err * weight).sum() / weight.sum()


def freeze_encoder(vae: nn.Module) -> nn.Module:
    """Leave only the decoder side trainable (``post_quant_conv`` and ``decoder``): the encoder, and
    so every latent already cached with it, stays exactly as it is."""
    for name, param in vae.named_parameters():
        param.requires_grad_(name.startswith(("decoder.", "post_quant_conv.")))
    return vae


def kl_loss(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) summed over latent voxels and channels, averaged over the batch.

    0.5 * sum(mu^2 + sigma^2 - log(sigma^2) - 1); zero exactly when mu = 0 and sigma = 1.
    """
    mu, sigma = z_mu.float(), z_sigma.float()
    per_voxel = mu.pow(2) + sigma.pow(2) - 2.0 * torch.log(sigma.clamp_min(1e-12)) - 1.0
    return 0.5 * per_voxel.flatten(1).sum(dim=1).mean()


def _check_kind(kind: str) -> None:
    if kind not in ADVERSARIAL_KINDS:
        raise InvalidInput(f"adversarial loss must be one of {', '.join(ADVERSARIAL_KINDS)}, got {kind!r}")


def generator_adversarial_loss(fake_logits: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """What the VAE (generator) minimises so its reconstructions look real to the discriminator.

    hinge: -mean(D(fake)); lsgan: mean((D(fake) - 1)^2).
    """
    _check_kind(kind)
    fake_logits = fake_logits.float()
    return -fake_logits.mean() if kind == "hinge" else (fake_logits - 1.0).pow(2).mean()


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """What the discriminator minimises (fake logits must come from a detached reconstruction).

    hinge: 0.5 * (mean(relu(1 - D(real))) + mean(relu(1 + D(fake))));
    lsgan: 0.5 * (mean((D(real) - 1)^2) + mean(D(fake)^2)).
    """
    _check_kind(kind)
    real_logits, fake_logits = real_logits.float(), fake_logits.float()
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())
    return 0.5 * ((real_logits - 1.0).pow(2).mean() + fake_logits.pow(2).mean())


def build_discriminator(channels: int = 16, num_layers: int = 3, in_channels: int = 1) -> nn.Module:
    """A small 3D PatchGAN (MONAI `PatchDiscriminator`): one logit per overlapping patch.

    Instance norm, not batch norm: VAE batches are tiny (often 1) and batch statistics of one
    sample make the discriminator's real/fake decision depend on the batch, not the patch.
    """
    from monai.networks.nets import PatchDiscriminator

    return PatchDiscriminator(spatial_dims=3, channels=channels, in_channels=in_channels, out_channels=1,
                              num_layers_d=num_layers, norm="INSTANCE")


def discriminator_logits(discriminator: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """Patch logits (B, 1, x, y, z): MONAI's discriminator returns every layer's features, last = logits."""
    out = discriminator(image)
    return out[-1] if isinstance(out, (list, tuple)) else out



@dataclass(frozen=True)
class VAETrainOptions:
    """What the VAE learns from and how its loss is built (stored in every checkpoint).

    patch: crop size (X, Y, Z), multiples of the VAE factor (4); smaller volumes are padded with air.
    batch_size: crops per step. spacing: resample scans to this voxel size (mm) first; None keeps each
      scan's own. kl_weight: weight of the KL term (small: the latent should stay informative).
    adv_weight: weight of the VAE's adversarial loss; 0 (default) leaves the discriminator out.
    adv_start: first step at which the adversarial terms count (the reconstruction settles first).
    adv_loss: "hinge" or "lsgan". disc_channels / disc_layers: size of the PatchGAN.
    cache_volumes: loaded volumes kept in memory per data process (each step crops from them).
    decoder_only: fine-tune only the decoder of an `init` VAE on its posterior means (no KL): the
      encoder, hence every latent cached with it and every flow model trained on them, stay valid.
    region_weight: voxels of `region_labels` (default: every tumour label) weigh this much in the L1
      (a weighted mean, as the ControlNet's region weights); 1 leaves them as any voxel. A small,
      low-contrast tumour is a few hundredths of a percent of a crop's L1 and is otherwise averaged
      away (measured: the small VAE reconstructs a -25 HU hepatic tumour at +1 HU).
    region_crops: share of crops centred (with jitter) on a region voxel, for scans that have one.
    Region settings need label maps in the datalist.
    """

    patch: tuple[int, int, int] = (64, 64, 64)
    batch_size: int = 1
    spacing: tuple[float, float, float] | None = None
    kl_weight: float = 1e-6
    adv_weight: float = 0.0
    adv_start: int = 0
    adv_loss: str = "hinge"
    disc_channels: int = 16
    disc_layers: int = 3
    cache_volumes: int = 32
    decoder_only: bool = False
    region_weight: float = 1.0
    region_labels: tuple[int, ...] | None = None
    region_crops: float = 0.0

    def __post_init__(self) -> None:
        checks = [
            (len(self.patch) == 3 and all(int(p) >= 4 and int(p) % 4 == 0 for p in self.patch),
             f"patch must be three multiples of 4 (the VAE's downsampling), got {tuple(self.patch)}"),
            (self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}"),
            (self.spacing is None or (len(self.spacing) == 3 and all(s > 0 for s in self.spacing)),
             f"spacing must be three positive numbers (mm), got {self.spacing}"),
            (self.kl_weight >= 0, f"kl_weight must be >= 0, got {self.kl_weight}"),
            (self.adv_weight >= 0, f"adv_weight must be >= 0 (0: no adversarial term), got {self.adv_weight}"),
            (self.adv_start >= 0, f"adv_start must be >= 0, got {self.adv_start}"),
            (self.adv_loss in ADVERSARIAL_KINDS,
             f"adv_loss must be one of {', '.join(ADVERSARIAL_KINDS)}, got {self.adv_loss!r}"),
            (self.disc_channels >= 1 and self.disc_layers >= 1, "disc_channels and disc_layers must be at least 1"),
            (self.cache_volumes >= 1, f"cache_volumes must be at least 1, got {self.cache_volumes}"),
            (self.region_weight >= 1, f"region_weight must be >= 1 (1: no extra weight), got {self.region_weight}"),
            (0 <= self.region_crops <= 1, f"region_crops must be a share in [0, 1], got {self.region_crops}"),
            (self.region_labels is None or len(self.region_labels) > 0, "region_labels must not be empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidInput(message)

    @property
    def adversarial(self) -> bool:
        return self.adv_weight > 0

    @property
    def region_ids(self) -> tuple[int, ...] | None:
        """The label ids of the weighted region, or None when no region setting is on."""
        if self.region_weight == 1 and self.region_crops == 0:
            return None
        return tuple(self.region_labels) if self.region_labels is not None else TUMOR_IDS

    def to_dict(self) -> dict:
        d = asdict(self)
        d["patch"] = list(self.patch)
        d["spacing"] = None if self.spacing is None else list(self.spacing)
        d["region_labels"] = None if self.region_labels is None else list(self.region_labels)
        return d


# -- data: random crops, positions drawn from the engine's data RNG ---------------------------

class RandomCrops(torch.utils.data.Dataset):
    """Crops of the datalist's scans, addressed by ``crop_seed * n_volumes + volume``.

    The index carries everything random about the crop (which scan, where), so the engine's
    planner owns the randomness (exact resume) and data workers need no RNG of their own.
    Items: {"image": (1, *patch) float32 in [0, 1]}, plus {"region": (1, *patch) bool} (voxels
    whose label is one of `region_ids`) when `region_ids` is given; then a share `region_crops`
    of the crops of a scan with region voxels is centred on one of them, give or take a quarter patch.
    """

    def __init__(self, items: Sequence[DataItem], patch: Sequence[int], spacing=None, cache_volumes: int = 32,
                 region_ids: Sequence[int] | None = None, region_crops: float = 0.0):
        if not items:
            raise InvalidInput("no scans to crop from")
        if region_ids is not None:
            unlabelled = [str(item.image) for item in items if item.label is None]
            if unlabelled:
                raise InvalidInput(f"region weights and region crops need a label map for every scan; "
                                 f"{len(unlabelled)} have none (first: {unlabelled[0]}): add a 'label' column")
        self.region_ids = None if region_ids is None else np.asarray(sorted(region_ids))
        self.region_crops = float(region_crops)
        self.volumes = CTDataset(items, spacing=spacing, shape=None, divisor=1, load_labels=region_ids is not None)
        self.patch = tuple(int(p) for p in patch)
        self.cache_volumes = cache_volumes
        self._cache: OrderedDict[int, tuple] = OrderedDict()

    @property
    def n_volumes(self) -> int:
        return len(self.volumes)

    def __len__(self) -> int:
        return self.n_volumes

    def volume(self, index: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Scan `index` in [0, 1], padded with air (centred) to at least the patch size; with
        region ids also its region mask and the coordinates of the region's voxels."""
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        item = self.volumes[index]
        image = item["image"][0].numpy()
        shape = [max(n, p) for n, p in zip(image.shape, self.patch)]
        image = center_pad_or_crop(image, shape, float(hu_to_unit(np.float32(HU_MIN))))
        region = voxels = None
        if self.region_ids is not None:
            region = center_pad_or_crop(np.isin(item["label"][0].numpy(), self.region_ids), shape, False)
            voxels = np.argwhere(region)
        self._cache[index] = (image, region, voxels)
        while len(self._cache) > self.cache_volumes:
            self._cache.popitem(last=False)
        return self._cache[index]

    def __getitem__(self, index: int) -> dict:
        seed, which = divmod(int(index), self.n_volumes)
        image, region, voxels = self.volume(which)
        rng = np.random.default_rng(seed)
        corner = [int(rng.integers(0, n - p + 1)) for n, p in zip(image.shape, self.patch)]
        if voxels is not None and len(voxels) and rng.random() < self.region_crops:
            centre = voxels[rng.integers(len(voxels))]
            corner = [int(np.clip(c - p // 2 + rng.integers(-(p // 4), p // 4 + 1), 0, n - p))
                      for c, n, p in zip(centre, image.shape, self.patch)]
        box = tuple(slice(c, c + p) for c, p in zip(corner, self.patch))
        out = {"image": torch.from_numpy(np.ascontiguousarray(image[box], dtype=np.float32))[None]}
        if region is not None:
            out["region"] = torch.from_numpy(np.ascontiguousarray(region[box]))[None]
        return out


def crop_plan(n_volumes: int, batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """One epoch: every scan once (more often when there are fewer scans than a batch per rank),
    in a shuffled order, each with a fresh crop seed; this rank's share under data parallelism."""
    info = dist_info()
    per_rank = max(-(-n_volumes // info.world_size), batch_size)
    repeats = -(-per_rank * info.world_size // n_volumes)
    order = torch.cat([torch.randperm(n_volumes, generator=generator) for _ in range(repeats)])
    seeds = torch.randint(0, 2**31 - 1, (len(order),), generator=generator)
    indices = (seeds * n_volumes + order).tolist()
    shard = indices[info.rank::info.world_size][:per_rank]
    return [shard[i:i + batch_size] for i in range(0, len(shard), batch_size)]


# -- the model the engine trains, and its loss --------------------------------------------------

class VAETrainingModel(nn.Module):
    """The VAE plus, with the adversarial term on, its discriminator: one module for the engine.

    forward(image, eps) runs everything a step needs inside one call (so data-parallel gradient
    sync sees every parameter used) and returns the tensors the loss is made of. With
    `decoder_only` the (frozen) encoder runs without gradients and the decoder gets the posterior
    mean, the latent `maisi2 encode` caches and generation produces.
    """

    def __init__(self, vae: nn.Module, discriminator: nn.Module | None = None, decoder_only: bool = False):
        super().__init__()
        self.vae = freeze_encoder(vae) if decoder_only else vae
        self.discriminator = discriminator
        self.decoder_only = decoder_only

    def forward(self, image: torch.Tensor, eps: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.decoder_only:
            with torch.no_grad():
                z_mu, z_sigma = self.vae.encode(image)
            recon = self.vae.decode(z_mu)
        else:
            z_mu, z_sigma = self.vae.encode(image)
            recon = self.vae.decode(z_mu + eps * z_sigma)
        out = {"recon": recon, "z_mu": z_mu, "z_sigma": z_sigma}
        if self.discriminator is not None:
            # The VAE's adversarial loss must not train the discriminator: score the reconstruction
            # with detached copies of its weights (gradients reach the VAE only) ...
            frozen = {k: v.detach() for k, v in self.discriminator.state_dict(keep_vars=True).items()}
            out["fake_logits_g"] = discriminator_logits(
                lambda x: torch.func.functional_call(self.discriminator, frozen, (x,)), recon)
            # ... and the discriminator's loss must not train the VAE: a detached reconstruction.
            out["real_logits"] = discriminator_logits(self.discriminator, image)
            out["fake_logits_d"] = discriminator_logits(self.discriminator, recon.detach())
        return out


class StepClock:
    """The engine's step, fed by its on_batch hook (the loss needs it for adv_start)."""

    def __init__(self):
        self.step = 0

    def __call__(self, step: int, batch) -> None:
        self.step = step


def make_vae_loss(options: VAETrainOptions, clock: StepClock | None = None):
    """The engine's loss_fn(model, batch, generator) -> (loss, logs) for a `VAETrainingModel`."""

    def loss_fn(model: nn.Module, batch: dict, generator: torch.Generator):
        device = next(model.parameters()).device
        image = batch["image"].to(device, non_blocking=True)
        latent_shape = _latent_shape(model, image)
        eps = torch.randn(latent_shape, generator=generator, device=device)
        out = model(image, eps)
        weight = None
        if "region" in batch and options.region_weight != 1:
            weight = mask_weights(batch["region"].to(device, non_blocking=True), options.region_weight)
        l_rec = reconstruction_l1(out["recon"], image, weight)
        l_kl = kl_loss(out["z_mu"], out["z_sigma"])
        # decoder_only: the KL has no trainable input, so it is logged but not added
        loss = l_rec if options.decoder_only else l_rec + options.kl_weight * l_kl
        logs = {"recon_l1": l_rec.detach(), "kl": l_kl.detach()}
        if "real_logits" in out:
            step = clock.step if clock is not None else 0
            # Before adv_start the terms are computed but weighted 0, so every parameter takes part
            # in every backward (data parallelism requires it) while the adversarial terms do nothing.
            on = 1.0 if step >= options.adv_start else 0.0
            l_g = generator_adversarial_loss(out["fake_logits_g"], options.adv_loss)
            l_d = discriminator_loss(out["real_logits"], out["fake_logits_d"], options.adv_loss)
            loss = loss + on * (options.adv_weight * l_g + l_d)
            logs.update(adv_g=l_g.detach(), adv_d=l_d.detach(), adv_on=on)
        return loss, logs

    return loss_fn


def _latent_shape(model: nn.Module, image: torch.Tensor) -> tuple[int, ...]:
    inner = getattr(model, "module", model)  # a DistributedDataParallel wrapper holds the model in .module
    vae = inner.vae
    factor = downsample_factor(vae)
    return (image.shape[0], vae.latent_channels, *(n // factor for n in image.shape[2:]))


# -- the run ---------------------------------------------------------------------------------

def _check_preset(cfg: Config, force: bool) -> None:
    if cfg.preset == "maisi-v2" and not force:
        raise InvalidInput(
            "the maisi-v2 preset uses the released MAISI VAE unchanged (as the paper does): pass "
            "autoencoder_v1.pt to `maisi2 encode --vae` instead of training one. Train a VAE for the "
            "tiny or small preset (--preset tiny|small), or pass --force to train/fine-tune a "
            "released-size VAE anyway (needs a GPU and real data; --init autoencoder_v1.pt fine-tunes it)"
        )


def _check_patch_fits(discriminator: nn.Module, patch: Sequence[int], layers: int) -> None:
    try:
        with torch.no_grad():
            discriminator_logits(discriminator, torch.zeros(1, 1, *patch))
    except (RuntimeError, ValueError) as err:
        raise InvalidInput(f"the patch {tuple(patch)} is too small for a discriminator with {layers} layers "
                         f"({err}); use a larger --patch or fewer --adv-layers") from None


def _check_same_options(out_dir: Path, options: VAETrainOptions) -> None:
    last = out_dir / LAST
    if not last.is_file():
        return
    saved = load_checkpoint(last).extra.get("vae_options")
    if saved is not None and saved != options.to_dict():
        changed = sorted(k for k in saved if saved.get(k) != options.to_dict().get(k))
        raise InvalidInput(f"{last} was trained with other VAE options ({', '.join(changed)} differ); resume with "
                         "the same options, or choose another output folder")


def export_vae(last: str | Path, path: str | Path) -> Path:
    """Write a plain "vae" checkpoint (VAE weights and EMA, no discriminator or trainer state)."""
    ckpt = load_checkpoint(last)

    def vae_part(state):
        return None if state is None else vae_state_only(state)

    extra = {k: v for k, v in ckpt.extra.items() if k != "trainer"}
    return save_checkpoint(path, Checkpoint(kind="vae", config=ckpt.config, state_dict=vae_part(ckpt.state_dict),
                                            ema_state_dict=vae_part(ckpt.ema_state_dict), step=ckpt.step, extra=extra))


@dataclass
class TrainVAEResult:
    vae: Path  # out_dir/vae.pt
    last: Path  # out_dir/last.pt (resumable)
    step: int
    rows: list


def train_vae(datalist: str | os.PathLike, out_dir: str | os.PathLike, cfg: Config,
              options: VAETrainOptions = VAETrainOptions(), settings: TrainSettings = TrainSettings(),
              resume: bool = False, force: bool = False, init: str | os.PathLike | None = None,
              num_workers: int = 0) -> TrainVAEResult:
    """Train the VAE of `cfg` on random crops of the datalist's scans; see the module docstring.

    init: start from these VAE weights (a "vae" checkpoint or the released file) instead of random.
    num_workers: data-loading processes (each keeps its own cache of loaded scans).
    """
    from maisi2.nets import build_vae

    # 1. check everything before any work
    _check_preset(cfg, force)
    out_dir = Path(out_dir)
    if resume:
        _check_same_options(out_dir, options)
    if options.decoder_only and init is None:
        raise InvalidInput("decoder-only training fine-tunes the decoder of a trained VAE: give its weights as --init")
    items = read_datalist(datalist)

    # 2. networks, initialised from the seed (two runs with one seed start from the same weights)
    torch.manual_seed(settings.seed)
    vae = build_vae(cfg)
    if init is not None:
        # The init's weights go straight into the network of this run's preset (any file `read_network`
        # knows, a model folder's bare vae.safetensors included); a mismatch names the preset they fit.
        load_weights(vae, read_network(init, "vae").state_dict, "vae", str(init), cfg.preset)
    discriminator = None
    if options.adversarial:
        discriminator = build_discriminator(options.disc_channels, options.disc_layers, cfg.image_channels)
        _check_patch_fits(discriminator, options.patch, options.disc_layers)
    model = VAETrainingModel(vae, discriminator, decoder_only=options.decoder_only)

    # 3. data and loss
    crops = RandomCrops(items, options.patch, options.spacing, options.cache_volumes,
                        region_ids=options.region_ids, region_crops=options.region_crops)
    source = BatchSource(crops, plan=lambda g: crop_plan(crops.n_volumes, options.batch_size, g),
                         num_workers=num_workers)
    clock = StepClock()

    # 4. train, then export the plain VAE checkpoint
    result = train(model, make_vae_loss(options, clock), source, settings, out_dir, kind="vae", config=cfg,
                   resume=resume, extra={"vae_options": options.to_dict()}, on_batch=clock)
    vae_path = out_dir / VAE_FILE
    if dist_info().is_main:
        export_vae(result.checkpoint, vae_path)
    return TrainVAEResult(vae=vae_path, last=result.checkpoint, step=result.step, rows=result.rows)
