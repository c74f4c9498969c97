"""The page's tumour edits as `maisi2.masks.tumors.edit_tumors` requests (the one implementation).

An edit from the page names one operation: add a tumour of a kind and radius at a clicked voxel;
remove / resize the one tumour at (or nearest) a clicked voxel (`maisi2 masks edit --remove-at X,Y,Z
--scale-at X,Y,Z=F`); or remove / resize every tumour of a kind (`--remove KIND --scale KIND=F`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from maisi2.errors import InvalidInput
from maisi2.masks.tumors import WITHIN_MM, AddTumor, TumorEdits, edit_tumors, remove_tumor_at, scale_tumor_at

__all__ = ["apply_edit"]


def apply_edit(labels: np.ndarray, spacing: Sequence[float], edit: dict) -> tuple[np.ndarray, dict]:
    """(edited labels, record) for {"op": "add", "kind", "radius_mm", "at"[, "seed"]},
    {"op": "remove", "at"[, "kind", "within_mm"]}, {"op": "scale", "at", "factor"[, "kind", "within_mm"]}
    (one tumour: the one at or nearest `at`, of `kind` if given), or {"op": "remove", "kind"} /
    {"op": "scale", "kind", "factor"} (every tumour of the kind); the record holds the request,
    the change list and a one-line summary for the mask's name."""
    if edit.get("op") in ("remove", "scale") and edit.get("at") is not None:
        edited, changes = _one_tumor(labels, spacing, edit)
        change = changes[0]
        verb = "removed" if edit["op"] == "remove" else f"x{float(edit['factor']):g}"
        summary = f"{change.label} at {[round(v) for v in change.centre_voxel]} {verb}"
    else:
        edits, summary = _request(edit)
        edited, changes = edit_tumors(labels, spacing, edits)
    return edited, {"edit": edit, "changes": [c.to_dict() for c in changes], "summary": summary}


def _one_tumor(labels, spacing, edit: dict):
    at, kind = edit["at"], edit.get("kind") or None
    within = float(edit.get("within_mm", WITHIN_MM))
    if edit["op"] == "remove":
        return remove_tumor_at(labels, spacing, at, within, kind)
    if edit.get("factor") is None:
        raise InvalidInput("resizing a tumour needs a factor (a length ratio, e.g. 0.8)")
    return scale_tumor_at(labels, spacing, at, float(edit["factor"]), within, kind)


def _request(edit: dict) -> tuple[TumorEdits, str]:
    op, kind = edit.get("op"), edit.get("kind")
    if not kind:
        raise InvalidInput("a tumour edit names the tumour kind (e.g. hepatic)")
    if op == "add":
        at = edit.get("at")
        if edit.get("radius_mm") is None or at is None:
            raise InvalidInput("adding a tumour needs a radius (mm) and a position (click on the organ)")
        add = AddTumor(kind, float(edit["radius_mm"]), tuple(int(v) for v in at))
        return TumorEdits(add=(add,), seed=int(edit.get("seed", 0))), f"{kind} {add.radius_mm:g} mm at {list(add.at)}"
    if op == "remove":
        return TumorEdits(remove=(kind,)), f"{kind} removed"
    if op == "scale":
        if edit.get("factor") is None:
            raise InvalidInput("resizing tumours needs a factor (a length ratio, e.g. 0.8)")
        return TumorEdits(scale=((kind, float(edit["factor"])),)), f"{kind} x{float(edit['factor']):g}"
    raise InvalidInput(f"unknown tumour edit {op!r}; the page offers add, remove and scale")
