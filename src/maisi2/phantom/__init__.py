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

Layout: this module holds the public API; `fields` the seeded noise and the canvases, `shapes` the
analytic shapes, tissues and layers, `anatomy` the torso template, `lesions` the lesion kinds and
their placement, `render` the slab-by-slab painting and finishing (texture, vessels, noise).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from maisi2.errors import InvalidInput, OutputExists
from maisi2.phantom.anatomy import _Anatomy
from maisi2.phantom.fields import _Fields
from maisi2.phantom.lesions import TUMOR_KINDS, _place_lesions
from maisi2.phantom.render import _render

__all__ = ["TumorSpec", "TUMOR_KINDS", "make_phantom", "parse_tumor_specs", "write_phantom"]


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
            raise InvalidInput(f"unknown tumour kind {self.kind!r}; choose from {', '.join(TUMOR_KINDS)}")
        if isinstance(self.count, bool) or not isinstance(self.count, (int, np.integer)) or self.count < 0:
            raise InvalidInput(f"tumour count must be a whole number >= 0, got {self.count!r}")
        try:
            low, high = (float(r) for r in self.radius_mm)
        except (TypeError, ValueError):
            raise InvalidInput(f"radius_mm must be two numbers (MIN MAX, mm), got {self.radius_mm!r}") from None
        if not (math.isfinite(high) and 0 < low <= high):
            raise InvalidInput(f"radius_mm must satisfy 0 < MIN <= MAX (finite, mm), got {self.radius_mm!r}")
        object.__setattr__(self, "radius_mm", (low, high))


def parse_tumor_specs(items: Sequence[str], radius_mm: Sequence[float] | None = None) -> list[TumorSpec]:
    """Parse CLI lesion requests such as ``["hepatic:2", "lung", "bone:1"]`` (count defaults to 1)."""
    specs = []
    for item in items:
        kind, sep, count_text = str(item).strip().partition(":")
        kind = kind.strip().lower()
        if kind not in TUMOR_KINDS:
            raise InvalidInput(
                f"unknown tumour kind {kind!r} in {item!r}; choose from {', '.join(TUMOR_KINDS)} "
                "written KIND or KIND:COUNT, e.g. hepatic:2"
            )
        count = 1
        if sep:
            try:
                count = int(count_text)
            except ValueError:
                raise InvalidInput(
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
    from maisi2.volume_io import ras_affine

    shape, spacing = _check_grid(shape, spacing)
    seed = _check_seed(seed)
    tumors = list(tumors)
    if not all(isinstance(t, TumorSpec) for t in tumors):
        raise InvalidInput("tumors must be TumorSpec objects (see parse_tumor_specs for 'hepatic:2' strings)")
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
    from maisi2.volume_io import Volume, save_ct, save_label_map

    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidInput(f"{out_dir} exists and is not a folder; --out names the folder to write into")
    ct_path, label_path = out_dir / "ct.nii.gz", out_dir / "label.nii.gz"
    for path in (ct_path, label_path):
        check_writable(path, overwrite)
    ct, labels, affine = make_phantom(shape, spacing, tumors, seed)
    save_label_map(label_path, Volume(labels, affine), overwrite=overwrite)
    save_ct(ct_path, Volume(ct, affine), overwrite=overwrite)
    return ct_path, label_path


# Probability that a phantom of a random set carries a lesion of each kind (one lesion each).
# The largest phantom: 2^30 voxels (1024^3; the release's largest CT is 512 x 512 x 768 = 2^27.6).
# Making one takes tens of bytes of float fields per voxel, so bigger requests are typos, not phantoms.
MAX_PHANTOM_VOXELS = 2**30
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
        raise InvalidInput("a phantom set needs count >= 1 and at least one (shape, spacing) grid")
    out_dir = Path(out_dir).expanduser()
    datalist = out_dir / "datalist.jsonl"
    if datalist.exists() and not overwrite:
        raise OutputExists(f"{datalist} already exists; pass --overwrite to replace the set")
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
        raise InvalidInput(f"shape must be three positive integers (voxels along x, y, z), got {shape!r}")
    if math.prod(dims) > MAX_PHANTOM_VOXELS:
        raise InvalidInput(f"shape {' x '.join(map(str, dims))} is {math.prod(dims):.3g} voxels; a phantom has at most "
                         f"{MAX_PHANTOM_VOXELS:.3g} (e.g. 1024 x 1024 x 1024), which a CPU can make in memory")
    try:
        mm = np.asarray(spacing, dtype=np.float64)
    except (TypeError, ValueError):
        mm = np.zeros(0)
    if mm.shape != (3,) or not np.all(np.isfinite(mm)) or np.any(mm <= 0):
        raise InvalidInput(f"spacing must be three positive finite numbers (mm per voxel), got {spacing!r}")
    return dims, mm


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InvalidInput(f"seed must be a whole number >= 0, got {seed!r}")
    return int(seed)
