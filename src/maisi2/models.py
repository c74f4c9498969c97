"""Network files and model folders: the one loader (`read_network`, `load_network`) and what
`maisi2 generate --model DIR` reads.

`read_network(path, kind)` knows every file a network comes in: one of our checkpoints
(`maisi2.checkpoint`; EMA weights when present; a train-vae run state gives its ``vae.*`` part), a
model folder (below), a released MAISI-v2 file or a folder holding it, and raw exports (a
``.safetensors`` file or a plain state dict of tensors). Files without a config are built with the
``maisi-v2`` preset (or the one asked for). `load_network` builds the network and loads it strictly.

A model folder is one of

* **ours, PyTorch checkpoints**: ``model.json`` + ``vae.pt``, ``unet.pt``, ``controlnet.pt`` in our
  checkpoint format (`maisi2.checkpoint`; EMA weights used when present);
* **ours, safetensors** (the bundled model): ``model.json`` + ``vae.safetensors``,
  ``unet.safetensors``, ``controlnet.safetensors`` (plain tensors, a format that cannot carry code);
* **the released MAISI-v2 files**: ``autoencoder_v1.pt``, ``diff_unet_3d_rflow-ct.pt``,
  ``controlnet_3d_rflow-ct.pt`` (`read_released`), built with the ``maisi-v2`` preset
  and loaded strictly. An optional ``model.json`` beside them may carry metadata.

``model.json``::

    {"format": "maisi2-model", "version": 1,
     "preset": "small", "overrides": ["unet.num_res_blocks=1"],   # or "config": {...full config...}
     "scale_factor": 0.93,              # else taken from unet.pt
     "metadata": {"fov_mm": {"min": [x, y, z], "max": [x, y, z]}, ...}}

``metadata.fov_mm`` is the range of fields of view (voxels x spacing, mm per axis) the model was
trained on and ``metadata.domain`` the rest of what it was trained on (`ModelDomain`: voxel
spacings, the largest volume, the label ids its ControlNet saw, body regions, and where each
figure comes from); generation checks every request against them before any work. The released
files carry none, so `RELEASED_METADATA` supplies the release's own limits.

Usage::

    models = load_model("path/to/model", device="cpu")
    models.cfg, models.vae, models.unet, models.controlnet, models.scale_factor
"""

from __future__ import annotations

import dataclasses
import gc
import json
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from maisi2 import allocator
from maisi2 import checkpoint as ckpt
from maisi2.atomic import atomic_output, check_writable
from maisi2.config import Config, get_config
from maisi2.errors import InvalidInput, MissingInput
from maisi2.progress import Progress, counter

__all__ = [
    "MODEL_JSON",
    "ModelDomain",
    "NETWORK_KINDS",
    "RELEASED_METADATA",
    "ModelInfo",
    "Models",
    "default_model_dir",
    "read_model_info",
    "read_description",
    "load_model",
    "save_model_folder",
    "inference_config",
]

MODEL_JSON = "model.json"
FORMAT = "maisi2-model"
VERSION = 1
NETWORK_KINDS = ("vae", "unet", "controlnet")
# Upstream's recommended CT targets run from a head scan (256 mm in-plane) to long-axis whole body
# (512 x 1.5 mm in-plane = 768 mm, 768 x 1.5 mm = 1152 mm along z); the shortest recommended z
# extent is 128 slices at 1 mm. Generation allows a factor of 2 beyond this range.
# Spacings and the largest volume are the limits the release's own request check enforces
# (`check_input` in its scripts/sample.py: in-plane 0.5-3.0 mm, slices 0.5-5.0 mm, output sizes up
# to 512 x 512 x 768). Its masks use the full MAISI label set, so no label counts as unseen.
RELEASED_METADATA: dict[str, Any] = {
    "fov_mm": {"min": [256.0, 256.0, 128.0], "max": [768.0, 768.0, 1152.0]},
    "fov_source": "NV-Generate-CTMR recommended output sizes and spacings (not the training data itself)",
    "domain": {
        "spacing_mm": {"min": [0.5, 0.5, 0.5], "max": [3.0, 3.0, 5.0]},
        "max_shape": [512, 512, 768],
        "labels_seen": None,
        "body_regions": ["head", "chest", "abdomen", "pelvis", "lower body"],
        "sources": {
            "spacing_mm": "the release's request check (check_input, scripts/sample.py of NV-Generate-CTMR and "
                          "MONAI tutorials generation/maisi): in-plane 0.5-3.0 mm, slices 0.5-5.0 mm",
            "max_shape": "the same check: output sizes up to 512 x 512 x 768",
            "fov_mm": "fov_source",
            "labels_seen": "the release's masks use the full MAISI label set (label_dict.json); no per-label "
                           "list of its training masks is published, so no label is treated as unseen",
        },
    },
}


Range = tuple[tuple[float, float, float], tuple[float, float, float]]


@dataclass(frozen=True)
class ModelDomain:
    """What a model was trained on, and the checks of a request against it.

    spacing_mm / fov_mm: (per-axis minimum, per-axis maximum), or None when unknown. The spacing
    range is strict: the spacing sets how large anatomy is in voxels, which a convolutional
    network does not extrapolate. The field of view is checked with a tolerance factor (more or
    less body around the same anatomy). max_shape: the largest volume in voxels per axis.
    labels_seen: the MAISI ids in the masks the ControlNet was trained on (None: all of them).
    """

    spacing_mm: Range | None = None
    fov_mm: Range | None = None
    max_shape: tuple[int, int, int] | None = None
    labels_seen: frozenset[int] | None = None
    body_regions: tuple[str, ...] = ()
    sources: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_metadata(cls, metadata: dict) -> "ModelDomain":
        block = metadata.get("domain") or {}

        def span(entry) -> Range | None:
            if not entry:
                return None
            return tuple(float(v) for v in entry["min"]), tuple(float(v) for v in entry["max"])

        labels = block.get("labels_seen")
        return cls(span(block.get("spacing_mm")), span(metadata.get("fov_mm")),
                   tuple(int(v) for v in block["max_shape"]) if block.get("max_shape") else None,
                   None if labels is None else frozenset(int(v) for v in labels),
                   tuple(block.get("body_regions", ())), dict(block.get("sources", {})))

    def describe(self) -> str:
        """One phrase: 'voxels of 3-4 x 3-4 x 3-4.5 mm, fields of view 384 x 384 x 96-384 mm, ...'."""
        parts = []
        if self.spacing_mm:
            parts.append(f"voxels of {_span_text(self.spacing_mm)} mm")
        if self.fov_mm:
            parts.append(f"fields of view of {_span_text(self.fov_mm)} mm")
        if self.max_shape:
            parts.append(f"at most {' x '.join(map(str, self.max_shape))} voxels")
        return ", ".join(parts) or "no recorded limits"

    def nearest_spacing(self, spacing) -> tuple[float, float, float]:
        """`spacing` with each axis clipped into the trained range (itself when inside)."""
        if not self.spacing_mm:
            return tuple(float(v) for v in spacing)
        low, high = self.spacing_mm
        return tuple(float(min(max(s, lo), hi)) for s, lo, hi in zip(spacing, low, high))

    def grid_problems(self, shape, spacing, fov_tolerance: float) -> list[str]:
        """Why a grid (voxels per axis, mm per voxel) is outside the domain; empty when inside."""
        problems = []
        if self.spacing_mm and tuple(spacing) != self.nearest_spacing(spacing):
            problems.append(f"voxels of {' x '.join(f'{v:g}' for v in spacing)} mm are outside the trained "
                            f"{_span_text(self.spacing_mm)} mm")
        fov = [n * s for n, s in zip(shape, spacing)]
        if self.fov_mm:
            low, high = self.fov_mm
            if any(f < lo / fov_tolerance or f > hi * fov_tolerance for f, lo, hi in zip(fov, low, high)):
                problems.append(f"a field of view of {' x '.join(f'{v:.0f}' for v in fov)} mm is more than "
                                f"{fov_tolerance:g}x outside the trained {_span_text(self.fov_mm)} mm")
        if self.max_shape and any(n > m for n, m in zip(shape, self.max_shape)):
            problems.append(f"{' x '.join(map(str, shape))} voxels exceed the largest trained volume "
                            f"({' x '.join(map(str, self.max_shape))})")
        return problems

    def unseen_labels(self, ids) -> list[int]:
        """The ids among `ids` that the ControlNet never saw in training (background never counts)."""
        if self.labels_seen is None:
            return []
        return sorted(int(i) for i in ids if int(i) != 0 and int(i) not in self.labels_seen)

    def to_dict(self) -> dict:
        def span(r):
            return None if r is None else {"min": list(r[0]), "max": list(r[1])}

        return {"spacing_mm": span(self.spacing_mm), "fov_mm": span(self.fov_mm),
                "max_shape": None if self.max_shape is None else list(self.max_shape),
                "labels_seen": None if self.labels_seen is None else sorted(self.labels_seen),
                "body_regions": list(self.body_regions), "sources": self.sources}


def _span_text(span: Range) -> str:
    """((3, 3, 3), (4, 4, 4.5)) -> '3-4 x 3-4 x 3-4.5'; an axis with one value shows it once."""
    return " x ".join(f"{lo:g}" if lo == hi else f"{lo:g}-{hi:g}" for lo, hi in zip(*span))


@dataclass(frozen=True)
class ModelInfo:
    """What a model folder holds, read without loading any weights (for checks before work)."""

    model_dir: Path
    layout: str  # "pt", "safetensors" or "released"
    cfg: Config
    metadata: dict[str, Any]
    scale_factor: float | None  # None: stored in unet.pt, read when the weights load

    @property
    def has_controlnet(self) -> bool:
        name = ckpt.RELEASED_FILES["controlnet"] if self.layout == "released" else f"controlnet.{self.layout}"
        return (self.model_dir / name).is_file()

    @property
    def fov_range_mm(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        return self.domain.fov_mm

    @property
    def domain(self) -> ModelDomain:
        return ModelDomain.from_metadata(self.metadata)


@dataclass
class Models:
    """The three networks in eval mode on one device, with what generation needs to know."""

    cfg: Config
    vae: nn.Module
    unet: nn.Module
    controlnet: nn.Module | None
    scale_factor: float
    metadata: dict[str, Any] = field(default_factory=dict)
    info: ModelInfo | None = None
    prefer_ema: bool = True

    @property
    def device(self) -> torch.device:
        net = next(n for n in (self.vae, self.unet, self.controlnet) if n is not None)
        return next(net.parameters()).device

    def weight_bytes(self, kinds: tuple[str, ...] = NETWORK_KINDS) -> int:
        nets = [getattr(self, k) for k in kinds if getattr(self, k) is not None]
        return sum(p.numel() * p.element_size() for n in nets for p in n.parameters())

    @property
    def has_diffusion(self) -> bool:
        """False after `release_diffusion` (until `restore_diffusion`)."""
        return self.unet is not None

    def release_diffusion(self) -> None:
        """Let go of the UNet and ControlNet (~1 GB for maisi-v2) while only the decoder is left to run,
        so a generation's peak memory is the larger of its two phases, not their sum."""
        if self.info is None:
            raise InvalidInput("these networks were not loaded from a model folder: releasing them could not be undone")
        self.unet = self.controlnet = None
        gc.collect()
        allocator.give_back_freed_memory()  # their freed weights would otherwise stay in the heap

    def restore_diffusion(self) -> float:
        """Read the UNet and ControlNet again after `release_diffusion`; returns the seconds it took."""
        if self.has_diffusion:
            return 0.0
        start = time.perf_counter()
        fresh = load_model(self.info, self.device, self.prefer_ema, kinds=("unet", "controlnet"))
        self.unet, self.controlnet = fresh.unet, fresh.controlnet
        return time.perf_counter() - start


def default_model_dir() -> Path:
    """The model bundled with the package (resources/models/default)."""
    return Path(str(resources.files("maisi2").joinpath("resources", "models", "default")))


def inference_config(cfg: Config) -> Config:
    """The config networks are built with for generation: VAE tensor splitting off.

    Splitting only trades speed for memory inside one call (same weights, outputs differ by
    ~1e-5); the tiled decoder bounds memory itself, and splitting fails on thin tiles.
    """
    return dataclasses.replace(cfg, vae=dataclasses.replace(cfg.vae, num_splits=1))


# -- reading a folder --------------------------------------------------------------------------

def read_model_info(model_dir: str | Path | None = None) -> ModelInfo:
    """Identify a model folder and read its config and metadata (no weights)."""
    model_dir = _existing_dir(model_dir)
    meta_file = model_dir / MODEL_JSON
    spec = read_description(meta_file, FORMAT, VERSION, "model") if meta_file.is_file() else None
    if (model_dir / ckpt.RELEASED_FILES["unet"]).is_file():
        metadata = {**RELEASED_METADATA, **(spec or {}).get("metadata", {})}
        return ModelInfo(model_dir, "released", get_config("maisi-v2"), metadata, None)
    if spec is None:
        raise MissingInput(
            f"{model_dir} is not a model folder: it has neither {MODEL_JSON} (a maisi2 model) nor the released "
            f"MAISI-v2 files ({', '.join(ckpt.RELEASED_FILES.values())})"
        )
    layout = _our_layout(model_dir)
    scale = spec.get("scale_factor")
    if layout == "safetensors" and scale is None:
        raise InvalidInput(f"{meta_file} needs a 'scale_factor' entry: safetensors weights do not carry it")
    return ModelInfo(model_dir, layout, _config_from_spec(spec, meta_file), dict(spec.get("metadata", {})),
                     None if scale is None else float(scale))


def _existing_dir(model_dir) -> Path:
    if model_dir is None:
        model_dir = default_model_dir()
        if not (model_dir / MODEL_JSON).is_file():
            raise MissingInput(
                f"no bundled model yet ({model_dir} is empty: the default model has not been trained and "
                "packaged). Pass --model DIR with a folder holding a maisi2 model (model.json + weights) or "
                "the released MAISI-v2 files (autoencoder_v1.pt, diff_unet_3d_rflow-ct.pt, controlnet_3d_rflow-ct.pt)"
            )
        return model_dir
    model_dir = Path(model_dir).expanduser()
    if not model_dir.is_dir():
        raise MissingInput(f"model folder {model_dir} does not exist (pass --model with an existing folder)")
    return model_dir


def read_description(path: Path, format: str, version: int, what: str) -> dict:
    """The JSON description of one of our folders (a model, a mask generator), refused with one line
    when it is not valid JSON, not of `format`, or written by a newer maisi2 than `version`."""
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InvalidInput(f"{path} is not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(spec, dict) or spec.get("format") != format:
        raise InvalidInput(f"{path} is not a maisi2 {what} description (expected \"format\": \"{format}\")")
    if int(spec.get("version", 0)) > version:
        raise InvalidInput(f"{path} was written by a newer maisi2 (version {spec['version']}); upgrade maisi2")
    return spec


def _config_from_spec(spec: dict, where: Path) -> Config:
    try:
        if "config" in spec:
            return Config.from_dict(spec["config"])
        if "preset" in spec:
            return get_config(spec["preset"], spec.get("overrides", []))
    except (ValueError, TypeError) as err:
        raise InvalidInput(f"{where}: invalid model config: {err}") from None
    raise InvalidInput(f"{where} names no network config: add \"preset\" (tiny, small, maisi-v2) or \"config\"")


def _our_layout(model_dir: Path) -> str:
    for layout in ("safetensors", "pt"):
        if all((model_dir / f"{kind}.{layout}").is_file() for kind in ("vae", "unet")):
            return layout
    raise MissingInput(
        f"{model_dir} has {MODEL_JSON} but not its weights: expected vae.pt, unet.pt, controlnet.pt "
        "(maisi2 checkpoints) or vae.safetensors, unet.safetensors, controlnet.safetensors"
    )


# -- one network, from any file ---------------------------------------------------------------

KIND_NAMES = {"vae": "VAE", "unet": "UNet", "controlnet": "ControlNet"}
_RELEASED_KEYS = {"unet": "unet_state_dict", "controlnet": "controlnet_state_dict"}


@dataclass
class NetworkWeights:
    """One network's weights as a file holds them, and what the file says about them."""

    kind: str
    state_dict: dict[str, torch.Tensor]
    config: Config | None  # None: the file carries no config (released files, raw exports)
    scale_factor: float | None
    source: str  # the file read
    used_ema: bool = False
    steps: int | None = None  # training steps these weights have had in all (our checkpoints)


def read_network(path: str | Path, kind: str, prefer_ema: bool = True) -> NetworkWeights:
    """The `kind` weights ("vae", "unet", "controlnet") in `path`: a file or a folder (see the module)."""
    if kind not in NETWORK_KINDS:
        raise InvalidInput(f"unknown network kind {kind!r}; choose from {', '.join(NETWORK_KINDS)}")
    path = Path(path).expanduser()
    if path.is_dir():
        return _read_from_folder(path, kind, prefer_ema)
    if not path.is_file():
        raise MissingInput(f"{path} does not exist: give a {KIND_NAMES[kind]} weights file or a folder holding one")
    if path.suffix == ".safetensors":
        return NetworkWeights(kind, ckpt.read_safetensors(path, f"{kind} weights"), None, None, str(path))
    data = ckpt.read_torch_file(path)
    if isinstance(data, dict) and data.get("format") == ckpt.FORMAT:
        found = ckpt.checkpoint_from_payload(data, path)
        if found.kind != kind and kind == "vae":
            raise InvalidInput(f"{path} is a '{found.kind}' checkpoint; --vae needs a VAE checkpoint "
                               "(made by `maisi2 train-vae`, or the released autoencoder_v1.pt)")
        if found.kind != kind:
            raise InvalidInput(f"{path} holds a {found.kind} checkpoint, not a {KIND_NAMES[kind]}")
        state = found.weights(prefer_ema)
        if kind == "vae":
            state = vae_state_only(state)
        return NetworkWeights(kind, state, found.config, found.scale_factor, str(path),
                              prefer_ema and found.ema_state_dict is not None, found.steps_in_all)
    key = _RELEASED_KEYS.get(kind)
    if key and isinstance(data, dict) and key in data:  # a released UNet / ControlNet file
        scale = data.get("scale_factor")
        scale = None if scale is None else float(torch.as_tensor(scale).reshape(-1)[0])
        return NetworkWeights(kind, data[key], None, scale, str(path))
    if isinstance(data, dict) and data and all(isinstance(v, torch.Tensor) for v in data.values()):
        return NetworkWeights(kind, data, None, None, str(path))  # a plain state dict (the released VAE)
    raise InvalidInput(f"{path} holds no {KIND_NAMES[kind]} weights maisi2 knows: neither a maisi2 checkpoint, "
                       f"the released {ckpt.RELEASED_FILES[kind]} nor a state dict of tensors")


def _read_from_folder(folder: Path, kind: str, prefer_ema: bool) -> NetworkWeights:
    """A model folder's `kind` file (its config and scale factor from model.json), else the released file."""
    if (folder / MODEL_JSON).is_file() and not (folder / ckpt.RELEASED_FILES["unet"]).is_file():
        info = read_model_info(folder)
        found = read_network(folder / f"{kind}.{info.layout}", kind, prefer_ema)
        # The folder's weights carry no history of their own: model.json's metadata says how long each
        # network trained and whether its weights were the EMA, so a re-export keeps both facts.
        steps = (info.metadata.get("trained_steps") or {}).get(kind)
        used_ema = (info.metadata.get("weights") or {}).get(kind) == "ema"
        return dataclasses.replace(found, config=info.cfg, scale_factor=info.scale_factor or found.scale_factor,
                                   steps=steps, used_ema=used_ema)
    released = folder / ckpt.RELEASED_FILES[kind]
    if not released.is_file():
        raise MissingInput(f"{folder} holds no {ckpt.RELEASED_FILES[kind]} and no {MODEL_JSON}; "
                           f"pass the {KIND_NAMES[kind]} weights file")
    return read_network(released, kind, prefer_ema)


def vae_state_only(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The VAE weights of a train-vae run state (``vae.*`` beside ``discriminator.*``), else `state`."""
    if state and all(k.startswith(("vae.", "discriminator.")) for k in state):
        return {k[len("vae."):]: v for k, v in state.items() if k.startswith("vae.")}
    return state


def load_network(path: str | Path, kind: str, device: str | torch.device | None = "cpu", prefer_ema: bool = True,
                 preset: str | None = None, overrides=()) -> tuple[nn.Module, Config, NetworkWeights]:
    """Build the `kind` network for the file's config (files without one: `preset`, default
    maisi-v2), with config `overrides`, and load the weights strictly; eval mode."""
    from maisi2.config import apply_overrides

    weights = read_network(path, kind, prefer_ema)
    if weights.config is not None and preset is not None and preset != weights.config.preset:
        raise InvalidInput(f"{path} was trained with preset {weights.config.preset!r}, not {preset!r}; drop --preset")
    cfg = apply_overrides(weights.config or get_config(preset or "maisi-v2"), list(overrides))
    net = ckpt.build_network(kind, cfg, device=device)
    ckpt.load_weights(net, weights.state_dict, kind, weights.source, cfg.preset)
    return net.eval(), cfg, weights


# -- loading ---------------------------------------------------------------------------------

def load_model(model_dir: str | Path | ModelInfo | None = None, device: str | torch.device | None = "cpu",
               prefer_ema: bool = True, kinds: tuple[str, ...] = NETWORK_KINDS,
               progress: Progress | None = None) -> Models:
    """Build the networks for the folder's config and load its weights strictly (eval mode).

    model_dir: a folder (see the module docstring), a `ModelInfo` from `read_model_info`, or None
    for the bundled model. The ControlNet is optional in the files; without it `Models.controlnet`
    is None and only unconditional sampling is possible. `kinds`: the networks to build (the others
    are None; `Models.restore_diffusion` reads only the UNet and ControlNet). progress: a
    `maisi2.progress.Progress` over 1 + the networks built: the weights read, then each network
    (what lets the web app cancel a job between them).
    """
    from maisi2.nets import resolve_device

    info = model_dir if isinstance(model_dir, ModelInfo) else read_model_info(model_dir)
    device = resolve_device(device)
    unknown = set(kinds) - set(NETWORK_KINDS)
    if unknown:
        raise InvalidInput(f"unknown network kinds {sorted(unknown)}; choose from {NETWORK_KINDS}")
    weights, scale_factor = _read_weights(info, prefer_ema, kinds)
    cfg = inference_config(info.cfg)
    wanted = [kind for kind in NETWORK_KINDS if kind in kinds and weights.get(kind) is not None]
    tick = counter(progress, 1 + len(wanted))
    tick()  # the weights are read
    built = dict.fromkeys(NETWORK_KINDS)
    for kind in wanted:
        # Built on the target device: the builders switch flash attention on only for CUDA.
        net = ckpt.build_network(kind, cfg, device=device)
        ckpt.load_weights(net, weights[kind], kind, _source(info, kind), info.cfg.preset)
        built[kind] = net.eval()
        tick()
    return Models(info.cfg, built["vae"], built["unet"], built["controlnet"], scale_factor, info.metadata, info,
                  prefer_ema)


def _source(info: ModelInfo, kind: str) -> str:
    if info.layout == "released":
        return str(info.model_dir / ckpt.RELEASED_FILES[kind])
    return str(info.model_dir / f"{kind}.{info.layout}")


def _read_weights(info: ModelInfo, prefer_ema: bool, kinds: tuple[str, ...] = NETWORK_KINDS) -> tuple[dict, float]:
    """State dicts by kind (controlnet may be None) and the latent scale factor.

    Files of kinds not asked for are not read, except the UNet's when it carries the scale factor
    and the released files (read together).
    """
    if info.layout == "released":
        released = read_released(info.model_dir)
        return {"vae": released.vae, "unet": released.unet, "controlnet": released.controlnet}, released.scale_factor
    weights, scale = {}, info.scale_factor
    for kind in NETWORK_KINDS:
        path = info.model_dir / f"{kind}.{info.layout}"
        if kind not in kinds and not (kind == "unet" and scale is None):
            continue
        if not path.is_file():
            weights[kind] = None
            continue
        found = read_network(path, kind, prefer_ema)
        weights[kind] = found.state_dict
        if scale is None:
            scale = found.scale_factor
    if scale is None:
        raise InvalidInput(f"neither {info.model_dir / MODEL_JSON} nor unet.pt records the latent scale_factor; "
                           "add \"scale_factor\" to model.json (it is stats.json's value from `maisi2 encode`)")
    return weights, float(scale)


@dataclass
class ReleasedWeights:
    vae: dict[str, torch.Tensor]
    unet: dict[str, torch.Tensor]
    controlnet: dict[str, torch.Tensor] | None
    scale_factor: float


def read_released(model_dir: str | Path) -> ReleasedWeights:
    """The released MAISI-v2 files of a local folder (weights only); the ControlNet is optional."""
    model_dir = Path(model_dir)
    files = {kind: model_dir / name for kind, name in ckpt.RELEASED_FILES.items()}
    missing = [f.name for k, f in files.items() if k != "controlnet" and not f.is_file()]
    if missing:
        raise MissingInput(
            f"{model_dir} lacks {', '.join(missing)}; expected the released MAISI-v2 files "
            f"({', '.join(ckpt.RELEASED_FILES.values())}) in that folder"
        )
    unet = read_network(files["unet"], "unet")
    if unet.scale_factor is None:
        raise InvalidInput(f"{files['unet']} has no 'scale_factor' entry; is it the rflow-ct UNet file?")
    controlnet = read_network(files["controlnet"], "controlnet").state_dict if files["controlnet"].is_file() else None
    return ReleasedWeights(vae=read_network(files["vae"], "vae").state_dict, unet=unet.state_dict,
                           controlnet=controlnet, scale_factor=unet.scale_factor)


# -- writing ---------------------------------------------------------------------------------

def save_model_folder(model_dir: str | Path, cfg: Config, vae: nn.Module, unet: nn.Module,
                      controlnet: nn.Module | None, scale_factor: float, metadata: dict | None = None,
                      layout: str = "pt", overwrite: bool = False) -> Path:
    """Write a model folder (ours) that `load_model` reads: model.json + weights, each file atomic."""
    if layout not in ("pt", "safetensors"):
        raise InvalidInput(f"layout must be 'pt' or 'safetensors', got {layout!r}")
    model_dir = Path(model_dir)
    nets = {"vae": vae, "unet": unet, "controlnet": controlnet}
    targets = [model_dir / MODEL_JSON] + [model_dir / f"{k}.{layout}" for k, n in nets.items() if n is not None]
    for path in targets:
        check_writable(path, overwrite)  # all-or-nothing: refuse before writing anything
    for kind, net in nets.items():
        if net is not None:
            _write_network(model_dir / f"{kind}.{layout}", kind, net, cfg, scale_factor, layout, overwrite)
    spec = {"format": FORMAT, "version": VERSION, "config": cfg.to_dict(), "scale_factor": float(scale_factor),
            "metadata": metadata or {}}
    with atomic_output(model_dir / MODEL_JSON, overwrite) as tmp:
        tmp.write_text(json.dumps(spec, indent=2))
    return model_dir


def _write_network(path: Path, kind: str, net: nn.Module, cfg: Config, scale_factor: float, layout: str,
                   overwrite: bool) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    if layout == "pt":
        ckpt.save_checkpoint(path, ckpt.Checkpoint(kind, cfg, state, scale_factor=float(scale_factor)), overwrite)
        return
    from safetensors.torch import save_file

    with atomic_output(path, overwrite) as tmp:
        save_file(state, str(tmp))
