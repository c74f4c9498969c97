"""What a model's ControlNet was trained on, read from its training datalist (not from its outputs).

Reads every labelled volume of the datalist the recipe trained the ControlNet on and prints, as
JSON: the voxel spacings (min and max per axis), the MAISI label ids present (what the ControlNet
saw), and the ids a TotalSegmentator import can give (`maisi2 labels import-totalseg`, either class
numbering) that it never saw. The fields of view come from the latent cache at export time
(`maisi2.export.trained_fov_mm`) and are already in model.json.

    python recipes/bundled_domain.py work/b2/all.jsonl      # the datalist of recipes/bundled_model.sh

A volume listed several times (the recipe repeats the real map to weight it) counts once.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from maisi2.data import read_datalist
from maisi2.labels import label_id, label_name
from maisi2.totalseg import CLASS_MAPS, maisi_name
from maisi2.volume_io import load_label_map


def importable_ids() -> set[int]:
    ids = set()
    for classes in CLASS_MAPS.values():
        for name in classes.values():
            try:
                ids.add(label_id(maisi_name(name)))
            except KeyError:  # a TotalSegmentator class without a MAISI label: not imported
                pass
    return ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datalist", type=Path)
    args = parser.parse_args()
    seen: set[int] = set()
    by_source: dict[str, set[int]] = {}
    spacings = []
    for item in {item.label: item for item in read_datalist(args.datalist) if item.label}.values():
        volume = load_label_map(item.label)
        ids = set(np.unique(volume.array).tolist())
        seen |= ids
        by_source.setdefault(item.source or "unknown", set()).update(ids)
        spacings.append(volume.spacing)
    seen.discard(0)  # background
    spacings = np.array(spacings)
    unseen = sorted(importable_ids() - seen)
    print(json.dumps({
        "labelled_volumes": len(spacings),
        "spacing_mm": {"min": spacings.min(0).tolist(), "max": spacings.max(0).tolist()},
        "labels_seen": sorted(seen),
        "labels_by_source": {source: sorted(ids - {0}) for source, ids in by_source.items()},
        "totalseg_importable": len(importable_ids()),
        "totalseg_unseen": {i: label_name(i) for i in unseen},
    }))


if __name__ == "__main__":
    main()
