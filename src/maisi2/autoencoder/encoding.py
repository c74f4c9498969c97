"""Encoding to the posterior mean, whole or tiled.

Images enter the VAE as (B, 1, X, Y, Z) in [0, 1] (`data.hu_to_unit`); every axis must be a
multiple of the VAE's downsampling factor (4 for every preset), and the latent is
(B, 4, X/4, Y/4, Z/4). MONAI's VAE ``encode`` returns ``(z_mu, z_sigma)``.

Tiled encoding (`tiled_encode_mean`). A large volume is cut into blocks (`Tiling.around_cores`);
each block is encoded with `overlap` voxels of context on every side and only the latent of its
core is kept. With the overlap at least the encoder's receptive field (`encoder_context`) the
convolutions see exactly what they see in a whole-volume pass. The group norms would not: their
statistics are taken per call, i.e. per block. By default they are therefore measured over the
whole volume first (`group_norm.VolumeStatistics`) and then held fixed, which makes the tiled latent
equal the whole-volume one up to float rounding (measured on the tiny preset: relative L2 5e-7;
per-block statistics instead: 0.2-0.6). Memory is bounded by one block; the price is more compute.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from maisi2.autoencoder.group_norm import VolumeStatistics
from maisi2.autoencoder.tiles import Tiling
from maisi2.errors import InvalidInput
from maisi2.progress import Progress, counter

__all__ = ["encode_mean", "tiled_encode_mean", "downsample_factor", "encoder_context", "NORM_STATS",
           "TILED_ENCODE_TOLERANCE"]

NORM_STATS = ("volume", "block")
# Relative L2 difference, tiled (whole-volume norm statistics, full-context overlap) vs whole-volume
# posterior mean, that tests/test_vae.py accepts; measured 5e-7 on the tiny preset (float rounding).
TILED_ENCODE_TOLERANCE = 1e-5


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
        raise InvalidInput(f"the VAE takes (B, C, X, Y, Z) images, got shape {tuple(image.shape)}")
    factor = downsample_factor(vae)
    if any(n % factor for n in image.shape[2:]):
        raise InvalidInput(f"every axis must be a multiple of {factor} for the VAE, got {tuple(image.shape[2:])}; "
                         "pad first")
    return factor


@torch.no_grad()
def encode_mean(vae: nn.Module, image: torch.Tensor, tile: int | None = None, overlap: int | None = None,
                norm_stats: str = "volume", progress: Progress | None = None) -> torch.Tensor:
    """Posterior mean z_mu of `image` (B, 1, X, Y, Z) in [0, 1] -> (B, C, X/f, Y/f, Z/f).

    The mean, not a sample: caching a sample would bake the posterior noise into every training
    target. With `tile` (image voxels) and any axis longer than it, encodes block by block
    (`tiled_encode_mean`), so activation memory stays bounded by one (tile + 2*overlap)^3 block.
    `progress` (`maisi2.progress`): per block as `tiled_encode_mean` says; a whole encode reports (1, 1).
    """
    _check_image(vae, image)
    if tile is not None and any(n > tile for n in image.shape[2:]):
        return tiled_encode_mean(vae, image, tile, overlap, norm_stats, progress)
    z_mu, _ = vae.encode(image)
    counter(progress, 1)()
    return z_mu


@torch.no_grad()
def tiled_encode_mean(vae: nn.Module, image: torch.Tensor, tile: int, overlap: int | None = None,
                      norm_stats: str = "volume", progress: Progress | None = None) -> torch.Tensor:
    """Posterior mean computed on overlapping blocks; each block contributes only its core.

    tile: largest core edge in image voxels; overlap: context voxels added on each side (both
    multiples of the VAE factor; None: `encoder_context`, the full receptive field). The encoder's
    group norms need statistics over the whole volume, which no single block sees:

    * ``norm_stats="volume"`` (default) first measures them block by block, one group norm at a
      time (`group_norm.VolumeStatistics`), then encodes every block with all of them fixed. The
      result equals a whole-volume pass up to float rounding and the context cut off beyond
      `overlap`; it costs about (number of norms / 2 + 1) tiled passes.
    * ``norm_stats="block"``: each block normalises with its own statistics (one pass; differs
      from the whole-volume latent by tens of percent with untrained weights).

    `progress` (`maisi2.progress`) hears every block encoded, the partial ones of the statistics
    passes included: (norms + 1) x blocks in all with ``"volume"``, blocks with ``"block"``.
    """
    factor = _check_image(vae, image)
    overlap = encoder_context(vae) if overlap is None else overlap
    if tile < factor or tile % factor or overlap < 0 or overlap % factor:
        raise InvalidInput(f"tile ({tile}) must be a positive multiple of {factor} and overlap ({overlap}) a "
                         f"non-negative multiple of {factor}")
    if norm_stats not in NORM_STATS:
        raise InvalidInput(f"norm_stats must be one of {', '.join(NORM_STATS)}, got {norm_stats!r}")
    tiling = Tiling.around_cores([n // factor for n in image.shape[2:]], tile // factor, overlap // factor)
    tiles = list(tiling)
    everything = (slice(None), slice(None))
    block = lambda index: image[(*everything, *tiling.window(tiles[index], factor))]  # noqa: E731
    if norm_stats == "block":
        return _encode_blocks(vae, block, tiling, tiles, counter(progress, len(tiles)))
    with VolumeStatistics(vae.encoder) as norms:
        tick = counter(progress, (len(norms.norms) + 1) * len(tiles))
        norms.measure([(tiling.owned(t), tiling.size(t)) for t in tiles], lambda index: vae.encoder(block(index)),
                      tick)
        return _encode_blocks(vae, block, tiling, tiles, tick)


def _encode_blocks(vae: nn.Module, block, tiling: Tiling, tiles: list, tick) -> torch.Tensor:
    """Encode every block and keep the latent of its core."""
    out = None
    everything = (slice(None), slice(None))
    for index, tile in enumerate(tiles):
        z_mu, _ = vae.encode(block(index))
        if out is None:
            out = z_mu.new_zeros((*z_mu.shape[:2], *tiling.shape))
        core = tuple(slice(lo, hi) for lo, hi in tiling.owned(tile))
        out[(*everything, *tiling.owned_region(tile))] = z_mu[(*everything, *core)]
        tick()
    return out
