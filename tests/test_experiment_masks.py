"""The experiments' mask editing (experiments/common.py: edit_mask), which makes the label maps
experiment 3 renders into synthetic training data."""

import numpy as np
import pytest

from common import IMPLANTS, edit_mask

from maisi2.labels import LUNG_IDS, TUMOR_IDS, label_id

LIVER, SPLEEN = label_id("liver"), label_id("spleen")


def _labels() -> np.ndarray:
    """Two lung lobes side by side, a liver below them carrying an existing hepatic tumour, a spleen."""
    labels = np.zeros((40, 40, 30), np.uint8)
    labels[2:20, 2:38, 16:29] = LUNG_IDS[0]
    labels[20:38, 2:38, 16:29] = LUNG_IDS[1]
    labels[2:38, 2:30, 1:15] = LIVER
    labels[30:38, 30:38, 1:15] = SPLEEN
    labels[10:14, 10:14, 5:9] = label_id("hepatic tumor")
    return labels


@pytest.mark.parametrize("kind", sorted(IMPLANTS))
def test_edit_mask_replaces_the_tumors_and_implants_balls_inside_their_organ(kind):
    labels = _labels()
    organ_ids, tumor_id = IMPLANTS[kind]
    for seed in range(4):
        edited = edit_mask(labels, np.random.default_rng(seed), radius_mm=(6.0, 10.0), spacing=(2.0, 2.0, 2.0),
                           kind=kind)
        implanted = edited == tumor_id
        assert implanted.any()
        # Only the implanted kind is left, and only where the organ was (after the old tumour became liver).
        assert set(np.unique(edited[np.isin(edited, TUMOR_IDS)])) == {tumor_id}
        assert np.isin(labels[implanted], (*organ_ids, label_id("hepatic tumor"))).all()
        # Nothing else moved: every other voxel keeps its label (the old tumour turns into liver).
        untouched = ~implanted & (labels != label_id("hepatic tumor"))
        np.testing.assert_array_equal(edited[untouched], labels[untouched])
        assert (edited[10:14, 10:14, 5:9][~implanted[10:14, 10:14, 5:9]] == LIVER).all()
        # A ball of radius >= 6 mm at 2 mm spacing: at least the 7-voxel cross through its centre.
        assert implanted.sum() >= 7


def test_edit_mask_refuses_an_unknown_kind():
    with pytest.raises(ValueError, match="unknown tumour kind 'brain'.*hepatic.*lung"):
        edit_mask(_labels(), np.random.default_rng(0), kind="brain")
