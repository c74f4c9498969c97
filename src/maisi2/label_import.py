"""Bring label maps from other tools to MAISI ids, plus the body envelope (label 200).

What users hold, and how each is read:
- TotalSegmentator "total" output: one multi-label file in v1 or v2 numbering (detected, or
  given), or a folder with one binary mask per class (`maisi2.totalseg`).
- Any other tool's multi-label map with a class table (CSV or JSON, class name -> id in the map).
- VISTA3D output: VISTA3D was trained with MAISI's label dictionary, so its ids are MAISI ids
  already; they are checked, not translated.

Class names are matched to the MAISI table exactly, in MAISI's spelling (``left kidney``) or
TotalSegmentator's (``kidney_left``), case aside; a name that matches nothing is listed with the
closest MAISI names and the import stops (never guessed). ``body`` and ``background`` are names
too, so a table can send a class with no MAISI label to the body on purpose.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from maisi2 import totalseg, volume_io
from maisi2.atomic import check_writable
from maisi2.envelope import body_envelope_from_ct, body_envelope_from_labels
from maisi2.errors import InvalidInput, MissingInput
from maisi2.labels import BACKGROUND, BODY, ID_TO_NAME, LABELS, VALID_IDS, check_label_ids, label_name

__all__ = [
    "ImportReport",
    "resolve_class_name",
    "read_class_table",
    "convert_label_map",
    "convert_totalseg",
    "import_totalseg",
    "import_with_classes",
    "import_vista3d",
]

_BY_LOWER_NAME = {name.lower(): idx for name, idx in LABELS.items()}
_MAX_INPUT_ID = 32767  # label maps are read as int16


@dataclass(frozen=True)
class ImportReport:
    """What a conversion did. Class names are the input's; voxel counts are of the input map."""

    numbering: str  # how the input ids were read, and why
    present: dict[str, int]  # class name -> voxels, for each class found in the map
    mapped: dict[str, str]  # class name -> MAISI name, for present classes with a counterpart
    no_counterpart: dict[str, int]  # class name -> voxels, which became body
    body_voxels: int  # voxels labelled body (200) in the output
    body_from: str  # "ct" or "labels"
    shape: tuple[int, ...]
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"read as {self.numbering}",
            f"classes present: {len(self.present)}; mapped to MAISI ids: {len(self.mapped)}",
            f"body envelope from the {'CT (HU threshold)' if self.body_from == 'ct' else 'labels (rough)'}: "
            f"{self.body_voxels} voxels of {int(np.prod(self.shape))}",
        ]
        if self.no_counterpart:
            gone = ", ".join(f"{k} ({v} voxels)" for k, v in self.no_counterpart.items())
            lines.append(f"no MAISI counterpart, relabelled as body: {gone}")
        else:
            lines.append("every present class has a MAISI counterpart")
        return "\n".join(lines + self.notes)


# -- names ------------------------------------------------------------------------------------

def resolve_class_name(name: str) -> int | None:
    """MAISI id of a class name, or None for a TotalSegmentator class declared to have no MAISI label.

    Accepts MAISI's spelling ('left kidney') and TotalSegmentator's ('kidney_left'), in any case,
    plus 'background' (0). Raises KeyError for anything else.
    """
    key = name.strip().lower()
    if key == "background":
        return BACKGROUND
    for candidate in (key, totalseg.maisi_name(key)):
        if candidate in _BY_LOWER_NAME:
            return _BY_LOWER_NAME[candidate]
    if key in totalseg.NO_COUNTERPART:
        return None
    raise KeyError(name)


def _unknown_names_text(unknown: Mapping[int, str]) -> str:
    parts = []
    for idx, name in sorted(unknown.items()):
        close = difflib.get_close_matches(name.lower(), list(_BY_LOWER_NAME), n=3, cutoff=0.6)
        hint = f" (closest MAISI names: {', '.join(map(repr, close))})" if close else ""
        parts.append(f"id {idx} {name!r}{hint}")
    return "; ".join(parts)


def read_class_table(path: str | os.PathLike) -> dict[int, str]:
    """{input id: class name} from a CSV (columns name,id; a header row is optional) or a JSON
    object {name: id}."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingInput(f"class table {path} does not exist")
    text = path.read_text()
    if path.suffix.lower() == ".json":
        try:
            pairs = list(json.loads(text).items())
        except (json.JSONDecodeError, AttributeError):
            raise InvalidInput(f"class table {path}: expected a JSON object {{\"class name\": id, ...}}") from None
    else:
        rows = [r for r in csv.reader(io.StringIO(text)) if r and not r[0].lstrip().startswith("#")]
        if rows and rows[0][-1].strip().lower() in ("id", "label", "value"):
            rows = rows[1:]  # a header row
        if any(len(r) != 2 for r in rows):
            raise InvalidInput(f"class table {path}: each CSV row must be 'name,id'")
        pairs = [(r[0], r[1]) for r in rows]
    return _table_from_pairs(pairs, path)


def _table_from_pairs(pairs, path: Path) -> dict[int, str]:
    table: dict[int, str] = {}
    for name, raw_id in pairs:
        try:
            idx = int(str(raw_id).strip())
        except ValueError:
            raise InvalidInput(f"class table {path}: id {raw_id!r} of {name!r} is not an integer") from None
        if not 0 < idx <= _MAX_INPUT_ID:
            raise InvalidInput(f"class table {path}: id {idx} of {name!r} must be in 1..{_MAX_INPUT_ID}")
        if idx in table:
            raise InvalidInput(f"class table {path}: id {idx} is given twice ({table[idx]!r} and {name!r})")
        table[idx] = str(name).strip()
    if not table:
        raise InvalidInput(f"class table {path} lists no classes")
    return table


# -- conversion -------------------------------------------------------------------------------

def convert_label_map(
    labels: np.ndarray, classes: Mapping[int, str], numbering: str,
    ct: np.ndarray | None = None, spacing: tuple[float, ...] | None = None,
) -> tuple[np.ndarray, ImportReport]:
    """Map a label map in another numbering to MAISI ids and add the body envelope.

    labels: integer array (X, Y, Z). classes: {input id: class name} (see `resolve_class_name`).
    ct: HU on the same grid, or None to build the envelope from the labels. spacing: voxel size in
    mm (x, y, z), which sizes the morphology; None means 1 mm. Returns an int16 MAISI label map and
    an `ImportReport`.
    """
    labels = np.asarray(labels)
    if ct is not None and np.shape(ct) != labels.shape:
        raise InvalidInput(f"CT shape {np.shape(ct)} differs from label map shape {labels.shape}; resample the CT onto the label grid")
    counts = _voxel_counts(labels)
    present = [int(i) for i in np.flatnonzero(counts) if i > 0]
    missing = [i for i in present if i not in classes]
    if missing:
        shown = ", ".join(f"{i} ({counts[i]} voxels)" for i in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise InvalidInput(f"label map holds ids that the {numbering} class table does not name: {shown}")
    lut, targets = _lookup({i: classes[i] for i in present}, numbering)
    seg = labels if np.issubdtype(labels.dtype, np.integer) else labels.astype(np.int16)
    out = lut[seg]
    if ct is not None:
        envelope = body_envelope_from_ct(ct, labels=seg, spacing=spacing)
    else:
        envelope = body_envelope_from_labels(seg, spacing=spacing)
    out[(out == BACKGROUND) & envelope] = BODY
    report = ImportReport(
        numbering=numbering,
        present={classes[i]: int(counts[i]) for i in present},
        mapped={classes[i]: label_name(targets[i]) for i in present if targets[i] is not None},
        no_counterpart={classes[i]: int(counts[i]) for i in present if targets[i] is None},
        body_voxels=int(np.count_nonzero(out == BODY)),
        body_from="ct" if ct is not None else "labels",
        shape=tuple(int(s) for s in out.shape),
    )
    return out, report


def _voxel_counts(labels: np.ndarray) -> np.ndarray:
    """Voxels per input id (index = id), after checking the map holds non-negative integers."""
    if not np.issubdtype(labels.dtype, np.integer) and not np.array_equal(labels, np.round(labels)):
        raise InvalidInput("label map holds non-integer values; was the CT passed in place of the label map?")
    if labels.size and labels.min() < 0:
        raise InvalidInput("label map holds negative values; was the CT passed in place of the label map?")
    # bincount beats np.unique (a full sort) on 512 x 512 x 768 maps.
    return np.bincount(labels.astype(np.intp, copy=False).ravel())


def _lookup(classes: Mapping[int, str], numbering: str) -> tuple[np.ndarray, dict[int, int | None]]:
    """(array indexed by input id giving the MAISI id, {input id: MAISI id or None})."""
    targets: dict[int, int | None] = {}
    unknown: dict[int, str] = {}
    for idx, name in classes.items():
        try:
            targets[idx] = resolve_class_name(name)
        except KeyError:
            unknown[idx] = name
    if unknown:
        raise InvalidInput(
            f"{numbering}: class names with no MAISI label: {_unknown_names_text(unknown)}. "
            "Name them as in `maisi2 labels list` (or 'body' / 'background') in a --classes table"
        )
    lut = np.zeros(max(classes, default=0) + 1, dtype=np.int16)
    for idx, maisi_id in targets.items():
        lut[idx] = BODY if maisi_id is None else maisi_id
    return lut, targets


def convert_totalseg(
    labels: np.ndarray, ct: np.ndarray | None = None, spacing: tuple[float, ...] | None = None,
    version: str | None = None,
) -> tuple[np.ndarray, ImportReport]:
    """`convert_label_map` for a TotalSegmentator "total" multi-label map; `version` "v1"/"v2" or
    None to detect it (`totalseg.detect_version`)."""
    labels = np.asarray(labels)
    _voxel_counts(labels)  # the CT-instead-of-labels check, before anything reads the values as ids
    top = int(labels.max()) if labels.size else 0
    v2_top = max(totalseg.CLASS_MAPS["v2"])
    if top > v2_top:
        raise InvalidInput(
            f"label map holds ids up to {top}, outside the TotalSegmentator 'total' classes (1..{v2_top}); "
            "expected the multi-label file of the 'total' task (`TotalSegmentator --ml`), or pass --classes "
            "with a table naming its ids"
        )
    v1_top = max(totalseg.CLASS_MAPS["v1"])
    if version == "v1" and top > v1_top:
        raise InvalidInput(f"label map holds ids up to {top}, above v1's {v1_top} classes: it is in v2 numbering "
                         "(leave out --version, or pass --version v2)")
    if version is None:
        version, why = totalseg.detect_version(labels)
    elif version not in totalseg.VERSIONS:
        raise InvalidInput(f"TotalSegmentator version must be one of {', '.join(totalseg.VERSIONS)}, got {version!r}")
    else:
        why = "as given"
    numbering = f"TotalSegmentator {version} 'total' numbering ({why})"
    return convert_label_map(labels, totalseg.CLASS_MAPS[version], numbering, ct, spacing)


def _vista3d_classes(labels: np.ndarray) -> dict[int, str]:
    """VISTA3D's ids are MAISI's: refuse any id outside the MAISI dictionary, name the rest."""
    present = np.flatnonzero(_voxel_counts(labels))
    foreign = [int(i) for i in present if int(i) not in VALID_IDS]
    if foreign:
        shown = ", ".join(map(str, foreign[:10])) + (" ..." if len(foreign) > 10 else "")
        raise InvalidInput(
            f"label map holds ids that are not in the MAISI label dictionary, which VISTA3D uses: {shown}. "
            "Was it made by another tool? Pass a --classes table naming its ids (`maisi2 labels import`)"
        )
    return {int(i): ID_TO_NAME[int(i)] for i in present if i > 0}


# -- files ------------------------------------------------------------------------------------

def import_totalseg(
    seg_path: str | os.PathLike, out_path: str | os.PathLike, ct_path: str | os.PathLike | None = None,
    version: str | None = None, overwrite: bool = False,
) -> ImportReport:
    """TotalSegmentator output (a multi-label NIfTI, or a folder of per-class masks) -> MAISI label map.

    version: "v1"/"v2" for a multi-label file, None to detect it (a folder is read by file names).
    With `ct_path` (NIfTI or DICOM folder, on the label map's grid) the body envelope comes from
    the CT's HU; without it, a rough envelope comes from the labels.
    """
    volume_io.check_label_map_writable(out_path, overwrite)  # fail before the slow part
    if Path(seg_path).is_dir():
        seg, classes = totalseg.read_class_folder(seg_path)
        ct = _ct_on_grid(ct_path, seg, seg_path)
        numbering = f"TotalSegmentator per-class folder ({len(classes)} masks, classes from file names)"
        out, report = convert_label_map(seg.array, classes, numbering, ct, seg.spacing)
    else:
        seg = volume_io.load_label_map(seg_path, check_ids=False)
        ct = _ct_on_grid(ct_path, seg, seg_path)
        out, report = convert_totalseg(seg.array, ct, spacing=seg.spacing, version=version)
    return _write(out_path, seg, out, report, overwrite)


def import_with_classes(
    seg_path: str | os.PathLike, classes_path: str | os.PathLike, out_path: str | os.PathLike,
    ct_path: str | os.PathLike | None = None, overwrite: bool = False,
) -> ImportReport:
    """Any tool's multi-label NIfTI plus its class table (`read_class_table`) -> MAISI label map."""
    volume_io.check_label_map_writable(out_path, overwrite)
    classes = read_class_table(classes_path)
    seg = volume_io.load_label_map(seg_path, check_ids=False)
    ct = _ct_on_grid(ct_path, seg, seg_path)
    numbering = f"class table {Path(classes_path).name}"
    out, report = convert_label_map(seg.array, classes, numbering, ct, seg.spacing)
    return _write(out_path, seg, out, report, overwrite)


def import_vista3d(
    seg_path: str | os.PathLike, out_path: str | os.PathLike, ct_path: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> ImportReport:
    """VISTA3D output (MAISI ids already) -> the same ids, checked, plus the body envelope."""
    volume_io.check_label_map_writable(out_path, overwrite)
    seg = volume_io.load_label_map(seg_path, check_ids=False)
    classes = _vista3d_classes(seg.array)
    ct = _ct_on_grid(ct_path, seg, seg_path)
    numbering = "VISTA3D output (MAISI label ids, checked against the MAISI dictionary)"
    out, report = convert_label_map(seg.array, classes, numbering, ct, seg.spacing)
    return _write(out_path, seg, out, report, overwrite)


def _write(out_path, seg: volume_io.Volume, out: np.ndarray, report: ImportReport, overwrite: bool) -> ImportReport:
    check_label_ids(out, "converted label map")
    volume_io.save_label_map(out_path, seg.with_array(out), overwrite=overwrite)
    return report


def _ct_on_grid(ct_path, seg: volume_io.Volume, seg_path) -> np.ndarray | None:
    if ct_path is None:
        return None
    ct = volume_io.load_ct(ct_path)
    if not _same_grid(ct, seg):
        raise InvalidInput(
            f"CT {Path(ct_path)} ({_grid_text(ct)}) is not on the grid of label map {Path(seg_path)} "
            f"({_grid_text(seg)}); pass the CT that was segmented, or resample it onto the label grid first"
        )
    return ct.array


def _same_grid(a, b, atol_mm: float = 1e-2) -> bool:
    # 0.01 mm: headers written from float32 geometry differ by rounding, real grid changes do not.
    return a.shape == b.shape and np.allclose(a.affine, b.affine, atol=atol_mm)


def _grid_text(vol) -> str:
    spacing = " x ".join(f"{s:g}" for s in vol.spacing)
    origin = ", ".join(f"{o:.1f}" for o in vol.affine[:3, 3])
    return f"shape {vol.shape}, spacing {spacing} mm, origin ({origin})"
