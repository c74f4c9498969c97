import json

import pytest

from maisi2.cli import main
from maisi2.config import PRESETS, Config, apply_overrides, get_config


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_round_trip_through_json(name):
    cfg = get_config(name)
    assert cfg.preset == name
    again = Config.from_json(cfg.to_json())
    assert again == cfg
    assert isinstance(again.unet.num_channels, tuple)


def test_overrides_change_only_the_named_field():
    base = get_config("tiny")
    cfg = apply_overrides(base, ["unet.num_res_blocks=2", "flow.sample_method=logit-normal", "flow.scale=1"])
    assert cfg.unet.num_res_blocks == 2 and cfg.flow.sample_method == "logit-normal"
    assert cfg.flow.scale == 1.0 and isinstance(cfg.flow.scale, float)
    assert cfg.vae == base.vae
    with pytest.raises(Exception):  # frozen
        cfg.unet.num_res_blocks = 3


@pytest.mark.parametrize(
    "override, message",
    [
        ("unet.num_res_block=2", "no such key"),
        ("unet.num_res_blocks=two", "must be an integer"),
        ("nosection.key=1", "not a config section"),
        ("unet.num_channels=[8, 8, 10, 16]", "divisible"),
        ("flow.sample_method=gaussian", "sample_method"),
        ("justtext", "section.key=value"),
    ],
)
def test_bad_overrides_fail_with_a_clear_message(override, message):
    with pytest.raises(ValueError, match=message):
        get_config("tiny", [override])


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ValueError, match="tiny, small, maisi-v2"):
        get_config("huge")


def test_unknown_json_key_is_rejected():
    data = get_config("tiny").to_dict()
    data["unet"]["surprise"] = 1
    with pytest.raises(ValueError, match="unet.surprise"):
        Config.from_dict(data)


def test_maisi_v2_matches_the_released_network_config(reference_dir):
    ref = json.loads((reference_dir / "config_network_rflow.json").read_text())
    cfg = get_config("maisi-v2")
    ae, un, cn, sch = ref["autoencoder_def"], ref["diffusion_unet_def"], ref["controlnet_def"], ref["noise_scheduler"]
    for key in ("num_channels", "num_res_blocks", "attention_levels"):
        assert list(getattr(cfg.vae, key)) == ae[key]
    for key in ("norm_num_groups", "norm_eps", "num_splits", "dim_split", "norm_float16", "use_convtranspose"):
        assert getattr(cfg.vae, key) == ae[key]
    assert cfg.vae.latent_channels == ref["latent_channels"]
    for key in ("num_channels", "attention_levels", "num_head_channels"):
        assert list(getattr(cfg.unet, key)) == un[key] == cn[key]
    for key in ("num_res_blocks", "num_class_embeds", "resblock_updown", "include_fc", "include_spacing_input"):
        assert getattr(cfg.unet, key) == un[key]
    assert list(cfg.controlnet.conditioning_embedding_num_channels) == cn["conditioning_embedding_num_channels"]
    assert cfg.controlnet.conditioning_embedding_in_channels == cn["conditioning_embedding_in_channels"]
    for key in ("num_train_timesteps", "use_discrete_timesteps", "use_timestep_transform", "sample_method", "scale"):
        assert getattr(cfg.flow, key) == sch[key]


def test_cli_config_show(capsys):
    assert main(["config", "show", "tiny", "--set", "unet.num_res_blocks=2"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["unet"]["num_res_blocks"] == 2 and shown["preset"] == "tiny"
