"""From the generator's class logits to a clean MAISI label map.

1. argmax over the 125 classes, then class -> MAISI id through the release's table
   (`labels.channels_to_ids`);
2. the body: only the largest connected foreground component is kept and its enclosed holes
   become body (200);
3. tumours not asked for (and the release's kidney-mass class) become their parent organ: the
   fixed parent of `labels.TUMOR_PARENT`, else (lung tumours, bone lesions, kidney masses) the
   nearest voxel of a candidate parent (lung lobes, bones, kidneys), one distance transform per
   kind: a generated map can hold thousands of specks, too many for a ring per component;
4. single organs (liver, spleen, kidneys, lung lobes, ...) keep their largest component, the rest
   becomes body; the requested tumour keeps its largest one too, except hepatic tumours and bone
   lesions, which may be several (as in the release);
5. holes inside each organ are filled with that organ.

The release runs similar steps (largest components, closing, tumours to fixed organs); these are
written from that description, not from its code.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from maisi2 import labels as L
from maisi2.errors import InvalidInput

__all__ = ["classes_to_ids", "logits_to_ids", "clean_mask", "SINGLE_COMPONENT_ORGANS", "MULTI_COMPONENT_TUMORS"]

SINGLE_COMPONENT_ORGANS: tuple[int, ...] = tuple(L.label_id(n) for n in (
    "liver", "spleen", "pancreas", "gallbladder", "stomach", "left kidney", "right kidney", "aorta",
    "inferior vena cava", "esophagus", "duodenum", "right adrenal gland", "left adrenal gland", "bladder",
)) + L.LUNG_IDS
MULTI_COMPONENT_TUMORS = (L.label_id("hepatic tumor"), L.label_id("bone lesion"))
_GENERATED_LESIONS = (*L.TUMOR_IDS, L.KIDNEY_MASS)


def classes_to_ids(classes) -> np.ndarray:
    """(X, Y, Z) class indices (tensor or array) -> int16 MAISI ids."""
    return L.channels_to_ids(np.asarray(classes))


def logits_to_ids(logits) -> np.ndarray:
    """(125, X, Y, Z) class logits (tensor or array) -> (X, Y, Z) int16 MAISI ids."""
    import torch

    logits = torch.as_tensor(logits)
    if logits.dim() != 4 or logits.shape[0] != len(L.MASK_GENERATOR_CHANNEL_IDS):
        raise InvalidInput(f"expected ({len(L.MASK_GENERATOR_CHANNEL_IDS)}, X, Y, Z) logits, got {tuple(logits.shape)}")
    return L.channels_to_ids(logits.argmax(dim=0).cpu().numpy())


def clean_mask(ids: np.ndarray, requested_tumor: int | None = None) -> np.ndarray:
    """Steps 2-5 above on an (X, Y, Z) MAISI label map; returns a new int16 array."""
    out = _largest_body(np.asarray(ids, dtype=np.int16))
    for lesion in _GENERATED_LESIONS:
        if lesion != requested_tumor:
            _to_parent(out, lesion)
    keep_one = list(SINGLE_COMPONENT_ORGANS)
    if requested_tumor is not None and requested_tumor not in MULTI_COMPONENT_TUMORS:
        keep_one.append(requested_tumor)
    for label in keep_one:
        _keep_largest(out, label)
    for label in SINGLE_COMPONENT_ORGANS:
        _fill_holes(out, label)
    return out


_NEAREST_CANDIDATES = {**L.RING_MAJORITY_CANDIDATES, L.KIDNEY_MASS: L.KIDNEY_IDS}
_SEARCH_MARGIN = 16  # voxels around the lesions searched for a parent before the whole volume


def _to_parent(out: np.ndarray, lesion: int) -> None:
    """Voxels of `lesion` take their parent organ (in place)."""
    where = out == lesion
    if not where.any():
        return
    if lesion in L.TUMOR_PARENT:
        out[where] = L.TUMOR_PARENT[lesion]
        return
    candidates = np.isin(out, _NEAREST_CANDIDATES[lesion])
    box = tuple(slice(max(s.start - _SEARCH_MARGIN, 0), s.stop + _SEARCH_MARGIN) for s in _box(where))
    if not candidates[box].any():
        box = tuple(slice(None) for _ in out.shape)
    if not candidates[box].any():
        out[where] = L.BODY
        return
    # For every voxel of the box, the index of the nearest candidate voxel.
    _, nearest = ndimage.distance_transform_edt(~candidates[box], return_indices=True)
    local = out[box]
    inside = where[box]
    local[inside] = local[tuple(axis[inside] for axis in nearest)]


def _largest_body(ids: np.ndarray) -> np.ndarray:
    components, count = ndimage.label(ids != L.BACKGROUND)
    if count == 0:
        return ids.copy()
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    body = components == int(np.argmax(sizes))
    out = np.where(body, ids, L.BACKGROUND).astype(np.int16)
    holes = ndimage.binary_fill_holes(body) & ~body
    out[holes] = L.BODY
    return out


def _box(mask: np.ndarray):
    boxes = ndimage.find_objects(mask.astype(np.uint8))
    return boxes[0] if boxes else None


def _keep_largest(out: np.ndarray, label: int) -> None:
    """Components of `label` other than the largest become body (in place)."""
    box = _box(out == label)
    if box is None:
        return
    local = out[box]
    components, count = ndimage.label(local == label)
    if count <= 1:
        return
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    local[(components > 0) & (components != int(np.argmax(sizes)))] = L.BODY


def _fill_holes(out: np.ndarray, label: int) -> None:
    """Voxels enclosed by `label` (in 3D) take it, unless they hold a lesion (in place)."""
    box = _box(out == label)
    if box is None:
        return
    local = out[box]
    organ = local == label
    holes = ndimage.binary_fill_holes(organ) & ~organ & ~np.isin(local, _GENERATED_LESIONS)
    local[holes] = label
