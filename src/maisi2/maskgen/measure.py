"""Measures of generated masks: plausibility against a reference set, and controllability.

Pure functions of MAISI label maps (numpy arrays on one grid):

* `organ_volumes_ml`: volume of each measured structure (the five organ slots and the body);
* `volume_distribution`: per structure, mean / sd / 5th-95th percentiles of a set, and the
  two-sample Kolmogorov-Smirnov distance between a generated and a reference set (0 = same
  distribution, 1 = disjoint);
* `components`: connected components per structure (26-connectivity) -- 1 is anatomical;
* `tumour_inside_parent`: per tumour component, the share of the voxels just outside it that
  belong to its parent organ(s); a tumour counts as inside when that share is at least 1/2;
* `body_closed`: the non-background voxels form one component with no enclosed background;
* `size_correlation`: Pearson r between requested and obtained sizes, per slot;
* `label_dice`: hard Dice per label between two label maps (the autoencoder's reconstruction
  against its input: what its argmax gives, not the soft Dice its training loss logs).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage, stats

from maisi2 import labels as L
from maisi2.errors import InvalidInput
from maisi2.maskgen.sizes import ORGAN_SLOTS, SLOTS, TUMOR_SLOTS

__all__ = ["MEASURED", "organ_volumes_ml", "volume_distribution", "components", "tumor_inside_parent",
           "body_closed", "size_correlation", "label_dice", "PARENTS"]

MEASURED = {name: (L.label_id(name),) for name in ORGAN_SLOTS} | {"body (all labels)": None}
# Parent organ(s) of each tumour slot: the fixed parent, or the candidates of a ring majority.
PARENTS = {name: ((L.TUMOR_PARENT[L.label_id(name)],) if L.label_id(name) in L.TUMOR_PARENT
                  else L.RING_MAJORITY_CANDIDATES[L.label_id(name)]) for name in TUMOR_SLOTS}
_FULL = np.ones((3, 3, 3), bool)


def organ_volumes_ml(mask: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    voxel_ml = float(np.prod(spacing)) / 1000.0
    out = {}
    for name, ids in MEASURED.items():
        voxels = np.count_nonzero(mask != L.BACKGROUND) if ids is None else np.count_nonzero(np.isin(mask, ids))
        out[name] = voxels * voxel_ml
    return out


def volume_distribution(generated: Sequence[float], reference: Sequence[float]) -> dict[str, float]:
    g, r = np.asarray(generated, float), np.asarray(reference, float)
    summary = {}
    for tag, values in (("generated", g), ("reference", r)):
        summary[f"{tag}_mean"] = float(values.mean())
        summary[f"{tag}_sd"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        summary[f"{tag}_p5"], summary[f"{tag}_p95"] = (float(v) for v in np.percentile(values, [5, 95]))
    summary["ks_distance"] = float(stats.ks_2samp(g, r).statistic)
    return summary


def components(mask: np.ndarray) -> dict[str, int]:
    """Connected components of each measured structure (0 when absent)."""
    out = {}
    for name, ids in MEASURED.items():
        region = mask != L.BACKGROUND if ids is None else np.isin(mask, ids)
        out[name] = int(ndimage.label(region, structure=_FULL)[1])
    return out


def tumor_inside_parent(mask: np.ndarray, slot: str) -> list[float]:
    """For each component of the slot's tumour, the share of its 1-voxel outer ring in a parent organ."""
    tumor = mask == L.label_id(slot)
    parents = np.isin(mask, PARENTS[slot])
    pieces, count = ndimage.label(tumor, structure=_FULL)
    shares = []
    for idx, box in enumerate(ndimage.find_objects(pieces), start=1):
        grown = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
        piece = pieces[grown] == idx
        ring = ndimage.binary_dilation(piece, structure=_FULL) & ~piece
        shares.append(float(parents[grown][ring].mean()) if ring.any() else 0.0)
    return shares


def body_closed(mask: np.ndarray) -> bool:
    foreground = mask != L.BACKGROUND
    count = ndimage.label(foreground, structure=_FULL)[1]
    return count == 1 and not np.any(ndimage.binary_fill_holes(foreground) & ~foreground)


def size_correlation(requested: np.ndarray, obtained: np.ndarray) -> dict[str, dict]:
    """Per slot: n, Pearson r (nan with fewer than 3 pairs or no spread), mean |difference| and
    the share of samples holding the slot at all (``present``), over the samples whose requested
    size is present (>= 0). requested, obtained: (N, 10)."""
    out = {}
    for k, name in enumerate(SLOTS):
        keep = requested[:, k] >= 0
        req, got = requested[keep, k], np.maximum(obtained[keep, k], 0.0)  # absent -> size 0
        r = float(stats.pearsonr(req, got)[0]) if keep.sum() >= 3 and req.std() > 0 and got.std() > 0 else float("nan")
        out[name] = {"n": int(keep.sum()), "pearson_r": r,
                     "mean_abs_diff": float(np.abs(req - got).mean()) if keep.any() else float("nan"),
                     "present": float((got > 0).mean()) if keep.any() else float("nan")}
    return out


def label_dice(predicted: np.ndarray, target: np.ndarray, background: int = 0) -> dict[int, float]:
    """Hard Dice of each label present in `target` (background left out): 2|P & T| / (|P| + |T|).

    Both maps in one numbering (MAISI ids, or the generator's class indices); a label the target
    holds and the prediction misses scores 0, labels only in the prediction are not scored.
    """
    predicted, target = np.asarray(predicted).ravel(), np.asarray(target).ravel()
    if predicted.shape != target.shape:
        raise InvalidInput(f"label maps differ in size: {predicted.size} vs {target.size} voxels")
    size = int(max(predicted.max(initial=0), target.max(initial=0))) + 1
    both = np.bincount(target[predicted == target].astype(np.int64), minlength=size)
    in_pred = np.bincount(predicted.astype(np.int64), minlength=size)
    in_target = np.bincount(target.astype(np.int64), minlength=size)
    return {int(k): float(2 * both[k] / (in_pred[k] + in_target[k]))
            for k in np.flatnonzero(in_target) if k != background}
