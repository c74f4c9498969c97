"""The latent-space Fréchet distance (patch vectors of latents) and the shared bootstrap draws."""

import numpy as np
import pytest
import torch

from maisi2.evaluate.fid import bootstrap_indices, percentile_interval
from maisi2.evaluate.latent_fid import latent_fid, latent_patch_stats, latent_patches


def _smooth_latents(n, seed, shape=(4, 12, 12, 8)):
    """Latents whose neighbouring voxels correlate (box-blurred noise), as real latents' do."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, *shape, generator=g)
    z = torch.nn.functional.avg_pool3d(z, 3, stride=1, padding=1, count_include_pad=False)
    return z / z.std()


def test_patches_are_the_blocks_flattened_channels_first():
    z = torch.arange(2 * 4 * 4 * 3, dtype=torch.float32).reshape(2, 4, 4, 3)
    feats = latent_patches(z, patch=2)
    assert feats.shape == (2 * 2 * 1, 2 * 8)  # the last z voxel (3 is not a multiple of 2) is left out
    np.testing.assert_array_equal(feats[0], z[:, :2, :2, :2].reshape(-1).numpy())
    np.testing.assert_array_equal(feats[1], z[:, :2, 2:4, :2].reshape(-1).numpy())  # z, then y, then x blocks
    np.testing.assert_array_equal(feats[3], z[:, 2:4, 2:4, :2].reshape(-1).numpy())


def test_same_distribution_near_zero_and_differences_score_higher():
    real = [latent_patch_stats(z) for z in _smooth_latents(16, 0)]
    same = [latent_patch_stats(z) for z in _smooth_latents(16, 1)]
    assert latent_fid(real, real) == pytest.approx(0.0, abs=1e-9)
    # another draw of the same distribution: only the finite-sample bias (2,304 vectors of 32 numbers)
    base = latent_fid(real, same)
    assert 0 < base < 0.5
    shifted = [latent_patch_stats(z + 0.3) for z in _smooth_latents(16, 1)]
    # a mean shift of 0.3 in each of the 32 patch numbers adds 32 * 0.09 = 2.88
    assert latent_fid(real, shifted) == pytest.approx(base + 2.88, abs=0.5)
    scaled = [latent_patch_stats(1.5 * z) for z in _smooth_latents(16, 1)]
    assert latent_fid(real, scaled) > 10 * base


def test_patches_see_spatial_structure_that_voxel_statistics_miss():
    """Voxels shuffled within each channel keep every per-voxel statistic and lose the neighbours'
    correlation: a patch feature must tell them apart from the data."""
    zs = _smooth_latents(16, 1)
    g = torch.Generator().manual_seed(2)
    shuffled = torch.stack([z.reshape(4, -1)[:, torch.randperm(z[0].numel(), generator=g)].reshape(z.shape) for z in zs])
    real = [latent_patch_stats(z) for z in _smooth_latents(16, 0)]
    same = latent_fid(real, [latent_patch_stats(z) for z in zs])
    assert latent_fid(real, [latent_patch_stats(z) for z in shuffled]) > 20 * same
    per_voxel = lambda zz: [latent_patch_stats(z, patch=1) for z in zz]  # noqa: E731
    # with 1-voxel "patches" the shuffle is invisible (the same vectors in another order)
    assert latent_fid(per_voxel(_smooth_latents(16, 0)), per_voxel(shuffled)) == pytest.approx(
        latent_fid(per_voxel(_smooth_latents(16, 0)), per_voxel(zs)), rel=1e-6)


def test_bootstrap_draws_are_seeded_and_pairable():
    draws = bootstrap_indices(8, resamples=50, seed=3)
    assert draws.shape == (50, 8) and draws.min() >= 0 and draws.max() < 8
    np.testing.assert_array_equal(draws, bootstrap_indices(8, resamples=50, seed=3))
    assert not np.array_equal(draws, bootstrap_indices(8, resamples=50, seed=4))
    # a paired difference of two scores that move together has a narrower interval than either score
    rng = np.random.default_rng(0)
    common = rng.normal(size=8) * 10
    a, b = common + rng.normal(size=8), common + 1 + rng.normal(size=8)
    mean_a, mean_b = a[draws].mean(1), b[draws].mean(1)
    lo, hi = percentile_interval(mean_a - mean_b)
    assert hi - lo < 0.5 * np.subtract(*percentile_interval(mean_a)[::-1])
    assert percentile_interval(np.arange(101.0)) == pytest.approx((2.5, 97.5))
    with pytest.raises(ValueError):
        bootstrap_indices(1)
