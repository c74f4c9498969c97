"""What can a generated tumour show on the experiments' grid? The bundled VAE's ceiling.

Every generated volume of experiments 2 and 3 is decoded by the bundled VAE, so a tumour can look
no more like a tumour than the VAE's reconstruction of a real one. This encodes held-out phantoms
of the experiment grid (96 x 96 x 64 at 4 mm) to their posterior mean, decodes them, and lists for
every tumour its size and its contrast against the surrounding parent organ
(`maisi2.evaluate.fidelity.tumor_contrasts`) in the phantom and in the reconstruction.

    python experiments/vae_ceiling.py --data work/exp_data --cases 12     # ~1 min on 2 cores
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import GRID_SPACING, bundled_vae, phantom_arrays, reconstruct_hu, test_seeds

from maisi2.evaluate.fidelity import tumor_contrasts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("work/exp_data"))
    ap.add_argument("--cases", type=int, default=12, help="held-out phantoms (each with a tumour)")
    args = ap.parse_args()
    cts, labels = phantom_arrays(args.data, test_seeds(args.cases), at_least_one_tumor=True)
    vae, _ = bundled_vae()
    print("| case | tumour | voxels | phantom contrast (HU) | VAE reconstruction (HU) |\n| ---: | --- | ---: | ---: | ---: |")
    for case, (ct, lab) in enumerate(zip(cts, labels)):
        recon = reconstruct_hu(vae, ct[None])[0]
        for own, back in zip(tumor_contrasts(ct, lab, GRID_SPACING), tumor_contrasts(recon, lab, GRID_SPACING)):
            print(f"| {case} | {own.tumor_name} | {own.voxels} | {own.contrast_hu:.0f} | {back.contrast_hu:.0f} |", flush=True)


if __name__ == "__main__":
    main()
