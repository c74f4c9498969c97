"""Why the DDPM baseline's samples saturate (issue #26, item 1): how each sampler turns a small,
systematic error of the network into an error of the sample's scale.

For Gaussian data x0 ~ N(0, s^2) the optimal network outputs are known in closed form:
eps*(x_t) = sqrt(1 - a_t) x_t / (a_t s^2 + 1 - a_t) (DDPM, MAISI's schedule) and, with
x_t = (1 - u) x0 + u noise (u = t / T), v*(x_t) = ((1 - u) s^2 - u) x_t / ((1 - u)^2 s^2 + u^2).
This script runs the project's own samplers (`ddpm.sample_ddpm`, `ddpm.sample_ddim`,
`flow.sample_euler`) with those outputs scaled by (1 + e) for a few relative errors e and prints
the standard deviation of the samples over s: 1.0 means the sampler reproduces the data's scale,
larger means it inflates the latents (decoded, over-large latents are saturated HU). It also prints
the factor sqrt((1 - a_t) / a_t) by which an epsilon error becomes an x0 error at a few t (for the
flow model the factor is u <= 1). Last, it prints how much of the path (1 = all of it) the
rectified-flow Euler grid integrates: the MONAI-parity grid (`flow.inference_timesteps`, the default)
truncates each next time to an integer but starts the next step from the untruncated one, so it
overshoots, more with more steps; `exact=True` integrates exactly 1. CPU, about a minute:

    python experiments/ddpm_sensitivity.py
"""

from __future__ import annotations

import torch

from maisi2 import ddpm, flow
from maisi2.config import FlowConfig

S = 1.0  # data standard deviation (the cache's scale factor makes the latents' std ~1)
ERRORS = (-0.05, -0.02, 0.0, 0.02, 0.05)
SHAPE = (256, 4, 4, 4, 4)


def eps_star(x: torch.Tensor, t: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    a_t = a[t.long()].view(-1, 1, 1, 1, 1)
    return (1 - a_t).sqrt() * x / (a_t * S**2 + 1 - a_t)


def v_star(x: torch.Tensor, t: torch.Tensor, T: int) -> torch.Tensor:
    u = (t / T).view(-1, 1, 1, 1, 1).to(x.dtype)
    return ((1 - u) * S**2 - u) * x / ((1 - u) ** 2 * S**2 + u**2)


def sample_std(kind: str, e: float) -> float:
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    a = ddpm.alphas_cumprod()
    eps_fn = lambda x, t: (1 + e) * eps_star(x, t, a)  # noqa: E731
    if kind == "ddpm-1000":
        out = ddpm.sample_ddpm(eps_fn, noise, 1000, generator=torch.Generator().manual_seed(1))
    elif kind == "ddim-30":
        out = ddpm.sample_ddim(eps_fn, noise, 30)
    else:
        cfg = FlowConfig()
        grid, nxt = flow.inference_timesteps(30, SHAPE[2:], cfg)
        out = flow.sample_euler(lambda x, t: (1 + e) * v_star(x, t, cfg.num_train_timesteps), noise, grid, nxt,
                                T=cfg.num_train_timesteps)
    return float(out.std() / S)


def main() -> None:
    torch.set_num_threads(1)
    a = ddpm.alphas_cumprod()
    print("eps error -> x0 error factor sqrt((1 - a_t) / a_t) on MAISI's DDPM schedule:")
    print("  " + ", ".join(f"t={t}: {float(((1 - a[t]) / a[t]).sqrt()):.2f}" for t in (50, 400, 800, 950, 999)))
    print(f"  a_T-1 = {float(a[-1]):.2e} (terminal signal fraction sqrt(a) = {float(a[-1].sqrt()):.4f})")
    print("\nsample std / data std, network output scaled by (1 + e):")
    print("| sampler | " + " | ".join(f"e = {e:+.2f}" for e in ERRORS) + " |")
    print("| --- |" + " ---: |" * len(ERRORS))
    for kind in ("rf-30", "ddim-30", "ddpm-1000"):
        print(f"| {kind} | " + " | ".join(f"{sample_std(kind, e):.3f}" for e in ERRORS) + " |")
    print("\npath fraction integrated by the RF Euler grid (MONAI-parity / exact):")
    for shape in ((24, 24, 16), SHAPE[2:]):
        print(f"  latent {shape}: " + ", ".join(f"{n}: {path_fraction(n, shape, False):.4f}/{path_fraction(n, shape, True):.4f}"
                                               for n in (5, 10, 20, 30, 50, 100, 1000)))


def path_fraction(steps: int, shape, exact: bool) -> float:
    cfg = FlowConfig()
    grid, nxt = flow.inference_timesteps(steps, shape, cfg, exact=exact)
    return float((grid - nxt).sum()) / cfg.num_train_timesteps


if __name__ == "__main__":
    main()
