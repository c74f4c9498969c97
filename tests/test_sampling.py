"""The sampling loop: seeded noise, Euler steps through `flow` + `nets`, ControlNet, guidance."""

import pytest
import torch

from maisi2 import flow, nets, sampling
from maisi2.config import get_config
from maisi2.labels import label_id

LATENT = (4, 8, 8, 8)  # tiny preset: image 32^3


@pytest.fixture(scope="module")
def tiny():
    cfg = get_config("tiny")
    torch.manual_seed(0)
    unet, controlnet = nets.build_unet(cfg).eval(), nets.build_controlnet(cfg).eval()
    # Fresh networks start with zeroed output convolutions (the UNet predicts v = 0, the ControlNet
    # adds nothing); give those weights so that time, noise and mask visibly matter here.
    with torch.no_grad():
        for net in (unet, controlnet):
            for p in net.parameters():
                if p.abs().sum() == 0:
                    p.normal_(0, 0.05)
    return cfg, unet, controlnet


def _mask(with_tumor: bool) -> torch.Tensor:
    mask = torch.full((1, 1, 32, 32, 32), label_id("body"), dtype=torch.int64)
    mask[..., 4:28, 4:20, 6:26] = label_id("liver")
    if with_tumor:
        mask[..., 10:16, 8:14, 12:18] = label_id("hepatic tumor")
    return mask


def _cond(mask: torch.Tensor) -> nets.Conditioning:
    return nets.Conditioning(torch.tensor([[2.0, 2.0, 2.0]]), torch.tensor([1]), nets.mask_to_bitplanes(mask))


def test_initial_noise_is_seeded_privately():
    torch.manual_seed(123)
    a = sampling.initial_noise(LATENT, seed=5)
    global_state = torch.get_rng_state()
    b = sampling.initial_noise(LATENT, seed=5)
    assert torch.equal(a, b) and a.shape == (1, *LATENT) and a.dtype == torch.float32
    assert torch.equal(torch.get_rng_state(), global_state)  # the global RNG was not used
    assert not torch.equal(a, sampling.initial_noise(LATENT, seed=6))
    with pytest.raises(ValueError, match="latent_shape"):
        sampling.initial_noise((8, 8, 8), seed=0)


def test_sample_latent_is_the_flow_euler_loop_over_predict_velocity(tiny):
    """Same result as integrating by hand with flow's grid and nets.predict_velocity."""
    cfg, unet, controlnet = tiny
    cond = _cond(_mask(False))
    z = sampling.sample_latent(unet, cond, LATENT, cfg.flow, controlnet=controlnet, steps=2, seed=1)
    x = sampling.initial_noise(LATENT, seed=1)
    timesteps, next_timesteps = flow.inference_timesteps(2, LATENT[1:], cfg.flow)
    with torch.no_grad():
        for t, t_next in zip(timesteps.tolist(), next_timesteps.tolist()):
            v = nets.predict_velocity(unet, x, torch.tensor([t]), cond, controlnet)
            x = flow.euler_step(x, v, t, t_next)
    torch.testing.assert_close(z, x, rtol=0, atol=0)


def test_deterministic_for_a_seed_and_seed_dependent(tiny):
    cfg, unet, controlnet = tiny
    cond = _cond(_mask(False))
    run = lambda seed: sampling.sample_latent(unet, cond, LATENT, cfg.flow, controlnet=controlnet, steps=2, seed=seed)
    a, b, c = run(3), run(3), run(4)
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 0.1


class _RecordingUNet(torch.nn.Module):
    """Stands in for the UNet: v = -x/2, and records the timesteps it is called at."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the sampler a device to read
        self.seen = []

    def forward(self, x, timesteps, class_labels, spacing_tensor, **residuals):
        self.seen.append(float(timesteps[0]))
        return -0.5 * x


def test_exact_grid_option_reaches_the_loop(tiny):
    cfg = tiny[0]
    cond = nets.Conditioning(torch.ones(1, 3), torch.tensor([1]))
    runs = {}
    for exact in (False, True):
        unet = _RecordingUNet()
        z = sampling.sample_latent(unet, cond, LATENT, cfg.flow, steps=7, seed=0, exact_grid=exact)
        expected = flow.inference_timesteps(7, LATENT[1:], cfg.flow, exact=exact)[0]
        assert unet.seen == pytest.approx(expected.tolist(), abs=1e-3)
        runs[exact] = z
    # 7 steps: MONAI's float16 grid rounds 857.14 to 857 and truncates next times; exact does not
    assert not torch.equal(runs[False], runs[True])
    assert (runs[False] - runs[True]).abs().max() < 0.05


def test_the_controlnet_and_the_mask_matter(tiny):
    cfg, unet, controlnet = tiny
    plain = sampling.sample_latent(unet, _cond(_mask(False)), LATENT, cfg.flow, steps=2, seed=0)
    controlled = sampling.sample_latent(unet, _cond(_mask(False)), LATENT, cfg.flow, controlnet=controlnet, steps=2, seed=0)
    other_mask = sampling.sample_latent(unet, _cond(_mask(True)), LATENT, cfg.flow, controlnet=controlnet, steps=2, seed=0)
    assert not torch.allclose(plain, controlled)
    assert not torch.allclose(controlled, other_mask)


def test_guided_velocity_formula():
    v_cond, v_uncond = torch.tensor([3.0, -1.0]), torch.tensor([1.0, 1.0])
    torch.testing.assert_close(sampling.guided_velocity(v_cond, v_uncond, 1.0), v_cond)
    torch.testing.assert_close(sampling.guided_velocity(v_cond, v_uncond, 0.0), v_uncond)
    torch.testing.assert_close(sampling.guided_velocity(v_cond, v_uncond, 2.0), torch.tensor([5.0, -3.0]))


def test_guidance_runs_both_branches_and_extrapolates(tiny):
    cfg, unet, controlnet = tiny
    cond, uncond = _cond(_mask(True)), _cond(_mask(False))
    calls = []
    record = lambda info: calls.append(info["i"])
    run = lambda scale: sampling.sample_latent(unet, cond, LATENT, cfg.flow, controlnet=controlnet, uncond=uncond,
                                               cfg_scale=scale, steps=2, seed=0, callback=record)
    plain = sampling.sample_latent(unet, cond, LATENT, cfg.flow, controlnet=controlnet, steps=2, seed=0)
    guided = run(3.0)
    assert calls == [0, 1]
    assert (guided - plain).abs().max() > 1e-4

    # one velocity evaluation: two network calls (conditional, then unconditional)
    velocity = sampling.velocity_function(unet, cond, controlnet, uncond, 3.0)
    x, t = sampling.initial_noise(LATENT, 0), torch.tensor([500.0])
    with torch.no_grad():
        v_cond = nets.predict_velocity(unet, x, t, cond, controlnet)
        v_uncond = nets.predict_velocity(unet, x, t, uncond, controlnet)
        torch.testing.assert_close(velocity(x, t), v_uncond + 3.0 * (v_cond - v_uncond))


def test_guidance_needs_both_parts(tiny):
    cfg, unet, controlnet = tiny
    with pytest.raises(ValueError, match="uncond"):
        sampling.velocity_function(unet, _cond(_mask(True)), controlnet, None, 2.0)


def test_memory_estimate_grows_with_size_and_counts_attention():
    cfg = get_config("maisi-v2")
    small = sampling.estimate_sampling_bytes(cfg, (32, 32, 32))
    assert 0.3e9 < small < 2e9  # measured ~0.6 GB growth for one step at 32^3
    big = sampling.estimate_sampling_bytes(cfg, (128, 128, 192))
    flash_fp16 = sampling.estimate_sampling_bytes(cfg, (128, 128, 192), flash=True, half=True)
    assert big > 100e9  # explicit 49152-token attention: a CPU cannot do the released full size
    assert flash_fp16 < 40e9  # the released 512x512x768 setting runs on an 80 GB GPU
    assert sampling.estimate_sampling_bytes(cfg, (32, 32, 32), guidance=True) > small
