"""Quality check of a generated CT: is the median HU of each major organ plausible?

MAISI-v2 regenerates a sample whose organs come out with implausible intensities. For each organ
group of `labels.QC_ORGAN_GROUPS` (liver, spleen, pancreas, kidney, lung, bone, brain) the median
HU over the group's voxels must lie inside a range taken from real CT: the packaged
``image_median_statistics_ct.json`` (per-organ statistics of the median HU over real scans). We use
its ``sigma_6_low`` / ``sigma_6_high`` columns, i.e. mean +- 3 standard deviations of the real
medians (a 6-sigma wide band), as the official MAISI-v2 code does. An organ the mask does not
contain is "not present", which is not a failure.

Everything here is a small pure function of arrays; `check_files` adds file reading and the
JSON report for ``maisi2 qc``.

Usage::

    report = quality_check(ct_hu, labels)
    report.passed, report.failed_organs()
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from maisi2.errors import InvalidInput
from maisi2.labels import QC_ORGAN_GROUPS, load_resource_json

__all__ = [
    "RANGE_SOURCE",
    "PASS",
    "FAIL",
    "NOT_PRESENT",
    "OrganCheck",
    "QualityReport",
    "hu_ranges",
    "organ_median_hu",
    "check_organ",
    "quality_check",
    "check_files",
]

STATISTICS_FILE = "image_median_statistics_ct.json"
LOW_KEY, HIGH_KEY = "sigma_6_low", "sigma_6_high"
RANGE_SOURCE = f"{STATISTICS_FILE}: [{LOW_KEY}, {HIGH_KEY}] (mean +- 3 SD of organ medians in real CT)"
PASS, FAIL, NOT_PRESENT = "pass", "fail", "not present"


@dataclass(frozen=True)
class OrganCheck:
    organ: str
    status: str  # PASS, FAIL or NOT_PRESENT
    voxels: int
    median_hu: float | None
    low: float
    high: float


@dataclass
class QualityReport:
    organs: list[OrganCheck] = field(default_factory=list)
    range_source: str = RANGE_SOURCE

    @property
    def passed(self) -> bool:
        return all(o.status != FAIL for o in self.organs)

    def failed_organs(self) -> list[str]:
        return [o.organ for o in self.organs if o.status == FAIL]

    def to_dict(self) -> dict:
        return {"passed": self.passed, "failed": self.failed_organs(), "range_source": self.range_source,
                "organs": {o.organ: {k: v for k, v in asdict(o).items() if k != "organ"} for o in self.organs}}

    def summary(self) -> str:
        lines = [f"quality check: {'PASSED' if self.passed else 'FAILED'} (ranges: {self.range_source})"]
        for o in self.organs:
            median = "-" if o.median_hu is None else f"{o.median_hu:8.1f}"
            lines.append(f"  {o.organ:9s} {o.status:12s} median {median} HU  range [{o.low:.0f}, {o.high:.0f}]")
        return "\n".join(lines)


def hu_ranges() -> dict[str, tuple[float, float]]:
    """Organ group -> (low, high) median-HU range from the packaged statistics."""
    stats = load_resource_json(STATISTICS_FILE)
    missing = [organ for organ in QC_ORGAN_GROUPS if organ not in stats]
    if missing:
        raise InvalidInput(f"{STATISTICS_FILE} lacks statistics for {', '.join(missing)}; the package is damaged")
    return {organ: (float(stats[organ][LOW_KEY]), float(stats[organ][HIGH_KEY])) for organ in QC_ORGAN_GROUPS}


def organ_median_hu(ct_hu: np.ndarray, labels: np.ndarray, ids: Sequence[int]) -> tuple[float | None, int]:
    """Median HU over the voxels whose label is in `ids`, and their count (None, 0 when absent)."""
    inside = np.isin(labels, np.asarray(ids))
    count = int(np.count_nonzero(inside))
    if count == 0:
        return None, 0
    return float(np.median(ct_hu[inside])), count


def check_organ(organ: str, median_hu: float | None, voxels: int, hu_range: tuple[float, float]) -> OrganCheck:
    low, high = hu_range
    if median_hu is None:
        return OrganCheck(organ, NOT_PRESENT, 0, None, low, high)
    status = PASS if low <= median_hu <= high else FAIL
    return OrganCheck(organ, status, voxels, median_hu, low, high)


def quality_check(ct_hu: np.ndarray, labels: np.ndarray,
                  ranges: Mapping[str, tuple[float, float]] | None = None) -> QualityReport:
    """Check every QC organ group of a CT (HU) against its label map (MAISI ids), same shape."""
    ct_hu, labels = np.asarray(ct_hu), np.asarray(labels)
    if ct_hu.shape != labels.shape:
        raise InvalidInput(f"CT shape {ct_hu.shape} and label map shape {labels.shape} differ; "
                         "the quality check needs the label map on the CT's grid")
    ranges = hu_ranges() if ranges is None else ranges
    organs = []
    for organ, ids in QC_ORGAN_GROUPS.items():
        median, count = organ_median_hu(ct_hu, labels, ids)
        organs.append(check_organ(organ, median, count, ranges[organ]))
    return QualityReport(organs)


def check_files(ct_path: str | Path, mask_path: str | Path, out: str | Path | None = None,
                overwrite: bool = False) -> QualityReport:
    """``maisi2 qc``: check a CT file against its mask file (same grid); optionally write JSON."""
    from maisi2 import volume_io
    from maisi2.atomic import atomic_output, check_writable

    if out is not None:
        check_writable(out, overwrite)
    ct = volume_io.load_ct(ct_path)
    mask = volume_io.load_label_map(mask_path)
    if ct.shape != mask.shape or not np.allclose(ct.affine, mask.affine, atol=1e-3):
        raise InvalidInput(f"{ct_path} (shape {ct.shape}) and {mask_path} (shape {mask.shape}) are not on the same "
                         "voxel grid; pass the label map the CT was generated from (maisi2 generate writes it "
                         "beside the CT as *_label.nii.gz)")
    report = quality_check(ct.array, mask.array)
    if out is not None:
        payload = {"ct": str(ct_path), "mask": str(mask_path), **report.to_dict()}
        with atomic_output(out, overwrite) as tmp:
            tmp.write_text(json.dumps(payload, indent=2))
    return report
