"""Procedural torso CT phantom: a CT volume (HU) and its MAISI label map, made from a seed.

The phantom is this project's own training and test data (no real CT data set can be downloaded
here), so it aims at two things at once: enough realism that a VAE, a flow model and a ControlNet
learn something CT-like from it, and speed (a 128^3 volume in a few seconds on one CPU core).

Geometry. Anatomy is modelled in millimetres in a patient frame with +x towards the patient's
left, +y anterior, +z superior, and mirrored along x on output so that the arrays follow RAS+
(liver at +x, the patient's right). The origin is the thoraco-abdominal junction (about the 11th
thoracic vertebra, just below the right diaphragm dome). The field of view, shape * spacing, is
centred on that origin: a 256 mm tall view holds the lung bases, heart, liver, spleen, kidneys,
pancreas, stomach and colon. Every random quantity depends only on the seed and on physical
position: organ sizes and positions are drawn from the seed, and the smooth random fields (organ
deformation, texture, bowel loops) are hashed lattice noise anchored at fixed physical positions.
The same seed at 2 mm and at 4 mm spacing is therefore the same body sampled differently (only the
voxel noise and texture finer than the voxel differ; lesions land in the same places too when the
field of view is the same, since they are drawn inside it).

Rendering. Each structure is an analytic shape (ellipsoid, elliptic cylinder, tube along a
polyline, or a region function) evaluated with vectorised numpy only inside its bounding box and
painted in anatomical order (later structures win). Coordinates are first displaced by a smooth
random field so that no organ is a perfect ellipsoid. Lesions are placed by asking the same
painter for the labels at a few thousand points, so each lies inside its parent organ (with a
voxel of margin) whatever the grid. Tissue intensities follow the packaged organ statistics
(image_median_statistics_ct.json): liver ~60 HU, spleen ~50, pancreas ~40, kidney ~150 (contrast),
lung ~-850, bone ~300, fat ~-100, muscle ~50, air -1000 outside the body.
"""

from __future__ import annotations

import math
import operator
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
from scipy import ndimage

from maisi2.labels import BODY, LUNG_IDS, TUMOR_PARENT, LABELS, label_id

__all__ = ["TumorSpec", "TUMOR_KINDS", "make_phantom", "parse_tumor_specs", "write_phantom"]

# CLI name -> MAISI label names a lesion of that kind may take (one is drawn per lesion).
TUMOR_KINDS: dict[str, tuple[str, ...]] = {
    "hepatic": ("hepatic tumor",),
    "pancreatic": ("pancreatic tumor",),
    "lung": ("lung tumor",),
    "colon": ("colon cancer primaries",),
    "bone": ("bone lesion",),
    "kidney-cyst": ("left kidney cyst", "right kidney cyst"),
}

_VERTEBRA_IDS = tuple(v for k, v in LABELS.items() if k.startswith("vertebrae"))
# Stream numbers: independent random streams per concern, so adding lesions never moves an organ.
_STREAM_ANATOMY, _STREAM_LESIONS, _STREAM_NOISE = 1, 2, 3
_SLAB_VOXELS = 4_000_000  # render in z-slabs of about this many voxels to bound memory
_DISP_LATTICE_MM, _DISP_SIGMA_NODES, _DISP_AMP_MM, _DISP_MAX_MM = 16.0, 2.5, 4.5, 10.0
_LOBULATION = 0.15  # lesion radius varies by +-15% with direction


@dataclass(frozen=True)
class TumorSpec:
    """`count` lesions of one kind (a key of TUMOR_KINDS), radius (mm) drawn from `radius_mm`.

    A lesion that does not fit inside its parent organ is shrunk (never below the minimum radius).
    """

    kind: str
    count: int = 1
    radius_mm: tuple[float, float] = (5.0, 20.0)

    def __post_init__(self):
        if self.kind not in TUMOR_KINDS:
            raise ValueError(f"unknown tumour kind {self.kind!r}; choose from {', '.join(TUMOR_KINDS)}")
        if isinstance(self.count, bool) or not isinstance(self.count, (int, np.integer)) or self.count < 0:
            raise ValueError(f"tumour count must be a whole number >= 0, got {self.count!r}")
        try:
            low, high = (float(r) for r in self.radius_mm)
        except (TypeError, ValueError):
            raise ValueError(f"radius_mm must be two numbers (MIN MAX, mm), got {self.radius_mm!r}") from None
        if not (math.isfinite(high) and 0 < low <= high):
            raise ValueError(f"radius_mm must satisfy 0 < MIN <= MAX (finite, mm), got {self.radius_mm!r}")
        object.__setattr__(self, "radius_mm", (low, high))


def parse_tumor_specs(items: Sequence[str], radius_mm: Sequence[float] | None = None) -> list[TumorSpec]:
    """Parse CLI lesion requests such as ``["hepatic:2", "lung", "bone:1"]`` (count defaults to 1)."""
    specs = []
    for item in items:
        kind, sep, count_text = str(item).strip().partition(":")
        kind = kind.strip().lower()
        if kind not in TUMOR_KINDS:
            raise ValueError(
                f"unknown tumour kind {kind!r} in {item!r}; choose from {', '.join(TUMOR_KINDS)} "
                "written KIND or KIND:COUNT, e.g. hepatic:2"
            )
        count = 1
        if sep:
            try:
                count = int(count_text)
            except ValueError:
                raise ValueError(
                    f"bad tumour count in {item!r}; write KIND:COUNT with a whole number, e.g. hepatic:2") from None
        extra = {} if radius_mm is None else {"radius_mm": tuple(radius_mm)}
        specs.append(TumorSpec(kind, count, **extra))
    return specs


def make_phantom(shape, spacing, tumors: Sequence[TumorSpec] = (), seed: int = 0):
    """A procedural torso CT and its MAISI label map.

    shape: voxels (X, Y, Z); spacing: mm per voxel; the field of view is centred on the
    thoraco-abdominal junction. Returns (ct float32 HU in [-1000, 1500] of `shape`, labels uint8
    MAISI ids of `shape`, RAS affine 4x4). Deterministic for a seed.
    """
    from maisi2.io import ras_affine

    shape, spacing = _check_grid(shape, spacing)
    seed = _check_seed(seed)
    tumors = list(tumors)
    if not all(isinstance(t, TumorSpec) for t in tumors):
        raise ValueError("tumors must be TumorSpec objects (see parse_tumor_specs for 'hepatic:2' strings)")
    origin = -(np.asarray(shape) - 1) / 2.0 * spacing
    axes = tuple(origin[i] + np.arange(shape[i]) * spacing[i] for i in range(3))
    fov_lo, fov_hi = origin, origin + (np.asarray(shape) - 1) * spacing
    fields = _Fields(seed, fov_lo, fov_hi)
    anatomy = _Anatomy(seed)
    lesions = _place_lesions(tumors, anatomy, fields, fov_lo, fov_hi, spacing, seed)
    ct, labels = _render(anatomy.layers + lesions, axes, fields, spacing, seed)
    # The anatomy is modelled with +x towards the patient's left; RAS+ puts +x towards the patient's
    # right (the liver at +x, as in real scans). The field of view is centred on x = 0, so flipping
    # the x axis of the arrays mirrors the body into RAS+ without touching the affine.
    return np.ascontiguousarray(ct[::-1]), np.ascontiguousarray(labels[::-1]), ras_affine(spacing, origin)


def write_phantom(out_dir, shape, spacing, tumors: Sequence[TumorSpec] = (), seed: int = 0,
                  overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``ct.nii.gz`` and ``label.nii.gz`` into `out_dir`; returns their paths.

    Refuses (before any work) to replace existing files unless `overwrite`.
    """
    from maisi2.atomic import check_writable
    from maisi2.io import Volume, save_ct, save_label_map

    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is not a folder; --out names the folder to write into")
    ct_path, label_path = out_dir / "ct.nii.gz", out_dir / "label.nii.gz"
    for path in (ct_path, label_path):
        check_writable(path, overwrite)
    ct, labels, affine = make_phantom(shape, spacing, tumors, seed)
    save_label_map(label_path, Volume(labels, affine), overwrite=overwrite)
    save_ct(ct_path, Volume(ct, affine), overwrite=overwrite)
    return ct_path, label_path


# Probability that a phantom of a random set carries a lesion of each kind (one lesion each).
RANDOM_TUMOR_RATES = {"hepatic": 0.5, "lung": 0.5, "pancreatic": 0.3, "colon": 0.3, "bone": 0.3, "kidney-cyst": 0.3}


def random_tumors(rng: np.random.Generator, radius_mm: tuple[float, float] = (5.0, 20.0)) -> list[TumorSpec]:
    """A random lesion mix: each kind present with its `RANDOM_TUMOR_RATES` probability."""
    return [TumorSpec(kind, 1, radius_mm) for kind, p in RANDOM_TUMOR_RATES.items() if rng.random() < p]


def write_phantom_set(out_dir, count: int, grids: Sequence[tuple[Sequence[int], Sequence[float]]],
                      seed: int = 0, tumors: Sequence[TumorSpec] | None = None, source: str = "phantom",
                      num_folds: int = 5, overwrite: bool = False, progress: bool = True) -> Path:
    """Write `count` phantoms (case_000/, case_001/, ...) and a ``datalist.jsonl`` describing them.

    Case i uses grid ``grids[i % len(grids)]`` (so a set can span several size buckets), seed
    ``seed + i``, fold ``i % num_folds``, and either the given `tumors` or, when None, a random
    lesion mix drawn from the seed. Returns the datalist path.
    """
    from maisi2.data import DataItem, write_datalist

    if count < 1 or not grids:
        raise ValueError("a phantom set needs count >= 1 and at least one (shape, spacing) grid")
    out_dir = Path(out_dir).expanduser()
    datalist = out_dir / "datalist.jsonl"
    if datalist.exists() and not overwrite:
        raise FileExistsError(f"{datalist} already exists; pass --overwrite to replace the set")
    items = []
    cases = range(count)
    if progress:
        from tqdm.auto import tqdm

        cases = tqdm(cases, desc="phantoms", unit="case")
    for i in cases:
        shape, spacing = grids[i % len(grids)]
        if tumors is not None:
            ct_path, label_path = write_phantom(out_dir / f"case_{i:03d}", shape, spacing, tumors, seed + i, overwrite)
        else:
            ct_path, label_path = _write_with_random_lesions(out_dir / f"case_{i:03d}", shape, spacing,
                                                             np.random.default_rng([seed, i]), seed + i, overwrite)
        items.append(DataItem(image=ct_path, label=label_path, spacing=tuple(float(v) for v in spacing),
                              source=source, fold=i % num_folds))
    return write_datalist(datalist, items, overwrite=overwrite)


def _write_with_random_lesions(case_dir, shape, spacing, rng, seed, overwrite):
    """A random mix may ask for a lesion that cannot fit at a coarse grid: drop such kinds and go on."""
    lesions = random_tumors(rng)
    while True:
        try:
            return write_phantom(case_dir, shape, spacing, lesions, seed, overwrite)
        except ValueError as err:
            misfit = [t for t in lesions if any(name in str(err) for name in TUMOR_KINDS[t.kind])]
            if not misfit:
                raise
            lesions = [t for t in lesions if t is not misfit[0]]


def _check_grid(shape, spacing) -> tuple[tuple[int, int, int], np.ndarray]:
    try:
        dims = tuple(operator.index(n) for n in shape)
        ok = len(dims) == 3 and min(dims) >= 1 and not any(isinstance(n, bool) for n in shape)
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"shape must be three positive integers (voxels along x, y, z), got {shape!r}")
    try:
        mm = np.asarray(spacing, dtype=np.float64)
    except (TypeError, ValueError):
        mm = np.zeros(0)
    if mm.shape != (3,) or not np.all(np.isfinite(mm)) or np.any(mm <= 0):
        raise ValueError(f"spacing must be three positive finite numbers (mm per voxel), got {spacing!r}")
    return dims, mm


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a whole number >= 0, got {seed!r}")
    return int(seed)


# ---------------------------------------------------------------- smooth random fields


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


# ---------------------------------------------------------------- shapes


class _Hit(NamedTuple):
    inside: np.ndarray  # bool, region shape
    depth: np.ndarray  # approximate distance (mm) inside the surface
    aux: dict


def _rotation(degrees=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Local -> anatomical rotation Rz @ Ry @ Rx (angles in degrees)."""
    ax, ay, az = np.radians(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


class _Shape:
    frame = "anat"  # "world" for lesions (placed on the grid, not deformed with the anatomy)
    lo: np.ndarray
    hi: np.ndarray

    def hit(self, region) -> _Hit | None:
        raise NotImplementedError


class _Ellipsoid(_Shape):
    def __init__(self, centre, semi, rotation=None):
        self.centre = np.asarray(centre, np.float64)
        self.semi = np.asarray(semi, np.float64)
        self.rot = np.eye(3) if rotation is None else np.asarray(rotation, np.float64)
        half = np.sqrt(((self.rot * self.semi) ** 2).sum(axis=1))  # exact box of the rotated ellipsoid
        self.lo, self.hi = self.centre - half, self.centre + half

    def hit(self, region):
        d = [c - float(o) for c, o in zip(region.coords(self.frame), self.centre)]
        q2 = 0.0
        for i in range(3):
            col = self.rot[:, i] / self.semi[i]
            q2 = q2 + (float(col[0]) * d[0] + float(col[1]) * d[1] + float(col[2]) * d[2]) ** 2
        q = np.sqrt(q2)
        return _Hit(q < 1.0, (1.0 - q) * float(self.semi.min()), {})


class _Cylinder(_Shape):
    """Vertical elliptic cylinder (vertebral bodies, discs, arches)."""

    def __init__(self, centre, semi_xy, half_height):
        self.centre = np.asarray(centre, np.float64)
        self.semi = (float(semi_xy[0]), float(semi_xy[1]), float(half_height))
        self.lo, self.hi = self.centre - self.semi, self.centre + self.semi

    def hit(self, region):
        x, y, z = region.coords(self.frame)
        cx, cy, cz = (float(c) for c in self.centre)
        ax, ay, hh = self.semi
        q = np.maximum(np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2), np.abs(z - cz) / hh)
        return _Hit(q < 1.0, (1.0 - q) * min(self.semi), {})


class _Tube(_Shape):
    """A tube along a polyline with radii interpolated along it (vessels, bowel, ribs, pancreas).

    wave=(amplitude, wavelength_mm) modulates the radius along the arc length (colon haustra).
    aux["up"]: anterior offset from the axis in radii (+1 = front wall), for gas levels.
    """

    def __init__(self, points, radii, wave=(0.0, 1.0)):
        pts = np.asarray(points, np.float64)
        rad = np.broadcast_to(np.asarray(radii, np.float64), (len(pts),))
        self.amp, self.wavelength = float(wave[0]), float(wave[1])
        grow = 1.0 + self.amp
        self.segments, arc = [], 0.0
        for a, b, ra, rb in zip(pts[:-1], pts[1:], rad[:-1], rad[1:]):
            d = b - a
            length = float(np.linalg.norm(d))
            reach = max(ra, rb) * grow
            lo, hi = np.minimum(a, b) - reach, np.maximum(a, b) + reach
            self.segments.append((a, d, max(length**2, 1e-9), float(ra), float(rb), arc, length, lo, hi))
            arc += length
        self.lo = np.min([s[7] for s in self.segments], axis=0)
        self.hi = np.max([s[8] for s in self.segments], axis=0)

    def hit(self, region):
        q = np.full(region.shape, 1e6, np.float32)
        up = np.zeros(region.shape, np.float32)
        rad = np.ones(region.shape, np.float32)
        coords = region.coords(self.frame)
        for a, d, len2, ra, rb, arc, length, lo, hi in self.segments:
            rel = region.sub(lo, hi)
            if rel is None:
                continue
            p = [c[rel] - float(o) for c, o in zip(coords, a)]
            t = np.clip((p[0] * float(d[0]) + p[1] * float(d[1]) + p[2] * float(d[2])) / len2, 0.0, 1.0)
            e = [pk - t * float(dk) for pk, dk in zip(p, d)]
            r = ra + (rb - ra) * t
            if self.amp:
                r = r * (1.0 + self.amp * np.cos((arc + t * length) * (2 * np.pi / self.wavelength)))
            qs = np.sqrt(e[0] ** 2 + e[1] ** 2 + e[2] ** 2) / r
            better = qs < q[rel]
            q[rel] = np.where(better, qs, q[rel])
            up[rel] = np.where(better, e[1] / r, up[rel])
            rad[rel] = np.where(better, r, rad[rel])
        inside = q < 1.0
        return _Hit(inside, (1.0 - q) * rad, {"up": up}) if inside.any() else None


class _Union(_Shape):
    def __init__(self, *parts: _Shape):
        self.parts = parts
        self.lo = np.min([p.lo for p in parts], axis=0)
        self.hi = np.max([p.hi for p in parts], axis=0)

    def hit(self, region):
        hits = [h for h in (p.hit(region) for p in self.parts) if h is not None]
        if not hits:
            return None
        inside = np.logical_or.reduce([h.inside for h in hits])
        depth = np.maximum.reduce([np.where(h.inside, h.depth, -1e6) for h in hits])
        return _Hit(inside, depth, {})


class _Where(_Shape):
    """`shape` restricted to where keep(x, y, z) holds, minus the `minus` shapes."""

    def __init__(self, shape: _Shape, keep=None, minus: Sequence[_Shape] = ()):
        self.shape, self.keep, self.minus = shape, keep, tuple(minus)
        self.lo, self.hi, self.frame = shape.lo, shape.hi, shape.frame

    def hit(self, region):
        h = self.shape.hit(region)
        if h is None:
            return None
        inside = h.inside.copy()
        if self.keep is not None:
            x, y, z = region.coords(self.frame)
            inside[inside] = self.keep(x[inside], y[inside], z[inside])
        for other in self.minus:
            o = other.hit(region)
            if o is not None:
                inside &= ~o.inside
        return h._replace(inside=inside) if inside.any() else None


class _Loops(_Shape):
    """Bowel loops: the part of `shape` where a ~1 cm random field exceeds `threshold`."""

    def __init__(self, shape: _Shape, threshold: float):
        self.shape, self.threshold = shape, threshold
        self.lo, self.hi = shape.lo, shape.hi

    def hit(self, region):
        h = self.shape.hit(region)
        if h is None:
            return None
        x, y, z = region.coords(self.frame)
        inside = h.inside.copy()
        loops = region.fields.field("bowel-loops", 5.0).at(x[inside], y[inside], z[inside])
        inside[inside] = loops > self.threshold
        return h._replace(inside=inside)


class _Lesion(_Shape):
    """A lobulated ball in world coordinates (radius varies smoothly with direction)."""

    frame = "world"

    def __init__(self, centre, radius: float, rng: np.random.Generator):
        self.centre = np.asarray(centre, np.float64)
        self.radius = float(radius)
        waves = rng.normal(size=(3, 3))
        self.waves = waves / np.linalg.norm(waves, axis=1, keepdims=True)
        self.freq = rng.uniform(1.0, 2.5, 3) * np.pi
        self.phase = rng.uniform(0, 2 * np.pi, 3)
        self.reach = self.radius * (1 + _LOBULATION)
        self.lo, self.hi = self.centre - self.reach, self.centre + self.reach

    def hit(self, region):
        d = [c - float(o) for c, o in zip(region.coords(self.frame), self.centre)]
        dist = np.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2)
        unit = [dk / np.maximum(dist, 1e-6) for dk in d]
        bumps = sum(np.cos(f * (w[0] * unit[0] + w[1] * unit[1] + w[2] * unit[2]) + p)
                    for w, f, p in zip(self.waves, self.freq, self.phase))
        r = self.radius * (1.0 + _LOBULATION * bumps / 3.0)
        q = dist / r
        inside = q < 1.0
        return _Hit(inside, (1.0 - q) * r, {}) if inside.any() else None


# ---------------------------------------------------------------- tissues and layers


@dataclass(frozen=True)
class _Tissue:
    """Base HU and texture amplitude (HU per unit of the texture field), optionally with a rim
    (cortical bone, kidney cortex, myocardium, bowel wall) and, for hollow organs, a gas cap:
    lumen voxels more than `gas_above` radii anterior of the axis hold air (patient supine)."""

    hu: float
    tex: float = 8.0
    rim_hu: float | None = None
    rim_mm: float = 2.0
    gas_above: float | None = None

    def values(self, hit: _Hit):
        hu = np.full(hit.inside.shape, self.hu, np.float32)
        tex = np.full(hit.inside.shape, self.tex, np.float32)
        if self.rim_hu is not None:
            hu += np.float32(self.rim_hu - self.hu) * np.clip(1.0 - hit.depth / self.rim_mm, 0.0, 1.0)
        if self.gas_above is not None:
            gas = (hit.aux["up"] > self.gas_above) & (hit.depth > self.rim_mm)
            hu[gas], tex[gas] = -1000.0, 0.0
        return hu, tex


class _Layer:
    """One painted structure: a shape, its MAISI label and its tissue."""

    def __init__(self, shape: _Shape, label: int, tissue: _Tissue):
        self.shape, self.label, self.tissue = shape, label, tissue
        self.lo, self.hi, self.frame = shape.lo, shape.hi, shape.frame

    def render(self, region):
        hit = self.shape.hit(region)
        if hit is None:
            return None
        hu, tex = self.tissue.values(hit)
        return hit.inside, self.label, hu, tex


def _paint(canvas, layer) -> None:
    region = canvas.region(layer.lo, layer.hi, layer.frame)
    if region is not None:
        out = layer.render(region)
        if out is not None:
            canvas.put(region, *out)


# ---------------------------------------------------------------- anatomy

_FAT, _VISCERAL_FAT, _MUSCLE = _Tissue(-105, 8), _Tissue(-95, 12), _Tissue(50, 6)
_CORTEX_HU = 650.0
_SPINE_NAMES = ([f"C{i}" for i in range(1, 8)] + [f"T{i}" for i in range(1, 13)] + [f"L{i}" for i in range(1, 6)]
                + ["S1"])
# Template (adult, mm): distance between vertebra centres and disc height, by region.
_PITCH = {"C": 16.0, "T_upper": 23.0, "T_lower": 26.0, "L": 35.0, "S": 35.0}
_DISC = {"C": 4.0, "T": 5.0, "L": 10.0, "S": 10.0}
_BODY_Z = np.array([-700.0, -250, -100, 0, 100, 200, 300, 700])
_BODY_A = np.array([172.0, 172, 168, 165, 160, 158, 160, 160])  # lateral semi-axis
_BODY_B = np.array([118.0, 120, 117, 114, 112, 110, 100, 100])  # antero-posterior semi-axis


def _spine_y_template(z):
    """Template y of the vertebral-body centres: lumbar lordosis forward, thoracic kyphosis back."""
    z = np.asarray(z, np.float64)
    return -46.0 + 5.0 * np.exp(-(((z + 150.0) / 130.0) ** 2)) - 5.0 * np.exp(-(((z - 120.0) / 120.0) ** 2))


class _Anatomy:
    """One body drawn from a seed: its geometry functions and the ordered list of painted layers."""

    def __init__(self, seed: int):
        rng = np.random.default_rng(np.random.SeedSequence([seed, _STREAM_ANATOMY]))
        self.s = rng.uniform(0.92, 1.08)  # body size in the axial plane
        self.sz = rng.uniform(0.95, 1.05)  # craniocaudal size
        self.fat_mm = rng.uniform(8.0, 30.0)
        self.muscle_mm = rng.uniform(8.0, 14.0)
        self.dome_right = (25.0 + rng.uniform(-10, 10)) * self.sz
        self.dome_left = self.dome_right - rng.uniform(8, 22) * self.sz
        self.oblique = [(70.0 + rng.uniform(-12, 12)) * self.sz for _ in range(2)]  # right, left
        self.horizontal = (88.0 + rng.uniform(-10, 10)) * self.sz
        self.apex = 245.0 * self.sz
        self.parents: dict[str, tuple[tuple[int, ...], np.ndarray, np.ndarray]] = {}
        self.layers = (self._torso() + self._thorax(rng) + self._bowel(rng) + self._upper_gi(rng)
                       + self._solid_organs(rng) + self._vessels(rng) + self._muscles(rng)
                       + self._spine() + self._ribs(rng))

    # --- template -> this body
    def P(self, x, y, z) -> np.ndarray:
        return np.array([x * self.s, y * self.s, z * self.sz], np.float64)

    def jitter(self, rng, point, mm=6.0) -> np.ndarray:
        return np.asarray(point, np.float64) + rng.uniform(-mm, mm, 3)

    def size(self, rng, semi, frac=0.1) -> np.ndarray:
        scale = np.array([self.s, self.s, self.sz])[: len(semi)]
        return np.asarray(semi, np.float64) * scale * rng.uniform(1 - frac, 1 + frac, len(semi))

    def spine_y(self, z_template) -> float:
        return float(_spine_y_template(z_template))

    def tube(self, rng, path, jitter_mm=0.0, wave=(0.0, 1.0)) -> _Tube:
        """A tube through template points (x, y, z, radius): points jittered, radii varied by +-10%."""
        points = [self.jitter(rng, self.P(x, y, z), jitter_mm) for x, y, z, _ in path]
        radii = [r * self.s * rng.uniform(0.9, 1.1) for *_, r in path]
        return _Tube(points, radii, wave)

    def parent(self, lesion: str, organ: _Shape, ids=None) -> None:
        """Record where lesions of kind `lesion` may go: inside `organ` (labels `ids`, by default the
        fixed parent of the label table)."""
        ids = (TUMOR_PARENT[label_id(lesion)],) if ids is None else tuple(ids)
        self.parents[lesion] = (ids, organ.lo, organ.hi)

    # --- body envelope, cavity and diaphragm (vectorised over coordinates)
    def body_semi(self, z):
        zt = np.asarray(z) / self.sz
        a = np.interp(zt, _BODY_Z, _BODY_A).astype(np.float32) * np.float32(self.s)
        b = np.interp(zt, _BODY_Z, _BODY_B).astype(np.float32) * np.float32(self.s)
        return a, b

    def cage(self, z):
        """The rib cage narrows towards the lung apices."""
        return np.interp(np.asarray(z) / self.sz, [150.0, 290.0], [1.0, 0.55]).astype(np.float32)

    def cavity_semi(self, z):
        """Semi-axes (lateral, anterior, posterior) of the body cavity inside the muscle wall."""
        a, b = self.body_semi(z)
        cage = self.cage(z)
        wall = self.fat_mm + self.muscle_mm
        return ((a - wall) * cage, (b - 1.1 * self.fat_mm - self.muscle_mm) * cage,
                (b - 0.5 * self.fat_mm - self.muscle_mm - 8.0) * cage)

    def cavity_q2(self, x, y, z):
        a, b_front, b_back = self.cavity_semi(z)
        return (x / a) ** 2 + (y / np.where(y >= 0, b_front, b_back)) ** 2

    def diaphragm_z(self, x, y):
        s = self.s
        # The dome falls away steeply behind (posterior recess) and gently in front (xiphoid).
        ap = np.where(y < 5.0 * s, 35.0, 12.0) * ((y - 5.0 * s) / (80.0 * s)) ** 2
        right = self.dome_right - 40.0 * ((x + 65.0 * s) / (105.0 * s)) ** 2 - ap
        left = self.dome_left - 40.0 * ((x - 65.0 * s) / (105.0 * s)) ** 2 - ap
        # Costophrenic recesses: the lungs reach further down behind and at the sides.
        recess = (25.0 * np.clip((-y - 30.0 * s) / (50.0 * s), 0.0, 1.0) ** 2
                  + 30.0 * np.clip((np.abs(x) - 95.0 * s) / (40.0 * s), 0.0, 1.0) ** 2)
        return np.maximum(right, left) - recess

    def in_abdomen(self, x, y, z):
        return (z < self.diaphragm_z(x, y) - 4.0) & (self.cavity_q2(x, y, z) < 1.0)

    def in_thorax(self, x, y, z):
        return (z > self.diaphragm_z(x, y)) & (self.cavity_q2(x, y, z) < 1.0)

    def lobes(self, x, y, z):
        right = x < 5.0 * self.s
        lower = np.where(right, z + y < self.oblique[0], z + y < self.oblique[1])
        ids = [np.uint8(label_id(n)) for n in ("right lung lower lobe", "right lung middle lobe",
                                               "right lung upper lobe", "left lung lower lobe", "left lung upper lobe")]
        rll, rml, rul, lll, lul = ids
        return np.where(right, np.where(lower, rll, np.where(z < self.horizontal, rml, rul)),
                        np.where(lower, lll, lul))

    # --- layers, in painting order
    def _torso(self):
        lungs_lo, lungs_hi = self.P(-200, -150, -120), self.P(200, 150, 0)
        lungs_hi[2] = self.apex
        self.parents["lung tumor"] = (LUNG_IDS, lungs_lo, lungs_hi)  # the lobe around it is its parent
        return [_TorsoLayer(self)]

    def _thorax(self, rng):
        P, s = self.P, self.s
        mediastinum = _Where(_Cylinder(P(5, 5, 200), (38 * s, 85 * s), 260 * self.sz), keep=self.in_thorax)
        heart = _Where(_Ellipsoid(self.jitter(rng, P(20, 25, 62)), self.size(rng, (62, 48, 58)),
                                  _rotation((0, -20 + rng.uniform(-8, 8), 30 + rng.uniform(-10, 10)))),
                       keep=self.in_thorax)
        ys = self.spine_y
        trachea = _Tube([P(0, ys(400) + 50, 400), P(0, ys(165) + 48, 165)], 9 * s)
        esophagus = _Tube([P(4, ys(400) + 22, 400), P(6, ys(100) + 24, 100), P(14, ys(30) + 30, 30),
                           P(32, -14, 4), P(46, -18, -4)], 7.5 * s)
        return [_Layer(mediastinum, BODY, _Tissue(-85, 10)),
                _Layer(heart, label_id("heart"), _Tissue(140, 6, rim_hu=55, rim_mm=9)),
                _Layer(trachea, label_id("trachea"), _Tissue(-1000, 0, rim_hu=30, rim_mm=2)),
                _Layer(esophagus, label_id("esophagus"), _Tissue(40, 6))]

    def _bowel(self, rng):
        P = self.P
        region = _Where(_Ellipsoid(self.jitter(rng, P(0, 25, -215), 10), self.size(rng, (105, 65, 95))),
                        keep=self.in_abdomen)
        path = [(-75, 10, -270, 30), (-90, -10, -200, 26), (-95, -5, -140, 25), (-80, 20, -112, 25),
                (-40, 55, -132, 24), (0, 60, -150, 24), (40, 55, -130, 24), (88, 10, -75, 23),
                (100, -15, -110, 21), (100, -10, -200, 20), (60, 20, -270, 20), (10, 0, -300, 18)]
        colon = _Where(self.tube(rng, path, 6, wave=(0.12, 42.0)), keep=self.in_abdomen)  # wave: haustra
        self.parent("colon cancer primaries", colon)
        return [_Layer(_Loops(region, -0.25), label_id("small bowel"), _Tissue(30, 18)),
                _Layer(colon, label_id("colon"), _Tissue(-60, 70, rim_hu=40, rim_mm=3, gas_above=0.25))]

    def _upper_gi(self, rng):
        # Fundus under the left dome, body, antrum across to the pylorus; then the duodenal C-loop.
        stomach = self.tube(rng, [(52, -22, 2, 38), (72, 8, -30, 36), (62, 40, -68, 30), (25, 55, -88, 22),
                                  (-15, 42, -92, 13)], 5)
        duodenum = self.tube(rng, [(-15, 42, -92, 13), (-42, 22, -100, 13), (-55, 5, -125, 13), (-50, 0, -150, 13),
                                   (-20, 5, -163, 13), (15, 5, -155, 13), (32, 10, -130, 13)], 4)
        return [_Layer(_Where(stomach, keep=self.in_abdomen), label_id("stomach"),
                       _Tissue(15, 10, rim_hu=45, rim_mm=4, gas_above=0.35)),
                _Layer(_Where(duodenum, keep=self.in_abdomen), label_id("duodenum"),
                       _Tissue(20, 10, rim_hu=45, rim_mm=2.5, gas_above=0.55))]

    def _solid_organs(self, rng):
        P, jit, size = self.P, self.jitter, self.size
        right_lobe = _Ellipsoid(jit(rng, P(-62, 2, -48), 8), size(rng, (80, 84, 80)),
                                _rotation((0, rng.uniform(-10, 10), rng.uniform(-10, 10))))
        left_lobe = _Ellipsoid(jit(rng, P(18, 38, -12), 8), size(rng, (62, 40, 36)),
                               _rotation((0, 0, 20 + rng.uniform(-8, 8))))
        liver = _Where(_Union(right_lobe, left_lobe), keep=self.in_abdomen)
        spleen_c = jit(rng, P(98, -38, -40), 6)
        spleen_rot = _rotation((0, 0, -35 + rng.uniform(-8, 8)))
        spleen_semi = size(rng, (22, 50, 52))
        # Crescent: the concave visceral surface (hilum) is cut away on the medial side.
        hilum = _Ellipsoid(spleen_c + spleen_rot @ np.array([-34.0 * self.s, 0, 0]), spleen_semi * [0.9, 0.7, 0.8],
                           spleen_rot)
        spleen = _Where(_Ellipsoid(spleen_c, spleen_semi, spleen_rot), keep=self.in_abdomen, minus=[hilum])
        # Head in the duodenal C-loop, neck and body across the aorta, tail up to the splenic hilum.
        pancreas = _Where(self.tube(rng, [(-32, 6, -118, 19), (-8, 18, -100, 12), (28, 14, -88, 13),
                                          (66, -2, -74, 11), (88, -18, -62, 9)], 5), keep=self.in_abdomen)
        gallbladder = _Where(_Ellipsoid(jit(rng, P(-42, 42, -98), 6), size(rng, (15, 15, 32), 0.2),
                                        _rotation((-35, 0, 0))), keep=self.in_abdomen)
        self.parent("hepatic tumor", liver)
        self.parent("pancreatic tumor", pancreas)
        return [_Layer(liver, label_id("liver"), _Tissue(60, 8)),
                _Layer(spleen, label_id("spleen"), _Tissue(52, 6)),
                *self._kidneys(rng),
                _Layer(pancreas, label_id("pancreas"), _Tissue(50, 14)),
                _Layer(gallbladder, label_id("gallbladder"), _Tissue(10, 3, rim_hu=35, rim_mm=2))]

    def _kidneys(self, rng):
        layers = []
        for side, name, z in ((1, "left", -80), (-1, "right", -95)):
            centre = self.jitter(rng, self.P(72 * side, -38, z), 6)
            semi = self.size(rng, (26, 20, 54))
            # Upper pole tilted medially, hilum facing antero-medially.
            rot = _rotation((0, -side * (12 + rng.uniform(-5, 5)), -side * (30 + rng.uniform(-8, 8))))
            kidney = _Where(_Ellipsoid(centre, semi, rot), keep=self.in_abdomen)
            sinus = _Ellipsoid(centre + rot @ np.array([-side * 0.6 * semi[0], 0, 0]), semi * [0.45, 0.5, 0.5], rot)
            # Perirenal fat: a fat capsule that separates the kidney from the liver, spleen and bowel.
            capsule = _Where(_Ellipsoid(centre, semi + 9.0 * self.s, rot), keep=self.in_abdomen)
            self.parent(f"{name} kidney cyst", kidney)
            layers += [_Layer(capsule, BODY, _Tissue(-90, 12)),
                       # Contrast: bright cortex over a darker medulla.
                       _Layer(kidney, label_id(f"{name} kidney"), _Tissue(135, 10, rim_hu=205, rim_mm=7)),
                       _Layer(sinus, BODY, _Tissue(-70, 10))]
        return layers

    def _vessels(self, rng):
        ys = self.spine_y
        # Ascending aorta out of the heart, the arch, then down in front of the spine.
        aorta_path = [(-2, 28, 55, 15), (-5, 28, 130, 15), (5, 5, 185, 13), (26, -28, 165, 12),
                      (28, ys(100) + 18, 100, 12), (22, ys(0) + 22, 0, 11.5), (16, ys(-100) + 28, -100, 10.5),
                      (12, ys(-190) + 30, -190, 9.5), (10, ys(-230) + 30, -230, 9)]
        ivc_path = [(-22, ys(-250) + 26, -250, 11), (-23, ys(-130) + 28, -130, 11), (-26, ys(-40) + 34, -40, 12),
                    (-18, ys(0) + 45, 0, 12), (-12, 10, 22, 13)]
        # Splenic vein along the back of the pancreas, then the portal vein up into the liver hilum.
        portal_path = [(85, -32, -60, 5), (62, -18, -76, 5.5), (25, -4, -90, 6), (-5, 0, -102, 7), (-25, 2, -82, 7.5),
                       (-42, 0, -58, 6.5)]
        aorta, ivc, portal = (self.tube(rng, path, 3) for path in (aorta_path, ivc_path, portal_path))
        return [_Layer(aorta, label_id("aorta"), _Tissue(165, 5)),  # portal-venous phase contrast
                _Layer(ivc, label_id("inferior vena cava"), _Tissue(130, 5)),
                _Layer(_Where(portal, keep=self.in_abdomen), label_id("portal vein and splenic vein"), _Tissue(150, 5))]

    def _muscles(self, rng):
        ys = self.spine_y
        layers = []
        for side, name in ((1, "left"), (-1, "right")):
            # Psoas: from T12 beside the vertebral bodies, widening towards the pelvis.
            psoas = self.tube(rng, [(side * x, ys(z) + y, z, r) for x, y, z, r in
                                    [(28, 0, -40, 8), (38, 2, -110, 18), (48, 5, -200, 24), (55, 12, -290, 26)]])
            # Autochthon (erector spinae): behind the transverse processes, the whole length of the spine.
            back = self.tube(rng, [(side * x, ys(z) + y, z, r) for x, y, z, r in
                                   [(36, -38, -700, 27), (36, -38, -150, 27), (36, -36, 0, 22), (34, -34, 150, 20),
                                    (30, -30, 700, 16)]])
            layers += [_Layer(_Where(psoas, keep=self.in_body), label_id(f"{name} iliopsoas"), _Tissue(55, 6)),
                       _Layer(_Where(back, keep=self.in_body), label_id(f"{name} autochthon"), _Tissue(48, 7))]
        return layers

    def in_body(self, x, y, z):
        a, b = self.body_semi(z)
        return (x / a) ** 2 + (y / b) ** 2 < 0.97

    def vertebra_levels(self):
        """(name, template z of the centre, body half-height) from C1 to S1, T11 centred at z = -10."""
        pitch, disc = [], []
        for name in _SPINE_NAMES:
            region = name[0]
            if region == "T":
                pitch.append(_PITCH["T_upper"] if int(name[1:]) <= 6 else _PITCH["T_lower"])
            else:
                pitch.append(_PITCH[region])
            disc.append(_DISC[region])
        centres = np.zeros(len(_SPINE_NAMES))
        anchor = _SPINE_NAMES.index("T11")
        centres[anchor] = -10.0
        for i in range(anchor + 1, len(centres)):
            centres[i] = centres[i - 1] - (pitch[i - 1] + pitch[i]) / 2
        for i in range(anchor - 1, -1, -1):
            centres[i] = centres[i + 1] + (pitch[i] + pitch[i + 1]) / 2
        return [(n, float(z), (p - d) / 2) for n, z, p, d in zip(_SPINE_NAMES, centres, pitch, disc)]

    def _vertebra_dims(self, zt):
        knots = [-250.0, -60, 150, 240, 320]
        return (float(np.interp(zt, knots, [26, 23, 17, 15, 10])), float(np.interp(zt, knots, [19, 17, 14, 12, 9])))

    def _spine(self):
        s, sz = self.s, self.sz
        levels = self.vertebra_levels()
        body_bone = _Tissue(230, 35, rim_hu=_CORTEX_HU, rim_mm=1.8)
        arch_bone = _Tissue(380, 30, rim_hu=_CORTEX_HU, rim_mm=1.5)
        layers, canal_points, cord_points = [], [], []
        for i, (name, zt, half) in enumerate(levels):
            ax, ay = self._vertebra_dims(zt)
            yb = self.spine_y(zt)
            canal_y = yb - ay - 9.0
            label = label_id(f"vertebrae {name}")
            parts = self._vertebra_parts(zt, half, ax, ay, yb, canal_y, lumbar=name[0] in "LS")
            layers.append(_Layer(_Cylinder(self.P(0, yb, zt), (ax * s, ay * s), half * sz), label, body_bone))
            layers += [_Layer(p, label, arch_bone) for p in parts]
            if i + 1 < len(levels):  # the disc below
                z_next, half_next = levels[i + 1][1], levels[i + 1][2]
                top, bottom = zt - half, z_next + half_next
                zc = (top + bottom) / 2
                disc = _Cylinder(self.P(0, self.spine_y(zc), zc), (ax * s, ay * s), (top - bottom) / 2 * sz)
                layers.append(_Layer(disc, BODY, _Tissue(85, 8)))
            canal_points.append(self.P(0, canal_y, zt))
            if zt > -80:  # the cord ends at L1 (conus); below it only fluid and nerve roots
                cord_points.append(self.P(0, canal_y, zt))
        layers.append(_Layer(_Tube(canal_points, 9.0 * s), BODY, _Tissue(15, 3)))
        layers.append(_Layer(_Tube(cord_points, 5.0 * s), label_id("spinal cord"), _Tissue(35, 3)))
        self.parent("bone lesion", _Union(*(layer.shape for layer in layers)), ids=_VERTEBRA_IDS)
        return layers

    def _vertebra_parts(self, zt, half, ax, ay, yb, canal_y, lumbar):
        """Posterior elements: the arch around the canal, the spinous and the transverse processes."""
        P, s, sz = self.P, self.s, self.sz
        arch = _Where(_Cylinder(P(0, canal_y, zt), (15 * s, 13 * s), 0.75 * half * sz),
                      minus=[_Cylinder(P(0, canal_y, zt), (9.5 * s, 8 * s), 2 * half * sz)])
        length, tilt = (30.0, 0.2) if lumbar else (34.0, 0.7)
        direction = np.array([0.0, -math.cos(tilt), -math.sin(tilt)])  # backwards and down
        frame = np.stack([[1.0, 0, 0], direction, np.cross([1.0, 0, 0], direction)], axis=1)
        spinous = _Ellipsoid(P(0, canal_y - 10, zt) + direction * (length / 2) * s, [4.5 * s, length / 2 * s, 7 * s],
                             frame)
        parts = [arch, spinous]
        span = 30.0 if lumbar else 24.0
        for side in (1, -1):
            angle = -side * (15.0 if lumbar else 35.0)  # thoracic processes point back to meet the ribs
            rot = _rotation((0, 0, angle))
            centre = P(side * (ax * 0.45), canal_y + 4, zt) + rot @ np.array([side * span / 2 * s, 0, 0])
            parts.append(_Ellipsoid(centre, [span / 2 * s, 5 * s, 6 * s], rot))
        return parts

    def _ribs(self, rng):
        layers = []
        levels = {n: (z, h) for n, z, h in self.vertebra_levels()}
        ends = [2.8] * 6 + [2.75, 2.55, 2.35, 2.15, 1.6, 1.15]  # angular extent from the spine (radians)
        rib_bone = _Tissue(260, 30, rim_hu=_CORTEX_HU, rim_mm=1.6)
        for k in range(1, 13):
            zt = levels[f"T{k}"][0] + 4.0
            drop = (45.0 + 6.5 * k) * rng.uniform(0.9, 1.1)  # posterior end to anterior end
            radius = (6.0 if k == 1 else 4.0 if k >= 11 else 4.6) * self.s
            for side, name in ((1, "left"), (-1, "right")):
                points = self._rib_path(zt, drop, ends[k - 1] + rng.uniform(-0.08, 0.08), side)
                layers.append(_Layer(_Tube(points, radius), label_id(f"{name} rib {k}"), rib_bone))
        front = [self.P(0, 0, z) for z in (40.0, 120.0, 210.0)]
        for p in front:  # sternum sits in the anterior chest wall
            p[1] = float(self.cavity_semi(np.float32(p[2]))[1]) + 7.0 * self.s
        layers.append(_Layer(_Tube(front, [8.0 * self.s, 9.0 * self.s, 10.0 * self.s]), label_id("sternum"),
                             _Tissue(280, 30, rim_hu=600, rim_mm=1.5)))
        return layers

    def _rib_path(self, zt, drop, end, side):
        """Rib centreline: from the costovertebral joint round the cavity wall, sloping down."""
        ax, ay = self._vertebra_dims(zt)
        start = 0.32
        points = [self.P(side * ax * 0.8, self.spine_y(zt) - 0.3 * ay, zt)]
        for phi in np.linspace(start, end, max(3, int(np.ceil((end - start) / 0.12)) + 1)):
            z = (zt - drop * (phi - start) / (np.pi - start)) * self.sz
            a, b_front, b_back = (float(v) for v in self.cavity_semi(np.float32(z)))
            sx, cy = math.sin(phi), -math.cos(phi)
            b = b_front if cy >= 0 else b_back
            rho = 1.0 / math.sqrt((sx / a) ** 2 + (cy / b) ** 2) + 5.0 * self.s  # just outside the cavity
            points.append(np.array([side * rho * sx, rho * cy, z]))
        return points


class _TorsoLayer:
    """Skin to cavity in one pass: subcutaneous fat, muscle wall, and inside the cavity the lungs
    (by lobe) above the diaphragm, visceral fat below it."""

    frame = "anat"

    def __init__(self, anatomy: _Anatomy):
        self.anatomy = anatomy
        self.lo, self.hi = np.full(3, -np.inf), np.full(3, np.inf)

    def render(self, region):
        an = self.anatomy
        x, y, z = region.coords("anat")
        a, b = an.body_semi(z)
        inside = (x / a) ** 2 + (y / b) ** 2 < 1.0
        if not inside.any():
            return None
        fat = an.fat_mm
        wall_b = np.where(y >= 0, b - 1.1 * fat, b - 0.5 * fat)
        muscle = (x / (a - fat)) ** 2 + (y / wall_b) ** 2 < 1.0
        cavity = an.cavity_q2(x, y, z) < 1.0
        dome = an.diaphragm_z(x, y)
        lungs = cavity & (z > dome) & (z < an.apex)
        label = np.full(region.shape, BODY, np.uint8)
        hu = np.full(region.shape, _FAT.hu, np.float32)
        tex = np.full(region.shape, _FAT.tex, np.float32)
        diaphragm = cavity & (np.abs(z - dome + 2.0) <= 2.0)  # a 4 mm muscle sheet under the lungs
        for mask, tissue in ((muscle, _MUSCLE), (cavity, _VISCERAL_FAT), (diaphragm, _MUSCLE)):
            hu[mask], tex[mask] = tissue.hu, tissue.tex
        label[lungs] = an.lobes(x[lungs], y[lungs], z[lungs])
        hu[lungs], tex[lungs] = -860.0, 25.0
        return inside, label, hu, tex


# ---------------------------------------------------------------- lesions

_LESION_TISSUES = {
    "hepatic tumor": lambda rng: _Tissue(rng.uniform(20, 30), 10),  # hypodense vs liver ~60
    "pancreatic tumor": lambda rng: _Tissue(rng.uniform(10, 20), 8),  # hypodense vs pancreas ~40
    "lung tumor": lambda rng: _Tissue(rng.uniform(25, 40), 15),  # solid nodule in air
    "colon cancer primaries": lambda rng: _Tissue(rng.uniform(35, 50), 10),  # soft-tissue mass in the lumen
    # Lytic (~100 HU, darker than the vertebra) or sclerotic (~800 HU, brighter).
    "bone lesion": lambda rng: (_Tissue(rng.uniform(80, 120), 15) if rng.random() < 0.5
                                else _Tissue(rng.uniform(700, 900), 30)),
    "left kidney cyst": lambda rng: _Tissue(rng.uniform(4, 10), 2),
    "right kidney cyst": lambda rng: _Tissue(rng.uniform(4, 10), 2),
}


# The largest lesion each parent organ of this phantom can hold (mm): radii are drawn below it, so
# placement rarely has to shrink a lesion (each failed try costs a few painter passes).
_RADIUS_CAP_MM = {"hepatic tumor": 45.0, "lung tumor": 30.0, "pancreatic tumor": 10.0, "colon cancer primaries": 12.0,
                  "bone lesion": 8.0, "left kidney cyst": 12.0, "right kidney cyst": 12.0}


def _fibonacci_sphere(n: int) -> np.ndarray:
    i = np.arange(n) + 0.5
    polar = np.arccos(1 - 2 * i / n)
    azimuth = np.pi * (1 + 5**0.5) * i
    return np.stack([np.cos(azimuth) * np.sin(polar), np.sin(azimuth) * np.sin(polar), np.cos(polar)], axis=1)


# Probe points, in units of a lesion's reach: a dense outer shell, an inner shell, the centre.
_PROBES = np.concatenate([_fibonacci_sphere(96), 0.5 * _fibonacci_sphere(24), np.zeros((1, 3))])


def _labels_at(anatomy: _Anatomy, fields: _Fields, points: np.ndarray) -> np.ndarray:
    canvas = _Points(points, fields)
    for layer in anatomy.layers:
        _paint(canvas, layer)
    return canvas.labels_in_input_order()


def _place_lesions(specs, anatomy, fields, fov_lo, fov_hi, spacing, seed) -> list[_Layer]:
    """Lesion layers: each lesion (plus one voxel of margin) inside one parent organ and the view."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, _STREAM_LESIONS]))
    margin = float(np.max(spacing))  # ring voxels around the voxelised lesion stay in the parent
    placed: list[_Lesion] = []
    layers = []
    for spec in specs:
        for _ in range(spec.count):
            lesion, name = _fit_lesion(spec, rng, anatomy, fields, fov_lo, fov_hi, margin, placed)
            placed.append(lesion)
            layers.append(_Layer(lesion, label_id(name), _LESION_TISSUES[name](rng)))
    return layers


def _fit_lesion(spec, rng, anatomy, fields, fov_lo, fov_hi, margin, placed):
    names = list(TUMOR_KINDS[spec.kind])
    rng.shuffle(names)
    low, high = spec.radius_mm
    for name in names:
        radius = rng.uniform(low, max(low, min(high, _RADIUS_CAP_MM[name])))
        for attempt in range(8):
            centre = _find_centre(name, radius, rng, anatomy, fields, fov_lo, fov_hi, margin, placed)
            if centre is not None:
                return _Lesion(centre, radius, rng), name
            if radius == low and attempt >= 4:
                break
            radius = max(low, radius * 0.75)
    raise ValueError(
        f"could not fit a {spec.kind} lesion of radius >= {low:g} mm (plus one voxel, {margin:g} mm, of "
        "margin) inside its parent organ within the field of view; the organ may lie outside the view "
        "or be too small at this spacing. Enlarge the field of view, use a finer spacing, lower "
        "--tumor-radius-mm or ask for fewer lesions."
    )


def _find_centre(name, radius, rng, anatomy, fields, fov_lo, fov_hi, margin, placed):
    """A lesion centre whose probe ball (radius + lobulation + margin) lies in one parent label, or None.

    Random candidates inside the parent are pushed towards its interior (along the mean direction
    of the probes that are still inside) until one fits: thin organs (pancreas, colon) get found.
    """
    parent_ids, box_lo, box_hi = anatomy.parents[name]
    reach = radius * (1 + _LOBULATION) + margin
    lo = np.maximum(box_lo - _DISP_MAX_MM, fov_lo + reach)
    hi = np.minimum(box_hi + _DISP_MAX_MM, fov_hi - reach)
    if np.any(lo >= hi):
        return None
    centres = rng.uniform(lo, hi, size=(1024, 3))
    centres = centres[np.isin(_labels_at(anatomy, fields, centres), parent_ids)][:64]
    for _ in range(6):
        for other in placed:  # lesions never touch each other
            centres = centres[np.linalg.norm(centres - other.centre, axis=1) > reach + other.reach]
        if not len(centres):
            return None
        probes = centres[:, None, :] + reach * _PROBES[None]
        found = _labels_at(anatomy, fields, probes.reshape(-1, 3)).reshape(len(centres), -1)
        own = found[:, -1]  # the last probe is the centre itself
        same = (found == own[:, None]) & np.isin(own, parent_ids)[:, None]
        fits = same.all(axis=1)
        if fits.any():
            return centres[int(np.argmax(fits))]
        shift = (same[:, :, None] * _PROBES[None]).mean(axis=1) * reach
        centres = np.clip(centres + shift, lo, hi)
    return None


# ---------------------------------------------------------------- rendering and finishing


def _render(layers, axes, fields: _Fields, spacing: np.ndarray, seed: int):
    xs, ys, zs = axes
    shape = (len(xs), len(ys), len(zs))
    labels = np.zeros(shape, np.uint8)
    ct = np.empty(shape, np.float32)
    step = max(1, _SLAB_VOXELS // (shape[0] * shape[1]))
    for z0 in range(0, shape[2], step):
        grid = _Grid(xs, ys, zs[z0 : z0 + step], fields)
        for layer in layers:
            _paint(grid, layer)
        labels[..., z0 : z0 + step] = grid.labels
        ct[..., z0 : z0 + step] = _textured(grid, spacing)
    # Partial volume, cheaply: the scanner's point spread softens every edge by about a third of a voxel.
    ct = ndimage.gaussian_filter(ct, 0.35, truncate=3.0)
    noise_rng = np.random.default_rng(np.random.SeedSequence([seed, _STREAM_NOISE]))
    sigma = np.float32(_noise_sigma(spacing))
    for z0 in range(0, shape[2], step):  # drawn slice by slice (z-major): the same noise for any slab size
        slab = ct[..., z0 : z0 + step]
        slab += sigma * noise_rng.standard_normal((slab.shape[2], *shape[:2]), np.float32).transpose(1, 2, 0)
    ct[labels == 0] = -1000.0  # MAISI convention: nothing but air outside the body
    np.clip(ct, -1000.0, 1500.0, out=ct)
    return ct, labels


def _noise_sigma(spacing) -> float:
    """Quantum noise (HU std) falls with the square root of the voxel volume: ~10 HU at 1.5 mm."""
    volume = float(np.prod(spacing))
    return float(np.clip(10.0 * math.sqrt(1.5**3 / volume), 2.0, 25.0))


def _textured(grid: _Grid, spacing) -> np.ndarray:
    """Base HU + per-tissue texture, lung and liver vessels, and the dependent lung density."""
    finest = float(np.max(spacing))
    ct = grid.hu + grid.tex * grid.fields.texture_on_axes(*grid.axes, finest)
    lung = np.isin(grid.labels, LUNG_IDS)
    liver = grid.labels == label_id("liver")
    if lung.any() or liver.any():
        vessels = _vessel_map(grid, finest)
        ct[lung] += (40.0 - ct[lung]) * vessels[lung]
        ct[liver] += 90.0 * vessels[liver]
    if lung.any():
        posterior = np.clip(-np.broadcast_to(grid.anat[1], grid.shape)[lung] / 100.0, 0.0, 1.0)
        ct[lung] += 60.0 * posterior  # gravity-dependent density, patient supine
    return ct


def _vessel_map(grid: _Grid, finest_mm: float) -> np.ndarray:
    """Soft indicator (0..1) of thin winding tubes: where two smooth random fields both cross zero."""
    scale = max(6.0, 2.0 * finest_mm)
    f1 = grid.fields.field("vessels-a", scale / 2).on_axes(*grid.axes)
    f2 = grid.fields.field("vessels-b", scale / 2).on_axes(*grid.axes)
    width = 0.22
    return np.clip(1.0 - np.maximum(np.abs(f1), np.abs(f2)) / width, 0.0, 1.0)
