"""Tumour editing on any MAISI label map: add, remove, scale and augment tumours inside their organs.

Pure functions over a label array (X, Y, Z) and its voxel spacing in mm. Each returns a new array
(the input is never touched) and a list of `TumorChange` records saying what changed: the kind,
the MAISI tumour label, its parent organ, its centre (voxel index and mm from the first voxel) and
its volume in mL counted from the voxels written. The CLI (`maisi2 masks edit`), `maisi2 generate
--tumors` and the web app are thin wrappers over `edit_tumors`.

Rules:

- A tumour lives in its parent organ (`labels.tumor_parent_ids`): hepatic -> liver, pancreatic ->
  pancreas, colon -> colon, kidney cysts -> the kidney they sit in, bone lesions -> the one bone
  they sit in, lung tumours -> the lungs (any lobe: a nodule may cross a fissure).
- `add_tumor` places the centre where the organ is at least `radius_mm` deep (its distance to the
  organ's surface, in mm), unless `at` names a voxel, which must lie inside the organ. An absent
  organ, or one nowhere `radius_mm` deep, is refused with the largest radius that would fit.
  The shape is a ball whose radius varies smoothly with direction (seeded, +-`lobulation`),
  clipped to the organ, keeping the piece connected to the centre.
- `remove_tumors_of` gives a kind's voxels back to the parent organ (`labels.remove_tumors`).
- `scale_tumors` scales each tumour about its centroid; grown voxels stay inside the organ.
- `remove_tumor_at` / `scale_tumor_at` do the same to ONE tumour: the connected tumour (one label's
  6-connected component) holding the voxel `at`, or else the nearest one within `within_mm` of it
  (a click in a viewer lands beside a small tumour as often as on it); none there is refused with
  where the nearest tumour is. Its neighbours, of any kind, are left as they were.
- `augment_tumors` perturbs existing tumours the way the release's augmentation does: a random
  elastic deformation (an affine one for bone lesions, MONAI's `Rand3DElastic` / `RandAffine`,
  nearest), redrawn until the deformed tumour keeps at least 80 % of its voxels inside the organ
  (75 % after 40 draws), then closed by one voxel and clipped to the organ again.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

from maisi2 import labels as L
from maisi2.errors import InvalidInput

__all__ = [
    "TumorChange",
    "AddTumor",
    "TumorEdits",
    "add_tumor",
    "remove_tumors_of",
    "scale_tumors",
    "tumor_at",
    "remove_tumor_at",
    "scale_tumor_at",
    "augment_tumors",
    "edit_tumors",
    "parse_add",
    "parse_scale",
    "parse_at",
    "parse_scale_at",
    "tumor_centre",
    "implant_random_balls",
]

LOBULATION = 0.2  # the shape's radius varies by up to +-20 % with direction
AUGMENT_KEEP = ((40, 0.80), (80, 0.75))  # (draws, fraction kept inside the organ) as in the release
WITHIN_MM = 10.0  # how far from a tumour a position may be and still pick it (a click beside a small one)


@dataclass(frozen=True)
class TumorChange:
    """One tumour changed. centre_voxel: (x, y, z) array index (centroid, may be fractional);
    centre_mm: centre_voxel x spacing (mm from the first voxel's centre)."""

    action: str  # "added", "removed", "scaled", "augmented", "unchanged"
    kind: str
    label: str
    parent_organ: str
    centre_voxel: tuple[float, float, float]
    centre_mm: tuple[float, float, float]
    voxels: int
    volume_ml: float
    volume_before_ml: float | None = None
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class AddTumor:
    """Add one tumour of `kind`, radius in mm, optionally centred at voxel `at` (x, y, z)."""

    kind: str
    radius_mm: float = 10.0
    at: tuple[int, int, int] | None = None


@dataclass(frozen=True)
class TumorEdits:
    """What `edit_tumors` does, in this order: remove the tumour at each position, scale the tumour
    at each position, remove kinds, scale kinds, augment, add. Positions are voxel indices (x, y, z),
    each looked up in the mask as edited so far (`tumor_at`, within `within_mm`)."""

    add: tuple[AddTumor, ...] = ()
    remove: tuple[str, ...] = ()
    scale: tuple[tuple[str, float], ...] = ()
    augment: bool = False
    seed: int = 0
    remove_at: tuple[tuple[int, int, int], ...] = ()
    scale_at: tuple[tuple[tuple[int, int, int], float], ...] = ()
    within_mm: float = WITHIN_MM

    def is_empty(self) -> bool:
        return not (self.add or self.remove or self.scale or self.augment or self.remove_at or self.scale_at)


# -- the kind table ----------------------------------------------------------------------------

def _kind_ids(kind: str) -> tuple[int, ...]:
    return tuple(L.label_id(name) for name in L.TUMOR_KINDS[kind])


def _parent_to_tumor(kind: str) -> dict[int, int]:
    """Parent organ id -> the tumour id a tumour of `kind` takes there."""
    return {parent: tumor for tumor in _kind_ids(kind) for parent in L.tumor_parent_ids(tumor)}


def _organ_words(kind: str) -> str:
    return {"lung": "the lungs", "bone": "a bone", "kidney-cyst": "a kidney"}.get(
        kind, L.label_name(L.tumor_parent_ids(_kind_ids(kind)[0])[0]))


def _confine_ids(kind: str, parent: int) -> tuple[int, ...]:
    """Labels a tumour of `kind` whose centre lies in `parent` may cover."""
    return L.LUNG_IDS if kind == "lung" else (parent,)


def _check_labels(labels: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    if labels.ndim != 3 or not np.issubdtype(labels.dtype, np.integer):
        raise InvalidInput(f"a label map is a 3D integer array, got {labels.dtype} of shape {labels.shape}")
    spacing = np.asarray(spacing, dtype=np.float64)
    if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InvalidInput(f"spacing must be three positive numbers (mm), got {spacing.tolist()}")
    return labels, spacing


def _change(action, kind, tumor_id, parent_id, mask, spacing, before=None, note="") -> TumorChange:
    centre = tumor_centre(mask)
    voxels = int(np.count_nonzero(mask))
    return TumorChange(action, kind, L.label_name(tumor_id), L.label_name(parent_id), centre,
                       tuple(round(float(c * s), 2) for c, s in zip(centre, spacing)), voxels,
                       round(_ml(voxels, spacing), 4), None if before is None else round(before, 4), note)


def _ml(voxels: int, spacing) -> float:
    return float(voxels) * float(np.prod(spacing)) / 1000.0


def tumor_centre(mask: np.ndarray) -> tuple[float, float, float]:
    """Centroid (x, y, z) voxel index of a boolean mask, rounded to 0.1 voxel."""
    if not mask.any():
        return (float("nan"),) * 3
    return tuple(round(float(c), 1) for c in ndimage.center_of_mass(mask))


def _majority(values: np.ndarray, default: int) -> int:
    if values.size == 0:
        return default
    ids, counts = np.unique(values, return_counts=True)
    return int(ids[np.argmax(counts)])


# -- add -------------------------------------------------------------------------------------

def add_tumor(labels: np.ndarray, spacing: Sequence[float], kind: str, radius_mm: float,
              at: Sequence[int] | None = None, seed: int = 0,
              lobulation: float = LOBULATION) -> tuple[np.ndarray, list[TumorChange]]:
    """One tumour of `kind` (a key of `labels.TUMOR_KINDS`) inside its parent organ.

    radius_mm: the mean radius; at: the centre voxel (x, y, z), inside the organ; else a random
    (seeded) centre at least `radius_mm` deep in the organ. Raises ValueError (one line saying
    what to change) when the organ is absent, too small, or `at` lies outside it.
    """
    labels, spacing = _check_labels(labels, spacing)
    kind = L.tumor_kind(kind)
    radius_mm = float(radius_mm)
    if not math.isfinite(radius_mm) or radius_mm < float(spacing.max()) / 2:
        raise InvalidInput(f"a {kind} tumour's radius must be at least half a voxel ({spacing.max() / 2:g} mm "
                         f"at this spacing), got {radius_mm:g} mm")
    parents = _parent_to_tumor(kind)
    rng = np.random.default_rng(seed)
    depth = _organ_depth(labels, tuple(parents), spacing, kind)
    if depth is None:
        raise InvalidInput(f"this mask has no {_organ_words(kind)}, so it cannot hold a {kind} tumour; "
                         "choose a mask that contains it (or another tumour kind)")
    deepest = float(depth.max())
    if deepest < radius_mm:
        raise InvalidInput(f"{_organ_words(kind)} is too small for a {kind} tumour of radius {radius_mm:g} mm "
                         f"(it is at most {deepest:.1f} mm deep); ask for radius <= {deepest:.0f} mm")
    centre = _chosen_centre(labels, depth, radius_mm, at, rng, kind, parents)
    parent = int(labels[centre])
    region = np.isin(labels, _confine_ids(kind, parent))
    shape = _irregular_ball(labels.shape, centre, radius_mm, spacing, rng, lobulation) & region
    shape = _component_at(shape, centre)
    out = labels.copy()
    out[shape] = parents[parent]
    return out, [_change("added", kind, parents[parent], parent, shape, spacing)]


def _organ_depth(labels, parents, spacing, kind) -> np.ndarray | None:
    """Distance (mm) from each organ voxel to the nearest voxel outside it; None without the organ.

    Distinct parent labels that touch (a rib on a vertebra, the two kidneys) count as each other's
    outside, so a depth is always within one organ (the lung lobes count as one organ).
    """
    organ = np.isin(labels, parents)
    if not organ.any():
        return None
    if kind != "lung":
        for axis in range(3):  # voxels whose neighbour holds another parent label are surface
            a = [slice(None)] * 3
            b = [slice(None)] * 3
            a[axis], b[axis] = slice(None, -1), slice(1, None)
            differ = (labels[tuple(a)] != labels[tuple(b)]) & organ[tuple(a)] & organ[tuple(b)]
            organ[tuple(a)] &= ~differ
            organ[tuple(b)] &= ~differ
    box = _grown_box(organ, 1)
    depth = np.zeros(labels.shape, dtype=np.float32)
    depth[box] = ndimage.distance_transform_edt(organ[box], sampling=spacing)
    return depth


def _grown_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    lo = np.argwhere(mask).min(axis=0) - margin
    hi = np.argwhere(mask).max(axis=0) + margin + 1
    return tuple(slice(max(int(a), 0), min(int(b), n)) for a, b, n in zip(lo, hi, mask.shape))


def _chosen_centre(labels, depth, radius_mm, at, rng, kind, parents) -> tuple[int, int, int]:
    if at is None:
        candidates = np.argwhere(depth >= radius_mm)
        return tuple(int(v) for v in candidates[rng.integers(len(candidates))])
    try:
        centre = tuple(int(round(float(v))) for v in at)
    except (TypeError, ValueError):
        raise InvalidInput(f"at must be three voxel indices x,y,z, got {at!r}") from None
    if len(centre) != 3 or any(not 0 <= c < n for c, n in zip(centre, labels.shape)):
        raise InvalidInput(f"at={at} is outside the mask (shape {labels.shape}); give a voxel index x,y,z inside it")
    if int(labels[centre]) not in parents:
        deepest = tuple(int(v) for v in np.unravel_index(int(np.argmax(depth)), depth.shape))
        raise InvalidInput(f"at={centre} lies in {L.label_name(int(labels[centre]))!r}, not in {_organ_words(kind)}; "
                         f"a {kind} tumour must start inside it (its deepest voxel is {deepest})")
    return centre


def _irregular_ball(shape, centre, radius_mm, spacing, rng, lobulation) -> np.ndarray:
    """A star-shaped blob: radius(direction) = radius_mm x (1 + lobulation x f(direction)), where f
    is a seeded sum of smooth waves over the unit sphere scaled into [-1, 1]."""
    reach = radius_mm * (1 + lobulation)
    half = np.ceil(reach / spacing).astype(int) + 1
    box = tuple(slice(max(c - h, 0), min(c + h + 1, n)) for c, h, n in zip(centre, half, shape))
    offsets = np.meshgrid(*[(np.arange(s.start, s.stop) - c) * sp for s, c, sp in zip(box, centre, spacing)],
                          indexing="ij")
    dist = np.sqrt(sum(o**2 for o in offsets))
    unit = [o / np.maximum(dist, 1e-6) for o in offsets]
    waves = rng.normal(size=(6, 3)) * 1.5
    phases = rng.uniform(0, 2 * np.pi, size=6)
    weights = rng.uniform(0.5, 1.0, size=6)
    f = sum(w * np.cos(sum(k[a] * unit[a] for a in range(3)) + p) for k, p, w in zip(waves, phases, weights))
    f = f / weights.sum()
    out = np.zeros(shape, dtype=bool)
    out[box] = dist <= radius_mm * (1 + lobulation * f)
    return out


def _component_at(mask: np.ndarray, centre) -> np.ndarray:
    components, _ = ndimage.label(mask)
    return components == components[tuple(centre)]


# -- remove, scale ---------------------------------------------------------------------------

def _tumor_components(labels: np.ndarray, kind: str):
    """(tumour id, boolean mask) for each connected tumour of `kind`."""
    for tumor in _kind_ids(kind):
        lesion = labels == tumor
        if not lesion.any():
            continue
        components, count = ndimage.label(lesion)
        for index in range(1, count + 1):
            yield tumor, components == index


def remove_tumors_of(labels: np.ndarray, spacing: Sequence[float], kind: str) -> tuple[np.ndarray, list[TumorChange]]:
    """Every tumour of `kind` given back to its parent organ (`labels.remove_tumors`)."""
    labels, spacing = _check_labels(labels, spacing)
    kind = L.tumor_kind(kind)
    out = L.remove_tumors(labels, only=_kind_ids(kind))
    changes = [_change("removed", kind, tumor, _majority(out[mask], L.BODY), mask, spacing)
               for tumor, mask in _tumor_components(labels, kind)]
    return out, changes


def scale_tumors(labels: np.ndarray, spacing: Sequence[float], kind: str,
                 factor: float) -> tuple[np.ndarray, list[TumorChange]]:
    """Each tumour of `kind` scaled by `factor` (in length) about its centroid, kept inside its organ."""
    labels, spacing = _check_labels(labels, spacing)
    kind = L.tumor_kind(kind)
    factor = _checked_factor(factor)
    out = L.remove_tumors(labels, only=_kind_ids(kind))
    changes = [_scale_one(out, kind, tumor, mask, factor, spacing) for tumor, mask in _tumor_components(labels, kind)]
    return out, changes


def _checked_factor(factor) -> float:
    factor = float(factor)
    if not (math.isfinite(factor) and 0.1 <= factor <= 4.0):
        raise InvalidInput(f"a scale factor is a length ratio between 0.1 and 4, got {factor:g}")
    return factor


def _scale_one(out: np.ndarray, kind: str, tumor: int, mask: np.ndarray, factor: float, spacing) -> TumorChange:
    """Paint the tumour `mask` scaled by `factor` into `out`, which holds the mask with it given back to
    its organ; grown voxels stay inside that organ."""
    parent = _majority(out[mask], L.BODY)
    scaled = _scaled(mask, factor) & np.isin(out, (*_confine_ids(kind, parent), tumor))
    out[scaled] = tumor
    return _change("scaled", kind, tumor, parent, scaled, spacing, _ml(mask.sum(), spacing),
                   note=f"x{factor:g} in length")


# -- one tumour, picked by position --------------------------------------------------------------

def tumor_at(labels: np.ndarray, spacing: Sequence[float], at: Sequence[int], within_mm: float = WITHIN_MM,
             kind: str | None = None) -> tuple[int, np.ndarray]:
    """(tumour label id, boolean mask) of the connected tumour holding voxel `at` (x, y, z), or else
    the one with a voxel nearest to it (distance in mm) if that is at most `within_mm` away.

    kind: only tumours of that kind count. Raises InvalidInput (where the nearest tumour is) when
    no tumour is that close, or the mask has none.
    """
    labels, spacing = _check_labels(labels, spacing)
    centre = _voxel(at, labels.shape)
    within_mm = float(within_mm)
    if not (math.isfinite(within_mm) and within_mm >= 0):
        raise InvalidInput(f"the distance to search for a tumour must be >= 0 mm, got {within_mm:g}")
    ids = _kind_ids(L.tumor_kind(kind)) if kind is not None else L.TUMOR_IDS
    what = f"{L.tumor_kind(kind)} tumour" if kind is not None else "tumour"
    tumorous = np.isin(labels, ids)
    if not tumorous.any():
        raise InvalidInput(f"this mask has no {what} to pick")
    if tumorous[centre]:
        nearest, distance = centre, 0.0
    else:  # tumours are small: a distance to each of their voxels is cheaper than a distance map
        nearest, distance = _nearest_voxel(tumorous, centre, spacing)
        if distance > within_mm:
            raise InvalidInput(f"no {what} within {within_mm:g} mm of voxel {list(centre)}; the nearest is "
                               f"{L.label_name(int(labels[nearest]))!r} at voxel {list(nearest)}, "
                               f"{distance:.0f} mm away")
    tumor = int(labels[nearest])
    return tumor, _component_at(labels == tumor, nearest)


def _voxel(at, shape) -> tuple[int, int, int]:
    try:
        voxel = tuple(int(round(float(v))) for v in at)
    except (TypeError, ValueError):
        raise InvalidInput(f"a position is three voxel indices x,y,z, got {at!r}") from None
    if len(voxel) != 3 or any(not 0 <= c < n for c, n in zip(voxel, shape)):
        raise InvalidInput(f"voxel {list(at)} is outside the mask (shape {tuple(shape)}); give x,y,z inside it")
    return voxel


def _nearest_voxel(mask: np.ndarray, centre, spacing) -> tuple[tuple[int, int, int], float]:
    """The voxel of `mask` nearest `centre` (in mm) and its distance."""
    points = np.argwhere(mask)
    distances = np.sqrt((((points - np.asarray(centre)) * spacing) ** 2).sum(axis=1))
    best = int(np.argmin(distances))
    return tuple(int(v) for v in points[best]), float(distances[best])


def remove_tumor_at(labels: np.ndarray, spacing: Sequence[float], at: Sequence[int], within_mm: float = WITHIN_MM,
                    kind: str | None = None) -> tuple[np.ndarray, list[TumorChange]]:
    """The one tumour `tumor_at` picks given back to its parent organ (as `remove_tumors_of` does)."""
    labels, spacing = _check_labels(labels, spacing)
    tumor, mask = tumor_at(labels, spacing, at, within_mm, kind)
    given_back = L.remove_tumors(labels, only=(tumor,))  # per component: the same for this one alone
    out = labels.copy()
    out[mask] = given_back[mask]
    kind = L.tumor_kind(L.label_name(tumor))
    return out, [_change("removed", kind, tumor, _majority(out[mask], L.BODY), mask, spacing)]


def scale_tumor_at(labels: np.ndarray, spacing: Sequence[float], at: Sequence[int], factor: float,
                   within_mm: float = WITHIN_MM, kind: str | None = None) -> tuple[np.ndarray, list[TumorChange]]:
    """The one tumour `tumor_at` picks scaled by `factor` (in length) about its centroid, inside its organ."""
    labels, spacing = _check_labels(labels, spacing)
    factor = _checked_factor(factor)
    tumor, mask = tumor_at(labels, spacing, at, within_mm, kind)
    out = labels.copy()
    out[mask] = L.remove_tumors(labels, only=(tumor,))[mask]
    return out, [_scale_one(out, L.tumor_kind(L.label_name(tumor)), tumor, mask, factor, spacing)]


def _scaled(mask: np.ndarray, factor: float) -> np.ndarray:
    """`mask` scaled about its centroid (nearest), computed in a box around it."""
    centre = np.array(ndimage.center_of_mass(mask))
    lo, hi = np.argwhere(mask).min(axis=0), np.argwhere(mask).max(axis=0) + 1
    half = np.ceil(np.maximum(centre - lo, hi - centre) * max(factor, 1.0)).astype(int) + 1
    box = tuple(slice(max(int(c) - h, 0), min(int(c) + h + 1, n)) for c, h, n in zip(centre, half, mask.shape))
    start = np.array([s.start for s in box])
    # output voxel p samples the input at centre + (p - centre) / factor (box coordinates)
    local_centre = centre - start
    matrix = np.full(3, 1.0 / factor)
    offset = local_centre - local_centre / factor
    src = np.zeros([s.stop - s.start for s in box], dtype=np.uint8)
    src[...] = mask[box]
    out = np.zeros_like(mask)
    out[box] = ndimage.affine_transform(src, matrix, offset=offset, order=0, mode="constant", cval=0) > 0
    return out


# -- augment ---------------------------------------------------------------------------------

def augment_tumors(labels: np.ndarray, spacing: Sequence[float], seed: int = 0,
                   kinds: Sequence[str] | None = None) -> tuple[np.ndarray, list[TumorChange]]:
    """The release's tumour augmentation: each present tumour label deformed at random (elastic;
    affine for bone lesions) until it keeps >= 80 % of its voxels inside the organ (75 % after 40
    draws, given up after 80: the tumour is left as it was and recorded "unchanged")."""
    labels, spacing = _check_labels(labels, spacing)
    kinds = list(L.TUMOR_KINDS) if kinds is None else [L.tumor_kind(k) for k in kinds]
    out = labels.copy()
    changes = []
    for kind in kinds:
        for tumor in _kind_ids(kind):
            lesion = out == tumor
            if not lesion.any():
                continue
            rng_seed = int(np.random.default_rng([seed, tumor]).integers(2**31))
            base = L.remove_tumors(out, only=(tumor,))
            parent = _majority(base[lesion], L.BODY)
            organ = np.isin(base, _confine_ids(kind, parent)) | lesion
            moved, draws = _deformed_inside(lesion, organ, kind, rng_seed)
            before = _ml(lesion.sum(), spacing)
            if moved is None:
                changes.append(_change("unchanged", kind, tumor, parent, lesion, spacing, before,
                                       note="no deformation kept 75 % of the tumour inside its organ in 80 draws"))
                continue
            out = base
            out[moved] = tumor
            changes.append(_change("augmented", kind, tumor, parent, moved, spacing, before,
                                   note=f"{'affine' if kind == 'bone' else 'elastic'}, draw {draws}"))
    return out, changes


def _deformed_inside(lesion: np.ndarray, organ: np.ndarray, kind: str, seed: int):
    """(deformed lesion inside `organ`, draws used), or (None, draws) when no draw keeps enough."""
    box = _grown_box(lesion, 8)
    local, inside = lesion[box], organ[box]
    transform = _random_deformation(kind, seed)
    size = int(local.sum())
    image = local[None].astype(np.float32)
    draws = 0
    for limit, keep in AUGMENT_KEEP:
        while draws < limit:
            draws += 1
            moved = np.asarray(transform(image, mode="nearest"))[0] > 0.5
            moved &= inside
            if moved.sum() >= keep * size:
                closed = ndimage.binary_closing(moved, structure=ndimage.generate_binary_structure(3, 1),
                                                border_value=0) & inside
                out = np.zeros_like(lesion)
                out[box] = closed | moved
                return out, draws
    return None, draws


def _random_deformation(kind: str, seed: int):
    """MONAI's random transforms (voxel units), seeded. Bone lesions move rigidly in-plane (as the
    release's bone augmentation); soft-tissue tumours deform elastically."""
    from monai.transforms import Rand3DElastic, RandAffine

    if kind == "bone":
        transform = RandAffine(prob=1.0, translate_range=(5, 5, 0), rotate_range=(0, 0, 0.1),
                               scale_range=(0.15, 0.15, 0), padding_mode="zeros")
    else:
        transform = Rand3DElastic(sigma_range=(5, 8), magnitude_range=(100, 200), prob=1.0,
                                  translate_range=(5, 5, 5), rotate_range=(np.pi / 36,) * 3,
                                  scale_range=(0.15, 0.15, 0.15), padding_mode="zeros")
    transform.set_random_state(seed=seed)
    return transform


# -- several edits ---------------------------------------------------------------------------

def edit_tumors(labels: np.ndarray, spacing: Sequence[float],
                edits: TumorEdits) -> tuple[np.ndarray, list[TumorChange]]:
    """Apply `edits` in order (remove at, scale at, remove, scale, augment, add); each step is seeded
    from edits.seed."""
    out, changes = np.asarray(labels), []
    for at in edits.remove_at:
        out, done = remove_tumor_at(out, spacing, at, edits.within_mm)
        changes += done
    for at, factor in edits.scale_at:
        out, done = scale_tumor_at(out, spacing, at, factor, edits.within_mm)
        changes += done
    for kind in edits.remove:
        out, done = remove_tumors_of(out, spacing, kind)
        changes += done
    for kind, factor in edits.scale:
        out, done = scale_tumors(out, spacing, kind, factor)
        changes += done
    if edits.augment:
        out, done = augment_tumors(out, spacing, seed=edits.seed)
        changes += done
    for i, request in enumerate(edits.add):
        seed = int(np.random.default_rng([edits.seed, 1 + i]).integers(2**31))
        out, done = add_tumor(out, spacing, request.kind, request.radius_mm, request.at, seed=seed)
        changes += done
    return (out.copy() if out is labels else out), changes


def parse_add(text: str) -> AddTumor:
    """``KIND[:radius=12mm][:at=x,y,z]`` (radius in mm, default 10; at: voxel indices) -> AddTumor."""
    kind, *options = str(text).strip().split(":")
    values = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or key.strip() not in ("radius", "at"):
            raise InvalidInput(f"bad tumour option {option!r} in {text!r}; write KIND[:radius=12mm][:at=x,y,z]")
        values[key.strip()] = value.strip()
    radius = 10.0
    if "radius" in values:
        try:
            radius = float(values["radius"].removesuffix("mm"))
        except ValueError:
            raise InvalidInput(f"bad radius in {text!r}; write radius=12mm") from None
    at = None
    if "at" in values:
        try:
            at = tuple(int(v) for v in values["at"].split(","))
        except ValueError:
            at = ()
        if len(at) != 3:
            raise InvalidInput(f"bad position in {text!r}; write at=x,y,z as three voxel indices")
    return AddTumor(L.tumor_kind(kind), radius, at)


def parse_at(text: str) -> tuple[int, int, int]:
    """``x,y,z`` (voxel indices) -> (x, y, z)."""
    try:
        at = tuple(int(v) for v in str(text).split(","))
    except ValueError:
        at = ()
    if len(at) != 3:
        raise InvalidInput(f"bad position {text!r}; write x,y,z as three voxel indices, e.g. 40,52,30")
    return at


def _split_factor(text: str, what: str, example: str) -> tuple[str, float]:
    """``HEAD=FACTOR`` -> (head, factor), refused with one line naming `what` and an example."""
    head, sep, value = str(text).partition("=")
    try:
        factor = float(value)
    except ValueError:
        sep = ""
    if not sep:
        raise InvalidInput(f"bad {what} {text!r}; write {example}")
    return head, factor


def parse_scale_at(text: str) -> tuple[tuple[int, int, int], float]:
    """``x,y,z=FACTOR`` -> ((x, y, z), factor)."""
    where, factor = _split_factor(text, "resize", "x,y,z=FACTOR, e.g. 40,52,30=0.8")
    return parse_at(where), factor


def parse_scale(text: str) -> tuple[str, float]:
    """``KIND=FACTOR`` -> (kind, factor)."""
    kind, factor = _split_factor(text, "scale", "KIND=FACTOR, e.g. hepatic=0.8")
    return L.tumor_kind(kind), factor


# -- the experiments' simple implants -----------------------------------------------------------

def implant_random_balls(labels: np.ndarray, rng: np.random.Generator, radius_mm=(8.0, 16.0),
                         spacing=(4.0, 4.0, 4.0), kind: str = "hepatic") -> np.ndarray:
    """Tumours out (each becomes its parent organ), then 1-2 plain balls of `kind` ("hepatic" or
    "lung") inside their organ, each centred at least its radius deep in the organ (for the lung:
    in the lungs, whichever lobes the ball then covers). What the experiments' masks are made of;
    `add_tumor` is the general, irregular-shaped edit."""
    if kind not in ("hepatic", "lung"):
        raise InvalidInput(f"unknown tumour kind {kind!r}; choose from ['hepatic', 'lung']")
    organ_ids, tumor_id = tuple(_parent_to_tumor(kind)), _kind_ids(kind)[0]
    edited = L.remove_tumors(labels)
    depth = ndimage.distance_transform_edt(np.isin(edited, organ_ids), sampling=spacing)
    grid = np.indices(labels.shape, dtype=np.float32)
    for _ in range(int(rng.integers(1, 3))):
        radius = float(rng.uniform(*radius_mm))
        candidates = np.argwhere(depth >= radius)
        if len(candidates) == 0:
            break
        centre = candidates[rng.integers(len(candidates))]
        dist2 = sum(((grid[a] - centre[a]) * spacing[a]) ** 2 for a in range(3))
        edited[(dist2 <= radius**2) & np.isin(edited, organ_ids)] = tumor_id
    return edited
