"""TotalSegmentator import (v2 multi-label file): name mapping, body envelope, file conversion and CLI.

Other formats (v1 numbering, per-class folders, class tables, VISTA3D): test_label_import.py."""

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from maisi2 import cli, envelope, volume_io
from maisi2.envelope import body_envelope_from_ct, body_envelope_from_labels
from maisi2.label_import import convert_totalseg, import_totalseg, resolve_class_name
from maisi2.labels import BODY, LABELS, check_label_ids, label_id
from maisi2.totalseg import CLASS_MAPS, NO_COUNTERPART, TOTALSEG_CLASSES, maisi_name

TS = {name: idx for idx, name in TOTALSEG_CLASSES.items()}


# -- mapping ------------------------------------------------------------------------------

@pytest.mark.parametrize("ts_name, maisi", [
    ("kidney_right", "right kidney"),
    ("lung_upper_lobe_left", "left lung upper lobe"),
    ("lung_middle_lobe_right", "right lung middle lobe"),
    ("vertebrae_L5", "vertebrae L5"),
    ("rib_left_1", "left rib 1"),
    ("rib_right_12", "right rib 12"),
    ("urinary_bladder", "bladder"),
    ("gluteus_maximus_left", "left gluteus maximus"),
    ("kidney_cyst_left", "left kidney cyst"),
    ("atrial_appendage_left", "left atrial appendage"),
    ("iliac_vena_left", "left iliac vena"),
    ("adrenal_gland_right", "right adrenal gland"),
    ("portal_vein_and_splenic_vein", "portal vein and splenic vein"),
    ("liver", "liver"),
])
def test_names_follow_the_maisi_spelling(ts_name, maisi):
    assert maisi_name(ts_name) == maisi
    assert resolve_class_name(ts_name) == label_id(maisi)


@pytest.mark.parametrize("version, count", [("v1", 104), ("v2", 117)])
def test_every_class_maps_or_is_declared_without_counterpart(version, count):
    table = {i: resolve_class_name(name) for i, name in CLASS_MAPS[version].items()}
    assert sorted(table) == list(range(1, count + 1))
    for ts_id, maisi_id in table.items():
        name = CLASS_MAPS[version][ts_id]
        if maisi_id is None:
            assert name in NO_COUNTERPART, f"{name} maps to nothing and is not declared in NO_COUNTERPART"
        else:
            assert name not in NO_COUNTERPART
            assert LABELS[maisi_name(name)] == maisi_id
    # Distinct classes stay distinct (a many-to-one map would silently merge organs), except v1's
    # five heart parts, which MAISI labels as one heart.
    mapped = [v for i, v in table.items() if v is not None and not CLASS_MAPS[version][i].startswith("heart_")]
    assert len(mapped) == len(set(mapped))
    assert BODY not in mapped
    if version == "v1":
        assert {n for n in CLASS_MAPS["v1"].values() if resolve_class_name(n) is None} == {"pulmonary_artery", "face"}
        assert {resolve_class_name(n) for n in CLASS_MAPS["v1"].values() if n.startswith("heart_")} == {label_id("heart")}


def test_packaged_class_map_matches_the_shared_copy(shared_data):
    shared = json.loads((shared_data / "totalsegmentator" / "class_map_total.json").read_text())
    assert {int(k): v for k, v in shared["total"].items()} == TOTALSEG_CLASSES


# -- synthetic volumes (no shared data needed) -----------------------------------------------

def _synthetic_scan():
    """A 40 x 40 x 6 'patient': body disc at 0 HU in air, lung (air) and liver inside, table below."""
    x, y = np.meshgrid(np.arange(40), np.arange(40), indexing="ij")
    disc = (x - 20) ** 2 + (y - 22) ** 2 < 15**2
    ct = np.full((40, 40, 6), -1000.0, dtype=np.float32)
    ct[disc] = 20.0
    lung = ((x - 14) ** 2 + (y - 22) ** 2 < 4**2)
    ct[lung] = -850.0
    ct[:, 3, :] = 100.0  # a one-voxel-thick table top, not part of the body
    ct[20, 3:8, :] = 100.0  # touching the body through a thin bridge
    seg = np.zeros(ct.shape, dtype=np.uint8)
    liver = (x - 26) ** 2 + (y - 22) ** 2 < 4**2
    seg[liver] = TS["liver"]
    seg[lung] = TS["lung_upper_lobe_right"]
    seg[(x - 20) ** 2 + (y - 30) ** 2 < 2**2] = TS["urinary_bladder"]
    return ct, seg, disc, lung


def test_synthetic_conversion_with_ct():
    ct, seg, disc, lung = _synthetic_scan()
    out, report = convert_totalseg(seg, ct, spacing=(2.0, 2.0, 2.0), version="v2")
    check_label_ids(out)
    assert out.dtype == np.int16
    assert np.all(out[seg == TS["liver"]] == label_id("liver"))
    assert np.all(out[seg == TS["urinary_bladder"]] == label_id("bladder"))
    unlabelled_body = np.broadcast_to(disc[..., None], ct.shape) & (seg == 0)
    assert np.all(out[unlabelled_body] == BODY)
    assert not np.any(out[:, :3, :]), "air below the table must stay background"
    assert np.count_nonzero(out[:, 3, :] == BODY) < 10, "the table must not join the body"
    assert report.present == {"liver": int((seg == TS["liver"]).sum()),
                              "lung_upper_lobe_right": int((seg == TS["lung_upper_lobe_right"]).sum()),
                              "urinary_bladder": int((seg == TS["urinary_bladder"]).sum())}
    assert report.mapped["urinary_bladder"] == "bladder" and report.no_counterpart == {}
    assert report.body_from == "ct" and report.body_voxels == int((out == BODY).sum())


def test_ct_envelope_keeps_unlabelled_lung_air_inside():
    ct, _, disc, lung = _synthetic_scan()
    body = body_envelope_from_ct(ct, spacing=(2.0, 2.0, 2.0))
    assert body[lung].all(), "air enclosed by the body (lung, bowel gas) is inside the body"
    assert body[disc].all() and not body[0, 0, 0]


def test_label_envelope_bridges_gaps_between_organs():
    labels = np.zeros((30, 30, 4), dtype=np.int16)
    labels[8:13, 10:20] = 1
    labels[16:21, 10:20] = 2  # a 3-voxel gap of unlabelled tissue between two organs
    body = body_envelope_from_labels(labels, spacing=(1.0, 1.0, 1.0), closing_mm=3.0)
    assert body[13:16, 12:18].all()
    assert not body[0:5].any() and not body[25:].any()
    assert body[labels > 0].all()


def test_classes_without_counterpart_become_body():
    v1 = {name: idx for idx, name in CLASS_MAPS["v1"].items()}
    seg = np.zeros((10, 10, 3), dtype=np.uint8)
    seg[2:5, 2:5] = v1["face"]
    seg[6:8, 6:8] = v1["liver"]
    out, report = convert_totalseg(seg, None, version="v1")
    assert np.all(out[seg == v1["face"]] == BODY)
    assert np.all(out[seg == v1["liver"]] == label_id("liver"))
    assert report.no_counterpart == {"face": 27}
    assert "face (27 voxels)" in report.summary()


def test_bad_inputs_are_explained():
    ct = np.full((8, 8, 3), -1000.0, dtype=np.float32)
    with pytest.raises(ValueError, match="was the CT passed"):
        convert_totalseg(ct, None)
    with pytest.raises(ValueError, match="outside the TotalSegmentator"):
        convert_totalseg(np.full((4, 4, 2), 118, dtype=np.int16), None)
    with pytest.raises(ValueError, match="differs from label map shape"):
        convert_totalseg(np.zeros((4, 4, 2), dtype=np.int16), np.zeros((4, 4, 3)), version="v2")


# -- the real TotalSegmentator example --------------------------------------------------

@pytest.fixture
def example(shared_data):
    folder = shared_data / "totalsegmentator"
    seg, ct = folder / "example_seg.nii.gz", folder / "example_ct_sm.nii.gz"
    if not (seg.exists() and ct.exists()):
        pytest.skip(f"TotalSegmentator example files absent from {folder}")
    return seg, ct


@pytest.mark.parametrize("with_ct", [True, False], ids=["ct-envelope", "label-envelope"])
def test_real_example_converts(example, tmp_path, with_ct):
    seg_path, ct_path = example
    out_path = tmp_path / "maisi.nii.gz"
    report = import_totalseg(seg_path, out_path, ct_path=ct_path if with_ct else None)
    out = volume_io.load_label_map(out_path).array  # check_ids=True: only MAISI ids
    seg = volume_io.load_label_map(seg_path, check_ids=False).array
    ct = volume_io.load_ct(ct_path).array
    for ts_name, maisi in [("liver", "liver"), ("spleen", "spleen"),
                           ("kidney_left", "left kidney"), ("kidney_right", "right kidney")]:
        assert np.array_equal(out == label_id(maisi), seg == TS[ts_name]), ts_name
    body = out > 0
    # The envelope covers every organ and the voxels between them ...
    organs = np.isin(seg, [TS["liver"], TS["spleen"], TS["kidney_left"], TS["kidney_right"]])
    assert body[organs].all()
    # ... and leaves out the air around the patient.
    assert np.mean(body[_outside_air(ct)]) < 0.01
    assert np.median(ct[out == BODY]) > -200, "the body label holds soft tissue, not air"
    assert len(report.present) == 41 and len(report.mapped) == 41
    assert report.body_from == ("ct" if with_ct else "labels")
    if with_ct:
        # The CT envelope includes fat and the body wall: nearly all tissue above -500 HU.
        tissue = ct > -500
        assert np.mean(body[tissue]) > 0.95


def _outside_air(ct):
    """Air (< -500 HU) connected, within its axial slice, to the slice border: around the patient."""
    outside = np.zeros(ct.shape, dtype=bool)
    for k in range(ct.shape[2]):
        parts, _ = ndimage.label(ct[:, :, k] < -500)
        border = np.unique(np.concatenate([parts[0], parts[-1], parts[:, 0], parts[:, -1]]))
        outside[:, :, k] = np.isin(parts, border[border > 0])
    assert outside.mean() > 0.2  # the example has plenty of air around the patient
    return outside


def test_label_envelope_is_smaller_than_ct_envelope(example, tmp_path):
    seg_path, ct_path = example
    from_ct = import_totalseg(seg_path, tmp_path / "a.nii.gz", ct_path=ct_path)
    from_labels = import_totalseg(seg_path, tmp_path / "b.nii.gz")
    assert 0 < from_labels.body_voxels < from_ct.body_voxels


def test_ct_on_another_grid_is_refused(example, tmp_path):
    seg_path, ct_path = example
    ct = volume_io.load_ct(ct_path)
    other = tmp_path / "ct_cropped.nii.gz"
    volume_io.save_ct(other, volume_io.Volume(ct.array[:, :, :20], ct.affine))
    with pytest.raises(ValueError, match="is not on the grid of label map"):
        import_totalseg(seg_path, tmp_path / "out.nii.gz", ct_path=other)
    assert not (tmp_path / "out.nii.gz").exists()


def _cli(monkeypatch, argv):
    # Only this command group: the test must not depend on other groups' modules.
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["maisi2.cli.labels_cmd"])
    return cli.main(argv)


def test_cli_writes_prints_and_refuses_to_overwrite(example, tmp_path, monkeypatch, capsys):
    seg_path, ct_path = example
    out_path = tmp_path / "maisi.nii.gz"
    argv = ["labels", "import-totalseg", str(seg_path), "--ct", str(ct_path), "--out", str(out_path)]
    assert _cli(monkeypatch, argv) == 0
    printed = capsys.readouterr().out
    assert "classes present: 41" in printed and str(out_path) in printed
    assert "v2 'total' numbering (ids up to 117" in printed
    stamp = out_path.stat().st_mtime_ns
    assert _cli(monkeypatch, argv) == 1
    assert "already exists" in capsys.readouterr().err
    assert out_path.stat().st_mtime_ns == stamp
    assert _cli(monkeypatch, argv + ["--overwrite"]) == 0
    saved = nib.load(out_path)
    assert np.allclose(saved.affine, nib.load(seg_path).affine)


def test_fast_hole_filling_equals_scipy():
    rng = np.random.default_rng(0)
    for shape in [(30, 25), (12, 14, 9)]:
        mask = rng.random(shape) < 0.55
        assert np.array_equal(envelope._enclosed_filled(mask), ndimage.binary_fill_holes(mask))
