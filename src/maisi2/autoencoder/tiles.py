"""The one tiler of the VAE: tiles over a latent grid, the part of each that is exact, the blend.

Tiled encoding and tiled decoding cut a volume the same way, in latent voxels (the image grid is
`factor` times finer on every axis, so every cut lines up with the latent). A `Tiling` holds, per
axis, each tile's window and the part of it that the tile *owns*: the owned parts partition the
axis and lie far enough inside their windows for the network's reach, so there the tile's output
equals a whole-volume pass (given whole-volume group-norm statistics, `group_norm.VolumeStatistics`,
which are measured over the owned parts). Two ways to lay tiles out:

* `Tiling.around_cores` (tiled encoding): near-equal cores of at most `core` voxels partition each
  axis; each window is its core plus `context` voxels on each side (clipped at the volume's edge);
  a tile owns its core, and only that part of its output is kept.
* `Tiling.spread` (tiled decoding): windows of one size spread evenly over each axis
  (`axis_starts`), neighbours overlapping by at least ``2 * halo + ramp``; neighbours split their
  overlap at its middle (at least `halo` inside both). Decoded tiles blend (`axis_weights`): the
  halo gets weight 0, then a raised-cosine ramp `ramp` latent voxels wide hands over to the
  neighbour, whose ramp is the mirror image (weights sum to one). Weights are products of per-axis
  profiles, so no full-size weight volume is stored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np

__all__ = ["axis_starts", "Span", "Tiling", "axis_weights", "axis_profiles"]

Index = tuple[int, int, int]


def axis_starts(length: int, tile: int, overlap: int) -> tuple[int, ...]:
    """Tile origins spread evenly over [0, length - tile], neighbours overlapping by >= `overlap`."""
    if tile >= length:
        return (0,)
    count = math.ceil((length - overlap) / (tile - overlap))
    stride = (length - tile) / (count - 1)
    return tuple(int(round(i * stride)) for i in range(count))


@dataclass(frozen=True)
class Span:
    """One tile on one axis: its window [start, stop) and the part it owns [own_start, own_stop)."""

    start: int
    stop: int
    own_start: int
    own_stop: int


@dataclass(frozen=True)
class Tiling:
    """Tiles over a latent grid of `shape`: per axis, one `Span` per tile position."""

    shape: tuple[int, int, int]
    axes: tuple[tuple[Span, ...], tuple[Span, ...], tuple[Span, ...]]

    @classmethod
    def spread(cls, shape, tile, overlap: int) -> "Tiling":
        """Windows of `tile` voxels per axis (at most the axis), spread evenly, overlapping by >= `overlap`;
        each owns up to the middle of its overlaps."""
        axes = []
        for length, size in zip(shape, tile):
            size = min(int(size), int(length))
            starts = axis_starts(int(length), size, overlap)
            cuts = [0] + [(a + size + b) // 2 for a, b in zip(starts[:-1], starts[1:])] + [int(length)]
            axes.append(tuple(Span(s, s + size, lo, hi) for s, lo, hi in zip(starts, cuts[:-1], cuts[1:])))
        return cls(tuple(int(n) for n in shape), tuple(axes))

    @classmethod
    def around_cores(cls, shape, core: int, context: int) -> "Tiling":
        """Near-equal cores of at most `core` voxels per axis, each window its core plus `context`."""
        axes = []
        for length in (int(n) for n in shape):
            count = math.ceil(length / core)
            bounds = [round(i * length / count) for i in range(count + 1)]
            axes.append(tuple(Span(max(0, s - context), min(length, e + context), s, e)
                              for s, e in zip(bounds[:-1], bounds[1:])))
        return cls(tuple(int(n) for n in shape), tuple(axes))

    @property
    def count(self) -> int:
        return math.prod(len(spans) for spans in self.axes)

    def __iter__(self) -> Iterator[Index]:
        for i in range(len(self.axes[0])):
            for j in range(len(self.axes[1])):
                for k in range(len(self.axes[2])):
                    yield (i, j, k)

    def spans(self, index: Index) -> tuple[Span, Span, Span]:
        return tuple(self.axes[a][index[a]] for a in range(3))

    def window(self, index: Index, factor: int = 1) -> tuple[slice, slice, slice]:
        """The tile's window on the grid `factor` times finer than the latent (1: the latent)."""
        return tuple(slice(s.start * factor, s.stop * factor) for s in self.spans(index))

    def owned(self, index: Index) -> tuple[tuple[int, int], ...]:
        """The owned part, (lo, hi) per axis in latent voxels relative to the window."""
        return tuple((s.own_start - s.start, s.own_stop - s.start) for s in self.spans(index))

    def owned_region(self, index: Index, factor: int = 1) -> tuple[slice, slice, slice]:
        """The owned part in volume coordinates, on the grid `factor` times finer than the latent."""
        return tuple(slice(s.own_start * factor, s.own_stop * factor) for s in self.spans(index))

    def size(self, index: Index) -> tuple[int, ...]:
        """The window's size in latent voxels per axis."""
        return tuple(s.stop - s.start for s in self.spans(index))


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


def axis_profiles(tiling: Tiling, axis: int, halo: int, ramp: int, factor: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Per-tile blending profiles on one axis and their sum over the axis (never zero)."""
    length = tiling.shape[axis]
    spans = tiling.axes[axis]
    profiles = [axis_weights(s.start, s.stop - s.start, length, halo, ramp, factor) for s in spans]
    total = np.zeros(length * factor)
    for span, profile in zip(spans, profiles):
        total[span.start * factor:span.stop * factor] += profile
    if (total <= 0).any():
        raise AssertionError("the tiling leaves voxels uncovered; overlap is smaller than 2 * halo + ramp")
    return profiles, total
