"""Issue #3: do 30-step samples of a `small` rectified-flow UNet trained on the CPU look like phantoms?

Experiment 1 (steps.py) trains its rectified-flow UNet for 500 steps; its samples are body-shaped
blurs. The training continues from that checkpoint on the same latent cache (resumable; rerun the
same command to go on):

    maisi2 train-flow work/exp_data/latents_96 --out work/flow_exp_long --preset small --stage 1 \\
        --init work/exp_steps/rflow/stage_1/last.pt --resume --steps 4000 --lr 3e-4 \\
        --recipe-set stage1.warmup=50 --recipe-set stage1.batch_size=8 \\
        --recipe-set 'stage1.latent_size=[24,24,16]' --recipe-set ema_decay=0.995 --recipe-set ckpt_every=50

This script then compares checkpoints (EMA weights) on what an unconditional sample should share
with the phantoms it was trained on, all from the same noise seeds, decoded by the same VAE:
- 2.5D FID (offline features, as experiment 1) against held-out reference phantoms, with the two
  floors of experiment 1 (the VAE's own reconstructions; training phantoms);
- the share of voxels in each tissue band (air, lung, fat, soft tissue, bone: HU ranges below), and
  its total-variation distance from the reference phantoms' shares (0 = the same mix of tissues);
- a figure: mid-axial and mid-coronal slices of reference phantoms and of each checkpoint's first
  samples; and the loss curve of the whole run (experiment 1's log, then the continuation's).

    python experiments/flow_quality.py --work work/flow_quality \\
        --checkpoint "experiment 1 (500 steps)=work/exp_steps/rflow/stage_1/last.pt" \\
        --checkpoint "continued=work/flow_exp_long/stage_1/last.pt" \\
        --loss-log work/exp_steps/rflow/stage_1/log.csv --loss-log work/flow_exp_long/stage_1/log.csv
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np

from common import (GRID_SHAPE, bundled_vae, cached_volumes, decode_hu, environment, phantom_arrays,
                    reconstruct_hu, reference_seeds, say, slices_figure, train_seeds, write_json, load_unet, sample)

from maisi2.evaluate.fid import fid, volume_set_stats

# HU bands of the tissues a phantom is made of, low edge inclusive; what falls between is "other".
TISSUE_BANDS = {"air": (-np.inf, -900.0), "lung": (-900.0, -500.0), "fat": (-200.0, -30.0),
                "soft tissue": (-30.0, 150.0), "bone": (150.0, np.inf)}


def tissue_shares(volumes: np.ndarray) -> dict[str, float]:
    """Mean share of voxels per tissue band over (N, X, Y, Z) HU volumes (plus "other")."""
    shares = {name: float(((volumes >= lo) & (volumes < hi)).mean()) for name, (lo, hi) in TISSUE_BANDS.items()}
    shares["other"] = 1.0 - sum(shares.values())
    return shares


def total_variation(p: dict[str, float], q: dict[str, float]) -> float:
    return 0.5 * sum(abs(p[k] - q[k]) for k in p)


def samples_of(path: Path, count: int, vae, work: Path, name: str) -> tuple[np.ndarray, int]:
    """`count` RF-30 samples (HU) of a checkpoint, and the training steps its weights have had in
    all (those of the run it continued included)."""
    unet, cfg, scale, step = load_unet(path)
    latent_shape = (cfg.vae.latent_channels, *(s // cfg.vae.downsample_factor for s in GRID_SHAPE))

    def make():
        return np.concatenate([decode_hu(vae, sample(unet, cfg, "rf", 30, [seed], latent_shape) / scale)
                               for seed in range(count)])

    slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
    return cached_volumes(work / f"rf30_{slug}_step{step}_{count}.npz", make, f"{count} RF-30 samples of {name}"), step


def loss_curve(logs: list[Path], path: Path, size=(640, 260), smooth: int = 10) -> dict:
    """The logged loss of runs that continue one another (each log's steps offset by the previous
    run's last step), with its moving average over `smooth` log rows; a mark where each run starts."""
    from PIL import Image, ImageDraw

    steps, losses, starts, offset = [], [], [], 0
    for log in logs:
        rows = list(csv.DictReader(open(log)))
        starts.append(offset)
        steps += [offset + int(r["step"]) for r in rows]
        losses += [float(r["loss"]) for r in rows]
        offset = steps[-1]
    steps, losses = np.array(steps, dtype=float), np.array(losses)
    kernel = np.ones(min(smooth, len(losses))) / min(smooth, len(losses))
    smoothed = np.convolve(losses, kernel, mode="valid")
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = 50, 22, size[0] - 10, size[1] - 25
    lo, hi = float(losses.min()), float(np.percentile(losses, 99))
    x_of = lambda s: left + (s - steps.min()) / max(np.ptp(steps), 1) * (right - left)  # noqa: E731
    y_of = lambda v: bottom - (min(v, hi) - lo) / max(hi - lo, 1e-12) * (bottom - top)  # noqa: E731
    draw.rectangle([left, top, right, bottom], outline="black")
    for start in starts[1:]:
        draw.line([(x_of(start), top), (x_of(start), bottom)], fill="gray")
        draw.text((x_of(start) + 3, top + 2), "continued", fill="gray")
    draw.line([(x_of(s), y_of(v)) for s, v in zip(steps, losses)], fill=(170, 190, 230), width=1)
    draw.line([(x_of(s), y_of(v)) for s, v in zip(steps[len(steps) - len(smoothed):], smoothed)], fill="navy", width=2)
    draw.text((left, 4), f"rectified-flow L1 velocity loss (light: logged every 10 steps; dark: mean of {smooth})",
              fill="black")
    draw.text((2, top), f"{hi:.2f}", fill="black")
    draw.text((2, bottom - 10), f"{lo:.2f}", fill="black")
    draw.text((left, bottom + 5), f"step {int(steps.min())}", fill="black")
    draw.text((right - 70, bottom + 5), f"step {int(steps.max())}", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    tail = losses[-smooth:]
    return {"last_step": int(steps.max()), "final_mean_loss": float(tail.mean()),
            "run_starts": [int(s) for s in starts]}


def table(results: dict) -> str:
    bands = list(TISSUE_BANDS) + ["other"]
    lines = ["| volumes | steps in all | 2.5D FID (offline features) | tissue-mix distance | " + " / ".join(bands)
             + " (% of voxels) |",
             "| --- | ---: | ---: | ---: | --- |"]
    for r in results["rows"]:
        fid_text = f"{r['fid']:.0f}" if r.get("fid") is not None else "-"
        step = f" {r['step']} " if "step" in r else " "  # an empty cell is "| |", as in the docs
        lines.append(f"| {r['name']} |{step}| {fid_text} | {r['tissue_distance']:.3f} | "
                     + " / ".join(f"{100 * r['tissue_shares'][b]:.1f}" for b in bands) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("work/flow_quality"))
    ap.add_argument("--data", type=Path, default=Path("work/exp_data"), help="the experiments' phantoms")
    ap.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH", required=True,
                    help="a flow UNet checkpoint to sample (repeatable, in the order of the table)")
    ap.add_argument("--loss-log", action="append", default=[], type=Path, metavar="CSV",
                    help="log.csv of each run, in training order (a continuation after the run it continues)")
    ap.add_argument("--samples", type=int, default=16, help="samples per checkpoint, noise seeds 0..N-1")
    ap.add_argument("--reference-volumes", type=int, default=32)
    ap.add_argument("--report", type=Path, default=Path("docs/img/flow_quality.png"),
                    help="the samples figure; the loss curve goes beside it as <stem>_loss.png")
    args = ap.parse_args()
    checkpoints = []
    for spec in args.checkpoint:
        name, sep, path = spec.rpartition("=")
        if not sep or not Path(path).is_file():
            ap.error(f"--checkpoint wants NAME=PATH to an existing checkpoint, got {spec!r}")
        checkpoints.append((name, Path(path)))
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.time()

    reference, _ = phantom_arrays(args.data, reference_seeds(args.reference_volumes))
    training, _ = phantom_arrays(args.data, train_seeds(args.samples))  # the floor: as many as samples
    vae, _ = bundled_vae()
    fid_kw = dict(spacing=None, shape=None, progress=False)
    ref_stats = volume_set_stats(reference, **fid_kw, desc="reference")
    ref_shares = tissue_shares(reference)

    def row(name, volumes, **extra):
        shares = tissue_shares(volumes)
        return {"name": name, "fid": fid(ref_stats, volumes, **fid_kw).average, "tissue_shares": shares,
                "tissue_distance": total_variation(shares, ref_shares), **extra}

    rows = [{"name": "reference phantoms", "fid": None, "tissue_shares": ref_shares, "tissue_distance": 0.0},
            row(f"floor: {args.samples} training phantoms", training),
            row("floor: the VAE's reconstructions of the reference set", cached_volumes(
                args.work / f"vae_reconstructions_{args.reference_volumes}.npz",
                lambda: reconstruct_hu(vae, reference), "the VAE's reconstructions of the reference set"))]
    figure_rows = [("reference phantoms", reference)]
    for name, path in checkpoints:
        volumes, step = samples_of(path, args.samples, vae, args.work, name)
        rows.append(row(f"RF-30 samples, {name}", volumes, step=step, checkpoint=str(path)))
        figure_rows.append((f"{name} (step {step})", volumes))
        say(f"{name}: FID {rows[-1]['fid']:.0f}, tissue-mix distance {rows[-1]['tissue_distance']:.3f}")
    slices_figure(figure_rows, args.report, coronal=True)
    loss = loss_curve(args.loss_log, args.report.with_name(args.report.stem + "_loss.png")) if args.loss_log else None
    bands = {name: [None if np.isinf(edge) else edge for edge in band] for name, band in TISSUE_BANDS.items()}
    results = {"command": " ".join(sys.argv), "rows": rows, "loss": loss, "tissue_bands_hu": bands,
               "features": "offline HU-texture (NOT comparable with the paper)", "environment": environment(),
               "wall_seconds": time.time() - started}
    write_json(args.work / "results.json", results)
    print(table(results))
    if loss:
        print(f"loss: mean of the last 10 logged values {loss['final_mean_loss']:.3f} at step {loss['last_step']}")


if __name__ == "__main__":
    main()
