"""The whole seed pipeline on the tiny preset, through the CLI, as a user would run it:
phantoms -> VAE -> latent cache -> flow training (3 stages) -> ControlNet -> model folder -> generate.
"""

import json

import numpy as np
import pytest
import torch

from maisi2.cli import main
from maisi2.volume_io import load_ct, load_label_map
from maisi2.labels import BODY, label_id

pytestmark = pytest.mark.slow


def run(*argv):
    assert main([str(a) for a in argv]) == 0, f"maisi2 {' '.join(map(str, argv))} failed"


def test_tiny_pipeline_end_to_end(tmp_path):
    data, vae, cache, flow, cn, model = (tmp_path / n for n in ("data", "vae", "cache", "flow", "cn", "model"))
    run("phantom", "--count", 2, "--shape", 64, 64, 64, "--spacing", 6, 6, 6, "--tumors", "hepatic:1",
        "--tumor-radius-mm", 12, 20, "--out", data, "--seed", 3)
    run("train-vae", data / "datalist.jsonl", "--out", vae, "--preset", "tiny", "--steps", 2,
        "--patch", 32, 32, 32, "--no-progress")
    run("encode", data / "datalist.jsonl", "--vae", vae / "vae.pt", "--out", cache, "--no-progress")
    stats = json.loads((cache / "stats.json").read_text())
    assert stats["scale_factor"] > 0 and stats["count"] == 2 * 4 * 16**3
    run("train-flow", cache, "--out", flow, "--preset", "tiny", "--steps", 2, "--no-progress")
    unet = flow / "stage_3" / "last.pt"
    run("train-controlnet", cache, "--unet", unet, "--out", cn, "--preset", "tiny", "--steps", 2, "--no-progress")
    run("export-model", "--vae", vae / "vae.pt", "--unet", unet, "--controlnet", cn / "last.pt",
        "--cache", cache, "--out", model)
    info = json.loads((model / "model.json").read_text())
    assert info["metadata"]["fov_mm"] == {"min": [384.0] * 3, "max": [384.0] * 3}
    domain = info["metadata"]["domain"]  # what generation checks requests against
    assert domain["spacing_mm"] == {"min": [6.0] * 3, "max": [6.0] * 3}
    assert {label_id("hepatic tumor"), label_id("liver"), BODY} <= set(domain["labels_seen"])
    assert info["metadata"]["weights"] == {"vae": "ema", "unet": "ema", "controlnet": "ema"}
    # the UNet's count adds up its three stages (each resumed from the one before)
    assert info["metadata"]["trained_steps"] == {"vae": 2, "unet": 6, "controlnet": 2}

    # re-exporting with the model folder as the VAE and UNet source (as recipes/real_mask_controlnet.sh
    # does) keeps what model.json said about their training
    again = tmp_path / "model_again"
    run("export-model", "--vae", model, "--unet", model, "--controlnet", cn / "last.pt", "--out", again)
    meta = json.loads((again / "model.json").read_text())["metadata"]
    assert meta["trained_steps"] == {"vae": 2, "unet": 6, "controlnet": 2}
    assert meta["weights"] == {"vae": "ema", "unet": "ema", "controlnet": "ema"}

    # --raw controlnet: the ControlNet's raw weights, not its EMA (which differ after training)
    from maisi2.checkpoint import load_checkpoint
    from maisi2.models import load_model

    raw_model = tmp_path / "model_raw"
    run("export-model", "--vae", vae / "vae.pt", "--unet", unet, "--controlnet", cn / "last.pt",
        "--out", raw_model, "--raw", "controlnet")
    assert json.loads((raw_model / "model.json").read_text())["metadata"]["weights"]["controlnet"] == "raw"
    trained = load_checkpoint(cn / "last.pt")
    exported = {"ema": load_model(model).controlnet.state_dict(), "raw": load_model(raw_model).controlnet.state_dict()}
    for which, state in (("ema", trained.ema_state_dict), ("raw", trained.state_dict)):
        assert all(torch.equal(exported[which][k], v) for k, v in state.items()), which
    assert any(not torch.equal(trained.ema_state_dict[k], v) for k, v in trained.state_dict.items())

    mask = data / "case_000" / "label.nii.gz"
    out = tmp_path / "gen" / "ct.nii.gz"
    run("generate", "--mask", mask, "--out", out, "--model", model, "--steps", 30, "--seed", 1, "--no-progress")
    ct, labels = load_ct(out), load_label_map(mask)
    assert ct.shape == labels.shape == (64, 64, 64)
    np.testing.assert_allclose(ct.affine, labels.affine)
    assert np.isfinite(ct.array).all() and ct.array.min() >= -1000 and ct.array.max() <= 1000
    assert (ct.array[labels.array == 0] == -1000).all()
    assert ct.array[labels.array > 0].std() > 0  # something was generated inside the body
