"""Sampling a mask: sizes -> latent (DDPM-1000 or rectified flow) -> logits -> clean MAISI label map.

`generate_mask` reads as steps:

1. complete the requested sizes into a 10-slot vector (`SizeTable.complete`), or take a full vector;
2. sample a latent from noise with the UNet conditioned on it: the release's DDPM (all 1000 steps,
   `maisi2.ddpm`, MONAI's scheduler) or our rectified flow (`maisi2.flow`, Euler steps);
3. decode it to 125 class logits with the mask autoencoder, argmax, class -> MAISI id;
4. clean it (`postprocess.clean_mask`) on the generator's grid (256^3 x 1.5 mm for the release);
5. resample (nearest) to the requested spacing and centre-pad/crop to the requested shape.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch

from maisi2 import ddpm, flow, volume_io
from maisi2.errors import InvalidInput
from maisi2.maskgen import networks, postprocess
from maisi2.maskgen.files import MaskGenerator
from maisi2.maskgen.sizes import SLOTS, check_requested, requested_tumor

__all__ = ["MaskSample", "sample_latent", "size_vector", "generate_mask", "DEFAULT_FLOW_STEPS"]

DEFAULT_FLOW_STEPS = 30


@dataclass
class MaskSample:
    """A generated mask and how it was made."""

    volume: volume_io.Volume  # on the requested grid (or the generator's when none was asked for)
    native: volume_io.Volume  # on the generator's grid, after cleaning
    size_vector: list[float]
    seed: int
    steps: int
    sampler: str
    seconds: dict[str, float] = field(default_factory=dict)

    def describe(self) -> dict:
        return {"size_vector": dict(zip(SLOTS, self.size_vector)), "seed": self.seed, "steps": self.steps,
                "sampler": self.sampler, "native_shape": list(self.native.shape),
                "native_spacing": list(self.native.spacing), "seconds": self.seconds}


def size_vector(generator: MaskGenerator, sizes: Mapping[str, float] | Sequence[float]) -> np.ndarray:
    """A full (10,) vector: given as one, or completed from the generator's size table."""
    if not isinstance(sizes, Mapping):
        vector = np.asarray(sizes, dtype=np.float32)
        if vector.shape != (len(SLOTS),):
            raise InvalidInput(f"a size vector needs {len(SLOTS)} values ({', '.join(SLOTS)}), got shape {vector.shape}")
        check_requested(dict(zip(SLOTS, vector.tolist())))
        return vector
    check_requested(sizes)
    if len(sizes) == len(SLOTS):
        return np.asarray([sizes[n] for n in SLOTS], dtype=np.float32)
    if generator.size_table is None:
        raise InvalidInput(
            f"{generator.model_dir} has no table of known anatomy sizes to fill the slots not given "
            f"({', '.join(n for n in SLOTS if n not in sizes)}): give all ten, or put the release's "
            "all_anatomy_size_conditions.json in that folder"
        )
    return generator.size_table.complete(sizes)


@torch.no_grad()
def sample_latent(generator: MaskGenerator, vectors: torch.Tensor, noise: torch.Tensor, steps: int | None = None,
                  rng: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
    """Latents (B, C, x, y, z) from `noise` for size vectors (B, 10).

    DDPM (the release) takes exactly 1000 ancestral steps; its per-step noise comes from `rng`
    (the global RNG when None, as MONAI's own loop). Rectified flow takes `steps` Euler steps
    (default 30) on the exact float64 grid.
    """
    cfg, unet = generator.cfg, generator.unet
    vectors = vectors.to(noise.device, noise.dtype)

    def model(x, t):
        return networks.predict(unet, x, t, vectors)

    if cfg.objective == "ddpm":
        if steps not in (None, 1000):
            raise InvalidInput(f"the DDPM mask generator samples with all 1000 steps; got steps={steps}")
        return ddpm.sample_ddpm(model, noise, 1000, generator=rng, progress=progress)
    steps = steps or cfg.flow.num_inference_steps or DEFAULT_FLOW_STEPS
    timesteps, next_timesteps = flow.inference_timesteps(steps, noise.shape[2:], cfg.flow, exact=True)
    return flow.sample_euler(model, noise, timesteps, next_timesteps, cfg.flow.num_train_timesteps, progress)


def generate_mask(generator: MaskGenerator, sizes: Mapping[str, float] | Sequence[float], seed: int = 0,
                  steps: int | None = None, shape: Sequence[int] | None = None,
                  spacing: Sequence[float] | None = None, progress: bool = False) -> MaskSample:
    """One mask for the requested anatomy sizes (see the module docstring for the steps)."""
    started = time.perf_counter()
    # 1. the size vector
    vector = size_vector(generator, sizes)
    cfg, device = generator.cfg, generator.device
    # 2. the latent
    rng = torch.Generator(device=device).manual_seed(int(seed))
    noise = torch.randn((1, *cfg.latent_shape), generator=rng, device=device)
    latent = sample_latent(generator, torch.from_numpy(vector)[None], noise, steps, rng, progress)
    sampled = time.perf_counter()
    # 3. logits -> MAISI ids
    ids = postprocess.classes_to_ids(networks.decode_to_classes(generator.autoencoder, latent, generator.scale_factor))
    decoded = time.perf_counter()
    # 4. clean on the generator's grid
    native = volume_io.Volume(postprocess.clean_mask(ids, requested_tumor(vector)), volume_io.ras_affine([cfg.spacing_mm] * 3))
    cleaned = time.perf_counter()
    # 5. onto the requested grid
    volume = _to_request(native, shape, spacing)
    used = 1000 if cfg.objective == "ddpm" else (steps or cfg.flow.num_inference_steps or DEFAULT_FLOW_STEPS)
    seconds = {"sample": sampled - started, "decode": decoded - sampled, "clean": cleaned - decoded,
               "total": time.perf_counter() - started}
    return MaskSample(volume, native, [float(v) for v in vector], int(seed), used, cfg.objective, seconds)


def _to_request(native: volume_io.Volume, shape, spacing) -> volume_io.Volume:
    from maisi2.data import center_pad_or_crop
    from maisi2.labels import BACKGROUND

    volume = native
    if spacing is not None and not np.allclose(spacing, native.spacing, rtol=1e-4):
        volume = volume_io.resample_to_spacing(native, spacing, order=0)
    if shape is not None and tuple(shape) != tuple(volume.shape):
        array = center_pad_or_crop(volume.array, tuple(int(n) for n in shape), fill=BACKGROUND)
        volume = volume_io.Volume(array.astype(np.int16), volume_io.ras_affine(volume.spacing))
    return volume
