"""Does a model follow a real TotalSegmentator mask it was not trained on? (issue 19, item 2)

For each model, on one real label map at the map's own spacing, with sampling seeds 0..N-1 and no
quality-check retries (the first sample is what is scored), through the same `generate` as the CLI:
the median HU of liver, spleen, pancreas, kidney, vertebrae and lung, the quality check, and three
yes/no criteria:

- lungs dark: lung median below -500 HU;
- organs in range: every organ group of the quality check that the mask holds passes it
  (`maisi2.quality`, the release's 6-sigma ranges of real organ medians);
- bone bright: the vertebrae median above every soft organ's median (liver, spleen, pancreas,
  kidney).

Two reference rows come first: the real CT itself, and its reconstruction by the first model's VAE
(encode to the posterior mean, decode): what any sample decoded by that VAE can at best look like.

    python experiments/real_masks.py --model shipped=src/maisi2/resources/models/default \\
        --model new=work/b2/model --work work/real_masks --seeds 3

The default map is ../shared/data/totalsegmentator/example_seg.nii.gz (abdomen with the lung
bases, 122 x 101 x 30 at 3 mm), imported with its CT (`maisi2 labels import-totalseg`). Prints a
Markdown table and writes real_masks.json into --work.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from maisi2 import volume_io
from maisi2.autoencoder import decode, encode_mean
from maisi2.data import hu_to_unit, unit_to_hu
from maisi2.errors import Maisi2Error
from maisi2.generate import GenerateOptions, generate
from maisi2.label_import import import_totalseg
from maisi2.labels import QC_ORGAN_GROUPS
from maisi2.models import load_model
from maisi2.quality import quality_check

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "totalsegmentator"
ORGANS = ("liver", "spleen", "pancreas", "kidney", "bone", "lung")
SOFT = ("liver", "spleen", "pancreas", "kidney")


def score(hu: np.ndarray, labels: np.ndarray) -> dict:
    """Organ medians, quality-check verdicts and the three criteria of one CT on its mask."""
    report = quality_check(hu, labels)
    checks = {c.organ: c for c in report.organs}
    medians = {organ: checks[organ].median_hu if organ in checks else None for organ in ORGANS}
    present = [c for c in report.organs if c.status != "not present"]
    soft = [medians[o] for o in SOFT if medians[o] is not None]
    return {
        **medians,
        "qc_failed": [c.organ for c in present if c.status == "fail"],
        "lungs_dark": None if medians["lung"] is None else bool(medians["lung"] < -500),
        "organs_in_range": all(c.status == "pass" for c in present),
        "bone_bright": None if medians["bone"] is None or not soft else bool(medians["bone"] > max(soft)),
    }


@torch.no_grad()
def vae_reconstruction(vae: torch.nn.Module, hu: np.ndarray) -> np.ndarray:
    """`vae` applied to a CT (padded with air to a multiple of 16 voxels, then cropped)."""
    pad = [(0, -n % 16) for n in hu.shape]
    padded = np.pad(hu, pad, constant_values=-1000.0)
    z = encode_mean(vae, hu_to_unit(torch.from_numpy(padded))[None, None].float())
    out = unit_to_hu(decode(vae, z))[0, 0].numpy()
    return out[tuple(slice(0, n) for n in hu.shape)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, metavar="NAME=DIR",
                    help="a model folder to score, with a name for the table (repeat)")
    ap.add_argument("--seg", type=Path, default=REAL / "example_seg.nii.gz", help="TotalSegmentator label map")
    ap.add_argument("--ct", type=Path, default=REAL / "example_ct_sm.nii.gz", help="its CT")
    ap.add_argument("--maisi-labels", action="store_true",
                    help="--seg already holds MAISI ids (e.g. a `maisi2 phantom` label map): no TotalSegmentator import")
    ap.add_argument("--work", type=Path, default=Path("work/real_masks"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--control-scale", type=float, default=1.0, help="generate's --control-scale")
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                    help="generate's --precision (auto: bf16 sampling where the CPU has bf16 hardware)")
    ap.add_argument("--relabel", action="append", default=[], metavar="FROM=TO",
                    help="generate from the mask with label FROM written as TO (MAISI ids; repeat); the scores "
                         "still read the original mask, e.g. 3=1 asks whether the spleen comes out as bright "
                         "when it is labelled liver (its code, not its shape or place)")
    args = ap.parse_args()
    relabel = [tuple(int(v) for v in spec.split("=", 1)) for spec in args.relabel]
    models = dict(spec.split("=", 1) for spec in args.model)
    args.work.mkdir(parents=True, exist_ok=True)
    mask_path = args.work / "real_mask.nii.gz"
    if args.maisi_labels:
        mask_path = args.seg
    else:
        import_totalseg(args.seg, mask_path, args.ct, overwrite=True)
    mask = volume_io.load_label_map(mask_path)
    labels = mask.array
    if relabel:  # the mask generated from; `labels` (what is scored) stays the original
        edited = labels.copy()
        for old, new in relabel:
            edited[labels == old] = new
        mask_path = volume_io.save_label_map(args.work / "real_mask_relabelled.nii.gz", mask.with_array(edited),
                                             overwrite=True)
    real_hu = volume_io.load_ct(args.ct).array
    loaded = {name: load_model(model_dir) for name, model_dir in models.items()}  # once for all seeds
    rows = [{"case": "real CT", **score(real_hu, labels)}]
    rows += [{"case": f"VAE reconstruction ({name})", **score(vae_reconstruction(networks.vae, real_hu), labels)}
             for name, networks in loaded.items()]
    for name, networks in loaded.items():
        for seed in range(args.seeds):
            started = time.perf_counter()
            try:
                result = generate(mask_path, args.work / f"{name}_seed{seed}.nii.gz", model=networks,
                                  options=GenerateOptions(seed=seed, overwrite=True, write_preview=False,
                                                          precision=args.precision, control_scale=args.control_scale))
            except Maisi2Error as refusal:
                rows.append({"case": f"{name}, seed {seed}", "refused": str(refusal)})
                continue
            hu = volume_io.load_ct(result.paths.ct).array
            rows.append({"case": f"{name}, seed {seed}", **score(hu, labels),
                         "out_of_domain": result.out_of_domain, "seconds": round(time.perf_counter() - started, 1),
                         "compute_plan": result.report.get("compute_plan")})
    (args.work / "real_masks.json").write_text(json.dumps({"models": models, "seg": str(args.seg), "precision": args.precision,
                                                           "relabel": args.relabel, "rows": rows},
                                                          indent=2))
    fmt = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
    yes = lambda v: "-" if v is None else ("yes" if v else "**no**")  # noqa: E731
    print("| case | " + " | ".join(ORGANS) + " | QC fails | lungs < -500 | organs in range | bone > soft |")
    print("| --- | " + " | ".join("---:" for _ in ORGANS) + " | --- | --- | --- | --- |")
    for r in rows:
        if "refused" in r:
            print(f"| {r['case']} | refused: {r['refused']} |")
            continue
        print(f"| {r['case']} | " + " | ".join(fmt(r[o]) for o in ORGANS)
              + f" | {', '.join(r['qc_failed']) or 'none'} | {yes(r['lungs_dark'])} | {yes(r['organs_in_range'])}"
              + f" | {yes(r['bone_bright'])} |")


if __name__ == "__main__":
    main()
