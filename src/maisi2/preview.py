"""The preview picture: axial, coronal and sagittal slices through one point, label outlines in
the colours of `maisi2.label_tables`, a legend of the labels drawn, and the HU window stated.

The point is the centre of the largest tumour when the label map has one (or of the largest
component of a requested label), else the middle of the volume: a preview of a generated tumour
should show the tumour. Display is radiological: patient right on the image left, anterior and
superior up; panels keep physical proportions (one mm-per-pixel scale for all three).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from maisi2 import label_tables
from maisi2 import labels as L
from maisi2.errors import InvalidInput

__all__ = ["PREVIEW_WINDOW_HU", "preview_centre", "render_preview"]

PREVIEW_WINDOW_HU = (-500.0, 500.0)  # lungs dark, soft tissues apart, bone bright
_TITLE_PX = 14
_LEGEND_ROW_PX = 12
_LEGEND_MAX_ROWS = 12
_LEGEND_COLUMN_PX = 200


def preview_centre(labels: np.ndarray, focus: str | int | None = None) -> tuple[tuple[int, int, int], str]:
    """(voxel (x, y, z) the slices pass through, what it is).

    focus: a MAISI label name or id to centre on (refused when absent from the map); None: the
    largest tumour if there is one, else the middle of the volume.
    """
    if focus is not None:
        target = L.label_id(focus) if isinstance(focus, str) else int(focus)
        if not np.any(labels == target):
            raise InvalidInput(f"the preview was asked to centre on {L.label_name(target)!r}, which the label map "
                             "does not hold; leave it out or name a label that is present")
        return _largest_component_centre(labels == target), f"centred on {L.label_name(target)}"
    present = [t for t in L.TUMOR_IDS if np.any(labels == t)]
    if present:
        mask = np.isin(labels, present)
        centre = _largest_component_centre(mask)
        return centre, f"centred on the largest tumour ({L.label_name(int(labels[centre]))})"
    return tuple(n // 2 for n in labels.shape), "mid-volume slices"


def _largest_component_centre(mask: np.ndarray) -> tuple[int, int, int]:
    components, count = ndimage.label(mask)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    biggest = components == int(np.argmax(sizes))
    centre = np.rint(ndimage.center_of_mass(biggest)).astype(int)
    if not biggest[tuple(centre)]:  # a curved component: take its voxel nearest the centre of mass
        voxels = np.argwhere(biggest)
        centre = voxels[np.argmin(((voxels - centre) ** 2).sum(axis=1))]
    return tuple(int(c) for c in centre)


def render_preview(hu: np.ndarray, labels: np.ndarray, spacing: Sequence[float], height: int = 256,
                   focus: str | int | None = None):
    """Tri-planar preview (PIL image) through `preview_centre(labels, focus)`, with a legend."""
    from PIL import Image, ImageDraw

    (x, y, z), where = preview_centre(labels, focus)
    views = {  # name: (hu slice, label slice, (row mm, column mm)) oriented for display
        "axial": (hu[::-1, ::-1, z].T, labels[::-1, ::-1, z].T, (spacing[1], spacing[0])),
        "coronal": (hu[::-1, y, ::-1].T, labels[::-1, y, ::-1].T, (spacing[2], spacing[0])),
        "sagittal": (hu[x, ::-1, ::-1].T, labels[x, ::-1, ::-1].T, (spacing[2], spacing[1])),
    }
    mm_per_px = max(n * s for n, s in zip(hu.shape, spacing)) / height
    panels = [_panel(*view, mm_per_px) for view in views.values()]
    drawn = _legend_ids(np.concatenate([np.unique(view[1]) for view in views.values()]), labels[x, y, z])
    gap = 4
    width = max(sum(p.width for p in panels) + gap * (len(panels) - 1), 2 * _LEGEND_COLUMN_PX)
    columns = max(1, width // _LEGEND_COLUMN_PX)
    rows = min(_LEGEND_MAX_ROWS, -(-len(drawn) // columns))
    canvas = Image.new("RGB", (width, _TITLE_PX + height + 2 * _TITLE_PX + rows * _LEGEND_ROW_PX + 4))
    draw = ImageDraw.Draw(canvas)
    left = 0
    for name, panel, index in zip(views, panels, (z, y, x)):
        canvas.paste(panel, (left, _TITLE_PX + (height - panel.height) // 2))
        draw.text((left + 2, 1), f"{name} {index}", fill=(255, 255, 255))
        left += panel.width + gap
    low, high = PREVIEW_WINDOW_HU
    lines = (f"{where} at voxel ({x}, {y}, {z})",
             f"window {low:g}..{high:g} HU (W {high - low:g} / L {(high + low) / 2:g}); patient right on the left")
    for row, line in enumerate(lines):
        draw.text((2, _TITLE_PX + height + 1 + row * _TITLE_PX), line, fill=(255, 255, 255))
    _draw_legend(draw, drawn, top=3 * _TITLE_PX + height, rows=rows, columns=columns)
    return canvas


def _legend_ids(ids: np.ndarray, centre_label: int) -> list[int]:
    """Labels in the drawn slices: the one at the centre first, then tumours, then the rest by id
    (background left out)."""
    present = sorted({int(i) for i in ids} - {L.BACKGROUND})
    first = [i for i in present if i == centre_label]
    tumors = [i for i in present if i in L.TUMOR_IDS and i != centre_label]
    return first + tumors + [i for i in present if i not in L.TUMOR_IDS and i != centre_label]


def _draw_legend(draw, ids: list[int], top: int, rows: int, columns: int) -> None:
    """Swatch and "id name" per label, column by column; what does not fit is counted in the last cell."""
    shown = ids if len(ids) <= rows * columns else ids[: rows * columns - 1]
    for n, idx in enumerate(shown):
        x, y = 4 + (n // rows) * _LEGEND_COLUMN_PX, top + (n % rows) * _LEGEND_ROW_PX
        colour = tuple(int(c) for c in label_tables.colours_of(np.array(idx)))
        draw.rectangle((x, y + 2, x + 8, y + 10), fill=colour)
        draw.text((x + 12, y), f"{idx} {L.label_name(idx)}", fill=(255, 255, 255))
    if len(shown) < len(ids):
        n = len(shown)
        x, y = 4 + (n // rows) * _LEGEND_COLUMN_PX, top + (n % rows) * _LEGEND_ROW_PX
        draw.text((x + 12, y), f"+{len(ids) - n} more labels", fill=(255, 255, 255))


def _panel(hu2d: np.ndarray, labels2d: np.ndarray, pixel_mm: tuple[float, float], mm_per_px: float):
    from PIL import Image

    low, high = PREVIEW_WINDOW_HU
    size = (max(1, round(hu2d.shape[1] * pixel_mm[1] / mm_per_px)), max(1, round(hu2d.shape[0] * pixel_mm[0] / mm_per_px)))
    gray = np.clip((hu2d.astype(np.float32) - low) / (high - low) * 255, 0, 255).astype(np.uint8)
    gray = np.asarray(Image.fromarray(np.ascontiguousarray(gray)).resize(size, Image.BILINEAR))
    ids = np.asarray(Image.fromarray(np.ascontiguousarray(labels2d.astype(np.int32))).resize(size, Image.NEAREST))
    rgb = np.repeat(gray[..., None], 3, axis=2)
    edge = np.zeros(ids.shape, dtype=bool)
    edge[:-1, :] |= ids[:-1, :] != ids[1:, :]
    edge[:, :-1] |= ids[:, :-1] != ids[:, 1:]
    edge &= ids != L.BACKGROUND
    rgb[edge] = label_tables.colours_of(ids[edge])
    return Image.fromarray(rgb)
