"""From intent to CT on the tiny preset: selection + fit + tumour edits + generate, numbered samples,
`generate --mask M --tumors`, and refusals before any work (nothing written)."""

import json

import numpy as np
import pytest
import torch

from maisi2 import cli, models, nets, volume_io
from maisi2 import generate as G
from maisi2 import labels as L
from maisi2.config import get_config
from maisi2.masks import intent
from maisi2.masks.select import make_request
from maisi2.phantom import parse_tumor_specs

TINY_FOV = {"fov_mm": {"min": [128.0, 128.0, 128.0], "max": [320.0, 320.0, 320.0]}}
HEPATIC = L.label_id("hepatic tumor")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cfg = get_config("tiny")
    torch.manual_seed(0)
    vae, unet, controlnet = nets.build_vae(cfg), nets.build_unet(cfg), nets.build_controlnet(cfg)
    return models.save_model_folder(tmp_path_factory.mktemp("model"), cfg, vae, unet, controlnet, 0.8, TINY_FOV)


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """Three small torso phantoms at 8 mm: two tumour-free, one with a lung tumour."""
    folder = tmp_path_factory.mktemp("library")
    for name, shape, tumors, seed in [("a", (32, 32, 24), [], 1), ("b", (32, 32, 24), [], 2),
                                      ("lung", (32, 32, 24), ["lung"], 3)]:
        volume_io.save_label_map(folder / f"{name}.nii.gz",
                          G.phantom_mask(shape, (8.0, 8.0, 8.0), parse_tumor_specs(tumors, (10.0, 14.0)), seed))
    return folder


@pytest.fixture
def nothing_runs(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the request was refused")

    monkeypatch.setattr(models, "load_model", forbidden)
    monkeypatch.setattr("maisi2.sampling.sample_latent", forbidden)


def test_two_samples_from_intent_with_an_added_tumor(model_dir, library, tmp_path):
    request = make_request("abdomen", "liver,hepatic tumor", (32, 32, 32), (8.0, 8.0, 8.0), divisor=32)
    options = G.GenerateOptions(steps=2, seed=5, progress=False)
    samples = intent.generate_from_intent(request, tmp_path / "ct.nii.gz", library=library, model=model_dir,
                                          options=options, num_samples=2)
    assert [s.ct_path.name for s in samples] == ["ct_000.nii.gz", "ct_001.nii.gz"]
    files = {s["selected"]["file"] for s in (x.report["request"] for x in samples)}
    assert files == {"a.nii.gz", "b.nii.gz"}  # the lung-tumour mask is rejected, both others used
    for sample in samples:
        assert sample.ct.shape == sample.labels.shape == (32, 32, 32) and sample.ct.dtype == np.int16
        req = sample.report["request"]
        assert any(r["file"] == "lung.nii.gz" and "holds lung tumor not asked for" in r["problems"][0]
                   for r in req["rejected"])
        [edit] = req["tumor_edits"]
        written = volume_io.load_label_map(sample.ct_path.with_name(sample.ct_path.name.replace(".nii.gz", "_label.nii.gz")))
        tumor = written.array == HEPATIC
        assert tumor.sum() == edit["voxels"] and edit["parent_organ"] == "liver"
        assert edit["volume_ml"] == pytest.approx(tumor.sum() * 8**3 / 1000)
        assert sample.report["settings"]["preview_focus"] == "hepatic tumor"
        centre = sample.report["preview"]["centre_voxel"]
        assert written.array[tuple(centre)] == HEPATIC
        on_disk = json.loads(sample.ct_path.with_name(sample.ct_path.name.replace(".nii.gz", "_report.json")).read_text())
        assert on_disk["request"]["selected"]["file"] == req["selected"]["file"]


def test_cli_mask_with_tumors_adds_them_inside_the_organ(model_dir, library, tmp_path, capsys):
    out = tmp_path / "ct.nii.gz"
    rc = cli.main(["generate", "--mask", str(library / "a.nii.gz"), "--tumors", "hepatic:2", "--out", str(out),
                   "--model", str(model_dir), "--steps", "2", "--no-progress"])
    assert rc == 0
    report = json.loads((tmp_path / "ct_report.json").read_text())
    edits = report["request"]["tumor_edits"]
    assert len(edits) == 2 and all(e["parent_organ"] == "liver" for e in edits)
    written = volume_io.load_label_map(tmp_path / "ct_label.nii.gz").array
    original = volume_io.load_label_map(library / "a.nii.gz").array
    assert np.all(original[written == HEPATIC] == L.label_id("liver"))
    assert (written == HEPATIC).sum() == sum(e["voxels"] for e in edits)
    assert "added hepatic tumor in liver" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--region", "chst"], "did you mean 'chest'"),
    (["--anatomy", "livr"], "did you mean 'liver'"),
    (["--region", "chest", "--size", "48", "32", "32"], "multiples of 32"),
    (["--region", "head"], "no mask in"),
    (["--region", "chest", "--num-samples", "0"], "--num-samples must be >= 1"),
    (["--mask", "LIB/a.nii.gz", "--tumors", "brain"], "unknown tumour kind 'brain'"),
    (["--mask", "LIB/a.nii.gz", "--tumors", "hepatic:x"], "KIND:COUNT"),
    (["--mask", "LIB/a.nii.gz", "--tumors", "hepatic", "--tumor-radius-mm", "90", "99"], "too small"),
])
def test_bad_intent_is_one_line_before_any_work_and_writes_nothing(model_dir, library, tmp_path, capsys, args,
                                                                   message, nothing_runs):
    out = tmp_path / "out" / "ct.nii.gz"
    args = [a.replace("LIB", str(library)) for a in args]
    rc = cli.main(["generate", *args, "--library", str(library), "--model", str(model_dir), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_an_empty_library_is_refused(model_dir, tmp_path, capsys, nothing_runs):
    (tmp_path / "lib").mkdir()
    rc = cli.main(["generate", "--region", "chest", "--library", str(tmp_path / "lib"), "--model", str(model_dir),
                   "--out", str(tmp_path / "ct.nii.gz")])
    assert rc == 1 and "holds no usable MAISI label maps" in capsys.readouterr().err


def test_num_samples_on_a_given_mask_use_distinct_seeds(model_dir, library, tmp_path):
    rc = cli.main(["generate", "--mask", str(library / "a.nii.gz"), "--num-samples", "2", "--out",
                   str(tmp_path / "ct.nii.gz"), "--model", str(model_dir), "--steps", "2", "--seed", "3",
                   "--no-progress"])
    assert rc == 0
    seeds = [json.loads((tmp_path / f"ct_{i:03d}_report.json").read_text())["seed"] for i in range(2)]
    assert seeds == [3, 4]
    a, b = (volume_io.load_ct(tmp_path / f"ct_{i:03d}.nii.gz").array for i in range(2))
    assert not np.array_equal(a, b)
