import os

import pytest
import torch

from maisi2 import nets
from maisi2.checkpoint import (Checkpoint, load_checkpoint, load_weights, read_released, save_checkpoint,
                               write_released)
from maisi2.config import get_config


def _tiny_unet(seed=0):
    torch.manual_seed(seed)
    return nets.build_unet(get_config("tiny"))


def test_round_trip_keeps_config_weights_ema_scale_and_step(tmp_path):
    cfg = get_config("tiny", ["flow.num_inference_steps=7"])
    unet = _tiny_unet()
    ema = {k: v + 1 for k, v in unet.state_dict().items()}
    path = save_checkpoint(tmp_path / "unet.pt", Checkpoint("unet", cfg, unet.state_dict(), ema, 0.8, 12, {"stage": 2}))
    ck = load_checkpoint(path)
    assert ck.config == cfg and ck.step == 12 and ck.scale_factor == pytest.approx(0.8)
    assert ck.extra == {"stage": 2}
    assert all(torch.equal(ck.weights()[k], ema[k]) for k in ema)
    assert all(torch.equal(ck.weights(prefer_ema=False)[k], v) for k, v in unet.state_dict().items())
    assert [p.name for p in tmp_path.iterdir()] == ["unet.pt"]  # no temporary file left


def test_mismatched_weights_name_keys_and_the_fitting_preset():
    small = nets.build_unet(get_config("small")).state_dict()
    with pytest.raises(ValueError) as err:
        load_weights(_tiny_unet(), small, "unet", "unet.pt", "tiny")
    msg = str(err.value)
    assert "wrong shape" in msg and "fit the preset(s) small" in msg
    broken = dict(_tiny_unet().state_dict())
    broken.pop("conv_in.conv.weight")
    broken["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as err:
        load_weights(_tiny_unet(), broken, "unet", "unet.pt", "tiny")
    assert "missing key(s): conv_in.conv.weight" in str(err.value)
    assert "unexpected key(s): extra.weight" in str(err.value)
    assert "no built-in preset fits" in str(err.value)


def test_nan_weights_are_refused():
    state = _tiny_unet().state_dict()
    state["conv_in.conv.weight"] = state["conv_in.conv.weight"] * float("nan")
    with pytest.raises(ValueError, match="NaN"):
        load_weights(_tiny_unet(), state, "unet", "x.pt", "tiny")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_files_needing_code_or_corrupt_are_refused_cleanly(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"x": _Evil()}, evil)
    with pytest.raises(ValueError, match="weights-only"):
        load_checkpoint(evil)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(junk)
    good = save_checkpoint(tmp_path / "good.pt", Checkpoint("unet", get_config("tiny"), _tiny_unet().state_dict()))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_checkpoint(truncated)
    plain = tmp_path / "plain.pt"
    torch.save({"unet_state_dict": {}}, plain)
    with pytest.raises(ValueError, match="released MAISI-v2 file"):
        load_checkpoint(plain)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "absent.pt")


def test_released_layout_round_trip(tmp_path):
    cfg = get_config("tiny")
    torch.manual_seed(1)
    vae, unet, cn = nets.build_vae(cfg), nets.build_unet(cfg), nets.build_controlnet(cfg)
    write_released(tmp_path, vae, unet, cn, scale_factor=0.9)
    raw = torch.load(tmp_path / "diff_unet_3d_rflow-ct.pt", weights_only=True)
    assert set(raw) >= {"unet_state_dict", "scale_factor"} and isinstance(raw["scale_factor"], torch.Tensor)
    assert "controlnet_state_dict" in torch.load(tmp_path / "controlnet_3d_rflow-ct.pt", weights_only=True)
    w = read_released(tmp_path)
    assert w.scale_factor == pytest.approx(0.9)
    fresh = nets.build_unet(cfg)
    load_weights(fresh, w.unet, "unet", "released", "tiny")
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), unet.state_dict().values()))
    (tmp_path / "autoencoder_v1.pt").unlink()
    with pytest.raises(FileNotFoundError, match="autoencoder_v1.pt"):
        read_released(tmp_path)
