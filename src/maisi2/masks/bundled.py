"""How the bundled mask library (maisi2/resources/masks) is made: `maisi2 masks make-default-library DIR`.

Contents (label maps only, uint8 NIfTI, a few tens of kB each):

- torso phantoms (`maisi2.phantom`, chest + abdomen) at three grids, tumour-free and with hepatic,
  lung, pancreatic and kidney-cyst lesions;
- label-only head and pelvis cartoons (`masks.cartoons`) at two grids each;
- the two real TotalSegmentator label maps of ../shared/data/totalsegmentator (the project's test
  reference files, repository Apache-2.0, scans from the TotalSegmentator data set, CC BY 4.0),
  imported to MAISI ids (`maisi2.totalseg`) and, for the 0.98 mm one, resampled (nearest) to 3 mm.
  They are copied when that folder exists; ATTRIBUTION.md says where they come from.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from maisi2 import volume_io

__all__ = ["make_default_library", "PHANTOMS", "CARTOONS"]

# (file stem, shape, spacing mm, tumours as "kind:count", seed)
PHANTOMS = (
    ("torso_64x64x48_6mm", (64, 64, 48), (6.0, 6.0, 6.0), (), 11),
    ("torso_96x96x64_4mm", (96, 96, 64), (4.0, 4.0, 4.0), (), 12),
    ("torso_128x128x96_3mm", (128, 128, 96), (3.0, 3.0, 3.0), (), 13),
    ("torso_hepatic_96x96x64_4mm", (96, 96, 64), (4.0, 4.0, 4.0), ("hepatic",), 14),
    ("torso_lung_96x96x64_4mm", (96, 96, 64), (4.0, 4.0, 4.0), ("lung",), 15),
    ("torso_pancreatic_kidney_128x128x96_3mm", (128, 128, 96), (3.0, 3.0, 3.0), ("pancreatic", "kidney-cyst"), 16),
    ("torso_hepatic_lung_128x128x64_3mm", (128, 128, 64), (3.0, 3.0, 4.0), ("hepatic", "lung"), 17),
)
CARTOONS = (
    ("head_64x64x48_4mm", "head", (64, 64, 48), (4.0, 4.0, 4.0), 21),
    ("head_128x128x96_2mm", "head", (128, 128, 96), (2.0, 2.0, 2.0), 22),
    ("pelvis_96x80x64_4mm", "pelvis", (96, 80, 64), (4.0, 4.0, 4.0), 23),
    ("pelvis_128x112x96_3mm", "pelvis", (128, 112, 96), (3.0, 3.0, 3.0), 24),
)
REAL = (  # (file stem, TotalSegmentator label map, its CT or None, spacing to resample to or None)
    ("totalseg_abdomen_122x101x30_3mm", "example_seg.nii.gz", "example_ct_sm.nii.gz", None),
    ("totalseg_upper_abdomen_3mm", "example_seg_dicom.nii.gz", None, (3.0, 3.0, 2.0)),
)
ATTRIBUTION = """# Where these masks come from

- `torso_*`: procedural phantoms of maisi2 (`maisi2.phantom`), made by `maisi2 masks make-default-library`.
- `head_*`, `pelvis_*`: label-only cartoons of maisi2 (`maisi2.masks.cartoons`): a few ellipsoids,
  for selection and editing; the bundled model was not trained on these regions.
- `totalseg_*`: label maps from the TotalSegmentator project's test reference files
  (https://github.com/wasserth/TotalSegmentator, `tests/reference_files/`; repository licence
  Apache-2.0; the scans come from the TotalSegmentator data set, Wasserthal et al., "TotalSegmentator:
  robust segmentation of 104 anatomical structures in CT images", Radiology: AI 2023, data licensed
  CC BY 4.0). They are TotalSegmentator model output, converted here to MAISI label ids with the
  body envelope added (`maisi2 labels import-totalseg`); `totalseg_upper_abdomen_3mm` was also
  resampled (nearest) from 0.98 x 0.98 x 2 mm to 3 x 3 x 2 mm. Changes: relabelling, resampling.
"""


def make_default_library(out_dir: str | os.PathLike, real_dir: str | os.PathLike | None = None,
                         overwrite: bool = False) -> list[Path]:
    """Write the bundled library into `out_dir`; returns the files written.

    real_dir: the folder of TotalSegmentator reference files (skipped when None or absent)."""
    from maisi2.masks.cartoons import head_mask, pelvis_mask
    from maisi2.phantom import make_phantom, parse_tumor_specs

    out_dir = Path(out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, shape, spacing, tumors, seed in PHANTOMS:
        _, labels, affine = make_phantom(shape, spacing, parse_tumor_specs(tumors, (8.0, 20.0)), seed=seed)
        written.append(_save(out_dir / f"{stem}.nii.gz", labels, affine, overwrite))
    makers = {"head": head_mask, "pelvis": pelvis_mask}
    for stem, region, shape, spacing, seed in CARTOONS:
        written.append(_save(out_dir / f"{stem}.nii.gz", makers[region](shape, spacing, seed),
                             volume_io.ras_affine(spacing), overwrite))
    if real_dir is not None and Path(real_dir).is_dir():
        written += [_import_real(out_dir, Path(real_dir), row, overwrite) for row in REAL]
    (out_dir / "ATTRIBUTION.md").write_text(ATTRIBUTION)
    return written


def _save(path: Path, labels: np.ndarray, affine, overwrite: bool) -> Path:
    volume_io.save_label_map(path, volume_io.Volume(labels.astype(np.uint8), affine), overwrite=overwrite, tables=False)
    return path


def _import_real(out_dir: Path, real_dir: Path, row, overwrite: bool) -> Path:
    from maisi2.totalseg import convert_totalseg

    stem, seg_name, ct_name, spacing = row
    seg = volume_io.load_label_map(real_dir / seg_name, check_ids=False)
    ct = volume_io.load_ct(real_dir / ct_name).array if ct_name else None
    labels, _ = convert_totalseg(seg.array, ct, spacing=seg.spacing)
    volume = seg.with_array(labels)
    if spacing is not None:
        volume = volume_io.resample_to_spacing(volume, spacing, order=0)
    return _save(out_dir / f"{stem}.nii.gz", volume.array, volume.affine, overwrite)
