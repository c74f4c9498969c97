"""Experiment 2 of issue #6: does the region-specific contrastive loss make small tumours appear?

The paper: a ControlNet trained with the contrastive loss (lambda 0.01 for the first half of
training, 0.001 after) renders small tumours that one trained without it misses; with the order
reversed (0.001 then 0.01) it fails.

Here, in miniature:
1. the frozen base: experiment 1's rectified-flow UNet (`experiments/steps.py` must have run, or
   pass --unet), on the same phantom grid and latent cache (which stores the label maps);
2. three ControlNets from the same start, same data, steps and learning rate: without the
   contrastive terms, with the paper's schedule, with the reversed schedule;
3. for held-out phantom masks (their tumours drawn at random, at least one each), a 30-step sample
   per ControlNet from the same noise seed, decoded by the bundled VAE;
4. per tumour (`maisi2.evaluate.fidelity`): the HU contrast of the generated tumour against its
   parent organ next to the phantom's true contrast, and the Dice of a tumour segmenter trained
   here on the training phantoms; per variant, the 2.5D FID (offline features) of the generated
   volumes against the reference phantoms -- tumours are well under 1 % of the voxels, so this is
   in effect the background FID;
5. the ceiling: the same measures on the bundled VAE's reconstructions of the held-out phantoms
   (every sample is decoded by that VAE, so no ControlNet can show more than it gives back; on this
   grid it keeps only lung tumours of ~140+ voxels, `experiments/vae_ceiling.py`);
6. tumours the VAE can show: the held-out masks edited (their tumours out, 1-2 lung tumours of
   radius 14-20 mm in), rendered by each ControlNet from the same noise; the generated
   tumour-to-lung contrast, the paired HU change inside and around the tumours (against the
   sample of the original mask from the same noise) and the segmenter's detection, next to the
   phantom CT with those tumours painted in at the training phantoms' median lung-tumour HU and
   its VAE reconstruction;
7. the real scan of ../shared/data (when present): its imported label map with 1-2 hepatic
   tumours implanted in the liver, rendered by each ControlNet; the generated tumour-to-liver
   contrast and the segmenter's detection (no real tumour exists to compare with).

    python experiments/contrastive.py                     # after experiments/steps.py; ~1 h 50 min on 2 cores
    python experiments/contrastive.py --steps 20 --cases 2 --seg-steps 20   # smoke run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from common import (GRID_SHAPE, GRID_SPACING, IMPLANTS, LUNG_IMPLANT_RADIUS_MM, reference_seeds,
                    test_seeds, train_seeds, bundled_vae, cached_volumes, edit_mask, encode_to_cache, environment,
                    phantom_arrays, real_scan_on_grid, reconstruct_hu, say, tumor_segmenter, write_json,
                    VARIANTS, generate_ct, load_controlnet, slug)

from maisi2.evaluate.fid import fid, volume_set_stats
from maisi2.evaluate.fidelity import fidelity
from maisi2.train_controlnet import ControlNetLossSettings, ControlNetRecipe, load_frozen_unet, train_controlnet

LUNG_TUMOR = IMPLANTS["lung"][1]


def train_variants(cache: Path, unet: Path, work: Path, args) -> dict[str, Path]:
    out = {}
    for name, loss in VARIANTS.items():
        recipe = ControlNetRecipe.of(loss=ControlNetLossSettings(**loss), steps=args.steps, lr=args.lr, warmup=20,
                                     ema_decay=0.99, ckpt_every=25, seed=args.seed, crop=tuple(args.crop or ()),
                                     tumor_crops=args.tumor_crops)
        folder = work / slug(name)
        say(f"ControlNet '{name}': {args.steps} steps")
        train_controlnet(cache, unet, folder, recipe, resume=True, device="cpu", progress=not args.no_progress)
        out[name] = folder / "last.pt"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("work/exp_contrastive"))
    ap.add_argument("--data", type=Path, default=Path("work/exp_data"))
    ap.add_argument("--unet", type=Path, default=Path("work/exp_steps/rflow/stage_1/last.pt"),
                    help="the frozen rectified-flow UNet (experiment 1's)")
    ap.add_argument("--train-volumes", type=int, default=96)
    ap.add_argument("--reference-volumes", type=int, default=32)
    ap.add_argument("--steps", type=int, default=1600, help="ControlNet training steps per variant")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--crop", type=int, nargs=3, default=(16, 16, 16), metavar=("X", "Y", "Z"),
                    help="train on latent windows of this size (ControlNetRecipe.crop; the latent is 24 x 24 x 16, "
                         "so 24 24 16 trains on whole latents)")
    ap.add_argument("--tumor-crops", type=float, default=0.7, help="share of windows centred on a tumour")
    ap.add_argument("--cases", type=int, default=8, help="held-out masks generated per variant")
    ap.add_argument("--seg-steps", type=int, default=800, help="tumour segmenter training steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--report", type=Path, default=Path("docs/img/exp_contrastive.png"))
    args = ap.parse_args()
    if not args.unet.is_file():
        sys.exit(f"{args.unet} does not exist: run experiments/steps.py first (its rflow UNet is the frozen base), "
                 "or pass --unet")
    work, started = args.work, time.time()
    work.mkdir(parents=True, exist_ok=True)

    train_ct, train_labels = phantom_arrays(args.data, train_seeds(args.train_volumes))
    ref_ct, _ = phantom_arrays(args.data, reference_seeds(args.reference_volumes))
    test_ct, test_labels = phantom_arrays(args.data, test_seeds(args.cases), at_least_one_tumor=True)
    vae, _ = bundled_vae()
    cache = encode_to_cache(args.data / f"latents_{args.train_volumes}", vae, train_ct, labels=train_labels)
    controlnets = train_variants(cache, args.unet, work, args)
    segmenter = tumor_segmenter(args.data / f"segmenter_{args.train_volumes}_{args.seg_steps}.pt",
                                 list(zip(train_ct, train_labels)), args.seg_steps, seed=args.seed,
                                 progress=not args.no_progress)

    unet, cfg, scale = load_frozen_unet(args.unet)
    ref_stats = volume_set_stats(ref_ct, spacing=None, shape=None, progress=False, desc="reference")
    rows, lung_rows = [], []
    recon = cached_volumes(work / "vae_reconstructions.npz", lambda: reconstruct_hu(vae, test_ct), "VAE reconstructions")
    lung_masks, painted = lung_implants(test_ct, test_labels, train_ct, train_labels, args.seed)
    painted_recon = cached_volumes(work / "lung_painted_reconstructions.npz", lambda: reconstruct_hu(vae, painted),
                                   "VAE reconstructions of the painted phantoms")
    generated = {}
    for name, path in controlnets.items():
        controlnet = load_controlnet(path)
        render = lambda masks: np.stack([generate_ct(unet, controlnet, cfg, scale, vae, lab, seed=100 + i)  # noqa: E731
                                         for i, lab in enumerate(masks)])
        generated[name] = cached_volumes(work / f"samples_{slug(name)}.npz", lambda: render(test_labels),
                                         f"{args.cases} cases with '{name}'")
        lung = cached_volumes(work / f"lung_{slug(name)}.npz", lambda: render(lung_masks),
                              f"{args.cases} lung-implant cases with '{name}'")
        rows.append(score(name, generated[name], test_labels, test_ct, segmenter, ref_stats))
        lung_rows.append({**score(name, lung, lung_masks, None, segmenter),
                          **paired_change(lung, generated[name], lung_masks)})
    rows.append(score("(the VAE's reconstructions: the ceiling)", recon, test_labels, test_ct, segmenter, ref_stats))
    lung_rows += [{**score("(phantom CT, tumours painted in)", painted, lung_masks, None, segmenter),
                   **paired_change(painted, test_ct, lung_masks)},
                  {**score("(its VAE reconstruction: the ceiling)", painted_recon, lung_masks, None, segmenter),
                   **paired_change(painted_recon, recon, lung_masks)}]
    real = [fidelity(ct, lab, GRID_SPACING, segmenter=segmenter) for ct, lab in zip(test_ct, test_labels)]
    real_scan = real_scan_on_grid()
    real_mask = None if real_scan is None else real_mask_case(real_scan, controlnets, unet, cfg, scale, vae,
                                                              segmenter, work, args)
    results = {"command": " ".join(sys.argv), "args": {k: str(v) for k, v in vars(args).items()},
               "grid": {"shape": GRID_SHAPE, "spacing": GRID_SPACING}, "rows": rows,
               "segmenter_on_real_phantoms": {
                   "mean_detected_fraction": float(np.mean([t.detected_fraction for r in real for t in r.tumors])),
                   "mean_case_dice": float(np.mean([r.dice for r in real]))},
               "lung_implants": lung_rows,
               "real_scan_mask": None if real_mask is None else real_mask["rows"],
               "features": "offline HU-texture (NOT comparable with the paper)", "environment": environment(),
               "wall_seconds": time.time() - started}
    write_json(work / "results.json", results)
    cases = min(3, len(test_labels))
    lung_cases = min(2, len(test_labels))
    generated = {name: np.concatenate([g[:cases], np.load(work / f"lung_{slug(name)}.npz")["hu"][:lung_cases]])
                 for name, g in generated.items()}
    real_ct = np.concatenate([test_ct[:cases], painted[:lung_cases]])
    labels = np.concatenate([test_labels[:cases], lung_masks[:lung_cases]])
    titles = ["phantom"] * cases + ["lung tumour painted in"] * lung_cases
    if real_mask is not None:  # the real scan's row last
        real_ct, labels = np.concatenate([real_ct, real_scan[0][None]]), np.concatenate([labels, real_mask["labels"][None]])
        generated = {name: np.concatenate([g, real_mask["generated"][name][None]]) for name, g in generated.items()}
        titles.append("real scan (no tumour)")
    figure(real_ct, labels, generated, args.report, titles)
    roi_distance_plot({name: work / slug(name) / "log.csv" for name, loss in VARIANTS.items() if loss["contrastive"]},
                      args.report.with_name(args.report.stem + "_droi.png"))
    print(table(results))


def roi_distance_plot(logs: dict[str, Path], path: Path, size=(520, 260), bin_steps: int = 100) -> None:
    """The logged contrastive distance D_roi (mean |v_mask - v_tumours-as-organ| over the tumour
    voxels of the training batch) of each variant, averaged over bins of `bin_steps` steps."""
    import csv

    from PIL import Image, ImageDraw

    curves = {}
    for name, log in logs.items():
        rows = [r for r in csv.DictReader(open(log)) if float(r["roi_samples"]) > 0]
        steps, d = np.array([int(r["step"]) for r in rows]), np.array([float(r["d_roi"]) for r in rows])
        bins = (steps - 1) // bin_steps
        curves[name] = [((b + 1) * bin_steps, float(d[bins == b].mean())) for b in np.unique(bins)]
    hi = max(v for c in curves.values() for _, v in c) * 1.1 or 1.0
    last = max(s for c in curves.values() for s, _ in c)
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = 45, 22, size[0] - 10, size[1] - 45
    draw.rectangle([left, top, right, bottom], outline="black")
    middle = (left + right) / 2  # both schedules switch lambda half-way
    draw.line([(middle, top), (middle, bottom)], fill="grey")
    draw.text((middle + 3, top + 2), "lambda switches", fill="grey")
    for k, (name, curve) in enumerate(curves.items()):
        colour = ("navy", "firebrick", "darkgreen")[k % 3]
        xy = [(left + s / last * (right - left), bottom - v / hi * (bottom - top)) for s, v in curve]
        draw.line(xy, fill=colour, width=2)
        draw.text((left + 5, bottom + 18 + 12 * k - 12), name, fill=colour)
    draw.text((left, 4), f"logged D_roi, mean over {bin_steps}-step bins", fill="black")
    draw.text((2, top), f"{hi:.2g}", fill="black")
    draw.text((2, bottom - 10), "0", fill="black")
    draw.text((right - 60, bottom + 3), f"step {last}", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def lung_implants(test_ct, test_labels, train_ct, train_labels, seed: int, radius_mm=LUNG_IMPLANT_RADIUS_MM):
    """Each held-out mask with its tumours out and 1-2 lung tumours of `radius_mm` in, and the
    phantom CT with those tumours painted at the training phantoms' median lung-tumour HU."""
    tumor_id = IMPLANTS["lung"][1]
    tumor_hu = float(np.median(train_ct[train_labels == tumor_id]))
    masks = np.stack([edit_mask(lab, np.random.default_rng(seed + i), radius_mm=radius_mm, kind="lung")
                      for i, lab in enumerate(test_labels)])
    painted = np.where(masks == tumor_id, np.float32(tumor_hu), test_ct).astype(np.float32)
    return masks, painted


def paired_change(with_tumors, without_tumors, masks, ring_voxels: int = 2) -> dict:
    """Mean HU change, volume with the implanted lung tumours minus the same volume without them
    (for samples: the original mask from the same noise), inside the tumours and in a ring of
    `ring_voxels` around them; per case."""
    from scipy import ndimage

    inside, ring = [], []
    for a, b, mask in zip(with_tumors, without_tumors, masks):
        tumor = mask == LUNG_TUMOR
        around = ndimage.binary_dilation(tumor, iterations=ring_voxels) & ~tumor
        inside.append(float(a[tumor].mean() - b[tumor].mean()))
        ring.append(float(a[around].mean() - b[around].mean()))
    return {"paired_change_inside_hu": inside, "paired_change_ring_hu": ring}


def score(name: str, volumes, labels, real_ct, segmenter, ref_stats=None) -> dict:
    """Tumour fidelity of volumes against their masks (contrast error needs `real_ct`); FID when
    `ref_stats` is given."""
    tumors, case_dice = [], []
    for i, (volume, lab) in enumerate(zip(volumes, labels)):
        result = fidelity(volume, lab, GRID_SPACING, real_hu=None if real_ct is None else real_ct[i], segmenter=segmenter)
        case_dice.append(result.dice)
        tumors += [t.to_dict() for t in result.tumors]
    row = {"variant": name, "tumors": len(tumors),
           "median_abs_contrast_error_hu": _median_abs([t.get("contrast_error_hu") for t in tumors]),
           "median_contrast_hu": _median([t["contrast_hu"] for t in tumors]),
           "mean_detected_fraction": float(np.mean([t["detected_fraction"] for t in tumors])),
           "mean_case_dice": float(np.mean(case_dice)),
           "fid": None if ref_stats is None else fid(ref_stats, volumes, spacing=None, shape=None, progress=False).average,
           "per_tumor": tumors}
    say(f"  {name}: {row['tumors']} tumours, median contrast {row['median_contrast_hu']}, "
        f"error {row['median_abs_contrast_error_hu']}, detected {row['mean_detected_fraction']:.3f}, FID {row['fid']}")
    return row


def figure(real_ct: np.ndarray, labels: np.ndarray, generated: dict[str, np.ndarray], path: Path,
           first_titles: list[str] | None = None, size: int = 144) -> None:
    """Per case (rows): the real volume (`first_titles`, default "phantom") and each variant's
    sample on the axial slice through the largest tumour, the mask's tumour outline drawn on all;
    window [-200, 300] HU, or [-1000, 200] HU where that tumour is a lung tumour."""
    from PIL import Image, ImageDraw
    from scipy import ndimage

    from maisi2.labels import TUMOR_IDS

    columns = ["phantom", *generated]
    cases = len(labels)
    first_titles = first_titles or ["phantom"] * cases
    canvas = Image.new("RGB", (len(columns) * (size + 4), cases * (size + 16) + 14), "black")
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 1), "axial slice through each case's largest tumour (red: its outline in the mask; lung window "
                      "for lung tumours)", fill="white")
    for row in range(cases):
        tumor = np.isin(labels[row], TUMOR_IDS)
        z = int(np.argmax(tumor.sum(axis=(0, 1)))) if tumor.any() else labels.shape[3] // 2
        outline = tumor[:, :, z] & ~ndimage.binary_erosion(tumor[:, :, z])
        components, count = ndimage.label(tumor)
        largest = np.argmax(np.bincount(components.ravel())[1:]) + 1 if count else 0
        low, high = (-1000, 200) if count and (labels[row][components == largest] == LUNG_TUMOR).any() else (-200, 300)
        for col, volume in enumerate([real_ct[row], *(g[row] for g in generated.values())]):
            grey = np.clip((volume[:, :, z].astype(np.float32) - low) / (high - low), 0, 1) * 255
            rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.uint8)
            rgb[outline] = (255, 60, 60)
            img = Image.fromarray(rgb[::-1, ::-1].transpose(1, 0, 2).copy()).resize((size, size), Image.NEAREST)
            x, y = col * (size + 4), 14 + row * (size + 16)
            canvas.paste(img, (x, y + 14))
            draw.text((x + 2, y + 1), first_titles[row] if col == 0 else columns[col].split(":")[0], fill="white")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def real_mask_case(real_scan, controlnets, unet, cfg, scale, vae, segmenter, work: Path, args) -> dict:
    """Each ControlNet on the real scan's label map with hepatic tumours implanted (same noise seed)."""
    labels = edit_mask(real_scan[1], np.random.default_rng(args.seed))
    rows, generated = [], {}
    for name, path in controlnets.items():
        gen = cached_volumes(work / f"real_mask_{slug(name)}.npz",
                             lambda: generate_ct(unet, load_controlnet(path), cfg, scale, vae, labels, seed=300)[None],
                             f"the real scan's mask with '{name}'")[0]
        result = fidelity(gen, labels, GRID_SPACING, segmenter=segmenter)
        generated[name] = gen
        rows.append({"variant": name, "dice": result.dice, "tumors": [t.to_dict() for t in result.tumors]})
    return {"labels": labels, "rows": rows, "generated": generated}


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


def _median_abs(values) -> float | None:
    values = [abs(v) for v in values if v is not None]
    return float(np.median(values)) if values else None


def table(results: dict) -> str:
    lines = ["| ControlNet | tumours | median abs. contrast error (HU) | tumour voxels found by the segmenter | "
             "segmenter Dice per case | 2.5D FID (offline) |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
    for r in results["rows"]:
        lines.append(f"| {r['variant']} | {r['tumors']} | {fmt(r['median_abs_contrast_error_hu'], '.0f')} | "
                     f"{fmt(r['mean_detected_fraction'], '.2f')} | {r['mean_case_dice']:.3f} | {fmt(r['fid'], '.1f')} |")
    real = results["segmenter_on_real_phantoms"]
    lines.append(f"| (the phantoms themselves) | | 0 | {real['mean_detected_fraction']:.2f} | {real['mean_case_dice']:.3f} | |")
    if results.get("lung_implants"):
        # the tumour count and each tumour's contrast stay in results.json (lung_implants: tumors, per_tumor)
        cases = len(results["lung_implants"][0]["paired_change_inside_hu"])
        lines += ["", f"Held-out masks edited to hold 1-2 lung tumours (radius {LUNG_IMPLANT_RADIUS_MM[0]:g}-{LUNG_IMPLANT_RADIUS_MM[1]:g} mm) instead of their own:", "",
                  "| volumes | tumour - lung contrast, median (HU) | HU change inside the tumours, with minus without "
                  f"them (mean over {cases} cases; range) | the same, 2-voxel ring around them | tumour voxels found | "
                  "segmenter Dice per case |",
                  "| --- | ---: | --- | --- | ---: | ---: |"]
        for r in results["lung_implants"]:
            change = lambda v: f"{np.mean(v):+.0f} ({min(v):+.0f} to {max(v):+.0f})"  # noqa: E731
            lines.append(f"| {r['variant']} | {fmt(r['median_contrast_hu'], '.0f')} | "
                         f"{change(r['paired_change_inside_hu'])} | {change(r['paired_change_ring_hu'])} | "
                         f"{r['mean_detected_fraction']:.2f} | {r['mean_case_dice']:.3f} |")
    if results.get("real_scan_mask"):
        lines += ["", "Real scan's label map with implanted hepatic tumours:", "",
                  "| ControlNet | tumour - liver contrast per tumour (HU) | tumour voxels found | segmenter Dice |",
                  "| --- | --- | --- | ---: |"]
        for r in results["real_scan_mask"]:
            contrasts = ", ".join("n/a" if t["contrast_hu"] is None else f"{t['contrast_hu']:.0f}" for t in r["tumors"])
            found = ", ".join("n/a" if t["detected_fraction"] is None else f"{t['detected_fraction']:.2f}"
                              for t in r["tumors"])
            dice = "n/a" if r["dice"] is None else f"{r['dice']:.3f}"
            lines.append(f"| {r['variant']} | {contrasts} | {found} | {dice} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
