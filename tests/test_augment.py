"""Variants of a real training pair (maisi2.augment): geometry and per-organ contrast."""

import numpy as np
import pytest

from maisi2.augment import SOFT_ORGANS, Augmentation, augmented_pair, organ_median_stats, shift_organs
from maisi2.errors import InvalidInput
from maisi2.labels import QC_ORGAN_GROUPS
from maisi2.quality import hu_ranges
from maisi2.volume_io import Volume, ras_affine

LIVER, SPLEEN, BONE = QC_ORGAN_GROUPS["liver"][0], QC_ORGAN_GROUPS["spleen"][0], QC_ORGAN_GROUPS["bone"][0]


def _pair(shape=(40, 36, 12)):
    """A small CT with a liver block (90 HU), a spleen ball (80 HU), a bone bar (300 HU) in water."""
    x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    labels = np.zeros(shape, np.int16)
    labels[5:18, 5:30, 2:10] = LIVER
    labels[(x - 28) ** 2 + (y - 18) ** 2 + 4 * (z - 6) ** 2 < 36] = SPLEEN
    labels[18:22, 30:34, :] = BONE
    hu = np.where(labels == LIVER, 90.0, np.where(labels == SPLEEN, 80.0, np.where(labels == BONE, 300.0, 0.0)))
    hu = (hu + np.random.default_rng(0).normal(0, 10, shape)).astype(np.float32)
    affine = ras_affine((3, 3, 3))
    return Volume(hu, affine), Volume(labels, affine)


def test_stats_are_the_quality_check_ranges_read_back():
    ranges = hu_ranges()
    for organ, (mean, sd) in organ_median_stats().items():
        assert (mean - 3 * sd, mean + 3 * sd) == pytest.approx(ranges[organ], abs=1e-9)
    assert set(organ_median_stats()) == set(SOFT_ORGANS)


def test_shift_moves_each_present_organ_to_its_draw_and_nothing_else():
    ct, labels = _pair()
    out = shift_organs(ct.array, labels.array, np.random.default_rng(7), organ_sd=0.5)
    # the draws come in organ order from one stream: rebuild them one by one
    rng = np.random.default_rng(7)
    draws = {o: rng.normal(m, 0.5 * s) for o, (m, s) in organ_median_stats().items()}
    for organ, code in (("liver", LIVER), ("spleen", SPLEEN)):
        inside = labels.array == code
        assert np.median(out[inside]) == pytest.approx(draws[organ], abs=1e-3)
        # a shift, not a rescale: the texture inside the organ is kept
        assert np.std(out[inside]) == pytest.approx(np.std(ct.array[inside]), rel=1e-5)
    others = ~np.isin(labels.array, [LIVER, SPLEEN])
    np.testing.assert_array_equal(out[others], ct.array[others])  # bone and background untouched


def test_no_rotation_no_scale_no_shift_is_the_identity():
    ct, labels = _pair()
    new_ct, new_labels = augmented_pair(ct, labels, seed=3, how=Augmentation((0, 0, 0), 0.0, 0.0))
    np.testing.assert_allclose(new_ct.array, ct.array, atol=1e-3)
    np.testing.assert_array_equal(new_labels.array, labels.array)
    assert new_ct.spacing == ct.spacing and new_labels.array.dtype == labels.array.dtype


def test_variants_are_reproducible_differ_by_seed_and_keep_the_label_vocabulary():
    ct, labels = _pair()
    a_ct, a_lab = augmented_pair(ct, labels, seed=1)
    b_ct, b_lab = augmented_pair(ct, labels, seed=1)
    c_ct, c_lab = augmented_pair(ct, labels, seed=2)
    np.testing.assert_array_equal(a_ct.array, b_ct.array)
    np.testing.assert_array_equal(a_lab.array, b_lab.array)
    assert not np.array_equal(a_lab.array, c_lab.array)
    assert set(np.unique(a_lab.array)) <= set(np.unique(labels.array))  # nearest: no blended ids
    # labels and CT moved together: the bone bar is still the bright part
    assert np.median(a_ct.array[a_lab.array == BONE]) > 250
    # the organs' medians are no longer the source scan's
    assert abs(np.median(a_ct.array[a_lab.array == SPLEEN]) - 80) > 1e-3


def test_bad_input_is_refused():
    ct, labels = _pair()
    with pytest.raises(InvalidInput, match="one grid"):
        augmented_pair(ct, Volume(labels.array[:-1], labels.affine), seed=0)
    for bad in (dict(scale=1.0), dict(organ_sd=-1.0), dict(rotate_deg=(float("nan"), 0, 0))):
        with pytest.raises(InvalidInput, match="augmentation needs"):
            Augmentation(**bad)
