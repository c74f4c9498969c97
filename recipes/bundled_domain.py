"""What the bundled model was trained on, derived from its recipe's data (not from its outputs).

Rebuilds step 1 of `recipes/bundled_model.sh` (the same 90 phantoms from seed 1000 on the same
three grids, and the imported real TotalSegmentator map) in a scratch folder, then prints:
the voxel spacings of the labelled training volumes, the MAISI label ids present in them (what the
ControlNet saw), for the real map the ids it holds that no phantom has, and the ids a
TotalSegmentator import can give (`maisi2 labels import-totalseg`, either class numbering) that
the model never saw. The fields of view
come from the latent cache at export time (`maisi2.export.trained_fov_mm`), already in model.json.

    python recipes/bundled_domain.py --scratch /tmp/domain [--shared ../shared/data/totalsegmentator]

Takes ~2-4 min of one core (90 phantoms at up to 128 x 128 x 96).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from maisi2.io import load_label_map
from maisi2.labels import label_id, label_name
from maisi2.totalseg import CLASS_MAPS, maisi_name
from maisi2.phantom import write_phantom_set
from maisi2.label_import import import_totalseg

GRIDS = [((128, 128, 96), (3.0, 3.0, 3.0)), ((96, 96, 64), (4.0, 4.0, 4.0)), ((128, 128, 64), (3.0, 3.0, 4.5))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scratch", required=True, type=Path)
    parser.add_argument("--shared", type=Path, default=Path("../shared/data/totalsegmentator"))
    args = parser.parse_args()
    datalist = args.scratch / "phantoms" / "datalist.jsonl"
    if not datalist.exists():
        write_phantom_set(args.scratch / "phantoms", 90, GRIDS, seed=1000, progress=False)
    real_label = args.scratch / "real" / "example_label.nii.gz"
    if not real_label.exists():
        import_totalseg(args.shared / "example_seg.nii.gz", real_label, ct_path=args.shared / "example_ct_sm.nii.gz")
    phantom_ids: set[int] = set()
    spacings = []
    for line in datalist.read_text().splitlines():
        row = json.loads(line)
        volume = load_label_map(datalist.parent / row["label"] if not Path(row["label"]).is_absolute() else row["label"])
        phantom_ids |= set(np.unique(volume.array).tolist())
        spacings.append(volume.spacing)
    real = load_label_map(real_label)
    real_ids = set(np.unique(real.array).tolist())
    spacings.append(real.spacing)
    spacings = np.array(spacings)
    seen = phantom_ids | real_ids
    importable = set()
    for classes in CLASS_MAPS.values():
        for name in classes.values():
            try:
                importable.add(label_id(maisi_name(name)))
            except KeyError:  # a TotalSegmentator class without a MAISI label: not imported
                pass
    unseen = sorted(importable - seen)
    print(json.dumps({
        "spacing_mm": {"min": spacings.min(0).tolist(), "max": spacings.max(0).tolist()},
        "labels_seen": sorted(phantom_ids | real_ids),
        "only_in_the_real_map": sorted(real_ids - phantom_ids),
        "phantom_labels": sorted(phantom_ids),
        "totalseg_importable": len(importable),
        "totalseg_unseen": {i: label_name(i) for i in unseen},
    }))


if __name__ == "__main__":
    main()
