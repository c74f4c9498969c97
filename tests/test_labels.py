import json

import numpy as np
import pytest

from maisi2 import labels
from maisi2.labels import BODY, label_id, remove_tumors


def test_table_matches_the_official_dictionary(reference_dir):
    official = json.loads((reference_dir / "label_dict.json").read_text())
    real = {k: v for k, v in official.items() if not k.startswith("dummy")}
    assert labels.LABELS == real
    assert BODY == 200 and label_id("liver") == 1


def test_unknown_names_and_ids_are_explained():
    with pytest.raises(KeyError, match="did you mean"):
        label_id("livers")
    bad = np.array([[[0, 1, 2, 300]]])  # 2 is a dummy slot, 300 is out of range
    with pytest.raises(ValueError, match="2, 300"):
        labels.check_label_ids(bad)
    labels.check_label_ids(np.array([0, 1, 200, 132]))


def test_fixed_parents_follow_design():
    pairs = {"hepatic tumor": "liver", "pancreatic tumor": "pancreas", "colon cancer primaries": "colon",
             "left kidney cyst": "left kidney", "right kidney cyst": "right kidney"}
    assert labels.TUMOR_PARENT == {label_id(k): label_id(v) for k, v in pairs.items()}


def _lobes_with_tumor():
    vol = np.full((24, 24, 24), label_id("left lung upper lobe"), np.int16)
    vol[:, 12:] = label_id("left lung lower lobe")
    vol[:, 8:12] = label_id("right lung middle lobe")  # a thin band that the ring mostly sees
    vol[10:14, 9:12, 10:14] = label_id("lung tumor")
    vol[2:4, 2:4, 2:4] = label_id("hepatic tumor")
    return vol


def test_remove_tumors_uses_ring_majority_for_lung_tumors():
    vol = _lobes_with_tumor()
    out = remove_tumors(vol)
    assert out is not vol and (vol == label_id("lung tumor")).any()  # input untouched
    assert not np.isin(out, labels.TUMOR_IDS).any()
    assert (out[10:14, 9:12, 10:14] == label_id("right lung middle lobe")).all()
    assert (out[2:4, 2:4, 2:4] == label_id("liver")).all()
    unchanged = ~np.isin(vol, labels.TUMOR_IDS)
    assert (out[unchanged] == vol[unchanged]).all()


def test_each_component_gets_its_own_majority():
    vol = np.zeros((30, 30, 30), np.int16)
    vol[:15] = label_id("vertebrae L1")
    vol[15:] = label_id("sacrum")
    vol[5:8, 5:8, 5:8] = label_id("bone lesion")
    vol[22:25, 5:8, 5:8] = label_id("bone lesion")
    out = remove_tumors(vol)
    assert (out[5:8, 5:8, 5:8] == label_id("vertebrae L1")).all()
    assert (out[22:25, 5:8, 5:8] == label_id("sacrum")).all()


def test_lesion_without_any_candidate_falls_back_to_body():
    vol = np.full((10, 10, 10), BODY, np.int16)
    vol[4:6, 4:6, 4:6] = label_id("lung tumor")
    assert (remove_tumors(vol)[4:6, 4:6, 4:6] == BODY).all()


def test_qc_groups_cover_the_reference_organs(reference_dir):
    stats = json.loads((reference_dir / "image_median_statistics_ct.json").read_text())
    assert set(labels.QC_ORGAN_GROUPS) == set(stats)


def test_unseen_labels_are_replaced_by_their_nearest_seen_look_alike():
    from maisi2.labels import substitute_unseen

    seen = {label_id(n) for n in ("liver", "aorta", "right lung lower lobe", "vertebrae T4", "left rib 3",
                                  "left autochthon", "heart")} | {BODY}
    names = ["hepatic tumor", "trachea", "left subclavian artery", "vertebrae T3", "left rib 1", "left femur",
             "left gluteus maximus", "left atrial appendage", "thyroid gland", "liver"]
    labels = np.array([[[label_id(n) for n in names] + [0]]], dtype=np.int16)
    out, replaced = substitute_unseen(labels, seen)
    want = ["liver", "right lung lower lobe", "aorta", "vertebrae T4", "left rib 3", "left rib 3",
            "left autochthon", "heart", "body", "liver"]
    assert out[0, 0].tolist() == [label_id(n) for n in want] + [0]
    assert replaced == {label_id(n): label_id(w) for n, w in zip(names, want) if n != w}
