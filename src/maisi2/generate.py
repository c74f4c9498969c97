"""Generation: a segmentation mask in, a synthetic CT out (what `maisi2 generate` runs).

`generate()` reads as numbered steps, each a short function below it:

1. check the settings and that no output would be overwritten unasked;
2. read the model folder's config and metadata (no weights yet);
3. prepare the mask: MAISI ids only, resampled (nearest) to the requested spacing, the body
   envelope (label 200) added when missing, padded to a size the networks accept;
4. check the request against the model (field of view) and the memory budget;
   every refusal happens here, before any weights are read or any sampling is done;
5. load the networks;
6. conditioning: the mask as bit-planes, spacing, modality (and, for guidance, the mask with its
   tumours replaced by their parent organs);
7. denoising loop (`sampling.sample_latent`), tiled decoding (`decode.decode_tiled`) back to HU,
   quality check; with `qc_retries`, again with seed+1, seed+2 ... while the check fails.
   Networks that `generate` loaded itself are its alone: the UNet and ControlNet are let go
   before decoding (read again for a retry), so the peak memory is the larger of sampling and
   decoding, not their sum; `generate_batch` and callers passing `Models` keep theirs loaded;
8. the report;
9. write the CT, the prepared label map, a preview and the JSON report as one set.

Outputs, for ``--out CT.nii.gz``: ``CT.nii.gz`` (int16 HU in [-1000, 1000], -1000 outside the body,
the mask's geometry and stored orientation), ``CT_label.nii.gz`` (the prepared label map, MAISI
ids, same grid, with its names and colours for 3D Slicer in ``CT_label.ctbl`` and for ITK-SNAP in
``CT_label.itksnap.txt``), ``CT_preview.png`` (axial/coronal/sagittal slices through the largest
tumour, or the middle, with label contours, a legend and the HU window; `maisi2.preview`) and
``CT_report.json`` (settings, seeds, timings, memory plan, quality check of every attempt). They
are staged beside their targets and renamed into place together at the end, so an error or
Ctrl-C never leaves a partial set.

Usage::

    result = generate("mask.nii.gz", "ct.nii.gz", model="models/mine", options=GenerateOptions(seed=3))
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from maisi2 import io, label_tables
from maisi2 import labels as L
from maisi2.dicom_series import write_ct_series
from maisi2.preview import PREVIEW_WINDOW_HU, preview_centre, render_preview
from maisi2.atomic import check_writable

__all__ = [
    "GenerateOptions",
    "ProgressFn",
    "OutputPaths",
    "PreparedMask",
    "GenerationResult",
    "BatchItem",
    "generate",
    "check_options",
    "generate_batch",
    "batch_from_dir",
    "batch_from_datalist",
    "phantom_mask",
    "mask_from_anatomy_sizes",
    "prepare_mask",
    "network_divisor",
    "memory_budget_bytes",
    "render_preview",
]

PathLike = str | os.PathLike
# `on_progress(event)` is called in the generating thread as the work advances, with one of
#   {"phase": "loading"} once the request has passed every check, before the weights are read,
#   {"phase": "sampling", "attempt": k, "step": i, "steps": n}  after each Euler step (i = 1..n),
#   {"phase": "decoding", "attempt": k}, {"phase": "checking", "attempt": k}, {"phase": "writing"}.
# An exception raised by it stops the generation there; nothing is written (a way to cancel).
ProgressFn = Callable[[dict], None]


@dataclass(frozen=True)
class GenerateOptions:
    """Everything `generate` can be told. None means "from the mask / the machine"."""

    spacing: tuple[float, float, float] | None = None  # mm; None keeps the mask's spacing
    steps: int = 30
    seed: int = 0
    exact_grid: bool = False  # float64 time grid instead of MONAI's float16 one
    cfg_scale: float | None = None  # classifier-free guidance scale (tumour-free mask as "unconditional")
    control_scale: float = 1.0
    max_memory_gb: float | None = None  # None: free device memory (CUDA) or available RAM (CPU)
    device: str | None = None  # "cpu", "cuda" or None (CUDA when present)
    half_precision: bool | None = None  # fp16 autocast; None: on for CUDA, off on CPU
    qc_retries: int = 0  # regenerate with seed+1, seed+2 ... while the quality check fails
    decode_statistics: str = "volume"  # "tile": one-pass tiled decoding with per-tile group norms
    spill_dir: str | None = None  # CPU: a streamed decode may keep its layer tensors in files here
    fov_tolerance: float = 2.0  # refuse fields of view more than this factor outside the trained range
    write_label: bool = True
    write_preview: bool = True
    out_format: str = "nifti"  # "dicom": the CT as a DICOM series (one file per slice) in a folder
    preview_focus: str | None = None  # label name the preview is centred on; None: the largest tumour, else mid-volume
    request: dict | None = None  # what the caller asked for (mask selection, tumour edits): copied into the report
    overwrite: bool = False
    progress: bool = False
    modality: str = "ct"


@dataclass(frozen=True)
class OutputPaths:
    ct: Path
    report: Path
    label: Path | None = None
    preview: Path | None = None
    slicer_colour_table: Path | None = None  # names and colours of the label map for 3D Slicer
    itksnap_labels: Path | None = None  # ... and for ITK-SNAP

    @classmethod
    def beside(cls, ct: PathLike, options: GenerateOptions) -> "OutputPaths":
        """CT.nii.gz -> CT_label.nii.gz, CT_preview.png, CT_report.json in the same folder.

        For DICOM output the CT is the folder CT (a trailing .nii.gz dropped) and the other files
        are named after it the same way."""
        ct = Path(ct).expanduser()
        stem = ct.name.removesuffix(".gz").removesuffix(".nii")
        if options.out_format == "dicom":
            ct = ct.with_name(stem)
        elif not ct.name.endswith((".nii.gz", ".nii")):
            raise ValueError(f"{ct}: the output CT is NIfTI; name it *.nii.gz (or pass --out-format dicom for a DICOM series)")
        label = ct.with_name(f"{stem}_label.nii.gz") if options.write_label else None
        slicer, itksnap = label_tables.table_paths(label) if label is not None else (None, None)
        return cls(ct=ct, report=ct.with_name(f"{stem}_report.json"), label=label,
                   preview=ct.with_name(f"{stem}_preview.png") if options.write_preview else None,
                   slicer_colour_table=slicer, itksnap_labels=itksnap)

    def all(self) -> list[Path]:
        return [p for p in (self.ct, self.label, self.slicer_colour_table, self.itksnap_labels, self.preview,
                            self.report) if p is not None]


@dataclass
class PreparedMask:
    """A mask ready for the networks.

    volume: the label map on the output grid (resampled, body envelope added), MAISI ids.
    padded: its labels padded with background to `network_divisor` multiples (what the
        ControlNet sees); `data.center_pad_or_crop` back to `volume.shape` undoes it.
    """

    volume: io.Volume
    padded: np.ndarray
    source: str
    input_shape: tuple[int, int, int]
    input_spacing: tuple[float, float, float]
    body_voxels_added: int

    def describe(self) -> dict:
        present = sorted(int(v) for v in np.unique(self.volume.array) if v != L.BACKGROUND)
        return {"source": self.source, "input_shape": list(self.input_shape),
                "input_spacing": list(self.input_spacing), "shape": list(self.volume.shape),
                "spacing": list(self.volume.spacing), "padded_shape": list(self.padded.shape),
                "field_of_view_mm": list(_fov(self.volume)), "body_voxels_added": self.body_voxels_added,
                "labels_present": present}


@dataclass
class GenerationResult:
    paths: OutputPaths
    report: dict[str, Any]

    @property
    def passed_qc(self) -> bool:
        return bool(self.report["quality"]["passed"])


# -- the pipeline ----------------------------------------------------------------------------

def generate(mask: PathLike | io.Volume, out: PathLike, model=None,
             options: GenerateOptions = GenerateOptions(), on_progress: ProgressFn | None = None) -> GenerationResult:
    """Generate a CT for `mask` and write it (plus label map, preview, report) to `out`.

    mask: a NIfTI label map path or an `io.Volume` of MAISI ids (e.g. from `phantom_mask`).
    model: a model folder, a `models.ModelInfo`/`models.Models`, or None for the bundled model.
    on_progress: called with each `ProgressFn` event; raising from it stops the run, nothing written.

    On glibc this sets the process-wide allocator policy of `maisi2.allocator` (freed blocks up to
    32 MiB are kept for reuse) and gives the freed memory back to the system before returning.
    """
    started = time.perf_counter()
    # 1. check inputs: settings, and outputs that may not be overwritten
    paths = _check_request(out, options)
    # 2. the model's config and metadata (weights later: refusals should cost nothing)
    info, models = _model_info(model)
    # 3. prepare the mask
    prepared = prepare_mask(mask, info.cfg, options.spacing)
    _check_preview_focus(prepared, options)
    # 4. check the request against the model and the memory budget. Networks loaded here are
    #    ours alone: the UNet and ControlNet are let go while the decoder runs.
    release = models is None
    fit = _check_fits(prepared, info, models, options, release)
    # 5. load the networks
    if on_progress is not None:
        on_progress({"phase": "loading"})
    models, load_seconds = _load_networks(info, models, options)
    return _generate_prepared(prepared, paths, models, fit, options, started, load_seconds, on_progress)


def _generate_prepared(prepared, paths, models, fit, options, started, load_seconds,
                       on_progress: ProgressFn | None = None) -> GenerationResult:
    """Steps 6-9 for a checked, prepared mask and loaded networks (shared with `generate_batch`)."""
    from maisi2 import allocator

    allocator.reuse_freed_memory()  # steps and decode slabs reuse freed blocks: no page-fault churn
    try:
        return _sample_decode_write(prepared, paths, models, fit, options, started, load_seconds,
                                    on_progress or _no_progress)
    finally:
        allocator.give_back_freed_memory()


def _no_progress(event: dict) -> None:
    pass


def _sample_decode_write(prepared, paths, models, fit, options, started, load_seconds,
                         on_progress: ProgressFn) -> GenerationResult:
    # 6. conditioning: mask bit-planes, spacing, modality (and the tumour-free mask for guidance)
    conditioning = _conditioning(prepared, models, options)
    # 7. denoising loop, tiled decoding, quality check; again with the next seed while it fails
    attempts, best = _attempts(prepared, models, conditioning, fit, options, on_progress)
    # 8. the report
    timings = {"load_model": load_seconds, "total": time.perf_counter() - started}
    report = _report(prepared, models, fit, options, conditioning, attempts, best, paths, timings)
    # 9. write everything as one set
    on_progress({"phase": "writing"})
    if paths.preview is not None:
        centre, what = preview_centre(prepared.volume.array, options.preview_focus)
        report["preview"] = {"centre_voxel": list(centre), "centred_on": what, "window_hu": list(PREVIEW_WINDOW_HU)}
    _write_outputs(paths, prepared, attempts[best]["hu"], report, options)
    return GenerationResult(paths, report)


# -- 1. check inputs -------------------------------------------------------------------------

def _check_request(out: PathLike, options: GenerateOptions) -> OutputPaths:
    check_options(options)
    paths = OutputPaths.beside(out, options)
    _check_targets(paths, options)
    return paths


def check_options(options: GenerateOptions) -> None:
    """Refuse (ValueError) settings `generate` would refuse, whatever the mask: cheap, no files read."""
    if not 1 <= options.steps <= 1000:
        raise ValueError(f"steps must be between 1 and 1000, got {options.steps}")
    if options.seed < 0 or options.qc_retries < 0:
        raise ValueError("seed and qc_retries must be >= 0")
    if options.cfg_scale is not None and not math.isfinite(options.cfg_scale):
        raise ValueError(f"cfg_scale must be a finite number, got {options.cfg_scale}")
    if options.decode_statistics not in ("volume", "tile"):
        raise ValueError(f"decode_statistics must be 'volume' or 'tile', got {options.decode_statistics!r}")
    if options.max_memory_gb is not None and not options.max_memory_gb > 0:
        raise ValueError(f"max_memory_gb must be positive, got {options.max_memory_gb}")
    if options.spill_dir is not None and not Path(options.spill_dir).expanduser().is_dir():
        raise ValueError(f"spill_dir {options.spill_dir} is not an existing folder; create it or leave it out")
    if options.spacing is not None:
        io.ras_affine(options.spacing)  # validates: three positive numbers
    if options.out_format not in ("nifti", "dicom"):
        raise ValueError(f"out_format must be 'nifti' or 'dicom', got {options.out_format!r}")


def _check_targets(paths: OutputPaths, options: GenerateOptions) -> None:
    for path in paths.all():
        if options.out_format == "dicom" and path == paths.ct:
            _check_series_folder(path, options.overwrite)
        else:
            check_writable(path, options.overwrite)


def _check_series_folder(folder: Path, overwrite: bool) -> None:
    """A DICOM output folder is new, or (with overwrite) holds only a DICOM series we may replace."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise FileExistsError(f"{folder} exists and is not a folder; DICOM output goes into a new folder")
    if not overwrite:
        raise FileExistsError(f"{folder} already exists; pass --overwrite (overwrite=True) to replace it")
    others = [p.name for p in folder.iterdir() if not p.name.endswith(".dcm")]
    if others:
        raise FileExistsError(f"{folder} holds files other than a DICOM series ({others[0]} ...); "
                              "it is not replaced: choose a new output folder")


# -- 2. the model's description --------------------------------------------------------------

def _model_info(model):
    """(ModelInfo, Models or None): accepts a folder, a ModelInfo, loaded Models, or None."""
    from maisi2 import models as M

    if isinstance(model, M.Models):
        if model.info is None or model.controlnet is None:
            raise ValueError("generation needs Models with a ControlNet and `info` (a ModelInfo, for the checks)")
        return model.info, model
    info = model if isinstance(model, M.ModelInfo) else M.read_model_info(model)
    if not info.has_controlnet:
        raise ValueError(f"{info.model_dir} has no ControlNet weights; generating from a mask needs them")
    return info, None


# -- 3. prepare the mask ---------------------------------------------------------------------

def network_divisor(cfg) -> int:
    """Every image axis must be a multiple of this: VAE factor x the UNet's total downsampling."""
    return cfg.vae.downsample_factor * 2 ** (len(cfg.unet.num_channels) - 1)


def mask_from_anatomy_sizes(sizes, out: PathLike, model=None, mask_generator: str | None = None,
                            options: GenerateOptions = GenerateOptions(), mask_steps: int | None = None):
    """A label map from the mask generator for requested anatomy sizes, to pass to `generate`.

    sizes: {slot name: size in [0, 1] or -1}, or a ``'liver=0.6,"hepatic tumor"=0.2'`` string
    (`maisi2.maskgen.sizes`). mask_generator: "released" (the release's files in the `model`
    folder), "bundled" (ours, shipped with the package), a folder, or None: "released" when the
    `model` folder holds the release's mask files, else "bundled". The request (sizes, settings,
    outputs beside `out`) is checked before any network is read. Seeded with ``options.seed``.
    Returns (the mask as an `io.Volume` on the generator's grid, a dict describing how it was made).
    """
    from maisi2.maskgen import files, generate_mask, sampling
    from maisi2.maskgen.sizes import parse_anatomy_sizes

    sizes = parse_anatomy_sizes(sizes) if isinstance(sizes, str) else dict(sizes)
    _check_request(out, options)
    folder = files.mask_generator_dir(mask_generator, model)
    generator = files.load_mask_generator(folder, device=options.device)
    sampling.size_vector(generator, sizes)  # a request the generator cannot complete fails here
    sample = generate_mask(generator, sizes, seed=options.seed, steps=mask_steps, progress=options.progress)
    return sample.native, {"generator": str(folder), "kind": generator.source, **sample.describe()}


def phantom_mask(shape: Sequence[int], spacing: Sequence[float], tumors=(), seed: int = 0) -> io.Volume:
    """The label map of a procedural phantom (`maisi2.phantom`), as a mask to generate from."""
    from maisi2.phantom import make_phantom

    _, labels, affine = make_phantom(tuple(shape), tuple(spacing), tumors, seed)
    return io.Volume(labels.astype(np.int16), affine)


def prepare_mask(mask: PathLike | io.Volume, cfg, spacing=None) -> PreparedMask:
    """Load/check a mask, resample it to `spacing` (nearest), add the body envelope, pad it."""
    from maisi2.data import center_pad_or_crop

    volume, source = _load_mask(mask)
    input_shape, input_spacing = volume.shape, volume.spacing
    if spacing is not None and not np.allclose(spacing, volume.spacing, rtol=1e-4):
        volume = io.resample_to_spacing(volume, spacing, order=0)
    volume, added = _with_body(volume, source)
    divisor = network_divisor(cfg)
    padded_shape = tuple(-(-n // divisor) * divisor for n in volume.shape)
    padded = center_pad_or_crop(volume.array, padded_shape, fill=L.BACKGROUND)
    return PreparedMask(volume, padded, source, input_shape, input_spacing, added)


def _check_preview_focus(prepared: PreparedMask, options: GenerateOptions) -> None:
    """A preview asked to centre on a label the mask lacks is refused before any work."""
    if options.write_preview and options.preview_focus is not None:
        preview_centre(prepared.volume.array, options.preview_focus)


def _load_mask(mask) -> tuple[io.Volume, str]:
    if isinstance(mask, io.Volume):
        array = np.asarray(mask.array)
        if not np.issubdtype(array.dtype, np.integer):
            raise ValueError("the mask Volume must hold integer MAISI label ids")
        L.check_label_ids(array, what="mask")
        return mask.with_array(array.astype(np.int16)), "volume given in code"
    return io.load_label_map(mask), str(mask)  # checks the ids


def _with_body(volume: io.Volume, source: str) -> tuple[io.Volume, int]:
    """Add the body envelope (label 200) to unlabelled voxels inside the labels' filled hull."""
    from maisi2.envelope import body_envelope_from_labels

    labels = volume.array
    if not np.any(labels != L.BACKGROUND):
        raise ValueError(f"mask {source} holds no labels (every voxel is 0); pass a MAISI label map with the "
                         "body (200) and organ labels")
    if np.any(labels == L.BODY):
        return volume, 0
    envelope = body_envelope_from_labels(labels, spacing=volume.spacing)
    fill = (labels == L.BACKGROUND) & envelope
    out = labels.copy()
    out[fill] = L.BODY
    return volume.with_array(out), int(np.count_nonzero(fill))


def _fov(volume: io.Volume) -> tuple[float, float, float]:
    return tuple(float(n * s) for n, s in zip(volume.shape, volume.spacing))


# -- 4. does the request fit? ----------------------------------------------------------------

def memory_budget_bytes(max_memory_gb: float | None, device) -> int:
    """The budget: as given, else free CUDA memory or available RAM (both x 0.9 for headroom)."""
    import torch

    if max_memory_gb is not None:
        return int(max_memory_gb * 2**30)
    if torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free * 0.9)
    return int(_available_ram() * 0.9)


def _available_ram() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _weight_bytes(info, models) -> dict[str, int]:
    """fp32 bytes of each network's parameters, by kind (counted on the meta device: nothing allocated)."""
    import torch

    from maisi2 import checkpoint as ckpt
    from maisi2.models import NETWORK_KINDS

    if models is not None:
        return {kind: models.weight_bytes((kind,)) for kind in NETWORK_KINDS}
    with torch.device("meta"):
        return {kind: sum(p.numel() * 4 for p in ckpt.build_network(kind, info.cfg).parameters())
                for kind in NETWORK_KINDS}


def _check_fits(prepared: PreparedMask, info, models, options: GenerateOptions, release: bool = False) -> dict:
    """Refuse (ValueError) a field of view far off the model's or a size over the memory budget.

    Returns the memory plan: budget, weights, sampling peak, host arrays, decode tiles, device, and
    `release` (the UNet and ControlNet are let go before decoding, so the decoder's budget counts
    only the VAE's weights).
    """
    from maisi2.nets import resolve_device

    _check_fov(prepared, info, options.fov_tolerance)
    device = resolve_device(options.device)
    weights = _weight_bytes(info, models)
    fit = {"device": str(device), "budget": memory_budget_bytes(options.max_memory_gb, device),
           "weights": sum(weights.values()), "release": release,
           "decode_weights": weights["vae"] if release else sum(weights.values()),
           # On the CPU the blended output volume and the HU arrays share the budget with the decoder.
           "host": math.prod(prepared.padded.shape) * 12 if device.type == "cpu" else 0}
    fit["sampling"] = fit["weights"] + _sampling_bytes(prepared, info.cfg, options, device)
    fit["plan"] = _decode_plan(prepared, info.cfg, fit, options.spill_dir if device.type == "cpu" else None)
    return fit


def _sampling_bytes(prepared: PreparedMask, cfg, options: GenerateOptions, device) -> int:
    from maisi2 import sampling

    latent = tuple(n // cfg.vae.downsample_factor for n in prepared.padded.shape)
    flash = device.type == "cuda" and cfg.unet.use_flash_attention
    return sampling.estimate_sampling_bytes(cfg, latent, flash, options.cfg_scale is not None, _half(options, device))


def _decode_plan(prepared: PreparedMask, cfg, fit: dict, spill_dir: str | None = None):
    from maisi2 import decode

    budget, size = fit["budget"], "x".join(map(str, prepared.padded.shape))
    if fit["sampling"] > budget:
        raise ValueError(
            f"sampling a {size} volume needs about {fit['sampling'] / 2**30:.1f} GB, over the "
            f"{budget / 2**30:.1f} GB budget. Raise --max-memory, choose a coarser --spacing, or crop the mask"
        )
    held = fit["decode_weights"]  # what stays loaded while decoding
    if held + fit["host"] >= budget:
        raise ValueError(
            f"the networks ({held / 2**30:.2f} GB) and the output arrays ({fit['host'] / 2**30:.2f} GB) "
            f"alone exceed the {budget / 2**30:.2f} GB budget; raise --max-memory or generate a smaller volume"
        )
    latent = tuple(n // cfg.vae.downsample_factor for n in prepared.padded.shape)
    return decode.plan_tiles(latent, cfg.vae, budget - held - fit["host"], spill_dir=spill_dir)


def _check_fov(prepared: PreparedMask, info, tolerance: float) -> None:
    fov_range = info.fov_range_mm
    if fov_range is None:
        return
    low, high = fov_range
    fov = _fov(prepared.volume)
    for axis, (have, lo, hi) in enumerate(zip(fov, low, high)):
        if have < lo / tolerance or have > hi * tolerance:
            raise ValueError(
                f"the field of view {' x '.join(f'{v:.0f}' for v in fov)} mm (shape x spacing) is far outside what "
                f"the model was trained on ({' x '.join(f'{v:.0f}' for v in low)} to "
                f"{' x '.join(f'{v:.0f}' for v in high)} mm; axis {'xyz'[axis]} is off by more than {tolerance:g}x). "
                "Choose --spacing so that shape x spacing lands in that range, or use a mask of a typical body region"
            )


# -- 5. load the networks --------------------------------------------------------------------

def _load_networks(info, models, options: GenerateOptions):
    from maisi2.models import load_model

    if models is not None:
        return models, 0.0
    start = time.perf_counter()
    models = load_model(info, device=options.device)
    return models, time.perf_counter() - start


# -- 6.-8. one attempt: sample, decode, check --------------------------------------------------

def _conditioning(prepared: PreparedMask, models, options: GenerateOptions) -> dict:
    """Conditioning on the networks' device; with guidance also the tumour-free mask's."""
    import torch

    from maisi2 import nets

    device = models.device

    def condition(labels: np.ndarray) -> nets.Conditioning:
        bits = nets.mask_to_bitplanes(torch.from_numpy(labels.astype(np.int64))[None, None])
        spacing = torch.tensor([prepared.volume.spacing], dtype=torch.float32)
        modality = torch.tensor([nets.modality_id(options.modality)], dtype=torch.long)
        return nets.Conditioning(spacing, modality, bits).to(device)

    cond = condition(prepared.padded)
    uncond = None
    if options.cfg_scale is not None:
        tumor_free = L.remove_tumors(prepared.padded)
        # Without tumours both branches agree and guidance changes nothing: skip the second call.
        uncond = condition(tumor_free) if np.any(tumor_free != prepared.padded) else None
    return {"cond": cond, "uncond": uncond}


def _half(options: GenerateOptions, device) -> bool:
    import torch

    return torch.device(device).type == "cuda" if options.half_precision is None else bool(options.half_precision)


def _attempts(prepared, models, conditioning, fit, options: GenerateOptions,
              on_progress: ProgressFn) -> tuple[list[dict], int]:
    """Attempts with seeds seed, seed+1, ... until one passes the quality check (or retries run out)."""
    attempts: list[dict] = []
    for retry in range(options.qc_retries + 1):
        attempts.append(_attempt(prepared, models, conditioning, fit, options, options.seed + retry,
                                 _attempt_progress(on_progress, retry + 1, options.steps)))
        best = _best_attempt(attempts)
        for i, other in enumerate(attempts):
            if i != best:
                other.pop("hu", None)  # keep one volume in memory, not one per attempt
        if attempts[-1]["qc"].passed:
            break
    return attempts, best


def _attempt_progress(on_progress: ProgressFn, attempt: int, steps: int) -> ProgressFn:
    """`on_progress` for one attempt: Euler-step callbacks (`flow.sample_euler`) and phase names in."""
    def report(event: dict) -> None:
        if "phase" in event:
            on_progress({**event, "attempt": attempt})
        else:  # a sampler step
            on_progress({"phase": "sampling", "attempt": attempt, "step": event["i"] + 1, "steps": steps})
    return report


def _attempt(prepared, models, conditioning, fit, options: GenerateOptions, seed: int,
             on_progress: ProgressFn = _no_progress) -> dict:
    """One sample: the denoising loop, decoding to HU, the quality check; with their timings."""
    from maisi2 import quality, sampling

    half = _half(options, models.device)
    latent_shape = (models.cfg.vae.latent_channels, *fit["plan"].latent_shape)
    uncond = conditioning["uncond"]
    reload_seconds = models.restore_diffusion()  # released by an earlier attempt (a QC retry)
    start = time.perf_counter()
    latent = sampling.sample_latent(
        models.unet, conditioning["cond"], latent_shape, models.cfg.flow, controlnet=models.controlnet,
        uncond=uncond, cfg_scale=options.cfg_scale if uncond is not None else None, steps=options.steps,
        seed=seed, exact_grid=options.exact_grid, control_scale=options.control_scale, autocast=half,
        progress=options.progress, callback=on_progress)
    sampled = time.perf_counter()
    if fit["release"]:
        models.release_diffusion()  # the decode plan counted only the VAE's weights
    on_progress({"phase": "decoding"})
    hu = _decode_to_hu(latent, prepared, models, fit["plan"], half, options.progress, options.decode_statistics)
    decoded = time.perf_counter()
    on_progress({"phase": "checking"})
    qc = quality.quality_check(hu, prepared.volume.array)
    timings = {"sampling": sampled - start, "decoding": decoded - sampled}
    if reload_seconds:
        timings["reload_networks"] = reload_seconds
    return {"seed": seed, "hu": hu, "qc": qc, "timings": timings}


def _decode_to_hu(latent, prepared: PreparedMask, models, plan, half: bool, progress: bool,
                  statistics: str) -> np.ndarray:
    """Latent -> int16 HU on the prepared grid: decode, clip to [0, 1], to HU, crop, air outside body."""
    from maisi2.data import center_pad_or_crop, unit_to_hu
    from maisi2.decode import decode_tiled

    image = decode_tiled(models.vae, latent / models.scale_factor, plan, autocast=half, progress=progress,
                         statistics=statistics)
    hu = unit_to_hu(image[0, 0]).numpy()  # clips to [0, 1] first
    hu = center_pad_or_crop(hu, prepared.volume.shape, fill=-1000.0)
    hu[prepared.volume.array == L.BACKGROUND] = -1000.0
    return np.rint(hu).astype(np.int16)


def _best_attempt(attempts: list[dict]) -> int:
    """The first passing attempt, else the one with the fewest failing organs (earliest on ties)."""
    for i, attempt in enumerate(attempts):
        if attempt["qc"].passed:
            return i
    return min(range(len(attempts)), key=lambda i: (len(attempts[i]["qc"].failed_organs()), i))


# -- 9. outputs --------------------------------------------------------------------------------

def _report(prepared, models, fit, options, conditioning, attempts, best, paths, timings) -> dict:
    from maisi2 import __version__

    info = models.info
    return {
        "maisi2_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "outputs": {k: (None if v is None else str(v)) for k, v in dataclasses.asdict(paths).items()},
        "mask": prepared.describe(),
        "model": {"dir": None if info is None else str(info.model_dir),
                  "layout": None if info is None else info.layout, "preset": models.cfg.preset,
                  "scale_factor": models.scale_factor, "metadata": models.metadata},
        "settings": {k: v for k, v in dataclasses.asdict(options).items() if k != "request"},
        **({"request": options.request} if options.request is not None else {}),
        "device": fit["device"],
        "precision": "fp16 autocast" if _half(options, models.device) else "fp32",
        "guidance": {"scale": options.cfg_scale, "applied": conditioning["uncond"] is not None,
                     "unconditional_mask": "tumours replaced by their parent organs (labels.remove_tumors)"},
        "memory": {"budget_bytes": fit["budget"], "weights_bytes": fit["weights"],
                   "weights_while_decoding_bytes": fit["decode_weights"],
                   "sampling_bytes": fit["sampling"], "host_bytes": fit["host"], "decode": fit["plan"].to_dict()},
        "seed": attempts[best]["seed"],
        "chosen_attempt": best,
        "attempts": [{"seed": a["seed"], "timings_s": a["timings"], "quality": a["qc"].to_dict()} for a in attempts],
        "quality": attempts[best]["qc"].to_dict(),
        "timings_s": timings,
    }


def _write_outputs(paths: OutputPaths, prepared: PreparedMask, hu: np.ndarray, report: dict,
                   options: GenerateOptions) -> None:
    """Stage every file beside its target, then rename them all into place (all or nothing)."""
    staged: dict[Path, Path] = {}

    def stage(target: Path) -> Path:
        staged[target] = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.part{''.join(target.suffixes)}")
        return staged[target]

    try:
        paths.ct.parent.mkdir(parents=True, exist_ok=True)
        if options.out_format == "dicom":
            write_ct_series(stage(paths.ct), prepared.volume.with_array(hu), window=PREVIEW_WINDOW_HU)
        else:
            io.save_ct(stage(paths.ct), prepared.volume.with_array(hu))
        if paths.label is not None:
            io.save_label_map(stage(paths.label), prepared.volume, tables=False)  # staged below
            stage(paths.slicer_colour_table).write_text(label_tables.slicer_colour_table())
            stage(paths.itksnap_labels).write_text(label_tables.itksnap_label_description())
        if paths.preview is not None:
            render_preview(hu, prepared.volume.array, prepared.volume.spacing,
                           focus=options.preview_focus).save(stage(paths.preview), format="PNG")
        stage(paths.report).write_text(json.dumps(report, indent=2, default=_json_default))
        _check_targets(paths, options)  # something may have appeared meanwhile
        for target, tmp in staged.items():
            _move_into_place(tmp, target)
    finally:
        for tmp in staged.values():
            if tmp.is_dir():
                shutil.rmtree(tmp)
            elif tmp.exists():
                tmp.unlink()


def _move_into_place(tmp: Path, target: Path) -> None:
    """Rename a staged file or series folder onto its target (a replaced folder goes only once the new one is in)."""
    if not (tmp.is_dir() and target.is_dir()):
        os.replace(tmp, target)
        return
    old = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.old")
    os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old)


def _json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, (Path, tuple)):
        return str(value) if isinstance(value, Path) else list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# -- batches -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class BatchItem:
    mask: Path
    out: Path
    spacing: tuple[float, float, float] | None = None  # overrides the options' spacing
    seed: int | None = None  # overrides the batch seed


def _output_name(mask: Path) -> str:
    stem = mask.name.split(".nii")[0]
    return f"{stem}_ct.nii.gz"


def batch_from_dir(mask_dir: PathLike, out_dir: PathLike) -> list[BatchItem]:
    """Every *.nii / *.nii.gz in `mask_dir` -> out_dir/<name>_ct.nii.gz."""
    mask_dir, out_dir = Path(mask_dir).expanduser(), Path(out_dir).expanduser()
    if not mask_dir.is_dir():
        raise FileNotFoundError(f"mask folder {mask_dir} does not exist")
    masks = sorted(p for p in mask_dir.iterdir() if p.name.endswith((".nii", ".nii.gz")) and not p.name.startswith("."))
    if not masks:
        raise ValueError(f"{mask_dir} holds no NIfTI masks (*.nii.gz)")
    return [BatchItem(m, out_dir / _output_name(m)) for m in masks]


def batch_from_datalist(path, out_dir: PathLike) -> list[BatchItem]:
    """A .txt (one mask path per line), .jsonl or decathlon-style .json datalist.

    JSONL rows and .json entries: {"mask": path (or "label", so a training datalist works),
    "spacing": [x, y, z] (optional), "seed": int (optional), "out": file name (optional)}. Relative
    paths are relative to the datalist's folder (a .json's: to its data root, see `maisi2.data`).
    `path` may be a `data.DatalistSource` naming the .json's list and data root.
    """
    from maisi2.data import DatalistSource, decathlon_rows

    source = DatalistSource.of(path)
    path, out_dir = source.path, Path(out_dir).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"datalist {path} does not exist")
    if path.suffix.lower() == ".json":
        items = [_batch_item(row, source.root(), where, out_dir) for where, row in decathlon_rows(source)]
        if not items:
            raise ValueError(f"datalist {path} lists no masks")
        return items
    items = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip() and not line.lstrip().startswith("#"):
            items.append(_datalist_item(line, path, number, out_dir))
    if not items:
        raise ValueError(f"datalist {path} lists no masks")
    return items


def _datalist_item(line: str, path: Path, number: int, out_dir: Path) -> BatchItem:
    where = f"{path}, line {number}"
    if path.suffix.lower() != ".jsonl":
        mask = path.parent / line.strip()
        return BatchItem(mask, out_dir / _output_name(mask))
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
    if isinstance(row, dict):
        unknown = set(row) - {"mask", "label", "spacing", "seed", "out", "image", "modality", "source", "fold"}
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}; valid: mask, spacing, seed, out")
    return _batch_item(row, path.parent, where, out_dir)


def _batch_item(row, root: Path, where: str, out_dir: Path) -> BatchItem:
    if not isinstance(row, dict) or not (row.get("mask") or row.get("label")):
        raise ValueError(f"{where}: each row needs a \"mask\" (or \"label\") path")
    mask = root / (row.get("mask") or row["label"])
    spacing = tuple(float(v) for v in row["spacing"]) if row.get("spacing") is not None else None
    seed = int(row["seed"]) if row.get("seed") is not None else None
    return BatchItem(mask, out_dir / (row.get("out") or _output_name(mask)), spacing, seed)


def generate_batch(items: Sequence[BatchItem], model=None, options: GenerateOptions = GenerateOptions(),
                   on_done=None) -> list[GenerationResult]:
    """Generate for each item with the networks loaded once.

    Every item is checked first (outputs, mask, field of view, memory), so a bad item stops the
    batch before any generation. Item i starts from seed ``options.seed + i * (qc_retries + 1)``
    unless it names its own, so retries never reuse another item's seed. `on_done(result)` is
    called after each item.
    """
    info, models = _model_info(model)
    _check_distinct(items)
    checked = []
    for i, item in enumerate(items):
        seed = item.seed if item.seed is not None else options.seed + i * (options.qc_retries + 1)
        item_options = dataclasses.replace(options, seed=seed, spacing=item.spacing or options.spacing)
        paths = _check_request(item.out, item_options)
        prepared = prepare_mask(item.mask, info.cfg, item_options.spacing)
        _check_preview_focus(prepared, item_options)
        checked.append((prepared, paths, _check_fits(prepared, info, models, item_options), item_options))
    models, load_seconds = _load_networks(info, models, options)
    results = []
    for prepared, paths, fit, item_options in checked:
        results.append(_generate_prepared(prepared, paths, models, fit, item_options, time.perf_counter(),
                                          load_seconds))
        if on_done is not None:
            on_done(results[-1])
    return results


def _check_distinct(items: Sequence[BatchItem]) -> None:
    outs = [Path(i.out).resolve() for i in items]
    if len(set(outs)) != len(outs):
        raise ValueError("two batch items would write the same output file; give them distinct \"out\" names")
    masks = {Path(i.mask).resolve() for i in items}
    clash = [o for o in outs if o in masks]
    if clash:
        raise ValueError(f"output {clash[0]} is also an input mask; choose another --out-dir")
