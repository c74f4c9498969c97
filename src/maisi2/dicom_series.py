"""Writing a CT volume as a DICOM series (CT Image Storage, one file per slice), with pydicom.

pydicom rather than highdicom: highdicom builds derived objects (segmentations, structured
reports, parametric maps) from existing source images and has no constructor for a plain CT image
series, which is what a synthetic CT is; pydicom writes any data set from its tags.

Geometry. DICOM patient coordinates are LPS (x to the patient's left, y posterior, z superior);
ours are RAS. The volume's RAS-canonical array is written with its first two axes reversed, so
that columns run to the patient's left and rows to the back, as scanners write axial slices
(ImageOrientationPatient 1\\0\\0\\0\\1\\0 for an unrotated volume): pixel (row r, column c) of slice k
is voxel (X-1-c, Y-1-r, k). From the affine A of that flipped array, in LPS (A_lps = diag(-1, -1,
1, 1) A): ImageOrientationPatient = its first two columns normalised, PixelSpacing = [row spacing
(column 1 norm), column spacing (column 0 norm)], ImagePositionPatient of slice k = A_lps (0, 0, k),
SliceThickness = SpacingBetweenSlices = column 2 norm. Voxels are int16 HU stored signed, with
RescaleSlope 1 and RescaleIntercept 0.

Every file says it is synthetic (PatientName SYNTHETIC^MAISI2, ImageType DERIVED\\SECONDARY,
ImageComments); no patient data enters them.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import numpy as np

from maisi2.errors import InvalidInput, OutputExists

__all__ = ["write_ct_series", "CT_IMAGE_STORAGE"]

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_INT16 = np.iinfo(np.int16)


def write_ct_series(folder: str | os.PathLike, volume, description: str = "maisi2 synthetic CT",
                    window: tuple[float, float] = (-500.0, 500.0)) -> list[Path]:
    """Write `volume` (an `io.Volume` of HU, RAS-canonical) as one DICOM file per axial slice into
    `folder` (created; must be empty or absent). Returns the files, in slice order."""
    from pydicom.uid import generate_uid

    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise OutputExists(f"{folder} is not empty; DICOM series are written into a new folder")
    array, affine_lps = _scanner_layout(volume)
    hu = np.clip(np.rint(array), _INT16.min, _INT16.max).astype(np.int16)
    folder.mkdir(parents=True, exist_ok=True)
    series = {"study": generate_uid(), "series": generate_uid(), "frame": generate_uid(),
              "now": datetime.datetime.now(datetime.timezone.utc), "description": description, "window": window}
    paths = []
    for k in range(hu.shape[2]):
        ds = _slice_dataset(hu[:, :, k], affine_lps, k, series)
        path = folder / f"CT_{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _scanner_layout(volume) -> tuple[np.ndarray, np.ndarray]:
    """(array with x and y reversed, its voxel -> LPS affine), after checking the slices are a stack."""
    array = np.asarray(volume.array)
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1.0, array.shape[0] - 1
    flip[1, 1], flip[1, 3] = -1.0, array.shape[1] - 1
    affine_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(volume.affine, dtype=np.float64) @ flip
    columns = affine_lps[:3, :3] / np.linalg.norm(affine_lps[:3, :3], axis=0)
    normal = np.cross(columns[:, 0], columns[:, 1])
    if abs(float(columns[:, 0] @ columns[:, 1])) > 1e-4 or float(normal @ columns[:, 2]) < 1 - 1e-4:
        raise InvalidInput("the volume's axes are sheared or not right-handed after the DICOM flip; a DICOM series "
                         "needs slices perpendicular to rows and columns (resample it first)")
    return array[::-1, ::-1, :], affine_lps


def _slice_dataset(slice_xy: np.ndarray, affine_lps: np.ndarray, k: int, series: dict):
    from pydicom.dataset import FileMetaDataset, Dataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    spacing = np.linalg.norm(affine_lps[:3, :3], axis=0)
    orientation = np.concatenate([affine_lps[:3, 0] / spacing[0], affine_lps[:3, 1] / spacing[1]])
    position = affine_lps @ np.array([0.0, 0.0, float(k), 1.0])
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    date, time = series["now"].strftime("%Y%m%d"), series["now"].strftime("%H%M%S")
    # patient, study, series, frame of reference, equipment (synthetic: nothing identifies a person)
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "SYNTHETIC^MAISI2", "MAISI2-SYNTHETIC", "", "O"
    ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime, ds.StudyID = series["study"], date, time, "1"
    ds.ReferringPhysicianName, ds.AccessionNumber = "", ""
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "CT", series["series"], 1
    ds.SeriesDescription = series["description"][:64]
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = series["frame"], ""
    ds.Manufacturer = "maisi2 (synthetic)"
    # image
    ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, sop_uid
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.ImageComments = "Synthetic CT generated by maisi2 from a segmentation mask; not an image of a patient"
    ds.BurnedInAnnotation = "NO"
    ds.InstanceNumber, ds.AcquisitionNumber = k + 1, 1
    ds.ContentDate, ds.ContentTime = date, time
    ds.KVP = ""
    ds.ImagePositionPatient = [_ds_number(v) for v in position[:3]]
    ds.ImageOrientationPatient = [_ds_number(v) for v in orientation]
    ds.PixelSpacing = [_ds_number(spacing[1]), _ds_number(spacing[0])]  # [between rows, between columns]
    ds.SliceThickness = ds.SpacingBetweenSlices = _ds_number(spacing[2])
    ds.SliceLocation = _ds_number(position[2])
    pixels = np.ascontiguousarray(slice_xy.T)  # rows x columns: row r is y index r, column c is x index c
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
    low, high = series["window"]
    ds.WindowCenter, ds.WindowWidth = _ds_number((low + high) / 2), _ds_number(high - low)
    ds.PixelData = pixels.astype("<i2").tobytes()
    return ds


def _ds_number(value: float) -> str:
    """A decimal string (DS) of at most 16 characters, as the standard requires."""
    value = float(value)
    if abs(value) < 1e-10:
        value = 0.0
    for digits in range(10, 0, -1):
        text = f"{value:.{digits}g}"
        if len(text) <= 16:
            return text
    raise InvalidInput(f"{value} does not fit a DICOM decimal string")
