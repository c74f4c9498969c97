"""Names and colours of the MAISI labels, for viewers: 3D Slicer colour tables, ITK-SNAP label
descriptions, and the preview's outlines and legend (one colour per id, the same everywhere).

Files written beside a label map ``X.nii.gz``:
- ``X.ctbl``: 3D Slicer's colour table ("Color table file" text format: one line
  ``index name R G B A`` per label, spaces in names replaced by underscores, components 0-255).
  Load it in Slicer with the label map (Add Data), then pick it as the volume's colour table.
- ``X.itksnap.txt``: ITK-SNAP's label description file (``IDX R G B A VIS MSH "LABEL"``, alpha
  0-1, visibility and mesh flags 0/1, the name in double quotes). In ITK-SNAP: Segmentation >
  Import Label Descriptions.
Both list every MAISI label (not only those present), so a label painted later has its name too.
"""

from __future__ import annotations

import colorsys
import os
from pathlib import Path

import numpy as np

from maisi2.atomic import atomic_output, check_writable
from maisi2.labels import BACKGROUND, BODY, ID_TO_NAME, RING_MAJORITY_CANDIDATES, TUMOR_PARENT

__all__ = [
    "label_table",
    "label_colours",
    "colours_of",
    "slicer_colour_table",
    "itksnap_label_description",
    "table_paths",
    "check_tables_writable",
    "write_label_tables",
]

_BODY_ALPHA = 0.25  # the body envelope covers everything: let the CT show through it


def label_colours() -> np.ndarray:
    """(256, 3) uint8: a fixed, well-spread colour per id (golden-ratio hues; the body grey).

    Consecutive ids (neighbouring organs, a tumour and its organ) get hues ~0.38 turns apart.
    """
    table = np.zeros((256, 3), dtype=np.uint8)
    for i in range(1, 256):
        table[i] = [round(255 * c) for c in colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.85, 1.0)]
    table[BODY] = (160, 160, 160)
    return table


_COLOURS = label_colours()


def colours_of(ids: np.ndarray) -> np.ndarray:
    """RGB uint8 colours of an array of label ids (shape (..., 3))."""
    return _COLOURS[np.clip(ids, 0, 255)]


def label_table() -> list[dict]:
    """Every MAISI label as {"id", "name", "colour" (#rrggbb, as the preview and the viewer tables
    draw it), "parent" (what a tumour or cyst is replaced by in the unconditional mask, or None)}."""
    rows = []
    for idx in sorted(ID_TO_NAME):
        if idx in TUMOR_PARENT:
            parent = ID_TO_NAME[TUMOR_PARENT[idx]]
        elif idx in RING_MAJORITY_CANDIDATES:
            parent = "the most common surrounding " + ("lung lobe" if "lung" in ID_TO_NAME[idx] else "bone")
        else:
            parent = None
        rows.append({"id": idx, "name": ID_TO_NAME[idx], "colour": "#%02x%02x%02x" % tuple(_COLOURS[idx]),
                     "parent": parent})
    return rows


def _entries() -> list[tuple[int, str, tuple[int, int, int], float]]:
    """(id, name, rgb, alpha) for background and every MAISI label, by id."""
    rows = [(BACKGROUND, "background", (0, 0, 0), 0.0)]
    for idx in sorted(ID_TO_NAME):
        alpha = _BODY_ALPHA if idx == BODY else 1.0
        rows.append((idx, ID_TO_NAME[idx], tuple(int(c) for c in _COLOURS[idx]), alpha))
    return rows


def slicer_colour_table(title: str = "MAISI labels") -> str:
    """The MAISI labels as a 3D Slicer colour table (.ctbl / .txt text format)."""
    rows = _entries()
    lines = [f"# Color table file {title}", f"# {len(rows)} values"]
    for idx, name, (r, g, b), alpha in rows:
        lines.append(f"{idx} {name.replace(' ', '_')} {r} {g} {b} {round(alpha * 255)}")
    return "\n".join(lines) + "\n"


def itksnap_label_description() -> str:
    """The MAISI labels as an ITK-SNAP label description file."""
    lines = [
        "################################################",
        "# ITK-SnAP Label Description File",
        "# File format:",
        "# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL",
        "# Fields:",
        "#    IDX:   Zero-based index",
        "#    -R-:   Red color component (0..255)",
        "#    -G-:   Green color component (0..255)",
        "#    -B-:   Blue color component (0..255)",
        "#    -A-:   Label transparency (0.00 .. 1.00)",
        "#    VIS:   Label visibility (0 or 1)",
        "#    MSH:   Label mesh visibility (0 or 1)",
        "#  LABEL:   Label description",
        "################################################",
    ]
    for idx, name, (r, g, b), alpha in _entries():
        shown = 0 if idx == BACKGROUND else 1
        lines.append(f"{idx:5d} {r:5d} {g:4d} {b:4d} {alpha:8.2f} {shown:2d} {shown:2d}    \"{name}\"")
    return "\n".join(lines) + "\n"


def table_paths(label_path: str | os.PathLike) -> tuple[Path, Path]:
    """(Slicer colour table, ITK-SNAP label description) paths beside a label map."""
    label_path = Path(label_path)
    stem = label_path.name.split(".nii")[0]
    return label_path.with_name(f"{stem}.ctbl"), label_path.with_name(f"{stem}.itksnap.txt")


def check_tables_writable(label_path: str | os.PathLike, overwrite: bool = False) -> None:
    for path in table_paths(label_path):
        check_writable(path, overwrite)


def write_label_tables(label_path: str | os.PathLike, overwrite: bool = False) -> tuple[Path, Path]:
    """Write both tables beside `label_path` (each atomically); returns their paths."""
    slicer, itksnap = table_paths(label_path)
    for path, text in ((slicer, slicer_colour_table()), (itksnap, itksnap_label_description())):
        with atomic_output(path, overwrite) as tmp:
            tmp.write_text(text)
    return slicer, itksnap
