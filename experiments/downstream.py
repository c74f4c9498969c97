"""Experiment 3 of issue #6: does synthetic CT help a downstream tumour segmenter?

The paper: a tumour segmentation network trained on real plus MAISI-v2 synthetic data (generated
from edited masks) beats one trained on the real data alone.

Here, in miniature:
1. "real" data: a few labelled phantoms (ground truth known), deliberately scarce;
2. synthetic data: label maps of other phantoms, edited -- their own tumours removed (each
   replaced by its parent organ), then 1-2 tumours of one kind (`--implant`: lung, the default, or
   hepatic) implanted at random inside their organ -- and rendered by the ControlNet of
   experiment 2 (the paper's schedule) in 30 steps. Lung is the default because on this grid the
   bundled VAE gives back a lung tumour of 140+ voxels at 350-400 HU above the lung, but every
   hepatic tumour within 8 HU of the liver (`experiments/vae_ceiling.py`), so no generator can
   make a hepatic tumour that looks like one through it;
3. a tumour segmenter (`maisi2.evaluate.seg`, MONAI UNet) trained on real only, and on real +
   synthetic, same steps, several seeds each;
4. Dice ("any tumour" vs rest) on held-out phantoms; mean and spread over the seeds; and per
   tumour kind (lung, hepatic), the share of its voxels the segmenter finds.

    python experiments/downstream.py            # after experiments/contrastive.py; ~15 min on 2 cores
    python experiments/downstream.py --real 2 --synthetic 2 --seeds 1 --seg-steps 10 --test 2   # smoke run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from common import (GRID_SHAPE, GRID_SPACING, IMPLANTS, LUNG_IMPLANT_RADIUS_MM, test_seeds,
                    train_seeds, bundled_vae, edit_mask, environment, phantom_arrays, say, write_json,
                    VARIANTS, generate_ct, load_controlnet, slug)

from maisi2.evaluate.seg import (SegmenterConfig, SegmenterTrainSettings, dice_score, labels_to_classes,
                                 load_segmenter, segment, train_segmenter)
from maisi2.atomic import atomic_output
from maisi2.train_controlnet import load_frozen_unet

# Tumour kinds whose voxels found by the segmenter are reported separately (mean over seeds).
FOUND_KINDS = {kind: IMPLANTS[kind][1] for kind in ("lung", "hepatic")}


def synthetic_pairs(args, work: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    low, high = args.radius
    path = work / f"synthetic_{args.implant}_{low:g}-{high:g}mm_{args.synthetic}.npz"
    if path.is_file():
        data = np.load(path)
        return list(zip(data["ct"].astype(np.float32), data["labels"]))
    # Masks from training phantoms the real set does not use, edited.
    _, source_labels = phantom_arrays(args.data, train_seeds(args.real + args.synthetic))
    rng = np.random.default_rng(args.seed)
    masks = [edit_mask(lab, rng, radius_mm=tuple(args.radius), kind=args.implant) for lab in source_labels[args.real:]]
    unet, cfg, scale = load_frozen_unet(args.unet)
    name = list(VARIANTS)[1]  # the paper's schedule
    controlnet = load_controlnet(args.controlnets / slug(name) / "last.pt")
    vae, _ = bundled_vae()
    cts = []
    for i, mask in enumerate(masks):
        say(f"synthetic volume {i + 1}/{len(masks)}")
        cts.append(generate_ct(unet, controlnet, cfg, scale, vae, mask, seed=500 + i))
    with atomic_output(path, overwrite=True) as tmp:
        np.savez(tmp, ct=np.round(np.stack(cts)).astype(np.int16), labels=np.stack(masks))
    return synthetic_pairs(args, work)  # what was stored, as a rerun reads it


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("work/exp_downstream"))
    ap.add_argument("--data", type=Path, default=Path("work/exp_data"))
    ap.add_argument("--unet", type=Path, default=Path("work/exp_steps/rflow/stage_1/last.pt"))
    ap.add_argument("--controlnets", type=Path, default=Path("work/exp_contrastive"),
                    help="experiment 2's folder (its 'paper' ControlNet renders the synthetic volumes)")
    ap.add_argument("--real", type=int, default=8, help="labelled phantoms in the real training set")
    ap.add_argument("--synthetic", type=int, default=16, help="synthetic volumes added to it")
    ap.add_argument("--test", type=int, default=12, help="held-out phantoms (each with a tumour)")
    ap.add_argument("--implant", choices=sorted(IMPLANTS), default="lung", help="tumour kind painted into the edited masks")
    ap.add_argument("--radius", type=float, nargs=2, default=LUNG_IMPLANT_RADIUS_MM, metavar=("MIN", "MAX"),
                    help="implanted tumour radius range, mm (default: common.LUNG_IMPLANT_RADIUS_MM)")
    ap.add_argument("--seg-steps", type=int, default=600)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--report", type=Path, default=Path("docs/img/exp_downstream.png"), help="where the plot goes")
    args = ap.parse_args()
    work, started = args.work, time.time()
    work.mkdir(parents=True, exist_ok=True)

    real_ct, real_labels = phantom_arrays(args.data, train_seeds(args.real + args.synthetic))
    real = list(zip(real_ct[: args.real], real_labels[: args.real]))
    test_ct, test_labels = phantom_arrays(args.data, test_seeds(args.test), at_least_one_tumor=True)
    synthetic = synthetic_pairs(args, work)
    config = SegmenterConfig()
    rows = []
    for condition, pairs in (("real only", real), ("real + synthetic", real + synthetic)):
        dices, found = [], {kind: [] for kind in FOUND_KINDS}
        for s in range(args.seeds):
            path = work / f"seg_{condition.replace(' ', '').replace('+', '_plus_')}_seed{s}.pt"
            say(f"segmenter '{condition}', seed {s}: {len(pairs)} volumes, {args.seg_steps} steps")
            train_segmenter(pairs, path, config, SegmenterTrainSettings(steps=args.seg_steps, seed=args.seed + s),
                            resume=True, progress=not args.no_progress)
            model, cfg = load_segmenter(path)
            predictions = [segment(model, ct, cfg) > 0 for ct in test_ct]
            dices.append(float(np.mean([dice_score(pred, labels_to_classes(lab, cfg.classes) > 0)
                                        for pred, lab in zip(predictions, test_labels)])))
            for kind, tumor_id in FOUND_KINDS.items():  # pooled over the test cases
                hit = sum(int(pred[lab == tumor_id].sum()) for pred, lab in zip(predictions, test_labels))
                total = sum(int((lab == tumor_id).sum()) for lab in test_labels)
                found[kind].append(hit / total if total else float("nan"))
        rows.append({"condition": condition, "training_volumes": len(pairs), "dice_per_seed": dices,
                     "dice_mean": float(np.mean(dices)), "dice_std": float(np.std(dices)),
                     "found_per_seed": found, "found_mean": {k: float(np.mean(v)) for k, v in found.items()}})
        say(f"  {condition}: Dice {np.mean(dices):.3f} +- {np.std(dices):.3f}")
    results = {"command": " ".join(sys.argv), "args": {k: str(v) for k, v in vars(args).items()},
               "grid": {"shape": GRID_SHAPE, "spacing": GRID_SPACING}, "rows": rows, "environment": environment(),
               "wall_seconds": time.time() - started}
    write_json(work / "results.json", results)
    plot(results, args.report)
    print(table(results))


def plot(results: dict, path: Path, size=(420, 260)) -> None:
    """Test Dice per condition: one dot per seed, a bar at the mean."""
    from PIL import Image, ImageDraw

    rows = results["rows"]
    hi = max(max(r["dice_per_seed"]) for r in rows) * 1.15 or 1.0
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = 45, 25, size[0] - 10, size[1] - 30
    draw.rectangle([left, top, right, bottom], outline="black")
    y_of = lambda v: bottom - v / hi * (bottom - top)  # noqa: E731
    slot = (right - left) / len(rows)
    for k, r in enumerate(rows):
        x0, x1 = left + slot * (k + 0.25), left + slot * (k + 0.75)
        draw.rectangle([x0, y_of(r["dice_mean"]), x1, bottom], fill=(170, 190, 230), outline="navy")
        for j, d in enumerate(r["dice_per_seed"]):
            x = x0 + (x1 - x0) * (j + 1) / (len(r["dice_per_seed"]) + 1)
            draw.ellipse([x - 3, y_of(d) - 3, x + 3, y_of(d) + 3], fill="black")
        draw.text((x0, bottom + 5), f"{r['condition']} ({r['training_volumes']})", fill="black")
        draw.text((x0, y_of(r["dice_mean"]) - 13), f"{r['dice_mean']:.3f}", fill="navy")
    draw.text((left, 5), "held-out tumour Dice: bar = mean, dots = seeds", fill="black")
    draw.text((2, top), f"{hi:.3g}", fill="black")
    draw.text((2, bottom - 10), "0", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def table(results: dict) -> str:
    kinds = list(results["rows"][0].get("found_mean", {}))
    lines = ["| training data | volumes | test Dice, mean +- population SD (numpy std, ddof 0) over seeds | per seed |"
             + "".join(f" {k} tumour voxels found (per seed) |" for k in kinds),
             "| --- | ---: | ---: | --- |" + " ---: |" * len(kinds)]
    for r in results["rows"]:
        lines.append(f"| {r['condition']} | {r['training_volumes']} | {r['dice_mean']:.3f} +- {r['dice_std']:.3f} | "
                     + ", ".join(f"{d:.3f}" for d in r["dice_per_seed"]) + " |"
                     + "".join(f" {r['found_mean'][k]:.2f} ("
                               + ", ".join(f"{f:.2f}" for f in r["found_per_seed"][k]) + ") |" for k in kinds))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
