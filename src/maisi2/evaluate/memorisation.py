"""Memorisation check: how close each generated latent lies to its nearest training latent.

A generator that copies its training set puts samples at distance ~0 from one training latent; one
that generalises keeps them about as far from the training set as held-out data is. Distances are
relative (||z - z_train|| / ||z_train||, Euclidean over all elements) so they read the same at any
latent size; compare a sample set's distances with those of held-out latents against the same
training set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from maisi2.errors import InvalidInput

__all__ = ["NearestTraining", "nearest_training"]


@dataclass
class NearestTraining:
    """Per sample: relative distance to the nearest training latent, and that latent's index."""

    distance: torch.Tensor  # (S,) float64
    index: torch.Tensor  # (S,) int64


def nearest_training(samples: torch.Tensor, training: torch.Tensor, chunk: int = 64) -> NearestTraining:
    """samples (S, *shape), training (N, *shape) of one shape; the training set is read in chunks of
    `chunk` latents, so memory stays O(chunk x latent size)."""
    if samples.shape[1:] != training.shape[1:]:
        raise InvalidInput(f"samples {tuple(samples.shape[1:])} and training latents {tuple(training.shape[1:])} "
                         "must have the same shape")
    if len(training) == 0 or len(samples) == 0:
        raise InvalidInput("need at least one sample and one training latent")
    s = samples.reshape(len(samples), -1).double()
    best = torch.full((len(s),), float("inf"), dtype=torch.float64)
    index = torch.zeros(len(s), dtype=torch.int64)
    for start in range(0, len(training), chunk):
        t = training[start:start + chunk].reshape(-1, s.shape[1]).double()
        # the direct difference, not the |a|^2 + |b|^2 - 2ab shortcut, so a copy lies at exactly 0
        dist = torch.cdist(s, t, compute_mode="donot_use_mm_for_euclid_dist") / t.norm(dim=1).clamp_min(1e-12)
        value, where = dist.min(dim=1)
        better = value < best
        best = torch.where(better, value, best)
        index = torch.where(better, where + start, index)
    return NearestTraining(best, index)
