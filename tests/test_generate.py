"""Generation end to end on the tiny preset, model folders, refusals before work, the CLI.

The released-weights path (`test_released_files_generate_through_the_same_path`) builds the
maisi-v2 networks with random weights and writes them in the released layout (~1 GB): slow.
"""

import dataclasses
import errno
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from maisi2 import autoencoder, cli, label_tables, models, nets, quality, volume_io
from maisi2 import generate as G
from maisi2.config import get_config
from maisi2.data import center_pad_or_crop
from maisi2.labels import BODY, label_id
from maisi2.phantom import parse_tumor_specs

TINY_FOV = {"fov_mm": {"min": [128.0, 128.0, 128.0], "max": [320.0, 320.0, 320.0]}}


def _waken(net):
    """Fresh networks have zeroed output convolutions; give them weights so outputs depend on inputs."""
    with torch.no_grad():
        for p in net.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return net


@pytest.fixture(scope="module")
def tiny_nets():
    cfg = get_config("tiny")
    torch.manual_seed(0)
    return cfg, nets.build_vae(cfg), _waken(nets.build_unet(cfg)), _waken(nets.build_controlnet(cfg))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_nets):
    cfg, vae, unet, controlnet = tiny_nets
    return models.save_model_folder(tmp_path_factory.mktemp("model"), cfg, vae, unet, controlnet, 0.8, TINY_FOV)


def _stored_las(volume: volume_io.Volume, path):
    """Write a label map with the x axis stored flipped (LAS), so orientation handling is exercised."""
    flipped = np.ascontiguousarray(volume.array[::-1])
    affine = volume.affine.copy()
    affine[:3, 3] += affine[:3, 0] * (volume.shape[0] - 1)
    affine[:3, 0] *= -1
    volume_io.save_label_map(path, volume_io.Volume(flipped, affine))
    return path


@pytest.fixture(scope="module")
def mask_file(tmp_path_factory):
    """A phantom with a liver tumour, 30x27x26 voxels of 8 mm (not a multiple of 32: padded)."""
    volume = G.phantom_mask((30, 27, 26), (8.0, 8.0, 8.0), parse_tumor_specs(["hepatic"]), seed=0)
    return _stored_las(volume, tmp_path_factory.mktemp("mask") / "mask.nii.gz")


@pytest.fixture(scope="module")
def small_mask_file(tmp_path_factory):
    """32^3 voxels of 8 mm: the cheapest mask the tiny model accepts (latent 8^3)."""
    path = tmp_path_factory.mktemp("small") / "small.nii.gz"
    volume_io.save_label_map(path, G.phantom_mask((32, 32, 32), (8.0, 8.0, 8.0), seed=1))
    return path


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, mask_file, model_dir):
    out = tmp_path_factory.mktemp("run") / "ct.nii.gz"
    return G.generate(mask_file, out, model=model_dir, options=G.GenerateOptions(steps=2, seed=1))


@pytest.fixture
def nothing_runs(monkeypatch):
    """Fail loudly if weights are loaded or sampling starts (refusals must come before that)."""
    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the request was refused")

    monkeypatch.setattr(models, "load_model", forbidden)
    monkeypatch.setattr("maisi2.sampling.sample_latent", forbidden)


@pytest.fixture
def run_cli(monkeypatch):
    """`maisi2 ...` with only this module's commands registered (other commands are not under test)."""
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["maisi2.cli.generate_cmd"])
    return cli.main


# -- end to end ---------------------------------------------------------------------------------

def test_outputs_match_the_mask_geometry_and_conventions(first_run, mask_file):
    paths = first_run.paths
    stored_mask = nib.load(mask_file)
    ct_image = nib.load(paths.ct)
    assert ct_image.shape == stored_mask.shape == (30, 27, 26)  # the padding to 32^3 was undone
    np.testing.assert_allclose(ct_image.affine, stored_mask.affine)  # same grid and stored orientation
    assert ct_image.get_data_dtype() == np.int16
    ct = np.asarray(ct_image.dataobj)
    mask = np.asarray(stored_mask.dataobj)
    assert ct.min() >= -1000 and ct.max() <= 1000
    assert np.all(ct[mask == 0] == -1000)  # air outside the body
    assert np.ptp(ct[mask > 0]) > 0  # something was generated inside
    np.testing.assert_array_equal(np.asarray(nib.load(paths.label).dataobj), mask)  # MAISI ids, not renumbered
    # names and colours for the viewers beside the label map (formats checked in test_label_tables)
    assert paths.slicer_colour_table.read_text() == label_tables.slicer_colour_table()
    assert paths.itksnap_labels.read_text() == label_tables.itksnap_label_description()
    assert label_tables.table_paths(paths.label) == (paths.slicer_colour_table, paths.itksnap_labels)


def test_dicom_output_holds_the_same_ct(first_run, mask_file, model_dir, tmp_path, run_cli):
    """--out-format dicom, same mask, model, seed and steps as first_run: a DICOM series that reads
    back (maisi2's reader and pydicom) with the NIfTI CT's voxels and geometry."""
    import pydicom

    argv = ["generate", "--mask", str(mask_file), "--model", str(model_dir), "--steps", "2", "--seed", "1",
            "--out", str(tmp_path / "ct.nii.gz"), "--out-format", "dicom", "--no-progress"]
    assert run_cli(argv) == 0
    series, nifti = volume_io.load_ct(tmp_path / "ct"), volume_io.load_ct(first_run.paths.ct)
    np.testing.assert_array_equal(series.array, nifti.array)
    np.testing.assert_allclose(series.affine, nifti.affine, atol=1e-4)
    first = pydicom.dcmread(tmp_path / "ct" / "CT_0001.dcm")
    lps_origin = np.diag([-1, -1, 1]) @ (nifti.affine @ [nifti.shape[0] - 1, nifti.shape[1] - 1, 0, 1])[:3]
    np.testing.assert_allclose([float(v) for v in first.ImagePositionPatient], lps_origin, atol=1e-3)
    assert [float(v) for v in first.PixelSpacing] == [8.0, 8.0] and float(first.SliceThickness) == 8.0
    np.testing.assert_array_equal(first.pixel_array, series.array[::-1, ::-1, 0].T)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ct", "ct_label.ctbl", "ct_label.itksnap.txt", "ct_label.nii.gz", "ct_preview.png", "ct_report.json"]
    # a rerun replaces the series only when asked, and never a folder holding anything else
    assert run_cli(argv) == 1
    assert run_cli(argv + ["--overwrite"]) == 0
    (tmp_path / "ct" / "notes.txt").write_text("mine")
    assert run_cli(argv + ["--overwrite"]) == 1
    assert (tmp_path / "ct" / "notes.txt").exists()


def test_report_and_preview(first_run):
    report = json.loads(first_run.paths.report.read_text())
    assert report["seed"] == 1 and report["settings"]["steps"] == 2 and len(report["attempts"]) == 1
    assert report["mask"]["padded_shape"] == [32, 32, 32] and report["mask"]["shape"] == [30, 27, 26]
    assert set(report["quality"]["organs"]) == {"liver", "spleen", "pancreas", "kidney", "lung", "bone", "brain"}
    assert report["timings_s"]["total"] > 0 and report["attempts"][0]["timings_s"]["sampling"] > 0
    assert report["memory"]["decode"]["tiles"] >= 1 and report["model"]["preset"] == "tiny"
    assert report["guidance"]["applied"] is False
    preview = Image.open(first_run.paths.preview)
    assert preview.format == "PNG" and preview.width > 2 * 256 and preview.height > 256  # three panels, a legend below
    pixels = np.asarray(preview.convert("RGB")).astype(int)
    assert (np.ptp(pixels, axis=2) > 60).sum() > 100  # coloured contour pixels were drawn
    # the mask has a hepatic tumour: the slices pass through it (tested in detail in test_preview)
    centre = report["preview"]["centre_voxel"]
    assert report["preview"]["centred_on"] == "centred on the largest tumour (hepatic tumor)"
    assert volume_io.load_label_map(first_run.paths.label).array[tuple(centre)] == label_id("hepatic tumor")
    assert report["preview"]["window_hu"] == [-500.0, 500.0]


def test_deterministic_for_a_seed_and_different_for_another(first_run, mask_file, model_dir, tmp_path):
    options = G.GenerateOptions(steps=2, seed=1, write_preview=False, write_label=False)
    again = G.generate(mask_file, tmp_path / "again.nii.gz", model=model_dir, options=options)
    other = G.generate(mask_file, tmp_path / "other.nii.gz", model=model_dir,
                       options=G.GenerateOptions(steps=2, seed=2, write_preview=False))
    first = np.asarray(nib.load(first_run.paths.ct).dataobj)
    np.testing.assert_array_equal(np.asarray(nib.load(again.paths.ct).dataobj), first)
    different = np.asarray(nib.load(other.paths.ct).dataobj)
    body = np.asarray(nib.load(first_run.paths.label).dataobj) > 0
    assert np.abs(different[body].astype(int) - first[body]).mean() > 5
    assert not (tmp_path / "again_label.nii.gz").exists() and not (tmp_path / "again_preview.png").exists()


def test_spacing_resamples_the_mask_and_guidance_runs(mask_file, model_dir, tmp_path):
    result = G.generate(mask_file, tmp_path / "ct.nii.gz", model=model_dir,
                        options=G.GenerateOptions(steps=2, seed=0, spacing=(10.0, 10.0, 10.0), cfg_scale=2.0))
    ct = nib.load(result.paths.ct)
    assert ct.shape == (24, 22, 21)  # 30x27x26 voxels of 8 mm -> 10 mm, same extent
    np.testing.assert_allclose(np.linalg.norm(ct.affine[:3, :3], axis=0), 10.0)
    labels = nib.load(result.paths.label)
    assert labels.shape == ct.shape and np.allclose(labels.affine, ct.affine)
    assert label_id("hepatic tumor") in np.unique(np.asarray(labels.dataobj))  # nearest neighbour keeps ids
    assert result.report["guidance"] == {**result.report["guidance"], "scale": 2.0, "applied": True}


def test_a_tight_memory_budget_tiles_the_decoder_without_changing_the_ct(model_dir, tmp_path, monkeypatch):
    """The decode plan follows --max-memory; with volume statistics the CT stays the same."""
    from maisi2 import autoencoder

    # At this size a streamed whole-volume decode needs less than any tile; test the tiles.
    monkeypatch.setattr(autoencoder.decoding, "streamable", lambda cfg: False)
    mask = G.phantom_mask((72, 32, 32), (4.0, 8.0, 8.0), seed=2)  # padded to 96x32x32: latent 24x8x8
    options = G.GenerateOptions(steps=1, seed=3, write_preview=False, write_label=False)
    roomy = G.generate(mask, tmp_path / "roomy.nii.gz", model=model_dir, options=options)
    memory = roomy.report["memory"]
    assert memory["decode"]["tiles"] == 1
    tight_gb = (memory["weights_while_decoding_bytes"] + memory["host_bytes"]
                + autoencoder.estimate_decode_bytes(get_config("tiny").vae, (21, 8, 8))) / 2**30
    tight = G.generate(mask, tmp_path / "tight.nii.gz", model=model_dir,
                       options=G.GenerateOptions(steps=1, seed=3, write_preview=False, write_label=False,
                                                 max_memory_gb=tight_gb))
    assert tight.report["memory"]["decode"]["tiles"] == 2
    a = np.asarray(nib.load(roomy.paths.ct).dataobj).astype(int)
    b = np.asarray(nib.load(tight.paths.ct).dataobj).astype(int)
    assert np.abs(a - b).max() <= 1  # float rounding may flip an int16 rounding


def test_spill_dir_reaches_the_decode_plan_and_a_spilled_decode_keeps_the_ct(model_dir, tmp_path, monkeypatch):
    """--spill-dir is handed to the decode plan, and a decode whose layer tensors live in files (the
    plan for volumes too large for memory; forced here, at a size where memory would do) gives the
    CT of the in-memory decode."""
    import dataclasses

    from maisi2 import autoencoder

    mask = G.phantom_mask((72, 32, 32), (4.0, 8.0, 8.0), seed=2)
    options = G.GenerateOptions(steps=1, seed=3, write_preview=False, write_label=False)
    roomy = G.generate(mask, tmp_path / "roomy.nii.gz", model=model_dir, options=options)
    seen, real_plan = [], autoencoder.plan_tiles

    def spilling_plan(*args, spill_dir=None, **kwargs):
        seen.append(spill_dir)
        return dataclasses.replace(real_plan(*args, spill_dir=spill_dir, **kwargs), storage="float16", spill_dir=spill_dir)

    monkeypatch.setattr(autoencoder, "plan_tiles", spilling_plan)
    spill = tmp_path / "spill"
    spill.mkdir()
    spilled = G.generate(mask, tmp_path / "spilled.nii.gz", model=model_dir,
                         options=dataclasses.replace(options, spill_dir=str(spill)))
    assert seen == [str(spill)]
    plan = spilled.report["memory"]["decode"]
    assert plan["tiles"] == 1 and plan["spilled"] and plan["storage"] == "float16"
    a = np.asarray(nib.load(roomy.paths.ct).dataobj).astype(int)
    b = np.asarray(nib.load(spilled.paths.ct).dataobj).astype(int)
    # float16 storage: STREAM_FLOAT16_TOLERANCE is 2e-3 of the largest raw decoder output, which
    # random weights push past [0, 1] (measured here: 6 HU max); tiles with per-tile statistics are off by 100+.
    assert np.abs(a - b).max() <= 12 and np.abs(a - b).mean() < 1
    assert not any(spill.iterdir())  # the files are deleted as they are made


# -- mask preparation --------------------------------------------------------------------------

def test_padding_is_centred_and_undone_by_the_crop():
    cfg = get_config("tiny")
    assert G.network_divisor(cfg) == 32  # VAE 4x, UNet 3 downsamplings
    volume = volume_io.Volume(np.random.default_rng(0).choice([1, 3, 4, 5], (33, 20, 64)).astype(np.int16), volume_io.ras_affine((6, 6, 6)))
    prepared = G.prepare_mask(volume, cfg)
    assert prepared.padded.shape == (64, 32, 64)
    assert prepared.padded[:15].max() == 0 and prepared.padded[:, :6].max() == 0  # background around it
    np.testing.assert_array_equal(center_pad_or_crop(prepared.padded, volume.shape, 0), volume.array)


def test_body_envelope_is_added_inside_the_labels_hull_only():
    labels = np.zeros((32, 32, 8), dtype=np.int16)
    labels[6:12, 8:24, :] = label_id("liver")
    labels[20:26, 8:24, :] = label_id("spleen")
    prepared = G.prepare_mask(volume_io.Volume(labels, volume_io.ras_affine((2, 2, 2))), get_config("tiny"))
    out = prepared.volume.array
    assert prepared.body_voxels_added > 0
    assert np.all(out[14:18, 12:20] == BODY)  # the gap between the organs is inside the body
    assert np.all(out[labels > 0] == labels[labels > 0])  # organs untouched
    assert out[0, 0, 0] == 0 and out[31, 31, 0] == 0  # far corners stay outside


# -- refusals before any work ------------------------------------------------------------------

def _unknown_ids(path):
    labels = np.full((32, 32, 32), BODY, dtype=np.int16)
    labels[10:20, 10:20, 10:20] = 150  # not a MAISI id
    nib.save(nib.Nifti1Image(labels, volume_io.ras_affine((8, 8, 8))), path)
    return path, {}, "not MAISI ids"


def _empty(path):
    volume_io.save_label_map(path, volume_io.Volume(np.zeros((32, 32, 32), dtype=np.int16), volume_io.ras_affine((8, 8, 8))))
    return path, {}, "holds no labels"


def _over_budget(path):
    volume_io.save_label_map(path, G.phantom_mask((32, 32, 32), (8.0, 8.0, 8.0), seed=1))
    return path, {"max_memory_gb": 0.02}, "GB"


def _fov_too_small(path):
    volume_io.save_label_map(path, G.phantom_mask((32, 32, 32), (1.5, 1.5, 1.5), seed=1))  # 48 mm vs >= 128 mm
    return path, {}, "field of view"


def _bad_spacing(path):
    volume_io.save_label_map(path, G.phantom_mask((32, 32, 32), (8.0, 8.0, 8.0), seed=1))
    return path, {"spacing": (8.0, -1.0, 8.0)}, "spacing"


def _missing_spill_dir(path):
    volume_io.save_label_map(path, G.phantom_mask((32, 32, 32), (8.0, 8.0, 8.0), seed=1))
    return path, {"spill_dir": str(path.parent / "nowhere")}, "spill_dir"


@pytest.mark.parametrize("make", [_unknown_ids, _empty, _over_budget, _fov_too_small, _bad_spacing, _missing_spill_dir])
def test_bad_requests_fail_before_any_work(make, model_dir, tmp_path, nothing_runs):
    mask, options, message = make(tmp_path / "mask.nii.gz")
    out_dir = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        G.generate(mask, out_dir / "ct.nii.gz", model=model_dir, options=G.GenerateOptions(steps=2, **options))
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_existing_outputs_are_kept_unless_overwrite(small_mask_file, model_dir, tmp_path, monkeypatch):
    (tmp_path / "ct_report.json").write_text("keep me")
    with monkeypatch.context() as patch:
        patch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded weights for a refused request"))
        with pytest.raises(FileExistsError, match="overwrite"):
            G.generate(small_mask_file, tmp_path / "ct.nii.gz", model=model_dir, options=G.GenerateOptions(steps=1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct_report.json"]
    G.generate(small_mask_file, tmp_path / "ct.nii.gz", model=model_dir,
               options=G.GenerateOptions(steps=1, overwrite=True))
    assert json.loads((tmp_path / "ct_report.json").read_text())["settings"]["overwrite"] is True


def test_a_failure_while_writing_leaves_no_partial_set(small_mask_file, model_dir, tmp_path, monkeypatch):
    def broken_preview(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(G, "render_preview", broken_preview)
    with pytest.raises(RuntimeError, match="disk full"):
        G.generate(small_mask_file, tmp_path / "ct.nii.gz", model=model_dir, options=G.GenerateOptions(steps=1))
    assert list(tmp_path.iterdir()) == []  # neither outputs nor staged temporary files


def test_progress_reports_each_step_and_phase_and_raising_from_it_writes_nothing(small_mask_file, model_dir, tmp_path):
    events = []
    options = G.GenerateOptions(steps=3, seed=0, qc_retries=1)
    result = G.generate(small_mask_file, tmp_path / "ct.nii.gz", model=model_dir, options=options,
                        on_progress=events.append)
    attempts = len(result.report["attempts"])
    # the decoder's own progress: a streamed decode, in thousandths of its work, up to 1000 of 1000
    decoding = [e for e in events if "done" in e and e["phase"] == "decoding"]
    assert decoding and all(e["total"] == 1000 and "tiles" not in e for e in decoding)
    assert decoding[0]["attempt"] == 1 and [e["done"] for e in decoding][-1] == 1000
    # loading: the weights read, then each of the three networks built (a cancel point after each)
    loading = [e for e in events if "done" in e and e["phase"] == "loading"]
    assert loading == [{"phase": "loading", "done": i, "total": 4} for i in (1, 2, 3, 4)]
    assert events.index(loading[0]) == 1 and events.index(loading[-1]) == 4
    phases = [e for e in events if "done" not in e]
    one = [{"phase": "sampling", "attempt": 1, "step": i, "steps": 3} for i in (0, 1, 2, 3)]
    assert phases[:7] == [{"phase": "loading"}] + one + [{"phase": "decoding", "attempt": 1},
                                                         {"phase": "checking", "attempt": 1}]
    retries = [e for e in phases if e["phase"] == "retrying"]
    assert len(retries) == attempts - 1
    assert len(phases) == 6 * attempts + 2 + len(retries) and events[-1] == {"phase": "writing"}

    class Stop(Exception):
        pass

    def stop_at_step_two(event):
        if event.get("step") == 2:
            raise Stop
    with pytest.raises(Stop):
        G.generate(small_mask_file, tmp_path / "stopped.nii.gz", model=model_dir, options=options,
                   on_progress=stop_at_step_two)
    assert sorted(p.name for p in tmp_path.iterdir() if "stopped" in p.name) == []


def test_missing_bundled_model_says_how_to_pass_one(tmp_path, monkeypatch, small_mask_file):
    monkeypatch.setattr(models, "default_model_dir", lambda: tmp_path / "default")
    with pytest.raises(FileNotFoundError, match="--model"):
        G.generate(small_mask_file, tmp_path / "ct.nii.gz")


# -- quality check and retries ------------------------------------------------------------------

def test_qc_retries_use_the_next_seeds_and_record_every_attempt(small_mask_file, model_dir, tmp_path, monkeypatch):
    impossible = {organ: (5000.0, 6000.0) for organ in quality.hu_ranges()}
    monkeypatch.setattr(quality, "hu_ranges", lambda: impossible)
    result = G.generate(small_mask_file, tmp_path / "ct.nii.gz", model=model_dir,
                        options=G.GenerateOptions(steps=1, seed=7, qc_retries=2, write_preview=False))
    report = json.loads(result.paths.report.read_text())
    assert [a["seed"] for a in report["attempts"]] == [7, 8, 9]
    assert not result.passed_qc and report["quality"]["passed"] is False
    assert report["seed"] == report["attempts"][report["chosen_attempt"]]["seed"]

    # Each retry read the UNet and ControlNet again (generate lets them go before decoding).
    assert "reload_networks" not in report["attempts"][0]["timings_s"]
    assert all(a["timings_s"]["reload_networks"] > 0 for a in report["attempts"][1:])

    monkeypatch.setattr(quality, "hu_ranges", lambda: {organ: (-2000.0, 2000.0) for organ in impossible})
    events = []
    result = G.generate(small_mask_file, tmp_path / "ok.nii.gz", model=model_dir, on_progress=events.append,
                        options=G.GenerateOptions(steps=1, seed=7, qc_retries=2, write_preview=False))
    assert result.passed_qc and len(result.report["attempts"]) == 1
    assert not [e for e in events if e["phase"] == "retrying"]  # nothing to retry


def test_a_retry_says_which_organs_failed_and_which_seed_comes_next(small_mask_file, model_dir, tmp_path,
                                                                     monkeypatch, capsys):
    def liver_and_spleen_fail(hu, labels):
        return quality.QualityReport([quality.OrganCheck(organ, quality.FAIL, 1, 0.0, 1.0, 2.0)
                                      for organ in ("liver", "spleen")])

    monkeypatch.setattr(quality, "quality_check", liver_and_spleen_fail)
    events = []
    G.generate(small_mask_file, tmp_path / "ct.nii.gz", model=model_dir, on_progress=events.append,
               options=G.GenerateOptions(steps=1, seed=7, qc_retries=2, write_preview=False, progress=True))
    retries = [e for e in events if e["phase"] == "retrying"]
    assert [(e["attempt"], e["seed"], e["failed"]) for e in retries] == [(2, 8, ["liver", "spleen"]),
                                                                         (3, 9, ["liver", "spleen"])]
    assert retries[0]["message"] == "quality check failed on liver, spleen (seed 7): retry 1 of 2 with seed 8"
    # each retry comes after its attempt's check and before the next attempt's first step
    checks = [i for i, e in enumerate(events) if e["phase"] == "checking"]
    starts = [i for i, e in enumerate(events) if e.get("step") == 0]  # each attempt's loop starting
    assert [events.index(e) for e in retries] == [i + 1 for i in checks[:2]] == [i - 1 for i in starts[1:]]
    assert retries[1]["message"] in capsys.readouterr().err  # --progress: on the terminal too


def test_a_tiled_decode_reports_its_tiles(small_mask_file, model_dir, tmp_path, monkeypatch, capsys):
    """A plan of 2 tiles (forced: the tiny latent fits whole): each tile decode is an event, and
    the CT is the one the same plan gives without anyone watching."""
    from maisi2.autoencoder import tiles

    real_plan = autoencoder.plan_tiles

    def two_tiles(latent, cfg, budget, **kwargs):
        whole = real_plan(latent, cfg, budget, **kwargs)
        starts = (tiles.axis_starts(latent[0], 6, 4), (0,), (0,))
        return dataclasses.replace(whole, tile=(6, *latent[1:]), starts=starts, halo=1, ramp=2)

    monkeypatch.setattr(G.autoencoder, "plan_tiles", two_tiles)
    options = G.GenerateOptions(steps=1, seed=3, write_preview=False, progress=True)
    events = []
    watched = G.generate(small_mask_file, tmp_path / "watched.nii.gz", model=model_dir, options=options,
                         on_progress=events.append)
    assert "decode" in capsys.readouterr().err  # the terminal bar
    decoding = [e for e in events if "done" in e and e["phase"] == "decoding"]
    norms = sum(isinstance(m, torch.nn.GroupNorm) for m in models.load_model(model_dir).vae.decoder.modules())
    total = (norms + 1) * 2  # a statistics pass per group norm, then the blend, each over both tiles
    assert decoding == [{"phase": "decoding", "attempt": 1, "done": i, "total": total, "tiles": 2}
                        for i in range(1, total + 1)]
    unwatched = G.generate(small_mask_file, tmp_path / "unwatched.nii.gz", model=model_dir,
                           options=dataclasses.replace(options, progress=False))
    assert watched.report["memory"]["decode"]["tiles"] == 2
    np.testing.assert_array_equal(np.asarray(nib.load(watched.paths.ct).dataobj),
                                  np.asarray(nib.load(unwatched.paths.ct).dataobj))


# -- memory: which networks are held while decoding ---------------------------------------------

@pytest.fixture
def decode_sees(monkeypatch):
    """Record, for every decode, whether the UNet and ControlNet were still loaded."""
    seen = []
    real = G._decode_to_hu

    def spy(latent, prepared, models, *args, **kwargs):
        seen.append(models.has_diffusion)
        return real(latent, prepared, models, *args, **kwargs)

    monkeypatch.setattr(G, "_decode_to_hu", spy)
    return seen


def test_generate_lets_go_of_the_diffusion_networks_before_decoding(small_mask_file, model_dir, tmp_path,
                                                                    decode_sees):
    result = G.generate(small_mask_file, tmp_path / "ct.nii.gz", model=model_dir,
                        options=G.GenerateOptions(steps=1, write_preview=False))
    assert decode_sees == [False]
    memory = result.report["memory"]
    vae_bytes = sum(p.numel() * 4 for p in models.load_model(model_dir).vae.parameters())
    assert memory["weights_while_decoding_bytes"] == vae_bytes < memory["weights_bytes"]


def test_networks_the_caller_passes_or_a_batch_shares_stay_loaded(small_mask_file, model_dir, tmp_path,
                                                                  decode_sees):
    loaded = models.load_model(model_dir)
    options = G.GenerateOptions(steps=1, write_preview=False)
    result = G.generate(small_mask_file, tmp_path / "ct.nii.gz", model=loaded, options=options)
    assert loaded.has_diffusion and decode_sees == [True]
    assert result.report["memory"]["weights_while_decoding_bytes"] == result.report["memory"]["weights_bytes"]
    items = [G.BatchItem(small_mask_file, tmp_path / f"b{i}.nii.gz", None, None) for i in range(2)]
    G.generate_batch(items, model=model_dir, options=options)
    assert decode_sees == [True, True, True]


def test_load_model_builds_only_the_kinds_asked_for(model_dir):
    partial = models.load_model(model_dir, kinds=("unet", "controlnet"))
    assert partial.vae is None and partial.unet is not None and partial.controlnet is not None
    assert partial.device == torch.device("cpu") and partial.scale_factor == pytest.approx(0.8)
    with pytest.raises(ValueError, match="unknown network kinds"):
        models.load_model(model_dir, kinds=("unet", "decoder"))
    full = models.load_model(model_dir)
    full.release_diffusion()
    assert not full.has_diffusion and full.weight_bytes() == full.weight_bytes(("vae",))
    assert full.restore_diffusion() > 0 and full.has_diffusion
    reference = models.load_model(model_dir).unet.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in full.unet.state_dict().items())


def test_a_retry_with_reloaded_networks_gives_what_its_seed_gives_first_time(small_mask_file, model_dir,
                                                                              tmp_path, monkeypatch):
    calls = []

    def third_time_lucky(hu, labels):
        calls.append(1)
        failing = [] if len(calls) == 3 else [quality.OrganCheck("liver", quality.FAIL, 1, 0.0, 1.0, 2.0)]
        return quality.QualityReport(failing)

    monkeypatch.setattr(quality, "quality_check", third_time_lucky)
    retried = G.generate(small_mask_file, tmp_path / "retried.nii.gz", model=model_dir,
                         options=G.GenerateOptions(steps=1, seed=7, qc_retries=2, write_preview=False))
    assert retried.report["seed"] == 9 and retried.report["chosen_attempt"] == 2
    direct = G.generate(small_mask_file, tmp_path / "direct.nii.gz", model=model_dir,
                        options=G.GenerateOptions(steps=1, seed=9, write_preview=False))
    np.testing.assert_array_equal(np.asarray(nib.load(direct.paths.ct).dataobj),
                                  np.asarray(nib.load(retried.paths.ct).dataobj))


# -- model folders -----------------------------------------------------------------------------

def test_pt_and_safetensors_folders_load_the_same_networks(tiny_nets, model_dir, tmp_path):
    cfg, vae, unet, controlnet = tiny_nets
    st_dir = models.save_model_folder(tmp_path / "st", cfg, vae, unet, controlnet, 0.8, TINY_FOV, layout="safetensors")
    from_pt, from_st = models.load_model(model_dir), models.load_model(st_dir)
    assert from_pt.info.layout == "pt" and from_st.info.layout == "safetensors"
    assert from_pt.scale_factor == from_st.scale_factor == pytest.approx(0.8)
    assert from_st.metadata == TINY_FOV and from_st.cfg == cfg
    for kind in ("vae", "unet", "controlnet"):
        a, b = getattr(from_pt, kind).state_dict(), getattr(from_st, kind).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert not getattr(from_st, kind).training


def test_model_folder_errors_are_explained(tiny_nets, tmp_path):
    cfg, vae, unet, controlnet = tiny_nets
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        models.read_model_info(tmp_path)
    folder = models.save_model_folder(tmp_path / "m", cfg, vae, unet, controlnet, 1.0)
    with pytest.raises(FileExistsError):
        models.save_model_folder(folder, cfg, vae, unet, controlnet, 1.0)
    spec = json.loads((folder / "model.json").read_text())
    spec.pop("config")
    spec["preset"] = "small"  # the weights are tiny-sized
    (folder / "model.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="fit the preset\\(s\\) tiny"):
        models.load_model(folder)
    (folder / "controlnet.pt").unlink()
    with pytest.raises(ValueError, match="no ControlNet"):
        G.generate(G.phantom_mask((32, 32, 32), (8.0, 8.0, 8.0)), tmp_path / "ct.nii.gz", model=folder)
    (folder / "unet.pt").unlink()
    with pytest.raises(FileNotFoundError, match="not its weights"):
        models.read_model_info(folder)


@pytest.fixture(scope="module")
def released_dir(tmp_path_factory):
    """maisi-v2 networks with random weights, written once in the released file layout (~1 GB)."""
    from maisi2 import checkpoint

    cfg = get_config("maisi-v2")
    folder = tmp_path_factory.mktemp("released")
    torch.manual_seed(0)
    vae = nets.build_vae(cfg)
    unet, controlnet = _waken(nets.build_unet(cfg)), _waken(nets.build_controlnet(cfg))
    return checkpoint.write_released(folder, vae, unet, controlnet, scale_factor=0.9)


@pytest.mark.slow
def test_released_files_generate_through_the_same_path(released_dir, tmp_path):
    """The released layout loads strictly into the maisi-v2 preset; a 64^3 CT at 3 x 3 x 4 mm (the
    coarsest in-plane spacing the release supports), 2 steps."""
    info = models.read_model_info(released_dir)
    assert info.layout == "released" and info.cfg.preset == "maisi-v2" and info.fov_range_mm is not None
    mask = G.phantom_mask((64, 64, 64), (3.0, 3.0, 4.0), seed=0)
    result = G.generate(mask, tmp_path / "ct.nii.gz", model=released_dir,
                        options=G.GenerateOptions(steps=2, seed=0, write_preview=False))
    ct = nib.load(result.paths.ct)
    assert ct.shape == (64, 64, 64) and ct.get_data_dtype() == np.int16
    assert result.report["model"]["layout"] == "released"
    assert result.report["model"]["scale_factor"] == pytest.approx(0.9)


# -- command line ------------------------------------------------------------------------------

def test_generate_command_from_a_phantom(run_cli, model_dir, tmp_path, capsys):
    out = tmp_path / "ct.nii.gz"
    argv = ["generate", "--phantom", "--shape", "32", "32", "32", "--phantom-spacing", "8", "8", "8",
            "--tumors", "hepatic", "--model", str(model_dir), "--out", str(out), "--steps", "1", "--no-progress"]
    assert run_cli(argv) == 0  # written, even though the untrained model fails the quality check
    assert out.exists() and (tmp_path / "ct_preview.png").exists()
    assert "wrote" in capsys.readouterr().out
    assert run_cli(argv) == 1  # outputs exist: refused without --overwrite
    assert "already exists" in capsys.readouterr().err
    labels = np.asarray(nib.load(tmp_path / "ct_label.nii.gz").dataobj)
    assert label_id("hepatic tumor") in labels
    assert run_cli(["qc", str(out), "--mask", str(tmp_path / "ct_label.nii.gz")]) in (0, 1)


def test_generate_command_over_a_folder_of_masks(run_cli, model_dir, small_mask_file, tmp_path, capsys):
    masks = tmp_path / "masks"
    masks.mkdir()
    for name in ("a.nii.gz", "b.nii.gz"):
        (masks / name).write_bytes(small_mask_file.read_bytes())
    (tmp_path / "list.jsonl").write_text(json.dumps({"mask": "masks/a.nii.gz", "seed": 5, "out": "first.nii.gz"}) + "\n")
    code = run_cli(["generate", "--mask-dir", str(masks), "--out-dir", str(tmp_path / "cts"), "--model", str(model_dir),
                    "--steps", "1", "--no-preview", "--no-progress"])
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "cts").iterdir()) == sorted(
        f"{n}_ct{end}" for n in "ab"
        for end in (".nii.gz", "_label.nii.gz", "_label.ctbl", "_label.itksnap.txt", "_report.json"))
    seeds = [json.loads((tmp_path / "cts" / f"{n}_ct_report.json").read_text())["seed"] for n in "ab"]
    assert seeds == [0, 1]  # distinct seeds per item
    assert run_cli(["generate", "--datalist", str(tmp_path / "list.jsonl"), "--out-dir", str(tmp_path / "dl"),
                    "--model", str(model_dir), "--steps", "1", "--no-preview", "--no-progress"]) == 0
    assert json.loads((tmp_path / "dl" / "first_report.json").read_text())["seed"] == 5


def test_batch_with_a_bad_mask_generates_nothing(model_dir, small_mask_file, tmp_path, nothing_runs):
    masks = tmp_path / "masks"
    masks.mkdir()
    (masks / "a.nii.gz").write_bytes(small_mask_file.read_bytes())
    _empty(masks / "b.nii.gz")
    with pytest.raises(ValueError, match="holds no labels"):
        G.generate_batch(G.batch_from_dir(masks, tmp_path / "out"), model=model_dir)
    assert not (tmp_path / "out").exists()


# -- the model's domain --------------------------------------------------------------------------

LIVER = label_id("liver")


@pytest.fixture(scope="module")
def domain_model(tmp_path_factory, tiny_nets, small_mask_file):
    """The tiny networks, said to be trained at 6-8 mm on the small phantom's labels except the liver."""
    cfg, vae, unet, controlnet = tiny_nets
    seen = set(np.unique(np.asarray(nib.load(small_mask_file).dataobj)).tolist()) - {0, LIVER}
    domain = {"spacing_mm": {"min": [6.0] * 3, "max": [8.0] * 3}, "labels_seen": sorted(seen),
              "body_regions": ["phantom"], "sources": {"spacing_mm": "this test"}}
    return models.save_model_folder(tmp_path_factory.mktemp("domain"), cfg, vae, unet, controlnet, 0.8,
                                    {**TINY_FOV, "domain": domain})


@pytest.fixture
def no_voxels_read(monkeypatch, nothing_runs):
    """Refusals from the header: reading or resampling the mask's voxels fails the test."""
    def forbidden(*args, **kwargs):
        raise AssertionError("voxels were read before the request was refused")

    monkeypatch.setattr(volume_io, "load_label_map", forbidden)
    monkeypatch.setattr(volume_io, "resample_to_spacing", forbidden)


def test_a_spacing_outside_the_domain_is_refused_from_the_header_with_the_nearest_request(
        domain_model, small_mask_file, tmp_path, no_voxels_read):
    with pytest.raises(ValueError) as err:
        G.generate(small_mask_file, tmp_path / "ct.nii.gz", model=domain_model,
                   options=G.GenerateOptions(steps=1, spacing=(4.0, 4.0, 9.0)))
    message = str(err.value)
    assert "\n" not in message and "trained on voxels of 6-8 x 6-8 x 6-8 mm" in message
    assert "voxels of 4 x 4 x 9 mm are outside" in message
    assert "Nearest valid request: --spacing 6 6 8" in message and "--fit-to-model" in message and "--force" in message
    assert list(tmp_path.iterdir()) == []


def test_fit_to_model_resamples_and_replaces_labels_the_model_never_saw(domain_model, small_mask_file, tmp_path):
    result = G.generate(small_mask_file, tmp_path / "ct.nii.gz", model=domain_model,
                        options=G.GenerateOptions(steps=1, spacing=(4.0, 4.0, 4.0), fit_to_model=True,
                                                  write_preview=False))
    domain = result.report["domain"]
    assert result.out_of_domain == [] and domain["fitted"] == ["voxels of 4 x 4 x 4 mm resampled to 6 x 6 x 6 mm"]
    assert domain["replaced_labels"][str(LIVER)]["by"] == BODY  # an organ it never saw: generic body
    assert nib.load(result.paths.ct).header.get_zooms() == (6.0, 6.0, 6.0)
    assert LIVER not in np.asarray(nib.load(result.paths.label).dataobj)


def test_force_runs_outside_the_domain_and_the_report_says_why(domain_model, small_mask_file, tmp_path):
    result = G.generate(small_mask_file, tmp_path / "ct.nii.gz", model=domain_model,
                        options=G.GenerateOptions(steps=1, spacing=(10.0, 10.0, 10.0), force=True, write_preview=False))
    reasons = json.loads(result.paths.report.read_text())["domain"]["out_of_domain"]
    assert reasons == result.out_of_domain and len(reasons) == 2
    assert "voxels of 10 x 10 x 10 mm are outside the trained 6-8 x 6-8 x 6-8 mm" in reasons[0]
    assert "labels the model never saw in training: liver (1)" in reasons[1]


def test_labels_the_model_never_saw_are_refused_when_many_and_reported_when_few(domain_model, small_mask_file,
                                                                              tmp_path, nothing_runs, monkeypatch):
    with pytest.raises(ValueError, match=r"of its labelled voxels carry labels the model never saw in training "
                                         r"\(liver \(1\)\).*--fit-to-model"):
        G.generate(small_mask_file, tmp_path / "ct.nii.gz", model=domain_model, options=G.GenerateOptions(steps=1))
    labels = np.asarray(nib.load(small_mask_file).dataobj).copy()
    liver = np.argwhere(labels == LIVER)
    labels[labels == LIVER] = BODY
    labels[tuple(liver[:3].T)] = LIVER  # three voxels: a guess there costs little
    few = tmp_path / "few.nii.gz"
    volume_io.save_label_map(few, volume_io.Volume(labels, nib.load(small_mask_file).affine))
    monkeypatch.undo()
    result = G.generate(few, tmp_path / "ct.nii.gz", model=domain_model,
                        options=G.GenerateOptions(steps=1, write_preview=False))
    assert result.report["domain"]["unseen_labels"] == {str(LIVER): {"name": "liver", "voxels": 3}}
    assert result.out_of_domain == ["3 voxels carry labels the model never saw in training: liver (1)"]


def test_the_released_domain_is_the_release_s_own_limits(tmp_path):
    for name in ("autoencoder_v1.pt", "diff_unet_3d_rflow-ct.pt", "controlnet_3d_rflow-ct.pt"):
        (tmp_path / name).write_bytes(b"")
    domain = models.read_model_info(tmp_path).domain
    assert domain.spacing_mm == ((0.5, 0.5, 0.5), (3.0, 3.0, 5.0)) and domain.max_shape == (512, 512, 768)
    assert domain.labels_seen is None and domain.unseen_labels([1, 200]) == []
    assert domain.grid_problems((512, 512, 128), (0.7, 0.7, 2.5), 2.0) == []
    assert domain.grid_problems((1024, 1024, 128), (0.5, 0.5, 2.5), 2.0) == [
        "1024 x 1024 x 128 voxels exceed the largest trained volume (512 x 512 x 768)"]
    assert domain.nearest_spacing((0.1, 0.1, 8.0)) == (0.5, 0.5, 5.0)


def test_the_bundled_model_knows_its_domain():
    domain = models.read_model_info(None).domain
    assert domain.spacing_mm == ((3.0, 3.0, 3.0), (4.0, 4.0, 4.5))
    assert domain.labels_seen and label_id("liver") in domain.labels_seen and BODY in domain.labels_seen
    assert domain.sources["spacing_mm"] and domain.sources["labels_seen"]
    assert domain.grid_problems((512, 512, 133), (0.7, 0.7, 2.5), 2.0)  # the chest CT of issue 19: refused


# -- sizes planned from the header -------------------------------------------------------------

def _header_only(path, shape, spacing=(1.0, 1.0, 1.0)):
    """A NIfTI header claiming `shape` voxels, followed by none of them (a few hundred bytes)."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.uint8)
    header.set_zooms(spacing)
    header.set_sform(np.diag([*spacing, 1.0]), code=1)
    header["vox_offset"] = 352
    path.write_bytes(header.binaryblock + b"\0" * 4)
    return path


def test_a_huge_header_is_refused_before_any_voxel_is_read(model_dir, tmp_path, no_voxels_read):
    mask = _header_only(tmp_path / "huge.nii", (4096, 4096, 4096), (0.1, 0.1, 0.1))  # a 410 mm cube
    with pytest.raises(ValueError, match=r"reading the 4096 x 4096 x 4096 mask .* needs about \d+\.\d GB, over the"):
        G.generate(mask, tmp_path / "ct.nii.gz", model=model_dir, options=G.GenerateOptions(steps=1))
    with pytest.raises(ValueError, match=r"field of view .* outside the trained"):
        G.generate(_header_only(tmp_path / "wide.nii", (4096, 4096, 4096)), tmp_path / "ct.nii.gz", model=model_dir)


def test_a_fine_spacing_is_refused_before_the_mask_is_resampled(domain_model, small_mask_file, tmp_path,
                                                                no_voxels_read):
    with pytest.raises(ValueError, match="Nearest valid request: --spacing 6 6 6"):
        G.generate(small_mask_file, tmp_path / "ct.nii.gz", model=domain_model,
                   options=G.GenerateOptions(spacing=(0.1, 0.1, 0.1)))
    with pytest.raises(ValueError, match=r"resampling it to 2560 x 2560 x 2560 voxels needs about [\d.]+ GB, over"):
        G.generate(small_mask_file, tmp_path / "ct.nii.gz", model=domain_model,
                   options=G.GenerateOptions(spacing=(0.1, 0.1, 0.1), force=True))


# -- numeric options, non-finite output --------------------------------------------------------

@pytest.mark.parametrize("option, value", [
    ("control_scale", float("nan")), ("control_scale", float("inf")), ("control_scale", -1.0),
    ("cfg_scale", 1e30), ("cfg_scale", float("nan")), ("max_memory_gb", float("inf")), ("max_memory_gb", 0.0),
    ("max_memory_gb", -2.0), ("steps", 0), ("seed", -1), ("qc_retries", -1), ("fov_tolerance", 0.5),
    ("spacing", (float("nan"), 1.0, 1.0)), ("spacing", (0.0, 1.0, 1.0)), ("spacing", (1e9, 1.0, 1.0)),
])
def test_absurd_numbers_are_refused_naming_the_option(option, value, small_mask_file, model_dir, tmp_path,
                                                      no_voxels_read):
    flag = "--" + option.replace("_", "-").replace("max-memory-gb", "max-memory")
    with pytest.raises(ValueError, match=f"^{option} \\({flag}"):
        G.generate(small_mask_file, tmp_path / "ct.nii.gz", model=model_dir,
                   options=G.GenerateOptions(**{option: value}))


def test_the_cli_names_the_option_of_an_absurd_number(run_cli, small_mask_file, model_dir, tmp_path, capsys):
    for argv, flag in ((["--control-scale", "nan"], "--control-scale"), (["--max-memory", "inf"], "--max-memory"),
                       (["--cfg-scale", "1e30"], "--cfg-scale")):
        assert run_cli(["generate", "--mask", str(small_mask_file), "--out", str(tmp_path / "ct.nii.gz"),
                        "--model", str(model_dir), *argv]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and flag in err, err
    with pytest.raises(SystemExit):
        run_cli(["generate", "--mask", str(small_mask_file), "--out", "x.nii.gz", "--spacing", "abc", "1", "1"])
    assert "argument --spacing: invalid float value: 'abc'" in capsys.readouterr().err


def test_nan_from_the_sampler_is_an_error_never_written_as_tissue(small_mask_file, model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("maisi2.sampling.sample_latent", lambda *a, **k: torch.full((1, 4, 8, 8, 8), float("nan")))
    with pytest.raises(ValueError, match=r"the sampled latent holds 2048 NaN/inf values .*nothing was written"):
        G.generate(small_mask_file, tmp_path / "ct.nii.gz", model=model_dir, options=G.GenerateOptions(steps=1))
    assert list(tmp_path.iterdir()) == []


# -- outputs -----------------------------------------------------------------------------------

def test_an_output_that_is_the_mask_is_refused(small_mask_file, model_dir, tmp_path, nothing_runs):
    mask = tmp_path / "case.nii.gz"
    mask.write_bytes(small_mask_file.read_bytes())
    with pytest.raises(ValueError, match="is the input mask"):
        G.generate(mask, mask, model=model_dir, options=G.GenerateOptions(overwrite=True))
    label_twin = tmp_path / "ct_label.nii.gz"  # --out ct.nii.gz writes its label map over this mask
    label_twin.write_bytes(small_mask_file.read_bytes())
    with pytest.raises(ValueError, match="ct_label.nii.gz is the input mask"):
        G.generate(label_twin, tmp_path / "ct.nii.gz", model=model_dir, options=G.GenerateOptions(overwrite=True))
    assert mask.read_bytes() == label_twin.read_bytes() == small_mask_file.read_bytes()


def test_output_problems_are_one_line_before_work(run_cli, small_mask_file, model_dir, tmp_path, capsys,
                                                  monkeypatch, nothing_runs):
    base = ["generate", "--mask", str(small_mask_file), "--model", str(model_dir)]
    assert run_cli([*base, "--out", str(tmp_path), "--overwrite"]) == 1  # a folder
    assert "is a folder; name the output file itself" in capsys.readouterr().err
    monkeypatch.setattr("maisi2.atomic.shutil.disk_usage", lambda path: type("U", (), {"free": 2**20})())
    assert run_cli([*base, "--out", str(tmp_path / "ct.nii.gz")]) == 1  # 1 MiB free: not enough
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "MiB free but the outputs need about" in err


def test_a_full_disk_while_writing_is_one_line_and_leaves_nothing(small_mask_file, model_dir, tmp_path, monkeypatch):
    def full(path, volume, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(volume_io, "save_label_map", full)
    with pytest.raises(OSError, match=r"ct_label.nii.gz failed \(No space left on device\); the disk is full"):
        G.generate(small_mask_file, tmp_path / "ct.nii.gz", model=model_dir,
                   options=G.GenerateOptions(steps=1, write_preview=False))
    assert list(tmp_path.iterdir()) == []


def test_a_set_finished_meanwhile_by_another_run_is_not_replaced(small_mask_file, model_dir, tmp_path, monkeypatch):
    real_preview = G.render_preview

    def other_run_finishes(*args, **kwargs):
        (tmp_path / "ct_report.json").write_text("the other run's")
        return real_preview(*args, **kwargs)

    monkeypatch.setattr(G, "render_preview", other_run_finishes)
    with pytest.raises(FileExistsError, match="appeared while this run was writing"):
        G.generate(small_mask_file, tmp_path / "ct.nii.gz", model=model_dir, options=G.GenerateOptions(steps=1))
    assert _names(tmp_path) == ["ct_report.json"] and (tmp_path / "ct_report.json").read_text() == "the other run's"


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


# -- batches -----------------------------------------------------------------------------------

@pytest.mark.parametrize("row, message", [
    ({"mask": "m.nii.gz", "out": "../x.nii.gz"}, "leads outside --out-dir"),
    ({"mask": "m.nii.gz", "out": "/tmp/x.nii.gz"}, "leads outside --out-dir"),
    ({"mask": "m.nii.gz", "spacing": ["abc", 1, 1]}, "\"spacing\" must be a list of three numbers"),
    ({"mask": "m.nii.gz", "spacing": [1, 1]}, "\"spacing\" must be three finite voxel sizes"),
    ({"mask": "m.nii.gz", "seed": "7"}, "\"seed\" must be a whole number"),
])
def test_datalist_rows_are_checked_and_errors_name_the_line(row, message, tmp_path):
    datalist = tmp_path / "list.jsonl"
    datalist.write_text(json.dumps({"mask": "m.nii.gz"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=f"list.jsonl, line 2: .*{message}"):
        G.batch_from_datalist(datalist, tmp_path / "out")


def test_a_rerun_skips_finished_items_and_a_failure_names_its_line(small_mask_file, model_dir, tmp_path, monkeypatch):
    (tmp_path / "a.nii.gz").write_bytes(small_mask_file.read_bytes())
    (tmp_path / "b.nii.gz").write_bytes(small_mask_file.read_bytes())
    datalist = tmp_path / "list.jsonl"
    datalist.write_text("".join(json.dumps({"mask": f"{n}.nii.gz"}) + "\n" for n in "ab"))
    items = G.batch_from_datalist(datalist, tmp_path / "out")
    options = G.GenerateOptions(steps=1, write_preview=False)
    real = G._generate_prepared

    def second_fails(plan, *args, **kwargs):
        if plan.paths.ct.name.startswith("b"):
            raise ValueError("the sampler diverged")
        return real(plan, *args, **kwargs)

    monkeypatch.setattr(G, "_generate_prepared", second_fails)
    with pytest.raises(ValueError, match=r"list.jsonl, line 2: the sampler diverged"):
        G.generate_batch(items, model=model_dir, options=options)
    assert {p.name[:5] for p in (tmp_path / "out").iterdir()} == {"a_ct.", "a_ct_"}  # item 1's set, whole
    monkeypatch.undo()
    skipped = []
    results = G.generate_batch(items, model=model_dir, options=options, on_skip=skipped.append)
    assert [i.where for i in skipped] == [f"{datalist}, line 1"] and [r.paths.ct.name for r in results] == ["b_ct.nii.gz"]
    assert results[0].report["seed"] == 1  # the seed item 2 had in the first run
