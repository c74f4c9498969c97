"""Merging FID feature statistics and the bootstrap interval over generated volumes."""

import numpy as np
import pytest

from maisi2.evaluate.fid import PLANES, FeatureStats, SetStats, bootstrap_fid, fid_from_stats, merge_set_stats


def _set(feats_per_plane):
    planes = {}
    for name in PLANES:
        st = FeatureStats(feats_per_plane.shape[1])
        st.update(feats_per_plane)
        planes[name] = st
    return SetStats(planes, "fake", None, None, 1)


def test_merge_equals_featurising_everything_at_once():
    rng = np.random.default_rng(0)
    parts = [rng.normal(size=(m, 3)) + i for i, m in enumerate((5, 1, 9))]
    merged = merge_set_stats([_set(p) for p in parts])
    whole = _set(np.concatenate(parts))
    for name in PLANES:
        assert merged.planes[name].n == 15
        np.testing.assert_allclose(merged.planes[name].mean, whole.planes[name].mean, rtol=1e-12)
        np.testing.assert_allclose(merged.planes[name].cov, np.cov(np.concatenate(parts).T), rtol=1e-10)
    assert merged.volumes == 3


def test_bootstrap_interval_brackets_the_estimate_and_is_seeded():
    rng = np.random.default_rng(1)
    real = _set(rng.normal(size=(400, 3)))
    generated = [_set(rng.normal(0.3, 1.0, size=(20, 3))) for _ in range(12)]
    point, lo, hi = bootstrap_fid(real, generated, resamples=200, seed=0)
    assert point == pytest.approx(fid_from_stats(real, merge_set_stats(generated)).average)
    assert lo <= point <= hi
    assert bootstrap_fid(real, generated, resamples=200, seed=0) == (point, lo, hi)
    few = bootstrap_fid(real, generated[:3], resamples=200, seed=0)
    assert few[2] - few[1] > hi - lo  # fewer volumes, wider interval
    with pytest.raises(ValueError, match="at least 2"):
        bootstrap_fid(real, generated[:1])
