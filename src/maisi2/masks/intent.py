"""From intent to CT: select a library mask (or take the user's), fit it, edit its tumours, generate.

    samples = generate_from_intent(make_request("chest", "liver,hepatic tumor", (128, 128, 96), (3, 3, 3)),
                                   "ct.nii.gz", num_samples=2)
    samples[0].ct, samples[0].labels        # arrays; files ct_000.nii.gz, ct_001.nii.gz (+ label, preview, report)

Steps: 1. check the request and every output before any work; 2. select masks (`select`);
3. for each sample: fit the mask to the grid, add the tumours the request names but the mask lacks
and those of `tumors` (`tumors.add_tumor`, radius drawn from `tumor_radius_mm`, shrunk while it
does not fit), 4. generate (`maisi2.generate.generate`) with the selection and the edits in the
report and the preview centred on the first edited tumour's label.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from maisi2 import volume_io
from maisi2 import labels as L
from maisi2.errors import InvalidInput
from maisi2.masks import tumors as T
from maisi2.masks.library import load_library
from maisi2.masks.select import MaskRequest, fit_mask, select_masks

__all__ = ["IntentSample", "TumorCount", "parse_tumor_counts", "generate_from_intent", "mask_with_tumors",
           "numbered_outputs", "add_tumors", "preview_label"]


@dataclass(frozen=True)
class TumorCount:
    kind: str
    count: int = 1


@dataclass
class IntentSample:
    ct_path: Path
    report: dict
    ct: np.ndarray  # int16 HU (x, y, z), read back from ct_path
    labels: np.ndarray  # the label map it was generated from


def parse_tumor_counts(items: Sequence[str]) -> list[TumorCount]:
    """``["hepatic:2", "lung"]`` -> TumorCounts (count defaults to 1)."""
    out = []
    for item in items:
        kind, sep, count = str(item).partition(":")
        try:
            n = int(count) if sep else 1
        except ValueError:
            n = -1
        if n < 1:
            raise InvalidInput(f"bad tumour request {item!r}; write KIND or KIND:COUNT with COUNT >= 1, e.g. hepatic:2")
        out.append(TumorCount(L.tumor_kind(kind), n))
    return out


def add_tumors(labels: np.ndarray, spacing, kind: str, count: int, radius_mm: tuple[float, float],
               seed: int) -> tuple[np.ndarray, list[T.TumorChange]]:
    """`count` tumours of `kind`, radius drawn from `radius_mm` and shrunk (x0.75, not below the
    minimum) while the organ is not that deep; the last refusal is raised as it is."""
    rng = np.random.default_rng(seed)
    changes = []
    for _ in range(count):
        radius, tumor_seed = float(rng.uniform(*radius_mm)), int(rng.integers(2**31))
        while True:
            try:
                labels, done = T.add_tumor(labels, spacing, kind, radius, seed=tumor_seed)
                break
            except ValueError as err:
                if "too small" not in str(err) or radius <= radius_mm[0]:
                    raise
                radius = max(radius_mm[0], radius * 0.75)
        changes += done
    return labels, changes


def mask_with_tumors(volume: volume_io.Volume, tumors: Sequence[TumorCount], radius_mm=(8.0, 15.0),
                     seed: int = 0) -> tuple[volume_io.Volume, list[T.TumorChange]]:
    """`volume` with the requested tumours added (what `generate --mask M --tumors KIND:N` runs)."""
    labels, changes = np.asarray(volume.array), []
    for i, request in enumerate(tumors):
        labels, done = add_tumors(labels, volume.spacing, request.kind, request.count, tuple(radius_mm),
                                  int(np.random.default_rng([seed, i]).integers(2**31)))
        changes += done
    return volume.with_array(labels), changes


def numbered_outputs(out: str | os.PathLike, count: int) -> list[Path]:
    """ct.nii.gz -> [ct.nii.gz] for one sample, [ct_000.nii.gz, ct_001.nii.gz, ...] for several."""
    out = Path(out).expanduser()
    if count == 1:
        return [out]
    stem = out.name.split(".nii")[0]
    suffix = out.name[len(stem):]
    return [out.with_name(f"{stem}_{i:03d}{suffix}") for i in range(count)]


def preview_label(changes: Sequence[T.TumorChange]) -> str | None:
    """The label the preview should be centred on: that of the first added or changed tumour."""
    for change in changes:
        if change.action != "removed":
            return change.label
    return None


def generate_from_intent(request: MaskRequest, out: str | os.PathLike, library: str | os.PathLike | None = None,
                         model=None, options=None, num_samples: int = 1, tumors: Sequence[TumorCount] = (),
                         tumor_radius_mm=(8.0, 15.0)) -> list[IntentSample]:
    """Select, fit, edit and generate `num_samples` CTs for `request`; one report each."""
    from maisi2 import generate as G

    options = options or G.GenerateOptions()
    # 1. check everything cheap first: outputs, options, the library, the selection
    if num_samples < 1:
        raise InvalidInput(f"--num-samples must be >= 1, got {num_samples}")
    outs = numbered_outputs(out, num_samples)
    for path in outs:
        G.check_request(path, options)
    index = load_library(library)
    # 2. selection
    chosen, best, rejected = select_masks(index, request, seed=options.seed, count=num_samples)
    samples = []
    for i, (verdict, path) in enumerate(zip(chosen, outs)):
        # 3. fit and edit
        volume = volume_io.load_label_map(index.folder / verdict.entry.file)
        fitted, fit_info = fit_mask(volume, request)
        edits = [TumorCount(L.tumor_kind(name)) for name in verdict.to_add] + list(tumors)
        edited, changes = mask_with_tumors(fitted, edits, tumor_radius_mm, seed=options.seed + i)
        # 4. generate
        report = {**(options.request or {}), "request": dataclasses.asdict(request), "library": str(index.folder),
                  "selected": verdict.to_dict(), "best_group": [v.entry.file for v in best],
                  "rejected": [v.to_dict() for v in rejected], "fit": fit_info,
                  "tumor_edits": [c.to_dict() for c in changes]}
        seed = options.seed + i * (options.qc_retries + 1)  # retries never reuse another sample's seed
        sample_options = dataclasses.replace(options, seed=seed, spacing=None,
                                             preview_focus=options.preview_focus or preview_label(changes),
                                             request=report)
        result = G.generate(edited, path, model=model, options=sample_options)
        hu = volume_io.load_ct(result.paths.ct).array.astype(np.int16)  # the file holds int16 HU
        samples.append(IntentSample(result.paths.ct, result.report, hu,
                                    edited.array))
    return samples
