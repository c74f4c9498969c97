"""experiments/ddpm_sensitivity.py: the closed-form optimal outputs really are optimal for the
project's samplers (exact outputs reproduce the data's scale), and the grid's path fractions."""

import pytest

import ddpm_sensitivity as exp  # experiments/ddpm_sensitivity.py: conftest puts experiments/ on the path

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("kind", ["ddpm-1000", "ddim-30"])
def test_optimal_outputs_reproduce_the_data_scale(monkeypatch, kind):
    monkeypatch.setattr(exp, "SHAPE", (64, 4, 4, 4, 4))  # 16k draws: the std's sampling error is ~0.6 %
    assert exp.sample_std(kind, 0.0) == pytest.approx(1.0, abs=0.08)
    assert exp.sample_std(kind, -0.05) > exp.sample_std(kind, 0.05)  # an under-predicted eps inflates the sample


def test_path_fraction_exact_is_one_and_monai_grid_overshoots():
    assert exp.path_fraction(100, (24, 24, 16), exact=True) == pytest.approx(1.0, abs=1e-12)
    assert exp.path_fraction(100, (24, 24, 16), exact=False) > 1.01


def test_x0_from_eps_inverts_the_noising():
    import torch
    from maisi2 import ddpm

    x0, noise, t = torch.randn(3, 2, 4, 4, 4), torch.randn(3, 2, 4, 4, 4), torch.tensor([0, 500, 999])
    x_t = ddpm.ddpm_add_noise(x0, noise, t)
    # float32 x_t carries ~1e-7 relative error; /sqrt(a_999) = /0.0119 amplifies it ~84x
    assert torch.allclose(ddpm.predicted_x0_from_eps(x_t, noise, t), x0, atol=1e-4)


def test_x0_error_table_for_both_objectives(tmp_path, capsys):
    """A tiny rflow and ddpm checkpoint of one stage-1 step each: finite errors per t, one row each."""
    import json
    import x0_error
    from maisi2.config import get_config
    from maisi2.train_flow import train_stage
    from test_train_flow import SMALL, make_cache, recipe

    cache = make_cache(tmp_path / "cache", shapes=[SMALL] * 2)
    paths = {}
    for objective in ("rflow", "ddpm"):
        r = recipe("stage1.steps=1", "stage1.batch_size=2", f"objective={objective}")
        paths[objective] = train_stage(1, cache, tmp_path / objective, get_config("tiny"), r, device="cpu",
                                       progress=False).checkpoint
    out = tmp_path / "x0.json"
    x0_error.main([str(cache), "--checkpoint", f"rf={paths['rflow']}", "--checkpoint", f"dd={paths['ddpm']}",
                   "--t", "50", "950", "--max-latents", "2", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["objective"] for r in rows] == ["rflow", "ddpm"]
    assert all(len(r["relative_x0_error"]) == 2 and all(e == e and e >= 0 for e in r["relative_x0_error"]) for r in rows)
    assert "| rf | rflow | 1 |" in capsys.readouterr().out
    # --match-noise moves only the flow checkpoint: to the time of DDPM's signal-to-noise ratio
    x0_error.main([str(cache), "--checkpoint", f"rf={paths['rflow']}", "--checkpoint", f"dd={paths['ddpm']}",
                   "--t", "50", "950", "--max-latents", "2", "--match-noise", "--out", str(out)])
    matched = json.loads(out.read_text())["rows"]
    assert matched[1]["relative_x0_error"] == rows[1]["relative_x0_error"]
    assert matched[0]["relative_x0_error"] != rows[0]["relative_x0_error"]


def test_x0_error_measures_a_model_folder(tmp_path, capsys):
    """The bundled model folder's UNet (the model card's x0 errors): its steps and scale factor from
    model.json."""
    import json
    from pathlib import Path

    import x0_error
    from test_train_flow import SMALL, make_cache

    folder = Path(__file__).resolve().parents[1] / "src/maisi2/resources/models/default"
    info = json.loads((folder / "model.json").read_text())
    steps = info["metadata"]["trained_steps"]["unet"]
    cache = make_cache(tmp_path / "cache", shapes=[SMALL] * 2)
    out = tmp_path / "x0.json"
    x0_error.main([str(cache), "--checkpoint", f"bundled={folder}", "--t", "50", "950", "--max-latents", "2",
                   "--out", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["objective"] == "rflow" and row["steps"] == steps
    assert all(e == e and e > 0 for e in row["relative_x0_error"])
    assert f"| bundled | rflow | {steps} |" in capsys.readouterr().out
    assert x0_error.load_measured(folder).scale_factor == info["scale_factor"]
