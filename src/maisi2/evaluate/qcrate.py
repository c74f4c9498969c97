"""QC rate: the share of generated volumes that pass `maisi2.quality.quality_check`.

A volume passes when no organ group's median HU falls outside its real-data range (organs its
mask lacks do not count as failures); see `maisi2.quality` for the ranges.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from maisi2.errors import InvalidInput
from maisi2.quality import QualityReport, quality_check

__all__ = ["QCRateResult", "qc_rate", "qc_rate_files"]


@dataclass
class QCRateResult:
    passed: int
    total: int
    failures_by_organ: dict[str, int]
    per_volume: list[dict] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.passed / self.total

    def to_dict(self) -> dict:
        return {"qc_rate": self.rate, "passed": self.passed, "total": self.total,
                "failures_by_organ": self.failures_by_organ, "volumes": self.per_volume}

    def summary(self) -> str:
        lines = [f"QC rate: {self.passed}/{self.total} = {100 * self.rate:.1f}% passed"]
        lines += [f"  {organ:9s} failed in {count}" for organ, count in sorted(self.failures_by_organ.items())]
        return "\n".join(lines)


def _tally(reports: Iterable[tuple[str, QualityReport]]) -> QCRateResult:
    per_volume, failures = [], Counter()
    for name, report in reports:
        failures.update(report.failed_organs())
        per_volume.append({"volume": name, **report.to_dict()})
    if not per_volume:
        raise InvalidInput("qc-rate needs at least one generated volume")
    passed = sum(v["passed"] for v in per_volume)
    return QCRateResult(passed, len(per_volume), dict(failures), per_volume)


def qc_rate(volumes: Sequence[tuple[np.ndarray, np.ndarray]], names: Sequence[str] | None = None) -> QCRateResult:
    """QC rate over (ct_hu, labels) array pairs."""
    names = [f"volume_{i}" for i in range(len(volumes))] if names is None else list(names)
    return _tally((name, quality_check(ct, labels)) for name, (ct, labels) in zip(names, volumes))


def qc_rate_files(pairs: Sequence[tuple[str | os.PathLike, str | os.PathLike | None]], progress: bool = False) -> QCRateResult:
    """QC rate over (CT file, label-map file) pairs; one volume in memory at a time."""
    from tqdm.auto import tqdm

    from maisi2 import volume_io

    def reports():
        for ct_path, mask_path in tqdm(pairs, desc="quality check", disable=not progress):
            if mask_path is None:
                raise InvalidInput(f"{ct_path} has no label map: put it beside the CT as *_label.nii.gz "
                                 "(as maisi2 generate does) or give a datalist with a label column")
            ct, mask = volume_io.load_ct(ct_path), volume_io.load_label_map(mask_path)
            if ct.shape != mask.shape:
                raise InvalidInput(f"{ct_path} (shape {ct.shape}) and {mask_path} (shape {mask.shape}) differ in shape")
            yield str(ct_path), quality_check(ct.array, mask.array)

    return _tally(reports())
