"""ControlNet training end to end on the tiny preset: a latent cache with label maps, a tiny flow
UNet checkpoint, a few steps with and without the contrastive loss, resume, and the CLI."""

import csv
import json
import math

import pytest
import torch

from maisi2 import cli, nets
from maisi2.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from maisi2.config import get_config
from maisi2.labels import label_id
from maisi2.latents import LatentRecord, compute_scale_factor, write_latent, write_stats
from maisi2.losses import PAPER_LAMBDA_SCHEDULE
from maisi2.train_controlnet import (
    ControlNetLossSettings,
    ControlNetRecipe,
    crop_window,
    load_frozen_unet,
    recipe_with_overrides,
    train_controlnet,
)

LIVER, TUMOR = label_id("liver"), label_id("hepatic tumor")
UNET_SCALE = 0.8  # deliberately not the cache's, to see which one the run uses


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A 3-volume latent cache (8^3 latents, 32^3 label maps, two with a tumour) and a tiny UNet
    checkpoint whose weights are non-zero (MONAI zero-initialises the output conv)."""
    root = tmp_path_factory.mktemp("controlnet")
    cache = root / "cache"
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        labels = torch.full((1, 32, 32, 32), LIVER, dtype=torch.uint8)
        labels[0, :2] = 0
        if i < 2:
            labels[0, 8 + 4 * i:16 + 4 * i, 10:18, 12:20] = TUMOR
        record = LatentRecord(file="", spacing=(1.5, 1.5, 2.0), latent_shape=(), source="test")
        write_latent(cache, f"vol{i}", torch.randn(4, 8, 8, 8, generator=g), record, label=labels)
    write_stats(cache, compute_scale_factor(cache))
    cfg = get_config("tiny")
    torch.manual_seed(0)
    unet = nets.build_unet(cfg)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    unet_ckpt = root / "unet.pt"
    save_checkpoint(unet_ckpt, Checkpoint(kind="unet", config=cfg, state_dict=unet.state_dict(), scale_factor=UNET_SCALE))
    return {"root": root, "cache": cache, "unet": unet_ckpt, "unet_state": {k: v.clone() for k, v in unet.state_dict().items()}}


def _recipe(**changes):
    base = dict(steps=4, lr=1e-3, batch_size=2, ckpt_every=0, log_every=1, amp="fp32", ema_decay=0.9, seed=1)
    return ControlNetRecipe.of(**{**base, **changes})


def _rows(out):
    with open(out / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def contrastive_run(workspace):
    """4 steps with the contrastive loss; keeps hold of the frozen UNet the run trained against."""
    import maisi2.train_controlnet as module

    out = workspace["root"] / "with_contrastive"
    frozen = []

    def keep(*args, **kwargs):
        loaded = load_frozen_unet(*args, **kwargs)
        frozen.append(loaded[0])
        return loaded

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(module, "load_frozen_unet", keep)
        result = train_controlnet(workspace["cache"], workspace["unet"], out, _recipe(), device="cpu", progress=False)
    return {"out": out, "result": result, "unet": frozen[0]}


def test_training_with_contrastive_loss(workspace, contrastive_run):
    out, result = contrastive_run["out"], contrastive_run["result"]
    assert result.step == 4 and result.skipped == 0
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt.kind == "controlnet" and ckpt.step == 4
    assert ckpt.scale_factor == pytest.approx(UNET_SCALE)  # the UNet's, not the cache's
    assert ckpt.ema_state_dict is not None
    recipe = ControlNetRecipe.from_dict(json.loads(ckpt.extra["recipe"]))
    assert recipe.loss.lambda_schedule == PAPER_LAMBDA_SCHEDULE
    # it learned: weights moved away from the UNet-initialised start
    start = nets.build_controlnet(ckpt.config)
    unet, _, _ = load_frozen_unet(workspace["unet"])
    nets.controlnet_from_unet(start, unet)
    moved = [k for k, v in ckpt.state_dict.items() if v.is_floating_point() and not torch.equal(v, start.state_dict()[k])]
    assert any(k.startswith("controlnet_down_blocks") for k in moved)
    rows = _rows(out)
    assert [float(r["lambda"]) for r in rows] == [0.01, 0.01, 0.001, 0.001]  # paper schedule over 4 steps
    for r in rows:
        assert float(r["flow_loss"]) > 0
    assert any(float(r["roi_loss"]) < 0 for r in rows) and any(float(r["bg_loss"]) > 0 for r in rows)


def test_the_unet_is_left_untouched(workspace, contrastive_run):
    unet = contrastive_run["unet"]  # the very module the run used
    assert not unet.training and not any(p.requires_grad or p.grad is not None for p in unet.parameters())
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in workspace["unet_state"].items())
    saved = load_checkpoint(workspace["unet"])
    assert all(torch.equal(saved.state_dict[k], v) for k, v in workspace["unet_state"].items())


def test_training_without_contrastive_loss(workspace):
    out = workspace["root"] / "flow_only"
    recipe = _recipe(steps=2, loss=ControlNetLossSettings(contrastive=False))
    result = train_controlnet(workspace["cache"], workspace["unet"], out, recipe, device="cpu", progress=False)
    assert result.step == 2
    rows = _rows(out)
    assert all(float(r["roi_loss"]) == 0 and float(r["bg_loss"]) == 0 and float(r["lambda"]) == 0 for r in rows)
    assert all(float(r["flow_loss"]) == pytest.approx(float(r["loss"])) for r in rows)


@pytest.mark.slow
def test_resume_continues_the_lambda_schedule_exactly(workspace, contrastive_run):
    out = workspace["root"] / "interrupted"

    def crash_at_2(step, batch):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_controlnet(workspace["cache"], workspace["unet"], out, _recipe(ckpt_every=2), device="cpu",
                         progress=False, on_batch=crash_at_2)
    assert load_checkpoint(out / "last.pt").step == 2
    result = train_controlnet(workspace["cache"], workspace["unet"], out, _recipe(ckpt_every=2), device="cpu",
                              progress=False, resume=True)
    assert result.step == 4
    assert [float(r["lambda"]) for r in _rows(out)] == [0.01, 0.01, 0.001, 0.001]
    straight = load_checkpoint(contrastive_run["out"] / "last.pt")
    resumed = load_checkpoint(out / "last.pt")
    assert all(torch.equal(straight.state_dict[k], v) for k, v in resumed.state_dict.items())


def test_recipe_overrides_and_bad_settings():
    recipe = recipe_with_overrides(ControlNetRecipe(), ["loss.placement=encoder", "loss.lambda_schedule=[[0, 0.02]]"])
    assert recipe.loss.placement == "encoder" and recipe.loss.lambda_schedule == ((0.0, 0.02),)
    with pytest.raises(ValueError, match="no such key"):
        recipe_with_overrides(ControlNetRecipe(), ["loss.nope=1"])
    with pytest.raises(ValueError, match="placement"):
        ControlNetLossSettings(placement="middle")
    with pytest.raises(ValueError, match="only exists at"):
        ControlNetLossSettings(placement="encoder", background_form="official")
    with pytest.raises(ValueError, match="start at fraction"):
        ControlNetLossSettings(lambda_schedule=((0.3, 0.01),))


def test_cli_end_to_end(workspace, monkeypatch, capsys):
    # only this command group: the test must not depend on the other command modules
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["maisi2.cli.controlnet_cmd"])
    out = workspace["root"] / "cli"
    argv = ["train-controlnet", str(workspace["cache"]), "--unet", str(workspace["unet"]), "--out", str(out),
            "--steps", "2", "--placement", "encoder", "--lambda-schedule", "0:0.001,0.5:0.01", "--amp", "fp32",
            "--device", "cpu", "--no-progress", "--recipe-set", "log_every=1", "--recipe-set", "batch_size=2"]
    assert cli.main(argv) == 0
    assert str(out / "last.pt") in capsys.readouterr().out
    ckpt = load_checkpoint(out / "last.pt")
    recipe = ControlNetRecipe.from_dict(json.loads(ckpt.extra["recipe"]))
    assert recipe.loss.placement == "encoder" and recipe.loss.lambda_schedule == ((0.0, 0.001), (0.5, 0.01))
    rows = _rows(out)
    assert [float(r["lambda"]) for r in rows] == [0.001, 0.01]
    assert all(float(r["encoder_placement"]) == 1.0 for r in rows)
    # a ControlNet checkpoint is not a UNet: one clear line, exit status 1
    bad = ["train-controlnet", str(workspace["cache"]), "--unet", str(out / "last.pt"), "--out", str(out / "x"),
           "--steps", "1", "--device", "cpu", "--no-progress"]
    assert cli.main(bad) == 1
    assert "holds a controlnet checkpoint" in capsys.readouterr().err
    # an existing run is never overwritten without --resume
    assert cli.main(argv) == 1
    assert "--resume" in capsys.readouterr().err


def test_frozen_unet_from_a_released_style_file(workspace, tmp_path):
    released = tmp_path / "diff_unet_3d_rflow-ct.pt"
    torch.save({"unet_state_dict": workspace["unet_state"], "scale_factor": torch.tensor(0.5)}, released)
    for source in (released, tmp_path):  # the file, or the folder holding it
        unet, cfg, scale = load_frozen_unet(source, preset="tiny")
        assert cfg.preset == "tiny" and scale == 0.5 and not unet.training
        assert all(torch.equal(unet.state_dict()[k], v) for k, v in workspace["unet_state"].items())
    with pytest.raises(ValueError, match="do not match"):
        load_frozen_unet(released, preset="small")  # the weights name the preset they fit


def test_volumes_without_a_label_map_are_skipped(tmp_path):
    import torch

    from maisi2.latents import LatentRecord, write_latent, write_stats, compute_scale_factor
    from maisi2.train_controlnet import _labelled_latents
    from maisi2.training import DistInfo

    for i, labelled in enumerate((True, False, True)):
        label = torch.ones(1, 16, 16, 16, dtype=torch.uint8) if labelled else None
        write_latent(tmp_path, f"v{i}", torch.randn(4, 4, 4, 4),
                     LatentRecord(file="", spacing=(1.0, 1.0, 1.0), latent_shape=(), label="l.nii.gz" if labelled else ""),
                     label=label)
    write_stats(tmp_path, compute_scale_factor(tmp_path))
    dataset = _labelled_latents(tmp_path, 1.0, DistInfo(0, 1, 0))
    assert len(dataset) == 2 and all("label" in dataset[i] for i in range(2))


def _positional_item(shape=(16, 16, 8), factor=4):
    """A latent whose value is its flat voxel index and a label map holding, at every fine voxel,
    the flat index of the latent voxel above it (mod 256 would clash; the shapes keep it < 256*k)."""
    latent = torch.arange(math.prod(shape), dtype=torch.float32).reshape(1, *shape).repeat(4, 1, 1, 1)
    coarse = torch.arange(math.prod(shape), dtype=torch.int64).reshape(shape)
    fine = coarse.repeat_interleave(factor, 0).repeat_interleave(factor, 1).repeat_interleave(factor, 2)
    return {"latent": latent, "spacing": torch.ones(3), "modality": 0, "fine_index": fine[None]}


def test_crop_window_cuts_latent_and_labels_from_the_same_region():
    item = _positional_item()
    labels = torch.full((1, 64, 64, 32), LIVER, dtype=torch.uint8)
    item["label"], item["label_perturbed"] = labels, labels.clone()
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(20):
        cut = crop_window({**item, "label_perturbed": item["fine_index"]}, (8, 8, 8), 4, 0.0, g)
        assert cut["latent"].shape == (4, 8, 8, 8) and cut["label"].shape == (1, 32, 32, 32)
        # every fine voxel of the label window lies under the latent voxel at the same place
        coarse = cut["label_perturbed"][0, ::4, ::4, ::4]
        assert torch.equal(coarse.float(), cut["latent"][0])
        seen.add(int(cut["latent"][0, 0, 0, 0]))
        assert torch.equal(cut["spacing"], item["spacing"])
    assert len(seen) > 5  # random windows, not one fixed place
    thin = crop_window(item, (8, 8, 16), 4, 0.0, g)  # z is 8 long: kept whole
    assert thin["latent"].shape == (4, 8, 8, 8) and thin["label"].shape == (1, 32, 32, 32)


def test_tumor_centred_windows_hold_the_tumor():
    labels = torch.full((1, 128, 128, 64), LIVER, dtype=torch.uint8)
    labels[0, 100:103, 9:12, 50:52] = TUMOR  # one small tumour near a corner
    item = {"latent": torch.zeros(4, 32, 32, 16), "spacing": torch.ones(3), "modality": 0, "label": labels}
    g = torch.Generator().manual_seed(1)

    def share_with_tumor(tumor_share):
        hits = [bool((crop_window(item, (8, 8, 8), 4, tumor_share, g)["label"] == TUMOR).any()) for _ in range(60)]
        return sum(hits) / len(hits)

    assert share_with_tumor(1.0) == 1.0  # centred (jittered by a quarter window at most): always inside
    assert share_with_tumor(0.0) < 0.3  # uniform windows mostly miss a tumour in 1 % of the volume
    no_tumor = {**item, "label": torch.full_like(labels, LIVER)}
    assert crop_window(no_tumor, (8, 8, 8), 4, 1.0, g)["latent"].shape == (4, 8, 8, 8)  # falls back to uniform


def test_training_on_tumor_centred_windows(tmp_path, workspace):
    """16^3 latents trained on 8^3 windows: the step sees the window (not the whole latent) and the
    recipe (with its crop) is stored; a crop the UNet cannot halve is refused before training."""
    cache = tmp_path / "cache"
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        labels = torch.full((1, 64, 64, 64), LIVER, dtype=torch.uint8)
        labels[0, 40:48, 10:18, 20:28] = TUMOR
        record = LatentRecord(file="", spacing=(1.5, 1.5, 2.0), latent_shape=(), source="test")
        write_latent(cache, f"vol{i}", torch.randn(4, 16, 16, 16, generator=g), record, label=labels)
    write_stats(cache, compute_scale_factor(cache))
    shapes = []
    import maisi2.train_controlnet as module

    real_loss = module.controlnet_loss

    def spy(unet, controlnet, x0, *args, **kwargs):
        shapes.append(tuple(x0.shape))
        return real_loss(unet, controlnet, x0, *args, **kwargs)

    recipe = _recipe(steps=3, crop=(8, 8, 8), tumor_crops=1.0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(module, "controlnet_loss", spy)
        train_controlnet(cache, workspace["unet"], tmp_path / "run", recipe, device="cpu", progress=False)
    assert shapes == [(2, 4, 8, 8, 8)] * 3
    rows = _rows(tmp_path / "run")
    assert all(float(r["roi_samples"]) == 2.0 for r in rows)  # every window of the batch holds the tumour
    assert float(rows[-1]["d_roi"]) > 0  # and its ROI reaches the contrastive term
    stored = ControlNetRecipe.from_dict(json.loads(load_checkpoint(tmp_path / "run" / "last.pt").extra["recipe"]))
    assert stored.crop == (8, 8, 8) and stored.tumor_crops == 1.0
    with pytest.raises(ValueError, match="multiple of 8"):
        train_controlnet(cache, workspace["unet"], tmp_path / "bad", _recipe(steps=1, crop=(4, 8, 8)),
                         device="cpu", progress=False)


def test_window_settings_are_checked():
    with pytest.raises(ValueError, match="three positive"):
        ControlNetRecipe(crop=(8, 8))
    with pytest.raises(ValueError, match="needs crop"):
        ControlNetRecipe(tumor_crops=0.5)
    with pytest.raises(ValueError, match="share"):
        ControlNetRecipe(crop=(8, 8, 8), tumor_crops=1.5)
    assert recipe_with_overrides(ControlNetRecipe(), ["crop=[16, 16, 8]"]).crop == (16, 16, 8)


# -- fine-tuning from the released ControlNet ----------------------------------------------------

def _randomised(net, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return net


def test_released_controlnet_file_loads_with_the_released_keys_and_shapes(reference_dir, tmp_path):
    """A random-weight ControlNet of the released architecture, written in the release's file
    layout (controlnet_3d_rflow-ct.pt), is what fine-tuning starts from, tensor for tensor."""
    import maisi2.train_controlnet as module
    from maisi2.checkpoint import write_released

    cfg = get_config("maisi-v2")
    released = _randomised(nets.build_controlnet(cfg), seed=3)
    write_released(tmp_path, None, None, released, scale_factor=1.0)
    data = torch.load(tmp_path / "controlnet_3d_rflow-ct.pt", weights_only=True)
    expected = {}
    for line in (reference_dir / "state_dict_keys_controlnet.tsv").read_text().splitlines():
        key, shape = line.split("\t")
        expected[key] = tuple(json.loads(shape.replace("(", "[").replace(")", "]").replace(",]", "]")))
    assert {k: tuple(v.shape) for k, v in data["controlnet_state_dict"].items()} == expected
    start = module._initial_controlnet(None, cfg, seed=0, device=torch.device("cpu"),
                                       init=tmp_path / "controlnet_3d_rflow-ct.pt")
    assert all(torch.equal(start.state_dict()[k], v) for k, v in released.state_dict().items())


def test_fine_tuning_starts_from_exactly_the_given_controlnet(workspace, tmp_path, monkeypatch):
    import maisi2.train_controlnet as module
    from maisi2.checkpoint import write_released

    cfg = get_config("tiny")
    released = _randomised(nets.build_controlnet(cfg), seed=5)
    write_released(tmp_path / "release", None, None, released, scale_factor=1.0)
    started = {}
    real_train = module.train

    def spy(model, *args, **kwargs):
        started["weights"] = {k: v.clone() for k, v in model.state_dict().items()}
        return real_train(model, *args, **kwargs)

    monkeypatch.setattr(module, "train", spy)
    out = tmp_path / "finetune"
    # the folder holding the released file, as --init-controlnet accepts it
    train_controlnet(workspace["cache"], workspace["unet"], out, _recipe(steps=2), device="cpu", progress=False,
                     init_controlnet=tmp_path / "release")
    assert started["weights"].keys() == released.state_dict().keys()
    assert all(torch.equal(started["weights"][k], v) for k, v in released.state_dict().items())
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt.extra["init"] == str(tmp_path / "release") and ckpt.step == 2
    assert any(not torch.equal(ckpt.state_dict[k], v) for k, v in released.state_dict().items()), "it trained"
    # without --init-controlnet the start is the UNet's weights, not the file's
    train_controlnet(workspace["cache"], workspace["unet"], tmp_path / "scratch", _recipe(steps=1), device="cpu",
                     progress=False)
    assert not torch.equal(started["weights"]["conv_in.conv.weight"], released.state_dict()["conv_in.conv.weight"])


def test_init_controlnet_of_other_shapes_or_kind_is_explained(workspace, tmp_path, monkeypatch, capsys):
    from maisi2.checkpoint import write_released

    write_released(tmp_path / "small", None, None, nets.build_controlnet(get_config("small")), scale_factor=1.0)
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["maisi2.cli.controlnet_cmd"])
    argv = ["train-controlnet", str(workspace["cache"]), "--unet", str(workspace["unet"]), "--steps", "1",
            "--device", "cpu", "--no-progress"]
    assert cli.main(argv + ["--out", str(tmp_path / "a"), "--init-controlnet", str(tmp_path / "small")]) == 1
    assert "preset" in capsys.readouterr().err  # strict loading names the preset the weights fit
    assert cli.main(argv + ["--out", str(tmp_path / "b"), "--init-controlnet", str(workspace["unet"])]) == 1
    assert "holds a unet checkpoint, not a ControlNet" in capsys.readouterr().err


def test_flow_loss_form_reaches_the_controlnet_loss_and_its_checkpoint(workspace, tmp_path, monkeypatch):
    """--set flow.loss=l2 on the ControlNet run: its flow term is the squared error, and saved."""
    from maisi2 import losses

    forms = []
    original = losses.flow_loss

    def spy(*args, **kwargs):
        forms.append(kwargs.get("form", "l1"))
        return original(*args, **kwargs)

    monkeypatch.setattr(losses, "flow_loss", spy)
    out = tmp_path / "l2"
    result = train_controlnet(workspace["cache"], workspace["unet"], out, _recipe(steps=1), overrides=["flow.loss=l2"],
                              device="cpu", progress=False)
    assert forms and set(forms) == {"l2"}
    assert load_checkpoint(result.checkpoint).config.flow.loss == "l2"
