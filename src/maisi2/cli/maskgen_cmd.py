"""`maisi2 train-maskgen DATALIST --out DIR`: train our rectified-flow mask generator.

Data parallel: ``torchrun --nproc_per_node N $(which maisi2) train-maskgen ...`` (every rank runs the
same command; rank 0 writes the checkpoints, logs and the exported folder).
"""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "train-maskgen",
        help="train the mask generator (mask autoencoder + rectified-flow latent UNet) on label maps",
        description=(
            "Train a mask generator on the label maps of a datalist (`maisi2 phantom --count N` writes one; "
            "rows of --recipe-set holdout_fold=K, default fold 0, are held out). Writes OUT/autoencoder/last.pt, "
            "OUT/unet/last.pt (each with log.csv) and the generator folder OUT/model, which "
            "`maisi2 generate --anatomy-size ... --mask-generator OUT/model` samples."
        ),
    )
    p.add_argument("datalist", help="datalist (.jsonl/.csv) whose 'label' column names MAISI label maps")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--preset", default="small", help="mask generator preset: tiny, small (default) or maisi-v2")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="mask generator config override, e.g. --set objective=ddpm (repeatable)")
    p.add_argument("--recipe-set", dest="recipe_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="training recipe override, e.g. --recipe-set unet_steps=2000 (repeatable; see MaskRecipe)")
    p.add_argument("--stage", default="all", choices=["autoencoder", "unet", "export", "all"],
                   help="which stage to run (default all, in order)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted stage from its last.pt")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)


def _train(args) -> int:
    from maisi2.maskgen.config import get_mask_config
    from maisi2.maskgen.train import STAGES, MaskRecipe, train_mask_generator

    cfg = get_mask_config(args.preset, args.overrides)
    recipe = MaskRecipe.from_overrides(args.recipe_overrides)
    stages = STAGES if args.stage == "all" else (args.stage,)
    done = train_mask_generator(args.datalist, args.out, cfg, recipe, stages, resume=args.resume,
                                device=args.device, progress=False if args.no_progress else None)
    for stage, path in done.items():
        print(f"{stage}: {path}")
    return 0
