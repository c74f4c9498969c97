"""What the experiments share: phantom data on one small grid, the bundled VAE, results files.

Every experiment works in its own folder (``--work``), writes each expensive product there once
(phantom arrays, latents, checkpoints, samples) and reuses it when run again, so an interrupted
run continues where it stopped. Results go to ``results.json`` in that folder and are turned into
tables/plots for docs/results.md by the experiment itself.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from maisi2 import ddpm, flow, latents, nets, volume_io
from maisi2.atomic import atomic_output
from maisi2.data import center_pad_or_crop, hu_to_unit, unit_to_hu
from maisi2.label_import import convert_totalseg
from maisi2.labels import BACKGROUND, LUNG_IDS, label_id
from maisi2.latents import LatentRecord
from maisi2.masks.tumors import implant_random_balls
from maisi2.models import load_model, load_network
from maisi2.phantom import TumorSpec, make_phantom, random_tumors
from maisi2.sampling import sample_latent

# The miniature grid: one of the bundled VAE's training grids (96 x 96 x 64 at 4 mm, a 38 x 38 x 26 cm
# field of view), so its reconstructions are as good as that VAE gets; the latent is 24 x 24 x 16,
# small enough to train and sample on 2 cores. (In a smoke run at 6 mm, a grid the VAE never saw,
# its reconstructions alone scored a 2.5D FID 36x that of one phantom set against another.)
GRID_SHAPE = (96, 96, 64)
GRID_SPACING = (4.0, 4.0, 4.0)


# Phantom seeds, disjoint: training volumes, the FID reference set, held-out test volumes.
def train_seeds(n: int) -> range:
    return range(5000, 5000 + n)


def reference_seeds(n: int) -> range:
    return range(7000, 7000 + n)


def test_seeds(n: int) -> range:
    return range(9000, 9000 + n)


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def phantom_arrays(folder: Path, seeds: range, shape=GRID_SHAPE, spacing=GRID_SPACING,
                   at_least_one_tumor: bool = False,
                   lung_radius_mm: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(N, X, Y, Z) float32 HU and uint8 labels of random-lesion phantoms, cached as one .npz.
    at_least_one_tumor: a phantom whose random draw has no lesion gets a hepatic one.
    lung_radius_mm: instead of random lesions, 1 or 2 lung tumours of this radius range and nothing else."""
    tag = "_tumour" if at_least_one_tumor else ""
    if lung_radius_mm is not None:
        tag += f"_lung{lung_radius_mm[0]:g}-{lung_radius_mm[1]:g}mm"
    path = folder / f"phantoms_{seeds.start}_{seeds.stop}{tag}.npz"
    for cached in sorted(folder.glob(f"phantoms_{seeds.start}_*{tag}.npz")):  # the same seeds, or more of them
        stop = cached.name[len(f"phantoms_{seeds.start}_"):-len(f"{tag}.npz")]
        if stop.isdigit() and int(stop) >= seeds.stop:
            data = np.load(cached)
            return data["ct"][: len(seeds)], data["labels"][: len(seeds)]
    cts, labels = [], []
    for seed in seeds:
        ct, lab = _phantom_that_fits(shape, spacing, seed, at_least_one_tumor, lung_radius_mm)
        cts.append(ct.astype(np.float32))
        labels.append(lab)
    ct, lab = np.stack(cts), np.stack(labels)
    with atomic_output(path, overwrite=True) as tmp:  # only reached when no cache covers these seeds
        np.savez(tmp, ct=ct, labels=lab)
    return ct, lab


def _phantom_that_fits(shape, spacing, seed: int, at_least_one_tumor: bool = False, lung_radius_mm=None):
    """A random-lesion phantom (or one with 1-2 lung tumours of `lung_radius_mm`); a lesion kind that
    cannot fit at this coarse spacing (a thin pancreas) is dropped and the phantom drawn again with
    the rest of its lesions."""
    rng = np.random.default_rng(seed)
    if lung_radius_mm is not None:
        tumors = [TumorSpec("lung", 1 + int(rng.integers(2)), tuple(lung_radius_mm))]
    else:
        tumors = random_tumors(rng)
    if at_least_one_tumor and not tumors:
        tumors = [TumorSpec("hepatic", 1, (5.0, 20.0))]
    while True:
        try:
            ct, labels, _ = make_phantom(shape, spacing, tumors, seed=seed)
            return ct, labels
        except ValueError as err:
            misfit = [t for t in tumors if f"a {t.kind} lesion" in str(err)]
            if not misfit:
                raise
            tumors = [t for t in tumors if t is not misfit[0]]


LIVER, HEPATIC_TUMOR = label_id("liver"), label_id("hepatic tumor")
# Tumour kinds edit_mask can implant: (the labels a tumour may replace, the tumour's label).
IMPLANTS = {
    "hepatic": ((LIVER,), HEPATIC_TUMOR),
    "lung": (LUNG_IDS, label_id("lung tumor")),
}

# Lung tumours implanted by experiments 2 and 3: large enough for the bundled VAE to give back
# (on this grid it keeps lung tumours of ~140+ voxels, i.e. radius 13 mm+: experiments/vae_ceiling.py).
LUNG_IMPLANT_RADIUS_MM = (14.0, 20.0)


def edit_mask(labels: np.ndarray, rng: np.random.Generator, radius_mm=(8.0, 16.0), spacing=GRID_SPACING,
              kind: str = "hepatic") -> np.ndarray:
    """Tumours out, then 1-2 balls of `kind` (IMPLANTS) inside their organ, on the experiments' grid
    (`maisi2.masks.tumors.implant_random_balls`)."""
    return implant_random_balls(labels, rng, radius_mm, spacing, kind)


REAL_SCANS = Path(__file__).resolve().parents[2] / "shared" / "data" / "totalsegmentator"


def real_scan_on_grid() -> tuple[np.ndarray, np.ndarray] | None:
    """The real abdominal scan of ../shared/data (TotalSegmentator's example_ct_sm, 122 x 101 x 30 at
    3 mm) and its label map imported to MAISI ids, resampled to the experiment's 4 mm and centre
    padded to its grid (CT with -1000 HU, labels with background): (hu, labels), or None when the
    folder is absent. Its slab is 9 cm thick, so most of the grid's 25.6 cm in z is empty."""
    seg_path, ct_path = REAL_SCANS / "example_seg.nii.gz", REAL_SCANS / "example_ct_sm.nii.gz"
    if not (seg_path.is_file() and ct_path.is_file()):
        return None
    ct, seg = volume_io.load_ct(ct_path), volume_io.load_label_map(seg_path, check_ids=False)
    labels, _ = convert_totalseg(seg.array, ct.array, spacing=seg.spacing)
    labels = volume_io.resample_to_spacing(seg.with_array(labels), GRID_SPACING, order=0).array
    hu = volume_io.resample_to_spacing(ct, GRID_SPACING, order=1).array
    return (center_pad_or_crop(hu.astype(np.float32), GRID_SHAPE, fill=-1000.0),
            center_pad_or_crop(labels, GRID_SHAPE, fill=BACKGROUND))


def bundled_vae():
    """(vae, config) of the bundled default model, eval mode, CPU."""
    models = load_model(None, device="cpu")
    return models.vae, models.cfg


@torch.no_grad()
def encode_to_cache(cache: Path, vae, ct_hu: np.ndarray, spacing=GRID_SPACING, labels: np.ndarray | None = None,
                    source: str = "phantom") -> Path:
    """Posterior means of every volume into a latent cache folder (skipped when already complete)."""
    if (cache / latents.STATS).is_file():
        return cache
    if cache.exists():  # an interrupted encode: start the (cheap) cache again
        import shutil
        shutil.rmtree(cache)
    for i, volume in enumerate(ct_hu):
        image = hu_to_unit(torch.from_numpy(volume))[None, None].float()
        z, _ = vae.encode(image)
        label = None if labels is None else torch.from_numpy(labels[i][None].astype(np.int64))
        record = LatentRecord(file="", spacing=tuple(spacing), latent_shape=tuple(z.shape[1:]), source=source,
                              label="array" if label is not None else "")
        latents.write_latent(cache, f"v{i:04d}", z[0], record, label=label)
    latents.write_stats(cache, latents.compute_scale_factor(cache))
    return cache


@torch.no_grad()
def decode_hu(vae, z_unscaled: torch.Tensor) -> np.ndarray:
    """(B, C, x, y, z) unscaled latents -> (B, X, Y, Z) float32 HU, one volume at a time."""
    out = [unit_to_hu(vae.decode(z[None].float()))[0, 0].numpy() for z in z_unscaled]
    return np.stack(out).astype(np.float32)


@torch.no_grad()
def reconstruct_hu(vae, ct_hu: np.ndarray) -> np.ndarray:
    """The VAE's reconstructions (decode of the posterior mean) of (N, X, Y, Z) HU volumes."""
    means = [vae.encode(hu_to_unit(torch.from_numpy(v))[None, None].float())[0] for v in ct_hu]
    return decode_hu(vae, torch.cat(means))


def tumor_segmenter(path: Path, pairs, steps: int, seed: int = 0, progress: bool = True) -> Path:
    """A tumour-vs-rest segmenter (`maisi2.evaluate.seg`) trained on (CT HU, labels) pairs; resumes."""
    from maisi2.evaluate.seg import SegmenterConfig, SegmenterTrainSettings, train_segmenter

    say(f"tumour segmenter: {len(pairs)} volumes, {steps} steps -> {path}")
    train_segmenter(pairs, path, SegmenterConfig(), SegmenterTrainSettings(steps=steps, seed=seed), resume=True,
                    progress=progress)
    return path


def cached_volumes(path: Path, make, what: str) -> np.ndarray:
    """(N, X, Y, Z) float32 HU volumes kept as int16 in `path`: made (and stored, atomically) on the
    first call only. Both calls return the stored values, so a rerun scores exactly what the first
    run scored."""
    if not path.is_file():
        say(f"making {what}")
        with atomic_output(path, overwrite=True) as tmp:
            np.savez(tmp, hu=np.round(make()).astype(np.int16))
    return np.load(path)["hu"].astype(np.float32)


def environment() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine()}


def slices_figure(rows: list[tuple[str, np.ndarray]], path: Path, count: int = 4, size: int = 128,
                  coronal: bool = False) -> None:
    """A labelled grid: per row, `count` volumes as their mid-axial slice (and mid-coronal, when
    `coronal`), windowed to HU -200..300, each slice resized to `size` pixels square."""
    from PIL import Image, ImageDraw

    label_width, per_volume = 190, 2 if coronal else 1
    canvas = Image.new("L", (label_width + per_volume * count * (size + 4), len(rows) * (size + 4)))
    draw = ImageDraw.Draw(canvas)
    for r, (name, volumes) in enumerate(rows):
        draw.text((4, r * (size + 4) + size // 2 - 6), name, fill=255)
        for c, volume in enumerate(volumes[:count]):
            slices = [volume[::-1, ::-1, volume.shape[2] // 2].T]
            if coronal:
                slices.append(volume[::-1, volume.shape[1] // 2, ::-1].T)
            for k, sl in enumerate(slices):
                img = np.clip((sl.astype(np.float32) + 200) / 500, 0, 1) * 255
                canvas.paste(Image.fromarray(img.astype(np.uint8)).resize((size, size)),
                             (label_width + (per_volume * c + k) * (size + 4), r * (size + 4)))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def write_json(path: Path, data: dict) -> None:
    with atomic_output(path, overwrite=True) as tmp:  # a rerun recomputes the results
        Path(tmp).write_text(json.dumps(data, indent=2, default=str))


# -- the networks the experiments train, and sampling from them -----------------------------------

# Experiment 2's ControlNet variants: the contrastive loss off, on with the paper's schedule, reversed.
VARIANTS = {
    "no contrastive loss": dict(contrastive=False),
    "paper: 0.01 then 0.001": dict(contrastive=True, lambda_schedule=((0.0, 0.01), (0.5, 0.001))),
    "reversed: 0.001 then 0.01": dict(contrastive=True, lambda_schedule=((0.0, 0.001), (0.5, 0.01))),
}


def slug(name: str) -> str:
    return name.split(":")[0].replace(" ", "_")


def load_controlnet(path: Path):
    """A trained ControlNet (EMA weights), eval mode."""
    return load_network(path, "controlnet")[0]


@torch.no_grad()
def generate_ct(unet, controlnet, cfg, scale, vae, labels: np.ndarray, seed: int) -> np.ndarray:
    cond = nets.condition_on(labels, GRID_SPACING)
    shape = (cfg.vae.latent_channels, *(s // cfg.vae.downsample_factor for s in labels.shape))
    z = sample_latent(unet, cond, shape, cfg.flow, controlnet=controlnet, steps=30, seed=seed)
    return decode_hu(vae, z / scale)[0]


def load_unet(path: Path):
    """(UNet with the checkpoint's EMA weights, eval mode; its config; its latent scale factor;
    the training steps its weights have had in all)."""
    unet, cfg, weights = load_network(path, "unet")
    return unet, cfg, weights.scale_factor, weights.steps


@torch.no_grad()
def sample(unet, cfg, kind: str, steps: int, seeds: list[int], latent_shape, exact_grid: bool = False) -> torch.Tensor:
    """Scaled latents (B, C, x, y, z) for these noise seeds with one sampler. exact_grid: rf on the
    float64 grid that integrates exactly the whole path (`flow.inference_timesteps(exact=True)`);
    the default MONAI-parity grid integrates 1.010 of it at 30 steps and 1.032 at 100. DDPM's
    ancestral noise comes from one generator per call, seeded by the first seed: a DDPM sample
    depends on the batch it was drawn in."""
    noise = torch.cat([torch.randn((1, *latent_shape), generator=torch.Generator().manual_seed(s)) for s in seeds])
    cond = nets.condition_on(None, GRID_SPACING, batch=len(seeds))
    net = lambda x, t: nets.predict_velocity(unet, x, t, cond)  # noqa: E731
    if kind == "rf":
        grid, nxt = flow.inference_timesteps(steps, latent_shape[1:], cfg.flow, exact=exact_grid)
        return flow.sample_euler(net, noise, grid, nxt, T=cfg.flow.num_train_timesteps)
    generator = torch.Generator().manual_seed(seeds[0] + 10_000)
    if kind == "ddpm":
        return ddpm.sample_ddpm(net, noise, 1000, generator=generator)
    return ddpm.sample_ddim(net, noise, steps)
