"""More real-shaped training pairs from one real CT and its label map.

The bundled model has one real label map in its ControlNet's training (issue 19). Shown a real map
it never saw, it draws some organs brighter than any training example did: it has seen one real
spleen, at one size, in one contrast phase. This module makes variants of such a pair for training:

- geometry: a random rotation and per-axis scale of CT and labels together (MONAI's `RandAffined`,
  linear for the CT, nearest for the labels; the edges are extended, as a scan cut in z continues);
- contrast: each soft organ's voxels shifted together so that the organ's median lands on a value
  drawn from the packaged statistics of real organ medians (`quality.STATISTICS_FILE`: mean and SD
  from its mean +- 3 SD range). One contrast-enhanced scan then stands for the phases real scans
  come in, instead of teaching that a real-shaped spleen is always as bright as this one's.

Bone, lungs and everything else keep their HU: the shift is per organ, not global.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from monai.transforms import RandAffined

from maisi2.errors import InvalidInput
from maisi2.labels import QC_ORGAN_GROUPS, load_resource_json
from maisi2.quality import HIGH_KEY, LOW_KEY, STATISTICS_FILE
from maisi2.volume_io import Volume

SOFT_ORGANS = ("liver", "spleen", "pancreas", "kidney")


@dataclass(frozen=True)
class Augmentation:
    """How far the variants may stray from the original pair."""

    rotate_deg: tuple[float, float, float] = (5.0, 5.0, 15.0)  # +- about the x, y, z axes
    scale: float = 0.15  # each axis scaled by 1 +- this
    organ_sd: float = 0.5  # organ medians drawn from N(mean, (organ_sd * SD)^2) of real medians; 0: no shift

    def __post_init__(self):
        values = [*self.rotate_deg, self.scale, self.organ_sd]
        if len(self.rotate_deg) != 3 or not all(np.isfinite(v) and v >= 0 for v in values) or self.scale >= 1:
            raise InvalidInput(f"augmentation needs 3 finite rotations >= 0, 0 <= scale < 1 and organ_sd >= 0; got {self}")


def organ_median_stats() -> dict[str, tuple[float, float]]:
    """Soft organ -> (mean, SD) of real organ medians, read back from the packaged mean +- 3 SD range."""
    stats = load_resource_json(STATISTICS_FILE)
    return {o: ((stats[o][LOW_KEY] + stats[o][HIGH_KEY]) / 2, (stats[o][HIGH_KEY] - stats[o][LOW_KEY]) / 6)
            for o in SOFT_ORGANS}


def shift_organs(hu: np.ndarray, labels: np.ndarray, rng: np.random.Generator, organ_sd: float = 1.0) -> np.ndarray:
    """A copy of `hu` with each soft organ present moved, as a whole, to a median drawn from real CT."""
    out = hu.astype(np.float32, copy=True)
    for organ, (mean, sd) in organ_median_stats().items():
        target = rng.normal(mean, organ_sd * sd)  # drawn even when absent: one stream for every map
        inside = np.isin(labels, QC_ORGAN_GROUPS[organ])
        if inside.any():
            out[inside] += target - np.median(hu[inside])
    return out


def augmented_pair(ct: Volume, labels: Volume, seed: int, how: Augmentation = Augmentation()) -> tuple[Volume, Volume]:
    """One variant of a CT and its label map (same grid), reproducible from `seed`."""
    if ct.shape != labels.shape or not np.allclose(ct.affine, labels.affine, atol=1e-3):
        raise InvalidInput(f"the CT ({ct.shape}) and its label map ({labels.shape}) must share one grid")
    transform = RandAffined(
        keys=("ct", "labels"), prob=1.0, rotate_range=tuple(np.deg2rad(how.rotate_deg)),
        scale_range=(how.scale,) * 3, mode=("bilinear", "nearest"), padding_mode="border")
    transform.set_random_state(seed)
    moved = transform({"ct": ct.array[None].astype(np.float32), "labels": labels.array[None].astype(np.float32)})
    hu = np.asarray(moved["ct"][0], dtype=np.float32)
    new_labels = np.rint(np.asarray(moved["labels"][0])).astype(labels.array.dtype)
    if how.organ_sd > 0:
        hu = shift_organs(hu, new_labels, np.random.default_rng(seed), how.organ_sd)
    return ct.with_array(hu), labels.with_array(new_labels)
