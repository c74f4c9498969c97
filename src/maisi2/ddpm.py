"""DDPM / DDIM baseline: the objective and samplers the paper's steps comparison sets against flow.

MAISI (v1) trained the same latent UNet with DDPM: a discrete time ``t`` in ``{0, ..., T-1}``
(T = 1000; larger t is noisier), ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise`` with
``a_t = prod_{s<=t} (1 - beta_s)``, and the network predicting the noise (epsilon) by default.
The schedule is MAISI's: ``beta`` from 0.0015 to 0.0195, "scaled_linear_beta" (linear in sqrt(beta)).

The stepping math is MONAI's (``DDPMScheduler`` / ``DDIMScheduler``), always built with
``clip_sample=False``: MONAI defaults to clipping the predicted x0 to [-1, 1], which would wreck
latents (they are not confined to [-1, 1]); the released config turns it off.

Samplers share ``flow.sample_euler``'s shape: ``eps_fn(x, t_batch) -> network output`` with
``t_batch`` (B,) float32. A fresh scheduler is built per call, so nothing is mutated between calls.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from maisi2.errors import InvalidInput

__all__ = [
    "MAISI_DDPM_SCHEDULE",
    "make_scheduler",
    "alphas_cumprod",
    "ddpm_add_noise",
    "ddpm_training_target",
    "predicted_x0_from_eps",
    "flow_time_at_same_noise",
    "sample_ddpm_training_t",
    "ddim_timesteps",
    "sample_ddpm",
    "sample_ddim",
]

# reference/maisi/config_network_rflow.json, "mask_generation_noise_scheduler" (MAISI's DDPM).
MAISI_DDPM_SCHEDULE: Mapping[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0015,
    "beta_end": 0.0195,
    "schedule": "scaled_linear_beta",
}
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_scheduler(
    kind: str = "ddpm", prediction_type: str = "epsilon", schedule: Mapping[str, Any] | None = None
) -> DDPMScheduler | DDIMScheduler:
    """A fresh MONAI scheduler (``kind`` "ddpm" or "ddim") with the MAISI schedule, no clipping."""
    if prediction_type not in PREDICTION_TYPES:
        raise InvalidInput(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}; got {prediction_type!r}")
    args = dict(MAISI_DDPM_SCHEDULE if schedule is None else schedule)
    if kind == "ddpm":
        return DDPMScheduler(clip_sample=False, prediction_type=prediction_type, **args)
    if kind == "ddim":
        return DDIMScheduler(clip_sample=False, prediction_type=prediction_type, **args)
    raise InvalidInput(f"kind must be 'ddpm' or 'ddim'; got {kind!r}")


def alphas_cumprod(schedule: Mapping[str, Any] | None = None) -> torch.Tensor:
    """``a_t`` for t = 0..T-1, (T,) float32 (a_0 close to 1, a_{T-1} close to 0)."""
    return make_scheduler("ddpm", schedule=schedule).alphas_cumprod


def _signal_noise_scales(t: torch.Tensor, like: torch.Tensor, schedule) -> tuple[torch.Tensor, torch.Tensor]:
    """``sqrt(a_t)`` and ``sqrt(1 - a_t)`` shaped (B, 1, ...) to broadcast against ``like``."""
    t = torch.as_tensor(t, device=like.device).long()
    if t.ndim != 1 or t.shape[0] != like.shape[0]:
        raise InvalidInput(f"t must have shape ({like.shape[0]},), one integer time per sample; got {tuple(t.shape)}")
    # Same order of operations as MONAI's add_noise (cast the table, index, then ** 0.5).
    a = alphas_cumprod(schedule).to(device=like.device, dtype=like.dtype)[t]
    view = (-1,) + (1,) * (like.ndim - 1)
    return (a**0.5).reshape(view), ((1 - a) ** 0.5).reshape(view)


def ddpm_add_noise(
    x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, schedule: Mapping[str, Any] | None = None
) -> torch.Tensor:
    """``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise``; x0, noise (B, C, *spatial), t (B,) integers."""
    if x0.shape != noise.shape:
        raise InvalidInput(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must have the same shape")
    signal, sigma = _signal_noise_scales(t, x0, schedule)
    return signal * x0 + sigma * noise


def ddpm_training_target(
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    prediction_type: str = "epsilon",
    schedule: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """What the network is trained to output at ``ddpm_add_noise(x0, noise, t)``.

    "epsilon": the noise; "sample": x0; "v_prediction": ``sqrt(a_t) noise - sqrt(1 - a_t) x0``.
    """
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        signal, sigma = _signal_noise_scales(t, x0, schedule)
        return signal * noise - sigma * x0
    raise InvalidInput(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}; got {prediction_type!r}")


def predicted_x0_from_eps(
    x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, schedule: Mapping[str, Any] | None = None
) -> torch.Tensor:
    """One jump to data from a noise prediction: ``(x_t - sqrt(1 - a_t) eps) / sqrt(a_t)``; an
    epsilon error reaches x0 multiplied by ``sqrt((1 - a_t) / a_t)`` (84 at t = 999 on MAISI's schedule)."""
    signal, sigma = _signal_noise_scales(t, x_t, schedule)
    return (x_t - sigma * eps) / signal


def flow_time_at_same_noise(
    t: torch.Tensor, num_train_timesteps: int = 1000, schedule: Mapping[str, Any] | None = None
) -> torch.Tensor:
    """The rectified-flow time (``flow.add_noise``'s convention, T = pure noise) whose x_t has the
    signal-to-noise ratio of DDPM's x_t at integer ``t``; (B,) float64.

    DDPM mixes ``sqrt(a) x0 + sqrt(1 - a) noise``, the flow ``(1 - u) x0 + u noise``: equal ratios
    need ``u = sqrt(1 - a) / (sqrt(a) + sqrt(1 - a))``, and then the flow's x_t is DDPM's divided by
    ``sqrt(a) + sqrt(1 - a)``, so the two objectives are compared on the same noisy input up to a
    scale. Comparing at the same t instead would give the flow far more signal at high t.
    """
    a = alphas_cumprod(schedule).double()[torch.as_tensor(t).long()]
    return num_train_timesteps * (1 - a).sqrt() / (a.sqrt() + (1 - a).sqrt())


def sample_ddpm_training_t(
    batch: int,
    num_train_timesteps: int = 1000,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Uniform integer training times in ``[0, T)``, (batch,) int64."""
    if device is None:
        device = generator.device if generator is not None else "cpu"
    return torch.randint(0, num_train_timesteps, (batch,), generator=generator, device=device)


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """DDIM grid ``[(N-1)k, ..., k, 0]`` with stride ``k = T // N``, (N,) int64.

    MONAI's DDIM step always jumps from t to ``t - T // N``; its own ``set_timesteps`` grid
    (``linspace(T-1, 0, N)``) has a different spacing unless N = T (at N = 30 it steps 33 but
    evaluates the next model call 34-35 later), so the sample and the time fed to the network
    drift apart. This stride-k grid (the DDIM paper's uniform skip) keeps every step landing
    exactly on the next grid time; the step from 0 goes to the clean end (a = 1).
    """
    if not 1 <= num_steps <= num_train_timesteps:
        raise InvalidInput(f"num_steps must be between 1 and num_train_timesteps={num_train_timesteps}; got {num_steps}")
    stride = num_train_timesteps // num_steps
    return torch.arange(num_steps - 1, -1, -1, dtype=torch.int64) * stride


def _denoise(step: Callable, eps_fn: EpsFn, x, timesteps, progress: bool, callback, desc: str) -> torch.Tensor:
    """The loop both samplers share: model call, scheduler step, optional callback."""
    steps = timesteps.tolist()
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=desc)
    for i, t in enumerate(steps):
        t_batch = torch.full((x.shape[0],), float(t), dtype=torch.float32, device=x.device)
        out = eps_fn(x, t_batch)
        x, x0_hat = step(out, t, x)
        if callback is not None:
            callback({"i": i, "x": x, "t": t, "model_output": out, "x0_hat": x0_hat})
    return x


@torch.no_grad()
def sample_ddpm(
    eps_fn: EpsFn,
    x: torch.Tensor,
    num_steps: int = 1000,
    prediction_type: str = "epsilon",
    schedule: Mapping[str, Any] | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    callback: Callable[[dict], None] | None = None,
) -> torch.Tensor:
    """Ancestral DDPM sampling from noise ``x`` (B, C, *spatial) through every time T-1 .. 0.

    Stochastic: pass a ``generator`` (on x's device) for reproducible draws. ``num_steps`` must
    equal T, because MONAI's DDPM step always moves from t to t-1 (skipping would be wrong).
    """
    sched = make_scheduler("ddpm", prediction_type, schedule)
    if num_steps != sched.num_train_timesteps:
        raise InvalidInput(
            f"DDPM sampling needs all {sched.num_train_timesteps} steps (got num_steps={num_steps}); "
            "use sample_ddim for fewer steps"
        )
    sched.set_timesteps(num_steps)
    step = lambda out, t, x: sched.step(out, t, x, generator=generator)  # noqa: E731
    return _denoise(step, eps_fn, x, sched.timesteps, progress, callback, "ddpm")


@torch.no_grad()
def sample_ddim(
    eps_fn: EpsFn,
    x: torch.Tensor,
    num_steps: int = 30,
    prediction_type: str = "epsilon",
    schedule: Mapping[str, Any] | None = None,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    progress: bool = False,
    callback: Callable[[dict], None] | None = None,
) -> torch.Tensor:
    """DDIM sampling in ``num_steps`` steps on the ``ddim_timesteps`` grid.

    eta = 0 (default) is the deterministic DDIM; eta = 1 adds DDPM-like noise (use ``generator``).
    """
    sched = make_scheduler("ddim", prediction_type, schedule)
    timesteps = ddim_timesteps(num_steps, sched.num_train_timesteps)
    sched.set_timesteps(num_steps)  # only to set the stride T // N that its step uses
    step = lambda out, t, x: sched.step(out, t, x, eta=eta, generator=generator)  # noqa: E731
    return _denoise(step, eps_fn, x, timesteps, progress, callback, "ddim")
