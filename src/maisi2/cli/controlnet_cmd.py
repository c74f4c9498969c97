"""`maisi2 train-controlnet CACHE --unet CKPT --out DIR`: train the mask ControlNet against the
frozen flow UNet, with MAISI-v2's region-specific contrastive loss.

Data parallel: ``torchrun --nproc_per_node N $(which maisi2) train-controlnet ...`` (every rank runs
the same command; rank 0 writes the checkpoint and logs).
"""

from __future__ import annotations

import argparse

from maisi2.cli.config_cmd import add_config_args


def register(sub) -> None:
    p = sub.add_parser(
        "train-controlnet",
        help="train the label-map ControlNet (frozen flow UNet, region contrastive loss)",
        description=(
            "Train a ControlNet on a latent cache stored with label maps (`maisi2 encode` with labels in the "
            "datalist), against the frozen flow UNet CKPT (a maisi2 unet checkpoint, or the released "
            "diff_unet_3d_rflow-ct.pt or its folder). The ControlNet starts from the UNet's weights, or from "
            "--init-controlnet (e.g. the released controlnet_3d_rflow-ct.pt, to fine-tune it for a new tumour "
            "class). Writes "
            "OUT/last.pt (kind controlnet) and OUT/log.csv (flow_loss, roi_loss, bg_loss, lambda, ...)."
        ),
    )
    p.add_argument("cache", help="latent cache folder (index.jsonl, stats.json, *.pt with labels)")
    p.add_argument("--unet", required=True, metavar="CKPT", help="trained flow UNet checkpoint (or released file/folder)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--init-controlnet", default=None, metavar="FILE",
                   help="fine-tune from this ControlNet instead of starting from the UNet's weights: the released "
                        "controlnet_3d_rflow-ct.pt (or its folder) or a maisi2 controlnet checkpoint")
    add_config_args(p)
    p.add_argument("--steps", type=int, default=None, help="training steps (default 10000)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-5)")
    p.add_argument("--batch-size", type=int, default=None, help="largest batch (default 1; capped by a voxel budget)")
    p.add_argument("--contrastive", action=argparse.BooleanOptionalAction, default=None,
                   help="use the region contrastive loss (default; --no-contrastive: flow loss only)")
    p.add_argument("--lambda-schedule", default=None, metavar="SPEC",
                   help="contrastive weight over training as START:VALUE pairs, START a fraction of the steps "
                        "(default '0:0.01,0.5:0.001', the paper's; '0.01' is the official constant)")
    p.add_argument("--placement", default=None, choices=["output", "encoder", "auto"],
                   help="compare final velocities (output) or ControlNet residuals (encoder, less memory); "
                        "auto: output up to 64^3 latent voxels per batch (default auto)")
    p.add_argument("--official", action="store_true",
                   help="the released code's loss: background term vs the flow target, constant lambda 0.01, "
                        "unnormalised region weights (later options still apply)")
    p.add_argument("--recipe-set", dest="recipe_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override, e.g. --recipe-set loss.dilation=2, or --recipe-set 'crop=[16,16,16]' "
                        "--recipe-set tumor_crops=0.7 to train on latent windows, most centred on a tumour "
                        "(repeatable; see ControlNetRecipe)")
    p.add_argument("--amp", default=None, choices=["auto", "fp32", "bf16", "fp16"], help="precision (default auto)")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT from OUT/last.pt")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train_controlnet)


def _overrides(args) -> list[str]:
    import json

    from maisi2.losses import OFFICIAL_LAMBDA_SCHEDULE, parse_lambda_schedule

    items = []
    if args.official:
        items += ['loss.background_form="official"', f"loss.lambda_schedule={json.dumps(OFFICIAL_LAMBDA_SCHEDULE)}",
                  "loss.normalise_weight=false"]
    if args.lambda_schedule is not None:
        items.append(f"loss.lambda_schedule={json.dumps(parse_lambda_schedule(args.lambda_schedule))}")
    for key, value in (("steps", args.steps), ("lr", args.lr), ("batch_size", args.batch_size),
                       ("loss.contrastive", args.contrastive), ("loss.placement", args.placement), ("amp", args.amp)):
        if value is not None:
            items.append(f"{key}={json.dumps(value)}")
    return items + list(args.recipe_overrides)


def _train_controlnet(args) -> int:
    from maisi2.train_controlnet import ControlNetRecipe, recipe_with_overrides, train_controlnet

    recipe = recipe_with_overrides(ControlNetRecipe(), _overrides(args))
    result = train_controlnet(args.cache, args.unet, args.out, recipe, preset=args.preset, overrides=args.overrides,
                              resume=args.resume, device=args.device, progress=False if args.no_progress else None,
                              init_controlnet=args.init_controlnet)
    skipped = f", {result.skipped} skipped" if result.skipped else ""
    print(f"controlnet: step {result.step}{skipped} -> {result.checkpoint}")
    return 0
