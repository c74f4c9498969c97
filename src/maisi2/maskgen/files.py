"""Mask-generator folders: the release's two files, and ours.

The release's files, in the user's model folder (read with ``torch.load(weights_only=True)``,
built with the ``maisi-v2`` mask preset and loaded strictly; a mismatch names the keys):

    mask_generation_autoencoder.pt      plain state dict of the mask autoencoder
    mask_generation_diffusion_unet.pt   {"unet_state_dict": ..., "scale_factor": tensor, ...}
    all_anatomy_size_conditions.json    optional: the release's candidate size vectors
                                        (or the tutorials' all_anatomy_size_condtions.json)

Ours (what `maisi2 train-maskgen` exports; the bundled generator when there is one)::

    maskgen.json                {"format": "maisi2-maskgen", "version": 1, "config": {...},
                                 "scale_factor": s, "size_scale": [10 mL], "size_table": [[10], ...],
                                 "metadata": {...}}
    mask_autoencoder.safetensors, mask_unet.safetensors
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from maisi2 import checkpoint as ckpt
from maisi2.atomic import atomic_output, check_writable
from maisi2.errors import InvalidInput, MissingInput
from maisi2.maskgen.config import MaskGenConfig, get_mask_config
from maisi2.maskgen.networks import build_mask_autoencoder, build_mask_unet
from maisi2.maskgen.sizes import RELEASE_TABLE_FILES, SizeScale, SizeTable
from maisi2.models import read_description

__all__ = [
    "RELEASED_MASK_FILES",
    "MASKGEN_JSON",
    "MaskGenerator",
    "bundled_mask_generator_dir",
    "mask_generator_dir",
    "is_released_mask_folder",
    "is_our_mask_folder",
    "load_mask_generator",
    "write_released_mask_generator",
    "save_mask_generator",
]

MASK_KINDS = ("mask_autoencoder", "mask_unet")
RELEASED_MASK_FILES = {"mask_autoencoder": "mask_generation_autoencoder.pt", "mask_unet": "mask_generation_diffusion_unet.pt"}
MASKGEN_JSON = "maskgen.json"
FORMAT = "maisi2-maskgen"
VERSION = 1


@dataclass
class MaskGenerator:
    """A mask generator ready to sample (networks in eval mode on one device)."""

    cfg: MaskGenConfig
    autoencoder: nn.Module
    unet: nn.Module
    scale_factor: float
    source: str  # "released" or "ours"
    model_dir: Path
    size_scale: SizeScale | None = None  # None: the release's (unpublished) scale
    size_table: SizeTable | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device


def bundled_mask_generator_dir() -> Path:
    """Where the package keeps its own mask generator (beside the bundled CT model)."""
    from maisi2.models import default_model_dir

    return default_model_dir() / "maskgen"


def mask_generator_dir(choice: str | Path | None, model_dir: str | Path | None = None) -> Path:
    """The folder of the mask generator a request names (checked to exist, nothing loaded).

    choice: "released" (the release's files in `model_dir`), "bundled" (ours, in the package), a
    folder, or None: "released" when `model_dir` holds the release's mask files, else "bundled".
    """
    if choice is None:
        choice = "released" if model_dir is not None and is_released_mask_folder(model_dir) else "bundled"
    if choice == "released":
        if model_dir is None or not is_released_mask_folder(model_dir):
            raise MissingInput(
                f"--mask-generator released reads the release's {RELEASED_MASK_FILES['mask_autoencoder']} and "
                f"{RELEASED_MASK_FILES['mask_unet']} from the --model folder"
                + ("" if model_dir is None else f"; {model_dir} lacks them")
            )
        return Path(model_dir)
    if choice == "bundled":
        folder = bundled_mask_generator_dir()
        if not is_our_mask_folder(folder):
            raise MissingInput(
                "maisi2 bundles no mask generator yet (none trained here has passed the bar in "
                "docs/mask_generator.md); pass --mask-generator DIR with one from `maisi2 train-maskgen`, or "
                "--mask-generator released with --model holding the release's mask generation files"
            )
        return folder
    folder = Path(choice).expanduser()
    if not (is_released_mask_folder(folder) or is_our_mask_folder(folder)):
        raise MissingInput(f"--mask-generator {folder}: no mask generator there ({MASKGEN_JSON} or the "
                                f"release's {RELEASED_MASK_FILES['mask_unet']})")
    return folder


def is_released_mask_folder(model_dir: str | Path) -> bool:
    return (Path(model_dir) / RELEASED_MASK_FILES["mask_unet"]).is_file()


def is_our_mask_folder(model_dir: str | Path) -> bool:
    return (Path(model_dir) / MASKGEN_JSON).is_file()


def load_mask_generator(model_dir: str | Path, device: str | torch.device | None = "cpu") -> MaskGenerator:
    """The mask generator in `model_dir` (the release's files or ours), loaded strictly."""
    from maisi2.nets import resolve_device

    model_dir = Path(model_dir).expanduser()
    device = resolve_device(device)
    if is_released_mask_folder(model_dir):
        return _load_released(model_dir, device)
    if is_our_mask_folder(model_dir):
        return _load_ours(model_dir, device)
    raise MissingInput(
        f"{model_dir} holds no mask generator: expected the release's {RELEASED_MASK_FILES['mask_autoencoder']} and "
        f"{RELEASED_MASK_FILES['mask_unet']}, or a maisi2 mask generator ({MASKGEN_JSON}; `maisi2 train-maskgen`)"
    )


def _built(cfg: MaskGenConfig, weights: dict, device, sources: dict[str, str]) -> tuple[nn.Module, nn.Module]:
    # Tensor splitting off for inference: same keys, outputs within ~1e-5, and it fails on thin tiles.
    inference = dataclasses.replace(cfg, autoencoder=dataclasses.replace(cfg.autoencoder, num_splits=1))
    nets = []
    for kind in MASK_KINDS:
        net = ckpt.build_network(kind, inference, device=device)
        ckpt.load_weights(net, weights[kind], kind, sources[kind], cfg.preset)
        nets.append(net.eval())
    return nets[0], nets[1]


def _load_released(model_dir: Path, device) -> MaskGenerator:
    paths = {k: model_dir / f for k, f in RELEASED_MASK_FILES.items()}
    if not paths["mask_autoencoder"].is_file():
        raise MissingInput(f"{model_dir} has {paths['mask_unet'].name} but not {paths['mask_autoencoder'].name}; "
                                "the released mask generator needs both files")
    autoencoder = ckpt.read_torch_file(paths["mask_autoencoder"])
    unet_file = ckpt.read_torch_file(paths["mask_unet"])
    for key in ("unet_state_dict", "scale_factor"):
        if not isinstance(unet_file, dict) or key not in unet_file:
            raise InvalidInput(f"{paths['mask_unet']} has no '{key}' entry; is it the release's mask generation UNet?")
    cfg = get_mask_config("maisi-v2")
    weights = {"mask_autoencoder": autoencoder, "mask_unet": unet_file["unet_state_dict"]}
    ae, unet = _built(cfg, weights, device, {k: str(p) for k, p in paths.items()})
    tables = [model_dir / name for name in RELEASE_TABLE_FILES if (model_dir / name).is_file()]
    table = SizeTable.read(tables[0]) if tables else None
    scale = float(torch.as_tensor(unet_file["scale_factor"]).reshape(-1)[0])
    return MaskGenerator(cfg, ae, unet, scale, "released", model_dir, None, table)


def _load_ours(model_dir: Path, device) -> MaskGenerator:
    from safetensors.torch import load_file

    spec_path = model_dir / MASKGEN_JSON
    spec = read_description(spec_path, FORMAT, VERSION, "mask generator")
    try:
        cfg = MaskGenConfig.from_dict(spec["config"])
        scale = SizeScale(tuple(float(v) for v in spec["size_scale"]))
        table = SizeTable(np.asarray(spec["size_table"]), str(spec_path))
        scale_factor = float(spec["scale_factor"])
    except (KeyError, TypeError, ValueError) as err:
        raise InvalidInput(f"{spec_path}: invalid mask generator description: {err}") from None
    paths = {k: model_dir / f"{k}.safetensors" for k in MASK_KINDS}
    missing = [p.name for p in paths.values() if not p.is_file()]
    if missing:
        raise MissingInput(f"{model_dir} has {MASKGEN_JSON} but lacks {', '.join(missing)}")
    weights = {k: load_file(str(p)) for k, p in paths.items()}
    ae, unet = _built(cfg, weights, device, {k: str(p) for k, p in paths.items()})
    return MaskGenerator(cfg, ae, unet, scale_factor, "ours", model_dir, scale, table, dict(spec.get("metadata", {})))


def _state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}


def write_released_mask_generator(model_dir: str | Path, autoencoder: nn.Module, unet: nn.Module,
                                  scale_factor: float, overwrite: bool = False) -> Path:
    """Write networks in the release's file layout (for tests, and to hand weights to the official code)."""
    model_dir = Path(model_dir)
    payloads = {
        "mask_autoencoder": _state(autoencoder),
        "mask_unet": {"unet_state_dict": _state(unet), "scale_factor": torch.tensor(float(scale_factor)),
                      "epoch": 0, "loss": 0.0, "num_train_timesteps": 1000},
    }
    for kind, payload in payloads.items():
        with atomic_output(model_dir / RELEASED_MASK_FILES[kind], overwrite=overwrite) as tmp:
            torch.save(payload, tmp)
    return model_dir


def save_mask_generator(model_dir: str | Path, cfg: MaskGenConfig, autoencoder: nn.Module, unet: nn.Module,
                        scale_factor: float, size_scale: SizeScale, size_table: SizeTable,
                        metadata: dict | None = None, overwrite: bool = False) -> Path:
    """Write our mask-generator folder (safetensors weights + maskgen.json), every file atomic."""
    from safetensors.torch import save_file

    model_dir = Path(model_dir)
    targets = [model_dir / MASKGEN_JSON] + [model_dir / f"{k}.safetensors" for k in MASK_KINDS]
    for path in targets:
        check_writable(path, overwrite)  # all or nothing: refuse before writing anything
    for kind, net in zip(MASK_KINDS, (autoencoder, unet)):
        with atomic_output(model_dir / f"{kind}.safetensors", overwrite) as tmp:
            save_file(_state(net), str(tmp))
    spec = {"format": FORMAT, "version": VERSION, "config": cfg.to_dict(), "scale_factor": float(scale_factor),
            "size_scale": list(size_scale.reference_ml), "size_table": np.asarray(size_table.vectors).tolist(),
            "metadata": metadata or {}}
    with atomic_output(model_dir / MASKGEN_JSON, overwrite) as tmp:
        tmp.write_text(json.dumps(spec, indent=1))
    return model_dir


# Our checkpoint format (maisi2.checkpoint) carries the mask generator's networks too.
for _kind, _build in zip(MASK_KINDS, (build_mask_autoencoder, build_mask_unet)):
    ckpt.register_kind(_kind, _build, MaskGenConfig, get_mask_config)
