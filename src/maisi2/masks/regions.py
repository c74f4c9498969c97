"""Body regions from the labels a mask holds: head, chest, abdomen, pelvis.

A region counts as covered when at least half of its marker groups are present, each with at
least `MIN_MARKER_ML` of tissue (a sliver of lung at the top of an abdominal scan does not make it
a chest scan). Markers are vertebrae of the region's spine segment and organs that sit in it:

| region  | markers (a group counts when any of its labels is present, vertebrae: at least 2) |
| head    | brain, skull, C1-C3 |
| chest   | lungs, heart, trachea, T1-T8 |
| abdomen | liver, spleen, kidneys, pancreas, stomach, T12-L3 |
| pelvis  | bladder, hips, sacrum, femurs, L5-S1 |

`covered_regions` returns the regions and, for each, the markers found (what `maisi2 masks index`
stores and what selection quotes when it refuses a mask).
"""

from __future__ import annotations

import difflib

from maisi2 import labels as L
from maisi2.errors import InvalidInput

__all__ = ["REGIONS", "REGION_ALIASES", "MIN_MARKER_ML", "region_name", "covered_regions"]

MIN_MARKER_ML = 5.0


def _names(prefix: str) -> tuple[str, ...]:
    return tuple(n for n in L.LABELS if n.startswith(prefix))


def _vertebrae(*levels: str) -> tuple[str, ...]:
    return tuple(f"vertebrae {v}" for v in levels if f"vertebrae {v}" in L.LABELS)


# region -> marker group -> (label names, how many of them must be present)
REGIONS: dict[str, dict[str, tuple[tuple[str, ...], int]]] = {
    "head": {"brain": (("brain",), 1), "skull": (("skull",), 1),
             "upper cervical spine": (_vertebrae("C1", "C2", "C3"), 2)},
    "chest": {"lungs": (tuple(L.label_name(i) for i in L.LUNG_IDS), 1), "heart": (("heart",), 1),
              "trachea": (("trachea",), 1),
              "thoracic spine": (_vertebrae(*(f"T{i}" for i in range(1, 9))), 2)},
    "abdomen": {"liver": (("liver",), 1), "spleen": (("spleen",), 1),
                "kidneys": (("left kidney", "right kidney"), 1), "pancreas": (("pancreas",), 1),
                "stomach": (("stomach",), 1),
                "thoracolumbar spine": (_vertebrae("T12", "L1", "L2", "L3"), 2)},
    "pelvis": {"bladder": (("bladder",), 1), "hips": (("left hip", "right hip"), 1), "sacrum": (("sacrum",), 1),
               "femurs": (("left femur", "right femur"), 1), "lumbosacral spine": (_vertebrae("L5", "S1"), 2)},
}
REGION_ALIASES = {"thorax": "chest", "lung": "chest", "abdominal": "abdomen", "brain": "head", "pelvic": "pelvis"}


def region_name(text: str) -> str:
    """A region name (or alias) -> one of REGIONS; ValueError suggesting the closest names."""
    key = str(text).strip().lower()
    key = REGION_ALIASES.get(key, key)
    if key in REGIONS:
        return key
    close = difflib.get_close_matches(key, [*REGIONS, *REGION_ALIASES], n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
    raise InvalidInput(f"unknown body region {text!r}{hint}; regions: {', '.join(REGIONS)}")


def covered_regions(volumes_ml: dict[str, float]) -> dict[str, list[str]]:
    """{region: markers found} for each region covered, given {label name: volume in mL}."""
    found = {}
    for region, groups in REGIONS.items():
        markers = [group for group, (names, need) in groups.items()
                   if sum(volumes_ml.get(n, 0.0) >= MIN_MARKER_ML for n in names) >= need]
        if 2 * len(markers) >= len(groups):
            found[region] = markers
    return found
