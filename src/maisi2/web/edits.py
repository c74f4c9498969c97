"""The page's tumour edits as `maisi2.masks.tumors.edit_tumors` requests (the one implementation).

An edit from the page names one operation: add a tumour of a kind and radius at a clicked voxel,
or remove / resize the tumours of a kind (as `maisi2 masks edit --remove KIND --scale KIND=F`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from maisi2.errors import InvalidInput
from maisi2.masks.tumors import AddTumor, TumorEdits, edit_tumors

__all__ = ["apply_edit"]


def apply_edit(labels: np.ndarray, spacing: Sequence[float], edit: dict) -> tuple[np.ndarray, dict]:
    """(edited labels, record) for {"op": "add", "kind", "radius_mm", "at"[, "seed"]},
    {"op": "remove", "kind"} or {"op": "scale", "kind", "factor"}; the record holds the request,
    `edit_tumors`' change list and a one-line summary for the mask's name."""
    edits, summary = _request(edit)
    edited, changes = edit_tumors(labels, spacing, edits)
    return edited, {"edit": edit, "changes": [c.to_dict() for c in changes], "summary": summary}


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
