"""How much memory a decode takes: the one estimate that `decoding.plan_tiles` plans with.

Memory model. Peak memory of one decoder call grows linearly with the output voxels it produces:
``bytes = DECODER_TENSORS_PER_VOXEL * num_channels[0] * 4`` per output voxel (fp32), i.e. that many
full-resolution activations of the finest level alive at once (MAISI's group norm keeps per-group
float32 copies and their concatenation beside its input). Measured as the growth of peak RSS
between two sizes on the CPU (torch 2.13, VAE splitting off, glibc mmap threshold pinned so freed
blocks go back): tiny (8 channels) 128 B per output voxel = 4.0 activations (32^3 -> 40^3 latent),
small (16) 449 B = 7.0 (16^3 -> 32^3), maisi-v2 (64) 1.79 kB = 7.0 (12^3 -> 20^3). The model budgets
8 activations (2 kB per voxel for the released VAE) plus `DECODER_FIXED_BYTES` of workspace.

The streamed decode (`streamed.decode_streamed`) stores only layer outputs, so its estimate counts
the channels it keeps per output voxel (`streamed_channels_per_voxel`) plus one slab of temporaries.
"""

from __future__ import annotations

import math
from typing import Sequence

from maisi2.config import VAEConfig

__all__ = ["DECODER_TENSORS_PER_VOXEL", "DECODER_FIXED_BYTES", "STREAM_SLAB_BYTES", "decoder_bytes_per_voxel",
           "estimate_decode_bytes", "streamed_channels_per_voxel", "streamed_slab_bytes", "estimate_streamed_bytes"]

DECODER_TENSORS_PER_VOXEL = 8
DECODER_FIXED_BYTES = 256 * 2**20
# Temporaries of one slab of a streamed decode (input rows, activated/upsampled rows, output rows):
# an eighth of the stored tensors, within these bounds. Thin slabs redo the activation of their halo rows.
STREAM_SLAB_BYTES = (128 * 2**20, 2 * 2**30)


def decoder_bytes_per_voxel(cfg: VAEConfig, dtype_bytes: int = 4) -> int:
    """Peak bytes per output voxel of one decoder call (see the module docstring)."""
    return DECODER_TENSORS_PER_VOXEL * cfg.num_channels[0] * dtype_bytes


def estimate_decode_bytes(cfg: VAEConfig, tile_latent: Sequence[int], dtype_bytes: int = 4) -> int:
    """Peak bytes of decoding one latent tile (weights excluded)."""
    factor = cfg.downsample_factor
    voxels = math.prod(int(n) * factor for n in tile_latent)
    return DECODER_FIXED_BYTES + decoder_bytes_per_voxel(cfg, dtype_bytes) * voxels


def streamed_channels_per_voxel(cfg: VAEConfig) -> float:
    """Peak stored channels per output voxel of `decode_streamed` (144 for the released VAE).

    Follows the decoder level by level: `buffer` is the channel count of the current level's
    buffer, `share` the voxels at this level per output voxel.
    """
    channels = list(reversed(cfg.num_channels))
    blocks = list(reversed(cfg.num_res_blocks))
    share = 8.0 ** -(len(channels) - 1)
    buffer = c = channels[0]
    peak = (cfg.latent_channels + c) * share  # latent + conv_in output
    for level, width in enumerate(channels):
        for _ in range(blocks[level]):
            in_place = buffer >= 2 * width  # shortcut and conv1 output fit in the buffer
            peak = max(peak, (buffer if in_place else buffer + width) * share)
            c = width
        if level < len(channels) - 1:
            if buffer > c:  # compacted before upsampling: buffer + its first c channels, briefly
                peak, buffer = max(peak, (buffer + c) * share), c
            peak = max(peak, (buffer + 8 * c) * share)  # coarse input + upsampled output
            share *= 8
    return max(peak, buffer + 1.0)


def streamed_slab_bytes(cfg: VAEConfig, latent_shape: Sequence[int], dtype_bytes: int = 4) -> int:
    """Slab temporaries `decode_streamed` is given: an eighth of its stored tensors, bounded."""
    voxels = math.prod(int(n) * cfg.downsample_factor for n in tuple(latent_shape)[-3:])
    low, high = STREAM_SLAB_BYTES
    return int(min(high, max(low, streamed_channels_per_voxel(cfg) * voxels * dtype_bytes / 8)))


def estimate_streamed_bytes(cfg: VAEConfig, latent_shape: Sequence[int], dtype_bytes: int = 4) -> int:
    """Peak bytes of `decode_streamed` for a latent (x, y, z), weights excluded: stored tensors, one
    slab of temporaries (`streamed_slab_bytes`, or less for small volumes), the float32 output
    and `DECODER_FIXED_BYTES`."""
    voxels = math.prod(int(n) * cfg.downsample_factor for n in tuple(latent_shape)[-3:])
    stored = streamed_channels_per_voxel(cfg) * voxels * dtype_bytes
    # A slab never holds more than every row of the widest layer: its input twice and its output.
    widest = 3 * max(cfg.num_channels) + cfg.num_channels[0]
    slab = min(streamed_slab_bytes(cfg, latent_shape, dtype_bytes), widest * voxels * 4)
    return int(DECODER_FIXED_BYTES + stored + slab + 4 * voxels)
