"""`maisi2 labels import-totalseg SEG [--ct CT] --out OUT`: TotalSegmentator map -> MAISI label map."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("labels", help="convert label maps to MAISI label ids")
    lsub = p.add_subparsers(dest="labels_command", metavar="ACTION", required=True)
    imp = lsub.add_parser(
        "import-totalseg",
        help="convert a TotalSegmentator 'total' label map to MAISI ids and add the body envelope (200)",
        description=(
            "Map TotalSegmentator v2 'total' classes to MAISI label ids by name and label the rest of "
            "the body 200. With --ct the body envelope comes from the CT (HU > -500, holes filled); "
            "without it a rough envelope is built from the labels alone (it misses the outer body "
            "wall, which TotalSegmentator does not label)."
        ),
    )
    imp.add_argument("seg", help="TotalSegmentator label map (NIfTI, one file with all classes)")
    imp.add_argument("--ct", default=None, help="the CT it was computed from (NIfTI or DICOM folder), same grid")
    imp.add_argument("--out", required=True, help="output MAISI label map (.nii.gz)")
    imp.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    imp.set_defaults(func=_import_totalseg)


def _import_totalseg(args) -> int:
    from maisi2.totalseg import import_totalseg

    report = import_totalseg(args.seg, args.out, ct_path=args.ct, overwrite=args.overwrite)
    print(report.summary())
    print(f"wrote {args.out}")
    return 0
