"""Which arithmetic each network runs in on this machine: the compute plan.

On CPUs with bfloat16 matrix hardware the same 3D convolutions run several times faster in
bfloat16 with channels-last-3d tensors than in float32 (Intel AMX: 4-8x, docs/performance.md);
on CPUs without it bfloat16 is emulated and slower. So the plan is chosen per machine:

* ``fp32``: every network in float32, contiguous tensors (what maisi2 always did on the CPU).
* ``bf16``: on the CPU, the 3x3x3 convolutions of the networks in `BF16_NETWORKS` (flow UNet,
  ControlNet, VAE decoder) multiply-add in bfloat16 with channels-last-3d operands
  (`fastops.Bf16Conv3d`, entered with `ComputePlan.lowered`); everything between them stays
  float32 (stored channels-last-3d, so that converting a convolution's input is a cast):
  activations, residual sums and skip connections, group norms and their statistics, attention,
  the time and spacing embeddings, the 1x1 convolutions, the ControlNet's mask embedding, each
  network's output convolution, and outside the networks the latent and the flow update
  ``x += v * dt``. This "convolutions only" form replaced bfloat16 autocast (which rounds every
  activation to bf16 as well): the sampled CT moves a quarter to two thirds as far from float32 (mean
  and max |d|), at some speed, since each convolution converts its input and output
  (docs/performance.md, "Precision"). On CUDA ``bf16`` is autocast.
* ``auto``: on the CPU, the networks in `AUTO_BF16_NETWORKS` (those measured within the release's
  own float16 error: the flow UNet and the ControlNet, not the VAE decoder) in bf16 where bf16
  pays (`bf16_pays`: AMX tiles, or AVX512-BF16 with a measured probe saying so), everything else
  float32. On CUDA ``auto`` keeps the release's float16 autocast (``half``).

`choose_plan` takes the capabilities as an argument, so the choice can be tested for any CPU;
`CpuCapabilities.detect()` reads this machine's.

Usage::

    plan = choose_plan("auto", "cpu")
    plan.prepare(unet, "unet")               # the layout and embedding layers the plan says
    with plan.lowered(unet, "unet"), plan.autocast("unet"):
        v = unet(...)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from maisi2.errors import InvalidInput

__all__ = ["CpuCapabilities", "NetworkCompute", "ComputePlan", "choose_plan", "bf16_pays", "measure_bf16_gain",
           "autocast", "AUTOCAST_DTYPES", "PRECISIONS", "NETWORKS", "BF16_NETWORKS", "AUTO_BF16_NETWORKS", "PROBE_MIN_GAIN"]

PRECISIONS = ("auto", "fp32", "bf16")
# What each precision name means inside a network call (training's --amp and the plans below).
AUTOCAST_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NETWORKS = ("unet", "controlnet", "vae_decoder", "vae_encoder")
# The networks ``--precision bf16`` lowers: the flow UNet and ControlNet (2.9x faster per step with
# AMX) and the VAE decoder (convolutions only). The encoder (training data, not generation) stays float32.
BF16_NETWORKS = ("unet", "controlnet", "vae_decoder")
# The networks ``auto`` lowers where bf16 pays: those whose bf16 CT stays within the release's own
# float16 error of the float32 one (same noise and mask, 128^3, docs/performance.md "Precision"):
# bf16 sampling (flow UNet + ControlNet, convolutions only) moved the CT by max 3.5 / mean 0.21 HU,
# largest organ median shift 0.57 HU (bundled model) and 7.2 / 0.40 / 1.83 HU (released
# architecture, random weights), where the release's float16 path moves it 6.7 / 0.84 / 1.78 and
# 24.0 / 1.22 / 2.62 HU. The bf16 decoder is outside that (17.7 / 1.96 / 3.09 and 115 / 6.4 / 8.9
# HU): its convolutions' bf16 outputs land on the image with little left to average them out, so
# it stays float32 unless ``--precision bf16`` asks for it.
AUTO_BF16_NETWORKS: tuple[str, ...] = ("unet", "controlnet")
# Linear layers a bf16 plan keeps in float32: the time and spacing embeddings, which scale and
# shift every block (measured: `fastops.Float32Linear`).
FLOAT32_LAYERS = ("time_embed", "time_emb_proj", "spacing_layer")
# bf16 convolutions must beat float32 by this factor in the probe to be chosen where the CPU has no
# AMX: a sampling step also runs norms and activations that bf16 does not speed up.
PROBE_MIN_GAIN = 1.5


@dataclass(frozen=True)
class CpuCapabilities:
    """What the CPU offers: its name, torch's ISA level and the relevant cpuinfo flags."""

    model: str
    isa: str  # torch.backends.cpu.get_cpu_capability(): "DEFAULT", "AVX2", "AVX512", ...
    flags: frozenset[str]

    @property
    def amx_bf16(self) -> bool:
        return "amx_bf16" in self.flags

    @property
    def avx512_bf16(self) -> bool:
        return "avx512_bf16" in self.flags

    def describe(self) -> str:
        extra = [f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in self.flags]
        return f"{self.model}; torch ISA {self.isa}" + (f"; {' '.join(extra)}" if extra else "; no bf16 hardware")

    def to_dict(self) -> dict:
        return {"model": self.model, "isa": self.isa,
                "bf16_flags": sorted(f for f in self.flags if "bf16" in f or f.startswith("amx"))}

    @classmethod
    @functools.lru_cache(maxsize=1)
    def detect(cls) -> "CpuCapabilities":
        """This machine's: /proc/cpuinfo where there is one, else torch's own CPU queries."""
        model, flags = "unknown CPU", set()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown CPU":
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
        except OSError:  # not Linux: ask torch (private queries, so guarded)
            cpu = getattr(torch, "cpu", None)
            for flag, query in (("avx512_bf16", "_is_avx512_bf16_supported"), ("amx_bf16", "_is_amx_tile_supported")):
                if cpu is not None and hasattr(cpu, query) and getattr(cpu, query)():
                    flags.add(flag)
        return cls(model, torch.backends.cpu.get_cpu_capability(), frozenset(flags))


def autocast(device: str | torch.device, precision: str | torch.dtype = "fp32"):
    """The one way a network call is put under mixed precision: autocast to `precision` ("fp32",
    "bf16", "fp16" or the torch dtype) on `device`'s type; float32 is no autocast at all."""
    dtype = AUTOCAST_DTYPES.get(precision) if isinstance(precision, str) else precision
    if dtype not in AUTOCAST_DTYPES.values():
        raise InvalidInput(f"precision must be one of {', '.join(AUTOCAST_DTYPES)}, got {precision!r}")
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


@dataclass(frozen=True)
class NetworkCompute:
    """How one network runs: autocast dtype (float32 = no autocast) and memory layout."""

    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    # Only the convolutions' multiply-adds in `dtype` (`fastops.Bf16Conv3d`), every activation
    # between them float32; False: the whole network under autocast (activations in `dtype`).
    convolutions_only: bool = False

    def to_dict(self) -> dict:
        low = self.dtype != torch.float32
        return {"dtype": str(self.dtype).removeprefix("torch."),
                "layout": "channels_last_3d" if self.channels_last else "contiguous",
                "activations": str(torch.float32 if self.convolutions_only or not low else self.dtype).removeprefix("torch.")}


FP32 = NetworkCompute()
BF16 = NetworkCompute(torch.bfloat16, channels_last=True)
# The decoder's: bf16 channels-last convolutions between float32 activations, its 1x1 shortcuts and
# output convolution float32 (`fastops.lower_convolutions`); see the module docstring.
BF16_CONVS = NetworkCompute(torch.bfloat16, channels_last=True, convolutions_only=True)
# Networks whose last 3x3x3 convolution writes their output (the velocity, the image): it stays
# float32, since its rounding lands on the result unfiltered (measured on the decoder: the largest
# organ median shift 3.1 -> 5.6 HU with it in bf16, bundled model). The ControlNet ends in 1x1 convolutions.
FLOAT32_OUTPUT = ("unet", "vae_decoder")
# Submodules a lowered network keeps in float32: the ControlNet's mask embedding runs once per
# generation (`sampling.velocity_function` caches it), so bf16 would only add error, never speed.
FLOAT32_SUBMODULES = ("controlnet_cond_embedding",)
# How ``bf16`` lowers each network on the CPU: convolutions only, everywhere. Measured against
# autocast at 128^3 (docs/performance.md, "Accuracy"): the sampled CT moves a quarter to two thirds as far
# (bundled model max |d| 3.5 vs 10.8 HU; autocast rounds every activation, residual sum and skip
# connection to bf16's 8 bits as well), at 1.5-2x autocast's CPU time for 30 sampling steps.
LOWERED = {"unet": BF16_CONVS, "controlnet": BF16_CONVS, "vae_decoder": BF16_CONVS}


@dataclass(frozen=True)
class ComputePlan:
    """The arithmetic of every network on one device; `reason` says why it was chosen."""

    precision: str  # what was asked: auto / fp32 / bf16
    device: str
    networks: dict[str, NetworkCompute]
    reason: str
    cpu: CpuCapabilities | None = None

    def of(self, network: str) -> NetworkCompute:
        return self.networks[network]

    @property
    def name(self) -> str:
        """fp32, bf16 (some networks in bf16) or fp16 (CUDA autocast)."""
        dtypes = {c.dtype for c in self.networks.values()}
        return "fp16" if torch.float16 in dtypes else "bf16" if torch.bfloat16 in dtypes else "fp32"

    def autocast(self, network: str):
        """The autocast context `network` runs under (a no-op for float32 and for a network lowered
        convolutions-only, which `lowered` puts in bf16 instead)."""
        c = self.of(network)
        return autocast(self.device, torch.float32 if c.convolutions_only else c.dtype)

    def prepare(self, module: nn.Module, network: str) -> nn.Module:
        """Put `module`'s weights in the layout the plan gives `network`, and its embedding layers
        in float32 under a bf16 plan (in place, reversibly; returns it)."""
        from maisi2.fastops import Float32Linear

        c = self.of(network)
        # Under bf16 autocast only (a convolutions-only network keeps float32 linear layers anyway);
        # float16 (the release's GPU path) is left as released.
        autocast_bf16 = c.dtype == torch.bfloat16 and not c.convolutions_only
        for name, m in module.named_modules():
            if type(m) in (nn.Linear, Float32Linear) and any(key in name for key in FLOAT32_LAYERS):
                m.__class__ = Float32Linear if autocast_bf16 else nn.Linear
        return module.to(memory_format=self._format(network))

    def _format(self, network: str) -> torch.memory_format:
        """The layout of `network`'s weights and inputs: channels-last wherever it runs in bf16
        (autocast or convolutions only: there the float32 activations are stored channels-last so
        that each bf16 conversion is a cast), else contiguous."""
        c = self.of(network)
        return torch.channels_last_3d if c.channels_last else torch.contiguous_format

    @contextlib.contextmanager
    def lowered(self, module: nn.Module, network: str):
        """While active, `module`'s convolutions run as the plan says when `network` is lowered
        convolutions-only on the CPU (`fastops.lower_convolutions`); otherwise nothing changes.
        The module is as before afterwards, whatever happened inside."""
        from maisi2.fastops import lower_convolutions

        c = self.of(network)
        if not (c.convolutions_only and c.dtype == torch.bfloat16 and torch.device(self.device).type == "cpu"):
            yield module
            return
        restore = lower_convolutions(module, keep_last=network in FLOAT32_OUTPUT, keep=FLOAT32_SUBMODULES)
        try:
            yield module
        finally:
            restore()

    def layout(self, x: torch.Tensor, network: str) -> torch.Tensor:
        """`x` (5D) in the layout of `network`'s weights."""
        if x.dim() != 5:
            return x
        return x.contiguous(memory_format=self._format(network))

    def to_dict(self) -> dict:
        return {"requested": self.precision, "chosen": self.name, "device": self.device, "reason": self.reason,
                "networks": {k: v.to_dict() for k, v in self.networks.items()},
                "cpu": None if self.cpu is None else self.cpu.to_dict()}


def _plan(precision: str, device: str, low: NetworkCompute | None, lowered: tuple[str, ...], reason: str,
          cpu: CpuCapabilities | None) -> ComputePlan:
    """low: how every lowered network runs; None: each as `LOWERED` says."""
    networks = {n: ((LOWERED[n] if low is None else low) if n in lowered else FP32) for n in NETWORKS}
    return ComputePlan(precision, device, networks, reason, cpu)


def bf16_pays(cpu: CpuCapabilities | None = None, probe=None) -> tuple[bool, str]:
    """Whether bf16 convolutions run clearly faster than float32 on this CPU, and why.

    AMX tiles: yes. AVX512-BF16 without AMX: the measured probe decides (>= `PROBE_MIN_GAIN`).
    Neither: no (bf16 is emulated). probe: a function returning the bf16/fp32 speed ratio
    (default `measure_bf16_gain`, cached per machine), called only in the middle case.
    """
    cpu = CpuCapabilities.detect() if cpu is None else cpu
    if cpu.amx_bf16:
        return True, "CPU has AMX bf16 tiles"
    if cpu.avx512_bf16:
        gain = (probe or measure_bf16_gain)()
        word = "" if gain >= PROBE_MIN_GAIN else " only"
        return gain >= PROBE_MIN_GAIN, f"AVX512-BF16 without AMX; measured bf16 convolutions{word} {gain:.2f}x float32"
    return False, "no bf16 hardware on this CPU"


def choose_plan(precision: str = "auto", device: str | torch.device = "cpu", cpu: CpuCapabilities | None = None,
                probe=None, half: bool | None = None,
                auto_networks: tuple[str, ...] | None = None) -> ComputePlan:
    """The compute plan for `precision` on `device`.

    cpu: the CPU's capabilities (default: this machine's). probe: see `bf16_pays`. half: CUDA
    only, the release's float16 autocast (None: on, as the release runs). auto_networks: the
    networks ``auto`` may lower (default `AUTO_BF16_NETWORKS`).
    """
    if precision not in PRECISIONS:
        raise InvalidInput(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    device = str(torch.device(device))
    if torch.device(device).type != "cpu":
        return _cuda_plan(precision, device, half)
    cpu = CpuCapabilities.detect() if cpu is None else cpu
    if precision == "fp32":
        return _plan(precision, device, FP32, (), "asked for fp32", cpu)
    if precision == "bf16":
        return _plan(precision, device, None, BF16_NETWORKS, "asked for bf16", cpu)
    auto_networks = AUTO_BF16_NETWORKS if auto_networks is None else tuple(auto_networks)
    if not auto_networks:
        return _plan(precision, device, FP32, (), "no network is measured within the release's float16 error in "
                     "bf16 (docs/performance.md, 'Precision'); --precision bf16 opts in", cpu)
    pays, why = bf16_pays(cpu, probe)
    if pays:
        kept = [n for n in NETWORKS if n not in auto_networks]
        why += (f"; bf16 for {', '.join(auto_networks)} (measured within the release's float16 error)"
                + (f", float32 for {', '.join(kept)}" if kept else ""))
    return _plan(precision, device, None, auto_networks if pays else (), why, cpu)


def _cuda_plan(precision: str, device: str, half: bool | None) -> ComputePlan:
    if precision == "bf16":
        return _plan(precision, device, NetworkCompute(torch.bfloat16), NETWORKS, "asked for bf16", None)
    if precision == "fp32" or half is False:
        return _plan(precision, device, FP32, (), "float32 on the GPU", None)
    return _plan(precision, device, NetworkCompute(torch.float16), NETWORKS,
                 "the release's float16 autocast on the GPU", None)


# -- the probe -----------------------------------------------------------------------------------

def _probe_cache() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "maisi2" / "compute_probe.json"


def _probe_key() -> str:
    cpu = CpuCapabilities.detect()
    return f"{cpu.model}|{cpu.isa}|{','.join(sorted(cpu.flags))}|torch {torch.__version__}|{torch.get_num_threads()} threads"


def measure_bf16_gain(cache: Path | None = None) -> float:
    """Speed of a bf16 channels-last 3D convolution over float32 on this machine (~1 s, cached).

    A 64 -> 64 channel 3x3x3 convolution at 32^3 (the size class of the decoder's and UNet's
    widest layers), best of three after a warm-up, each dtype in its best layout. The result is
    kept in ~/.cache/maisi2/compute_probe.json under the CPU, torch version and thread count.
    """
    cache = _probe_cache() if cache is None else Path(cache)
    key = _probe_key()
    try:
        stored = json.loads(cache.read_text())
    except (OSError, ValueError):
        stored = {}
    if key in stored:
        return float(stored[key])
    gain = _time_conv(torch.float32, False) / _time_conv(torch.bfloat16, True)
    stored[key] = gain
    try:
        from maisi2.atomic import atomic_output

        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(cache, overwrite=True) as tmp:
            Path(tmp).write_text(json.dumps(stored, indent=1))
    except OSError:
        pass  # an unwritable cache only costs the probe again next time
    return gain


def _time_conv(dtype: torch.dtype, channels_last: bool, n: int = 32, channels: int = 64) -> float:
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, channels, n, n, n, generator=generator).to(dtype).contiguous(memory_format=fmt)
    w = torch.randn(channels, channels, 3, 3, 3, generator=generator).to(dtype).contiguous(memory_format=fmt)
    best = float("inf")
    with torch.no_grad():
        for i in range(4):
            start = time.perf_counter()
            torch.nn.functional.conv3d(x, w, padding=1)
            if i:
                best = min(best, time.perf_counter() - start)
    return best


def replace(plan: ComputePlan, **networks: NetworkCompute) -> ComputePlan:
    """`plan` with some networks' arithmetic changed (benchmarks compare variants this way)."""
    return dataclasses.replace(plan, networks={**plan.networks, **networks})
