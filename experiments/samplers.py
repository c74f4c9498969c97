"""Issue #26, item 1: rectified flow and DDPM samplers on equal footing.

The paper's claim: the same UNet trained with rectified flow reaches in 30 Euler steps the FID
that the DDPM-trained one reaches in 1000 ancestral steps, beats DDIM at 30, and gains little past
30 steps. experiments/steps.py tested it in miniature with 16 samples and no intervals, on UNets
trained 500 steps (the DDPM one had not learnt the high-noise end). This script scores two UNets
trained side by side for as long as experiments/x0_training.py takes them (small preset, the same
initial weights, latents, batches, seeds and schedule; objective rflow or ddpm):

* samples: noise seeds 0 .. --samples-1, the same initial noise for every arm: RF Euler at 5, 10,
  20, 30, 50, 100 steps on the *exact* time grid (`flow.inference_timesteps(exact=True)`: the
  MONAI-parity grid integrates 1.010 of the path at 30 steps and 1.032 at 100, which would blur a
  same-noise comparison), DDPM-1000 ancestral and DDIM-30 (eta 0); decoded by the bundled VAE;
* image FID: the offline 2.5D features of `maisi2.evaluate.fid` (NOT comparable with the paper's
  RadImageNet numbers) against the VAE's reconstructions of --reference-volumes reference phantoms
  (seeds 7000+), so the VAE's own loss is not counted against the samplers; the noise floor is the
  VAE's reconstructions of as many *other* phantoms (test seeds 9000+) scored the same way (FID from
  a few dozen volumes is biased upwards: the floor is what "as good as the data" scores here);
* latent FID (`maisi2.evaluate.latent_fid`: 2^3 patch vectors of the scaled latents) against the
  reference phantoms' posterior-mean latents, scaled as the training latents, with the same floor;
* 95 % percentile bootstrap intervals over generated volumes (--resamples draws of the volume
  indices, with replacement; the reference set stays fixed). The draws are shared by all arms, so
  a difference between two arms (same noise seeds) is a paired bootstrap;
* the same-noise distance ||RF-k - RF-100|| / ||RF-100|| of each sample's latent;
* memorisation: each sample's relative distance to its nearest training latent
  (`maisi2.evaluate.memorisation`), next to that of the reference phantoms' latents (held-out data);
* CPU seconds per sample of the sampler's network calls (decoding excluded), one thread.

    OMP_NUM_THREADS=1 python experiments/samplers.py --work work/exp_samplers --data work/exp_data \\
        --rflow work/exp_x0_training_2000/rflow/stage_1/last.pt --ddpm work/exp_x0_training_2000/ddpm/stage_1/last.pt

Resumable: every batch of samples (latents and decoded HU) is written under --work as soon as it
is made, and the image features of every arm once computed, so a rerun continues where it stopped
(an interrupted DDPM-1000 loses at most the batch in flight). Two calls on one --work share the
work batch by batch (each claims a batch before making it), e.g. on two cores:

    ... samplers.py <as above> --arms ddpm-1000 rf-5 rf-10 rf-20 rf-30 rf-50 rf-100 ddim-30 &
    ... samplers.py <as above>          # the default order: RF, DDIM-30, then DDPM-1000

Every call then scores and tabulates the arms complete so far (--arms with no names: only that).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common import (GRID_SHAPE, GRID_SPACING, bundled_vae, cached_volumes, decode_hu, encode_to_cache, environment,
                    load_unet, phantom_arrays, reference_seeds, sample, say, slices_figure, test_seeds, train_seeds,
                    write_json)

from maisi2.atomic import atomic_output
from maisi2.compute import CpuCapabilities
from maisi2.evaluate.fid import (SetStats, bootstrap_indices, fid_from_stats, merge_set_stats, percentile_interval,
                                 volume_set_stats)
from maisi2.evaluate.latent_fid import latent_fid, latent_patch_stats
from maisi2.evaluate.memorisation import nearest_training
from maisi2.latents import LatentDataset

RF_STEPS = (5, 10, 20, 30, 50, 100)
# Cheap arms first, DDPM-1000 (1000 network calls per batch) last.
ARMS = [f"rf-{n}" for n in RF_STEPS] + ["ddim-30", "ddpm-1000"]
OBJECTIVE = {"rf": "rflow", "ddim": "ddpm", "ddpm": "ddpm"}
PAIRS = [("rf-30", "ddpm-1000"), ("ddim-30", "ddpm-1000"), ("rf-30", "rf-100")]
FLOOR = "floor"  # the VAE's reconstructions / latents of the other phantoms, scored like an arm
FID_KW = dict(spacing=None, shape=None, progress=False)  # all volumes share the experiments' grid


def split(arm: str) -> tuple[str, int]:
    kind, steps = arm.split("-")
    return kind, int(steps)


def batch_path(work: Path, arm: str, start: int) -> Path:
    return work / "arms" / arm / f"seeds-{start:03d}.npz"


def sample_arm(arm: str, unet, cfg, scale: float, vae, work: Path, args) -> None:
    """Every missing batch of the arm's samples: scaled latents, decoded HU (int16), CPU seconds."""
    kind, steps = split(arm)
    latent_shape = (cfg.vae.latent_channels, *(s // cfg.vae.downsample_factor for s in GRID_SHAPE))
    for start in range(0, args.samples, args.sample_batch):
        path = batch_path(work, arm, start)
        if path.is_file() or not claim(path):  # done, or being made by another call right now
            continue
        seeds = list(range(start, min(start + args.sample_batch, args.samples)))
        say(f"{arm}: noise seeds {seeds[0]}-{seeds[-1]}")
        cpu, wall = time.process_time(), time.perf_counter()
        z = sample(unet, cfg, kind, steps, seeds, latent_shape, exact_grid=True)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        hu = decode_hu(vae, z / scale)
        with atomic_output(path, overwrite=True) as tmp:
            np.savez(tmp, latent=z.numpy().astype(np.float32), hu=np.round(hu).astype(np.int16),
                     seeds=np.array(seeds), cpu_seconds=cpu, wall_seconds=wall)
        path.with_suffix(".claim").unlink()


def claim(path: Path) -> bool:
    """Claim the making of `path` for this process (a `.claim` file holding its pid), so that two
    calls on one --work share the batches; a claim whose process has ended is taken over."""
    mark = path.with_suffix(".claim")
    mark.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        owner = mark.read_text().strip()
        if not owner.isdigit():
            return False  # being written this instant
        try:
            os.kill(int(owner), 0)
            return False
        except ProcessLookupError:
            mark.unlink(missing_ok=True)  # an interrupted call's
            return claim(path)
        except PermissionError:
            return False
    with os.fdopen(fd, "w") as fh:
        fh.write(str(os.getpid()))
    return True


def load_arm(work: Path, arm: str, n: int) -> dict | None:
    """The arm's first n samples, or None while any batch of them is missing."""
    parts, start = [], 0
    while start < n:
        path = batch_path(work, arm, start)
        if not path.is_file():
            return None
        data = dict(np.load(path))
        parts.append(data)
        start += len(data["seeds"])
    seeds = np.concatenate([p["seeds"] for p in parts])[:n]
    if not np.array_equal(seeds, np.arange(n)):
        sys.exit(f"{work / 'arms' / arm} holds seeds {seeds.tolist()}, not 0-{n - 1}; use one --sample-batch per --work")
    return {"latent": torch.from_numpy(np.concatenate([p["latent"] for p in parts])[:n]),
            "hu": np.concatenate([p["hu"] for p in parts])[:n].astype(np.float32),
            "cpu_seconds_per_sample": float(sum(p["cpu_seconds"] for p in parts)) / sum(len(p["seeds"]) for p in parts),
            "wall_seconds_per_sample": float(sum(p["wall_seconds"] for p in parts)) / sum(len(p["seeds"]) for p in parts)}


def image_stats(work: Path, name: str, hu: np.ndarray) -> list[SetStats]:
    """Per-volume 2.5D feature statistics of a set, kept under work/features/name (one file per volume)."""
    out = []
    for i, volume in enumerate(hu):
        # named by content: a regenerated sample never meets the features of the one it replaced
        digest = hashlib.sha1(np.ascontiguousarray(volume, np.float32).tobytes()).hexdigest()[:12]
        path = work / "features" / name / f"v{i:03d}-{digest}.npz"
        if not path.is_file():
            volume_set_stats([volume], **FID_KW, desc=name).save(path, overwrite=True)
        out.append(SetStats.load(path))
    return out


def scores(ref_image: SetStats, ref_latent, per_volume_image: list[SetStats], latents: torch.Tensor,
           draws: np.ndarray, patch: int) -> dict:
    """Image and latent FID of one set (all volumes, and at every bootstrap draw of its volumes)."""
    per_volume_latent = [latent_patch_stats(z, patch) for z in latents]
    image = lambda idx: fid_from_stats(ref_image, merge_set_stats([per_volume_image[i] for i in idx]))  # noqa: E731
    latent = lambda idx: latent_fid(ref_latent, [per_volume_latent[i] for i in idx])  # noqa: E731
    whole = image(range(len(latents)))
    return {"image_fid": whole.average, "image_fid_per_plane": whole.per_plane,
            "image_fid_draws": [image(idx).average for idx in draws],
            "latent_fid": latent(range(len(latents))), "latent_fid_draws": [latent(idx) for idx in draws]}


def mean_interval(values: np.ndarray, draws: np.ndarray, level: float) -> dict:
    """Mean of per-sample values and the percentile bootstrap interval of that mean (same draws)."""
    values = np.asarray(values, np.float64)
    return {"mean": float(values.mean()), "interval": percentile_interval(values[draws].mean(1), level),
            "min": float(values.min()), "max": float(values.max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("work/exp_samplers"))
    ap.add_argument("--data", type=Path, default=Path("work/exp_data"),
                    help="phantoms and latents shared by the experiments (made here when missing)")
    ap.add_argument("--rflow", type=Path, default=Path("work/exp_x0_training_2000/rflow/stage_1/last.pt"),
                    help="the rectified-flow UNet's checkpoint")
    ap.add_argument("--ddpm", type=Path, default=Path("work/exp_x0_training_2000/ddpm/stage_1/last.pt"),
                    help="the DDPM UNet's checkpoint (trained from the same start on the same batches)")
    ap.add_argument("--train-volumes", type=int, default=96, help="the UNets' training set (memorisation check)")
    ap.add_argument("--reference-volumes", type=int, default=32)
    ap.add_argument("--floor-volumes", type=int, default=None, help="default: --reference-volumes")
    ap.add_argument("--samples", type=int, default=32, help="samples per arm (noise seeds 0 .. samples-1)")
    ap.add_argument("--sample-batch", type=int, default=8)
    ap.add_argument("--arms", nargs="*", default=ARMS, choices=ARMS,
                    help="arms to sample in this call, in this order (none: only score what is there)")
    ap.add_argument("--resamples", type=int, default=1000, help="bootstrap draws")
    ap.add_argument("--level", type=float, default=0.95)
    ap.add_argument("--patch", type=int, default=2, help="latent FID patch size (voxels per side)")
    ap.add_argument("--report", type=Path, default=Path("docs/img/exp_samplers.png"), help="where the plot goes")
    args = ap.parse_args()
    floor_n = args.floor_volumes or args.reference_volumes
    torch.set_num_threads(1)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)

    say("data: phantoms, latents (bundled VAE), reconstructions")
    vae, _ = bundled_vae()
    train_ct, train_labels = phantom_arrays(args.data, train_seeds(args.train_volumes))
    train_cache = encode_to_cache(args.data / f"latents_{args.train_volumes}", vae, train_ct, labels=train_labels)
    scale = LatentDataset(train_cache).scale_factor  # the training latents' scale, as the networks see them
    sets = {}
    for name, tag, seeds, count in (("reference", "reference", reference_seeds, args.reference_volumes),
                                    (FLOOR, "test", test_seeds, floor_n)):
        ct, _ = phantom_arrays(args.data, seeds(count))
        cache = encode_to_cache(args.data / f"latents_{tag}_{count}", vae, ct)
        data = LatentDataset(cache, scale_factor=scale)
        z = torch.stack([data[i]["latent"] for i in range(len(data))])
        hu = cached_volumes(work / f"{name}_reconstructions_{count}.npz", lambda: decode_hu(vae, z / scale),
                            f"the VAE's reconstructions of the {name} phantoms")
        sets[name] = {"latent": z, "hu": hu}
    train_data = LatentDataset(train_cache)
    train_z = torch.stack([train_data[i]["latent"] for i in range(len(train_data))])

    unets = {}
    for arm in args.arms:
        objective = OBJECTIVE[split(arm)[0]]
        if load_arm(work, arm, args.samples) is None:
            if objective not in unets:
                path = args.rflow if objective == "rflow" else args.ddpm
                unet, cfg, unet_scale, steps = load_unet(path)
                if not np.isclose(unet_scale, scale, rtol=1e-5):
                    sys.exit(f"{path} was trained on latents scaled by {unet_scale}, not this cache's {scale}")
                unets[objective] = (unet, cfg, unet_scale, steps)
                say(f"{objective} UNet: {path}, {steps} training steps")
            unet, cfg, unet_scale, _ = unets[objective]
            sample_arm(arm, unet, cfg, unet_scale, vae, work, args)
        say(f"{arm}: sampled (or being sampled by another call)")

    say("scoring")
    draws = bootstrap_indices(args.samples, args.resamples, seed=0)
    floor_draws = draws if floor_n == args.samples else bootstrap_indices(floor_n, args.resamples, seed=0)
    ref_image = merge_set_stats(image_stats(work, "reference", sets["reference"]["hu"]))
    ref_latent = [latent_patch_stats(z, args.patch) for z in sets["reference"]["latent"]]
    arms = {a: d for a in ARMS if (d := load_arm(work, a, args.samples)) is not None}
    rows = {}
    for name in [FLOOR, *arms]:
        data = sets[FLOOR] if name == FLOOR else arms[name]
        say(f"  {name}")
        row = scores(ref_image, ref_latent, image_stats(work, name, data["hu"]), data["latent"],
                     floor_draws if name == FLOOR else draws, args.patch)
        near = nearest_training(data["latent"], train_z).distance.numpy()
        row["nearest_training"] = mean_interval(near, floor_draws if name == FLOOR else draws, args.level)
        if name != FLOOR:
            row["cpu_seconds_per_sample"] = data["cpu_seconds_per_sample"]
            row["wall_seconds_per_sample"] = data["wall_seconds_per_sample"]
        rows[name] = row
    # held-out data against the same training set: what a model that does not copy scores
    reference_near = nearest_training(sets["reference"]["latent"], train_z).distance.numpy()
    rows["reference"] = {"nearest_training": mean_interval(
        reference_near, bootstrap_indices(len(reference_near), args.resamples, seed=0), args.level)}
    for row in rows.values():
        for key in ("image_fid", "latent_fid"):
            if f"{key}_draws" in row:
                row[f"{key}_interval"] = percentile_interval(row[f"{key}_draws"], args.level)
    if "rf-100" in arms:
        end = arms["rf-100"]["latent"].flatten(1).double()
        for arm in arms:
            if arm.startswith("rf-"):
                gap = ((arms[arm]["latent"].flatten(1).double() - end).norm(dim=1) / end.norm(dim=1)).numpy()
                rows[arm]["distance_to_rf100"] = mean_interval(gap, draws, args.level)
    paired = []
    for a, b in PAIRS:
        if a in arms and b in arms:
            entry = {"a": a, "b": b}
            for key in ("image_fid", "latent_fid"):
                diff = np.subtract(rows[a][f"{key}_draws"], rows[b][f"{key}_draws"])
                entry[key] = {"difference": rows[a][key] - rows[b][key], "interval": percentile_interval(diff, args.level)}
            paired.append(entry)
    for row in rows.values():
        row.pop("image_fid_draws", None), row.pop("latent_fid_draws", None)

    results = {"command": " ".join(["python", *sys.argv]), "args": {k: str(v) for k, v in vars(args).items()},
               "grid": {"shape": GRID_SHAPE, "spacing": GRID_SPACING}, "samples": args.samples,
               "arms_complete": list(arms), "arms_missing": [a for a in ARMS if a not in arms],
               "unets": {"rflow": str(args.rflow), "ddpm": str(args.ddpm)}, "rows": rows, "paired": paired,
               "features": "offline HU-texture 2.5D features (NOT comparable with the paper); latent: 2^3 patches",
               "environment": {**environment(), "cpu": CpuCapabilities.detect().to_dict()}}
    write_json(work / "results.json", results)
    plot(results, args.report)
    sample_rows = [("reference (VAE recon.)", sets["reference"]["hu"])]
    sample_rows += [(a.upper(), arms[a]["hu"]) for a in ("rf-5", "rf-30", "rf-100", "ddim-30", "ddpm-1000") if a in arms]
    slices_figure(sample_rows, args.report.with_name(args.report.stem + "_samples.png"))
    print(tables(results))


def _ci(value: float, interval, digits: int) -> str:
    return f"{value:.{digits}f} [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"


def tables(results: dict) -> str:
    """The markdown tables of docs/results.md section 1, as they go there."""
    rows, n = results["rows"], results["samples"]
    level = f"{float(results['args']['level']):.0%}"
    head = (f"| arm | network calls | image FID [{level}] | latent FID [{level}] | "
            f"\\|\\|RF-k - RF-100\\|\\| / \\|\\|RF-100\\|\\| [{level}] | nearest training latent [{level}] | "
            "CPU s / sample |")
    lines = [head, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for arm in ARMS:
        if arm not in rows:
            lines.append(f"| {arm.upper()} | {split(arm)[1]} | not run | | | | |")
            continue
        r = rows[arm]
        gap = "" if "distance_to_rf100" not in r else "0 (itself)" if arm == "rf-100" else \
            _ci(r["distance_to_rf100"]["mean"], r["distance_to_rf100"]["interval"], 4)
        near = r["nearest_training"]
        lines.append(f"| {arm.upper()} | {split(arm)[1]} | {_ci(r['image_fid'], r['image_fid_interval'], 1)} | "
                     f"{_ci(r['latent_fid'], r['latent_fid_interval'], 3)} | {gap} | "
                     f"{_ci(near['mean'], near['interval'], 3)} | {r['cpu_seconds_per_sample']:.2f} |")
    f, ref = rows[FLOOR], rows["reference"]["nearest_training"]
    floor_n = results["args"]["floor_volumes"] if results["args"]["floor_volumes"] != "None" \
        else results["args"]["reference_volumes"]
    lines.append(f"| floor: {floor_n} other phantoms (VAE) | | {_ci(f['image_fid'], f['image_fid_interval'], 1)} | "
                 f"{_ci(f['latent_fid'], f['latent_fid_interval'], 3)} | | "
                 f"{_ci(f['nearest_training']['mean'], f['nearest_training']['interval'], 3)} | |")
    lines.append(f"| reference phantoms (held out) | | | | | {_ci(ref['mean'], ref['interval'], 3)} | |")
    out = ["\n".join(lines), ""]
    if results["paired"]:
        p = [f"| paired difference ({n} shared noise seeds) | image FID [{level}] | latent FID [{level}] |",
             "| --- | ---: | ---: |"]
        for e in results["paired"]:
            p.append(f"| {e['a'].upper()} - {e['b'].upper()} | "
                     f"{_ci(e['image_fid']['difference'], e['image_fid']['interval'], 1)} | "
                     f"{_ci(e['latent_fid']['difference'], e['latent_fid']['interval'], 3)} |")
        out.append("\n".join(p))
    return "\n".join(out)


def plot(results: dict, path: Path, size=(780, 330)) -> None:
    """Two panels (image FID, latent FID; log axes) against RF Euler steps (log axis) with interval
    bars; DDPM-1000, DDIM-30 and the floor as lines with their intervals as pale bands."""
    from PIL import Image, ImageDraw

    rows = results["rows"]
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    colours = {"DDPM-1000": (139, 0, 0), "DDIM-30": (255, 140, 0), "floor": (110, 110, 110)}
    width = (size[0] - 70 - 2 * 95) // 2
    for p, (key, title) in enumerate((("image_fid", "image FID (2.5D, offline)"), ("latent_fid", "latent FID (2^3 patches)"))):
        left = 60 + p * (width + 105)
        top, right, bottom = 25, left + width, size[1] - 35
        rf = [(split(a)[1], rows[a][key], rows[a][f"{key}_interval"]) for a in ARMS if a.startswith("rf-") and a in rows]
        bands = {name: rows[a] for name, a in (("DDPM-1000", "ddpm-1000"), ("DDIM-30", "ddim-30"), ("floor", FLOOR))
                 if a in rows}
        values = [v for _, v, iv in rf for v in (v, *iv)] + [v for r in bands.values() for v in (r[key], *r[f"{key}_interval"])]
        lo, hi = np.log10(max(min(values), 1e-4)) - 0.1, np.log10(max(values)) + 0.1
        x_of = lambda n: left + (np.log(n) - np.log(5)) / (np.log(100) - np.log(5)) * (right - left)  # noqa: E731
        y_of = lambda v: bottom - (np.log10(max(v, 1e-4)) - lo) / (hi - lo) * (bottom - top)  # noqa: E731
        draw.rectangle([left, top, right, bottom], outline="black")
        for name, r in bands.items():
            pale = tuple(int(c + (255 - c) * 0.8) for c in colours[name])
            draw.rectangle([left + 1, y_of(r[f"{key}_interval"][1]), right - 1, y_of(r[f"{key}_interval"][0])], fill=pale)
        label_y = []
        for name, r in sorted(bands.items(), key=lambda item: -item[1][key]):
            y = y_of(r[key])
            draw.line([(left, y), (right, y)], fill=colours[name], width=1)
            y_text = max([y - 6] + [prev + 11 for prev in label_y if abs(prev - (y - 6)) < 11])  # no overlaps
            label_y.append(y_text)
            draw.text((right + 4, y_text), name, fill=colours[name])
        pts = [(x_of(n), y_of(v)) for n, v, _ in rf]
        if len(pts) > 1:
            draw.line(pts, fill="navy", width=2)
        for (x, y), (n, _, (lo_i, hi_i)) in zip(pts, rf):
            draw.line([(x, y_of(lo_i)), (x, y_of(hi_i))], fill="navy", width=1)
            for end in (lo_i, hi_i):
                draw.line([(x - 3, y_of(end)), (x + 3, y_of(end))], fill="navy")
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill="navy")
            draw.text((x - 8, bottom + 4), str(n), fill="black")
        for e in range(int(np.ceil(lo)), int(np.floor(hi)) + 1):
            draw.line([(left - 4, y_of(10.0 ** e)), (left, y_of(10.0 ** e))], fill="black")
            draw.text((left - 40, y_of(10.0 ** e) - 6), f"1e{e}", fill="black")
        draw.text((left, 5), f"{title} vs RF Euler steps, {results['samples']} samples", fill="black")
    draw.text((60, size[1] - 14), f"bars / bands: {float(results['args']['level']):.0%} bootstrap intervals over "
              "volumes; navy: RF Euler (exact grid); floor: other phantoms' VAE reconstructions / latents", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


if __name__ == "__main__":
    main()
