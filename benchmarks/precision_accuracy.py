"""How far bfloat16 and the release's float16 move a generated CT from the float32 one (HU).

Same networks, same noise, same mask; only the arithmetic differs. Sampling variants: ``fp32``;
``bf16`` (maisi2's bf16 compute plan: only the 3x3x3 convolutions of the UNet and ControlNet in
bf16 channels-last, every activation float32, `compute.ComputePlan.lowered`); ``bf16ac`` (the same
networks under bfloat16 autocast with channels-last-3d tensors, the plan of sessions 11-12:
activations in bf16 too); ``fp16`` (the release's GPU path, float16 autocast, run here on the CPU). Decoder variants: ``fp32`` (maisi2's float32 decode); ``bf16``
(the bf16 plan's decoder: 3x3x3 convolutions in bf16 channels-last between float32 activations,
group norms, 1x1 shortcuts and the output convolution float32); ``bf16out`` (the same with the
output convolution in bf16 too); ``bf16ac`` (the whole decoder under bfloat16 autocast,
channels-last: activations and group-norm inputs in bf16); ``fp16`` (the release's: MONAI's
decode under float16 autocast with its float16 group norm). Every pairing is compared with fp32
sampling + fp32 decode, in HU inside the body: max and mean |difference| and the per-organ median
shift (median HU of each label, variant minus float32; the largest |shift| over the labels and
their median are printed).

    python benchmarks/precision_accuracy.py --model released   # maisi-v2 architecture, random weights
    python benchmarks/precision_accuracy.py --model bundled    # the bundled model (small preset)

Released architecture at 128^3 on 1 thread: ~25 CPU minutes on a loaded Xeon with AMX. Volumes
are cached under --work (reruns reuse them).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

# Default rows: each half of the bf16 plan and of the release's fp16 path alone, then both whole.
PAIRS = [("bf16", "fp32"), ("bf16ac", "fp32"), ("fp16", "fp32"), ("fp32", "bf16"), ("fp32", "fp16"), ("bf16", "bf16"),
         ("fp16", "fp16")]


def _networks(model: str):
    """(cfg, unet, controlnet, vae, scale_factor, spacing) for the released architecture or the bundled model."""
    if model == "released":
        from maisi2.benchmarking import networks as released

        cfg, net = released(("vae", "unet", "controlnet"), torch.device("cpu"), reference=False)
        return cfg, net["unet"], net["controlnet"], net["vae"], 1.0, (1.5, 1.5, 1.5)
    from maisi2.models import load_model

    models = load_model(None, device="cpu")
    return models.cfg, models.unet, models.controlnet, models.vae, models.scale_factor, (3.0, 3.0, 3.0)


def _plan(name: str):
    from maisi2 import compute

    if name in ("fp16", "bf16ac"):
        low = compute.NetworkCompute(torch.float16) if name == "fp16" else compute.BF16
        return compute.replace(compute.choose_plan("fp32", "cpu"), unet=low, controlnet=low)
    return compute.choose_plan(name, "cpu")


def _sample(nets, cond, size: int, variant: str, steps: int) -> np.ndarray:
    from maisi2 import sampling

    cfg, unet, controlnet = nets[:3]
    return sampling.sample_latent(unet, cond, (4, size // 4, size // 4, size // 4), cfg.flow, controlnet=controlnet,
                                  steps=steps, seed=0, compute=_plan(variant)).numpy()


def _decode(nets, latent: np.ndarray, variant: str) -> np.ndarray:
    from maisi2 import autoencoder, compute, fastops

    cfg, vae, scale = nets[0], nets[3], nets[4]
    z = torch.from_numpy(latent) / scale
    if variant == "fp16":  # the release: MONAI's layers, float16 group norm, float16 autocast
        fastops.restore_monai_layers(vae)
        norms = [m for m in vae.modules() if hasattr(m, "norm_float16")]
        for m in norms:
            m.norm_float16 = True
        try:
            with torch.no_grad(), compute.autocast("cpu", "fp16"):
                return vae.decode(z).float()[0, 0].numpy()
        finally:
            for m in norms:
                m.norm_float16 = False
            fastops.accelerate(vae)
    if variant == "bf16ac":  # the naive way: every activation of the decoder in bf16
        with torch.no_grad(), compute.autocast("cpu", "bf16"):
            vae.to(memory_format=torch.channels_last_3d)
            try:
                return vae.decode(z.contiguous(memory_format=torch.channels_last_3d)).float()[0, 0].numpy()
            finally:
                vae.to(memory_format=torch.contiguous_format)
    plan = autoencoder.plan_tiles(z.shape[2:], cfg.vae, 8 * 2**30)
    if variant == "bf16out":
        restore = fastops.lower_convolutions(vae.decoder, keep_last=False)
        try:
            return autoencoder.decode_tiled(vae, z, plan)[0, 0].numpy()
        finally:
            restore()
    if variant not in ("fp32", "bf16"):
        raise SystemExit(f"decoder variant {variant!r}: one of fp32, bf16, bf16out, bf16ac, fp16")
    return autoencoder.decode_tiled(vae, z, plan, arithmetic=_plan(variant))[0, 0].numpy()


def _cached(path: Path, make) -> np.ndarray:
    if path.exists():
        return np.load(path)
    start = time.process_time()
    value = make()
    np.save(path, value)
    print(f"  made {path.name} in {time.process_time() - start:.0f} CPU s", flush=True)
    return value


def _compare(hu: np.ndarray, ref: np.ndarray, labels: np.ndarray) -> dict:
    body = labels > 0
    diff = np.abs(hu - ref)[body]
    shifts = [float(np.median(hu[labels == v]) - np.median(ref[labels == v])) for v in np.unique(labels) if v > 0]
    return {"max_hu": float(diff.max()), "mean_hu": float(diff.mean()),
            "organ_median_shift_max_hu": float(np.max(np.abs(shifts))),
            "organ_median_shift_median_hu": float(np.median(np.abs(shifts))), "organs": len(shifts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("released", "bundled"), default="released")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pairs", nargs="+", default=[f"{s}+{d}" for s, d in PAIRS],
                        help="sampling+decoder variants compared with fp32+fp32")
    parser.add_argument("--work", default="work/bench/precision")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from maisi2 import compute, nets as maisi_nets
    from maisi2.data import unit_to_hu
    from maisi2.generate import phantom_mask

    print("command: python " + " ".join(sys.argv))
    print(f"CPU: {compute.CpuCapabilities.detect().describe()}; torch {torch.__version__}, {args.threads} threads")
    work = Path(args.work) / f"{args.model}{args.size}"
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    networks = _networks(args.model)
    volume = phantom_mask((args.size,) * 3, networks[5], seed=0)
    labels = volume.array.astype(np.int64)
    cond = maisi_nets.Conditioning(torch.tensor([volume.spacing], dtype=torch.float32), torch.ones(1, dtype=torch.long),
                                   maisi_nets.mask_to_bitplanes(torch.from_numpy(labels)[None, None]))
    latents = {}

    def hu_of(sampling: str, decoder: str) -> np.ndarray:
        if sampling not in latents:
            latents[sampling] = _cached(work / f"latent_{sampling}.npy",
                                        lambda: _sample(networks, cond, args.size, sampling, args.steps))
        image = _cached(work / f"image_{sampling}_{decoder}.npy", lambda: _decode(networks, latents[sampling], decoder))
        return unit_to_hu(torch.from_numpy(image)).numpy()

    ref = hu_of("fp32", "fp32")
    print(f"\n{args.model} networks, {args.size}^3 phantom mask, {args.steps} steps; HU vs fp32 sampling + fp32 decode, "
          f"inside the body ({int((labels > 0).sum())} voxels)")
    print(f"{'sampling + decoder':<20} {'max |d| HU':>11} {'mean |d| HU':>12} {'organ median shift: max':>24} {'median':>8}")
    for pair in args.pairs:
        sampling, decoder = pair.split("+")
        r = _compare(hu_of(sampling, decoder), ref, labels)
        print(f"{pair:<20} {r['max_hu']:>11.1f} {r['mean_hu']:>12.3f} {r['organ_median_shift_max_hu']:>24.2f} "
              f"{r['organ_median_shift_median_hu']:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
