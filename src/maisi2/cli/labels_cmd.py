"""`maisi2 labels list | import-totalseg | import-vista3d | import`: the MAISI label table, and label
maps from other tools -> MAISI label maps."""

from __future__ import annotations

_BODY_TEXT = (
    "Voxels inside the body that no class claims become body (200): with --ct the envelope comes "
    "from the CT (HU > -500, holes filled); without it a rough envelope is built from the labels "
    "alone (it misses the outer body wall). Beside OUT X.nii.gz go the label names and colours for "
    "3D Slicer (X.ctbl) and ITK-SNAP (X.itksnap.txt)."
)


def register(sub) -> None:
    p = sub.add_parser("labels", help="the MAISI label table; convert label maps to MAISI label ids")
    lsub = p.add_subparsers(dest="labels_command", metavar="ACTION", required=True)
    lst = lsub.add_parser("list", help="print every MAISI label id, name and colour",
                          description="Print the MAISI label table: id, name, tumour parent organ, preview colour.")
    lst.add_argument("--format", choices=["text", "json"], default="text")
    lst.set_defaults(func=_list)

    ts = _import_parser(lsub, "import-totalseg",
                        "TotalSegmentator 'total' output (one --ml file, or the folder of per-class masks) -> MAISI ids",
                        "Map TotalSegmentator 'total' classes to MAISI label ids by name. A multi-label "
                        "file's numbering (v1: 104 classes, v2: 117) is detected from its ids and anatomy "
                        "unless --version says it; a folder of per-class masks (liver.nii.gz ...) is read "
                        "by file name. " + _BODY_TEXT)
    ts.add_argument("seg", help="TotalSegmentator output: the multi-label NIfTI (--ml) or the folder of per-class masks")
    ts.add_argument("--version", dest="ts_version", choices=["v1", "v2"], default=None,
                    help="numbering of a multi-label file (default: detected)")
    ts.set_defaults(func=_import_totalseg)

    vista = _import_parser(lsub, "import-vista3d", "VISTA3D output (MAISI ids already: checked) -> MAISI label map",
                           "VISTA3D labels with MAISI's label dictionary, so its ids are kept; any id outside "
                           "that dictionary is refused. " + _BODY_TEXT)
    vista.add_argument("seg", help="VISTA3D label map (NIfTI)")
    vista.set_defaults(func=_import_vista3d)

    table = _import_parser(lsub, "import", "any tool's label map plus a class table (name -> id) -> MAISI ids",
                           "Map each id of SEG to MAISI by the class name a table gives it (MAISI spelling "
                           "'left kidney' or TotalSegmentator's 'kidney_left'; 'body' and 'background' too). "
                           "Unknown names are listed, never guessed. " + _BODY_TEXT)
    table.add_argument("seg", help="multi-label map (NIfTI)")
    table.add_argument("--classes", required=True, help="class table: CSV rows 'name,id' or JSON {\"name\": id}")
    table.set_defaults(func=_import_with_classes)


def _import_parser(lsub, name: str, help_text: str, description: str):
    p = lsub.add_parser(name, help=help_text, description=description)
    p.add_argument("--ct", default=None, help="the CT it was computed from (NIfTI or DICOM folder), same grid")
    p.add_argument("--out", required=True, help="output MAISI label map (.nii.gz)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT (and its tables) if they exist")
    return p


def _done(report, out) -> int:
    from maisi2.label_tables import table_paths

    print(report.summary())
    print(f"wrote {out} (names and colours: {', '.join(map(str, table_paths(out)))})")
    return 0


def _import_totalseg(args) -> int:
    from maisi2.label_import import import_totalseg

    report = import_totalseg(args.seg, args.out, ct_path=args.ct, version=args.ts_version, overwrite=args.overwrite)
    return _done(report, args.out)


def _import_vista3d(args) -> int:
    from maisi2.label_import import import_vista3d

    return _done(import_vista3d(args.seg, args.out, ct_path=args.ct, overwrite=args.overwrite), args.out)


def _import_with_classes(args) -> int:
    from maisi2.label_import import import_with_classes

    report = import_with_classes(args.seg, args.classes, args.out, ct_path=args.ct, overwrite=args.overwrite)
    return _done(report, args.out)


def _list(args) -> int:
    import json

    from maisi2.label_tables import label_table

    rows = label_table()
    if args.format == "json":
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'id':>4}  {'name':<32} {'colour':<8} lesion of")
    for row in rows:
        print(f"{row['id']:>4}  {row['name']:<32} {row['colour']:<8} {row['parent'] or ''}")
    return 0
