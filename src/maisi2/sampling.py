"""Sampling a latent CT from the flow model: noise -> Euler steps -> latent.

The math lives elsewhere and is only wired together here: the time grid and the Euler integrator
in `maisi2.flow` (`inference_timesteps`, `sample_euler`), the network call with its conditioning in
`maisi2.nets.predict_velocity`. This module adds

* `initial_noise`: the starting noise from a private `torch.Generator`, so a seed gives the same
  volume whatever else uses the global RNG, and the same noise on CPU and CUDA;
* `guided_velocity` / `velocity_function`: the velocity the sampler follows, with the ControlNet
  and optional classifier-free guidance. The unconditional branch of MAISI-v2 guidance is the
  same mask with every tumour replaced by its parent organ (`labels.remove_tumors`), so guidance
  pushes the sample towards "what the tumour labels add": ``v = v_uncond + s * (v_cond - v_uncond)``
  (s = 1 is plain conditional sampling, s > 1 exaggerates the tumours);
* the arithmetic of the network calls from a `compute.ComputePlan` (bf16 convolutions on CPUs where
  that pays); the latent, the velocity and the Euler update stay float32;
* `sample_latent`: the loop itself;
* `estimate_sampling_bytes`: the memory one network call needs, so a request that cannot fit is
  refused before any work.

Usage::

    cond = nets.condition_on(labels, spacing, "ct")
    z = sample_latent(unet, cond, (4, 32, 32, 32), cfg.flow, controlnet=controlnet, seed=7)
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Sequence

import torch
from torch import nn

from maisi2 import compute as compute_plan
from maisi2 import flow, nets
from maisi2.config import Config, FlowConfig
from maisi2.errors import InvalidInput

__all__ = [
    "initial_noise",
    "guided_velocity",
    "velocity_function",
    "sample_latent",
    "estimate_sampling_bytes",
    "SAMPLING_BYTES_PER_LATENT_VOXEL",
]


def initial_noise(latent_shape: Sequence[int], seed: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """Standard normal (1, C, x, y, z) float32 noise for `seed`.

    Drawn on the CPU from a generator of its own, then moved: the global RNG is untouched, and
    the same seed gives the same starting point on every device (CUDA generators draw differently).
    """
    shape = tuple(int(s) for s in latent_shape)
    if len(shape) != 4 or min(shape) < 1:
        raise InvalidInput(f"latent_shape must be (C, x, y, z) positive sizes, got {latent_shape}")
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn((1, *shape), generator=generator, dtype=torch.float32).to(device)


def guided_velocity(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``v_uncond + scale * (v_cond - v_uncond)`` (scale 1 = v_cond)."""
    return v_uncond + scale * (v_cond - v_uncond)


def velocity_function(
    unet: nn.Module,
    cond: nets.Conditioning,
    controlnet: nn.Module | None = None,
    uncond: nets.Conditioning | None = None,
    cfg_scale: float | None = None,
    control_scale: float = 1.0,
    autocast: bool = False,
    compute: compute_plan.ComputePlan | None = None,
) -> flow.VelocityFn:
    """``v(x, t)`` for `flow.sample_euler`: the conditional velocity, guided when `uncond` is given.

    The two branches run one after the other, not as a batch of two, so guidance costs time but
    no extra peak memory. Outputs are float32 whatever precision the networks ran in. `compute`:
    the plan the networks run under (default: float32, or the release's float16 autocast on CUDA
    when `autocast`); the ControlNet runs under the UNet's, since its residuals feed the UNet.
    """
    if (uncond is None) != (cfg_scale is None):
        raise InvalidInput("classifier-free guidance needs both `uncond` and `cfg_scale` (or neither)")
    plan = _plan(compute, next(unet.parameters()).device, autocast)

    if controlnet is not None and not torch.is_grad_enabled():
        # The mask encoder depends on the mask alone: run it once, not at every step.
        cond = _embedded(controlnet, cond, plan)
        uncond = None if uncond is None else _embedded(controlnet, uncond, plan)

    def predict(x: torch.Tensor, t: torch.Tensor, c: nets.Conditioning) -> torch.Tensor:
        with plan.autocast("unet"):
            return nets.predict_velocity(unet, plan.layout(x, "unet"), t, c, controlnet, control_scale).float()

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v_cond = predict(x, t, cond)
        if uncond is None:
            return v_cond
        return guided_velocity(v_cond, predict(x, t, uncond), cfg_scale)

    return velocity


def _embedded(controlnet: nn.Module, cond: nets.Conditioning, plan: compute_plan.ComputePlan) -> nets.Conditioning:
    if cond.mask_embedding is not None or cond.mask_bits is None:
        return cond
    with plan.autocast("controlnet"):
        embedded = nets.embed_mask(controlnet, nets.Conditioning(
            cond.spacing, cond.modality, plan.layout(cond.mask_bits, "controlnet")))
    return nets.Conditioning(cond.spacing, cond.modality, cond.mask_bits, embedded.mask_embedding)


def _plan(compute: compute_plan.ComputePlan | None, device: torch.device, autocast: bool) -> compute_plan.ComputePlan:
    if compute is not None:
        return compute
    cuda_half = autocast and torch.device(device).type == "cuda"
    return compute_plan.choose_plan("auto" if cuda_half else "fp32", device, half=cuda_half)


@torch.no_grad()
def sample_latent(
    unet: nn.Module,
    cond: nets.Conditioning,
    latent_shape: Sequence[int],
    flow_cfg: FlowConfig,
    *,
    controlnet: nn.Module | None = None,
    uncond: nets.Conditioning | None = None,
    cfg_scale: float | None = None,
    steps: int = 30,
    seed: int = 0,
    exact_grid: bool = False,
    control_scale: float = 1.0,
    autocast: bool = False,
    compute: compute_plan.ComputePlan | None = None,
    progress: bool = False,
    callback: Callable[[dict], None] | None = None,
) -> torch.Tensor:
    """Integrate the flow from seeded noise to a (1, C, x, y, z) latent (scaled, as the UNet sees it).

    latent_shape: (C, x, y, z). The grid is `flow.inference_timesteps` on the latent's spatial
    shape (MONAI-parity grid unless `exact_grid`). `cond` (and `uncond`) must be on the device the
    networks are on; the latent is returned on that device. Deterministic for a seed on CPU.
    `compute`: the plan the networks run under (`velocity_function`); it puts their weights in
    its layout (in place).
    """
    device = next(unet.parameters()).device
    plan = _plan(compute, device, autocast)
    for network, module in (("unet", unet), ("controlnet", controlnet)):
        if module is not None:
            plan.prepare(module, network)
    timesteps, next_timesteps = flow.inference_timesteps(steps, tuple(latent_shape)[1:], flow_cfg, exact=exact_grid)
    noise = initial_noise(latent_shape, seed, device)
    # One region around the whole loop: autocast keeps its lower-precision copies of the weights
    # until the region ends, and so do the lowered convolutions, so they are converted once, not
    # at every step.
    with contextlib.ExitStack() as stack:
        for network, module in (("unet", unet), ("controlnet", controlnet)):
            if module is not None:
                stack.enter_context(plan.lowered(module, network))
        stack.enter_context(plan.autocast("unet"))
        velocity = velocity_function(unet, cond, controlnet, uncond, cfg_scale, control_scale, compute=plan)
        x = flow.sample_euler(velocity, noise, timesteps, next_timesteps, T=flow_cfg.num_train_timesteps,
                              progress=progress, callback=callback)
    return x.contiguous()


# -- memory ----------------------------------------------------------------------------------
# Peak memory of one UNet + ControlNet call (no gradients, fp32), measured on the CPU (torch 2.13,
# glibc mmap threshold pinned so freed blocks go back) as the growth of peak RSS between latents
# of 16^3 and 32^3: tiny 10.4 kB, small 9.3 kB, maisi-v2 10.2 kB per latent voxel. It hardly
# depends on the preset because it is dominated by what runs at image resolution (the mask
# bit-planes and the first layers of the ControlNet's mask embedding: 64 image voxels per latent
# voxel). We budget 12 kB. Attention matrices come on top (see `_attention_bytes`) unless flash
# attention runs. Not measured on CUDA (no GPU here); the caching allocator there needs headroom,
# which is why the default budget is 90 % of the free memory.
SAMPLING_BYTES_PER_LATENT_VOXEL = 12_000


def _attention_bytes(cfg: Config, latent_spatial: Sequence[int], flash: bool) -> int:
    """Peak bytes of the explicit attention matrices: (scores + softmax) x heads x tokens^2 x 4 B.

    Without flash attention MONAI materialises the full token x token matrix per head; at the
    released sizes it is what makes a full-resolution CPU run impossible (a 128x128x192 latent
    gives 49152 tokens at the third level: about 150 GB).
    """
    if flash:
        return 0
    u = cfg.unet
    worst = 0
    for level, (attend, channels, head_channels) in enumerate(zip(u.attention_levels, u.num_channels, u.num_head_channels)):
        if not attend:
            continue
        tokens = math.prod(max(1, n // 2**level) for n in latent_spatial)
        heads = max(1, channels // head_channels) if head_channels else 1
        worst = max(worst, 2 * heads * tokens * tokens * 4)
    return worst


def estimate_sampling_bytes(cfg: Config, latent_spatial: Sequence[int], flash: bool = False,
                            guidance: bool = False, half: bool = False) -> int:
    """Peak bytes of one sampling step at this latent size (networks' weights excluded).

    half: fp16 autocast, which halves the activations. Guidance adds one stored velocity (the two
    branches run one after the other).
    """
    voxels = math.prod(int(n) for n in latent_spatial)
    activations = SAMPLING_BYTES_PER_LATENT_VOXEL * voxels + _attention_bytes(cfg, latent_spatial, flash)
    step = activations / 2 if half else activations
    # The running latent, the velocity and (with guidance) the second velocity, all fp32.
    state = (3 + int(guidance)) * cfg.vae.latent_channels * voxels * 4
    return int(step + state)
