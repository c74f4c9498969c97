"""Which files an evaluation reads: volume sets given as folders, globs, datalists or files.

A *set* argument is one of
- a folder: every ``*.nii`` / ``*.nii.gz`` in it, except label maps named ``*_label.nii.gz``
  (what `maisi2 generate` writes beside each CT) and hidden files, sorted by name;
- a glob pattern (``gen/*_ct.nii.gz``);
- a datalist (``.jsonl`` / ``.csv`` / decathlon-style ``.json``, see `maisi2.data`): its ``image`` column (and ``label``);
- a single NIfTI file.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

from maisi2.errors import InvalidInput, MissingInput

__all__ = ["NIFTI_SUFFIXES", "collect_volumes", "collect_pairs", "label_beside"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
LABEL_SUFFIX = "_label"


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def label_beside(ct: str | os.PathLike) -> Path:
    """``X.nii.gz`` -> ``X_label.nii.gz`` in the same folder (the `maisi2 generate` convention)."""
    ct = Path(ct)
    return ct.with_name(f"{_stem(ct)}{LABEL_SUFFIX}.nii.gz")


def _is_volume_file(path: Path) -> bool:
    return (path.is_file() and path.name.endswith(NIFTI_SUFFIXES) and not path.name.startswith(".")
            and not _stem(path).endswith(LABEL_SUFFIX))


def collect_pairs(spec: str | os.PathLike, what: str = "set", source=None) -> list[tuple[Path, Path | None]]:
    """(image, label or None) for every volume of a set; labels from datalists or ``*_label`` files beside.

    source: a `maisi2.data.DatalistSource` for `spec` when it is a datalist read with a list key or
    data root other than the defaults."""
    text = str(spec)
    path = Path(text).expanduser()
    if path.suffix.lower() in (".jsonl", ".csv", ".json") and path.is_file():
        from maisi2.data import read_datalist

        return [(item.image, item.label) for item in read_datalist(source or path)]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if _is_volume_file(p))
        where = f"folder {path}"
    elif any(ch in text for ch in "*?["):
        files = sorted(p for p in map(Path, glob.glob(os.path.expanduser(text))) if _is_volume_file(p))
        where = f"pattern {text!r}"
    elif path.is_file():
        files, where = [path], str(path)
    else:
        raise MissingInput(f"{what} {text!r} is neither a folder, a glob pattern with matches, a datalist "
                                "(.jsonl/.csv/.json) nor a file")
    if not files:
        raise InvalidInput(f"{what}: {where} holds no NIfTI volumes (*.nii.gz; *_label.nii.gz files are label maps)")
    pairs = []
    for f in files:
        label = label_beside(f)
        pairs.append((f, label if label.is_file() else None))
    return pairs


def collect_volumes(spec: str | os.PathLike, what: str = "set", source=None) -> list[Path]:
    """The image paths of a set (see the module docstring; `source` as for `collect_pairs`)."""
    return [image for image, _ in collect_pairs(spec, what, source)]
