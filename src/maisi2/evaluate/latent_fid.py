"""A Fréchet distance between sets of latents, without any image features.

The image FID (`maisi2.evaluate.fid`) scores decoded volumes, so it also measures the decoder. This
one scores the diffusion model's output directly: the Fréchet distance between Gaussians fitted to
*patch vectors* of the latents.

The feature: every non-overlapping ``patch``^3 block of a (C, x, y, z) latent, flattened to a
vector of C * patch^3 numbers (32 for 4 channels and patch 2). Why patches and not the alternatives:

* the whole latent as one vector (36,864 numbers for 4 x 24 x 24 x 16) against a few dozen volumes
  gives a covariance of rank < 32 in that many dimensions: the distance is then mostly the
  estimator's bias, and the matrix square root is ill-conditioned;
* one vector per voxel (C numbers) is well conditioned but blind to any spatial structure: a
  sample with its voxels shuffled would score as well as the data;
* a 2^3 patch keeps the local joint structure across channels and neighbouring voxels, and a
  24 x 24 x 16 latent gives 1,152 patches per volume, so 32 volumes give ~37,000 vectors for 32
  dimensions: a well-conditioned covariance.

What it cannot see: where in the volume a patch lies (a sample with anatomy in the wrong place but
the right local texture scores well); the image FID and the samples figure cover that.
Statistics are per volume (`FeatureStats`), merged for a set, so a bootstrap over volumes
(`maisi2.evaluate.fid.bootstrap_indices`) recombines them without recomputing anything.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from maisi2.errors import InvalidInput
from maisi2.evaluate.fid import FeatureStats, frechet_distance

__all__ = ["latent_patches", "latent_patch_stats", "merge_feature_stats", "latent_fid"]


def latent_patches(latent, patch: int = 2) -> np.ndarray:
    """(C, x, y, z) latent -> (blocks, C * patch^3) float64: its non-overlapping patch^3 blocks,
    flattened (a trailing part of an axis not divisible by `patch` is left out)."""
    z = torch.as_tensor(latent).double()
    if z.ndim != 4:
        raise InvalidInput(f"expected one latent (C, x, y, z), got shape {tuple(z.shape)}")
    if patch < 1 or any(s < patch for s in z.shape[1:]):
        raise InvalidInput(f"patch must be >= 1 and fit the latent's spatial shape {tuple(z.shape[1:])}; got {patch}")
    c, (x, y, w) = z.shape[0], (s // patch * patch for s in z.shape[1:])
    z = z[:, :x, :y, :w].reshape(c, x // patch, patch, y // patch, patch, w // patch, patch)
    # -> (x', y', z', C, p, p, p): one row per block, its channels and voxels together
    return z.permute(1, 3, 5, 0, 2, 4, 6).reshape(-1, c * patch ** 3).numpy()


def latent_patch_stats(latent, patch: int = 2) -> FeatureStats:
    """The patch vectors' running statistics of one latent (merge them with `merge_feature_stats`)."""
    feats = latent_patches(latent, patch)
    stats = FeatureStats(feats.shape[1])
    stats.update(feats)
    return stats


def merge_feature_stats(parts: Sequence[FeatureStats]) -> FeatureStats:
    """The statistics of the union of several sets of vectors (e.g. one per volume)."""
    if not parts:
        raise InvalidInput("nothing to merge: give at least one FeatureStats")
    merged = FeatureStats(parts[0].dim)
    for p in parts:
        merged = merged.merge(p)
    return merged


def latent_fid(real: FeatureStats | Sequence[FeatureStats], generated: FeatureStats | Sequence[FeatureStats]) -> float:
    """Squared Fréchet distance between the patch statistics of two sets (per-volume lists are merged)."""
    a = real if isinstance(real, FeatureStats) else merge_feature_stats(real)
    b = generated if isinstance(generated, FeatureStats) else merge_feature_stats(generated)
    if a.dim != b.dim:
        raise InvalidInput(f"the sets have patch vectors of {a.dim} and {b.dim} numbers: different patch sizes "
                           "or channel counts")
    return frechet_distance(a.mean, a.cov, b.mean, b.cov)
