"""`maisi2 train-vae` (train a tiny/small VAE on random crops) and `maisi2 encode` (build the latent cache)."""

from __future__ import annotations

from maisi2.cli.config_cmd import add_config_args
from maisi2.cli.datalist_args import DATALIST_HELP, add_datalist_options, datalist_source


def register(sub) -> None:
    _register_train(sub)
    _register_encode(sub)


def _register_train(sub) -> None:
    p = sub.add_parser("train-vae", help="train a VAE (tiny/small presets) on random crops of a datalist's scans",
                       description="Train a VAE on random crops (L1 + KL, optional patch-adversarial term). Writes "
                                   "OUT/vae.pt (the VAE checkpoint), OUT/last.pt (resumable state) and OUT/log.csv.")
    p.add_argument("datalist", help=f"{DATALIST_HELP} of CT scans")
    add_datalist_options(p)
    p.add_argument("--out", required=True, help="run folder")
    add_config_args(p)  # --preset defaults to small here
    p.add_argument("--steps", type=int, default=2000, help="optimiser steps (default 2000)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    p.add_argument("--warmup", type=int, default=0, help="warmup steps")
    p.add_argument("--batch-size", type=int, default=1, help="crops per step (default 1)")
    p.add_argument("--patch", type=int, nargs=3, default=[64, 64, 64], metavar=("X", "Y", "Z"),
                   help="crop size in voxels, multiples of 4 (default 64 64 64)")
    p.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("SX", "SY", "SZ"),
                   help="resample scans to this voxel size (mm) first; default: each scan's own")
    p.add_argument("--kl-weight", type=float, default=1e-6, help="weight of the KL term (default 1e-6)")
    p.add_argument("--adv-weight", type=float, default=0.0,
                   help="weight of the patch-adversarial term; 0 (default) trains without a discriminator")
    p.add_argument("--adv-start", type=int, default=0, help="step at which the adversarial term starts")
    p.add_argument("--adv-loss", choices=["hinge", "lsgan"], default="hinge")
    p.add_argument("--adv-layers", type=int, default=3, help="discriminator depth (default 3; 2 for patches < 32)")
    p.add_argument("--adv-channels", type=int, default=16, help="discriminator width (default 16)")
    p.add_argument("--decoder-only", action="store_true",
                   help="fine-tune only the decoder of the --init VAE (the encoder, and latents cached with it, "
                        "stay valid)")
    p.add_argument("--region-weight", type=float, default=1.0,
                   help="weight of --region-labels voxels in the L1 (weighted mean; default 1: none). Small, "
                        "low-contrast tumours need it to survive reconstruction")
    p.add_argument("--region-labels", type=_label_ids, default=None, metavar="ID,ID,...",
                   help="label ids of the weighted region (default: every tumour label); needs label maps")
    p.add_argument("--region-crops", type=float, default=0.0,
                   help="share of crops centred on a region voxel (default 0)")
    p.add_argument("--ema-decay", type=float, default=0.999, help="EMA decay of the weights (0: no EMA)")
    p.add_argument("--amp", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    p.add_argument("--ckpt-every", type=int, default=500, help="checkpoint every N steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="data-loading processes")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--init", default=None, help="start from these VAE weights (our checkpoint or autoencoder_v1.pt)")
    p.add_argument("--force", action="store_true",
                   help="allow the maisi-v2 preset (the paper reuses the released VAE; training one needs a GPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)


def _register_encode(sub) -> None:
    p = sub.add_parser("encode", help="encode a datalist's scans to cached latents (posterior mean) + scale factor",
                       description="Encode every scan of a datalist with a VAE and cache the posterior means (with "
                                   "label maps, spacing, modality) for flow/ControlNet training. Idempotent: "
                                   "unchanged scans are skipped on a rerun, changed ones re-encoded.")
    p.add_argument("datalist", help=DATALIST_HELP)
    add_datalist_options(p)
    p.add_argument("--vae", required=True, help="VAE checkpoint (from train-vae) or the released autoencoder_v1.pt")
    p.add_argument("--out", required=True, help="cache folder")
    p.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("SX", "SY", "SZ"),
                   help="resample scans to this voxel size (mm); default: each scan's own")
    p.add_argument("--tile", type=int, default=128,
                   help="encode volumes longer than N voxels on any axis in blocks of N (default 128; 0: never)")
    p.add_argument("--overlap", type=int, default=None,
                   help="context voxels around each block (default: the encoder's receptive field)")
    p.add_argument("--norm-stats", choices=["volume", "block"], default="volume",
                   help="group-norm statistics of tiled encoding: whole volume (exact, slower) or per block")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_encode)


def _label_ids(text: str) -> tuple[int, ...]:
    """'26,27' -> (26, 27), each a known MAISI label id."""
    import argparse

    import numpy as np

    from maisi2.labels import check_label_ids

    try:
        ids = tuple(int(part) for part in text.split(",") if part.strip())
        check_label_ids(np.asarray(ids), what="--region-labels")
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None
    return ids


def _train(args) -> int:
    from maisi2.config import get_config
    from maisi2.train_vae import VAETrainOptions, train_vae
    from maisi2.training import TrainSettings, distributed

    cfg = get_config(args.preset or "small", args.overrides)
    options = VAETrainOptions(
        patch=tuple(args.patch), batch_size=args.batch_size, spacing=tuple(args.spacing) if args.spacing else None,
        kl_weight=args.kl_weight, adv_weight=args.adv_weight, adv_start=args.adv_start, adv_loss=args.adv_loss,
        disc_layers=args.adv_layers, disc_channels=args.adv_channels, decoder_only=args.decoder_only,
        region_weight=args.region_weight, region_labels=args.region_labels, region_crops=args.region_crops,
    )
    settings = TrainSettings(
        steps=args.steps, lr=args.lr, warmup=args.warmup, ema_decay=args.ema_decay, amp=args.amp,
        ckpt_every=args.ckpt_every, seed=args.seed, device=args.device,
        progress=False if args.no_progress else None,
    )
    with distributed(args.device) as info:
        result = train_vae(datalist_source(args.datalist, args), args.out, cfg, options, settings, resume=args.resume, force=args.force,
                           init=args.init, num_workers=args.workers)
    if info.is_main:
        last = result.rows[-1] if result.rows else {}
        summary = f" (last recon L1 {last['recon_l1']:.4f})" if "recon_l1" in last else ""
        print(f"trained {result.step} steps{summary}")
        print(f"VAE checkpoint: {result.vae}")
        print(f"resumable state: {result.last}; log: {result.last.parent / 'log.csv'}")
    return 0


def _encode(args) -> int:
    from maisi2.encode import encode_datalist

    report = encode_datalist(datalist_source(args.datalist, args), args.vae, args.out, spacing=args.spacing, tile=args.tile or None,
                             overlap=args.overlap, norm_stats=args.norm_stats, device=args.device,
                             progress=not args.no_progress)
    print(f"encoded {len(report.encoded)}, already up to date {len(report.skipped)}")
    print(f"latent cache: {report.cache} (index.jsonl, stats.json)")
    print(f"scale_factor = {report.stats['scale_factor']:.6g} (1/std over {report.stats['count']} latent values)")
    return 0
