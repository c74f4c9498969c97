"""Reading and writing CT volumes and label maps.

Inputs: NIfTI files (anything nibabel reads) and, for CT, a folder holding one DICOM series.
Outputs: NIfTI only, written atomically, never replacing an existing file unless asked.

Orientation contract. Every loaded `Volume` holds its voxels in the closest canonical RAS
orientation (the semantics of ``nibabel.as_closest_canonical``: axes permuted and flipped so the
array's i, j, k axes point as nearly as possible to Right, Anterior, Superior; an oblique rotation
stays in the affine). The affine of the file as stored is kept in ``original_affine``, and saving
puts the array back in that axis order with exactly that affine, so a file loaded and saved
unchanged comes back with the same orientation and geometry. Volumes built in code
(``original_affine=None``) are saved with their ``affine`` as is.
"""

from __future__ import annotations

import dataclasses
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform
from scipy import ndimage

from maisi2 import label_tables
from maisi2.atomic import atomic_output, check_writable
from maisi2.errors import InvalidInput, MissingInput
from maisi2.labels import check_label_ids

__all__ = [
    "Volume",
    "ras_affine",
    "load_ct",
    "load_label_map",
    "read_grid",
    "save_ct",
    "save_label_map",
    "check_label_map_writable",
    "resample_to_spacing",
    "resampled_shape",
]

PathLike = str | os.PathLike
_INT16 = np.iinfo(np.int16)
# What a damaged NIfTI raises while nibabel reads it (truncated gzip, short data, bad header).
_READ_ERRORS = (ImageFileError, OSError, EOFError, ValueError, zlib.error)


@dataclass(frozen=True, eq=False)  # eq=False: comparing numpy arrays with == is ambiguous
class Volume:
    """A 3D voxel array with its geometry.

    array: voxels in canonical RAS orientation, axes (x, y, z).
    affine: 4x4 voxel -> RAS+ world (mm) map of `array`.
    original_affine: affine of the file as stored (its axis order), used when saving; None for
        volumes made in code, which are saved with `affine`.
    """

    array: np.ndarray
    affine: np.ndarray
    original_affine: np.ndarray | None = None

    def __post_init__(self):
        if np.ndim(self.array) != 3:
            raise InvalidInput(f"a Volume holds a 3D array, got shape {np.shape(self.array)}")
        object.__setattr__(self, "affine", _checked_affine(self.affine, "Volume.affine"))
        if self.original_affine is not None:
            object.__setattr__(
                self, "original_affine", _checked_affine(self.original_affine, "Volume.original_affine")
            )

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each array axis (norms of the affine's columns)."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.array.shape)

    def with_array(self, array: np.ndarray) -> "Volume":
        """Same geometry (and saved orientation), new voxel data of the same shape."""
        if np.shape(array) != self.shape:
            raise InvalidInput(f"new array has shape {np.shape(array)}, the volume has {self.shape}")
        return dataclasses.replace(self, array=array)


def ras_affine(spacing, origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Diagonal RAS affine: voxel (0, 0, 0) at `origin`, axes along +x, +y, +z with `spacing` mm."""
    affine = np.diag([*_spacing3(spacing), 1.0])
    affine[:3, 3] = origin
    return affine


def _spacing3(spacing) -> np.ndarray:
    spacing = np.asarray(spacing, dtype=np.float64)
    if spacing.shape != (3,) or not np.all(spacing > 0):
        raise InvalidInput(f"spacing must be three positive numbers (mm), got {spacing.tolist()}")
    return spacing


# ---------------------------------------------------------------- loading


def load_ct(path: PathLike) -> Volume:
    """Load a CT (NIfTI file or folder with one DICOM series) as float32 HU in RAS orientation."""
    path = _existing(path)
    if path.is_dir():
        array, affine = _read_dicom_series(path)
    else:
        array, affine = _read_nifti(path, dtype=np.float32)
    array = _validated(array, path)
    return _canonical(array.astype(np.float32, copy=False), affine, path)


def load_label_map(path: PathLike, check_ids: bool = True) -> Volume:
    """Load an integer label map (NIfTI) as int16 in RAS orientation.

    check_ids: also require MAISI label ids (0, 1..132, 200); switch off for maps still in another
    numbering (e.g. raw TotalSegmentator output before conversion).
    """
    path = _existing(path)
    if path.is_dir():
        raise InvalidInput(
            f"{path} is a folder; label maps are read from NIfTI files (.nii/.nii.gz). "
            "Convert a DICOM SEG / image series to NIfTI first."
        )
    array, affine = _read_nifti(path, dtype=None)
    labels = _as_int16_labels(_validated(array, path), f"label map {path}")
    if check_ids:
        check_label_ids(labels, what=f"label map {path}")
    return _canonical(labels, affine, path)


def read_grid(path: PathLike) -> tuple[tuple[int, int, int], tuple[float, float, float], np.dtype]:
    """Shape and spacing (canonical RAS order) and stored dtype of a NIfTI file, from its header alone.

    No voxel is read, so sizes can be checked before any memory is spent: a 348-byte header may
    claim 4096^3 voxels.
    """
    path = _existing(path)
    if path.is_dir():
        raise InvalidInput(f"{path} is a folder; label maps are read from NIfTI files (.nii/.nii.gz)")
    try:
        image = nib.load(path)  # header only: nibabel reads voxels lazily
        shape = tuple(int(n) for n in image.shape)
        dtype = np.dtype(image.get_data_dtype())
    except PermissionError:
        raise PermissionError(f"cannot read {path}: permission denied; check the file's permissions") from None
    except _READ_ERRORS as err:
        raise InvalidInput(f"cannot read {path} as a NIfTI image ({type(err).__name__}: {err}); the file is corrupt, "
                         "truncated or not an image. Re-export or re-download it.") from err
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3 or min(shape) < 1:
        raise InvalidInput(f"{path} has shape {shape}; expected a non-empty 3D volume (x, y, z)")
    affine = _checked_affine(image.affine, f"affine of {path}")
    ornt = io_orientation(affine)
    canonical = affine @ inv_ornt_aff(ornt, shape)
    order = [int(axis) for axis in ornt[:, 0]]
    canonical_shape = [0, 0, 0]
    for stored_axis, ras_axis in enumerate(order):
        canonical_shape[ras_axis] = shape[stored_axis]
    spacing = tuple(float(v) for v in np.linalg.norm(canonical[:3, :3], axis=0))
    return tuple(canonical_shape), spacing, dtype


def _existing(path: PathLike) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise MissingInput(
            f"{path} does not exist; check the path (expected a NIfTI file, or for a CT a folder of DICOM slices)"
        )
    return path


def _read_nifti(path: Path, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Voxels (scaled by the header's slope/intercept) and affine, as stored in the file."""
    try:
        image = nib.load(path)
        # Reading the data here, not lazily later, so a truncated file fails with its name attached.
        array = image.get_fdata(dtype=dtype) if dtype is not None else np.asanyarray(image.dataobj)
    except PermissionError:
        raise PermissionError(f"cannot read {path}: permission denied; check the file's permissions") from None
    except _READ_ERRORS as err:
        hint = " For DICOM, pass the folder holding the series, not one slice." if path.suffix.lower() == ".dcm" else ""
        raise InvalidInput(
            f"cannot read {path} as a NIfTI image ({type(err).__name__}: {err}); the file is corrupt, "
            f"truncated or not an image. Re-export or re-download it.{hint}"
        ) from err
    return np.asarray(array), _checked_affine(image.affine, f"affine of {path}")


def _validated(array: np.ndarray, source) -> np.ndarray:
    """3D (a trailing singleton 4th dim is dropped), non-empty and finite, else a ValueError."""
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise InvalidInput(f"{source} has shape {array.shape}; expected a 3D volume (x, y, z)")
    if array.size == 0:
        raise InvalidInput(f"{source} is empty (shape {array.shape}); it holds no voxels")
    if np.issubdtype(array.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise InvalidInput(
                f"{source} holds {bad} NaN/inf voxels; replace them with finite values "
                "(e.g. -1000 HU for CT, 0 for labels) before using it"
            )
    return array


def _as_int16_labels(array: np.ndarray, what: str) -> np.ndarray:
    """Integer-valued labels as int16; a non-integer or out-of-range value is a ValueError."""
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        fractional = array != np.round(array)
        if fractional.any():
            example = float(array[fractional][0])
            raise InvalidInput(
                f"{what} holds non-integer values (e.g. {example:g}); a label map holds integer ids. "
                "Was a CT image passed as the mask, or the map resampled with interpolation "
                "instead of nearest neighbour?"
            )
    low, high = array.min(), array.max()
    if low < _INT16.min or high > _INT16.max:
        raise InvalidInput(f"{what} holds ids from {low} to {high}, outside the int16 range of label maps")
    return array.astype(np.int16)


def _checked_affine(affine, what: str) -> np.ndarray:
    affine = np.array(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise InvalidInput(f"{what} must be a finite 4x4 matrix, got {affine.tolist()}")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InvalidInput(f"{what} is degenerate (a zero voxel size or collinear axes): {affine.tolist()}")
    return affine


# ---------------------------------------------------------------- orientation


def _canonical(array: np.ndarray, affine: np.ndarray, source) -> Volume:
    """Reorder the stored array to closest-canonical RAS and remember the stored affine."""
    ornt = io_orientation(affine)
    canonical = apply_orientation(array, ornt)
    canonical_affine = affine @ inv_ornt_aff(ornt, array.shape)
    return Volume(np.ascontiguousarray(canonical), canonical_affine, original_affine=affine)


def _stored_orientation(volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    """The array and affine to write: back in the source file's axis order when there is one."""
    if volume.original_affine is None:
        return volume.array, volume.affine
    to_stored = ornt_transform(io_orientation(volume.affine), io_orientation(volume.original_affine))
    array = apply_orientation(volume.array, to_stored)
    affine = volume.affine @ inv_ornt_aff(to_stored, volume.shape)
    if not np.allclose(affine, volume.original_affine, rtol=1e-6, atol=1e-4):
        raise InvalidInput(
            "Volume.original_affine does not describe the same voxel grid as Volume.affine (was the "
            "array resampled without updating it?); build the Volume with original_affine=None to "
            "save it with its own affine"
        )
    # The stored affine itself, not the recomputed one, so a round trip is bit-exact.
    return array, volume.original_affine


# ---------------------------------------------------------------- saving


def save_ct(path: PathLike, volume: Volume, overwrite: bool = False) -> Path:
    """Write a CT as int16 HU NIfTI (rounded, clipped to the int16 range), in its stored orientation."""
    array = _validated(np.asarray(volume.array), f"CT volume to save as {path}")
    hu = np.clip(np.rint(array), _INT16.min, _INT16.max).astype(np.int16)
    return _write_nifti(path, volume.with_array(hu), overwrite)


def save_label_map(path: PathLike, volume: Volume, overwrite: bool = False, tables: bool = True) -> Path:
    """Write a label map as NIfTI: uint8 when every id is in 0..255, else int16.

    tables: also write the MAISI names and colours beside it for 3D Slicer (``X.ctbl``) and
    ITK-SNAP (``X.itksnap.txt``); see `maisi2.label_tables`. Every target is checked first.
    """
    if tables:
        check_label_map_writable(path, overwrite)
    what = f"label map to save as {path}"
    labels = _as_int16_labels(_validated(np.asarray(volume.array), what), what)
    fits_uint8 = labels.min() >= 0 and labels.max() <= 255
    written = _write_nifti(path, volume.with_array(labels.astype(np.uint8) if fits_uint8 else labels), overwrite)
    if tables:
        label_tables.write_label_tables(written, overwrite)
    return written


def check_label_map_writable(path: PathLike, overwrite: bool = False) -> None:
    """Fail before any work if the label map or its viewer tables may not be written."""
    check_writable(Path(path).expanduser(), overwrite)
    label_tables.check_tables_writable(Path(path).expanduser(), overwrite)


def _write_nifti(path: PathLike, volume: Volume, overwrite: bool) -> Path:
    path = Path(path).expanduser()
    if not path.name.endswith((".nii", ".nii.gz")):
        raise InvalidInput(f"{path}: outputs are NIfTI; name the file *.nii.gz (or *.nii)")
    array, affine = _stored_orientation(volume)
    image = nib.Nifti1Image(np.ascontiguousarray(array), affine)
    # Both codes set to scanner space so every reader (qform- or sform-first) sees the same geometry.
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    with atomic_output(path, overwrite) as tmp:
        nib.save(image, tmp)
    return path


# ---------------------------------------------------------------- resampling


# Voxel sizes outside this are not CT (a 1-micron voxel, a 10 cm voxel).
_SPACING_RANGE_MM = (0.01, 100.0)


def check_spacing(spacing, what: str) -> None:
    """Refuse a voxel size that cannot be CT (InvalidInput naming `what`)."""
    low, high = _SPACING_RANGE_MM
    values = list(spacing)
    if len(values) != 3 or not all(isinstance(v, (int, float, np.integer, np.floating)) for v in values) \
            or not all(math.isfinite(v) and low <= v <= high for v in values):
        raise InvalidInput(f"{what} must be three finite voxel sizes from {low:g} to {high:g} mm, got {values}")


def resampled_shape(shape, spacing, new_spacing) -> np.ndarray:
    """The grid `resample_to_spacing` makes: the same physical extent in `new_spacing` voxels,
    rounded to whole voxels, at least one per axis."""
    shape, spacing, new_spacing = (np.asarray(v, dtype=np.float64) for v in (shape, spacing, new_spacing))
    return np.maximum(np.rint(shape * spacing / new_spacing), 1).astype(int)


def resample_to_spacing(volume: Volume, spacing, order: int) -> Volume:
    """Resample onto a grid with `spacing` mm voxels covering the same physical extent, centred.

    order: 0 (nearest neighbour, for label maps: ids are never blended) or 1 (linear, for CT:
    no overshoot beyond the input HU range). No anti-aliasing filter is applied when downsampling.
    The axis directions (and any obliquity) stay those of `volume.affine`. When the volume came
    from a file, the result keeps that file's axis order for saving: its `original_affine` is the
    new grid's affine in the stored axis order (the old one no longer describes the voxels).
    """
    if order not in (0, 1):
        raise InvalidInput(f"order must be 0 (nearest, label maps) or 1 (linear, CT), got {order}")
    new_spacing = _spacing3(spacing)
    old_spacing = np.asarray(volume.spacing)
    old_shape = np.asarray(volume.shape)
    new_shape = resampled_shape(old_shape, old_spacing, new_spacing)
    if np.array_equal(new_shape, old_shape) and np.allclose(new_spacing, old_spacing):
        return volume
    # Map new voxel index -> old voxel index so that both grids share their centre point.
    zoom = new_spacing / old_spacing
    old_centre, new_centre = (old_shape - 1) / 2, (new_shape - 1) / 2
    offset = old_centre - zoom * new_centre
    source = volume.array if order == 0 else volume.array.astype(np.float32, copy=False)
    array = ndimage.affine_transform(
        source, zoom, offset=offset, output_shape=tuple(new_shape), order=order, mode="nearest"
    )
    affine = volume.affine.copy()
    affine[:3, :3] = volume.affine[:3, :3] * zoom  # scale each column: same directions, new voxel size
    affine[:3, 3] = volume.affine[:3, :3] @ old_centre + volume.affine[:3, 3] - affine[:3, :3] @ new_centre
    return Volume(array, affine, original_affine=_stored_affine_for(volume, affine, tuple(new_shape)))


def _stored_affine_for(volume: Volume, affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    """Affine that a grid (`affine`, `shape`) has in the axis order of the volume's source file."""
    if volume.original_affine is None:
        return None
    to_stored = ornt_transform(io_orientation(volume.affine), io_orientation(volume.original_affine))
    return affine @ inv_ornt_aff(to_stored, shape)


# ---------------------------------------------------------------- DICOM


def _read_dicom_series(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """HU voxels (columns, rows, slices) and RAS affine of the one DICOM series in `folder`."""
    slices = _one_series(folder, _dicom_headers(folder))
    row_dir, col_dir, pixel_spacing, shape = _common_geometry(folder, slices)
    normal = np.cross(row_dir, col_dir)
    slices.sort(key=lambda item: float(np.dot(_position(item[1]), normal)))
    positions = np.array([_position(ds) for _, ds in slices])
    step = _slice_step(folder, positions, normal, slices[0][1])
    lps = np.eye(4)
    # Voxel (i, j, k) = (column, row, slice): DICOM puts column c at IPP + c * dx * row_dir.
    lps[:3, 0] = row_dir * pixel_spacing[1]
    lps[:3, 1] = col_dir * pixel_spacing[0]
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # DICOM patient space is LPS
    array = np.stack([_slice_hu(path, folder).T for path, _ in slices], axis=-1)
    if array.shape[:2] != shape:
        raise InvalidInput(f"DICOM pixel data in {folder} does not match Rows/Columns {shape[::-1]}")
    return array, ras


def _dicom_headers(folder: Path) -> list:
    """(path, header) of every DICOM image slice under `folder`; other files are skipped."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    found = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue  # not DICOM (or unreadable): folders often hold readme/DICOMDIR-like extras
        if "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds:
            found.append((path, ds))
    if not found:
        raise InvalidInput(
            f"{folder} holds no DICOM image slices (files with ImagePositionPatient); "
            "pass the folder of one CT series, or a NIfTI file"
        )
    return found


def _one_series(folder: Path, headers: list) -> list:
    series: dict[str, list] = {}
    for path, ds in headers:
        series.setdefault(str(ds.get("SeriesInstanceUID", "unknown")), []).append((path, ds))
    if len(series) > 1:
        listing = "; ".join(
            f"{uid} ({len(items)} slices, {str(items[0][1].get('SeriesDescription', '')) or 'no description'})"
            for uid, items in series.items()
        )
        raise InvalidInput(
            f"{folder} mixes {len(series)} DICOM series: {listing}. Which one do you mean? "
            "Move that series' files into a folder of their own and pass that folder."
        )
    return next(iter(series.values()))


def _common_geometry(folder: Path, slices: list):
    """Row/column directions, pixel spacing and (columns, rows) shared by all slices."""
    def geometry(ds):
        return (
            np.array([float(v) for v in ds.ImageOrientationPatient]),
            np.array([float(v) for v in ds.PixelSpacing]),
            (int(ds.Columns), int(ds.Rows)),
        )

    orientation, pixel_spacing, shape = geometry(slices[0][1])
    for path, ds in slices[1:]:
        other_orientation, other_spacing, other_shape = geometry(ds)
        same = (
            np.allclose(other_orientation, orientation, atol=1e-4)
            and np.allclose(other_spacing, pixel_spacing)
            and other_shape == shape
        )
        if not same:
            raise InvalidInput(
                f"slices in {folder} differ in orientation, pixel spacing or size ({path.name} vs "
                f"{slices[0][0].name}); the series mixes several stacks, split them into separate folders"
            )
    return orientation[:3], orientation[3:], pixel_spacing, shape


def _position(ds) -> np.ndarray:
    return np.array([float(v) for v in ds.ImagePositionPatient])


def _slice_step(folder: Path, positions: np.ndarray, normal: np.ndarray, first) -> np.ndarray:
    """World vector from one slice to the next (follows a gantry tilt, unlike the bare normal)."""
    if len(positions) == 1:
        thickness = float(first.get("SpacingBetweenSlices", None) or first.get("SliceThickness", None) or 1.0)
        return normal * thickness
    gaps = np.diff(positions @ normal)
    if np.any(gaps < 1e-3):
        raise InvalidInput(
            f"{folder} holds several slices at the same position; the series mixes acquisitions "
            "(e.g. echoes or phases): split them into separate folders"
        )
    if np.ptp(gaps) > 0.01 * np.median(gaps) + 1e-3:
        raise InvalidInput(
            f"slices in {folder} are not evenly spaced (gaps {gaps.min():.3g} to {gaps.max():.3g} mm); "
            "slices may be missing: check the export, or convert it with a tool that resamples (dcm2niix)"
        )
    return (positions[-1] - positions[0]) / (len(positions) - 1)


def _slice_hu(path: Path, folder: Path) -> np.ndarray:
    """One slice's pixels in HU (RescaleSlope/Intercept applied), rows x columns, float32."""
    import pydicom

    ds = pydicom.dcmread(path)
    try:
        pixels = ds.pixel_array
    except Exception as err:  # pydicom raises assorted types for missing codecs and bad data
        raise InvalidInput(
            f"cannot decode the pixel data of {path} in {folder} ({err}); install a decoder for its "
            "transfer syntax (e.g. pylibjpeg) or convert the series to NIfTI (dcm2niix)"
        ) from err
    if pixels.ndim != 2:
        raise InvalidInput(f"{path} is a multi-frame DICOM (shape {pixels.shape}); convert it to NIfTI (dcm2niix)")
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    return pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)
