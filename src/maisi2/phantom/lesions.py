"""Lesions: the kinds, their tissues, and their placement inside a parent organ (probed with the
same painter that renders the volume, so a lesion fits whatever the grid).
"""

from __future__ import annotations

import numpy as np

from maisi2.errors import InvalidInput
from maisi2.labels import TUMOR_KINDS, label_id
from maisi2.phantom.anatomy import _Anatomy
from maisi2.phantom.fields import _DISP_MAX_MM, _Fields, _Points, _STREAM_LESIONS
from maisi2.phantom.shapes import _LOBULATION, _Layer, _Lesion, _Tissue, _paint




_LESION_TISSUES = {
    "hepatic tumor": lambda rng: _Tissue(rng.uniform(20, 30), 10),  # hypodense vs liver ~60
    "pancreatic tumor": lambda rng: _Tissue(rng.uniform(10, 20), 8),  # hypodense vs pancreas ~40
    "lung tumor": lambda rng: _Tissue(rng.uniform(25, 40), 15),  # solid nodule in air
    "colon cancer primaries": lambda rng: _Tissue(rng.uniform(35, 50), 10),  # soft-tissue mass in the lumen
    # Lytic (~100 HU, darker than the vertebra) or sclerotic (~800 HU, brighter).
    "bone lesion": lambda rng: (_Tissue(rng.uniform(80, 120), 15) if rng.random() < 0.5
                                else _Tissue(rng.uniform(700, 900), 30)),
    "left kidney cyst": lambda rng: _Tissue(rng.uniform(4, 10), 2),
    "right kidney cyst": lambda rng: _Tissue(rng.uniform(4, 10), 2),
}


# The largest lesion each parent organ of this phantom can hold (mm): radii are drawn below it, so
# placement rarely has to shrink a lesion (each failed try costs a few painter passes).
_RADIUS_CAP_MM = {"hepatic tumor": 45.0, "lung tumor": 30.0, "pancreatic tumor": 10.0, "colon cancer primaries": 12.0,
                  "bone lesion": 8.0, "left kidney cyst": 12.0, "right kidney cyst": 12.0}


def _fibonacci_sphere(n: int) -> np.ndarray:
    i = np.arange(n) + 0.5
    polar = np.arccos(1 - 2 * i / n)
    azimuth = np.pi * (1 + 5**0.5) * i
    return np.stack([np.cos(azimuth) * np.sin(polar), np.sin(azimuth) * np.sin(polar), np.cos(polar)], axis=1)


# Probe points, in units of a lesion's reach: a dense outer shell, an inner shell, the centre.
_PROBES = np.concatenate([_fibonacci_sphere(96), 0.5 * _fibonacci_sphere(24), np.zeros((1, 3))])


def _labels_at(anatomy: _Anatomy, fields: _Fields, points: np.ndarray) -> np.ndarray:
    canvas = _Points(points, fields)
    for layer in anatomy.layers:
        _paint(canvas, layer)
    return canvas.labels_in_input_order()


def _place_lesions(specs, anatomy, fields, fov_lo, fov_hi, spacing, seed) -> list[_Layer]:
    """Lesion layers: each lesion (plus one voxel of margin) inside one parent organ and the view."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, _STREAM_LESIONS]))
    margin = float(np.max(spacing))  # ring voxels around the voxelised lesion stay in the parent
    placed: list[_Lesion] = []
    layers = []
    for spec in specs:
        for _ in range(spec.count):
            lesion, name = _fit_lesion(spec, rng, anatomy, fields, fov_lo, fov_hi, margin, placed)
            placed.append(lesion)
            layers.append(_Layer(lesion, label_id(name), _LESION_TISSUES[name](rng)))
    return layers


def _fit_lesion(spec, rng, anatomy, fields, fov_lo, fov_hi, margin, placed):
    names = list(TUMOR_KINDS[spec.kind])
    rng.shuffle(names)
    low, high = spec.radius_mm
    for name in names:
        radius = rng.uniform(low, max(low, min(high, _RADIUS_CAP_MM[name])))
        for attempt in range(8):
            centre = _find_centre(name, radius, rng, anatomy, fields, fov_lo, fov_hi, margin, placed)
            if centre is not None:
                return _Lesion(centre, radius, rng), name
            if radius == low and attempt >= 4:
                break
            radius = max(low, radius * 0.75)
    raise InvalidInput(
        f"could not fit a {spec.kind} lesion of radius >= {low:g} mm (plus one voxel, {margin:g} mm, of "
        "margin) inside its parent organ within the field of view; the organ may lie outside the view "
        "or be too small at this spacing. Enlarge the field of view, use a finer spacing, lower "
        "--tumor-radius-mm or ask for fewer lesions."
    )


def _find_centre(name, radius, rng, anatomy, fields, fov_lo, fov_hi, margin, placed):
    """A lesion centre whose probe ball (radius + lobulation + margin) lies in one parent label, or None.

    Random candidates inside the parent are pushed towards its interior (along the mean direction
    of the probes that are still inside) until one fits: thin organs (pancreas, colon) get found.
    """
    parent_ids, box_lo, box_hi = anatomy.parents[name]
    reach = radius * (1 + _LOBULATION) + margin
    lo = np.maximum(box_lo - _DISP_MAX_MM, fov_lo + reach)
    hi = np.minimum(box_hi + _DISP_MAX_MM, fov_hi - reach)
    if np.any(lo >= hi):
        return None
    centres = rng.uniform(lo, hi, size=(1024, 3))
    centres = centres[np.isin(_labels_at(anatomy, fields, centres), parent_ids)][:64]
    for _ in range(6):
        for other in placed:  # lesions never touch each other
            centres = centres[np.linalg.norm(centres - other.centre, axis=1) > reach + other.reach]
        if not len(centres):
            return None
        probes = centres[:, None, :] + reach * _PROBES[None]
        found = _labels_at(anatomy, fields, probes.reshape(-1, 3)).reshape(len(centres), -1)
        own = found[:, -1]  # the last probe is the centre itself
        same = (found == own[:, None]) & np.isin(own, parent_ids)[:, None]
        fits = same.all(axis=1)
        if fits.any():
            return centres[int(np.argmax(fits))]
        shift = (same[:, :, None] * _PROBES[None]).mean(axis=1) * reach
        centres = np.clip(centres + shift, lo, hi)
    return None
