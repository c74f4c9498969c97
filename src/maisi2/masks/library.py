"""A mask library: a folder of MAISI label maps and its index (``index.json`` in the folder).

Each entry describes one readable label map: its file (relative to the folder), size and
modification time (to notice changes), shape, spacing (mm), field of view (mm), the body regions
it covers (`regions.covered_regions`, with the markers found), the labels present, its tumour
labels and the volume of every label in mL. Files that cannot be read, or hold ids that are not
MAISI ids, are listed under ``skipped`` with the reason, never a crash. Indexing again reads only
files that are new or whose size or modification time changed (skipped files too).

    index = index_library("masks/")          # writes masks/index.json
    entries = load_library("masks/")         # the index, made or refreshed when needed
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from maisi2 import volume_io
from maisi2 import labels as L
from maisi2.atomic import atomic_output
from maisi2.errors import InvalidInput, MissingInput
from maisi2.masks.regions import covered_regions

__all__ = ["MaskEntry", "LibraryIndex", "INDEX_NAME", "index_library", "load_library", "default_library_dir",
           "describe_labels"]

INDEX_NAME = "index.json"
INDEX_VERSION = 2


@dataclass(frozen=True)
class MaskEntry:
    file: str
    bytes: int
    mtime_ns: int
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    fov_mm: tuple[float, float, float]
    regions: dict[str, list[str]]  # region -> markers found
    labels: tuple[str, ...]  # every label present (body included), by name
    tumors: tuple[str, ...]  # tumour labels present
    volumes_ml: dict[str, float]
    boxes: dict[str, list[int]]  # label -> bounding box in voxels [x0, y0, z0, x1, y1, z1) (end excluded)

    @classmethod
    def from_dict(cls, row: dict) -> "MaskEntry":
        return cls(**{**row, "shape": tuple(row["shape"]), "spacing": tuple(row["spacing"]),
                      "fov_mm": tuple(row["fov_mm"]), "labels": tuple(row["labels"]), "tumors": tuple(row["tumors"])})


@dataclass
class LibraryIndex:
    folder: Path
    entries: list[MaskEntry]
    skipped: list[dict]  # {"file", "bytes", "mtime_ns", "reason"}
    read: int = 0  # files read in this call (the rest came from the previous index)

    def summary(self) -> str:
        lines = [f"{len(self.entries)} masks indexed in {self.folder} ({self.read} read now, "
                 f"{len(self.entries) + len(self.skipped) - self.read} unchanged); {len(self.skipped)} skipped"]
        reasons: dict[str, int] = {}
        for row in self.skipped:
            reasons[row["reason"]] = reasons.get(row["reason"], 0) + 1
        lines += [f"  skipped {n}: {reason}" for reason, n in reasons.items()]
        return "\n".join(lines)


def describe_labels(array: np.ndarray, spacing) -> dict:
    """Labels present, tumours, volumes (mL), bounding boxes and regions covered, for a label array."""
    from scipy import ndimage

    array = array.astype(np.int64, copy=False)
    counts = np.bincount(array.ravel())
    voxel_ml = float(np.prod(spacing)) / 1000.0
    volumes = {L.label_name(i): round(float(n) * voxel_ml, 3) for i, n in enumerate(counts)
               if n and i != L.BACKGROUND}
    tumor_names = {L.label_name(t) for t in L.TUMOR_IDS}
    boxes = {L.label_name(i + 1): [*(s.start for s in box), *(s.stop for s in box)]
             for i, box in enumerate(ndimage.find_objects(array)) if box is not None}
    return {"labels": tuple(volumes), "tumors": tuple(n for n in volumes if n in tumor_names),
            "volumes_ml": volumes, "boxes": boxes, "regions": covered_regions(volumes)}


def _read_entry(path: Path, folder: Path, stat: os.stat_result) -> MaskEntry:
    volume = volume_io.load_label_map(path)  # refuses non-MAISI ids
    spacing = tuple(round(float(s), 4) for s in volume.spacing)
    return MaskEntry(file=path.relative_to(folder).as_posix(), bytes=stat.st_size, mtime_ns=stat.st_mtime_ns,
                     shape=tuple(int(n) for n in volume.shape), spacing=spacing,
                     fov_mm=tuple(round(n * s, 1) for n, s in zip(volume.shape, spacing)),
                     **describe_labels(volume.array, spacing))


def _candidates(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith((".nii", ".nii.gz"))
                  and not p.name.startswith("."))


def _previous(folder: Path) -> dict[str, dict]:
    path = folder / INDEX_NAME
    try:
        data = json.loads(path.read_text())
        if data.get("version") != INDEX_VERSION:
            return {}
        return {row["file"]: row for row in [*data["entries"], *data["skipped"]]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # no index yet, or one we cannot trust: read everything again


def index_library(folder: str | os.PathLike, write: bool = True, trust_sizes: bool = False) -> LibraryIndex:
    """Index every NIfTI label map under `folder`, reusing the previous index for unchanged files.

    A file is unchanged when its size and modification time match the index; with `trust_sizes`
    (the bundled library, whose files only change with the package) its size alone."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise MissingInput(f"mask library {folder} is not a folder")
    previous = _previous(folder)
    entries, skipped, read = [], [], 0
    for path in _candidates(folder):
        rel, stat = path.relative_to(folder).as_posix(), path.stat()
        old = previous.get(rel)
        if old and old.get("bytes") == stat.st_size and (trust_sizes or old.get("mtime_ns") == stat.st_mtime_ns):
            (skipped.append(old) if "reason" in old else entries.append(MaskEntry.from_dict(old)))
            continue
        read += 1
        try:
            entries.append(_read_entry(path, folder, stat))
        except Exception as err:  # a library scan never stops at one bad file; the reason is kept
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            if "not MAISI ids" in reason:
                reason = "holds label ids that are not MAISI ids (convert it first, e.g. maisi2 labels import-totalseg)"
            skipped.append({"file": rel, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                            "reason": reason.replace(str(path), "<file>")})
    index = LibraryIndex(folder, entries, skipped, read)
    if write and (read or set(previous) != {e.file for e in entries} | {s["file"] for s in skipped}):
        _write_index(index)
    return index


def _write_index(index: LibraryIndex) -> None:
    data = {"version": INDEX_VERSION, "entries": [asdict(e) for e in index.entries], "skipped": index.skipped}
    with atomic_output(index.folder / INDEX_NAME, overwrite=True) as tmp:
        tmp.write_text(json.dumps(data, indent=1))


def load_library(folder: str | os.PathLike | None = None) -> LibraryIndex:
    """The index of `folder` (the default library when None), refreshed for new or changed files.

    The bundled library's index is never rewritten (it ships with the package); a read-only
    folder is indexed in memory."""
    bundled = folder is None
    folder = default_library_dir() if bundled else Path(folder).expanduser()
    if not folder.is_dir():
        raise MissingInput(f"mask library {folder} is not a folder")
    index = index_library(folder, write=not bundled and os.access(folder, os.W_OK), trust_sizes=bundled)
    if not index.entries:
        why = f"; skipped {len(index.skipped)}: {index.skipped[0]['reason']}" if index.skipped else ""
        raise InvalidInput(f"mask library {folder} holds no usable MAISI label maps{why}. "
                         "Point --library at a folder of MAISI label maps (*.nii.gz) or leave it out for the bundled one")
    return index


def default_library_dir() -> Path:
    """The small library shipped with the package (maisi2/resources/masks)."""
    return Path(str(resources.files("maisi2").joinpath("resources", "masks")))
