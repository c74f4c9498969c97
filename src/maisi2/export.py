"""Assemble a model folder (what `generate --model` reads) from trained checkpoints.

The VAE, flow UNet and ControlNet are trained separately (train-vae, train-flow,
train-controlnet); `export_model` takes their EMA weights (or, for the networks named in `raw`,
the raw ones: the EMA of a short run lags far behind it, see docs/model_card.md), checks they
belong together (same VAE and trunk config, one scale factor), records the fields of view the
model was trained on (fields of view, spacings, label ids: from the latent cache) and writes the folder with `models.save_model_folder`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from maisi2.checkpoint import build_network, load_weights
from maisi2.errors import InvalidInput
from maisi2.latents import read_index

__all__ = ["export_model", "trained_fov_mm", "trained_domain"]


def trained_fov_mm(cache: str | Path, downsample: int) -> dict:
    """Per-axis range of the fields of view (mm) of the volumes in a latent cache."""
    fovs = np.array([[n * downsample * s for n, s in zip(r.latent_shape[1:], r.spacing)] for r in read_index(cache)])
    return {"min": fovs.min(0).round(1).tolist(), "max": fovs.max(0).round(1).tolist()}


def trained_domain(cache: str | Path) -> dict:
    """model.json's ``domain`` block from a latent cache: the voxel spacings of its volumes and the
    label ids of its labelled ones (what a ControlNet trained on it saw)."""
    from maisi2.latents import _load

    records = read_index(cache)
    spacings = np.array([r.spacing for r in records])
    seen: set[int] = set()
    for record in records:
        if record.label:
            seen |= set(np.unique(_load(Path(cache) / record.file)["label"].numpy()).tolist())
    seen.discard(0)
    return {"spacing_mm": {"min": spacings.min(0).tolist(), "max": spacings.max(0).tolist()},
            "labels_seen": sorted(int(i) for i in seen),
            "sources": {"spacing_mm": f"the voxel sizes of the volumes in the latent cache {cache}",
                        "fov_mm": f"the fields of view of the latent cache {cache}",
                        "labels_seen": f"the label ids of the labelled volumes in the latent cache {cache}"}}


def export_model(vae: str | Path, unet: str | Path, controlnet: str | Path | None, out_dir: str | Path,
                 cache: str | Path | None = None, layout: str = "safetensors", notes: dict | None = None,
                 overwrite: bool = False, raw: Sequence[str] = ()) -> Path:
    """Write `out_dir` (model.json + weights) from our vae/unet/controlnet checkpoints; the
    networks named in `raw` ("vae", "unet", "controlnet") take their raw weights, not their EMA."""
    from maisi2.models import read_network, save_model_folder

    unknown = sorted(set(raw) - {"vae", "unet", "controlnet"})
    if unknown:
        raise InvalidInput(f"raw: unknown network(s) {', '.join(unknown)}; choose from vae, unet, controlnet")
    paths = {"vae": vae, "unet": unet, **({"controlnet": controlnet} if controlnet is not None else {})}
    found = {kind: read_network(path, kind, prefer_ema=kind not in raw) for kind, path in paths.items()}
    for kind, weights in found.items():
        if weights.config is None:
            raise InvalidInput(f"{paths[kind]} carries no config; export-model takes maisi2 checkpoints "
                               "(from `maisi2 train-vae`, `train-flow`, `train-controlnet`)")
    cfg = found["unet"].config
    if found["vae"].config.vae != cfg.vae:
        raise InvalidInput("the VAE checkpoint's VAE config differs from the one the UNet was trained with")
    if "controlnet" in found and found["controlnet"].config.unet != cfg.unet:
        raise InvalidInput("the ControlNet's trunk config differs from the UNet's; was it trained on this UNet?")
    scale = found["unet"].scale_factor
    if scale is None:
        raise InvalidInput(f"{unet} carries no scale_factor; train it with `maisi2 train-flow` on an encoded cache")
    networks = {kind: load_weights(build_network(kind, cfg), w.state_dict, kind, w.source, cfg.preset).eval()
                for kind, w in found.items()}
    # steps in all: a flow UNet's stages (and the runs it was initialised from) add up
    metadata = {"trained_steps": {k: w.steps for k, w in found.items()},
                "weights": {k: "ema" if w.used_ema else "raw" for k, w in found.items()},
                **(notes or {})}
    if cache is not None:
        metadata["fov_mm"] = trained_fov_mm(cache, cfg.vae.downsample_factor)
        metadata["domain"] = {**trained_domain(cache), **metadata.get("domain", {})}
    return save_model_folder(out_dir, cfg, networks["vae"], networks["unet"], networks.get("controlnet"),
                             scale, metadata=metadata, layout=layout, overwrite=overwrite)
