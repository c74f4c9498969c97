"""Tumour editing on label maps (maisi2.masks.tumors): inside the organ, volumes from voxels, refusals."""

import numpy as np
import pytest

from maisi2 import labels as L
from maisi2.masks import tumors as T

LIVER, SPLEEN, PANCREAS = L.label_id("liver"), L.label_id("spleen"), L.label_id("pancreas")
HEPATIC = L.label_id("hepatic tumor")
LUNG_TUMOR, BONE_LESION = L.label_id("lung tumor"), L.label_id("bone lesion")
SPACING = (2.0, 2.0, 2.5)


def _labels() -> np.ndarray:
    """Body, two lung lobes, a liver with one hepatic tumour, a spleen, a small pancreas, a vertebra."""
    labels = np.full((48, 44, 36), L.BODY, np.int16)
    labels[:, :, :2] = 0
    labels[4:24, 4:40, 20:34] = L.LUNG_IDS[0]
    labels[24:44, 4:40, 20:34] = L.LUNG_IDS[2]
    labels[4:30, 4:32, 3:18] = LIVER
    labels[32:44, 30:40, 3:18] = SPLEEN
    labels[32:38, 10:14, 8:11] = PANCREAS  # 12 x 8 x 7.5 mm: too thin for a 10 mm tumour
    labels[10:14, 10:14, 6:9] = HEPATIC
    labels[20:28, 36:42, 4:30] = L.label_id("vertebrae L1")
    return labels


def test_added_tumor_lies_inside_its_organ_and_its_volume_matches_the_voxels():
    labels = _labels()
    out, [change] = T.add_tumor(labels, SPACING, "hepatic", radius_mm=7, seed=3)
    new = (out == HEPATIC) & (labels != HEPATIC)
    assert new.sum() == change.voxels > 0
    assert np.all(labels[new] == LIVER)  # only liver voxels became tumour
    assert change.volume_ml == pytest.approx(new.sum() * np.prod(SPACING) / 1000, rel=1e-6)
    assert change.parent_organ == "liver" and change.label == "hepatic tumor" and change.action == "added"
    assert np.all(out[labels != LIVER] == labels[labels != LIVER])  # nothing else touched
    ball = 4 / 3 * np.pi * 7**3 / 1000
    assert 0.4 * ball < change.volume_ml < 1.8 * ball  # an irregular ball of about that radius
    assert labels[tuple(round(c) for c in change.centre_voxel)] == LIVER


def test_added_tumor_is_seeded_and_irregular():
    labels = _labels()
    a, _ = T.add_tumor(labels, SPACING, "hepatic", 7, at=(20, 20, 10), seed=1)
    b, _ = T.add_tumor(labels, SPACING, "hepatic", 7, at=(20, 20, 10), seed=1)
    c, _ = T.add_tumor(labels, SPACING, "hepatic", 7, at=(20, 20, 10), seed=2)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_tumor_at_a_position_is_centred_there_and_clipped_to_the_organ():
    labels = _labels()
    out, [change] = T.add_tumor(labels, SPACING, "hepatic", 8, at=(5, 20, 10), seed=0)  # at the liver's edge
    new = (out == HEPATIC) & (labels != HEPATIC)
    assert new[5, 20, 10] and np.all(labels[new] == LIVER)


def test_lung_tumor_may_cross_lobes_but_stays_in_the_lungs():
    labels = _labels()
    out, [change] = T.add_tumor(labels, SPACING, "lung", 8, at=(23, 20, 27), seed=0)  # at the fissure
    new = out == LUNG_TUMOR
    assert np.all(np.isin(labels[new], L.LUNG_IDS))
    assert set(np.unique(labels[new])) == {L.LUNG_IDS[0], L.LUNG_IDS[2]}


def test_bone_lesion_stays_in_the_one_bone_it_starts_in():
    labels = _labels()
    out, [change] = T.add_tumor(labels, SPACING, "bone", 4, seed=5)
    assert change.parent_organ == "vertebrae L1"
    assert np.all(labels[out == BONE_LESION] == L.label_id("vertebrae L1"))


@pytest.mark.parametrize("kind, radius, at, message", [
    ("colon", 5, None, "has no colon"),
    ("pancreatic", 10, None, "too small"),
    ("hepatic", 5, (40, 35, 10), "lies in 'spleen', not in liver"),
    ("hepatic", 5, (99, 0, 0), "outside the mask"),
    ("hepatic", 0.5, None, "half a voxel"),
    ("hepatc", 5, None, "did you mean 'hepatic'"),
])
def test_add_refuses_clearly(kind, radius, at, message):
    with pytest.raises(ValueError, match=message):
        T.add_tumor(_labels(), SPACING, kind, radius, at=at)


def test_too_small_says_the_largest_radius_that_fits():
    with pytest.raises(ValueError, match=r"ask for radius <= \d+ mm"):
        T.add_tumor(_labels(), SPACING, "pancreatic", 10)


def test_remove_gives_the_tumor_back_to_its_organ():
    labels = _labels()
    out, [change] = T.remove_tumors_of(labels, SPACING, "hepatic")
    assert not np.any(out == HEPATIC) and np.all(out[labels == HEPATIC] == LIVER)
    assert change.voxels == (labels == HEPATIC).sum() and change.parent_organ == "liver"
    assert change.centre_voxel == (11.5, 11.5, 7.0)


def test_scale_shrinks_and_grows_inside_the_organ():
    labels = _labels()
    labels[labels == HEPATIC] = LIVER
    labels[14:26, 14:26, 8:14] = HEPATIC  # 864 voxels
    before = labels == HEPATIC
    small, [shrunk] = T.scale_tumors(labels, SPACING, "hepatic", 0.5)
    big, [grown] = T.scale_tumors(labels, SPACING, "hepatic", 1.5)
    assert shrunk.volume_before_ml == grown.volume_before_ml == pytest.approx(864 * np.prod(SPACING) / 1000)
    assert 0.08 < (small == HEPATIC).sum() / 864 < 0.2  # ~0.5^3 of the block
    assert 2.5 < (big == HEPATIC).sum() / 864 < 4.0  # ~1.5^3
    assert shrunk.voxels == (small == HEPATIC).sum() and grown.voxels == (big == HEPATIC).sum()
    assert np.all(np.isin(labels[big == HEPATIC], (LIVER, HEPATIC)))
    assert np.all(small[before & (small != HEPATIC)] == LIVER)
    assert shrunk.centre_voxel == pytest.approx((19.5, 19.5, 10.5), abs=0.6)


def test_augment_keeps_most_of_the_tumor_inside_the_organ():
    labels = _labels()
    labels[labels == HEPATIC] = LIVER
    labels[14:24, 14:24, 8:14] = HEPATIC
    out, changes = T.augment_tumors(labels, SPACING, seed=4)
    [change] = [c for c in changes if c.kind == "hepatic"]
    assert change.action == "augmented"
    tumor = out == HEPATIC
    assert np.all(np.isin(labels[tumor], (LIVER, HEPATIC)))
    assert tumor.sum() >= 0.75 * (labels == HEPATIC).sum()
    assert change.voxels == tumor.sum()
    assert not np.array_equal(tumor, labels == HEPATIC)
    again, _ = T.augment_tumors(labels, SPACING, seed=4)
    assert np.array_equal(out, again)


def test_edit_tumors_applies_remove_then_add_and_reports_each():
    labels = _labels()
    edits = T.TumorEdits(add=(T.parse_add("hepatic:radius=6mm"), T.parse_add("lung:radius=5mm:at=10,20,27")),
                         remove=("hepatic",), seed=7)
    out, changes = T.edit_tumors(labels, SPACING, edits)
    assert [c.action for c in changes] == ["removed", "added", "added"]
    assert np.all(labels == _labels())  # input untouched
    assert (out == LUNG_TUMOR)[10, 20, 27]


@pytest.mark.parametrize("text, message", [
    ("hepatic:radius=big", "bad radius"), ("hepatic:at=1,2", "three voxel indices"),
    ("hepatic:size=3", "bad tumour option"), ("brain", "unknown tumour kind"),
])
def test_parse_add_refuses_clearly(text, message):
    with pytest.raises(ValueError, match=message):
        T.parse_add(text)


def test_parse_scale():
    assert T.parse_scale("hepatic=0.8") == ("hepatic", 0.8)
    assert T.parse_scale("lung tumor=2") == ("lung", 2.0)
    with pytest.raises(ValueError, match="KIND=FACTOR"):
        T.parse_scale("hepatic")


# -- one tumour, picked by position ---------------------------------------------------------------

def _three_hepatic() -> np.ndarray:
    """The liver holding three separate hepatic tumours (and the lungs one lung tumour)."""
    labels = _labels()  # one hepatic tumour at [10:14, 10:14, 6:9]
    labels[20:24, 10:14, 6:9] = HEPATIC
    labels[14:20, 22:28, 10:15] = HEPATIC
    labels[30:34, 20:24, 26:29] = LUNG_TUMOR
    return labels


def test_tumor_at_picks_the_component_holding_or_nearest_the_voxel():
    labels = _three_hepatic()
    tumor, mask = T.tumor_at(labels, SPACING, (11, 12, 7))  # inside the first
    assert tumor == HEPATIC and mask.sum() == 48 and mask[10:14, 10:14, 6:9].all()
    tumor, mask = T.tumor_at(labels, SPACING, (16, 12, 7))  # in the liver between the first two:
    assert mask[10:14, 10:14, 6:9].all() and mask.sum() == 48  # 6 mm from the first, 8 mm from the second
    tumor, mask = T.tumor_at(labels, SPACING, (17, 12, 7))  # 8 mm from the first, 6 mm from the second
    assert mask[20:24, 10:14, 6:9].all() and mask.sum() == 48
    tumor, mask = T.tumor_at(labels, SPACING, (31, 21, 25))  # beside the lung tumour, in the lung
    assert tumor == LUNG_TUMOR and mask.sum() == (labels == LUNG_TUMOR).sum()
    tumor, mask = T.tumor_at(labels, SPACING, (31, 21, 25), kind="hepatic", within_mm=40)
    assert tumor == HEPATIC and mask[14:20, 22:28, 10:15].all()  # of that kind only: the third


def test_tumor_at_refuses_far_voxels_and_tumor_free_masks_clearly():
    labels = _three_hepatic()
    with pytest.raises(ValueError, match=r"no tumour within 10 mm of voxel \[40, 6, 3\]; the nearest is "
                                         r"'hepatic tumor' at voxel \[23, 10, 6\], \d+ mm away"):
        T.tumor_at(labels, SPACING, (40, 6, 3))
    T.tumor_at(labels, SPACING, (40, 6, 3), within_mm=40)  # found when allowed further
    with pytest.raises(ValueError, match="has no tumour to pick"):
        T.tumor_at(L.remove_tumors(labels), SPACING, (11, 12, 7))
    with pytest.raises(ValueError, match="has no bone tumour"):
        T.tumor_at(labels, SPACING, (11, 12, 7), kind="bone")
    with pytest.raises(ValueError, match="outside the mask"):
        T.tumor_at(labels, SPACING, (11, 12, 70))


def test_remove_tumor_at_removes_that_one_and_leaves_its_neighbours():
    labels = _three_hepatic()
    out, [change] = T.remove_tumor_at(labels, SPACING, (21, 11, 8))
    assert change.action == "removed" and change.parent_organ == "liver" and change.voxels == 48
    assert change.centre_voxel == (21.5, 11.5, 7.0)
    assert np.all(out[20:24, 10:14, 6:9] == LIVER)
    changed = out != labels
    assert changed.sum() == 48 and changed[20:24, 10:14, 6:9].all()  # nothing else moved
    assert np.all(labels == _three_hepatic())  # input untouched
    lung, [change] = T.remove_tumor_at(labels, SPACING, (31, 21, 27))
    assert change.label == "lung tumor" and not np.any(lung == LUNG_TUMOR)
    assert np.all(np.isin(lung[labels == LUNG_TUMOR], L.LUNG_IDS))  # back to the lobe around it


def test_scale_tumor_at_resizes_that_one_inside_its_organ():
    labels = _three_hepatic()
    third = np.zeros(labels.shape, bool)
    third[14:20, 22:28, 10:15] = True
    out, [change] = T.scale_tumor_at(labels, SPACING, (16, 24, 12), 1.5)
    grown = out == HEPATIC
    assert change.action == "scaled" and change.volume_before_ml == pytest.approx(third.sum() * np.prod(SPACING) / 1000)
    assert 2.5 < change.voxels / third.sum() < 4.5  # ~1.5^3
    assert np.all(out[10:14, 10:14, 6:9] == HEPATIC) and np.all(out[20:24, 10:14, 6:9] == HEPATIC)
    assert np.all(np.isin(labels[grown & (labels != HEPATIC)], (LIVER,)))  # grew into the liver only
    elsewhere = np.ones(labels.shape, bool)
    elsewhere[8:26, 18:32, 6:19] = False  # a box around the third tumour and its growth
    assert np.array_equal(out[elsewhere], labels[elsewhere])
    small, [shrunk] = T.scale_tumor_at(labels, SPACING, (16, 24, 12), 0.5)
    assert shrunk.voxels < 0.25 * third.sum() and np.all(small[third & (small != HEPATIC)] == LIVER)
    with pytest.raises(ValueError, match="between 0.1 and 4"):
        T.scale_tumor_at(labels, SPACING, (16, 24, 12), 5)


def test_edit_tumors_runs_positions_first_and_parses_them():
    labels = _three_hepatic()
    edits = T.TumorEdits(remove_at=(T.parse_at("11,12,7"),), scale_at=(T.parse_scale_at("16,24,12=0.5"),))
    out, changes = T.edit_tumors(labels, SPACING, edits)
    assert [c.action for c in changes] == ["removed", "scaled"]
    assert np.all(out[10:14, 10:14, 6:9] == LIVER) and np.all(out[20:24, 10:14, 6:9] == HEPATIC)
    assert T.parse_scale_at("1,2,3=1.5") == ((1, 2, 3), 1.5)
    for parse, bad, message in ((T.parse_at, "1,2", "three voxel indices"), (T.parse_scale_at, "1,2,3", "x,y,z=FACTOR"),
                                (T.parse_scale_at, "a,b,c=2", "three voxel indices")):
        with pytest.raises(ValueError, match=message):
            parse(bad)


# -- the file front end and the CLI ------------------------------------------------------------

def _mask_file(tmp_path):
    from maisi2 import volume_io

    path = tmp_path / "mask.nii.gz"
    volume_io.save_label_map(path, volume_io.Volume(_labels(), volume_io.ras_affine(SPACING)), tables=False)
    return path


def test_masks_edit_cli_writes_the_map_and_its_changes(tmp_path, capsys):
    import json

    from maisi2 import volume_io
    from maisi2.cli import main

    mask = _mask_file(tmp_path)
    out = tmp_path / "edited.nii.gz"
    rc = main(["masks", "edit", str(mask), str(out), "--add", "hepatic:radius=6mm", "--remove", "hepatic",
               "--seed", "2"])
    assert rc == 0
    report = json.loads((tmp_path / "edited_edits.json").read_text())
    assert [c["action"] for c in report["changes"]] == ["removed", "added"]
    edited = volume_io.load_label_map(out).array
    added = report["changes"][1]
    assert (edited == HEPATIC).sum() == added["voxels"]
    assert added["volume_ml"] == pytest.approx(added["voxels"] * np.prod(SPACING) / 1000)
    assert "added     hepatic tumor in liver" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited.ctbl", "edited.itksnap.txt", "edited.nii.gz",
                                                         "edited_edits.json", "mask.nii.gz"]


def test_masks_edit_cli_removes_and_resizes_one_tumor_by_position(tmp_path, capsys):
    import json

    from maisi2 import volume_io
    from maisi2.cli import main

    mask = tmp_path / "mask.nii.gz"
    volume_io.save_label_map(mask, volume_io.Volume(_three_hepatic(), volume_io.ras_affine(SPACING)), tables=False)
    out = tmp_path / "edited.nii.gz"
    rc = main(["masks", "edit", str(mask), str(out), "--remove-at", "16,12,7", "--scale-at", "16,24,12=0.5",
               "--within", "8"])
    assert rc == 0
    report = json.loads((tmp_path / "edited_edits.json").read_text())
    assert [c["action"] for c in report["changes"]] == ["removed", "scaled"] and report["within_mm"] == 8
    edited = volume_io.load_label_map(out).array
    assert np.all(edited[10:14, 10:14, 6:9] == LIVER) and np.all(edited[20:24, 10:14, 6:9] == HEPATIC)
    assert "removed   hepatic tumor in liver: " in capsys.readouterr().out
    rc = main(["masks", "edit", str(mask), str(tmp_path / "far.nii.gz"), "--remove-at", "16,12,7", "--within", "4"])
    assert rc != 0 and "no tumour within 4 mm of voxel [16, 12, 7]" in capsys.readouterr().err
    assert not (tmp_path / "far.nii.gz").exists()


@pytest.mark.parametrize("args, message", [
    (["--add", "colon"], "has no colon"),
    (["--remove-at", "1,2"], "three voxel indices"),
    (["--scale-at", "12,12,7"], "x,y,z=FACTOR"),
    (["--add", "hepatic:at=40,35,10"], "not in liver"),
    (["--scale", "hepatic=9"], "between 0.1 and 4"),
    ([], "no edit asked for"),
])
def test_masks_edit_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, message):
    from maisi2.cli import main

    mask = _mask_file(tmp_path)
    rc = main(["masks", "edit", str(mask), str(tmp_path / "edited.nii.gz"), *args])
    err = capsys.readouterr().err
    assert rc == 1 and message in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.nii.gz"]
