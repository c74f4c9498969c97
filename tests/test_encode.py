"""The latent cache builder (`maisi2.encode`) and the `maisi2 encode` command, on the tiny preset."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from maisi2 import latents
from maisi2.checkpoint import Checkpoint, save_checkpoint
from maisi2.config import get_config
from maisi2.data import hu_to_unit
from maisi2.encode import encode_datalist, image_divisor
from maisi2.volume_io import Volume, load_ct, load_label_map, ras_affine, save_ct, save_label_map
from maisi2.nets import build_vae
from maisi2.autoencoder import encode_mean, load_vae

SPACING = (8.0, 8.0, 10.0)  # coarse, so a tiny grid still covers a whole torso


def synthetic_scan(shape, seed=0):
    """(ct HU, MAISI labels, affine): the phantom when `maisi2.phantom` exists, else a body (200)
    holding a liver-like blob (1) in air."""
    try:
        from maisi2.phantom import make_phantom
    except ImportError:
        make_phantom = None
    if make_phantom is not None:
        ct, labels, affine = make_phantom(shape, SPACING, seed=seed)
        return ct.astype(np.float32), labels.astype(np.int16), affine
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    body = (grid**2).sum(0) < 0.7
    liver = ((grid - np.array([0.3, 0.0, 0.0])[:, None, None, None]) ** 2).sum(0) < 0.08
    ct = np.where(body, 20.0, -1000.0) + np.where(liver, 40.0, 0.0) + rng.normal(0, 10, shape)
    labels = np.where(liver, 1, np.where(body, 200, 0)).astype(np.int16)
    return ct.astype(np.float32), labels, ras_affine(SPACING)


def write_scan(folder, name, shape, seed=0, with_label=True, overwrite=False):
    ct, labels, affine = synthetic_scan(shape, seed)
    image = save_ct(folder / f"{name}.nii.gz", Volume(ct, affine), overwrite=overwrite)
    label = None
    if with_label:
        label = save_label_map(folder / f"{name}_seg.nii.gz", Volume(labels, affine), overwrite=overwrite)
    return image, label


def write_datalist(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def vae_ckpt(tmp_path_factory):
    """A randomly initialised tiny VAE saved as our checkpoint (with different EMA weights)."""
    torch.manual_seed(0)
    cfg = get_config("tiny")
    raw = build_vae(cfg).state_dict()
    ema = {k: v + 0.01 if v.is_floating_point() else v for k, v in raw.items()}
    path = tmp_path_factory.mktemp("vae") / "vae.pt"
    save_checkpoint(path, Checkpoint(kind="vae", config=cfg, state_dict=raw, ema_state_dict=ema, step=3))
    return path


@pytest.fixture
def dataset(tmp_path):
    """Two scans (one with a label map) and their datalist."""
    a_img, a_lab = write_scan(tmp_path, "a", (40, 36, 30), seed=1)
    b_img, _ = write_scan(tmp_path, "b", (30, 30, 20), seed=2, with_label=False)
    rows = [{"image": a_img.name, "label": a_lab.name, "source": "s1"}, {"image": b_img.name, "fold": 1}]
    return write_datalist(tmp_path / "train.jsonl", rows)


def test_image_divisor_is_vae_times_unet_downsampling():
    for preset in ("tiny", "small", "maisi-v2"):
        assert image_divisor(get_config(preset)) == 32
    cfg = get_config("tiny", ["unet.num_channels=[8, 8, 16]", "unet.attention_levels=[false, false, true]",
                              "unet.num_head_channels=[0, 0, 8]"])
    assert image_divisor(cfg) == 16


def test_encode_writes_records_labels_and_stats(tmp_path, dataset, vae_ckpt):
    out = tmp_path / "cache"
    report = encode_datalist(dataset, vae_ckpt, out, progress=False)
    assert len(report.encoded) == 2 and not report.skipped
    records = {r.source: r for r in latents.read_index(out)}
    a, b = records["s1"], records["default"]
    # 40x36x30 pads to 64x64x32 (multiples of 32), latent 4x smaller with 4 channels.
    assert a.extra["padded_shape"] == [64, 64, 32] and a.latent_shape == (4, 16, 16, 8)
    assert b.latent_shape == (4, 8, 8, 8) and b.fold == 1
    assert a.spacing == pytest.approx(SPACING) and a.modality == "ct"
    stored = torch.load(out / a.file, weights_only=True)
    assert stored["label"].shape == (1, 64, 64, 32) and stored["label"].dtype == torch.uint8
    expected_ids = set(np.unique(load_label_map(tmp_path / "a_seg.nii.gz").array).tolist()) | {0}
    assert set(stored["label"].unique().tolist()) == expected_ids and len(expected_ids) > 2
    assert "label" not in torch.load(out / b.file, weights_only=True)
    # Centred padding: the label's body occupies the middle, the pad is background.
    assert stored["label"][0, :12].max() == 0 and stored["label"][0, -12:].max() == 0
    stats = latents.read_stats(out)
    assert stats["scale_factor"] == pytest.approx(1 / stats["std"]) and stats["vae"] == report.vae_fingerprint
    assert stats["count"] == 4 * 16 * 16 * 8 + 4 * 8**3


def test_cached_latent_is_the_posterior_mean_of_the_ema_weights(tmp_path, dataset, vae_ckpt):
    out = tmp_path / "cache"
    encode_datalist(dataset, vae_ckpt, out, progress=False)
    record = next(r for r in latents.read_index(out) if r.source == "default")
    cached = torch.load(out / record.file, weights_only=True)["latent"]
    loaded = load_vae(vae_ckpt)
    assert loaded.used_ema
    # Rebuild the padded input by hand: 30x30x20 -> 32x32x32 centred, air (0.0) around.
    ct = load_ct(tmp_path / "b.nii.gz").array
    x = torch.zeros(1, 1, 32, 32, 32)
    x[0, 0, 1:31, 1:31, 6:26] = torch.from_numpy(hu_to_unit(ct).astype(np.float32))
    expected = encode_mean(loaded.model, x)[0]
    torch.testing.assert_close(cached, expected, atol=1e-5, rtol=1e-5)
    # Deterministic: the mean, not a sample - a second run from scratch gives the same bits.
    encode_datalist(dataset, vae_ckpt, tmp_path / "cache2", progress=False)
    again = torch.load(tmp_path / "cache2" / record.file, weights_only=True)["latent"]
    assert torch.equal(cached, again)


def test_rerun_is_idempotent_and_a_changed_input_is_reencoded(tmp_path, dataset, vae_ckpt):
    out = tmp_path / "cache"
    encode_datalist(dataset, vae_ckpt, out, progress=False)
    files = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    second = encode_datalist(dataset, vae_ckpt, out, progress=False)
    assert not second.encoded and len(second.skipped) == 2
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == files  # nothing rewritten

    # Change one image (other content, later mtime): only it is encoded again.
    image, _ = write_scan(tmp_path, "b", (30, 30, 20), seed=7, with_label=False, overwrite=True)
    stamp = image.stat()
    os.utime(image, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9))
    third = encode_datalist(dataset, vae_ckpt, out, progress=False)
    assert len(third.encoded) == 1 and third.encoded[0].startswith("b-") and len(third.skipped) == 1
    assert len(latents.read_index(out)) == 2


def test_tiled_encode_option_and_spacing(tmp_path, dataset, vae_ckpt):
    out = tmp_path / "cache"
    coarse = (16.0, 16.0, 16.0)
    report = encode_datalist(dataset, vae_ckpt, out, spacing=coarse, tile=16, overlap=4, norm_stats="block",
                             progress=False)
    assert len(report.encoded) == 2
    a = next(r for r in latents.read_index(out) if r.source == "s1")
    # 40x36x30 at 8/8/10 mm -> 20x18x19 at 16 mm -> padded to 32^3.
    assert a.spacing == coarse and a.extra["image_shape"] == [20, 18, 19] and a.latent_shape == (4, 8, 8, 8)
    assert a.extra["key"]["tile"] == 16 and a.extra["key"]["norm_stats"] == "block"
    # Tiling settings are part of the key: asking for whole-volume encoding re-encodes.
    assert len(encode_datalist(dataset, vae_ckpt, out, spacing=coarse, tile=None, progress=False).encoded) == 2


def test_progress_shows_the_volumes_and_the_blocks_of_a_tiled_encode(tmp_path, dataset, vae_ckpt, capsys):
    coarse = (16.0, 16.0, 16.0)
    encode_datalist(dataset, vae_ckpt, tmp_path / "cache", spacing=coarse, tile=16, overlap=4, norm_stats="block",
                    progress=True)
    shown = capsys.readouterr().err
    assert "encode" in shown and "2/2" in shown  # the volumes
    assert "8/8 [" in shown and "block" in shown  # 32^3 padded in 16^3 cores: 8 blocks a volume


def test_errors_for_bad_vae_checkpoints(tmp_path, dataset, vae_ckpt):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        encode_datalist(dataset, tmp_path / "missing.pt", tmp_path / "c", progress=False)
    unet_ckpt = tmp_path / "unet.pt"
    cfg = get_config("tiny")
    from maisi2.nets import build_unet

    save_checkpoint(unet_ckpt, Checkpoint(kind="unet", config=cfg, state_dict=build_unet(cfg).state_dict()))
    with pytest.raises(ValueError, match="'unet' checkpoint.*VAE checkpoint"):
        encode_datalist(dataset, unet_ckpt, tmp_path / "c", progress=False)
    # Weights that do not fit the config stored beside them: the error names the preset that fits.
    small = get_config("small")
    bad = tmp_path / "bad.pt"
    save_checkpoint(bad, Checkpoint(kind="vae", config=small, state_dict=build_vae(cfg).state_dict()))
    with pytest.raises(ValueError, match="(?s)do not match the 'small' vae.*fit the preset.*tiny"):
        encode_datalist(dataset, bad, tmp_path / "c", progress=False)
    not_ckpt = tmp_path / "junk.pt"
    not_ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        encode_datalist(dataset, not_ckpt, tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists()  # failed before writing anything


def test_errors_for_bad_datalist_rows(tmp_path, vae_ckpt):
    image, label = write_scan(tmp_path, "a", (32, 32, 32))
    missing = write_datalist(tmp_path / "m.jsonl", [{"image": "nope.nii.gz"}])
    with pytest.raises(FileNotFoundError, match="line 1.*does not exist"):
        encode_datalist(missing, vae_ckpt, tmp_path / "c", progress=False)
    no_image = write_datalist(tmp_path / "n.jsonl", [{"image": image.name}, {"label": label.name}])
    with pytest.raises(ValueError, match="line 2.*missing 'image'"):
        encode_datalist(no_image, vae_ckpt, tmp_path / "c", progress=False)
    twice = write_datalist(tmp_path / "t.jsonl", [{"image": image.name}, {"image": image.name}])
    with pytest.raises(ValueError, match="listed twice"):
        encode_datalist(twice, vae_ckpt, tmp_path / "c", progress=False)
    # A label map on another grid than its image.
    _, other = write_scan(tmp_path, "b", (32, 32, 16))
    mismatch = write_datalist(tmp_path / "x.jsonl", [{"image": image.name, "label": other.name}])
    with pytest.raises(ValueError, match="not on the grid of its image"):
        encode_datalist(mismatch, vae_ckpt, tmp_path / "c", progress=False)


def test_refuses_to_mix_latents_of_two_vaes(tmp_path, dataset, vae_ckpt):
    out = tmp_path / "cache"
    encode_datalist(dataset, vae_ckpt, out, progress=False)
    other = tmp_path / "other.pt"
    cfg = get_config("tiny")
    torch.manual_seed(5)
    save_checkpoint(other, Checkpoint(kind="vae", config=cfg, state_dict=build_vae(cfg).state_dict()))
    only_b = write_datalist(tmp_path / "b.jsonl", [{"image": "b.nii.gz"}])
    with pytest.raises(ValueError, match="another VAE"):
        encode_datalist(only_b, other, out, progress=False)
    # Listing every cached volume re-encodes them all with the new VAE.
    assert len(encode_datalist(dataset, other, out, progress=False).encoded) == 2


def test_encode_cli_end_to_end(tmp_path, dataset, vae_ckpt, capsys):
    from maisi2.cli import main

    out = tmp_path / "cache"
    assert main(["encode", str(dataset), "--vae", str(vae_ckpt), "--out", str(out), "--device", "cpu",
                 "--tile", "0", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "encoded 2" in printed and str(out) in printed and "scale_factor" in printed
    assert main(["encode", str(dataset), "--vae", str(vae_ckpt), "--out", str(out), "--tile", "0",
                 "--no-progress"]) == 0
    assert "encoded 0" in capsys.readouterr().out
    assert main(["encode", str(dataset), "--vae", str(tmp_path / "none.pt"), "--out", str(out)]) == 1
    assert "does not exist" in capsys.readouterr().err
