"""The three MAISI networks: building them from a config, and the one function that calls them.

* `build_vae`, `build_unet`, `build_controlnet` make MONAI's `AutoencoderKlMaisi`,
  `DiffusionModelUNetMaisi` and `ControlNetMaisi` from a `Config`. For the ``maisi-v2`` preset
  the state dicts have exactly the released keys and shapes.
* `predict_velocity` is the single place where the flow UNet (and, when given, the ControlNet) is
  called with the conditioning the released weights expect: spacing in mm x 100, the modality
  class id, and the label map as 8 bit-planes at image resolution.
* `embed_mask` runs the ControlNet's mask encoder once. It works at image resolution (64x the
  latent voxels) and depends on the mask alone, yet MONAI's ControlNet reruns it at every sampling
  step: about 40 % of a ControlNet call at a 32^3 latent. With the embedding in the conditioning,
  `predict_velocity` feeds it to the ControlNet trunk directly (`controlnet_residuals`); same result.

Every builder swaps in the faster, numerically equivalent layers of `maisi2.fastops` (same
parameters and keys). Two released settings only work on CUDA / under fp16 autocast (flash attention, fp16 group
norm). They do not change the parameters, so we switch them off where they cannot run and the
state-dict keys stay identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from maisi2.config import AutoencoderKLConfig, Config
from maisi2.errors import CannotRun, InvalidInput
from maisi2.fastops import accelerate
from maisi2.labels import load_resource_json

__all__ = [
    "build_autoencoder_kl",
    "build_vae",
    "build_unet",
    "build_controlnet",
    "Conditioning",
    "mask_to_bitplanes",
    "modality_id",
    "predict_velocity",
    "embed_mask",
    "controlnet_residuals",
    "controlnet_from_unet",
    "resolve_device",
    "condition_on",
    "SPACING_SCALE",
]

# The released UNet embeds spacing given in units of 0.01 mm (the official code multiplies by 100).
SPACING_SCALE = 100.0
_MASK_BITS = 8  # label ids 0..255 as 8 binary planes, least significant bit first


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """'cuda' when available and not told otherwise; never assumes a GPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CannotRun("--device cuda was requested but no CUDA device is available; use --device cpu")
    return device


def _flash_ok(requested: bool, device: torch.device | None) -> bool:
    return bool(requested and device is not None and device.type == "cuda")


def build_autoencoder_kl(a: AutoencoderKLConfig, in_channels: int, out_channels: int,
                         device: str | torch.device | None = None, fp16_norm: bool = False,
                         nonlocal_attn: tuple[bool, bool] = (False, False)) -> nn.Module:
    """MONAI's `AutoencoderKlMaisi` from its shared arguments (the CT VAE and the mask autoencoder).
    `fp16_norm` restores the released half-precision group norm (fp16 autocast only);
    `nonlocal_attn`: attention at the bottom of the (encoder, decoder)."""
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi

    model = AutoencoderKlMaisi(
        spatial_dims=3, in_channels=in_channels, out_channels=out_channels, latent_channels=a.latent_channels,
        num_channels=list(a.num_channels), num_res_blocks=list(a.num_res_blocks), norm_num_groups=a.norm_num_groups,
        norm_eps=a.norm_eps, attention_levels=list(a.attention_levels),
        with_encoder_nonlocal_attn=nonlocal_attn[0], with_decoder_nonlocal_attn=nonlocal_attn[1], use_flash_attention=False,
        use_checkpointing=a.use_checkpointing, use_convtranspose=a.use_convtranspose,
        num_splits=a.num_splits, dim_split=a.dim_split, norm_float16=bool(a.norm_float16 and fp16_norm),
    )
    accelerate(model)
    return model.to(device) if device is not None else model


def build_vae(cfg: Config, device: str | torch.device | None = None, fp16_norm: bool = False) -> nn.Module:
    """The VAE. `fp16_norm` restores the released half-precision group norm (fp16 autocast only)."""
    v = cfg.vae
    return build_autoencoder_kl(v, cfg.image_channels, cfg.image_channels, device, fp16_norm,
                                (v.with_encoder_nonlocal_attn, v.with_decoder_nonlocal_attn))


def _trunk_kwargs(cfg: Config, device) -> dict:
    u = cfg.unet
    return dict(
        spatial_dims=3, in_channels=cfg.vae.latent_channels, num_channels=list(u.num_channels),
        attention_levels=list(u.attention_levels), num_head_channels=list(u.num_head_channels),
        num_res_blocks=u.num_res_blocks, norm_num_groups=u.norm_num_groups, norm_eps=u.norm_eps,
        num_class_embeds=u.num_class_embeds, resblock_updown=u.resblock_updown, include_fc=u.include_fc,
        use_flash_attention=_flash_ok(u.use_flash_attention, device),
    )


def build_unet(cfg: Config, device: str | torch.device | None = None) -> nn.Module:
    """The latent flow UNet (predicts the velocity v = x0 - noise)."""
    from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi

    device = torch.device(device) if device is not None else None
    model = DiffusionModelUNetMaisi(
        out_channels=cfg.vae.latent_channels, include_spacing_input=cfg.unet.include_spacing_input,
        include_top_region_index_input=False, include_bottom_region_index_input=False,
        **_trunk_kwargs(cfg, device),
    )
    accelerate(model)
    return model.to(device) if device is not None else model


def build_controlnet(cfg: Config, device: str | torch.device | None = None) -> nn.Module:
    """The ControlNet; its trunk mirrors the UNet's so its residuals fit the UNet's skips."""
    from monai.apps.generation.maisi.networks.controlnet_maisi import ControlNetMaisi

    device = torch.device(device) if device is not None else None
    c = cfg.controlnet
    model = ControlNetMaisi(
        conditioning_embedding_in_channels=c.conditioning_embedding_in_channels,
        conditioning_embedding_num_channels=list(c.conditioning_embedding_num_channels),
        use_checkpointing=c.use_checkpointing, **_trunk_kwargs(cfg, device),
    )
    accelerate(model)
    return model.to(device) if device is not None else model


def controlnet_from_unet(controlnet: nn.Module, unet: nn.Module) -> tuple[int, int]:
    """Initialise a ControlNet from the flow UNet where names and shapes match.

    The ControlNet has no spacing input, so its time-embedding projections are narrower than the
    UNet's and stay freshly initialised. Returns (copied, total) tensor counts.
    """
    source = unet.state_dict()
    target = controlnet.state_dict()
    copied = {k: v for k, v in source.items() if k in target and target[k].shape == v.shape}
    target.update(copied)
    controlnet.load_state_dict(target)
    return len(copied), len(target)


# -- conditioning and the network call -----------------------------------------------------

def modality_id(name: str) -> int:
    """Class id of a modality name (packaged modality_mapping.json; 'ct' = 1)."""
    table = load_resource_json("modality_mapping.json")
    if name not in table:
        raise InvalidInput(f"unknown modality {name!r}; choose one of {', '.join(table)}")
    return int(table[name])


def mask_to_bitplanes(labels: torch.Tensor) -> torch.Tensor:
    """(B, 1, X, Y, Z) integer label map -> (B, 8, X, Y, Z) float bit-planes, LSB first.

    Ids must lie in 0..255 (MAISI ids do: 1..132 and 200).
    """
    if labels.dim() != 5 or labels.shape[1] != 1:
        raise InvalidInput(f"label map must have shape (B, 1, X, Y, Z), got {tuple(labels.shape)}")
    ids = labels.to(torch.int32)
    if ids.min() < 0 or ids.max() > 255:
        raise InvalidInput("label ids must lie in 0..255 to be encoded as 8 bit-planes")
    bits = torch.arange(_MASK_BITS, device=labels.device, dtype=torch.int32).view(1, -1, 1, 1, 1)
    return ((ids >> bits) & 1).float()


@dataclass
class Conditioning:
    """What the networks are conditioned on, batched.

    spacing: (B, 3) voxel size in mm of the *image* (not the latent).
    modality: (B,) int64 modality class ids.
    mask_bits: (B, 8, X, Y, Z) bit-planes of the label map at image resolution, or None
        (no ControlNet).
    mask_embedding: the ControlNet's encoding of `mask_bits` (B, C0, x, y, z) at latent resolution,
        when computed once beforehand (`embed_mask`); None: the ControlNet encodes the mask itself.
    """

    spacing: torch.Tensor
    modality: torch.Tensor
    mask_bits: torch.Tensor | None = None
    mask_embedding: torch.Tensor | None = None

    def to(self, device) -> "Conditioning":
        bits = None if self.mask_bits is None else self.mask_bits.to(device)
        embedding = None if self.mask_embedding is None else self.mask_embedding.to(device)
        return Conditioning(self.spacing.to(device), self.modality.to(device), bits, embedding)


def condition_on(labels, spacing, modality: str = "ct", batch: int = 1, device=None) -> Conditioning:
    """The conditioning of `batch` samples on one grid: `spacing` (mm, three numbers) and the
    modality for each, and, when `labels` (an (X, Y, Z) integer MAISI label map, numpy or torch) is
    given, its bit-planes for the ControlNet. What a caller would otherwise assemble by hand."""
    mask_bits = None
    if labels is not None:
        ids = torch.as_tensor(labels).to(torch.int64)[None, None]
        mask_bits = mask_to_bitplanes(ids).expand(batch, -1, -1, -1, -1) if batch > 1 else mask_to_bitplanes(ids)
    cond = Conditioning(torch.tensor([tuple(spacing)] * batch, dtype=torch.float32),
                        torch.full((batch,), modality_id(modality), dtype=torch.long), mask_bits)
    return cond if device is None else cond.to(device)


def predict_velocity(
    unet: nn.Module,
    x_t: torch.Tensor,
    t: torch.Tensor,
    cond: Conditioning,
    controlnet: nn.Module | None = None,
    control_scale: float = 1.0,
) -> torch.Tensor:
    """v = model(x_t, t | spacing, modality[, mask]): the single home of the network call.

    x_t: (B, C, x, y, z) latent; t: (B,) timesteps in [0, T] (T = pure noise).
    With a ControlNet and mask bit-planes, the ControlNet's residuals are added to the UNet's
    skips and middle block.
    """
    t = t.to(x_t.device, torch.float32).reshape(-1).expand(x_t.shape[0])
    residuals = {}
    if controlnet is not None:
        down, mid = controlnet_residuals(controlnet, x_t, t, cond, control_scale)
        residuals = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
    spacing = cond.spacing.to(x_t.device, torch.float32) * SPACING_SCALE
    return unet(x=x_t, timesteps=t, class_labels=cond.modality, spacing_tensor=spacing, **residuals)


@torch.no_grad()
def embed_mask(controlnet: nn.Module, cond: Conditioning) -> Conditioning:
    """`cond` with the ControlNet's mask embedding computed once (what every sampling step reuses)."""
    if cond.mask_bits is None:
        raise InvalidInput("embed_mask needs the mask bit-planes in the conditioning")
    weight = next(controlnet.controlnet_cond_embedding.parameters())
    embedding = controlnet.controlnet_cond_embedding(cond.mask_bits.to(weight.device, weight.dtype))
    return Conditioning(cond.spacing, cond.modality, cond.mask_bits, embedding)


def controlnet_residuals(controlnet: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                         scale: float = 1.0) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The ControlNet's residuals (down-block list, middle block) for the UNet, as
    `ControlNetMaisi.forward` computes them.

    With ``cond.mask_embedding`` (from `embed_mask`) the mask embedding is not recomputed: the same
    steps run through MONAI's own stages (time + class embedding, conv_in plus the embedding, down
    blocks, middle block, zero convolutions, conditioning scale), so the result is identical.
    """
    t = t.to(x_t.device, torch.float32).reshape(-1).expand(x_t.shape[0])
    if cond.mask_embedding is not None:
        emb = controlnet._prepare_time_and_class_embedding(x_t, t, cond.modality)
        h = controlnet._apply_initial_convolution(x_t) + cond.mask_embedding.to(x_t.dtype)
        down, h = controlnet._apply_down_blocks(emb, None, h)
        h = controlnet._apply_mid_block(emb, None, h)
        down, mid = controlnet._apply_controlnet_blocks(h, down)
        return [d * scale for d in down], mid * scale
    if cond.mask_bits is None:
        raise InvalidInput("a ControlNet needs the mask bit-planes (or their embedding) in the conditioning")
    return controlnet(x=x_t, timesteps=t, controlnet_cond=cond.mask_bits, conditioning_scale=scale,
                      class_labels=cond.modality)
