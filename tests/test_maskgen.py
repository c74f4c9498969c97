"""The mask generator: the release's networks (keys, strict loading, DDPM against MONAI), the
anatomy-size vector, the class -> MAISI id table, cleaning, and sampling on tiny networks."""

import json

import numpy as np
import pytest
import torch

from maisi2 import checkpoint, ddpm
from maisi2 import labels as L
from maisi2.maskgen import files, networks, postprocess, sampling, sizes
from maisi2.maskgen.config import get_mask_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference_def(reference_dir, key):
    """A network definition of config_network_rflow.json with its '@' references resolved."""
    config = json.loads((reference_dir / "config_network_rflow.json").read_text())
    args = {k: (config[v[1:]] if isinstance(v, str) and v.startswith("@") else v)
            for k, v in config[key].items() if k != "_target_"}
    return config, args


def _shapes(net):
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def test_released_mask_networks_have_the_keys_of_monai_built_with_the_release_arguments(reference_dir):
    """No key list of these two networks ships in ../shared/reference: MONAI's classes built with
    the release's exact arguments are the reference."""
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi
    from monai.networks.nets.diffusion_model_unet import DiffusionModelUNet

    assert not list(reference_dir.glob("state_dict_keys_mask*"))
    config, ae_args = _reference_def(reference_dir, "mask_generation_autoencoder_def")
    _, unet_args = _reference_def(reference_dir, "mask_generation_diffusion_def")
    unet_args["use_flash_attention"] = False  # needs CUDA to run; adds no parameter
    cfg = get_mask_config("maisi-v2")
    with torch.device("meta"):
        assert _shapes(AutoencoderKlMaisi(**ae_args)) == _shapes(checkpoint.build_network("mask_autoencoder", cfg))
        assert _shapes(DiffusionModelUNet(**unet_args)) == _shapes(checkpoint.build_network("mask_unet", cfg))
    assert list(cfg.latent_shape) == config["mask_generation_latent_shape"]
    assert cfg.scale_factor == config["mask_generation_scale_factor"]
    assert cfg.mask_shape == (256, 256, 256) and cfg.spacing_mm == 1.5 and cfg.objective == "ddpm"


def test_mask_ddpm_schedule_is_monai_s_scheduler_of_the_release(reference_dir):
    from monai.networks.schedulers import DDPMScheduler

    config = json.loads((reference_dir / "config_network_rflow.json").read_text())
    args = {k: v for k, v in config["mask_generation_noise_scheduler"].items() if k != "_target_"}
    theirs, ours = DDPMScheduler(**args), ddpm.make_scheduler("ddpm")
    assert torch.equal(theirs.betas, ours.betas) and torch.equal(theirs.alphas_cumprod, ours.alphas_cumprod)
    assert (theirs.clip_sample, ours.clip_sample) == (False, False)
    assert theirs.prediction_type == ours.prediction_type == "epsilon"


# One UNet level on a 4^3 latent: 1000 DDPM steps in ~15 s on a busy 2-core machine.
SMALLEST_DDPM = ["objective=ddpm", "unet.channels=[8]", "unet.attention_levels=[true]", "unet.num_head_channels=[8]",
                 "latent_shape=[4,4,4,4]"]


@pytest.mark.slow
def test_ddpm_mask_sampling_equals_monai_inferer_step_for_step():
    """All 1000 DDPM steps on a tiny UNet: our loop and MONAI's DiffusionInferer give the same latent."""
    from monai.inferers.inferer import DiffusionInferer

    cfg = get_mask_config("tiny", SMALLEST_DDPM)
    torch.manual_seed(0)
    gen = files.MaskGenerator(cfg, networks.build_mask_autoencoder(cfg).eval(), networks.build_mask_unet(cfg).eval(),
                              1.0, "ours", None)
    vector = torch.tensor([[0.1, 0.6, 0.3, 0.4, 0.5, -1, -1, 0.2, -1, -1]])
    noise = torch.randn(1, *cfg.latent_shape)
    torch.manual_seed(7)
    ours = sampling.sample_latent(gen, vector, noise.clone())
    scheduler = ddpm.make_scheduler("ddpm")
    scheduler.set_timesteps(1000)
    torch.manual_seed(7)
    with torch.no_grad():
        theirs = DiffusionInferer(scheduler).sample(noise.clone(), gen.unet, scheduler, conditioning=vector[:, None, :],
                                                    verbose=False)
    assert torch.equal(ours, theirs)
    with pytest.raises(ValueError, match="1000 steps"):
        sampling.sample_latent(gen, vector, noise, steps=30)


def test_released_layout_of_other_shapes_is_refused_naming_keys(tmp_path):
    cfg = get_mask_config("tiny")
    files.write_released_mask_generator(tmp_path, networks.build_mask_autoencoder(cfg), networks.build_mask_unet(cfg),
                                        scale_factor=1.0)
    with pytest.raises(ValueError) as err:
        files.load_mask_generator(tmp_path)
    text = str(err.value)
    assert "mask_generation_autoencoder.pt" in text and "wrong shape" in text and "tiny" in text
    assert "encoder.blocks.0.conv.conv.weight" in text or "missing" in text


@pytest.mark.slow
def test_released_shapes_load_strictly_and_predict(tmp_path):
    """Random weights of the exact released shapes (~0.8 GB), written in the release's layout."""
    cfg = get_mask_config("maisi-v2")
    torch.manual_seed(0)
    ae, unet = networks.build_mask_autoencoder(cfg), networks.build_mask_unet(cfg)
    files.write_released_mask_generator(tmp_path, ae, unet, scale_factor=1.0056)
    raw = torch.load(tmp_path / "mask_generation_diffusion_unet.pt", weights_only=True)
    assert set(raw) >= {"unet_state_dict", "scale_factor"}
    del raw
    gen = files.load_mask_generator(tmp_path)
    assert gen.source == "released" and gen.scale_factor == pytest.approx(1.0056) and gen.size_table is None
    assert all(torch.equal(a, b) for a, b in zip(gen.unet.state_dict().values(), unet.state_dict().values()))
    del ae, unet
    with torch.no_grad():  # one call on a small latent: the full 64^3 x 1000 steps is too slow for a test
        x = torch.randn(1, 4, 8, 8, 8)
        out = networks.predict(gen.unet, x, torch.tensor([999.0]), torch.tensor([[0.5] * 5 + [-1] * 5]))
        logits = networks.decode_logits(gen.autoencoder, x, gen.scale_factor)
    assert out.shape == x.shape and logits.shape == (1, 125, 32, 32, 32)
    with pytest.raises(ValueError, match="all_anatomy_size_conditions.json"):
        sampling.size_vector(gen, {"liver": 0.5})


def test_channel_table_is_the_release_s():
    ids = L.MASK_GENERATOR_CHANNEL_IDS
    assert len(ids) == 125 and ids[0] == 0 and ids[1] == L.label_id("liver") and ids[124] == L.BODY
    assert ids[121] == L.label_id("bone lesion") and ids[122] == L.KIDNEY_MASS
    assert np.array_equal(L.channels_to_ids(np.arange(125)), np.array(ids))
    maisi = np.array([0, 1, 200, 62, 23, 116])
    assert L.channels_to_ids(L.ids_to_channels(maisi)).tolist() == [0, 1, 200, 62, 23, L.label_id("left kidney")]
    with pytest.raises(ValueError):
        L.channels_to_ids(np.array([125]))


def test_parse_and_check_anatomy_sizes():
    assert sizes.parse_anatomy_sizes('liver=0.6,"hepatic tumor"=0.2') == {"liver": 0.6, "hepatic tumor": 0.2}
    assert sizes.parse_anatomy_sizes("colon=-1, stomach=1") == {"colon": -1.0, "stomach": 1.0}
    for bad, message in (("liver=1.5", r"\[0, 1\]"), ("spleen=0.3", "no anatomy-size slot"), ("liver", "NAME=SIZE"),
                         ("liver=big", "not a number"), ("lung tumor=0.2,bone lesion=0.1", "one tumour kind")):
        with pytest.raises(ValueError, match=message):
            sizes.parse_anatomy_sizes(bad)


def test_table_completes_a_request_from_the_closest_vector(tmp_path):
    vectors = np.array([[0.1, 0.9, 0.5, 0.5, 0.5, -1, -1, -1, -1, -1],
                        [0.2, 0.3, 0.4, 0.6, 0.7, 0.3, -1, -1, -1, -1]], dtype=np.float32)
    release_style = tmp_path / "all_anatomy_size_conditions.json"
    release_style.write_text(json.dumps([{"organ_size": v.tolist()} for v in vectors]))
    table = sizes.SizeTable.read(release_style)
    out = table.complete({"liver": 0.35, "hepatic tumor": 0.2})
    assert out[1] == pytest.approx(0.35) and out[7] == pytest.approx(0.2)
    assert out[3] == pytest.approx(0.6)  # from the second vector, whose liver is closer
    assert out[5] == -1  # its lung tumour was not asked for
    assert sizes.requested_tumor(out) == L.label_id("hepatic tumor")
    assert sizes.requested_tumor(table.complete({"liver": 0.9})) is None


def test_size_scale_from_volumes():
    labels = np.zeros((10, 10, 10), np.int16)
    labels[:4] = L.label_id("liver")
    labels[5, 5, 5] = L.label_id("hepatic tumor")
    volumes = sizes.slot_volumes_ml(labels, (2.0, 2.0, 2.0))
    assert volumes[1] == pytest.approx(400 * 8 / 1000) and volumes[7] == pytest.approx(8 / 1000) and volumes[0] == 0
    scale = sizes.SizeScale.from_volumes(np.stack([volumes, volumes / 2]))
    s = scale.sizes(volumes / 2)
    assert s[1] == pytest.approx(0.5) and s[0] == sizes.ABSENT
    assert scale.volumes_ml(s)[1] == pytest.approx(volumes[1] / 2)


def test_clean_mask_keeps_the_body_and_organs_whole():
    liver, tumor, lung_tumor = L.label_id("liver"), L.label_id("hepatic tumor"), L.label_id("lung tumor")
    ids = np.zeros((24, 24, 24), np.int16)
    ids[2:22, 2:22, 2:22] = L.BODY
    ids[4:12, 4:12, 4:12] = liver
    ids[7, 7, 7] = L.BODY  # a hole in the liver
    ids[6:8, 9:11, 9:11] = tumor
    ids[16:18, 16:18, 16:18] = liver  # a stray liver piece
    lobe = L.LUNG_IDS[2]
    ids[13:20, 3:8, 3:8] = lobe
    ids[14:16, 4:6, 4:6] = lung_tumor  # not asked for: becomes the lobe around it
    ids[0, 0, 0] = L.BODY  # a speck outside the body
    ids[10, 15, 15] = 0  # a hole in the body
    out = postprocess.clean_mask(ids, requested_tumor=tumor)
    assert out[0, 0, 0] == 0 and out[10, 15, 15] == L.BODY
    assert out[7, 7, 7] == liver and np.all(out[16:18, 16:18, 16:18] == L.BODY)
    assert np.all(out[6:8, 9:11, 9:11] == tumor) and np.all(out[14:16, 4:6, 4:6] == lobe)
    assert not np.any(postprocess.clean_mask(ids, requested_tumor=None) == tumor)


def test_logits_to_ids_argmax_then_table():
    logits = torch.zeros(125, 2, 1, 1)
    logits[124, 0] = 5.0
    logits[121, 1] = 5.0
    assert postprocess.logits_to_ids(logits)[:, 0, 0].tolist() == [L.BODY, L.label_id("bone lesion")]


def _tiny_generator(tmp_path, overrides=()):
    cfg = get_mask_config("tiny", list(overrides))
    torch.manual_seed(0)
    scale = sizes.SizeScale(tuple([100.0] * 10))
    table = sizes.SizeTable(np.array([[0.1, 0.5, 0.5, 0.5, 0.5, -1, -1, -1, -1, -1]]), "test")
    files.save_mask_generator(tmp_path, cfg, networks.build_mask_autoencoder(cfg), networks.build_mask_unet(cfg),
                              1.0, scale, table)
    return files.load_mask_generator(tmp_path)


def test_generate_mask_ddpm_1000_steps_on_cpu_and_resampled_to_the_request(tmp_path):
    gen = _tiny_generator(tmp_path, SMALLEST_DDPM)
    sample = sampling.generate_mask(gen, {"liver": 0.6, "hepatic tumor": 0.2}, seed=3, shape=(40, 30, 20),
                                    spacing=(6.0, 6.0, 8.0))
    assert sample.steps == 1000 and sample.sampler == "ddpm"
    assert sample.native.shape == (16, 16, 16) and sample.native.spacing == (12.0, 12.0, 12.0)
    assert sample.volume.shape == (40, 30, 20) and sample.volume.spacing == (6.0, 6.0, 8.0)
    L.check_label_ids(sample.volume.array)
    assert sample.size_vector[1] == pytest.approx(0.6) and sample.size_vector[7] == pytest.approx(0.2)


def test_our_folder_round_trip_and_refusals(tmp_path):
    gen = _tiny_generator(tmp_path / "g")
    assert gen.source == "ours" and gen.cfg.preset == "tiny" and gen.size_scale.reference_ml[0] == 100.0
    sample = sampling.generate_mask(gen, {"liver": 0.6}, seed=0, steps=4)
    assert sample.steps == 4 and sample.sampler == "rflow"
    again = sampling.generate_mask(gen, {"liver": 0.6}, seed=0, steps=4)
    assert np.array_equal(again.native.array, sample.native.array)  # the seed fixes the mask
    with pytest.raises(FileExistsError):
        files.save_mask_generator(tmp_path / "g", gen.cfg, gen.autoencoder, gen.unet, 1.0, gen.size_scale, gen.size_table)
    with pytest.raises(FileNotFoundError, match="holds no mask generator"):
        files.load_mask_generator(tmp_path)


def test_slab_decode_equals_the_whole_decode_where_slabs_see_everything():
    """With a halo as deep as the latent every slab decodes the whole volume: same classes exactly.
    Thinner halos change group-norm statistics, so only the shape is checked for them."""
    cfg = get_mask_config("tiny")
    torch.manual_seed(0)
    ae = networks.build_mask_autoencoder(cfg).eval()
    latent = torch.randn(1, 4, 8, 6, 6)
    with torch.no_grad():
        whole = networks.decode_logits(ae, latent)[0].argmax(dim=0)
    assert torch.equal(networks.decode_to_classes(ae, latent, slab=3, halo=8), whole)
    assert networks.decode_to_classes(ae, latent, slab=2, halo=1).shape == whole.shape


def test_measures_on_a_hand_made_mask():
    from maisi2.maskgen import measure

    liver, tumor = L.label_id("liver"), L.label_id("hepatic tumor")
    ids = np.zeros((20, 20, 20), np.int16)
    ids[2:18, 2:18, 2:18] = L.BODY
    ids[4:10, 4:10, 4:10] = liver
    ids[6:8, 6:8, 6:8] = tumor  # inside the liver
    ids[14:16, 14:16, 14:16] = tumor  # in the body, outside the liver
    ids[12, 4, 4] = liver  # a second liver piece
    assert measure.components(ids)["liver"] == 2 and measure.components(ids)["body (all labels)"] == 1
    assert sorted(measure.tumor_inside_parent(ids, "hepatic tumor")) == [0.0, 1.0]
    assert measure.organ_volumes_ml(ids, (10.0, 10.0, 10.0))["liver"] == pytest.approx((216 - 8 + 1) * 1.0)
    assert measure.body_closed(ids)
    ids[9, 9, 9] = 0
    assert not measure.body_closed(ids)  # an enclosed hole
    d = measure.volume_distribution([1, 2, 3, 4], [1, 2, 3, 4])
    assert d["ks_distance"] == 0 and d["generated_mean"] == 2.5
    assert measure.volume_distribution([10, 11, 12], [1, 2, 3])["ks_distance"] == 1
    req = np.full((4, 10), -1.0)
    req[:, 1] = [0.2, 0.4, 0.6, 0.8]
    got = req.copy()
    got[:, 1] = [0.25, 0.35, 0.7, 0.75]
    corr = measure.size_correlation(req, got)
    assert corr["liver"]["n"] == 4 and corr["liver"]["pearson_r"] > 0.9 and corr["gallbladder"]["n"] == 0
    got[3, 1] = -1.0  # one requested liver missing
    assert measure.size_correlation(req, got)["liver"]["present"] == 0.75


def test_label_dice_is_one_for_a_perfect_prediction_and_counts_misses():
    from maisi2.maskgen import measure

    target = np.zeros((6, 6, 6), np.int64)
    target[1:5, 1:5, 1:5] = 124  # body channel
    target[2:4, 2:4, 2:4] = 1  # liver channel
    assert measure.label_dice(target, target) == {1: 1.0, 124: 1.0}  # background is not scored
    pred = target.copy()
    pred[pred == 1] = 124  # the liver missed: 0 for it, and the body's Dice drops
    dice = measure.label_dice(pred, target)
    assert dice[1] == 0.0 and dice[124] == pytest.approx(2 * 56 / (64 + 56))
    with pytest.raises(ValueError, match="differ"):
        measure.label_dice(pred[:3], target)


def test_size_vector_reaches_the_unet_output():
    # MONAI zero-initialises the cross-attention's output projection, so an untrained UNet ignores
    # the sizes by construction; with every weight perturbed, two size vectors must give two outputs
    # (the sizes enter as the one context token of every cross-attention).
    cfg = get_mask_config("tiny")
    unet = networks.build_mask_unet(cfg).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
        x = torch.randn((1, *cfg.latent_shape), generator=gen)
        t = torch.tensor([500.0])
        small = torch.full((1, 10), -1.0)
        small[0, 1] = 0.2
        large = small.clone()
        large[0, 1] = 0.9
        out_small, out_large = networks.predict(unet, x, t, small), networks.predict(unet, x, t, large)
    assert (out_small - out_large).abs().mean() > 1e-3 * out_small.abs().mean()
