"""Configuration of the mask generator: its two networks and how it samples, with named presets.

The mask generator is a latent diffusion model over label maps, as in the MAISI release:

* a mask autoencoder (MONAI `AutoencoderKlMaisi`): label map -> 4-channel latent (4x smaller per
  axis) -> 125 class logits per voxel (decoded by argmax, then mapped to MAISI ids);
* a latent UNet (MONAI `DiffusionModelUNet`) conditioned by cross-attention on the 10-slot
  anatomy-size vector (`maisi2.maskgen.sizes`).

Presets, as for the CT networks (`maisi2.config`):

* ``maisi-v2``: exactly the release's (reference/maisi/config_network_rflow.json,
  ``mask_generation_*``): latent [4, 64, 64, 64] = 256^3 voxels of 1.5 mm, DDPM with 1000 steps
  and MAISI's scaled-linear betas 0.0015-0.0195, so the released files load strictly;
* ``small`` and ``tiny``: the same architecture family, narrower and on coarser grids, sampled with
  rectified flow (`maisi2.flow`) in 30 Euler steps; ``tiny`` is for tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from maisi2.config import AutoencoderKLConfig, FlowConfig, JsonDataclass, set_dotted
from maisi2.errors import InvalidInput

__all__ = [
    "MaskAutoencoderConfig",
    "MaskUNetConfig",
    "MaskGenConfig",
    "MASK_PRESETS",
    "OBJECTIVES",
    "get_mask_config",
]

OBJECTIVES = ("ddpm", "rflow")


@dataclass(frozen=True)
class MaskAutoencoderConfig(AutoencoderKLConfig):
    """`AutoencoderKlMaisi` arguments of the mask autoencoder (release's values as defaults).

    in_channels: the label map enters as 8 bit-planes of its MAISI ids (as the ControlNet's mask);
    out_channels: one logit per mask-generator class (`labels.MASK_GENERATOR_CHANNEL_IDS`).
    Tensor splitting (off on small grids, where a split would be thinner than a kernel) and the
    fp16 group norm change no parameter.
    """

    num_channels: tuple[int, ...] = (32, 64, 128)
    num_res_blocks: tuple[int, ...] = (1, 2, 2)
    use_checkpointing: bool = True
    use_convtranspose: bool = True
    num_splits: int = 8
    in_channels: int = 8
    out_channels: int = 125


@dataclass(frozen=True)
class MaskUNetConfig:
    """`DiffusionModelUNet` arguments of the latent UNet (release's values as defaults)."""

    channels: tuple[int, ...] = (64, 128, 256, 512)
    attention_levels: tuple[bool, ...] = (False, False, True, True)
    num_head_channels: tuple[int, ...] = (0, 0, 32, 32)
    num_res_blocks: int = 2
    norm_num_groups: int = 32
    upcast_attention: bool = True
    cross_attention_dim: int = 10  # the anatomy-size vector's slots
    use_flash_attention: bool = True  # CUDA only; switched off elsewhere (same keys)


@dataclass(frozen=True)
class MaskGenConfig(JsonDataclass):
    """The mask generator: networks, latent grid and sampling.

    latent_shape: (C, x, y, z) of the latent the UNet samples; the mask is latent x
    ``autoencoder.downsample_factor`` voxels of ``spacing_mm`` (isotropic).
    objective: "ddpm" (the release: noise prediction, `ddpm.MAISI_DDPM_SCHEDULE`, 1000 steps) or
    "rflow" (ours: velocity prediction, `maisi2.flow`, ``flow.num_inference_steps`` Euler steps).
    scale_factor: latent scale used when no file records one (the release's config value).
    """

    preset: str = "maisi-v2"
    autoencoder: MaskAutoencoderConfig = field(default_factory=MaskAutoencoderConfig)
    unet: MaskUNetConfig = field(default_factory=MaskUNetConfig)
    latent_shape: tuple[int, ...] = (4, 64, 64, 64)
    spacing_mm: float = 1.5
    objective: str = "ddpm"
    scale_factor: float = 1.0055984258651733
    flow: FlowConfig = field(default_factory=lambda: FlowConfig(base_img_size_numel=64**3, use_timestep_transform=False))

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def mask_shape(self) -> tuple[int, int, int]:
        f = self.autoencoder.downsample_factor
        return tuple(int(n) * f for n in self.latent_shape[1:])


def _validate(cfg: MaskGenConfig) -> None:
    ae, unet = cfg.autoencoder, cfg.unet
    checks = [
        (cfg.objective in OBJECTIVES, f"objective must be one of {', '.join(OBJECTIVES)}, got {cfg.objective!r}"),
        (len(cfg.latent_shape) == 4 and cfg.latent_shape[0] == ae.latent_channels,
         f"latent_shape must be (latent_channels={ae.latent_channels}, x, y, z), got {cfg.latent_shape}"),
        (len(ae.num_res_blocks) == len(ae.attention_levels) == len(ae.num_channels),
         "autoencoder.num_channels, num_res_blocks and attention_levels must have equal length"),
        (len(unet.attention_levels) == len(unet.num_head_channels) == len(unet.channels),
         "unet.channels, attention_levels and num_head_channels must have equal length"),
        (all(c % ae.norm_num_groups == 0 for c in ae.num_channels),
         f"autoencoder.num_channels must be multiples of norm_num_groups={ae.norm_num_groups}"),
        (all(c % unet.norm_num_groups == 0 for c in unet.channels),
         f"unet.channels must be multiples of norm_num_groups={unet.norm_num_groups}"),
        (cfg.spacing_mm > 0, f"spacing_mm must be positive, got {cfg.spacing_mm}"),
    ]
    multiple = 2 ** (len(unet.channels) - 1)
    checks.append((all(n % multiple == 0 for n in cfg.latent_shape[1:]),
                   f"latent_shape {cfg.latent_shape[1:]} must be multiples of {multiple} (the UNet's downsampling)"))
    for ok, message in checks:
        if not ok:
            raise InvalidInput(f"mask generator config: {message}")


def _small() -> MaskGenConfig:
    # 64^3 voxels of 6 mm (384 mm per side, the release's 256 x 1.5 mm widened to hold a trunk).
    return MaskGenConfig(
        preset="small",
        autoencoder=MaskAutoencoderConfig(num_channels=(16, 32, 64), num_res_blocks=(1, 1, 1), norm_num_groups=8,
                                          use_checkpointing=False, num_splits=1, norm_float16=False),
        unet=MaskUNetConfig(channels=(32, 64, 64), attention_levels=(False, True, True), num_head_channels=(0, 16, 16),
                            num_res_blocks=1, norm_num_groups=8, use_flash_attention=False),
        latent_shape=(4, 16, 16, 16), spacing_mm=6.0, objective="rflow", scale_factor=1.0,
        flow=FlowConfig(base_img_size_numel=16**3),
    )


def _tiny() -> MaskGenConfig:
    return MaskGenConfig(
        preset="tiny",
        autoencoder=MaskAutoencoderConfig(num_channels=(8, 8, 16), num_res_blocks=(1, 1, 1), norm_num_groups=4,
                                          use_checkpointing=False, num_splits=1, norm_float16=False),
        unet=MaskUNetConfig(channels=(8, 16), attention_levels=(False, True), num_head_channels=(0, 8),
                            num_res_blocks=1, norm_num_groups=4, use_flash_attention=False),
        latent_shape=(4, 8, 8, 8), spacing_mm=12.0, objective="rflow", scale_factor=1.0,
        flow=FlowConfig(base_img_size_numel=8**3),
    )


MASK_PRESETS = {"tiny": _tiny, "small": _small, "maisi-v2": MaskGenConfig}


def get_mask_config(preset: str = "maisi-v2", overrides: list[str] | tuple[str, ...] = ()) -> MaskGenConfig:
    """A named mask-generator preset with dotted ``key=value`` overrides (values parsed as JSON)."""
    if preset not in MASK_PRESETS:
        raise InvalidInput(f"unknown mask generator preset {preset!r}; choose one of {', '.join(MASK_PRESETS)}")
    cfg = MASK_PRESETS[preset]()
    if not overrides:
        return cfg
    return MaskGenConfig.from_dict(set_dotted(cfg.to_dict(), overrides, what="mask generator config"))
