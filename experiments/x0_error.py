"""x0-prediction error of flow-UNet checkpoints on cached latents, per noise level (issue #26).

For each checkpoint (EMA weights) and each t, every cached latent x0 (times the checkpoint's scale
factor) is noised with a fixed seed per latent, the network predicts, and x0 is recovered in one jump
(`flow.predicted_x0` for the rectified-flow objective, `ddpm.predicted_x0_from_eps` for the DDPM
one; the objective is read from the checkpoint's recipe). Printed: the relative error
||x0_hat - x0|| / ||x0|| averaged over latents, one row per checkpoint, so a series of checkpoints of
one run shows whether the error falls with training, and the two objectives can be set side by side
(same t, same noise). The same t means different noise levels for the two objectives: RF's x_t keeps
(1 - t/T) of the signal, DDPM's sqrt(a_t). With --match-noise a rectified-flow checkpoint is instead
queried at the flow time whose x_t has DDPM's signal-to-noise ratio at t
(`ddpm.flow_time_at_same_noise`), so both objectives see the same noisy input up to a scale.

    python experiments/x0_error.py CACHE --checkpoint NAME=PATH [--checkpoint ...] \\
        [--t 50 400 800 950] [--max-latents 16] [--match-noise] [--out results.json]

PATH is a trainer checkpoint (`last.pt`) or a model folder such as the bundled
src/maisi2/resources/models/default (its UNet as exported, with the folder's scale factor; a model
folder holds a rectified-flow UNet).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from maisi2 import ddpm, flow, nets
from maisi2.checkpoint import load_checkpoint
from maisi2.latents import LatentDataset
from maisi2.models import load_network


def table_head(times: list[int]) -> str:
    """The Markdown table's header and alignment lines; its rows come from `table_row` as measured."""
    return ("| checkpoint | objective | steps | " + " | ".join(f"t = {t}" for t in times) + " |\n"
            + "| --- | --- | ---: |" + " ---: |" * len(times))


def table_row(name: str, objective: str, steps: int | None, errors: list[float]) -> str:
    return f"| {name} | {objective} | {'-' if steps is None else steps} | " + " | ".join(f"{e:.3f}" for e in errors) + " |"


def objective_of(ckpt) -> str:
    recipe = ckpt.extra.get("recipe")
    return json.loads(recipe).get("objective", "rflow") if recipe else "rflow"


@dataclass
class Measured:
    """A UNet to measure and what the table says about it."""

    unet: torch.nn.Module
    objective: str
    steps: int | None  # training steps in all, when the file says
    scale_factor: float
    num_train_timesteps: int


def load_measured(path: Path) -> Measured:
    """A trainer checkpoint's EMA weights (objective from its recipe), or a model folder's UNet."""
    if Path(path).is_dir():
        unet, cfg, weights = load_network(path, "unet")
        return Measured(unet, "rflow", weights.steps, weights.scale_factor, cfg.flow.num_train_timesteps)
    ckpt = load_checkpoint(path)
    unet = nets.build_unet(ckpt.config)
    unet.load_state_dict(ckpt.weights(prefer_ema=True))
    return Measured(unet, objective_of(ckpt), ckpt.steps_in_all, ckpt.scale_factor,
                    ckpt.config.flow.num_train_timesteps)


def x0_errors(measured: Measured, cache: Path, times: list[int], max_latents: int,
              match_noise: bool = False) -> list[float]:
    """Mean relative x0 error of `measured` at each t in `times`, over the first `max_latents`
    cached latents."""
    data = LatentDataset(cache, scale_factor=measured.scale_factor)
    return relative_x0_errors(measured.unet, measured.objective, data, times, max_latents,
                              measured.num_train_timesteps, match_noise)


@torch.no_grad()
def relative_x0_errors(unet, objective: str, data: LatentDataset, times: list[int], max_latents: int, T: int = 1000,
                       match_noise: bool = False) -> list[float]:
    """||x0_hat - x0|| / ||x0|| averaged over the first `max_latents` latents of `data`, one value per
    t in `times` (DDPM's integer scale). Latent i is noised with seed i whatever the objective, so two
    networks are compared on the same draws; `match_noise`: see the module docstring."""
    unet.eval()
    sums = [0.0] * len(times)
    count = min(len(data), max_latents)
    for i in range(count):
        item = data[i]
        x0 = item["latent"][None].float()
        cond = nets.Conditioning(spacing=torch.as_tensor(item["spacing"], dtype=torch.float32)[None],
                                 modality=torch.tensor([int(item["modality"])]))
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(i))
        for k, t in enumerate(times):
            tt = torch.tensor([t])
            if objective == "ddpm":
                x_t = ddpm.ddpm_add_noise(x0, noise, tt)
                x0_hat = ddpm.predicted_x0_from_eps(x_t, nets.predict_velocity(unet, x_t, tt.float(), cond), tt)
            else:
                tf = ddpm.flow_time_at_same_noise(tt, T).float() if match_noise else tt.float()
                x_t = flow.add_noise(x0, noise, tf, T)
                x0_hat = flow.predicted_x0(x_t, nets.predict_velocity(unet, x_t, tf, cond), tf, T)
            sums[k] += float((x0_hat - x0).norm() / x0.norm().clamp_min(1e-12))
    return [s / max(count, 1) for s in sums]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cache", type=Path)
    ap.add_argument("--checkpoint", action="append", required=True, metavar="NAME=PATH")
    ap.add_argument("--t", type=int, nargs="+", default=[50, 400, 800, 950])
    ap.add_argument("--max-latents", type=int, default=16)
    ap.add_argument("--match-noise", action="store_true",
                    help="query rectified-flow checkpoints at DDPM's signal-to-noise ratio of each t")
    ap.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    if any(not 0 <= t < 1000 for t in args.t) or args.max_latents < 1:
        sys.exit("--t values must lie in [0, 1000) and --max-latents must be >= 1")
    named = [c.split("=", 1) if "=" in c else (c, c) for c in args.checkpoint]
    for _, path in named:
        if not Path(path).exists():
            sys.exit(f"no checkpoint or model folder at {path}")
    torch.set_num_threads(1)
    rows = []
    print(table_head(args.t))
    for name, path in named:
        measured = load_measured(Path(path))
        errors = x0_errors(measured, args.cache, args.t, args.max_latents, args.match_noise)
        rows.append({"checkpoint": name, "path": path, "objective": measured.objective, "steps": measured.steps,
                     "t": args.t, "match_noise": args.match_noise, "relative_x0_error": errors})
        print(table_row(name, measured.objective, measured.steps, errors))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
