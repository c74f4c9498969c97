"""Faster drop-in layers for the MAISI networks, with identical parameters and keys.

Measured bottlenecks (2 CPU threads, torch 2.13, 16 channels at 64^3 for the first two):

* The weight gradient of a 3x3x3 convolution takes ~3 s through PyTorch's CPU kernel, 10x its
  forward pass. The same sum written as a convolution of the input with the output gradient
  (batch and channel axes swapped) takes ~0.4 s. `FastConv3d` uses it in the backward pass;
  the forward pass is untouched.
* MONAI's `MaisiGroupNorm3D` normalises group by group in a Python loop; `F.group_norm` computes
  the same statistics in one kernel, several times faster (forward and backward).
* The flow UNet's upsampling residual blocks (``resblock_updown``) upsample with nearest neighbours
  and then run a 3x3x3 convolution at the fine resolution. Each fine voxel of a nearest-upsampled
  volume repeats a coarse one, so per output parity (8 of them in 3D) the same sum is a 2x2x2
  convolution of the coarse input with summed weights (`upsample_nearest_conv3x3x3`): 8 instead of
  27 multiply-adds per output and no upsampled copy. Same result up to float rounding.
* Under bfloat16 autocast PyTorch runs ``avg_pool3d`` in float32 (its CPU autocast list), and on
  channels-last-3d tensors it makes a contiguous copy first: 2x2x2 average pooling took ~20 % of
  a bf16 sampling step. `FastAvgPool3d` sums the eight strided sub-volumes in float32 instead
  (any layout, one rounding to the input's dtype); float32 contiguous input keeps PyTorch's kernel.
* A 1x1x1 convolution of a float32 channels-last-3d tensor takes PyTorch's generic CPU path, ~6x
  slower than the matrix product it is (`PointwiseConv3d`).

* Not speed but correctness: under CPU bf16 training autocast, PyTorch's convolution gave garbage
  weight gradients for inputs 2 voxels deep (`bf16_weight_grad_unsafe`); `FastConv3d` and
  `ShallowSafeConv3d` (every other 3D kernel but 1x1x1) run such layers in float32.

`accelerate(model)` swaps these classes in place on an existing network (the instances keep
their parameters, so state dicts and released checkpoints are unaffected). The fp16 group norm
of the released VAE (CUDA/autocast only) is left alone.

`Bf16Conv3d` (swapped in by `lower_convolutions` for the time of a decode, never by `accelerate`)
is the bf16 plan's decoder convolution: bfloat16 channels-last-3d multiply-adds (AMX) between
float32 activations, see its docstring.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FastConv3d", "ShallowSafeConv3d", "bf16_weight_grad_unsafe", "Bf16Conv3d", "lower_convolutions", "conv3d_of", "conv3d_into", "PointwiseConv3d", "pointwise_conv3d", "FastGroupNorm", "FastAvgPool3d", "Float32Linear", "FusedUpForward", "accelerate", "restore_monai_layers", "conv3x3x3_weight_grad",
           "upsample_nearest_conv3x3x3"]


def conv3x3x3_weight_grad(x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """d(loss)/d(weight) of a stride-1, padding-1 3x3x3 convolution.

    x: (B, Cin, X, Y, Z) input; grad_out: (B, Cout, X, Y, Z). Returns (Cout, Cin, 3, 3, 3).
    grad_w[o, i, k] = sum_{b, v} grad_out[b, o, v] * x_pad[b, i, v + k]: a 'valid' convolution of the
    padded input (Cin as batch, B as channels) with the output gradient as a (Cout, B, X, Y, Z) kernel.
    """
    x_pad = F.pad(x, (1, 1, 1, 1, 1, 1))
    grad_w = F.conv3d(x_pad.transpose(0, 1), grad_out.transpose(0, 1))  # (Cin, Cout, 3, 3, 3)
    return grad_w.transpose(0, 1)


class _Conv3x3x3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.conv3d(x, weight, bias, padding=1)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # The adjoint of a padding-1 3x3x3 convolution: flip the kernel, swap in/out channels.
            grad_x = F.conv3d(grad_out, weight.flip(2, 3, 4).transpose(0, 1), padding=1)
        if ctx.needs_input_grad[1]:
            grad_w = conv3x3x3_weight_grad(x, grad_out)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum(dim=(0, 2, 3, 4))
        return grad_x, grad_w, grad_b


def _is_plain_3x3x3(conv: nn.Conv3d) -> bool:
    return (conv.kernel_size == (3, 3, 3) and conv.stride == (1, 1, 1) and conv.padding == (1, 1, 1)
            and conv.dilation == (1, 1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")


def bf16_weight_grad_unsafe(x: torch.Tensor) -> bool:
    """Would PyTorch's CPU bfloat16 convolution give a wrong weight gradient for input `x`?

    With torch 2.13 on an AMD Zen 4 (AVX512-BF16, no AMX), the weight gradient of a 3x3x3
    convolution under CPU bf16 autocast is garbage (1e30 to inf, once heap corruption) whenever
    the first spatial axis of the input has 2 voxels, e.g. the deepest level of a UNet on a 16^3
    latent window: every ControlNet step on such windows was skipped as non-finite. Inputs and
    outputs are right. Such layers are tiny, so they run in float32 under training autocast
    (`tests/test_fastops.py` has the shapes that failed).
    """
    return (torch.is_grad_enabled() and x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and x.dim() == 5 and x.shape[2] <= 2)


class FastConv3d(nn.Conv3d):
    """nn.Conv3d whose backward pass (stride 1, padding 1, 3x3x3, float32 on CPU) is faster."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bf16_weight_grad_unsafe(x):
            with torch.autocast("cpu", enabled=False):
                return _Conv3x3x3.apply(x.float(), self.weight, self.bias)
        # Not under autocast: its forward would run in bf16 while this backward assumes float32.
        fast = (torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32
                and self.weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu"))
        if fast:
            return _Conv3x3x3.apply(x, self.weight, self.bias)
        return super().forward(x)


class ShallowSafeConv3d(nn.Conv3d):
    """nn.Conv3d (any other 3D kernel than 1x1x1 or plain 3x3x3, e.g. a strided downsampling)
    that runs in float32 where `bf16_weight_grad_unsafe`; PyTorch's kernel otherwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bf16_weight_grad_unsafe(x):
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
        return super().forward(x)


class PointwiseConv3d(nn.Conv3d):
    """nn.Conv3d with a 1x1x1 kernel that runs channels-last-3d input as a matrix product
    (`pointwise_conv3d`); other input takes PyTorch's kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
            return pointwise_conv3d(x, self.weight, self.bias)
        return super().forward(x)


def _is_pointwise(conv: nn.Conv3d) -> bool:
    return (conv.kernel_size == (1, 1, 1) and conv.stride == (1, 1, 1) and conv.padding == (0, 0, 0)
            and conv.groups == 1)


def pointwise_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A 1x1x1 convolution of a channels-last-3d `x` as one matrix product over its channel axis.

    PyTorch's CPU kernel takes a slow generic path for this case (float32 channels-last: ~6x a
    matrix product, 256 -> 128 channels at 16^3, one thread); here the channels are already the
    innermost axis, so the permutation is a view and the result comes back channels-last. Same
    products and sums as the convolution (equal results in the test).
    """
    y = F.linear(x.permute(0, 2, 3, 4, 1), weight.reshape(weight.shape[0], weight.shape[1]).to(x.dtype),
                 None if bias is None else bias.to(x.dtype))
    return y.permute(0, 4, 1, 2, 3)


class Bf16Conv3d(FastConv3d):
    """A 3D convolution whose multiply-adds run in bfloat16, channels-last-3d, between float32 tensors.

    Without gradients on the CPU: the float32 input is rounded to bfloat16 once (channels-last,
    the layout AMX kernels want), convolved with a bfloat16 copy of the weight (kept until the
    weight changes; the products accumulate in float32 inside the kernel), and the result comes
    back as float32 with the float32 bias added there. So only the convolution's operands and its
    output carry bfloat16 rounding: the activations between layers, the residual sums, the
    group-norm statistics and everything else stay float32, unlike autocast, which keeps every
    activation in bfloat16. With gradients, or float16 input, it is a plain `FastConv3d`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _runs_lowered(self, x):
            return super().forward(x)
        return self.lowered(x, self.padding)

    def lowered(self, x: torch.Tensor, padding) -> torch.Tensor:
        """The convolution of float32 `x` with `padding` (which may differ from the module's)."""
        y = self.product(x, padding).float()
        if self.bias is not None:
            y += self.bias.detach().reshape(1, -1, 1, 1, 1)
        return y

    def product(self, x: torch.Tensor, padding) -> torch.Tensor:
        """The bf16 convolution without its bias: its bf16 output, channels-last-3d."""
        key = (self.weight.data_ptr(), self.weight._version, self.weight.device)
        cached = getattr(self, "_bf16_weight", None)
        if cached is None or cached[0] != key:
            weight = self.weight.detach().to(torch.bfloat16, memory_format=torch.channels_last_3d)
            cached = (key, weight)
            self._bf16_weight = cached
        return F.conv3d(x.to(torch.bfloat16, memory_format=torch.channels_last_3d), cached[1], None, self.stride,
                        padding, self.dilation, self.groups)


def _runs_lowered(conv: nn.Conv3d, x: torch.Tensor) -> bool:
    """Whether `conv` multiplies `x` in bf16: a `Bf16Conv3d` on float32 input, without gradients."""
    return type(conv) is Bf16Conv3d and not torch.is_grad_enabled() and x.dtype == torch.float32


def conv3d_of(conv: nn.Conv3d, x: torch.Tensor, padding) -> torch.Tensor:
    """``conv`` applied to `x` with another `padding`, in the arithmetic of its class (`Bf16Conv3d`:
    bf16 multiply-adds) or float32 (exactly ``F.conv3d``); for callers that convolve slab by slab."""
    if _runs_lowered(conv, x):
        return conv.lowered(x, padding)
    return F.conv3d(x, conv.weight, conv.bias, conv.stride, padding, conv.dilation, conv.groups)


def conv3d_into(conv: nn.Conv3d, x: torch.Tensor, padding, out: torch.Tensor, add: bool = False) -> torch.Tensor:
    """``out = conv(x)`` (``out += conv(x)`` with `add`) as `conv3d_of` computes it, written into `out`.

    For a `Bf16Conv3d` and a float32 `out` the bf16 product goes into `out` directly and the bias
    is added there: two passes over `out` instead of a float32 copy of the product, its bias, the
    sum and the store (same values up to float32 rounding). Returns `out`.
    """
    if _runs_lowered(conv, x) and out.dtype == torch.float32:
        y = conv.product(x, padding)
        out.add_(y) if add else out.copy_(y)
        if conv.bias is not None:
            out.add_(conv.bias.detach().reshape(1, -1, 1, 1, 1))
        return out
    y = conv3d_of(conv, x, padding)
    if add:  # summed in float32, rounded to out's type once
        y += out
    return out.copy_(y)


def lower_convolutions(module: nn.Module, keep_last: bool = True, keep: tuple[str, ...] = ()):
    """Make `module`'s 3x3x3 convolutions `Bf16Conv3d` in place; returns a function that undoes it.

    1x1 convolutions (the residual shortcuts: a 27th of a 3x3x3's work) stay float32, and with
    `keep_last` so does the last 3x3x3 convolution (a decoder's output layer, whose rounding would
    land on the image unfiltered); so do those inside the submodules named in `keep`.
    """
    kept = {id(m) for name in keep if hasattr(module, name) for m in getattr(module, name).modules()}
    convs = [m for m in module.modules() if type(m) in (nn.Conv3d, FastConv3d) and m.kernel_size == (3, 3, 3)
             and m.padding_mode == "zeros" and id(m) not in kept]
    if keep_last and convs:
        convs = convs[:-1]
    classes = [conv.__class__ for conv in convs]
    for conv in convs:
        conv.__class__ = Bf16Conv3d

    def restore() -> None:
        for conv, cls in zip(convs, classes):
            conv.__class__ = cls
            conv.__dict__.pop("_bf16_weight", None)  # the bfloat16 copy goes with the class
    return restore


class FastGroupNorm(nn.GroupNorm):
    """GroupNorm in one kernel (MONAI's MAISI version loops over groups); float32 statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and x.device.type == "cpu":
            # PyTorch's CPU kernel takes bf16 input with float32 weights and accumulates in float32:
            # the same values as converting first (tested), without two copies (8x faster at 256 ch, 32^3).
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps).to(x.dtype)


class FastAvgPool3d(nn.AvgPool3d):
    """AvgPool3d (kernel 2, stride 2) that stays in the input's dtype and layout (bf16, channels-last)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and x.is_contiguous():
            return super().forward(x)
        return average_2x2x2(x)


def average_2x2x2(x: torch.Tensor) -> torch.Tensor:
    """Mean over 2x2x2 blocks of (B, C, X, Y, Z) (odd edges dropped, as AvgPool3d(2) does),
    accumulated in float32 and rounded once to x's dtype; the layout of x is kept."""
    sizes = [2 * (n // 2) for n in x.shape[2:]]
    x = x[:, :, : sizes[0], : sizes[1], : sizes[2]]
    # A copy even for float32 input: `.float()` would return a view of x, and the sums below would
    # overwrite the caller's tensor (a float32 channels-last input is a skip connection in the UNet).
    total = x[:, :, 0::2, 0::2, 0::2].to(torch.float32, copy=True)
    for px, py, pz in [(a, b, c) for a in (0, 1) for b in (0, 1) for c in (0, 1)][1:]:
        total += x[:, :, px::2, py::2, pz::2]
    return total.mul_(0.125).to(x.dtype)


class Float32Linear(nn.Linear):
    """nn.Linear that runs in float32 even inside an autocast region (its output is float32).

    For the flow networks' time and spacing embeddings: under bfloat16 autocast their rounding
    alone made one velocity call ~2.4x less exact (relative L2 against float32 1.77 % -> 0.73 %
    at a 16^3 latent with the released architecture), at a negligible cost (vectors, not volumes).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.weight, self.bias)


def _is_pool_2x(module: nn.Module) -> bool:
    def triple(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v, v, v)

    return (type(module) is nn.AvgPool3d and triple(module.kernel_size) == (2, 2, 2)
            and triple(module.stride) == (2, 2, 2) and triple(module.padding) == (0, 0, 0)
            and not module.ceil_mode and module.divisor_override is None)


def _collapse_taps(weight: torch.Tensor, dim: int, parity: int) -> torch.Tensor:
    """Fold the three taps of `dim` onto the two coarse voxels a nearest-upsampled input repeats.

    Fine output 2i (parity 0) reads fine inputs 2i-1, 2i, 2i+1 = coarse i-1, i, i: taps (w0, w1 + w2)
    on coarse (i-1, i). Fine output 2i+1 reads 2i, 2i+1, 2i+2 = coarse i, i, i+1: taps (w0 + w1, w2)
    on coarse (i, i+1).
    """
    a, b, c = weight.unbind(dim)
    return torch.stack((a, b + c) if parity == 0 else (a + b, c), dim)


def _parity_kernels(weight: torch.Tensor) -> dict[tuple[int, int, int], torch.Tensor]:
    kernels = {}
    for px in (0, 1):
        kx = _collapse_taps(weight, 2, px)
        for py in (0, 1):
            ky = _collapse_taps(kx, 3, py)
            for pz in (0, 1):
                kernels[px, py, pz] = _collapse_taps(ky, 4, pz).contiguous()
    return kernels


def upsample_nearest_conv3x3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                               kernels: dict | None = None) -> torch.Tensor:
    """``conv3d(interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1)`` without
    building the upsampled input: one 2x2x2 convolution of the coarse input per output parity.

    x: (B, Cin, X, Y, Z); weight: (Cout, Cin, 3, 3, 3). Returns (B, Cout, 2X, 2Y, 2Z). The fine
    convolution's zero padding is one coarse voxel of zeros. `kernels`: `_parity_kernels(weight)`
    when the caller keeps them.
    """
    kernels = _parity_kernels(weight) if kernels is None else kernels
    n = x.shape[2:]
    padded = F.pad(x, (1, 1, 1, 1, 1, 1))
    out = x.new_empty((x.shape[0], weight.shape[0], *(2 * s for s in n)))
    for (px, py, pz), kernel in kernels.items():
        # Parity 0 reads coarse (i-1, i) = padded (i, i+1); parity 1 reads (i, i+1) = padded (i+1, i+2).
        window = padded[:, :, px:px + n[0] + 1, py:py + n[1] + 1, pz:pz + n[2] + 1]
        out[:, :, px::2, py::2, pz::2] = F.conv3d(window, kernel, bias)
    return out


class FusedUpForward:
    """The forward of MONAI's `DiffusionUNetResnetBlock` with ``up=True`` (3D), upsample + conv1 fused.

    A mixin: `accelerate` gives such blocks a class deriving from this and MONAI's block, so the
    modules and parameters stay MONAI's. Without gradients (sampling) on the CPU the fused path
    runs; with gradients (training), and on other devices, MONAI's own forward does: the gain was
    measured on the CPU only, and on an H200 our sampling step was 1.28x slower (median) than the
    reference's, where a GPU step is bound by kernel launches and the fused form launches 8
    convolutions for one (docs/performance.md).
    """

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.device.type != "cpu":
            return super().forward(x, emb)
        h = self.nonlinearity(self.norm1(x))
        conv = self.conv1.conv
        if type(conv) is Bf16Conv3d and h.dtype == torch.float32:  # bf16 multiply-adds, float32 in and out
            low = h.to(torch.bfloat16, memory_format=torch.channels_last_3d)
            h = upsample_nearest_conv3x3x3(low, conv.weight, None, self._kernels(conv.weight, torch.bfloat16)).float()
            if conv.bias is not None:
                h += conv.bias.reshape(1, -1, 1, 1, 1)
        else:
            h = upsample_nearest_conv3x3x3(h, conv.weight, conv.bias, self._kernels(conv.weight))
        h = h + self.time_emb_proj(self.nonlinearity(emb))[:, :, None, None, None]
        h = self.conv2(self.nonlinearity(self.norm2(h)))
        return self.skip_connection(self.upsample(x)) + h

    def _kernels(self, weight: torch.Tensor, dtype: torch.dtype | None = None) -> dict:
        # The folded weights are kept until the weight changes (sampling calls the block 30 times).
        # `dtype`: the folded float32 sums rounded once to it (channels-last, for bf16 kernels).
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device, dtype)
        cached = getattr(self, "_parity_cache", None)
        if cached is None or cached[0] != key:
            kernels = _parity_kernels(weight.detach())
            if dtype is not None:
                kernels = {k: v.to(dtype, memory_format=torch.channels_last_3d) for k, v in kernels.items()}
            cached = (key, kernels)
            self._parity_cache = cached
        return cached[1]


def _fusable_up_block(module: nn.Module) -> bool:
    from monai.networks.nets.diffusion_model_unet import DiffusionUNetResnetBlock

    if type(module) is not DiffusionUNetResnetBlock or not module.up or module.spatial_dims != 3:
        return False
    inner = getattr(module.upsample, "upsample_non_trainable", None)
    conv = module.conv1.conv
    return (isinstance(inner, nn.Upsample) and inner.mode == "nearest"
            and tuple(inner.scale_factor) == (2.0, 2.0, 2.0) and isinstance(conv, nn.Conv3d) and _is_plain_3x3x3(conv))


def accelerate(model: nn.Module) -> nn.Module:
    """Swap eligible layers of `model` for the fast versions in place; returns the model."""
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import MaisiGroupNorm3D

    for module in model.modules():
        if type(module) is nn.Conv3d and _is_plain_3x3x3(module):
            module.__class__ = FastConv3d  # a subclass with no extra state: parameters stay as they are
        elif type(module) is nn.Conv3d and _is_pointwise(module):
            module.__class__ = PointwiseConv3d
        elif type(module) is nn.Conv3d:
            module.__class__ = ShallowSafeConv3d
        elif isinstance(module, MaisiGroupNorm3D) and not module.norm_float16:
            module.__class__ = FastGroupNorm
        elif _fusable_up_block(module):
            module.__class__ = _fused_up_block_class()
        elif _is_pool_2x(module):
            module.__class__ = FastAvgPool3d
    return model


def restore_monai_layers(model: nn.Module) -> nn.Module:
    """Undo `accelerate` in place: MONAI's own classes again (benchmarks and tests compare with them)."""
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import MaisiGroupNorm3D
    from monai.networks.nets.diffusion_model_unet import DiffusionUNetResnetBlock

    for module in model.modules():
        if type(module) in (FastConv3d, PointwiseConv3d, ShallowSafeConv3d):
            module.__class__ = nn.Conv3d
        elif type(module) is FastGroupNorm:
            module.__class__ = MaisiGroupNorm3D
        elif isinstance(module, FusedUpForward):
            module.__class__ = DiffusionUNetResnetBlock
        elif type(module) is FastAvgPool3d:
            module.__class__ = nn.AvgPool3d
    return model


@functools.lru_cache(maxsize=None)
def _fused_up_block_class() -> type:
    from monai.networks.nets.diffusion_model_unet import DiffusionUNetResnetBlock

    # The fused forward on top of MONAI's block (same modules, same state-dict keys).
    return type("FusedUpResnetBlock", (FusedUpForward, DiffusionUNetResnetBlock), {})
