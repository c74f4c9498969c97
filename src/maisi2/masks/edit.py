"""Tumour edits on a label-map file: read, `tumors.edit_tumors`, write the map and its change list.

    changes = edit_file("mask.nii.gz", "edited.nii.gz", TumorEdits(add=(AddTumor("hepatic", 12),)))

writes ``edited.nii.gz`` (same grid and stored orientation), its viewer tables (as every label map
maisi2 writes: `maisi2.label_tables`) and ``edited_edits.json`` (what changed: one record per
tumour, see `tumors.TumorChange`), all or none.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from maisi2 import label_tables, volume_io
from maisi2.atomic import atomic_output, check_writable
from maisi2.errors import InvalidInput
from maisi2.masks.tumors import TumorChange, TumorEdits, edit_tumors

__all__ = ["edit_file", "changes_path"]


def changes_path(out: str | os.PathLike) -> Path:
    """edited.nii.gz -> edited_edits.json beside it."""
    out = Path(out)
    stem = out.name.split(".nii")[0]
    return out.with_name(f"{stem}_edits.json")


def edit_file(mask: str | os.PathLike, out: str | os.PathLike, edits: TumorEdits,
              overwrite: bool = False) -> list[TumorChange]:
    """Apply `edits` to the MAISI label map `mask` and write `out` plus its `_edits.json`."""
    out = Path(out).expanduser()
    if not out.name.endswith((".nii", ".nii.gz")):
        raise InvalidInput(f"{out}: the edited mask is NIfTI; name it *.nii.gz")
    if edits.is_empty():
        raise InvalidInput("no edit asked for; give --add, --remove, --scale, --remove-at, --scale-at or --augment")
    report_path = changes_path(out)
    slicer, itksnap = label_tables.table_paths(out)
    for path in (out, report_path, slicer, itksnap):
        check_writable(path, overwrite)
    volume = volume_io.load_label_map(mask)
    edited, changes = edit_tumors(volume.array, volume.spacing, edits)
    report = {"input": str(mask), "output": str(out), "spacing_mm": list(volume.spacing),
              "seed": edits.seed, "changes": [c.to_dict() for c in changes]}
    if edits.remove_at or edits.scale_at:  # how far a position could be from the tumour it picked
        report["within_mm"] = edits.within_mm
    # Every file is staged beside its target and renamed in at the end of the block, together.
    with atomic_output(out, overwrite) as map_tmp, atomic_output(report_path, overwrite) as json_tmp, \
            atomic_output(slicer, overwrite) as slicer_tmp, atomic_output(itksnap, overwrite) as itksnap_tmp:
        volume_io.save_label_map(map_tmp, volume.with_array(edited), overwrite=True, tables=False)
        slicer_tmp.write_text(label_tables.slicer_colour_table())
        itksnap_tmp.write_text(label_tables.itksnap_label_description())
        json_tmp.write_text(json.dumps(report, indent=2))
    return changes
