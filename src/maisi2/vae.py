"""The VAE side of MAISI: loading a VAE, encoding to the posterior mean (whole or tiled), decoding,
and the VAE training losses.

Images enter the VAE as (B, 1, X, Y, Z) in [0, 1] (`data.hu_to_unit`); every axis must be a
multiple of the VAE's downsampling factor (4 for every preset), and the latent is
(B, 4, X/4, Y/4, Z/4). MONAI's VAE forward returns ``(recon, z_mu, z_sigma)``.

Tiled encoding (`tiled_encode_mean`). A large volume is cut into blocks; each block is encoded
with `overlap` voxels of context on every side and only the latent of its core is kept. With the
overlap at least the encoder's receptive field (`encoder_context`) the convolutions see exactly
what they see in a whole-volume pass. The group norms would not: their statistics are taken per
call, i.e. per block. By default they are therefore measured over the whole volume first (block
by block, one norm at a time) and then held fixed, which makes the tiled latent equal the
whole-volume one up to float rounding (measured on the tiny preset: relative L2 5e-7; per-block
statistics instead: 0.2-0.6). Memory is bounded by one block; the price is more compute (see the
function). Decoding for generation (tiled, memory-budgeted) lives elsewhere; `decode` here is the
plain whole-latent call.

Losses (pure functions of tensors): `reconstruction_l1`, `kl_loss`, and the patch-adversarial
pair `generator_adversarial_loss` / `discriminator_loss` (hinge or least-squares). No perceptual
loss: MAISI's uses pretrained feature networks whose weights cannot be downloaded here.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from maisi2.checkpoint import RELEASED_FILES, load_checkpoint, load_weights, read_torch_file
from maisi2.config import Config, get_config

__all__ = [
    "LoadedVAE",
    "load_vae",
    "encode_mean",
    "tiled_encode_mean",
    "decode",
    "downsample_factor",
    "encoder_context",
    "NORM_STATS",
    "file_fingerprint",
    "vae_state_only",
    "reconstruction_l1",
    "kl_loss",
    "generator_adversarial_loss",
    "discriminator_loss",
    "build_discriminator",
    "discriminator_logits",
    "ADVERSARIAL_KINDS",
    "TILED_ENCODE_TOLERANCE",
    "decoder_only",
]

ADVERSARIAL_KINDS = ("hinge", "lsgan")
# Relative L2 difference, tiled (whole-volume norm statistics, full-context overlap) vs whole-volume
# posterior mean, that tests/test_vae.py accepts; measured 5e-7 on the tiny preset (float rounding).
TILED_ENCODE_TOLERANCE = 1e-5


# -- loading -------------------------------------------------------------------------------

@dataclass
class LoadedVAE:
    """A VAE ready to use, its config, and a short fingerprint of the weights file it came from."""

    model: nn.Module
    config: Config
    fingerprint: str
    source: str
    used_ema: bool


def load_vae(path: str | Path, device: str | torch.device = "cpu", prefer_ema: bool = True) -> LoadedVAE:
    """Load a VAE in eval mode from one of our "vae" checkpoints or the released MAISI-v2 VAE.

    `path` is a maisi2 checkpoint of kind "vae" (EMA weights used when present and `prefer_ema`),
    the released ``autoencoder_v1.pt`` (a plain state dict, loaded into the ``maisi-v2`` preset),
    or a folder holding it.
    """
    path = Path(path)
    if path.is_dir():
        path = path / RELEASED_FILES["vae"]
        if not path.is_file():
            raise FileNotFoundError(f"{path.parent} holds no {RELEASED_FILES['vae']}; pass the VAE checkpoint file")
    data = read_torch_file(path, map_location="cpu")
    if isinstance(data, dict) and data.get("format") == "maisi2":
        ckpt = load_checkpoint(path)
        if ckpt.kind != "vae":
            raise ValueError(f"{path} is a '{ckpt.kind}' checkpoint; --vae needs a VAE checkpoint "
                             "(made by `maisi2 train-vae`, or the released autoencoder_v1.pt)")
        cfg, state, used_ema = ckpt.config, ckpt.weights(prefer_ema), prefer_ema and ckpt.ema_state_dict is not None
        state = vae_state_only(state)
    elif isinstance(data, dict) and data and all(isinstance(v, torch.Tensor) for v in data.values()):
        cfg, state, used_ema = get_config("maisi-v2"), data, False  # the released VAE: maisi-v2 architecture
    else:
        raise ValueError(f"{path} is neither a maisi2 VAE checkpoint nor a VAE state dict")
    from maisi2.nets import build_vae

    model = build_vae(cfg)
    load_weights(model, state, "vae", str(path), cfg.preset)
    model = model.to(device).eval()
    return LoadedVAE(model=model, config=cfg, fingerprint=file_fingerprint(path), source=str(path), used_ema=used_ema)


def vae_state_only(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The VAE weights of a train-vae run state (``vae.*`` beside ``discriminator.*``), else `state`."""
    if state and all(k.startswith(("vae.", "discriminator.")) for k in state):
        return {k[len("vae."):]: v for k, v in state.items() if k.startswith("vae.")}
    return state


def file_fingerprint(path: str | Path) -> str:
    """sha256 of a file's bytes (first 16 hex digits): the identity of a weights file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


# -- encode / decode -----------------------------------------------------------------------

def downsample_factor(vae: nn.Module) -> int:
    """How much the VAE shrinks each axis: 2 per downsampling block of its encoder (4 in every preset)."""
    count = sum(type(block).__name__.endswith("Downsample") for block in vae.encoder.blocks)
    return 2**count


def encoder_context(vae: nn.Module) -> int:
    """Overlap (image voxels, a multiple of the VAE factor) that gives every kept latent voxel of a
    tiled encode its full receptive field: an upper bound on the encoder's receptive-field radius.

    Walks the encoder's convolutions in order: a centred k-kernel at input stride j reaches
    (k-1)/2 * j voxels to each side; an unpadded one (MONAI pads the downsampling conv on one side
    by hand) is counted with its whole reach (k-1) * j. Tiny: 28, small: 28, released VAE: 40.
    """
    reach, stride = 0.0, 1
    for conv in (m for m in vae.encoder.modules() if isinstance(m, nn.Conv3d)):
        k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
        reach += (k - 1) / 2 * stride if p == (k - 1) // 2 and k % 2 else (k - 1) * stride
        stride *= s
    factor = downsample_factor(vae)
    return int(math.ceil(reach / factor) * factor)


def _check_image(vae: nn.Module, image: torch.Tensor) -> int:
    if image.dim() != 5:
        raise ValueError(f"the VAE takes (B, C, X, Y, Z) images, got shape {tuple(image.shape)}")
    factor = downsample_factor(vae)
    if any(n % factor for n in image.shape[2:]):
        raise ValueError(f"every axis must be a multiple of {factor} for the VAE, got {tuple(image.shape[2:])}; "
                         "pad first")
    return factor


@torch.no_grad()
def encode_mean(vae: nn.Module, image: torch.Tensor, tile: int | None = None, overlap: int | None = None,
                norm_stats: str = "volume") -> torch.Tensor:
    """Posterior mean z_mu of `image` (B, 1, X, Y, Z) in [0, 1] -> (B, C, X/f, Y/f, Z/f).

    The mean, not a sample: caching a sample would bake the posterior noise into every training
    target. With `tile` (image voxels) and any axis longer than it, encodes block by block
    (`tiled_encode_mean`), so activation memory stays bounded by one (tile + 2*overlap)^3 block.
    """
    _check_image(vae, image)
    if tile is not None and any(n > tile for n in image.shape[2:]):
        return tiled_encode_mean(vae, image, tile, overlap, norm_stats)
    z_mu, _ = vae.encode(image)
    return z_mu


def _axis_blocks(length: int, tile: int, overlap: int, factor: int) -> list[tuple[int, int, int, int]]:
    """(core_start, core_end, block_start, block_end) along one axis, cores of near-equal size.

    All bounds are multiples of `factor`, so each block's latent lines up with the whole latent.
    """
    units = length // factor
    count = math.ceil(length / tile)
    bounds = [round(i * units / count) * factor for i in range(count + 1)]
    return [(s, e, max(0, s - overlap), min(length, e + overlap)) for s, e in zip(bounds[:-1], bounds[1:])]


@dataclass(frozen=True)
class _Block:
    """One block of a tiled pass: where it is cut from the image and which part of it is kept."""

    cut: tuple[slice, slice, slice]  # image region fed to the encoder (core + context)
    core: tuple[slice, slice, slice]  # the kept part, in the block's own image coordinates
    target: tuple[slice, slice, slice]  # where the kept latent goes, in latent coordinates


def _blocks(shape: tuple[int, ...], tile: int, overlap: int, factor: int) -> list[_Block]:
    axes = [_axis_blocks(n, tile, overlap, factor) for n in shape]
    blocks = []
    for bx in axes[0]:
        for by in axes[1]:
            for bz in axes[2]:
                b = (bx, by, bz)
                blocks.append(_Block(
                    cut=tuple(slice(a[2], a[3]) for a in b),
                    core=tuple(slice(a[0] - a[2], a[1] - a[2]) for a in b),
                    target=tuple(slice(a[0] // factor, a[1] // factor) for a in b),
                ))
    return blocks


NORM_STATS = ("volume", "block")


@torch.no_grad()
def tiled_encode_mean(vae: nn.Module, image: torch.Tensor, tile: int, overlap: int | None = None,
                      norm_stats: str = "volume") -> torch.Tensor:
    """Posterior mean computed on overlapping blocks; each block contributes only its core.

    tile: largest core edge in image voxels; overlap: context voxels added on each side (both
    multiples of the VAE factor; None: `encoder_context`, the full receptive field). The encoder's
    group norms need statistics over the whole volume, which no single block sees:

    * ``norm_stats="volume"`` (default) first measures them block by block, one group norm at a
      time (pass k runs every block up to the k-th norm, with norms 0..k-1 already fixed, and
      sums its input over the block cores), then encodes every block with all of them fixed. The
      result equals a whole-volume pass up to float rounding and the context cut off beyond
      `overlap`; it costs about (number of norms / 2 + 1) tiled passes.
    * ``norm_stats="block"``: each block normalises with its own statistics (one pass; differs
      from the whole-volume latent by tens of percent with untrained weights).
    """
    factor = _check_image(vae, image)
    overlap = encoder_context(vae) if overlap is None else overlap
    if tile < factor or tile % factor or overlap < 0 or overlap % factor:
        raise ValueError(f"tile ({tile}) must be a positive multiple of {factor} and overlap ({overlap}) a "
                         f"non-negative multiple of {factor}")
    if norm_stats not in NORM_STATS:
        raise ValueError(f"norm_stats must be one of {', '.join(NORM_STATS)}, got {norm_stats!r}")
    blocks = _blocks(tuple(image.shape[2:]), tile, overlap, factor)
    if norm_stats == "block":
        return _encode_blocks(vae, image, blocks, factor)
    norms = _FixedGroupNorms(vae.encoder)
    with norms.installed():
        for _ in range(norms.count):
            norms.measure_next(vae.encoder, image, blocks)
        return _encode_blocks(vae, image, blocks, factor, before_block=norms.reset_calls)


def _encode_blocks(vae: nn.Module, image: torch.Tensor, blocks: list[_Block], factor: int,
                   before_block=None) -> torch.Tensor:
    out = None
    everything = (slice(None), slice(None))
    for block in blocks:
        if before_block is not None:
            before_block()
        z_mu, _ = vae.encode(image[(*everything, *block.cut)])
        if out is None:
            out = z_mu.new_zeros((*z_mu.shape[:2], *(n // factor for n in image.shape[2:])))
        core = tuple(slice(s.start // factor, s.stop // factor) for s in block.core)
        out[(*everything, *block.target)] = z_mu[(*everything, *core)]
    return out


class _StopEncoder(Exception):
    """Raised inside the encoder once the group norm being measured has seen its input."""


class _FixedGroupNorms:
    """Replaces the forward of every group norm of `encoder` so that, by call order, a norm either
    normalises with statistics fixed in advance or (the next one to measure) accumulates its
    input's sums over the current block's core and stops the pass.

    The fixed-statistics forward reproduces MONAI's `MaisiGroupNorm3D`: per sample and group,
    (x - mean) / sqrt(var + eps) in float32, optionally cast to float16, then the affine.
    """

    def __init__(self, encoder: nn.Module):
        self.modules = [m for m in encoder.modules() if isinstance(m, nn.GroupNorm)]
        self.count = len(self.modules)
        self.stats: list[tuple[torch.Tensor, torch.Tensor]] = []  # (mean, std), each (B, G), by call order
        self.calls = 0
        self.core: tuple[slice, ...] = ()
        self.block_shape: list[int] = []
        self.sums: list[tuple] = []  # per block: (sum, sum of squares, count) of the measured norm's input
        self.measured: nn.GroupNorm | None = None

    @contextlib.contextmanager
    def installed(self):
        for module in self.modules:
            module.forward = functools.partial(self._forward, module)
        try:
            yield self
        finally:
            for module in self.modules:
                del module.forward  # back to the class's forward

    def reset_calls(self) -> None:
        self.calls = 0

    def measure_next(self, encoder: nn.Module, image: torch.Tensor, blocks: list[_Block]) -> None:
        """One pass over all blocks that fixes the statistics of the next group norm."""
        self.sums = []
        for block in blocks:
            self.calls, self.core = 0, block.core
            self.block_shape = [s.stop - s.start for s in block.cut]
            try:
                encoder(image[(slice(None), slice(None), *block.cut)])
            except _StopEncoder:
                continue
            raise RuntimeError("the encoder finished without reaching the group norm being measured")
        total, total_sq, count = (sum(parts) for parts in zip(*self.sums))
        mean = total / count
        var = (total_sq / count - mean * mean).clamp_min(0.0)
        self.stats.append((mean.float(), (var + self.measured.eps).sqrt().float()))

    def _forward(self, module: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        index = self.calls
        self.calls += 1
        if index < len(self.stats):
            return _normalise(module, x, *self.stats[index])
        # The norm being measured: its input over the block core, at this layer's resolution.
        self.measured = module
        core = self._core_at(x)
        groups = x[(slice(None), slice(None), *core)].double().reshape(x.shape[0], module.num_groups, -1)
        self.sums.append((groups.sum(-1), groups.pow(2).sum(-1), groups.shape[-1]))
        raise _StopEncoder

    def _core_at(self, x: torch.Tensor) -> tuple[slice, ...]:
        """The block core in the coordinates of activation `x` (downsampled 1, 2, 4... times)."""
        scales = [full // n for full, n in zip(self.block_shape, x.shape[2:])]
        return tuple(slice(s.start // k, s.stop // k) for s, k in zip(self.core, scales))


def _normalise(module: nn.GroupNorm, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Group norm of x (B, C, ...) with given per-(sample, group) mean and std, each (B, G)."""
    b, c = x.shape[:2]
    groups = x.float().reshape(b, module.num_groups, -1)
    out = ((groups - mean[:, :, None]) / std[:, :, None]).reshape(x.shape)
    if getattr(module, "norm_float16", False):
        out = out.half()
    if module.affine:
        shape = (1, c) + (1,) * (x.dim() - 2)
        out = out * module.weight.view(shape) + module.bias.view(shape)
    return out


@torch.no_grad()
def decode(vae: nn.Module, z: torch.Tensor, clip: bool = True) -> torch.Tensor:
    """Decode an (unscaled) latent to an image in [0, 1] (clipped unless `clip` is False)."""
    image = vae.decode(z)
    return image.clamp(0.0, 1.0) if clip else image


# -- losses ----------------------------------------------------------------------------------

def reconstruction_l1(recon: torch.Tensor, image: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean absolute error between reconstruction and input (both in [0, 1] units); with a per-voxel
    `weight` (broadcastable to the image), the weighted mean sum(w |r - x|) / sum(w)."""
    err = (recon.float() - image.float()).abs()
    if weight is None:
        return err.mean()
    weight = weight.float().expand_as(err)
    return (err * weight).sum() / weight.sum()


def decoder_only(vae: nn.Module) -> nn.Module:
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
        raise ValueError(f"adversarial loss must be one of {', '.join(ADVERSARIAL_KINDS)}, got {kind!r}")


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
