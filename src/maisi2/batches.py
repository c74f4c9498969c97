"""Batch requests for `maisi2 generate --mask-dir / --datalist`: a folder of masks or a datalist
(.txt, .jsonl, decathlon .json) read into `BatchItem`s, each naming where it came from so errors
point at the line. Parsing only; `generate.generate_batch` runs them."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from maisi2.data import DatalistSource, decathlon_rows
from maisi2.errors import InvalidInput, MissingInput
from maisi2.volume_io import check_spacing

__all__ = ["BatchItem", "batch_from_dir", "batch_from_datalist"]

PathLike = str | os.PathLike


@dataclass(frozen=True)
class BatchItem:
    mask: Path
    out: Path
    spacing: tuple[float, float, float] | None = None  # overrides the options' spacing
    seed: int | None = None  # overrides the batch seed
    where: str = ""  # where the item comes from ("list.jsonl, line 3"), named in its errors


def _output_name(mask: Path) -> str:
    stem = mask.name.split(".nii")[0]
    return f"{stem}_ct.nii.gz"


def batch_from_dir(mask_dir: PathLike, out_dir: PathLike) -> list[BatchItem]:
    """Every *.nii / *.nii.gz in `mask_dir` -> out_dir/<name>_ct.nii.gz."""
    mask_dir, out_dir = Path(mask_dir).expanduser(), Path(out_dir).expanduser()
    if not mask_dir.is_dir():
        raise MissingInput(f"mask folder {mask_dir} does not exist")
    masks = sorted(p for p in mask_dir.iterdir() if p.name.endswith((".nii", ".nii.gz")) and not p.name.startswith("."))
    if not masks:
        raise InvalidInput(f"{mask_dir} holds no NIfTI masks (*.nii.gz)")
    return [BatchItem(m, out_dir / _output_name(m), where=str(m)) for m in masks]


def batch_from_datalist(path, out_dir: PathLike) -> list[BatchItem]:
    """A .txt (one mask path per line), .jsonl or decathlon-style .json datalist.

    JSONL rows and .json entries: {"mask": path (or "label", so a training datalist works),
    "spacing": [x, y, z] (optional), "seed": int (optional), "out": file name inside `out_dir`
    (optional)}. Relative paths are relative to the datalist's folder (a .json's: to its data root,
    see `maisi2.data`). `path` may be a `data.DatalistSource` naming the .json's list and data root.
    Errors name the line (or entry).
    """
    source = DatalistSource.of(path)
    path, out_dir = source.path, Path(out_dir).expanduser()
    if not path.is_file():
        raise MissingInput(f"datalist {path} does not exist")
    if path.suffix.lower() == ".json":
        items = [_batch_item(row, source.root(), where, out_dir) for where, row in decathlon_rows(source)]
        if not items:
            raise InvalidInput(f"datalist {path} lists no masks")
        return items
    items = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip() and not line.lstrip().startswith("#"):
            items.append(_datalist_item(line, path, number, out_dir))
    if not items:
        raise InvalidInput(f"datalist {path} lists no masks")
    return items


def _datalist_item(line: str, path: Path, number: int, out_dir: Path) -> BatchItem:
    where = f"{path}, line {number}"
    if path.suffix.lower() != ".jsonl":
        mask = path.parent / line.strip()
        return BatchItem(mask, out_dir / _output_name(mask), where=where)
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise InvalidInput(f"{where}: not valid JSON ({err.msg})") from None
    if isinstance(row, dict):
        unknown = set(row) - {"mask", "label", "spacing", "seed", "out", "image", "modality", "source", "fold"}
        if unknown:
            raise InvalidInput(f"{where}: unknown field(s) {', '.join(sorted(unknown))}; valid: mask, spacing, seed, out")
    return _batch_item(row, path.parent, where, out_dir)


def _batch_item(row, root: Path, where: str, out_dir: Path) -> BatchItem:
    if not isinstance(row, dict) or not (row.get("mask") or row.get("label")):
        raise InvalidInput(f"{where}: each row needs a \"mask\" (or \"label\") path")
    mask = root / (row.get("mask") or row["label"])
    spacing, seed = row.get("spacing"), row.get("seed")
    if spacing is not None:
        if not isinstance(spacing, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in spacing):
            raise InvalidInput(f"{where}: \"spacing\" must be a list of three numbers in mm, got {spacing!r}")
        check_spacing(spacing, f"{where}: \"spacing\"")
        spacing = tuple(float(v) for v in spacing)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise InvalidInput(f"{where}: \"seed\" must be a whole number >= 0, got {seed!r}")
    return BatchItem(mask, _inside(out_dir, row.get("out") or _output_name(mask), where), spacing, seed, where)


def _inside(out_dir: Path, name, where: str) -> Path:
    """out_dir / name, refused when `name` would lead outside `out_dir` (absolute, `..`, a symlink out)."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidInput(f"{where}: \"out\" must be a file name, got {name!r}")
    target = out_dir / name
    root = out_dir.resolve()
    if Path(name).is_absolute() or not target.resolve().is_relative_to(root):
        raise InvalidInput(f"{where}: \"out\" {name!r} leads outside --out-dir {out_dir}; give a name inside it")
    return target
