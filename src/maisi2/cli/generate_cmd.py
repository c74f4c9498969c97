"""`maisi2 generate`: synthetic CT from a mask (file, phantom, folder or datalist); `maisi2 qc`: check one.

    maisi2 generate --mask MASK.nii.gz --out CT.nii.gz [--spacing SX SY SZ] [--steps 30] [--seed N]
    maisi2 generate --phantom --shape 128 128 128 --phantom-spacing 2 2 2 --tumors hepatic:2 --out CT.nii.gz
    maisi2 generate --mask-dir MASKS/ --out-dir CTS/          (or --datalist masks.jsonl --out-dir CTS/)
    maisi2 generate --region chest --anatomy "liver,hepatic tumor" --size 128 128 96 --spacing 3 3 3 --out CT.nii.gz
    maisi2 generate --mask MASK.nii.gz --tumors hepatic:2 --out CT.nii.gz
    torchrun --nproc_per_node 2 -m maisi2 generate --requests requests.jsonl --out-dir CTS/   (sharded, resumable)
    maisi2 qc CT.nii.gz --mask CT_label.nii.gz [--out qc.json]
"""

from __future__ import annotations

import dataclasses

from maisi2.cli.datalist_args import add_datalist_options, datalist_source
from maisi2.errors import InvalidInput

def register(sub) -> None:
    _register_generate(sub)
    _register_qc(sub)


def _register_generate(sub) -> None:
    p = sub.add_parser(
        "generate", help="generate a synthetic CT from a MAISI label map",
        description=(
            "Generate a CT (int16 HU) from a MAISI label map with the flow model and ControlNet. Beside "
            "OUT it writes OUT_label.nii.gz (the prepared mask), OUT_preview.png and OUT_report.json. "
            "Bad requests (unknown label ids, empty mask, a spacing or field of view outside what the model was "
            "trained on, labels it never saw, a size over the memory budget or the free disk, existing outputs, an "
            "output folder that cannot be written) are refused before any work, sizes planned from the mask's "
            "header before its voxels are read. A failed quality check is reported (and recorded in the JSON "
            "report) but is not an error: the outputs are written, exit status 0."
        ),
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument("--mask", help="MAISI label map (NIfTI)")
    source.add_argument("--phantom", action="store_true", help="generate from a procedural phantom mask made now")
    source.add_argument("--mask-dir", help="batch: every *.nii.gz mask in this folder")
    source.add_argument("--datalist", help="batch: .txt (a mask path per line), .jsonl ({\"mask\", \"spacing\", \"seed\", "
                        "\"out\"}) or decathlon-style .json (the \"label\" of each entry is the mask)")
    source.add_argument("--anatomy-size", metavar="NAME=SIZE,...",
                        help="make the mask with the mask generator for these anatomy sizes (0..1, -1 = absent), e.g. "
                             "liver=0.6,\"hepatic tumor\"=0.2; slots: gallbladder, liver, stomach, pancreas, colon, "
                             "lung tumor, pancreatic tumor, hepatic tumor, colon cancer primaries, bone lesion")
    source.add_argument("--requests", metavar="JSONL",
                        help="dataset scale: one request per line ({\"region\", \"anatomy\", \"size\", \"spacing\", "
                             "\"tumors\", \"seed\", \"out\"} or {\"mask\", ...}); sharded over torchrun's processes, "
                             "finished outputs skipped, failures recorded per line (see maisi2.masks.shards)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--out", help="output CT (.nii.gz) for --mask / --phantom")
    target.add_argument("--out-dir", help="output folder for --mask-dir / --datalist (<mask>_ct.nii.gz each)")
    add_datalist_options(p)
    p.add_argument("--spacing", type=float, nargs=3, metavar=("SX", "SY", "SZ"),
                   help="output voxel size in mm (the mask is resampled, nearest); default: the mask's")
    p.add_argument("--steps", type=int, default=30, help="Euler steps (default 30)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="model folder: a maisi2 model (model.json + weights) or the released MAISI-v2 files; "
                        "default: the bundled model")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--max-memory", type=float, default=None, metavar="GB",
                   help="memory budget (device memory on CUDA, RAM on CPU); default: what is free")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (batches: redo finished items)")
    p.add_argument("--fit-to-model", action="store_true",
                   help="fit the request to what the model was trained on: resample to the nearest trained spacing, "
                        "pad to its smallest field of view, replace labels it never saw by the nearest it knows")
    p.add_argument("--force", action="store_true",
                   help="run a request outside the model's domain anyway; the JSON report lists why it is out of domain")
    p.add_argument("--cfg-scale", type=float, default=None, metavar="S",
                   help="classifier-free guidance scale; unconditional branch = the mask without tumours")
    p.add_argument("--control-scale", type=float, default=1.0, metavar="S", help="ControlNet residual scale (default 1)")
    p.add_argument("--exact-grid", action="store_true", help="float64 time grid (default: MONAI's float16 grid)")
    p.add_argument("--qc-retries", type=int, default=0, metavar="N",
                   help="regenerate with seed+1, seed+2 ... up to N times while the quality check fails")
    p.add_argument("--tile-statistics", action="store_true",
                   help="when the VAE decodes in tiles, let each tile use its own group-norm statistics (one pass, "
                        "faster; the default measures the whole volume's so tiling does not change the result)")
    p.add_argument("--spill-dir", default=None, metavar="DIR",
                   help="CPU only: when even a float16 whole-volume decode does not fit the budget, keep the "
                        "decoder's layer tensors in (deleted) files here instead of falling back to tiles")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="arithmetic of the networks. bf16: on the CPU the 3x3x3 convolutions of the flow UNet, "
                        "ControlNet and VAE decoder in bfloat16 (channels-last), everything between them float32. "
                        "auto: bf16 for the networks measured within the release's own fp16 error (the flow UNet and "
                        "ControlNet; the decoder stays fp32), on CPUs where it pays (AMX; AVX512-BF16 when a short "
                        "probe says so), else fp32 (docs/performance.md). On CUDA auto is the release's fp16 "
                        "autocast. The choice is in the report's compute_plan")
    p.add_argument("--fp32", action="store_true", help="full precision everywhere (same as --precision fp32)")
    p.add_argument("--no-label", action="store_true", help="do not write the prepared label map")
    p.add_argument("--no-preview", action="store_true", help="do not write the PNG preview")
    p.add_argument("--out-format", choices=["nifti", "dicom"], default="nifti",
                   help="nifti (default) or dicom: the CT as a DICOM CT series (one file per slice) in the folder "
                        "OUT (a trailing .nii.gz dropped); label map, preview and report stay beside it")
    p.add_argument("--preview-at", default=None, metavar="LABEL",
                   help="centre the preview's slices on this label (a MAISI name, e.g. 'hepatic tumor'); "
                        "default: the largest tumour, else the middle of the volume")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    mg = p.add_argument_group("mask generator (with --anatomy-size)")
    mg.add_argument("--mask-generator", default=None, metavar="released|bundled|DIR",
                    help="released: the release's mask generation files in --model; bundled: ours; or a folder. "
                         "Default: released when --model holds them, else bundled")
    mg.add_argument("--mask-steps", type=int, default=None, metavar="N",
                    help="sampling steps of a rectified-flow mask generator (default its own, 30); the release's "
                         "DDPM one always takes 1000")
    _register_intent(p)
    ph = p.add_argument_group("phantom mask (with --phantom)")
    # Defaults: a field of view the bundled model was trained on (384 x 384 x 288 mm).
    ph.add_argument("--shape", type=int, nargs=3, default=(128, 128, 96), metavar=("X", "Y", "Z"),
                    help="phantom voxels (default 128 128 96)")
    ph.add_argument("--phantom-spacing", type=float, nargs=3, default=(3.0, 3.0, 3.0), metavar=("SX", "SY", "SZ"),
                    help="phantom voxel size in mm (default 3 3 3)")
    ph.add_argument("--phantom-seed", type=int, default=0, help="phantom anatomy seed (default 0)")
    p.set_defaults(func=_generate)


def _register_intent(p) -> None:
    it = p.add_argument_group(
        "from intent (no --mask: a library mask is selected, fitted and edited; see `maisi2 masks --help`)")
    it.add_argument("--region", default=None, help="body region(s) the mask must cover: head, chest, abdomen, pelvis "
                    "(comma-separated)")
    it.add_argument("--anatomy", default=None, help='MAISI label names the mask must hold, comma-separated, e.g. '
                    '"liver,hepatic tumor" (a tumour it lacks is added to its organ)')
    it.add_argument("--size", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                    help="output voxels (multiples of the networks' divisor, 16 for the bundled model); "
                         "default: the selected mask's, resampled")
    it.add_argument("--library", default=None, metavar="DIR", help="mask library folder (default: the bundled one)")
    it.add_argument("--num-samples", type=int, default=1, metavar="N",
                    help="N outputs OUT_000 ...: from intent, different masks among the best (and seeds); "
                         "with --mask / --phantom, the same mask with different seeds")
    it.add_argument("--tumors", nargs="*", default=[], metavar="KIND[:COUNT]",
                    help="tumours to add: hepatic, pancreatic, lung, colon, bone, kidney-cyst; with --phantom drawn "
                         "into the phantom, with --mask or a library mask added inside the parent organ")
    it.add_argument("--tumor-radius-mm", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                    help="tumour radius range in mm (default 5 20 for phantoms, 8 15 for masks)")


def _register_qc(sub) -> None:
    p = sub.add_parser(
        "qc", help="quality check: organ median HU of a CT inside real-data ranges",
        description=(
            "Median HU of liver, spleen, pancreas, kidney, lung, bone and brain must lie inside the packaged "
            "image_median_statistics_ct.json ranges (sigma_6_low..sigma_6_high). Organs absent from the mask "
            "are 'not present'. Exit status 1 when an organ fails."
        ),
    )
    p.add_argument("ct", help="CT (NIfTI, HU)")
    p.add_argument("--mask", required=True, help="its MAISI label map on the same grid")
    p.add_argument("--out", default=None, help="write the per-organ report as JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_qc)


def _options(args):
    from maisi2.generate import GenerateOptions

    return GenerateOptions(
        spacing=tuple(args.spacing) if args.spacing else None, steps=args.steps, seed=args.seed,
        exact_grid=args.exact_grid, cfg_scale=args.cfg_scale, control_scale=args.control_scale,
        max_memory_gb=args.max_memory, device=args.device, half_precision=False if args.fp32 else None,
        precision="fp32" if args.fp32 else args.precision,
        qc_retries=args.qc_retries, decode_statistics="tile" if args.tile_statistics else "volume",
        spill_dir=args.spill_dir, force=args.force, fit_to_model=args.fit_to_model,
        write_label=not args.no_label, write_preview=not args.no_preview, preview_focus=args.preview_at,
        out_format=args.out_format,
        overwrite=args.overwrite, progress=not args.no_progress,
    )


def _generate(args) -> int:
    from maisi2 import generate as G

    options = _options(args)
    if args.num_samples < 1:
        raise InvalidInput(f"--num-samples must be >= 1, got {args.num_samples}")
    intent = args.region is not None or args.anatomy is not None
    sources = [bool(args.mask), args.phantom, bool(args.mask_dir), bool(args.datalist), bool(args.requests),
               bool(args.anatomy_size), intent]
    if sum(sources) != 1:
        raise InvalidInput("give one mask source: --mask, --phantom, --mask-dir, --datalist, --requests, --anatomy-size, "
                         "or --region/--anatomy (a mask chosen from the library)")
    if args.requests:
        return _run_requests(args, options)
    batch = args.mask_dir or args.datalist
    if bool(batch) != bool(args.out_dir) or not (args.out or args.out_dir):
        raise InvalidInput("--mask-dir / --datalist write to --out-dir; --mask / --phantom / --anatomy-size / --region "
                         "write to --out")
    if batch:
        items = (G.batch_from_dir(args.mask_dir, args.out_dir) if args.mask_dir
                 else G.batch_from_datalist(datalist_source(args.datalist, args), args.out_dir))
        G.generate_batch(items, model=args.model, options=options, on_done=_print_result,
                         on_skip=lambda item: print(f"skipped {item.out} (already written; --overwrite redoes it)"))
        return 0
    if intent:
        return _generate_from_intent(args, options)
    mask = args.mask
    if args.phantom:
        from maisi2.phantom import parse_tumor_specs

        tumors = parse_tumor_specs(args.tumors, args.tumor_radius_mm)
        # Refuse an impossible phantom request from its grid, before the phantom costs anything.
        G.preflight(G.MaskGrid(tuple(args.shape), tuple(args.phantom_spacing), 2, "phantom"), args.out,
                    args.model, options)
        mask = G.phantom_mask(args.shape, args.phantom_spacing, tumors, args.phantom_seed)
    elif args.anatomy_size:
        mask, made = G.mask_from_anatomy_sizes(args.anatomy_size, args.out, args.model, args.mask_generator, options,
                                               args.mask_steps)
        sizes = ", ".join(f"{k}={v:g}" for k, v in made["size_vector"].items())
        print(f"mask from the {made['kind']} mask generator ({made['sampler']}, {made['steps']} steps, "
              f"{made['seconds']['total']:.1f} s): {sizes}")
        # The CT's report says how its mask was made (the full size vector used, generator, steps, seed).
        options = dataclasses.replace(options, request={**(options.request or {}), "mask_generator": made})
    elif args.tumors:
        mask, options = _mask_with_tumors(args, options)
    _generate_samples(mask, args, options)
    return 0


def _generate_samples(mask, args, options) -> None:
    """One CT, or with --num-samples N the same mask with N seeds (apart by qc_retries + 1, so retries never
    reuse another sample's seed) into OUT_000, OUT_001, ..."""
    import dataclasses

    from maisi2 import generate as G
    from maisi2.masks.intent import numbered_outputs

    outs = numbered_outputs(args.out, args.num_samples)
    for out in outs:  # every output checked before the first sample
        G.check_request(out, options, mask)
    for i, out in enumerate(outs):
        seed = options.seed + i * (options.qc_retries + 1)
        _print_result(G.generate(mask, out, model=args.model, options=dataclasses.replace(options, seed=seed)))


def _mask_with_tumors(args, options):
    """--mask M --tumors KIND[:N]: the tumours added to the mask (at the output spacing), preview on them."""
    import dataclasses

    from maisi2 import volume_io
    from maisi2.masks import intent
    from maisi2.masks.select import MaskRequest, fit_mask

    counts = intent.parse_tumor_counts(args.tumors)
    volume, _ = fit_mask(volume_io.load_label_map(args.mask), MaskRequest(spacing=options.spacing))
    edited, changes = intent.mask_with_tumors(volume, counts, tuple(args.tumor_radius_mm or (8.0, 15.0)),
                                              seed=options.seed)
    for c in changes:
        print(f"added {c.label} in {c.parent_organ}: {c.volume_ml:.2f} mL at voxel "
              f"({', '.join(f'{v:g}' for v in c.centre_voxel)})")
    return edited, dataclasses.replace(options, spacing=None,
                                       preview_focus=options.preview_focus or intent.preview_label(changes),
                                       request={"mask": args.mask, "tumor_edits": [c.to_dict() for c in changes]})


def _run_requests(args, options) -> int:
    from maisi2.masks.shards import run_requests_distributed

    if not args.out_dir:
        raise InvalidInput("--requests writes into --out-dir")
    summary = run_requests_distributed(args.requests, args.out_dir, model=args.model, options=options,
                                       library=args.library)
    import os

    if int(os.environ.get("RANK", 0)) == 0:
        print(f"{summary['lines']} requests: {summary['done']} done, {summary['failed']} failed, "
              f"{summary['skipped']} skipped (already there); details in {args.out_dir}/summary.json"
              + (f" and failures.rank*.jsonl" if summary["failed"] else ""))
    return 1 if summary["failed"] else 0


def _generate_from_intent(args, options) -> int:
    from maisi2.generate import network_divisor
    from maisi2.masks import intent
    from maisi2.masks.select import make_request
    from maisi2.models import read_model_info

    divisor = network_divisor(read_model_info(args.model).cfg)  # the config only: no weights read
    request = make_request(args.region, args.anatomy, args.size, options.spacing, divisor=divisor)
    samples = intent.generate_from_intent(
        request, args.out, library=args.library, model=args.model, options=options, num_samples=args.num_samples,
        tumors=intent.parse_tumor_counts(args.tumors), tumor_radius_mm=tuple(args.tumor_radius_mm or (8.0, 15.0)))
    for sample in samples:
        req = sample.report["request"]
        print(f"{req['selected']['file']} (from {req['library']}) -> {sample.ct_path}; "
              f"quality check {'passed' if sample.report['quality']['passed'] else 'FAILED'}")
        for edit in req["tumor_edits"]:
            print(f"  added {edit['label']} in {edit['parent_organ']}: {edit['volume_ml']:.2f} mL")
    return 0


def _print_result(result) -> None:
    quality = result.report["quality"]
    verdict = "passed" if quality["passed"] else f"FAILED ({', '.join(quality['failed'])})"
    attempts = len(result.report["attempts"])
    print(f"wrote {result.paths.ct} (seed {result.report['seed']}, quality check {verdict}, "
          f"{attempts} attempt{'s' if attempts > 1 else ''})")
    for path in result.paths.all()[1:]:
        print(f"  {path}")
    domain = result.report["domain"]
    for change in domain["fitted"]:
        print(f"  fitted to the model: {change}")
    for reason in domain["out_of_domain"]:
        print(f"  WARNING, out of the model's domain: {reason}")


def _qc(args) -> int:
    from maisi2.quality import check_files

    report = check_files(args.ct, args.mask, out=args.out, overwrite=args.overwrite)
    print(report.summary())
    if args.out:
        print(f"wrote {args.out}")
    return 0 if report.passed else 1
