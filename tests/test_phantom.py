"""The procedural phantom: anatomy, intensities, lesions, physical consistency, CLI."""

import numpy as np
import pytest
from scipy import ndimage

from maisi2 import labels
from maisi2.cli import main
from maisi2.volume_io import load_ct, load_label_map, ras_affine
from maisi2.labels import BODY, LUNG_IDS, label_id, remove_tumors
from maisi2.phantom import TUMOR_KINDS, TumorSpec, make_phantom, parse_tumor_specs, render, write_phantom

TYPICAL = ((96, 96, 64), (4.0, 4.0, 4.0))  # 384 x 384 x 256 mm: lung bases to the colon
REQUIRED = ["liver", "spleen", "pancreas", "left kidney", "right kidney", "stomach", "colon", "aorta",
            "inferior vena cava", "left lung upper lobe", "left lung lower lobe", "right lung upper lobe",
            "right lung middle lobe", "right lung lower lobe", "heart"]
VERTEBRA_IDS = [v for k, v in labels.LABELS.items() if k.startswith("vertebrae")]
RIB_IDS = [v for k, v in labels.LABELS.items() if " rib " in f" {k} "]


@pytest.fixture(scope="module")
def typical():
    return make_phantom(*TYPICAL, seed=0)


@pytest.fixture(scope="module")
def with_lesions():
    tumors = parse_tumor_specs(["hepatic:2", "lung:1", "bone:1", "pancreatic:1", "colon:1", "kidney-cyst:1"])
    return make_phantom(*TYPICAL, tumors=tumors, seed=1)


def test_output_types_geometry_and_valid_ids(typical):
    ct, lab, affine = typical
    assert ct.shape == lab.shape == TYPICAL[0]
    assert ct.dtype == np.float32 and lab.dtype == np.uint8
    labels.check_label_ids(lab)
    # The field of view is centred on the anatomy's origin (RAS, diagonal spacing).
    shape, spacing = TYPICAL
    assert np.allclose(affine, ras_affine(spacing, -(np.array(shape) - 1) / 2 * np.array(spacing)))
    assert np.allclose(affine @ [*(np.array(shape) - 1) / 2, 1], [0, 0, 0, 1])
    assert ct.min() >= -1000 and ct.max() <= 1500


def test_every_required_structure_is_present_at_a_plausible_size(typical):
    _, lab, _ = typical
    voxel_ml = np.prod(TYPICAL[1]) / 1000.0
    for name in REQUIRED:
        ml = np.count_nonzero(lab == label_id(name)) * voxel_ml
        assert ml > 5.0, f"{name}: {ml:.1f} ml"
    liver_ml = np.count_nonzero(lab == label_id("liver")) * voxel_ml
    assert 900 < liver_ml < 2500
    assert np.isin(lab, VERTEBRA_IDS).sum() > 1000 and len(set(np.unique(lab)) & set(VERTEBRA_IDS)) >= 6
    assert len(set(np.unique(lab)) & set(RIB_IDS)) >= 12
    assert np.count_nonzero(lab == BODY) > 0.1 * lab.size


def test_organ_medians_fall_inside_the_packaged_quality_ranges(typical):
    ct, lab, _ = typical
    stats = labels.load_resource_json("image_median_statistics_ct.json")
    checked = []
    for group, ids in labels.QC_ORGAN_GROUPS.items():
        mask = np.isin(lab, ids)
        if not mask.any():
            continue
        median = float(np.median(ct[mask]))
        low, high = stats[group]["sigma_6_low"], stats[group]["sigma_6_high"]
        assert low <= median <= high, f"{group}: median {median:.0f} HU outside [{low:.0f}, {high:.0f}]"
        checked.append(group)
    assert set(checked) >= {"liver", "spleen", "pancreas", "kidney", "lung", "bone"}


def test_tissue_intensities_are_plausible(typical):
    ct, lab, _ = typical
    median = {n: float(np.median(ct[lab == label_id(n)])) for n in ("liver", "spleen", "aorta", "left autochthon")}
    assert 45 < median["liver"] < 75 and 35 < median["spleen"] < 65
    assert median["aorta"] > 120  # contrast-enhanced blood
    assert 30 < median["left autochthon"] < 70  # muscle
    body = ct[lab == BODY]
    assert np.mean((body > -130) & (body < -70)) > 0.4  # fat dominates the unlabelled soft tissue
    lungs = ct[np.isin(lab, LUNG_IDS)]
    assert -900 < np.median(lungs) < -780 and np.std(lungs) > 20  # textured, with vessels


def test_background_is_air_and_label_zero(typical):
    ct, lab, _ = typical
    assert np.all(ct[lab == 0] == -1000.0)
    corners = lab[[0, -1]][:, [0, -1]][:, :, [0, -1]]
    assert np.all(corners == 0)
    assert 0.15 < np.mean(lab == 0) < 0.7  # an elliptic torso, not a full box


def test_deterministic_for_a_seed_and_varied_across_seeds():
    grid = ((40, 32, 24), (8.0, 8.0, 8.0))
    ct_a, lab_a, aff_a = make_phantom(*grid, seed=3)
    ct_b, lab_b, aff_b = make_phantom(*grid, seed=3)
    assert np.array_equal(ct_a, ct_b) and np.array_equal(lab_a, lab_b) and np.array_equal(aff_a, aff_b)
    ct_c, lab_c, _ = make_phantom(*grid, seed=4)
    assert np.mean(lab_a != lab_c) > 0.01
    liver = label_id("liver")
    assert np.count_nonzero(lab_a == liver) != np.count_nonzero(lab_c == liver)


def test_same_seed_gives_the_same_body_at_2_and_4_mm():
    # Odd shapes with a shared origin put every 4 mm voxel centre on a 2 mm voxel centre.
    fine_ct, fine, fine_aff = make_phantom((149, 99, 99), (2.0, 2.0, 2.0), seed=5)
    coarse_ct, coarse, coarse_aff = make_phantom((75, 50, 50), (4.0, 4.0, 4.0), seed=5)
    assert np.allclose(fine_aff[:3, 3], coarse_aff[:3, 3])
    for name in ("liver", "spleen", "left kidney", "stomach"):
        ml_fine = np.count_nonzero(fine == label_id(name)) * 8e-3
        ml_coarse = np.count_nonzero(coarse == label_id(name)) * 64e-3
        assert ml_fine > 20 and abs(ml_fine / ml_coarse - 1) < 0.10, (name, ml_fine, ml_coarse)
    assert np.mean(fine[::2, ::2, ::2] == coarse) > 0.995
    liver = coarse == label_id("liver")
    assert abs(np.median(fine_ct[::2, ::2, ::2][liver]) - np.median(coarse_ct[liver])) < 10


def test_slab_rendering_has_no_seams(monkeypatch):
    # Big volumes are rendered in z-slabs to bound memory; the result must not depend on the slab size.
    grid = ((40, 36, 30), (6.0, 6.0, 6.0))
    whole = make_phantom(*grid, seed=7)
    monkeypatch.setattr(render, "_SLAB_VOXELS", 40 * 36 * 4)
    slabs = make_phantom(*grid, seed=7)
    assert np.array_equal(whole[1], slabs[1])
    assert np.allclose(whole[0], slabs[0], atol=1e-3)


def _expected_parents(tumor_id: int) -> set[int]:
    if tumor_id in labels.TUMOR_PARENT:
        return {labels.TUMOR_PARENT[tumor_id]}
    return set(LUNG_IDS) if tumor_id == label_id("lung tumor") else set(VERTEBRA_IDS)


def test_lesions_lie_inside_their_parent_organ_with_distinct_intensity(with_lesions):
    ct, lab, _ = with_lesions
    perturbed = remove_tumors(lab)
    found = {int(v) for v in np.unique(lab)} & set(labels.TUMOR_IDS)
    cysts = {label_id("left kidney cyst"), label_id("right kidney cyst")}
    assert found - cysts == {label_id(n) for n in ("hepatic tumor", "lung tumor", "bone lesion",
                                                    "pancreatic tumor", "colon cancer primaries")}
    assert len(found & cysts) == 1
    for tumor in found:
        lesion = lab == tumor
        parents = {int(v) for v in np.unique(perturbed[lesion])}
        assert parents <= _expected_parents(tumor), (labels.label_name(tumor), parents)
        # Surrounded by its parent: every voxel touching the lesion is the parent (or the lesion).
        ring = ndimage.binary_dilation(lesion) & ~lesion
        assert set(np.unique(lab[ring]).tolist()) <= parents, labels.label_name(tumor)
        parent_hu = np.median(ct[np.isin(lab, list(parents))])
        assert abs(np.median(ct[lesion]) - parent_hu) > 10, labels.label_name(tumor)
    hepatic = ct[lab == label_id("hepatic tumor")]
    assert np.median(hepatic) < np.median(ct[lab == label_id("liver")]) - 20  # hypodense


def test_lesions_do_not_move_the_anatomy(typical):
    tumors = [TumorSpec("hepatic", 1, (8.0, 10.0))]
    _, lab, _ = make_phantom(*TYPICAL, tumors=tumors, seed=0)
    _, plain, _ = typical
    assert np.array_equal(remove_tumors(lab), plain)


def test_tumor_specs_parse_and_fail_clearly():
    specs = parse_tumor_specs(["hepatic:2", "lung", "kidney-cyst:0"], radius_mm=(6, 9))
    assert [(s.kind, s.count, s.radius_mm) for s in specs] == [
        ("hepatic", 2, (6.0, 9.0)), ("lung", 1, (6.0, 9.0)), ("kidney-cyst", 0, (6.0, 9.0))]
    assert set(TUMOR_KINDS) >= {"hepatic", "pancreatic", "lung", "colon", "bone", "kidney-cyst"}
    for name in (n for names in TUMOR_KINDS.values() for n in names):
        assert label_id(name) in labels.TUMOR_IDS
    with pytest.raises(ValueError, match="unknown tumour kind 'brain'.*hepatic"):
        parse_tumor_specs(["brain:1"])
    with pytest.raises(ValueError, match="KIND:COUNT"):
        parse_tumor_specs(["hepatic:two"])
    with pytest.raises(ValueError, match="count"):
        TumorSpec("hepatic", -1)
    with pytest.raises(ValueError, match="MIN <= MAX"):
        TumorSpec("hepatic", 1, (9.0, 3.0))
    with pytest.raises(ValueError, match="MIN <= MAX"):
        TumorSpec("hepatic", 1, (0.0, 3.0))


def test_a_lesion_that_cannot_fit_is_an_error():
    with pytest.raises(ValueError, match="could not fit a hepatic lesion.*field of view"):
        make_phantom((16, 16, 16), (4.0, 4.0, 4.0), tumors=[TumorSpec("hepatic", 1, (40.0, 50.0))])


@pytest.mark.parametrize("shape, spacing, match", [
    ((0, 10, 10), (1, 1, 1), "shape"),
    ((10, 10), (1, 1, 1), "shape"),
    ((10.5, 10, 10), (1, 1, 1), "shape"),
    ((10, 10, 10), (1, 0, 1), "spacing"),
    ((10, 10, 10), (1, float("nan"), 1), "spacing"),
    ((10, 10, 10), (1, 1), "spacing"),
])
def test_bad_grids_are_rejected(shape, spacing, match):
    with pytest.raises(ValueError, match=match):
        make_phantom(shape, spacing)


def test_bad_seed_is_rejected():
    with pytest.raises(ValueError, match="seed"):
        make_phantom((8, 8, 8), (8, 8, 8), seed=-1)


def test_cli_writes_both_files_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "phantom"
    argv = ["phantom", "--shape", "32", "32", "24", "--spacing", "8", "8", "8", "--seed", "2",
            "--tumors", "hepatic:1", "--tumor-radius-mm", "10", "12", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "ct.nii.gz" in printed and "label.nii.gz" in printed
    ct, lab = load_ct(out / "ct.nii.gz"), load_label_map(out / "label.nii.gz")
    assert ct.shape == lab.shape == (32, 32, 24)
    assert np.allclose(ct.spacing, 8.0) and np.allclose(ct.affine, lab.affine)
    assert label_id("hepatic tumor") in lab.array
    expected_ct, expected_lab, _ = make_phantom((32, 32, 24), (8, 8, 8), parse_tumor_specs(["hepatic:1"], (10, 12)), 2)
    assert np.array_equal(lab.array, expected_lab)
    assert np.abs(ct.array - expected_ct).max() <= 0.5  # saved as int16 HU

    before = (out / "label.nii.gz").read_bytes()
    assert main(argv[:-2] + ["--seed", "3", "--out", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert (out / "label.nii.gz").read_bytes() == before
    assert main(argv + ["--overwrite"]) == 0


def test_cli_reports_bad_requests(tmp_path, capsys):
    argv = ["phantom", "--shape", "16", "16", "16", "--spacing", "8", "8", "8", "--out", str(tmp_path / "x")]
    assert main(argv + ["--tumors", "brain:1"]) == 1
    assert "unknown tumour kind" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_write_phantom_returns_the_paths(tmp_path):
    ct_path, label_path = write_phantom(tmp_path, (16, 16, 12), (10.0, 10.0, 10.0), seed=1)
    assert ct_path.name == "ct.nii.gz" and label_path.name == "label.nii.gz"
    assert ct_path.exists() and label_path.exists()
    with pytest.raises(FileExistsError):
        write_phantom(tmp_path, (16, 16, 12), (10.0, 10.0, 10.0), seed=1)


def test_phantom_set_writes_cases_on_several_grids_and_a_datalist(tmp_path):
    from maisi2.cli import main
    from maisi2.data import read_datalist
    from maisi2.volume_io import load_label_map

    out = tmp_path / "set"
    assert main(["phantom", "--count", "3", "--shape", "32", "32", "32", "--spacing", "8", "8", "8",
                 "--shape", "40", "40", "24", "--spacing", "7", "7", "10", "--seed", "5", "--out", str(out)]) == 0
    items = read_datalist(out / "datalist.jsonl")
    assert [it.fold for it in items] == [0, 1, 2] and {it.source for it in items} == {"phantom"}
    shapes = [load_label_map(it.label).shape for it in items]
    assert shapes == [(32, 32, 32), (40, 40, 24), (32, 32, 32)]
    assert items[1].spacing == (7.0, 7.0, 10.0)
    assert main(["phantom", "--count", "3", "--shape", "32", "32", "32", "--spacing", "8", "8", "8",
                 "--out", str(out)]) == 1  # refuses to replace the set


def test_phantom_follows_ras_plus_liver_on_patient_right():
    """RAS+: +x is the patient's right, so the liver's centre has x > 0 and the spleen's x < 0."""
    from maisi2.labels import label_id

    ct, labels, affine = make_phantom((64, 64, 48), (6.0, 6.0, 6.0), seed=2)
    def centre_x(name):
        ijk = np.argwhere(labels == label_id(name)).mean(0)
        return (affine @ np.r_[ijk, 1.0])[0]
    assert centre_x("liver") > 20 and centre_x("spleen") < -20
    assert centre_x("right kidney") > 0 > centre_x("left kidney")
    assert centre_x("left lung lower lobe") < 0 < centre_x("right lung lower lobe")
