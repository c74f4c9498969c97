"""Issue #25: our rectified-flow mask generator, trained and measured on held-out masks.

1. data: random-lesion phantoms (`maisi2.phantom`) on a 64 x 64 x 48 grid of 6 mm (fold = index
   mod 5), plus TotalSegmentator's two example maps of ../shared/data imported to MAISI ids (when
   present): example_seg held out (fold 0), example_seg_dicom trained on (fold 1); fold 0 is held
   out (or ``--datalist`` names label maps of your own);
2. training: `maisi2.maskgen.train.train_mask_generator` (autoencoder, then the rectified-flow
   UNet, then the generator folder), resumable; then the autoencoder's hard Dice on the training
   and held-out masks (posterior mean, argmax: the ceiling of any sample);
3. samples: for every held-out mask, its own size vector (computed on the generator's grid with
   the generator's size scale; of several tumour kinds only the first is kept, as a request holds
   one) is requested ``--per-vector`` times (seeds 0, 1, ...), RF-30;
4. plausibility of the samples against the training masks: structure volumes (mean, sd, 5-95th
   percentiles, two-sample KS distance), connected components per structure, each generated
   tumour's ring inside its parent organ, body envelope closed; controllability: per slot, Pearson
   r of requested vs obtained size and their mean |difference|;
5. time per mask (sampling only, then the whole mask) at RF-30 vs DDPM-1000 on the same network
   size (the DDPM UNet has the same config and random weights: the time does not depend on them);
6. a figure (volumes and mid-slices) and results.json.

    python experiments/mask_generator.py --work work/exp_maskgen             # the documented run
    python experiments/mask_generator.py --work W --preset tiny --count 6 --ae-steps 2 --unet-steps 2   # smoke

Rerunning continues: phantoms, checkpoints (the trainer resumes) and the export are reused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from maisi2 import volume_io
from maisi2.atomic import atomic_output
from maisi2.data import DataItem, read_datalist, write_datalist
from maisi2.maskgen import files, measure, networks, sampling
from maisi2.maskgen.config import get_mask_config
from maisi2.maskgen.sizes import SLOTS, TUMOR_SLOTS
from maisi2.maskgen.train import MaskRecipe, autoencoder_dice, load_library, train_mask_generator

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "totalsegmentator"
# (map, its CT, fold): the NIfTI example is held out, the DICOM one (upper abdomen) trained on.
REAL_MAPS = (("example_seg.nii.gz", "example_ct_sm.nii.gz", 0), ("example_seg_dicom.nii.gz", "example_ct_dicom", 1))


def say(message: str) -> None:
    print(f"[mask_generator] {message}", file=sys.stderr, flush=True)


def cpu_model() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or platform.machine()
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{fields.get('Model name', '?').strip()} ({', '.join(isa)})"


# -- 1. data ------------------------------------------------------------------------------------

def make_data(work: Path, count: int, seed: int) -> Path:
    """Phantoms + the real maps found (`REAL_MAPS`), as one datalist of label maps."""
    from maisi2.phantom import write_phantom_set

    datalist = work / "masks.jsonl"
    if datalist.is_file():
        return datalist
    phantoms = work / "phantoms" / "datalist.jsonl"
    if not phantoms.is_file():
        say(f"writing {count} phantoms (64 x 64 x 48 at 6 mm, random lesions)")
        write_phantom_set(work / "phantoms", count, [((64, 64, 48), (6.0, 6.0, 6.0))], seed=seed, overwrite=True)
    items = read_datalist(phantoms)
    for seg_name, ct_name, fold in REAL_MAPS:
        if not ((SHARED / seg_name).is_file() and (SHARED / ct_name).exists()):
            say(f"{SHARED / seg_name} or its CT not found: left out")
            continue
        from maisi2.label_import import convert_totalseg

        seg, ct = volume_io.load_label_map(SHARED / seg_name, check_ids=False), volume_io.load_ct(SHARED / ct_name)
        labels, _ = convert_totalseg(seg.array, ct.array, spacing=seg.spacing)
        path = work / f"real_{seg_name.split('.')[0]}.nii.gz"
        volume_io.save_label_map(path, seg.with_array(labels), overwrite=True)
        items.append(DataItem(image=path, label=path, spacing=seg.spacing, source="real", fold=fold))
    return write_datalist(datalist, items, overwrite=True)


# -- 3-4. samples and measures ------------------------------------------------------------------

def one_tumor(vector: np.ndarray) -> np.ndarray:
    """The vector with only its first present tumour slot kept (a request holds one tumour kind;
    a phantom may hold several)."""
    out = vector.copy()
    present = [SLOTS.index(s) for s in TUMOR_SLOTS if out[SLOTS.index(s)] >= 0]
    out[present[1:]] = -1.0
    return out


def sample_heldout(generator, heldout, per_vector: int, steps: int) -> tuple[list, np.ndarray, np.ndarray, list]:
    """RF samples for each held-out mask's own size vector (one tumour kind kept), `per_vector`
    seeds each; returns (masks, requested vectors, obtained vectors, seconds)."""
    scale = generator.size_scale
    requested = [one_tumor(v) for v in scale.sizes(heldout.volumes_ml)]
    masks, asked, got, seconds = [], [], [], []
    for vector in requested:
        for seed in range(per_vector):
            sample = sampling.generate_mask(generator, vector, seed=seed, steps=steps)
            masks.append(sample.native.array)
            asked.append(vector)
            got.append(scale.sizes(measure_slot_volumes(sample.native.array, generator.cfg.spacing_mm)))
            seconds.append(sample.seconds)
    return masks, np.array(asked), np.array(got), seconds


def measure_slot_volumes(mask: np.ndarray, spacing_mm: float) -> np.ndarray:
    from maisi2.maskgen.sizes import slot_volumes_ml

    return slot_volumes_ml(mask, [spacing_mm] * 3)


def plausibility(generated: list[np.ndarray], training: list[np.ndarray], spacing_mm: float) -> dict:
    spacing = [spacing_mm] * 3
    gen_vol = [measure.organ_volumes_ml(m, spacing) for m in generated]
    ref_vol = [measure.organ_volumes_ml(m, spacing) for m in training]
    volumes = {name: measure.volume_distribution([v[name] for v in gen_vol], [v[name] for v in ref_vol])
               for name in measure.MEASURED}
    comps = {}
    for tag, masks in (("generated", generated), ("training", training)):
        counts = [measure.components(m) for m in masks]
        comps[tag] = {name: {"mean": float(np.mean([c[name] for c in counts])),
                             "share_one": float(np.mean([c[name] == 1 for c in counts]))}
                      for name in measure.MEASURED}
    tumors = {}
    for slot in TUMOR_SLOTS:
        shares = [s for m in generated for s in measure.tumor_inside_parent(m, slot)]
        tumors[slot] = {"components": len(shares),
                         "share_inside": float(np.mean([s >= 0.5 for s in shares])) if shares else float("nan")}
    return {"volumes_ml": volumes, "components": comps, "tumors_inside_parent": tumors,
            "body_closed": {"generated": float(np.mean([measure.body_closed(m) for m in generated])),
                            "training": float(np.mean([measure.body_closed(m) for m in training]))}}


# -- 5. timing -----------------------------------------------------------------------------------

def time_samplers(generator, rf_steps: int) -> dict:
    """Seconds for one latent (and one whole mask) at RF-`rf_steps` (the trained UNet) and at
    DDPM-1000 (an untrained UNet of the same config), measured one after the other."""
    rf = sampling.generate_mask(generator, generator.size_table.vectors[0], seed=100, steps=rf_steps)
    ddpm_cfg = dataclasses.replace(generator.cfg, objective="ddpm")
    twin = files.MaskGenerator(ddpm_cfg, generator.autoencoder, networks.build_mask_unet(ddpm_cfg).eval(),
                               generator.scale_factor, "ours", generator.model_dir, generator.size_scale,
                               generator.size_table)
    dd = sampling.generate_mask(twin, generator.size_table.vectors[0], seed=100)
    return {"rf_steps": rf_steps, "rf_seconds": rf.seconds, "ddpm_steps": 1000, "ddpm_seconds": dd.seconds,
            "sampling_ratio": dd.seconds["sample"] / rf.seconds["sample"]}


# -- 6. figure ------------------------------------------------------------------------------------

def figure(path: Path, generated, training, results: dict, count: int = 4, size: int = 128) -> None:
    """Top: per structure, the training (grey, upper row) and generated (white, lower row) volumes
    as dots on one mL axis. Bottom: mid-axial slices of training and generated masks, colours by id."""
    from PIL import Image, ImageDraw

    names = list(measure.MEASURED)
    spacing = [results["config"]["spacing_mm"]] * 3
    width, row_h = 190 + count * 2 * (size + 4), 34
    canvas = Image.new("RGB", (width, len(names) * row_h + size + 30))
    draw = ImageDraw.Draw(canvas)
    x0, x1 = 190, width - 10
    for r, name in enumerate(names):
        ref = [measure.organ_volumes_ml(m, spacing)[name] for m in training]
        gen = [measure.organ_volumes_ml(m, spacing)[name] for m in generated]
        top = max(ref + gen + [1e-9])
        ks = results["plausibility"]["volumes_ml"][name]["ks_distance"]
        draw.text((4, r * row_h + 8), f"{name} 0-{top:.0f} mL KS {ks:.2f}", fill=(255, 255, 255))
        for k, (values, colour) in enumerate(((ref, (140, 140, 140)), (gen, (255, 255, 255)))):
            y = r * row_h + 8 + 12 * k
            draw.line((x0, y + 3, x1, y + 3), fill=(60, 60, 60))
            for v in values:
                x = x0 + (x1 - x0) * v / top
                draw.ellipse((x - 2, y + 1, x + 2, y + 5), fill=colour)
    palette = np.random.default_rng(0).integers(60, 256, (256, 3)).astype(np.uint8)
    palette[0] = 0
    y = len(names) * row_h + 20
    draw.text((4, y + size // 2 - 6), "training | generated", fill=(255, 255, 255))
    for c in range(count):
        for k, source in enumerate((training, generated)):
            if c < len(source):
                m = source[c]
                rgb = palette[m[::-1, ::-1, m.shape[2] // 2].T.astype(np.int64) % 256]
                canvas.paste(Image.fromarray(rgb).resize((size, size), Image.NEAREST),
                             (190 + (2 * c + k) * (size + 4), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, overwrite=True) as tmp:
        canvas.save(tmp, format="PNG")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, type=Path)
    p.add_argument("--datalist", default=None, help="label maps to use instead of the phantoms (fold 0 held out)")
    p.add_argument("--preset", default="small")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--count", type=int, default=40, help="phantoms to write (default 40; fold = index mod 5)")
    p.add_argument("--ae-steps", type=int, default=600)
    p.add_argument("--ae-crop", type=int, default=None,
                   help="autoencoder training cubes (voxels a side; default 0 = whole masks up to 32^3, else 32)")
    p.add_argument("--unet-steps", type=int, default=1500)
    p.add_argument("--per-vector", type=int, default=2, help="samples per held-out size vector")
    p.add_argument("--rf-steps", type=int, default=30)
    p.add_argument("--figure", type=Path, default=None, help="where to write the figure (default WORK/mask_generator.png)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recipe-set", dest="recipe_overrides", action="append", default=[],
                   help="MaskRecipe key=value (e.g. unet_lr=1e-3), after the options above")
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    args.work.mkdir(parents=True, exist_ok=True)
    cfg = get_mask_config(args.preset, args.overrides)
    datalist = Path(args.datalist) if args.datalist else make_data(args.work, args.count, args.seed)
    # Whole masks where they are small: a crop's group-norm statistics are not the whole mask's.
    crop = args.ae_crop if args.ae_crop is not None else (0 if max(cfg.mask_shape) <= 32 else 32)
    recipe = MaskRecipe.from_overrides([f"autoencoder_steps={args.ae_steps}", f"unet_steps={args.unet_steps}",
                                        f"autoencoder_crop={crop}", f"seed={args.seed}", *args.recipe_overrides])
    started, cpu_started = time.perf_counter(), time.process_time()
    if not files.is_our_mask_folder(args.work / "run" / "model"):
        train_mask_generator(datalist, args.work / "run", cfg, recipe, resume=True, device="cpu", progress=False)
    train_seconds, train_cpu = time.perf_counter() - started, time.process_time() - cpu_started
    generator = files.load_mask_generator(args.work / "run" / "model", device="cpu")
    heldout = load_library(datalist, cfg, "holdout", recipe.holdout_fold)
    training = load_library(datalist, cfg, "train", recipe.holdout_fold)
    say("autoencoder reconstruction (hard Dice)")
    ae_dice = {"training": autoencoder_dice(generator.autoencoder, training.masks),
               "heldout": autoencoder_dice(generator.autoencoder, heldout.masks)}
    say(f"sampling {len(heldout) * args.per_vector} masks for {len(heldout)} held-out size vectors (RF-{args.rf_steps})")
    generated, asked, got, seconds = sample_heldout(generator, heldout, args.per_vector, args.rf_steps)
    results = {
        "command": "python experiments/mask_generator.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "config": cfg.to_dict(), "recipe": json.loads(recipe.to_json()), "training_masks": len(training),
        "heldout_masks": len(heldout), "samples": len(generated), "rf_steps": args.rf_steps,
        "train_seconds_this_call": train_seconds, "train_cpu_seconds_this_call": train_cpu,
        "autoencoder_dice": ae_dice,
        "plausibility": plausibility(generated, training.masks, cfg.spacing_mm),
        "controllability": measure.size_correlation(asked, got),
        "timing": time_samplers(generator, args.rf_steps),
    }
    with atomic_output(args.work / "results.json", overwrite=True) as tmp:
        tmp.write_text(json.dumps(results, indent=2, default=str))
    figure(args.figure or args.work / "mask_generator.png", generated, training.masks, results)
    print_summary(results)
    return results


def print_summary(r: dict) -> None:
    print(f"CPU: {r['cpu']}, {r['threads']} threads; {r['training_masks']} training / {r['heldout_masks']} held-out "
          f"masks, {r['samples']} samples at RF-{r['rf_steps']}")
    for tag, d in r["autoencoder_dice"].items():
        print(f"autoencoder hard Dice, {tag} masks: mean {d['mean']:.3f}; "
              + ", ".join(f"{k} {v:.2f}" for k, v in d.items() if k != "mean"))
    print(f"{'structure':24s} {'train mean mL':>13s} {'gen mean mL':>12s} {'KS':>5s} {'comp. train':>11s} {'comp. gen':>9s}")
    for name, v in r["plausibility"]["volumes_ml"].items():
        c = r["plausibility"]["components"]
        print(f"{name:24s} {v['reference_mean']:13.1f} {v['generated_mean']:12.1f} {v['ks_distance']:5.2f} "
              f"{c['training'][name]['mean']:11.2f} {c['generated'][name]['mean']:9.2f}")
    for slot, t in r["plausibility"]["tumors_inside_parent"].items():
        if t["components"]:
            print(f"tumour {slot}: {t['components']} components, {t['share_inside']:.2f} inside their parent")
    print(f"body closed: generated {r['plausibility']['body_closed']['generated']:.2f}, "
          f"training {r['plausibility']['body_closed']['training']:.2f}")
    for slot in SLOTS:
        c = r["controllability"][slot]
        if c["n"]:
            print(f"size {slot}: n {c['n']}, r {c['pearson_r']:.2f}, mean |req - got| {c['mean_abs_diff']:.3f}, "
                  f"present in {c.get('present', float('nan')):.2f} of the samples")
    t = r["timing"]
    print(f"time per mask, sampling only: RF-{t['rf_steps']} {t['rf_seconds']['sample']:.1f} s, DDPM-1000 "
          f"{t['ddpm_seconds']['sample']:.1f} s ({t['sampling_ratio']:.1f}x); whole mask {t['rf_seconds']['total']:.1f} "
          f"vs {t['ddpm_seconds']['total']:.1f} s")


if __name__ == "__main__":
    main()
