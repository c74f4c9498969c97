"""Seeded randomness for the phantom: hashed lattice noise anchored at physical positions, the
smooth displacement and texture fields built from it, and the canvases (a voxel grid, a list of
points) that shapes are painted onto.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
from scipy import ndimage


# Stream numbers: independent random streams per concern, so adding lesions never moves an organ.
_STREAM_ANATOMY, _STREAM_LESIONS, _STREAM_NOISE = 1, 2, 3
_DISP_LATTICE_MM, _DISP_SIGMA_NODES, _DISP_AMP_MM, _DISP_MAX_MM = 16.0, 2.5, 4.5, 10.0


def _stream_key(seed: int, name: str) -> int:
    return int(np.random.SeedSequence([seed, zlib.crc32(name.encode())]).generate_state(1, np.uint64)[0])


def _mix64(h: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a cheap, well-mixed integer hash (wrapping uint64 arithmetic)."""
    h = h ^ (h >> np.uint64(30))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> np.uint64(27))
    h = h * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


_AXIS_MULT = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9)


def _hashed_white(key: int, first: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Unit-variance white noise on lattice nodes first..first+count-1: a pure function of (key, node)."""
    h = np.full((1, 1, 1), key, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for axis in range(3):
            node = (np.arange(count[axis], dtype=np.int64) + int(first[axis]) + (1 << 40)).astype(np.uint64)
            shape = [1, 1, 1]
            shape[axis] = -1
            h = _mix64(h ^ (node * np.uint64(_AXIS_MULT[axis])).reshape(shape))
    uniform = (h >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-24)
    return (uniform - np.float32(0.5)) * np.float32(math.sqrt(12.0))


def _gaussian_kernel(sigma: float) -> np.ndarray:
    radius = max(1, int(3.0 * sigma + 0.5))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


class _NoiseField:
    """A smooth unit-variance random field over physical space (mm).

    White noise hashed from (key, lattice node) is gaussian-filtered on a lattice anchored at the
    physical origin, so a value depends on the key and the position only, never on the block of
    space that happened to be computed: two grids that overlap see the same field.
    """

    def __init__(self, key: int, lattice_mm: float, lo, hi, sigma_nodes: float = 2.0):
        kernel = _gaussian_kernel(sigma_nodes)
        pad = len(kernel) // 2
        self.lattice = float(lattice_mm)
        self.first = np.floor(np.asarray(lo, np.float64) / lattice_mm).astype(np.int64) - 1
        last = np.ceil(np.asarray(hi, np.float64) / lattice_mm).astype(np.int64) + 1
        values = _hashed_white(key, self.first - pad, last - self.first + 1 + 2 * pad)
        for axis in range(3):
            values = ndimage.correlate1d(values, kernel.astype(np.float32), axis=axis, mode="nearest")
        norm = np.float32(np.sum(kernel**2) ** 1.5)  # std of filtered unit white noise
        self.values = np.ascontiguousarray(values[pad:-pad, pad:-pad, pad:-pad]) / norm

    def _position(self, coord, axis: int) -> np.ndarray:
        pos = np.asarray(coord, np.float64) / self.lattice - self.first[axis]
        return np.clip(pos, 0.0, self.values.shape[axis] - 1 - 1e-6)

    def on_axes(self, xs, ys, zs) -> np.ndarray:
        """Values on the grid xs x ys x zs (1D mm coordinates): separable linear interpolation."""
        out = self.values
        for axis, coord in enumerate((xs, ys, zs)):
            pos = self._position(coord, axis)
            low = pos.astype(np.int64)
            shape = [1, 1, 1]
            shape[axis] = -1
            t = (pos - low).astype(np.float32).reshape(shape)
            below, above = np.take(out, low, axis=axis), np.take(out, low + 1, axis=axis)
            out = below + (above - below) * t
        return out

    def at(self, x, y, z) -> np.ndarray:
        """Values at points (arrays of one shape, mm): trilinear interpolation."""
        coords = np.stack([self._position(c, a) for a, c in enumerate((x, y, z))])
        return ndimage.map_coordinates(self.values, coords, order=1, mode="nearest").astype(np.float32)


class _Fields:
    """The seed's named random fields, built lazily over the field of view (plus a margin)."""

    # Texture octaves: (feature size sigma in mm, weight); an octave finer than the voxel is dropped
    # (a big voxel averages it away), so coarse grids are smoother, as real thick-slice CT is.
    TEXTURE_OCTAVES = ((32.0, 0.45), (16.0, 0.55), (8.0, 0.55), (4.0, 0.45))

    def __init__(self, seed: int, lo, hi):
        self.seed = seed
        margin = _DISP_MAX_MM + 8.0
        self.lo, self.hi = np.asarray(lo) - margin, np.asarray(hi) + margin
        self._cache: dict[tuple[str, float], _NoiseField] = {}

    def field(self, name: str, lattice_mm: float, sigma_nodes: float = 2.0) -> _NoiseField:
        key = (name, lattice_mm)
        if key not in self._cache:
            stream = _stream_key(self.seed, f"{name}@{lattice_mm:g}")
            self._cache[key] = _NoiseField(stream, lattice_mm, self.lo, self.hi, sigma_nodes)
        return self._cache[key]

    def _displacement_fields(self):
        return [self.field(f"displace-{a}", _DISP_LATTICE_MM, _DISP_SIGMA_NODES) for a in "xyz"]

    def displacement_on_axes(self, xs, ys, zs) -> list[np.ndarray]:
        return [np.clip(_DISP_AMP_MM * f.on_axes(xs, ys, zs), -_DISP_MAX_MM, _DISP_MAX_MM)
                for f in self._displacement_fields()]

    def displacement_at(self, x, y, z) -> list[np.ndarray]:
        return [np.clip(_DISP_AMP_MM * f.at(x, y, z), -_DISP_MAX_MM, _DISP_MAX_MM)
                for f in self._displacement_fields()]

    def texture_on_axes(self, xs, ys, zs, finest_mm: float) -> np.ndarray:
        total = np.zeros((len(xs), len(ys), len(zs)), np.float32)
        for sigma, weight in self.TEXTURE_OCTAVES:
            if sigma >= 1.5 * finest_mm:
                total += np.float32(weight) * self.field("texture", sigma / 2).on_axes(xs, ys, zs)
        return total


# ---------------------------------------------------------------- canvases: where shapes are painted


class _GridRegion:
    """A box of a _Grid: slices into its arrays, coordinates as views."""

    def __init__(self, grid: "_Grid", index: tuple[slice, slice, slice]):
        self.grid, self.index = grid, index
        self.shape = tuple(s.stop - s.start for s in index)
        self.fields = grid.fields

    def coords(self, frame: str):
        if frame == "world":
            axes = [a[s].reshape([-1 if i == k else 1 for i in range(3)])
                    for k, (a, s) in enumerate(zip(self.grid.axes, self.index))]
            return np.broadcast_arrays(*axes)
        return tuple(c[self.index] for c in self.grid.anat)

    def sub(self, lo, hi):
        """Slices (relative to this region) of the voxels whose anatomical position may be in [lo, hi]."""
        g = self.grid
        rel = []
        for axis, s in enumerate(self.index):
            ax = g.axes[axis][s]
            i0 = int(np.searchsorted(ax, lo[axis] - g.dmax[axis], "left"))
            i1 = int(np.searchsorted(ax, hi[axis] - g.dmin[axis], "right"))
            if i1 <= i0:
                return None
            rel.append(slice(i0, i1))
        return tuple(rel)


class _Grid:
    """A block of z-slices of the output grid: world axes, displaced (anatomical) coordinates, outputs."""

    def __init__(self, xs, ys, zs, fields: _Fields):
        self.fields = fields
        self.axes = tuple(np.asarray(a, np.float32) for a in (xs, ys, zs))
        self.shape = tuple(len(a) for a in self.axes)
        self.world = tuple(a.reshape([-1 if i == k else 1 for i in range(3)]) for k, a in enumerate(self.axes))
        disp = fields.displacement_on_axes(*self.axes)
        self.anat = tuple(w + d for w, d in zip(self.world, disp))
        self.dmin = np.array([d.min() for d in disp], np.float64)
        self.dmax = np.array([d.max() for d in disp], np.float64)
        self.labels = np.zeros(self.shape, np.uint8)
        self.hu = np.full(self.shape, -1000.0, np.float32)
        self.tex = np.zeros(self.shape, np.float32)

    def region(self, lo, hi, frame: str):
        lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
        if frame != "world":  # voxel w holds anatomy at w + d(w): widen by the displacement range
            lo, hi = lo - self.dmax, hi - self.dmin
        index = []
        for ax, low, high in zip(self.axes, lo, hi):
            i0, i1 = int(np.searchsorted(ax, low, "left")), int(np.searchsorted(ax, high, "right"))
            if i1 <= i0:
                return None
            index.append(slice(i0, i1))
        return _GridRegion(self, tuple(index))

    def put(self, region: _GridRegion, mask, label, hu, tex):
        for array, value in ((self.labels, label), (self.hu, hu), (self.tex, tex)):
            view = array[region.index]
            view[mask] = value if np.ndim(value) == 0 else value[mask]


class _PointRegion:
    def __init__(self, canvas: "_Points", index: np.ndarray):
        self.canvas, self.index = canvas, index
        self.shape = (len(index),)
        self.fields = canvas.fields
        self._coords = {}

    def coords(self, frame: str):
        if frame not in self._coords:
            self._coords[frame] = tuple(c[self.index] for c in self.canvas.columns[frame])
        return self._coords[frame]

    def sub(self, lo, hi):
        x, y, z = self.coords("anat")
        inside = (x >= lo[0]) & (x <= hi[0]) & (y >= lo[1]) & (y <= hi[1]) & (z >= lo[2]) & (z <= hi[2])
        rel = np.flatnonzero(inside)
        return rel if rel.size else None


class _Points:
    """Arbitrary world points (N, 3): the painter run here answers 'which label is at p?'.

    Points are kept sorted by anatomical z so that a layer's bounding box selects a contiguous run.
    """

    def __init__(self, world: np.ndarray, fields: _Fields):
        self.fields = fields
        world = np.asarray(world, np.float32).reshape(-1, 3)
        anat = world + np.stack(fields.displacement_at(*world.T), axis=1)
        self.order = np.argsort(anat[:, 2], kind="stable")
        self.world, self.anat = world[self.order], anat[self.order]
        self.columns = {"anat": tuple(np.ascontiguousarray(self.anat[:, k]) for k in range(3)),
                        "world": tuple(np.ascontiguousarray(self.world[:, k]) for k in range(3))}
        n = len(world)
        self.labels = np.zeros(n, np.uint8)
        self.hu = np.full(n, -1000.0, np.float32)
        self.tex = np.zeros(n, np.float32)

    def region(self, lo, hi, frame: str):
        x, y, z = self.columns[frame]
        if frame == "anat":  # sorted by z: a contiguous run, then test x and y
            i0, i1 = np.searchsorted(z, lo[2], "left"), np.searchsorted(z, hi[2], "right")
        else:
            i0, i1 = 0, len(z)
        xs, ys, zs = x[i0:i1], y[i0:i1], z[i0:i1]
        inside = (xs >= lo[0]) & (xs <= hi[0]) & (ys >= lo[1]) & (ys <= hi[1]) & (zs >= lo[2]) & (zs <= hi[2])
        index = i0 + np.flatnonzero(inside)
        return _PointRegion(self, index) if index.size else None

    def put(self, region: _PointRegion, mask, label, hu, tex):
        target = region.index[mask]
        for array, value in ((self.labels, label), (self.hu, hu), (self.tex, tex)):
            array[target] = value if np.ndim(value) == 0 else value[mask]

    def labels_in_input_order(self) -> np.ndarray:
        out = np.empty_like(self.labels)
        out[self.order] = self.labels
        return out
