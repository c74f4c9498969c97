"""Label-only cartoons of the head and the pelvis, so the bundled library has a mask for every region.

The torso phantom (`maisi2.phantom`) models the chest and abdomen only. These two masks are a few
seeded ellipsoids each (no CT is rendered): enough for selection, editing and a field of view to
generate in, not anatomy to learn from. The bundled model was trained on torso phantoms, so CTs
generated from these masks are not realistic head or pelvis scans.
"""

from __future__ import annotations

import numpy as np

from maisi2 import labels as L

__all__ = ["head_mask", "pelvis_mask"]


def _grid(shape, spacing):
    """Voxel centre coordinates in mm, centred on the array (x, y, z)."""
    return np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)], indexing="ij")


def _ellipsoid(grid, centre, radii) -> np.ndarray:
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


def head_mask(shape, spacing, seed: int = 0) -> np.ndarray:
    """Head and upper neck: scalp (body), skull shell, brain, C1-C3 and the spinal cord below."""
    rng = np.random.default_rng(seed)
    grid = _grid(shape, spacing)
    size = rng.uniform(0.92, 1.08, size=3)
    out = np.zeros(shape, np.uint8)
    head_c, head_r = (0, 0, 20), np.array([75, 95, 85]) * size
    out[_ellipsoid(grid, (0, -10, -70), (45, 45, 60))] = L.BODY  # neck
    out[_ellipsoid(grid, head_c, head_r)] = L.BODY
    out[_ellipsoid(grid, head_c, head_r - 5)] = L.label_id("skull")
    out[_ellipsoid(grid, head_c, head_r - 12)] = L.label_id("brain")
    for k, level in enumerate(("C1", "C2", "C3")):
        out[_ellipsoid(grid, (0, -15, -60 - 16 * k), (14, 12, 7))] = L.label_id(f"vertebrae {level}")
    return out


def pelvis_mask(shape, spacing, seed: int = 0) -> np.ndarray:
    """Pelvis: body, hips, sacrum, L5 and S1, bladder, colon (sigmoid) and the femoral heads/shafts."""
    rng = np.random.default_rng(seed)
    grid = _grid(shape, spacing)
    size = rng.uniform(0.92, 1.08, size=3)
    out = np.zeros(shape, np.uint8)
    out[_ellipsoid(grid, (0, 0, 0), np.array([170, 120, 400]) * size)] = L.BODY
    for side, sign in (("left", -1), ("right", 1)):  # RAS: the patient's right at +x
        wing = _ellipsoid(grid, (sign * 85, -20, 40), (45, 25, 60)) & ~_ellipsoid(grid, (sign * 85, -5, 40), (35, 20, 55))
        out[wing] = L.label_id(f"{side} hip")
        out[_ellipsoid(grid, (sign * 95, 0, -50), (25, 25, 25))] = L.label_id(f"{side} femur")
        out[_ellipsoid(grid, (sign * 105, 0, -110), (15, 15, 60))] = L.label_id(f"{side} femur")
    out[_ellipsoid(grid, (0, -60, 40), (40, 18, 45))] = L.label_id("sacrum")
    out[_ellipsoid(grid, (0, -55, 105), (25, 20, 12))] = L.label_id("vertebrae S1")
    out[_ellipsoid(grid, (0, -45, 135), (25, 20, 13))] = L.label_id("vertebrae L5")
    out[_ellipsoid(grid, (0, 45, -10), np.array([40, 35, 35]) * size)] = L.label_id("bladder")
    out[_ellipsoid(grid, (-10, -25, 0), (18, 15, 60))] = L.label_id("colon")
    return out
