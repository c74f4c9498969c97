"""`maisi2 phantom`: write a procedural torso CT and its MAISI label map (the project's own data)."""

from __future__ import annotations

from maisi2.errors import InvalidInput


def register(sub) -> None:
    p = sub.add_parser(
        "phantom",
        help="write a procedural torso CT (ct.nii.gz) and its MAISI label map (label.nii.gz)",
        description=(
            "Procedural torso CT centred on the thoraco-abdominal junction, with its MAISI label map. "
            "Anatomy is placed in millimetres, so one seed gives the same body at any spacing; the "
            "field of view is shape * spacing."
        ),
    )
    p.add_argument("--shape", nargs=3, type=int, required=True, action="append", metavar=("X", "Y", "Z"),
                   help="voxels per axis (repeat with --spacing to give a --count set several grids)")
    p.add_argument("--spacing", nargs=3, type=float, required=True, action="append", metavar=("SX", "SY", "SZ"),
                   help="voxel size in mm per axis")
    p.add_argument("--count", type=int, default=None,
                   help="write a set of COUNT phantoms (case_000/...) plus datalist.jsonl into --out; "
                        "without --tumors each case gets a random lesion mix")
    p.add_argument("--tumors", nargs="*", default=[], metavar="KIND[:COUNT]",
                   help="lesions to add, e.g. hepatic:2 lung:1 bone:1; kinds: hepatic, pancreatic, lung, "
                        "colon, bone, kidney-cyst")
    p.add_argument("--tumor-radius-mm", nargs=2, type=float, default=None, metavar=("MIN", "MAX"),
                   help="lesion radius range in mm (default 5 20)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out", required=True, help="folder to write ct.nii.gz and label.nii.gz into")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from maisi2.phantom import parse_tumor_specs, write_phantom, write_phantom_set

    if len(args.shape) != len(args.spacing):
        raise InvalidInput("give one --spacing per --shape")
    tumors = parse_tumor_specs(args.tumors, radius_mm=args.tumor_radius_mm)
    if args.count is not None:
        grids = list(zip(args.shape, args.spacing))
        datalist = write_phantom_set(args.out, args.count, grids, seed=args.seed, tumors=tumors or None,
                                     overwrite=args.overwrite)
        print(f"wrote {args.count} phantoms and {datalist}")
        return 0
    if len(args.shape) > 1:
        raise InvalidInput("several --shape/--spacing grids only make sense with --count")
    ct_path, label_path = write_phantom(args.out, args.shape[0], args.spacing[0], tumors, seed=args.seed,
                                        overwrite=args.overwrite)
    print(f"wrote {ct_path}")
    print(f"wrote {label_path}")
    return 0
