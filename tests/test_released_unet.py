"""The released-size flow UNet (random weights) takes one sampling step at a 32^3 latent on CPU."""

import pytest
import torch

from maisi2 import flow, nets
from maisi2.config import get_config

pytestmark = pytest.mark.slow


def test_maisi_v2_unet_one_euler_step_at_32_cubed():
    cfg = get_config("maisi-v2")
    torch.manual_seed(0)
    unet = nets.build_unet(cfg, device="cpu").eval()
    x = torch.randn(1, 4, 32, 32, 32)
    cond = nets.Conditioning(spacing=torch.tensor([[1.5, 1.5, 2.0]]), modality=torch.tensor([1]))
    timesteps, next_timesteps = flow.inference_timesteps(30, (32, 32, 32), cfg.flow)
    calls = []

    def velocity(x_t, t):
        calls.append(float(t[0]))
        return nets.predict_velocity(unet, x_t, t, cond)

    out = flow.sample_euler(velocity, x, timesteps[:1], next_timesteps[:1], T=cfg.flow.num_train_timesteps)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert calls == [1000.0]  # the first step starts from pure noise
