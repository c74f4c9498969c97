"""The quality check: organ median HU inside the packaged real-data ranges."""

import json

import numpy as np
import pytest

from maisi2 import quality, volume_io
from maisi2.cli import main
from maisi2.labels import QC_ORGAN_GROUPS, label_id


def _volume_with(organ_hu: dict[str, float], shape=(24, 24, 24)):
    """A label map with one 6x6x6 cube per organ group and a CT whose cubes hold the given HU.

    Each cube also holds a few outliers, so only a median (not a mean) lands on the target value.
    """
    labels = np.full(shape, label_id("body"), dtype=np.int16)
    ct = np.zeros(shape, dtype=np.float32)
    for n, (organ, hu) in enumerate(organ_hu.items()):
        x, y = 6 * (n % 4), 6 * (n // 4) + 6
        cube = (slice(x, x + 6), slice(y, y + 6), slice(6, 12))
        labels[cube] = QC_ORGAN_GROUPS[organ][0]
        values = np.full((6, 6, 6), hu, dtype=np.float32)
        values[0, 0, :3] = 3000.0  # outliers that would drag a mean
        ct[cube] = values
    return ct, labels


def test_ranges_are_the_sigma_6_columns():
    ranges = quality.hu_ranges()
    assert set(ranges) == set(QC_ORGAN_GROUPS)
    assert ranges["liver"] == pytest.approx((-21.596463547885904, 156.27881534763367))
    assert ranges["lung"][1] < -500 and ranges["bone"][0] > 50


def test_plausible_volume_passes_and_absent_organs_are_not_failures():
    ct, labels = _volume_with({"liver": 60, "spleen": 50, "kidney": 150, "lung": -850, "bone": 300})
    report = quality.quality_check(ct, labels)
    assert report.passed, report.summary()
    status = {o.organ: o.status for o in report.organs}
    assert status["pancreas"] == status["brain"] == quality.NOT_PRESENT
    liver = next(o for o in report.organs if o.organ == "liver")
    assert liver.median_hu == pytest.approx(60.0) and liver.voxels == 216


def test_organ_outside_its_range_fails():
    ct, labels = _volume_with({"liver": 60, "lung": -100, "bone": 20})  # lung too dense, bone too soft
    report = quality.quality_check(ct, labels)
    assert not report.passed
    assert report.failed_organs() == ["lung", "bone"]
    data = report.to_dict()
    assert data["organs"]["lung"]["status"] == "fail" and data["organs"]["liver"]["status"] == "pass"
    assert data["passed"] is False and "sigma_6" in data["range_source"]


def test_range_edges_are_inclusive():
    low, high = quality.hu_ranges()["spleen"]
    assert quality.check_organ("spleen", low, 10, (low, high)).status == quality.PASS
    assert quality.check_organ("spleen", high + 0.01, 10, (low, high)).status == quality.FAIL


def test_kidney_group_pools_both_kidneys():
    labels = np.zeros((4, 4, 4), dtype=np.int16)
    ct = np.zeros((4, 4, 4), dtype=np.float32)
    labels[0], ct[0] = label_id("left kidney"), 100.0
    labels[1], ct[1] = label_id("right kidney"), 100.0
    labels[2, :2], ct[2, :2] = label_id("right kidney"), 900.0
    median, count = quality.organ_median_hu(ct, labels, QC_ORGAN_GROUPS["kidney"])
    assert count == 40 and median == 100.0


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="same|grid"):
        quality.quality_check(np.zeros((4, 4, 4)), np.zeros((4, 4, 5), dtype=np.int16))


def _write_pair(tmp_path, organ_hu):
    ct, labels = _volume_with(organ_hu)
    affine = volume_io.ras_affine((2.0, 2.0, 2.0))
    volume_io.save_ct(tmp_path / "ct.nii.gz", volume_io.Volume(ct, affine))
    volume_io.save_label_map(tmp_path / "mask.nii.gz", volume_io.Volume(labels, affine))
    return tmp_path / "ct.nii.gz", tmp_path / "mask.nii.gz"


def test_qc_command_exit_codes_and_report(tmp_path, capsys):
    ct, mask = _write_pair(tmp_path, {"liver": 60, "bone": 300})
    assert main(["qc", str(ct), "--mask", str(mask), "--out", str(tmp_path / "qc.json")]) == 0
    report = json.loads((tmp_path / "qc.json").read_text())
    assert report["passed"] and report["organs"]["brain"]["status"] == "not present"
    assert "PASSED" in capsys.readouterr().out

    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    ct, mask = _write_pair(bad_dir, {"liver": -400})
    assert main(["qc", str(ct), "--mask", str(mask)]) == 1
    assert "FAILED" in capsys.readouterr().out
    # an existing report is not replaced without --overwrite
    assert main(["qc", str(ct), "--mask", str(mask), "--out", str(tmp_path / "qc.json")]) == 1
    assert json.loads((tmp_path / "qc.json").read_text())["passed"] is True


def test_qc_command_refuses_masks_on_another_grid(tmp_path, capsys):
    ct, _ = _write_pair(tmp_path, {"liver": 60})
    labels = np.full((12, 12, 12), label_id("liver"), dtype=np.int16)
    volume_io.save_label_map(tmp_path / "other.nii.gz", volume_io.Volume(labels, volume_io.ras_affine((4.0, 4.0, 4.0))))
    assert main(["qc", str(ct), "--mask", str(tmp_path / "other.nii.gz")]) == 1
    assert "same voxel grid" in capsys.readouterr().err
