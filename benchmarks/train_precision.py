"""One flow-UNet training step (forward + backward) in float32 and under bfloat16 autocast.

What `training` chooses for ``amp="auto"`` on a CPU rests on this: bf16 where it pays
(`maisi2.compute.bf16_pays`). CPU seconds of the process (less disturbed than wall time on a
shared machine), three rounds with the variants interleaved, after one warm-up step each.

    python benchmarks/train_precision.py --preset small --size 16
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--size", type=int, default=16, help="latent edge")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from maisi2 import compute, nets
    from maisi2.config import get_config

    torch.manual_seed(0)
    unet = nets.build_unet(get_config(args.preset))
    x = torch.randn(1, 4, *(args.size,) * 3)
    t = torch.tensor([500.0])
    cond = nets.Conditioning(torch.tensor([[1.5, 1.5, 1.5]]), torch.ones(1, dtype=torch.long), None)

    def step(bf16: bool) -> float:
        unet.zero_grad(set_to_none=True)
        start = time.process_time()
        with compute.autocast("cpu", "bf16" if bf16 else "fp32"):
            v = nets.predict_velocity(unet, x, t, cond)
        (v.float() - x).pow(2).mean().backward()
        return time.process_time() - start

    seconds = {"fp32": [], "bf16 autocast": []}
    for bf16 in (False, True):
        step(bf16)
    for _ in range(3):
        for name in seconds:
            seconds[name].append(step(name != "fp32"))
    print(f"CPU: {compute.CpuCapabilities.detect().describe()}; torch {torch.__version__}, {args.threads} threads")
    print(f"{args.preset} flow UNet, latent {args.size}^3, one training step, CPU s (3 rounds):")
    for name, values in seconds.items():
        print(f"  {name:<14} {' '.join(f'{v:.2f}' for v in values)}   min {min(values):.2f}")
    print(f"bf16 / fp32 speed: {min(seconds['fp32']) / min(seconds['bf16 autocast']):.2f}x; "
          f"amp='auto' here: {'bf16' if compute.bf16_pays()[0] else 'fp32'} ({compute.bf16_pays()[1]})")


if __name__ == "__main__":
    main()
