"""Checkpoint files: our own format, writing the released MAISI-v2 layout, strict, explained loading.

Reading a network from any file (these, the released files, model folders, raw exports) goes
through the one loader, `maisi2.models.read_network` / `load_network`.

Our checkpoint is a plain dict that `torch.load(weights_only=True)` can read (tensors, numbers,
strings; no pickled code):

    {"format": "maisi2", "version": 1, "kind": "vae" | "unet" | "controlnet",
     "config": <Config as JSON text>, "state_dict": {...}, "ema_state_dict": {...} | None,
     (kinds "mask_autoencoder" | "mask_unet": the mask generator's networks, config a MaskGenConfig)
     "scale_factor": float | None, "step": int, "extra": {...}}

The released files (a folder the user points at):
    autoencoder_v1.pt           plain VAE state dict
    diff_unet_3d_rflow-ct.pt    {"unet_state_dict": ..., "scale_factor": tensor, ...}
    controlnet_3d_rflow-ct.pt   {"controlnet_state_dict": ..., ...}
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from maisi2.atomic import atomic_output
from maisi2.config import PRESETS, Config, get_config
from maisi2.errors import InvalidInput, MissingInput

__all__ = [
    "Checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "read_torch_file",
    "load_weights",
    "RELEASED_FILES",
    "checkpoint_from_payload",
    "write_released",
    "build_network",
]

FORMAT = "maisi2"
VERSION = 1
KINDS = ("vae", "unet", "controlnet")
# Kinds that packages above this one add (the mask generator's, from maisi2.maskgen.files): kind ->
# (network builder, config class, preset lookup). A registry keeps this module below them: it never
# imports the packages that use its format.
_REGISTERED: dict[str, tuple[Callable, type, Callable]] = {}
RELEASED_FILES = {
    "vae": "autoencoder_v1.pt",
    "unet": "diff_unet_3d_rflow-ct.pt",
    "controlnet": "controlnet_3d_rflow-ct.pt",
}


@dataclass
class Checkpoint:
    kind: str
    config: Config
    state_dict: dict[str, torch.Tensor]
    ema_state_dict: dict[str, torch.Tensor] | None = None
    scale_factor: float | None = None
    step: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def weights(self, prefer_ema: bool = True) -> dict[str, torch.Tensor]:
        """EMA weights when present (what sampling should use), else the raw weights."""
        return self.ema_state_dict if prefer_ema and self.ema_state_dict is not None else self.state_dict

    @property
    def steps_in_all(self) -> int:
        """Training steps these weights have had: this run's, plus those of the checkpoint it
        started from (``extra["steps_before"]``, which flow stages record) and so on back."""
        return int(self.extra.get("steps_before", 0)) + int(self.step)


def register_kind(kind: str, build: Callable, config_class: type, preset_config: Callable) -> None:
    """Let checkpoints of another network `kind` be written, read and strictly loaded here:
    `build(cfg, device=...)` makes the network, `config_class.from_json` reads its config,
    `preset_config(name)` gives a named preset's (to say which preset a file fits)."""
    _REGISTERED[kind] = (build, config_class, preset_config)


def _kinds() -> tuple[str, ...]:
    return KINDS + tuple(_REGISTERED)


def build_network(kind: str, cfg: Config, device=None) -> nn.Module:
    """The network of `kind` for `cfg` (a `Config`; a registered kind's own config class)."""
    from maisi2 import nets

    if kind in _REGISTERED:
        return _REGISTERED[kind][0](cfg, device=device)
    builders = {"vae": nets.build_vae, "unet": nets.build_unet, "controlnet": nets.build_controlnet}
    if kind not in builders:
        raise InvalidInput(f"unknown network kind {kind!r}; expected one of {', '.join(_kinds())}")
    return builders[kind](cfg, device=device)


def save_checkpoint(path: str | Path, ckpt: Checkpoint, overwrite: bool = True) -> Path:
    """Write `ckpt` atomically (a crash never leaves a truncated checkpoint)."""
    if ckpt.kind not in _kinds():
        raise InvalidInput(f"unknown checkpoint kind {ckpt.kind!r}")
    payload = {
        "format": FORMAT, "version": VERSION, "kind": ckpt.kind, "config": ckpt.config.to_json(),
        "state_dict": _cpu(ckpt.state_dict),
        "ema_state_dict": None if ckpt.ema_state_dict is None else _cpu(ckpt.ema_state_dict),
        "scale_factor": None if ckpt.scale_factor is None else float(ckpt.scale_factor),
        "step": int(ckpt.step), "extra": ckpt.extra,
    }
    with atomic_output(path, overwrite=overwrite) as tmp:
        save_torch_file(payload, tmp)
    return Path(path)


def save_torch_file(payload: Any, path: str | Path) -> None:
    """`torch.save`, with a failed write (which torch reports as an internal RuntimeError) as an OSError
    naming the file, and a full disk said plainly."""
    import errno
    import os
    import shutil

    try:
        torch.save(payload, path)
    except RuntimeError as err:
        if "write" not in str(err).lower():
            raise
        full = shutil.disk_usage(Path(path).parent).free < 64 * 2**20
        code = errno.ENOSPC if full else errno.EIO
        reason = os.strerror(code) if full else f"torch could not write it: {_first_line(err)}"
        raise OSError(code, reason, str(path)) from err


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in state.items()}


def read_torch_file(path: str | Path, map_location: str | torch.device = "cpu", what: str = "PyTorch checkpoint",
                    remedy: str = "Re-save it as a plain state dict of tensors.") -> Any:
    """`torch.load` with weights_only=True (a pickled payload is refused, never run) and errors that
    say what went wrong: missing, unreadable (permissions), code inside, or damaged."""
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except PermissionError:
        raise PermissionError(f"cannot read {what} {path}: permission denied; check the file's permissions") from None
    except pickle.UnpicklingError as err:
        text = str(err)
        if "GLOBAL" in text or "global" in text:
            name = next((ln.strip() for ln in text.splitlines() if "GLOBAL" in ln or "global" in ln.lower()), "")
            raise InvalidInput(
                f"{path} is not a weights-only {what}: loading it would run pickled code, which maisi2 "
                f"refuses for safety ({name}). {remedy}"
            ) from None
        raise InvalidInput(f"{path} is not a readable {what} (corrupt or truncated?). {remedy}") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError) as err:
        raise InvalidInput(f"{path} is not a readable {what} (corrupt or truncated?): {_first_line(err)}. {remedy}") from None


def read_safetensors(path: str | Path, what: str = "weights file") -> dict[str, torch.Tensor]:
    """A .safetensors file's tensors, with the same kinds of errors as `read_torch_file`."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"{what} {path} does not exist")
    try:
        return load_file(str(path))
    except PermissionError:
        raise PermissionError(f"cannot read {what} {path}: permission denied; check the file's permissions") from None
    except Exception as err:  # safetensors raises its own error types for bad headers and short files
        raise InvalidInput(f"{path} is not a readable safetensors {what} (corrupt or truncated?): {_first_line(err)}; "
                         "re-export or re-download it") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read one of our checkpoints; a released file gets a pointer to the right loader."""
    return checkpoint_from_payload(read_torch_file(path, map_location), path)


def checkpoint_from_payload(data: Any, path: str | Path) -> Checkpoint:
    """The `Checkpoint` in what `read_torch_file` returned for `path` (checked: format, version, config)."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        hint = ""
        if isinstance(data, dict) and ({"unet_state_dict", "controlnet_state_dict"} & set(data) or "encoder.blocks.0.conv.conv.weight" in data):
            hint = " It looks like a released MAISI-v2 file: point --model at its folder instead."
        raise InvalidInput(f"{path} is not a maisi2 checkpoint.{hint}")
    if data.get("version", 0) > VERSION:
        raise InvalidInput(f"{path} was written by a newer maisi2 (format version {data['version']}); upgrade maisi2")
    try:
        cfg = _config_class(data.get("kind")).from_json(data["config"])
    except (ValueError, TypeError, KeyError) as err:
        raise InvalidInput(f"{path} carries an invalid config: {err}") from None
    return Checkpoint(
        kind=data["kind"], config=cfg, state_dict=data["state_dict"], ema_state_dict=data.get("ema_state_dict"),
        scale_factor=data.get("scale_factor"), step=int(data.get("step", 0)), extra=data.get("extra") or {},
    )


def _config_class(kind: str | None):
    return _REGISTERED[kind][1] if kind in _REGISTERED else Config


def _preset_config(kind: str, name: str):
    return _REGISTERED[kind][2](name) if kind in _REGISTERED else get_config(name)


# -- strict loading with explanations ------------------------------------------------------

def _shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def _fitting_presets(kind: str, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Presets whose `kind` network has exactly these keys and shapes (built on the meta device)."""
    fits = []
    for name in PRESETS:
        with torch.device("meta"):
            model = build_network(kind, _preset_config(kind, name))
        if _shapes(model.state_dict()) == shapes:
            fits.append(name)
    return fits


def _describe_mismatch(expected, got) -> str:
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    parts = []
    for label, keys, show in (
        ("missing", missing, lambda k: k),
        ("unexpected", unexpected, lambda k: k),
        ("wrong shape", wrong, lambda k: f"{k}: file {got[k]} vs model {expected[k]}"),
    ):
        if keys:
            shown = "; ".join(show(k) for k in keys[:4]) + (f"; ... ({len(keys)} in all)" if len(keys) > 4 else "")
            parts.append(f"{len(keys)} {label} key(s): {shown}")
    return "\n  ".join(parts)


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], kind: str, source: str, preset: str) -> nn.Module:
    """Strictly load `state_dict`, or fail naming a few mismatched keys and the preset that fits."""
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise InvalidInput(f"{source}: expected a {kind} state dict (names -> tensors)")
    expected, got = _shapes(model.state_dict()), _shapes(state_dict)
    if expected != got:
        fits = _fitting_presets(kind, got)
        advice = (f"these weights fit the preset(s) {', '.join(fits)}" if fits
                  else "no built-in preset fits them; check the config overrides they were trained with")
        raise InvalidInput(
            f"{source}: the {kind} weights do not match the '{preset}' {kind} network.\n  "
            f"{_describe_mismatch(expected, got)}\n  {advice}."
        )
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise InvalidInput(f"{source}: {len(bad)} tensor(s) hold NaN/inf values, e.g. {bad[0]}; the file is damaged")
    model.load_state_dict(state_dict, strict=True)
    return model


# -- released MAISI-v2 files ---------------------------------------------------------------

def write_released(model_dir: str | Path, vae: nn.Module | None, unet: nn.Module | None, controlnet: nn.Module | None,
                   scale_factor: float, overwrite: bool = False) -> Path:
    """Write networks in the released file layout (for tests, and to hand weights to the official code);
    a network given as None is not written."""
    model_dir = Path(model_dir)
    payloads = {}
    if vae is not None:
        payloads["vae"] = _cpu(vae.state_dict())
    if unet is not None:
        payloads["unet"] = {"unet_state_dict": _cpu(unet.state_dict()), "scale_factor": torch.tensor(float(scale_factor)),
                            "epoch": 0, "loss": 0.0, "num_train_timesteps": 1000}
    if controlnet is not None:
        payloads["controlnet"] = {"controlnet_state_dict": _cpu(controlnet.state_dict()), "epoch": 0, "loss": 0.0}
    for kind, payload in payloads.items():
        with atomic_output(model_dir / RELEASED_FILES[kind], overwrite=overwrite) as tmp:
            torch.save(payload, tmp)
    return model_dir
