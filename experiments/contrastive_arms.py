"""Issue #26, item 2: the region-specific contrastive loss where it can matter.

The paper's claim: a ControlNet trained with the contrastive loss renders small tumours that one
trained without it misses, and the reversed lambda schedule fails. Experiment 2
(experiments/contrastive.py) could not decide it: its tumours were large enough to be drawn without
the loss, and at our window size lambda x D_roi was 10-70x weaker, relative to the flow loss, than
in the paper's 128 x 128 x 32 latents. Here:

1. the frozen base: the best flow UNet of this grid (`--unet`; the 2000-step rectified-flow UNet of
   experiments/x0_training.py by default);
2. arms (`ARMS`), each trained from `--seeds` training seeds (the seed sets the ControlNet's initial
   weights and the batch order, so arm A seed s and arm B seed s see the same data in the same
   order: the arms are paired by seed):
   * ``none``: no contrastive terms;
   * ``paper``: the paper's schedule (0.01 for the first half, 0.001 after) in the "normalised"
     lambda mode, which gives the contrastive gradient the strength relative to the flow loss that
     lambda has in a 128 x 128 x 32 latent holding 64 tumour voxels (`maisi2.losses`, derived and
     tested there): about 15-25x the raw lambda on our 16^3 windows (logged 0.15-0.24 for 0.01);
   * ``reversed``: 0.001 then 0.01, normalised the same way;
   * optional raw-lambda arms ``lambda-0.01``, ``lambda-0.1``, ``lambda-0.5`` (constant lambda);
3. tumours at the VAE's visibility threshold: each of `--cases` held-out phantom masks gets its
   tumours out and 1-2 lung balls of radius `--radius` (10-14 mm: the bundled VAE gives back lung
   tumours of ~140 voxels and more on this 4 mm grid, i.e. radius ~13 mm, experiments/vae_ceiling.py);
4. endpoint, paired by noise: each ControlNet renders the mask with and without the implanted
   tumours from the same noise seed (30 Euler steps); per tumour the mean HU change inside it and
   in a 2-voxel ring around it; per case the mean |HU change| outside the tumours grown by 3
   voxels (the background, which the loss's second term should keep unchanged). The ceiling: the
   same changes between the VAE's reconstructions of the phantom CT with and without the tumours
   painted in (at the training phantoms' median lung-tumour HU). A tumour counts as drawn when its
   inside change reaches half of the ceiling's for that tumour;
5. intervals: 95 % bootstrap over cases (each case with all its tumours, every seed kept), for
   each arm and for each arm's paired difference from ``none`` (same seeds, masks and noise).

    OMP_NUM_THREADS=1 python experiments/contrastive_arms.py --work work/exp_contrastive_arms \\
        --data work/exp_data --unet work/exp_x0_training_2000/rflow/stage_1/last.pt --no-progress
    python experiments/contrastive_arms.py --steps 10 --seeds 0 --cases 2 --work work/smoke_arms  # smoke

Rerunning continues: ControlNets resume, rendered volumes are cached per (arm, seed).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from common import (GRID_SHAPE, GRID_SPACING, IMPLANTS, bundled_vae, cached_volumes, edit_mask, encode_to_cache,
                    environment, generate_ct, load_controlnet, phantom_arrays, reconstruct_hu, say, test_seeds,
                    train_seeds, write_json)

from maisi2.evaluate.fid import bootstrap_indices, percentile_interval
from maisi2.labels import remove_tumors
from maisi2.train_controlnet import ControlNetLossSettings, ControlNetRecipe, load_frozen_unet, train_controlnet

LUNG_TUMOR = IMPLANTS["lung"][1]
PAPER, REVERSED = ((0.0, 0.01), (0.5, 0.001)), ((0.0, 0.001), (0.5, 0.01))
ARMS = {
    "none": dict(contrastive=False),
    "paper": dict(contrastive=True, lambda_mode="normalised", lambda_schedule=PAPER),
    "reversed": dict(contrastive=True, lambda_mode="normalised", lambda_schedule=REVERSED),
    "lambda-0.01": dict(contrastive=True, lambda_schedule=((0.0, 0.01),)),
    "lambda-0.1": dict(contrastive=True, lambda_schedule=((0.0, 0.1),)),
    "lambda-0.5": dict(contrastive=True, lambda_schedule=((0.0, 0.5),)),
}
RING_VOXELS, BACKGROUND_MARGIN = 2, 3
# endpoint -> (measured key, reduction over tumours or cases); "drawn": the share of tumours whose
# inside change reaches half of the VAE ceiling's for that tumour
ENDPOINTS = {"inside": ("inside", np.mean), "ring": ("ring", np.mean), "background": ("background", np.mean),
             "drawn": ("share", lambda share: np.mean(share >= 0.5))}


def train_arm(arm: str, seed: int, cache: Path, args) -> Path:
    folder = args.work / f"{arm}_seed{seed}"
    recipe = ControlNetRecipe.of(loss=ControlNetLossSettings(**ARMS[arm]), steps=args.steps, lr=args.lr, warmup=20,
                                 ema_decay=0.99, ckpt_every=25, seed=seed, crop=tuple(args.crop),
                                 tumor_crops=args.tumor_crops, amp=args.amp)
    if not (folder / "done").is_file():
        say(f"ControlNet {arm}, seed {seed}: {args.steps} steps")
        train_controlnet(cache, args.unet, folder, recipe, resume=True, device="cpu", progress=not args.no_progress)
        (folder / "done").write_text("")
    return folder / "last.pt"


def implanted_masks(test_labels: np.ndarray, args) -> tuple[np.ndarray, np.ndarray]:
    """(with, without): each held-out mask with its tumours out and 1-2 lung balls in, and the same
    mask without the balls (its tumours out)."""
    with_t = np.stack([edit_mask(lab, np.random.default_rng(args.mask_seed + i), radius_mm=tuple(args.radius),
                                 kind="lung") for i, lab in enumerate(test_labels)])
    without = np.stack([remove_tumors(lab) for lab in test_labels])
    return with_t, without


def changes(with_vol: np.ndarray, without_vol: np.ndarray, masks: np.ndarray) -> dict:
    """Per tumour (connected component of the implanted lung tumour label): mean HU change inside
    and in a ring around it; per case: mean |change| outside the tumours grown by BACKGROUND_MARGIN."""
    from scipy import ndimage

    inside, ring, case_of, voxels, background = [], [], [], [], []
    for case, (a, b, mask) in enumerate(zip(with_vol, without_vol, masks)):
        tumor = mask == LUNG_TUMOR
        components, count = ndimage.label(tumor)
        for k in range(1, count + 1):
            one = components == k
            around = ndimage.binary_dilation(one, iterations=RING_VOXELS) & ~tumor
            inside.append(float(a[one].mean() - b[one].mean()))
            ring.append(float(a[around].mean() - b[around].mean()))
            case_of.append(case)
            voxels.append(int(one.sum()))
        outside = ~ndimage.binary_dilation(tumor, iterations=BACKGROUND_MARGIN)
        background.append(float(np.abs(a[outside] - b[outside]).mean()))
    return {"inside": inside, "ring": ring, "case": case_of, "voxels": voxels, "background": background}


def pooled(per_seed: list[dict], key: str, reduce, cases: np.ndarray) -> float:
    """`reduce` over the values of `key` of these cases (tumours of a case, or the case's own value
    for "background"), every seed's pooled together; a case drawn twice counts twice."""
    parts = []
    for s in per_seed:
        if key == "background":
            parts.append(np.asarray(s[key], dtype=float)[cases])
        else:
            values, case_of = np.asarray(s[key], dtype=float), np.asarray(s["case"])
            parts += [values[case_of == c] for c in cases]
    return float(reduce(np.concatenate(parts)))


def case_bootstrap(per_seed: list[dict], key: str, reduce, resamples: int = 2000, seed: int = 0):
    """(point, lo, hi): `pooled` over all cases, with a 95 % bootstrap interval that resamples cases
    (each case with all its tumours, in every seed at once: `fid.bootstrap_indices`)."""
    cases = len(per_seed[0]["background"])
    values = [pooled(per_seed, key, reduce, draw) for draw in bootstrap_indices(cases, resamples, seed)]
    return (pooled(per_seed, key, reduce, np.arange(cases)), *percentile_interval(values))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("work/exp_contrastive_arms"))
    ap.add_argument("--data", type=Path, default=Path("work/exp_data"))
    ap.add_argument("--unet", type=Path, default=Path("work/exp_x0_training_2000/rflow/stage_1/last.pt"),
                    help="the frozen rectified-flow UNet")
    ap.add_argument("--arms", nargs="+", default=["none", "paper", "reversed"], choices=list(ARMS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds per arm")
    ap.add_argument("--train-volumes", type=int, default=96)
    ap.add_argument("--steps", type=int, default=400, help="ControlNet training steps per run")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--crop", type=int, nargs=3, default=(16, 16, 16), metavar=("X", "Y", "Z"))
    ap.add_argument("--tumor-crops", type=float, default=0.7, help="share of windows centred on a tumour")
    ap.add_argument("--cases", type=int, default=8, help="held-out masks with implanted lung tumours")
    ap.add_argument("--radius", type=float, nargs=2, default=(10.0, 14.0), metavar=("MIN", "MAX"),
                    help="radius range of the implanted lung tumours (mm)")
    ap.add_argument("--mask-seed", type=int, default=0)
    ap.add_argument("--amp", choices=("auto", "fp32", "bf16"), default="auto",
                    help="training precision of the ControlNets (auto: bf16 autocast where the CPU pays); use a "
                         "separate --work per choice, runs are cached by arm and seed only")
    ap.add_argument("--train-only", action="store_true", help="train the ControlNets, render nothing")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--report", type=Path, default=Path("docs/img/exp_contrastive_arms.png"),
                    help="the plot (per-seed and pooled HU change inside the tumours, per arm)")
    args = ap.parse_args()
    if not args.unet.is_file():
        sys.exit(f"{args.unet} does not exist: run experiments/x0_training.py first (its rflow UNet is the base), "
                 "or pass --unet")
    if args.steps < 1 or args.cases < 1 or not 0 < args.radius[0] <= args.radius[1]:
        sys.exit("--steps and --cases must be >= 1 and --radius MIN MAX with 0 < MIN <= MAX")
    work, started = args.work, time.time()
    work.mkdir(parents=True, exist_ok=True)

    train_ct, train_labels = phantom_arrays(args.data, train_seeds(args.train_volumes))
    test_ct, test_labels = phantom_arrays(args.data, test_seeds(args.cases), at_least_one_tumor=True)
    vae, _ = bundled_vae()
    cache = encode_to_cache(args.data / f"latents_{args.train_volumes}", vae, train_ct, labels=train_labels)
    with_masks, without_masks = implanted_masks(test_labels, args)
    tumor_hu = float(np.median(train_ct[train_labels == LUNG_TUMOR]))
    painted = np.where(with_masks == LUNG_TUMOR, np.float32(tumor_hu), test_ct).astype(np.float32)
    tag = f"{args.cases}_{args.radius[0]:g}-{args.radius[1]:g}mm_m{args.mask_seed}"
    ceiling = changes(cached_volumes(work / f"ceiling_with_{tag}.npz", lambda: reconstruct_hu(vae, painted), "VAE ceiling"),
                      cached_volumes(work / f"ceiling_without_{tag}.npz", lambda: reconstruct_hu(vae, test_ct), "VAE ceiling"),
                      with_masks)
    unet, cfg, scale = load_frozen_unet(args.unet)
    measured = {}
    # Seeds outer, arms inner, each run measured as soon as it is trained: an interrupted run has
    # every arm at the same number of seeds, and its results so far are usable.
    for seed in args.seeds:
        for arm in args.arms:
            path = train_arm(arm, seed, cache, args)
            if args.train_only:
                continue
            controlnet = load_controlnet(path)
            render = lambda masks: np.stack([generate_ct(unet, controlnet, cfg, scale, vae, lab, seed=100 + i)  # noqa: E731
                                             for i, lab in enumerate(masks)])
            a = cached_volumes(work / f"with_{arm}_seed{seed}_{tag}.npz", lambda: render(with_masks),
                               f"{arm} seed {seed}, with")
            b = cached_volumes(work / f"without_{arm}_seed{seed}_{tag}.npz", lambda: render(without_masks),
                               f"{arm} seed {seed}, without")
            measured[(arm, seed)] = changes(a, b, with_masks)
            share = np.asarray(measured[(arm, seed)]["inside"]) / np.asarray(ceiling["inside"])
            say(f"  {arm} seed {seed}: inside {np.mean(measured[(arm, seed)]['inside']):+.0f} HU, "
                f"{np.mean(share >= 0.5):.2f} drawn")
    if args.train_only:
        return
    results = summarise(measured, ceiling, args)
    results.update({"command": " ".join(sys.argv), "args": {k: str(v) for k, v in vars(args).items()},
                    "grid": {"shape": GRID_SHAPE, "spacing": GRID_SPACING}, "painted_tumour_hu": tumor_hu,
                    "environment": environment(), "wall_seconds": time.time() - started})
    write_json(work / f"results_{tag}.json", results)
    plot(results, args.report)
    print(table(results))


def summarise(measured: dict, ceiling: dict, args) -> dict:
    """Per arm: the endpoints with case-bootstrap intervals, per seed, and paired against `none`."""
    ceiling_inside = np.asarray(ceiling["inside"])
    for m in measured.values():  # the share of the VAE's ceiling each tumour reaches
        m["share"] = list(np.asarray(m["inside"]) / ceiling_inside)
    arms = {}
    for arm in args.arms:
        per_seed = [measured[(arm, s)] for s in args.seeds if (arm, s) in measured]
        row = {"seeds": [s for s in args.seeds if (arm, s) in measured]}
        cases = np.arange(len(per_seed[0]["background"]))
        for name, (key, reduce) in ENDPOINTS.items():
            row[name] = case_bootstrap(per_seed, key, reduce)
            row[f"{name}_per_seed"] = [pooled([s], key, reduce, cases) for s in per_seed]
        if arm != "none" and all(("none", s) in measured for s in row["seeds"]):
            diffs = []
            for s in row["seeds"]:
                a, b = measured[(arm, s)], measured[("none", s)]
                diffs.append({k: list(np.asarray(a[k]) - np.asarray(b[k])) for k in ("inside", "ring", "background", "share")}
                             | {"case": a["case"]})
            row["minus_none"] = {k: case_bootstrap(diffs, k, np.mean) for k in ("inside", "ring", "background", "share")}
        arms[arm] = row
    return {"arms": arms, "ceiling": {"inside_mean": float(np.mean(ceiling["inside"])),
                                      "ring_mean": float(np.mean(ceiling["ring"])),
                                      "per_tumour_inside": ceiling["inside"], "voxels": ceiling["voxels"]},
            "tumours": len(ceiling["inside"])}


def plot(results: dict, path: Path, size=(520, 280)) -> None:
    """Per arm: the mean HU change inside the implanted tumours of each training seed (dots) and
    pooled over seeds with its 95 % case-bootstrap interval (bar); the VAE ceiling as a line."""
    from PIL import Image, ImageDraw

    arms = results["arms"]
    ceiling = results["ceiling"]["inside_mean"]
    values = [v for r in arms.values() for v in (*r["inside"], *r["inside_per_seed"])] + [ceiling, 0.0]
    lo, hi = min(values) - 10, max(values) * 1.08
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = 60, 25, size[0] - 20, size[1] - 35
    y_of = lambda v: bottom - (v - lo) / (hi - lo) * (bottom - top)  # noqa: E731
    draw.rectangle([left, top, right, bottom], outline="black")
    for level, colour, name in ((0.0, "gray", "0"), (ceiling, "darkred", f"VAE ceiling {ceiling:+.0f}")):
        draw.line([(left, y_of(level)), (right, y_of(level))], fill=colour)
        draw.text((left + 4, y_of(level) - 12), name, fill=colour)
    step = (right - left) / (len(arms) + 1)
    for k, (arm, r) in enumerate(arms.items(), start=1):
        x = left + k * step
        point, low, high = r["inside"]
        draw.line([(x, y_of(low)), (x, y_of(high))], fill="navy", width=3)
        draw.line([(x - 8, y_of(point)), (x + 8, y_of(point))], fill="navy", width=3)
        for j, v in enumerate(r["inside_per_seed"]):
            dx = 14 + 6 * j
            draw.ellipse([x + dx - 3, y_of(v) - 3, x + dx + 3, y_of(v) + 3], fill="darkorange")
        draw.text((x - 20, bottom + 6), f"{arm} ({len(r['seeds'])})", fill="black")
    draw.text((left, 6), "HU change inside the implanted lung tumours (bar: pooled, 95 % interval; dots: seeds)",
              fill="black")
    for v in (lo, hi):
        draw.text((4, y_of(v) - 6), f"{v:+.0f}", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def table(results: dict) -> str:
    fmt = lambda t, f="+.0f": f"{t[0]:{f}} ({t[1]:{f}} to {t[2]:{f}})"  # noqa: E731
    lines = [f"{results['tumours']} implanted lung tumours; value (95 % case-bootstrap interval), all seeds pooled", "",
             "| arm | seeds | HU change inside | ring (2 voxels) | mean abs. change, background | tumours drawn "
             "(>= half the VAE ceiling) | per seed: inside / drawn |",
             "| --- | ---: | --- | --- | --- | --- | --- |"]
    for arm, r in results["arms"].items():
        per = "; ".join(f"{i:+.0f} / {d:.2f}" for i, d in zip(r["inside_per_seed"], r["drawn_per_seed"]))
        lines.append(f"| {arm} | {len(r['seeds'])} | {fmt(r['inside'])} | {fmt(r['ring'])} | {fmt(r['background'], '.1f')} | "
                     f"{fmt(r['drawn'], '.2f')} | {per} |")
    c = results["ceiling"]
    lines.append(f"| (VAE ceiling: reconstructions with / without the painted tumours) | | {c['inside_mean']:+.0f} | "
                 f"{c['ring_mean']:+.0f} | | 1.00 | |")
    diff = [(arm, r["minus_none"]) for arm, r in results["arms"].items() if "minus_none" in r]
    if diff:
        lines += ["", "Paired difference from `none` (same seeds, masks and noise):", "",
                  "| arm minus none | inside (HU) | ring (HU) | background mean abs. (HU) | share of the ceiling |",
                  "| --- | --- | --- | --- | --- |"]
        for arm, d in diff:
            lines.append(f"| {arm} | {fmt(d['inside'])} | {fmt(d['ring'])} | {fmt(d['background'], '+.1f')} | "
                         f"{fmt(d['share'], '+.2f')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
