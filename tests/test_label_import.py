"""Label maps in the shapes users hold them: TotalSegmentator v1/v2 numbering and per-class folders,
other tools' maps with a class table, VISTA3D output; `maisi2 labels list`.

The real-map tests build each format from TotalSegmentator's own example output (v2, 41 classes):
renumbered to v1 where both versions have the class, split into one mask per class, described by
a class table, and as VISTA3D would write it (MAISI ids). Each import must give the MAISI map
that importing the original v2 file gives.
"""

import json

import numpy as np
import pytest

from maisi2 import cli, volume_io
from maisi2.label_import import (
    convert_totalseg,
    import_totalseg,
    import_vista3d,
    import_with_classes,
    read_class_table,
)
from maisi2.label_tables import label_table
from maisi2.labels import BODY, ID_TO_NAME, LABELS, label_id, load_resource_json
from maisi2.totalseg import CLASS_MAPS, detect_version

V1 = {name: idx for idx, name in CLASS_MAPS["v1"].items()}
V2 = {name: idx for idx, name in CLASS_MAPS["v2"].items()}


@pytest.fixture
def example(shared_data):
    folder = shared_data / "totalsegmentator"
    seg, ct = folder / "example_seg.nii.gz", folder / "example_ct_sm.nii.gz"
    if not (seg.exists() and ct.exists()):
        pytest.skip(f"TotalSegmentator example files absent from {folder}")
    return seg, ct


@pytest.fixture
def reference(example, tmp_path):
    """The MAISI map from the v2 file as TotalSegmentator wrote it, and the v2 volume."""
    seg_path, ct_path = example
    import_totalseg(seg_path, tmp_path / "reference.nii.gz", ct_path=ct_path)
    return volume_io.load_label_map(tmp_path / "reference.nii.gz").array, volume_io.load_label_map(seg_path, check_ids=False)


def _renumbered(v2: np.ndarray, target: dict[str, int]) -> np.ndarray:
    """A v2 map in another numbering, classes named the same (others dropped to 0)."""
    lut = np.zeros(max(CLASS_MAPS["v2"]) + 1, dtype=np.int16)
    for name, idx in V2.items():
        lut[idx] = target.get(name, 0)
    return lut[v2]


# -- v1 and v2 numbering ------------------------------------------------------------------------

def test_v1_numbering_is_detected_and_converts_like_v2(example, reference, tmp_path):
    seg_path, ct_path = example
    expected, v2 = reference
    v1 = _renumbered(v2.array, V1)
    dropped = [n for n in (CLASS_MAPS["v2"][i] for i in np.unique(v2.array) if i) if n not in V1]
    assert dropped == ["spinal_cord", "costal_cartilages"]  # v1 has no such classes
    assert detect_version(v1)[0] == "v1"
    volume_io.save_label_map(tmp_path / "v1.nii.gz", v2.with_array(v1), tables=False)
    report = import_totalseg(tmp_path / "v1.nii.gz", tmp_path / "out.nii.gz", ct_path=ct_path)
    assert "v1 'total' numbering (anatomy" in report.numbering
    out = volume_io.load_label_map(tmp_path / "out.nii.gz").array
    kept = v1 > 0
    assert np.array_equal(out[kept], expected[kept])
    assert set(report.mapped.values()) == {ID_TO_NAME[i] for i in np.unique(expected[kept])}


def test_v2_below_104_is_told_from_v1_by_anatomy(reference):
    _, v2 = reference
    low = np.where(v2.array > 104, 0, v2.array)  # no id above v1's range left
    version, why = detect_version(low)
    assert version == "v2" and "anatomy" in why
    # Read the wrong way round, only about half the sided classes lie on their named side.
    assert "v1: " in why


def test_undecidable_numbering_asks_for_version():
    seg = np.zeros((20, 20, 4), dtype=np.int16)
    seg[5:10, 5:10] = 5  # liver in v1 and v2, and no sided class to tell them apart
    with pytest.raises(ValueError, match="pass --version v1 or --version v2"):
        convert_totalseg(seg)
    out, report = convert_totalseg(seg, version="v1")
    assert np.all(out[seg == 5] == label_id("liver")) and "as given" in report.numbering


def test_v1_asked_for_a_v2_map_is_refused():
    seg = np.zeros((6, 6, 2), dtype=np.int16)
    seg[1, 1] = 116  # sternum, v2 only
    with pytest.raises(ValueError, match="it is in v2 numbering"):
        convert_totalseg(seg, version="v1")


# -- one mask per class -------------------------------------------------------------------------

def _split_into_folder(v2: volume_io.Volume, folder, extra_name=None):
    folder.mkdir()  # masks in the example's stored orientation, as TotalSegmentator writes them
    for idx in np.unique(v2.array):
        if idx:
            volume_io.save_label_map(folder / f"{CLASS_MAPS['v2'][int(idx)]}.nii.gz",
                              v2.with_array((v2.array == idx).astype(np.int16)), tables=False)
    if extra_name:
        extra = np.zeros(v2.shape, np.int16)
        extra[:3, :3, :3] = 1  # a class of another task, not overlapping the others
        volume_io.save_label_map(folder / f"{extra_name}.nii.gz", v2.with_array(extra), tables=False)


def test_per_class_folder_converts_like_the_multilabel_file(example, reference, tmp_path):
    _, ct_path = example
    expected, v2 = reference
    _split_into_folder(v2, tmp_path / "segmentations")
    report = import_totalseg(tmp_path / "segmentations", tmp_path / "out.nii.gz", ct_path=ct_path)
    assert np.array_equal(volume_io.load_label_map(tmp_path / "out.nii.gz").array, expected)
    assert "per-class folder (41 masks" in report.numbering and len(report.mapped) == 41


def test_unknown_class_file_is_listed_not_guessed(reference, tmp_path):
    _, v2 = reference
    _split_into_folder(v2, tmp_path / "segmentations", extra_name="lung_vessels")
    with pytest.raises(ValueError, match=r"no MAISI label: id \d+ 'lung_vessels'") as err:
        import_totalseg(tmp_path / "segmentations", tmp_path / "out.nii.gz")
    assert "labels list" in str(err.value)
    assert not (tmp_path / "out.nii.gz").exists()


def test_per_class_folder_on_two_grids_is_refused(tmp_path):
    folder = tmp_path / "seg"
    folder.mkdir()
    volume_io.save_label_map(folder / "liver.nii.gz", volume_io.Volume(np.ones((4, 4, 3), np.int16), np.eye(4)), tables=False)
    volume_io.save_label_map(folder / "spleen.nii.gz", volume_io.Volume(np.ones((4, 4, 4), np.int16), np.eye(4)), tables=False)
    with pytest.raises(ValueError, match="is not on the grid of liver.nii.gz"):
        import_totalseg(folder, tmp_path / "out.nii.gz")


# -- class tables ---------------------------------------------------------------------------------

def _write_table(path, classes: dict[str, int]):
    if path.suffix == ".json":
        path.write_text(json.dumps(classes))
    else:
        path.write_text("name,id\n" + "".join(f"{n},{i}\n" for n, i in classes.items()))
    return path


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_class_table_in_either_spelling_converts_like_totalseg(example, reference, tmp_path, suffix):
    seg_path, ct_path = example
    expected, v2 = reference
    present = [int(i) for i in np.unique(v2.array) if i]
    # Another tool's numbering (ids 1..41), half its names in MAISI's spelling, half in TotalSegmentator's.
    names = {}
    for new_id, old in enumerate(present, start=1):
        ts_name = CLASS_MAPS["v2"][old]
        names[ts_name if new_id % 2 else ID_TO_NAME[int(expected[v2.array == old][0])].upper()] = new_id
    renumbered = np.zeros_like(v2.array)
    for new_id, old in enumerate(present, start=1):
        renumbered[v2.array == old] = new_id
    volume_io.save_label_map(tmp_path / "other.nii.gz", v2.with_array(renumbered), tables=False)
    table = _write_table(tmp_path / f"classes{suffix}", names)
    assert read_class_table(table) == {i: n for n, i in names.items()}
    report = import_with_classes(tmp_path / "other.nii.gz", table, tmp_path / "out.nii.gz", ct_path=ct_path)
    assert np.array_equal(volume_io.load_label_map(tmp_path / "out.nii.gz").array, expected)
    assert report.numbering == f"class table classes{suffix}"


def test_class_table_unknown_names_and_ids_are_listed(tmp_path):
    seg = np.zeros((8, 8, 3), dtype=np.int16)
    seg[1:3, 1:3] = 1
    seg[4:6, 4:6] = 2
    seg[6, 6] = 3
    volume_io.save_label_map(tmp_path / "seg.nii.gz", volume_io.Volume(seg, np.eye(4)), tables=False)
    table = _write_table(tmp_path / "t.csv", {"liver": 1, "left kidny": 2, "tumour blob": 3})
    with pytest.raises(ValueError) as err:
        import_with_classes(tmp_path / "seg.nii.gz", table, tmp_path / "out.nii.gz")
    message = str(err.value)
    assert "id 2 'left kidny' (closest MAISI names: 'left kidney'" in message
    assert "id 3 'tumour blob'" in message and "liver" not in message.split("no MAISI label:")[1]
    # 'body' sends a class without a MAISI label to the body on purpose; a missing id is named.
    _write_table(table, {"liver": 1, "left kidney": 2, "body": 3})
    import_with_classes(tmp_path / "seg.nii.gz", table, tmp_path / "out.nii.gz")
    out = volume_io.load_label_map(tmp_path / "out.nii.gz").array
    assert out[6, 6, 0] == BODY and out[1, 1, 0] == label_id("liver")
    _write_table(table, {"liver": 1, "left kidney": 2})
    with pytest.raises(ValueError, match=r"does not name: 3 \(3 voxels\)"):
        import_with_classes(tmp_path / "seg.nii.gz", table, tmp_path / "out2.nii.gz")


@pytest.mark.parametrize("text, problem", [
    ("liver,1\nspleen,1\n", "id 1 is given twice"),
    ("liver,one\n", "is not an integer"),
    ("liver\n", "must be 'name,id'"),
])
def test_bad_class_tables_are_explained(tmp_path, text, problem):
    (tmp_path / "t.csv").write_text(text)
    with pytest.raises(ValueError, match=problem):
        read_class_table(tmp_path / "t.csv")


# -- VISTA3D ----------------------------------------------------------------------------------

def test_vista3d_ids_are_kept_and_checked(example, reference, tmp_path):
    _, ct_path = example
    expected, v2 = reference
    vista = np.where(expected == BODY, 0, expected)  # VISTA3D writes organs, no body envelope
    volume_io.save_label_map(tmp_path / "vista.nii.gz", v2.with_array(vista), tables=False)
    report = import_vista3d(tmp_path / "vista.nii.gz", tmp_path / "out.nii.gz", ct_path=ct_path)
    assert np.array_equal(volume_io.load_label_map(tmp_path / "out.nii.gz").array, expected)
    assert "MAISI label ids" in report.numbering and all(k == v for k, v in report.mapped.items())
    dummy = next(int(v) for k, v in load_resource_json("label_dict.json").items() if k.startswith("dummy"))
    for foreign in (dummy, 133):
        vista[0, 0, 0] = foreign
        volume_io.save_label_map(tmp_path / "bad.nii.gz", v2.with_array(vista), overwrite=True, tables=False)
        with pytest.raises(ValueError, match=f"not in the MAISI label dictionary, which VISTA3D uses: {foreign}"):
            import_vista3d(tmp_path / "bad.nii.gz", tmp_path / "out3.nii.gz")


# -- CLI --------------------------------------------------------------------------------------

def _cli(monkeypatch, argv):
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["maisi2.cli.labels_cmd"])
    return cli.main([str(a) for a in argv])


def test_cli_import_commands(example, reference, tmp_path, monkeypatch, capsys):
    seg_path, ct_path = example
    expected, v2 = reference
    volume_io.save_label_map(tmp_path / "v1.nii.gz", v2.with_array(_renumbered(v2.array, V1)), tables=False)
    assert _cli(monkeypatch, ["labels", "import-totalseg", tmp_path / "v1.nii.gz", "--version", "v1",
                              "--out", tmp_path / "a.nii.gz"]) == 0
    assert "v1 'total' numbering (as given)" in capsys.readouterr().out
    assert _cli(monkeypatch, ["labels", "import-vista3d", tmp_path / "a.nii.gz", "--out", tmp_path / "b.nii.gz"]) == 0
    assert "b.ctbl" in capsys.readouterr().out
    table = _write_table(tmp_path / "t.json", {"liver": 5})
    assert _cli(monkeypatch, ["labels", "import", seg_path, "--classes", table, "--out", tmp_path / "c.nii.gz"]) == 1
    assert "does not name" in capsys.readouterr().err
    assert not (tmp_path / "c.nii.gz").exists()


def test_labels_list(monkeypatch, capsys):
    assert _cli(monkeypatch, ["labels", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 + len(LABELS)  # a header, then every MAISI label (body included)
    hepatic = next(line for line in lines if "hepatic tumor" in line).split()
    assert hepatic[0] == str(label_id("hepatic tumor")) and hepatic[-1] == "liver"
    assert _cli(monkeypatch, ["labels", "list", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == label_table() and {r["name"] for r in rows} == set(LABELS)


def test_real_dicom_ct_gives_the_envelope(shared_data, tmp_path):
    """TotalSegmentator's 512 x 512 x 20 example: its label map (NIfTI) with the CT as a DICOM series."""
    folder = shared_data / "totalsegmentator"
    seg, dicom = folder / "example_seg_dicom.nii.gz", folder / "example_ct_dicom"
    if not (seg.exists() and dicom.is_dir()):
        pytest.skip(f"TotalSegmentator DICOM example absent from {folder}")
    report = import_totalseg(seg, tmp_path / "out.nii.gz", ct_path=dicom)
    out = volume_io.load_label_map(tmp_path / "out.nii.gz").array
    v2 = volume_io.load_label_map(seg, check_ids=False).array
    assert np.array_equal(out == label_id("liver"), v2 == V2["liver"])
    assert len(report.mapped) == 31 and report.body_from == "ct"
    ct = volume_io.load_ct(dicom).array
    assert np.median(ct[out == BODY]) > -200 and np.mean(out[ct < -900] > 0) < 0.2
