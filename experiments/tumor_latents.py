"""Where does a tumour get lost: in the ControlNet or in the VAE? Compared in latent space.

    python experiments/tumor_latents.py --model src/maisi2/resources/models/default --model work/model_gpu
    python experiments/tumor_latents.py --model work/model_cn_fast --tumor lung --radius 10 14

For the phantom mask of experiments/previews.py (128 x 128 x 96 at 3 mm, anatomy seed 7) with one
tumour (default: hepatic, radius 15-20 mm): (1) the encoder's answer: the posterior mean of the
phantom's own CT minus that of the same CT with the tumour filled with its parent organ (the
organ's median HU); (2) each model's answer: the latent sampled (30 steps, seed 0) from the mask
minus the one sampled from the same noise with the tumour removed from the mask, unscaled like
(1). Both: max over channels of |difference|, mean and max over the latent voxels under the
tumour, and the max elsewhere; then the tumour-to-organ contrast (HU) of the VAE's own
reconstruction (the most a generator can show through this VAE) and of each model's decoded
sample, and the paired change: mean HU inside the tumour of the sample with the tumour in the
mask minus that of the sample from the same noise without it (the phantom's own: its
contrast).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from maisi2 import nets
from maisi2.data import hu_to_unit, unit_to_hu
from maisi2.evaluate.fidelity import tumor_contrasts
from maisi2.labels import remove_tumors
from maisi2.losses import pool_any
from maisi2.models import load_model
from maisi2.phantom import TumorSpec, make_phantom
from maisi2.sampling import sample_latent
from maisi2.autoencoder import decode, encode_mean

SHAPE, SPACING = (128, 128, 96), (3.0, 3.0, 3.0)


def summary(diff: torch.Tensor, roi: torch.Tensor) -> str:
    d = diff.abs().amax(1)[0]
    return f"tumour mean {float(d[roi].mean()):.3f}, max {float(d[roi].max()):.3f}; elsewhere max {float(d[~roi].max()):.3f}"


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, help="model folder (repeat to compare)")
    parser.add_argument("--tumor", default="hepatic", help="tumour kind (maisi2.phantom.TUMOR_KINDS)")
    parser.add_argument("--seeds", type=int, default=1, help="noise seeds 0..N-1 per model")
    parser.add_argument("--radius", nargs=2, type=float, default=(15.0, 20.0), metavar=("MIN", "MAX"), help="mm")
    args = parser.parse_args()
    ct, labels, _ = make_phantom(SHAPE, SPACING, [TumorSpec(args.tumor, 1, tuple(args.radius))], 7)
    parents = remove_tumors(labels)
    tumor = parents != labels
    filled = ct.copy()
    filled[tumor] = np.median(ct[parents == parents[tumor][0]])
    phantom_paired = float(ct[tumor].mean() - filled[tumor].mean())
    latent_shape = (4, *(n // 4 for n in SHAPE))
    roi = pool_any(torch.from_numpy(tumor)[None, None], latent_shape[1:])[0, 0].bool()
    print(f"tumour: {int(tumor.sum())} voxels, {int(roi.sum())} latent voxels; phantom contrast "
          f"{tumor_contrasts(ct, labels, SPACING)[0].contrast_hu:.0f} HU (tumour minus the organ's median {phantom_paired:+.0f} HU)")
    for folder in args.model:
        models = load_model(folder, device="cpu")
        encoded = [encode_mean(models.vae, hu_to_unit(torch.from_numpy(v.astype(np.float32)))[None, None])
                   for v in (ct, filled)]
        print(f"\n{folder}\n  encoder, phantom CT with vs without the tumour: {summary(encoded[0] - encoded[1], roi)}")
        recon = unit_to_hu(decode(models.vae, encoded[0])[0, 0]).numpy()
        print(f"  the VAE's reconstruction of the phantom: tumour - organ {tumor_contrasts(recon, labels, SPACING)[0].contrast_hu:.0f} HU")
        for seed in range(args.seeds):
            sampled = []
            for lab in (labels, parents):
                cond = nets.condition_on(lab, SPACING)
                z = sample_latent(models.unet, cond, latent_shape, models.cfg.flow, controlnet=models.controlnet,
                                  seed=seed)
                sampled.append(z / models.scale_factor)
            hu = [unit_to_hu(decode(models.vae, z)[0, 0]).numpy() for z in sampled]
            paired = float(hu[0][tumor].mean() - hu[1][tumor].mean())
            print(f"  seed {seed}: generated, mask with vs without the tumour: {summary(sampled[0] - sampled[1], roi)}\n"
                  f"          decoded: tumour - organ {tumor_contrasts(hu[0], labels, SPACING)[0].contrast_hu:.0f} HU; "
                  f"mean HU inside the tumour, with minus without it in the mask: {paired:+.0f} HU")


if __name__ == "__main__":
    main()
