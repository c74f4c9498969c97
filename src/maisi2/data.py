"""Datalists (which scans to train on), the CT dataset, and size-bucketed / source-weighted sampling.

Intensity convention (the one place it is defined): CT is clipped to [-1000, 1000] HU and scaled
linearly to [0, 1] for the VAE (`hu_to_unit`); generated volumes come back through `unit_to_hu`.

Datalist formats: JSON lines (``.jsonl``, one object per line), CSV (``.csv``, header row), or a
decathlon-style JSON file (``.json``: ``{"training": [{"image": ..., "label": ...}, ...],
"validation": [...], "test": [...]}``, as the Medical Segmentation Decathlon, MONAI and the MAISI
release write them; the ``training`` list unless another key is asked for, paths relative to a data
root that defaults to the file's folder, joined exactly as MONAI's ``load_decathlon_datalist`` joins
them; other keys of an entry, such as the MAISI release's ``dim``, are not used). The fields

=========  ===================================================================================
image      CT path (NIfTI file or DICOM folder), relative to the datalist's folder. Required.
label      MAISI label map path (NIfTI), same grid as the image. Optional.
spacing    voxel size in mm, x,y,z: ``"1.5,1.5,2"`` in CSV, ``[1.5, 1.5, 2]`` in JSONL. Optional;
           when given it replaces the spacing in the image header (for scans whose header is
           wrong), else the header's spacing is used.
modality   name from modality_mapping.json (default ``ct``).
source     free string naming where the scan comes from, for balanced sampling (default ``default``).
fold       integer cross-validation fold (default 0).
=========  ===================================================================================

Arrays are RAS-canonical with axes (x, y, z), as `maisi2.volume_io` loads them.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import nibabel as nib
import numpy as np
import torch
from nibabel.orientations import io_orientation

from maisi2 import volume_io
from maisi2.atomic import atomic_output
from maisi2.errors import InvalidInput, MissingInput
from maisi2.labels import load_resource_json

__all__ = [
    "HU_MIN",
    "HU_MAX",
    "hu_to_unit",
    "unit_to_hu",
    "MODALITIES",
    "DataItem",
    "DatalistSource",
    "read_datalist",
    "decathlon_rows",
    "write_datalist",
    "center_pad_or_crop",
    "CTDataset",
    "collate_samples",
    "scan_shape",
    "bucket_by_size",
    "shape_per_item",
    "BucketBatchSampler",
    "weighted_source_sampler",
]

HU_MIN, HU_MAX = -1000.0, 1000.0
MODALITIES: dict[str, int] = {k: int(v) for k, v in load_resource_json("modality_mapping.json").items()}
FIELDS = ("image", "label", "spacing", "modality", "source", "fold")


# -- intensity convention ------------------------------------------------------------------

def hu_to_unit(hu):
    """HU -> [0, 1]: clip to [HU_MIN, HU_MAX], then scale linearly. numpy arrays or torch tensors."""
    if isinstance(hu, torch.Tensor):
        return (hu.clamp(HU_MIN, HU_MAX) - HU_MIN) / (HU_MAX - HU_MIN)
    return (np.clip(hu, HU_MIN, HU_MAX) - HU_MIN) / (HU_MAX - HU_MIN)


def unit_to_hu(x):
    """[0, 1] -> HU, clipping first: decoded volumes overshoot [0, 1] a little."""
    if isinstance(x, torch.Tensor):
        return x.clamp(0.0, 1.0) * (HU_MAX - HU_MIN) + HU_MIN
    return np.clip(x, 0.0, 1.0) * (HU_MAX - HU_MIN) + HU_MIN


# -- datalists -----------------------------------------------------------------------------

@dataclass(frozen=True)
class DataItem:
    """One scan of a datalist; paths are absolute."""

    image: Path
    label: Path | None = None
    spacing: tuple[float, float, float] | None = None
    modality: str = "ct"
    source: str = "default"
    fold: int = 0

    def __post_init__(self):
        # Items built in code get the same normal form as read ones (Path objects, float tuples).
        object.__setattr__(self, "image", Path(self.image))
        if self.label is not None:
            object.__setattr__(self, "label", Path(self.label))
        if self.spacing is not None:
            object.__setattr__(self, "spacing", tuple(float(v) for v in self.spacing))
        if self.modality not in MODALITIES:
            raise InvalidInput(f"unknown modality {self.modality!r}; valid: {', '.join(MODALITIES)}")

    @property
    def modality_id(self) -> int:
        return MODALITIES[self.modality]


@dataclass(frozen=True)
class DatalistSource:
    """A datalist file and, for a decathlon-style .json, which list to read and the folder its paths
    are relative to (None: the file's folder)."""

    path: Path
    key: str | None = None  # .json only; None means "training"
    data_root: Path | None = None

    @classmethod
    def of(cls, source: "str | os.PathLike | DatalistSource") -> "DatalistSource":
        return source if isinstance(source, DatalistSource) else cls(Path(source).expanduser())

    def root(self) -> Path:
        """The folder relative paths start from (checked to exist)."""
        if self.data_root is None:
            return Path(self.path).parent
        root = Path(self.data_root).expanduser()
        if not root.is_dir():
            raise MissingInput(f"data root {root} is not an existing folder")
        return root


def read_datalist(source: str | os.PathLike | DatalistSource) -> list[DataItem]:
    """Read a .jsonl, .csv or decathlon-style .json datalist; a bad row raises an error naming where it is."""
    source = DatalistSource.of(source)
    path = Path(source.path)
    if not path.is_file():
        raise MissingInput(f"datalist {path} does not exist")
    fmt = _format(path)
    root = source.root()
    if fmt == "json":
        rows = decathlon_rows(source)
        items = [_parse_row({k: v for k, v in raw.items() if k in FIELDS}, root, where) for where, raw in rows]
    else:
        if source.key is not None:
            raise InvalidInput(f"datalist {path}: a list key ({source.key!r}) applies to decathlon-style .json datalists only")
        text = path.read_text()
        rows = _jsonl_rows(path, text) if fmt == "jsonl" else _csv_rows(path, text)
        items = [_parse_row(raw, root, f"{path}, line {line}") for line, raw in rows]
    if not items:
        raise InvalidInput(f"datalist {path} holds no rows")
    return items


def decathlon_rows(source: str | os.PathLike | DatalistSource) -> list[tuple[str, dict]]:
    """(where, entry) for each entry of one list of a decathlon-style .json datalist, paths joined to
    the data root by MONAI's ``load_decathlon_datalist`` (image and label always, other keys when
    the joined path exists; a bare path in a "test" list becomes {"image": path})."""
    from monai.data import load_decathlon_datalist

    source = DatalistSource.of(source)
    path, key = Path(source.path), source.key or "training"
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InvalidInput(f"datalist {path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    lists = [k for k, v in content.items() if isinstance(v, list)] if isinstance(content, dict) else []
    if key not in lists:
        raise InvalidInput(f"datalist {path} has no {key!r} list (lists: {', '.join(lists) or 'none'}); "
                         "a decathlon-style datalist is {\"training\": [{\"image\": ..., \"label\": ...}]}; "
                         "choose the list with --datalist-key")
    if any(not isinstance(e, (dict, str)) for e in content[key]):
        raise InvalidInput(f"datalist {path}: each entry of {key!r} must be an object like {{\"image\": ...}} or a path")
    entries = load_decathlon_datalist(path, is_segmentation=True, data_list_key=key, base_dir=source.root())
    return [(f"{path}, {key}[{i}]", entry) for i, entry in enumerate(entries)]


def _format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv", ".json"):
        raise InvalidInput(f"datalist {path}: unknown format {suffix!r}; name it *.jsonl (JSON lines), *.csv, "
                         "or *.json (decathlon style)")
    return suffix[1:]


def _jsonl_rows(path: Path, text: str) -> Iterator[tuple[int, dict]]:
    for line, content in enumerate(text.splitlines(), start=1):
        if not content.strip():
            continue
        try:
            raw = json.loads(content)
        except json.JSONDecodeError as err:
            raise InvalidInput(f"{path}, line {line}: not valid JSON ({err.msg}); each line holds one object") from None
        if not isinstance(raw, dict):
            raise InvalidInput(f"{path}, line {line}: expected a JSON object like {{\"image\": ...}}, got {type(raw).__name__}")
        yield line, raw


def _csv_rows(path: Path, text: str) -> Iterator[tuple[int, dict]]:
    reader = csv.DictReader(io.StringIO(text))
    header = reader.fieldnames or []
    unknown = [c for c in header if c not in FIELDS]
    if unknown:
        raise InvalidInput(f"{path}, line 1: unknown column(s) {', '.join(map(repr, unknown))}; valid: {', '.join(FIELDS)}")
    for row in reader:
        if None in row:  # DictReader files surplus cells under the key None
            raise InvalidInput(f"{path}, line {reader.line_num}: more cells than columns (quote spacing as \"sx,sy,sz\")")
        # Empty cells mean "not given", so defaults apply as in JSONL.
        yield reader.line_num, {k: v for k, v in row.items() if v not in (None, "")}


def _parse_row(raw: Mapping, root: Path, where: str) -> DataItem:
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise InvalidInput(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; valid: {', '.join(FIELDS)}")
    if not raw.get("image"):
        raise InvalidInput(f"{where}: missing 'image' (the CT path)")
    modality = raw.get("modality", "ct")
    if modality not in MODALITIES:
        raise InvalidInput(f"{where}: unknown modality {modality!r}; valid: {', '.join(MODALITIES)}")
    return DataItem(
        image=_existing(raw["image"], root, where),
        label=_existing(raw["label"], root, where) if raw.get("label") else None,
        spacing=_parse_spacing(raw.get("spacing"), where),
        modality=modality,
        source=str(raw.get("source", "default")),
        fold=_parse_fold(raw.get("fold", 0), where),
    )


def _existing(value, root: Path, where: str) -> Path:
    if not isinstance(value, str):
        raise InvalidInput(f"{where}: paths must be strings, got {value!r}")
    # abspath, not resolve: keeps symlinked data folders as the user named them.
    path = Path(os.path.abspath(root / Path(value).expanduser()))
    if not path.exists():
        raise MissingInput(f"{where}: {path} does not exist (relative paths start at the datalist's folder)")
    return path


def _parse_spacing(value, where: str) -> tuple[float, float, float] | None:
    if value is None:
        return None
    parts = value.replace(" ", "").split(",") if isinstance(value, str) else value
    try:
        spacing = tuple(float(v) for v in parts)
    except (TypeError, ValueError):
        spacing = ()
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise InvalidInput(f"{where}: spacing must be three positive numbers in mm (\"sx,sy,sz\" or [sx, sy, sz]), got {value!r}")
    return spacing


def _parse_fold(value, where: str) -> int:
    try:
        fold = int(value)
    except (TypeError, ValueError):
        fold = None
    if isinstance(value, bool) or fold is None or str(fold) != str(value).strip():
        raise InvalidInput(f"{where}: fold must be an integer, got {value!r}")
    return fold


def write_datalist(path: str | os.PathLike, items: Sequence[DataItem], overwrite: bool = False) -> Path:
    """Write items as .jsonl, .csv or decathlon-style .json ({"training": [...]}) by suffix,
    atomically; paths relative to the file's folder."""
    path = Path(path)
    fmt = _format(path)
    rows = [_row_for(item, Path(os.path.abspath(path.parent))) for item in items]
    with atomic_output(path, overwrite) as tmp:
        with open(tmp, "w", newline="") as f:
            if fmt == "jsonl":
                f.writelines(json.dumps(row) + "\n" for row in rows)
            elif fmt == "json":
                json.dump({"training": rows}, f, indent=1)
            else:
                writer = csv.DictWriter(f, fieldnames=FIELDS)
                writer.writeheader()
                for row in rows:
                    spacing = row.get("spacing")
                    writer.writerow({**row, "spacing": ",".join(map(repr, spacing)) if spacing else ""})
    return path


def _row_for(item: DataItem, root: Path) -> dict:
    row = {"image": _relative(item.image, root)}
    if item.label is not None:
        row["label"] = _relative(item.label, root)
    if item.spacing is not None:
        row["spacing"] = [float(s) for s in item.spacing]
    row.update(modality=item.modality, source=item.source, fold=int(item.fold))
    return row


def _relative(path: Path, root: Path) -> str:
    try:
        return Path(os.path.relpath(os.path.abspath(path), root)).as_posix()
    except ValueError:  # another drive on Windows: no relative path exists
        return Path(os.path.abspath(path)).as_posix()


# -- dataset -------------------------------------------------------------------------------

Shape3 = tuple[int, int, int]


def center_pad_or_crop(array: np.ndarray, shape: Sequence[int], fill: float) -> np.ndarray:
    """Pad (with `fill`) or crop each axis around the centre to `shape`."""
    out = np.full(tuple(shape), fill, dtype=array.dtype)
    src, dst = [], []
    for have, want in zip(array.shape, shape):
        # The same split for padding and cropping: the extra voxel goes to the far end.
        offset = abs(want - have) // 2
        n = min(have, want)
        src.append(slice(offset, offset + n) if have > want else slice(0, n))
        dst.append(slice(offset, offset + n) if want > have else slice(0, n))
    out[tuple(dst)] = array[tuple(src)]
    return out


def _round_up(shape: Sequence[int], divisor: int) -> Shape3:
    return tuple(int(-(-s // divisor) * divisor) for s in shape)


def _with_spacing(volume: volume_io.Volume, spacing) -> volume_io.Volume:
    """The same voxels with another voxel size: axis directions and the first voxel's position kept."""
    affine = volume.affine.copy()
    directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    affine[:3, :3] = directions * np.asarray(spacing, dtype=np.float64)
    return volume_io.Volume(volume.array, affine)


class CTDataset(torch.utils.data.Dataset):
    """CT volumes (and label maps) of a datalist as tensors ready for the VAE / flow model.

    Each sample is a dict:
      image     (1, X, Y, Z) float32 in [0, 1] (`hu_to_unit`)
      label     (1, X, Y, Z) int16 MAISI ids, or None when the item has no label (or load_labels=False)
      spacing   (3,) float32 voxel size in mm after resampling
      modality  int modality id;  source  str

    spacing: resample every scan to this voxel size (mm; linear for CT, nearest for labels).
    shape: pad/crop every scan to this shape, or a mapping item index -> shape (`shape_per_item`
      of size buckets); None pads each scan up to the next multiple of `divisor`.
    divisor: every output size must be a multiple of it (4 for the VAE, 4 * 4 = 16 for the flow
      model's latent grid); a given `shape` that is not is an error.
    CT pads with -1000 HU (air), labels with 0.
    """

    def __init__(self, items: Sequence[DataItem], spacing: Sequence[float] | None = None,
                 shape: Sequence[int] | Mapping[int, Sequence[int]] | None = None, divisor: int = 1,
                 load_labels: bool = True):
        if divisor < 1:
            raise InvalidInput(f"divisor must be a positive integer, got {divisor}")
        self.items = list(items)
        self.spacing = None if spacing is None else tuple(float(s) for s in spacing)
        self.divisor = int(divisor)
        self.load_labels = load_labels
        if isinstance(shape, Mapping):
            self.shape = {int(i): self._check_shape(s) for i, s in shape.items()}
        else:
            self.shape = None if shape is None else self._check_shape(shape)

    def _check_shape(self, shape) -> Shape3:
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3 or any(s < 1 or s % self.divisor for s in shape):
            raise InvalidInput(f"target shape {shape} must be three positive multiples of divisor={self.divisor}")
        return shape

    def __len__(self) -> int:
        return len(self.items)

    def target_shape(self, index: int, current: Sequence[int]) -> Shape3:
        if self.shape is None:
            return _round_up(current, self.divisor)
        if isinstance(self.shape, Mapping):
            if index not in self.shape:
                raise KeyError(f"no target shape for item {index}; the shape mapping must cover every item")
            return self.shape[index]
        return self.shape

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        ct, label = self._load(item)
        if self.spacing is not None:
            ct = volume_io.resample_to_spacing(ct, self.spacing, order=1)
            label = None if label is None else volume_io.resample_to_spacing(label, self.spacing, order=0)
        shape = self.target_shape(index, ct.shape)
        image = hu_to_unit(center_pad_or_crop(ct.array, shape, HU_MIN)).astype(np.float32)
        sample = {
            "image": torch.from_numpy(image)[None],
            "label": None,
            "spacing": torch.tensor(ct.spacing, dtype=torch.float32),
            "modality": item.modality_id,
            "source": item.source,
        }
        if label is not None:
            sample["label"] = torch.from_numpy(center_pad_or_crop(label.array, shape, 0).astype(np.int16))[None]
        return sample

    def _load(self, item: DataItem) -> tuple[volume_io.Volume, volume_io.Volume | None]:
        ct = volume_io.load_ct(item.image)
        label = volume_io.load_label_map(item.label) if item.label is not None and self.load_labels else None
        if label is not None and not (label.shape == ct.shape and np.allclose(label.affine, ct.affine, atol=1e-2)):
            raise InvalidInput(
                f"label map {item.label} (shape {label.shape}) is not on the grid of its image {item.image} "
                f"(shape {ct.shape}) or has another origin/orientation; resample it onto the image grid (nearest neighbour)"
            )
        if item.spacing is not None:
            ct = _with_spacing(ct, item.spacing)
            label = None if label is None else _with_spacing(label, item.spacing)
        return ct, label


def collate_samples(samples: Sequence[dict]) -> dict:
    """Batch `CTDataset` samples of one shape (use with `BucketBatchSampler`); labels all or none."""
    shapes = {tuple(s["image"].shape) for s in samples}
    if len(shapes) > 1:
        raise InvalidInput(f"cannot batch volumes of different shapes {sorted(shapes)}; bucket them by size first")
    has_label = [s["label"] is not None for s in samples]
    if any(has_label) and not all(has_label):
        raise InvalidInput("some samples of the batch have label maps and some do not")
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "label": torch.stack([s["label"] for s in samples]) if all(has_label) else None,
        "spacing": torch.stack([s["spacing"] for s in samples]),
        "modality": torch.tensor([s["modality"] for s in samples], dtype=torch.long),
        "source": [s["source"] for s in samples],
    }


# -- size buckets and samplers ---------------------------------------------------------------

def scan_shape(item: DataItem, spacing: Sequence[float] | None = None) -> Shape3:
    """RAS-canonical shape of an item's image, after resampling to `spacing` when given.

    NIfTI headers are read without loading voxels; DICOM folders are loaded in full.
    """
    if item.image.is_dir():
        vol = volume_io.load_ct(item.image)
        shape, own_spacing = np.asarray(vol.shape), np.asarray(vol.spacing)
    else:
        header = nib.load(item.image)
        stored_shape = header.shape[:3]
        stored_spacing = np.linalg.norm(header.affine[:3, :3], axis=0)
        axis = io_orientation(header.affine)[:, 0].astype(int)  # stored axis i -> canonical axis[i]
        shape, own_spacing = np.zeros(3, int), np.zeros(3)
        shape[axis], own_spacing[axis] = stored_shape, stored_spacing
    if item.spacing is not None:
        own_spacing = np.asarray(item.spacing, dtype=np.float64)
    if spacing is None:
        return tuple(int(s) for s in shape)
    return tuple(int(s) for s in volume_io.resampled_shape(shape, own_spacing, spacing))


def bucket_by_size(
    items_or_shapes: Sequence[DataItem | Sequence[int]],
    bucket_edges: Sequence[int] | Sequence[Sequence[int]] | None = None,
    num_buckets: int | None = None,
    divisor: int = 1,
    spacing: Sequence[float] | None = None,
) -> dict[Shape3, list[int]]:
    """Group volumes by the shape they will be padded (or cropped) to: one shape per bucket.

    items_or_shapes: `DataItem`s (their shape read from the header, resampled to `spacing` when
      given) or (X, Y, Z) shapes.
    bucket_edges: allowed sizes, one list for every axis or three lists (x, y, z); each size goes
      up to the next edge, and sizes above the largest edge are cropped to it.
    num_buckets: instead of edges, sort the volumes by voxel count and split them into this many
      groups of near-equal count; each group pads to its largest size per axis.
    neither: one bucket per distinct shape.
    All bucket shapes are rounded up to multiples of `divisor`. Returns {bucket shape: [indices]},
    keys sorted; pass the result to `shape_per_item` for `CTDataset` and to `BucketBatchSampler`.
    """
    if bucket_edges is not None and num_buckets is not None:
        raise InvalidInput("give bucket_edges or num_buckets, not both")
    shapes = [scan_shape(s, spacing) if isinstance(s, DataItem) else tuple(int(v) for v in s) for s in items_or_shapes]
    if any(len(s) != 3 for s in shapes):
        raise InvalidInput("shapes must be (X, Y, Z) triples")
    if bucket_edges is not None:
        targets = _snap_to_edges(shapes, bucket_edges)
    elif num_buckets is not None:
        targets = _group_by_count(shapes, num_buckets)
    else:
        targets = shapes
    buckets: dict[Shape3, list[int]] = {}
    for index, target in enumerate(targets):
        buckets.setdefault(_round_up(target, divisor), []).append(index)
    return dict(sorted(buckets.items()))


def _snap_to_edges(shapes: list[Shape3], edges) -> list[Shape3]:
    per_axis = [edges] * 3 if all(np.isscalar(e) for e in edges) else list(edges)
    if len(per_axis) != 3 or any(len(e) == 0 for e in per_axis):
        raise InvalidInput("bucket_edges must be one list of sizes, or three (x, y, z)")
    per_axis = [np.sort(np.asarray(e, dtype=int)) for e in per_axis]
    snapped = []
    for shape in shapes:
        # Index of the first edge >= the size; past the end means crop to the largest edge.
        snapped.append(tuple(int(e[min(np.searchsorted(e, s), len(e) - 1)]) for s, e in zip(shape, per_axis)))
    return snapped


def _group_by_count(shapes: list[Shape3], num_buckets: int) -> list[Shape3]:
    if num_buckets < 1:
        raise InvalidInput(f"num_buckets must be at least 1, got {num_buckets}")
    order = sorted(range(len(shapes)), key=lambda i: (int(np.prod(shapes[i])), shapes[i]))
    targets: list[Shape3] = [()] * len(shapes)
    for group in np.array_split(np.asarray(order, dtype=int), min(num_buckets, max(len(shapes), 1))):
        largest = tuple(int(v) for v in np.max([shapes[i] for i in group], axis=0))
        for i in group:
            targets[i] = largest
    return targets


def shape_per_item(buckets: Mapping[Shape3, Sequence[int]]) -> dict[int, Shape3]:
    """{item index: bucket shape}, the `shape` argument of `CTDataset` for bucketed training."""
    return {int(i): tuple(shape) for shape, indices in buckets.items() for i in indices}


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches drawn from one size bucket at a time, each bucket with its own batch size.

    For data-parallel training every rank builds the same sampler with its own `rank`: buckets
    are dealt to ranks so that each rank serves whole buckets (largest workload first, to the
    least-loaded rank); with more ranks than buckets, the busiest buckets are shared and their
    items split between the ranks serving them. Every rank yields the same number of batches
    (`len`), cycling through its own when it has fewer, so no rank waits at a collective.
    Deterministic for a (seed, epoch); call `set_epoch` each epoch to reshuffle.
    """

    def __init__(self, buckets: Mapping[Shape3, Sequence[int]], batch_size: int | Mapping[Shape3, int],
                 seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True, drop_last: bool = False):
        if not 0 <= rank < world_size:
            raise InvalidInput(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.buckets = {tuple(k): list(v) for k, v in sorted(buckets.items()) if len(v)}
        if not self.buckets:
            raise InvalidInput("no buckets with items to sample from")
        self.batch_size = {k: self._size_for(batch_size, k) for k in self.buckets}
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle, self.drop_last, self.epoch = shuffle, drop_last, 0
        self.ranks_of = self._deal_buckets()
        self._length = max(self._rank_batch_count(r) for r in range(world_size))
        if self._rank_batch_count(rank) == 0:
            raise InvalidInput(f"rank {rank} gets no batch: fewer items than ranks, or all buckets smaller than their batch size with drop_last")

    @staticmethod
    def _size_for(batch_size, key) -> int:
        size = batch_size[key] if isinstance(batch_size, Mapping) else batch_size
        if int(size) < 1:
            raise InvalidInput(f"batch size for bucket {key} must be at least 1, got {size}")
        return int(size)

    def _batches_in(self, n_items: int, key) -> int:
        size = self.batch_size[key]
        return n_items // size if self.drop_last else -(-n_items // size)

    def _deal_buckets(self) -> dict[Shape3, list[int]]:
        """bucket -> ranks serving it (longest-processing-time-first scheduling, deterministic)."""
        work = {k: self._batches_in(len(v), k) for k, v in self.buckets.items()}
        by_work = sorted(work, key=lambda k: (-work[k], k))
        if self.world_size <= len(by_work):
            load = [0] * self.world_size
            ranks_of = {}
            for k in by_work:
                r = min(range(self.world_size), key=lambda r: (load[r], r))
                ranks_of[k], load[r] = [r], load[r] + work[k]
            return ranks_of
        ranks_of = {k: [r] for r, k in enumerate(by_work)}
        for r in range(len(by_work), self.world_size):
            busiest = max(by_work, key=lambda k: (work[k] / len(ranks_of[k]), -by_work.index(k)))
            ranks_of[busiest].append(r)
        return ranks_of

    def _rank_batch_count(self, rank: int) -> int:
        total = 0
        for k, ranks in self.ranks_of.items():
            if rank in ranks:
                share = len(self.buckets[k][ranks.index(rank)::len(ranks)])
                total += self._batches_in(share, k)
        return total

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _my_batches(self) -> list[list[int]]:
        batches = []
        for b, (k, ranks) in enumerate(self.ranks_of.items()):
            if self.rank not in ranks:
                continue
            indices = np.asarray(self.buckets[k])
            if self.shuffle:  # same permutation on every rank sharing the bucket: disjoint shards
                indices = np.random.default_rng([self.seed, self.epoch, b]).permutation(indices)
            shard = indices[ranks.index(self.rank)::len(ranks)]
            size = self.batch_size[k]
            stop = len(shard) - len(shard) % size if self.drop_last else len(shard)
            batches += [shard[i:i + size].tolist() for i in range(0, stop, size)]
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch, 1_000_003 + self.rank]).permutation(len(batches))
            batches = [batches[i] for i in order]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._my_batches()
        for i in range(self._length):
            yield batches[i % len(batches)]

    def __len__(self) -> int:
        return self._length


def weighted_source_sampler(items: Sequence[DataItem | str], weights: Mapping[str, float],
                            num_samples: int | None = None, seed: int = 0) -> torch.utils.data.WeightedRandomSampler:
    """Sampler drawing each source with probability proportional to its weight (with replacement).

    A source's weight is shared evenly by its items, so a source with 10 scans and one with 1000
    are drawn equally often at equal weights: the balanced fine-tuning stage's undoing of the
    size/bucket imbalance. items: `DataItem`s or their source strings. Every source present
    needs a weight (0 excludes it) and every weight a source, so a typo cannot pass silently.
    """
    sources = [s if isinstance(s, str) else s.source for s in items]
    counts = {s: sources.count(s) for s in set(sources)}
    missing, unused = sorted(set(counts) - set(weights)), sorted(set(weights) - set(counts))
    if missing or unused:
        raise InvalidInput(f"weights must name exactly the datalist's sources {sorted(counts)}; "
                         f"missing: {missing}, not in the datalist: {unused}")
    if any(w < 0 or not np.isfinite(w) for w in weights.values()) or sum(weights.values()) <= 0:
        raise InvalidInput(f"source weights must be finite, non-negative and not all zero, got {dict(weights)}")
    per_item = torch.tensor([weights[s] / counts[s] for s in sources], dtype=torch.double)
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.WeightedRandomSampler(per_item, num_samples or len(sources), replacement=True, generator=generator)
