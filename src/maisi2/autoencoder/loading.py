"""Loading a VAE for inference: one of our "vae" checkpoints or the released MAISI-v2 VAE."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from maisi2.checkpoint import RELEASED_FILES, load_checkpoint, load_weights, read_torch_file
from maisi2.config import Config, get_config
from maisi2.errors import InvalidInput, MissingInput
from maisi2.nets import build_vae

__all__ = ["LoadedVAE", "load_vae", "vae_state_only", "file_fingerprint"]


@dataclass
class LoadedVAE:
    """A VAE ready to use, its config, and a short fingerprint of the weights file it came from."""

    model: nn.Module
    config: Config
    fingerprint: str
    source: str
    used_ema: bool


def load_vae(path: str | Path, device: str | torch.device = "cpu", prefer_ema: bool = True) -> LoadedVAE:
    """Load a VAE in eval mode from one of our "vae" checkpoints or the released MAISI-v2 VAE.

    `path` is a maisi2 checkpoint of kind "vae" (EMA weights used when present and `prefer_ema`),
    the released ``autoencoder_v1.pt`` (a plain state dict, loaded into the ``maisi-v2`` preset),
    or a folder holding it.
    """
    path = Path(path)
    if path.is_dir():
        path = path / RELEASED_FILES["vae"]
        if not path.is_file():
            raise MissingInput(f"{path.parent} holds no {RELEASED_FILES['vae']}; pass the VAE checkpoint file")
    data = read_torch_file(path, map_location="cpu")
    if isinstance(data, dict) and data.get("format") == "maisi2":
        ckpt = load_checkpoint(path)
        if ckpt.kind != "vae":
            raise InvalidInput(f"{path} is a '{ckpt.kind}' checkpoint; --vae needs a VAE checkpoint "
                             "(made by `maisi2 train-vae`, or the released autoencoder_v1.pt)")
        cfg, state, used_ema = ckpt.config, ckpt.weights(prefer_ema), prefer_ema and ckpt.ema_state_dict is not None
        state = vae_state_only(state)
    elif isinstance(data, dict) and data and all(isinstance(v, torch.Tensor) for v in data.values()):
        cfg, state, used_ema = get_config("maisi-v2"), data, False  # the released VAE: maisi-v2 architecture
    else:
        raise InvalidInput(f"{path} is neither a maisi2 VAE checkpoint nor a VAE state dict")
    model = build_vae(cfg)
    load_weights(model, state, "vae", str(path), cfg.preset)
    model = model.to(device).eval()
    return LoadedVAE(model=model, config=cfg, fingerprint=file_fingerprint(path), source=str(path), used_ema=used_ema)


def vae_state_only(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The VAE weights of a train-vae run state (``vae.*`` beside ``discriminator.*``), else `state`."""
    if state and all(k.startswith(("vae.", "discriminator.")) for k in state):
        return {k[len("vae."):]: v for k, v in state.items() if k.startswith("vae.")}
    return state


def file_fingerprint(path: str | Path) -> str:
    """sha256 of a file's bytes (first 16 hex digits): the identity of a weights file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]
