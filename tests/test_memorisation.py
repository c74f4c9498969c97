"""The nearest-training-latent check: a copied latent is found at distance 0 with its index."""

import pytest
import torch

from maisi2.evaluate.memorisation import nearest_training


def test_copies_are_found_and_fresh_draws_are_far():
    g = torch.Generator().manual_seed(0)
    training = torch.randn(10, 4, 3, 3, 2, generator=g)
    samples = torch.cat([training[7:8], training[2:3] * 1.01, torch.randn(1, 4, 3, 3, 2, generator=g)])
    result = nearest_training(samples, training, chunk=3)  # chunks 3, 3, 3, 1: the index offsets matter
    assert result.index[:2].tolist() == [7, 2]
    assert result.distance[0].item() == pytest.approx(0.0, abs=1e-12)
    # 1.01 * z rounds each float32 element (relative 6e-8), which is ~6e-6 of the 0.01 difference
    assert result.distance[1].item() == pytest.approx(0.01, rel=1e-4)
    # two independent N(0, 1) draws of 72 elements differ by about sqrt(2) of one's norm
    assert result.distance[2].item() > 0.8


def test_shapes_must_agree():
    with pytest.raises(ValueError, match="same shape"):
        nearest_training(torch.zeros(1, 4, 2, 2, 2), torch.zeros(3, 4, 2, 2, 3))
