"""`maisi2 train-flow CACHE --out DIR`: train the latent flow UNet (MAISI-v2's three stages).

Data parallel: ``torchrun --nproc_per_node N $(which maisi2) train-flow ...`` (every rank runs the
same command; rank 0 writes the checkpoints and logs).
"""

from __future__ import annotations

from maisi2.cli.config_cmd import add_config_args
from maisi2.errors import InvalidInput, MissingInput


def register(sub) -> None:
    p = sub.add_parser(
        "train-flow",
        help="train the latent rectified-flow UNet on a latent cache (3 stages)",
        description=(
            "Train the flow UNet on a latent cache written by `maisi2 encode`. Stages: 1 low-resolution "
            "pre-training, 2 full resolution with size buckets, 3 balanced fine-tuning at batch 1. Each "
            "stage writes OUT/stage_K/last.pt (+ log.csv) and starts from the previous stage's checkpoint."
        ),
    )
    p.add_argument("cache", help="latent cache folder (index.jsonl, stats.json, *.pt)")
    p.add_argument("--out", required=True, help="output folder (one sub-folder per stage)")
    add_config_args(p)
    p.add_argument("--stage", default="all", choices=["1", "2", "3", "all"], help="which stage(s) to run (default all)")
    p.add_argument("--init", default=None, metavar="CKPT", help="unet checkpoint the first stage run starts from")
    p.add_argument("--resume", action="store_true", help="continue interrupted stages, keep finished ones")
    p.add_argument("--recipe", default=None, metavar="JSON", help="recipe file (see `FlowRecipe`; defaults otherwise)")
    p.add_argument("--recipe-set", dest="recipe_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override, e.g. --recipe-set stage2.voxels_per_batch=262144 (repeatable)")
    p.add_argument("--steps", type=int, default=None, help="steps of every stage run (overrides the recipe)")
    p.add_argument("--lr", type=float, default=None, help="learning rate of every stage run (overrides the recipe)")
    p.add_argument("--amp", default=None, choices=["auto", "fp32", "bf16", "fp16"], help="precision (default auto)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train_flow)


def _recipe(args, cfg, stages):
    import json
    from pathlib import Path

    from maisi2.train_flow import FlowRecipe, default_recipe, recipe_with_overrides

    if args.recipe:
        path = Path(args.recipe)
        if not path.is_file():
            raise MissingInput(f"recipe file {path} does not exist")
        try:
            recipe = FlowRecipe.from_json(path.read_text())
        except json.JSONDecodeError as err:
            raise InvalidInput(f"recipe file {path} is not valid JSON: {err}") from None
    else:
        recipe = default_recipe(cfg)
    overrides = list(args.recipe_overrides)
    for name, value in (("steps", args.steps), ("lr", args.lr)):
        if value is not None:
            overrides += [f"stage{k}.{name}={value}" for k in stages]
    if args.amp is not None:
        overrides.append(f"amp={json.dumps(args.amp)}")
    return recipe_with_overrides(recipe, overrides)


def _train_flow(args) -> int:
    from maisi2.config import get_config
    from maisi2.train_flow import STAGES, train_flow

    cfg = get_config(args.preset or "maisi-v2", args.overrides)
    stages = list(STAGES) if args.stage == "all" else [int(args.stage)]
    recipe = _recipe(args, cfg, stages)
    results = train_flow(args.cache, args.out, cfg, recipe, stages=stages, init=args.init, resume=args.resume,
                         device=args.device, progress=False if args.no_progress else None)
    for k, result in results.items():
        skipped = f", {result.skipped} skipped" if result.skipped else ""
        print(f"stage {k}: step {result.step}{skipped} -> {result.checkpoint}")
    return 0
