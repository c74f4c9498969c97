"""Can the mask autoencoder give ONE phantom mask back? (issue #25: why the tiny generator failed)

Trains a fresh mask autoencoder of a preset on a single phantom mask (the first of
`maisi2.phantom`'s set, 64 x 64 x 48 at 6 mm, brought to the preset's grid) with Adam at a fixed
learning rate, bf16 autocast, the training loss of `maisi2.maskgen.train`, and prints the loss's
soft Dice and the hard Dice of the argmax (mean over the classes present) every tenth of the run.

    python experiments/mask_autoencoder_overfit.py --lr 2e-4 --steps 400   # the first recipe's rate
    python experiments/mask_autoencoder_overfit.py --lr 1e-3 --steps 400
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from maisi2 import compute, volume_io
from maisi2 import labels as L
from maisi2.data import read_datalist
from maisi2.maskgen import networks
from maisi2.maskgen.config import get_mask_config
from maisi2.maskgen.measure import label_dice
from maisi2.maskgen.train import autoencoder_loss, mask_on_grid, with_training_forward
from maisi2.nets import mask_to_bitplanes
from maisi2.phantom import write_phantom_set


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--dice-weight", type=float, default=1.0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = get_mask_config(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        write_phantom_set(Path(tmp), 1, [((64, 64, 48), (6.0, 6.0, 6.0))], seed=0, overwrite=True)
        mask = mask_on_grid(volume_io.load_label_map(read_datalist(Path(tmp) / "datalist.jsonl")[0].label), cfg)
    target = torch.from_numpy(L.ids_to_channels(mask))[None]
    bits = mask_to_bitplanes(torch.from_numpy(mask.astype(np.int64))[None, None])
    print(f"{args.preset}: grid {mask.shape}, {len(np.unique(mask))} labels present, lr {args.lr}")
    ae = with_training_forward(networks.build_mask_autoencoder(cfg))
    opt = torch.optim.Adam(ae.parameters(), lr=args.lr)
    latent = (1, cfg.autoencoder.latent_channels, *(n // cfg.autoencoder.downsample_factor for n in mask.shape))
    started = time.process_time()
    for step in range(args.steps):
        with compute.autocast(torch.device("cpu"), "bf16"):
            logits, _, _ = ae(bits, torch.randn(latent))
            loss, logs = autoencoder_loss(logits, target, args.dice_weight)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ae.parameters(), 1.0)
        opt.step()
        if step % max(args.steps // 10, 1) == 0 or step == args.steps - 1:
            hard = np.mean(list(label_dice(logits.argmax(1).numpy(), target.numpy()).values()))
            print(f"step {step:4d}  ce {logs['ce']:.3f}  soft Dice {logs['dice']:.3f}  hard Dice {hard:.3f}  "
                  f"CPU {time.process_time() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
