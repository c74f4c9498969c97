"""Does a VAE keep tumours? Tumour-to-parent-organ contrast of scans against their reconstruction.

    python experiments/vae_tumors.py --datalist work/dec_ft/held_out.jsonl \
        --vae work/vae/vae.pt --vae work/vae_tumour/vae.pt

Each scan (with its label map) is encoded to the posterior mean (what the latent cache holds and
what generation produces), decoded, and every tumour's median HU minus its parent-organ shell's
(`maisi2.evaluate.fidelity.tumor_contrasts`) is compared with the scan's own. Tumours whose own
contrast is beyond +-300 HU (lung nodules against air) are listed but left out of the mean error.
Prints a Markdown table: one row per tumour, one column per VAE, then mean |error| and the
whole-volume L1 in HU.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from maisi2.data import CTDataset, read_datalist, unit_to_hu
from maisi2.evaluate.fidelity import tumor_contrasts
from maisi2.autoencoder import decode, encode_mean, load_vae


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datalist", required=True, help="scans with label maps")
    parser.add_argument("--vae", action="append", required=True, help="VAE checkpoint (repeat to compare)")
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    vaes = [load_vae(path).model.eval() for path in args.vae]
    data = CTDataset(read_datalist(args.datalist), divisor=4)
    rows, l1 = [], [[] for _ in vaes]
    for index in range(len(data)):
        item = data[index]
        image, labels = item["image"][None], item["label"][0].numpy()
        spacing = tuple(float(s) for s in item["spacing"])
        own = unit_to_hu(image[0, 0]).numpy()
        found = tumor_contrasts(own, labels, spacing)
        if not found:
            continue
        per_vae = []
        for k, vae in enumerate(vaes):
            with torch.no_grad():
                recon = decode(vae, encode_mean(vae, image))
            hu = unit_to_hu(recon[0, 0]).numpy()
            l1[k].append(float(np.abs(hu - own).mean()))
            per_vae.append(tumor_contrasts(hu, labels, spacing))
        for j, tumor in enumerate(found):
            rows.append({"scan": Path(str(data.items[index].image)).parent.name, "tumor": tumor.tumor_name,
                         "voxels": tumor.voxels, "own": tumor.contrast_hu,
                         "recon": [found_k[j].contrast_hu for found_k in per_vae]})
    names = [Path(p).parent.name + "/" + Path(p).name for p in args.vae]
    print("| scan | tumour | voxels | own contrast | " + " | ".join(names) + " |")
    print("| --- | --- | ---: | ---: |" + " ---: |" * len(names))
    for r in rows:
        cells = " | ".join("-" if c is None else f"{c:.0f}" for c in r["recon"])
        print(f"| {r['scan']} | {r['tumor']} | {r['voxels']} | {r['own']:.0f} | {cells} |")
    usable = [r for r in rows if r["own"] is not None and abs(r["own"]) <= 300 and None not in r["recon"]]
    errors = [float(np.mean([abs(r["recon"][k] - r["own"]) for r in usable])) for k in range(len(vaes))]
    print(f"| mean abs contrast error ({len(usable)} tumours with a contrast between -300 and +300 HU) | | | | "
          + " | ".join(f"{e:.1f}" for e in errors) + " |")
    print("| mean whole-volume L1 (HU) | | | | " + " | ".join(f"{np.mean(v):.1f}" for v in l1) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps({"vaes": args.vae, "rows": rows, "contrast_error": errors,
                                               "l1_hu": [float(np.mean(v)) for v in l1]}, indent=1))


if __name__ == "__main__":
    main()
