"""DICOM CT series output: read back through maisi2's own DICOM reader (same voxels, same geometry)
and checked tag by tag with pydicom, the position of each voxel recomputed from the tags alone."""

import numpy as np
import pydicom
import pytest

from maisi2 import volume_io
from maisi2.dicom_series import CT_IMAGE_STORAGE, write_ct_series

LPS = np.diag([-1.0, -1.0, 1.0])


def _rotated(affine, angle, axis):
    c, s = np.cos(angle), np.sin(angle)
    r = {"z": [[c, -s, 0], [s, c, 0], [0, 0, 1]], "x": [[1, 0, 0], [0, c, -s], [0, s, c]]}[axis]
    out = affine.copy()
    out[:3, :3] = np.array(r) @ affine[:3, :3]
    return out


def _volumes():
    rng = np.random.default_rng(0)
    hu = rng.integers(-1024, 3000, (9, 7, 5)).astype(np.float32)
    plain = volume_io.ras_affine((0.7, 0.8, 2.5), origin=(-100.0, 20.5, -300.0))
    return {"axis-aligned": volume_io.Volume(hu, plain),
            "rotated in plane": volume_io.Volume(hu, _rotated(plain, 0.3, "z")),
            "tilted": volume_io.Volume(hu, _rotated(plain, -0.2, "x"))}


@pytest.mark.parametrize("name", list(_volumes()))
def test_series_reads_back_with_the_same_voxels_and_geometry(tmp_path, name):
    volume = _volumes()[name]
    files = write_ct_series(tmp_path / "series", volume)
    assert len(files) == volume.shape[2]
    back = volume_io.load_ct(tmp_path / "series")
    np.testing.assert_array_equal(back.array, volume.array)
    np.testing.assert_allclose(back.affine, volume.affine, atol=1e-6)


@pytest.mark.parametrize("name", list(_volumes()))
def test_tags_place_every_voxel_where_the_volume_has_it(tmp_path, name):
    volume = _volumes()[name]
    write_ct_series(tmp_path / "series", volume)
    slices = [pydicom.dcmread(p) for p in sorted((tmp_path / "series").iterdir())]
    spacing = volume.spacing
    uids = {(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID) for ds in slices}
    assert len(uids) == 1 and len({ds.SOPInstanceUID for ds in slices}) == len(slices)
    for k, ds in enumerate(slices):
        assert ds.SOPClassUID == CT_IMAGE_STORAGE and ds.file_meta.MediaStorageSOPClassUID == CT_IMAGE_STORAGE
        assert ds.Modality == "CT" and ds.InstanceNumber == k + 1 and "DERIVED" in ds.ImageType
        assert (ds.Rows, ds.Columns) == (volume.shape[1], volume.shape[0])
        assert float(ds.RescaleSlope) == 1.0 and float(ds.RescaleIntercept) == 0.0 and ds.PixelRepresentation == 1
        assert [float(v) for v in ds.PixelSpacing] == pytest.approx([spacing[1], spacing[0]])
        assert float(ds.SliceThickness) == pytest.approx(spacing[2])
        row_dir, col_dir = np.array(ds.ImageOrientationPatient[:3], float), np.array(ds.ImageOrientationPatient[3:], float)
        assert np.linalg.norm(row_dir) == pytest.approx(1) and row_dir @ col_dir == pytest.approx(0, abs=1e-9)
        origin = np.array(ds.ImagePositionPatient, float)
        pixels = ds.pixel_array
        # Each pixel's LPS position from the tags alone, against the voxel's RAS position from the affine.
        for i in range(volume.shape[0]):
            for j in range(volume.shape[1]):
                ras = volume.affine @ np.array([i, j, k, 1.0])
                lps = LPS @ ras[:3]
                offset = lps - origin
                c = offset @ row_dir / float(ds.PixelSpacing[1])
                r = offset @ col_dir / float(ds.PixelSpacing[0])
                assert np.allclose([r, c], np.rint([r, c]), atol=1e-3), "the voxel falls on a pixel centre"
                assert pixels[int(round(r)), int(round(c))] == volume.array[i, j, k]
    if name == "axis-aligned":  # how scanners write axial slices: columns to the left, rows to the back
        assert [float(v) for v in slices[0].ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]


def test_series_is_marked_synthetic_and_needs_an_empty_folder(tmp_path):
    volume = _volumes()["axis-aligned"]
    write_ct_series(tmp_path / "s", volume)
    ds = pydicom.dcmread(tmp_path / "s" / "CT_0001.dcm")
    assert str(ds.PatientName) == "SYNTHETIC^MAISI2" and "not an image of a patient" in ds.ImageComments
    with pytest.raises(FileExistsError, match="not empty"):
        write_ct_series(tmp_path / "s", volume)
