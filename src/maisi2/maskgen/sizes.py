"""The anatomy-size vector the mask generator is conditioned on.

Ten slots in the release's order (`SLOTS`): five organs, then five tumour kinds. A slot holds a
size in [0, 1], or -1 for "absent"; the release generates at most one tumour kind per mask.

What a size means is set by a `SizeScale`: the volume (mL) that counts as 1 for each slot, so
``size = min(volume / reference_ml, 1)``. Our generators take the largest volume of each slot in
their training masks as its reference, and store the scale with their weights. The release never
published its scale, so for the released generator the numbers the user gives are passed on as
they are.

A request rarely names all ten slots: the others come from the closest vector of a `SizeTable`
(sum of |difference| over the named slots, as the release picks from its candidate list), then
the named slots are written over it. A table is either one a generator was trained with (the size
vectors of its training masks) or the release's candidate list, ``all_anatomy_size_conditions.json``
(a list of ``{"organ_size": [10 numbers]}``), when it is put in the released model folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from maisi2 import labels as L
from maisi2.errors import InvalidInput

__all__ = [
    "SLOTS",
    "ORGAN_SLOTS",
    "TUMOR_SLOTS",
    "ABSENT",
    "SizeScale",
    "SizeTable",
    "parse_anatomy_sizes",
    "check_requested",
    "slot_volumes_ml",
    "requested_tumor",
    "RELEASE_TABLE_FILE",
    "RELEASE_TABLE_FILES",
]

ORGAN_SLOTS = ("gallbladder", "liver", "stomach", "pancreas", "colon")
TUMOR_SLOTS = ("lung tumor", "pancreatic tumor", "hepatic tumor", "colon cancer primaries", "bone lesion")
SLOTS = ORGAN_SLOTS + TUMOR_SLOTS
ABSENT = -1.0
RELEASE_TABLE_FILE = "all_anatomy_size_conditions.json"
# The MONAI tutorials' copy of the same list carries a typo in its name; either is read.
RELEASE_TABLE_FILES = (RELEASE_TABLE_FILE, "all_anatomy_size_condtions.json")


def parse_anatomy_sizes(text: str) -> dict[str, float]:
    """``'liver=0.6,"hepatic tumor"=0.2'`` -> {"liver": 0.6, "hepatic tumor": 0.2} (checked)."""
    sizes: dict[str, float] = {}
    for part in _split_outside_quotes(text):
        name, sep, value = part.rpartition("=")
        name = name.strip().strip("'\"").strip()
        if not sep or not name:
            raise InvalidInput(f"--anatomy-size item {part!r} must look like NAME=SIZE, e.g. liver=0.6")
        try:
            sizes[name] = float(value)
        except ValueError:
            raise InvalidInput(f"--anatomy-size {name}: {value!r} is not a number") from None
    check_requested(sizes)
    return sizes


def _split_outside_quotes(text: str) -> list[str]:
    parts, current, quote = [], "", None
    for ch in text:
        if ch in "'\"":
            quote = None if quote == ch else (ch if quote is None else quote)
        if ch == "," and quote is None:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return [p for p in (p.strip() for p in parts) if p]


def check_requested(sizes: Mapping[str, float]) -> None:
    """One clear line for a bad request: unknown slot, size outside [0, 1] and not -1, two tumours."""
    if not sizes:
        raise InvalidInput("no anatomy sizes given; name at least one of: " + ", ".join(SLOTS))
    for name, value in sizes.items():
        if name not in SLOTS:
            raise InvalidInput(f"{name!r} has no anatomy-size slot; the mask generator controls: {', '.join(SLOTS)}")
        if not (value == ABSENT or 0.0 <= value <= 1.0):
            raise InvalidInput(f"anatomy size of {name} must lie in [0, 1] or be -1 (absent), got {value}")
    tumors = [n for n in sizes if n in TUMOR_SLOTS and sizes[n] != ABSENT]
    if len(tumors) > 1:
        raise InvalidInput(f"the mask generator makes one tumour kind per mask; got {', '.join(tumors)}")


def requested_tumor(vector: Sequence[float]) -> int | None:
    """MAISI id of the tumour kind a size vector asks for (None: no tumour)."""
    present = [name for name, v in zip(SLOTS, vector) if name in TUMOR_SLOTS and v != ABSENT]
    return L.label_id(present[-1]) if present else None


def slot_volumes_ml(labels: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """(10,) volume in mL of each slot's label in a MAISI label map (0 where absent)."""
    voxel_ml = float(np.prod(np.asarray(spacing, dtype=np.float64))) / 1000.0
    counts = np.bincount(np.asarray(labels, dtype=np.int64).ravel(), minlength=256)
    return np.array([counts[L.label_id(name)] * voxel_ml for name in SLOTS], dtype=np.float64)


@dataclass(frozen=True)
class SizeScale:
    """The volume (mL) that counts as size 1, per slot."""

    reference_ml: tuple[float, ...]

    def __post_init__(self):
        if len(self.reference_ml) != len(SLOTS) or not all(v > 0 for v in self.reference_ml):
            raise InvalidInput(f"a size scale needs {len(SLOTS)} positive reference volumes, got {self.reference_ml}")

    @classmethod
    def from_volumes(cls, volumes_ml: np.ndarray) -> "SizeScale":
        """The largest volume of each slot over a set of masks (N, 10); 1 mL where never seen."""
        largest = np.max(np.asarray(volumes_ml, dtype=np.float64), axis=0)
        return cls(tuple(float(v) if v > 0 else 1.0 for v in largest))

    def sizes(self, volumes_ml: np.ndarray) -> np.ndarray:
        """(..., 10) volumes -> sizes in [0, 1], -1 where the volume is 0 (absent)."""
        volumes_ml = np.asarray(volumes_ml, dtype=np.float64)
        sizes = np.minimum(volumes_ml / np.asarray(self.reference_ml), 1.0)
        return np.where(volumes_ml > 0, sizes, ABSENT).astype(np.float32)

    def volumes_ml(self, sizes: np.ndarray) -> np.ndarray:
        """The inverse of `sizes` for present slots (0 for absent ones)."""
        sizes = np.asarray(sizes, dtype=np.float64)
        return np.where(sizes >= 0, sizes * np.asarray(self.reference_ml), 0.0)


@dataclass(frozen=True)
class SizeTable:
    """Known size vectors (N, 10) to complete a request from."""

    vectors: np.ndarray
    source: str

    def __post_init__(self):
        v = np.asarray(self.vectors, dtype=np.float32)
        if v.ndim != 2 or v.shape[1] != len(SLOTS) or len(v) == 0:
            raise InvalidInput(f"{self.source}: a size table needs vectors of {len(SLOTS)} slots, got shape {v.shape}")
        object.__setattr__(self, "vectors", v)

    def complete(self, requested: Mapping[str, float]) -> np.ndarray:
        """The (10,) vector for a request: the closest known vector (L1 over the requested slots;
        the first on ties), with the requested slots written over it and every tumour slot not
        requested set to -1 (the release keeps a tumour its candidate vector happens to carry; a
        tumour nobody asked for is not wanted here)."""
        check_requested(requested)
        index = [SLOTS.index(n) for n in requested]
        wanted = np.array([requested[n] for n in requested], dtype=np.float32)
        distance = np.abs(self.vectors[:, index] - wanted).sum(axis=1)
        vector = self.vectors[int(np.argmin(distance))].copy()
        vector[index] = wanted
        for name in TUMOR_SLOTS:  # a tumour only where asked for, never one the table vector had
            if name not in requested:
                vector[SLOTS.index(name)] = ABSENT
        return vector

    @classmethod
    def read(cls, path: str | Path) -> "SizeTable":
        """Our ``size_table.json`` ({"vectors": [[...], ...]}) or the release's candidate list
        ([{"organ_size": [...]}, ...])."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise InvalidInput(f"cannot read the anatomy-size table {path}: {err}") from None
        if isinstance(data, dict) and "vectors" in data:
            return cls(np.asarray(data["vectors"]), str(path))
        if isinstance(data, list) and data and all(isinstance(d, dict) and "organ_size" in d for d in data):
            return cls(np.asarray([d["organ_size"] for d in data]), str(path))
        raise InvalidInput(f"{path} is not an anatomy-size table (expected {{\"vectors\": ...}} or "
                         "a list of {\"organ_size\": [...]})")
