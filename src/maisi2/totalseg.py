"""Import TotalSegmentator label maps: class ids -> MAISI ids by name, plus the body envelope.

TotalSegmentator's "total" task (v2, 117 classes; class map packaged as
resources/totalseg_class_map_total.json) spells names as ``kidney_right`` or ``rib_left_1``; the
MAISI table spells them ``right kidney`` and ``left rib 1``. One rule covers almost every class:
move the side word to the front and join the rest with spaces. The few names the rule cannot
produce live in `_RENAMES`; classes MAISI has no label for would live in `NO_COUNTERPART` and
their voxels become body (today every "total" class has a counterpart).

MAISI label maps also carry the body envelope (label 200): voxels inside the body that no organ
claims. The generator sets everything outside labels to -1000 HU, so without the envelope fat and
muscle would come out as air. The envelope comes from the CT when one is given (a threshold at
-500 HU, thin bridges to the scanner table cut, the main connected component kept, holes filled
so the lungs and bowel gas count as inside), else from the labels alone (closing and hole filling of the union of all labels per axial slice).
The label-only envelope is rough: TotalSegmentator does not label subcutaneous fat or most
muscles, so it hugs the labelled organs and misses the outer body wall.

Arrays are RAS-canonical with axes (x, y, z), as `maisi2.io` loads them; axial slices are
``array[:, :, k]``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from maisi2 import io
from maisi2.atomic import check_writable
from maisi2.labels import BACKGROUND, BODY, LABELS, check_label_ids, label_id, label_name, load_resource_json

__all__ = [
    "TOTALSEG_CLASSES",
    "NO_COUNTERPART",
    "maisi_name",
    "totalseg_to_maisi_table",
    "ImportReport",
    "convert_totalseg",
    "body_envelope_from_ct",
    "body_envelope_from_labels",
    "import_totalseg",
]

TOTALSEG_CLASSES: dict[int, str] = {
    int(k): v for k, v in load_resource_json("totalseg_class_map_total.json")["total"].items()
}
# Names the side rule cannot produce: MAISI says "bladder", TotalSegmentator "urinary_bladder".
_RENAMES: dict[str, str] = {"urinary_bladder": "bladder"}
# TotalSegmentator classes with no MAISI label (none in the v2 "total" task; a test keeps it so).
NO_COUNTERPART: frozenset[str] = frozenset()
_SIDES = ("left", "right")


def maisi_name(totalseg_name: str) -> str:
    """The MAISI spelling of a TotalSegmentator class name (not checked against the table).

    >>> maisi_name("lung_upper_lobe_left"), maisi_name("rib_right_3"), maisi_name("vertebrae_L5")
    ('left lung upper lobe', 'right rib 3', 'vertebrae L5')
    """
    if totalseg_name in _RENAMES:
        return _RENAMES[totalseg_name]
    words = totalseg_name.split("_")
    side = [w for w in words if w in _SIDES]
    rest = [w for w in words if w not in _SIDES]
    return " ".join(side + rest)


def totalseg_to_maisi_table() -> dict[int, int | None]:
    """TotalSegmentator "total" class id -> MAISI id, or None for a class with no counterpart."""
    table: dict[int, int | None] = {}
    for ts_id, name in TOTALSEG_CLASSES.items():
        target = maisi_name(name)
        table[ts_id] = None if name in NO_COUNTERPART or target not in LABELS else label_id(target)
    return table


@dataclass(frozen=True)
class ImportReport:
    """What a conversion did. Names are TotalSegmentator's; voxel counts are of the input map."""

    present: dict[str, int]  # class name -> voxels, for each class found in the map
    mapped: dict[str, str]  # class name -> MAISI name, for present classes with a counterpart
    no_counterpart: dict[str, int]  # class name -> voxels, which became body
    body_voxels: int  # voxels labelled body (200) in the output
    body_from: str  # "ct" or "labels"
    shape: tuple[int, ...]

    def summary(self) -> str:
        lines = [
            f"TotalSegmentator classes present: {len(self.present)}; mapped to MAISI ids: {len(self.mapped)}",
            f"body envelope from the {'CT (HU threshold)' if self.body_from == 'ct' else 'labels (rough)'}: "
            f"{self.body_voxels} voxels of {int(np.prod(self.shape))}",
        ]
        if self.no_counterpart:
            gone = ", ".join(f"{k} ({v} voxels)" for k, v in self.no_counterpart.items())
            lines.append(f"no MAISI counterpart, relabelled as body: {gone}")
        else:
            lines.append("every present class has a MAISI counterpart")
        return "\n".join(lines)


def _lookup_table() -> np.ndarray:
    """Array indexed by TotalSegmentator id giving the MAISI id (body for classes with no label)."""
    lut = np.zeros(max(TOTALSEG_CLASSES) + 1, dtype=np.int16)
    for ts_id, maisi_id in totalseg_to_maisi_table().items():
        lut[ts_id] = BODY if maisi_id is None else maisi_id
    return lut


def _class_voxel_counts(seg: np.ndarray) -> np.ndarray:
    """Voxels per TotalSegmentator id (index = id), after checking the map holds only class ids."""
    if not np.issubdtype(seg.dtype, np.integer) and not np.array_equal(seg, np.round(seg)):
        raise ValueError("TotalSegmentator label map holds non-integer values; was the CT passed in place of the label map?")
    low, high = int(seg.min()), int(seg.max())
    if low < 0 or high > max(TOTALSEG_CLASSES):
        hint = " (negative values: was the CT passed in place of the label map?)" if low < 0 else ""
        raise ValueError(
            f"label map holds ids from {low} to {high}, outside the TotalSegmentator 'total' classes "
            f"(1..{max(TOTALSEG_CLASSES)}){hint}; expected the single multi-label file of TotalSegmentator "
            "v2's 'total' task (`TotalSegmentator --ml`)"
        )
    # bincount beats np.unique (a full sort) on 512 x 512 x 768 maps.
    return np.bincount(seg.astype(np.intp, copy=False).ravel(), minlength=max(TOTALSEG_CLASSES) + 1)


def convert_totalseg(
    labels: np.ndarray, ct: np.ndarray | None = None, spacing: tuple[float, ...] | None = None
) -> tuple[np.ndarray, ImportReport]:
    """Map a TotalSegmentator "total" label map to MAISI ids and add the body envelope.

    labels: integer array (X, Y, Z), TotalSegmentator class ids. ct: HU on the same grid, or None
    to build the envelope from the labels. spacing: voxel size in mm (x, y, z), which sizes the
    morphology; None means 1 mm. Returns an int16 MAISI label map and an `ImportReport`.
    """
    labels = np.asarray(labels)
    if ct is not None and np.shape(ct) != labels.shape:
        raise ValueError(f"CT shape {np.shape(ct)} differs from label map shape {labels.shape}; resample the CT onto the label grid")
    counts = _class_voxel_counts(labels)
    seg = labels if np.issubdtype(labels.dtype, np.integer) else labels.astype(np.int16)
    out = _lookup_table()[seg]
    if ct is not None:
        envelope = body_envelope_from_ct(ct, labels=seg, spacing=spacing)
    else:
        envelope = body_envelope_from_labels(seg, spacing=spacing)
    out[(out == BACKGROUND) & envelope] = BODY
    return out, _report(counts, out, ct is not None)


def _report(counts: np.ndarray, out: np.ndarray, from_ct: bool) -> ImportReport:
    table = totalseg_to_maisi_table()
    present = {TOTALSEG_CLASSES[i]: int(counts[i]) for i in TOTALSEG_CLASSES if counts[i]}
    target = {TOTALSEG_CLASSES[i]: table[i] for i in TOTALSEG_CLASSES}
    return ImportReport(
        present=present,
        mapped={n: label_name(target[n]) for n in present if target[n] is not None},
        no_counterpart={n: c for n, c in present.items() if target[n] is None},
        body_voxels=int(np.count_nonzero(out == BODY)),
        body_from="ct" if from_ct else "labels",
        shape=tuple(int(s) for s in out.shape),
    )


def body_envelope_from_ct(
    ct_hu: np.ndarray,
    threshold: float = -500.0,
    labels: np.ndarray | None = None,
    spacing: tuple[float, ...] | None = None,
    detach_mm: float = 3.0,
) -> np.ndarray:
    """Boolean body mask from a CT in HU (X, Y, Z).

    1. Voxels above `threshold` HU.
    2. An in-plane opening of radius `detach_mm` cuts thin bridges (the table top, cables,
       blankets) from the body; the largest connected component of what remains is the body,
       plus, when `labels` are given, any component holding a labelled voxel (arms beside the
       body are separate components but still body).
    3. The opening rounded off the body outline, so the kept components are grown back by
       `detach_mm` inside the thresholded voxels (a stub of the table at most that long remains).
    4. Holes filled, so lungs, airways and bowel gas count as inside.

    spacing: voxel size in mm (x, y, z); None means 1 mm.
    """
    tissue = np.asarray(ct_hu) > threshold
    sampling = _in_plane(spacing)
    core = _per_slice(lambda m: _opening_2d(m, sampling, detach_mm), tissue)
    core = _main_components(core, labels)
    regrown = _per_slice(lambda m: _dilation_2d(m, sampling, detach_mm), core) & tissue
    return _fill_holes(regrown)


def _main_components(mask: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
    """The largest connected component, plus any component holding a labelled voxel."""
    components, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    keep = np.zeros(count + 1, dtype=bool)
    keep[int(np.argmax(sizes))] = True
    if labels is not None:
        keep[np.unique(components[labels > 0])] = True
        keep[0] = False
    return keep[components]


def body_envelope_from_labels(
    labels: np.ndarray, spacing: tuple[float, ...] | None = None, closing_mm: float = 10.0
) -> np.ndarray:
    """A rough body mask from a label map alone: the labelled union, closed and hole-filled per slice.

    The closing (a disc of radius `closing_mm` in each axial slice) bridges the unlabelled fat and
    muscle between organs; it cannot recover the outer body wall, which TotalSegmentator does not
    label, so prefer `body_envelope_from_ct` when the CT is at hand. spacing: voxel size in mm
    (x, y, z); None means 1 mm.
    """
    sampling = _in_plane(spacing)
    closed = _per_slice(lambda m: _closing_2d(m, sampling, closing_mm), np.asarray(labels) > 0)
    return _fill_holes(closed)


# -- per-slice morphology -------------------------------------------------------------------
# Discs are applied through distance transforms: their cost does not grow with the radius, where a
# 10 mm structuring element at sub-millimetre spacing makes scipy's binary morphology crawl on a
# 512 x 512 slice. Only in-array zeros count as background, so a body cut by the field of view is
# not eaten from the array edge.

def _in_plane(spacing) -> tuple[float, float]:
    return (1.0, 1.0) if spacing is None else (float(spacing[0]), float(spacing[1]))


def _per_slice(fn, mask: np.ndarray) -> np.ndarray:
    out = np.empty_like(mask)
    for k in range(mask.shape[2]):
        out[:, :, k] = fn(mask[:, :, k])
    return out


def _dilation_2d(mask, sampling, radius_mm):
    if not mask.any():
        return mask
    return ndimage.distance_transform_edt(~mask, sampling=sampling) <= radius_mm


def _erosion_2d(mask, sampling, radius_mm):
    if mask.all():
        return mask
    return ndimage.distance_transform_edt(mask, sampling=sampling) > radius_mm


def _closing_2d(mask, sampling, radius_mm):
    return _erosion_2d(_dilation_2d(mask, sampling, radius_mm), sampling, radius_mm)


def _opening_2d(mask, sampling, radius_mm):
    return _dilation_2d(_erosion_2d(mask, sampling, radius_mm), sampling, radius_mm)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill holes per axial slice, then in 3D.

    Per slice first because the lungs and trachea touch the top and bottom of a scan: in 3D their
    air connects to the volume border and would not count as a hole, in an axial slice it is
    enclosed by the chest wall.
    """
    return _enclosed_filled(_per_slice(_enclosed_filled, mask))


def _enclosed_filled(mask: np.ndarray) -> np.ndarray:
    """`mask` plus every background region not touching the array border (any number of dims).

    Same result as ndimage.binary_fill_holes, about twice as fast: one labelling pass instead of
    an iterated propagation.
    """
    background, _ = ndimage.label(~mask)
    faces = [np.take(background, end, axis=axis).ravel() for axis in range(mask.ndim) for end in (0, -1)]
    outside = np.zeros(background.max() + 1, dtype=bool)
    outside[np.concatenate(faces)] = True
    outside[0] = False  # label 0 is the mask itself
    return ~outside[background]


def _same_grid(a, b, atol_mm: float = 1e-2) -> bool:
    # 0.01 mm: headers written from float32 geometry differ by rounding, real grid changes do not.
    return a.shape == b.shape and np.allclose(a.affine, b.affine, atol=atol_mm)


def _grid_text(vol) -> str:
    spacing = " x ".join(f"{s:g}" for s in vol.spacing)
    origin = ", ".join(f"{o:.1f}" for o in vol.affine[:3, 3])
    return f"shape {vol.shape}, spacing {spacing} mm, origin ({origin})"


def import_totalseg(
    seg_path: str | os.PathLike,
    out_path: str | os.PathLike,
    ct_path: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> ImportReport:
    """Convert a TotalSegmentator label map file to a MAISI label map file (NIfTI).

    With `ct_path` (NIfTI or DICOM folder, on the label map's grid) the body envelope comes from
    the CT's HU; without it, a rough envelope comes from the labels.
    """
    check_writable(out_path, overwrite)  # fail before the slow part
    seg = io.load_label_map(seg_path, check_ids=False)
    ct = None
    if ct_path is not None:
        ct = io.load_ct(ct_path)
        if not _same_grid(ct, seg):
            raise ValueError(
                f"CT {Path(ct_path)} ({_grid_text(ct)}) is not on the grid of label map {Path(seg_path)} "
                f"({_grid_text(seg)}); pass the CT that TotalSegmentator segmented, or resample it onto the label grid first"
            )
    out, report = convert_totalseg(seg.array, None if ct is None else ct.array, spacing=seg.spacing)
    check_label_ids(out, "converted label map")
    io.save_label_map(out_path, seg.with_array(out), overwrite=overwrite)
    return report
