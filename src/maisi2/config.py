"""Frozen configuration dataclasses, named presets, dotted overrides and JSON round-trips.

A `Config` describes the networks (VAE, flow UNet, ControlNet) and the rectified-flow
schedule. Three presets exist:

* ``tiny``     - a few thousand parameters; every test runs on it in seconds on a CPU.
* ``small``    - the CPU demo model (the bundled default model uses it).
* ``maisi-v2`` - exactly the released architecture and scheduler
  (reference/maisi/config_network_rflow.json), so the released weights load strictly.

The ControlNet has no trunk settings of its own: its trunk must mirror the UNet's for the
residuals to fit, so the builder takes them from ``unet`` (one source, no way to disagree).

Usage::

    cfg = get_config("tiny", overrides=["unet.num_res_blocks=1"])
    cfg2 = Config.from_json(cfg.to_json())
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from maisi2.errors import InvalidInput

__all__ = [
    "JsonDataclass",
    "AutoencoderKLConfig",
    "VAEConfig",
    "UNetConfig",
    "ControlNetConfig",
    "FlowConfig",
    "Config",
    "PRESETS",
    "get_config",
    "apply_overrides",
    "set_dotted",
    "dataclass_from_dict",
]


class JsonDataclass:
    """JSON round-trips of a frozen config dataclass (the configs, the mask generator's config and
    the training recipes mix it in; all are stored as JSON in checkpoints and model folders)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        return dataclass_from_dict(cls, data)

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True)
class AutoencoderKLConfig:
    """The `AutoencoderKlMaisi` arguments shared by the CT VAE and the mask generator's autoencoder
    (`nets.build_autoencoder_kl` builds either). Volumes shrink 2**(len(num_channels)-1) per axis."""

    num_channels: tuple[int, ...] = (64, 128, 256)
    num_res_blocks: tuple[int, ...] = (2, 2, 2)
    latent_channels: int = 4
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    attention_levels: tuple[bool, ...] = (False, False, False)
    use_checkpointing: bool = False
    use_convtranspose: bool = False
    # The release splits tensors along one axis to save GPU memory; it changes outputs by ~1e-5
    # and fails on inputs thinner than a few voxels, so small presets turn it off (num_splits=1).
    num_splits: int = 4
    dim_split: int = 1
    # Released setting; it only works under fp16 autocast, so the builders turn it off for fp32
    # runs (same state-dict keys either way).
    norm_float16: bool = True

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.num_channels) - 1)


@dataclass(frozen=True)
class VAEConfig(AutoencoderKLConfig):
    """The CT VAE: one image channel in and out, the shared arguments plus non-local attention."""

    with_encoder_nonlocal_attn: bool = False
    with_decoder_nonlocal_attn: bool = False


@dataclass(frozen=True)
class UNetConfig:
    """`DiffusionModelUNetMaisi` arguments (also the ControlNet trunk)."""

    num_channels: tuple[int, ...] = (64, 128, 256, 512)
    attention_levels: tuple[bool, ...] = (False, False, True, True)
    num_head_channels: tuple[int, ...] = (0, 0, 32, 32)
    num_res_blocks: int = 2
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    num_class_embeds: int = 128  # modality ids (reference/maisi/modality_mapping.json)
    resblock_updown: bool = True
    include_fc: bool = True
    include_spacing_input: bool = True
    # Flash attention needs CUDA; `nets` turns it off elsewhere (same keys).
    use_flash_attention: bool = True


@dataclass(frozen=True)
class ControlNetConfig:
    """The ControlNet's own settings: how the label map is embedded.

    The label map enters as 8 bit-planes (ids 0..255) at image resolution; the embedding
    downsamples it len(conditioning_embedding_num_channels)-1 times, which must equal the VAE's
    number of downsamplings so the embedding lands on the latent grid.
    """

    conditioning_embedding_in_channels: int = 8
    conditioning_embedding_num_channels: tuple[int, ...] = (8, 32, 64)
    use_checkpointing: bool = True


@dataclass(frozen=True)
class FlowConfig:
    """Rectified-flow schedule, as MONAI's `RFlowScheduler` behind the released weights."""

    num_train_timesteps: int = 1000
    use_discrete_timesteps: bool = False
    use_timestep_transform: bool = True
    sample_method: str = "uniform"  # or "logit-normal"
    loc: float = 0.0
    scale: float = 1.4  # only used by logit-normal sampling
    base_img_size_numel: int = 32**3  # latent voxels at which the resolution shift is 1
    num_inference_steps: int = 30
    # Training loss of the UNet and the ControlNet: "l1" as the official code (default), "l2" the
    # squared error the paper writes (`maisi2.losses.flow_loss`).
    loss: str = "l1"


@dataclass(frozen=True)
class Config(JsonDataclass):
    preset: str = "maisi-v2"
    vae: VAEConfig = field(default_factory=VAEConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    controlnet: ControlNetConfig = field(default_factory=ControlNetConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    image_channels: int = 1
    modality: str = "ct"

    def __post_init__(self) -> None:
        _validate(self)


def _validate(cfg: Config) -> None:
    vae, unet, cn = cfg.vae, cfg.unet, cfg.controlnet
    n = len(vae.num_channels)
    if not (len(vae.num_res_blocks) == len(vae.attention_levels) == n):
        raise InvalidInput("vae.num_channels, vae.num_res_blocks and vae.attention_levels must have equal length")
    m = len(unet.num_channels)
    if not (len(unet.attention_levels) == len(unet.num_head_channels) == m):
        raise InvalidInput("unet.num_channels, unet.attention_levels and unet.num_head_channels must have equal length")
    for name, chans, groups in (("vae", vae.num_channels, vae.norm_num_groups), ("unet", unet.num_channels, unet.norm_num_groups)):
        bad = [c for c in chans if c % groups]
        if bad:
            raise InvalidInput(f"{name}.num_channels {list(chans)} must all be divisible by {name}.norm_num_groups={groups}")
    if len(cn.conditioning_embedding_num_channels) - 1 != n - 1:
        raise InvalidInput(
            "controlnet.conditioning_embedding_num_channels must have len(vae.num_channels) entries "
            f"({n}) so the mask embedding reaches the latent grid; got {len(cn.conditioning_embedding_num_channels)}"
        )
    if cfg.flow.sample_method not in ("uniform", "logit-normal"):
        raise InvalidInput(f"flow.sample_method must be 'uniform' or 'logit-normal', got {cfg.flow.sample_method!r}")
    if cfg.flow.loss not in ("l1", "l2"):  # the forms of maisi2.losses.flow_loss
        raise InvalidInput(f"flow.loss must be 'l1' (the official code) or 'l2' (the paper's squared error), got {cfg.flow.loss!r}")


def dataclass_from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build the (nested, frozen) dataclass `cls` from JSON data, checking keys and value types;
    shared by the config and the training recipes, which are stored as JSON in checkpoints.
    `path` prefixes key names in error messages."""
    if not isinstance(data, dict):
        raise InvalidInput(f"config section {path or '<root>'} must be an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise InvalidInput(f"unknown config key(s) {', '.join(path + k for k in unknown)}; valid: {', '.join(sorted(names))}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = dataclass_from_dict(hint, value, f"{path}{key}.")
        else:
            kwargs[key] = _coerce(value, hint, f"{path}{key}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Check and convert a JSON value to the annotated field type (lists become tuples)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):  # `X | None`: null, or an X
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None and len(options) < len(typing.get_args(hint)):
            return None
        if len(options) == 1:
            return _coerce(value, options[0], name)
    if origin is tuple:
        (item_type, _) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise InvalidInput(f"{name} must be a list, got {value!r}")
        return tuple(_coerce(v, item_type, name) for v in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise InvalidInput(f"{name} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidInput(f"{name} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidInput(f"{name} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise InvalidInput(f"{name} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config field type for {name}: {hint}")


# -- presets -------------------------------------------------------------------------------

def _narrow(preset: str, vae_channels: tuple[int, ...], unet_channels: tuple[int, ...], groups: int,
            head_channels: int, embedding_channels: tuple[int, ...], latent_side: int) -> Config:
    """A CPU-sized preset: the released layout with fewer channels, one res block per level,
    attention only at the bottom, no tensor splitting or fp16 norm, no flash attention and the
    flow's resolution shift at ``latent_side``^3 latent voxels."""
    return Config(
        preset=preset,
        vae=VAEConfig(num_channels=vae_channels, num_res_blocks=(1, 1, 1), norm_num_groups=groups, num_splits=1,
                      norm_float16=False),
        unet=UNetConfig(num_channels=unet_channels, attention_levels=(False, False, False, True),
                        num_head_channels=(0, 0, 0, head_channels), num_res_blocks=1, norm_num_groups=groups,
                        use_flash_attention=False),
        controlnet=ControlNetConfig(conditioning_embedding_num_channels=embedding_channels, use_checkpointing=False),
        flow=FlowConfig(base_img_size_numel=latent_side**3),
    )


def _tiny() -> Config:
    return _narrow("tiny", (8, 8, 16), (8, 8, 16, 16), groups=4, head_channels=8, embedding_channels=(8, 8, 8),
                   latent_side=8)


def _small() -> Config:
    return _narrow("small", (16, 32, 64), (16, 32, 64, 64), groups=8, head_channels=32,
                   embedding_channels=(8, 16, 32), latent_side=16)


PRESETS = {"tiny": _tiny, "small": _small, "maisi-v2": Config}


def get_config(preset: str = "maisi-v2", overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a named preset and apply dotted ``key=value`` overrides."""
    if preset not in PRESETS:
        raise InvalidInput(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return apply_overrides(PRESETS[preset](), overrides)


def set_dotted(data: dict[str, Any], overrides: list[str] | tuple[str, ...], what: str = "config") -> dict[str, Any]:
    """Apply ``section.key=value`` strings to a nested dict in place (value parsed as JSON, else a
    string) and return it. The one override parser for configs and training recipes."""
    for item in overrides:
        if "=" not in item:
            raise InvalidInput(f"{what} override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                sections = ", ".join(k for k, v in node.items() if isinstance(v, dict))
                raise InvalidInput(f"{what} override {key!r}: {part!r} is not a {what} section ({sections})")
            node = node[part]
        if parts[-1] not in node:
            raise InvalidInput(f"{what} override {key!r}: no such key; valid here: {', '.join(sorted(node))}")
        node[parts[-1]] = value
    return data


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """Apply ``section.key=value`` strings; the value is parsed as JSON, else taken as a string.

    >>> apply_overrides(get_config("tiny"), ["flow.num_inference_steps=10"]).flow.num_inference_steps
    10
    """
    data = set_dotted(cfg.to_dict(), overrides, what="config")
    return Config.from_dict(data)
