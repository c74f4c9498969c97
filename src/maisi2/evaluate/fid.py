"""The paper's 2.5D FID: Fréchet distances between slice features of real and generated CT.

Protocol (MAISI-v2 / MAISI's ``compute_fid_2-5d_ct.py``), for every volume of both sets:

1. load in RAS orientation (`maisi2.volume_io.load_ct`), resample linearly to a common `spacing`;
2. pad with -1000 HU and centre-crop to a common `shape`; clip to [-1000, 1000] HU;
3. cut it into the slices of three planes: XY (one per z), YZ (one per x), ZX (one per y);
4. turn every slice into a feature vector (`features.ResNet50Features` for the paper's numbers,
   `features.HUTextureFeatures` offline), streaming `batch_size` slices at a time;
5. per plane, pool the features of all slices of all volumes of a set into a mean and an
   unbiased covariance (accumulated batch by batch, so memory does not grow with the data);
6. FID per plane = Fréchet distance between the two Gaussians; the reported FID is their mean.

Fréchet distance between N(mu1, S1) and N(mu2, S2):
    d^2 = |mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2)).
The value is what the FID literature calls "FID" (the squared distance, no square root).

Usage::

    result = fid(real_paths, generated_paths)                       # offline features
    result = fid(real_paths, generated_paths, extractor=ResNet50Features("RadImageNet-ResNet50.pt"))
    result.average, result.per_plane["xy"]
    stats = volume_set_stats(real_paths, extractor); stats.save("real_stats.npz")  # reuse later
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from scipy import linalg

from maisi2 import volume_io
from maisi2.data import HU_MAX, HU_MIN, center_pad_or_crop
from maisi2.errors import InvalidInput, MissingInput
from maisi2.evaluate.features import HUTextureFeatures, SliceFeatures

__all__ = [
    "PLANES",
    "frechet_distance",
    "FeatureStats",
    "SetStats",
    "FIDResult",
    "prepare_volume",
    "plane_slices",
    "volume_set_stats",
    "fid_from_stats",
    "fid",
    "merge_set_stats",
    "bootstrap_fid",
    "bootstrap_indices",
    "percentile_interval",
]

# Plane name -> the array axis (x=0, y=1, z=2) the slices are taken along, as MAISI's script does.
PLANES: dict[str, int] = {"xy": 2, "yz": 0, "zx": 1}
DEFAULT_SPACING = (1.0, 1.0, 1.0)
DEFAULT_SHAPE = (512, 512, 512)
VolumeLike = str | os.PathLike | volume_io.Volume | np.ndarray


def frechet_distance(mu1, cov1, mu2, cov2, eps: float = 1e-6) -> float:
    """Squared Fréchet distance between two Gaussians (the FID formula); float64 throughout.

    The matrix square root of S1 S2 comes from `scipy.linalg.sqrtm`. When it is not finite (a
    near-singular product, common with fewer samples than feature dimensions) `eps` is added to
    both diagonals, as is standard. A tiny imaginary part from round-off is dropped; a large one is
    a ValueError. The result is clipped at 0 (round-off can make identical sets slightly negative).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    cov1, cov2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or cov1.shape != (d, d) or cov2.shape != (d, d):
        raise InvalidInput(f"shapes do not match: means {mu1.shape}, {mu2.shape}; covariances {cov1.shape}, {cov2.shape}")
    for name, value in (("mu1", mu1), ("mu2", mu2), ("cov1", cov1), ("cov2", cov2)):
        if not np.all(np.isfinite(value)):
            raise InvalidInput(f"{name} holds NaN/inf; were the features computed from volumes with NaNs?")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)  # singular products are handled below
        covmean = linalg.sqrtm(cov1 @ cov2)
        if not np.all(np.isfinite(covmean)):
            offset = np.eye(d) * eps
            covmean = linalg.sqrtm((cov1 + offset) @ (cov2 + offset))
    if np.iscomplexobj(covmean):
        diag = np.diagonal(covmean)
        if np.max(np.abs(diag.imag)) > 1e-3 * max(1.0, float(np.max(np.abs(diag.real)))):
            raise InvalidInput(f"sqrtm(S1 S2) has a large imaginary part ({np.max(np.abs(diag.imag)):.3g}); "
                             "the covariances are badly conditioned (too few samples?)")
        covmean = covmean.real
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * np.trace(covmean))
    return max(value, 0.0)


@dataclass
class FeatureStats:
    """Running mean and scatter matrix of feature vectors (Chan et al.'s pairwise merge, float64).

    Memory is O(dim^2) whatever the number of samples: 32 MB for 2048 ResNet features.
    """

    dim: int
    n: int = 0
    mean: np.ndarray | None = None
    scatter: np.ndarray | None = None  # sum over samples of (f - mean)(f - mean)^T

    def __post_init__(self):
        if self.mean is None:
            self.mean = np.zeros(self.dim)
        if self.scatter is None:
            self.scatter = np.zeros((self.dim, self.dim))

    def update(self, feats) -> None:
        feats = np.asarray(feats, np.float64)
        if feats.ndim != 2 or feats.shape[1] != self.dim:
            raise InvalidInput(f"expected features of shape (batch, {self.dim}), got {feats.shape}")
        if not np.all(np.isfinite(feats)):
            raise InvalidInput("the feature network returned NaN/inf features; check the input volumes")
        m = feats.shape[0]
        if m == 0:
            return
        batch_mean = feats.mean(0)
        centred = feats - batch_mean
        delta = batch_mean - self.mean
        total = self.n + m
        self.scatter += centred.T @ centred + np.outer(delta, delta) * (self.n * m / total)
        self.mean += delta * (m / total)
        self.n = total

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """The statistics of both sets of vectors together (Chan et al.'s pairwise merge); new object."""
        if other.dim != self.dim:
            raise InvalidInput(f"cannot merge features of dimension {self.dim} and {other.dim}")
        total = self.n + other.n
        if total == 0:
            return FeatureStats(self.dim)
        delta = other.mean - self.mean
        return FeatureStats(self.dim, total, self.mean + delta * (other.n / total),
                            self.scatter + other.scatter + np.outer(delta, delta) * (self.n * other.n / total))

    @property
    def cov(self) -> np.ndarray:
        """Unbiased covariance (divides by n - 1, as numpy.cov and MONAI's FIDMetric do)."""
        if self.n < 2:
            raise InvalidInput(f"a covariance needs at least 2 feature vectors, have {self.n}")
        return self.scatter / (self.n - 1)


@dataclass
class SetStats:
    """Per-plane feature statistics of one set of volumes, with the settings that produced them."""

    planes: dict[str, FeatureStats]
    extractor: str
    spacing: tuple[float, float, float] | None
    shape: tuple[int, int, int] | None
    volumes: int

    def settings(self) -> dict:
        return {"extractor": self.extractor, "spacing": None if self.spacing is None else list(self.spacing),
                "shape": None if self.shape is None else list(self.shape)}

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write an .npz (atomically) that `load` reads back, to reuse e.g. a real set's statistics."""
        from maisi2.atomic import atomic_output

        arrays = {"meta": np.array(json.dumps({**self.settings(), "volumes": self.volumes}))}
        for name, st in self.planes.items():
            arrays[f"{name}_n"], arrays[f"{name}_mean"], arrays[f"{name}_scatter"] = np.array(st.n), st.mean, st.scatter
        with atomic_output(path, overwrite) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SetStats":
        path = Path(path)
        if not path.is_file():
            raise MissingInput(f"feature statistics file {path} does not exist")
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                planes = {}
                for name in PLANES:
                    mean = z[f"{name}_mean"]
                    planes[name] = FeatureStats(mean.shape[0], int(z[f"{name}_n"]), mean, z[f"{name}_scatter"])
        except (KeyError, ValueError, OSError) as err:
            raise InvalidInput(f"{path} is not a maisi2 FID statistics file ({err})") from None
        spacing, shape = meta.get("spacing"), meta.get("shape")
        return cls(planes, meta["extractor"], None if spacing is None else tuple(spacing),
                   None if shape is None else tuple(shape), int(meta.get("volumes", 0)))


@dataclass
class FIDResult:
    per_plane: dict[str, float]
    average: float
    extractor: str
    comparable_to_paper: bool
    settings: dict
    samples: dict = field(default_factory=dict)  # set -> plane -> number of slices
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"fid": self.average, "per_plane": self.per_plane, "extractor": self.extractor,
                "comparable_to_paper": self.comparable_to_paper, "settings": self.settings, "slices": self.samples,
                "notes": self.notes}

    def summary(self) -> str:
        lines = [f"2.5D FID ({self.extractor}; {'comparable' if self.comparable_to_paper else 'NOT comparable'} "
                 "with the paper's numbers)"]
        lines += [f"  {plane.upper():4s} {value:12.4f}" for plane, value in self.per_plane.items()]
        lines.append(f"  mean {self.average:12.4f}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def prepare_volume(volume: VolumeLike, spacing=DEFAULT_SPACING, shape=DEFAULT_SHAPE) -> np.ndarray:
    """Steps 1-2: RAS volume -> resampled, padded/cropped, clipped float32 HU array.

    volume: a path (loaded with `volume_io.load_ct`), a `Volume`, or a bare array (taken as already RAS;
    it cannot be resampled, so `spacing` must be None for it). spacing/shape None skip that step.
    """
    if isinstance(volume, (str, os.PathLike)):
        volume = volume_io.load_ct(volume)
    if isinstance(volume, volume_io.Volume):
        if spacing is not None:
            volume = volume_io.resample_to_spacing(volume, spacing, order=1)
        array = volume.array
    else:
        array = np.asarray(volume)
        if array.ndim != 3:
            raise InvalidInput(f"expected a 3D volume, got shape {array.shape}")
        if spacing is not None:
            raise InvalidInput("a bare array has no voxel spacing to resample from; pass a Volume or a path, "
                             "or spacing=None when the arrays already share one grid")
    array = np.asarray(array, np.float32)
    if not np.all(np.isfinite(array)):
        raise InvalidInput("volume holds NaN/inf voxels; replace them (e.g. with -1000 HU) first")
    if shape is not None:
        array = center_pad_or_crop(array, tuple(int(s) for s in shape), fill=HU_MIN)
    return np.clip(array, HU_MIN, HU_MAX)


def plane_slices(array: np.ndarray, plane: str, batch_size: int) -> Iterator[torch.Tensor]:
    """Step 3: batches (B, H, W) of the slices of one plane, in slice order."""
    axis = PLANES[plane]
    moved = np.moveaxis(array, axis, 0)
    for start in range(0, moved.shape[0], batch_size):
        yield torch.from_numpy(np.ascontiguousarray(moved[start:start + batch_size]))


def volume_set_stats(volumes: Sequence[VolumeLike], extractor: SliceFeatures | None = None, *,
                     spacing=DEFAULT_SPACING, shape=DEFAULT_SHAPE, batch_size: int = 16,
                     progress: bool = True, desc: str = "volumes") -> SetStats:
    """Steps 1-5 for one set: per-plane feature statistics, one volume in memory at a time."""
    from tqdm.auto import tqdm

    extractor = HUTextureFeatures() if extractor is None else extractor
    volumes = list(volumes)
    if not volumes:
        raise InvalidInput(f"the {desc} set is empty; give at least one volume")
    if batch_size < 1:
        raise InvalidInput(f"batch_size must be >= 1, got {batch_size}")
    planes = {name: FeatureStats(extractor.dim) for name in PLANES}
    for volume in tqdm(volumes, desc=f"FID features ({desc})", unit="vol", disable=not progress):
        array = prepare_volume(volume, spacing, shape)
        value_range = (float(array.min()), float(array.max()))  # the same for every plane's stack
        for name in PLANES:
            for batch in plane_slices(array, name, batch_size):
                planes[name].update(extractor(batch, value_range).numpy())
    return SetStats(planes, extractor.name, None if spacing is None else tuple(float(s) for s in spacing),
                    None if shape is None else tuple(int(s) for s in shape), len(volumes))


def fid_from_stats(real: SetStats, generated: SetStats, comparable_to_paper: bool = False,
                   eps: float = 1e-6) -> FIDResult:
    """Step 6: per-plane Fréchet distances and their mean; both sets must share their settings."""
    if real.settings() != generated.settings():
        raise InvalidInput(f"the two sets were featurised differently: real {real.settings()} vs generated "
                         f"{generated.settings()}; recompute one with the other's settings")
    per_plane, notes = {}, []
    for name in PLANES:
        a, b = real.planes[name], generated.planes[name]
        for label, st in (("real", a), ("generated", b)):
            if st.n < 2:
                raise InvalidInput(f"the {label} set gives {st.n} {name.upper()} slice(s); the FID needs at least 2 "
                                 "per plane (and, for a stable estimate, many more than the feature dimension "
                                 f"{st.dim}): add volumes")
            if st.n <= st.dim:
                notes.append(f"{label} {name.upper()}: {st.n} slices for {st.dim} features; the covariance is "
                             "singular and the FID biased upwards: compare only with FIDs from as many slices")
        per_plane[name] = frechet_distance(a.mean, a.cov, b.mean, b.cov, eps=eps)
    samples = {"real": {n: s.n for n, s in real.planes.items()}, "generated": {n: s.n for n, s in generated.planes.items()}}
    return FIDResult(per_plane, float(np.mean(list(per_plane.values()))), real.extractor, comparable_to_paper,
                     {**real.settings(), "real_volumes": real.volumes, "generated_volumes": generated.volumes}, samples,
                     notes)


def fid(real: Sequence[VolumeLike] | SetStats, generated: Sequence[VolumeLike] | SetStats,
        extractor: SliceFeatures | None = None, *, spacing=DEFAULT_SPACING, shape=DEFAULT_SHAPE,
        batch_size: int = 16, progress: bool = True) -> FIDResult:
    """2.5D FID between a real and a generated set (volumes, paths, or precomputed `SetStats`)."""
    extractor = HUTextureFeatures() if extractor is None else extractor

    def stats(items, desc):
        if isinstance(items, SetStats):
            return items
        return volume_set_stats(items, extractor, spacing=spacing, shape=shape, batch_size=batch_size,
                                progress=progress, desc=desc)

    real_stats, gen_stats = stats(real, "real"), stats(generated, "generated")
    if real_stats.extractor != extractor.name or gen_stats.extractor != extractor.name:
        raise InvalidInput(f"precomputed statistics use {real_stats.extractor!r}/{gen_stats.extractor!r} features, "
                         f"not {extractor.name!r}")
    return fid_from_stats(real_stats, gen_stats, comparable_to_paper=extractor.comparable_to_paper)


def merge_set_stats(parts: Sequence[SetStats]) -> SetStats:
    """One `SetStats` for the union of several sets featurised with the same settings (e.g. per-volume
    statistics from `volume_set_stats([v])`, which a bootstrap recombines without re-featurising)."""
    if not parts:
        raise InvalidInput("nothing to merge: give at least one SetStats")
    first = parts[0]
    if any(p.settings() != first.settings() for p in parts):
        raise InvalidInput("the sets were featurised with different settings; they cannot be merged")
    planes = {}
    for name in PLANES:
        merged = FeatureStats(first.planes[name].dim)
        for p in parts:
            merged = merged.merge(p.planes[name])
        planes[name] = merged
    return SetStats(planes, first.extractor, first.spacing, first.shape, sum(p.volumes for p in parts))


def bootstrap_indices(n: int, resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """(resamples, n) int64: each row n indices into a set of n items drawn with replacement.

    One draw shared by several scores is a paired bootstrap: arms sampled from the same noise seeds
    are resampled at the same volume indices, so their difference's interval keeps the pairing."""
    if n < 2 or resamples < 1:
        raise InvalidInput(f"a bootstrap needs at least 2 items and 1 resample; got {n} items, {resamples} resamples")
    return np.random.default_rng(seed).integers(0, n, (resamples, n))


def percentile_interval(values, level: float = 0.95) -> tuple[float, float]:
    """The central `level` percentile interval of bootstrap values (e.g. 2.5 % and 97.5 % for 0.95)."""
    if not 0 < level < 1:
        raise InvalidInput(f"level must lie in (0, 1); got {level}")
    lo, hi = np.quantile(np.asarray(values, np.float64), [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def bootstrap_fid(real: SetStats, generated_per_volume: Sequence[SetStats], resamples: int = 1000,
                  level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(FID of all generated volumes, lower, upper): a percentile bootstrap interval over generated
    volumes (drawn with replacement, `resamples` times; the reference set stays fixed), so the
    interval reflects how many volumes were generated, not the reference set's own variability."""
    if len(generated_per_volume) < 2:
        raise InvalidInput("bootstrap_fid needs at least 2 generated volumes")
    point = fid_from_stats(real, merge_set_stats(generated_per_volume)).average
    draws = bootstrap_indices(len(generated_per_volume), resamples, seed)
    values = [fid_from_stats(real, merge_set_stats([generated_per_volume[i] for i in rows])).average for rows in draws]
    return (float(point), *percentile_interval(values, level))
