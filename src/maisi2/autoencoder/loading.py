"""Loading a VAE for inference, through the one network loader (`maisi2.models.load_network`)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from maisi2.config import Config
from maisi2.models import load_network

__all__ = ["LoadedVAE", "load_vae", "file_fingerprint"]


@dataclass
class LoadedVAE:
    """A VAE ready to use, its config, and a short fingerprint of the weights file it came from."""

    model: nn.Module
    config: Config
    fingerprint: str
    source: str
    used_ema: bool


def load_vae(path: str | Path, device: str | torch.device = "cpu", prefer_ema: bool = True) -> LoadedVAE:
    """Load a VAE in eval mode from any file `models.read_network` knows: one of our "vae"
    checkpoints (EMA weights when present and `prefer_ema`), the released ``autoencoder_v1.pt``
    (loaded into the ``maisi-v2`` preset), a model folder or a folder holding the released file."""
    model, cfg, weights = load_network(path, "vae", device=device, prefer_ema=prefer_ema)
    return LoadedVAE(model=model, config=cfg, fingerprint=file_fingerprint(weights.source), source=weights.source,
                     used_ema=weights.used_ema)


def file_fingerprint(path: str | Path) -> str:
    """sha256 of a file's bytes (first 16 hex digits): the identity of a weights file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]
