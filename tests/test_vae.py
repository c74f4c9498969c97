"""VAE losses, posterior-mean and tiled encoding, and VAE training (`maisi2.autoencoder`, `maisi2.train_vae`)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from maisi2.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from maisi2.config import get_config
from maisi2.labels import TUMOR_IDS
from maisi2.nets import build_vae
from maisi2.autoencoder import TILED_ENCODE_TOLERANCE, decode, encode_mean, encoder_context, load_vae, tiled_encode_mean
from maisi2.train_vae import (VAE_FILE, RandomCrops, StepClock, VAETrainingModel, VAETrainOptions, build_discriminator,
                              crop_plan, discriminator_loss, generator_adversarial_loss, kl_loss, make_vae_loss,
                              reconstruction_l1, train_vae)
from maisi2.training import TrainSettings
from test_encode import write_scan


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def tiny_vae():
    torch.manual_seed(0)
    return build_vae(get_config("tiny")).eval()


def body_like(shape, seed=0) -> torch.Tensor:
    """(1, 1, *shape) in [0, 1]: a soft ellipsoid with an insert and a little noise."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, n) for n in shape], indexing="ij"))
    inside = ((grid**2).sum(0) < 0.8).float()
    insert = (((grid[0] - 0.3) ** 2 + grid[1] ** 2 + grid[2] ** 2) < 0.05).float()
    return (0.5 * inside + 0.2 * insert + 0.02 * torch.randn(shape, generator=g)).clamp(0, 1)[None, None]


# -- losses --------------------------------------------------------------------------------------

def test_kl_is_zero_for_the_prior_and_sums_over_voxels():
    mu, sigma = torch.zeros(2, 4, 3, 3, 3), torch.ones(2, 4, 3, 3, 3)
    assert kl_loss(mu, sigma).item() == pytest.approx(0.0, abs=1e-7)
    # mu = 1, sigma = 1: 0.5 * mu^2 per value, summed over the 108 values of a sample, mean over batch.
    assert kl_loss(mu + 1, sigma).item() == pytest.approx(0.5 * 108)
    # sigma = e: 0.5 * (e^2 - 2 - 1) per value.
    e = float(np.e)
    assert kl_loss(mu, sigma * e).item() == pytest.approx(0.5 * 108 * (e**2 - 3), rel=1e-5)
    # Batch mean, not sum: one sample off the prior in a batch of two halves its contribution.
    mixed = torch.cat([mu[:1] + 1, mu[1:]])
    assert kl_loss(mixed, sigma).item() == pytest.approx(0.5 * 108 / 2)


def test_reconstruction_l1():
    x = torch.zeros(1, 1, 4, 4, 4)
    assert reconstruction_l1(x + 0.25, x).item() == pytest.approx(0.25)
    y = x.clone()
    y[..., 0] = 1.0  # a quarter of the voxels off by 1
    assert reconstruction_l1(y, x).item() == pytest.approx(0.25)


def test_adversarial_losses():
    real, fake = torch.full((2, 1, 2, 2, 2), 2.0), torch.full((2, 1, 2, 2, 2), -2.0)
    # hinge: a discriminator beyond the margins has zero loss; the generator wants D(fake) high.
    assert discriminator_loss(real, fake, "hinge").item() == 0.0
    assert discriminator_loss(fake, real, "hinge").item() == pytest.approx(3.0)
    assert generator_adversarial_loss(fake, "hinge").item() == pytest.approx(2.0)
    # least squares: targets 1 (real) and 0 (fake).
    assert discriminator_loss(torch.ones(3), torch.zeros(3), "lsgan").item() == 0.0
    assert discriminator_loss(torch.zeros(3), torch.ones(3), "lsgan").item() == pytest.approx(1.0)
    assert generator_adversarial_loss(torch.zeros(3), "lsgan").item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="hinge, lsgan"):
        generator_adversarial_loss(fake, "wgan")


# -- encoding ------------------------------------------------------------------------------------

def test_posterior_mean_shape_and_determinism(tiny_vae):
    x = body_like((32, 32, 16))
    z1, z2 = encode_mean(tiny_vae, x), encode_mean(tiny_vae, x)
    assert z1.shape == (1, 4, 8, 8, 4)
    assert torch.equal(z1, z2)  # the mean, no sampling
    assert decode(tiny_vae, z1).shape == x.shape
    assert decode(tiny_vae, z1).min() >= 0 and decode(tiny_vae, z1).max() <= 1
    with pytest.raises(ValueError, match="multiple of 4"):
        encode_mean(tiny_vae, torch.zeros(1, 1, 30, 32, 32))


def test_encoder_context_covers_the_receptive_field():
    with torch.device("meta"):
        sizes = {p: encoder_context(build_vae(get_config(p))) for p in ("tiny", "small", "maisi-v2")}
    assert sizes == {"tiny": 28, "small": 28, "maisi-v2": 40}


def test_tiled_encode_matches_whole_volume(tiny_vae):
    """Tiled vs whole-volume posterior mean, tiny preset, 64 x 16 x 16 volume cut in 4 x 1 x 1 blocks.

    Measured (random weights), relative L2 to the whole-volume latent by overlap 4/8/16/24/28:
    whole-volume norm statistics 0.27/0.14/0.017/4e-7/4e-7 (from 24 on the receptive field is
    covered and only float rounding is left; bound `TILED_ENCODE_TOLERANCE` = 1e-5); per-block
    statistics 0.37/0.24/0.09/0.07/0.06 - a tiled encode with per-call norms is a different
    latent, not a slightly noisy one.
    """
    x = body_like((64, 16, 16), seed=3)
    whole = encode_mean(tiny_vae, x)
    tiled = tiled_encode_mean(tiny_vae, x, tile=16)
    assert tiled.shape == whole.shape
    assert rel_l2(tiled, whole) < TILED_ENCODE_TOLERANCE
    per_block = tiled_encode_mean(tiny_vae, x, tile=16, norm_stats="block")
    assert rel_l2(per_block, whole) > 100 * TILED_ENCODE_TOLERANCE
    # encode_mean tiles when an axis exceeds `tile`.
    assert torch.equal(encode_mean(tiny_vae, x, tile=16, norm_stats="block"), per_block)
    # Too little context: the receptive field is cut off and the match degrades.
    assert rel_l2(tiled_encode_mean(tiny_vae, x, tile=16, overlap=4), whole) > TILED_ENCODE_TOLERANCE
    # The norms are restored afterwards: a plain pass is unchanged.
    assert torch.equal(encode_mean(tiny_vae, x), whole)
    with pytest.raises(ValueError, match="multiple of 4"):
        tiled_encode_mean(tiny_vae, x, tile=30)
    with pytest.raises(ValueError, match="norm_stats"):
        tiled_encode_mean(tiny_vae, x, tile=32, norm_stats="sample")


@pytest.mark.parametrize("norm_stats", ["volume", "block"])
def test_tiled_encode_reports_every_block_and_is_unchanged_by_it(tiny_vae, norm_stats):
    x = body_like((64, 16, 16), seed=3)
    calls = []
    watched = encode_mean(tiny_vae, x, tile=16, norm_stats=norm_stats,
                          progress=lambda done, total: calls.append((done, total)))
    norms = sum(isinstance(m, torch.nn.GroupNorm) for m in tiny_vae.encoder.modules())
    blocks = 4  # 64 x 16 x 16 in cores of 16
    total = (norms + 1) * blocks if norm_stats == "volume" else blocks
    assert calls == [(done, total) for done in range(1, total + 1)]
    assert torch.equal(watched, encode_mean(tiny_vae, x, tile=16, norm_stats=norm_stats))
    calls.clear()
    encode_mean(tiny_vae, x, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 1)]  # a whole-volume encode is one piece of work


# -- training pieces -------------------------------------------------------------------------------

def test_options_are_checked():
    with pytest.raises(ValueError, match="multiples of 4"):
        VAETrainOptions(patch=(30, 32, 32))
    with pytest.raises(ValueError, match="adv_loss"):
        VAETrainOptions(adv_loss="wgan")
    with pytest.raises(ValueError, match="adv_weight"):
        VAETrainOptions(adv_weight=-1)
    with pytest.raises(ValueError, match="region_weight"):
        VAETrainOptions(region_weight=0.5)
    with pytest.raises(ValueError, match="region_crops"):
        VAETrainOptions(region_crops=1.5)
    with pytest.raises(ValueError, match="region_labels"):
        VAETrainOptions(region_weight=10, region_labels=())
    assert VAETrainOptions().region_ids is None  # no region setting: labels are not even loaded
    assert VAETrainOptions(region_weight=10).region_ids == TUMOR_IDS
    assert VAETrainOptions(region_crops=0.5, region_labels=(1, 5)).region_ids == (1, 5)


def test_weighted_reconstruction_l1():
    recon, image = torch.zeros(1, 1, 2, 2, 1), torch.tensor([0.1, 0.2, 0.3, 0.4]).reshape(1, 1, 2, 2, 1)
    assert reconstruction_l1(recon, image, torch.ones_like(image)).item() == pytest.approx(0.25)
    weight = torch.tensor([1.0, 1.0, 1.0, 7.0]).reshape(1, 1, 2, 2, 1)
    assert reconstruction_l1(recon, image, weight).item() == pytest.approx((0.1 + 0.2 + 0.3 + 7 * 0.4) / 10)


def test_region_crops_carry_the_region_and_centre_on_it(tmp_path):
    from maisi2.data import read_datalist

    image, label = write_scan(tmp_path, "a", (64, 60, 40), seed=2)
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": image.name, "label": label.name}) + "\n")
    items = read_datalist(tmp_path / "d.jsonl")
    labels = np.asarray(nib.load(label).dataobj)
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    region_id = int(ids[counts.argmin()])  # the smallest structure
    share = (labels == region_id).mean()
    centred = RandomCrops(items, (16, 16, 16), region_ids=[region_id], region_crops=1.0)
    anywhere = RandomCrops(items, (16, 16, 16), region_ids=[region_id], region_crops=0.0)
    hits_centred = [bool(centred[i]["region"].any()) for i in range(40)]
    hits_anywhere = [bool(anywhere[i]["region"].any()) for i in range(40)]
    assert all(hits_centred), "a crop centred on the region (give or take a quarter patch) must contain it"
    assert sum(hits_anywhere) < 40, share  # a small structure is missed by most random crops
    item = centred[3]
    assert item["region"].dtype == torch.bool and item["region"].shape == item["image"].shape
    assert torch.equal(centred[3]["image"], item["image"])  # still addressed by index alone
    unlabelled = tmp_path / "u.jsonl"
    unlabelled.write_text(json.dumps({"image": image.name}) + "\n")
    with pytest.raises(ValueError, match="need a label map for every scan"):
        RandomCrops(read_datalist(unlabelled), (16, 16, 16), region_ids=[region_id])


def test_random_crops_are_addressed_by_index(tmp_path):
    from maisi2.data import read_datalist

    image, _ = write_scan(tmp_path, "a", (40, 36, 20), seed=1, with_label=False)
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": image.name}) + "\n")
    crops = RandomCrops(read_datalist(tmp_path / "d.jsonl"), (32, 32, 32))
    a, b, c = crops[5], crops[5], crops[6]
    assert a["image"].shape == (1, 32, 32, 32) and torch.equal(a["image"], b["image"])
    assert not torch.equal(a["image"], c["image"])
    assert 0 <= float(a["image"].min()) and float(a["image"].max()) <= 1
    plan = crop_plan(1, batch_size=3, generator=torch.Generator().manual_seed(0))
    assert [len(batch) for batch in plan] == [3]  # one scan still fills a batch


def test_each_adversarial_term_trains_only_its_own_network(tiny_vae):
    import copy

    model = VAETrainingModel(copy.deepcopy(tiny_vae), build_discriminator(channels=4, num_layers=2)).train()
    x = body_like((32, 32, 32))
    out = model(x, torch.zeros(1, 4, 8, 8, 8))

    def grads(loss):
        model.zero_grad(set_to_none=True)
        loss.backward(retain_graph=True)
        vae_g = [p.grad for p in model.vae.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
        disc_g = [p.grad for p in model.discriminator.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
        return len(vae_g), len(disc_g)

    vae_moved, disc_moved = grads(generator_adversarial_loss(out["fake_logits_g"]))
    assert vae_moved > 0 and disc_moved == 0
    vae_moved, disc_moved = grads(discriminator_loss(out["real_logits"], out["fake_logits_d"]))
    assert vae_moved == 0 and disc_moved > 0


def test_adversarial_term_starts_at_adv_start(tiny_vae):
    import copy

    options = VAETrainOptions(patch=(32, 32, 32), adv_weight=0.5, adv_start=3, disc_layers=2, disc_channels=4)
    model = VAETrainingModel(copy.deepcopy(tiny_vae), build_discriminator(4, 2))
    clock = StepClock()
    loss_fn = make_vae_loss(options, clock)
    batch = {"image": body_like((32, 32, 32))}
    clock(2, batch)
    loss_before, logs_before = loss_fn(model, batch, torch.Generator().manual_seed(0))
    clock(3, batch)
    loss_after, logs_after = loss_fn(model, batch, torch.Generator().manual_seed(0))
    assert logs_before["adv_on"] == 0.0 and logs_after["adv_on"] == 1.0
    base = logs_before["recon_l1"] + options.kl_weight * logs_before["kl"]
    assert loss_before.item() == pytest.approx(float(base), rel=1e-5)
    expected = base + 0.5 * logs_after["adv_g"] + logs_after["adv_d"]
    assert loss_after.item() == pytest.approx(float(expected), rel=1e-5)


# -- training runs ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scans")
    rows = []
    for i, shape in enumerate([(40, 36, 30), (36, 36, 32)]):
        image, _ = write_scan(folder, f"s{i}", shape, seed=i, with_label=False)
        rows.append(json.dumps({"image": image.name}))
    path = folder / "train.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


def fast_settings(steps, **kw):
    return TrainSettings(steps=steps, lr=2e-3, log_every=1, ckpt_every=0, ema_decay=0.0, progress=False,
                         tensorboard=False, **kw)


@pytest.mark.slow
def test_a_few_steps_lower_the_reconstruction_error(tmp_path, scans, tiny_vae):
    init = tmp_path / "init.pt"
    cfg = get_config("tiny")
    save_checkpoint(init, Checkpoint(kind="vae", config=cfg, state_dict=tiny_vae.state_dict()))
    from maisi2.data import read_datalist

    # Fixed evaluation crops from the training distribution (crop seeds the run is unlikely to draw).
    crops = RandomCrops(read_datalist(scans), (32, 32, 32))
    x = torch.stack([crops[i]["image"] for i in range(1000, 1004)])

    def error(vae):  # posterior mean -> decode, as the cache and generation use it
        return reconstruction_l1(decode(vae, encode_mean(vae, x)), x).item()

    before = error(tiny_vae)
    result = train_vae(scans, tmp_path / "run", cfg, VAETrainOptions(patch=(32, 32, 32)), fast_settings(8),
                       init=init)
    after = error(load_vae(result.vae).model)
    # Measured: 0.28 -> 0.16 after 12 steps, ~0.18 after 8 (the first steps fix the air/body levels).
    assert after < 0.8 * before, (before, after)
    assert [row["step"] for row in result.rows] == list(range(1, 9))
    # vae.pt is a plain VAE checkpoint: exactly the network's keys, no discriminator, no trainer state.
    ckpt = load_checkpoint(result.vae)
    assert ckpt.kind == "vae" and set(ckpt.state_dict) == set(tiny_vae.state_dict()) and "trainer" not in ckpt.extra
    assert ckpt.extra["vae_options"]["patch"] == [32, 32, 32]


@pytest.mark.slow
def test_adversarial_run_and_resume(tmp_path, scans):
    cfg = get_config("tiny")
    options = VAETrainOptions(patch=(32, 32, 32), adv_weight=0.1, adv_start=1, disc_layers=2, disc_channels=4)
    out = tmp_path / "run"
    first = train_vae(scans, out, cfg, options, fast_settings(2))
    assert first.rows[0]["adv_on"] == 0.0 and first.rows[1]["adv_on"] == 1.0
    assert any(k.startswith("discriminator.") for k in load_checkpoint(first.last).state_dict)
    load_vae(first.last)  # the run state loads as a VAE too (its vae.* part)
    with pytest.raises(FileExistsError, match="--resume"):
        train_vae(scans, out, cfg, options, fast_settings(3))
    with pytest.raises(ValueError, match="adv_weight"):
        train_vae(scans, out, cfg, VAETrainOptions(patch=(32, 32, 32)), fast_settings(3), resume=True)
    second = train_vae(scans, out, cfg, options, fast_settings(3), resume=True)
    assert second.step == 3 and [r["step"] for r in second.rows] == [3]
    assert load_checkpoint(out / VAE_FILE).step == 3


def test_refusals(tmp_path, scans):
    with pytest.raises(ValueError, match="released MAISI VAE unchanged.*--force"):
        train_vae(scans, tmp_path / "r", get_config("maisi-v2"), VAETrainOptions(), fast_settings(1))
    with pytest.raises(ValueError, match="too small for a discriminator with 3 layers"):
        train_vae(scans, tmp_path / "r", get_config("tiny"), VAETrainOptions(patch=(16, 16, 16), adv_weight=0.1),
                  fast_settings(1))
    with pytest.raises(FileNotFoundError, match="datalist"):
        train_vae(tmp_path / "none.jsonl", tmp_path / "r", get_config("tiny"), VAETrainOptions(), fast_settings(1))
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_decoder_only_fine_tuning_keeps_the_encoder(tmp_path, tiny_vae):
    folder = tmp_path / "data"
    folder.mkdir()
    image, label = write_scan(folder, "s", (40, 36, 32), seed=3)
    datalist = folder / "d.jsonl"
    datalist.write_text(json.dumps({"image": image.name, "label": label.name}) + "\n")
    cfg = get_config("tiny")
    init = tmp_path / "init.pt"
    save_checkpoint(init, Checkpoint(kind="vae", config=cfg, state_dict=tiny_vae.state_dict()))
    options = VAETrainOptions(patch=(32, 32, 32), decoder_only=True, region_weight=50, region_labels=(1,),
                              region_crops=0.5)
    result = train_vae(datalist, tmp_path / "run", cfg, options, fast_settings(3), init=init)
    trained = load_checkpoint(result.vae).state_dict
    before = tiny_vae.state_dict()
    changed = {k for k in before if not torch.equal(before[k], trained[k])}
    assert changed and all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed), sorted(changed)[:5]
    assert any(k.startswith("decoder.") for k in changed)
    assert ckpt_options(result.vae)["decoder_only"] is True
    with pytest.raises(ValueError, match="--init"):
        train_vae(datalist, tmp_path / "run2", cfg, options, fast_settings(1))


def ckpt_options(path):
    return load_checkpoint(path).extra["vae_options"]


@pytest.mark.slow
def test_cli_train_vae_then_encode(tmp_path, scans, capsys):
    from maisi2.cli import main

    out = tmp_path / "vae_run"
    args = ["train-vae", str(scans), "--out", str(out), "--preset", "tiny", "--steps", "2", "--patch", "32", "32",
            "32", "--lr", "1e-3", "--device", "cpu", "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"VAE checkpoint: {out / VAE_FILE}" in printed
    assert main(args[:6] + ["--steps", "3"] + args[8:] + ["--resume"]) == 0
    assert load_checkpoint(out / VAE_FILE).step == 3
    capsys.readouterr()
    assert main(["train-vae", str(scans), "--out", str(tmp_path / "x"), "--preset", "maisi-v2"]) == 1
    assert "--force" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # an unknown label id is refused while parsing
        main(["train-vae", str(scans), "--out", str(tmp_path / "x"), "--region-labels", "26,999"])
    assert "999" in capsys.readouterr().err
    # region weights on scans without label maps: a clear error, nothing trained
    assert main(["train-vae", str(scans), "--out", str(tmp_path / "y"), "--preset", "tiny", "--patch", "32", "32",
                 "32", "--region-weight", "10", "--no-progress"]) == 1
    assert "label map for every scan" in capsys.readouterr().err
    assert not (tmp_path / "y" / "last.pt").exists()
    cache = tmp_path / "cache"
    assert main(["encode", str(scans), "--vae", str(out / VAE_FILE), "--out", str(cache), "--no-progress"]) == 0
    assert "encoded 2" in capsys.readouterr().out
    assert (cache / "stats.json").is_file()


def test_one_seed_fixes_the_weight_initialisation(tmp_path, scans):
    """Two runs with one seed end with the same weights, whatever global RNG state the caller left."""
    cfg, options = get_config("tiny"), VAETrainOptions(patch=(16, 16, 16))
    runs = []
    for name in "ab":
        torch.manual_seed(len(runs))  # different global RNG states before each run
        runs.append(load_checkpoint(train_vae(scans, tmp_path / name, cfg, options, fast_settings(1, seed=3)).vae))
    a, b = (run.state_dict for run in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_init_takes_a_bare_weights_file_into_the_run_s_preset(tmp_path, tiny_vae):
    """A model folder's vae.safetensors carries no config: its weights go into the --preset network,
    and weights of another size are refused naming the preset they fit."""
    from safetensors.torch import save_file

    folder = tmp_path / "data"
    folder.mkdir()
    image, _ = write_scan(folder, "s", (36, 36, 32), seed=5)
    datalist = folder / "d.jsonl"
    datalist.write_text(json.dumps({"image": image.name}) + "\n")
    bare = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_vae.state_dict().items()}, str(bare))
    options = VAETrainOptions(patch=(32, 32, 32), decoder_only=True)
    result = train_vae(datalist, tmp_path / "run", get_config("tiny"), options, fast_settings(1), init=bare)
    trained = load_checkpoint(result.vae).state_dict
    encoder = [k for k in tiny_vae.state_dict() if k.startswith("encoder.")]
    assert encoder and all(torch.equal(tiny_vae.state_dict()[k], trained[k]) for k in encoder)
    with pytest.raises(ValueError, match="tiny"):
        train_vae(datalist, tmp_path / "run2", get_config("small"), options, fast_settings(1), init=bare)
