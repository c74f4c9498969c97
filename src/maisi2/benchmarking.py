"""What the benchmarks share: process memory readings (Linux /proc; graceful elsewhere) and the
networks, mask and latent every variant of a benchmark starts from.

The scripts in benchmarks/ import it from the package (`from maisi2.benchmarking import ...`)
rather than from one another.
"""

from __future__ import annotations

import resource
from pathlib import Path


def status_mib(field: str) -> float | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MiB, or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the resident high-water mark (Linux clear_refs, value 5); False where not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return status_mib("VmHWM") is not None
    except OSError:
        return False


def peak_rss_mib() -> float:
    """The process's resident high-water mark: VmHWM, else ru_maxrss (peak over the whole process)."""
    return status_mib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- the benchmarks' inputs --------------------------------------------------------------------

SEED = 0


def networks(kinds, device, reference: bool, overrides=()):
    """The maisi-v2 networks with random weights from SEED (identical in every subprocess)."""
    import torch

    from maisi2 import fastops, nets
    from maisi2.config import get_config

    cfg = get_config("maisi-v2", list(overrides))
    torch.manual_seed(SEED)
    built = {}
    for kind in ("vae", "unet", "controlnet"):  # always all three, in one order: same weights each run
        model = {"vae": nets.build_vae, "unet": nets.build_unet, "controlnet": nets.build_controlnet}[kind](cfg)
        with torch.no_grad():
            for p in model.parameters():  # zero-initialised output convs would make everything trivial
                p.add_(torch.randn_like(p) * 0.01)
        if kind in kinds:
            if reference:
                fastops.restore_monai_layers(model)
            built[kind] = model.eval().to(device)
        else:
            del model
    return cfg, built


def latent_from_seed(shape):
    import torch

    return torch.randn((1, 4, *shape), generator=torch.Generator().manual_seed(SEED + 1))


def our_decode(vae, cfg, z, device, budget_gb, spill_dir=None, compute=None):
    """`generate`'s decode: the tile plan for the budget, the decoder's arithmetic from `compute`
    (a `maisi2.compute.ComputePlan`; None: float32)."""
    from maisi2 import autoencoder
    from maisi2.generate import memory_budget_bytes

    budget = memory_budget_bytes(budget_gb, device) - sum(p.numel() * 4 for p in vae.parameters())
    plan = autoencoder.plan_tiles(z.shape[2:], cfg.vae, budget, spill_dir=spill_dir)
    return autoencoder.decode_tiled(vae, z, plan, arithmetic=compute), plan.to_dict()


def phantom_conditioning(size: int):
    """The conditioning of a procedural phantom mask of size^3 voxels at 1.5 mm (seed SEED)."""
    from maisi2 import nets
    from maisi2.generate import phantom_mask

    volume = phantom_mask((size,) * 3, (1.5, 1.5, 1.5), seed=SEED)
    return nets.condition_on(volume.array, volume.spacing)
