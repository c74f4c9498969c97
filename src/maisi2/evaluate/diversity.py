"""Diversity of samples generated from one mask: mean pairwise 3D MS-SSIM (lower = more diverse).

Each volume is clipped to [-1000, 1000] HU and scaled to [0, 1] (`maisi2.data.hu_to_unit`);
MS-SSIM (MONAI `MultiScaleSSIMMetric`, 3D, Gaussian window, data_range 1) is computed for every
unordered pair and averaged. The standard setting (5 scales, 11-voxel window, sigma 1.5) needs at
least 176 voxels per axis (the coarsest scale, 1/16, must hold a whole window); smaller volumes
get fewer scales (4 from 99 voxels, 3 from 44, 2 from 22; the first weights of the standard five,
renormalised to sum 1) and, below 22 voxels, a smaller window (sigma scaled with it).
The scales and window used are part of the result: compare numbers only at equal settings.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch

from maisi2.data import hu_to_unit
from maisi2.errors import InvalidInput

__all__ = ["MS_SSIM_WEIGHTS", "MSSSIMSettings", "ms_ssim_settings", "ms_ssim", "DiversityResult", "diversity"]

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003
MIN_SIZE = 6  # below this no window >= 3 with 2 scales fits


@dataclass(frozen=True)
class MSSSIMSettings:
    scales: int
    kernel_size: int
    kernel_sigma: float
    weights: tuple[float, ...]


def _fits(size: int, scales: int, kernel: int) -> bool:
    # The coarsest scale must hold a whole window; MONAI also checks size // (scales-1)^2 > kernel - 1.
    return size // 2 ** (scales - 1) >= kernel and size // max(1, scales - 1) ** 2 > kernel - 1


def ms_ssim_settings(shape: Sequence[int]) -> MSSSIMSettings:
    """The most scales (<= 5, with the 11-voxel window) that `shape` allows, else a smaller window."""
    size = min(int(s) for s in shape)
    for kernel in (11, 9, 7, 5, 3):
        for scales in range(5, 1, -1):
            if _fits(size, scales, kernel):
                w = np.asarray(MS_SSIM_WEIGHTS[:scales])
                return MSSSIMSettings(scales, kernel, 1.5 * kernel / 11, tuple(float(v) for v in w / w.sum()))
    raise InvalidInput(f"volumes of shape {tuple(shape)} are too small for MS-SSIM: need at least {MIN_SIZE} voxels "
                     "per axis (176 for the standard 5 scales with an 11-voxel window)")


def ms_ssim(a_hu: np.ndarray, b_hu: np.ndarray, settings: MSSSIMSettings | None = None) -> float:
    """3D MS-SSIM of two HU volumes of the same shape (1 for identical volumes)."""
    from monai.metrics import MultiScaleSSIMMetric

    a, b = np.asarray(a_hu), np.asarray(b_hu)
    if a.shape != b.shape or a.ndim != 3:
        raise InvalidInput(f"MS-SSIM needs two 3D volumes of one shape, got {a.shape} and {b.shape}")
    settings = ms_ssim_settings(a.shape) if settings is None else settings
    metric = MultiScaleSSIMMetric(spatial_dims=3, data_range=1.0, kernel_size=settings.kernel_size,
                                  kernel_sigma=settings.kernel_sigma, weights=settings.weights)
    ta, tb = (torch.from_numpy(np.asarray(hu_to_unit(v), np.float32))[None, None] for v in (a, b))
    with torch.no_grad():
        return float(metric(ta, tb).mean())


@dataclass
class DiversityResult:
    mean_ms_ssim: float
    std_ms_ssim: float
    pairs: int
    samples: int
    settings: MSSSIMSettings
    pair_values: list[float]

    def to_dict(self) -> dict:
        return {"mean_ms_ssim": self.mean_ms_ssim, "std_ms_ssim": self.std_ms_ssim, "pairs": self.pairs,
                "samples": self.samples, "settings": asdict(self.settings), "pair_values": self.pair_values}

    def summary(self) -> str:
        s = self.settings
        return (f"diversity: mean pairwise MS-SSIM {self.mean_ms_ssim:.4f} (SD {self.std_ms_ssim:.4f}) over "
                f"{self.pairs} pairs of {self.samples} samples; {s.scales} scales, {s.kernel_size}-voxel window "
                "(lower = more diverse)")


def diversity(volumes: Sequence[np.ndarray | str | os.PathLike], progress: bool = False) -> DiversityResult:
    """Mean pairwise MS-SSIM of >= 2 samples (HU arrays or NIfTI paths) on one grid."""
    from tqdm.auto import tqdm

    from maisi2 import volume_io

    arrays = [volume_io.load_ct(v).array if isinstance(v, (str, os.PathLike)) else np.asarray(v) for v in volumes]
    if len(arrays) < 2:
        raise InvalidInput(f"diversity needs at least 2 samples generated from one mask, got {len(arrays)}")
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise InvalidInput(f"samples have different shapes {sorted(shapes)}; samples from one mask share its grid")
    for i, a in enumerate(arrays):
        if not np.all(np.isfinite(a)):
            raise InvalidInput(f"sample {i} holds NaN/inf voxels")
    settings = ms_ssim_settings(arrays[0].shape)
    pairs = list(itertools.combinations(range(len(arrays)), 2))
    values = [ms_ssim(arrays[i], arrays[j], settings) for i, j in tqdm(pairs, desc="MS-SSIM pairs", disable=not progress)]
    return DiversityResult(float(np.mean(values)), float(np.std(values)), len(pairs), len(arrays), settings, values)
