"""VAE decoding under a memory budget: streamed whole-volume decoding, or tiles.

MONAI's decoder holds ~7 full-resolution activations at once, so a whole 512 x 512 x 768 volume
does not decode in one call on most machines. `plan_tiles` picks, from the budget (`memory`), in
this order: a streamed whole-volume decode (`streamed.decode_streamed`: exact group-norm
statistics, one decoder's FLOPs, about a third of MONAI's memory) with float32 layer tensors, the
same with float16 ones, the same with its tensors in files (when asked), and else overlapping
tiles (`tiles.Tiling.spread`), each decoded on its own and blended.

The halo. The decoder's convolutions reach `decoder_context(cfg)` latent voxels (9 for the released
VAE, 6 for tiny/small; measured on tiny: a halo of 6 gives a max error of 1e-5, 5 gives 2e-3), so
with a halo that wide the zero padding at a tile's border cannot reach the part a tile owns.

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

from maisi2 import compute
from maisi2.autoencoder.group_norm import VolumeStatistics
from maisi2.autoencoder.memory import (DECODER_FIXED_BYTES, STREAM_SLAB_BYTES, estimate_decode_bytes,
                                       estimate_streamed_bytes, streamed_slab_bytes)
from maisi2.autoencoder.streamed import decode_streamed, streamable, streamable_decoder
from maisi2.autoencoder.tiles import Tiling, axis_profiles, axis_starts
from maisi2.config import VAEConfig
from maisi2.errors import InvalidInput
from maisi2.progress import Progress, counter

__all__ = ["TILED_DECODE_TOLERANCE", "decoder_context", "TilePlan", "plan_tiles", "decode_tiled", "decode"]

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

    @property
    def tiling(self) -> Tiling:
        return Tiling.spread(self.latent_shape, self.tile, 2 * self.halo + self.ramp)

    def to_dict(self) -> dict:
        return {"latent_shape": list(self.latent_shape), "tile": list(self.tile), "tiles": self.count,
                "halo": self.halo, "ramp": self.ramp, "estimated_peak_bytes": self.peak_bytes,
                "storage": self.storage, "spilled": self.spill_dir is not None}


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
        raise InvalidInput(f"halo ({halo}) and ramp ({ramp}) must be >= 0")
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
            raise InvalidInput(
                f"the VAE cannot decode within {budget_bytes / 2**30:.2f} GB: even the smallest tile "
                f"({smallest}^3 latent voxels) needs about {need / 2**30:.2f} GB. Raise --max-memory or "
                "generate a smaller volume"
            )
        # Shrink the longest side; tiles that tile an axis must keep room for halos and a ramp.
        tile[axis] = max(smallest, min(tile[axis] - 1, int(tile[axis] * 0.9)))
    starts = tuple(axis_starts(n, t, overlap) for n, t in zip(shape, tile))
    return TilePlan(shape, tuple(tile), starts, halo, ramp, cfg.downsample_factor,
                    estimate_decode_bytes(cfg, tile, dtype_bytes))


@torch.no_grad()
def decode(vae: nn.Module, z: torch.Tensor, clip: bool = True) -> torch.Tensor:
    """Decode an (unscaled) latent in one plain decoder call to an image in [0, 1] (clipped unless
    `clip` is False). For volumes of any size under a memory budget: `plan_tiles` + `decode_tiled`."""
    image = vae.decode(z)
    return image.clamp(0.0, 1.0) if clip else image


@torch.no_grad()
def decode_tiled(vae: nn.Module, z: torch.Tensor, plan: TilePlan, autocast: bool = False,
                 progress: Progress | None = None, statistics: str = "volume",
                 arithmetic: compute.ComputePlan | None = None) -> torch.Tensor:
    """Decode an unscaled latent (1, C, x, y, z) as `plan` says; returns (1, 1, X, Y, Z) float32 on CPU.

    A single-tile plan decodes the whole volume with `decode_streamed` (storage as planned) when
    the VAE's decoder is streamable, else with ``vae.decode``.
    statistics: "volume" (default) gives every tile the group-norm statistics of the whole volume
    (`group_norm.VolumeStatistics`): the result equals a whole-volume decode up to float rounding,
    whatever the tiling, at the cost of extra partial passes. "tile" lets each tile use its own
    statistics (one pass, as MONAI's sliding-window decoding does); it differs from a whole-volume
    decode. Tiles run on the VAE's device; the blend is accumulated on the CPU. Values are not clipped.
    `autocast`: fp16 autocast on CUDA (how the released weights run); nothing elsewhere.
    `arithmetic`: the compute plan; where it lowers the ``vae_decoder`` (bf16 on the CPU) the
    decoder's 3x3x3 convolutions run in bf16 for this call, streamed or tiled
    (`ComputePlan.lowered`); None: float32.
    `progress` (`maisi2.progress`): a streamed decode reports thousandths of its multiply-adds; a
    tiled one every tile decode, the partial ones of the statistics passes included (one pass per
    group norm, so (norms + 1) x tiles in all); a plain ``vae.decode`` once, at the end.
    """
    if statistics not in ("volume", "tile"):
        raise InvalidInput(f"statistics must be 'volume' or 'tile', got {statistics!r}")
    if z.dim() != 5 or z.shape[0] != 1 or tuple(z.shape[2:]) != plan.latent_shape:
        raise InvalidInput(f"latent must be (1, C, {', '.join(map(str, plan.latent_shape))}), got {tuple(z.shape)}")
    if arithmetic is None:
        return _decode(vae, z, plan, autocast, progress, statistics)
    with arithmetic.lowered(getattr(vae, "decoder", vae), "vae_decoder"):
        return _decode(vae, z, plan, autocast, progress, statistics)


def _decode(vae: nn.Module, z: torch.Tensor, plan: TilePlan, autocast: bool, progress: Progress | None,
            statistics: str) -> torch.Tensor:
    device = next(vae.parameters()).device
    # The release runs its VAE under float16 autocast on CUDA; on the CPU the decoder's activations
    # stay float32 (a bf16 plan lowers only its convolutions, `decode_tiled`).
    precision = "fp16" if autocast and device.type == "cuda" else "fp32"
    if plan.count == 1:
        with compute.autocast(device, precision):
            if streamable_decoder(vae):
                return decode_streamed(vae, z, storage=getattr(torch, plan.storage), slab_bytes=plan.slab_bytes,
                                       spill_dir=plan.spill_dir, progress=progress)
            image = vae.decode(z.to(device)).float().cpu()
            counter(progress, 1)()
            return image
    tiling = plan.tiling
    tiles = list(tiling)

    def run(index: int) -> torch.Tensor:
        with compute.autocast(device, precision):
            return vae.decode(z[(slice(None), slice(None), *tiling.window(tiles[index]))].to(device)).float().cpu()

    if statistics == "tile":
        return _blend_tiles(run, tiling, tiles, plan, counter(progress, len(tiles)))
    # A decoder without group norms has nothing to measure: its tiles are exact as they are.
    with VolumeStatistics(getattr(vae, "decoder", vae)) as norms:
        tick = counter(progress, (len(norms.norms) + 1) * len(tiles))
        norms.measure([(tiling.owned(t), tiling.size(t)) for t in tiles], run, tick)
        return _blend_tiles(run, tiling, tiles, plan, tick)


def _blend_tiles(run, tiling: Tiling, tiles: list, plan: TilePlan, tick) -> torch.Tensor:
    """Decode every tile and add it in, weighted by its blending profile; divide by the summed weights."""
    profiles, totals = zip(*(axis_profiles(tiling, a, plan.halo, plan.ramp, plan.factor) for a in range(3)))
    out = torch.zeros((1, 1, *plan.output_shape), dtype=torch.float32)
    for index in range(len(tiles)):
        tile = tiles[index]
        piece = run(index)
        weight = np.einsum("i,j,k->ijk", *(profiles[a][tile[a]] for a in range(3)))
        out[(slice(None), slice(None), *tiling.window(tile, plan.factor))] += piece * torch.from_numpy(weight).float()
        tick()
    # The summed weights are separable too: divide axis by axis instead of storing a volume of them.
    for axis, total in enumerate(totals):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = -1
        out /= torch.from_numpy(total).float().reshape(shape)
    return out
