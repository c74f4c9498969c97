"""Does synthetic CT help a downstream tumour segmenter? (experiment 3 of issue #6; item 3 of #26)

The paper: a tumour segmentation network trained on real plus MAISI-v2 synthetic data (generated
from edited masks) beats one trained on the real data alone, and more so when the ControlNet was
trained with the region-specific contrastive loss.

Here, in miniature:
1. "real" data: a few labelled phantoms (ground truth known), deliberately scarce;
2. synthetic data: label maps of other phantoms, edited -- their own tumours removed (each
   replaced by its parent organ), then 1-2 tumours of one kind (`--implant`: lung, the default, or
   hepatic) implanted at random inside their organ -- and rendered by a ControlNet in 30 steps.
   Lung is the default because on this grid the bundled VAE gives back a lung tumour of 140+ voxels
   at 350-400 HU above the lung, but every hepatic tumour within 8 HU of the liver
   (`experiments/vae_ceiling.py`), so no generator can make a hepatic tumour that looks like one
   through it. Which ControlNet:
   * by default one, the "paper" ControlNet of experiment 2 (`--controlnets`), for every seed;
   * with `--arms-from` (issue #26, item 3), one synthetic arm per name in `--arms`, each seed s
     rendered by that arm's training seed s of experiments/contrastive_arms.py
     (`<arms-from>/<arm>_seed<s>/last.pt`): with the contrastive loss (``paper``) and without it
     (``none``); every arm renders the same edited masks from the same noise;
3. a tumour segmenter (`maisi2.evaluate.seg`, MONAI UNet) trained on real only, and on real + each
   synthetic set, same steps; seed s of every condition uses training seed s;
4. test cases: held-out phantoms, each with a tumour (`--test-lung-radius`: instead, each drawn with
   1-2 lung tumours of that radius, the kind and size the synthetic tumours add). Dice ("any
   tumour" vs rest) per case; per condition the mean over cases per seed; per tumour kind (lung,
   hepatic) the share of its voxels the segmenter finds;
5. paired comparisons (when there are several seeds and cases): for each pair of conditions, per
   case the Dice difference averaged over seeds; its mean with a 95 % bootstrap interval over cases
   (`maisi2.evaluate.fid.bootstrap_indices`), the two-sided Wilcoxon signed-rank p over cases, and
   the per-seed mean differences.

    python experiments/downstream.py            # after experiments/contrastive.py; ~15 min on 2 cores
    python experiments/downstream.py --arms-from work/exp_contrastive_arms --arms none paper --seeds 5 \\
        --test 30 --test-lung-radius 10 14 --radius 10 14 --unet work/exp_x0_training_2000/snapshots/rflow-02000.pt
    python experiments/downstream.py --real 2 --synthetic 2 --seeds 1 --seg-steps 10 --test 2   # smoke run

Rerunning continues: synthetic sets, test phantoms and segmenters are cached in `--work`.
"""

from __future__ import annotations

import argparse
import fcntl
import sys
import time
from pathlib import Path

import numpy as np

from common import (GRID_SHAPE, GRID_SPACING, IMPLANTS, LUNG_IMPLANT_RADIUS_MM, test_seeds,
                    train_seeds, bundled_vae, edit_mask, environment, phantom_arrays, say, write_json,
                    VARIANTS, generate_ct, load_controlnet, slug)

from maisi2.atomic import atomic_output
from maisi2.evaluate.fid import bootstrap_indices, percentile_interval
from maisi2.evaluate.seg import (SegmenterConfig, SegmenterTrainSettings, dice_score, labels_to_classes,
                                 load_segmenter, segment, train_segmenter)
from maisi2.train_controlnet import load_frozen_unet

# Tumour kinds whose voxels found by the segmenter are reported separately (mean over seeds).
FOUND_KINDS = {kind: IMPLANTS[kind][1] for kind in ("lung", "hepatic")}
REAL_ONLY = "real only"


class Renderer:
    """The frozen UNet and the VAE, loaded on first use (a rerun with every set cached loads nothing)."""

    def __init__(self, unet_path: Path):
        self.unet_path, self.parts, self.controlnet = unet_path, None, (None, None)

    def __call__(self, controlnet_path: Path, mask: np.ndarray, seed: int) -> np.ndarray:
        if self.parts is None:
            self.parts = (*load_frozen_unet(self.unet_path), bundled_vae()[0])
        if self.controlnet[0] != controlnet_path:  # a set's volumes share one ControlNet: load it once
            self.controlnet = (controlnet_path, load_controlnet(controlnet_path))
        unet, cfg, scale, vae = self.parts
        return generate_ct(unet, self.controlnet[1], cfg, scale, vae, mask, seed=seed)


def edited_masks(args) -> list[np.ndarray]:
    """Masks of training phantoms the real set does not use, tumours out and 1-2 implanted: the same
    masks for every arm and seed."""
    _, source_labels = phantom_arrays(args.data, train_seeds(args.real + args.synthetic))
    rng = np.random.default_rng(args.seed)
    return [edit_mask(lab, rng, radius_mm=tuple(args.radius), kind=args.implant) for lab in source_labels[args.real:]]


def synthetic_pairs(args, work: Path, controlnet: Path, tag: str, render: Renderer) -> list[tuple[np.ndarray, np.ndarray]]:
    low, high = args.radius
    path = work / f"synthetic_{args.implant}_{low:g}-{high:g}mm_{args.synthetic}{tag}.npz"
    if not path.is_file():
        # contrastive_arms.py marks a finished run with "done"; its last.pt exists from the first checkpoint on
        finished = controlnet.is_file() and (args.arms_from is None or (controlnet.parent / "done").is_file())
        if not finished:
            sys.exit(f"{controlnet} does not exist or is still training: train it first (experiments/contrastive_arms.py "
                     "--train-only, or experiments/contrastive.py), or pass --arms-from / --controlnets")
        masks = edited_masks(args)
        cts = []
        for i, mask in enumerate(masks):
            say(f"synthetic volume {i + 1}/{len(masks)}{tag.replace('_', ' ')}")
            cts.append(render(controlnet, mask, seed=500 + i))
        with atomic_output(path, overwrite=True) as tmp:
            np.savez(tmp, ct=np.round(np.stack(cts)).astype(np.int16), labels=np.stack(masks))
    data = np.load(path)  # what was stored, as a rerun reads it
    return list(zip(data["ct"].astype(np.float32), data["labels"]))


def conditions(args) -> list[tuple[str, object]]:
    """(name, seed -> ControlNet path or None for real only)."""
    if args.arms_from is None:
        paper = args.controlnets / slug(list(VARIANTS)[1]) / "last.pt"  # experiment 2's paper schedule
        return [(REAL_ONLY, None), ("real + synthetic", lambda s: paper)]
    return [(REAL_ONLY, None)] + [(f"real + synthetic ({arm})", lambda s, arm=arm: args.arms_from / f"{arm}_seed{s}" / "last.pt")
                                  for arm in args.arms]


def paired(rows: list[dict], resamples: int = 2000) -> list[dict]:
    """Every pair of conditions, paired by test case (Dice averaged over seeds) and by seed."""
    from scipy.stats import t as t_dist
    from scipy.stats import wilcoxon

    out = []
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            per_case = np.mean(np.asarray(b["dice_per_case"]) - np.asarray(a["dice_per_case"]), axis=0)
            per_seed = [float(x) for x in np.asarray(b["dice_per_seed"]) - np.asarray(a["dice_per_seed"])]
            row = {"pair": f"{b['condition']} minus {a['condition']}", "mean": float(per_case.mean()),
                   "per_seed": per_seed, "cases_better": int((per_case > 0).sum()),
                   "cases_worse": int((per_case < 0).sum()), "cases": len(per_case)}
            if len(per_case) >= 2:
                draws = bootstrap_indices(len(per_case), resamples)
                row["interval"] = percentile_interval(per_case[draws].mean(axis=1))
                row["wilcoxon_p"] = float(wilcoxon(per_case).pvalue) if np.any(per_case != 0) else 1.0
            if len(per_seed) >= 2:
                # The case-level figures hold these trained networks fixed; whether another training
                # run would show the same is the seeds' question: a t interval over the per-seed means.
                half = t_dist.ppf(0.975, len(per_seed) - 1) * np.std(per_seed, ddof=1) / np.sqrt(len(per_seed))
                row["seed_interval"] = (float(np.mean(per_seed) - half), float(np.mean(per_seed) + half))
            out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("work/exp_downstream"))
    ap.add_argument("--data", type=Path, default=Path("work/exp_data"))
    ap.add_argument("--unet", type=Path, default=Path("work/exp_steps/rflow/stage_1/last.pt"))
    ap.add_argument("--controlnets", type=Path, default=Path("work/exp_contrastive"),
                    help="experiment 2's folder (its 'paper' ControlNet renders the synthetic volumes)")
    ap.add_argument("--arms-from", type=Path, default=None,
                    help="experiments/contrastive_arms.py's folder: one synthetic condition per --arms, seed s "
                         "rendered by that arm's training seed s (instead of --controlnets)")
    ap.add_argument("--arms", nargs="+", default=["none", "paper"], help="arms of --arms-from to compare")
    ap.add_argument("--real", type=int, default=8, help="labelled phantoms in the real training set")
    ap.add_argument("--synthetic", type=int, default=16, help="synthetic volumes added to it")
    ap.add_argument("--test", type=int, default=12, help="held-out phantoms (each with a tumour)")
    ap.add_argument("--test-lung-radius", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                    help="test phantoms drawn with 1-2 lung tumours of this radius (mm) and no other lesion")
    ap.add_argument("--implant", choices=sorted(IMPLANTS), default="lung", help="tumour kind painted into the edited masks")
    ap.add_argument("--radius", type=float, nargs=2, default=LUNG_IMPLANT_RADIUS_MM, metavar=("MIN", "MAX"),
                    help="implanted tumour radius range, mm (default: common.LUNG_IMPLANT_RADIUS_MM)")
    ap.add_argument("--seg-steps", type=int, default=600)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--report", type=Path, default=Path("docs/img/exp_downstream.png"), help="where the plot goes")
    args = ap.parse_args()
    if min(args.real, args.synthetic, args.test, args.seg_steps, args.seeds) < 1:
        sys.exit("--real, --synthetic, --test, --seg-steps and --seeds must be >= 1")
    for name in ("radius", "test_lung_radius"):
        r = getattr(args, name)
        if r is not None and not 0 < r[0] <= r[1]:
            sys.exit(f"--{name.replace('_', '-')} MIN MAX needs 0 < MIN <= MAX")
    work, started = args.work, time.time()
    work.mkdir(parents=True, exist_ok=True)
    lock = open(work / ".lock", "w")  # noqa: SIM115 (held until the process ends)
    try:  # two runs on one folder would train the same checkpoints at once
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        say(f"another downstream.py run is using {work}; waiting for it to finish")
        fcntl.flock(lock, fcntl.LOCK_EX)

    real_ct, real_labels = phantom_arrays(args.data, train_seeds(args.real + args.synthetic))
    real = list(zip(real_ct[: args.real], real_labels[: args.real]))
    lung = None if args.test_lung_radius is None else tuple(args.test_lung_radius)
    test_ct, test_labels = phantom_arrays(args.data, test_seeds(args.test), at_least_one_tumor=lung is None,
                                          lung_radius_mm=lung)
    render, config, rows = Renderer(args.unet), SegmenterConfig(), []
    for condition, controlnet_of in conditions(args):
        dices, per_case, found, volumes = [], [], {kind: [] for kind in FOUND_KINDS}, 0
        for s in range(args.seeds):
            pairs = real
            if controlnet_of is not None:
                tag = "" if args.arms_from is None else f"_{condition.split('(')[-1].rstrip(')')}_seed{s}"
                pairs = real + synthetic_pairs(args, work, controlnet_of(s), tag, render)
            volumes = len(pairs)
            name = condition.replace(" ", "").replace("+", "_plus_").replace("(", "_").replace(")", "")
            path = work / f"seg_{name}_seed{s}.pt"
            say(f"segmenter '{condition}', seed {s}: {len(pairs)} volumes, {args.seg_steps} steps")
            train_segmenter(pairs, path, config, SegmenterTrainSettings(steps=args.seg_steps, seed=args.seed + s),
                            resume=True, progress=not args.no_progress)
            model, cfg = load_segmenter(path)
            predictions = [segment(model, ct, cfg) > 0 for ct in test_ct]
            case_dice = [dice_score(pred, labels_to_classes(lab, cfg.classes) > 0)
                         for pred, lab in zip(predictions, test_labels)]
            per_case.append(case_dice)
            dices.append(float(np.mean(case_dice)))
            for kind, tumor_id in FOUND_KINDS.items():  # pooled over the test cases
                hit = sum(int(pred[lab == tumor_id].sum()) for pred, lab in zip(predictions, test_labels))
                total = sum(int((lab == tumor_id).sum()) for lab in test_labels)
                found[kind].append(hit / total if total else float("nan"))
        rows.append({"condition": condition, "training_volumes": volumes, "dice_per_seed": dices,
                     "dice_per_case": per_case, "dice_mean": float(np.mean(dices)), "dice_std": float(np.std(dices)),
                     "found_per_seed": found, "found_mean": {k: float(np.mean(v)) for k, v in found.items()}})
        say(f"  {condition}: Dice {np.mean(dices):.3f} +- {np.std(dices):.3f}")
    results = {"command": " ".join(sys.argv), "args": {k: str(v) for k, v in vars(args).items()},
               "grid": {"shape": GRID_SHAPE, "spacing": GRID_SPACING}, "rows": rows, "paired": paired(rows),
               "environment": environment(), "wall_seconds": time.time() - started}
    write_json(work / "results.json", results)
    plot(results, args.report)
    print(table(results))
    print()
    print(paired_table(results))


def plot(results: dict, path: Path) -> None:
    """Test Dice per condition: one dot per seed, a bar at the mean."""
    from PIL import Image, ImageDraw

    rows = results["rows"]
    size = (max(420, 60 + 190 * len(rows)), 260)
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
    kinds = [k for k in results["rows"][0].get("found_mean", {})  # kinds absent from the test set: no column
             if not all(np.isnan(r["found_mean"][k]) for r in results["rows"])]
    lines = ["| training data | volumes | test Dice, mean +- population SD (numpy std, ddof 0) over seeds | per seed |"
             + "".join(f" {k} tumour voxels found (per seed) |" for k in kinds),
             "| --- | ---: | ---: | --- |" + " ---: |" * len(kinds)]
    for r in results["rows"]:
        lines.append(f"| {r['condition']} | {r['training_volumes']} | {r['dice_mean']:.3f} +- {r['dice_std']:.3f} | "
                     + ", ".join(f"{d:.3f}" for d in r["dice_per_seed"]) + " |"
                     + "".join(f" {r['found_mean'][k]:.2f} ("
                               + ", ".join(f"{f:.2f}" for f in r["found_per_seed"][k]) + ") |" for k in kinds))
    return "\n".join(lines)


def paired_table(results: dict) -> str:
    """The paired comparisons of `paired`: a line per pair of conditions."""
    lines = ["| comparison (test cases paired; Dice averaged over seeds per case) | mean Dice difference "
             "(95 % case bootstrap) | Wilcoxon signed-rank p (cases) | cases better / worse | per seed "
             "| 95 % t interval over seeds |",
             "| --- | --- | ---: | ---: | --- | --- |"]
    for r in results.get("paired", []):
        interval = f" ({r['interval'][0]:+.3f} to {r['interval'][1]:+.3f})" if "interval" in r else ""
        p = f"{r['wilcoxon_p']:.2g}" if "wilcoxon_p" in r else "-"
        seeds = f"{r['seed_interval'][0]:+.3f} to {r['seed_interval'][1]:+.3f}" if "seed_interval" in r else "-"
        lines.append(f"| {r['pair']} | {r['mean']:+.3f}{interval} | {p} | {r['cases_better']} / {r['cases_worse']} "
                     f"of {r['cases']} | " + ", ".join(f"{d:+.3f}" for d in r["per_seed"]) + f" | {seeds} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
