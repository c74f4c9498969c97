"""What the web app does, as Python functions: masks in, tumour edits, generation jobs, results out.

`Workspace` owns one output folder and everything in it; the FastAPI layer (`maisi2.web.app`)
only translates HTTP to these calls, and the tests call them directly. Layout::

    OUT/uploads/<id>/<file>            raw uploads, deleted once imported
    OUT/masks/<id>/mask.nii.gz         every mask: uploaded, imported, phantom, library, edited
    OUT/masks/<id>/mask.json           its name, source, parent mask and the edit that made it
    OUT/results/<id>/ct.nii.gz ...     what `generate` wrote (CT, label map, preview, report)
    OUT/results/<id>/request.json      the mask and settings the result was made from

Every mask and result is written in a hidden staging folder (``.new-<id>``) and renamed into
place when complete, so a cancelled job, a refused import or a stopped server leaves no
half-written entry; staging folders left by a killed server are removed at the next start.
Files are only ever addressed by (kind, id) pairs checked against `ID_PATTERN`, never by a path
from the request, so nothing outside OUT (and nothing the app did not write) can be downloaded.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

from maisi2 import volume_io
from maisi2 import labels as L
from maisi2.errors import InvalidInput, Maisi2Error
from maisi2.web.jobs import Job, JobQueue, NotFound

__all__ = ["Workspace", "UploadTooLarge", "GenerationSettings", "WINDOW_PRESETS", "ID_PATTERN", "RESULT_FILES", "tumor_list"]

ID_PATTERN = re.compile(r"^[0-9a-f]{12}$")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
# Result downloads: kind -> file name inside the result folder (what `generate` writes for ct.nii.gz).
RESULT_FILES = {"ct": "ct.nii.gz", "label": "ct_label.nii.gz", "report": "ct_report.json",
                "preview": "ct_preview.png"}
# Display windows (width, level) in HU, as radiology viewers name them.
WINDOW_PRESETS = {"soft tissue": (400.0, 40.0), "lung": (1500.0, -600.0), "bone": (1800.0, 400.0)}
# The page's precision choice: the CLI's `generate --precision` (`maisi2.compute.PRECISIONS`, not
# imported here: it pulls in torch). auto is the release's fp16 autocast on CUDA, fp32 or bf16 on CPU.
PRECISIONS = ("auto", "fp32", "bf16")
MAX_PHANTOM_VOXELS = 256**3  # a phantom is painted in the request: keep it to seconds


@dataclass(frozen=True)
class GenerationSettings:
    """The generation settings the page offers (the CLI's `generate` options of the same names)."""

    steps: int = 30
    seed: int = 0
    spacing: tuple[float, float, float] | None = None  # mm; None: the mask's own
    precision: str = "auto"  # --precision: auto (the machine's compute plan: fp16 autocast on CUDA), fp32, bf16
    model: str = "bundled"  # a name from Workspace.models
    qc_retries: int = 0
    force: bool = False  # run a request outside the model's domain anyway; the report marks it out of domain
    fit_to_model: bool = False  # resample / pad / relabel the request to the nearest one the model knows

    def options(self):
        from maisi2.generate import GenerateOptions, check_options

        # As `generate --precision P`; fp32 is float32 everywhere, the decoder too (as `--fp32`).
        options = GenerateOptions(steps=self.steps, seed=self.seed,
                                  spacing=None if self.spacing is None else tuple(self.spacing),
                                  precision=self.precision, half_precision=False if self.precision == "fp32" else None,
                                  qc_retries=self.qc_retries,
                                  force=bool(self.force), fit_to_model=bool(self.fit_to_model))
        check_options(options)  # the CLI's refusals, before the job is queued
        return options


@dataclass(frozen=True)
class MaskRecord:
    id: str
    name: str
    source: str  # upload, totalseg, phantom, library, request, edit
    parent: str | None = None  # the mask an edit started from
    change: dict | None = None  # the edit (or import report) that made it
    created: float = field(default_factory=time.time)


class Workspace:
    """One output folder, its masks and results, and the generation queue (one job at a time)."""

    def __init__(self, out_dir: str | os.PathLike, models: dict[str, str | None] | None = None,
                 library: str | os.PathLike | None = None, max_upload_bytes: int = 512 * 2**20):
        self.root = Path(out_dir).expanduser().resolve()
        self.models = dict(models or {"bundled": None})  # page name -> model folder (None: bundled)
        self.library = None if library is None else Path(library).expanduser()  # None: the bundled library
        self.max_upload_bytes = int(max_upload_bytes)
        for sub in ("uploads", "masks", "results"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
            _remove_staging(self.root / sub)
        self._lock = threading.Lock()
        self.queue = JobQueue(workers=1)

    def close(self) -> None:
        """Cancel queued and running jobs and wait for the worker: nothing is left half-written."""
        self.queue.shutdown()

    # -- uploads ---------------------------------------------------------------------------

    def store_upload(self, name: str, chunks: Iterable[bytes]) -> str:
        """Save an uploaded NIfTI file, refusing it past the size limit; returns its id."""
        with self.new_upload(name) as upload:
            for chunk in chunks:
                upload.write(chunk)
        return upload.id

    def new_upload(self, name: str, declared_size: int | None = None) -> "UploadWriter":
        """``with ws.new_upload(name) as up: up.write(chunk)...``: a streamed upload (the HTTP route).

        declared_size: the size the client announced, refused at once when over the limit.
        """
        if declared_size is not None and declared_size > self.max_upload_bytes:
            raise UploadTooLarge.of(name, self.max_upload_bytes)
        return UploadWriter(self.root / "uploads", _nifti_name(name), name, self.max_upload_bytes)

    def _upload_path(self, upload_id: str) -> Path:
        folder = self.root / "uploads" / _checked_id(upload_id, "upload")
        files = list(folder.iterdir()) if folder.is_dir() else []
        if len(files) != 1:
            raise NotFound(f"no upload {upload_id!r} (uploads are used once; upload the file again)")
        return files[0]

    def _discard_uploads(self, *upload_ids: str | None) -> None:
        for upload_id in upload_ids:
            if upload_id is not None and ID_PATTERN.match(upload_id):
                shutil.rmtree(self.root / "uploads" / upload_id, ignore_errors=True)

    # -- masks in --------------------------------------------------------------------------

    def import_label_map(self, upload_id: str) -> MaskRecord:
        """A MAISI label map upload becomes a mask (ids checked, as `generate --mask` checks them)."""
        try:
            path = self._upload_path(upload_id)
            volume = _in_users_words(volume_io.load_label_map, path)
            return self._add_mask(volume, path.name, "upload")
        finally:
            self._discard_uploads(upload_id)

    def import_totalseg(self, seg_upload: str, ct_upload: str | None = None, version: str | None = None) -> MaskRecord:
        """A TotalSegmentator map (and optionally its CT) -> MAISI mask (`maisi2.label_import`).

        version: the map's numbering, "v1" or "v2"; None detects it (as `labels import-totalseg`).
        """
        from maisi2.label_import import import_totalseg

        try:
            seg = self._upload_path(seg_upload)
            ct = None if ct_upload is None else self._upload_path(ct_upload)
            with self._staging("masks") as (mask_id, folder):
                report = _in_users_words(import_totalseg, seg, folder / "mask.nii.gz", ct_path=ct, version=version,
                                         also=() if ct is None else (ct,))
                record = MaskRecord(mask_id, f"{_stem(seg.name)} (TotalSegmentator)", "totalseg",
                                    change={"import": report.summary()})
                _write_json(folder / "mask.json", asdict(record))
            return record
        finally:
            self._discard_uploads(seg_upload, ct_upload)

    def add_phantom(self, shape: Sequence[int], spacing: Sequence[float], seed: int = 0,
                    tumors: Sequence[str] = ()) -> MaskRecord:
        """A procedural phantom's label map (`maisi2 generate --phantom`), e.g. tumors=["hepatic:1"]."""
        from maisi2.generate import phantom_mask
        from maisi2.phantom import parse_tumor_specs

        if len(shape) != 3 or int(np.prod([int(n) for n in shape])) > MAX_PHANTOM_VOXELS:
            raise InvalidInput(f"a phantom here has three sizes and at most {MAX_PHANTOM_VOXELS:,} voxels "
                             f"(e.g. 128 128 96), got {list(shape)}; use `maisi2 phantom` for larger ones")
        volume = phantom_mask(shape, spacing, parse_tumor_specs(tumors), seed)
        name = f"phantom {'x'.join(map(str, shape))} @ {'x'.join(f'{s:g}' for s in spacing)} mm, seed {seed}"
        return self._add_mask(volume, name + (f", {' '.join(tumors)}" if tumors else ""), "phantom")

    def library_entries(self) -> list[dict]:
        """The masks of the library (`--library DIR`, else the bundled one), as the page lists them."""
        index = self._library()
        return [{"file": e.file, "shape": list(e.shape), "spacing": list(e.spacing), "regions": sorted(e.regions),
                 "tumors": list(e.tumors),
                 "summary": f"{'x'.join(map(str, e.shape))} @ {'x'.join(f'{s:g}' for s in e.spacing)} mm; "
                            f"{', '.join(sorted(e.regions)) or 'no region'}"
                            + (f"; {', '.join(e.tumors)}" if e.tumors else "")}
                for e in index.entries]

    def add_from_library(self, file: str) -> MaskRecord:
        """A library mask, named by its index entry (never by a path from the request)."""
        index = self._library()
        entry = next((e for e in index.entries if e.file == file), None)
        if entry is None:
            raise NotFound(f"no mask {file!r} in the library {index.folder}")
        volume = volume_io.load_label_map(index.folder / entry.file)
        return self._add_mask(volume, f"{entry.file} (library)", "library")

    def request_mask(self, region=None, anatomy=(), size=None, spacing=None, seed: int = 0) -> MaskRecord:
        """A mask for a request by region, anatomy, size and spacing (`maisi2 generate --region ...`):
        the library's best mask, fitted to the grid, with the requested tumours it lacks added."""
        from maisi2.masks.intent import TumorCount, mask_with_tumors
        from maisi2.masks.select import fit_mask, make_request, select_masks

        request = make_request(region, anatomy, size, spacing)
        index = self._library()
        (chosen,), _, _ = select_masks(index, request, seed=seed)
        fitted, fit = fit_mask(volume_io.load_label_map(index.folder / chosen.entry.file), request)
        edited, changes = mask_with_tumors(fitted, [TumorCount(L.tumor_kind(n)) for n in chosen.to_add], seed=seed)
        asked = ", ".join([*request.regions, *request.anatomy]) or "any mask"
        return self._add_mask(edited, f"{asked} -> {chosen.entry.file}", "request",
                              change={"selected": chosen.to_dict(), "fit": fit,
                                      "tumor_edits": [c.to_dict() for c in changes]})

    def _library(self):
        from maisi2.masks.library import load_library

        return load_library(self.library)

    def _add_mask(self, volume: volume_io.Volume, name: str, source: str, parent: str | None = None,
                  change: dict | None = None) -> MaskRecord:
        with self._staging("masks") as (mask_id, folder):
            volume_io.save_label_map(folder / "mask.nii.gz", volume)
            record = MaskRecord(mask_id, name, source, parent, change)
            _write_json(folder / "mask.json", asdict(record))
        return record

    def masks(self) -> list[MaskRecord]:
        """Every mask in the folder, newest first."""
        records = [_read_mask_record(p) for p in (self.root / "masks").glob("*/mask.json") if ID_PATTERN.match(p.parent.name)]
        return sorted(records, key=lambda r: r.created, reverse=True)

    def mask(self, mask_id: str) -> MaskRecord:
        path = self._mask_dir(mask_id) / "mask.json"
        return _read_mask_record(path)

    def mask_path(self, mask_id: str) -> Path:
        return self._mask_dir(mask_id) / "mask.nii.gz"

    def _mask_dir(self, mask_id: str) -> Path:
        folder = self.root / "masks" / _checked_id(mask_id, "mask")
        if not (folder / "mask.json").is_file():
            raise NotFound(f"no mask {mask_id!r}")
        return folder

    # -- tumour edits (maisi2.masks) ---------------------------------------------------------

    def edit_mask(self, mask_id: str, edit: dict) -> MaskRecord:
        """Apply one tumour edit to a mask; the edited mask is a new mask whose parent is `mask_id`.

        edit: {"op": "add", "kind": "hepatic", "radius_mm": 12, "at": [x, y, z]} (a voxel inside the
        tumour's organ); {"op": "remove", "at": [x, y, z]} or {"op": "scale", "at": [x, y, z],
        "factor": 0.8} (the one tumour at or nearest that voxel); {"op": "remove", "kind": "hepatic"}
        or {"op": "scale", "kind": "hepatic", "factor": 0.8} (every tumour of that kind, as
        `maisi2 masks edit` does); see `web.edits`.
        """
        from maisi2.web.edits import apply_edit

        record = self.mask(mask_id)
        volume = load_volume(self.mask_path(mask_id), "labels")
        labels, change = apply_edit(volume.array, volume.spacing, edit)
        return self._add_mask(volume.with_array(labels), f"{record.name} + {change['summary']}", "edit",
                              parent=mask_id, change=change)

    # -- viewing ---------------------------------------------------------------------------

    def describe(self, kind: str, item_id: str) -> dict:
        """What the viewer needs of a mask or a result: grid, legend, tumours, whether a CT exists."""
        labels = load_volume(self._volume_path(kind, item_id, "labels"), "labels")
        present, counts = np.unique(labels.array, return_counts=True)
        palette = _palette()
        legend = [{"id": int(i), "name": L.label_name(int(i)), "colour": palette[int(i)].tolist(),
                   "voxels": int(n)} for i, n in zip(present, counts) if i != L.BACKGROUND]
        return {"kind": kind, "id": item_id, "shape": list(labels.shape), "spacing": list(labels.spacing),
                "has_ct": kind == "result", "legend": legend,
                "tumors": tumor_list(labels.array, labels.spacing)}

    def view_slice(self, kind: str, item_id: str, layer: str, axis: int, index: int) -> np.ndarray:
        """One slice of a volume in array order: int16 HU for layer "ct", uint8 label ids for "labels"."""
        if axis not in (0, 1, 2):
            raise InvalidInput(f"axis must be 0, 1 or 2, got {axis}")
        volume = load_volume(self._volume_path(kind, item_id, layer), layer)
        if not 0 <= index < volume.shape[axis]:
            raise InvalidInput(f"slice {index} is outside 0..{volume.shape[axis] - 1} along axis {axis}")
        return np.ascontiguousarray(np.take(volume.array, index, axis=axis))

    def _volume_path(self, kind: str, item_id: str, layer: str) -> Path:
        if kind == "mask" and layer == "labels":
            return self.mask_path(item_id)
        if kind == "result" and layer in ("ct", "labels"):
            return self.result_file(item_id, "ct" if layer == "ct" else "label")
        raise InvalidInput(f"no {layer!r} layer for a {kind!r} (masks have labels; results have ct and labels)")

    # -- generation --------------------------------------------------------------------------

    def submit(self, mask_id: str, settings: GenerationSettings = GenerationSettings()) -> Job:
        """Queue a generation from a mask. Checked now: the settings, and the mask's grid against the
        model's domain (refused with the nearest valid request, as `maisi2 generate` refuses it, unless
        force or fit_to_model); what needs the voxels (labels the model never saw) when the job runs."""
        from maisi2.generate import plan_grid
        from maisi2.models import read_model_info

        record = self.mask(mask_id)
        options = settings.options()
        if settings.model not in self.models:
            raise InvalidInput(f"unknown model {settings.model!r}; this server offers {', '.join(self.models)}")
        plan_grid(self.mask_path(mask_id), read_model_info(self.models[settings.model]), options)  # header only
        details = {"mask": record.id, "mask_name": record.name, "settings": asdict(settings)}

        def task(on_progress):
            return self._generate(record, settings, options, on_progress)

        return self.queue.submit(task, label=record.name, details=details)

    def _generate(self, record: MaskRecord, settings: GenerationSettings, options, on_progress) -> str:
        from maisi2.generate import generate

        mask_path = self.mask_path(record.id)
        with self._staging("results") as (result_id, folder):
            _write_json(folder / "request.json", {"mask": asdict(record), "settings": asdict(settings)})
            try:
                generate(mask_path, folder / RESULT_FILES["ct"], model=self.models[settings.model],
                         options=options, on_progress=on_progress)
            except Maisi2Error as err:  # the page knows the mask by its name, not by our copy's path
                message = str(err).replace(str(mask_path), repr(record.name)).replace(str(folder), "the result folder")
                raise type(err)(message) if message != str(err) else err from None
        return result_id

    def cancel(self, job_id: str) -> Job:
        return self.queue.cancel(job_id)

    def jobs(self) -> list[dict]:
        return [{**job.to_dict(), "position": self.queue.position(job)} for job in self.queue.jobs()]

    # -- results out -----------------------------------------------------------------------

    def results(self) -> list[dict]:
        """Every finished result in the folder (this run's and earlier ones), newest first."""
        found = [self.result(p.parent.name) for p in (self.root / "results").glob("*/request.json")
                 if ID_PATTERN.match(p.parent.name)]
        return sorted(found, key=lambda r: r["created"], reverse=True)

    def result(self, result_id: str) -> dict:
        folder = self._result_dir(result_id)
        request = json.loads((folder / "request.json").read_text())
        report = json.loads((folder / RESULT_FILES["report"]).read_text())
        quality, domain = report["quality"], report.get("domain", {})
        return {"id": result_id, "created": (folder / "request.json").stat().st_mtime,
                "mask": request["mask"], "settings": request["settings"], "seed": report["seed"],
                "shape": report["mask"]["shape"], "spacing": report["mask"]["spacing"],
                "quality": {"passed": quality["passed"], "failed": quality.get("failed", []),
                            "organs": quality.get("organs", {})},
                "out_of_domain": domain.get("out_of_domain", []),  # why a forced request was outside it
                "fitted": domain.get("fitted", []),  # what fit_to_model changed
                "attempts": len(report["attempts"]), "timings_s": report["timings_s"],
                "files": [kind for kind, name in RESULT_FILES.items() if (folder / name).is_file()]}

    def result_file(self, result_id: str, kind: str) -> Path:
        """The path of one file the app wrote for a result; refuses anything else."""
        if kind not in RESULT_FILES:
            raise NotFound(f"no file kind {kind!r}; results have {', '.join(RESULT_FILES)}")
        path = self._result_dir(result_id) / RESULT_FILES[kind]
        if not path.is_file():
            raise NotFound(f"result {result_id} has no {kind} file")
        return path

    def _result_dir(self, result_id: str) -> Path:
        folder = self.root / "results" / _checked_id(result_id, "result")
        if not (folder / "request.json").is_file():
            raise NotFound(f"no result {result_id!r}")
        return folder

    # -- staging -----------------------------------------------------------------------------

    def _staging(self, area: str):
        return _StagedFolder(self.root / area)


class UploadTooLarge(InvalidInput):
    """An upload past the server's size limit."""

    @classmethod
    def of(cls, name: str, limit: int) -> "UploadTooLarge":
        return cls(f"{name} is larger than the upload limit of {_mib(limit)}; crop or resample it, "
                   "or start `maisi2 serve` with a larger --max-upload-mb")


class UploadWriter:
    """One upload written chunk by chunk; over the limit or on any error, nothing of it is kept."""

    def __init__(self, parent: Path, safe_name: str, given_name: str, limit: int):
        self.id = secrets.token_hex(6)
        self.folder, self.name, self.given_name, self.limit = parent / self.id, safe_name, given_name, limit
        self.size, self._file = 0, None

    def __enter__(self) -> "UploadWriter":
        self.folder.mkdir()
        self._file = open(self.folder / self.name, "wb")
        return self

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            raise UploadTooLarge.of(self.given_name, self.limit)
        self._file.write(chunk)

    def __exit__(self, exc_type, exc, tb) -> None:
        self._file.close()
        if exc_type is None and self.size == 0:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise InvalidInput(f"{self.given_name} is empty")
        if exc_type is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


class _StagedFolder:
    """``with _StagedFolder(parent) as (id, folder)``: build in parent/.new-<id>, rename to parent/<id>."""

    def __init__(self, parent: Path):
        self.id = secrets.token_hex(6)
        self.parent, self.folder = parent, parent / f".new-{self.id}"

    def __enter__(self) -> tuple[str, Path]:
        self.folder.mkdir()
        return self.id, self.folder

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            os.rename(self.folder, self.parent / self.id)
        else:
            shutil.rmtree(self.folder, ignore_errors=True)


def _remove_staging(parent: Path) -> None:
    """Staging folders left by a server that was killed (what it wrote is incomplete)."""
    for folder in parent.glob(".new-*"):
        shutil.rmtree(folder, ignore_errors=True)
    if parent.name == "uploads":  # uploads of an earlier run were never imported
        for folder in parent.iterdir():
            shutil.rmtree(folder, ignore_errors=True)


# -- helpers ----------------------------------------------------------------------------------

def tumor_list(labels: np.ndarray, spacing: Sequence[float]) -> list[dict]:
    """Each connected tumour (lesion label component): label, kind, the voxel of it nearest its
    centre ("at", where the page's "show" button moves the crosshair), size in voxels and mL."""
    found = []
    voxel_ml = float(np.prod(spacing)) / 1000.0
    for tumor_id in L.TUMOR_IDS:
        components, count = ndimage.label(labels == tumor_id)
        for k, box in enumerate(ndimage.find_objects(components), start=1):
            inside = np.argwhere(components[box] == k) + [s.start for s in box]
            nearest = inside[np.argmin(((inside - inside.mean(axis=0)) ** 2).sum(axis=1))]
            found.append({"label": tumor_id, "name": L.label_name(tumor_id),
                          "kind": L.tumor_kind(L.label_name(tumor_id)), "at": nearest.tolist(),
                          "voxels": len(inside), "volume_ml": round(len(inside) * voxel_ml, 2)})
    return found


@lru_cache(maxsize=1)
def _palette() -> np.ndarray:
    from maisi2.label_tables import label_colours

    return label_colours()


def load_volume(path: Path, layer: str) -> volume_io.Volume:
    """A volume the viewer shows (cached: slices are requested one at a time)."""
    return _load_cached(str(path), layer, path.stat().st_mtime_ns)


@lru_cache(maxsize=6)
def _load_cached(path: str, layer: str, mtime_ns: int) -> volume_io.Volume:
    if layer == "ct":
        volume = volume_io.load_ct(path)
        return volume.with_array(np.rint(volume.array).astype(np.int16))
    volume = volume_io.load_label_map(path)
    return volume.with_array(volume.array.astype(np.uint8))  # MAISI ids are 0..200


def _checked_id(value: str, what: str) -> str:
    if not isinstance(value, str) or not ID_PATTERN.match(value):
        raise NotFound(f"no {what} {value!r}")
    return value


def _nifti_name(name: str) -> str:
    """A safe file name for an upload: NIfTI suffix required, no folders, plain characters."""
    base = Path(str(name).replace("\\", "/")).name
    lower = base.lower()
    suffix = next((s for s in NIFTI_SUFFIXES if lower.endswith(s)), None)
    if suffix is None:
        raise InvalidInput(f"{name!r} is not a NIfTI file; upload a label map as .nii.gz or .nii")
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", base[: -len(suffix)])[:80].strip(".") or "upload"
    return stem + suffix


def _stem(name: str) -> str:
    return name.split(".nii")[0]


def _in_users_words(fn, path: Path, *args, also: Sequence[Path] = (), **kwargs):
    """Call `fn(path, ...)`; in an error message, name the upload (and the uploads in `also`, e.g. the
    CT of a TotalSegmentator map) as the user did, not by our copy's path."""
    try:
        return fn(path, *args, **kwargs)
    except Maisi2Error as err:  # only our own refusals: a ValueError or KeyError from a bug stays a 500
        message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        for upload in (path, *also):
            for location in (str(upload), str(upload.parent)):
                message = message.replace(location, upload.name)
        raise InvalidInput(message) from None


def _read_mask_record(path: Path) -> MaskRecord:
    data = json.loads(path.read_text())
    return MaskRecord(**data)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2))


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"
