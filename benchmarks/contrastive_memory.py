"""Peak memory and time per ControlNet training step: contrastive loss at the output vs on the
ControlNet encoder residuals (and the flow loss alone, for reference), side by side.

Each variant runs in a fresh subprocess. Memory, two ways. "saved MiB": the bytes of the
activations autograd keeps for the backward pass of one step (counted with
``torch.autograd.graph.saved_tensors_hooks``, weights excluded): exact, allocator-independent, and
the quantity the placement is about. "step MiB": after one warm-up step (which also creates the
AdamW state) the process's resident high-water mark is reset (``/proc/self/clear_refs``) and the
peak over the timed steps is read back (``VmHWM``); "step MiB" is that peak minus the resident
size before the timed steps, i.e. what one training step needs on top of weights and optimiser
state. glibc is told to return large blocks to the system at once (``MALLOC_MMAP_THRESHOLD_``) so
resident memory follows live tensors. Where clear_refs is not writable, ``ru_maxrss`` (peak over
the whole process) is reported instead. On CUDA the peak is ``torch.cuda.max_memory_allocated``.
Every step is a full training step (forward, backward, AdamW update) on one batch whose first
sample holds a tumour, so both passes of the contrastive loss run. Random weights.

    python benchmarks/contrastive_memory.py                          # maisi-v2 nets, 16^3 latent, CPU
    python benchmarks/contrastive_memory.py --preset small --latent 32
    python benchmarks/contrastive_memory.py --preset small --latent 32 --set controlnet.use_checkpointing=true
    python benchmarks/contrastive_memory.py --latent 64 --device cuda

Not a test: a few minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time

from maisi2.benchmarking import reset_peak_rss, status_mib

VARIANTS = ("flow-only", "output", "encoder")


def _worker(args) -> dict:
    import torch

    from maisi2 import nets
    from maisi2.config import get_config
    from maisi2.labels import label_id
    from maisi2.train_controlnet import ControlNetLossSettings, controlnet_loss

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = nets.resolve_device(args.device)
    cfg = get_config(args.preset, args.overrides)
    unet, controlnet = nets.build_unet(cfg, device), nets.build_controlnet(cfg, device)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    nets.controlnet_from_unet(controlnet, unet)
    unet.eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=1e-5)

    n, f = args.latent, cfg.vae.downsample_factor
    labels = torch.full((args.batch, 1, n * f, n * f, n * f), label_id("liver"), dtype=torch.uint8)
    labels[0, 0, : 2 * f, : 2 * f, : 2 * f] = label_id("hepatic tumor")
    x0 = torch.randn(args.batch, cfg.vae.latent_channels, n, n, n, device=device)
    cond = nets.Conditioning(torch.ones(args.batch, 3), torch.ones(args.batch, dtype=torch.long)).to(device)
    labels = labels.to(device)
    placement = "output" if args.variant == "flow-only" else args.variant
    settings = ControlNetLossSettings(contrastive=args.variant != "flow-only", placement=placement)

    weights = {p.untyped_storage().data_ptr() for p in [*unet.parameters(), *controlnet.parameters()]}
    saved: dict[int, int] = {}

    def count_saved(tensor):
        """Bytes autograd keeps for the backward pass (activations; weights excluded)."""
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    def step(track: bool = False) -> None:
        optimizer.zero_grad(set_to_none=True)
        hooks = torch.autograd.graph.saved_tensors_hooks(count_saved, lambda t: t)
        with hooks if track else contextlib.nullcontext():
            out = controlnet_loss(unet, controlnet, x0, cond, labels, settings, cfg.flow, lam=0.01)
        out.loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    step(track=True)  # warm-up (allocator, lazy inits, AdamW state), counting saved activations
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        cuda_base = torch.cuda.memory_allocated()
    exact = reset_peak_rss()
    base = status_mib("VmRSS") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = status_mib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {"variant": args.variant, "seconds": sum(times) / len(times), "peak_rss_mib": peak,
              "step_rss_mib": peak - base, "exact": exact,
              "saved_mib": sum(saved.values()) / 2**20}
    if device.type == "cuda":
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["cuda_step_mib"] = (torch.cuda.max_memory_allocated() - cuda_base) / 2**20
    return result


def _run_variant(variant: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--preset", args.preset, "--latent", str(args.latent),
           "--batch", str(args.batch), "--steps", str(args.steps), "--device", args.device,
           "--threads", str(args.threads)]
    for item in args.overrides:
        cmd += ["--set", item]
    # A fixed mmap threshold: large blocks go straight back to the system when freed.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="maisi-v2")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. controlnet.use_checkpointing=true")
    parser.add_argument("--latent", type=int, default=16, help="latent edge (image edge = 4x)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=1, help="timed steps after one warm-up step")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.variant = args.worker
        print(json.dumps(_worker(args)))
        return
    print("command: python " + " ".join(sys.argv))
    overrides = f" ({', '.join(args.overrides)})" if args.overrides else ""
    print(f"preset {args.preset}{overrides}, latent {args.latent}^3 (image {args.latent * 4}^3), batch {args.batch}, "
          f"device {args.device}, {args.threads} threads, mean of {args.steps} step(s) after a warm-up\n")
    rows = [_run_variant(v, args) for v in VARIANTS]
    cuda = "cuda_peak_mib" in rows[0]
    header = f"{'variant':<10} {'s/step':>8} {'saved MiB':>10} {'peak RSS MiB':>13} {'step MiB':>9}"
    header += f" {'CUDA peak MiB':>14} {'CUDA step MiB':>14}" if cuda else ""
    print(header)
    print("-" * len(header))
    for r in rows:
        line = (f"{r['variant']:<10} {r['seconds']:>8.2f} {r['saved_mib']:>10.0f} {r['peak_rss_mib']:>13.0f} "
                f"{r['step_rss_mib']:>9.0f}")
        print(line + (f" {r['cuda_peak_mib']:>14.0f} {r['cuda_step_mib']:>14.0f}" if cuda else ""))
    print("\nsaved MiB = activations autograd keeps for the backward pass of one step (weights excluded);"
          " exact and allocator-independent.")
    if all(r["exact"] for r in rows):
        print("step MiB = peak resident memory during the timed steps minus the resident memory before them.")
    else:
        print("step MiB = ru_maxrss after minus before the timed steps (clear_refs unavailable: a lower bound).")


if __name__ == "__main__":
    main()
