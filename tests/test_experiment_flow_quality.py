"""The measures of experiments/flow_quality.py (issue #3): tissue shares, the continued loss curve, and the
slices figure it (and experiments/steps.py) draw with experiments/common.py."""

import numpy as np
import pytest

from flow_quality import loss_curve, tissue_shares, total_variation


def test_tissue_shares_count_each_band_once_and_the_rest_as_other():
    # 10 voxels: 2 air, 1 lung, 1 in the gap between lung and fat, 2 fat, 3 soft tissue, 1 bone
    hu = np.array([-1000, -950, -700, -300, -100, -50, 0, 40, 100, 400], np.float32).reshape(1, 10, 1, 1)
    shares = tissue_shares(hu)
    assert shares == pytest.approx({"air": 0.2, "lung": 0.1, "fat": 0.2, "soft tissue": 0.3, "bone": 0.1,
                                    "other": 0.1})
    assert total_variation(shares, shares) == 0.0
    everything_air = tissue_shares(np.full((1, 10, 1, 1), -1000.0))
    assert total_variation(shares, everything_air) == pytest.approx(0.8)


def test_loss_curve_puts_a_continuation_after_the_run_it_continues(tmp_path):
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    first.write_text("step,lr,loss,skipped,seconds\n" + "".join(f"{s},0,{1 - s / 100},0,0\n" for s in (10, 20, 30)))
    second.write_text("step,lr,loss,skipped,seconds\n" + "".join(f"{s},0,0.5,0,0\n" for s in (10, 20)))
    out = tmp_path / "loss.png"
    summary = loss_curve([first, second], out, smooth=2)
    assert summary["run_starts"] == [0, 30]
    assert summary["last_step"] == 50
    assert summary["final_mean_loss"] == pytest.approx(0.5)
    assert out.is_file()


def test_slices_figure_lays_out_axial_and_coronal_slices_in_the_hu_window(tmp_path):
    from PIL import Image

    from common import slices_figure

    # A volume whose mid-axial slice (z = 4) is soft tissue (50 HU) and whose mid-coronal slice
    # (y = 5) is, away from z = 4, bone (500 HU: above the window, white).
    volume = np.full((10, 10, 8), -1000.0, np.float32)
    volume[:, 5, :] = 500.0
    volume[:, :, 4] = 50.0
    size, label = 32, 190
    out = tmp_path / "grid.png"
    slices_figure([("row a", volume[None]), ("row b", np.stack([volume, volume]))], out, count=2, size=size,
                  coronal=True)
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 * (size + 4), label + 4 * (size + 4))
    axial = grid[:size, label:label + size]
    assert axial[size // 4, size // 4] == int(250 / 500 * 255)  # 50 HU, window -200..300
    coronal = grid[:size, label + size + 4:label + 2 * size + 4]
    assert coronal[2, 2] == 255
    assert (grid[:size, label + 2 * (size + 4):] == 0).all()  # row a has one volume: the rest stays black
    assert (grid[size + 4:2 * size + 4, label + 2 * (size + 4):label + 3 * size + 8] > 0).all()  # row b: its second one

    axial_only = tmp_path / "axial.png"
    slices_figure([("a", volume[None])], axial_only, count=4, size=size)
    assert np.asarray(Image.open(axial_only)).shape == (size + 4, label + 4 * (size + 4))
