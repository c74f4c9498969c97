"""`maisi2 export-model`: trained checkpoints -> a model folder for `generate --model`."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("export-model", help="assemble a model folder from trained VAE/UNet/ControlNet checkpoints")
    p.add_argument("--vae", required=True, help="VAE checkpoint (train-vae's vae.pt)")
    p.add_argument("--unet", required=True, help="flow UNet checkpoint (train-flow's stage_N/last.pt)")
    p.add_argument("--controlnet", default=None, help="ControlNet checkpoint (train-controlnet's last.pt)")
    p.add_argument("--cache", default=None, help="latent cache the models were trained on (records the trained FOV)")
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument("--layout", choices=["safetensors", "pt"], default="safetensors")
    p.add_argument("--raw", action="append", default=[], choices=["vae", "unet", "controlnet"],
                   help="export this network's raw weights instead of its EMA (repeatable); for a short run, "
                        "whose EMA still lags far behind the weights")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from maisi2.export import export_model

    out = export_model(args.vae, args.unet, args.controlnet, args.out, cache=args.cache, layout=args.layout,
                       overwrite=args.overwrite, raw=args.raw)
    print(f"wrote model folder {out}")
    return 0
