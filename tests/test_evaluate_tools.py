"""Fidelity, diversity, QC rate, the tumour segmenter and the `maisi2 evaluate` commands."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from maisi2.cli import main
from maisi2.evaluate.diversity import diversity, ms_ssim, ms_ssim_settings
from maisi2.evaluate.fid import SetStats
from maisi2.evaluate.fidelity import fidelity, tumor_contrasts
from maisi2.evaluate.inputs import collect_pairs
from maisi2.evaluate.qcrate import qc_rate, qc_rate_files
from maisi2.evaluate.seg import (
    SegmenterConfig,
    SegmenterTrainSettings,
    dice_score,
    labels_to_classes,
    load_segmenter,
    segment,
    train_segmenter,
)
from maisi2.volume_io import Volume, ras_affine, save_ct, save_label_map
from maisi2.labels import label_id

LIVER, HEPATIC, SPLEEN = label_id("liver"), label_id("hepatic tumor"), label_id("spleen")
LUNG_LOBE, LUNG_TUMOR = label_id("right lung lower lobe"), label_id("lung tumor")


pytestmark = pytest.mark.usefixtures("one_thread")


def _ball(shape, centre, radius):
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2


def _liver_case(tumor_hu=120.0, liver_hu=60.0, shape=(24, 24, 24)):
    """A liver block holding one spherical hepatic tumour, a spleen touching it (HU 900), air elsewhere."""
    labels = np.zeros(shape, np.int16)
    labels[2:22, 2:22, 2:14] = LIVER
    labels[2:22, 2:22, 14:22] = SPLEEN
    tumor = _ball(shape, (12, 12, 11), 3)
    labels[tumor] = HEPATIC
    ct = np.full(shape, -1000.0, np.float32)
    ct[labels == LIVER] = liver_hu
    ct[labels == SPLEEN] = 900.0  # inside the shell radius of the tumour, but not its parent organ
    ct[tumor] = tumor_hu
    return ct, labels


# ---------------------------------------------------------------- fidelity


def test_contrast_is_tumor_minus_parent_shell_only():
    ct, labels = _liver_case(tumor_hu=130.0, liver_hu=60.0)
    (t,) = tumor_contrasts(ct, labels, spacing=(1.0, 1.0, 1.0), shell_mm=4.0)
    assert (t.tumor_name, t.parent_label, t.component) == ("hepatic tumor", LIVER, 1)
    assert t.tumor_median_hu == 130.0 and t.parent_median_hu == 60.0  # the 900 HU spleen is not in the shell
    assert t.contrast_hu == pytest.approx(70.0)
    assert 0 < t.shell_voxels < np.count_nonzero(labels == LIVER)


def test_fidelity_compares_with_the_real_contrast_and_counts_components():
    ct, labels = _liver_case(tumor_hu=100.0)
    labels[_ball(labels.shape, (5, 5, 5), 1)] = HEPATIC  # a second, separate tumour
    ct[_ball(labels.shape, (5, 5, 5), 1)] = 100.0
    real, _ = _liver_case(tumor_hu=160.0)
    real[_ball(labels.shape, (5, 5, 5), 1)] = 160.0
    result = fidelity(ct, labels, (1.0, 1.0, 1.0), real_hu=real)
    assert len(result.tumors) == 2
    for t in result.tumors:
        assert t.generated.contrast_hu == pytest.approx(40.0)
        assert t.real.contrast_hu == pytest.approx(100.0)
        assert t.contrast_error_hu == pytest.approx(-60.0)
    json.dumps(result.to_dict())  # the report is JSON-serialisable


def test_lung_tumor_parent_is_the_surrounding_lobe_and_coarse_spacing_keeps_a_shell():
    labels = np.full((12, 12, 12), LUNG_LOBE, np.int16)
    labels[5:7, 5:7, 5:7] = LUNG_TUMOR
    ct = np.where(labels == LUNG_TUMOR, 30.0, -850.0).astype(np.float32)
    (t,) = tumor_contrasts(ct, labels, spacing=(8.0, 8.0, 8.0), shell_mm=5.0)  # 5 mm < one voxel
    assert t.parent_label == LUNG_LOBE and t.shell_radius_mm == 8.0 and t.shell_voxels > 0
    assert t.contrast_hu == pytest.approx(880.0)


def test_fidelity_without_tumors_and_bad_shapes():
    ct, labels = _liver_case()
    labels[labels == HEPATIC] = LIVER
    assert fidelity(ct, labels).tumors == [] and "no tumour" in fidelity(ct, labels).notes[0]
    with pytest.raises(ValueError, match="one 3D grid"):
        tumor_contrasts(ct[:-1], labels)


class _Threshold(nn.Module):
    """A 'segmenter' marking voxels above 100 HU (0.55 in unit intensity) as tumour."""

    def forward(self, x):
        score = (x - 0.55) * 100
        return torch.cat([-score, score], dim=1)


def test_fidelity_with_a_segmenter_reports_dice_and_detection():
    ct, labels = _liver_case(tumor_hu=300.0)
    ct[labels == SPLEEN] = 0.0  # nothing else bright
    config = SegmenterConfig(channels=(4, 8), strides=(2,), patch=(16, 16, 16))
    result = fidelity(ct, labels, segmenter=(_Threshold(), config))
    assert result.dice == pytest.approx(1.0)
    assert result.tumors[0].detected_fraction == pytest.approx(1.0)


# ---------------------------------------------------------------- diversity


def test_ms_ssim_identical_is_one_and_different_is_less():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 300, (32, 32, 32)).astype(np.float32)
    assert ms_ssim(a, a) == pytest.approx(1.0, abs=1e-5)
    b = a + rng.normal(0, 300, a.shape).astype(np.float32)
    assert ms_ssim(a, b) < 0.9
    same = diversity([a, a.copy(), a.copy()])
    assert same.pairs == 3 and same.mean_ms_ssim == pytest.approx(1.0, abs=1e-5)
    assert diversity([a, b, a]).mean_ms_ssim < same.mean_ms_ssim


def test_ms_ssim_settings_fit_the_volume():
    assert ms_ssim_settings((176, 200, 180)).scales == 5 and ms_ssim_settings((175, 200, 200)).scales == 4
    small = ms_ssim_settings((64, 64, 48))
    assert (small.scales, small.kernel_size) == (3, 11) and sum(small.weights) == pytest.approx(1.0)
    tiny = ms_ssim_settings((16, 16, 16))
    assert tiny.kernel_size < 11 and 16 // 2 ** (tiny.scales - 1) >= tiny.kernel_size
    with pytest.raises(ValueError, match="too small"):
        ms_ssim_settings((5, 64, 64))


def test_diversity_errors():
    a = np.zeros((32, 32, 32), np.float32)
    with pytest.raises(ValueError, match="at least 2"):
        diversity([a])
    with pytest.raises(ValueError, match="different shapes"):
        diversity([a, a[:-1]])


# ---------------------------------------------------------------- QC rate


def _qc_volume(liver_hu):
    labels = np.zeros((8, 8, 8), np.int16)
    labels[2:6, 2:6, 2:6] = LIVER
    ct = np.where(labels == LIVER, liver_hu, -1000.0).astype(np.float32)
    return ct, labels


def test_qc_rate_counts_passes_and_failing_organs():
    result = qc_rate([_qc_volume(60.0), _qc_volume(60.0), _qc_volume(900.0), _qc_volume(-500.0)])
    assert (result.passed, result.total, result.rate) == (2, 4, 0.5)
    assert result.failures_by_organ == {"liver": 2}
    assert [v["passed"] for v in result.per_volume] == [True, True, False, False]
    with pytest.raises(ValueError, match="at least one"):
        qc_rate([])


def test_qc_rate_files_needs_masks(tmp_path):
    ct, labels = _qc_volume(60.0)
    save_ct(tmp_path / "a_ct.nii.gz", Volume(ct, ras_affine((2, 2, 2))))
    with pytest.raises(ValueError, match="no label map"):
        qc_rate_files(collect_pairs(tmp_path))
    save_label_map(tmp_path / "a_ct_label.nii.gz", Volume(labels, ras_affine((2, 2, 2))))
    assert qc_rate_files(collect_pairs(tmp_path)).rate == 1.0


# ---------------------------------------------------------------- segmenter


def _easy_case(seed, shape=(16, 16, 16)):
    rng = np.random.default_rng(seed)
    labels = np.full(shape, LIVER, np.int16)
    tumor = _ball(shape, rng.integers(5, 11, 3), 3)
    labels[tumor] = HEPATIC
    ct = (rng.normal(60, 20, shape) + 400 * tumor).astype(np.float32)
    return ct, labels


def test_segmenter_learns_an_easy_task_and_resumes(tmp_path):
    pairs = [_easy_case(i) for i in range(3)]
    config = SegmenterConfig(channels=(4, 8), strides=(2,), patch=(16, 16, 16))
    settings = SegmenterTrainSettings(steps=25, batch_size=2, lr=1e-2, ckpt_every=10)
    out = tmp_path / "seg.pt"
    result = train_segmenter(pairs, out, config, settings, progress=False)
    assert result.step == 25 and out.is_file()
    assert np.mean(result.losses[-5:]) < 0.7 * np.mean(result.losses[:5])
    model, loaded = load_segmenter(out)
    assert loaded == config
    ct, labels = _easy_case(7)
    pred = segment(model, ct, loaded)
    assert pred.shape == ct.shape and pred.dtype == np.uint8 and set(np.unique(pred)) <= {0, 1}
    # Resuming continues from step 25 with the stored losses.
    more = train_segmenter(pairs, out, config, SegmenterTrainSettings(steps=27, lr=1e-2), progress=False)
    assert more.step == 27 and len(more.losses) == 27 and more.losses[:25] == result.losses
    with pytest.raises(FileExistsError, match="resume"):
        train_segmenter(pairs, out, config, settings, resume=False, progress=False)
    with pytest.raises(ValueError, match="another network config"):
        train_segmenter(pairs, out, SegmenterConfig(channels=(4, 8), strides=(2,), patch=(8, 8, 8)), progress=False)


def test_segmenter_inputs_are_checked(tmp_path):
    ct, labels = _easy_case(0)
    with pytest.raises(ValueError, match="divisible by 4"):
        SegmenterConfig(patch=(30, 32, 32), channels=(4, 8, 16), strides=(2, 2))
    with pytest.raises(ValueError, match="nothing to learn"):
        train_segmenter([(ct, np.full_like(labels, LIVER))], tmp_path / "s.pt",
                        SegmenterConfig(channels=(4, 8), strides=(2,), patch=(16, 16, 16)), progress=False)
    with pytest.raises(ValueError, match="one 3D grid"):
        train_segmenter([(ct, labels[:-1])], tmp_path / "s.pt", progress=False)
    np.testing.assert_array_equal(labels_to_classes(np.array([0, LIVER, HEPATIC, LUNG_TUMOR]), [(HEPATIC,), (LUNG_TUMOR,)]),
                                  [0, 0, 1, 2])
    assert dice_score(np.array([1, 1, 0, 0]), np.array([1, 0, 1, 0])) == pytest.approx(0.5)
    assert dice_score(np.zeros(3), np.zeros(3)) == 1.0


# ---------------------------------------------------------------- CLI


def _write_case(folder, name, ct, labels, spacing=(2.0, 2.0, 2.0)):
    save_ct(folder / f"{name}.nii.gz", Volume(ct, ras_affine(spacing)))
    save_label_map(folder / f"{name}_label.nii.gz", Volume(labels, ras_affine(spacing)))


def test_cli_tools_write_reports(tmp_path, capsys, fid_round_off):
    gen = tmp_path / "gen"
    gen.mkdir()
    for i, hu in enumerate((100.0, 120.0)):
        _write_case(gen, f"case{i}_ct", *_liver_case(tumor_hu=hu, shape=(24, 24, 24)))
    assert main(["evaluate", "qc-rate", str(gen), "--out", str(tmp_path / "qc.json"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "qc.json").read_text())["total"] == 2
    assert main(["evaluate", "fidelity", str(gen), "--real", str(gen), "--out", str(tmp_path / "f.json"),
                 "--no-progress"]) == 0
    report = json.loads((tmp_path / "f.json").read_text())
    assert report["summary"]["tumors"] == 2 and report["summary"]["mean_abs_contrast_error_hu"] == 0.0
    assert main(["evaluate", "diversity", str(gen), "--no-progress"]) == 0
    assert main(["evaluate", "fid", "--real", str(gen), "--generated", f"{gen}/*_ct.nii.gz", "--spacing", "2", "2", "2",
                 "--shape", "24", "24", "24", "--out", str(tmp_path / "fid.json"), "--no-progress",
                 "--save-real-stats", str(tmp_path / "real.npz")]) == 0
    fid_report = json.loads((tmp_path / "fid.json").read_text())
    assert 0.0 <= fid_report["fid"] <= fid_round_off(SetStats.load(tmp_path / "real.npz"))
    assert fid_report["comparable_to_paper"] is False
    out = capsys.readouterr().out
    assert "QC rate: 0/2" in out and "spleen    failed in 2" in out  # the test spleen is 900 HU
    assert "NOT comparable" in out and "MS-SSIM" in out


def test_cli_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["evaluate", "qc-rate", str(tmp_path / "empty")]) == 1
    assert "holds no NIfTI volumes" in capsys.readouterr().err
    assert main(["evaluate", "fid", "--real", str(tmp_path / "empty"), "--generated", str(tmp_path / "empty"),
                 "--weights", str(tmp_path / "nope.pt")]) == 1
    assert "does not exist" in capsys.readouterr().err
