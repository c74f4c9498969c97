"""Tumour fidelity: does a generated CT honour the tumours of the mask it was generated from?

For every connected component (26-connectivity) of every tumour label in the mask:

- its parent organ: the label the tumour takes in `labels.remove_tumors` (liver for a hepatic
  tumour, the most common neighbouring lobe for a lung tumour, ...), i.e. the same rule the
  contrastive loss uses;
- the shell: voxels labelled with that parent organ within `shell_mm` millimetres (Euclidean,
  voxel spacing respected) of the component; at coarse spacings the radius is raised to the
  largest voxel size so the shell always reaches the neighbouring voxels;
- HU statistics inside the component and in the shell (median and mean), and the
  **contrast = median HU(tumour) - median HU(shell)**. None when the shell is empty;
- with a real CT of the same mask: the same numbers on the real CT and the contrast error
  (generated - real);
- with a segmenter (`maisi2.evaluate.seg`): the share of the component's voxels it labels as a
  tumour class ("detected fraction"); per volume, the Dice between its prediction (any tumour
  class) and the mask's tumour voxels of the segmenter's classes.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
from scipy import ndimage

from maisi2.errors import InvalidInput
from maisi2.labels import TUMOR_IDS, label_name, remove_tumors

__all__ = ["TumorContrast", "TumorFidelity", "FidelityResult", "tumor_contrasts", "fidelity", "fidelity_files"]

DEFAULT_SHELL_MM = 5.0


@dataclass
class TumorContrast:
    tumor_label: int
    tumor_name: str
    component: int  # 1-based index among this label's components, in scipy.ndimage.label order
    voxels: int
    centroid_voxel: tuple[float, float, float]
    parent_label: int
    parent_name: str
    shell_radius_mm: float  # shell_mm, or the largest voxel size when that is larger
    shell_voxels: int
    tumor_median_hu: float
    tumor_mean_hu: float
    parent_median_hu: float | None
    parent_mean_hu: float | None

    @property
    def contrast_hu(self) -> float | None:
        return None if self.parent_median_hu is None else self.tumor_median_hu - self.parent_median_hu


@dataclass
class TumorFidelity:
    generated: TumorContrast
    real: TumorContrast | None = None
    detected_fraction: float | None = None

    @property
    def contrast_error_hu(self) -> float | None:
        if self.real is None or self.generated.contrast_hu is None or self.real.contrast_hu is None:
            return None
        return self.generated.contrast_hu - self.real.contrast_hu

    def to_dict(self) -> dict:
        g = self.generated
        out = {**asdict(g), "contrast_hu": g.contrast_hu, "detected_fraction": self.detected_fraction}
        if self.real is not None:
            out.update(real_tumor_median_hu=self.real.tumor_median_hu, real_parent_median_hu=self.real.parent_median_hu,
                       real_contrast_hu=self.real.contrast_hu, contrast_error_hu=self.contrast_error_hu)
        return out


@dataclass
class FidelityResult:
    tumors: list[TumorFidelity]
    dice: float | None = None
    shell_mm: float = DEFAULT_SHELL_MM
    name: str = ""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"volume": self.name, "shell_mm": self.shell_mm, "dice": self.dice, "notes": self.notes,
                "tumors": [t.to_dict() for t in self.tumors]}

    def summary(self) -> str:
        head = f"{self.name or 'volume'}: {len(self.tumors)} tumour(s)"
        if self.dice is not None:
            head += f", segmenter Dice {self.dice:.3f}"
        lines = [head]
        for t in self.tumors:
            g = t.generated
            fmt = lambda v: "   -  " if v is None else f"{v:7.1f}"  # noqa: E731
            line = (f"  {g.tumor_name:24s} #{g.component:<2d} {g.voxels:7d} vox  contrast {fmt(g.contrast_hu)} HU "
                    f"(vs {g.parent_name})")
            if t.real is not None:
                line += f"  real {fmt(t.real.contrast_hu)}  error {fmt(t.contrast_error_hu)}"
            if t.detected_fraction is not None:
                line += f"  detected {100 * t.detected_fraction:5.1f}%"
            lines.append(line)
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _components(labels: np.ndarray):
    """(tumour id, component index, boolean mask of the component's bounding box, box slices)."""
    structure = np.ones((3, 3, 3), bool)
    for tumor in TUMOR_IDS:
        lesion = labels == tumor
        if not lesion.any():
            continue
        comp, _ = ndimage.label(lesion, structure=structure)
        for idx, box in enumerate(ndimage.find_objects(comp), start=1):
            yield tumor, idx, comp, box


def tumor_contrasts(ct_hu: np.ndarray, labels: np.ndarray, spacing=(1.0, 1.0, 1.0),
                    shell_mm: float = DEFAULT_SHELL_MM) -> list[TumorContrast]:
    """HU contrast of every tumour component against its parent-organ shell (see the module docstring)."""
    ct, labels = np.asarray(ct_hu, np.float32), np.asarray(labels)
    if ct.shape != labels.shape or ct.ndim != 3:
        raise InvalidInput(f"CT shape {ct.shape} and label map shape {labels.shape} must be one 3D grid")
    if not np.all(np.isfinite(ct)):
        raise InvalidInput("the CT holds NaN/inf voxels")
    if shell_mm <= 0:
        raise InvalidInput(f"shell_mm must be > 0, got {shell_mm}")
    spacing = np.asarray(spacing, np.float64)
    radius = max(float(shell_mm), float(spacing.max()))
    parents = remove_tumors(labels)
    margin = np.ceil(radius / spacing).astype(int) + 1
    out = []
    for tumor, idx, comp, box in _components(labels):
        # Work in the component's box grown by the shell radius: cheap on large volumes.
        sl = tuple(slice(max(s.start - m, 0), min(s.stop + m, n)) for s, m, n in zip(box, margin, labels.shape))
        inside = comp[sl] == idx
        parent = int(np.bincount(parents[sl][inside].astype(np.int64)).argmax())
        distance = ndimage.distance_transform_edt(~inside, sampling=spacing)
        shell = (distance <= radius) & ~inside & (labels[sl] == parent)
        hu_in, hu_shell = ct[sl][inside], ct[sl][shell]
        centroid = tuple(float(c + s.start) for c, s in zip(ndimage.center_of_mass(inside), sl))
        out.append(TumorContrast(
            int(tumor), label_name(tumor), idx, int(inside.sum()), centroid, parent, label_name(parent),
            radius, int(shell.sum()), float(np.median(hu_in)), float(hu_in.mean()),
            float(np.median(hu_shell)) if hu_shell.size else None, float(hu_shell.mean()) if hu_shell.size else None,
        ))
    return out


def fidelity(generated_hu: np.ndarray, labels: np.ndarray, spacing=(1.0, 1.0, 1.0), *,
             real_hu: np.ndarray | None = None, segmenter=None, shell_mm: float = DEFAULT_SHELL_MM,
             name: str = "") -> FidelityResult:
    """Tumour fidelity of one generated CT (HU) against its mask; see the module docstring.

    real_hu: a real CT on the same grid whose mask is `labels` (optional).
    segmenter: (model, SegmenterConfig) from `seg.load_segmenter`, or a checkpoint path (optional).
    """
    from maisi2.evaluate import seg

    generated = tumor_contrasts(generated_hu, labels, spacing, shell_mm)
    notes = []
    if not generated:
        notes.append("the mask holds no tumour labels")
    real = [None] * len(generated)
    if real_hu is not None:
        if np.shape(real_hu) != np.shape(labels):
            raise InvalidInput(f"real CT shape {np.shape(real_hu)} differs from the mask's {np.shape(labels)}")
        real = tumor_contrasts(real_hu, labels, spacing, shell_mm)
    tumors = [TumorFidelity(g, r) for g, r in zip(generated, real)]
    dice = None
    if segmenter is not None:
        model, config = seg.load_segmenter(segmenter) if isinstance(segmenter, (str, os.PathLike)) else segmenter
        predicted = seg.segment(model, generated_hu, config) > 0
        target = seg.labels_to_classes(labels, config.classes) > 0
        dice = seg.dice_score(predicted, target)
        for t, (tumor, idx, comp, box) in zip(tumors, _components(np.asarray(labels))):
            in_box = comp[box] == idx
            t.detected_fraction = float(predicted[box][in_box].mean())
            if not np.isin(tumor, np.concatenate([np.asarray(c) for c in config.classes])):
                notes.append(f"{label_name(tumor)} is not among the segmenter's classes")
    return FidelityResult(tumors, dice, shell_mm, name, notes)


def fidelity_files(cases: Sequence[tuple[str | os.PathLike, str | os.PathLike, str | os.PathLike | None]],
                   segmenter=None, shell_mm: float = DEFAULT_SHELL_MM, progress: bool = False) -> list[FidelityResult]:
    """`fidelity` over (generated CT, mask, real CT or None) files, one case in memory at a time."""
    from tqdm.auto import tqdm

    from maisi2 import volume_io
    from maisi2.evaluate import seg

    if not cases:
        raise InvalidInput("fidelity needs at least one (generated CT, mask) pair")
    if isinstance(segmenter, (str, os.PathLike)):
        segmenter = seg.load_segmenter(segmenter)
    results = []
    for gen_path, mask_path, real_path in tqdm(cases, desc="fidelity", disable=not progress):
        if mask_path is None:
            raise InvalidInput(f"{gen_path} has no mask: put it beside the CT as *_label.nii.gz or use a datalist")
        gen, mask = volume_io.load_ct(gen_path), volume_io.load_label_map(mask_path)
        if gen.shape != mask.shape:
            raise InvalidInput(f"{gen_path} (shape {gen.shape}) and its mask {mask_path} (shape {mask.shape}) differ")
        real = None
        if real_path is not None:
            real = volume_io.load_ct(real_path)
            if real.shape != mask.shape:
                raise InvalidInput(f"real CT {real_path} (shape {real.shape}) is not on the grid of mask {mask_path} "
                                 f"(shape {mask.shape}); give the real CT the mask was drawn from")
            real = real.array
        results.append(fidelity(gen.array, mask.array, gen.spacing, real_hu=real, segmenter=segmenter,
                                shell_mm=shell_mm, name=str(gen_path)))
    return results
