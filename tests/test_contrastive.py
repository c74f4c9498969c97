"""The region-specific contrastive loss: pure tensor functions first, then one training loss on the
tiny networks (frozen UNet, both placements)."""

import pytest
import torch
import torch.nn.functional as F

from maisi2 import nets
from maisi2.config import get_config
from maisi2.labels import label_id
from maisi2.losses import (
    OFFICIAL_LAMBDA_SCHEDULE,
    PAPER_LAMBDA_SCHEDULE,
    check_lambda_schedule,
    contrast_regions,
    dilate,
    feature_contrastive_loss,
    lambda_at,
    parse_lambda_schedule,
    pool_any,
    region_contrastive_loss,
    region_weight_map,
)

LIVER, TUMOR = label_id("liver"), label_id("hepatic tumor")


def _labels(batch=1, size=16, tumor_at=None):
    """Liver everywhere inside a body; optionally a cubic hepatic tumour (slices) in sample 0."""
    labels = torch.full((batch, 1, size, size, size), LIVER, dtype=torch.uint8)
    if tumor_at is not None:
        labels[(0, 0, *tumor_at)] = TUMOR
    return labels


def _perturbed(labels):
    from maisi2.train_controlnet import perturb_labels  # labels.remove_tumors, per sample

    return perturb_labels(labels)


def _regions_for(labels, grid=(4, 4, 4), dilation=1):
    return contrast_regions(labels, _perturbed(labels), grid, dilation)


# -- regions on the latent grid ------------------------------------------------------------

def test_one_voxel_tumor_survives_pooling_to_latent_grid():
    labels = _labels(tumor_at=(5, 9, 14))  # image 16^3 -> latent 4^3: latent voxel (1, 2, 3)
    regions = _regions_for(labels)
    assert regions.roi.sum() == 1 and regions.roi[0, 0, 1, 2, 3] == 1
    assert bool(regions.has_roi[0])
    # what nearest-neighbour resizing (the released code) would do: the tumour vanishes
    nearest = F.interpolate((labels != _perturbed(labels)).float(), size=(4, 4, 4), mode="nearest")
    assert nearest.sum() == 0
    weights = region_weight_map(labels, [TUMOR], (4, 4, 4), weight=100.0)
    assert weights[0, 0, 1, 2, 3] == 100 and weights.sum() == 100 + 63


def test_one_voxel_lung_tumor_takes_its_lobe_and_still_counts():
    lobe = label_id("left lung upper lobe")
    labels = torch.full((1, 1, 16, 16, 16), lobe, dtype=torch.uint8)
    labels[0, 0, 2, 3, 7] = label_id("lung tumor")
    perturbed = _perturbed(labels)
    assert perturbed[0, 0, 2, 3, 7] == lobe and (perturbed == lobe).all()
    regions = contrast_regions(labels, perturbed, (4, 4, 4))
    assert regions.roi.sum() == 1 and regions.roi[0, 0, 0, 0, 1] == 1


def test_background_is_complement_of_dilated_roi():
    labels = _labels(tumor_at=(slice(4, 8), slice(4, 8), slice(4, 8)))  # latent voxel (1, 1, 1)
    regions = _regions_for(labels, dilation=1)
    grown = torch.zeros(4, 4, 4)
    grown[0:3, 0:3, 0:3] = 1
    assert torch.equal(regions.background[0, 0], 1 - grown)
    assert torch.equal(_regions_for(labels, dilation=0).background, 1 - regions.roi)


def test_pool_any_uneven_sizes_and_errors():
    mask = torch.zeros(1, 1, 10, 10, 10)
    mask[0, 0, 9, 0, 4] = 1
    pooled = pool_any(mask, (3, 3, 3))
    assert pooled.sum() >= 1 and pooled[0, 0, 2, 0, 1] == 1
    with pytest.raises(ValueError, match="only shrinks"):
        pool_any(mask, (20, 20, 20))
    with pytest.raises(ValueError, match=">= 0"):
        dilate(mask, -1)


def test_regions_at_coarser_grid_never_call_dilated_roi_background():
    labels = _labels(size=32, tumor_at=(slice(0, 2), slice(0, 2), slice(0, 2)))
    regions = _regions_for(labels, grid=(8, 8, 8), dilation=1)
    coarse = regions.at((2, 2, 2))
    assert coarse.roi[0, 0, 0, 0, 0] == 1 and coarse.roi.sum() == 1
    assert coarse.background[0, 0, 0, 0, 0] == 0 and coarse.background.sum() == 7


# -- the loss terms ------------------------------------------------------------------------

def _predictions(batch=1, grid=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    v_orig = torch.randn(batch, 4, grid, grid, grid, generator=g).requires_grad_()
    v_pert = torch.randn(batch, 4, grid, grid, grid, generator=g).mul(0.1).requires_grad_()
    return v_orig, v_pert


def test_no_tumor_gives_exactly_zero_and_no_gradient():
    v_orig, v_pert = _predictions()
    regions = _regions_for(_labels())
    terms = region_contrastive_loss(v_orig, v_pert, regions)
    l_roi, l_bg = terms.batch_mean()
    assert l_roi.item() == 0.0 and l_bg.item() == 0.0
    (l_roi + l_bg).backward()
    assert not v_orig.grad.any() and not v_pert.grad.any()
    feats = feature_contrastive_loss([v_orig, v_orig[:, :, ::2, ::2, ::2]], [v_pert, v_pert[:, :, ::2, ::2, ::2]], regions)
    assert feats.roi.item() == 0.0 and feats.background.item() == 0.0


def test_background_term_ignores_the_dilated_roi():
    labels = _labels(tumor_at=(slice(4, 8), slice(4, 8), slice(4, 8)))
    regions = _regions_for(labels, dilation=1)
    v_orig, v_pert = _predictions()
    before = region_contrastive_loss(v_orig, v_pert, regions)
    inside = dilate(regions.roi, 1).bool().expand_as(v_pert)
    v_changed = v_pert.detach().clone()
    v_changed[inside] += 5.0  # inside the dilated ROI only
    after = region_contrastive_loss(v_orig, v_changed, regions)
    assert torch.equal(after.background, before.background)
    assert not torch.equal(after.roi, before.roi)  # the ROI term did see it
    v_changed[~inside] += 1.0  # now outside: the background term must move
    assert not torch.equal(region_contrastive_loss(v_orig, v_changed, regions).background, before.background)


def test_roi_term_is_clamped_at_delta_with_zero_gradient():
    labels = _labels(tumor_at=(slice(4, 8), slice(4, 8), slice(4, 8)))
    regions = _regions_for(labels)
    v_orig = torch.zeros(1, 4, 4, 4, 4, requires_grad=True)
    far = torch.full((1, 4, 4, 4, 4), 3.0, requires_grad=True)  # D_roi = 3 > delta = 2
    terms = region_contrastive_loss(v_orig, far, regions, delta=2.0)
    assert terms.roi.item() == -2.0 and terms.distance.item() == pytest.approx(3.0)
    terms.roi.sum().backward()
    assert not v_orig.grad.any() and not far.grad.any()
    near = torch.full((1, 4, 4, 4, 4), 0.5, requires_grad=True)  # below delta: -D_roi, live gradient
    terms = region_contrastive_loss(v_orig, near, regions, delta=2.0)
    assert terms.roi.item() == pytest.approx(-0.5)
    terms.roi.sum().backward()
    assert near.grad.any()


def test_batch_mixes_tumor_and_tumor_free_samples():
    labels = _labels(batch=3)
    labels[0, 0, 4:8, 4:8, 4:8] = TUMOR
    labels[2, 0, 0:2, 12:16, 8:9] = TUMOR
    regions = _regions_for(labels)
    assert regions.has_roi.tolist() == [True, False, True]
    v_orig, v_pert = _predictions(batch=3)
    terms = region_contrastive_loss(v_orig, v_pert, regions)
    assert terms.roi[1] == 0 and terms.background[1] == 0 and terms.roi[0] < 0 and terms.background[2] > 0
    # each sample alone gives the same terms as in the batch; the batch mean divides by the whole batch
    for b in (0, 2):
        alone = region_contrastive_loss(v_orig[b:b + 1], v_pert[b:b + 1], regions.select(torch.tensor([b])))
        assert torch.allclose(alone.roi, terms.roi[b:b + 1]) and torch.allclose(alone.background, terms.background[b:b + 1])
    l_roi, l_bg = terms.batch_mean()
    assert torch.allclose(l_roi, (terms.roi[0] + terms.roi[2]) / 3)
    (l_roi + l_bg).backward()
    assert not v_orig.grad[1].any() and not v_pert.grad[1].any() and v_orig.grad[0].any()
    with pytest.raises(ValueError, match="smaller"):
        terms.batch_mean(2)


def test_official_background_form_compares_with_the_target():
    labels = _labels(tumor_at=(slice(4, 8), slice(4, 8), slice(4, 8)))
    regions = _regions_for(labels)
    v_orig, v_pert = _predictions()
    target = v_pert.detach().clone()
    official = region_contrastive_loss(v_orig, v_pert, regions, background_form="official", v_target=target)
    assert official.background.item() == 0.0  # v_pert equals the target
    paper = region_contrastive_loss(v_orig, v_pert, regions)
    assert paper.background.item() > 0 and torch.equal(paper.roi, official.roi)
    with pytest.raises(ValueError, match="v_target"):
        region_contrastive_loss(v_orig, v_pert, regions, background_form="official")
    with pytest.raises(ValueError, match="background_form"):
        region_contrastive_loss(v_orig, v_pert, regions, background_form="nope")


def test_feature_placement_pools_regions_per_level():
    labels = _labels(tumor_at=(slice(4, 8), slice(4, 8), slice(4, 8)))
    regions = _regions_for(labels, dilation=0)
    g = torch.Generator().manual_seed(1)
    shapes = [(1, 3, 4, 4, 4), (1, 5, 2, 2, 2), (1, 6, 1, 1, 1)]
    f_orig = [torch.randn(s, generator=g) for s in shapes]
    f_pert = [f + 0.25 for f in f_orig]  # every level differs by exactly 0.25 everywhere
    terms = feature_contrastive_loss(f_orig, f_pert, regions, delta=2.0)
    assert terms.roi.item() == pytest.approx(-0.25) and terms.distance.item() == pytest.approx(0.25)
    # the 1^3 mid level lies wholly in the ROI: its background is empty and counts 0
    assert terms.background.item() == pytest.approx((0.25 + 0.25 + 0.0) / 3)


# -- the lambda schedule -------------------------------------------------------------------

def test_paper_schedule_and_its_reversed_ablation():
    assert [lambda_at(PAPER_LAMBDA_SCHEDULE, s, 100) for s in (0, 49, 50, 99)] == [0.01, 0.01, 0.001, 0.001]
    reversed_ = parse_lambda_schedule("0:0.001,0.5:0.01")
    assert reversed_ == ((0.0, 0.001), (0.5, 0.01))
    assert [lambda_at(reversed_, s, 10) for s in (0, 4, 5, 9)] == [0.001, 0.001, 0.01, 0.01]
    assert parse_lambda_schedule("0.01") == OFFICIAL_LAMBDA_SCHEDULE
    assert lambda_at(OFFICIAL_LAMBDA_SCHEDULE, 999, 1000) == 0.01
    three = check_lambda_schedule([(0, 0.1), (0.25, 0.0), (0.75, 0.2)])
    assert [lambda_at(three, s, 4) for s in range(4)] == [0.1, 0.0, 0.0, 0.2]


@pytest.mark.parametrize("bad, match", [
    (((0.5, 0.01),), "start at fraction 0.0"),
    (((0.0, 0.01), (0.0, 0.1)), "increase strictly"),
    (((0.0, 0.01), (1.0, 0.1)), "increase strictly"),
    (((0.0, -1.0),), ">= 0"),
    ((), "start at fraction 0.0"),
])
def test_bad_schedules_say_what_is_wrong(bad, match):
    with pytest.raises(ValueError, match=match):
        check_lambda_schedule(bad)


def test_unreadable_schedule_text():
    with pytest.raises(ValueError, match="START:VALUE"):
        parse_lambda_schedule("half:0.01")


# -- on the tiny networks ------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_nets():
    """A frozen tiny UNet with non-zero weights (MONAI zero-initialises its output conv, which would
    make every prediction 0) and a ControlNet initialised from it with live zero-convs."""
    torch.manual_seed(0)
    cfg = get_config("tiny")
    unet, controlnet = nets.build_unet(cfg), nets.build_controlnet(cfg)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    nets.controlnet_from_unet(controlnet, unet)
    with torch.no_grad():
        for name, p in controlnet.named_parameters():
            if name.startswith("controlnet_"):
                p.add_(torch.randn_like(p) * 0.05)
    unet.eval().requires_grad_(False)
    return cfg, unet, controlnet


def _batch(size=32):
    """(x0, cond, labels): two samples, the first with a hepatic tumour, the second without."""
    labels = torch.full((2, 1, size, size, size), LIVER, dtype=torch.uint8)
    labels[0, 0, 8:20, 8:20, 8:20] = TUMOR
    cond = nets.Conditioning(torch.ones(2, 3), torch.ones(2, dtype=torch.long))
    return torch.randn(2, 4, size // 4, size // 4, size // 4, generator=torch.Generator().manual_seed(5)), cond, labels


@pytest.mark.parametrize("placement", ["output", "encoder"])
def test_only_the_controlnet_learns(tiny_nets, placement):
    from maisi2.train_controlnet import ControlNetLossSettings, controlnet_loss

    cfg, unet, controlnet = tiny_nets
    controlnet.zero_grad(set_to_none=True)
    settings = ControlNetLossSettings(placement=placement)
    out = controlnet_loss(unet, controlnet, *_batch(), settings, cfg.flow, lam=0.01,
                          generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert out.logs["roi_samples"] == 1 and out.logs["roi_loss"] < 0 and out.logs["bg_loss"] > 0
    assert out.logs["encoder_placement"] == float(placement == "encoder")
    assert all(not p.requires_grad and p.grad is None for p in unet.parameters())
    assert not unet.training
    grads = [p.grad for p in controlnet.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert torch.isfinite(out.loss)


def test_contrastive_off_is_the_plain_weighted_flow_loss(tiny_nets):
    from maisi2.train_controlnet import ControlNetLossSettings, controlnet_loss

    cfg, unet, controlnet = tiny_nets
    batch = _batch()
    on = controlnet_loss(unet, controlnet, *batch, ControlNetLossSettings(placement="output"), cfg.flow, lam=0.01,
                         generator=torch.Generator().manual_seed(3))
    off = controlnet_loss(unet, controlnet, *batch, ControlNetLossSettings(contrastive=False), cfg.flow, lam=0.01,
                          generator=torch.Generator().manual_seed(3))
    assert off.logs["roi_loss"] == 0 and off.logs["bg_loss"] == 0 and off.logs["lambda"] == 0
    assert off.loss.item() == pytest.approx(on.logs["flow_loss"])  # same t and noise from the same seed
    logs = on.logs
    assert on.loss.item() == pytest.approx(logs["flow_loss"] + 0.01 * (logs["roi_loss"] + logs["bg_loss"]))


def test_residual_helper_matches_the_call_inside_predict_velocity(tiny_nets):
    from maisi2.train_controlnet import _RecordResiduals

    cfg, unet, controlnet = tiny_nets
    _, cond, labels = _batch()
    cond = nets.Conditioning(cond.spacing, cond.modality, nets.mask_to_bitplanes(labels))
    x_t, t = torch.randn(2, 4, 8, 8, 8), torch.tensor([100.0, 900.0])
    recorder = _RecordResiduals(controlnet)
    with torch.no_grad():
        nets.predict_velocity(unet, x_t, t, cond, controlnet=recorder)
        down, mid = nets.controlnet_residuals(controlnet, x_t, t, cond)
        direct = [*down, mid]
    assert len(direct) == len(recorder.residuals)
    assert all(torch.equal(a, b) for a, b in zip(direct, recorder.residuals))


def test_auto_placement_rule():
    from maisi2.train_controlnet import ControlNetLossSettings, resolve_placement

    auto = ControlNetLossSettings(placement="auto", auto_output_max_voxels=32**3)
    assert resolve_placement(auto, 1, (32, 32, 32)) == "output"
    assert resolve_placement(auto, 2, (32, 32, 32)) == "encoder"  # the budget counts the whole batch
    assert resolve_placement(ControlNetLossSettings(placement="encoder"), 1, (8, 8, 8)) == "encoder"
    official = ControlNetLossSettings(placement="auto", background_form="official", auto_output_max_voxels=1)
    assert resolve_placement(official, 4, (64, 64, 64)) == "output"  # needs the final prediction


def test_normalised_lambda_mode_scales_the_contrastive_term(tiny_nets):
    """lambda_mode=normalised: the tumour sample's lambda is the derived one, logged, and in the loss."""
    from maisi2.losses import normalised_lambdas, pool_any, mask_weights
    from maisi2.train_controlnet import ControlNetLossSettings, controlnet_loss

    cfg, unet, controlnet = tiny_nets
    x0, cond, labels = _batch()
    out = controlnet_loss(unet, controlnet, x0, cond, labels,
                          ControlNetLossSettings(placement="output", lambda_mode="normalised"), cfg.flow, lam=0.01,
                          generator=torch.Generator().manual_seed(3))
    roi = pool_any(labels == TUMOR, (8, 8, 8))
    expected = normalised_lambdas(0.01, roi[:1].sum().reshape(1), mask_weights(roi, 100.0).sum(), 2, 100.0, True)
    logs = out.logs
    assert logs["lambda"] == pytest.approx(float(expected))
    assert out.loss.item() == pytest.approx(logs["flow_loss"] + logs["lambda"] * (logs["roi_loss"] + logs["bg_loss"]))
