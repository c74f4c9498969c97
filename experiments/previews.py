"""Preview PNGs for docs/: what the trained small model produces.

Usage (after recipes/bundled_model.sh, whose phantoms it reads from --work):
    python experiments/previews.py --work work --model src/maisi2/resources/models/default --out docs/img

Writes
  flow_samples.png      30-step rectified-flow samples of the flow UNet alone (no mask), next to
                        real phantoms of the same grid, mid-slices; with --compare-model NAME=DIR a
                        third row holds that model's samples from the same noise
                        (flow_samples_compare.png)
  controlnet_tumor.png  a phantom mask with a liver tumour, the generated CT, and the CT generated
                        from the same noise with the tumour removed from the mask
                        (controlnet_pair.png: the slice through the tumour); --tumor KIND
                        --radius MIN MAX pick another lesion, --pair-only writes only
                        controlnet_pair_KIND.png
The training runs' loss curves (docs/img/loss_*.png) are drawn by experiments/loss_curves.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from maisi2 import nets
from maisi2.autoencoder import decode
from maisi2.data import unit_to_hu
from maisi2.generate import phantom_mask
from maisi2.labels import remove_tumors
from maisi2.models import load_model
from maisi2.preview import render_preview
from maisi2.sampling import sample_latent
from maisi2.volume_io import load_ct


def axial(hu: np.ndarray, size: int = 192, z: int | None = None, window: tuple[float, float] = (-200, 300),
          box: tuple[slice, slice] | None = None) -> Image.Image:
    """Axial slice `z` (default the middle one), radiological display, HU `window`; `box` zooms
    into (x, y) slices of the volume first."""
    sl = hu[:, :, hu.shape[2] // 2 if z is None else z]
    if box is not None:
        sl = sl[box]
    lo, hi = window
    img = np.clip((sl[::-1, ::-1].T - lo) / (hi - lo), 0, 1) * 255
    return Image.fromarray(img.astype(np.uint8)).resize((size, size), Image.NEAREST if box is not None else Image.BICUBIC)


def grid(images: list[Image.Image], cols: int, titles: list[str]) -> Image.Image:
    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    canvas = Image.new("L", (cols * (w + 4), rows * (h + 16)))
    draw = ImageDraw.Draw(canvas)
    for k, (img, title) in enumerate(zip(images, titles)):
        x, y = (k % cols) * (w + 4), (k // cols) * (h + 16)
        canvas.paste(img, (x, y + 14))
        draw.text((x + 2, y + 1), title, fill=255)
    return canvas


@torch.no_grad()
def flow_samples(models, shape, spacing, seeds):
    """Unconditional (no ControlNet) samples on one grid, decoded to HU."""
    cfg = models.cfg
    latent_shape = (cfg.vae.latent_channels, *(n // cfg.vae.downsample_factor for n in shape))
    cond = nets.condition_on(None, spacing)
    out = []
    for seed in seeds:
        z = sample_latent(models.unet, cond, latent_shape, cfg.flow, steps=30, seed=seed)
        out.append(unit_to_hu(decode(models.vae, z / models.scale_factor)[0, 0].numpy()))
    return out


def tumor_pair(model: str, kind: str, radius: tuple[float, float], out: Path, pair_name: str,
                overview_name: str | None) -> None:
    """CT generated from a phantom mask with one tumour of `kind`, and from the same noise with the
    tumour removed from the mask: the slice through the tumour side by side, and their difference."""
    from maisi2.generate import GenerateOptions, generate
    from maisi2.phantom import TumorSpec

    mask = phantom_mask((128, 128, 96), (3.0, 3.0, 3.0), [TumorSpec(kind, 1, radius)], seed=7)
    no_tumor = mask.with_array(remove_tumors(mask.array))
    tmp = out / "_tmp"
    for name, m in (("tumor", mask), ("no_tumor", no_tumor)):
        generate(m, tmp / f"{name}.nii.gz", model=model, options=GenerateOptions(seed=0, overwrite=True, progress=False))
    a, b = (load_ct(tmp / f"{n}.nii.gz").array for n in ("tumor", "no_tumor"))
    if overview_name:
        render_preview(a, mask.array, mask.spacing).save(out / overview_name)
    tumor = np.argwhere(mask.array != no_tumor.array)
    cx, cy, z = (int(v) for v in tumor.mean(0))  # the slice through the tumour, and a 48-voxel box around it
    corner = [max(0, min(c - 24, n - 48)) for c, n in zip((cx, cy), mask.array.shape[:2])]
    box = tuple(slice(c, c + 48) for c in corner)
    window = (-1000, 200) if kind == "lung" else (-200, 300)  # lung tumours: a lung window
    outline = np.where(mask.array != no_tumor.array, 1000.0, -1000.0)
    grid([axial(a, z=z, window=window), axial(b, z=z, window=window), axial(np.abs(a - b) - 200, z=z),
          axial(a, z=z, window=window, box=box), axial(b, z=z, window=window, box=box), axial(outline, z=z, box=box)], 3,
         [f"mask with {kind} tumour", "same noise, tumour removed", "|difference| (0-500 HU)",
          "zoom: with tumour", "zoom: without", "zoom: the tumour in the mask"]).save(out / pair_name)
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="work")
    ap.add_argument("--model", default="src/maisi2/resources/models/default")
    ap.add_argument("--out", default="docs/img")
    ap.add_argument("--compare-model", default=None, metavar="NAME=DIR",
                    help="also sample this model's flow UNet (same seeds) into flow_samples_compare.png")
    ap.add_argument("--flow-only", action="store_true", help="only the flow samples (no ControlNet pair)")
    ap.add_argument("--pair-only", action="store_true", help="only the ControlNet pair, as controlnet_pair_KIND.png")
    ap.add_argument("--tumor", default="hepatic", help="the pair's tumour kind (maisi2.phantom.TUMOR_KINDS)")
    ap.add_argument("--radius", nargs=2, type=float, default=(15.0, 20.0), metavar=("MIN", "MAX"), help="mm")
    args = ap.parse_args()
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    if args.pair_only:
        tumor_pair(args.model, args.tumor, tuple(args.radius), out, f"controlnet_pair_{args.tumor}.png", None)
        print(f"wrote the ControlNet pair into {out}")
        return
    models = load_model(args.model, device="cpu")

    # 1. Flow-only samples next to real phantoms of the same grid (128 x 128 x 96 at 3 mm).
    samples = flow_samples(models, (128, 128, 96), (3.0, 3.0, 3.0), seeds=[0, 1, 2])
    reals = [load_ct(work / f"phantoms/case_{i:03d}/ct.nii.gz").array for i in (0, 3, 6)]
    titles = [f"phantom {i}" for i in (0, 3, 6)] + [f"RF-30 sample, seed {s}" for s in (0, 1, 2)]
    if args.compare_model:
        name, folder = args.compare_model.split("=", 1)
        other = flow_samples(load_model(folder, device="cpu"), (128, 128, 96), (3.0, 3.0, 3.0), seeds=[0, 1, 2])
        grid([axial(a) for a in reals + samples + other], 3,
             titles + [f"{name}, seed {s}" for s in (0, 1, 2)]).save(out / "flow_samples_compare.png")
    else:
        grid([axial(a) for a in reals + samples], 3, titles).save(out / "flow_samples.png")
    if args.flow_only:
        print(f"wrote flow samples into {out}")
        return

    # 2. ControlNet: a mask with a liver tumour, and the same noise with the tumour removed.
    tumor_pair(args.model, args.tumor, tuple(args.radius), out, "controlnet_pair.png", "controlnet_tumor.png")

    print(f"wrote previews into {out}")


if __name__ == "__main__":
    main()
