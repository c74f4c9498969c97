"""The flow recipe: batches, the three stages and their hand-over, resume, torchrun buckets, the CLI.

Everything runs the tiny preset on latent caches of a few 8^3 / 16x8x8 latents built in tmp_path.
"""

import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
from collections import Counter

import pytest
import torch

from maisi2 import latents, nets
from maisi2.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from maisi2.cli import main
from maisi2.config import get_config
from maisi2.latents import LatentRecord, prepare_batch, resize_latent
from maisi2.training import LAST, LOG, DistInfo
from maisi2.train_flow import (FlowRecipe, bucket_batch_sizes, default_recipe, recipe_with_overrides, source_weights,
                               stage_dir, stage_source, train_flow, train_stage)

CFG = get_config("tiny")
SMALL, LONG = (4, 8, 8, 8), (4, 16, 8, 8)


pytestmark = pytest.mark.usefixtures("one_thread")


def make_cache(folder, shapes=(SMALL, LONG, SMALL, LONG, SMALL, LONG, SMALL), sources=None, same=False, scale=1.0):
    """Random latents (or, with `same`, one constant per channel), spacing 1.5 x 1.5 x 2 mm."""
    g = torch.Generator().manual_seed(0)
    pattern = torch.tensor([2.0, -2.0, 1.0, -1.0]).view(4, 1, 1, 1).expand(SMALL)
    for i, shape in enumerate(shapes):
        z = pattern.clone() if same else torch.randn(shape, generator=g)
        source = sources[i] if sources else ("a" if i < 5 else "b")
        latents.write_latent(folder, f"v{i}", z, LatentRecord(file="", spacing=(1.5, 1.5, 2.0), latent_shape=shape,
                                                             modality="ct", source=source))
    latents.write_stats(folder, {"scale_factor": scale, "std": 1 / scale, "mean": 0.0, "count": 1})
    return folder


def recipe(*overrides, **stage_steps):
    base = ["stage1.steps=4", "stage2.steps=4", "stage3.steps=4", "stage1.batch_size=4", "stage1.warmup=0",
            "stage2.warmup=0", "stage2.voxels_per_batch=1024", "ckpt_every=2", "log_every=1", "ema_decay=0.9"]
    return recipe_with_overrides(default_recipe(CFG), [*base, *overrides])


def fresh_unet_checkpoint(path, seed=3):
    torch.manual_seed(seed)
    unet = nets.build_unet(CFG)
    save_checkpoint(path, Checkpoint(kind="unet", config=CFG, state_dict=unet.state_dict()))
    return path


def digest(state):
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode() + state[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# -- recipe ---------------------------------------------------------------------------------------

def test_recipe_json_round_trip_overrides_and_errors():
    r = recipe("stage2.lr=1e-5", "stage1.latent_size=[8, 8, 16]", "modality_dropout=0.1")
    assert FlowRecipe.from_json(r.to_json()) == r
    assert r.stage2.lr == 1e-5 and r.stage1.latent_size == (8, 8, 16) and r.modality_dropout == 0.1
    assert default_recipe(CFG).stage1.latent_size == (8, 8, 8)
    assert default_recipe(get_config("maisi-v2")).stage1.latent_size == (32, 32, 32)
    with pytest.raises(ValueError, match="no such key"):
        recipe("stage2.batch=3")
    with pytest.raises(ValueError, match="stage1.resize"):
        recipe("stage1.resize=nearest")
    with pytest.raises(ValueError, match="stage3: steps must be at least 1"):
        recipe("stage3.steps=0")
    with pytest.raises(ValueError, match="must be an integer"):
        recipe("stage1.batch_size=two")


# -- batches ---------------------------------------------------------------------------------------

def _item(shape, spacing=(1.0, 2.0, 3.0), modality=1):
    return {"latent": torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape),
            "spacing": torch.tensor(spacing), "modality": modality, "source": "a"}


def test_downsample_keeps_the_true_voxel_size():
    latent = torch.ones(4, 16, 8, 8)
    small, spacing = resize_latent(latent, torch.tensor([1.0, 2.0, 3.0]), (8, 8, 4), "downsample", torch.Generator())
    assert small.shape == (4, 8, 8, 4) and torch.allclose(small, torch.ones_like(small))
    assert spacing.tolist() == [2.0, 2.0, 6.0]
    # Area averaging: a 2x2x2 block becomes its mean.
    block = torch.arange(8.0).reshape(1, 2, 2, 2)
    assert resize_latent(block, torch.ones(3), (1, 1, 1), "downsample", torch.Generator())[0].item() == 3.5


def test_crop_is_a_random_window_and_refuses_small_latents():
    item = _item((1, 16, 8, 8))
    g = torch.Generator().manual_seed(0)
    crops = {resize_latent(item["latent"], item["spacing"], (8, 8, 8), "crop", g)[0][0, 0, 0, 0].item() for _ in range(20)}
    assert len(crops) > 1  # different offsets along x
    with pytest.raises(ValueError, match="lower stage1.latent_size"):
        resize_latent(item["latent"], item["spacing"], (32, 8, 8), "crop", g)


def test_prepare_batch_conditioning_and_checks():
    g = torch.Generator().manual_seed(0)
    x0, cond = prepare_batch([_item(SMALL), _item(SMALL, modality=3)], g, torch.device("cpu"), multiple=8)
    assert x0.shape == (2, *SMALL) and cond.modality.tolist() == [1, 3]
    assert cond.spacing.tolist() == [[1.0, 2.0, 3.0]] * 2  # image mm; nets multiplies by 100
    _, dropped = prepare_batch([_item(SMALL)] * 4, g, torch.device("cpu"), modality_dropout=1.0)
    assert dropped.modality.tolist() == [0, 0, 0, 0]  # class 0 = "unknown"
    draws = prepare_batch([_item(SMALL)] * 400, g, torch.device("cpu"), modality_dropout=0.25)[1].modality
    assert 0.15 < (draws == 0).float().mean().item() < 0.35
    with pytest.raises(ValueError, match="mixes latent shapes"):
        prepare_batch([_item(SMALL), _item(LONG)], g, torch.device("cpu"))
    with pytest.raises(ValueError, match="multiple of 8"):
        prepare_batch([_item((4, 12, 8, 8))], g, torch.device("cpu"), multiple=8)
    resized, _ = prepare_batch([_item(SMALL), _item(LONG)], g, torch.device("cpu"), latent_size=(8, 8, 8))
    assert resized.shape == (2, *SMALL)


def test_bucket_batch_sizes_and_source_weights():
    assert bucket_batch_sizes([(8, 8, 8), (16, 8, 8), (64, 64, 64)], 1024, 16) == {
        (8, 8, 8): 2, (16, 8, 8): 1, (64, 64, 64): 1}
    assert bucket_batch_sizes([(2, 2, 2)], 10**6, 16) == {(2, 2, 2): 16}
    sources = ["a"] * 3 + ["b"]
    assert source_weights("inverse", sources) == {"a": 1.0, "b": 1.0}
    assert source_weights("uniform", sources) == {"a": 3.0, "b": 1.0}
    assert source_weights("a=2, b=0.5", sources) == {"a": 2.0, "b": 0.5}
    with pytest.raises(ValueError, match="name=weight"):
        source_weights("a:2", sources)


def test_balanced_stage_draws_sources_equally(tmp_path):
    cache = make_cache(tmp_path, shapes=[SMALL] * 10, sources=["a"] * 9 + ["b"])
    dataset = latents.LatentDataset(cache)
    source = stage_source(3, dataset, recipe(), DistInfo())
    g = torch.Generator().manual_seed(0)
    drawn = [dataset.records[i].source for _ in range(60) for batch in source.plan(g) for i in batch]
    assert all(len(batch) == 1 for batch in source.plan(g))
    assert 0.4 < Counter(drawn)["b"] / len(drawn) < 0.6  # uniform over volumes would give 0.1
    with pytest.raises(ValueError, match="exactly the datalist's sources"):
        stage_source(3, dataset, recipe("stage3.source_weights=a=1"), DistInfo())


# -- training ----------------------------------------------------------------------------------------

def test_loss_decreases_on_a_learnable_cache(tmp_path):
    """Every latent is the same constant per channel: the model can learn x0, so the velocity error drops."""
    cache = make_cache(tmp_path / "cache", shapes=[SMALL] * 4, same=True)
    r = recipe("stage1.steps=25", "stage1.lr=3e-3", "stage1.batch_size=2", "stage1.schedule=constant", "ckpt_every=0")
    result = train_stage(1, cache, tmp_path / "out", CFG, r, device="cpu", progress=False)
    losses = [row["loss"] for row in result.rows]
    assert len(losses) == 25
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.75 * first, (first, last)


def test_a_unet_fitted_to_one_latent_samples_that_latent(tmp_path):
    """Training and sampling agree on the flow convention end to end (time direction, velocity sign,
    shift, conditioning): a UNet fitted to a single latent, sampled with 30 Euler steps from fresh
    noise, lands near that latent. A sign or time-direction slip anywhere sends it elsewhere."""
    from maisi2 import sampling

    cache = make_cache(tmp_path / "cache", shapes=[SMALL] * 4, same=True)
    r = recipe("stage1.steps=150", "stage1.lr=3e-3", "stage1.batch_size=4", "stage1.schedule=constant",
               "ckpt_every=0")
    model = train_stage(1, cache, tmp_path / "out", CFG, r, device="cpu", progress=False).model.eval()
    target = torch.tensor([2.0, -2.0, 1.0, -1.0]).view(1, 4, 1, 1, 1).expand(1, *SMALL)
    cond = nets.Conditioning(torch.tensor([[1.5, 1.5, 2.0]]), torch.tensor([nets.modality_id("ct")]))
    for seed in (0, 1):
        sample = sampling.sample_latent(model, cond, SMALL, CFG.flow, steps=30, seed=seed)
        noise = sampling.initial_noise(SMALL, seed)
        assert (sample - target).abs().mean() < 0.5 * (noise - target).abs().mean()


def test_stages_hand_over_and_sample_as_designed(tmp_path):
    cache = make_cache(tmp_path / "cache")
    seen = {1: [], 2: [], 3: []}
    stage = iter([1] * 4 + [2] * 4 + [3] * 4)

    def record(step, items):
        seen[next(stage)].append([tuple(item["latent"].shape) for item in items])

    # lr 0 in stages 2 and 3: their raw weights must stay exactly stage 1's final weights.
    r = recipe("stage2.lr=0.0", "stage3.lr=0.0")
    results = train_flow(cache, tmp_path / "out", CFG, r, device="cpu", progress=False, on_batch=record)
    ckpts = {k: load_checkpoint(stage_dir(tmp_path / "out", k) / LAST) for k in (1, 2, 3)}
    assert all(ckpts[k].step == 4 and ckpts[k].extra["stage"] == k for k in ckpts)
    assert ckpts[2].extra["init"] == str(stage_dir(tmp_path / "out", 1) / LAST)
    assert digest(ckpts[1].state_dict) == digest(ckpts[2].state_dict) == digest(ckpts[3].state_dict)
    assert digest(results[3].model.state_dict()) == digest(ckpts[1].state_dict)
    # Stage 1: one shuffled batch of 4 then the remaining 3, any shapes (resized in the loss).
    assert [len(b) for b in seen[1][:2]] == [4, 3] and {s for b in seen[1] for s in b} == {SMALL, LONG}
    # Stage 2, one process: cycles through both buckets, each batch one shape with its own batch size.
    assert {(b[0], len(b)) for b in seen[2]} == {(SMALL, 2), (LONG, 1)} and all(len(set(b)) == 1 for b in seen[2])
    # Stage 3: batch 1.
    assert all(len(b) == 1 for b in seen[3])
    for k in (1, 2, 3):
        assert (stage_dir(tmp_path / "out", k) / LOG).is_file()


def test_checkpoint_has_ema_scale_factor_and_recipe(tmp_path):
    cache = make_cache(tmp_path / "cache", scale=0.75)
    r = recipe("modality_dropout=0.5")
    result = train_stage(2, cache, tmp_path / "out", CFG, r, device="cpu", progress=False)
    ckpt = load_checkpoint(result.checkpoint)
    assert ckpt.kind == "unet" and ckpt.config == CFG and ckpt.scale_factor == 0.75
    assert FlowRecipe.from_json(ckpt.extra["recipe"]) == r and ckpt.extra["stage"] == 2
    assert digest(ckpt.weights()) == digest(result.ema_state_dict) != digest(ckpt.state_dict)
    unet = nets.build_unet(CFG)
    unet.load_state_dict(ckpt.weights(), strict=True)  # the EMA is a complete UNet state dict


class _Crash(Exception):
    pass


@pytest.mark.parametrize("k", [1, 2, 3])
def test_resume_matches_an_uninterrupted_stage(tmp_path, k):
    """Crop offsets, modality dropout, timesteps, noise and the data order all come back on resume."""
    cache = make_cache(tmp_path / "cache")
    r = recipe("stage1.resize=crop", "ckpt_every=2", "modality_dropout=0.5", "stage1.batch_size=2")  # 4 steps each

    def crash(step, items):
        if step == 2:
            raise _Crash

    straight = train_stage(k, cache, tmp_path / "a", CFG, r, device="cpu", progress=False)
    with pytest.raises(_Crash):
        train_stage(k, cache, tmp_path / "b", CFG, r, device="cpu", progress=False, on_batch=crash)
    resumed = train_stage(k, cache, tmp_path / "b", CFG, r, resume=True, device="cpu", progress=False)
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    assert digest(straight.ema_state_dict) == digest(resumed.ema_state_dict)


def test_later_stage_needs_the_previous_one_or_init(tmp_path):
    cache = make_cache(tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="run stage 2 first.*--init"):
        train_flow(cache, tmp_path / "out", CFG, recipe(), stages=[3], device="cpu")
    init = fresh_unet_checkpoint(tmp_path / "init.pt")
    r = recipe("stage3.lr=0.0")
    result = train_flow(cache, tmp_path / "out", CFG, r, stages=[3], init=init, device="cpu", progress=False)[3]
    assert digest(result.model.state_dict()) == digest(load_checkpoint(init).state_dict)
    small = get_config("small")
    with pytest.raises(ValueError, match="do not match"):
        train_flow(cache, tmp_path / "other", small, default_recipe(small), stages=[3], init=init, device="cpu")


def test_a_resumable_run_started_from_init_says_so(tmp_path, capsys):
    cache = make_cache(tmp_path / "cache")
    init = fresh_unet_checkpoint(tmp_path / "init.pt")
    train_flow(cache, tmp_path / "out", CFG, recipe("stage3.lr=0.0"), stages=[3], init=init, resume=True,
               device="cpu", progress=False)
    err = capsys.readouterr().err
    assert f"starting from {init}" in err and "from scratch" not in err


# -- data parallel -----------------------------------------------------------------------------------

WORKER = textwrap.dedent("""
    import hashlib, json, os, sys
    import torch
    torch.set_num_threads(1)
    from maisi2.config import get_config
    from maisi2.train_flow import default_recipe, recipe_with_overrides, train_flow

    cache, out, init = sys.argv[1:4]
    rank = int(os.environ["RANK"])
    seen = []
    cfg = get_config("tiny")
    recipe = recipe_with_overrides(default_recipe(cfg), [
        "stage2.steps=4", "stage2.warmup=0", "stage2.lr=1e-3", "stage2.voxels_per_batch=1024",
        "ckpt_every=2", "log_every=1", "ema_decay=0.9"])

    def record(step, items):
        seen.append({"step": step, "shapes": sorted({tuple(x["latent"].shape) for x in items}), "batch": len(items)})

    result = train_flow(cache, out, cfg, recipe, stages=[2], init=init, device="cpu", progress=False,
                        on_batch=record)[2]

    def digest(state):
        h = hashlib.sha256()
        for key in sorted(state):
            h.update(key.encode() + state[key].detach().contiguous().numpy().tobytes())
        return h.hexdigest()

    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"weights": digest(result.model.state_dict()), "ema": digest(result.ema_state_dict),
                   "seen": seen}, f)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_ranks_serve_one_bucket_each(tmp_path):
    cache = make_cache(tmp_path / "cache")
    init = fresh_unet_checkpoint(tmp_path / "init.pt")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(script), str(cache), str(out), str(init)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    ckpt = load_checkpoint(stage_dir(out, 2) / LAST)
    # Identical weights and EMA on both ranks, equal to what rank 0 saved, and not the start.
    assert ranks[0]["weights"] == ranks[1]["weights"] == digest(ckpt.state_dict) != digest(load_checkpoint(init).state_dict)
    assert ranks[0]["ema"] == ranks[1]["ema"] == digest(ckpt.ema_state_dict)
    # Each rank served one bucket, with that bucket's batch size, for every one of the 4 steps.
    served = [{(tuple(s["shapes"][0]), s["batch"]) for s in rank["seen"]} for rank in ranks]
    assert all(len(rank["seen"]) == 4 and all(len(s["shapes"]) == 1 for s in rank["seen"]) for rank in ranks)
    assert sorted(served, key=str) == sorted([{(SMALL, 2)}, {(LONG, 1)}], key=str)
    # Rank 0 checkpointed both ranks' RNG and data positions (for an exact resume).
    assert len(ckpt.extra["trainer"]["ranks"]) == 2 and not (stage_dir(out, 2) / "rank1").exists()


# -- CLI ----------------------------------------------------------------------------------------------

def test_cli_trains_all_stages_and_resumes(tmp_path, capsys):
    cache = make_cache(tmp_path / "cache")
    out = tmp_path / "out"
    args = ["train-flow", str(cache), "--out", str(out), "--preset", "tiny", "--steps", "2", "--device", "cpu",
            "--no-progress", "--amp", "fp32", "--recipe-set", "stage2.voxels_per_batch=1024",
            "--recipe-set", "ckpt_every=1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    for k in (1, 2, 3):
        assert f"stage {k}: step 2 -> {stage_dir(out, k) / LAST}" in printed
    assert load_checkpoint(stage_dir(out, 3) / LAST).extra["init"] == str(stage_dir(out, 2) / LAST)
    assert [load_checkpoint(stage_dir(out, k) / LAST).steps_in_all for k in (1, 2, 3)] == [2, 4, 6]
    assert main(args) == 1  # a second run must not overwrite the first
    assert "--resume" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0  # finished stages are kept as they are
    assert main([*args[:-4], "--stage", "3", "--steps", "3", "--resume"]) == 0  # extend stage 3
    assert load_checkpoint(stage_dir(out, 3) / LAST).step == 3
    resumed = load_checkpoint(stage_dir(out, 3) / LAST)
    assert resumed.steps_in_all == 7  # a resumed stage keeps its start count ...
    assert resumed.extra["init"] == str(stage_dir(out, 2) / LAST)  # ... and its origin
    bad = tmp_path / "recipe.json"
    bad.write_text("{not json")
    assert main([*args, "--recipe", str(bad)]) == 1
    assert "not valid JSON" in capsys.readouterr().err


# -- the DDPM baseline objective ------------------------------------------------------------------

def test_ddpm_objective_is_monai_noising_with_an_l1_noise_target():
    """ddpm_loss = |net(MONAI DDPMScheduler.add_noise(x0, noise, t), t) - noise| for the same draws."""
    from monai.networks.schedulers import DDPMScheduler

    from maisi2.ddpm import MAISI_DDPM_SCHEDULE
    from maisi2.train_flow import ddpm_loss

    torch.manual_seed(0)
    unet = nets.build_unet(CFG).eval()
    x0 = torch.randn(SMALL)[None].repeat(2, 1, 1, 1, 1)
    cond = nets.Conditioning(spacing=torch.tensor([[1.5, 1.5, 2.0]] * 2), modality=torch.tensor([1, 1]))
    with torch.no_grad():
        ours = ddpm_loss(unet, x0, cond, CFG.flow, torch.Generator().manual_seed(7))
        g = torch.Generator().manual_seed(7)  # the same draws, in the same order: noise, then t
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (2,), generator=g)
        sched = DDPMScheduler(**{k: v for k, v in MAISI_DDPM_SCHEDULE.items()}, clip_sample=False)
        x_t = sched.add_noise(x0, noise, t)
        eps = nets.predict_velocity(unet, x_t, t.float(), cond)
        expected = (eps - noise).abs().mean()
    assert torch.allclose(ours, expected, rtol=1e-6, atol=1e-7)


def test_ddpm_objective_trains_through_the_stage_recipe(tmp_path):
    cache = make_cache(tmp_path / "cache", shapes=[SMALL] * 4, same=True)
    r = recipe("objective=\"ddpm\"", "stage1.steps=25", "stage1.lr=3e-3", "stage1.batch_size=2",
               "stage1.schedule=constant", "ckpt_every=0")
    assert r.objective == "ddpm"
    result = train_stage(1, cache, tmp_path / "out", CFG, r, device="cpu", progress=False)
    losses = [row["loss"] for row in result.rows]
    # Noise prediction is harder to learn than x0 here (it must undo the schedule); 25 steps give ~0.77x.
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5, losses
    with pytest.raises(ValueError, match="objective must be one of"):
        recipe("objective=\"ddim\"")
