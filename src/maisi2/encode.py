"""Building the latent cache: every volume of a datalist through the VAE encoder, once.

For each datalist row: load the CT (and its label map), resample to `spacing` when given, map HU
to [0, 1] (`data.hu_to_unit`), pad every axis (centred, like `data.CTDataset`) up to a multiple
of what the networks need (`image_divisor`) with -1000 HU and label 0, encode to the posterior
mean (tiled when the volume is large), and store it with `latents.write_latent`. Finally the
scale factor 1/std over the whole cache is written (`latents.write_stats`).

Idempotent: each record keeps, in ``extra["key"]``, what its latent was computed from (input
paths with size and modification time, the VAE file's hash, spacing and tiling). A rerun skips
rows whose key is unchanged and re-encodes rows whose inputs changed; a cache made with another
VAE cannot silently mix with this one's latents.

Usage::

    report = encode_datalist("train.jsonl", "vae.pt", "cache/", spacing=(1.5, 1.5, 1.5))
    print(report.encoded, report.skipped, report.stats["scale_factor"])
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from maisi2 import latents
from maisi2.config import Config
from maisi2.data import HU_MIN, CTDataset, DataItem, center_pad_or_crop, hu_to_unit, read_datalist
from maisi2.errors import InvalidInput
from maisi2.progress import Progress, terminal_bar

__all__ = ["EncodeReport", "encode_datalist", "image_divisor", "cache_name", "input_key", "DEFAULT_TILE"]

# Volumes longer than 128 voxels on some axis are encoded in blocks of at most 128 (+ context), so
# the encoder's activations stay bounded whatever the volume size (released VAE: a 64-channel fp32
# activation of a 200^3 block is 2 GB; of a 512 x 512 x 768 volume, 51 GB).
DEFAULT_TILE = 128


@dataclass
class EncodeReport:
    cache: Path
    encoded: list[str] = field(default_factory=list)  # cache file names written this run
    skipped: list[str] = field(default_factory=list)  # up to date, left alone
    stats: dict = field(default_factory=dict)  # what stats.json holds
    vae_fingerprint: str = ""


def image_divisor(cfg: Config) -> int:
    """Every image axis must be a multiple of this: the VAE shrinks by 2**(levels-1), and the flow
    UNet halves the latent len(unet.num_channels)-1 times (4 * 8 = 32 for every preset)."""
    vae_factor = 2 ** (len(cfg.vae.num_channels) - 1)
    unet_factor = 2 ** (len(cfg.unet.num_channels) - 1)
    return vae_factor * unet_factor


def cache_name(item: DataItem) -> str:
    """A cache file stem unique per image path: readable stem + hash of the absolute path."""
    stem = item.image.name
    for suffix in (".nii.gz", ".nii"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    digest = hashlib.sha1(str(Path(os.path.abspath(item.image))).encode()).hexdigest()[:8]
    return f"{stem}-{digest}"


def _stamp(path: Path) -> list[int]:
    """[size, mtime_ns] of a file; for a DICOM folder, total size and newest mtime of its files."""
    if path.is_dir():
        stats = [p.stat() for p in path.rglob("*") if p.is_file()]
        return [sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)]
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def input_key(item: DataItem, spacing, tile, overlap, norm_stats, vae_fingerprint: str) -> dict:
    """Everything a cached latent depends on; a different key means the latent must be recomputed."""
    return {
        "image": str(item.image), "image_stamp": _stamp(item.image),
        "label": str(item.label) if item.label else "", "label_stamp": _stamp(item.label) if item.label else [],
        "header_spacing_override": list(item.spacing) if item.spacing else None,
        "spacing": [float(s) for s in spacing] if spacing else None,
        "tile": tile, "overlap": overlap, "norm_stats": norm_stats, "vae": vae_fingerprint,
    }


def encode_datalist(
    datalist: str | os.PathLike,
    vae: str | os.PathLike,
    out: str | os.PathLike,
    spacing: Sequence[float] | None = None,
    tile: int | None = DEFAULT_TILE,
    overlap: int | None = None,
    norm_stats: str = "volume",
    device: str | torch.device | None = None,
    progress: bool = True,
) -> EncodeReport:
    """Encode every row of `datalist` into the latent cache folder `out`; see the module docstring.

    vae: a maisi2 "vae" checkpoint (EMA weights used when present) or the released VAE file.
    tile: encode in blocks when an axis exceeds this many voxels (None or 0: always whole);
    overlap, norm_stats: how (`autoencoder.tiled_encode_mean`; the defaults reproduce a whole-volume pass).
    progress: a bar over the volumes and, under it, one over the blocks of the volume being encoded
    (a tiled encode counts every block of its statistics passes too).
    """
    from tqdm.auto import tqdm

    from maisi2.nets import resolve_device
    from maisi2.autoencoder import NORM_STATS, encoder_context, load_vae

    # 1. inputs: datalist rows, the VAE, unique cache names
    items = read_datalist(datalist)
    loaded = load_vae(vae, device=resolve_device(device))
    tile = tile or None
    if norm_stats not in NORM_STATS:
        raise InvalidInput(f"norm_stats must be one of {', '.join(NORM_STATS)}, got {norm_stats!r}")
    overlap = encoder_context(loaded.model) if overlap is None else int(overlap)
    names = [cache_name(item) for item in items]
    _check_unique(items, names)
    cache = Path(out)
    report = EncodeReport(cache=cache, vae_fingerprint=loaded.fingerprint)

    # 2. what is already cached, and whether it came from this VAE
    existing = {r.file: r for r in latents.read_index(cache)} if (cache / latents.INDEX).is_file() else {}
    _check_same_vae(existing, {f"{n}.pt" for n in names}, loaded.fingerprint, cache)

    # 3. encode what is missing or out of date
    dataset = CTDataset(items, spacing=spacing, shape=None, divisor=1)
    divisor = image_divisor(loaded.config)
    for index in tqdm(range(len(items)), desc="encode", unit="vol", disable=not progress):
        name, item = names[index], items[index]
        key = input_key(item, spacing, tile, overlap, norm_stats, loaded.fingerprint)
        record = existing.get(f"{name}.pt")
        if record is not None and record.extra.get("key") == key and (cache / record.file).is_file():
            report.skipped.append(record.file)
            continue
        blocks = terminal_bar(f"  {name}", "block", leave=False) if progress else None
        _encode_one(dataset, index, name, key, loaded, cache, divisor, (tile, overlap, norm_stats), blocks)
        report.encoded.append(f"{name}.pt")

    # 4. the scale factor over the whole cache (unchanged cache: keep the stats already there)
    stats_path = cache / latents.STATS
    if report.encoded or not stats_path.is_file():
        stats = latents.compute_scale_factor(cache)
        latents.write_stats(cache, {**stats, "vae": loaded.fingerprint})
    report.stats = latents.read_stats(cache)
    return report


def _check_unique(items: list[DataItem], names: list[str]) -> None:
    seen: dict[str, DataItem] = {}
    for item, name in zip(items, names):
        if name in seen:
            raise InvalidInput(f"{item.image} is listed twice in the datalist; each image is encoded once, keep one row")
        seen[name] = item


def _check_same_vae(existing: dict, listed: set[str], fingerprint: str, cache: Path) -> None:
    """Latents of another VAE that this run would not replace would poison the scale factor and
    the training set; refuse rather than mix them."""
    foreign = sorted(f for f, r in existing.items()
                     if f not in listed and r.extra.get("key", {}).get("vae") != fingerprint)
    if foreign:
        raise InvalidInput(
            f"{cache} holds {len(foreign)} latent(s) made with another VAE (e.g. {foreign[0]}) that are not in "
            "this datalist; encode into a new --out folder, or list those volumes too so they are re-encoded"
        )


def _encode_one(dataset: CTDataset, index: int, name: str, key: dict, loaded, cache: Path,
                divisor: int, tiling: tuple, progress: Progress | None = None) -> None:
    from maisi2.autoencoder import encode_mean

    sample = dataset[index]
    image = sample["image"][0].numpy()  # (X, Y, Z) in [0, 1], resampled, not yet padded
    shape = tuple(int(-(-n // divisor) * divisor) for n in image.shape)
    # Padding value: air, -1000 HU, in the VAE's units (0.0); labels pad with background 0.
    padded = center_pad_or_crop(image, shape, float(hu_to_unit(np.float32(HU_MIN))))
    label = sample["label"]
    if label is not None:
        label = torch.from_numpy(center_pad_or_crop(label[0].numpy(), shape, 0))
    device = next(loaded.model.parameters()).device
    x = torch.from_numpy(padded)[None, None].to(device)
    z_mu = encode_mean(loaded.model, x, *tiling, progress=progress)[0].cpu()
    item = dataset.items[index]
    record = latents.LatentRecord(
        file=f"{name}.pt", spacing=tuple(float(s) for s in sample["spacing"]), latent_shape=tuple(z_mu.shape),
        modality=item.modality, source=item.source, fold=item.fold, image=str(item.image),
        label=str(item.label) if item.label else "",
        extra={"key": key, "image_shape": list(image.shape), "padded_shape": list(shape), "padding": "centred"},
    )
    latents.write_latent(cache, name, z_mu, record, label=label)
