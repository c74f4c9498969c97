"""Where the streamed decode's time goes: every convolution timed and counted, by shape.

    python benchmarks/profile_decode.py --latent 32 --storage float32      # 128^3 output, ~75 s on a Zen 3
    python benchmarks/profile_decode.py --shape 16 128 32 --plan-shape 128 128 32 --storage float16   # 1/8 of 512x512x128

The maisi-v2 VAE with the benchmark's random weights (`benchmarking.networks`), one
`autoencoder.decode_streamed` call; `F.conv3d` is wrapped to time each call (and count its FLOPs:
2 x multiply-adds), so the rest of the wall time is what the decoder does between convolutions
(group-norm statistics, activation, upsampling, copies). Prints the total, the convolutions' share
and rate, and the 12 costliest convolution shapes (in -> out channels, kernel, input slab).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from maisi2 import autoencoder, benchmarking


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latent", type=int, default=32, help="latent edge (the output is 4x per axis)")
    ap.add_argument("--shape", type=int, nargs=3, metavar=("X", "Y", "Z"),
                    help="latent shape instead of a cube (e.g. 16 128 32: a slice of the 512 x 512 x 128 "
                         "decode, whose slabs are planes of 512 x 128 output voxels)")
    ap.add_argument("--slab-mib", type=float,
                    help="slab temporaries (default: what autoencoder.plan_tiles gives --plan-shape, else this shape)")
    ap.add_argument("--plan-shape", type=int, nargs=3, metavar=("X", "Y", "Z"),
                    help="latent shape whose plan sets the slab size (e.g. 128 128 32 with --shape 16 128 32)")
    ap.add_argument("--storage", choices=("float32", "float16"), default="float32")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg, net = benchmarking.networks(("vae",), "cpu", reference=False)
    shape = tuple(args.shape or (args.latent,) * 3)
    z = torch.randn(1, 4, *shape, generator=torch.Generator().manual_seed(0))
    storage = getattr(torch, args.storage)
    slab_bytes = (int(args.slab_mib * 2**20) if args.slab_mib else
                  autoencoder.streamed_slab_bytes(cfg.vae, args.plan_shape or shape, storage.itemsize))
    by_shape: dict[tuple, list[float]] = {}
    plain = F.conv3d

    def timed(x, weight, bias=None, *rest, **kw):
        started = time.perf_counter()
        y = plain(x, weight, bias, *rest, **kw)
        entry = by_shape.setdefault((weight.shape[1], weight.shape[0], weight.shape[2], tuple(x.shape[2:])), [0, 0.0, 0.0])
        entry[0] += 1
        entry[1] += time.perf_counter() - started
        entry[2] += 2 * weight[0].numel() * y.numel()
        return y

    autoencoder.streamed.F.conv3d = timed
    try:
        started = time.perf_counter()
        with torch.no_grad():
            autoencoder.decode_streamed(net["vae"], z, storage=storage, slab_bytes=slab_bytes)
        total = time.perf_counter() - started
    finally:
        autoencoder.streamed.F.conv3d = plain
    conv_s = sum(e[1] for e in by_shape.values())
    flops = sum(e[2] for e in by_shape.values())
    print(f"decode of {' x '.join(str(4 * n) for n in shape)} ({args.storage} storage, slabs of "
          f"{slab_bytes / 2**20:.0f} MiB): {total:.1f} s, convolutions {conv_s:.1f} s ({100 * conv_s / total:.0f} %) "
          f"at {flops / conv_s / 1e9:.0f} GFLOP/s, overall {flops / total / 1e9:.0f} GFLOP/s")
    print("in -> out, kernel, input slab | calls | seconds | GFLOP/s")
    for (cin, cout, k, slab), (calls, seconds, fl) in sorted(by_shape.items(), key=lambda kv: -kv[1][1])[:12]:
        print(f"{cin} -> {cout}, {k}^3, {slab} | {calls} | {seconds:.1f} | {fl / seconds / 1e9:.0f}")


if __name__ == "__main__":
    main()
