"""Choose a library mask for a request (regions, anatomy, size, spacing), fit it to the grid, say why.

A candidate is kept when it passes every rule; otherwise its verdict names each rule it breaks:

1. **anatomy**: every requested label is present. A requested tumour that is absent is still
   acceptable when its parent organ is present: it will be added (`tumors.add_tumor`); masks that
   already hold it rank first.
2. **region**: every requested body region is covered (`regions.covered_regions`).
3. **no unrequested tumour**: the mask holds no tumour label the request did not name.
4. **field of view**: the requested structures fit inside the requested field of view (size x
   spacing), so the crop can keep them whole.

Ranking (the release's preference, made explicit): exact size and spacing first; then the
distance ``fov + (size + spacing) / 4``, where each term sums |log(mask / requested)| over the
three axes (0.1 is about 10 % off on one axis). Candidates within `BEST_TOLERANCE` of the best one
form the best group; the seed picks among them (different masks for different samples).

`fit_mask` resamples a mask (nearest) to the requested spacing and pads or crops it to the size,
placing the window as centred as it can while keeping every requested structure whole.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from maisi2 import volume_io
from maisi2 import labels as L
from maisi2.errors import InvalidInput
from maisi2.masks.library import LibraryIndex, MaskEntry
from maisi2.masks.regions import region_name

__all__ = ["MaskRequest", "Verdict", "make_request", "judge", "rank", "select_masks", "fit_mask",
           "BEST_TOLERANCE", "anatomy_name"]

BEST_TOLERANCE = 0.05


@dataclass(frozen=True)
class MaskRequest:
    regions: tuple[str, ...] = ()
    anatomy: tuple[str, ...] = ()  # MAISI label names (organs and tumours)
    size: tuple[int, int, int] | None = None
    spacing: tuple[float, float, float] | None = None

    @property
    def fov_mm(self) -> tuple[float, float, float] | None:
        if self.size is None or self.spacing is None:
            return None
        return tuple(n * s for n, s in zip(self.size, self.spacing))

    def tumors(self) -> tuple[str, ...]:
        names = {L.label_name(t) for t in L.TUMOR_IDS}
        return tuple(a for a in self.anatomy if a in names)


@dataclass
class Verdict:
    entry: MaskEntry
    problems: list[str] = field(default_factory=list)
    to_add: list[str] = field(default_factory=list)  # requested tumour labels the mask lacks
    score: float = math.inf
    exact: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"file": self.entry.file, "kept": self.ok, "problems": self.problems, "tumors_to_add": self.to_add,
                "exact_size_and_spacing": self.exact, "distance": None if math.isinf(self.score) else round(self.score, 4)}


def anatomy_name(text: str) -> str:
    """A MAISI label name, matched without case; ValueError suggesting the closest names."""
    key = " ".join(str(text).strip().lower().replace("_", " ").split())
    lowered = {n.lower(): n for n in L.LABELS}
    if key in lowered:
        return lowered[key]
    close = difflib.get_close_matches(key, list(lowered), n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(repr(lowered[c]) for c in close)}?)" if close else ""
    raise InvalidInput(f"unknown anatomy {text!r}{hint}; anatomy names are MAISI label names "
                     "(those of maisi2/resources/label_dict.json, e.g. 'liver', 'hepatic tumor')")


def make_request(region: str | Sequence[str] | None = None, anatomy: str | Sequence[str] = (),
                 size: Sequence[int] | None = None, spacing: Sequence[float] | None = None,
                 divisor: int = 16) -> MaskRequest:
    """Check and normalise a request; raises ValueError (one line) for unknown names or bad numbers.

    region / anatomy: a name, a comma-separated string or a list. size: voxels, each a multiple of
    `divisor` (the networks' total downsampling); spacing: mm, positive."""
    regions = tuple(dict.fromkeys(region_name(r) for r in _split(region)))
    names = tuple(dict.fromkeys(anatomy_name(a) for a in _split(anatomy)))
    if size is not None:
        size = tuple(int(n) for n in size)
        if len(size) != 3 or any(n < divisor or n % divisor for n in size):
            raise InvalidInput(f"--size must be three multiples of {divisor} (the networks halve each axis "
                             f"{int(math.log2(divisor))} times), got {' '.join(map(str, size))}; "
                             f"e.g. {' '.join(str(max(divisor, round(n / divisor) * divisor)) for n in size)}")
    if spacing is not None:
        spacing = tuple(float(s) for s in spacing)
        if len(spacing) != 3 or not all(math.isfinite(s) and 0.2 <= s <= 20 for s in spacing):
            raise InvalidInput(f"--spacing must be three numbers between 0.2 and 20 mm, got {spacing}")
    return MaskRequest(regions, names, size, spacing)


def _split(value) -> list[str]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    return [part.strip() for item in items for part in str(item).split(",") if part.strip()]


# -- rules -------------------------------------------------------------------------------------

def judge(entry: MaskEntry, request: MaskRequest) -> Verdict:
    """The verdict on one library mask: every broken rule in words, and its distance."""
    verdict = Verdict(entry)
    _check_anatomy(entry, request, verdict)
    for region in request.regions:
        if region not in entry.regions:
            covers = ", ".join(entry.regions) or "no region we recognise"
            verdict.problems.append(f"does not cover the {region} (covers {covers})")
    extra = [t for t in entry.tumors if t not in request.anatomy]
    if extra:
        verdict.problems.append(f"holds {', '.join(extra)} not asked for (name it in --anatomy, or remove it "
                                "first with `maisi2 masks edit --remove KIND`)")
    _check_fov(entry, request, verdict)
    if verdict.ok:
        verdict.score, verdict.exact = _distance(entry, request)
    return verdict


def _check_anatomy(entry, request, verdict) -> None:
    tumors = set(request.tumors())
    for name in request.anatomy:
        if name in entry.labels:
            continue
        if name in tumors and any(L.label_name(p) in entry.labels for p in L.tumor_parent_ids(L.label_id(name))):
            verdict.to_add.append(name)
        elif name in tumors:
            verdict.problems.append(f"lacks {name} and the organ it would be added to")
        else:
            verdict.problems.append(f"lacks {name}")


def _check_fov(entry, request, verdict) -> None:
    fov = request.fov_mm
    keep = [n for n in request.anatomy if n in entry.boxes]
    if fov is None or not keep:
        return
    boxes = np.array([entry.boxes[n] for n in keep])
    extent = (boxes[:, 3:].max(axis=0) - boxes[:, :3].min(axis=0)) * np.array(entry.spacing)
    if np.any(extent > np.array(fov) + 1e-6):
        verdict.problems.append(
            f"its {', '.join(keep)} extend over {' x '.join(f'{e:.0f}' for e in extent)} mm, more than the requested "
            f"field of view {' x '.join(f'{f:.0f}' for f in fov)} mm")


def _log_distance(have, want) -> float:
    return float(sum(abs(math.log(h / w)) for h, w in zip(have, want)))


def _distance(entry: MaskEntry, request: MaskRequest) -> tuple[float, bool]:
    size_d = 0.0 if request.size is None else _log_distance(entry.shape, request.size)
    spacing_d = 0.0 if request.spacing is None else _log_distance(entry.spacing, request.spacing)
    fov_d = 0.0 if request.fov_mm is None else _log_distance(entry.fov_mm, request.fov_mm)
    exact = size_d < 1e-6 and spacing_d < 1e-6
    return fov_d + (size_d + spacing_d) / 4, exact


def rank(index: LibraryIndex, request: MaskRequest) -> tuple[list[Verdict], list[Verdict]]:
    """(kept, rejected): kept sorted best first (exact, fewer tumours to add, distance, file name);
    rejected sorted by how few rules they break."""
    verdicts = [judge(e, request) for e in index.entries]
    kept = sorted((v for v in verdicts if v.ok), key=lambda v: (not v.exact, len(v.to_add), v.score, v.entry.file))
    rejected = sorted((v for v in verdicts if not v.ok), key=lambda v: (len(v.problems), v.entry.file))
    return kept, rejected


def select_masks(index: LibraryIndex, request: MaskRequest, seed: int = 0,
                 count: int = 1) -> tuple[list[Verdict], list[Verdict], list[Verdict]]:
    """(chosen, best group, rejected): `count` masks drawn by `seed` from the best group (without
    repeats until the group is used up). Raises ValueError saying why the closest masks fail."""
    kept, rejected = rank(index, request)
    if not kept:
        raise InvalidInput(_nothing_fits(index, request, rejected))
    head = kept[0]
    best = [v for v in kept if (v.exact, len(v.to_add)) == (head.exact, len(head.to_add))
            and v.score <= head.score + BEST_TOLERANCE]
    rng = np.random.default_rng(seed)
    order = [best[i] for i in rng.permutation(len(best))]
    chosen = [order[i % len(order)] for i in range(count)]
    return chosen, best, rejected


def _nothing_fits(index, request, rejected) -> str:
    closest = "; ".join(f"{v.entry.file}: {', '.join(v.problems)}" for v in rejected[:3])
    advice = []
    problems = " ".join(p for v in rejected[:3] for p in v.problems)
    if "does not cover" in problems:
        advice.append("drop or change --region")
    if "lacks" in problems:
        advice.append("drop what is missing from --anatomy")
    if "not asked for" in problems:
        advice.append("name those tumours in --anatomy")
    if "field of view" in problems:
        advice.append("raise --size or --spacing")
    return (f"no mask in {index.folder} fits the request ({len(rejected)} checked); closest: {closest}. "
            f"Try: {', or '.join(advice) or 'another --library'}, or add suitable masks to --library")


# -- fitting -----------------------------------------------------------------------------------

def fit_mask(volume: volume_io.Volume, request: MaskRequest) -> tuple[volume_io.Volume, dict]:
    """Resample (nearest) to the requested spacing, then pad/crop to the requested size keeping the
    requested structures whole. Returns the volume and what was done (for the report)."""
    info = {"input_shape": list(volume.shape), "input_spacing": [round(s, 4) for s in volume.spacing]}
    if request.spacing is not None and not np.allclose(volume.spacing, request.spacing, rtol=1e-4):
        volume = volume_io.resample_to_spacing(volume, request.spacing, order=0)
    info["resampled_shape"] = list(volume.shape)
    if request.size is None:
        return volume, info
    start = _window_start(volume.array, request)
    array = _window(volume.array, start, request.size)
    affine = volume.affine.copy()
    affine[:3, 3] += affine[:3, :3] @ np.asarray(start, dtype=np.float64)
    info["window_start_voxel"] = [int(s) for s in start]  # negative: padding before the mask
    return volume_io.Volume(array, affine), info


def _window_start(labels: np.ndarray, request: MaskRequest) -> list[int]:
    ids = [L.label_id(n) for n in request.anatomy]
    keep = np.isin(labels, ids) if ids else np.zeros(labels.shape, bool)
    where = np.argwhere(keep)
    start = []
    for axis, (n, want) in enumerate(zip(labels.shape, request.size)):
        preferred = (n - want) // 2  # centred: crop both ends or pad both ends
        if len(where):
            lo, hi = int(where[:, axis].min()), int(where[:, axis].max()) + 1
            if hi - lo > want:
                raise InvalidInput(f"the requested structures span {hi - lo} voxels along {'xyz'[axis]}, more than "
                                 f"the requested size {want}; raise --size or --spacing")
            preferred = min(max(preferred, hi - want), lo)
        start.append(preferred)
    return start


def _window(array: np.ndarray, start, size) -> np.ndarray:
    out = np.zeros(size, dtype=array.dtype)
    src, dst = [], []
    for s, n, want in zip(start, array.shape, size):
        a, b = max(s, 0), min(s + want, n)
        src.append(slice(a, b))
        dst.append(slice(a - s, b - s))
    out[tuple(dst)] = array[tuple(src)]
    return out
