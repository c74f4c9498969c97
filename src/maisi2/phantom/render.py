"""Rendering: paint the layers slab by slab, add texture, vessels, partial volume and noise.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from maisi2.labels import LUNG_IDS, label_id
from maisi2.phantom.fields import _Fields, _Grid, _STREAM_NOISE
from maisi2.phantom.shapes import _paint


_SLAB_VOXELS = 4_000_000  # render in z-slabs of about this many voxels to bound memory


def _render(layers, axes, fields: _Fields, spacing: np.ndarray, seed: int):
    xs, ys, zs = axes
    shape = (len(xs), len(ys), len(zs))
    labels = np.zeros(shape, np.uint8)
    ct = np.empty(shape, np.float32)
    step = max(1, _SLAB_VOXELS // (shape[0] * shape[1]))
    for z0 in range(0, shape[2], step):
        grid = _Grid(xs, ys, zs[z0 : z0 + step], fields)
        for layer in layers:
            _paint(grid, layer)
        labels[..., z0 : z0 + step] = grid.labels
        ct[..., z0 : z0 + step] = _textured(grid, spacing)
    # Partial volume, cheaply: the scanner's point spread softens every edge by about a third of a voxel.
    ct = ndimage.gaussian_filter(ct, 0.35, truncate=3.0)
    noise_rng = np.random.default_rng(np.random.SeedSequence([seed, _STREAM_NOISE]))
    sigma = np.float32(_noise_sigma(spacing))
    for z0 in range(0, shape[2], step):  # drawn slice by slice (z-major): the same noise for any slab size
        slab = ct[..., z0 : z0 + step]
        slab += sigma * noise_rng.standard_normal((slab.shape[2], *shape[:2]), np.float32).transpose(1, 2, 0)
    ct[labels == 0] = -1000.0  # MAISI convention: nothing but air outside the body
    np.clip(ct, -1000.0, 1500.0, out=ct)
    return ct, labels


def _noise_sigma(spacing) -> float:
    """Quantum noise (HU std) falls with the square root of the voxel volume: ~10 HU at 1.5 mm."""
    volume = float(np.prod(spacing))
    return float(np.clip(10.0 * math.sqrt(1.5**3 / volume), 2.0, 25.0))


def _textured(grid: _Grid, spacing) -> np.ndarray:
    """Base HU + per-tissue texture, lung and liver vessels, and the dependent lung density."""
    finest = float(np.max(spacing))
    ct = grid.hu + grid.tex * grid.fields.texture_on_axes(*grid.axes, finest)
    lung = np.isin(grid.labels, LUNG_IDS)
    liver = grid.labels == label_id("liver")
    if lung.any() or liver.any():
        vessels = _vessel_map(grid, finest)
        ct[lung] += (40.0 - ct[lung]) * vessels[lung]
        ct[liver] += 90.0 * vessels[liver]
    if lung.any():
        posterior = np.clip(-np.broadcast_to(grid.anat[1], grid.shape)[lung] / 100.0, 0.0, 1.0)
        ct[lung] += 60.0 * posterior  # gravity-dependent density, patient supine
    return ct


def _vessel_map(grid: _Grid, finest_mm: float) -> np.ndarray:
    """Soft indicator (0..1) of thin winding tubes: where two smooth random fields both cross zero."""
    scale = max(6.0, 2.0 * finest_mm)
    f1 = grid.fields.field("vessels-a", scale / 2).on_axes(*grid.axes)
    f2 = grid.fields.field("vessels-b", scale / 2).on_axes(*grid.axes)
    width = 0.22
    return np.clip(1.0 - np.maximum(np.abs(f1), np.abs(f2)) / width, 0.0, 1.0)
