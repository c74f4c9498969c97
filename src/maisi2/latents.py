"""The latent cache: one weights-only file per volume plus an index, and a dataset over it.

Layout of a cache folder (written by `maisi2 encode`, read by the flow and ControlNet trainers)::

    index.jsonl    one JSON object per volume: {"file", "image", "label", "spacing", "modality",
                   "source", "fold", "latent_shape"}
    <name>.pt      {"latent": (C, x, y, z) float32 posterior mean, NOT scaled,
                    "label": (1, X, Y, Z) uint8 MAISI label map at image resolution, or absent}
    stats.json     {"scale_factor": 1/std over all cached latents, "std", "mean", "count"}

Latents are stored unscaled so the scale factor can be recomputed when volumes are added; the
dataset multiplies by it on the way out (the networks see ``latent * scale_factor``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from maisi2 import nets
from maisi2.atomic import atomic_output
from maisi2.checkpoint import read_torch_file, save_torch_file
from maisi2.errors import InvalidInput, MissingInput

__all__ = ["LatentRecord", "write_latent", "read_index", "compute_scale_factor", "write_stats",
           "read_stats", "LatentDataset", "RESIZE_MODES", "resize_latent", "prepare_batch"]

INDEX = "index.jsonl"
STATS = "stats.json"
RESIZE_MODES = ("downsample", "crop")


@dataclass(frozen=True)
class LatentRecord:
    file: str  # the .pt file name inside the cache folder
    spacing: tuple[float, float, float]  # image voxel size in mm
    latent_shape: tuple[int, ...]  # (C, x, y, z)
    modality: str = "ct"
    source: str = ""
    fold: int = 0
    image: str = ""  # where the volume came from (for the record)
    label: str = ""
    extra: dict = field(default_factory=dict)


def write_latent(cache: str | Path, name: str, latent: torch.Tensor, record: LatentRecord,
                 label: torch.Tensor | None = None) -> LatentRecord:
    """Store one latent (and its label map) and append its record to the index (atomically)."""
    cache = Path(cache)
    if latent.dim() != 4 or not torch.isfinite(latent).all():
        raise InvalidInput(f"latent for {name} must be a finite (C, x, y, z) tensor, got shape {tuple(latent.shape)}")
    payload = {"latent": latent.detach().float().cpu().contiguous()}
    if label is not None:
        if label.max() > 255 or label.min() < 0:
            raise InvalidInput(f"label map for {name} holds ids outside 0..255")
        payload["label"] = label.detach().to(torch.uint8).cpu().reshape(1, *label.shape[-3:]).contiguous()
    with atomic_output(cache / f"{name}.pt", overwrite=True) as tmp:
        save_torch_file(payload, tmp)
    # `label` names where the stored label map came from; it is never empty when one is stored,
    # so readers can tell labelled records apart without opening the files.
    label_source = record.label or ("(stored with the latent)" if label is not None else "")
    record = LatentRecord(**{**asdict(record), "file": f"{name}.pt", "latent_shape": tuple(latent.shape),
                             "label": label_source})
    records = [r for r in read_index(cache) if r.file != record.file] if (cache / INDEX).exists() else []
    _write_index(cache, [*records, record])
    return record


def _write_index(cache: Path, records: list[LatentRecord]) -> None:
    with atomic_output(cache / INDEX, overwrite=True) as tmp:
        tmp.write_text("".join(json.dumps(asdict(r)) + "\n" for r in records))


def read_index(cache: str | Path) -> list[LatentRecord]:
    path = Path(cache) / INDEX
    if not path.is_file():
        raise MissingInput(f"{path} not found: run `maisi2 encode` to build the latent cache first")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                d = json.loads(line)
                d["spacing"], d["latent_shape"] = tuple(d["spacing"]), tuple(d["latent_shape"])
                records.append(LatentRecord(**d))
            except (json.JSONDecodeError, TypeError, KeyError) as err:
                raise InvalidInput(f"{path}:{n}: not a latent record ({err})") from None
    return records


def compute_scale_factor(cache: str | Path) -> dict[str, float]:
    """1/std over every cached latent value (streamed: one volume in memory at a time)."""
    total, total_sq, count = 0.0, 0.0, 0
    for record in read_index(cache):
        z = _load(Path(cache) / record.file)["latent"].double()
        total += z.sum().item()
        total_sq += (z * z).sum().item()
        count += z.numel()
    if count == 0:
        raise InvalidInput(f"{cache} holds no latents")
    mean = total / count
    std = max(total_sq / count - mean * mean, 0.0) ** 0.5
    if std == 0:
        raise InvalidInput(f"the latents in {cache} are constant; the VAE is broken or the data empty")
    return {"scale_factor": 1.0 / std, "std": std, "mean": mean, "count": count}


def write_stats(cache: str | Path, stats: dict[str, float]) -> None:
    with atomic_output(Path(cache) / STATS, overwrite=True) as tmp:
        tmp.write_text(json.dumps(stats, indent=2))


def read_stats(cache: str | Path) -> dict[str, float]:
    path = Path(cache) / STATS
    if not path.is_file():
        raise MissingInput(f"{path} not found: run `maisi2 encode` (it writes the scale factor)")
    return json.loads(path.read_text())


def _load(path: Path) -> dict:
    data = read_torch_file(path, what="latent file", remedy="Delete it and run `maisi2 encode` again.")
    if not isinstance(data, dict) or not isinstance(data.get("latent"), torch.Tensor):
        raise InvalidInput(f"{path} is not a latent file of `maisi2 encode` (no \"latent\" tensor); delete it and "
                         "run `maisi2 encode` again")
    return data


class LatentDataset(Dataset):
    """Items: {"latent": (C,x,y,z) scaled, "spacing": (3,), "modality": int, "source": str,
    "label": (1,X,Y,Z) uint8 if stored and `with_labels`}.

    `indices` restricts to a subset (e.g. one fold or one size bucket).
    """

    def __init__(self, cache: str | Path, scale_factor: float | None = None, with_labels: bool = False,
                 indices: list[int] | None = None):
        from maisi2.nets import modality_id

        self.cache = Path(cache)
        records = read_index(self.cache)
        self.records = records if indices is None else [records[i] for i in indices]
        self.scale_factor = float(scale_factor if scale_factor is not None else read_stats(self.cache)["scale_factor"])
        self.with_labels = with_labels
        self._modality_id = modality_id

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        record = self.records[i]
        data = _load(self.cache / record.file)
        item = {
            "latent": data["latent"] * self.scale_factor,
            "spacing": torch.tensor(record.spacing, dtype=torch.float32),
            "modality": self._modality_id(record.modality),
            "source": record.source,
        }
        if self.with_labels:
            if "label" not in data:
                raise InvalidInput(f"{record.file} has no label map; re-encode with labels in the datalist")
            item["label"] = data["label"]
        return item


# -- batches of cached latents, as the flow and ControlNet recipes train on them -----------------

def resize_latent(latent: torch.Tensor, spacing: torch.Tensor, size: Sequence[int], mode: str,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring one (C, x, y, z) latent to `size`; returns it with the image spacing (mm) it now has.

    "downsample": area averaging (MONAI-free `F.interpolate(mode="area")`); each axis's spacing
    grows by old/new size so the conditioning still tells the true voxel size.
    "crop": a random window (offsets from `generator`), spacing unchanged.
    """
    old = torch.tensor(latent.shape[1:], dtype=torch.float32)
    new = torch.tensor(tuple(size), dtype=torch.float32)
    if mode == "downsample":
        resized = F.interpolate(latent[None], size=tuple(size), mode="area")[0]
        return resized, spacing * (old / new).to(spacing.device)
    if mode != "crop":
        raise InvalidInput(f"resize mode must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")
    if (old < new).any():
        raise InvalidInput(f"cannot crop a latent of shape {tuple(latent.shape[1:])} to {tuple(size)}: lower "
                         "stage1.latent_size or use stage1.resize=downsample")
    starts = [int(torch.randint(0, o - n + 1, (1,), generator=generator, device=generator.device))
              for o, n in zip(latent.shape[1:], size)]
    window = tuple(slice(s, s + n) for s, n in zip(starts, size))
    return latent[(slice(None), *window)], spacing


def prepare_batch(items: list[dict], generator: torch.Generator, device: torch.device, *,
                  latent_size: Sequence[int] | None = None, resize: str = "downsample",
                  modality_dropout: float = 0.0, multiple: int = 1) -> tuple[torch.Tensor, nets.Conditioning]:
    """`LatentDataset` items -> x0 (B, C, x, y, z) on `device` and its conditioning.

    latent_size: resize every latent to it first (stage 1). multiple: every spatial size must be
    a multiple of it (the UNet halves the grid len(num_channels)-1 times).
    """
    latents, spacings = [], []
    for item in items:
        latent, spacing = item["latent"].to(device), item["spacing"].to(device, torch.float32)
        if latent_size is not None:
            latent, spacing = resize_latent(latent, spacing, latent_size, resize, generator)
        latents.append(latent)
        spacings.append(spacing)
    shapes = sorted({tuple(z.shape) for z in latents})
    if len(shapes) != 1:
        raise InvalidInput(f"a batch mixes latent shapes {shapes}; bucket the data by size")
    if any(s % multiple for s in shapes[0][1:]):
        raise InvalidInput(f"latent shape {shapes[0][1:]} is not a multiple of {multiple} on every axis, which the "
                         "UNet needs; re-encode the volumes padded to a multiple of that times the VAE factor")
    modality = torch.tensor([int(item["modality"]) for item in items], dtype=torch.long, device=device)
    if modality_dropout > 0:
        dropped = torch.rand(len(items), generator=generator, device=generator.device) < modality_dropout
        modality = torch.where(dropped.to(device), torch.zeros_like(modality), modality)
    return torch.stack(latents), nets.Conditioning(spacing=torch.stack(spacings), modality=modality)
