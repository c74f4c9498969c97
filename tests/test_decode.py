"""Tiled VAE decoding: tile placement, blending weights, the memory plan, tiled vs whole decode."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from maisi2 import autoencoder, nets
from maisi2.autoencoder import streamed, tiles
from maisi2.config import get_config
from maisi2.data import hu_to_unit
from maisi2.phantom import make_phantom


# -- geometry of the plan -----------------------------------------------------------------------

def test_decoder_context_follows_the_architecture():
    # tiny: conv_in 1 + level0 (1 block x 2 convs) 2 + up 1/2 + level1 2/2 + up 1/4 + level2 2/4 + conv_out 1/4
    assert autoencoder.decoder_context(get_config("tiny").vae) == math.ceil(5.5)
    # released: 1 + 4 + 1/2 + 4/2 + 1/4 + 4/4 + 1/4 = 9
    assert autoencoder.decoder_context(get_config("maisi-v2").vae) == 9


@pytest.mark.parametrize("length,tile,overlap", [(24, 16, 6), (40, 13, 10), (17, 16, 14), (100, 30, 20), (16, 16, 14)])
def test_tiles_cover_the_axis_with_enough_overlap(length, tile, overlap):
    starts = tiles.axis_starts(length, tile, overlap)
    assert starts[0] == 0 and starts[-1] + tile == length
    assert all(a + tile - b >= overlap for a, b in zip(starts, starts[1:]))


def test_weights_are_zero_on_halos_and_sum_to_one():
    halo, ramp, factor, tile, length = 3, 2, 4, 14, 20
    starts = tiles.axis_starts(length, tile, 2 * halo + ramp)
    assert starts == (0, 6)  # overlap exactly 2 * halo + ramp
    left, right = (tiles.axis_weights(s, tile, length, halo, ramp, factor) for s in starts)
    inner = (halo + ramp) * factor
    assert np.all(left[:-inner] == 1) and np.all(left[-halo * factor:] == 0)  # border side kept, inner halo dropped
    assert np.all(right[:halo * factor] == 0) and np.all(right[inner:] == 1)
    assert np.all(np.diff(left[-inner:]) <= 0) and 0 < left[-inner] < 1  # a smooth ramp down
    total = np.zeros(length * factor)
    total[:tile * factor] += left
    total[6 * factor:] += right
    np.testing.assert_allclose(total, 1.0, atol=1e-12)  # mirrored raised-cosine ramps: a partition of one


def test_plan_uses_the_whole_latent_when_it_fits_and_tiles_otherwise():
    cfg = get_config("maisi-v2").vae
    whole = autoencoder.plan_tiles((4, 32, 32, 32), cfg, budget_bytes=64 * 2**30)
    assert whole.count == 1 and whole.tile == (32, 32, 32) and whole.output_shape == (128, 128, 128)
    budget = 2 * 2**30
    tiled = autoencoder.plan_tiles((128, 128, 192), cfg, budget_bytes=budget)
    assert tiled.count > 1 and tiled.peak_bytes <= budget
    assert min(tiled.tile) >= 2 * tiled.halo + tiled.ramp + 2
    with pytest.raises(ValueError, match="--max-memory"):
        autoencoder.plan_tiles((128, 128, 192), cfg, budget_bytes=0.3 * 2**30)


def test_memory_model_matches_the_measurements():
    # measured growth of peak RSS per output voxel: maisi-v2 1.79 kB, small 449 B, tiny 128 B
    assert 1.79e3 <= autoencoder.decoder_bytes_per_voxel(get_config("maisi-v2").vae) <= 2.5e3
    assert 449 <= autoencoder.decoder_bytes_per_voxel(get_config("small").vae) <= 700
    assert 128 <= autoencoder.decoder_bytes_per_voxel(get_config("tiny").vae) <= 300


# -- decoding -----------------------------------------------------------------------------------

class _ConvDecoder(nn.Module):
    """A VAE stand-in whose decoder is convolutions only (no group norm): tiling must be exact."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv3d(4, 8, 3, padding=1), nn.SiLU(), nn.Upsample(scale_factor=2),
            nn.Conv3d(8, 8, 3, padding=1), nn.SiLU(), nn.Upsample(scale_factor=2), nn.Conv3d(8, 1, 3, padding=1),
        )

    def decode(self, z):
        return self.net(z)


def _plan(latent, tile, halo, ramp=2):
    starts = tuple(tiles.axis_starts(n, tile, 2 * halo + ramp) for n in latent)
    return autoencoder.TilePlan(tuple(latent), (tile,) * 3, starts, halo, ramp, 4, 0)


def test_halo_wider_than_the_receptive_field_makes_a_convolutional_decoder_exact():
    vae = _ConvDecoder().eval()
    z = torch.randn(1, 4, 14, 12, 10, generator=torch.Generator().manual_seed(1))
    plan = _plan((14, 12, 10), tile=8, halo=2)  # reach: 1 + 1/2 + 1/4 latent voxels
    assert plan.count > 1
    with torch.no_grad():
        whole = vae.decode(z)
    tiled = autoencoder.decode_tiled(vae, z, plan)
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-5)
    too_thin = autoencoder.decode_tiled(vae, z, _plan((14, 12, 10), tile=8, halo=0, ramp=1))
    assert (too_thin - whole).abs().max() > 1e-3  # without the halo the zero padding shows


@pytest.fixture(scope="module")
def tiny_vae():
    cfg = get_config("tiny")
    torch.manual_seed(0)
    return nets.build_vae(cfg).eval(), cfg


def _plan_for(latent, tile, halo, ramp=2):
    starts = tuple(tiles.axis_starts(n, t, 2 * halo + ramp) for n, t in zip(latent, tile))
    return autoencoder.TilePlan(tuple(latent), tuple(tile), starts, halo, ramp, 4, 0)


def test_tiled_decode_with_volume_statistics_equals_the_whole_decode(tiny_vae):
    """2 x 2 tiles of the tiny VAE (random weights, so every statistic matters): within tolerance.

    Each tile alone normalises with its own statistics and lands far off; with the volume's
    statistics the only differences left are float rounding (measured 1.2e-5).
    """
    vae, cfg = tiny_vae
    latent = (18, 17, 8)
    z = torch.randn(1, 4, *latent, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole = vae.decode(z)
    plan = _plan_for(latent, (16, 16, 8), halo=autoencoder.decoder_context(cfg.vae))
    assert plan.count == 4
    synced = autoencoder.decode_tiled(vae, z, plan)
    assert (synced - whole).abs().max().item() <= autoencoder.TILED_DECODE_TOLERANCE
    per_tile = autoencoder.decode_tiled(vae, z, plan, statistics="tile")
    assert (per_tile - whole).abs().max().item() > 100 * autoencoder.TILED_DECODE_TOLERANCE
    # the norms are themselves again afterwards
    assert not any("forward" in vars(m) for m in vae.decoder.modules())
    with torch.no_grad():
        torch.testing.assert_close(vae.decode(z), whole, rtol=0, atol=0)


def test_tiled_decode_of_a_phantom_latent(tiny_vae):
    """A latent that encodes anatomy (phantom CT) rather than noise, tiled along one axis."""
    vae, cfg = tiny_vae
    ct = make_phantom((96, 32, 32), (4.0, 4.0, 4.0), seed=11)[0]
    with torch.no_grad():
        z = vae.encode(torch.from_numpy(hu_to_unit(ct)).float()[None, None])[0]
        whole = vae.decode(z)
    plan = _plan_for(z.shape[2:], (20, 8, 8), halo=autoencoder.decoder_context(cfg.vae))
    assert plan.count == 2
    tiled = autoencoder.decode_tiled(vae, z, plan)
    assert (tiled - whole).abs().max().item() <= autoencoder.TILED_DECODE_TOLERANCE


def test_a_single_tile_plan_is_the_plain_decode(tiny_vae):
    vae, cfg = tiny_vae
    z = torch.randn(1, 4, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    plan = autoencoder.plan_tiles(z.shape[1:], cfg.vae, budget_bytes=2**30)
    assert plan.count == 1 and plan.storage == "float32"
    with torch.no_grad():
        want = vae.decode(z)
    assert (autoencoder.decode_tiled(vae, z, plan) - want).abs().max().item() <= autoencoder.TILED_DECODE_TOLERANCE
    with pytest.raises(ValueError, match="latent must be"):
        autoencoder.decode_tiled(vae, z[:, :, :4], plan)
    with pytest.raises(ValueError, match="statistics"):
        autoencoder.decode_tiled(vae, z, plan, statistics="global")


# -- streamed whole-volume decoding -------------------------------------------------------------

def _perturbed_vae(preset, overrides=()):
    cfg = get_config(preset, list(overrides))
    torch.manual_seed(0)
    vae = nets.build_vae(cfg).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vae, cfg


@pytest.mark.parametrize("preset, latent, overrides", [
    ("tiny", (10, 7, 6), ()), ("small", (8, 6, 7), ()),
    ("maisi-v2", (6, 8, 5), ("vae.num_splits=1",)),  # MONAI's splitting fails on latents this small
])
def test_streamed_decode_equals_monai_s_whole_decode(preset, latent, overrides):
    """Layer by layer, slab by slab, with whole-volume group-norm statistics: the plain decode."""
    vae, cfg = _perturbed_vae(preset, overrides)
    z = torch.randn(1, 4, *latent, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = vae.decode(z)
    assert autoencoder.streamable_decoder(vae) and autoencoder.streamable(cfg.vae)
    # whole tensors at once, and (not for the big preset: slow) one row per slab
    for slab_bytes in (autoencoder.STREAM_SLAB_BYTES[1],) + ((1,) if preset != "maisi-v2" else ()):
        got = autoencoder.decode_streamed(vae, z, slab_bytes=slab_bytes)
        assert got.shape == want.shape and got.dtype == torch.float32
        assert (got - want).abs().max().item() <= autoencoder.TILED_DECODE_TOLERANCE * want.abs().max().item()
    half = autoencoder.decode_streamed(vae, z, storage=torch.float16)
    assert (half - want).abs().max().item() <= autoencoder.STREAM_FLOAT16_TOLERANCE * want.abs().max().item()


def test_streamed_decode_can_keep_its_tensors_in_files(tiny_vae, tmp_path):
    vae, _ = tiny_vae
    z = torch.randn(1, 4, 6, 5, 4, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(autoencoder.decode_streamed(vae, z, spill_dir=str(tmp_path)), autoencoder.decode_streamed(vae, z))
    assert not list(tmp_path.iterdir())  # the files were deleted at once


def test_spilled_decode_keeps_every_stored_tensor_in_a_file(tiny_vae, tmp_path, monkeypatch):
    """With spill_dir, every layer input a convolution reads lies in a file, the compacted copy
    before an upsampling included (a plain clone held 4 GiB of anonymous memory at 512^3);
    only the post-quant latent (4 channels at latent resolution) is in RAM."""
    vae, _ = tiny_vae
    z = torch.randn(1, 4, 6, 5, 4, generator=torch.Generator().manual_seed(4))
    inputs, compacted = [], []
    real_conv, real_compact = streamed._Streamer.conv, streamed._Streamer.compact

    def conv(self, x, *args, **kwargs):
        inputs.append((x.shape[1], x.untyped_storage().data_ptr() in self.mapped))
        return real_conv(self, x, *args, **kwargs)

    def compact(self, buffer, channels):
        compacted.append(channels)
        return real_compact(self, buffer, channels)

    monkeypatch.setattr(streamed._Streamer, "conv", conv)
    monkeypatch.setattr(streamed._Streamer, "compact", compact)
    autoencoder.decode_streamed(vae, z, spill_dir=str(tmp_path))
    assert compacted  # the tiny decoder halves its channels once, so a copy is made
    assert inputs[0] == (4, False) and all(in_file for _, in_file in inputs[1:]), inputs


def test_streamed_memory_model():
    # released VAE: the full-resolution 128-channel buffer + the half-resolution input of its upsampling
    assert autoencoder.streamed_channels_per_voxel(get_config("maisi-v2").vae) == 128 + 128 / 8
    cfg, latent = get_config("maisi-v2").vae, (48, 48, 48)
    fp32, fp16 = (autoencoder.estimate_streamed_bytes(cfg, latent, b) for b in (4, 2))
    assert fp16 < fp32 < autoencoder.estimate_decode_bytes(cfg, latent)
    # the plan prefers float32, then float16 storage, then files (when allowed), then tiles
    assert autoencoder.plan_tiles(latent, cfg, fp32).storage == "float32"
    half = autoencoder.plan_tiles(latent, cfg, fp32 - 1)
    assert half.count == 1 and half.storage == "float16" and half.spill_dir is None
    spilled = autoencoder.plan_tiles(latent, cfg, fp16 - 1, spill_dir="/tmp")
    assert spilled.count == 1 and spilled.spill_dir == "/tmp" and spilled.peak_bytes < fp16 / 2
    assert autoencoder.plan_tiles(latent, cfg, fp16 - 1).count > 1
    attention = get_config("maisi-v2", ["vae.attention_levels=[false,false,true]"]).vae
    assert not autoencoder.streamable(attention)


# -- progress -----------------------------------------------------------------------------------

def _recorder():
    calls = []
    return calls, lambda done, total: calls.append((done, total))


def _counts_up_to_the_total(calls, total=None):
    totals = {t for _, t in calls}
    dones = [d for d, _ in calls]
    assert len(totals) == 1 and (total is None or totals == {total})
    assert dones == sorted(set(dones)) and dones[0] >= 1 and dones[-1] == calls[0][1]


@pytest.mark.parametrize("statistics", ["volume", "tile"])
def test_tiled_decode_reports_every_tile_and_is_unchanged_by_it(tiny_vae, statistics):
    vae, cfg = tiny_vae
    latent = (18, 17, 8)
    z = torch.randn(1, 4, *latent, generator=torch.Generator().manual_seed(2))
    plan = _plan_for(latent, (16, 16, 8), halo=autoencoder.decoder_context(cfg.vae))
    calls, record = _recorder()
    watched = autoencoder.decode_tiled(vae, z, plan, statistics=statistics, progress=record)
    norms = sum(isinstance(m, nn.GroupNorm) for m in vae.decoder.modules())
    passes = norms + 1 if statistics == "volume" else 1
    assert [d for d, _ in calls] == list(range(1, passes * plan.count + 1))  # one call per tile decode
    _counts_up_to_the_total(calls, passes * plan.count)
    assert torch.equal(watched, autoencoder.decode_tiled(vae, z, plan, statistics=statistics))


@pytest.mark.parametrize("slab_bytes", [1, autoencoder.STREAM_SLAB_BYTES[1]])
def test_streamed_decode_reports_its_share_of_the_work_and_is_unchanged_by_it(tiny_vae, slab_bytes):
    vae, cfg = tiny_vae
    z = torch.randn(1, 4, 10, 7, 6, generator=torch.Generator().manual_seed(3))
    calls, record = _recorder()
    watched = autoencoder.decode_streamed(vae, z, slab_bytes=slab_bytes, progress=record)
    _counts_up_to_the_total(calls, 1000)  # thousandths of the multiply-adds; the last call is 1000/1000
    if slab_bytes == 1:  # one row per slab: many calls, so the count is told as the work advances
        assert len(calls) > 20
    assert torch.equal(watched, autoencoder.decode_streamed(vae, z, slab_bytes=slab_bytes))
    # and through the plan, as generate decodes
    plan = autoencoder.plan_tiles(z.shape[1:], cfg.vae, budget_bytes=2**30)
    calls, record = _recorder()
    autoencoder.decode_tiled(vae, z, plan, progress=record)
    _counts_up_to_the_total(calls, 1000)


def test_progress_that_raises_stops_the_decode(tiny_vae):
    """How the web app cancels a job: the callback raises and the decode goes no further."""
    vae, cfg = tiny_vae
    z = torch.randn(1, 4, 18, 17, 8, generator=torch.Generator().manual_seed(2))
    plan = _plan_for((18, 17, 8), (16, 16, 8), halo=autoencoder.decoder_context(cfg.vae))
    seen = []

    def stop(done, total):
        seen.append(done)
        if done == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        autoencoder.decode_tiled(vae, z, plan, progress=stop)
    assert seen == [1, 2]
