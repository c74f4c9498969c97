"""Issue #26, item 1: does the DDPM baseline's x0-prediction error fall with training like the
rectified-flow model's, and do its samples stop saturating?

The two UNets of experiments/steps.py (small preset, the same initial weights, latents, batches,
learning-rate schedule and EMA; objective rflow or ddpm) are trained side by side, both paused at
every `--every` steps so that a partial run has both objectives at the same step count. At each
of those steps (and at step 0, the shared initial weights) it measures:

* the relative x0-prediction error ||x0_hat - x0|| / ||x0|| per noise level on held-out latents,
  of the EMA weights (what sampling uses) and of the raw weights
  (`x0_error.relative_x0_errors`): DDPM at integer t, the flow at the time with the same
  signal-to-noise ratio (`ddpm.flow_time_at_same_noise`), with the same noise draw per latent;
  predicting x0_hat = 0 scores exactly 1, so an error above 1 is worse than no prediction;
* at the --sample-at steps, the standard deviation of a few samples' latents over that of the
  held-out latents (as in experiments/ddpm_sensitivity.py: 1 = the data's scale; saturated samples
  are far above 1) for DDPM-1000 and RF-30 from the same noise seeds.

The defaults repeat the training recipe of docs/results.md section 1 (steps.py --train-steps 500:
batches of 8, lr 5e-4, cosine). 733 CPU seconds on one thread (Intel Xeon, session 14):

    OMP_NUM_THREADS=1 python experiments/x0_training.py --work work/exp_x0_training --data work/exp_data

Rerunning continues: the data, the paused runs (the trainer resumes exactly), the snapshots and
the measured rows are reused. The table is printed and written to `--work`/x0_training.json. The two runs live in work/<objective>/stage_1 as in steps.py, so
`steps.py --work` on the same folder with the same --train-steps samples the final UNets for FID.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common import (GRID_SHAPE, bundled_vae, encode_to_cache, environment, load_unet, phantom_arrays, sample, say,
                    test_seeds, train_seeds, write_json)
from steps import train, unet_recipe
from x0_error import relative_x0_errors

from maisi2 import ddpm
from maisi2.atomic import atomic_output
from maisi2.checkpoint import load_checkpoint
from maisi2.latents import LatentDataset
from maisi2.models import load_network
from maisi2.train_flow import _initial_unet, stage_dir

OBJECTIVES = ("rflow", "ddpm")
SAMPLERS = {"rflow": ("rf", 30), "ddpm": ("ddpm", 1000)}
CKPT_EVERY = 50  # steps.unet_recipe's ckpt_every: a pause can only fall on a saved step


class _Pause(Exception):
    """Raised from the trainer's hook at a milestone: last.pt then holds exactly that step, so the
    next call resumes where this one stopped, bit for bit."""


def milestones(train_steps: int, every: int) -> list[int]:
    return list(range(every, train_steps + 1, every))


def snapshot(work: Path, objective: str, step: int) -> Path:
    return work / "snapshots" / f"{objective}-{step:05d}.pt"


def train_to(objective: str, step: int, cache: Path, work: Path, args) -> Path:
    """The `objective` UNet's checkpoint after `step` steps (of a run of --train-steps), kept as a
    snapshot; trains (resuming) up to it when missing."""
    path = snapshot(work, objective, step)
    if path.is_file():
        return path
    last = stage_dir(work / objective, 1) / "last.pt"

    def keep(at: int) -> None:
        if at > 0 and at % args.every == 0 and not snapshot(work, objective, at).is_file():
            with atomic_output(snapshot(work, objective, at)) as tmp:
                shutil.copyfile(last, tmp)

    def on_batch(at: int, batch) -> None:
        keep(at)  # called before step `at + 1`: last.pt was just written at `at` (or resumed from it)
        if at == step:
            raise _Pause

    say(f"training {objective} to step {step}")
    try:
        train(objective, cache, work, args, on_batch=on_batch)
    except _Pause:
        pass
    done = load_checkpoint(last).step
    if done != step:  # e.g. the folder's run was taken further by steps.py: its earlier steps are gone
        sys.exit(f"{last} holds step {done}, not {step}, and there is no snapshot of step {step}; use a new --work")
    keep(step)  # the run's last step has no batch after it
    return path


def measure(unet, objective: str, heldout: LatentDataset, data_std: float, cfg, args, with_samples: bool) -> dict:
    """x0 errors per t and the sample-scale ratio of one network (EMA weights, eval mode)."""
    started = time.process_time()
    errors = relative_x0_errors(unet, objective, heldout, args.t, args.heldout_volumes,
                                cfg.flow.num_train_timesteps, match_noise=True)
    kind, steps = SAMPLERS[objective]
    latent_shape = (cfg.vae.latent_channels, *(s // cfg.vae.downsample_factor for s in GRID_SHAPE))
    z = sample(unet, cfg, kind, steps, list(range(args.samples)), latent_shape) if with_samples else None
    return {"relative_x0_error": errors, "sampler": f"{kind}-{steps}",
            "sample_std_ratio": None if z is None else float(z.std() / data_std),
            "cpu_seconds": time.process_time() - started}


def row_for(objective: str, step: int, cache: Path, heldout: LatentDataset, data_std: float, work: Path, args) -> dict:
    path = work / "rows" / f"{objective}-{step:05d}.json"
    # Only at --sample-at steps: DDPM-1000 costs 1000 network calls, the rest of a row a few dozen.
    with_samples = args.samples > 0 and step in args.sample_at
    if path.is_file():
        return json.loads(path.read_text())
    started = time.process_time()
    if step == 0:  # the initial weights, built as the trainer builds them (both objectives share them)
        cfg, recipe = unet_recipe(objective, args)
        unet = raw = _initial_unet(cfg, recipe, "cpu", None)[0]
    else:
        path_pt = train_to(objective, step, cache, work, args)
        unet, cfg, _, _ = load_unet(path_pt)
        raw = load_network(path_pt, "unet", prefer_ema=False)[0]
    say(f"measuring {objective} at step {step}")
    row = {"objective": objective, "step": step, "cpu_seconds_to_reach": time.process_time() - started,
           **measure(unet, objective, heldout, data_std, cfg, args, with_samples),
           # The EMA (decay 0.995) still holds 0.995^step of the random initial weights (8 % at 500
           # steps), which an epsilon network's high-t error amplifies; the raw weights show how much.
           "relative_x0_error_raw": relative_x0_errors(raw, objective, heldout, args.t, args.heldout_volumes,
                                                       cfg.flow.num_train_timesteps, match_noise=True)}
    write_json(path, row)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("work/exp_x0_training"))
    ap.add_argument("--data", type=Path, default=Path("work/exp_data"),
                    help="phantoms and latents shared by the experiments (made here when missing)")
    ap.add_argument("--train-volumes", type=int, default=96)
    ap.add_argument("--heldout-volumes", type=int, default=8, help="held-out phantoms the x0 error is measured on")
    ap.add_argument("--train-steps", type=int, default=500)
    ap.add_argument("--every", type=int, default=100, help="measure (and keep a snapshot) every this many steps")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--t", type=int, nargs="+", default=[50, 200, 400, 600, 800, 950],
                    help="noise levels as DDPM times (the flow is queried at the same signal-to-noise ratio)")
    ap.add_argument("--samples", type=int, default=1, help="samples for the scale check (0: none)")
    ap.add_argument("--sample-at", type=int, nargs="*", default=[300, 500], help="steps with the scale check")
    ap.add_argument("--up-to", type=int, default=None,
                    help="stop after this step in this call (a later call continues); default --train-steps")
    ap.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=list(OBJECTIVES),
                    help="train and measure only these (two calls, one per objective, run on two cores at once; "
                         "a last call with both assembles the table from their stored rows)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--report", type=Path, default=Path("docs/img/exp_x0_training.png"), help="where the plot goes")
    args = ap.parse_args()
    if args.every < CKPT_EVERY or args.every % CKPT_EVERY or args.train_steps % args.every:
        sys.exit(f"--every must be a multiple of {CKPT_EVERY} that divides --train-steps; got {args.every}, {args.train_steps}")
    if any(not 0 <= t < 1000 for t in args.t) or args.heldout_volumes < 1 or args.samples < 0:
        sys.exit("--t values must lie in [0, 1000), --heldout-volumes >= 1, --samples >= 0")
    torch.set_num_threads(1)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    started = time.process_time()

    say("data: phantoms and latents (bundled VAE)")
    vae, _ = bundled_vae()
    train_ct, train_labels = phantom_arrays(args.data, train_seeds(args.train_volumes))
    cache = encode_to_cache(args.data / f"latents_{args.train_volumes}", vae, train_ct, labels=train_labels)
    held_ct, _ = phantom_arrays(args.data, test_seeds(args.heldout_volumes))
    held_cache = encode_to_cache(args.data / f"latents_test_{args.heldout_volumes}", vae, held_ct)
    scale = LatentDataset(cache).scale_factor  # the training latents' scale, as the networks see them
    heldout = LatentDataset(held_cache, scale_factor=scale)
    data_std = float(torch.stack([heldout[i]["latent"] for i in range(len(heldout))]).std())

    objectives = [o for o in OBJECTIVES if o in args.objectives]
    rows = [row_for(o, 0, cache, heldout, data_std, work, args) for o in objectives]
    up_to = args.train_steps if args.up_to is None else args.up_to
    for step in [m for m in milestones(args.train_steps, args.every) if m <= up_to]:
        # both objectives reach each step before either goes on, so a partial run compares like with like
        rows += [row_for(o, step, cache, heldout, data_std, work, args) for o in objectives]
    rf_times = ddpm.flow_time_at_same_noise(torch.tensor(args.t)).tolist()
    results = {"command": " ".join(sys.argv), "args": {k: str(v) for k, v in vars(args).items()},
               "t_ddpm": args.t, "t_rflow_same_noise": rf_times, "heldout_latent_std": data_std, "rows": rows,
               "environment": environment(), "cpu_seconds_this_call": time.process_time() - started}
    if len(objectives) < len(OBJECTIVES):  # one half of a split run: its rows are stored; no table yet
        return
    write_json(work / "x0_training.json", results)  # not results.json: steps.py may share the folder
    plot(results, args.report)
    print(table(results))


def table(results: dict) -> str:
    """Markdown: one row per objective and step; each cell the EMA weights' error (the raw weights')."""
    t, rf_t = results["t_ddpm"], results["t_rflow_same_noise"]
    head = " | ".join(f"t = {a} (RF {b:.0f})" for a, b in zip(t, rf_t))
    lines = [f"| objective | steps | {head} | sample std / data std |", "| --- | ---: |" + " ---: |" * (len(t) + 1)]
    for r in sorted(results["rows"], key=lambda r: (r["objective"] != "rflow", r["step"])):
        pairs = zip(r["relative_x0_error"], r.get("relative_x0_error_raw", r["relative_x0_error"]))
        cells = [f"{e:.3f}" if r["step"] == 0 else f"{e:.3f} ({raw:.3f})" for e, raw in pairs]  # step 0: one network
        std = "" if r["sample_std_ratio"] is None else f"{r['sample_std_ratio']:.2f} ({r['sampler']})"
        lines.append(f"| {r['objective']} | {r['step']} | " + " | ".join(cells) + f" | {std} |")
    return "\n".join(lines)


def plot(results: dict, path: Path, size=(640, 300)) -> None:
    """Two panels (RF, DDPM): relative x0 error (log axis) against training steps, one line per t."""
    from PIL import Image, ImageDraw

    rows, t = results["rows"], results["t_ddpm"]
    steps = sorted({r["step"] for r in rows})
    errors = [e for r in rows for e in r["relative_x0_error"]]
    lo, hi = np.log10(max(min(errors), 1e-3)) - 0.1, np.log10(max(errors)) + 0.1
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    colours = ["navy", "teal", "green", "olive", "darkorange", "darkred", "purple", "black"]
    width = (size[0] - 120) // 2
    for p, objective in enumerate(OBJECTIVES):
        left, top, right, bottom = 50 + p * (width + 20), 25, 50 + p * (width + 20) + width, size[1] - 30
        x_of = lambda s: left + s / max(steps[-1], 1) * (right - left)  # noqa: E731
        y_of = lambda e: bottom - (np.log10(max(e, 1e-3)) - lo) / (hi - lo) * (bottom - top)  # noqa: E731
        draw.rectangle([left, top, right, bottom], outline="black")
        draw.text((left, 5), f"{objective}, EMA weights: ||x0_hat - x0|| / ||x0|| vs steps", fill="black")
        if lo < 0 < hi:
            draw.line([(left, y_of(1.0)), (right, y_of(1.0))], fill="gray")  # x0_hat = 0 scores 1
        mine = sorted((r for r in rows if r["objective"] == objective), key=lambda r: r["step"])
        for k, tk in enumerate(t):
            pts = [(x_of(r["step"]), y_of(r["relative_x0_error"][k])) for r in mine]
            if len(pts) > 1:
                draw.line(pts, fill=colours[k % len(colours)], width=2)
            if p == 1:
                draw.text((right + 6, top + 12 * k), f"t = {tk}", fill=colours[k % len(colours)])
        for s in steps:
            draw.text((x_of(s) - 8, bottom + 4), str(s), fill="black")
    for v in range(int(np.ceil(lo)), int(np.floor(hi)) + 1):
        draw.text((4, bottom - (v - lo) / (hi - lo) * (bottom - top) - 6), f"1e{v}", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


if __name__ == "__main__":
    main()
