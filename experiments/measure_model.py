"""Measure a model folder the way docs/model_card.md reports it.

    python experiments/measure_model.py --model src/maisi2/resources/models/default --work work/measure

1. The README command's mask (phantom 128 x 128 x 96 at 3 mm, anatomy seed 0, one hepatic tumour)
   with sampling seeds 0..N-1, through the same `generate` as the CLI: the organ-HU quality check,
   the median HU of liver, spleen, kidney, bone and lung next to the phantom's own CT on that
   mask, and the tumour-to-liver contrast next to the phantom's (`maisi2.evaluate.fidelity`).
2. The real label map of ../shared/data (TotalSegmentator's example_seg imported to MAISI ids,
   body envelope from its CT): the same medians, next to the real CT's.

Prints a Markdown table and writes measure.json into --work.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from maisi2 import volume_io
from maisi2.evaluate.fidelity import fidelity
from maisi2.generate import GenerateOptions, generate
from maisi2.labels import LUNG_IDS, label_id
from maisi2.phantom import make_phantom, parse_tumor_specs
from maisi2.quality import organ_median_hu
from maisi2.label_import import import_totalseg

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "totalsegmentator"
ORGANS = {
    "liver": [label_id("liver")],
    "spleen": [label_id("spleen")],
    "kidney": [label_id("left kidney"), label_id("right kidney")],
    "bone (T12-L3)": [label_id(f"vertebrae {v}") for v in ("T12", "L1", "L2", "L3")],
    "lung": list(LUNG_IDS),
}


def medians(hu: np.ndarray, labels: np.ndarray) -> dict[str, float | None]:
    return {organ: organ_median_hu(hu, labels, ids)[0] for organ, ids in ORGANS.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="src/maisi2/resources/models/default")
    ap.add_argument("--work", type=Path, default=Path("work/measure"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--name", default="generated", help="what the generated rows are called in the table")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    rows = []

    # 1. The README command's mask.
    tumors = parse_tumor_specs(["hepatic:1"], None)
    true_ct, labels, affine = make_phantom((128, 128, 96), (3.0, 3.0, 3.0), tumors, 0)
    mask = volume_io.Volume(labels.astype(np.int16), affine)
    truth = fidelity(true_ct, labels, mask.spacing).tumors[0].generated.contrast_hu
    rows.append({"case": "phantom (the README mask's own CT)", "qc": None, **medians(true_ct, labels),
                 "tumor_contrast_hu": truth})
    for seed in range(args.seeds):
        started = time.perf_counter()
        result = generate(mask, args.work / f"phantom_seed{seed}.nii.gz", model=args.model,
                          options=GenerateOptions(seed=seed, overwrite=True))
        hu = volume_io.load_ct(result.paths.ct).array
        contrast = fidelity(hu, labels, mask.spacing).tumors[0].generated.contrast_hu
        rows.append({"case": f"{args.name}, seed {seed}", "qc": result.report["quality"]["passed"],
                     "failed_organs": result.report["quality"]["failed"],
                     **medians(hu, labels), "tumor_contrast_hu": contrast,
                     "seconds": round(time.perf_counter() - started, 1)})

    # 2. The real label map.
    if (REAL / "example_seg.nii.gz").is_file():
        real_mask = args.work / "real_mask.nii.gz"
        import_totalseg(REAL / "example_seg.nii.gz", real_mask, REAL / "example_ct_sm.nii.gz", overwrite=True)
        real_labels = volume_io.load_label_map(real_mask).array
        real_hu = volume_io.load_ct(REAL / "example_ct_sm.nii.gz").array
        rows.append({"case": "real scan (its own CT)", "qc": None, **medians(real_hu, real_labels)})
        result = generate(real_mask, args.work / "real_seed0.nii.gz", model=args.model,
                          options=GenerateOptions(seed=0, overwrite=True))
        hu = volume_io.load_ct(result.paths.ct).array
        rows.append({"case": f"{args.name} on the real mask, seed 0", "qc": result.report["quality"]["passed"],
                     "failed_organs": result.report["quality"]["failed"],
                     **medians(hu, real_labels)})

    (args.work / "measure.json").write_text(json.dumps({"model": args.model, "rows": rows}, indent=2))
    fmt = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
    print("| case | QC | " + " | ".join(ORGANS) + " | tumour - liver (HU) |")
    print("| --- | --- | " + " | ".join("---:" for _ in ORGANS) + " | ---: |")
    for r in rows:
        qc = "-" if r["qc"] is None else ("pass" if r["qc"] else "fail: " + ", ".join(r["failed_organs"]))
        print(f"| {r['case']} | {qc} | " + " | ".join(fmt(r[o]) for o in ORGANS) + f" | {fmt(r.get('tumor_contrast_hu'))} |")


if __name__ == "__main__":
    main()
