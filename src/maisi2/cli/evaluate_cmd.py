"""`maisi2 evaluate ...`: 2.5D FID, tumour fidelity, diversity, QC rate, and the tumour segmenter.

    maisi2 evaluate fid --real REAL/ --generated GEN/ [--weights RadImageNet-ResNet50.pt] [--out fid.json]
    maisi2 evaluate fidelity GEN/ [--real REAL/] [--segmenter seg.pt] [--out fidelity.json]
    maisi2 evaluate diversity SAMPLES/ [--out diversity.json]
    maisi2 evaluate qc-rate GEN/ [--out qc.json]
    maisi2 evaluate train-segmenter --data train.jsonl --out seg.pt [--steps 1000]

A SET is a folder of NIfTI volumes (``*_label.nii.gz`` files are the label maps beside them), a
glob pattern, a datalist (.jsonl/.csv with image and label columns, or a decathlon-style .json whose
"training" list is read, paths relative to its folder) or one file.
"""

from __future__ import annotations

from maisi2.cli.datalist_args import add_datalist_options, datalist_source
from maisi2.errors import InvalidInput

_SET_HELP = "folder, glob pattern, datalist (.jsonl/.csv/decathlon-style .json) or NIfTI file"


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="evaluate generated CT: fid, fidelity, diversity, qc-rate, train-segmenter",
                       description="Evaluation tools (definitions in docs/evaluation.md). Each writes an optional "
                                   "JSON report (--out) and prints a short table.")
    tools = p.add_subparsers(dest="tool", metavar="TOOL")
    _register_fid(tools)
    _register_fidelity(tools)
    _register_diversity(tools)
    _register_qc_rate(tools)
    _register_train_segmenter(tools)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _common(p) -> None:
    p.add_argument("--out", help="JSON report to write (atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_datalist_options(p)


def _register_fid(tools) -> None:
    p = tools.add_parser("fid", help="2.5D FID between real and generated volumes",
                         description="The paper's 2.5D FID: XY, YZ and ZX slices through a feature network, one "
                                     "Fréchet distance per plane and their mean. Without --weights the offline "
                                     "hu-texture features are used: their numbers are NOT comparable with the paper's.")
    p.add_argument("--real", required=True, help=f"real volumes: {_SET_HELP}; or a .npz from --save-real-stats")
    p.add_argument("--generated", required=True, help=f"generated volumes: {_SET_HELP}")
    p.add_argument("--weights", help="ResNet-50 state dict (.pt/.pth/.safetensors; RadImageNet for the paper's numbers)")
    p.add_argument("--spacing", type=float, nargs=3, default=[1.0, 1.0, 1.0], metavar=("SX", "SY", "SZ"),
                   help="common voxel size in mm (default 1 1 1)")
    p.add_argument("--shape", type=int, nargs=3, default=[512, 512, 512], metavar=("X", "Y", "Z"),
                   help="common grid after padding with -1000 HU / centre cropping (default 512 512 512)")
    p.add_argument("--batch-size", type=int, default=16, help="slices per network call (default 16)")
    p.add_argument("--device", default="cpu", help="torch device for the ResNet (default cpu)")
    p.add_argument("--save-real-stats", metavar="NPZ", help="also save the real set's feature statistics here")
    _common(p)
    p.set_defaults(func=_fid)


def _register_fidelity(tools) -> None:
    p = tools.add_parser("fidelity", help="per-tumour HU contrast (and segmenter Dice) of generated volumes",
                         description="For each tumour component of each mask: median HU inside vs a shell of its "
                                     "parent organ, compared with a real CT of the same mask when given, and the "
                                     "detection / Dice of a trained segmenter when given.")
    p.add_argument("generated", help=f"generated CTs with their masks beside them (*_label.nii.gz): {_SET_HELP}")
    p.add_argument("--real", help=f"real CTs of the same masks, matched by position (sorted names; datalist row order): {_SET_HELP}")
    p.add_argument("--segmenter", help="checkpoint from `maisi2 evaluate train-segmenter`")
    p.add_argument("--shell-mm", type=float, default=5.0, help="parent-organ shell thickness in mm (default 5)")
    _common(p)
    p.set_defaults(func=_fidelity)


def _register_diversity(tools) -> None:
    p = tools.add_parser("diversity", help="mean pairwise 3D MS-SSIM of samples from one mask (lower = more diverse)")
    p.add_argument("samples", help=f"two or more samples generated from one mask: {_SET_HELP}")
    _common(p)
    p.set_defaults(func=_diversity)


def _register_qc_rate(tools) -> None:
    p = tools.add_parser("qc-rate", help="share of generated volumes passing the organ-HU quality check")
    p.add_argument("generated", help=f"generated CTs with their masks beside them (*_label.nii.gz): {_SET_HELP}")
    _common(p)
    p.set_defaults(func=_qc_rate)


def _register_train_segmenter(tools) -> None:
    p = tools.add_parser("train-segmenter", help="train the tumour segmenter (MONAI UNet) used by fidelity",
                         description="Train a small 3D UNet to find tumours (all MAISI tumour labels as one class) "
                                     "on (image, label) pairs; resumable: rerun with --resume and more --steps.")
    p.add_argument("--data", required=True, action="append",
                   help=f"training CTs with labels (datalist, or folder with *_label.nii.gz beside): {_SET_HELP}; repeatable")
    p.add_argument("--out", required=True, help="checkpoint file to write (e.g. seg.pt)")
    add_datalist_options(p)
    p.add_argument("--steps", type=int, default=1000, help="optimiser steps (default 1000)")
    p.add_argument("--batch-size", type=int, default=4, help="patches per step (default 4)")
    p.add_argument("--patch", type=int, nargs=3, default=[32, 32, 32], metavar=("X", "Y", "Z"),
                   help="patch size, multiple of 8 (default 32 32 32)")
    p.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64, 128], help="UNet channels (default 16 32 64 128)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default 3e-3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue an existing --out checkpoint")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train_segmenter)


# ---------------------------------------------------------------- commands


def _prepare_out(args) -> None:
    from maisi2.atomic import check_writable

    if args.out:
        check_writable(args.out, args.overwrite)  # fail before any work


def _write(args, payload: dict) -> None:
    import json

    from maisi2.atomic import atomic_output

    if args.out:
        with atomic_output(args.out, args.overwrite) as tmp:
            tmp.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.out}")


def _fid(args) -> int:
    from pathlib import Path

    from maisi2.evaluate.fid import SetStats, fid, volume_set_stats
    from maisi2.evaluate.features import HUTextureFeatures, ResNet50Features
    from maisi2.evaluate.inputs import collect_volumes

    _prepare_out(args)
    extractor = ResNet50Features(args.weights, device=args.device) if args.weights else HUTextureFeatures()
    real = (SetStats.load(args.real) if str(args.real).endswith(".npz")
            else collect_volumes(args.real, "--real", datalist_source(args.real, args)))
    generated = collect_volumes(args.generated, "--generated", datalist_source(args.generated, args))
    settings = dict(spacing=tuple(args.spacing), shape=tuple(args.shape), batch_size=args.batch_size,
                    progress=not args.no_progress)
    if not isinstance(real, SetStats):
        real = volume_set_stats(real, extractor, desc="real", **settings)
        if args.save_real_stats:
            real.save(args.save_real_stats, overwrite=args.overwrite)
    elif real.settings()["spacing"] != list(args.spacing) or real.settings()["shape"] != list(args.shape):
        raise InvalidInput(f"{args.real} was computed with spacing {real.spacing} and shape {real.shape}; "
                         "pass the same --spacing/--shape")
    gen = volume_set_stats(generated, extractor, desc="generated", **settings)
    result = fid(real, gen, extractor)
    print(result.summary())
    _write(args, {"real": str(args.real), "generated": str(args.generated),
                  "weights": None if not args.weights else str(Path(args.weights)), **result.to_dict()})
    return 0


def _fidelity(args) -> int:
    from maisi2.evaluate.fidelity import fidelity_files
    from maisi2.evaluate.inputs import collect_pairs, collect_volumes

    _prepare_out(args)
    pairs = collect_pairs(args.generated, "generated set", datalist_source(args.generated, args))
    reals = [None] * len(pairs)
    if args.real:
        reals = collect_volumes(args.real, "--real", datalist_source(args.real, args))
        if len(reals) != len(pairs):
            raise InvalidInput(f"--real holds {len(reals)} volumes but the generated set {len(pairs)}; they are "
                             "matched by sorted order, one real CT per generated CT")
    cases = [(gen, mask, real) for (gen, mask), real in zip(pairs, reals)]
    results = fidelity_files(cases, segmenter=args.segmenter, shell_mm=args.shell_mm, progress=not args.no_progress)
    for (gen, _, real), r in zip(cases, results):
        print(r.summary() + (f"\n  real CT: {real}" if real else ""))
    dice = [r.dice for r in results if r.dice is not None]
    errors = [abs(t.contrast_error_hu) for r in results for t in r.tumors if t.contrast_error_hu is not None]
    summary = {"volumes": len(results), "tumors": sum(len(r.tumors) for r in results),
               "mean_dice": sum(dice) / len(dice) if dice else None,
               "mean_abs_contrast_error_hu": sum(errors) / len(errors) if errors else None}
    print("  ".join(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in summary.items()))
    _write(args, {"summary": summary, "segmenter": args.segmenter,
                  "cases": [{**r.to_dict(), "real": None if real is None else str(real)} for (_, _, real), r in zip(cases, results)]})
    return 0


def _diversity(args) -> int:
    from maisi2.evaluate.diversity import diversity
    from maisi2.evaluate.inputs import collect_volumes

    _prepare_out(args)
    samples = collect_volumes(args.samples, "samples", datalist_source(args.samples, args))
    result = diversity(samples, progress=not args.no_progress)
    print(result.summary())
    _write(args, {"samples": [str(s) for s in samples], **result.to_dict()})
    return 0


def _qc_rate(args) -> int:
    from maisi2.evaluate.inputs import collect_pairs
    from maisi2.evaluate.qcrate import qc_rate_files

    _prepare_out(args)
    result = qc_rate_files(collect_pairs(args.generated, "generated set", datalist_source(args.generated, args)),
                           progress=not args.no_progress)
    print(result.summary())
    _write(args, result.to_dict())
    return 0


def _train_segmenter(args) -> int:
    from maisi2.evaluate.inputs import collect_pairs
    from maisi2.evaluate.seg import SegmenterConfig, SegmenterTrainSettings, train_segmenter

    pairs = [pair for spec in args.data for pair in collect_pairs(spec, "--data", datalist_source(spec, args))]
    unlabeled = [str(img) for img, lab in pairs if lab is None]
    if unlabeled:
        raise InvalidInput(f"{len(unlabeled)} training image(s) have no label map (e.g. {unlabeled[0]}); give a datalist "
                         "with a label column or put X_label.nii.gz beside X.nii.gz")
    depth = len(args.channels) - 1
    config = SegmenterConfig(channels=tuple(args.channels), strides=(2,) * depth, patch=tuple(args.patch))
    settings = SegmenterTrainSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    result = train_segmenter(pairs, args.out, config, settings, resume=args.resume, progress=not args.no_progress,
                             device=args.device)
    tail = result.losses[-10:]
    print(f"trained {result.step} steps on {len(pairs)} volumes; mean loss of the last {len(tail)} steps "
          f"{sum(tail) / max(len(tail), 1):.4f}; wrote {result.path}")
    return 0
