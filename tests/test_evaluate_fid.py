"""2.5D FID: the Fréchet distance, streaming statistics, slicing, feature networks."""

import numpy as np
import pytest
import torch

from maisi2.evaluate.features import (
    RADIMAGENET,
    TORCHVISION,
    HUTextureFeatures,
    ResNet50Features,
    ResNet50Trunk,
    load_resnet50,
)
from maisi2.evaluate.fid import (
    FeatureStats,
    SetStats,
    fid,
    fid_from_stats,
    frechet_distance,
    plane_slices,
    prepare_volume,
    volume_set_stats,
)
from maisi2.volume_io import Volume, ras_affine


pytestmark = pytest.mark.usefixtures("one_thread")


def _spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.5 * np.eye(d)


# ---------------------------------------------------------------- Fréchet distance


def test_frechet_closed_form_diagonal():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    var1, var2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-10)
    # One dimension: (m1 - m2)^2 + (s1 - s2)^2.
    assert frechet_distance([3.0], [[4.0]], [1.0], [[1.0]]) == pytest.approx(4.0 + 1.0)


def test_frechet_matches_symmetric_form_for_non_commuting_covariances():
    rng = np.random.default_rng(0)
    s1, s2 = _spd(rng, 6), _spd(rng, 6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    # Independent formula: Tr((S1 S2)^1/2) = Tr((S1^1/2 S2 S1^1/2)^1/2), via eigendecompositions.
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(w)) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(inner))
    got = frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(got, rel=1e-8)  # symmetric
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)  # zero for identical


@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated")  # inside MONAI
def test_frechet_agrees_with_monai_fid_metric():
    from monai.metrics import FIDMetric

    rng = np.random.default_rng(1)
    a = rng.normal(size=(200, 8))
    b = rng.normal(loc=0.3, size=(150, 8)) @ rng.normal(size=(8, 8)) * 0.5
    ref = float(FIDMetric()(torch.from_numpy(a), torch.from_numpy(b)))
    sa, sb = FeatureStats(8), FeatureStats(8)
    sa.update(a), sb.update(b)
    assert frechet_distance(sa.mean, sa.cov, sb.mean, sb.cov) == pytest.approx(ref, rel=1e-6)


def test_frechet_survives_singular_covariances():
    rng = np.random.default_rng(2)
    a, b = FeatureStats(20), FeatureStats(20)
    a.update(rng.normal(size=(5, 20)))  # 5 samples in 20 dims: rank 4
    b.update(rng.normal(size=(5, 20)))
    value = frechet_distance(a.mean, a.cov, b.mean, b.cov)
    assert np.isfinite(value) and value > 0


def test_frechet_rejects_bad_input():
    with pytest.raises(ValueError, match="shapes do not match"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.array([np.nan, 0]), np.eye(2), np.zeros(2), np.eye(2))


def test_feature_stats_streaming_equals_numpy():
    rng = np.random.default_rng(3)
    data = rng.normal(loc=5.0, size=(103, 7)) * np.arange(1, 8)
    st = FeatureStats(7)
    for start, stop in ((0, 1), (1, 40), (40, 41), (41, 103)):  # uneven batches, a batch of one
        st.update(data[start:stop])
    assert st.n == 103
    np.testing.assert_allclose(st.mean, data.mean(0), rtol=1e-12)
    np.testing.assert_allclose(st.cov, np.cov(data, rowvar=False), rtol=1e-10)
    with pytest.raises(ValueError, match=r"shape \(batch, 7\)"):
        st.update(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="at least 2"):
        _ = FeatureStats(3).cov


# ---------------------------------------------------------------- slicing and preparation


def test_plane_slices_follow_the_maisi_axes():
    array = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)
    xy = torch.cat(list(plane_slices(array, "xy", batch_size=2)))
    yz = torch.cat(list(plane_slices(array, "yz", batch_size=2)))
    zx = torch.cat(list(plane_slices(array, "zx", batch_size=3)))
    assert xy.shape == (5, 3, 4) and yz.shape == (3, 4, 5) and zx.shape == (4, 3, 5)
    np.testing.assert_array_equal(xy[2].numpy(), array[:, :, 2])
    np.testing.assert_array_equal(yz[1].numpy(), array[1])
    np.testing.assert_array_equal(zx[3].numpy(), array[:, 3, :])


def test_prepare_volume_resamples_pads_crops_and_clips():
    array = np.full((10, 10, 10), 2000.0, np.float32)
    out = prepare_volume(Volume(array, ras_affine((2.0, 2.0, 2.0))), spacing=(1.0, 1.0, 1.0), shape=(24, 16, 20))
    assert out.shape == (24, 16, 20)
    assert out.max() == 1000.0  # clipped
    assert out[0, 8, 10] == -1000.0 and out[12, 8, 10] == 1000.0  # padded with air around the 20 mm cube
    with pytest.raises(ValueError, match="no voxel spacing"):
        prepare_volume(array, spacing=(1.0, 1.0, 1.0), shape=None)
    with pytest.raises(ValueError, match="NaN"):
        prepare_volume(np.full((4, 4, 4), np.nan), spacing=None, shape=None)


# ---------------------------------------------------------------- end to end (offline features)


def _phantom_like(seed, shift=0.0):
    rng = np.random.default_rng(seed)
    x, y, z = np.mgrid[:24, :24, :24]
    body = (x - 12) ** 2 + (y - 12) ** 2 < 90
    ct = np.where(body, 40.0 + shift, -1000.0) + rng.normal(0, 15, (24, 24, 24)) * body
    ct[(x - 12) ** 2 + (y - 10) ** 2 + (z - 12) ** 2 < 9] = 400 + shift
    return ct.astype(np.float32)


def test_fid_zero_for_identical_sets_and_grows_with_a_shift(fid_round_off):
    real = [_phantom_like(s) for s in range(3)]
    kw = dict(spacing=None, shape=None, batch_size=7, progress=False)
    same = fid(real, real, **kw)
    tolerance = fid_round_off(volume_set_stats(real, spacing=None, shape=None, batch_size=7,
                                                          progress=False))
    assert 0.0 <= same.average <= tolerance
    assert set(same.per_plane) == {"xy", "yz", "zx"} and not same.comparable_to_paper
    small = fid(real, [_phantom_like(s, 50) for s in range(3)], **kw).average
    large = fid(real, [_phantom_like(s, 300) for s in range(3)], **kw).average
    assert 100 * tolerance < small < large  # the bound is far below what a 50 HU shift gives
    assert same.samples["real"]["xy"] == 3 * 24


def test_set_stats_round_trip_and_settings_check(tmp_path, fid_round_off):
    real = [_phantom_like(s) for s in range(2)]
    stats = volume_set_stats(real, spacing=None, shape=None, progress=False)
    path = stats.save(tmp_path / "real.npz")
    loaded = SetStats.load(path)
    assert loaded.settings() == stats.settings() and loaded.volumes == 2
    np.testing.assert_array_equal(loaded.planes["yz"].scatter, stats.planes["yz"].scatter)
    assert 0.0 <= fid(loaded, real, spacing=None, shape=None, progress=False).average <= fid_round_off(stats)
    other = volume_set_stats([a[:20] for a in real], spacing=None, shape=(20, 24, 24), progress=False)
    with pytest.raises(ValueError, match="featurised differently"):
        fid_from_stats(loaded, other)


def test_fid_needs_enough_slices_and_a_non_empty_set():
    planes = {name: FeatureStats(2, 1, np.zeros(2), np.zeros((2, 2))) for name in ("xy", "yz", "zx")}
    one = SetStats(planes, "hu-texture", None, None, 1)
    with pytest.raises(ValueError, match="at least 2 per plane"):
        fid_from_stats(one, one)
    few = {name: FeatureStats(2, 2, np.zeros(2), np.eye(2)) for name in ("xy", "yz", "zx")}
    result = fid_from_stats(SetStats(few, "hu-texture", None, None, 1), SetStats(few, "hu-texture", None, None, 1))
    assert result.average == 0.0 and "biased upwards" in result.notes[0] and len(result.notes) == 6
    with pytest.raises(ValueError, match="empty"):
        volume_set_stats([], spacing=None, shape=None)


def test_hu_texture_features_are_deterministic_and_shaped():
    ex = HUTextureFeatures()
    slices = torch.from_numpy(_phantom_like(0)[:5])
    f1, f2 = ex(slices, (-1000.0, 1000.0)), ex(slices, (0.0, 1.0))
    assert f1.shape == (5, ex.dim) == (5, 46)
    torch.testing.assert_close(f1, f2)  # value_range is ignored: HU are absolute
    torch.testing.assert_close(f1[:, :16].sum(1), torch.full((5,), 100.0))  # histogram in % of the slice


# ---------------------------------------------------------------- ResNet-50


def _random_bn(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def test_resnet50_loads_torchvision_layout_and_matches_monai_forward(tmp_path):
    from monai.networks.nets import resnet50

    torch.manual_seed(0)
    # MONAI's ResNet with torchvision's stem stride has the torchvision layout and key names.
    ref = resnet50(spatial_dims=2, n_input_channels=3, conv1_t_stride=2, shortcut_type="B",
                   bias_downsample=False, feed_forward=False).eval()
    _random_bn(ref)
    state = {**ref.state_dict(), "fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)}
    torch.save(state, tmp_path / "tv.pt")
    extractor = ResNet50Features(tmp_path / "tv.pt")
    assert extractor.net.layout is TORCHVISION and not extractor.comparable_to_paper
    hu = torch.rand(2, 48, 40) * 2000 - 1000
    low, high = float(hu.min()), float(hu.max())
    got = extractor(hu, (low, high))
    x = (hu - low) / (high - low)
    with torch.no_grad():
        expected = ref(torch.stack([x - 0.406, x - 0.456, x - 0.485], dim=1))  # avg-pooled layer-4 features
    assert got.shape == (2, 2048)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_resnet50_detects_radimagenet_layout_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    trunk = ResNet50Trunk(RADIMAGENET)
    assert trunk.layer2[0].conv1.stride == (2, 2) and trunk.layer2[0].conv2.stride == (1, 1)
    state = {k: v for k, v in trunk.state_dict().items() if not k.endswith("num_batches_tracked")}
    save_file(state, str(tmp_path / "rin.safetensors"))
    loaded = load_resnet50(tmp_path / "rin.safetensors")
    assert loaded.layout is RADIMAGENET
    torch.testing.assert_close(loaded.layer4[2].conv3.bias, trunk.layer4[2].conv3.bias)
    assert ResNet50Features(loaded).comparable_to_paper


def test_resnet50_errors_name_the_problem(tmp_path):
    state = ResNet50Trunk(TORCHVISION).state_dict()
    bad = {k.replace("layer3.", "stage3."): v for k, v in state.items()}
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"missing keys: layer3\.0\..*unexpected keys: stage3\.0\."):
        load_resnet50(tmp_path / "bad.pt")
    with pytest.raises(FileNotFoundError, match="hu-texture"):
        load_resnet50(tmp_path / "absent.pt")
    wrong = dict(state)
    wrong["conv1.weight"] = torch.zeros(64, 1, 7, 7)
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match=r"conv1.weight \(64, 1, 7, 7\)"):
        load_resnet50(tmp_path / "wrong.pt")
