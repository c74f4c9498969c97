"""Experiment 1 of issue #6: how many sampling steps does rectified flow need, against DDPM?

The paper: the same UNet trained with rectified flow reaches, in 30 Euler steps, the FID that the
DDPM-trained one reaches in 1000 (and beats DDIM at 30), with diminishing returns past 30 steps.

Here, in miniature (every number reproducible from this one command):
1. data: random-lesion phantoms on one small grid (96 x 96 x 64 at 4 mm), a training set and a
   separate reference set (different seeds) that FID compares samples against;
2. latents: the training set through the bundled model's VAE (posterior means);
3. two UNets of the `small` preset from the same initial weights, same data, batches, steps and
   learning-rate schedule: one with the rectified-flow objective, one with DDPM's (noise
   prediction, MAISI v1's schedule) -- `maisi2.train_flow` stage 1, ``objective`` rflow / ddpm;
4. samples: RF at 5, 10, 20, 30, 50, 100 Euler steps, DDPM at 1000 ancestral steps, DDIM at 30,
   the same noise seeds for every setting, decoded by the same VAE;
5. 2.5D FID of every setting against the reference set with the offline features
   (`maisi2.evaluate`; NOT comparable with the paper's RadImageNet numbers), next to two floors:
   the VAE's own reconstructions of the reference set, and the training phantoms themselves.

    python experiments/steps.py --work work/exp_steps            # defaults: ~1 h on 2 CPU cores
    python experiments/steps.py --work work/exp_steps --train-steps 100 --samples 8   # smoke run

Rerunning continues: data, checkpoints (the trainer resumes) and samples are reused.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from common import (GRID_SHAPE, GRID_SPACING, reference_seeds, train_seeds, bundled_vae, decode_hu, encode_to_cache, environment,
                    phantom_arrays, reconstruct_hu, say, slices_figure, write_json, load_unet, sample)

from maisi2.config import get_config
from maisi2.evaluate.fid import fid, volume_set_stats
from maisi2.train_flow import default_recipe, recipe_with_overrides, stage_dir, train_stage

RF_STEPS = (5, 10, 20, 30, 50, 100)
SETTINGS = [("rflow", "rf", n) for n in RF_STEPS] + [("ddpm", "ddpm", 1000), ("ddpm", "ddim", 30)]


def unet_recipe(objective: str, args):
    """(config, recipe) of the `objective` UNet: the small preset, stage 1 on whole latents."""
    cfg = get_config("small")
    side = tuple(s // cfg.vae.downsample_factor for s in GRID_SHAPE)
    return cfg, recipe_with_overrides(default_recipe(cfg), [
        f'objective="{objective}"', f"stage1.steps={args.train_steps}", f"stage1.lr={args.lr}",
        "stage1.warmup=20", f"stage1.batch_size={args.batch_size}", f"stage1.latent_size={list(side)}",
        "ema_decay=0.995", "ckpt_every=50", f"seed={args.seed}"])


def train(objective: str, cache: Path, work: Path, args, on_batch=None) -> Path:
    """Train (or resume) the `objective` UNet into work/objective; on_batch: the engine's hook
    (experiments/x0_training.py keeps snapshots and pauses there)."""
    cfg, recipe = unet_recipe(objective, args)
    out = work / objective
    # The same initial weights for both objectives: the trainer seeds the model build from the recipe.
    train_stage(1, cache, out, cfg, recipe, resume=True, device="cpu", progress=not args.no_progress,
                on_batch=on_batch)
    return stage_dir(out, 1) / "last.pt"


def samples_for(setting, unet, cfg, scale, vae, work: Path, args) -> tuple[np.ndarray, float]:
    objective, kind, steps = setting
    path = work / "samples" / f"{kind}-{steps}.npz"
    if path.is_file():
        data = np.load(path)
        return data["hu"].astype(np.float32), float(data["seconds_per_sample"])
    latent_shape = (cfg.vae.latent_channels, *(s // cfg.vae.downsample_factor for s in GRID_SHAPE))
    seeds = list(range(args.samples))
    chunks, seconds = [], 0.0
    for start in range(0, len(seeds), args.sample_batch):
        started = time.perf_counter()
        z = sample(unet, cfg, kind, steps, seeds[start:start + args.sample_batch], latent_shape)
        seconds += time.perf_counter() - started
        chunks.append(decode_hu(vae, z / scale))
    hu = np.concatenate(chunks)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path.with_suffix(".part.npz"), hu=hu.astype(np.int16), seconds_per_sample=seconds / len(seeds))
    path.with_suffix(".part.npz").replace(path)
    return hu, seconds / len(seeds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("work/exp_steps"))
    ap.add_argument("--data", type=Path, default=Path("work/exp_data"),
                    help="phantoms and latents shared by the experiments (made here when missing)")
    ap.add_argument("--train-volumes", type=int, default=96)
    ap.add_argument("--reference-volumes", type=int, default=32)
    ap.add_argument("--train-steps", type=int, default=800)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--samples", type=int, default=24, help="samples per setting (the same noise seeds)")
    ap.add_argument("--sample-batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip", action="append", default=[], metavar="SAMPLER-STEPS",
                    help="leave a setting out, e.g. ddpm-1000 in a smoke run (repeatable)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--report", type=Path, default=Path("docs/img/exp_steps.png"), help="where the plot goes")
    args = ap.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()

    say("data: phantoms")
    train_ct, train_labels = phantom_arrays(args.data, train_seeds(args.train_volumes))
    ref_ct, _ = phantom_arrays(args.data, reference_seeds(args.reference_volumes))
    vae, _ = bundled_vae()
    say("latents: bundled VAE")
    cache = encode_to_cache(args.data / f"latents_{args.train_volumes}", vae, train_ct, labels=train_labels)
    ckpts = {}
    for objective in ("rflow", "ddpm"):
        say(f"training the {objective} UNet ({args.train_steps} steps)")
        ckpts[objective] = train(objective, cache, work, args)

    say("FID floors")
    fid_kw = dict(spacing=None, shape=None, progress=False)
    ref_stats = volume_set_stats(ref_ct, **fid_kw, desc="reference")  # featurised once, reused by every row
    floors = {"vae_reconstruction": fid(ref_stats, reconstruct_hu(vae, ref_ct), **fid_kw).average,
              "training_phantoms": fid(ref_stats, train_ct[: args.samples], **fid_kw).average}
    rows = []
    for setting in SETTINGS:
        objective, kind, steps = setting
        if f"{kind}-{steps}" in args.skip:
            continue
        unet, cfg, scale, _ = load_unet(ckpts[objective])
        say(f"sampling {kind}-{steps}")
        hu, sec = samples_for(setting, unet, cfg, scale, vae, work, args)
        result = fid(ref_stats, hu, **fid_kw)
        rows.append({"objective": objective, "sampler": kind, "steps": steps, "fid": result.average,
                     "fid_per_plane": result.per_plane, "seconds_per_sample": sec})
        say(f"  {kind}-{steps}: FID {result.average:.3f}, {sec:.2f} s/sample")
    results = {"command": " ".join(sys.argv), "args": {k: str(v) for k, v in vars(args).items()},
               "grid": {"shape": GRID_SHAPE, "spacing": GRID_SPACING}, "floors": floors, "rows": rows,
               "features": "offline HU-texture (NOT comparable with the paper)", "environment": environment(),
               "wall_seconds": time.time() - started}
    write_json(work / "results.json", results)
    plot(results, args.report)
    samples_figure(work, ref_ct, args.report.with_name(args.report.stem + "_samples.png"))
    print(table(results))


def samples_figure(work: Path, reference: np.ndarray, path: Path) -> None:
    """Mid axial slices: reference phantoms, then the first samples of RF-30, RF-100, DDPM-1000, DDIM-30."""
    rows = [("phantoms (reference set)", reference)]
    for name in ("rf-30", "rf-100", "ddpm-1000", "ddim-30"):
        if (work / "samples" / f"{name}.npz").is_file():
            rows.append((name.upper(), np.load(work / "samples" / f"{name}.npz")["hu"]))
    slices_figure(rows, path)


def table(results: dict) -> str:
    lines = ["| objective | sampler | steps | 2.5D FID (offline features) | s / sample |", "| --- | --- | ---: | ---: | ---: |"]
    for r in results["rows"]:
        lines.append(f"| {r['objective']} | {r['sampler']} | {r['steps']} | {r['fid']:.3f} | {r['seconds_per_sample']:.2f} |")
    for name, value in results["floors"].items():
        lines.append(f"| floor: {name.replace('_', ' ')} | | | {value:.3f} | |")
    return "\n".join(lines)


def plot(results: dict, path: Path, size=(560, 300)) -> None:
    """FID against RF steps (log axis), DDPM-1000 and DDIM-30 as horizontal lines."""
    from PIL import Image, ImageDraw

    rf = [(r["steps"], r["fid"]) for r in results["rows"] if r["sampler"] == "rf"]
    lines = {f"{r['sampler'].upper()}-{r['steps']}": r["fid"] for r in results["rows"] if r["sampler"] != "rf"}
    lines["VAE floor"] = results["floors"]["vae_reconstruction"]
    values = [v for _, v in rf] + list(lines.values())
    lo, hi = 0.0, max(values) * 1.1
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = 55, 25, size[0] - 110, size[1] - 30
    x_of = lambda n: left + (np.log(n) - np.log(5)) / (np.log(100) - np.log(5)) * (right - left)  # noqa: E731
    y_of = lambda v: bottom - (v - lo) / (hi - lo) * (bottom - top)  # noqa: E731
    draw.rectangle([left, top, right, bottom], outline="black")
    colours = {"DDPM-1000": "darkred", "DDIM-30": "darkorange", "VAE floor": "gray"}
    for name, value in lines.items():
        draw.line([(left, y_of(value)), (right, y_of(value))], fill=colours.get(name, "black"), width=1)
        draw.text((right + 4, y_of(value) - 6), f"{name} {value:.2f}", fill=colours.get(name, "black"))
    pts = [(x_of(n), y_of(v)) for n, v in rf]
    draw.line(pts, fill="navy", width=2)
    for (x, y), (n, v) in zip(pts, rf):
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill="navy")
        draw.text((x - 8, bottom + 4), str(n), fill="black")
    draw.text((left, 5), "2.5D FID (offline features) vs rectified-flow Euler steps", fill="black")
    draw.text((2, top), f"{hi:.2f}", fill="black")
    draw.text((2, bottom - 10), f"{lo:.2f}", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


if __name__ == "__main__":
    main()
