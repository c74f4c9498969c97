"""Group norms with whole-volume statistics, for a VAE that runs on pieces of a volume.

MONAI's `MaisiGroupNorm3D` (like torch's GroupNorm) normalises with the statistics of the tensor it
is given. When the VAE runs on tiles (tiled encode and decode) or on slabs (the streamed decode),
that tensor is a piece, and a piece's statistics are not the volume's (most where it is mostly
air). This module is the one home of the fix, used by all three:

* `Moments` gathers per-channel moments piece by piece: float32 mean and centred mean square per
  piece, merged in float64 (Chan et al.); `group_statistics` turns them into each group's mean and
  variance over the whole volume.
* `normalise` applies a norm with given statistics in MONAI's order: float32 (x - mean) / std,
  cast to float16 when the norm has ``norm_float16``, then the affine in place (in that dtype).
  `scale_and_shift` folds the same norm into one per-channel multiply-add for the streamed decode,
  which runs only decoders whose norms stay in float32.
* `VolumeStatistics` makes every group norm of an encoder or a decoder normalise with
  whole-volume statistics while the network runs on tiles. The statistics are found one norm at a
  time, in the order the network calls them: with the earlier norms fixed, a pass over the tiles
  stops at the first unknown norm, which adds its input over the voxels each tile owns (exact
  there: the tiles' overlap covers the convolutions' reach). With N norms that is N partial passes
  before the final one, about N/2 + 1 full passes in all.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import nn

from maisi2.errors import InvalidInput

__all__ = ["Moments", "group_statistics", "normalise", "scale_and_shift", "VolumeStatistics"]

Statistics = tuple[torch.Tensor, torch.Tensor]  # per (sample, group) mean and variance, float64


class Moments:
    """Per-(sample, channel) count, mean and sum of squared deviations (M2), merged over pieces."""

    def __init__(self):
        self.count = 0.0
        self.mean: torch.Tensor | None = None  # (B, C) float64
        self.m2: torch.Tensor | None = None

    def add(self, piece: torch.Tensor) -> None:
        """Merge a piece (B, C, ...) of any layout: its mean and its centred mean square in float32
        (two passes over a float32 copy in the piece's layout, changed in place), merged into the
        running totals in float64."""
        part = piece.to(torch.float32, copy=True)
        dims = tuple(range(2, part.dim()))
        n = math.prod(part.shape[2:])
        piece_mean = part.mean(dims, keepdim=True)
        piece_var = part.sub_(piece_mean).square_().mean(dims)
        piece_mean = piece_mean.flatten(1)
        if self.mean is None:
            self.mean = torch.zeros(piece_mean.shape, dtype=torch.float64, device=piece.device)
            self.m2 = torch.zeros_like(self.mean)
        delta = piece_mean.double() - self.mean
        total = self.count + n
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + piece_var.double() * n + delta.square() * (self.count * n / total)
        self.count = total


def group_statistics(moments: Moments, num_groups: int) -> Statistics:
    """Each group's mean and variance (B, G), float64, from its channels' moments.

    Every channel counts the same voxels, so the group mean is the channels' mean and the group's
    sum of squared deviations adds each channel's spread around the group mean.
    """
    batch, channels = moments.mean.shape
    per_group = channels // num_groups
    mean = moments.mean.reshape(batch, num_groups, per_group)
    group_mean = mean.mean(-1)
    m2 = moments.m2.reshape(batch, num_groups, per_group)
    group_m2 = (m2 + moments.count * (mean - group_mean[..., None]).square()).sum(-1)
    return group_mean, group_m2 / (moments.count * per_group)


def normalise(norm: nn.GroupNorm, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """What `norm` computes on x (B, C, ...), with the given per-(sample, group) statistics (B, G).

    MONAI's order: float32 (x - mean) / sqrt(var + eps); float16 if ``norm.norm_float16``; then the
    affine, in place. MAISI's norm returns that tensor (float32, or float16); torch's keeps x's dtype.
    """
    n, c = x.shape[:2]
    groups = norm.num_groups
    shape = (n, groups, 1) + (1,) * (x.dim() - 2)
    std = (var + norm.eps).sqrt().float().to(x.device).reshape(shape)
    grouped = x.float().reshape(n, groups, c // groups, *x.shape[2:])
    y = ((grouped - mean.float().to(x.device).reshape(shape)) / std).reshape(x.shape)
    if getattr(norm, "norm_float16", False):
        y = y.half()
    if norm.affine:
        affine_shape = (1, c) + (1,) * (x.dim() - 2)
        y.mul_(norm.weight.reshape(affine_shape)).add_(norm.bias.reshape(affine_shape))
    return y if hasattr(norm, "norm_float16") else y.to(x.dtype)


def scale_and_shift(norm: nn.GroupNorm, mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel float32 (scale, shift), each (1, C, 1, 1, 1), with norm(x) = x * scale + shift for
    one sample's statistics (1, G): scale = weight / sqrt(var + eps), shift = bias - mean * scale.
    Only for norms that stay in float32 (no ``norm_float16``): the fold skips the float16 cast."""
    if getattr(norm, "norm_float16", False):
        raise InvalidInput("a float16 group norm cannot be folded into a float32 multiply-add")
    per_group = norm.num_channels // norm.num_groups
    inv_std = (var[0] + norm.eps).rsqrt().repeat_interleave(per_group)
    weight = norm.weight.double() if norm.affine else torch.ones_like(inv_std)
    bias = norm.bias.double() if norm.affine else torch.zeros_like(inv_std)
    scale = weight * inv_std
    shift = bias - mean[0].repeat_interleave(per_group) * scale
    shape = (1, norm.num_channels, 1, 1, 1)
    return scale.float().reshape(shape), shift.float().reshape(shape)


class _Measured(Exception):
    """Stops a pass once the group norm being measured has seen its input."""


class VolumeStatistics:
    """While active, every group norm of `network` normalises with whole-volume statistics.

    Usage: ``with VolumeStatistics(vae.decoder) as norms: norms.measure(tiles, run)`` and then run
    the tiles for real. `tiles` yields (owned, size): the part of the tile whose values are exact,
    ((lo, hi) per axis), in units of a grid on which the tile has `size` voxels per axis; `run(tile)`
    runs the network on that tile. An activation of length L on an axis holds the owned rows
    [lo * L // size, hi * L // size) (the network's resolution changes by whole factors).
    """

    def __init__(self, network: nn.Module):
        # A network without group norms has nothing to measure: its tiles are exact as they are.
        self.norms = [m for m in network.modules() if isinstance(m, nn.GroupNorm)]
        self.stats: dict[int, Statistics] = {}
        self._pending: int | None = None
        self._moments: Moments | None = None
        self._owned: tuple[tuple[int, int], ...] = ()
        self._size: tuple[int, ...] = ()

    def __enter__(self) -> "VolumeStatistics":
        for index, norm in enumerate(self.norms):
            norm.forward = lambda x, index=index: self._forward(index, x)
        return self

    def __exit__(self, *exc) -> None:
        for norm in self.norms:
            del norm.forward  # back to the class's own forward

    @property
    def complete(self) -> bool:
        return len(self.stats) == len(self.norms)

    def measure(self, tiles: Iterable[tuple[tuple[tuple[int, int], ...], tuple[int, ...]]],
                run: Callable[[int], object], tick: Callable[[], None] = lambda: None) -> None:
        """Fix the statistics of every norm, one partial pass over the tiles per norm (len(self.norms)
        passes); `tick()` after each tile of a pass (`maisi2.progress.counter`)."""
        tiles = list(tiles)
        while not self.complete:
            self._moments = Moments()
            for index, (owned, size) in enumerate(tiles):
                self._owned, self._size = owned, size
                try:
                    run(index)
                except _Measured:
                    tick()
                    continue
                raise RuntimeError("a pass finished without reaching a group norm still to measure")
            norm = self.norms[self._pending]
            self.stats[self._pending] = group_statistics(self._moments, norm.num_groups)
            self._pending, self._moments = None, None

    def _forward(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if index in self.stats:
            return normalise(self.norms[index], x, *self.stats[index])
        if self._pending is None:
            self._pending = index
        region = tuple(slice(lo * n // size, hi * n // size)
                       for (lo, hi), n, size in zip(self._owned, x.shape[2:], self._size))
        owned = x[(slice(None), slice(None), *region)]
        self._moments.add(owned.reshape(*x.shape[:2], -1))
        raise _Measured
