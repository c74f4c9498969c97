"""Allocation churn: what glibc's handling of freed memory costs our generation path on the CPU.

Runs our sampling steps (UNet + ControlNet, 32^3 latent, 128^3 phantom mask) and our 128^3 decode
once per allocator policy, each in a fresh subprocess:

- ``pinned``: glibc's mmap threshold fixed at 128 KiB (``MALLOC_MMAP_THRESHOLD_=131072``), so every
  large tensor gets fresh pages from the kernel and gives them back on free (what the benchmarks of
  sessions 5-8 ran with);
- ``default``: glibc's defaults (its threshold adapts upwards as blocks are freed);
- ``reuse``: `maisi2.allocator.reuse_freed_memory`, what `maisi2 generate` and training set.

Each prints the median wall time and minor page faults per step (after one warm-up step), then
the decode's time and page faults, and the process's peak resident memory (VmHWM).

    python benchmarks/allocator_churn.py            # ~2 min on 2 cores of a Zen 5
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

POLICIES = ("pinned", "default", "reuse")


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _worker(policy: str, steps: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from maisi2.benchmarking import peak_rss_mib
    from maisi2.benchmarking import SEED, latent_from_seed, networks, our_decode, phantom_conditioning

    from maisi2 import allocator, sampling

    if policy == "reuse":
        allocator.reuse_freed_memory()
    cfg, net = networks(("vae", "unet", "controlnet"), torch.device("cpu"), reference=False)
    cond = phantom_conditioning(128)
    marks = [(time.perf_counter(), _faults())]

    def tick(_=None):
        marks.append((time.perf_counter(), _faults()))

    sampling.sample_latent(net["unet"], cond, (4, 32, 32, 32), cfg.flow, controlnet=net["controlnet"],
                           steps=steps + 1, seed=SEED, callback=tick)
    # step 0 also embeds the mask and warms up; the rest are plain UNet + ControlNet calls
    per_step = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(marks[1:], marks[2:])]
    del net["unet"], net["controlnet"]
    allocator.give_back_freed_memory()
    z = latent_from_seed((32, 32, 32))
    start, faults = time.perf_counter(), _faults()
    our_decode(net["vae"], cfg, z, torch.device("cpu"), None)
    return {"policy": policy,
            "step_s": sorted(s for s, _ in per_step)[len(per_step) // 2],
            "step_faults": sorted(f for _, f in per_step)[len(per_step) // 2],
            "decode_s": time.perf_counter() - start, "decode_faults": _faults() - faults,
            "peak_rss_mib": peak_rss_mib()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--worker", choices=POLICIES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker, args.steps, args.threads)))
        return
    rows = []
    for policy in args.policies:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        env["OMP_NUM_THREADS"] = str(args.threads)
        if policy == "pinned":
            env["MALLOC_MMAP_THRESHOLD_"] = "131072"
        done = subprocess.run([sys.executable, __file__, "--worker", policy, "--steps", str(args.steps),
                               "--threads", str(args.threads)], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{policy}: exit code {done.returncode}\n{done.stderr[-2000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\nallocator policies, {args.threads} threads: median of {args.steps} steps (UNet + ControlNet, "
          "32^3 latent), then our 128^3 decode")
    print(f"{'policy':<8} {'s/step':>7} {'faults/step':>12} {'decode s':>9} {'decode faults':>14} {'peak MiB':>9}")
    for r in rows:
        print(f"{r['policy']:<8} {r['step_s']:>7.2f} {r['step_faults']:>12,} {r['decode_s']:>9.1f} "
              f"{r['decode_faults']:>14,} {r['peak_rss_mib']:>9.0f}")


if __name__ == "__main__":
    main()
