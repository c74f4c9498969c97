"""experiments/mask_generator.py end to end on label maps of boxes and a tiny, barely trained generator."""

import math

import pytest

import mask_generator  # experiments/mask_generator.py: conftest puts experiments/ on the path
from test_maskgen_train import _blob_masks

pytestmark = pytest.mark.usefixtures("one_thread")
# One UNet level on a 4^3 latent: DDPM-1000 in ~15 s on a busy 2-core machine.
SMALLEST = ["unet.channels=[8]", "unet.attention_levels=[true]", "unet.num_head_channels=[8]", "latent_shape=[4,4,4,4]"]


@pytest.mark.slow
def test_experiment_runs_and_reports_every_measure(tmp_path, capsys):
    datalist = _blob_masks(tmp_path, count=5)  # fold = index: mask 0 is held out
    argv = ["--work", str(tmp_path / "w"), "--datalist", str(datalist), "--preset", "tiny", "--ae-steps", "2",
            "--ae-crop", "8", "--unet-steps", "2", "--per-vector", "2", "--rf-steps", "3"]
    for item in SMALLEST:
        argv += ["--set", item]
    results = mask_generator.main(argv)
    assert results["training_masks"] == 4 and results["heldout_masks"] == 1 and results["samples"] == 2
    assert 0 <= results["autoencoder_dice"]["heldout"]["mean"] <= 1 and "liver" in results["autoencoder_dice"]["training"]
    plaus = results["plausibility"]
    assert set(plaus["volumes_ml"]) == {"gallbladder", "liver", "stomach", "pancreas", "colon", "body (all labels)"}
    assert plaus["components"]["training"]["liver"]["share_one"] == 1.0
    assert 0 <= plaus["body_closed"]["generated"] <= 1 and plaus["body_closed"]["training"] == 1.0
    liver = results["controllability"]["liver"]
    assert liver["n"] == 2 and (math.isnan(liver["pearson_r"]) or -1 <= liver["pearson_r"] <= 1)
    timing = results["timing"]
    assert timing["ddpm_steps"] == 1000 and timing["ddpm_seconds"]["sample"] > timing["rf_seconds"]["sample"]
    assert (tmp_path / "w" / "results.json").is_file() and (tmp_path / "w" / "mask_generator.png").is_file()
    assert "time per mask" in capsys.readouterr().out


def test_a_request_keeps_one_tumor_kind():
    import numpy as np

    vector = np.array([0.1, 0.5, 0.5, 0.5, 0.5, 0.2, -1, 0.3, -1, 0.1], dtype=np.float32)
    assert mask_generator.one_tumor(vector).tolist()[5:] == pytest.approx([0.2, -1, -1, -1, -1])
    assert mask_generator.one_tumor(vector)[:5].tolist() == pytest.approx(vector[:5].tolist())
