"""Tests for maisi2.volume_io: orientation, geometry, dtypes, atomic writes, bad input, DICOM series."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from maisi2.volume_io import (
    Volume,
    load_ct,
    load_label_map,
    ras_affine,
    resample_to_spacing,
    save_ct,
    save_label_map,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "totalsegmentator"

# Voxel axes 0, 1, 2 point to Left, Posterior, Superior (a typical DICOM-derived NIfTI).
LPS_AFFINE = np.array(
    [[-2.0, 0, 0, 30.0], [0, -3.0, 0, 40.0], [0, 0, 4.0, -50.0], [0, 0, 0, 1]]
)
# Axes permuted and flipped: axis 0 -> Inferior, axis 1 -> Right, axis 2 -> Posterior.
PERMUTED_AFFINE = np.array(
    [[0, 1.5, 0, -20.0], [0, 0, -2.5, 15.0], [-0.5, 0, 0, 7.0], [0, 0, 0, 1]]
)


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


def world(affine: np.ndarray, index) -> np.ndarray:
    return (affine @ np.array([*index, 1.0]))[:3]


# ---------------------------------------------------------------- orientation and geometry


def test_marker_voxel_lands_where_its_world_position_says(tmp_path):
    array = np.zeros((4, 5, 6), np.int16)
    array[1, 2, 3] = 500
    path = write_nifti(tmp_path / "lps.nii.gz", array, LPS_AFFINE)

    ct = load_ct(path)

    assert nib.aff2axcodes(ct.affine) == ("R", "A", "S")
    assert ct.array.dtype == np.float32 and ct.shape == (4, 5, 6)
    marker = np.unravel_index(np.argmax(ct.array), ct.shape)
    assert marker == (2, 2, 3)  # x and y flipped, z kept
    np.testing.assert_allclose(world(ct.affine, marker), world(LPS_AFFINE, (1, 2, 3)))
    np.testing.assert_array_equal(ct.original_affine, LPS_AFFINE)


def test_permuted_axes_are_reordered_and_spacing_follows(tmp_path):
    array = np.zeros((3, 4, 5), np.int16)
    array[0, 1, 2] = 7
    path = write_nifti(tmp_path / "perm.nii.gz", array, PERMUTED_AFFINE)

    ct = load_ct(path)

    assert nib.aff2axcodes(ct.affine) == ("R", "A", "S")
    assert ct.shape == (4, 5, 3)  # stored axes (I, R, P) become (R, A, S) = stored (1, 2, 0)
    assert ct.spacing == pytest.approx((1.5, 2.5, 0.5))
    marker = np.unravel_index(np.argmax(ct.array), ct.shape)
    np.testing.assert_allclose(world(ct.affine, marker), world(PERMUTED_AFFINE, (0, 1, 2)))


@pytest.mark.parametrize("affine", [LPS_AFFINE, PERMUTED_AFFINE], ids=["lps", "permuted"])
def test_round_trip_keeps_data_and_original_affine_exactly(tmp_path, affine):
    rng = np.random.default_rng(0)
    array = rng.integers(-1000, 2000, size=(3, 4, 5)).astype(np.int16)
    source = write_nifti(tmp_path / "in.nii.gz", array, affine)

    out = save_ct(tmp_path / "out.nii.gz", load_ct(source))

    written = nib.load(out)
    assert written.get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), array)
    np.testing.assert_array_equal(written.affine, affine)
    assert written.header["sform_code"] == 1 and written.header["qform_code"] == 1
    np.testing.assert_allclose(written.header.get_qform(), affine, atol=1e-5)


def test_label_map_round_trip_keeps_orientation(tmp_path):
    labels = np.zeros((3, 4, 5), np.uint8)
    labels[0, 0, 0], labels[2, 3, 4] = 1, 200
    source = write_nifti(tmp_path / "labels.nii.gz", labels, PERMUTED_AFFINE)

    loaded = load_label_map(source)
    out = save_label_map(tmp_path / "out.nii.gz", loaded)

    assert loaded.array.dtype == np.int16
    written = nib.load(out)
    assert written.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), labels)
    np.testing.assert_array_equal(written.affine, PERMUTED_AFFINE)


def test_spacing_from_affine_columns():
    rotation = np.array([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]])  # 90 degrees about z: norms unchanged
    affine = np.eye(4)
    affine[:3, :3] = rotation * [0.7, 1.2, 3.0]
    volume = Volume(np.zeros((2, 2, 2)), affine)
    assert volume.spacing == pytest.approx((0.7, 1.2, 3.0))
    assert Volume(np.zeros((2, 3, 4)), ras_affine((1, 2, 3))).spacing == (1.0, 2.0, 3.0)


def test_ras_affine_places_origin_and_rejects_bad_spacing():
    affine = ras_affine((0.5, 1.0, 2.0), origin=(1, 2, 3))
    np.testing.assert_array_equal(world(affine, (2, 2, 2)), [2.0, 4.0, 7.0])
    with pytest.raises(ValueError, match="positive"):
        ras_affine((1.0, 0.0, 1.0))


def test_made_up_volume_is_saved_with_its_affine(tmp_path):
    affine = ras_affine((1.0, 2.0, 4.0), origin=(-8.0, 16.0, 32.0))
    out = save_ct(tmp_path / "made.nii.gz", Volume(np.full((2, 3, 4), 5.0, np.float32), affine))
    written = nib.load(out)
    np.testing.assert_array_equal(written.affine, affine)
    assert written.shape == (2, 3, 4)


def test_with_array_keeps_geometry_and_checks_shape():
    volume = Volume(np.zeros((2, 3, 4)), ras_affine((1, 1, 1)), original_affine=LPS_AFFINE)
    replaced = volume.with_array(np.ones((2, 3, 4)))
    assert replaced.array.sum() == 24
    np.testing.assert_array_equal(replaced.original_affine, LPS_AFFINE)
    with pytest.raises(ValueError, match="shape"):
        volume.with_array(np.ones((2, 3, 5)))


def test_inconsistent_original_affine_is_not_saved(tmp_path):
    # An identity grid flipped back to LPS axes cannot give LPS_AFFINE: saving must refuse, not guess.
    volume = Volume(np.zeros((2, 3, 4)), np.eye(4), original_affine=LPS_AFFINE)
    with pytest.raises(ValueError, match="original_affine=None"):
        save_ct(tmp_path / "ct.nii.gz", volume)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- output dtypes and atomic writes


def test_ct_saved_as_rounded_clipped_int16(tmp_path):
    array = np.array([12.6, -3000.4, 40000.0, -40000.0, 0.4, -0.6], np.float32).reshape(1, 2, 3)
    out = save_ct(tmp_path / "ct.nii.gz", Volume(array, np.eye(4)))
    written = nib.load(out)
    assert written.get_data_dtype() == np.int16
    assert np.asanyarray(written.dataobj).ravel().tolist() == [13, -3000, 32767, -32768, 0, -1]


def test_label_dtype_is_uint8_up_to_255_else_int16(tmp_path):
    small = save_label_map(tmp_path / "small.nii.gz", Volume(np.full((2, 2, 2), 255), np.eye(4)))
    large = save_label_map(tmp_path / "large.nii.gz", Volume(np.full((2, 2, 2), 300), np.eye(4)))
    assert nib.load(small).get_data_dtype() == np.uint8
    assert nib.load(large).get_data_dtype() == np.int16
    assert int(np.asanyarray(nib.load(large).dataobj).max()) == 300


def test_no_overwrite_without_flag(tmp_path):
    target = tmp_path / "ct.nii.gz"
    save_ct(target, Volume(np.zeros((2, 2, 2)), np.eye(4)))
    with pytest.raises(FileExistsError, match="overwrite"):
        save_ct(target, Volume(np.ones((2, 2, 2)), np.eye(4)))
    assert np.asanyarray(nib.load(target).dataobj).max() == 0
    save_ct(target, Volume(np.ones((2, 2, 2)), np.eye(4)), overwrite=True)
    assert np.asanyarray(nib.load(target).dataobj).max() == 1


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken_save(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(nib, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        save_ct(tmp_path / "ct.nii.gz", Volume(np.zeros((2, 2, 2)), np.eye(4)))
    with pytest.raises(RuntimeError, match="disk full"):
        save_label_map(tmp_path / "labels.nii.gz", Volume(np.zeros((2, 2, 2)), np.eye(4)))
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_file(tmp_path, monkeypatch):
    target = save_ct(tmp_path / "ct.nii.gz", Volume(np.full((2, 2, 2), 9.0), np.eye(4)))
    monkeypatch.setattr(nib, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError, match="boom"):
        save_ct(target, Volume(np.zeros((2, 2, 2)), np.eye(4)), overwrite=True)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["ct.nii.gz"]
    assert np.asanyarray(nib.load(target).dataobj).min() == 9


def test_output_must_be_nifti(tmp_path):
    with pytest.raises(ValueError, match="nii.gz"):
        save_ct(tmp_path / "ct.mha", Volume(np.zeros((2, 2, 2)), np.eye(4)))


def test_nan_volume_is_not_saved(tmp_path):
    array = np.zeros((2, 2, 2), np.float32)
    array[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        save_ct(tmp_path / "ct.nii.gz", Volume(array, np.eye(4)))
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- bad input


def test_four_d_with_trailing_singleton_is_squeezed(tmp_path):
    path = write_nifti(tmp_path / "4d.nii.gz", np.zeros((2, 3, 4, 1), np.int16), np.eye(4))
    assert load_ct(path).shape == (2, 3, 4)


@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 4, 2)], ids=["2d", "4d-two-channels"])
def test_not_3d_is_rejected(tmp_path, shape):
    path = write_nifti(tmp_path / "bad.nii.gz", np.zeros(shape, np.int16), np.eye(4))
    with pytest.raises(ValueError, match="expected a 3D volume") as err:
        load_ct(path)
    assert str(path) in str(err.value)


def test_empty_is_rejected(tmp_path):
    path = write_nifti(tmp_path / "empty.nii.gz", np.zeros((0, 3, 3), np.float32), np.eye(4))
    with pytest.raises(ValueError, match="empty") as err:
        load_ct(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_is_rejected(tmp_path, bad):
    array = np.zeros((2, 3, 4), np.float32)
    array[1, 1, 1] = bad
    path = write_nifti(tmp_path / "nan.nii.gz", array, np.eye(4))
    with pytest.raises(ValueError, match="1 NaN/inf voxels") as err:
        load_ct(path)
    assert str(path) in str(err.value)
    with pytest.raises(ValueError, match="NaN/inf"):
        load_label_map(path)


def test_non_integer_labels_are_rejected(tmp_path):
    array = np.zeros((2, 3, 4), np.float32)
    array[0, 0, 0] = 1.5
    path = write_nifti(tmp_path / "soft.nii.gz", array, np.eye(4))
    with pytest.raises(ValueError, match=r"non-integer values \(e.g. 1.5\)") as err:
        load_label_map(path)
    assert str(path) in str(err.value)


def test_float_stored_integer_labels_are_accepted(tmp_path):
    array = np.zeros((2, 3, 4), np.float32)
    array[0, 0, 0] = 1.0
    labels = load_label_map(write_nifti(tmp_path / "float.nii.gz", array, np.eye(4)))
    assert labels.array.dtype == np.int16 and labels.array.max() == 1


def test_unknown_label_ids_are_rejected_unless_unchecked(tmp_path):
    array = np.zeros((2, 3, 4), np.int16)
    array[0, 0, 0], array[1, 1, 1] = 133, 1
    path = write_nifti(tmp_path / "ids.nii.gz", array, np.eye(4))
    with pytest.raises(ValueError, match="133") as err:
        load_label_map(path)
    assert str(path) in str(err.value)
    assert load_label_map(path, check_ids=False).array.max() == 133


def test_truncated_file_is_reported_as_corrupt(tmp_path):
    path = write_nifti(tmp_path / "ct.nii.gz", np.arange(4000, dtype=np.int16).reshape(10, 20, 20), np.eye(4))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt") as err:
        load_ct(path)
    assert str(path) in str(err.value)


def test_truncated_uncompressed_file_is_reported_as_corrupt(tmp_path):
    path = write_nifti(tmp_path / "ct.nii", np.arange(4000, dtype=np.int16).reshape(10, 20, 20), np.eye(4))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="corrupt"):
        load_label_map(path, check_ids=False)


def test_not_an_image_is_reported(tmp_path):
    path = tmp_path / "notes.nii.gz"
    path.write_text("this is not an image")
    with pytest.raises(ValueError, match="cannot read .*notes.nii.gz"):
        load_ct(path)


def test_missing_path_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        load_ct(tmp_path / "missing.nii.gz")
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        load_label_map(tmp_path / "missing.nii.gz")


def test_label_map_folder_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="NIfTI"):
        load_label_map(tmp_path)


# ---------------------------------------------------------------- resampling


def test_resample_labels_nearest_keeps_ids_and_centre():
    labels = np.zeros((8, 8, 8), np.int16)
    labels[2:6, 2:6, 2:6] = 1
    labels[4:6, 4:6, 4:6] = 200
    volume = Volume(labels, ras_affine((1.0, 1.0, 1.0), origin=(10.0, 20.0, 30.0)))

    coarse = resample_to_spacing(volume, (2.0, 2.0, 0.5), order=0)

    assert coarse.shape == (4, 4, 16) and coarse.spacing == pytest.approx((2.0, 2.0, 0.5))
    assert coarse.array.dtype == np.int16
    assert set(np.unique(coarse.array)) == {0, 1, 200}
    centre_old = world(volume.affine, (np.array(volume.shape) - 1) / 2)
    centre_new = world(coarse.affine, (np.array(coarse.shape) - 1) / 2)
    np.testing.assert_allclose(centre_new, centre_old)
    assert coarse.original_affine is None


def test_resample_ct_linear_reproduces_a_linear_ramp():
    x = np.arange(10, dtype=np.float32)
    ramp = np.broadcast_to(x[:, None, None] * 10.0, (10, 4, 4)).copy()
    volume = Volume(ramp, ras_affine((1.0, 1.0, 1.0)))

    fine = resample_to_spacing(volume, (0.5, 1.0, 1.0), order=1)

    assert fine.shape == (20, 4, 4) and fine.array.dtype == np.float32
    # Inside the original extent a linear ramp must stay exactly linear in world x.
    xs = np.array([world(fine.affine, (i, 0, 0))[0] for i in range(20)])
    inside = (xs >= 0) & (xs <= 9)
    np.testing.assert_allclose(fine.array[inside, 0, 0], 10.0 * xs[inside], atol=1e-4)


def test_resample_rejects_other_orders():
    with pytest.raises(ValueError, match="order"):
        resample_to_spacing(Volume(np.zeros((2, 2, 2)), np.eye(4)), (1, 1, 1), order=3)


def test_resampled_file_volume_saves_in_the_file_orientation(tmp_path):
    array = np.random.default_rng(1).integers(0, 100, size=(6, 8, 4)).astype(np.int16)
    source = write_nifti(tmp_path / "in.nii.gz", array, PERMUTED_AFFINE)
    ct = load_ct(source)

    coarse = resample_to_spacing(ct, (3.0, 5.0, 1.0), order=1)
    out = save_ct(tmp_path / "out.nii.gz", coarse)

    written = nib.load(out)
    assert nib.aff2axcodes(written.affine) == nib.aff2axcodes(PERMUTED_AFFINE)
    reloaded = load_ct(out)
    np.testing.assert_allclose(reloaded.affine, coarse.affine, atol=1e-5)
    np.testing.assert_array_equal(reloaded.array, np.rint(coarse.array))


# ---------------------------------------------------------------- DICOM series


def write_dicom_slice(path, pixels, position, orientation, pixel_spacing, series_uid, instance,
                      slope=2.0, intercept=-1024.0):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID, ds.InstanceNumber = "CT", series_uid, instance
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = [float(v) for v in pixel_spacing]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_series(folder: Path, orientation, n_slices=5, step=2.5, series_uid="1.2.3.4.1",
                 marker=(1, 2, 3), skip=()):
    """Slices written in shuffled file order with misleading InstanceNumbers.

    Pixel value of slice k = 100 * k + 600 (so HU = 2 * value - 1024); one marker pixel at
    (row, column, slice) = `marker`. Returns the marker's LPS world position.
    """
    folder.mkdir(parents=True, exist_ok=True)
    row_dir, col_dir = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(row_dir, col_dir)
    pixel_spacing = (0.8, 0.5)  # (between rows, between columns)
    origin = np.array([-10.0, 20.0, 5.0])
    order = np.random.default_rng(0).permutation(n_slices)
    for file_index, k in enumerate(order):
        if k in skip:
            continue
        pixels = np.full((4, 3), 100 * k + 600)
        if k == marker[2]:
            pixels[marker[0], marker[1]] = 3000
        write_dicom_slice(folder / f"IM{file_index:04d}", pixels, origin + k * step * normal, orientation,
                          pixel_spacing, series_uid, instance=n_slices - file_index)
    r, c, k = marker
    return origin + k * step * normal + c * pixel_spacing[1] * row_dir + r * pixel_spacing[0] * col_dir


AXIAL = (1, 0, 0, 0, 1, 0)
SAGITTAL = (0, 1, 0, 0, 0, -1)
CORONAL = (1, 0, 0, 0, 0, -1)


@pytest.mark.parametrize("orientation", [AXIAL, SAGITTAL, CORONAL], ids=["axial", "sagittal", "coronal"])
def test_dicom_series_sorted_rescaled_and_placed(tmp_path, orientation):
    marker_lps = write_series(tmp_path / "series", orientation)
    (tmp_path / "series" / "README.txt").write_text("not DICOM, must be skipped")

    ct = load_ct(tmp_path / "series")

    assert ct.array.dtype == np.float32 and sorted(ct.shape) == [3, 4, 5]
    assert nib.aff2axcodes(ct.affine) == ("R", "A", "S")
    assert sorted(ct.spacing) == pytest.approx([0.5, 0.8, 2.5])
    marker = np.unravel_index(np.argmax(ct.array), ct.shape)
    assert ct.array[marker] == 2 * 3000 - 1024
    np.testing.assert_allclose(world(ct.affine, marker), marker_lps * [-1, -1, 1], atol=1e-6)
    # Every voxel's HU must say which slice it came from: slice k sits at LPS origin + k * step * normal.
    normal = np.cross(orientation[:3], orientation[3:])
    for index in [(0, 0, 0), tuple(np.array(ct.shape) - 1), (1, 0, 2)]:
        if index == marker:
            continue
        lps = world(ct.affine, index) * [-1, -1, 1]
        k = round(float(np.dot(lps - [-10.0, 20.0, 5.0], normal)) / 2.5)
        assert ct.array[index] == 2 * (100 * k + 600) - 1024


def test_dicom_volume_saves_and_reloads_with_same_geometry(tmp_path):
    write_series(tmp_path / "series", AXIAL)
    ct = load_ct(tmp_path / "series")
    reloaded = load_ct(save_ct(tmp_path / "ct.nii.gz", ct))
    np.testing.assert_allclose(reloaded.affine, ct.affine, atol=1e-5)
    np.testing.assert_array_equal(reloaded.array, ct.array)


def test_mixed_series_names_every_uid(tmp_path):
    write_series(tmp_path / "mixed", AXIAL, series_uid="1.2.3.4.111")
    write_series(tmp_path / "mixed" / "other", AXIAL, n_slices=3, series_uid="1.2.3.4.222")
    with pytest.raises(ValueError, match="2 DICOM series") as err:
        load_ct(tmp_path / "mixed")
    assert "1.2.3.4.111 (5 slices" in str(err.value) and "1.2.3.4.222 (3 slices" in str(err.value)
    assert "Which one" in str(err.value)


def test_folder_without_dicom_is_rejected(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="no DICOM image slices") as err:
        load_ct(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_missing_slice_is_rejected(tmp_path):
    write_series(tmp_path / "gap", AXIAL, n_slices=6, skip=(2,))
    with pytest.raises(ValueError, match="not evenly spaced"):
        load_ct(tmp_path / "gap")


# ---------------------------------------------------------------- real data (skipped when absent)


def shared_file(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"shared example data not found at {path} (only present in the development checkout)")
    return path


def test_real_dicom_series_matches_its_nifti_segmentation():
    ct = load_ct(shared_file("example_ct_dicom"))
    seg = load_label_map(shared_file("example_seg_dicom.nii.gz"), check_ids=False)  # TotalSegmentator ids

    assert ct.shape == seg.shape == (512, 512, 20)
    assert ct.spacing == pytest.approx((0.9765625, 0.9765625, 2.0))
    np.testing.assert_allclose(ct.affine, seg.affine, atol=1e-3)
    assert -1100 <= ct.array.min() <= -900 and 1000 <= ct.array.max() <= 4000  # air .. bone HU
    # Alignment, not just equal affines: labelled vertebrae must sit on bone-bright voxels.
    names = json.loads(shared_file("class_map_total.json").read_text())["total"]
    vertebrae = [int(i) for i, name in names.items() if name.startswith("vertebrae_")]
    in_vertebrae = np.isin(seg.array, vertebrae)
    assert in_vertebrae.sum() > 1000
    assert np.median(ct.array[in_vertebrae]) > 150
