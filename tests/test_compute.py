"""The compute plan: which arithmetic for which CPU (capabilities injected), bf16 numerics, the report."""

import dataclasses
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from maisi2 import compute, fastops, models, nets, sampling
from maisi2 import generate as G
from maisi2.config import get_config

ZEN3 = compute.CpuCapabilities("AMD EPYC 7B13", "AVX2", frozenset({"avx2", "fma"}))
ZEN5 = compute.CpuCapabilities("AMD EPYC 9B45", "AVX512", frozenset({"avx2", "avx512f", "avx512_bf16"}))
SAPPHIRE = compute.CpuCapabilities("Intel Xeon", "AVX512", frozenset({"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}))


FLOW = ("unet", "controlnet")  # what `auto` lowers: measured within the bound


def _never():
    raise AssertionError("the probe must not run here")


def _dtypes(plan):
    return {name: plan.of(name).dtype for name in compute.NETWORKS}


def test_auto_picks_bf16_channels_last_for_the_flow_networks_on_amx_without_probing():
    plan = compute.choose_plan("auto", "cpu", cpu=SAPPHIRE, probe=_never, auto_networks=FLOW)
    assert plan.name == "bf16" and "AMX" in plan.reason
    for name in compute.NETWORKS:
        lowered = name in FLOW
        assert plan.of(name).dtype == (torch.bfloat16 if lowered else torch.float32)
        assert plan.of(name).channels_last == lowered
        assert plan.of(name).convolutions_only == lowered  # bf16 multiply-adds, float32 activations
    # --precision bf16 lowers the decoder too; the encoder (training data) stays float32
    assert set(compute.BF16_NETWORKS) == {"unet", "controlnet", "vae_decoder"}


@pytest.mark.parametrize("cpu, probe, lowered", [(SAPPHIRE, _never, True), (ZEN5, lambda: 2.0, True),
                                                 (ZEN5, lambda: 1.1, False), (ZEN3, _never, False)])
def test_the_decoder_is_lowered_where_bf16_pays_and_auto_may_lower_it(cpu, probe, lowered):
    plan = compute.choose_plan("auto", "cpu", cpu=cpu, probe=probe, auto_networks=("vae_decoder",))
    want = compute.BF16_CONVS if lowered else compute.FP32
    assert plan.of("vae_decoder") == want and plan.of("vae_encoder") == compute.FP32
    assert plan.of("unet") == compute.FP32  # only the networks auto may lower
    # an explicit bf16 lowers it on every CPU, fp32 never
    assert compute.choose_plan("bf16", "cpu", cpu=cpu, probe=_never).of("vae_decoder") == compute.BF16_CONVS
    assert compute.choose_plan("fp32", "cpu", cpu=cpu, probe=_never).of("vae_decoder") == compute.FP32


def test_auto_lowers_only_networks_measured_within_the_release_fp16_error():
    # Measured (docs/performance.md, "Precision"): bf16 sampling is within the release's float16
    # error, the bf16 decoder is not; auto says so in its reason
    assert compute.AUTO_BF16_NETWORKS == FLOW
    plan = compute.choose_plan("auto", "cpu", cpu=SAPPHIRE, probe=_never)
    assert _dtypes(plan) == {"unet": torch.bfloat16, "controlnet": torch.bfloat16,
                             "vae_decoder": torch.float32, "vae_encoder": torch.float32}
    assert "float32 for vae_decoder, vae_encoder" in plan.reason
    # with no network measured within it, auto is float32 even with AMX and says why
    none = compute.choose_plan("auto", "cpu", cpu=SAPPHIRE, probe=_never, auto_networks=())
    assert none.name == "fp32" and "--precision bf16" in none.reason


def test_auto_falls_back_to_fp32_without_bf16_hardware_and_never_probes():
    plan = compute.choose_plan("auto", "cpu", cpu=ZEN3, probe=_never, auto_networks=FLOW)
    assert plan.name == "fp32" and set(_dtypes(plan).values()) == {torch.float32}
    assert not any(plan.of(n).channels_last for n in compute.NETWORKS)


@pytest.mark.parametrize("gain, chosen", [(2.0, "bf16"), (compute.PROBE_MIN_GAIN, "bf16"), (1.1, "fp32")])
def test_avx512_bf16_without_amx_follows_the_measured_probe(gain, chosen):
    plan = compute.choose_plan("auto", "cpu", cpu=ZEN5, probe=lambda: gain, auto_networks=FLOW)
    assert plan.name == chosen and f"{gain:.2f}x" in plan.reason


@pytest.mark.parametrize("cpu", [ZEN3, ZEN5, SAPPHIRE])
def test_an_explicit_precision_is_obeyed_on_every_cpu(cpu):
    assert compute.choose_plan("fp32", "cpu", cpu=cpu, probe=_never).name == "fp32"
    assert compute.choose_plan("bf16", "cpu", cpu=cpu, probe=_never).name == "bf16"


def test_cuda_keeps_the_release_fp16_autocast_unless_told_otherwise():
    assert compute.choose_plan("auto", "cuda").name == "fp16"
    assert compute.choose_plan("auto", "cuda", half=False).name == "fp32"
    assert compute.choose_plan("fp32", "cuda").name == "fp32"
    with pytest.raises(ValueError, match="precision must be one of"):
        compute.choose_plan("fp8", "cpu", cpu=ZEN3)


def test_autocast_is_one_function_for_names_dtypes_and_plans():
    """compute.autocast is what sampling, decoding and training enter: a name or a dtype, float32 none."""
    x = torch.ones(2, 2)
    with compute.autocast("cpu", "bf16"):
        assert (x @ x).dtype == torch.bfloat16
    with compute.autocast("cpu", torch.bfloat16):
        assert (x @ x).dtype == torch.bfloat16
    with compute.autocast("cpu", "fp32"):
        assert not torch.is_autocast_enabled("cpu") and (x @ x).dtype == torch.float32
    autocast_plan = compute.replace(compute.choose_plan("fp32", "cpu", cpu=SAPPHIRE), unet=compute.BF16)
    with autocast_plan.autocast("unet"):
        assert (x @ x).dtype == torch.bfloat16
    # the CPU's bf16 plan lowers convolutions only (`lowered`): no autocast for any network
    for network in compute.NETWORKS:
        with compute.choose_plan("bf16", "cpu", cpu=SAPPHIRE).autocast(network):
            assert (x @ x).dtype == torch.float32
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16"):
        compute.autocast("cpu", "fp8")


def test_the_probe_is_measured_once_and_cached_per_machine(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(compute, "_time_conv", lambda dtype, cl: calls.append(dtype) or (2.0 if dtype == torch.float32 else 1.0))
    cache = tmp_path / "probe.json"
    assert compute.measure_bf16_gain(cache) == 2.0 and len(calls) == 2
    assert compute.measure_bf16_gain(cache) == 2.0 and len(calls) == 2  # from the cache
    assert list(json.loads(cache.read_text()).values()) == [2.0]


def test_the_plan_dict_names_dtypes_layouts_and_the_cpu():
    d = compute.choose_plan("auto", "cpu", cpu=SAPPHIRE, auto_networks=FLOW).to_dict()
    assert d["chosen"] == "bf16" and d["requested"] == "auto" and d["cpu"]["model"] == "Intel Xeon"
    assert d["networks"]["unet"] == {"dtype": "bfloat16", "layout": "channels_last_3d", "activations": "float32"}
    assert d["networks"]["vae_decoder"] == {"dtype": "float32", "layout": "contiguous", "activations": "float32"}
    assert compute.BF16.to_dict()["activations"] == "bfloat16"  # autocast rounds the activations too


# -- numerics ----------------------------------------------------------------------------------

def test_average_2x2x2_is_avgpool_in_float32_and_one_rounding_in_bf16():
    x = torch.randn(1, 3, 7, 6, 4, generator=torch.Generator().manual_seed(0))
    pooled = nn.AvgPool3d(2)(x)
    torch.testing.assert_close(fastops.average_2x2x2(x), pooled, rtol=1e-6, atol=1e-6)
    low = x.bfloat16().contiguous(memory_format=torch.channels_last_3d)
    out = fastops.average_2x2x2(low)
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(out, nn.AvgPool3d(2)(low.float()).bfloat16(), rtol=0, atol=0)


def test_bf16_group_norm_equals_float32_statistics_rounded_once():
    norm = fastops.FastGroupNorm(4, 16)
    x = (torch.randn(1, 16, 6, 6, 6) * 3 + 5).bfloat16()
    expected = nn.functional.group_norm(x.float(), 4, norm.weight, norm.bias, norm.eps).bfloat16()
    torch.testing.assert_close(norm(x), expected, rtol=0, atol=0)


def _waken(net):
    with torch.no_grad():
        for p in net.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return net


@pytest.fixture(scope="module")
def tiny():
    cfg = get_config("tiny")
    torch.manual_seed(0)
    return cfg, _waken(nets.build_vae(cfg)), _waken(nets.build_unet(cfg)), _waken(nets.build_controlnet(cfg))


def test_bf16_velocity_stays_within_the_bf16_rounding_bound_of_float32(tiny):
    """bfloat16 keeps 8 significant bits (unit roundoff u = 2^-8 ~ 0.39 %). One velocity call of
    the tiny networks chains ~10 rounded convolutions; if every one added its full u, the relative
    error would stay under 10u ~ 3.9 %. The released architecture measured 0.9 % (docs)."""
    cfg, _, unet, controlnet = tiny
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 8, 8, 8, generator=g)
    labels = torch.randint(0, 8, (1, 1, 32, 32, 32), generator=g)
    cond = nets.Conditioning(torch.tensor([[1.5, 1.5, 1.5]]), torch.ones(1, dtype=torch.long), nets.mask_to_bitplanes(labels))
    t = torch.tensor([600.0])
    out = {}
    for name in ("fp32", "bf16"):
        plan = compute.choose_plan(name, "cpu")
        plan.prepare(unet, "unet")
        plan.prepare(controlnet, "controlnet")
        with torch.no_grad(), plan.lowered(unet, "unet"), plan.lowered(controlnet, "controlnet"):
            out[name] = sampling.velocity_function(unet, cond, controlnet, compute=plan)(x, t)
    compute.choose_plan("fp32", "cpu").prepare(unet, "unet")  # back to contiguous float32 layers
    compute.choose_plan("fp32", "cpu").prepare(controlnet, "controlnet")
    assert out["bf16"].dtype == torch.float32
    error = float((out["bf16"] - out["fp32"]).norm() / out["fp32"].norm())
    assert 0 < error < 10 * 2**-8


def test_prepare_is_reversible(tiny):
    _, _, unet, _ = tiny
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    autocast_plan = compute.replace(compute.choose_plan("fp32", "cpu"), unet=compute.BF16)
    autocast_plan.prepare(unet, "unet")
    assert any(type(m) is fastops.Float32Linear for m in unet.modules())
    compute.choose_plan("fp32", "cpu").prepare(unet, "unet")
    assert not any(type(m) is fastops.Float32Linear for m in unet.modules())
    assert all(torch.equal(state[k], v) for k, v in unet.state_dict().items())


# -- the report ----------------------------------------------------------------------------------

def test_generate_records_the_plan_and_bf16_stays_close_to_fp32(tiny, tmp_path):
    cfg, vae, unet, controlnet = tiny
    fov = {"fov_mm": {"min": [128.0] * 3, "max": [320.0] * 3}}
    model_dir = models.save_model_folder(tmp_path / "model", cfg, vae, unet, controlnet, 0.8, fov)
    mask = tmp_path / "mask.nii.gz"
    from maisi2 import volume_io

    volume_io.save_label_map(mask, G.phantom_mask((32, 32, 32), (8.0, 8.0, 8.0), seed=1))
    cts = {}
    for precision, seed in (("fp32", 0), ("bf16", 0), ("fp32", 1)):
        options = G.GenerateOptions(steps=2, seed=seed, precision=precision, write_preview=False, write_label=False)
        result = G.generate(mask, tmp_path / f"{precision}{seed}.nii.gz", model=model_dir, options=options)
        assert result.report["precision"] == precision
        assert result.report["compute_plan"]["requested"] == precision
        assert result.report["compute_plan"]["networks"]["vae_decoder"]["dtype"] == (
            "bfloat16" if precision == "bf16" else "float32")
        cts[precision, seed] = np.asarray(nib.load(result.paths.ct).dataobj).astype(float)
    assert json.loads((tmp_path / "bf160_report.json").read_text())["compute_plan"]["chosen"] == "bf16"
    # bf16 moves the CT far less than another seed does
    assert np.abs(cts["bf16", 0] - cts["fp32", 0]).mean() < 0.2 * np.abs(cts["fp32", 1] - cts["fp32", 0]).mean()
    with pytest.raises(ValueError, match="precision must be one of"):
        G.generate(mask, tmp_path / "x.nii.gz", model=model_dir, options=G.GenerateOptions(precision="half"))


# -- bf16 convolutions between float32 activations (the CPU's bf16 plan) -------------------------

def test_bf16_conv_is_a_convolution_of_bf16_rounded_operands_with_float32_out():
    g = torch.Generator().manual_seed(0)
    conv = fastops.FastConv3d(6, 5, 3, padding=1)
    x = torch.randn(1, 6, 7, 6, 5, generator=g)
    restore = fastops.lower_convolutions(conv, keep_last=False)
    assert type(conv) is fastops.Bf16Conv3d
    with torch.no_grad():
        got = conv(x)
        want = nn.functional.conv3d(x.bfloat16().float(), conv.weight.bfloat16().float(), padding=1).bfloat16().float()
        want += conv.bias.reshape(1, -1, 1, 1, 1)
        other = fastops.conv3d_of(conv, x, (0, 1, 1))  # another padding, as the streamed decode asks
    assert got.dtype == torch.float32 and got.shape == (1, 5, 7, 6, 5)
    # the kernel accumulates in float32 in its own order: equal up to one bf16 rounding of the output
    torch.testing.assert_close(got, want, rtol=2**-7, atol=1e-5)
    assert other.shape == (1, 5, 5, 6, 5)
    torch.testing.assert_close(other, got[:, :, 1:-1], rtol=0, atol=0)
    restore()
    assert type(conv) is fastops.FastConv3d and "_bf16_weight" not in vars(conv)
    with torch.no_grad():  # float32 again, and conv3d_of is exactly F.conv3d there
        torch.testing.assert_close(fastops.conv3d_of(conv, x, 1), nn.functional.conv3d(x, conv.weight, conv.bias, padding=1),
                                   rtol=0, atol=0)


def test_lowering_keeps_pointwise_and_output_convolutions_float32(tiny):
    _, vae, _, _ = tiny
    convs = [m for m in vae.decoder.modules() if isinstance(m, nn.Conv3d)]
    classes = [type(m) for m in convs]
    plan = compute.choose_plan("bf16", "cpu", cpu=SAPPHIRE)
    with plan.lowered(vae.decoder, "vae_decoder"):
        lowered = [type(m) is fastops.Bf16Conv3d for m in convs]
        three = [m.kernel_size == (3, 3, 3) for m in convs]
        assert lowered[:-1] == three[:-1] and not lowered[-1] and three[-1]  # the output conv stays float32
    assert [type(m) for m in convs] == classes
    # a float32 plan, and a bf16 plan on CUDA (autocast there), change nothing
    for other in (compute.choose_plan("fp32", "cpu"), compute.choose_plan("bf16", "cuda")):
        with other.lowered(vae.decoder, "vae_decoder"):
            assert [type(m) for m in convs] == classes


def test_average_2x2x2_leaves_a_float32_input_alone():
    """It used to sum into a view of a float32 channels-last input: the UNet's skip connection."""
    x = torch.randn(1, 3, 4, 4, 4).contiguous(memory_format=torch.channels_last_3d)
    before = x.clone()
    fastops.average_2x2x2(x)
    torch.testing.assert_close(x, before, rtol=0, atol=0)


# The bf16 decoder's bound on a small case: bfloat16 operands carry a relative rounding of at most
# u = 2^-8; the tiny decoder chains 7 lowered convolutions between float32 norms, so even if each
# added its full u the image would move by < 10u in relative L2 (measured: see the test).
BF16_DECODE_RELATIVE_L2 = 10 * 2**-8


@pytest.mark.parametrize("tiled", [False, True])
def test_bf16_decode_stays_within_the_rounding_bound_and_fp32_is_unchanged(tiny, tiled):
    from maisi2 import autoencoder

    cfg, vae, _, _ = tiny
    z = torch.randn(1, 4, 18, 8, 8, generator=torch.Generator().manual_seed(3))
    if tiled:  # two tiles with whole-volume statistics: the plain vae.decode on each
        halo = autoencoder.decoder_context(cfg.vae)
        starts = tuple(autoencoder.tiles.axis_starts(n, t, 2 * halo + 2) for n, t in zip((18, 8, 8), (16, 8, 8)))
        plan = autoencoder.TilePlan((18, 8, 8), (16, 8, 8), starts, halo, 2, 4, 0)
        assert plan.count == 2
    else:  # the streamed whole-volume decode
        plan = autoencoder.plan_tiles(z.shape[2:], cfg.vae, 1.0e12)
        assert plan.count == 1 and autoencoder.streamable_decoder(vae)
    fp32 = compute.choose_plan("fp32", "cpu")
    plain = autoencoder.decode_tiled(vae, z, plan)
    torch.testing.assert_close(autoencoder.decode_tiled(vae, z, plan, arithmetic=fp32), plain, rtol=0, atol=0)
    low = autoencoder.decode_tiled(vae, z, plan, arithmetic=compute.choose_plan("bf16", "cpu"))
    error = float((low - plain).norm() / plain.norm())
    print(f"bf16 decode, relative L2 against float32: {error:.5f}")
    assert low.dtype == torch.float32 and 0 < error < BF16_DECODE_RELATIVE_L2
    assert not any(type(m) is fastops.Bf16Conv3d for m in vae.modules())  # as before afterwards


def test_the_controlnet_mask_embedding_stays_float32_under_bf16(tiny):
    """It runs once per generation (cached), so bf16 there would add error and save nothing."""
    _, _, _, controlnet = tiny
    embedding = set(map(id, controlnet.controlnet_cond_embedding.modules()))
    plan = compute.choose_plan("bf16", "cpu", cpu=SAPPHIRE)
    with plan.lowered(controlnet, "controlnet"):
        lowered = [id(m) in embedding for m in controlnet.modules() if type(m) is fastops.Bf16Conv3d]
        assert lowered and not any(lowered)  # the rest of the ControlNet is lowered, the embedding is not
        kept = [m for m in controlnet.controlnet_cond_embedding.modules() if isinstance(m, nn.Conv3d)]
        assert kept and all(type(m) is not fastops.Bf16Conv3d for m in kept)


def test_bf16_streamed_decode_is_the_same_spilled_to_files_or_in_memory(tiny, tmp_path):
    """A bf16 decoder stores its tensors channels-last; spilled, they are views of (1, D, H, W, C) files."""
    from maisi2 import autoencoder

    cfg, vae, _, _ = tiny
    z = torch.randn(1, 4, 12, 8, 6, generator=torch.Generator().manual_seed(4))
    plan = autoencoder.plan_tiles(z.shape[2:], cfg.vae, 1.0e12)
    spilled = dataclasses.replace(plan, spill_dir=str(tmp_path))  # what a plan too large for memory says
    assert spilled.count == 1
    bf16 = compute.choose_plan("bf16", "cpu")
    in_memory = autoencoder.decode_tiled(vae, z, plan, arithmetic=bf16)
    torch.testing.assert_close(autoencoder.decode_tiled(vae, z, spilled, arithmetic=bf16), in_memory, rtol=0, atol=0)
    assert in_memory.is_contiguous()
    plain = autoencoder.decode_tiled(vae, z, plan)
    assert float((in_memory - plain).norm() / plain.norm()) < BF16_DECODE_RELATIVE_L2
    assert list(tmp_path.iterdir()) == []  # the spill files went with their tensors
