"""`maisi2 masks`: edit tumours in a label map; index a folder of label maps; show the bundled library.

    maisi2 masks index DIR                      (writes DIR/index.json; again: reads only new/changed files)
    maisi2 masks list [--library DIR]
    maisi2 masks make-default-library DIR       (how maisi2/resources/masks was made)

    maisi2 masks edit IN.nii.gz OUT.nii.gz --add hepatic:radius=12mm[:at=x,y,z] --remove lung \
        --scale hepatic=0.8 --augment --seed 0
    maisi2 masks edit IN.nii.gz OUT.nii.gz --remove-at 40,52,30 --scale-at 61,48,22=1.5 [--within 10]
"""

from __future__ import annotations

from maisi2.errors import InvalidInput


def register(sub) -> None:
    p = sub.add_parser("masks", help="edit tumours in MAISI label maps; index a mask library")
    msub = p.add_subparsers(dest="masks_command", metavar="ACTION", required=True)
    _register_edit(msub)
    ix = msub.add_parser("index", help="index a folder of MAISI label maps (shape, spacing, regions, labels, volumes)",
                         description="Writes DIR/index.json. Unreadable or non-MAISI files are skipped with a reason; "
                                     "indexing again reads only new or changed files.")
    ix.add_argument("folder", help="folder of MAISI label maps (*.nii.gz, searched recursively)")
    ix.set_defaults(func=_index)
    ls = msub.add_parser("list", help="list a mask library (default: the bundled one)")
    ls.add_argument("--library", default=None, metavar="DIR")
    ls.set_defaults(func=_list)
    mk = msub.add_parser("make-default-library", help="write the bundled library's masks into DIR")
    mk.add_argument("folder")
    mk.add_argument("--real", default=None, metavar="DIR",
                    help="folder of the TotalSegmentator reference files to import (../shared/data/totalsegmentator)")
    mk.add_argument("--overwrite", action="store_true")
    mk.set_defaults(func=_make_default)


def _register_edit(msub) -> None:
    from maisi2.labels import TUMOR_KINDS
    from maisi2.masks.tumors import WITHIN_MM

    kinds = ", ".join(TUMOR_KINDS)
    e = msub.add_parser(
        "edit", help="add, remove, scale or augment tumours inside their organs",
        description=(
            f"Tumour kinds: {kinds}. Edits run in the order remove-at, scale-at, remove, scale, augment, add. "
            "--remove-at and --scale-at change one tumour: the connected tumour holding the voxel x,y,z, or "
            "else the nearest one within --within mm of it. An added tumour "
            "is an irregular (seeded) blob clipped to its parent organ; without at= its centre lies at least "
            "the radius deep in the organ. Writes OUT and OUT_edits.json (kind, centre, volume in mL, parent "
            "organ of each changed tumour), both or neither."),
    )
    e.add_argument("mask", help="MAISI label map (NIfTI)")
    e.add_argument("out", help="edited label map (.nii.gz)")
    e.add_argument("--add", action="append", default=[], metavar="KIND[:radius=12mm][:at=x,y,z]",
                   help="add a tumour (radius default 10 mm; at: centre voxel index); repeatable")
    e.add_argument("--remove", action="append", default=[], metavar="KIND",
                   help="give every tumour of KIND back to its organ; repeatable")
    e.add_argument("--scale", action="append", default=[], metavar="KIND=FACTOR",
                   help="scale every tumour of KIND about its centre (length ratio); repeatable")
    e.add_argument("--remove-at", action="append", default=[], metavar="X,Y,Z",
                   help="give the one tumour at (or nearest) voxel X,Y,Z back to its organ; repeatable")
    e.add_argument("--scale-at", action="append", default=[], metavar="X,Y,Z=FACTOR",
                   help="scale the one tumour at (or nearest) voxel X,Y,Z about its centre; repeatable")
    e.add_argument("--within", type=float, default=WITHIN_MM, metavar="MM",
                   help=f"how far from X,Y,Z the picked tumour may be (default {WITHIN_MM:g} mm)")
    e.add_argument("--augment", action="store_true",
                   help="deform existing tumours at random as the release's augmentation does")
    e.add_argument("--seed", type=int, default=0, help="seed for placement, shape and augmentation (default 0)")
    e.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    e.set_defaults(func=_edit)


def _edit(args) -> int:
    from maisi2.labels import tumor_kind
    from maisi2.masks.edit import changes_path, edit_file
    from maisi2.masks.tumors import TumorEdits, parse_add, parse_at, parse_scale, parse_scale_at

    if args.seed < 0:
        raise InvalidInput(f"--seed must be >= 0, got {args.seed}")
    if not args.within >= 0:
        raise InvalidInput(f"--within must be a distance >= 0 mm, got {args.within:g}")
    edits = TumorEdits(add=tuple(parse_add(a) for a in args.add), remove=tuple(tumor_kind(k) for k in args.remove),
                       scale=tuple(parse_scale(s) for s in args.scale), augment=args.augment, seed=args.seed,
                       remove_at=tuple(parse_at(a) for a in args.remove_at),
                       scale_at=tuple(parse_scale_at(s) for s in args.scale_at), within_mm=args.within)
    changes = edit_file(args.mask, args.out, edits, overwrite=args.overwrite)
    for c in changes:
        centre = ", ".join(f"{v:g}" for v in c.centre_voxel)
        print(f"{c.action:9s} {c.label} in {c.parent_organ}: {c.volume_ml:.2f} mL at voxel ({centre})"
              + (f" [{c.note}]" if c.note else ""))
    print(f"wrote {args.out}\n  {changes_path(args.out)}")
    return 0


def _index(args) -> int:
    from maisi2.masks.library import INDEX_NAME, index_library

    index = index_library(args.folder)
    print(index.summary())
    print(f"wrote {index.folder / INDEX_NAME}")
    return 0


def _list(args) -> int:
    from maisi2.masks.library import load_library

    index = load_library(args.library)
    print(f"{index.folder}: {len(index.entries)} masks")
    for e in index.entries:
        print(f"  {e.file}: {' x '.join(map(str, e.shape))} at {' x '.join(f'{s:g}' for s in e.spacing)} mm; "
              f"regions {', '.join(e.regions) or '-'}; tumours {', '.join(e.tumors) or '-'}; {len(e.labels)} labels")
    return 0


def _make_default(args) -> int:
    from maisi2.masks.bundled import make_default_library

    for path in make_default_library(args.folder, args.real, overwrite=args.overwrite):
        print(f"wrote {path}")
    return 0
