"""The paired comparison of experiments/downstream.py (issue #26, item 3): test cases paired across
conditions (Dice averaged over seeds per case), a case bootstrap, a signed-rank test, per-seed
differences; and the table that prints it."""

import numpy as np
import pytest

from downstream import conditions, paired, paired_table


def _row(name, per_case):
    per_case = np.asarray(per_case, float)  # (seeds, cases)
    return {"condition": name, "dice_per_case": per_case.tolist(), "dice_per_seed": per_case.mean(axis=1).tolist()}


def test_paired_differences_are_per_case_means_over_seeds_with_an_interval_and_a_signed_rank_p():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.1, 0.6, (5, 30))
    better = base + 0.1  # every case, every seed gains exactly 0.1
    same = base.copy()
    rows = [_row("real only", base), _row("real + synthetic (none)", same), _row("real + synthetic (paper)", better)]
    out = {r["pair"]: r for r in paired(rows, resamples=500)}
    assert list(out) == ["real + synthetic (none) minus real only", "real + synthetic (paper) minus real only",
                         "real + synthetic (paper) minus real + synthetic (none)"]
    gain = out["real + synthetic (paper) minus real only"]
    assert gain["mean"] == pytest.approx(0.1)
    assert gain["interval"] == pytest.approx((0.1, 0.1))
    assert gain["per_seed"] == pytest.approx([0.1] * 5)
    assert (gain["cases_better"], gain["cases_worse"], gain["cases"]) == (30, 0, 30)
    assert gain["wilcoxon_p"] < 1e-5
    assert gain["seed_interval"] == pytest.approx((0.1, 0.1))  # every seed gains the same
    nothing = out["real + synthetic (none) minus real only"]
    assert nothing["mean"] == 0.0 and nothing["wilcoxon_p"] == 1.0 and nothing["cases_better"] == 0


def test_pairing_is_by_case_so_a_per_case_shift_hidden_in_seed_noise_is_found():
    # Seeds differ by a lot (0.3), cases by the same small gain: unpaired by seed this would be noise.
    rng = np.random.default_rng(1)
    seed_offsets = np.array([0.0, 0.3, -0.2, 0.1, -0.1])[:, None]
    base = np.clip(rng.uniform(0.2, 0.5, (1, 40)) + seed_offsets, 0, 1)
    gain = base + rng.normal(0.02, 0.005, base.shape)
    got = paired([_row("a", base), _row("b", gain)], resamples=1000)[0]
    assert 0.015 < got["interval"][0] < got["mean"] < got["interval"][1] < 0.025
    assert got["wilcoxon_p"] < 1e-3
    assert got["seed_interval"][0] < got["mean"] < got["seed_interval"][1]


def test_the_paired_table_prints_each_pair_its_interval_p_and_seeds():
    rows = [_row("real only", [[0.2, 0.4], [0.3, 0.5]]), _row("real + synthetic (paper)", [[0.3, 0.4], [0.3, 0.7]])]
    text = paired_table({"paired": paired(rows, resamples=200)})
    line = text.splitlines()[2]
    assert line.startswith("| real + synthetic (paper) minus real only | +0.075 (")
    assert "| 2 / 0 of 2 | +0.050, +0.100 | -0.243 to +0.393 |" in line  # 0.075 +- 12.706 * 0.025


def test_conditions_name_one_controlnet_per_arm_and_seed(tmp_path):
    class Args:
        arms_from, arms, controlnets = tmp_path, ["none", "paper"], tmp_path / "unused"

    got = conditions(Args)
    assert [name for name, _ in got] == ["real only", "real + synthetic (none)", "real + synthetic (paper)"]
    assert got[0][1] is None
    assert got[2][1](3) == tmp_path / "paper_seed3" / "last.pt"
    Args.arms_from = None
    legacy = conditions(Args)
    assert [name for name, _ in legacy] == ["real only", "real + synthetic"]
    assert legacy[1][1](0) == legacy[1][1](4)  # one ControlNet for every seed
