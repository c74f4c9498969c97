"""Tiled VAE decoding under a memory budget.

A whole 512 x 512 x 768 volume does not decode in one call on most machines, so the latent is cut
into overlapping tiles, each tile is decoded on its own, and the decoded tiles are blended.

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
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

    @property
    def count(self) -> int:
        return math.prod(len(s) for s in self.starts)

    @property
    def output_shape(self) -> tuple[int, int, int]:
        return tuple(n * self.factor for n in self.latent_shape)

    def to_dict(self) -> dict:
        return {"latent_shape": list(self.latent_shape), "tile": list(self.tile), "tiles": self.count,
                "halo": self.halo, "ramp": self.ramp, "estimated_peak_bytes": self.peak_bytes}


def _axis_starts(length: int, tile: int, overlap: int) -> tuple[int, ...]:
    """Tile origins spread evenly over [0, length - tile], neighbours overlapping by >= `overlap`."""
    if tile >= length:
        return (0,)
    count = math.ceil((length - overlap) / (tile - overlap))
    stride = (length - tile) / (count - 1)
    return tuple(int(round(i * stride)) for i in range(count))


def plan_tiles(latent_shape: Sequence[int], cfg: VAEConfig, budget_bytes: float, halo: int | None = None,
               ramp: int = DEFAULT_RAMP, dtype_bytes: int = 4) -> TilePlan:
    """The largest tiles whose decode fits `budget_bytes` (the whole latent when it fits).

    latent_shape: (x, y, z) or (C, x, y, z). halo defaults to `decoder_context(cfg)`. Raises a
    ValueError when even the smallest useful tile (two halos, a ramp and two core voxels per
    axis) does not fit.
    """
    shape = tuple(int(n) for n in latent_shape)[-3:]
    halo = decoder_context(cfg) if halo is None else int(halo)
    if halo < 0 or ramp < 0:
        raise ValueError(f"halo ({halo}) and ramp ({ramp}) must be >= 0")
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
