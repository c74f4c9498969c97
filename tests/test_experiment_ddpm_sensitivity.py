"""experiments/ddpm_sensitivity.py: the closed-form optimal outputs really are optimal for the
project's samplers (exact outputs reproduce the data's scale), and the grid's path fractions."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import ddpm_sensitivity as exp  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("kind", ["ddpm-1000", "ddim-30"])
def test_optimal_outputs_reproduce_the_data_scale(monkeypatch, kind):
    monkeypatch.setattr(exp, "SHAPE", (64, 4, 4, 4, 4))  # 16k draws: the std's sampling error is ~0.6 %
    assert exp.sample_std(kind, 0.0) == pytest.approx(1.0, abs=0.08)
    assert exp.sample_std(kind, -0.05) > exp.sample_std(kind, 0.05)  # an under-predicted eps inflates the sample


def test_path_fraction_exact_is_one_and_monai_grid_overshoots():
    assert exp.path_fraction(100, (24, 24, 16), exact=True) == pytest.approx(1.0, abs=1e-12)
    assert exp.path_fraction(100, (24, 24, 16), exact=False) > 1.01
