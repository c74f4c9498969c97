"""maisi2.ddpm: the DDPM objective and the DDPM/DDIM samplers (MONAI schedulers, MAISI schedule)."""

from __future__ import annotations

import pytest
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from maisi2 import ddpm

T = 1000


def maisi_alphas_float64() -> torch.Tensor:
    """a_t written out from the schedule's definition, independently of MONAI."""
    betas = torch.linspace(0.0015**0.5, 0.0195**0.5, T, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


def oracle_eps(x0: torch.Tensor):
    """The exact noise given x_t and t, for a known x0 (what a perfect network would output)."""
    a = maisi_alphas_float64()

    def eps_fn(x, t_batch):
        a_t = a[t_batch.long()].reshape(-1, *([1] * (x.ndim - 1)))
        return ((x.double() - a_t.sqrt() * x0.double()) / (1 - a_t).sqrt()).to(x.dtype)

    return eps_fn


def data(seed=0, shape=(2, 4, 3, 3, 2)):
    g = torch.Generator().manual_seed(seed)
    # Values well outside [-1, 1]: clipping the predicted x0 (MONAI's default) would show.
    return 3 * torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def test_schedulers_do_not_clip_and_use_the_maisi_schedule():
    for kind, cls in (("ddpm", DDPMScheduler), ("ddim", DDIMScheduler)):
        sched = ddpm.make_scheduler(kind)
        assert isinstance(sched, cls) and sched.clip_sample is False
        assert sched.num_train_timesteps == T
        assert torch.allclose(sched.alphas_cumprod.double(), maisi_alphas_float64(), rtol=1e-5)
    with pytest.raises(ValueError, match="kind"):
        ddpm.make_scheduler("pndm")
    with pytest.raises(ValueError, match="prediction_type"):
        ddpm.make_scheduler("ddpm", prediction_type="noise")


def test_add_noise_matches_monai_and_the_formula():
    x0, noise = data()
    t = torch.tensor([0, 999])
    got = ddpm.ddpm_add_noise(x0, noise, t)
    assert torch.equal(got, ddpm.make_scheduler().add_noise(x0, noise, t))
    a = maisi_alphas_float64()[t].reshape(-1, 1, 1, 1, 1)
    expected = a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double()
    assert torch.allclose(got.double(), expected, atol=1e-5)
    assert ddpm.alphas_cumprod()[0] > 0.998 and ddpm.alphas_cumprod()[-1] < 2e-4


def test_training_targets():
    x0, noise = data(1)
    t = ddpm.sample_ddpm_training_t(2, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and ((0 <= t) & (t < T)).all()
    assert torch.equal(ddpm.ddpm_training_target(x0, noise, t), noise)
    assert torch.equal(ddpm.ddpm_training_target(x0, noise, t, "sample"), x0)
    v = ddpm.ddpm_training_target(x0, noise, t, "v_prediction")
    assert torch.equal(v, ddpm.make_scheduler().get_velocity(x0, noise, t))
    with pytest.raises(ValueError, match="prediction_type"):
        ddpm.ddpm_training_target(x0, noise, t, "flow")
    with pytest.raises(ValueError, match="one integer time per sample"):
        ddpm.ddpm_add_noise(x0, noise, torch.tensor(5))


def test_ddim_grid_lands_each_step_on_the_next_time():
    for n in (5, 10, 30, 50, 1000):
        grid = ddpm.ddim_timesteps(n, T)
        assert grid.shape == (n,) and grid[-1] == 0
        stride = T // n  # the jump MONAI's DDIM step makes
        assert torch.equal(grid[:-1] - stride, grid[1:])
    # Why not MONAI's own grid: at 30 steps its spacing (34-35) differs from its step (33).
    monai = DDIMScheduler(**ddpm.MAISI_DDPM_SCHEDULE)
    monai.set_timesteps(30)
    assert not torch.equal(monai.timesteps[:-1] - T // 30, monai.timesteps[1:])
    with pytest.raises(ValueError, match="num_steps"):
        ddpm.ddim_timesteps(0)


@pytest.mark.parametrize("num_steps", [5, 30])
def test_ddim_with_oracle_eps_recovers_x0(num_steps):
    x0, noise = data(2)
    out = ddpm.sample_ddim(oracle_eps(x0), noise, num_steps=num_steps)
    assert (out - x0).abs().max().item() < 1e-4


def test_ddim_step_is_the_ddim_update():
    """Independent float64 check of grid + step: x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev) eps."""
    x0, x = data(3)
    toy_eps = lambda x, t_batch: 0.5 * x + 1e-3 * t_batch.reshape(-1, 1, 1, 1, 1)  # noqa: E731
    out = ddpm.sample_ddim(toy_eps, x.clone(), num_steps=4)

    a = maisi_alphas_float64()
    grid = ddpm.ddim_timesteps(4, T).tolist()
    y = x.double()
    for t, t_prev in zip(grid, grid[1:] + [None]):
        a_prev = a[t_prev] if t_prev is not None else torch.tensor(1.0, dtype=torch.float64)
        eps = 0.5 * y + 1e-3 * t
        x0_hat = (y - (1 - a[t]).sqrt() * eps) / a[t].sqrt()
        y = a_prev.sqrt() * x0_hat + (1 - a_prev).sqrt() * eps
    assert torch.allclose(out.double(), y, rtol=1e-4, atol=1e-4)


def test_ddpm_sampling_is_reproducible_with_a_generator_and_recovers_x0_from_an_oracle():
    x0, noise = data(4, shape=(1, 2, 2, 2, 2))
    run = lambda seed: ddpm.sample_ddpm(  # noqa: E731
        oracle_eps(x0), noise.clone(), generator=torch.Generator().manual_seed(seed)
    )
    first, again, other = run(0), run(0), run(1)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    # The last step (t = 0) adds no noise and, with the exact x0 prediction, returns x0.
    assert (first - x0).abs().max().item() < 1e-3


def test_ddpm_refuses_skipped_steps_and_samplers_report_progress():
    x = torch.zeros((1, 1, 2, 2, 2))
    with pytest.raises(ValueError, match="sample_ddim"):
        ddpm.sample_ddpm(lambda x, t: torch.zeros_like(x), x, num_steps=30)
    seen = []

    def eps_fn(x, t_batch):
        assert t_batch.shape == (1,) and t_batch.dtype == torch.float32
        return torch.zeros_like(x)

    ddpm.sample_ddim(eps_fn, x, num_steps=3, progress=True, callback=lambda d: seen.append(d["t"]))
    assert seen == ddpm.ddim_timesteps(3).tolist()


def test_ddim_with_eta_is_stochastic_but_reproducible():
    x0, noise = data(5)
    run = lambda seed: ddpm.sample_ddim(  # noqa: E731
        lambda x, t: 0.1 * x, noise.clone(), num_steps=10, eta=1.0, generator=torch.Generator().manual_seed(seed)
    )
    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def test_flow_time_at_same_noise_gives_the_same_input_up_to_a_scale():
    """At the matched time the flow's x_t is DDPM's x_t divided by sqrt(a) + sqrt(1 - a): the same
    signal-to-noise ratio, so both objectives are asked about the same noisy latent."""
    from maisi2 import flow

    x0, noise = torch.randn(4, 2, 3, 3, 3, dtype=torch.float64), torch.randn(4, 2, 3, 3, 3, dtype=torch.float64)
    t = torch.tensor([0, 50, 600, 999])
    u = ddpm.flow_time_at_same_noise(t)
    a = ddpm.alphas_cumprod().double()[t].view(-1, 1, 1, 1, 1)
    expected = ddpm.ddpm_add_noise(x0, noise, t) / (a.sqrt() + (1 - a).sqrt())
    assert torch.allclose(flow.add_noise(x0, noise, u), expected, atol=1e-6)
    assert torch.all(u[1:] > u[:-1]) and 0 < u[0] < u[-1] < 1000  # monotone, inside the flow's range
