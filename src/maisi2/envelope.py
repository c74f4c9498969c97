"""The body envelope (MAISI label 200): voxels inside the body that no organ claims.

MAISI label maps carry it because the generator sets everything outside labels to -1000 HU:
without it fat and muscle would come out as air. It comes from the CT when one is at hand (a
threshold at -500 HU, thin bridges to the scanner table cut, the main connected component kept,
holes filled so the lungs and bowel gas count as inside), else from the labels alone (closing and
hole filling of the union of all labels per axial slice). The label-only envelope is rough: tools
such as TotalSegmentator do not label subcutaneous fat or most muscles, so it hugs the labelled
organs and misses the outer body wall.

Arrays are RAS-canonical with axes (x, y, z), as `maisi2.volume_io` loads them; axial slices are
``array[:, :, k]``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["body_envelope_from_ct", "body_envelope_from_labels"]


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
