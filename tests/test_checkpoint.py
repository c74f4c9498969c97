import os

import pytest
import torch

from maisi2 import nets
from maisi2.checkpoint import Checkpoint, load_checkpoint, load_weights, save_checkpoint, write_released
from maisi2.config import get_config
from maisi2.models import read_released


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


class _Marker:
    """A pickle payload that would leave a file behind if it ever ran."""

    path = ""

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_payload_in_a_latent_cache_is_refused_and_never_runs(tmp_path):
    from maisi2 import latents

    marker = tmp_path / "payload_ran"
    _Marker.path = str(marker)
    torch.save({"latent": torch.zeros(4, 2, 2, 2), "extra": _Marker()}, tmp_path / "case.pt")
    with pytest.raises(ValueError, match=r"case.pt is not a weights-only latent file: loading it would run pickled "
                                         r"code.*Delete it and run `maisi2 encode` again"):
        latents._load(tmp_path / "case.pt")
    assert not marker.exists()


def test_truncated_or_garbage_safetensors_are_one_line(tmp_path):
    from safetensors.torch import save_file

    from maisi2.checkpoint import read_safetensors

    good = tmp_path / "unet.safetensors"
    save_file({"w": torch.ones(64, 64)}, str(good))
    (tmp_path / "short.safetensors").write_bytes(good.read_bytes()[:200])
    (tmp_path / "junk.safetensors").write_bytes(b"\x00garbage" * 50)
    for name in ("short", "junk"):
        with pytest.raises(ValueError, match=rf"{name}.safetensors is not a readable safetensors unet weights "
                                             r"\(corrupt or truncated\?\): .*; re-export or re-download it") as err:
            read_safetensors(tmp_path / f"{name}.safetensors", "unet weights")
        assert "\n" not in str(err.value)


def test_permission_denied_is_reported_as_such_not_as_corrupt(tmp_path, monkeypatch):
    """Root reads any file, so the denial is simulated where the file is opened."""
    from maisi2 import volume_io
    from maisi2.checkpoint import read_safetensors, read_torch_file

    good = save_checkpoint(tmp_path / "good.pt", Checkpoint("unet", get_config("tiny"), _tiny_unet().state_dict()))

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(good))

    monkeypatch.setattr(torch, "load", denied)
    with pytest.raises(PermissionError, match=r"cannot read PyTorch checkpoint .*good.pt: permission denied"):
        read_torch_file(good)
    monkeypatch.setattr("safetensors.torch.load_file", denied)
    (tmp_path / "w.safetensors").write_bytes(b"x")
    with pytest.raises(PermissionError, match="permission denied"):
        read_safetensors(tmp_path / "w.safetensors")
    monkeypatch.setattr(volume_io.nib, "load", denied)
    (tmp_path / "mask.nii.gz").write_bytes(b"x")
    for read in (volume_io.load_label_map, volume_io.read_grid):
        with pytest.raises(PermissionError, match=r"cannot read .*mask.nii.gz: permission denied"):
            read(tmp_path / "mask.nii.gz")


def test_a_full_disk_while_checkpointing_says_so(tmp_path, monkeypatch):
    from maisi2.atomic import OutputError

    def torch_full_disk(payload, path):
        raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file "
                           "data/3: file write failed")

    monkeypatch.setattr(torch, "save", torch_full_disk)
    monkeypatch.setattr("shutil.disk_usage", lambda path: type("U", (), {"free": 0})())
    target = tmp_path / "run" / "last.pt"
    with pytest.raises(OutputError) as err:
        save_checkpoint(target, Checkpoint("unet", get_config("tiny"), _tiny_unet().state_dict()))
    assert str(err.value) == (f"writing {target} failed (No space left on device); the disk is full: free some space "
                              "or choose another output folder")
    assert list((tmp_path / "run").iterdir()) == []
