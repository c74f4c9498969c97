"""Generation speed and memory: maisi2 against the reference inference path, side by side.

The reference is how the original release runs inference, rebuilt here from MONAI primitives:
MONAI's `RFlowScheduler` loop calling `ControlNetMaisi` and then `DiffusionModelUNetMaisi` at every
step, then the VAE decode as the release does it: the whole latent at once when it has no more
voxels than the window, else MONAI's `SlidingWindowInferer` (gaussian blending, overlap 0.4,
window 80^3 latent voxels clamped per axis to the latent), with the autoencoder's tensor splitting
as configured (num_splits 4 on axis 1), on the CPU in fp32 with its half-precision normalisation
off (it only runs under fp16 autocast). The networks are MONAI's own classes (maisi2's faster
layers taken out again with `fastops.restore_monai_layers`). Ours is what `maisi2 generate` runs:
`sampling.sample_latent` (mask embedding computed once, fused upsampling blocks), the UNet and
ControlNet let go (as `generate` does with networks it loaded), and `autoencoder.decode_tiled` with the
plan `autoencoder.plan_tiles` makes for the memory budget.

Same networks (``maisi-v2`` architecture, random weights from one seed, perturbed so that the
zero-initialised layers are not zero), same noise, same mask, same machine, same run. Each variant
runs in a fresh subprocess; its peak resident memory is the process's VmHWM (whole process:
weights included); on CUDA the peak is ``torch.cuda.max_memory_allocated``. Each runs with the
allocator a user would get: the reference with glibc's defaults (the release changes nothing),
ours with `maisi2.allocator.reuse_freed_memory`, as `generate` sets it. The variant
``reference_reuse`` is the reference with that same allocator policy, to show what part of the
difference is the allocator.

    python benchmarks/generation_speed.py e2e                   # mask -> CT at 128^3 (2 cores: ~3 min on a Zen 5, ~9 on a Zen 3)
    python benchmarks/generation_speed.py decode --spill-dir D  # 512x512x128 decode (2 cores: ~30 min on a Zen 5, ~1.6 h on a Zen 3)
    python benchmarks/generation_speed.py decode --shape 512 512 512 --variants ours --budget-gb 16 --spill-dir D
    python benchmarks/generation_speed.py limit                 # best 3D-conv GFLOP/s per dtype/layout + FLOP counts
    python benchmarks/generation_speed.py e2e --variants reference ours ours_bf16   # + the bf16 sampling plan

``ours`` runs the compute plan ``--precision auto`` picks on this machine; ``ours_bf16`` forces
``--precision bf16`` (the 3x3x3 convolutions of the flow UNet, ControlNet and VAE decoder in
bfloat16 channels-last-3d between float32 activations) and ``ours_fp32`` ``--precision fp32``,
for ``e2e`` and ``decode`` alike (on a CPU without bf16 hardware ``ours`` is ``ours_fp32``). Every
table is printed with the CPU model and its ISA (`maisi2.compute.CpuCapabilities`), as the Markdown
table docs/performance.md shows (`e2e_table`, `decode_table`, `limit_table`).

Results (JSON lines) are appended to ``--out`` (default work/bench/generation_speed.jsonl), so an
interrupted run keeps what it finished and ``--resume`` skips variants already there.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from maisi2.benchmarking import SEED, latent_from_seed, networks, our_decode, peak_rss_mib, phantom_conditioning

# Our variants and the `--precision` each runs under.
OURS = {"ours": "auto", "ours_bf16": "bf16", "ours_fp32": "fp32"}
WINDOW = 80  # latent voxels per axis of the release's sliding-window decode
OVERLAP = 0.4
# -- measurement helpers ---------------------------------------------------------------------

def _peak_mib(device) -> dict:
    import torch

    out = {"peak_rss_mib": peak_rss_mib()}
    if device.type == "cuda":
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _cpu_seconds() -> float:
    """User + system CPU time of this process: less disturbed than wall time by other processes."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _reference_decode(vae, z, device):
    """The release's decode: whole latent when it fits the window, else MONAI's sliding window."""
    import torch
    from monai.inferers import SlidingWindowInferer

    window = tuple(min(WINDOW, n) for n in z.shape[2:])
    with torch.no_grad():
        if math.prod(z.shape[2:]) <= WINDOW**3:
            return vae.decode(z.to(device)).float().cpu()
        inferer = SlidingWindowInferer(roi_size=window, sw_batch_size=1, overlap=OVERLAP, mode="gaussian",
                                       sw_device=device, device=torch.device("cpu"), progress=False)
        return inferer(z, vae.decode_stage_2_outputs).float()


# -- workers (run in subprocesses) ------------------------------------------------------------

def _e2e(args, device, reference: bool) -> dict:
    import numpy as np
    import torch

    from maisi2 import allocator, nets, sampling
    from maisi2.data import unit_to_hu

    cfg, net = networks(("vae", "unet", "controlnet"), device, reference)
    scale_factor = 1.0
    cond = phantom_conditioning(args.size).to(device)
    latent_shape = (4, *(n // 4 for n in cond.mask_bits.shape[2:]))
    _sync(device)
    start, cpu_start, step_times = time.perf_counter(), _cpu_seconds(), []
    last = [start]

    def tick(_=None):
        _sync(device)
        now = time.perf_counter()
        step_times.append(now - last[0])
        last[0] = now

    if reference:
        from monai.networks.schedulers.rectified_flow import RFlowScheduler

        scheduler = RFlowScheduler(num_train_timesteps=1000, use_discrete_timesteps=False, use_timestep_transform=True,
                                   sample_method="uniform", scale=1.4)
        scheduler.set_timesteps(num_inference_steps=args.steps, device=device,
                                input_img_size_numel=math.prod(latent_shape[1:]))
        times = scheduler.timesteps
        nexts = torch.cat((times[1:], torch.tensor([0], dtype=times.dtype, device=device)))
        x = sampling.initial_noise(latent_shape, SEED, device)
        spacing = cond.spacing * nets.SPACING_SCALE
        with torch.no_grad():
            for t, t_next in zip(times, nexts):
                tt = torch.tensor([float(t)], device=device)
                down, mid = net["controlnet"](x=x, timesteps=tt, controlnet_cond=cond.mask_bits,
                                              conditioning_scale=1.0, class_labels=cond.modality)
                v = net["unet"](x=x, timesteps=tt, spacing_tensor=spacing, class_labels=cond.modality,
                                down_block_additional_residuals=down, mid_block_additional_residual=mid)
                x, _ = scheduler.step(v, t, x, t_next)
                tick()
        _sync(device)
        sampled, cpu_sampled = time.perf_counter(), _cpu_seconds()
        image = _reference_decode(net["vae"], x / scale_factor, device)
        plan = compute_plan = None
    else:
        from maisi2 import compute

        plan = compute.choose_plan(OURS[args.variant], device)
        x = sampling.sample_latent(net["unet"], cond, latent_shape, cfg.flow, controlnet=net["controlnet"],
                                   steps=args.steps, seed=SEED, callback=tick, compute=plan)
        compute_plan = plan.to_dict()
        # What `generate` does with networks it loaded itself (`Models.release_diffusion`): the UNet
        # and ControlNet are let go before decoding. The reference keeps all three loaded, as the release does.
        del net["unet"], net["controlnet"]
        gc.collect()
        allocator.give_back_freed_memory()
        _sync(device)
        sampled, cpu_sampled = time.perf_counter(), _cpu_seconds()
        image, plan = our_decode(net["vae"], cfg, x / scale_factor, device, args.budget_gb, compute=plan)
    _sync(device)
    done, cpu_done = time.perf_counter(), _cpu_seconds()
    hu = unit_to_hu(image[0, 0]).numpy()
    out = Path(args.out).with_suffix("")
    np.save(f"{out}_e2e{args.size}_{args.variant}.npy", image[0, 0].numpy())
    np.save(f"{out}_e2e{args.size}_{args.variant}_latent.npy", x.cpu().numpy())
    return {"total_s": done - start, "sampling_s": sampled - start, "per_step_s": (sampled - start) / args.steps,
            "decode_s": done - sampled, "step_min_s": min(step_times), "step_median_s": sorted(step_times)[len(step_times) // 2],
            "cpu_sampling_s": cpu_sampled - cpu_start, "cpu_decode_s": cpu_done - cpu_sampled,
            "plan": plan, "compute_plan": compute_plan,
            "hu_mean": float(hu.mean()), **_peak_mib(device)}


def _decode(args, device, variant: str) -> dict:
    import numpy as np
    import torch

    from maisi2 import autoencoder

    reference = variant.startswith("reference")
    cfg, net = networks(("vae",), device, reference=reference)
    vae = net["vae"]
    z = latent_from_seed([n // 4 for n in args.shape])
    _sync(device)
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    plan = None
    if reference:
        image = _reference_decode(vae, z, device)
    elif variant in OURS:
        from maisi2 import compute

        arithmetic = compute.choose_plan(OURS[variant], device)
        image, plan = our_decode(vae, cfg, z, device, args.budget_gb, args.spill_dir, compute=arithmetic)
        plan = {**plan, "compute_plan": arithmetic.to_dict()}
    else:  # "whole": the exact whole-volume decode (streamed, float32), what both are compared with
        image = autoencoder.decode_streamed(vae, z, storage=torch.float32, spill_dir=args.spill_dir)
    _sync(device)
    seconds = time.perf_counter() - start
    name = "x".join(map(str, args.shape))
    np.save(f"{Path(args.out).with_suffix('')}_decode{name}_{variant}.npy", image[0, 0].numpy())
    return {"decode_s": seconds, "cpu_decode_s": _cpu_seconds() - cpu_start, "plan": plan, **_peak_mib(device)}


LIMIT_KINDS = {"fp32": ("float32", False), "fp32_cl": ("float32", True), "bf16": ("bfloat16", False),
               "bf16_cl": ("bfloat16", True)}


def _limit(args, device) -> dict:
    """Best 3D-conv throughput over decoder/UNet-like shapes for each dtype and layout (float32 and
    bfloat16, contiguous and channels-last-3d), and FLOPs of one step and one decode."""
    import torch
    import torch.nn.functional as F

    best, shapes = {k: 0.0 for k in LIMIT_KINDS}, []
    for cin, cout, n in [(64, 64, 64), (128, 64, 64), (128, 128, 48), (256, 256, 32), (64, 64, 32), (512, 512, 16)]:
        row = {"shape": f"{cin}->{cout} @ {n}^3"}
        for kind, (dtype, channels_last) in LIMIT_KINDS.items():
            fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
            x = torch.randn(1, cin, n, n, n, device=device).to(getattr(torch, dtype)).contiguous(memory_format=fmt)
            w = torch.randn(cout, cin, 3, 3, 3, device=device).to(getattr(torch, dtype)).contiguous(memory_format=fmt)
            seconds = []
            with torch.no_grad():
                for _ in range(4):
                    _sync(device)
                    t0 = time.perf_counter()
                    F.conv3d(x, w, padding=1)
                    _sync(device)
                    seconds.append(time.perf_counter() - t0)
            row[kind] = 2 * cin * cout * 27 * n**3 / min(seconds[1:]) / 1e9
            best[kind] = max(best[kind], row[kind])
        shapes.append(row)
    return {"conv_gflops_best": best["fp32"], "conv_gflops_best_by_kind": best, "conv_shapes": shapes,
            **_flop_counts(device)}


def _flop_counts(device) -> dict:
    """Multiply-adds x 2 of every convolution and linear layer, counted with forward hooks on a
    small input and scaled to the benchmark sizes (all of them grow linearly with the voxels; the
    attention products, which do not, are counted too and are a small share)."""
    import torch
    from torch import nn

    from maisi2 import nets

    # MONAI's modules; the VAE without tensor splitting, whose overlapping splits add convolutions
    cfg, net = networks(("vae", "unet", "controlnet"), device, reference=True, overrides=("vae.num_splits=1",))
    counted = {"n": 0.0}

    def conv_hook(module, inputs, output):
        k = math.prod(module.kernel_size)
        counted["n"] += 2 * module.in_channels // module.groups * k * output.numel()

    def linear_hook(module, inputs, output):
        counted["n"] += 2 * module.in_features * output.numel()

    for model in net.values():
        for m in model.modules():
            if isinstance(m, nn.Conv3d):
                m.register_forward_hook(conv_hook)
            elif isinstance(m, nn.Linear):
                m.register_forward_hook(linear_hook)
    n = 16  # latent edge counted; scaled by (32/16)^3 to the 128^3 image
    cond = nets.Conditioning(torch.ones(1, 3), torch.ones(1, dtype=torch.long),
                             torch.zeros(1, 8, 4 * n, 4 * n, 4 * n)).to(device)
    x = torch.randn(1, 4, n, n, n, device=device)
    t = torch.tensor([500.0], device=device)
    with torch.no_grad():
        nets.predict_velocity(net["unet"], x, t, cond)
        unet = counted["n"]
        counted["n"] = 0.0
        net["controlnet"](x=x, timesteps=t, controlnet_cond=cond.mask_bits, class_labels=cond.modality)
        controlnet = counted["n"]
        counted["n"] = 0.0
        net["controlnet"].controlnet_cond_embedding(cond.mask_bits)
        embedding = counted["n"]
        counted["n"] = 0.0
        net["vae"].decode(x)
        vae = counted["n"]
    scale = (32 / n) ** 3
    return {"flops_unet_step_32": unet * scale, "flops_controlnet_step_32": controlnet * scale,
            "flops_mask_embedding_32": embedding * scale, "flops_decode_per_latent_voxel": vae / n**3}


def _worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from maisi2.nets import resolve_device

    device = resolve_device(args.device)
    if args.variant != "reference":
        from maisi2 import allocator

        allocator.reuse_freed_memory()  # what `generate` and training set; the reference keeps glibc's defaults
    if args.command == "e2e":
        return _e2e(args, device, reference=args.variant.startswith("reference"))
    if args.command == "decode":
        return _decode(args, device, args.variant)
    return _limit(args, device)


# -- driver ------------------------------------------------------------------------------------

def _key(args, variant: str) -> str:
    size = args.size if args.command == "e2e" else "x".join(map(str, getattr(args, "shape", [])))
    return f"{args.command}:{size}:{variant}:{args.device}:{args.threads}"


def _done(args) -> dict:
    path = Path(args.out)
    rows = {}
    if path.exists():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            rows[row["key"]] = row
    return rows


def _run(args, variant: str) -> dict:
    cmd = [sys.executable, __file__, args.command, "--worker", variant, "--device", args.device,
           "--threads", str(args.threads), "--out", args.out, "--steps", str(args.steps), "--size", str(args.size),
           "--shape", *map(str, args.shape)]
    if args.budget_gb is not None:
        cmd += ["--budget-gb", str(args.budget_gb)]
    if args.spill_dir:
        cmd += ["--spill-dir", args.spill_dir]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        row = {"error": f"exit code {done.returncode}", "stderr": done.stderr[-2000:],
               "wall_s": time.perf_counter() - start}
    else:
        row = json.loads(done.stdout.strip().splitlines()[-1])
    row.update(key=_key(args, variant), command=args.command, variant=variant, device=args.device,
               threads=args.threads, when=time.strftime("%Y-%m-%d %H:%M:%S"))
    with open(args.out, "a") as handle:
        handle.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)
    return row


def _compare(a, b) -> dict:
    """max and mean |a - b| in [0, 1] units (unclipped) and in HU (after the [0, 1] clip)."""
    import numpy as np

    from maisi2.data import unit_to_hu

    diff = np.abs(a - b)
    hu = np.abs(unit_to_hu(a) - unit_to_hu(b))
    return {"max_unit": float(diff.max()), "mean_unit": float(diff.mean()),
            "max_hu": float(hu.max()), "mean_hu": float(hu.mean())}


def _peak(row: dict) -> float:
    """The peak that bounds the run: GPU memory on CUDA, resident memory on CPU."""
    return row.get("cuda_peak_mib", row["peak_rss_mib"])


# -- the tables docs/performance.md shows (tests/test_results_tables.py holds the two together) --

LABELS = {"reference": "reference (the release's path, float32)",
          "reference_reuse": "reference_reuse (the reference under our allocator policy)",
          "ours": "ours, `auto`", "ours_bf16": "ours, `--precision bf16`", "ours_fp32": "ours, `--precision fp32`"}
NETWORK_NAMES = {"unet": "UNet", "controlnet": "ControlNet", "vae_decoder": "decoder"}  # the encoder: not used here
DTYPE_NAMES = {"bfloat16": "bf16", "float16": "float16", "float32": "float32"}


def _md_row(cells) -> str:
    return "|" + "".join(f" {cell} |" if cell != "" else " |" for cell in cells)


def _whole(x: float) -> str:
    """A whole number, thousands set off by a space from 10 000 on, as the docs write them."""
    return f"{x:,.0f}".replace(",", " ") if abs(x) >= 9999.5 else f"{x:.0f}"


def _hu(x: float) -> str:
    """An HU difference to two significant figures, one decimal from 10 HU on, never in e-notation."""
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.{max(1, 1 - math.floor(math.log10(x)))}f}" if x > 0 else "0"


def _plan_words(compute_plan: dict) -> str:
    """What a compute plan runs each generating network in: 'UNet and ControlNet bf16, decoder float32'."""
    by_dtype: dict[str, list[str]] = {}
    for network, name in NETWORK_NAMES.items():
        if network in compute_plan["networks"]:
            dtype = compute_plan["networks"][network]["dtype"]
            by_dtype.setdefault(DTYPE_NAMES.get(dtype, dtype), []).append(name)
    parts = []
    for dtype, names in by_dtype.items():
        parts.append((", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]) + f" {dtype}")
    return ", ".join(parts)


def _peak_header(rows: dict[str, dict]) -> str:
    return "GPU peak MiB" if any("cuda_peak_mib" in r for r in rows.values()) else "peak MiB"


def _reference_pairs(rows: dict[str, dict]):
    """(reference name, our variant, its row, our row) for every reference and ours both in `rows`:
    the ratio rows of the tables."""
    for name in ("reference", "reference_reuse"):
        for mine in OURS:
            if name in rows and mine in rows:
                yield name, mine, rows[name], rows[mine]


def _agreement_cell(agree: dict | None) -> str:
    return f"{_hu(agree['max_hu'])} / {_hu(agree['mean_hu'])}" if agree else ""


def e2e_table(rows: dict[str, dict], agreement: dict[str, dict] | None = None) -> str:
    """The Markdown table of an `e2e` run: a row per variant, then the ratio of each reference to each of ours.

    `rows` maps a variant to its stored row (as in --out), failed ones left out; `agreement` maps
    each of ours to `_compare`'s figures against the reference's CT (the caller loads the volumes).
    The step column and its ratio are medians: one slow step (the machine, not the code) moves a mean.
    """
    agreement = agreement or {}
    order = [v for v in ("reference", "reference_reuse", *OURS) if v in rows]
    peak_name = _peak_header(rows)
    lines = [_md_row(["", "total s", "s / step (median)", "sampling s", "decode s", "CPU s sampling / decode",
                      peak_name, "vs reference: max / mean \\|d\\| HU"]),
             _md_row(["---", *["---:"] * 6, "---"])]
    for variant in order:
        r = rows[variant]
        label = LABELS[variant]
        if variant == "ours" and r.get("compute_plan"):
            label += f" ({_plan_words(r['compute_plan'])})"
        agree = agreement.get(variant)
        lines.append(_md_row([label, f"{r['total_s']:.1f}", f"{r['step_median_s']:.2f}", f"{r['sampling_s']:.1f}",
                              f"{r['decode_s']:.1f}", f"{r['cpu_sampling_s']:.1f} / {r['cpu_decode_s']:.1f}",
                              _whole(_peak(r)), _agreement_cell(agree)]))
    for name, mine, ref, ours in _reference_pairs(rows):
        cpu = (ref["cpu_sampling_s"] + ref["cpu_decode_s"]) / (ours["cpu_sampling_s"] + ours["cpu_decode_s"])
        lines.append(_md_row([f"ratio {name} / `{OURS[mine]}`", f"{ref['total_s'] / ours['total_s']:.2f}x",
                              f"{ref['step_median_s'] / ours['step_median_s']:.2f}x",
                              f"{ref['sampling_s'] / ours['sampling_s']:.2f}x",
                              f"{ref['decode_s'] / ours['decode_s']:.2f}x", f"{cpu:.2f}x (all CPU s)",
                              f"{_peak(ours) / _peak(ref):.2f}", ""]))
    return "\n".join(lines)


def _decoder_dtype(row: dict) -> str:
    """The dtype a `decode` row's decoder ran in; rows from before compute plans ran float32."""
    compute_plan = (row.get("plan") or {}).get("compute_plan")
    return compute_plan["networks"]["vae_decoder"]["dtype"] if compute_plan else "float32"


def _decode_label(variant: str, row: dict) -> str:
    if variant == "whole":
        return "whole (the exact whole-volume decode, float32)"
    label = LABELS[variant]
    if variant == "ours" and (row.get("plan") or {}).get("compute_plan"):
        dtype = _decoder_dtype(row)
        label += f" ({DTYPE_NAMES.get(dtype, dtype)} decoder)"
    return label


def decode_table(rows: dict[str, dict], agreement: dict[str, dict] | None = None, against: str = "whole") -> str:
    """The Markdown table of a `decode` run: a row per variant, then the ratio of each reference to each of ours.

    `rows` maps a variant to its stored row (as in --out), failed ones left out; `agreement` maps a
    variant to `_compare`'s figures against the decode of `against` (the caller loads the volumes):
    the exact whole-volume decode, or without one a float32 decode of ours.
    """
    agreement = agreement or {}
    order = [v for v in ("reference", "reference_reuse", *OURS, "whole") if v in rows]
    peak_name = _peak_header(rows)
    yardstick = "whole-volume decode" if against == "whole" else _decode_label(against, rows.get(against, {}))
    lines = [_md_row(["", "decode s", "CPU s", peak_name, f"vs {yardstick}: max / mean \\|d\\| HU"]),
             _md_row(["---", "---:", "---:", "---:", "---"])]
    for variant in order:
        r = rows[variant]
        agree = agreement.get(variant)
        lines.append(_md_row([_decode_label(variant, r), f"{r['decode_s']:.1f}", _whole(r["cpu_decode_s"]),
                              _whole(_peak(r)), _agreement_cell(agree)]))
    for name, mine, ref, ours in _reference_pairs(rows):
        lines.append(_md_row([f"ratio {name} / `{OURS[mine]}`", f"{ref['decode_s'] / ours['decode_s']:.2f}x",
                              f"{ref['cpu_decode_s'] / ours['cpu_decode_s']:.2f}x",
                              f"{_peak(ours) / _peak(ref):.2f}", ""]))
    return "\n".join(lines)


def limit_table(row: dict) -> str:
    """The Markdown table of a `limit` run: GFLOP/s per convolution shape and dtype/layout, and the best of each."""
    lines = [_md_row(["conv", *(k.replace("_cl", " channels-last") for k in LIMIT_KINDS)]),
             _md_row(["---", *["---:"] * len(LIMIT_KINDS)])]
    for s in row["conv_shapes"]:
        lines.append(_md_row([s["shape"].replace("->", " -> "), *(f"{s[k]:.0f}" for k in LIMIT_KINDS)]))
    lines.append(_md_row(["best", *(f"{row['conv_gflops_best_by_kind'][k]:.0f}" for k in LIMIT_KINDS)]))
    return "\n".join(lines)


def _table(args, rows: dict) -> None:
    import numpy as np

    from maisi2.compute import CpuCapabilities

    print(f"\nCPU: {CpuCapabilities.detect().describe()}; load average at the end {os.getloadavg()[0]:.1f}")
    prefix = Path(args.out).with_suffix("")
    if args.command == "e2e":
        print(f"\nend to end, mask -> CT at {args.size}^3, {args.steps} steps, {args.device}, {args.threads} threads\n")
        ok = {}
        for variant in ("reference", "reference_reuse", *OURS):
            r = rows.get(_key(args, variant))
            if r and "error" in r:
                print(f"{variant} failed: {r['error']}")
            elif r:
                ok[variant] = r
        agreement, details = {}, []
        for mine in OURS:
            if mine in ok and "reference" in ok:
                a = np.load(f"{prefix}_e2e{args.size}_reference.npy")
                b = np.load(f"{prefix}_e2e{args.size}_{mine}.npy")
                la = np.load(f"{prefix}_e2e{args.size}_reference_latent.npy")
                lb = np.load(f"{prefix}_e2e{args.size}_{mine}_latent.npy")
                agreement[mine] = _compare(a, b)
                details.append(f"agreement {mine} vs reference: image {agreement[mine]}; latent max |diff| "
                               f"{np.abs(la - lb).max():.2e} (latent max {np.abs(la).max():.2f})")
        print(e2e_table(ok, agreement) + "\n")
        for mine in OURS:
            if mine in ok and ok[mine].get("compute_plan"):
                nets = ok[mine]["compute_plan"]["networks"]
                print(f"{mine} (--precision {OURS[mine]}): " + ", ".join(f"{k} {v['dtype']}" for k, v in nets.items()))
        print("\n".join(details))
    elif args.command == "decode":
        name = "x".join(map(str, args.shape))
        print(f"\ndecode of a {name} volume, {args.device}, {args.threads} threads\n")
        ok = {}
        for variant in ("reference", "reference_reuse", *OURS, "whole"):
            r = rows.get(_key(args, variant))
            if r and "error" in r:
                print(f"{variant} failed: {r['error']}")
            elif r:
                ok[variant] = r
        volumes = {v: Path(f"{prefix}_decode{name}_{v}.npy") for v in ok}
        volumes = {v: path for v, path in volumes.items() if path.exists()}
        # The yardstick is the exact whole-volume decode; a run without one (it takes hours on a
        # CPU) is measured against our float32 decoder instead.
        against = "whole" if "whole" in volumes else next(
            (v for v in OURS if v in volumes and _decoder_dtype(ok[v]) == "float32"), None)
        agreement, details = {}, []
        if against:
            base = np.load(volumes[against])
            for variant, path in volumes.items():
                if variant != against:
                    agreement[variant] = _compare(np.load(path), base)
                    details.append(f"agreement {variant} vs {against}: {agreement[variant]}")
        print(decode_table(ok, agreement, against or "whole") + "\n")
        for variant in OURS:
            plan = (ok.get(variant) or {}).get("plan")
            if plan:
                tiles = "one tile" if plan["tiles"] == 1 else f"{plan['tiles']} tiles"
                print(f"{variant} (--precision {OURS[variant]}): decoder {_decoder_dtype(ok[variant])}, {tiles}, "
                      f"{plan['storage']} layer tensors {'in files' if plan.get('spilled') else 'in memory'}")
        print("\n".join(details))
    else:
        r = rows.get(_key(args, "limit"))
        if r and "error" not in r:
            print("\nconvolution 3x3x3, GFLOP/s, best of 3 after a warm-up\n")
            print(limit_table(r) + "\n")
            print(f"FLOPs at a 32^3 latent: UNet step "
                  f"{r['flops_unet_step_32'] / 1e12:.3f} T, ControlNet step {r['flops_controlnet_step_32'] / 1e12:.3f} T "
                  f"(mask embedding {r['flops_mask_embedding_32'] / 1e12:.3f} T), decode of 128^3 "
                  f"{r['flops_decode_per_latent_voxel'] * 32**3 / 1e12:.2f} T")
        elif r:
            print(f"limit failed: {r['error']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("e2e", "decode", "limit"))
    parser.add_argument("--size", type=int, default=128, help="e2e: image edge (a multiple of 32)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 128], help="decode: image shape")
    parser.add_argument("--variants", nargs="+", default=None,
                        help="default: reference ours (+ whole for decode); also reference_reuse (the reference "
                             "with our allocator policy)")
    parser.add_argument("--budget-gb", type=float, default=None, help="our memory budget (default: available RAM)")
    parser.add_argument("--spill-dir", default=None,
                        help="decode: where the whole decode (and ours, when RAM is short) keeps layer tensors in files")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="work/bench/generation_speed.jsonl")
    parser.add_argument("--resume", action="store_true", help="skip variants already in --out")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.variant = args.worker
        print(json.dumps(_worker(args)))
        return
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    print("command: python " + " ".join(sys.argv), flush=True)
    default = {"e2e": ["reference", "ours"], "decode": ["reference", "ours", "whole"], "limit": ["limit"]}
    rows = _done(args)
    for variant in args.variants or default[args.command]:
        if args.resume and _key(args, variant) in rows and "error" not in rows[_key(args, variant)]:
            continue
        rows[_key(args, variant)] = _run(args, variant)
    _table(args, rows)


if __name__ == "__main__":
    main()
