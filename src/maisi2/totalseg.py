"""TotalSegmentator's "total" task: its two class numberings, its name spelling, its output shapes.

Class maps (packaged as resources/totalseg_class_map_total.json for v2, 117 classes, and
resources/totalseg_class_map_total_v1.json for v1, 104 classes; both taken from
``totalsegmentator/map_to_binary.py`` of github.com/wasserth/TotalSegmentator, Apache-2.0). The two
versions share names but not ids: v1 numbers aorta 7, v2 pancreas 7.

Names: TotalSegmentator spells ``kidney_right`` or ``rib_left_1``; the MAISI table spells
``right kidney`` and ``left rib 1``. One rule covers almost every class: move the side word to the
front and join the rest with spaces. The few names the rule cannot produce live in `_RENAMES`
(v1's five heart parts become MAISI's one heart); classes MAISI has no label for are declared in
`NO_COUNTERPART` and their voxels become body.

Output shapes: one multi-label file (``TotalSegmentator --ml``), or a folder with one binary mask
per class (``liver.nii.gz``, the default without ``--ml``; `read_class_folder`).

Which numbering a multi-label file uses: ids above 104 exist only in v2; otherwise
`detect_version` reads it off the anatomy (classes named left lie left of the body's midline in
the right numbering, and only about half of them do in the wrong one).
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

from maisi2 import volume_io
from maisi2.errors import InvalidInput
from maisi2.labels import load_resource_json

__all__ = [
    "CLASS_MAPS",
    "TOTALSEG_CLASSES",
    "NO_COUNTERPART",
    "VERSIONS",
    "maisi_name",
    "detect_version",
    "read_class_folder",
]

VERSIONS = ("v1", "v2")
CLASS_MAPS: dict[str, dict[int, str]] = {
    "v1": {int(k): v for k, v in load_resource_json("totalseg_class_map_total_v1.json")["total_v1"].items()},
    "v2": {int(k): v for k, v in load_resource_json("totalseg_class_map_total.json")["total"].items()},
}
TOTALSEG_CLASSES = CLASS_MAPS["v2"]  # the current numbering
# Names the side rule cannot produce: MAISI says "bladder", TotalSegmentator "urinary_bladder";
# MAISI has one heart label where v1 had five parts.
_RENAMES: dict[str, str] = {
    "urinary_bladder": "bladder",
    **{f"heart_{part}": "heart" for part in
       ("myocardium", "atrium_left", "ventricle_left", "atrium_right", "ventricle_right")},
}
# TotalSegmentator classes with no MAISI label (only v1 has them; their voxels become body).
NO_COUNTERPART: frozenset[str] = frozenset({"pulmonary_artery", "face"})
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


# -- which numbering ---------------------------------------------------------------------------

_MIN_SIDED = 4  # sided classes needed before anatomy can tell the numberings apart
_MIN_AGREEMENT = 0.8  # share of sided classes on their named side in the right numbering
_MIN_MARGIN = 0.3  # ... ahead of the other numbering


def detect_version(labels: np.ndarray) -> tuple[str, str]:
    """("v1" or "v2", why) for a multi-label TotalSegmentator map in RAS orientation (X, Y, Z).

    Ids above 104 settle it (v2). Otherwise each numbering names some present classes left or
    right; in RAS arrays patient left is low x. The numbering under which clearly more of them lie
    on their named side of the midline (the middle of the labelled extent along x) wins. Raises
    ValueError when neither does, asking for ``--version``.
    """
    counts_by_x = _counts_by_x(labels)  # (X, ids)
    present = np.flatnonzero(counts_by_x.sum(axis=0))
    present = present[present > 0]
    top = int(present.max()) if present.size else 0
    if top > max(CLASS_MAPS["v1"]):
        return "v2", f"ids up to {top}; v1 stops at {max(CLASS_MAPS['v1'])}"
    scores = {v: _side_agreement(counts_by_x, present, CLASS_MAPS[v]) for v in VERSIONS}
    text = "; ".join(f"{v}: {ok} of {n} sided classes on their named side" for v, (ok, n) in scores.items())
    share = {v: ok / n if n >= _MIN_SIDED else 0.0 for v, (ok, n) in scores.items()}
    best, other = sorted(VERSIONS, key=share.get, reverse=True)
    if share[best] >= _MIN_AGREEMENT and share[best] - share[other] >= _MIN_MARGIN:
        return best, f"anatomy ({text})"
    raise InvalidInput(
        f"cannot tell TotalSegmentator v1 from v2 numbering (ids up to {top}; {text}); "
        "pass --version v1 or --version v2 (TotalSegmentator >= 2.0 writes v2)"
    )


def _counts_by_x(labels: np.ndarray) -> np.ndarray:
    """Voxels per (x index, class id): one bincount per sagittal slab, no full-size temporaries."""
    labels = np.asarray(labels)
    if labels.min() < 0:
        raise InvalidInput("label map holds negative values; was the CT passed in place of the label map?")
    width = int(labels.max()) + 1
    return np.stack([np.bincount(labels[x].ravel().astype(np.intp), minlength=width) for x in range(labels.shape[0])])


def _side_agreement(counts_by_x: np.ndarray, present: np.ndarray, names: dict[int, str]) -> tuple[int, int]:
    """(classes on their named side, sided classes present) under one numbering."""
    x = np.arange(counts_by_x.shape[0], dtype=np.float64)
    labelled_x = np.flatnonzero(counts_by_x[:, 1:].sum(axis=1))
    midline = (labelled_x.min() + labelled_x.max()) / 2 if labelled_x.size else 0.0
    agree = total = 0
    for idx in present:
        words = names.get(int(idx), "").split("_")
        side = [w for w in words if w in _SIDES]
        if len(side) != 1:
            continue
        centre = float(x @ counts_by_x[:, idx] / counts_by_x[:, idx].sum())
        total += 1
        agree += (centre > midline) == (side[0] == "right")  # RAS: patient right is high x
    return agree, total


# -- one mask per class -------------------------------------------------------------------------

def read_class_folder(folder: str | os.PathLike) -> tuple[volume_io.Volume, dict[int, str]]:
    """A folder of binary masks named by class (``liver.nii.gz`` ...) as one multi-label volume.

    Returns the volume (ids 1..N in the files' name order, RAS) and {id: class name}. Every file is
    checked to be on one grid from its header before any voxels are read. Where masks overlap, the
    later file in name order wins (TotalSegmentator's own masks do not overlap).
    """
    folder = Path(folder).expanduser()
    files = sorted(p for p in folder.iterdir() if p.name.endswith((".nii", ".nii.gz")) and not p.name.startswith("."))
    if not files:
        raise InvalidInput(f"{folder} holds no NIfTI masks (*.nii.gz); expected TotalSegmentator's one-file-per-class output")
    _check_one_grid(files)
    names: dict[int, str] = {}
    merged = None
    for idx, path in enumerate(files, start=1):
        mask = volume_io.load_label_map(path, check_ids=False)
        if mask.array.min() < 0 or mask.array.max() > 1:
            raise InvalidInput(f"{path} holds values other than 0 and 1; a per-class folder holds binary masks")
        if merged is None:
            merged = mask.with_array(np.zeros(mask.shape, dtype=np.int16))
        merged.array[mask.array > 0] = idx
        names[idx] = path.name.split(".nii")[0]
    return merged, names


def _check_one_grid(files: list[Path]) -> None:
    first = nib.load(files[0])
    for path in files[1:]:
        image = nib.load(path)
        if image.shape != first.shape or not np.allclose(image.affine, first.affine, atol=1e-3):
            raise InvalidInput(
                f"{path.name} (shape {image.shape}) is not on the grid of {files[0].name} (shape {first.shape}); "
                "the masks of one folder must come from one TotalSegmentator run"
            )
