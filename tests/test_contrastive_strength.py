"""The contrastive term's strength relative to the flow loss (derived in maisi2.losses): the
closed form against autograd, and the normalised lambda giving one strength at two geometries."""

import pytest
import torch

from maisi2.losses import (ContrastRegions, contrastive_relative_strength, dilate, flow_loss, flow_weight_sum,
                           mask_weights, normalised_lambdas, region_contrastive_loss)

W = 100.0  # the tumour weight of the flow loss (ControlNetLossSettings.label_weight)


def _geometry(size, corner, side):
    """An (1, 1, size^3) latent-grid ROI: a cube of `side` voxels at `corner`."""
    roi = torch.zeros(1, 1, size, size, size)
    roi[0, 0, corner:corner + side, corner:corner + side, corner:corner + side] = 1
    return roi


def _gradient_ratio(roi, lam_b, normalise=True):
    """|d(lambda_b L_contrast)/dv| over |d L_flow/dv| at one ROI element, measured by autograd on
    the same functions the ControlNet loss calls (L1 flow loss, output placement)."""
    g = torch.Generator().manual_seed(0)
    shape = (1, 4, *roi.shape[2:])
    v_orig = torch.randn(shape, generator=g).requires_grad_(True)
    v_target = torch.randn(shape, generator=g)
    v_pert = v_orig.detach() + 0.1 * torch.randn(shape, generator=g)  # D_roi ~ 0.08 < delta: the ROI term is live
    weight = mask_weights(roi, W)
    (g_flow,) = torch.autograd.grad(flow_loss(v_orig, v_target, weight, normalise=normalise), v_orig)
    terms = region_contrastive_loss(v_orig, v_pert, ContrastRegions(roi, 1 - dilate(roi, 1)))
    (g_con,) = torch.autograd.grad((lam_b * (terms.roi + terms.background)).sum(), v_orig)
    at = (0, 0, *[int(i) for i in roi[0, 0].nonzero()[0]])
    return (g_con[at].abs() / g_flow[at].abs()).item()


@pytest.mark.parametrize("normalise", [True, False])
@pytest.mark.parametrize("size,side", [(8, 2), (16, 3), (16, 5)])
def test_closed_form_matches_autograd(size, side, normalise):
    roi = _geometry(size, 2, side)
    n, N = side**3, size**3
    expected = contrastive_relative_strength(0.01, n, flow_weight_sum(N, n, W, normalise), W)
    assert _gradient_ratio(roi, torch.tensor([0.01]), normalise) == pytest.approx(expected, rel=1e-4)
    if normalise:  # the sketch, lambda (N + 99 n) / (100 n), is this closed form at w = 100
        assert expected == pytest.approx(0.01 * (N + 99 * n) / (100 * n))


def test_normalised_lambda_gives_one_strength_at_two_geometries():
    reference = (128 * 128 * 32, 64)
    target = 0.01 * (reference[0] + 99 * reference[1]) / (100 * reference[1])
    ratios_paper, ratios_normalised = [], []
    for size, side in [(8, 2), (16, 4)]:  # N/n = 64 and 64 at different N, then below a different N/n
        roi = _geometry(size, 2, side)
        n = roi.sum().reshape(1)
        lam_b = normalised_lambdas(0.01, n, mask_weights(roi, W).sum(), 1, W, True, reference)
        ratios_normalised.append(_gradient_ratio(roi, lam_b))
        ratios_paper.append(_gradient_ratio(roi, torch.tensor([0.01])))
    roi = _geometry(16, 1, 2)  # N/n = 512
    lam_b = normalised_lambdas(0.01, roi.sum().reshape(1), mask_weights(roi, W).sum(), 1, W, True, reference)
    ratios_normalised.append(_gradient_ratio(roi, lam_b))
    ratios_paper.append(_gradient_ratio(roi, torch.tensor([0.01])))
    assert ratios_normalised == pytest.approx([target] * 3, rel=1e-4)
    assert max(ratios_paper) / min(ratios_paper) > 3  # the plain lambda's strength does depend on N/n


def test_batch_of_two_geometries_each_get_the_reference_strength():
    """In a batch the flow loss is one weighted mean over both samples: lambda_b uses the batch's S."""
    roi = torch.cat([_geometry(8, 1, 2), _geometry(8, 1, 4)])
    weight = mask_weights(roi, W)
    n = roi.flatten(1).sum(1)
    lam_b = normalised_lambdas(0.01, n, weight.sum(), 2, W, True)
    strength = contrastive_relative_strength(lam_b, n, weight.sum(), W, batch_size=2)
    ref = contrastive_relative_strength(0.01, 64, flow_weight_sum(128 * 128 * 32, 64, W, True), W)
    assert strength.tolist() == pytest.approx([ref, ref])


def test_normalised_mode_in_the_controlnet_loss_and_its_checks():
    from maisi2.train_controlnet import ControlNetLossSettings

    assert ControlNetLossSettings().lambda_mode == "paper"  # the default keeps the paper's lambda as given
    with pytest.raises(ValueError, match="lambda_mode"):
        ControlNetLossSettings(lambda_mode="scaled")
    with pytest.raises(ValueError, match="lambda_reference"):
        ControlNetLossSettings(lambda_mode="normalised", lambda_reference=(64, 128))
