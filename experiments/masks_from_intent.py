"""docs/img/masks_from_intent.png: requests -> selected / edited masks -> CTs, with the bundled library
and the bundled model (`maisi2.masks.intent`).

    python experiments/masks_from_intent.py --out docs/img/masks_from_intent.png --work /tmp/intent_fig

One row per request: the request in words, the mask it got (axial slice through the edited tumour,
or the largest tumour, labels in colour, tumours in white) and the generated CT (tri-planar preview
through the same voxel, label outlines). Each request is generated once into --work (rerun: reused).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from maisi2 import label_tables, volume_io
from maisi2 import labels as L
from maisi2.generate import GenerateOptions
from maisi2.preview import preview_centre, render_preview
from maisi2.masks import intent
from maisi2.masks.select import make_request

REAL_MASK = "totalseg_abdomen_122x101x30_3mm.nii.gz"
# (caption, region, anatomy, tumours to add, mask file of the bundled library or None)
REQUESTS = [
    ("chest; heart, lung tumor", "chest", "heart,lung tumor", (), None),
    ("abdomen; liver, hepatic tumor", "abdomen", "liver,hepatic tumor", (), None),
    ("real TotalSegmentator mask + pancreatic:1", None, None, ("pancreatic",), REAL_MASK),
    ("pelvis; bladder (cartoon mask)", "pelvis", "bladder", (), None),
]
SIZE, SPACING = (96, 96, 64), (4.0, 4.0, 4.0)


def colour_labels(labels2d: np.ndarray) -> np.ndarray:
    """RGB in the preview's label colours (`maisi2.label_tables`), background black, tumours white."""
    rgb = label_tables.colours_of(labels2d).copy()
    rgb[labels2d == L.BACKGROUND] = 0
    rgb[np.isin(labels2d, L.TUMOR_IDS)] = 255
    return rgb


def _edits(request: dict) -> list:
    """The tumour edits a report records (reports written before the key's spelling was unified
    call them "tumour_edits")."""
    return request.get("tumor_edits", request.get("tumour_edits", []))


def run_request(work: Path, index: int, request) -> tuple[np.ndarray, np.ndarray, tuple, dict]:
    caption, region, anatomy, tumors, mask = request
    out = work / f"request_{index}.nii.gz"
    report_path = work / f"request_{index}_report.json"
    if not report_path.is_file():
        options = GenerateOptions(seed=index, progress=False)
        counts = [intent.TumorCount(k) for k in tumors]
        if mask is None:
            intent.generate_from_intent(make_request(region, anatomy, SIZE, SPACING), out, options=options,
                                        tumors=counts)
        else:
            _generate_on_mask(mask, counts, out, options)
    report = json.loads(report_path.read_text())
    labels = volume_io.load_label_map(work / f"request_{index}_label.nii.gz")
    ct = volume_io.load_ct(out).array
    edits = _edits(report.get("request", {}))
    report["focus"] = edits[0]["label"] if edits else None  # the preview's rule: the edited tumour's label
    return ct, labels.array, labels.spacing, report


def _generate_on_mask(mask: str, counts, out: Path, options) -> None:
    import dataclasses

    from maisi2.generate import generate
    from maisi2.masks.library import default_library_dir

    volume = volume_io.load_label_map(default_library_dir() / mask)
    edited, changes = intent.mask_with_tumors(volume, counts, radius_mm=(6.0, 9.0), seed=options.seed)
    options = dataclasses.replace(options, preview_focus=intent.preview_label(changes),
                                  request={"mask": mask, "tumor_edits": [c.to_dict() for c in changes]})
    generate(edited, out, options=options)


def figure(rows, path: Path) -> None:
    from PIL import Image, ImageDraw

    height, text_width, mask_size = 200, 260, 200
    previews = [render_preview(ct, labels, spacing, height=height, focus=info["focus"])
                for ct, labels, spacing, info in rows]
    width = text_width + mask_size + 8 + max(p.width for p in previews)
    row_height = max(mask_size, *(p.height for p in previews)) + 12
    canvas = Image.new("RGB", (width, len(rows) * row_height + 20))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), "request", fill=(255, 255, 255))
    draw.text((text_width, 4), "selected / edited mask (axial)", fill=(255, 255, 255))
    draw.text((text_width + mask_size + 8, 4), "generated CT (bundled model)", fill=(255, 255, 255))
    for r, ((ct, labels, spacing, info), preview) in enumerate(zip(rows, previews)):
        top = 20 + r * row_height
        request = info.get("request", {})
        selected = request.get("selected", {}).get("file") or request.get("mask", "")
        lines = [REQUESTS[r][0], f"mask: {selected}"]
        lines += [f"{e['action']} {e['label']}: {e['volume_ml']:.1f} mL" for e in _edits(request)]
        lines.append(f"QC {'passed' if info['quality']['passed'] else 'failed'}")
        for k, line in enumerate(lines):
            draw.text((4, top + 14 * k), line[:40], fill=(255, 255, 255))
        z = preview_centre(labels, info["focus"])[0][2]
        axial = colour_labels(labels[::-1, ::-1, z].T)
        canvas.paste(Image.fromarray(np.ascontiguousarray(axial)).resize((mask_size, mask_size), Image.NEAREST),
                     (text_width, top))
        canvas.paste(preview, (text_width + mask_size + 8, top))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("docs/img/masks_from_intent.png"))
    ap.add_argument("--work", type=Path, required=True, help="folder for the generated volumes (reused on a rerun)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    args.work.mkdir(parents=True, exist_ok=True)
    rows = [run_request(args.work, i, request) for i, request in enumerate(REQUESTS)]
    figure(rows, args.out)
    for (caption, *_), (_, _, _, info) in zip(REQUESTS, rows):
        print(f"{caption}: QC {'passed' if info['quality']['passed'] else 'failed ' + str(info['quality']['failed'])}, "
              f"{info['timings_s']['total']:.1f} s")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
