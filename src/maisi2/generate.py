"""Generation: a segmentation mask in, a synthetic CT out (what `maisi2 generate` runs).

`generate()` reads as numbered steps, each a short function below it:

1. check the settings (every number finite and in its range), that no output is the mask, and
   the output folder (writable; no file replaced unasked);
2. read the model folder's config, metadata and domain (what it was trained on; no weights yet);
3. plan the output grid from the mask's header, before any voxel is read: the spacing asked for
   (or the mask's; with `fit_to_model` the nearest the model knows), checked against the model's
   domain: refused with the nearest valid request, or, with `force`, run and marked out of domain;
4. check the plan against the memory budget and the free disk space (still no voxel read);
5. prepare the mask: MAISI ids only, labels the model never saw (refused, replaced or reported),
   resampled (nearest) to the planned spacing, the body envelope (label 200) added when missing,
   padded to a size the networks accept. Every refusal happens by here, before any weights are
   read or any sampling is done;
6. load the networks;
7. conditioning: the mask as bit-planes, spacing, modality (and, for guidance, the mask with its
   tumours replaced by their parent organs);
8. denoising loop (`sampling.sample_latent`), tiled decoding (`autoencoder.decode_tiled`) back to HU
   (a non-finite value is an error, never written as tissue), quality check; with `qc_retries`,
   again with seed+1, seed+2 ... while the check fails. Networks that `generate` loaded itself
   are its alone: the UNet and ControlNet are let go before decoding (read again for a retry), so
   the peak memory is the larger of sampling and decoding, not their sum; `generate_batch` and
   callers passing `Models` keep theirs loaded;
9. the report;
10. write the CT, the prepared label map, a preview and the JSON report as one set.

Outputs, for ``--out CT.nii.gz``: ``CT.nii.gz`` (int16 HU in [-1000, 1000], -1000 outside the body,
the mask's geometry and stored orientation), ``CT_label.nii.gz`` (the prepared label map, MAISI
ids, same grid, with its names and colours for 3D Slicer in ``CT_label.ctbl`` and for ITK-SNAP in
``CT_label.itksnap.txt``), ``CT_preview.png`` (axial/coronal/sagittal slices through the largest
tumour, or the middle, with label contours, a legend and the HU window; `maisi2.preview`) and
``CT_report.json`` (settings, seeds, timings, memory plan, quality check of every attempt). They
are staged beside their targets and moved into place together at the end (`atomic.output_set`), so
an error, Ctrl-C or SIGTERM never leaves a partial set, and a set that appeared meanwhile is not
replaced.

Usage::

    result = generate("mask.nii.gz", "ct.nii.gz", model="models/mine", options=GenerateOptions(seed=3))
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from maisi2 import __version__, allocator, autoencoder, compute, label_tables, nets, quality, sampling, volume_io
from maisi2 import checkpoint as ckpt
from maisi2 import labels as L
from maisi2 import models as M
from maisi2.atomic import check_free_space, check_outputs, output_set
from maisi2.autoencoder import decode_tiled
from maisi2.batches import BatchItem, batch_from_datalist, batch_from_dir
from maisi2.data import center_pad_or_crop, unit_to_hu
from maisi2.dicom_series import write_ct_series
from maisi2.envelope import body_envelope_from_labels
from maisi2.errors import InvalidInput, OutputExists
from maisi2.maskgen import files as maskgen_files
from maisi2.maskgen import generate_mask
from maisi2.maskgen import sampling as maskgen_sampling
from maisi2.maskgen.sizes import parse_anatomy_sizes
from maisi2.phantom import make_phantom
from maisi2.preview import PREVIEW_WINDOW_HU, preview_centre, render_preview
from maisi2.progress import Progress, terminal_bar

__all__ = [
    "GenerateOptions",
    "ProgressFn",
    "OutputPaths",
    "MaskGrid",
    "GridPlan",
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
    "plan_grid",
    "preflight",
    "prepare_mask",
    "network_divisor",
    "memory_budget_bytes",
    "render_preview",
]

PathLike = str | os.PathLike
# `on_progress(event)` is called in the generating thread as the work advances, with one of
#   {"phase": "loading"} once the request has passed every check, before the weights are read,
#   {"phase": "loading", "done": i, "total": n} when they are read (i = 1), then after each network
#   built (`models.load_model`'s progress),
#   {"phase": "sampling", "attempt": k, "step": 0, "steps": n} as the denoising loop starts,
#   {"phase": "sampling", "attempt": k, "step": i, "steps": n}  after each Euler step (i = 1..n),
#   {"phase": "decoding", "attempt": k} as the decode starts, then after each tile or slab
#   {"phase": "decoding", "attempt": k, "done": i, "total": n} (`autoencoder.decode_tiled`'s
#   progress: thousandths of a streamed decode, or tile decodes with "tiles": the plan's tile count),
#   {"phase": "checking", "attempt": k},
#   {"phase": "retrying", "attempt": k + 1, "seed": s, "failed": [organs], "message": "..."} when the
#   quality check failed and a retry follows, {"phase": "writing"}.
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
    half_precision: bool | None = None  # CUDA: fp16 autocast; None: on
    precision: str = "auto"  # "auto" | "fp32" | "bf16": the compute plan (`maisi2.compute.choose_plan`)
    qc_retries: int = 0  # regenerate with seed+1, seed+2 ... while the quality check fails
    decode_statistics: str = "volume"  # "tile": one-pass tiled decoding with per-tile group norms
    spill_dir: str | None = None  # CPU: a streamed decode may keep its layer tensors in files here
    fov_tolerance: float = 2.0  # refuse fields of view more than this factor outside the trained range
    force: bool = False  # run a request outside the model's domain anyway (the report marks it out_of_domain)
    fit_to_model: bool = False  # resample to the nearest trained spacing, pad to the trained field of view,
                                # replace labels the model never saw (see `labels.substitute_unseen`)
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
        elif ct.is_dir():
            raise InvalidInput(f"{ct} is a folder; name the output file itself (e.g. {ct / 'ct.nii.gz'})")
        elif not ct.name.endswith((".nii.gz", ".nii")):
            raise InvalidInput(f"{ct}: the output CT is NIfTI; name it *.nii.gz (or pass --out-format dicom for a DICOM series)")
        label = ct.with_name(f"{stem}_label.nii.gz") if options.write_label else None
        slicer, itksnap = label_tables.table_paths(label) if label is not None else (None, None)
        return cls(ct=ct, report=ct.with_name(f"{stem}_report.json"), label=label,
                   preview=ct.with_name(f"{stem}_preview.png") if options.write_preview else None,
                   slicer_colour_table=slicer, itksnap_labels=itksnap)

    def all(self) -> list[Path]:
        return [p for p in (self.ct, self.label, self.slicer_colour_table, self.itksnap_labels, self.preview,
                            self.report) if p is not None]


@dataclass(frozen=True)
class MaskGrid:
    """A mask's grid without its voxels: what `plan_grid` needs (from a header, or a mask yet to be made)."""

    shape: tuple[int, int, int]  # voxels per axis, RAS order
    spacing: tuple[float, float, float]  # mm
    itemsize: int = 2  # bytes per stored voxel (what reading the mask costs)
    source: str = "mask"


@dataclass(frozen=True)
class GridPlan:
    """Step 3's result: the output grid, planned from the mask's header before any voxel is read.

    shape/spacing: the output CT's grid (the mask resampled). network_shape: what the networks
    see: `shape` padded with background to `network_divisor` multiples (and, with `fit_to_model`,
    to the model's smallest trained field of view); the CT is cropped back to `shape`.
    out_of_domain: why the request is outside the model's domain (non-empty only with `force`);
    fitted: what `fit_to_model` changed.
    """

    mask: MaskGrid
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    network_shape: tuple[int, int, int]
    out_of_domain: tuple[str, ...] = ()
    fitted: tuple[str, ...] = ()


@dataclass
class PreparedMask:
    """A mask ready for the networks.

    volume: the label map on the output grid (resampled, body envelope added), MAISI ids.
    padded: its labels padded with background to the planned network shape (what the ControlNet
        sees); `data.center_pad_or_crop` back to `volume.shape` undoes it.
    unseen_labels: {id: voxels} of labels the model never saw in training (as given);
    replaced_labels: {id: substitute} where `fit_to_model` replaced them.
    """

    volume: volume_io.Volume
    padded: np.ndarray
    source: str
    input_shape: tuple[int, int, int]
    input_spacing: tuple[float, float, float]
    body_voxels_added: int
    unseen_labels: dict[int, int] = dataclasses.field(default_factory=dict)
    replaced_labels: dict[int, int] = dataclasses.field(default_factory=dict)

    def describe(self) -> dict:
        present = sorted(int(v) for v in np.unique(self.volume.array) if v != L.BACKGROUND)
        return {"source": self.source, "input_shape": list(self.input_shape),
                "input_spacing": list(self.input_spacing), "shape": list(self.volume.shape),
                "spacing": list(self.volume.spacing), "padded_shape": list(self.padded.shape),
                "field_of_view_mm": list(_fov(self.volume)), "body_voxels_added": self.body_voxels_added,
                "labels_present": present}


@dataclass(frozen=True)
class MemoryFit:
    """Step 4's result: the request checked against the memory budget (bytes throughout).

    release: the UNet and ControlNet are let go before decoding, so the decoder's share counts only
    the VAE's weights (`decode_weights`). host: the CPU's output arrays, which share the budget with
    the decoder. compute: the precision plan (`compute.ComputePlan`); decode: the decoder's tiles
    (`autoencoder.plan_tiles`).
    """

    device: str
    budget: int
    prepare: int
    weights: int
    release: bool
    decode_weights: int
    host: int
    compute: Any
    sampling: int
    decode: Any

    def to_dict(self) -> dict:
        return {"budget_bytes": self.budget, "weights_bytes": self.weights, "prepare_bytes": self.prepare,
                "weights_while_decoding_bytes": self.decode_weights, "sampling_bytes": self.sampling,
                "host_bytes": self.host, "decode": self.decode.to_dict()}


@dataclass(frozen=True)
class Guidance:
    """Step 7's result: the conditioning on the networks' device; `uncond` (the tumour-free mask's)
    only with classifier-free guidance and a mask that has tumours."""

    cond: Any
    uncond: Any = None


@dataclass(frozen=True)
class GenerationPlan:
    """Everything one generation works from, worked out once before the networks run: the outputs,
    the grid, the memory fit, the prepared mask and the options (`generate` builds one; `generate_batch`
    one per item). `guidance` is added once the networks are loaded (`with_guidance`)."""

    paths: OutputPaths
    info: Any  # the model's `models.ModelInfo`
    grid: GridPlan
    fit: MemoryFit
    prepared: PreparedMask
    options: GenerateOptions
    guidance: Guidance | None = None

    def with_guidance(self, guidance: Guidance) -> "GenerationPlan":
        return dataclasses.replace(self, guidance=guidance)


@dataclass
class GenerationResult:
    paths: OutputPaths
    report: dict[str, Any]

    @property
    def passed_qc(self) -> bool:
        return bool(self.report["quality"]["passed"])

    @property
    def out_of_domain(self) -> list[str]:
        """Why the output is outside what the model was trained on (empty when inside)."""
        return list(self.report["domain"]["out_of_domain"])


# -- the pipeline ----------------------------------------------------------------------------

def generate(mask: PathLike | volume_io.Volume, out: PathLike, model=None,
             options: GenerateOptions = GenerateOptions(), on_progress: ProgressFn | None = None) -> GenerationResult:
    """Generate a CT for `mask` and write it (plus label map, preview, report) to `out`.

    mask: a NIfTI label map path or an `volume_io.Volume` of MAISI ids (e.g. from `phantom_mask`).
    model: a model folder, a `models.ModelInfo`/`models.Models`, or None for the bundled model.
    on_progress: called with each `ProgressFn` event; raising from it stops the run, nothing written.

    On glibc this sets the process-wide allocator policy of `maisi2.allocator` (freed blocks up to
    32 MiB are kept for reuse) and gives the freed memory back to the system before returning.
    """
    started = time.perf_counter()
    # 1.-4. settings, outputs, the model's domain, memory and disk: all from headers, no voxel read;
    # 5. the prepared mask: ids, unseen labels, resampled, body envelope, padded. One plan from here on.
    plan, models = _plan(mask, out, model, options)
    # 6. load the networks (those loaded here are ours alone: let go while the decoder runs)
    if on_progress is not None:
        on_progress({"phase": "loading"})
    models, load_seconds = _load_networks(plan.info, models, options, on_progress)
    return _generate_prepared(plan, models, started, load_seconds, on_progress)


def preflight(mask, out: PathLike, model=None, options: GenerateOptions = GenerateOptions(),
              release: bool | None = None):
    """Steps 1-4, everything checked before a voxel is read: (paths, info, models, grid, fit).

    `mask` may be a `MaskGrid` (e.g. a phantom not made yet), so a request is refused before
    the mask itself costs anything. release: whether the UNet and ControlNet will be let go while
    decoding (default: when `generate` loads them itself, i.e. `model` is not loaded `Models`).
    """
    # 1. check the settings, that no output is the mask, and the output folder
    paths = _check_request(out, options, mask)
    # 2. the model's config, metadata and domain (weights later: refusals should cost nothing)
    info, models = _model_info(model)
    # 3. plan the grid from the header, checked against the model's domain
    grid = plan_grid(mask, info, options)
    # 4. check the plan against the memory budget and the free disk space
    fit = _check_fits(grid, info, models, options, release=models is None if release is None else release)
    check_free_space(paths.all(), _output_bytes(grid, options))
    return paths, info, models, grid, fit


def _plan(mask, out: PathLike, model, options: GenerateOptions, release: bool | None = None):
    """Steps 1-5: (the `GenerationPlan`, the `Models` passed in or None)."""
    paths, info, models, grid, fit = preflight(mask, out, model, options, release)
    prepared = prepare_mask(mask, info.cfg, grid=grid, domain=info.domain, options=options)
    _check_preview_focus(prepared, options)
    return GenerationPlan(paths, info, grid, fit, prepared, options), models


def _generate_prepared(plan: GenerationPlan, models, started: float, load_seconds: float,
                       on_progress: ProgressFn | None = None) -> GenerationResult:
    """Steps 7-10 for a plan and loaded networks (shared with `generate_batch`)."""
    allocator.reuse_freed_memory()  # steps and decode slabs reuse freed blocks: no page-fault churn
    try:
        return _sample_decode_write(plan, models, started, load_seconds, on_progress or _no_progress)
    finally:
        allocator.give_back_freed_memory()


def _no_progress(event: dict) -> None:
    pass


def _sample_decode_write(plan: GenerationPlan, models, started: float, load_seconds: float,
                         on_progress: ProgressFn) -> GenerationResult:
    # 7. conditioning: mask bit-planes, spacing, modality (and the tumour-free mask for guidance)
    plan = plan.with_guidance(_conditioning(plan.prepared, models, plan.options))
    # 8. denoising loop, tiled decoding, quality check; again with the next seed while it fails
    attempts, best = _attempts(plan, models, on_progress)
    # 9. the report
    timings = {"load_model": load_seconds, "total": time.perf_counter() - started}
    report = _report(plan, models, attempts, best, timings)
    # 10. write everything as one set
    on_progress({"phase": "writing"})
    paths, prepared, options = plan.paths, plan.prepared, plan.options
    if paths.preview is not None:
        centre, what = preview_centre(prepared.volume.array, options.preview_focus)
        report["preview"] = {"centre_voxel": list(centre), "centred_on": what, "window_hu": list(PREVIEW_WINDOW_HU)}
    _write_outputs(paths, prepared, attempts[best]["hu"], report, options)
    return GenerationResult(paths, report)


# -- 1. check inputs -------------------------------------------------------------------------

# (option, lowest, highest): beyond these a number is a typo or a misunderstanding, not a setting.
# Guidance and ControlNet scales far above their usual 1-10 push every latent out of the range the
# networks were trained on; a budget over a petabyte is not a budget.
_NUMERIC_RANGES = {
    "steps": (1, 1000), "seed": (0, 2**63 - 1), "qc_retries": (0, 100),
    "cfg_scale": (0.0, 100.0), "control_scale": (0.0, 100.0), "max_memory_gb": (1e-3, 2**20),
    "fov_tolerance": (1.0, 100.0),
}


def check_options(options: GenerateOptions) -> None:
    """Every numeric option finite and inside its range: a ValueError naming the option otherwise."""
    for name, (low, high) in _NUMERIC_RANGES.items():
        value = getattr(options, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise InvalidInput(f"{name} (--{name.replace('_', '-')}) must be a number, got {value!r}")
        if not math.isfinite(value) or not low <= value <= high:
            raise InvalidInput(f"{name} (--{name.replace('_', '-')}) must be a finite number from {low:g} to "
                             f"{high:g}, got {value!r}")
    if not isinstance(options.steps, (int, np.integer)) or not isinstance(options.seed, (int, np.integer)):
        raise InvalidInput(f"steps and seed must be whole numbers, got {options.steps!r} and {options.seed!r}")
    if options.spacing is not None:
        volume_io.check_spacing(options.spacing, "spacing (--spacing)")
    if options.decode_statistics not in ("volume", "tile"):
        raise InvalidInput(f"decode_statistics must be 'volume' or 'tile', got {options.decode_statistics!r}")
    if options.precision not in compute.PRECISIONS:
        raise InvalidInput(f"precision must be one of {', '.join(compute.PRECISIONS)}, got {options.precision!r}")
    if options.out_format not in ("nifti", "dicom"):
        raise InvalidInput(f"out_format must be 'nifti' or 'dicom', got {options.out_format!r}")
    if options.spill_dir is not None and not Path(options.spill_dir).expanduser().is_dir():
        raise InvalidInput(f"spill_dir {options.spill_dir} is not an existing folder; create it or leave it out")


def check_request(out: PathLike, options: GenerateOptions, mask=None) -> OutputPaths:
    """What `generate` refuses first (bad settings, outputs that may not be written), for callers that
    prepare several outputs or edit a mask before calling it."""
    return _check_request(out, options, mask)


def _check_request(out: PathLike, options: GenerateOptions, mask=None) -> OutputPaths:
    check_options(options)
    paths = OutputPaths.beside(out, options)
    if isinstance(mask, (str, os.PathLike)):
        _check_not_the_mask(paths, Path(mask).expanduser())
    if options.out_format == "dicom":
        _check_series_folder(paths.ct, options.overwrite)
    check_outputs(paths.all(), options.overwrite, folders=_folders(paths, options))
    return paths


def _folders(paths: OutputPaths, options: GenerateOptions) -> tuple[Path, ...]:
    """The outputs that are folders: the CT of a DICOM series."""
    return (paths.ct,) if options.out_format == "dicom" else ()


def _check_not_the_mask(paths: OutputPaths, mask: Path) -> None:
    """An output that is the input mask would replace it (with --overwrite) or be refused confusingly."""
    for target in paths.all():
        same = target.resolve() == mask.resolve() or (target.exists() and mask.exists() and os.path.samefile(target, mask))
        if same:
            raise InvalidInput(f"output {target} is the input mask {mask}; choose another --out")


def _check_series_folder(folder: Path, overwrite: bool) -> None:
    """A DICOM output folder is new, or (with overwrite) holds only a DICOM series we may replace."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise OutputExists(f"{folder} exists and is not a folder; DICOM output goes into a new folder")
    if not overwrite:
        raise OutputExists(f"{folder} already exists; pass --overwrite (overwrite=True) to replace it")
    others = [p.name for p in folder.iterdir() if not p.name.endswith(".dcm")]
    if others:
        raise OutputExists(f"{folder} holds files other than a DICOM series ({others[0]} ...); "
                              "it is not replaced: choose a new output folder")


# -- 2. the model's description --------------------------------------------------------------

def _model_info(model):
    """(ModelInfo, Models or None): accepts a folder, a ModelInfo, loaded Models, or None."""
    if isinstance(model, M.Models):
        if model.info is None or model.controlnet is None:
            raise InvalidInput("generation needs Models with a ControlNet and `info` (a ModelInfo, for the checks)")
        return model.info, model
    info = model if isinstance(model, M.ModelInfo) else M.read_model_info(model)
    if not info.has_controlnet:
        raise InvalidInput(f"{info.model_dir} has no ControlNet weights; generating from a mask needs them")
    return info, None


# -- 3. plan the grid from the header ----------------------------------------------------------

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
    Returns (the mask as an `volume_io.Volume` on the generator's grid, a dict describing how it was
    made: the generator folder and kind, the sizes requested, the full size vector used after the
    missing slots were filled, sampler, steps, seed; pass it as ``GenerateOptions.request`` so the CT's
    report carries it, as the CLI does).
    """
    sizes = parse_anatomy_sizes(sizes) if isinstance(sizes, str) else dict(sizes)
    _check_request(out, options)
    folder = maskgen_files.mask_generator_dir(mask_generator, model)
    generator = maskgen_files.load_mask_generator(folder, device=options.device)
    maskgen_sampling.size_vector(generator, sizes)  # a request the generator cannot complete fails here
    sample = generate_mask(generator, sizes, seed=options.seed, steps=mask_steps, progress=options.progress)
    return sample.native, {"generator": str(folder), "kind": generator.source, "requested_sizes": sizes,
                           **sample.describe()}


def plan_grid(mask, info, options: GenerateOptions = GenerateOptions()) -> GridPlan:
    """The output grid from the mask's header (or `MaskGrid`), checked against `info.domain`.

    Outside the domain: a ValueError that says what the model supports and the nearest valid
    request, unless `options.force` (then the plan carries the reasons) or `options.fit_to_model`
    (then the spacing is clipped into the trained range and the networks' input padded up to the
    smallest trained field of view).
    """
    grid, domain = mask_grid(mask), info.domain
    spacing = tuple(float(v) for v in (options.spacing or grid.spacing))
    fitted = []
    if options.fit_to_model and domain.nearest_spacing(spacing) != spacing:
        nearest = domain.nearest_spacing(spacing)
        fitted.append(f"voxels of {_mm(spacing)} mm resampled to {_mm(nearest)} mm")
        spacing = nearest
    shape = grid.shape if np.allclose(spacing, grid.spacing, rtol=1e-4) else \
        tuple(int(n) for n in volume_io.resampled_shape(grid.shape, grid.spacing, spacing))
    network_shape = _network_shape(shape, spacing, info.cfg, domain if options.fit_to_model else None, fitted)
    problems = domain.grid_problems(network_shape, spacing, options.fov_tolerance)
    if problems and not options.force:
        raise InvalidInput(_out_of_domain_message(info, domain, problems, grid, spacing, network_shape))
    return GridPlan(grid, shape, spacing, network_shape, tuple(problems), tuple(fitted))


def mask_grid(mask) -> MaskGrid:
    """The grid of a mask file (header only), an `volume_io.Volume` or a `MaskGrid`."""
    if isinstance(mask, MaskGrid):
        return mask
    if isinstance(mask, volume_io.Volume):
        return MaskGrid(mask.shape, mask.spacing, np.asarray(mask.array).itemsize, "volume given in code")
    shape, spacing, dtype = volume_io.read_grid(mask)
    return MaskGrid(shape, spacing, dtype.itemsize, str(mask))


def _network_shape(shape, spacing, cfg, domain, fitted: list) -> tuple[int, int, int]:
    """`shape` padded to divisor multiples; with a domain (fit_to_model), at least its smallest field of view."""
    divisor = network_divisor(cfg)
    want = list(shape)
    if domain is not None and domain.fov_mm:
        smallest = [math.ceil(lo / s - 1e-6) for lo, s in zip(domain.fov_mm[0], spacing)]
        if any(m > n for m, n in zip(smallest, shape)):
            want = [max(n, m) for n, m in zip(shape, smallest)]
            fitted.append(f"field of view padded with background from {_mm(_fov_of(shape, spacing), 0)} to "
                          f"{_mm(_fov_of(want, spacing), 0)} mm for the networks (the CT keeps the mask's extent)")
    return tuple(-(-n // divisor) * divisor for n in want)


def _out_of_domain_message(info, domain, problems, grid: MaskGrid, spacing, network_shape) -> str:
    """One line: what the model was trained on, what is wrong, and the nearest valid request."""
    nearest = domain.nearest_spacing(spacing)
    hints = []
    if nearest != tuple(spacing):
        hints.append(f"--spacing {' '.join(f'{v:g}' for v in nearest)}")
    fov = _fov_of(network_shape, spacing)
    if domain.fov_mm and any(f > hi for f, hi in zip(fov, domain.fov_mm[1])):
        hints.append(f"a mask cropped to at most {_mm(domain.fov_mm[1], 0)} mm")
    fit = "--fit-to-model (fit_to_model=True) resamples and pads to the trained grid"
    suggestion = f"{' and '.join(hints)}; or {fit}" if hints else fit
    name = "the bundled model" if info.model_dir == M.default_model_dir() else f"the model in {info.model_dir}"
    return (f"{name} was trained on {domain.describe()}, but {'; '.join(problems)}. Nearest valid request: "
            f"{suggestion}; --force (force=True) runs anyway and marks the output out of domain")


def _mm(values, digits: int | None = None) -> str:
    return " x ".join(f"{v:g}" if digits is None else f"{v:.{digits}f}" for v in values)


def _fov_of(shape, spacing) -> tuple[float, ...]:
    return tuple(float(n * s) for n, s in zip(shape, spacing))


# -- 4. does the request fit? ----------------------------------------------------------------

def memory_budget_bytes(max_memory_gb: float | None, device) -> int:
    """The budget: as given, else free CUDA memory or available RAM (both x 0.9 for headroom)."""
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
    if models is not None:
        return {kind: models.weight_bytes((kind,)) for kind in M.NETWORK_KINDS}
    with torch.device("meta"):
        return {kind: sum(p.numel() * 4 for p in ckpt.build_network(kind, info.cfg).parameters())
                for kind in M.NETWORK_KINDS}


def _prepare_bytes(grid: GridPlan) -> int:
    """Peak host bytes of step 5: the stored voxels read and converted (twice their size, int16 twice,
    a bool mask), then the resampled labels with the body envelope's masks (~16 bytes a voxel)."""
    return math.prod(grid.mask.shape) * (2 * grid.mask.itemsize + 5) + math.prod(grid.network_shape) * 16


def _output_bytes(grid: GridPlan, options: GenerateOptions) -> int:
    """Disk the outputs may take: int16 CT and uint8 labels uncompressed (gzip's worst case), 4 MiB more."""
    return math.prod(grid.shape) * (2 + (1 if options.write_label else 0)) + 4 * 2**20


def _check_fits(grid: GridPlan, info, models, options: GenerateOptions, release: bool = False) -> MemoryFit:
    """Refuse (ValueError) a request over the memory budget: preparing the mask, sampling, decoding.

    Returns the memory plan: budget, weights, sampling peak, host arrays, decode tiles, device, and
    `release` (the UNet and ControlNet are let go before decoding, so the decoder's budget counts
    only the VAE's weights).
    """
    device = nets.resolve_device(options.device)
    budget, prepare = memory_budget_bytes(options.max_memory_gb, device), _prepare_bytes(grid)
    if prepare > budget:
        raise InvalidInput(
            f"reading the {_mm(grid.mask.shape)} mask and resampling it to {_mm(grid.network_shape)} voxels needs "
            f"about {prepare / 2**30:.1f} GB, over the {budget / 2**30:.1f} GB budget. Raise "
            "--max-memory, choose a coarser --spacing, or crop the mask")
    weights = _weight_bytes(info, models)
    total = sum(weights.values())
    held = weights["vae"] if release else total  # what stays loaded while decoding
    # On the CPU the blended output volume and the HU arrays share the budget with the decoder.
    host = math.prod(grid.network_shape) * 12 if device.type == "cpu" else 0
    plan = compute.choose_plan(options.precision, device, half=_half(options, device))
    sampling_peak = total + _sampling_bytes(grid, info.cfg, options, device, plan)
    decode = _decode_plan(grid, info.cfg, budget, sampling_peak, held, host,
                          options.spill_dir if device.type == "cpu" else None)
    return MemoryFit(device=str(device), budget=budget, prepare=prepare, weights=total, release=release,
                     decode_weights=held, host=host, compute=plan, sampling=sampling_peak, decode=decode)


def _sampling_bytes(grid: GridPlan, cfg, options: GenerateOptions, device, plan) -> int:
    latent = tuple(n // cfg.vae.downsample_factor for n in grid.network_shape)
    flash = device.type == "cuda" and cfg.unet.use_flash_attention
    half = plan.name == "fp16"  # the CUDA estimate halves; bf16 on the CPU keeps the (measured) float32 one
    return sampling.estimate_sampling_bytes(cfg, latent, flash, options.cfg_scale is not None, half)


def _decode_plan(grid: GridPlan, cfg, budget: int, sampling_peak: int, held: int, host: int,
                 spill_dir: str | None = None):
    """The decoder's tiles for what the budget leaves beside the weights held and the host arrays."""
    size = "x".join(map(str, grid.network_shape))
    if sampling_peak > budget:
        raise InvalidInput(
            f"sampling a {size} volume needs about {sampling_peak / 2**30:.1f} GB, over the "
            f"{budget / 2**30:.1f} GB budget. Raise --max-memory, choose a coarser --spacing, or crop the mask"
        )
    if held + host >= budget:
        raise InvalidInput(
            f"the networks ({held / 2**30:.2f} GB) and the output arrays ({host / 2**30:.2f} GB) "
            f"alone exceed the {budget / 2**30:.2f} GB budget; raise --max-memory or generate a smaller volume"
        )
    latent = tuple(n // cfg.vae.downsample_factor for n in grid.network_shape)
    return autoencoder.plan_tiles(latent, cfg.vae, budget - held - host, spill_dir=spill_dir)


# -- 5. prepare the mask -----------------------------------------------------------------------

def phantom_mask(shape: Sequence[int], spacing: Sequence[float], tumors=(), seed: int = 0) -> volume_io.Volume:
    """The label map of a procedural phantom (`maisi2.phantom`), as a mask to generate from."""
    _, labels, affine = make_phantom(tuple(shape), tuple(spacing), tumors, seed)
    return volume_io.Volume(labels.astype(np.int16), affine)


def prepare_mask(mask: PathLike | volume_io.Volume, cfg, spacing=None, grid: GridPlan | None = None, domain=None,
                 options: GenerateOptions = GenerateOptions()) -> PreparedMask:
    """Load/check a mask, resample it (nearest) to the planned grid, add the body envelope, pad it.

    grid: step 3's plan (default: the mask at `spacing`, padded to divisor multiples). domain: the
    model's `ModelDomain`; labels it never saw are refused when they cover more than
    `UNSEEN_LABEL_SHARE` of the body, replaced with `options.fit_to_model`, and always reported.
    """
    volume, source = _load_mask(mask)
    input_shape, input_spacing = volume.shape, volume.spacing
    target = grid.spacing if grid is not None else spacing
    if target is not None and not np.allclose(target, volume.spacing, rtol=1e-4):
        volume = volume_io.resample_to_spacing(volume, target, order=0)
    unseen, replaced = {}, {}
    if domain is not None:
        volume, unseen, replaced = _unseen_labels(volume, domain, options, source)
    volume, added = _with_body(volume, source)
    divisor = network_divisor(cfg)
    padded_shape = grid.network_shape if grid is not None else tuple(-(-n // divisor) * divisor for n in volume.shape)
    padded = center_pad_or_crop(volume.array, padded_shape, fill=L.BACKGROUND)
    return PreparedMask(volume, padded, source, input_shape, input_spacing, added, unseen, replaced)


def _check_preview_focus(prepared: PreparedMask, options: GenerateOptions) -> None:
    """A preview asked to centre on a label the mask lacks is refused before any work."""
    if options.write_preview and options.preview_focus is not None:
        preview_centre(prepared.volume.array, options.preview_focus)


# Labels the ControlNet never saw get an output it was never taught; refused (without --force or
# --fit-to-model) when they cover more than this share of the labelled voxels.
UNSEEN_LABEL_SHARE = 0.05


def _unseen_labels(volume: volume_io.Volume, domain, options: GenerateOptions, source: str):
    ids, counts = np.unique(volume.array, return_counts=True)
    unseen = {int(i): int(c) for i, c in zip(ids, counts) if int(i) in set(domain.unseen_labels(ids))}
    if not unseen:
        return volume, {}, {}
    if options.fit_to_model:
        array, replaced = L.substitute_unseen(volume.array, domain.labels_seen)
        return volume.with_array(array), unseen, replaced
    labelled = int(counts[ids != L.BACKGROUND].sum())
    share = sum(unseen.values()) / max(labelled, 1)
    if share > UNSEEN_LABEL_SHARE and not options.force:
        names = ", ".join(f"{L.label_name(i)} ({i})" for i in sorted(unseen, key=unseen.get, reverse=True)[:6])
        raise InvalidInput(
            f"mask {source}: {share:.0%} of its labelled voxels carry labels the model never saw in training "
            f"({names}{' ...' if len(unseen) > 6 else ''}); its output there would be a guess. Pass --fit-to-model "
            "(fit_to_model=True) to replace them with the nearest labels it knows, or --force to run anyway")
    return volume, unseen, {}


def _load_mask(mask) -> tuple[volume_io.Volume, str]:
    if isinstance(mask, volume_io.Volume):
        array = np.asarray(mask.array)
        if not np.issubdtype(array.dtype, np.integer):
            raise InvalidInput("the mask Volume must hold integer MAISI label ids")
        L.check_label_ids(array, what="mask")
        return mask.with_array(array.astype(np.int16)), "volume given in code"
    return volume_io.load_label_map(mask), str(mask)  # checks the ids


def _with_body(volume: volume_io.Volume, source: str) -> tuple[volume_io.Volume, int]:
    """Add the body envelope (label 200) to unlabelled voxels inside the labels' filled hull."""
    labels = volume.array
    if not np.any(labels != L.BACKGROUND):
        raise InvalidInput(f"mask {source} holds no labels (every voxel is 0); pass a MAISI label map with the "
                         "body (200) and organ labels")
    if np.any(labels == L.BODY):
        return volume, 0
    envelope = body_envelope_from_labels(labels, spacing=volume.spacing)
    fill = (labels == L.BACKGROUND) & envelope
    out = labels.copy()
    out[fill] = L.BODY
    return volume.with_array(out), int(np.count_nonzero(fill))


def _fov(volume: volume_io.Volume) -> tuple[float, float, float]:
    return tuple(float(n * s) for n, s in zip(volume.shape, volume.spacing))


# -- 6. load the networks --------------------------------------------------------------------

def _load_networks(info, models, options: GenerateOptions, on_progress: ProgressFn | None = None):
    if models is not None:
        return models, 0.0
    start = time.perf_counter()
    loaded = None if on_progress is None else lambda done, total: on_progress({"phase": "loading", "done": done,
                                                                               "total": total})
    models = M.load_model(info, device=options.device, progress=loaded)
    return models, time.perf_counter() - start


# -- 7.-8. one attempt: sample, decode, check --------------------------------------------------

def _conditioning(prepared: PreparedMask, models, options: GenerateOptions) -> Guidance:
    """Conditioning on the networks' device; with guidance also the tumour-free mask's."""
    device = models.device

    def condition(labels: np.ndarray) -> nets.Conditioning:
        return nets.condition_on(labels, prepared.volume.spacing, options.modality, device=device)

    cond = condition(prepared.padded)
    uncond = None
    if options.cfg_scale is not None:
        tumor_free = L.remove_tumors(prepared.padded)
        # Without tumours both branches agree and guidance changes nothing: skip the second call.
        uncond = condition(tumor_free) if np.any(tumor_free != prepared.padded) else None
    return Guidance(cond, uncond)


def _half(options: GenerateOptions, device) -> bool:
    return torch.device(device).type == "cuda" if options.half_precision is None else bool(options.half_precision)


def _attempts(plan: GenerationPlan, models, on_progress: ProgressFn) -> tuple[list[dict], int]:
    """Attempts with seeds seed, seed+1, ... until one passes the quality check (or retries run out)."""
    options = plan.options
    attempts: list[dict] = []
    for retry in range(options.qc_retries + 1):
        attempts.append(_attempt(plan, models, options.seed + retry,
                                 _attempt_progress(on_progress, retry + 1, options.steps)))
        best = _best_attempt(attempts)
        for i, other in enumerate(attempts):
            if i != best:
                other.pop("hu", None)  # keep one volume in memory, not one per attempt
        if attempts[-1]["qc"].passed:
            break
        if retry < options.qc_retries:
            _announce_retry(on_progress, attempts[-1], retry + 1, options)
    return attempts, best


def _announce_retry(on_progress: ProgressFn, failed: dict, retry: int, options: GenerateOptions) -> None:
    """Say which organs failed the quality check and which seed the next attempt takes."""
    organs = failed["qc"].failed_organs()
    seed = options.seed + retry
    message = (f"quality check failed on {', '.join(organs)} (seed {failed['seed']}): "
               f"retry {retry} of {options.qc_retries} with seed {seed}")
    if options.progress:
        from tqdm.auto import tqdm

        tqdm.write(message, file=sys.stderr)  # where the bars are, between them
    on_progress({"phase": "retrying", "attempt": retry + 1, "seed": seed, "failed": organs, "message": message})


def _attempt_progress(on_progress: ProgressFn, attempt: int, steps: int) -> ProgressFn:
    """`on_progress` for one attempt: Euler-step callbacks (`flow.sample_euler`) and phase names in."""
    def report(event: dict) -> None:
        if "phase" in event:
            on_progress({**event, "attempt": attempt})
        else:  # a sampler step
            on_progress({"phase": "sampling", "attempt": attempt, "step": event["i"] + 1, "steps": steps})
    return report


def _attempt(plan: GenerationPlan, models, seed: int, on_progress: ProgressFn = _no_progress) -> dict:
    """One sample: the denoising loop, decoding to HU, the quality check; with their timings."""
    options, fit, prepared = plan.options, plan.fit, plan.prepared
    half = _half(options, models.device)
    latent_shape = (models.cfg.vae.latent_channels, *fit.decode.latent_shape)
    uncond = plan.guidance.uncond
    reload_seconds = models.restore_diffusion()  # released by an earlier attempt (a QC retry)
    on_progress({"phase": "sampling", "step": 0, "steps": options.steps})  # a stop here costs no step
    start = time.perf_counter()
    latent = sampling.sample_latent(
        models.unet, plan.guidance.cond, latent_shape, models.cfg.flow, controlnet=models.controlnet,
        uncond=uncond, cfg_scale=options.cfg_scale if uncond is not None else None, steps=options.steps,
        seed=seed, exact_grid=options.exact_grid, control_scale=options.control_scale, compute=fit.compute,
        progress=options.progress, callback=on_progress)
    _check_finite(latent, "the sampled latent", seed, options)
    sampled = time.perf_counter()
    if fit.release:
        models.release_diffusion()  # the decode plan counted only the VAE's weights
    on_progress({"phase": "decoding"})
    hu = _decode_to_hu(latent, prepared, models, fit.decode, half, fit.compute,
                       _decode_progress(on_progress, fit.decode.count, options.progress), options.decode_statistics,
                       lambda image: _check_finite(image, "the decoded CT", seed, options))
    decoded = time.perf_counter()
    on_progress({"phase": "checking"})
    qc = quality.quality_check(hu, prepared.volume.array)
    timings = {"sampling": sampled - start, "decoding": decoded - sampled}
    if reload_seconds:
        timings["reload_networks"] = reload_seconds
    return {"seed": seed, "hu": hu, "qc": qc, "timings": timings}


def _check_finite(values, what: str, seed: int, options: GenerateOptions) -> None:
    """NaN or inf must never reach the int16 cast, where they would be written as tissue."""
    bad = int((~torch.isfinite(values)).sum())
    if bad:
        raise InvalidInput(
            f"{what} holds {bad} NaN/inf values (seed {seed}, cfg scale {options.cfg_scale}, control scale "
            f"{options.control_scale}); nothing was written. Lower --cfg-scale / --control-scale, or check the "
            "model's weights")


def _decode_progress(on_progress: ProgressFn, tiles: int, bar: bool) -> Progress:
    """The decoder's (done, total) as decoding events, and with `bar` as a terminal bar too."""
    draw = terminal_bar("decode", "tile" if tiles > 1 else "‰") if bar else None
    tiled = {"tiles": tiles} if tiles > 1 else {}

    def report(done: int, total: int) -> None:
        if draw is not None:
            draw(done, total)
        on_progress({"phase": "decoding", "done": done, "total": total, **tiled})
    return report


def _decode_to_hu(latent, prepared: PreparedMask, models, plan, half: bool, arithmetic: compute.ComputePlan,
                  progress: Progress | None, statistics: str, check=None) -> np.ndarray:
    """Latent -> int16 HU on the prepared grid: decode, clip to [0, 1], to HU, crop, air outside body.

    `check(image)` sees the decoded image before its values are clipped and cast.
    """
    image = decode_tiled(models.vae, latent / models.scale_factor, plan, autocast=half, progress=progress,
                         statistics=statistics, arithmetic=arithmetic)
    if check is not None:
        check(image)
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


# -- 9.-10. the report and the outputs -------------------------------------------------------

def _report(plan: GenerationPlan, models, attempts: list[dict], best: int, timings: dict) -> dict:
    prepared, options, fit = plan.prepared, plan.options, plan.fit
    info = models.info
    return {
        "maisi2_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "outputs": {k: (None if v is None else str(v)) for k, v in dataclasses.asdict(plan.paths).items()},
        "mask": prepared.describe(),
        "model": {"dir": None if info is None else str(info.model_dir),
                  "layout": None if info is None else info.layout, "preset": models.cfg.preset,
                  "scale_factor": models.scale_factor, "metadata": models.metadata},
        "settings": {k: v for k, v in dataclasses.asdict(options).items() if k != "request"},
        **({"request": options.request} if options.request is not None else {}),
        "domain": _domain_report(prepared, info, plan.grid),
        "device": fit.device,
        "precision": fit.compute.name,
        "compute_plan": fit.compute.to_dict(),
        "guidance": {"scale": options.cfg_scale, "applied": plan.guidance.uncond is not None,
                     "unconditional_mask": "tumours replaced by their parent organs (labels.remove_tumors)"},
        "memory": fit.to_dict(),
        "seed": attempts[best]["seed"],
        "chosen_attempt": best,
        "attempts": [{"seed": a["seed"], "timings_s": a["timings"], "quality": a["qc"].to_dict()} for a in attempts],
        "quality": attempts[best]["qc"].to_dict(),
        "timings_s": timings,
    }


def _domain_report(prepared: PreparedMask, info, grid: GridPlan) -> dict:
    """What of this request lies outside what the model was trained on, and what was fitted to it."""
    reasons = list(grid.out_of_domain)
    unseen = {i: n for i, n in prepared.unseen_labels.items() if i not in prepared.replaced_labels}
    if unseen:
        names = ", ".join(f"{L.label_name(i)} ({i})" for i in sorted(unseen))
        reasons.append(f"{sum(unseen.values())} voxels carry labels the model never saw in training: {names}")
    return {
        "out_of_domain": reasons,
        "fitted": list(grid.fitted),
        "unseen_labels": {str(i): {"name": L.label_name(i), "voxels": n} for i, n in prepared.unseen_labels.items()},
        "replaced_labels": {str(i): {"name": L.label_name(i), "by": new, "by_name": L.label_name(new)}
                            for i, new in prepared.replaced_labels.items()},
        "model": None if info is None else info.domain.to_dict(),
    }


def _write_outputs(paths: OutputPaths, prepared: PreparedMask, hu: np.ndarray, report: dict,
                   options: GenerateOptions) -> None:
    """Write every file (or series folder) to its staging name, then move them all into place
    together (`atomic.output_set`)."""
    with output_set(paths.all(), options.overwrite, folders=_folders(paths, options)) as staged:
        if options.out_format == "dicom":
            write_ct_series(staged[paths.ct], prepared.volume.with_array(hu), window=PREVIEW_WINDOW_HU)
        else:
            volume_io.save_ct(staged[paths.ct], prepared.volume.with_array(hu))
        if paths.label is not None:
            volume_io.save_label_map(staged[paths.label], prepared.volume, tables=False)  # its tables are in the set
            staged[paths.slicer_colour_table].write_text(label_tables.slicer_colour_table())
            staged[paths.itksnap_labels].write_text(label_tables.itksnap_label_description())
        if paths.preview is not None:
            render_preview(hu, prepared.volume.array, prepared.volume.spacing,
                           focus=options.preview_focus).save(staged[paths.preview], format="PNG")
        staged[paths.report].write_text(json.dumps(report, indent=2, default=_json_default))


def _json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, (Path, tuple)):
        return str(value) if isinstance(value, Path) else list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# -- batches -----------------------------------------------------------------------------------

def generate_batch(items: Sequence[BatchItem], model=None, options: GenerateOptions = GenerateOptions(),
                   on_done=None, on_skip=None) -> list[GenerationResult]:
    """Generate for each item with the networks loaded once.

    Items whose outputs all exist are skipped (unless `options.overwrite`), so a batch stopped by
    a failure is finished by running it again; `on_skip(item)` is called for each. Every other
    item is checked first (outputs, mask, domain, memory), so a bad item stops the batch before any
    generation; errors name the item (its datalist line). Item i starts from seed
    ``options.seed + i * (qc_retries + 1)`` unless it names its own, so retries never reuse another
    item's seed, and a rerun gives each item the seed it had. `on_done(result)` is called after each item.
    """
    info, models = _model_info(model)
    _check_distinct(items)
    checked = []
    for i, item in enumerate(items):
        seed = item.seed if item.seed is not None else options.seed + i * (options.qc_retries + 1)
        item_options = dataclasses.replace(options, seed=seed, spacing=item.spacing or options.spacing)
        if not options.overwrite and _finished(item, item_options):
            if on_skip is not None:
                on_skip(item)
            continue
        with _naming(item):
            plan, _ = _plan(item.mask, item.out, models or info, item_options, release=False)
        checked.append((item, plan))
    if not checked:
        return []
    models, load_seconds = _load_networks(info, models, options)
    results = []
    for item, plan in checked:
        with _naming(item):
            results.append(_generate_prepared(plan, models, time.perf_counter(), load_seconds))
        if on_done is not None:
            on_done(results[-1])
    return results


def _finished(item: BatchItem, options: GenerateOptions) -> bool:
    """Whether every output of the item exists (outputs appear as a set, so all or none do)."""
    paths = OutputPaths.beside(item.out, options).all()
    present = [p for p in paths if p.exists()]
    if present and len(present) < len(paths):
        missing = ", ".join(str(p) for p in paths if not p.exists())
        raise OutputExists(f"{item.where or item.mask}: some outputs exist but {missing} does not (written by "
                              "another version, or removed since?); remove the others or pass --overwrite")
    return bool(present)


@contextmanager
def _naming(item: BatchItem):
    """Errors raised inside name the batch item they belong to."""
    try:
        yield
    except (ValueError, FileNotFoundError, FileExistsError, OSError) as err:
        prefix = f"{item.where or item.mask}: "
        if str(err).startswith(prefix):
            raise
        try:
            named = type(err)(prefix + str(err))
        except TypeError:
            named = ValueError(prefix + str(err))
        raise named from err


def _check_distinct(items: Sequence[BatchItem]) -> None:
    outs = [Path(i.out).resolve() for i in items]
    if len(set(outs)) != len(outs):
        raise InvalidInput("two batch items would write the same output file; give them distinct \"out\" names")
    masks = {Path(i.mask).resolve() for i in items}
    clash = [o for o in outs if o in masks]
    if clash:
        raise InvalidInput(f"output {clash[0]} is also an input mask; choose another --out-dir")
