"""The measures of experiments/flow_quality.py (issue #3): tissue shares and the continued loss curve."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from flow_quality import loss_curve, tissue_shares, total_variation  # noqa: E402


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
