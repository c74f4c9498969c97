import copy

import pytest
import torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import MaisiGroupNorm3D
from torch import nn

from maisi2.fastops import FastConv3d, FastGroupNorm, accelerate


@pytest.mark.parametrize("batch, cin, cout, bias", [(1, 1, 4, True), (2, 3, 5, False), (3, 6, 2, True)])
def test_fast_conv_matches_torch_values_and_gradients(batch, cin, cout, bias):
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
    assert torch.allclose(out, ref(x), atol=1e-6)
    assert torch.allclose(x2.grad, x.grad, atol=1e-5, rtol=1e-4)
    for p_fast, p_ref in zip(fast.parameters(), ref.parameters()):
        assert torch.allclose(p_fast.grad, p_ref.grad, atol=1e-4, rtol=1e-4)


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


def test_accelerate_keeps_keys_and_skips_strided_convs():
    from maisi2.config import get_config
    from maisi2.nets import build_vae

    model = build_vae(get_config("tiny"))  # builders accelerate already
    kinds = {type(m) for m in model.modules()}
    assert FastConv3d in kinds and FastGroupNorm in kinds
    assert all(m.stride == (1, 1, 1) for m in model.modules() if isinstance(m, FastConv3d))
    strided = [m for m in model.modules() if type(m) is nn.Conv3d]
    assert strided and all(m.stride != (1, 1, 1) or m.kernel_size != (3, 3, 3) for m in strided)
    again = accelerate(model)
    assert again is model
