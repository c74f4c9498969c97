"""`generate --anatomy-size` (and `generate.mask_from_anatomy_sizes`) route to the mask generator."""

import json
import re

import numpy as np
import pytest
import torch

from maisi2 import cli, models, nets, volume_io
from maisi2 import generate as G
from maisi2 import labels as L
from maisi2.config import get_config
from maisi2.maskgen import files, networks
from maisi2.maskgen.config import get_mask_config
from maisi2.maskgen.sizes import SizeScale, SizeTable

pytestmark = pytest.mark.usefixtures("one_thread")
SIZES = 'liver=0.6,"hepatic tumor"=0.2'


@pytest.fixture(scope="module")
def ct_model(tmp_path_factory):
    cfg = get_config("tiny")
    torch.manual_seed(0)
    fov = {"fov_mm": {"min": [128.0, 128.0, 128.0], "max": [400.0, 400.0, 400.0]}}
    return models.save_model_folder(tmp_path_factory.mktemp("model"), cfg, nets.build_vae(cfg), nets.build_unet(cfg),
                                    nets.build_controlnet(cfg), 0.8, fov)


@pytest.fixture(scope="module")
def mask_generator(tmp_path_factory):
    cfg = get_mask_config("tiny")
    torch.manual_seed(0)
    table = SizeTable(np.array([[0.1, 0.5, 0.5, 0.5, 0.5, -1, -1, -1, -1, -1]]), "test")
    return files.save_mask_generator(tmp_path_factory.mktemp("maskgen"), cfg, networks.build_mask_autoencoder(cfg),
                                     networks.build_mask_unet(cfg), 1.0, SizeScale(tuple([100.0] * 10)), table)


@pytest.fixture
def run_cli(monkeypatch):
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["maisi2.cli.generate_cmd"])
    return cli.main


def test_cli_generates_a_ct_from_anatomy_sizes(run_cli, ct_model, mask_generator, tmp_path, capsys):
    out = tmp_path / "ct.nii.gz"
    code = run_cli(["generate", "--anatomy-size", SIZES, "--mask-generator", str(mask_generator), "--model",
                    str(ct_model), "--out", str(out), "--steps", "2", "--mask-steps", "2", "--no-progress",
                    "--no-preview"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "mask from the ours mask generator (rflow, 2 steps" in printed and "hepatic tumor=0.2" in printed
    label = volume_io.load_label_map(tmp_path / "ct_label.nii.gz")
    assert label.shape == (32, 32, 32) and label.spacing == (12.0, 12.0, 12.0)
    assert volume_io.load_ct(out).shape == label.shape
    made = json.loads((tmp_path / "ct_report.json").read_text())["request"]["mask_generator"]
    # the full vector actually used: the named slots, the rest from the table, the other tumours absent
    assert made["size_vector"] == pytest.approx({"gallbladder": 0.1, "liver": 0.6, "stomach": 0.5, "pancreas": 0.5,
                                                 "colon": 0.5, "lung tumor": -1, "pancreatic tumor": -1,
                                                 "hepatic tumor": 0.2, "colon cancer primaries": -1,
                                                 "bone lesion": -1})
    assert made["requested_sizes"] == {"liver": 0.6, "hepatic tumor": 0.2}
    assert made["generator"] == str(mask_generator) and made["kind"] == "ours"
    assert made["steps"] == 2 and made["seed"] == 0 and made["sampler"] == "rflow"


def test_python_api_returns_the_mask_and_how_it_was_made(mask_generator, tmp_path):
    volume, made = G.mask_from_anatomy_sizes({"liver": 0.6}, tmp_path / "ct.nii.gz", None, str(mask_generator),
                                             G.GenerateOptions(seed=2), mask_steps=2)
    L.check_label_ids(volume.array)
    assert made["kind"] == "ours" and made["size_vector"]["liver"] == pytest.approx(0.6) and made["seed"] == 2


@pytest.mark.parametrize("sizes, generator, message", [
    ("liver=2", None, r"\[0, 1\]"),
    ("spleen=0.2", None, "no anatomy-size slot"),
    ("liver=0.5", "bundled", "bundles no mask generator"),
    ("liver=0.5", "released", "release's mask_generation_autoencoder.pt"),
    ("liver=0.5", "/nonexistent", "no mask generator there"),
])
def test_bad_requests_are_one_line_before_any_network_loads(run_cli, ct_model, tmp_path, capsys, monkeypatch,
                                                            sizes, generator, message):
    monkeypatch.setattr(files, "bundled_mask_generator_dir", lambda: tmp_path / "none")
    monkeypatch.setattr(files, "load_mask_generator", lambda *a, **k: pytest.fail("a network was loaded"))
    argv = ["generate", "--anatomy-size", sizes, "--model", str(ct_model), "--out", str(tmp_path / "ct.nii.gz")]
    if generator:
        argv += ["--mask-generator", generator]
    assert run_cli(argv) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err)


def test_existing_outputs_are_refused_before_the_mask_is_made(mask_generator, tmp_path, monkeypatch):
    out = tmp_path / "ct.nii.gz"
    out.write_bytes(b"keep me")
    monkeypatch.setattr(files, "load_mask_generator", lambda *a, **k: pytest.fail("a network was loaded"))
    with pytest.raises(FileExistsError):
        G.mask_from_anatomy_sizes({"liver": 0.6}, out, None, str(mask_generator))
    assert out.read_bytes() == b"keep me"
