"""The mask generator's two networks: building them from a `MaskGenConfig`, and the calls.

* `build_mask_autoencoder`: MONAI `AutoencoderKlMaisi` (8 bit-planes in, 125 class logits out);
* `build_mask_unet`: MONAI `DiffusionModelUNet` with cross-attention on the anatomy-size vector;
* `predict`: the one call of the UNet, ``(x_t, t, sizes) -> output`` (noise for the release's
  DDPM, velocity for our rectified flow), sizes entering as a one-token context (B, 1, 10);
* `encode_masks` / `decode_logits`: label maps <-> latents (the latent is the posterior mean
  times the scale factor, as for the CT latents).

For the ``maisi-v2`` preset the state dicts have exactly the keys and shapes of MONAI's classes
built with the release's arguments (reference/maisi/config_network_rflow.json), so the released
files load strictly. Both builders swap in `maisi2.fastops`' numerically equivalent faster layers
(same parameters and keys), as the CT networks' builders do. Settings that change no parameter and cannot run on a CPU (flash attention,
the fp16 group norm) are switched off there.
"""

from __future__ import annotations

import torch
from torch import nn

from maisi2.errors import InvalidInput
from maisi2.fastops import accelerate
from maisi2.maskgen.config import MaskGenConfig
from maisi2.nets import build_autoencoder_kl, mask_to_bitplanes

__all__ = ["build_mask_autoencoder", "build_mask_unet", "predict", "encode_masks", "decode_logits", "decode_to_classes",
           "reconstruct_classes", "DECODE_SLAB", "DECODE_HALO"]

# The release's 64^3 latent decodes to 125 x 256^3 logits: 8.4 GB in float32. `decode_to_classes`
# decodes slabs of DECODE_SLAB latent rows (plus DECODE_HALO rows of context on each side, whose
# output is dropped) and keeps only each voxel's argmax: ~2 GB at the release's size.
DECODE_SLAB = 8
DECODE_HALO = 4


def build_mask_autoencoder(cfg: MaskGenConfig, device: str | torch.device | None = None,
                           fp16_norm: bool = False) -> nn.Module:
    a = cfg.autoencoder
    return build_autoencoder_kl(a, a.in_channels, a.out_channels, device, fp16_norm)


def build_mask_unet(cfg: MaskGenConfig, device: str | torch.device | None = None) -> nn.Module:
    from monai.networks.nets.diffusion_model_unet import DiffusionModelUNet

    u = cfg.unet
    device = torch.device(device) if device is not None else None
    model = DiffusionModelUNet(
        spatial_dims=3, in_channels=cfg.latent_shape[0], out_channels=cfg.latent_shape[0], channels=list(u.channels),
        attention_levels=list(u.attention_levels), num_head_channels=list(u.num_head_channels),
        num_res_blocks=u.num_res_blocks, norm_num_groups=u.norm_num_groups, with_conditioning=True,
        upcast_attention=u.upcast_attention, cross_attention_dim=u.cross_attention_dim,
        use_flash_attention=bool(u.use_flash_attention and device is not None and device.type == "cuda"),
    )
    accelerate(model)
    return model.to(device) if device is not None else model


def predict(unet: nn.Module, x_t: torch.Tensor, t: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """The UNet's output at (x_t, t) given anatomy-size vectors.

    x_t: (B, C, x, y, z); t: (B,) times (DDPM: integer steps 0..999; flow: [0, T], T = noise);
    sizes: (B, 10) anatomy-size vectors, fed as a single cross-attention token (B, 1, 10),
    as the release conditions its mask UNet.
    """
    if sizes.dim() != 2:
        raise InvalidInput(f"sizes must have shape (B, slots), got {tuple(sizes.shape)}")
    t = t.to(x_t.device, torch.float32).reshape(-1).expand(x_t.shape[0])
    return unet(x=x_t, timesteps=t, context=sizes.to(x_t.device, x_t.dtype)[:, None, :])


def encode_masks(autoencoder: nn.Module, labels: torch.Tensor, scale_factor: float = 1.0) -> torch.Tensor:
    """(B, 1, X, Y, Z) MAISI ids -> (B, C, X/f, Y/f, Z/f) latents: posterior mean x scale_factor."""
    z_mu, _ = autoencoder.encode(mask_to_bitplanes(labels))
    return z_mu * scale_factor


def decode_logits(autoencoder: nn.Module, latent: torch.Tensor, scale_factor: float = 1.0) -> torch.Tensor:
    """(B, C, x, y, z) latents -> (B, 125, fx, fy, fz) class logits (what argmax turns into a mask)."""
    return autoencoder.decode_stage_2_outputs(latent / scale_factor)


@torch.no_grad()
def decode_to_classes(autoencoder: nn.Module, latent: torch.Tensor, scale_factor: float = 1.0,
                      slab: int = DECODE_SLAB, halo: int = DECODE_HALO) -> torch.Tensor:
    """(1, C, x, y, z) latent -> (X, Y, Z) int64 class indices (argmax of the logits), slab by slab
    along the first axis. Each slab sees `halo` latent rows of context on both sides, so its group
    norms see most of the volume's neighbourhood, as the release's sliding windows do; a latent of
    at most `slab` rows is decoded whole."""
    rows = latent.shape[2]
    if rows <= slab:
        return decode_logits(autoencoder, latent, scale_factor)[0].argmax(dim=0).cpu()
    factor = None
    parts = []
    for start in range(0, rows, slab):
        lo, hi = max(start - halo, 0), min(start + slab + halo, rows)
        logits = decode_logits(autoencoder, latent[:, :, lo:hi], scale_factor)[0]
        factor = factor or logits.shape[1] // (hi - lo)
        keep = slice((start - lo) * factor, (min(start + slab, rows) - lo) * factor)
        parts.append(logits[:, keep].argmax(dim=0).cpu())
        del logits
    return torch.cat(parts, dim=0)


@torch.no_grad()
def reconstruct_classes(autoencoder: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """(1, 1, X, Y, Z) MAISI ids -> (X, Y, Z) class indices the autoencoder gives back through its
    posterior mean (what the latent UNet learns to sample), for measuring how well it reconstructs."""
    return decode_to_classes(autoencoder, encode_masks(autoencoder, labels))
