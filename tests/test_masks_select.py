"""Mask library, selection and fitting (maisi2.masks.library / select / regions): every rule, explained."""

import json
import os

import numpy as np
import pytest

from maisi2 import volume_io
from maisi2 import labels as L
from maisi2.masks import library as LIB
from maisi2.masks import select as S
from maisi2.masks.regions import covered_regions, region_name

LIVER, HEPATIC = L.label_id("liver"), L.label_id("hepatic tumor")


def _entry(file="a.nii.gz", shape=(128, 128, 96), spacing=(3.0, 3.0, 3.0), labels=("liver", "spleen", "body"),
           tumors=(), regions=("chest", "abdomen"), boxes=None) -> LIB.MaskEntry:
    boxes = boxes or {n: [10, 10, 10, 60, 60, 50] for n in labels}
    return LIB.MaskEntry(file, 1, 1, shape, spacing, tuple(n * s for n, s in zip(shape, spacing)),
                         {r: [] for r in regions}, tuple(labels) + tuple(tumors), tuple(tumors),
                         {n: 100.0 for n in (*labels, *tumors)}, {**boxes, **{t: [20, 20, 20, 25, 25, 25] for t in tumors}})


def _index(*entries) -> LIB.LibraryIndex:
    return LIB.LibraryIndex(folder="lib", entries=list(entries), skipped=[])


# -- requests ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"region": "chst"}, "unknown body region 'chst' (did you mean 'chest'?)"),
    ({"anatomy": "liver,hepatc tumor"}, "did you mean 'hepatic tumor'"),
    ({"size": (100, 128, 96)}, "multiples of 16"),
    ({"size": (128, 128)}, "multiples of 16"),
    ({"spacing": (1.5, 0, 2)}, "between 0.2 and 20 mm"),
])
def test_bad_requests_say_what_to_change(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        S.make_request(**kwargs)


def test_request_names_are_normalised():
    request = S.make_request("Thorax", "Liver, hepatic_tumor", (128, 128, 96), (3, 3, 3))
    assert request.regions == ("chest",) and request.anatomy == ("liver", "hepatic tumor")
    assert request.tumors() == ("hepatic tumor",) and request.fov_mm == (384.0, 384.0, 288.0)
    assert region_name("pelvic") == "pelvis"


# -- each rule ---------------------------------------------------------------------------------

def test_rule_anatomy_present():
    verdict = S.judge(_entry(), S.make_request(anatomy="liver,stomach"))
    assert verdict.problems == ["lacks stomach"]


def test_rule_missing_tumor_is_added_when_its_organ_is_present_and_ranks_after_one_that_has_it():
    request = S.make_request(anatomy="liver,hepatic tumor")
    plain, with_tumor = _entry("plain"), _entry("tumour", tumors=("hepatic tumor",))
    assert S.judge(plain, request).ok and S.judge(plain, request).to_add == ["hepatic tumor"]
    kept, _ = S.rank(_index(plain, with_tumor), request)
    assert [v.entry.file for v in kept] == ["tumour", "plain"]
    lung = S.judge(_entry(), S.make_request(anatomy="lung tumor"))
    assert lung.problems == ["lacks lung tumor and the organ it would be added to"]


def test_rule_region_covered():
    verdict = S.judge(_entry(regions=("abdomen",)), S.make_request(region="chest"))
    assert verdict.problems == ["does not cover the chest (covers abdomen)"]


def test_rule_no_unrequested_tumor():
    verdict = S.judge(_entry(tumors=("lung tumor",)), S.make_request(anatomy="liver"))
    assert len(verdict.problems) == 1 and "holds lung tumor not asked for" in verdict.problems[0]


def test_rule_requested_structures_fit_the_field_of_view():
    entry = _entry(boxes={"liver": [0, 0, 0, 80, 40, 40]})  # liver 240 mm long in x at 3 mm
    assert S.judge(entry, S.make_request(anatomy="liver", size=(64, 64, 64), spacing=(4, 4, 4))).ok  # 256 mm
    verdict = S.judge(entry, S.make_request(anatomy="liver", size=(64, 64, 64), spacing=(3, 3, 3)))  # 192 mm
    assert "its liver extend over 240 x 120 x 120 mm, more than the requested field of view 192 x 192 x 192 mm" \
        in verdict.problems[0]


def test_ranking_prefers_exact_then_closest_field_of_view():
    request = S.make_request(size=(128, 128, 96), spacing=(3, 3, 3))
    exact = _entry("exact")
    near = _entry("near", shape=(96, 96, 72), spacing=(4.0, 4.0, 4.0))  # same FOV, other grid
    far = _entry("far", shape=(64, 64, 48), spacing=(3.0, 3.0, 3.0))  # half the FOV
    kept, _ = S.rank(_index(far, near, exact), request)
    assert [v.entry.file for v in kept] == ["exact", "near", "far"]
    assert kept[0].exact and not kept[1].exact and kept[1].score < kept[2].score


def test_seed_picks_among_the_best_group_and_samples_cycle_through_it():
    request = S.make_request(size=(128, 128, 96), spacing=(3, 3, 3))
    a, b = _entry("a", shape=(96, 96, 72), spacing=(4.0, 4.0, 4.0)), _entry("b", shape=(96, 96, 72), spacing=(4.0, 4.0, 4.0))
    far = _entry("far", shape=(64, 64, 48))
    picks = {S.select_masks(_index(a, b, far), request, seed=s)[0][0].entry.file for s in range(12)}
    assert picks == {"a", "b"}
    chosen, best, _ = S.select_masks(_index(a, b, far), request, seed=0, count=3)
    assert sorted(v.entry.file for v in best) == ["a", "b"]
    assert {v.entry.file for v in chosen[:2]} == {"a", "b"} and chosen[2] is chosen[0]


def test_nothing_fits_names_the_closest_masks_and_what_to_change():
    index = _index(_entry("abd", regions=("abdomen",)), _entry("tum", tumors=("lung tumor",)))
    with pytest.raises(ValueError) as err:
        S.select_masks(index, S.make_request(region="chest", anatomy="liver"))
    message = str(err.value)
    assert "abd: does not cover the chest (covers abdomen)" in message and "tum: holds lung tumor" in message
    assert "drop or change --region" in message and "name those tumours in --anatomy" in message
    assert "\n" not in message


# -- fitting -----------------------------------------------------------------------------------

def _volume(shape=(60, 50, 40), spacing=(2.0, 2.0, 2.0)) -> volume_io.Volume:
    labels = np.full(shape, L.BODY, np.int16)
    labels[5:25, 10:40, 5:30] = LIVER
    labels[12:16, 20:24, 10:14] = HEPATIC
    labels[40:55, 10:20, 20:35] = L.label_id("spleen")
    return volume_io.Volume(labels, volume_io.ras_affine(spacing, (-10.0, 5.0, 7.0)))


def test_fit_resamples_nearest_and_crops_keeping_the_requested_structures_whole():
    volume = _volume()
    request = S.make_request(anatomy="liver,hepatic tumor", size=(32, 32, 64), spacing=(2.0, 2.0, 1.0))
    fitted, info = S.fit_mask(volume, request)
    assert fitted.shape == (32, 32, 64) and fitted.spacing == pytest.approx((2.0, 2.0, 1.0))
    resampled = volume_io.resample_to_spacing(volume, (2.0, 2.0, 1.0), order=0)
    for label in (LIVER, HEPATIC):  # every voxel of the requested structures survives the crop
        assert (fitted.array == label).sum() == (resampled.array == label).sum() > 0
    # the window's world position: voxel (i, j, k) of the crop is voxel start + (i, j, k) of the resampled map
    start = np.array(info["window_start_voxel"])
    assert np.allclose(fitted.affine[:3, 3], resampled.affine[:3, :3] @ start + resampled.affine[:3, 3])
    padded = np.pad(resampled.array, 100)  # background all round, then the window
    expected = padded[tuple(slice(s + 100, s + 100 + n) for s, n in zip(start, (32, 32, 64)))]
    assert np.array_equal(fitted.array, expected)


def test_fit_pads_with_background_centred():
    fitted, info = S.fit_mask(_volume(), S.make_request(size=(64, 64, 48)))
    assert info["window_start_voxel"] == [-2, -7, -4]
    assert np.all(fitted.array[:2] == 0) and np.all(fitted.array[62:] == 0) and (fitted.array == LIVER).sum() == 20 * 30 * 25 - 64


def test_fit_refuses_a_window_smaller_than_the_requested_structures():
    with pytest.raises(ValueError, match="span 20 voxels along x, more than the requested size 16"):
        S.fit_mask(_volume(), S.make_request(anatomy="liver", size=(16, 32, 32)))


# -- the library index -------------------------------------------------------------------------

def test_regions_need_half_their_markers():
    assert covered_regions({"liver": 1500, "spleen": 200, "left kidney": 150}) == {
        "abdomen": ["liver", "spleen", "kidneys"]}
    assert covered_regions({"liver": 1500, "left lung lower lobe": 2.0}) == {}  # a sliver of lung is not a chest


def test_index_skips_bad_files_with_reasons_and_rereads_only_changes(tmp_path):
    volume_io.save_label_map(tmp_path / "good.nii.gz", _volume())
    (tmp_path / "corrupt.nii.gz").write_bytes(b"not a nifti")
    volume_io.save_label_map(tmp_path / "sub" / "foreign.nii.gz", volume_io.Volume(np.full((8, 8, 8), 250, np.int16), np.eye(4)))
    first = LIB.index_library(tmp_path)
    assert [e.file for e in first.entries] == ["good.nii.gz"] and first.read == 3
    reasons = {s["file"]: s["reason"] for s in first.skipped}
    assert "corrupt" in reasons["corrupt.nii.gz"] and "not MAISI ids" in reasons["sub/foreign.nii.gz"]
    entry = first.entries[0]
    assert entry.shape == (60, 50, 40) and entry.fov_mm == (120.0, 100.0, 80.0) and entry.tumors == ("hepatic tumor",)
    assert entry.volumes_ml["hepatic tumor"] == pytest.approx(4 * 4 * 4 * 8 / 1000)
    assert entry.boxes["liver"] == [5, 10, 5, 25, 40, 30]
    assert "; 2 skipped" in first.summary() and "skipped 1: cannot read" in first.summary()
    again = LIB.index_library(tmp_path)
    assert again.read == 0 and again.entries == first.entries
    volume_io.save_label_map(tmp_path / "new.nii.gz", _volume())
    os.utime(tmp_path / "good.nii.gz", ns=(1, 1))
    assert LIB.index_library(tmp_path).read == 2  # the new file and the touched one
    assert json.loads((tmp_path / "index.json").read_text())["version"] == LIB.INDEX_VERSION


def test_an_empty_or_corrupt_library_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="holds no usable MAISI label maps"):
        LIB.load_library(tmp_path)
    (tmp_path / "x.nii.gz").write_bytes(b"junk")
    with pytest.raises(ValueError, match="holds no usable MAISI label maps; skipped 1: cannot read"):
        LIB.load_library(tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        LIB.load_library(tmp_path / "missing")


# -- the bundled library -------------------------------------------------------------------------

def test_bundled_library_is_small_and_indexed():
    folder = LIB.default_library_dir()
    total = sum(p.stat().st_size for p in folder.iterdir())
    assert total < 2_000_000
    index = LIB.load_library()
    assert len(index.entries) >= 11 and not index.skipped
    fresh = LIB.index_library(folder, write=False, trust_sizes=False)  # read every file again
    assert sorted(fresh.entries, key=lambda e: e.file) == [
        LIB.MaskEntry(**{**e.__dict__, "mtime_ns": f.mtime_ns}) for e, f in
        zip(sorted(index.entries, key=lambda e: e.file), sorted(fresh.entries, key=lambda e: e.file))]


@pytest.mark.parametrize("region, anatomy", [
    ("head", "brain"), ("chest", "heart,lung tumor"), ("abdomen", "liver,hepatic tumor"), ("pelvis", "bladder"),
])
def test_bundled_library_selects_for_each_region(region, anatomy):
    request = S.make_request(region, anatomy, (96, 96, 64), (4.0, 4.0, 4.0))
    [chosen], best, _ = S.select_masks(LIB.load_library(), request, seed=0)
    assert region in chosen.entry.regions
    volume = volume_io.load_label_map(LIB.default_library_dir() / chosen.entry.file)
    fitted, _ = S.fit_mask(volume, request)
    present = {L.label_name(int(v)) for v in np.unique(fitted.array)}
    assert set(request.anatomy) - set(chosen.to_add) <= present
