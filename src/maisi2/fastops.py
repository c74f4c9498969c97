"""Faster drop-in layers for the MAISI networks on CPU, with identical parameters and keys.

Two measured bottlenecks (2 CPU threads, torch 2.13, 16 channels at 64^3):

* The weight gradient of a 3x3x3 convolution takes ~3 s through PyTorch's CPU kernel, 10x its
  forward pass. The same sum written as a convolution of the input with the output gradient
  (batch and channel axes swapped) takes ~0.4 s. `FastConv3d` uses it in the backward pass;
  the forward pass is untouched.
* MONAI's `MaisiGroupNorm3D` normalises group by group in a Python loop; `F.group_norm` computes
  the same statistics in one kernel, several times faster (forward and backward).

`accelerate(model)` swaps these classes in place on an existing network (the instances keep
their parameters, so state dicts and released checkpoints are unaffected). The fp16 group norm
of the released VAE (CUDA/autocast only) is left alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FastConv3d", "FastGroupNorm", "accelerate", "conv3x3x3_weight_grad"]


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


class FastConv3d(nn.Conv3d):
    """nn.Conv3d whose backward pass (stride 1, padding 1, 3x3x3, float32 on CPU) is faster."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = (torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32
                and self.weight.dtype == torch.float32)
        if fast:
            return _Conv3x3x3.apply(x, self.weight, self.bias)
        return super().forward(x)


class FastGroupNorm(nn.GroupNorm):
    """GroupNorm in one kernel (MONAI's MAISI version loops over groups); float32 statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps).to(x.dtype)


def accelerate(model: nn.Module) -> nn.Module:
    """Swap eligible layers of `model` for the fast versions in place; returns the model."""
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import MaisiGroupNorm3D

    for module in model.modules():
        if type(module) is nn.Conv3d and _is_plain_3x3x3(module):
            module.__class__ = FastConv3d  # a subclass with no extra state: parameters stay as they are
        elif isinstance(module, MaisiGroupNorm3D) and not module.norm_float16:
            module.__class__ = FastGroupNorm
    return model
