import copy

import pytest
import torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import MaisiGroupNorm3D
from torch import nn

from maisi2.fastops import FastConv3d, FastGroupNorm, accelerate


EPS32 = torch.finfo(torch.float32).eps


def _round_off(sums_of_abs_terms, terms):
    """A bound on |a - b| for two float32 evaluations of the same sums (any order, any CPU): each is
    within terms * eps * sum|term| of the exact value (Higham's gamma_n, with room to spare)."""
    return 2 * terms * EPS32 * sums_of_abs_terms


@pytest.mark.parametrize("batch, cin, cout, bias", [(1, 1, 4, True), (2, 3, 5, False), (3, 6, 2, True)])
def test_fast_conv_matches_torch_values_and_gradients(batch, cin, cout, bias):
    import torch.nn.functional as F

    torch.manual_seed(0)
    ref = nn.Conv3d(cin, cout, 3, padding=1, bias=bias)
    fast = copy.deepcopy(ref)
    fast.__class__ = FastConv3d
    x = torch.randn(batch, cin, 7, 6, 5, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    g = torch.randn(batch, cout, 7, 6, 5)
    ref(x).backward(g)
    out = fast(x2)
    out.backward(g)
    w, ax, ag = ref.weight.detach().abs(), x.detach().abs(), g.abs()
    b = None if ref.bias is None else ref.bias.detach().abs()
    # Each output, input gradient and weight gradient is a sum; bound the difference by its terms.
    assert ((out - ref(x)).abs() <= _round_off(F.conv3d(ax, w, b, padding=1), 27 * cin + 1)).all()
    assert ((x2.grad - x.grad).abs() <= _round_off(F.conv_transpose3d(ag, w, padding=1), 27 * cout)).all()
    grad_w_terms = torch.nn.grad.conv3d_weight(ax, w.shape, ag, padding=1)
    assert ((fast.weight.grad - ref.weight.grad).abs() <= _round_off(grad_w_terms, batch * 7 * 6 * 5)).all()
    if bias:
        assert ((fast.bias.grad - ref.bias.grad).abs() <= _round_off(ag.sum((0, 2, 3, 4)), batch * 7 * 6 * 5)).all()


def test_fast_conv_gradcheck_in_double():
    # float64 takes the ordinary path; check the custom Function itself with gradcheck
    from maisi2.fastops import _Conv3x3x3

    x = torch.randn(2, 2, 4, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_Conv3x3x3.apply, (x, w, b))


def test_fast_group_norm_equals_maisi_group_norm():
    torch.manual_seed(0)
    ref = MaisiGroupNorm3D(4, 8, eps=1e-6)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    fast = copy.deepcopy(ref)
    fast.__class__ = FastGroupNorm
    x = torch.randn(2, 8, 5, 6, 7) * 3 + 1
    assert torch.allclose(fast(x), ref(x), atol=1e-5)


def test_accelerate_keeps_keys_and_gives_strided_convs_only_the_shallow_guard():
    from maisi2.config import get_config
    from maisi2.nets import build_vae

    model = build_vae(get_config("tiny"))  # builders accelerate already
    kinds = {type(m) for m in model.modules()}
    assert FastConv3d in kinds and FastGroupNorm in kinds
    assert all(m.stride == (1, 1, 1) for m in model.modules() if isinstance(m, FastConv3d))
    from maisi2.fastops import ShallowSafeConv3d

    strided = [m for m in model.modules() if type(m) is ShallowSafeConv3d]
    assert strided and all(m.stride != (1, 1, 1) or m.kernel_size != (3, 3, 3) for m in strided)
    again = accelerate(model)
    assert again is model


# -- nearest upsampling + 3x3x3 convolution as one convolution per output parity -----------------

@pytest.mark.parametrize("batch, cin, cout, shape, bias", [(1, 3, 5, (4, 3, 5), True), (2, 4, 2, (2, 5, 3), False)])
def test_upsample_conv_equals_interpolate_then_conv(batch, cin, cout, shape, bias):
    import torch.nn.functional as F

    from maisi2.fastops import upsample_nearest_conv3x3x3

    torch.manual_seed(0)
    x = torch.randn(batch, cin, *shape)
    weight, b = torch.randn(cout, cin, 3, 3, 3), torch.randn(cout) if bias else None
    up = F.interpolate(x, scale_factor=2.0, mode="nearest")
    want = F.conv3d(up, weight, b, padding=1)
    bound = _round_off(F.conv3d(up.abs(), weight.abs(), None if b is None else b.abs(), padding=1), 27 * cin + 1)
    assert ((upsample_nearest_conv3x3x3(x, weight, b) - want).abs() <= bound).all()


def _tiny_unet():
    from maisi2 import nets
    from maisi2.config import get_config

    torch.manual_seed(0)
    unet = nets.build_unet(get_config("tiny")).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))  # zero-initialised convs would hide differences
    return unet


def test_fused_up_blocks_give_monai_s_unet_output():
    from monai.networks.nets.diffusion_model_unet import DiffusionUNetResnetBlock

    from maisi2.fastops import FusedUpForward, restore_monai_layers

    unet = _tiny_unet()
    fused = [m for m in unet.modules() if isinstance(m, FusedUpForward)]
    assert fused and all(isinstance(m, DiffusionUNetResnetBlock) and m.up for m in fused)
    monai = restore_monai_layers(copy.deepcopy(unet))
    assert not any(isinstance(m, (FusedUpForward, FastConv3d, FastGroupNorm)) for m in monai.modules())
    assert unet.state_dict().keys() == monai.state_dict().keys()
    x, t = torch.randn(1, 4, 8, 8, 8), torch.tensor([300.0])
    kwargs = dict(class_labels=torch.tensor([1]), spacing_tensor=torch.tensor([[150.0, 150.0, 200.0]]))
    with torch.no_grad():
        want = monai(x, t, **kwargs)
        torch.testing.assert_close(unet(x, t, **kwargs), want, rtol=1e-5, atol=1e-5)
        with torch.no_grad():  # second call: folded weights from the cache
            torch.testing.assert_close(unet(x, t, **kwargs), want, rtol=1e-5, atol=1e-5)
        for p in unet.parameters():  # a changed weight is folded again
            p.mul_(0.5)
        for p in monai.parameters():
            p.mul_(0.5)
        torch.testing.assert_close(unet(x, t, **kwargs), monai(x, t, **kwargs), rtol=1e-5, atol=1e-5)
    # with gradients (training) the block runs MONAI's own forward
    loss = unet(x, t, **kwargs).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in fused[0].conv1.parameters())


def test_fused_up_blocks_run_only_on_the_cpu(monkeypatch):
    """Off the CPU (here the shape-only 'meta' device, standing in for CUDA) MONAI's forward runs."""
    from maisi2 import fastops

    block = next(m for m in _tiny_unet().modules() if isinstance(m, fastops.FusedUpForward))
    x, emb = torch.randn(1, block.norm1.num_channels, 4, 4, 4), torch.randn(1, block.time_emb_proj.in_features)
    with torch.no_grad():
        on_cpu = block(x, emb)

    def fail(*args, **kwargs):
        raise AssertionError("the fused path ran off the CPU")

    monkeypatch.setattr(fastops, "upsample_nearest_conv3x3x3", fail)
    with pytest.raises(AssertionError, match="fused path"):
        with torch.no_grad():
            block(x, emb)
    block = block.to("meta")
    with torch.no_grad():
        out = block(x.to("meta"), emb.to("meta"))
    assert out.device.type == "meta" and out.shape == on_cpu.shape


@pytest.mark.parametrize("bias", [True, False])
def test_pointwise_conv_is_the_convolution_on_any_layout(bias):
    from maisi2.fastops import PointwiseConv3d, restore_monai_layers

    torch.manual_seed(0)
    conv = nn.Conv3d(6, 5, 1, bias=bias)
    fast = copy.deepcopy(conv)
    accelerate(fast)
    assert type(fast) is PointwiseConv3d
    x = torch.randn(2, 6, 4, 5, 3)
    for layout in (torch.contiguous_format, torch.channels_last_3d):
        xl = x.contiguous(memory_format=layout)
        with torch.no_grad():
            y, ref = fast(xl), conv(xl)
        assert torch.allclose(y, ref, atol=1e-6, rtol=1e-5)
        if layout == torch.channels_last_3d:
            assert y.is_contiguous(memory_format=torch.channels_last_3d)  # stays in the caller's layout
    # gradients flow through the matrix-product path as through the convolution
    xl = x.contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    fast(xl).square().sum().backward()
    g = xl.grad.clone()
    xl.grad = None
    conv(xl).square().sum().backward()
    assert torch.allclose(g, xl.grad, atol=1e-5)
    assert type(restore_monai_layers(fast)) is nn.Conv3d


# -- bf16 weight gradients on shallow inputs (bf16_weight_grad_unsafe) -------------------------
# torch 2.13's CPU bf16 convolution gave garbage weight gradients (1e30..inf) for inputs whose
# first spatial axis has 2 voxels on an AMD Zen 4 with AVX512-BF16 (these shapes, among others:
# (2, 2, 2), (2, 4, 4), (2, 3, 3), (2, 2, 1), (2, 16, 16) at 16-128 channels); such layers run in float32.

@pytest.mark.parametrize("shape", [(2, 2, 2), (2, 8, 8), (1, 4, 4)])
def test_shallow_inputs_train_in_float32_with_the_float32_weight_gradient(shape):
    torch.manual_seed(0)
    plain = torch.nn.Conv3d(8, 8, 3, padding=1)
    fast = accelerate(torch.nn.Sequential(torch.nn.Conv3d(8, 8, 3, padding=1)))[0]
    fast.load_state_dict(plain.state_dict())
    x, g = torch.randn(2, 8, *shape), torch.randn(2, 8, *shape)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fast(x)
    assert y.dtype == torch.float32  # not PyTorch's bf16 kernel
    y.backward(g)
    plain(x).backward(g)
    # Two float32 evaluations of sums of 2 x voxels terms, each |g x| <= max|x| |g|.
    bound = _round_off(float(x.abs().max() * g.abs().sum(dim=(0, 2, 3, 4)).max()), 2 * x[0, 0].numel())
    assert (fast.weight.grad - plain.weight.grad).abs().max() <= bound
    assert (fast.bias.grad - plain.bias.grad).abs().max() <= _round_off(float(g.abs().sum(dim=(0, 2, 3, 4)).max()), 2 * x[0, 0].numel())


def test_the_guard_is_narrow_deeper_inputs_and_sampling_keep_bf16():
    fast = accelerate(torch.nn.Sequential(torch.nn.Conv3d(8, 8, 3, padding=1)))[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fast(torch.randn(1, 8, 3, 4, 4)).dtype == torch.bfloat16  # 3 voxels deep: bf16 as before
        with torch.no_grad():  # sampling computes no weight gradient
            assert fast(torch.randn(1, 8, 2, 4, 4)).dtype == torch.bfloat16


def test_strided_convolutions_are_guarded_too_and_restored():
    from maisi2.fastops import ShallowSafeConv3d, restore_monai_layers

    torch.manual_seed(0)
    plain = torch.nn.Conv3d(8, 8, 3, stride=2, padding=1)
    model = accelerate(torch.nn.Sequential(torch.nn.Conv3d(8, 8, 3, stride=2, padding=1)))
    assert type(model[0]) is ShallowSafeConv3d
    model[0].load_state_dict(plain.state_dict())
    x = torch.randn(1, 8, 2, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model[0](x)
    assert y.dtype == torch.float32
    y.sum().backward()
    plain(x).sum().backward()
    # One float32 kernel on the same input both times: the same sums, at most reordered.
    bound = _round_off(float(x.abs().max()) * y[0, 0].numel(), y[0, 0].numel())
    assert (model[0].weight.grad - plain.weight.grad).abs().max() <= bound
    assert type(restore_monai_layers(model)[0]) is torch.nn.Conv3d
