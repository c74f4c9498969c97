"""The measures of experiments/contrastive_arms.py (issue #26, item 2): paired HU changes per
implanted tumour, the background change, and the case bootstrap."""

import numpy as np
import pytest

from contrastive_arms import BACKGROUND_MARGIN, LUNG_TUMOR, case_bootstrap, changes


def _case(centres, shape=(24, 24, 24), radius=2):
    mask = np.zeros(shape, np.uint8)
    grid = np.indices(shape)
    for c in centres:
        mask[sum((grid[a] - c[a]) ** 2 for a in range(3)) <= radius**2] = LUNG_TUMOR
    return mask


def test_changes_measure_each_tumour_its_ring_and_the_background_separately():
    mask = np.stack([_case([(6, 6, 6), (17, 17, 17)]), _case([(12, 12, 12)])])
    without = np.full(mask.shape, -800.0, np.float32)
    with_t = without.copy()
    with_t[mask == LUNG_TUMOR] += 300.0  # every tumour brightened by 300 HU
    with_t[1, 0, 0, 0] += 50.0  # one background voxel of case 1 moves, far from its tumour
    got = changes(with_t, without, mask)
    assert got["inside"] == pytest.approx([300.0, 300.0, 300.0])
    assert got["ring"] == pytest.approx([0.0, 0.0, 0.0])  # nothing changed around them
    assert got["case"] == [0, 0, 1]
    assert got["voxels"] == [int((_case([(12, 12, 12)]) == LUNG_TUMOR).sum())] * 3
    from scipy import ndimage
    outside = (~ndimage.binary_dilation(mask[1] == LUNG_TUMOR, iterations=BACKGROUND_MARGIN)).sum()
    assert got["background"] == pytest.approx([0.0, 50.0 / outside])


def test_case_bootstrap_point_is_the_pooled_mean_and_resamples_whole_cases():
    # two seeds, three cases; case 2 holds two tumours
    seed_a = {"inside": [10.0, 20.0, 30.0, 50.0], "case": [0, 1, 2, 2], "background": [1.0, 2.0, 3.0]}
    seed_b = {"inside": [12.0, 18.0, 28.0, 52.0], "case": [0, 1, 2, 2], "background": [1.0, 2.0, 5.0]}
    point, lo, hi = case_bootstrap([seed_a, seed_b], "inside", np.mean, resamples=500)
    assert point == pytest.approx(np.mean(seed_a["inside"] + seed_b["inside"]))
    assert lo <= point <= hi and lo < hi
    assert lo >= 10.0 and hi <= 52.0
    assert case_bootstrap([seed_a, seed_b], "inside", np.mean, resamples=500) == (point, lo, hi)  # seeded
    bg, bg_lo, bg_hi = case_bootstrap([seed_a, seed_b], "background", np.mean, resamples=500)
    assert bg == pytest.approx(14.0 / 6)
    # identical arms: a paired difference of exactly zero, with a zero-width interval
    diff = {"inside": [0.0] * 4, "case": [0, 1, 2, 2], "background": [0.0] * 3}
    assert case_bootstrap([diff, diff], "inside", np.mean, resamples=100) == (0.0, 0.0, 0.0)


def test_plot_draws_every_arm_and_the_ceiling(tmp_path):
    from PIL import Image

    from contrastive_arms import plot

    results = {"arms": {"none": {"inside": (3.0, 1.0, 5.0), "inside_per_seed": [2.0, 4.0], "seeds": [0, 1]},
                        "paper": {"inside": (33.0, 10.0, 60.0), "inside_per_seed": [29.0, 37.0], "seeds": [0, 1]}},
               "ceiling": {"inside_mean": 355.0}}
    out = tmp_path / "arms.png"
    plot(results, out, size=(400, 200))
    pixels = np.asarray(Image.open(out).convert("RGB")).reshape(-1, 3)
    assert Image.open(out).size == (400, 200)
    assert ((pixels == (139, 0, 0)).all(axis=1)).sum() > 100  # the ceiling line (darkred)
    assert ((pixels == (255, 140, 0)).all(axis=1)).sum() >= 4 * 9  # four seed dots (darkorange)
