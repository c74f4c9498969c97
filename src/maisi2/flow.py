"""Rectified-flow math: the one place the time convention lives.

Convention (MONAI ``RFlowScheduler``, which the released MAISI-v2 weights were trained with):

* Time ``t`` runs over ``[0, T]`` with ``T = num_train_timesteps = 1000``; **t = T is pure noise**,
  t = 0 is data.
* Noising: ``x_t = (1 - t/T) * x0 + (t/T) * noise``.
* The network predicts the velocity ``v = x0 - noise`` (it points from noise to data).
* An Euler step from ``t`` to ``t_next < t`` is ``x <- x + v * (t - t_next) / T``.
* Resolution shift: for a latent of ``n`` voxels, ``r = (n / base_img_size_numel) ** (1/3)`` and
  a time ``s = t/T`` becomes ``s' = r*s / (1 + (r - 1)*s)``. For ``r > 1`` (latents larger than
  the base) it pushes times towards the noisy end, where large volumes need more steps; it is
  used both for training-time sampling and for the inference grid.

Parity with MONAI (``inference_timesteps(..., exact=False)``, the default): MONAI computes the
shifted grid in float32 (the official code passes the voxel count as an int64 tensor), casts it to
float16 (error up to 0.17-0.24 time units at 30 steps), and its ``step`` truncates the next timestep
to an integer. The truncation lengthens every step by the fractional part of its end point, so the
MONAI steps sum to more than 1 (1.010 at 30 steps on a 32^3 latent, up to ~1.02 at 50 steps).
``exact=True`` gives a float64 grid whose steps sum to 1.

Every function is pure: tensors in, tensors out, nothing stored between calls.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

from maisi2.errors import InvalidInput

from .config import FlowConfig

__all__ = [
    "add_noise",
    "velocity_target",
    "predicted_x0",
    "resolution_ratio",
    "shift_time",
    "sample_training_t",
    "inference_timesteps",
    "euler_step",
    "sample_euler",
]

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _per_sample(t: torch.Tensor | float, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Shape a scalar or (B,) time so it broadcasts against ``like`` (B, C, *spatial)."""
    t = torch.as_tensor(t, device=like.device).to(dtype)
    if t.ndim == 0:
        return t
    if t.ndim != 1 or t.shape[0] != like.shape[0]:
        raise InvalidInput(f"t must be a scalar or have shape ({like.shape[0]},) to match the batch; got {tuple(t.shape)}")
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | float, T: int = 1000) -> torch.Tensor:
    """Noisy sample ``x_t = (1 - t/T) x0 + (t/T) noise``.

    x0, noise: (B, C, *spatial); t: scalar or (B,). Returns (B, C, *spatial).
    Computed as MONAI does (``keep = 1 - t/T`` then ``(1 - keep)`` for the noise weight) so the
    result is bit-identical to ``RFlowScheduler.add_noise`` in float32.
    """
    if x0.shape != noise.shape:
        raise InvalidInput(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must have the same shape")
    # float32 at least (MONAI's t.float()), float64 when the data is float64.
    dtype = torch.promote_types(x0.dtype, torch.float32)
    keep = 1 - _per_sample(t, x0, dtype) / T
    return keep * x0 + (1 - keep) * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The flow-matching target ``v = x0 - noise`` (constant along each straight path)."""
    return x0 - noise


def predicted_x0(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor | float, T: int = 1000) -> torch.Tensor:
    """One jump to data: ``x0_hat = x_t + v * t/T`` (exact when ``v`` is the true velocity)."""
    dtype = torch.promote_types(x_t.dtype, torch.float32)
    return x_t + v * (_per_sample(t, x_t, dtype) / T)


def resolution_ratio(
    latent_spatial_shape: Sequence[int], base_numel: int, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """``r = (prod(latent_spatial_shape) / base_numel) ** (1 / ndim)`` as a 0-d tensor.

    16^3 -> 0.5, 32^3 -> 1, 64^3 -> 2 for base 32^3. ``dtype=torch.float32`` reproduces MONAI,
    which gets float32 because the official code passes the voxel count as an int64 tensor.
    """
    shape = tuple(int(s) for s in latent_spatial_shape)
    if not shape or min(shape) < 1:
        raise InvalidInput(f"latent_spatial_shape must be positive sizes, e.g. (32, 32, 32); got {latent_spatial_shape}")
    if base_numel < 1:
        raise InvalidInput(f"base_numel must be positive (flow.base_img_size_numel); got {base_numel}")
    numel = torch.tensor(math.prod(shape), dtype=torch.int64).to(dtype)
    return (numel / base_numel) ** (1.0 / len(shape))


def shift_time(t: torch.Tensor | float, ratio: torch.Tensor | float, T: int = 1000) -> torch.Tensor | float:
    """Resolution shift ``s' = r*s / (1 + (r - 1)*s)`` with ``s = t/T``; returns ``s' * T``.

    Works elementwise on tensors or Python floats. The operation order is MONAI's
    ``timestep_transform``, so equal inputs give bit-equal outputs. r = 1 is the identity;
    t = 0 and t = T are fixed points (up to rounding).
    """
    s = t / T
    return ratio * s / (1 + (ratio - 1) * s) * T


def sample_training_t(
    batch: int,
    latent_spatial_shape: Sequence[int],
    cfg: FlowConfig,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Random training times, (batch,) float32 in [0, T] (int64 if discrete and unshifted).

    uniform: ``U(0, 1) * T``; logit-normal: ``sigmoid(N(loc, scale)) * T``. Then optional integer
    truncation (``cfg.use_discrete_timesteps``) and the resolution shift
    (``cfg.use_timestep_transform``). With ``generator=None`` the global RNG is used and the draw
    is bit-identical to ``RFlowScheduler.sample_timesteps`` after the same ``torch.manual_seed``.
    """
    T = cfg.num_train_timesteps
    if device is None:
        device = generator.device if generator is not None else "cpu"
    if cfg.sample_method == "uniform":
        t = torch.rand((batch,), generator=generator, device=device) * T
    elif cfg.sample_method == "logit-normal":
        z = torch.randn((batch,), generator=generator, device=device) * cfg.scale + cfg.loc
        # Clamp as torch's LogisticNormal (MONAI's sampler) does, keeping t strictly inside (0, T).
        eps = torch.finfo(z.dtype)
        t = torch.sigmoid(z).clamp(min=eps.tiny, max=1.0 - eps.eps) * T
    else:
        raise InvalidInput(f"cfg.sample_method must be 'uniform' or 'logit-normal', got {cfg.sample_method!r}")
    if cfg.use_discrete_timesteps:
        t = t.long()
    if cfg.use_timestep_transform:
        ratio = resolution_ratio(latent_spatial_shape, cfg.base_img_size_numel, torch.float32).to(device)
        t = shift_time(t, ratio, T)
    return t


def inference_timesteps(
    num_steps: int, latent_spatial_shape: Sequence[int], cfg: FlowConfig, exact: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling grid ``(timesteps, next_timesteps)``, each (num_steps,) float64, from T down to 0.

    Step i integrates from ``timesteps[i]`` to ``next_timesteps[i]``; ``next_timesteps[-1] == 0``.

    exact=False: MONAI parity. ``timesteps`` equals ``RFlowScheduler.set_timesteps(...).timesteps``
    (float16 values, held in float64) and ``next_timesteps`` is what its ``step`` really uses:
    ``int(timesteps[i+1])`` (truncated), then 0.
    exact=True: the float64 shifted grid with exact end points, steps summing to 1.
    """
    T = cfg.num_train_timesteps
    if not 1 <= num_steps <= T:
        raise InvalidInput(f"num_steps must be between 1 and num_train_timesteps={T}; got {num_steps}")
    if exact:
        return _exact_grid(num_steps, latent_spatial_shape, cfg)
    return _monai_grid(num_steps, latent_spatial_shape, cfg)


def _exact_grid(num_steps: int, shape: Sequence[int], cfg: FlowConfig) -> tuple[torch.Tensor, torch.Tensor]:
    T = cfg.num_train_timesteps
    grid = torch.linspace(T, 0, num_steps + 1, dtype=torch.float64)
    if cfg.use_discrete_timesteps:
        grid = grid.round()
    if cfg.use_timestep_transform:
        grid = shift_time(grid, resolution_ratio(shape, cfg.base_img_size_numel, torch.float64), T)
    # 1 + (r - 1) can round away from r for r > 2; pin the ends so the steps telescope to exactly 1.
    grid[0], grid[-1] = T, 0.0
    return grid[:-1].clone(), grid[1:].clone()


def _monai_grid(num_steps: int, shape: Sequence[int], cfg: FlowConfig) -> tuple[torch.Tensor, torch.Tensor]:
    T = cfg.num_train_timesteps
    times: list = [(1.0 - i / num_steps) * T for i in range(num_steps)]
    if cfg.use_discrete_timesteps:
        times = [int(round(t)) for t in times]
    if cfg.use_timestep_transform:
        ratio = resolution_ratio(shape, cfg.base_img_size_numel, torch.float32)
        times = [float(shift_time(t, ratio, T)) for t in times]  # float32 values, as in MONAI
        times = np.array(times, dtype=np.float32)
    # numpy, not torch: numpy rounds float64 -> float16 directly, as MONAI's astype does.
    half = np.asarray(times).astype(np.float16)
    if cfg.use_discrete_timesteps:
        half = half.astype(np.int64)
    timesteps = torch.from_numpy(half.astype(np.float64))
    # MONAI's step does int(next_timestep): truncation towards zero.
    next_timesteps = torch.cat([timesteps[1:].trunc(), torch.zeros(1, dtype=torch.float64)])
    return timesteps, next_timesteps


def euler_step(
    x: torch.Tensor, v: torch.Tensor, t: torch.Tensor | float, t_next: torch.Tensor | float, T: int = 1000
) -> torch.Tensor:
    """One Euler step ``x + v * (t - t_next) / T`` for scalar times (shared by the whole batch).

    dt is formed in Python float64 and enters the product as a scalar, exactly as MONAI's
    ``step`` does (its float16 subtraction ``t - int(t_next)`` is exact for t < 2048, since both
    are multiples of t's float16 spacing), so trajectories match MONAI bit for bit.
    """
    dt = (float(t) - float(t_next)) / T
    return x + v * dt


@torch.no_grad()
def sample_euler(
    velocity_fn: VelocityFn,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    next_timesteps: torch.Tensor,
    T: int = 1000,
    progress: bool = False,
    callback: Callable[[dict], None] | None = None,
) -> torch.Tensor:
    """Integrate the flow from noise ``x`` (B, C, *spatial) along the grid with Euler steps.

    ``velocity_fn(x, t_batch) -> v`` receives ``t_batch`` as (B,) float32 on x's device.
    ``callback`` (if given) is called after each step with ``{"i", "x", "t", "t_next", "v"}``.
    """
    if len(timesteps) != len(next_timesteps):
        raise InvalidInput(f"timesteps ({len(timesteps)}) and next_timesteps ({len(next_timesteps)}) must have equal length")
    steps = zip(timesteps.tolist(), next_timesteps.tolist())
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, total=len(timesteps), desc="euler")
    for i, (t, t_next) in enumerate(steps):
        t_batch = torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device)
        v = velocity_fn(x, t_batch)
        x = euler_step(x, v, t, t_next, T)
        if callback is not None:
            callback({"i": i, "x": x, "t": t, "t_next": t_next, "v": v})
    return x
