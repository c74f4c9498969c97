"""The training recipes hold one `TrainSettings` (``recipe.train``) and still read what they were
given before they did: flat recipe JSON in older checkpoints and flat ``--recipe-set`` keys."""

import dataclasses
import json

import pytest

from maisi2.maskgen.train import MaskRecipe
from maisi2.train_controlnet import ControlNetRecipe, recipe_with_overrides
from maisi2.train_flow import FlowRecipe, stage_settings
from maisi2.training import TrainSettings

# recipe JSON as checkpoints stored it before the recipes held a TrainSettings (printed by the
# previous to_json; a mask generator's recipe was compact and had no schedule or weight_decay)
OLD_CONTROLNET = json.loads("""{"loss": {"contrastive": true, "delta": 2.0, "dilation": 1, "background_form": "paper",
 "lambda_schedule": [[0.0, 0.01], [0.5, 0.001]], "placement": "auto", "auto_output_max_voxels": 262144,
 "weighted_labels": [23, 24, 26, 27, 116, 117, 128], "label_weight": 100.0, "normalise_weight": true,
 "lambda_mode": "paper", "lambda_reference": [524288, 64]}, "steps": 7, "lr": 2e-05, "warmup": 0,
 "schedule": "cosine", "batch_size": 1, "voxels_per_batch": 2097152, "grad_clip": 1.0, "ema_decay": 0.999,
 "weight_decay": 0.0, "amp": "auto", "ckpt_every": 100, "log_every": 10, "max_nonfinite": 10, "seed": 0,
 "num_workers": 0, "crop": [16, 16, 8], "tumor_crops": 0.5}""")
OLD_FLOW = json.loads("""{"stage1": {"steps": 20000, "lr": 0.0001, "warmup": 500, "schedule": "cosine", "batch_size": 8,
 "latent_size": [32, 32, 32], "resize": "downsample"}, "stage2": {"steps": 20000, "lr": 5e-05, "warmup": 100,
 "schedule": "cosine", "voxels_per_batch": 2097152, "max_batch_size": 16}, "stage3": {"steps": 5000, "lr": 2e-05,
 "warmup": 0, "schedule": "constant", "source_weights": "inverse"}, "modality_dropout": 0.0, "objective": "rflow",
 "grad_clip": 1.0, "ema_decay": 0.995, "weight_decay": 0.0, "amp": "auto", "ckpt_every": 50, "log_every": 10,
 "max_nonfinite": 10, "seed": 3, "num_workers": 0}""")
OLD_MASK = json.loads("""{"autoencoder_steps": 2000, "autoencoder_lr": 0.0002, "autoencoder_batch": 2, "autoencoder_crop": 0,
 "kl_weight": 1e-06, "dice_weight": 1.0, "unet_steps": 4000, "unet_lr": 0.0002, "unet_batch": 4, "warmup": 50,
 "grad_clip": 1.0, "ema_decay": 0.999, "amp": "auto", "ckpt_every": 250, "log_every": 10, "seed": 0,
 "holdout_fold": 0}""")


def test_old_flat_recipe_json_still_loads():
    cn = ControlNetRecipe.from_dict(OLD_CONTROLNET)
    assert cn == ControlNetRecipe.of(steps=7, lr=2e-5, ckpt_every=100, crop=(16, 16, 8), tumor_crops=0.5)
    assert cn.train.steps == 7 and cn.train.ckpt_every == 100 and cn.crop == (16, 16, 8)
    flow = FlowRecipe.from_dict(OLD_FLOW)
    assert flow.train.ema_decay == 0.995 and flow.train.ckpt_every == 50 and flow.stage3.schedule == "constant"
    assert stage_settings(flow, 2).seed == 3 * 31 + 2 and stage_settings(flow, 2).lr == 5e-5
    # OLD_MASK was written when the autoencoder's default learning rate was 2e-4
    assert MaskRecipe.from_dict(OLD_MASK) == dataclasses.replace(MaskRecipe(), autoencoder_lr=2e-4)
    for recipe in (cn, flow, MaskRecipe()):  # and what they write now reads back the same
        assert type(recipe).from_json(recipe.to_json()) == recipe
        assert "train" in json.loads(recipe.to_json()) and "ckpt_every" not in json.loads(recipe.to_json())


def test_the_engine_settings_a_recipe_hands_the_engine():
    cn = ControlNetRecipe.of(steps=5, amp="fp32", seed=4)
    assert cn.settings("cpu", False) == TrainSettings(steps=5, lr=1e-5, amp="fp32", seed=4, device="cpu",
                                                      progress=False)
    mask = MaskRecipe.from_overrides(["autoencoder_steps=20", "unet_lr=1e-3", "ckpt_every=3"])
    assert mask.settings("autoencoder", "cpu", None) == TrainSettings(
        steps=20, lr=1e-3, warmup=19, ckpt_every=3, seed=0, device="cpu",
        ema_decay=0.5)  # warmup capped below the steps, the EMA decay at 1 - 10/steps (maskgen.train.ema_decay_for)
    assert mask.settings("unet", "cpu", None).lr == 1e-3 and mask.settings("unet", "cpu", None).seed == 1


def test_flat_and_dotted_overrides_reach_the_settings():
    flat = FlowRecipe().with_overrides(["ema_decay=0.995", "ckpt_every=100", "stage1.warmup=50", "amp=\"fp32\""])
    dotted = FlowRecipe().with_overrides(["train.ema_decay=0.995", "train.ckpt_every=100", "stage1.warmup=50",
                                          "train.amp=fp32"])
    assert flat == dotted and flat.train.ema_decay == 0.995 and flat.stage1.warmup == 50
    cn = recipe_with_overrides(ControlNetRecipe(), ["warmup=50", "crop=[32,32,8]", "tumor_crops=0.3",
                                                    "train.min_lr_ratio=0.1"])
    assert cn.train.warmup == 50 and cn.train.lr == 1e-5 and cn.crop == (32, 32, 8) and cn.train.min_lr_ratio == 0.1
    # a partial "train" keeps the recipe's own defaults, not the engine's
    assert ControlNetRecipe.from_dict({"train": {"steps": 3}}).train.lr == 1e-5
    with pytest.raises(ValueError, match="no such key"):
        ControlNetRecipe().with_overrides(["train.nope=1"])
    with pytest.raises(ValueError, match="ema_decay must lie"):
        ControlNetRecipe().with_overrides(["ema_decay=1.5"])


def test_a_value_the_stages_set_is_refused_in_train():
    with pytest.raises(ValueError, match="sets lr per stage: use stage1.lr, stage2.lr, stage3.lr"):
        FlowRecipe().with_overrides(["lr=1e-3"])
    with pytest.raises(ValueError, match="sets steps per stage: use autoencoder_steps, unet_steps"):
        MaskRecipe.from_overrides(["steps=10"])
