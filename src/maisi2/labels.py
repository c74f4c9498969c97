"""The one label table: MAISI names and ids, organ groups, and the tumour -> parent-organ map.

Every other module names labels through this table (``label_id("liver")``), never by number.
The ids are those of the released MAISI label dictionary (packaged as resources/label_dict.json):
1..132 for anatomy and lesions ("dummy" ids are unused slots and count as unknown), 200 for the
body envelope, 0 for background.
"""

from __future__ import annotations

import difflib
import json
from functools import lru_cache
from importlib import resources

import numpy as np
from scipy import ndimage

from maisi2.errors import InvalidInput, UnknownName

__all__ = [
    "LABELS",
    "ID_TO_NAME",
    "BACKGROUND",
    "BODY",
    "label_id",
    "label_name",
    "VALID_IDS",
    "check_label_ids",
    "TUMOR_PARENT",
    "RING_MAJORITY_CANDIDATES",
    "TUMOR_IDS",
    "TUMOR_KINDS",
    "tumor_kind",
    "tumor_parent_ids",
    "LUNG_IDS",
    "BONE_IDS",
    "QC_ORGAN_GROUPS",
    "remove_tumors",
    "substitute_unseen",
    "load_resource_json",
    "MASK_GENERATOR_CHANNEL_IDS",
    "KIDNEY_MASS",
    "KIDNEY_IDS",
    "channels_to_ids",
    "ids_to_channels",
]


def load_resource_json(name: str):
    """Read one of the JSON files packaged under maisi2/resources."""
    return json.loads(resources.files("maisi2").joinpath("resources", name).read_text())


LABELS: dict[str, int] = {k: int(v) for k, v in load_resource_json("label_dict.json").items() if not k.startswith("dummy")}
ID_TO_NAME: dict[int, str] = {v: k for k, v in LABELS.items()}
BACKGROUND = 0
BODY = LABELS["body"]
VALID_IDS: frozenset[int] = frozenset({BACKGROUND, *LABELS.values()})


def label_id(name: str) -> int:
    """MAISI id of a label name (as spelled in the label dictionary)."""
    try:
        return LABELS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(LABELS), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise UnknownName(f"unknown MAISI label name {name!r}{hint}") from None


def label_name(idx: int) -> str:
    if idx == BACKGROUND:
        return "background"
    try:
        return ID_TO_NAME[int(idx)]
    except KeyError:
        raise UnknownName(f"unknown MAISI label id {idx}") from None


def _ids(*names: str) -> tuple[int, ...]:
    return tuple(label_id(n) for n in names)


LUNG_IDS = _ids(
    "left lung upper lobe", "left lung lower lobe", "right lung upper lobe",
    "right lung middle lobe", "right lung lower lobe",
)
_VERTEBRAE = tuple(v for k, v in LABELS.items() if k.startswith("vertebrae"))
_RIBS = tuple(v for k, v in LABELS.items() if " rib " in f" {k} ")
BONE_IDS = tuple(sorted({
    *_VERTEBRAE, *_RIBS,
    *_ids("left humerus", "right humerus", "left scapula", "right scapula", "left clavicula",
          "right clavicula", "left femur", "right femur", "left hip", "right hip", "sacrum",
          "skull", "sternum"),
}))

# Tumours (and kidney cysts) replaced by a fixed parent organ in the perturbed mask.
TUMOR_PARENT: dict[int, int] = {
    label_id("hepatic tumor"): label_id("liver"),
    label_id("pancreatic tumor"): label_id("pancreas"),
    label_id("colon cancer primaries"): label_id("colon"),
    label_id("left kidney cyst"): label_id("left kidney"),
    label_id("right kidney cyst"): label_id("right kidney"),
}
# Lesions whose parent is the most common candidate label in a thin ring around each lesion.
RING_MAJORITY_CANDIDATES: dict[int, tuple[int, ...]] = {
    label_id("lung tumor"): LUNG_IDS,
    label_id("bone lesion"): BONE_IDS,
}
TUMOR_IDS: tuple[int, ...] = tuple(sorted({*TUMOR_PARENT, *RING_MAJORITY_CANDIDATES}))

# Tumour kinds as users name them -> the MAISI tumour labels of that kind (the phantom draws one
# per lesion; mask editing picks the one whose parent organ holds the tumour).
TUMOR_KINDS: dict[str, tuple[str, ...]] = {
    "hepatic": ("hepatic tumor",),
    "pancreatic": ("pancreatic tumor",),
    "lung": ("lung tumor",),
    "colon": ("colon cancer primaries",),
    "bone": ("bone lesion",),
    "kidney-cyst": ("left kidney cyst", "right kidney cyst"),
}


def tumor_kind(name: str) -> str:
    """The kind (a key of TUMOR_KINDS) for a kind or a MAISI tumour label name, e.g. "hepatic tumor"."""
    text = str(name).strip().lower().replace("_", "-")
    if text in TUMOR_KINDS:
        return text
    spaced = text.replace("-", " ")
    for kind, names in TUMOR_KINDS.items():
        if spaced in names or spaced == kind.replace("-", " "):
            return kind
    choices = [*TUMOR_KINDS, *(n for names in TUMOR_KINDS.values() for n in names)]
    close = difflib.get_close_matches(text, choices, n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
    raise InvalidInput(f"unknown tumour kind {name!r}{hint}; kinds: {', '.join(TUMOR_KINDS)}")


def tumor_parent_ids(tumor: int) -> tuple[int, ...]:
    """The labels a tumour of id `tumor` lives in: its fixed parent organ, or the lung lobes / bones."""
    if tumor in TUMOR_PARENT:
        return (TUMOR_PARENT[tumor],)
    return RING_MAJORITY_CANDIDATES[tumor]

# Organ groups whose median HU the quality check tests (names match image_median_statistics_ct.json).
QC_ORGAN_GROUPS: dict[str, tuple[int, ...]] = {
    "liver": _ids("liver"),
    "spleen": _ids("spleen"),
    "pancreas": _ids("pancreas"),
    "kidney": _ids("left kidney", "right kidney"),
    "lung": LUNG_IDS,
    "bone": BONE_IDS,
    "brain": _ids("brain"),
}


def check_label_ids(labels: np.ndarray, what: str = "label map") -> None:
    """Raise a ValueError naming the offending ids if `labels` holds ids outside the MAISI table."""
    present = np.unique(labels)
    unknown = sorted(int(v) for v in present if int(v) not in VALID_IDS)
    if unknown:
        shown = ", ".join(map(str, unknown[:10])) + (" ..." if len(unknown) > 10 else "")
        raise InvalidInput(
            f"{what} holds label ids that are not MAISI ids: {shown}. MAISI ids are 0, 1..132 "
            "(without the unused 'dummy' slots) and 200 for the body; convert the map first "
            "(e.g. `maisi2 labels import-totalseg` for TotalSegmentator output)."
        )


@lru_cache(maxsize=8)
def _ball(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    zz, yy, xx = np.meshgrid(r, r, r, indexing="ij")
    return (zz**2 + yy**2 + xx**2) <= radius**2


def remove_tumors(labels: np.ndarray, ring_radius: int = 2, max_ring_radius: int = 8,
                  only: tuple[int, ...] | None = None) -> np.ndarray:
    """The perturbed mask of the contrastive loss: every tumour replaced by its parent organ.

    Fixed-parent tumours take their organ's id. Lung tumours and bone lesions take, per connected
    component, the most common candidate label (lung lobes / bones) in a ring of `ring_radius`
    voxels around the component; the ring widens (up to `max_ring_radius`) when it holds no
    candidate, then falls back to the most common candidate anywhere, then to the body label.

    labels: integer array (any number of dims); returns a new array, input untouched.
    only: the tumour ids to replace (default: every tumour id).
    """
    out = labels.copy()
    for tumor, parent in TUMOR_PARENT.items():
        if only is None or tumor in only:
            out[labels == tumor] = parent
    for tumor, candidates in RING_MAJORITY_CANDIDATES.items():
        if only is None or tumor in only:
            _ring_majority_fill(out, labels, tumor, candidates, ring_radius, max_ring_radius)
    return out


def _ring_majority_fill(out, labels, lesion_id, candidates, ring_radius, max_ring_radius) -> None:
    """Each connected component of `lesion_id` in `labels` -> the ring-majority candidate, in `out`."""
    lesion = labels == lesion_id
    if not lesion.any():
        return
    components, _ = ndimage.label(lesion)
    fallback = []  # the most common candidate anywhere, computed once if a ring finds none
    for idx, box in enumerate(ndimage.find_objects(components), start=1):
        parent = _ring_majority(labels, components, idx, box, candidates, ring_radius, max_ring_radius, fallback)
        out[box][components[box] == idx] = parent


def _ring_majority(labels, components, idx, box, candidates, radius, max_radius, fallback) -> int:
    """Most common candidate label in a ring around component `idx` of `components` (found in
    `box`); widening rings, then the most common candidate anywhere (cached in `fallback`), then body."""
    cand = np.asarray(candidates)
    while radius <= max_radius:
        # Work inside the component's bounding box grown by the ring radius: cheap on big volumes.
        sl = tuple(slice(max(s.start - radius, 0), s.stop + radius) for s in box)
        local = components[sl] == idx
        struct = _ball(radius) if local.ndim == 3 else ndimage.generate_binary_structure(local.ndim, 1)
        iterations = 1 if local.ndim == 3 else radius
        ring = ndimage.binary_dilation(local, structure=struct, iterations=iterations) & ~local
        values = labels[sl][ring]
        values = values[np.isin(values, cand)]
        if values.size:
            ids, counts = np.unique(values, return_counts=True)
            return int(ids[np.argmax(counts)])
        radius *= 2
    if not fallback:
        anywhere = labels[np.isin(labels, cand)]
        if anywhere.size:
            ids, counts = np.unique(anywhere, return_counts=True)
            fallback.append(int(ids[np.argmax(counts)]))
        else:
            fallback.append(BODY)
    return fallback[0]


# -- the release's mask generator numbering -------------------------------------------------
# Its networks output 125 classes. resources/label_dict_124_to_132.json (from the release) gives
# name -> [channel, MAISI id]; the two numberings agree only for background (0) and liver (1),
# and channel 124 is the body (200). Channel 122, "kidney mass", is MAISI id 129, a slot the label
# dictionary leaves unused: generated kidney masses go to their kidney (`KIDNEY_IDS`). The
# kidney cysts (116, 117) have no channel; a mask holding them is encoded with their kidneys.

KIDNEY_MASS = 129
KIDNEY_IDS = _ids("left kidney", "right kidney")


def _channel_table() -> tuple[int, ...]:
    table = load_resource_json("label_dict_124_to_132.json")
    ids = [0] * len(table)
    for channel, maisi_id in table.values():
        ids[int(channel)] = int(maisi_id)
    return tuple(ids)


MASK_GENERATOR_CHANNEL_IDS: tuple[int, ...] = _channel_table()


def channels_to_ids(channels: np.ndarray) -> np.ndarray:
    """Mask-generator class indices (0..124) -> MAISI ids (int16), through the release's table."""
    lookup = np.asarray(MASK_GENERATOR_CHANNEL_IDS, dtype=np.int16)
    channels = np.asarray(channels)
    if channels.size and (channels.min() < 0 or channels.max() >= len(lookup)):
        raise InvalidInput(f"mask-generator classes must lie in 0..{len(lookup) - 1}")
    return lookup[channels]


def ids_to_channels(labels: np.ndarray) -> np.ndarray:
    """MAISI ids -> mask-generator class indices (int64); kidney cysts count as their kidney."""
    labels = np.asarray(labels)
    check_label_ids(labels)
    lookup = np.zeros(256, dtype=np.int64)
    for channel, maisi_id in enumerate(MASK_GENERATOR_CHANNEL_IDS):
        lookup[maisi_id] = channel
    for cyst in (label_id("left kidney cyst"), label_id("right kidney cyst")):
        lookup[cyst] = lookup[TUMOR_PARENT[cyst]]
    return lookup[labels.astype(np.int64)]


# Families of look-alike tissue by name, for replacing a label a model never saw (air, vessels, muscle).
_FAMILY_WORDS = {"airway": ("lung", "trachea"), "artery": ("artery", "aorta", "trunk"), "vein": ("vein", "vena"),
                 "muscle": ("gluteus", "iliopsoas", "autochthon"), "heart": ("heart", "atrial")}


def _name_family(label: int) -> tuple[int, ...]:
    name = ID_TO_NAME.get(label, "")
    for words in _FAMILY_WORDS.values():
        if any(w in name for w in words):
            return tuple(i for i, n in ID_TO_NAME.items() if any(w in n for w in words) and i not in TUMOR_IDS)
    return ()


def _substitute_for(label: int, seen: frozenset[int]) -> int:
    """The nearest label in `seen` for an unseen one: a tumour's organ; a bone of the same family
    (vertebra, rib) or any bone; a seen airway or lung lobe for air, a vessel for a vessel, a muscle
    for a muscle; else the body envelope (soft tissue)."""
    parent = TUMOR_PARENT.get(label)
    if parent in seen:
        return parent
    if label in BONE_IDS or label == label_id("bone lesion"):
        families = [f for f in (_VERTEBRAE, _RIBS) if label in f] + [BONE_IDS]
    elif label == label_id("lung tumor"):
        families = [LUNG_IDS]
    else:
        families = [_name_family(label)]
    for family in families:
        known = [i for i in family if i in seen]
        if known:
            return min(known, key=lambda i: abs(i - label))
    return BODY


def substitute_unseen(labels: np.ndarray, seen) -> tuple[np.ndarray, dict[int, int]]:
    """`labels` with every id not in `seen` (background aside) replaced by its nearest seen label
    (`_substitute_for`); returns the new array and {replaced id: substitute}."""
    seen = frozenset(int(i) for i in seen)
    present = [int(i) for i in np.unique(labels) if int(i) != BACKGROUND and int(i) not in seen]
    if not present:
        return labels, {}
    table = np.arange(max(int(labels.max()), BODY) + 1, dtype=labels.dtype)
    replaced = {i: _substitute_for(i, seen) for i in present}
    for old, new in replaced.items():
        table[old] = new
    return table[labels], replaced
