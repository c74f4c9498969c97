"""VAE decoding under a memory budget: streamed whole-volume decoding, or tiles.

MONAI's decoder holds ~7 full-resolution activations at once, so a whole 512 x 512 x 768 volume
does not decode in one call on most machines. `plan_tiles` picks, from the budget, in this order:
a streamed whole-volume decode (`decode_streamed`: the decoder's layers one after the other over
the whole volume, every convolution slab by slab; exact group-norm statistics, one decoder's
FLOPs, about a third of MONAI's memory) with float32 layer tensors, the same with float16 ones,
the same with its tensors in files (when asked), and else overlapping tiles, each decoded on its
own and blended, as described next.

How the tiles are blended. Every tile carries a *halo* of `halo` latent voxels on each side that
has a neighbour. The decoder's convolutions reach `decoder_context(cfg)` latent voxels (9 for the
released VAE, 6 for tiny/small; measured on tiny: a halo of 6 gives a max error of 1e-5, 5 gives
2e-3), so with a halo that wide the zero padding at a tile's border cannot reach its inner part.
The halo is thrown away (weight 0); next to it a raised-cosine ramp `ramp` latent voxels wide hands
over to the neighbouring tile, whose ramp is the mirror image (weights sum to one). Weights are
products of per-axis profiles, so their sum is too and no full-size weight volume is stored.

Group norms. The decoder's group norms compute their statistics per call, i.e. per tile, and a
tile's statistics differ from the whole volume's (most where a tile is mostly air). Measured on the
tiny VAE fitted to phantom CTs (L1 fit on 32^3 crops), a 96^3 phantom decoded in eight 64^3 tiles
differs from the whole-volume decode by a relative L2 of 0.24-0.31 (150-230 HU mean absolute
difference), whatever the halo: far too much to call tiling a detail. So by default
(``statistics="volume"``) every tile is normalised with the statistics of the whole volume, which
are measured beforehand norm by norm over the tiles (`_VolumeGroupNorms`). A tiled decode then
equals a whole-volume decode up to float rounding (measured: max 1.2e-5 in [0, 1] units, i.e.
0.02 HU; tests allow `TILED_DECODE_TOLERANCE`), so a seed gives the same CT on machines with
different memory budgets. The price: one partial pass per group norm (7 in tiny, 13 in the
released VAE), about N/2 + 1 decodes; 5.5x a single tiled pass on tiny. ``statistics="tile"``
is the one-pass alternative MONAI's sliding-window decoding uses. (With that VAE, fitted on crops,
per-tile statistics even reconstruct the input better, 83-98 HU mean error against 160 HU for the
whole-volume decode: statistics over a whole volume are not what it was fitted with. A VAE meant
for whole-volume decoding should be trained on large crops.)

Memory model. Peak memory of one decoder call grows linearly with the output voxels it produces:
``bytes = DECODER_TENSORS_PER_VOXEL * num_channels[0] * 4`` per output voxel (fp32), i.e. that many
full-resolution activations of the finest level alive at once (MAISI's group norm keeps per-group
float32 copies and their concatenation beside its input). Measured as the growth of peak RSS
between two sizes on the CPU (torch 2.13, VAE splitting off, glibc mmap threshold pinned so freed
blocks go back): tiny (8 channels) 128 B per output voxel = 4.0 activations (32^3 -> 40^3 latent),
small (16) 449 B = 7.0 (16^3 -> 32^3), maisi-v2 (64) 1.79 kB = 7.0 (12^3 -> 20^3). The model budgets
8 activations (2 kB per voxel for the released VAE) plus `DECODER_FIXED_BYTES` of workspace.

Usage::

    plan = plan_tiles(latent.shape[1:], cfg.vae, budget_bytes)
    image = decode_tiled(vae, latent / scale_factor, plan)     # (1, 1, X, Y, Z) float32 on CPU
    image = decode_streamed(vae, latent / scale_factor)        # the whole volume, streamed
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from maisi2.config import VAEConfig

__all__ = [
    "DECODER_TENSORS_PER_VOXEL",
    "DECODER_FIXED_BYTES",
    "TILED_DECODE_TOLERANCE",
    "decoder_context",
    "decoder_bytes_per_voxel",
    "estimate_decode_bytes",
    "TilePlan",
    "plan_tiles",
    "axis_weights",
    "decode_tiled",
    "decode_streamed",
    "streamable",
    "streamed_channels_per_voxel",
    "streamed_slab_bytes",
    "estimate_streamed_bytes",
    "STREAM_SLAB_BYTES",
    "STREAM_FLOAT16_TOLERANCE",
]

DECODER_TENSORS_PER_VOXEL = 8
DECODER_FIXED_BYTES = 256 * 2**20
# Max absolute difference ([0, 1] image units; 1e-4 = 0.2 HU) between a tiled decode with volume
# statistics and a whole-volume decode that tests/test_decode.py allows (measured 1.2e-5).
TILED_DECODE_TOLERANCE = 1e-4
DEFAULT_RAMP = 2


def decoder_context(cfg: VAEConfig) -> int:
    """How far (latent voxels, rounded up) the decoder's 3x3x3 convolutions see around an output.

    conv_in and the coarsest level's residual blocks act at latent resolution (one voxel per
    conv), each finer level at 2x, 4x ... resolution (half, a quarter ... of a latent voxel per conv),
    each upsampling adds one conv at the finer resolution and conv_out one at the finest.
    """
    levels = len(cfg.num_channels)
    blocks = list(reversed(cfg.num_res_blocks))  # the decoder runs from the coarsest level
    reach = 1.0  # conv_in
    for level in range(levels):
        reach += blocks[level] * 2 / 2**level  # two convs per residual block
        if level < levels - 1:
            reach += 1 / 2 ** (level + 1)  # the upsampling conv
    reach += 1 / 2 ** (levels - 1)  # conv_out
    return math.ceil(reach)


def decoder_bytes_per_voxel(cfg: VAEConfig, dtype_bytes: int = 4) -> int:
    """Peak bytes per output voxel of one decoder call (see the module docstring)."""
    return DECODER_TENSORS_PER_VOXEL * cfg.num_channels[0] * dtype_bytes


def estimate_decode_bytes(cfg: VAEConfig, tile_latent: Sequence[int], dtype_bytes: int = 4) -> int:
    """Peak bytes of decoding one latent tile (weights excluded)."""
    factor = cfg.downsample_factor
    voxels = math.prod(int(n) * factor for n in tile_latent)
    return DECODER_FIXED_BYTES + decoder_bytes_per_voxel(cfg, dtype_bytes) * voxels


# -- streamed whole-volume decoding ---------------------------------------------------------------
# MONAI's decoder runs block by block on whole tensors; its peak is ~7 full-resolution activations
# (group-norm copies, the upsampled input, split/concat buffers). `decode_streamed` runs the same
# layers in the same order, whole volume by whole volume, but every convolution slab by slab
# along the first axis: a slab of its input (with the one-voxel halo the kernel needs) is
# normalised, activated and upsampled into a small temporary, convolved, and written into the
# output tensor. Group norms get their statistics from the whole stored input (exact, one pass)
# and nothing is split or recomputed: exactly one decoder's worth of multiply-adds.
#
# Memory: only layer outputs are stored, and a level's tensors share one buffer. The upsampling
# conv makes a buffer of C channels; a residual block that halves the channels (C -> C/2, with
# its 1x1 shortcut) writes its shortcut into channels [0, C/2) and its conv1 output into
# [C/2, C) of that same buffer, each slab committed one slab late, once the next slab has read
# the rows it shares; later blocks of the level keep their conv1 output in [C/2, C) too. For
# the released VAE the peak is the full-resolution 128-channel buffer plus the half-resolution
# input of its upsampling: 144 channels per output voxel (`streamed_channels_per_voxel`), against
# MONAI's ~450. Stored tensors may be float16 (`storage`), halving that; arithmetic is float32.

# Temporaries of one slab (input rows, activated/upsampled rows, output rows): an eighth of the
# stored tensors, within these bounds. Thin slabs redo the activation of their halo rows.
STREAM_SLAB_BYTES = (128 * 2**20, 2 * 2**30)
# Max |difference| between a streamed decode with float16 storage and the float32 one that
# tests/test_decode.py allows, relative to the largest output value (float16 keeps 11
# significant bits per stored activation; measured 0.9-1.2e-3 with random weights).
STREAM_FLOAT16_TOLERANCE = 2e-3


def streamable(cfg: VAEConfig) -> bool:
    """Whether `decode_streamed` knows every block of this decoder (no attention, no transposed convs)."""
    return not (any(cfg.attention_levels) or cfg.with_decoder_nonlocal_attn or cfg.use_convtranspose)


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


def _inner_conv(module: nn.Module) -> nn.Conv3d:
    """The nn.Conv3d inside MONAI's MaisiConvolution / Convolution wrappers."""
    while not isinstance(module, nn.Conv3d):
        module = module.conv
    return module


def _affine_of_norm(x: torch.Tensor, norm: nn.GroupNorm, rows: int, release=lambda t: None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) that apply `norm` to `x` (1, C, D, H, W): statistics of the whole x.

    Mean and variance per channel and slab (float32, two passes: the mean, then the mean square
    of the centred copy), merged over slabs and then over each group's channels in float64
    (Chan et al.); then norm(x) = x * scale + shift with scale = weight / sqrt(var + eps),
    shift = bias - mean * scale. (torch.var_mean over these dims computes the same to ~1e-7
    relative but took 2.6x as long on a 10-row slab of 512 x 128 planes.)
    """
    c, groups = x.shape[1], norm.num_groups
    count = 0.0
    mean = torch.zeros(c, dtype=torch.float64, device=x.device)
    m2 = torch.zeros_like(mean)
    for start in range(0, x.shape[2], rows):
        part = x[0, :, start:start + rows].reshape(c, -1).to(torch.float32, copy=True)
        n = part.shape[1]
        mean_b = part.mean(1, keepdim=True)
        var_b = part.sub_(mean_b).square_().mean(1)
        mean_b = mean_b[:, 0]
        delta = mean_b.double() - mean
        total = count + n
        mean = mean + delta * (n / total)
        m2 = m2 + var_b.double() * n + delta.square() * (count * n / total)
        count = total
        release(x)
    # Channels -> groups: equal counts, so the group mean is the channels' mean and the group's
    # sum of squared deviations adds each channel's spread around the group mean.
    per_group = c // groups
    mean_g = mean.reshape(groups, per_group).mean(1)
    m2_g = (m2.reshape(groups, per_group) + count * (mean.reshape(groups, per_group) - mean_g[:, None]).square()).sum(1)
    var_g = m2_g / (count * per_group)
    inv_std = (var_g + norm.eps).rsqrt().repeat_interleave(per_group)
    weight = norm.weight.double() if norm.affine else torch.ones_like(mean)
    bias = norm.bias.double() if norm.affine else torch.zeros_like(mean)
    scale = weight * inv_std
    shift = bias - mean_g.repeat_interleave(per_group) * scale
    return scale.float().reshape(1, c, 1, 1, 1), shift.float().reshape(1, c, 1, 1, 1)


class _Streamer:
    """Runs a MAISI decoder layer by layer on whole stored tensors, convolving slab by slab.

    The current activation is always ``buffer[:, :channels]``; the rest of the buffer is room.
    """

    def __init__(self, storage: torch.dtype, slab_bytes: int, spill_dir: str | None = None):
        self.storage = storage
        self.slab_bytes = slab_bytes
        self.spill_dir = spill_dir
        self.mapped: dict[int, weakref.ref] = {}  # storage address -> its memory map (spilled tensors)

    # -- stored tensors --

    def empty(self, shape, dtype: torch.dtype, device) -> torch.Tensor:
        """A stored layer tensor; with `spill_dir`, backed by a deleted file (the OS pages it in and out)."""
        if self.spill_dir is None or torch.device(device).type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        import tempfile

        with tempfile.TemporaryFile(dir=self.spill_dir) as handle:
            array = np.memmap(handle, dtype=torch.empty(0, dtype=dtype).numpy().dtype, mode="w+", shape=tuple(shape))
        tensor = torch.from_numpy(array)
        # Weak references only: the file must go when its tensor does.
        self.mapped = {k: ref for k, ref in self.mapped.items() if ref() is not None}
        self.mapped[tensor.untyped_storage().data_ptr()] = weakref.ref(array)
        return tensor

    def release(self, *tensors: torch.Tensor) -> None:
        """Drop the resident pages of spilled tensors (a shared file mapping keeps the data in the file)."""
        import mmap

        for tensor in tensors:
            ref = self.mapped.get(tensor.untyped_storage().data_ptr())
            array = None if ref is None else ref()
            if array is not None:
                array._mmap.madvise(mmap.MADV_DONTNEED)

    def rows_for(self, row_bytes: int) -> int:
        return max(1, self.slab_bytes // max(1, row_bytes))

    # -- slabs --

    def _input_rows(self, x, o0: int, o1: int, reach: int, scale, shift, silu: bool, upsample: bool):
        """float32 conv input for output rows [o0, o1): rows [o0 - reach, o1 + reach) of
        upsample(silu(norm(x))), with zero rows beyond the volume (the conv's own zero padding,
        added after the norm as in the plain decoder). A trilinear upsample reads one more coarse
        row on each side, so every row it keeps is interpolated exactly as in the whole volume."""
        factor = 2 if upsample else 1
        depth = x.shape[2] * factor
        f0, f1 = max(0, o0 - reach), min(depth, o1 + reach)
        low, high = reach - (o0 - f0), reach - (f1 - o1)
        part = torch.empty((1, x.shape[1], o1 - o0 + 2 * reach, *(n * factor for n in x.shape[3:])),
                           dtype=torch.float32, device=x.device)
        if low:
            part[:, :, :low].zero_()
        if high:
            part[:, :, part.shape[2] - high:].zero_()
        body = part[:, :, low:low + f1 - f0]
        if upsample:
            c0, c1 = max(0, f0 // 2 - 1), min(x.shape[2], (f1 - 1) // 2 + 2)
            coarse = self._activate(x[:, :, c0:c1], scale, shift, silu)
            body.copy_(F.interpolate(coarse, scale_factor=2.0, mode="trilinear")[:, :, f0 - 2 * c0:f1 - 2 * c0])
        else:
            self._activate(x[:, :, f0:f1], scale, shift, silu, out=body)
        return part

    @staticmethod
    def _activate(x: torch.Tensor, scale, shift, silu: bool, out: torch.Tensor | None = None) -> torch.Tensor:
        """float32 silu(x * scale + shift) (or a float32 copy of x without a norm), into `out` if given."""
        # Converted once into a float32 buffer and then changed in place: no further temporaries.
        y = out.copy_(x) if out is not None else x.to(torch.float32, copy=True)
        if scale is not None:
            torch.addcmul(shift, y, scale, out=y)
        return F.silu(y, inplace=True) if silu else y

    def _norm(self, x, norm):
        if norm is None:
            return None, None
        return _affine_of_norm(x, norm, self.rows_for(x[0, :, 0].numel() * 8), self.release)

    def conv(self, x: torch.Tensor, conv: nn.Conv3d, norm: nn.GroupNorm | None = None, silu: bool = False,
             upsample: bool = False, out: torch.Tensor | None = None, add: bool = False,
             dtype: torch.dtype | None = None) -> torch.Tensor:
        """conv(upsample(silu(norm(x)))) over a stored x (1, C, D, H, W), written to (or added into)
        `out` (which must not overlap the channels of x)."""
        reach = conv.kernel_size[0] // 2
        scale, shift = self._norm(x, norm)
        depth = x.shape[2] * (2 if upsample else 1)
        plane = x[0, 0, 0].numel() * (4 if upsample else 1)
        if out is None:
            out = self.empty((1, conv.out_channels, depth, *(n * (2 if upsample else 1) for n in x.shape[3:])),
                             dtype or self.storage, x.device)
        # Per output row: its input rows (twice, with the activation) and the output row, float32.
        rows = self.rows_for((3 * conv.in_channels + conv.out_channels) * plane * 4)
        for o0 in range(0, depth, rows):
            o1 = min(depth, o0 + rows)
            y = F.conv3d(self._input_rows(x, o0, o1, reach, scale, shift, silu, upsample), conv.weight, conv.bias,
                         padding=(0, reach, reach))
            if add:  # summed in float32, rounded to the storage type once
                y += out[:, :, o0:o1]
            out[:, :, o0:o1] = y
            self.release(x, out)
        return out

    # -- blocks --

    def res_block(self, buffer: torch.Tensor, channels: int, block: nn.Module) -> tuple[torch.Tensor, int]:
        """MaisiResBlock: x' = shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x)))))), x = buffer[:, :channels]."""
        x = buffer[:, :channels]
        conv1, conv2 = _inner_conv(block.conv1), _inner_conv(block.conv2)
        width = conv1.out_channels
        shortcut = None if isinstance(block.nin_shortcut, nn.Identity) else _inner_conv(block.nin_shortcut)
        if shortcut is not None and width > channels:
            raise NotImplementedError("decode_streamed: a residual block that widens the channels")
        if shortcut is not None and buffer.shape[1] >= 2 * width:
            self._conv1_and_shortcut_in_place(buffer, channels, conv1, block.norm1, shortcut)
            h, out = buffer[:, width:2 * width], buffer[:, :width]
        else:
            room = buffer[:, channels:2 * channels] if shortcut is None and buffer.shape[1] >= 2 * channels else None
            h = self.conv(x, conv1, block.norm1, silu=True, out=room)
            out = x if shortcut is None else self._shortcut_in_place(x, shortcut)
        self.conv(h, conv2, block.norm2, silu=True, out=out, add=True)
        return buffer, width

    def _shortcut_in_place(self, x: torch.Tensor, conv: nn.Conv3d) -> torch.Tensor:
        """A 1x1 convolution (no more output channels than input ones) written over x's first channels.

        Pointwise, so a slab reads only its own rows.
        """
        rows = self.rows_for((x.shape[1] + conv.out_channels) * x[0, 0, 0].numel() * 4)
        for start in range(0, x.shape[2], rows):
            y = F.conv3d(x[:, :, start:start + rows].float(), conv.weight, conv.bias)
            x[:, :conv.out_channels, start:start + rows] = y
            self.release(x)
        return x[:, :conv.out_channels]

    def _conv1_and_shortcut_in_place(self, buffer, channels, conv1, norm1, shortcut) -> None:
        """A channel-halving block's conv1 and 1x1 shortcut, both written into its own input buffer:
        shortcut -> channels [0, W), conv1 output -> [W, 2W). Slab k's results are committed after
        slab k+1 has been computed, since slab k+1 reads the last input row of slab k."""
        x, width, reach = buffer[:, :channels], conv1.out_channels, conv1.kernel_size[0] // 2
        scale, shift = self._norm(x, norm1)
        rows = self.rows_for((3 * channels + 4 * width) * x[0, 0, 0].numel() * 4)
        pending = None
        for o0 in range(0, x.shape[2], rows):
            o1 = min(x.shape[2], o0 + rows)
            h = F.conv3d(self._input_rows(x, o0, o1, reach, scale, shift, True, False), conv1.weight, conv1.bias,
                         padding=(0, reach, reach))
            s = F.conv3d(x[:, :, o0:o1].float(), shortcut.weight, shortcut.bias)
            if pending is not None:
                self._commit(buffer, width, *pending)
            pending = (o0, o1, s, h)
        self._commit(buffer, width, *pending)

    def _commit(self, buffer, width, o0, o1, s, h) -> None:
        buffer[:, :width, o0:o1] = s
        buffer[:, width:2 * width, o0:o1] = h
        self.release(buffer)

    def upsample(self, buffer: torch.Tensor, channels: int, block: nn.Module) -> tuple[torch.Tensor, int]:
        if buffer.shape[1] > channels:  # keep only the activation before the larger buffer is made
            buffer = self.compact(buffer, channels)
        return self.conv(buffer, _inner_conv(block.conv), upsample=True), channels

    def compact(self, buffer: torch.Tensor, channels: int) -> torch.Tensor:
        """A stored copy of buffer[:, :channels], made like every stored tensor (`empty`: in a file
        when spilling) and copied slab by slab. A plain clone would be anonymous memory: at 512^3
        the released VAE's 128-channel half-resolution activation, 4 GiB in float16, held while
        the last upsampling convolution runs."""
        copy = self.empty((1, channels, *buffer.shape[2:]), buffer.dtype, buffer.device)
        rows = self.rows_for(channels * buffer[0, 0, 0].numel() * buffer.element_size())
        for start in range(0, buffer.shape[2], rows):
            copy[:, :, start:start + rows] = buffer[:, :channels, start:start + rows]
            self.release(buffer, copy)
        return copy


@torch.no_grad()
def decode_streamed(vae: nn.Module, z: torch.Tensor, storage: torch.dtype = torch.float32,
                    slab_bytes: int = STREAM_SLAB_BYTES[0], spill_dir: str | None = None) -> torch.Tensor:
    """Whole-volume decode of an unscaled latent (1, C, x, y, z) with bounded temporaries.

    Equals ``vae.decode(z)`` up to float rounding (float32 storage; tests allow
    `TILED_DECODE_TOLERANCE`) at a fraction of its memory (`estimate_streamed_bytes`); float16
    storage halves the stored tensors (`STREAM_FLOAT16_TOLERANCE`); `spill_dir` keeps them in
    (deleted) files there instead of RAM, for volumes too large for either. Runs on the VAE's
    device; returns (1, 1, X, Y, Z) float32 on the CPU. Decoders with attention or transposed
    convolutions are not supported (`streamable`).
    """
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import MaisiResBlock, MaisiUpsample

    if z.dim() != 5 or z.shape[0] != 1:
        raise ValueError(f"latent must be (1, C, x, y, z), got {tuple(z.shape)}")
    if not _streamable_module(vae):
        raise NotImplementedError("decode_streamed supports MAISI decoders without attention or transposed convs")
    device = next(vae.parameters()).device
    run = _Streamer(storage, slab_bytes, spill_dir)
    post = _inner_conv(vae.post_quant_conv)
    buffer = F.conv3d(z.to(device).float(), post.weight, post.bias).to(storage)
    channels = buffer.shape[1]
    blocks = list(vae.decoder.blocks)
    for index, block in enumerate(blocks):
        if isinstance(block, MaisiResBlock):
            buffer, channels = run.res_block(buffer, channels, block)
        elif isinstance(block, MaisiUpsample):
            buffer, channels = run.upsample(buffer, channels, block)
        elif isinstance(block, nn.GroupNorm):
            continue  # applied by the next block, conv_out
        else:
            # conv_in, or conv_out after the last norm (no activation in between); the image is float32
            norm = blocks[index - 1] if index and isinstance(blocks[index - 1], nn.GroupNorm) else None
            buffer = run.conv(buffer[:, :channels], _inner_conv(block), norm,
                              dtype=torch.float32 if index == len(blocks) - 1 else None)
            channels = buffer.shape[1]
    return buffer[:, :channels].float().cpu()


def _safe_inner_conv(module: nn.Module):
    try:
        return _inner_conv(module)
    except AttributeError:
        return None


def _streamable_module(vae: nn.Module) -> bool:
    """Whether every block of this VAE's decoder is one `decode_streamed` runs."""
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import MaisiResBlock, MaisiUpsample

    blocks = list(getattr(getattr(vae, "decoder", None), "blocks", []))
    if not blocks or not hasattr(vae, "post_quant_conv"):
        return False
    for i, block in enumerate(blocks):
        if isinstance(block, MaisiResBlock):
            if not isinstance(block.nin_shortcut, nn.Identity) and block.out_channels > block.in_channels:
                return False
        elif isinstance(block, MaisiUpsample):
            if block.use_convtranspose:
                return False
        elif isinstance(block, nn.GroupNorm):
            if i != len(blocks) - 2:
                return False
        elif not isinstance(_safe_inner_conv(block), nn.Conv3d):
            return False
    return True


@dataclass(frozen=True)
class TilePlan:
    """Where the tiles go. All sizes in latent voxels; `starts[a]` are the tile origins on axis a."""

    latent_shape: tuple[int, int, int]
    tile: tuple[int, int, int]
    starts: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
    halo: int
    ramp: int
    factor: int
    peak_bytes: int
    storage: str = "float32"  # dtype of the stored layer tensors of a streamed whole-volume decode
    slab_bytes: int = STREAM_SLAB_BYTES[0]  # temporaries of one slab of a streamed decode
    spill_dir: str | None = None  # a streamed decode keeps its layer tensors in files here

    @property
    def count(self) -> int:
        return math.prod(len(s) for s in self.starts)

    @property
    def output_shape(self) -> tuple[int, int, int]:
        return tuple(n * self.factor for n in self.latent_shape)

    def to_dict(self) -> dict:
        return {"latent_shape": list(self.latent_shape), "tile": list(self.tile), "tiles": self.count,
                "halo": self.halo, "ramp": self.ramp, "estimated_peak_bytes": self.peak_bytes,
                "storage": self.storage, "spilled": self.spill_dir is not None}


def _axis_starts(length: int, tile: int, overlap: int) -> tuple[int, ...]:
    """Tile origins spread evenly over [0, length - tile], neighbours overlapping by >= `overlap`."""
    if tile >= length:
        return (0,)
    count = math.ceil((length - overlap) / (tile - overlap))
    stride = (length - tile) / (count - 1)
    return tuple(int(round(i * stride)) for i in range(count))


def plan_tiles(latent_shape: Sequence[int], cfg: VAEConfig, budget_bytes: float, halo: int | None = None,
               ramp: int = DEFAULT_RAMP, dtype_bytes: int = 4, spill_dir: str | None = None) -> TilePlan:
    """How to decode within `budget_bytes`: whole volume when it fits, else the largest tiles that do.

    With a streamable decoder (`streamable`) the whole volume is decoded by `decode_streamed`
    when its stored tensors fit in float32, else in float16; else, with `spill_dir`, with them
    kept in files there (then memory holds only slabs). Otherwise tiles. latent_shape: (x, y, z)
    or (C, x, y, z). halo defaults to `decoder_context(cfg)`. Raises a ValueError when even the
    smallest useful tile (two halos, a ramp and two core voxels per axis) does not fit.
    """
    shape = tuple(int(n) for n in latent_shape)[-3:]
    halo = decoder_context(cfg) if halo is None else int(halo)
    if halo < 0 or ramp < 0:
        raise ValueError(f"halo ({halo}) and ramp ({ramp}) must be >= 0")
    if streamable(cfg):
        # One streamed whole-volume decode when it fits: exact statistics in one pass, no halos.
        # float16 storage before tiling: it costs far less accuracy than per-tile statistics.
        for storage, nbytes in (("float32", 4), ("float16", 2)):
            need = estimate_streamed_bytes(cfg, shape, nbytes)
            if need <= budget_bytes:
                return TilePlan(shape, shape, ((0,), (0,), (0,)), halo, ramp, cfg.downsample_factor, need, storage,
                                streamed_slab_bytes(cfg, shape, nbytes))
        if spill_dir is not None:
            slab = streamed_slab_bytes(cfg, shape, 2)
            need = DECODER_FIXED_BYTES + slab + 4 * math.prod(n * cfg.downsample_factor for n in shape)
            if need <= budget_bytes:
                return TilePlan(shape, shape, ((0,), (0,), (0,)), halo, ramp, cfg.downsample_factor, need, "float16",
                                slab, str(spill_dir))
    overlap = 2 * halo + ramp
    smallest = overlap + 2
    tile = list(shape)
    while estimate_decode_bytes(cfg, tile, dtype_bytes) > budget_bytes:
        axis = int(np.argmax(tile))
        if tile[axis] <= smallest:
            need = estimate_decode_bytes(cfg, [min(n, smallest) for n in shape], dtype_bytes)
            raise ValueError(
                f"the VAE cannot decode within {budget_bytes / 2**30:.2f} GB: even the smallest tile "
                f"({smallest}^3 latent voxels) needs about {need / 2**30:.2f} GB. Raise --max-memory or "
                "generate a smaller volume"
            )
        # Shrink the longest side; tiles that tile an axis must keep room for halos and a ramp.
        tile[axis] = max(smallest, min(tile[axis] - 1, int(tile[axis] * 0.9)))
    starts = tuple(_axis_starts(n, t, overlap) for n, t in zip(shape, tile))
    return TilePlan(shape, tuple(tile), starts, halo, ramp, cfg.downsample_factor,
                    estimate_decode_bytes(cfg, tile, dtype_bytes))


def axis_weights(start: int, tile: int, length: int, halo: int, ramp: int, factor: int) -> np.ndarray:
    """Blending profile (tile * factor,) of one tile along one axis, in output voxels.

    Sides at the volume border keep weight 1 up to the edge; a side facing a neighbour gets
    `halo` latent voxels of 0 and then a raised-cosine ramp over `ramp` latent voxels up to 1.
    """
    weights = np.ones(tile * factor, dtype=np.float64)
    zero, width = halo * factor, ramp * factor
    # Half-voxel offsets: mirrored ramps of neighbours with the same overlap sum to exactly one.
    rise = 0.5 - 0.5 * np.cos(np.pi * (np.arange(width) + 0.5) / width) if width else np.zeros(0)
    if start > 0:
        weights[:zero] = 0.0
        weights[zero:zero + width] = rise
    if start + tile < length:
        weights[len(weights) - zero:] = 0.0
        weights[len(weights) - zero - width:len(weights) - zero] = rise[::-1]
    return weights


def _axis_profiles(plan: TilePlan, axis: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Per-tile weight profiles on one axis and their sum over the axis (never zero)."""
    length, tile = plan.latent_shape[axis], plan.tile[axis]
    profiles = [axis_weights(s, tile, length, plan.halo, plan.ramp, plan.factor) for s in plan.starts[axis]]
    total = np.zeros(length * plan.factor)
    for start, profile in zip(plan.starts[axis], profiles):
        total[start * plan.factor:(start + tile) * plan.factor] += profile
    if (total <= 0).any():
        raise AssertionError("tile plan leaves voxels uncovered; overlap is smaller than 2 * halo + ramp")
    return profiles, total


def _tile_grid(plan: TilePlan) -> list[tuple[int, int, int]]:
    return [(i, j, k) for i in range(len(plan.starts[0])) for j in range(len(plan.starts[1]))
            for k in range(len(plan.starts[2]))]


def _window(plan: TilePlan, index) -> tuple[slice, ...]:
    """The tile's latent slices (all five dims)."""
    starts = [plan.starts[a][index[a]] for a in range(3)]
    return (slice(None), slice(None), *(slice(s, s + t) for s, t in zip(starts, plan.tile)))


def _owned(plan: TilePlan, index) -> tuple[tuple[int, int], ...]:
    """The part of a tile that no other tile owns, in latent voxels relative to the tile.

    Neighbours split their overlap at its middle, which lies at least `halo` voxels inside both
    tiles (the overlap is at least 2 * halo + ramp), i.e. where a tile is exact.
    """
    owned = []
    for axis, i in enumerate(index):
        starts, tile, length = plan.starts[axis], plan.tile[axis], plan.latent_shape[axis]
        low = 0 if i == 0 else (starts[i - 1] + tile + starts[i]) // 2
        high = length if i == len(starts) - 1 else (starts[i] + tile + starts[i + 1]) // 2
        owned.append((low - starts[i], high - starts[i]))
    return tuple(owned)


class _StatisticsCollected(Exception):
    """Stops a decoder pass once the group norm being measured has seen its input."""


class _VolumeGroupNorms:
    """Make a decoder's group norms normalise with statistics of the whole volume while it runs
    on tiles, so a tiled decode equals a whole-volume decode.

    Statistics are found one norm at a time, in the order the decoder calls them: with the
    earlier norms already fixed, a pass over the tiles stops at the first unknown norm, which adds
    the mean and variance of its input over the voxels each tile owns (exact there: the halo
    covers the convolutions' reach) into running totals. With N norms that is N partial passes
    before the final one, about N/2 + 1 full decodes in all.
    """

    def __init__(self, vae: nn.Module):
        # A decoder without group norms has nothing to measure: its tiles are exact as they are.
        self.norms = [m for m in getattr(vae, "decoder", vae).modules() if isinstance(m, nn.GroupNorm)]
        self.stats: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.pending: int | None = None
        self.totals = None  # (count, mean, M2) per group, float64, merged over tiles
        self.owned = None
        self.tile_latent = None

    def __enter__(self):
        for index, norm in enumerate(self.norms):
            norm.forward = lambda x, index=index: self._forward(index, x)
        return self

    def __exit__(self, *exc):
        for norm in self.norms:
            del norm.forward  # back to the class's own forward

    @property
    def complete(self) -> bool:
        return len(self.stats) == len(self.norms)

    def _forward(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if index in self.stats:
            return self._normalise(self.norms[index], x, *self.stats[index])
        if self.pending is None:
            self.pending = index
        self._accumulate(self.norms[index], x)
        raise _StatisticsCollected

    def _accumulate(self, norm: nn.GroupNorm, x: torch.Tensor) -> None:
        """Merge this tile's per-group mean and variance over its owned voxels (Chan et al.)."""
        scale = x.shape[2] // self.tile_latent[0]
        region = x[(slice(None), slice(None), *(slice(lo * scale, hi * scale) for lo, hi in self.owned))]
        grouped = region.float().reshape(x.shape[0], norm.num_groups, -1)
        var, mean = torch.var_mean(grouped, dim=2, correction=0)
        count, mean, m2 = grouped.shape[2], mean.double().cpu(), var.double().cpu() * grouped.shape[2]
        if self.totals is None:
            self.totals = (count, mean, m2)
            return
        n_a, mean_a, m2_a = self.totals
        delta, total = mean - mean_a, n_a + count
        self.totals = (total, mean_a + delta * count / total, m2_a + m2 + delta**2 * n_a * count / total)

    def close_pass(self) -> None:
        count, mean, m2 = self.totals
        self.stats[self.pending] = (mean, m2 / count)
        self.pending, self.totals = None, None

    @staticmethod
    def _normalise(norm: nn.GroupNorm, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """What the norm computes, with the given per-group statistics instead of the input's own."""
        n, c = x.shape[:2]
        shape = (n, norm.num_groups, 1) + (1,) * (x.dim() - 2)
        inv_std = (var + norm.eps).rsqrt().float().to(x.device).reshape(shape)
        y = x.float().reshape(n, norm.num_groups, c // norm.num_groups, *x.shape[2:]) - mean.float().to(x.device).reshape(shape)
        y = y.mul_(inv_std).reshape(x.shape)
        if norm.affine:
            affine_shape = (1, c) + (1,) * (x.dim() - 2)
            y = y.mul_(norm.weight.float().reshape(affine_shape)).add_(norm.bias.float().reshape(affine_shape))
        # MAISI's group norm returns float32 (float16 with norm_float16); torch's keeps the input's dtype.
        if getattr(norm, "norm_float16", False):
            return y.half()
        return y if hasattr(norm, "norm_float16") else y.to(x.dtype)


def _measure_statistics(vae: nn.Module, z: torch.Tensor, plan: TilePlan, sync: _VolumeGroupNorms,
                        device, autocast: bool) -> None:
    from maisi2.sampling import autocast_context

    sync.tile_latent = plan.tile
    while not sync.complete:
        for index in _tile_grid(plan):
            sync.owned = _owned(plan, index)
            try:
                with autocast_context(device, autocast):
                    vae.decode(z[_window(plan, index)].to(device))
            except _StatisticsCollected:
                continue
            raise AssertionError("a decoder pass finished without reaching an unmeasured group norm")
        sync.close_pass()


@torch.no_grad()
def decode_tiled(vae: nn.Module, z: torch.Tensor, plan: TilePlan, autocast: bool = False,
                 progress: bool = False, statistics: str = "volume") -> torch.Tensor:
    """Decode an unscaled latent (1, C, x, y, z) tile by tile; returns (1, 1, X, Y, Z) float32 on CPU.

    A single-tile plan decodes the whole volume with `decode_streamed` (storage as planned) when
    the VAE's decoder is streamable, else with ``vae.decode``.
    statistics: "volume" (default) gives every tile the group-norm statistics of the whole volume
    (`_VolumeGroupNorms`): the result equals a whole-volume decode up to float rounding, whatever
    the tiling, at the cost of extra partial passes. "tile" lets each tile use its own statistics
    (one pass, as MONAI's sliding-window decoding does); it differs from a whole-volume decode.
    Tiles run on the VAE's device; the blend is accumulated on the CPU. Values are not clipped.
    """
    from maisi2.sampling import autocast_context

    if statistics not in ("volume", "tile"):
        raise ValueError(f"statistics must be 'volume' or 'tile', got {statistics!r}")
    if z.dim() != 5 or z.shape[0] != 1 or tuple(z.shape[2:]) != plan.latent_shape:
        raise ValueError(f"latent must be (1, C, {', '.join(map(str, plan.latent_shape))}), got {tuple(z.shape)}")
    device = next(vae.parameters()).device
    if plan.count == 1:
        with autocast_context(device, autocast):
            if _streamable_module(vae):
                return decode_streamed(vae, z, storage=getattr(torch, plan.storage), slab_bytes=plan.slab_bytes,
                                       spill_dir=plan.spill_dir)
            return vae.decode(z.to(device)).float().cpu()
    if statistics == "tile":
        return _blend_tiles(vae, z, plan, device, autocast, progress)
    with _VolumeGroupNorms(vae) as sync:
        _measure_statistics(vae, z, plan, sync, device, autocast)
        return _blend_tiles(vae, z, plan, device, autocast, progress)


def _blend_tiles(vae, z, plan: TilePlan, device, autocast: bool, progress: bool) -> torch.Tensor:
    from maisi2.sampling import autocast_context

    profiles, totals = zip(*(_axis_profiles(plan, a) for a in range(3)))
    out = torch.zeros((1, 1, *plan.output_shape), dtype=torch.float32)
    grid = _tile_grid(plan)
    if progress:
        from tqdm.auto import tqdm

        grid = tqdm(grid, desc="decode tiles")
    for index in grid:
        window = _window(plan, index)
        with autocast_context(device, autocast):
            piece = vae.decode(z[window].to(device)).float().cpu()
        weight = np.einsum("i,j,k->ijk", *(profiles[a][index[a]] for a in range(3)))
        target = tuple(slice(w.start * plan.factor, w.stop * plan.factor) for w in window[2:])
        out[(slice(None), slice(None), *target)] += piece * torch.from_numpy(weight).float()
    # The summed weights are separable too: divide axis by axis instead of storing a volume of them.
    for axis, total in enumerate(totals):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = -1
        out /= torch.from_numpy(total).float().reshape(shape)
    return out
