"""Training losses, each a pure function of tensors.

* `flow_loss`: L1 between predicted and target velocity (the official MAISI code trains with L1;
  the paper writes a squared error, available as ``form="l2"``), optionally with per-voxel region
  weights (tumour voxels weigh more for the ControlNet).
* the region-specific contrastive loss of MAISI-v2 lives below it (see `region_contrastive_loss`).
"""

from __future__ import annotations

import torch

__all__ = ["FLOW_LOSS_FORMS", "check_flow_loss_form", "flow_loss"]

# "l1": mean absolute error, as the official MAISI code trains; "l2": mean squared error, as the
# paper writes the rectified-flow objective.
FLOW_LOSS_FORMS = ("l1", "l2")


def check_flow_loss_form(form: str) -> str:
    if form not in FLOW_LOSS_FORMS:
        raise InvalidInput(f"flow.loss must be one of {', '.join(FLOW_LOSS_FORMS)} (l1: the official code, "
                         f"l2: the paper's squared error); got {form!r}")
    return form


def flow_loss(
    v_pred: torch.Tensor,
    v_target: torch.Tensor,
    weight: torch.Tensor | None = None,
    normalise: bool = True,
    form: str = "l1",
) -> torch.Tensor:
    """Mean velocity error: absolute (``form="l1"``, the release) or squared (``"l2"``, the paper).

    v_pred, v_target: (B, C, x, y, z). weight: broadcastable to them (e.g. (B, 1, x, y, z)), or None.
    With `normalise` the weighted error is divided by the summed weight (a weighted mean, so the
    loss scale does not depend on how many voxels are up-weighted); without it, it is divided by
    the voxel count as in the official code (tumour-heavy batches then have larger losses).
    """
    diff = v_pred.float() - v_target.float()
    err = diff.abs() if check_flow_loss_form(form) == "l1" else diff.square()
    if weight is None:
        return err.mean()
    weight = weight.float().expand_as(err)
    if normalise:
        return (err * weight).sum() / weight.sum().clamp_min(1e-12)
    return (err * weight).mean()


# -- region-specific contrastive loss (MAISI-v2) -------------------------------------------
#
# The ControlNet sees the same noisy latent twice: with the real label map and with a perturbed
# one in which every tumour became its parent organ (`labels.remove_tumors`). Inside the changed
# region (the ROI) the two velocity predictions should differ, so the tumour label matters;
# outside the dilated ROI they should agree, so a tumour does not repaint the whole body:
#
#     L_roi = -min(D_roi, delta),  D_roi = mean over the ROI of |v_orig - v_pert|
#     L_bg  = mean over the background of |v_orig - v_pert|   (paper; official: |v_pert - v_target|)
#     L     = L_flow + lambda * (L_roi + L_bg)
#
# Regions live on the latent grid, 4x coarser than the label map. They are pooled with "any
# voxel" (max) pooling, not nearest-neighbour sampling, so a tumour smaller than one latent voxel
# still marks the voxel it falls in. Every term is per sample: a sample whose mask holds no tumour
# gets no contrastive term at all (exactly zero, no gradient), whatever else is in the batch.

# This section's imports (the file grows by appending sections).
import math  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Sequence  # noqa: E402

import torch.nn.functional as F  # noqa: E402

from maisi2.errors import InvalidInput

__all__ += [
    "pool_any",
    "dilate",
    "ContrastRegions",
    "contrast_regions",
    "region_weight_map",
    "mask_weights",
    "ContrastiveTerms",
    "region_contrastive_loss",
    "feature_contrastive_loss",
    "BACKGROUND_FORMS",
    "LambdaSchedule",
    "PAPER_LAMBDA_SCHEDULE",
    "OFFICIAL_LAMBDA_SCHEDULE",
    "check_lambda_schedule",
    "parse_lambda_schedule",
    "lambda_at",
]

BACKGROUND_FORMS = ("paper", "official")


def pool_any(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(B, 1, X, Y, Z) mask -> (B, 1, *size) float 0/1: a coarse voxel is 1 when any fine voxel
    under it is 1 (max pooling; sizes that do not divide evenly use adaptive windows).
    """
    size = tuple(int(s) for s in size)
    if mask.dim() != 5 or len(size) != 3:
        raise InvalidInput(f"expected a (B, 1, X, Y, Z) mask and a 3-d size; got {tuple(mask.shape)} and {size}")
    m = mask.float()
    if tuple(m.shape[2:]) == size:
        return m
    if any(s > S for s, S in zip(size, m.shape[2:])):
        raise InvalidInput(f"cannot pool a {tuple(m.shape[2:])} mask up to {size}; pooling only shrinks")
    return F.adaptive_max_pool3d(m, size)


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Grow a (B, 1, x, y, z) 0/1 mask by `radius` voxels (a cube of side 2*radius+1, via max pooling)."""
    if radius < 0:
        raise InvalidInput(f"dilation radius must be >= 0, got {radius}")
    m = mask.float()
    if radius == 0:
        return m
    return F.max_pool3d(m, kernel_size=2 * radius + 1, stride=1, padding=radius)


@dataclass(frozen=True)
class ContrastRegions:
    """Where the two predictions must differ (`roi`) and where they must agree (`background`).

    roi, background: (B, 1, x, y, z) float 0/1 on one grid; background = 1 - dilate(roi).
    """

    roi: torch.Tensor
    background: torch.Tensor

    @property
    def has_roi(self) -> torch.Tensor:
        """(B,) bool: samples that hold a tumour (the only ones that get a contrastive term)."""
        return self.roi.flatten(1).amax(dim=1) > 0

    def at(self, size: Sequence[int]) -> "ContrastRegions":
        """The same regions on a coarser grid: the ROI and the dilated ROI both pooled with any-voxel
        pooling, so a coarse voxel touching the dilated ROI is never counted as background."""
        return ContrastRegions(pool_any(self.roi, size), 1.0 - pool_any(1.0 - self.background, size))

    def select(self, index: torch.Tensor) -> "ContrastRegions":
        return ContrastRegions(self.roi[index], self.background[index])


def contrast_regions(labels: torch.Tensor, perturbed: torch.Tensor, size: Sequence[int], dilation: int = 1) -> ContrastRegions:
    """ROI and background of the contrastive loss on the latent grid `size`.

    labels, perturbed: (B, 1, X, Y, Z) label maps at image resolution (real and tumour-free).
    The ROI is every voxel the perturbation changed, pooled to `size` with any-voxel pooling; the
    background is the complement of the ROI dilated by `dilation` latent voxels.
    """
    if labels.shape != perturbed.shape:
        raise InvalidInput(f"labels {tuple(labels.shape)} and perturbed {tuple(perturbed.shape)} must have the same shape")
    roi = pool_any(labels != perturbed, size)
    return ContrastRegions(roi, 1.0 - dilate(roi, dilation))


def region_weight_map(labels: torch.Tensor, ids: Sequence[int], size: Sequence[int], weight: float = 100.0) -> torch.Tensor:
    """Per-voxel flow-loss weights on the latent grid: `weight` where any image voxel under a latent
    voxel carries one of `ids`, else 1. labels: (B, 1, X, Y, Z) -> (B, 1, *size)."""
    chosen = torch.isin(labels, torch.as_tensor(list(ids), device=labels.device, dtype=labels.dtype))
    return mask_weights(pool_any(chosen, size), weight)


def mask_weights(mask: torch.Tensor, weight: float) -> torch.Tensor:
    """`weight` where `mask` is set, 1 elsewhere (float): the weights of a region-weighted mean."""
    return 1.0 + (float(weight) - 1.0) * mask.float()


@dataclass
class ContrastiveTerms:
    """Per-sample contrastive terms, (n,) each; zero (and gradient-free) where `has_roi` is False.

    roi: -min(D_roi, delta); background: L_bg; distance: D_roi (detached, for logs).
    """

    roi: torch.Tensor
    background: torch.Tensor
    distance: torch.Tensor
    has_roi: torch.Tensor

    def batch_mean(self, batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_roi, L_bg) averaged over a batch of `batch_size` samples (default: the n given here).

        Dividing by the whole batch, tumour-free samples included, makes the batch loss the mean of
        the per-sample losses batch-1 training would compute, so lambda means the same at any batch size.
        """
        n = batch_size if batch_size is not None else self.roi.shape[0]
        if n < self.roi.shape[0]:
            raise InvalidInput(f"batch_size {n} is smaller than the {self.roi.shape[0]} samples given")
        return self.roi.sum() / max(n, 1), self.background.sum() / max(n, 1)


def _masked_mean(err: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample mean of err (B, C, ...) over mask (B, 1, ...); 0 for an empty mask (no NaN, no grad)."""
    count = mask.flatten(1).sum(dim=1) * err.shape[1]
    return (err * mask).flatten(1).sum(dim=1) / count.clamp_min(1.0)


def _terms(d_roi: torch.Tensor, l_bg: torch.Tensor, has_roi: torch.Tensor, delta: float) -> ContrastiveTerms:
    # clamp, not min with a constant: the gradient is exactly zero once D_roi passes delta
    # ("we do not need it to be extreme"), so the ROI term cannot blow the predictions apart.
    l_roi = -torch.clamp(d_roi, max=float(delta))
    zero = torch.zeros_like(l_roi)
    return ContrastiveTerms(
        roi=torch.where(has_roi, l_roi, zero),
        background=torch.where(has_roi, l_bg, zero),
        distance=torch.where(has_roi, d_roi, zero).detach(),
        has_roi=has_roi,
    )


def region_contrastive_loss(
    v_orig: torch.Tensor,
    v_pert: torch.Tensor,
    regions: ContrastRegions,
    delta: float = 2.0,
    background_form: str = "paper",
    v_target: torch.Tensor | None = None,
) -> ContrastiveTerms:
    """The contrastive terms on the final velocity predictions (the `output` placement).

    v_orig, v_pert: (B, C, x, y, z) predictions with the real and the tumour-free mask, from the
    same x_t, t and noise. regions: on the same (x, y, z) grid.
    background_form: "paper" compares the two predictions outside the dilated ROI; "official"
    compares the perturbed prediction with the flow target `v_target` (as the released code does).
    """
    if v_orig.shape != v_pert.shape:
        raise InvalidInput(f"v_orig {tuple(v_orig.shape)} and v_pert {tuple(v_pert.shape)} must have the same shape")
    if background_form not in BACKGROUND_FORMS:
        raise InvalidInput(f"background_form must be one of {', '.join(BACKGROUND_FORMS)}; got {background_form!r}")
    diff = (v_orig.float() - v_pert.float()).abs()
    if background_form == "official":
        if v_target is None:
            raise InvalidInput("background_form='official' compares with the flow target: pass v_target")
        bg_err = (v_pert.float() - v_target.float()).abs()
    else:
        bg_err = diff
    regions = regions.at(v_orig.shape[2:])
    return _terms(_masked_mean(diff, regions.roi), _masked_mean(bg_err, regions.background), regions.has_roi, delta)


def feature_contrastive_loss(
    feats_orig: Sequence[torch.Tensor],
    feats_pert: Sequence[torch.Tensor],
    regions: ContrastRegions,
    delta: float = 2.0,
) -> ContrastiveTerms:
    """The contrastive terms on ControlNet residuals (the memory-saving `encoder` placement).

    feats_orig, feats_pert: matching lists of (B, C_l, x_l, y_l, z_l) tensors (the ControlNet's down
    residuals and its mid residual) for the real and the tumour-free mask. The regions are pooled to
    each level's grid; D_roi and L_bg are the means over levels of the per-level masked L1, and the
    clamp at delta applies once, to the mean (one delta for the whole term, as at the output).
    """
    if len(feats_orig) != len(feats_pert) or not feats_orig:
        raise InvalidInput(f"need two equal, non-empty lists of features; got {len(feats_orig)} and {len(feats_pert)}")
    d_levels, bg_levels = [], []
    for f_orig, f_pert in zip(feats_orig, feats_pert):
        if f_orig.shape != f_pert.shape:
            raise InvalidInput(f"feature shapes differ: {tuple(f_orig.shape)} vs {tuple(f_pert.shape)}")
        level = regions.at(f_orig.shape[2:])
        diff = (f_orig.float() - f_pert.float()).abs()
        d_levels.append(_masked_mean(diff, level.roi))
        bg_levels.append(_masked_mean(diff, level.background))
    d_roi = torch.stack(d_levels).mean(dim=0)
    l_bg = torch.stack(bg_levels).mean(dim=0)
    return _terms(d_roi, l_bg, regions.has_roi, delta)


# -- the lambda schedule -------------------------------------------------------------------
# A schedule is a tuple of (fraction_start, value) pairs: value applies from that fraction of the
# total training steps until the next pair starts. The paper's order (large, then small) matters:
# the reversed order fails to make tumours appear; it is kept expressible for that ablation.

LambdaSchedule = tuple[tuple[float, float], ...]
PAPER_LAMBDA_SCHEDULE: LambdaSchedule = ((0.0, 0.01), (0.5, 0.001))
OFFICIAL_LAMBDA_SCHEDULE: LambdaSchedule = ((0.0, 0.01),)


def check_lambda_schedule(schedule: Sequence[Sequence[float]]) -> LambdaSchedule:
    """Validate and normalise a schedule; raises a ValueError saying what a valid one looks like."""
    example = "e.g. ((0.0, 0.01), (0.5, 0.001)) or '0:0.01,0.5:0.001'"
    try:
        pairs = tuple((float(start), float(value)) for start, value in schedule)
    except (TypeError, ValueError):
        raise InvalidInput(f"a lambda schedule is a list of (fraction_start, value) pairs, {example}; got {schedule!r}") from None
    if not pairs or pairs[0][0] != 0.0:
        raise InvalidInput(f"a lambda schedule must start at fraction 0.0, {example}; got {schedule!r}")
    starts = [s for s, _ in pairs]
    if any(b <= a for a, b in zip(starts, starts[1:])) or starts[-1] >= 1.0:
        raise InvalidInput(f"lambda schedule fractions must increase strictly within [0, 1), {example}; got {schedule!r}")
    if any(v < 0 or not math.isfinite(v) for _, v in pairs):
        raise InvalidInput(f"lambda values must be finite and >= 0; got {schedule!r}")
    return pairs


def parse_lambda_schedule(text: str) -> LambdaSchedule:
    """'0:0.01,0.5:0.001' -> ((0.0, 0.01), (0.5, 0.001)); a single number is a constant lambda."""
    text = text.strip()
    try:
        if ":" not in text:
            return check_lambda_schedule(((0.0, float(text)),))
        pairs = [item.split(":") for item in text.split(",") if item.strip()]
        return check_lambda_schedule([(float(a), float(b)) for a, b in pairs])
    except ValueError as err:
        if "schedule" in str(err) or "lambda" in str(err):
            raise
        raise InvalidInput(f"cannot read lambda schedule {text!r}: write START:VALUE pairs, e.g. '0:0.01,0.5:0.001'") from None


def lambda_at(schedule: LambdaSchedule, step: int, total_steps: int) -> float:
    """The weight of the contrastive terms at optimiser step `step` (0-based) of `total_steps`."""
    if total_steps < 1:
        raise InvalidInput(f"total_steps must be >= 1, got {total_steps}")
    fraction = step / total_steps
    value = schedule[0][1]
    for start, v in schedule:
        if fraction >= start:
            value = v
    return value


# -- the contrastive term's strength relative to the flow loss -----------------------------
# lambda means different things at different latent sizes. Take the output placement, batch B,
# C channels, N latent voxels per sample, n_b ROI voxels in sample b, flow-loss weight w on tumour
# voxels (`region_weight_map`, w = 100) and 1 elsewhere. With the L1 flow loss, the gradient of
# each loss with respect to one ROI element of v_orig has the magnitude
#
#     flow:         w / (C S)            S = sum of the flow weights over the batch, per channel:
#                                          sum_b (N + (w - 1) n_b) for the weighted mean (paper),
#                                          B N for the unnormalised official form (or no weighting)
#     contrastive:  lambda / (B C n_b)    (L_roi = -mean over the C n_b ROI elements, / B per batch)
#
# so the contrastive gradient per ROI element, relative to the tumour-weighted flow gradient, is
#
#     r_b = lambda S / (B w n_b)          (one sample, weighted mean: lambda (N + 99 n) / (100 n)).
#
# (While D_roi < delta; past it the ROI gradient is zero. For the squared-error flow loss the flow
# gradient also scales with the error, so r_b holds only for L1.) A tumour of fixed size in a larger
# latent gets a larger r: about 0.02-0.06 with lambda = 0.01 for a 16^3 window holding n = 8-30, and
# 0.83 for a 128 x 128 x 32 latent holding n = 64. The "normalised" lambda mode keeps r_b at the
# value lambda gives at a reference geometry (by default that 128 x 128 x 32 latent with a 64-voxel
# tumour region), so a lambda schedule means the same strength on small training windows.

LAMBDA_MODES = ("paper", "normalised")
REFERENCE_GEOMETRY = (128 * 128 * 32, 64)  # (latent voxels N, ROI voxels n) of the normalised mode

__all__ += ["LAMBDA_MODES", "REFERENCE_GEOMETRY", "flow_weight_sum", "contrastive_relative_strength",
            "normalised_lambdas"]


def flow_weight_sum(latent_voxels: int, roi_voxels: torch.Tensor | float, label_weight: float, normalise: bool) -> torch.Tensor | float:
    """S of one sample (sum these over a batch): N + (w - 1) n for the weighted mean, N otherwise."""
    if normalise:
        return latent_voxels + (float(label_weight) - 1.0) * roi_voxels
    return float(latent_voxels)


def contrastive_relative_strength(lam, roi_voxels, weight_sum, label_weight: float, batch_size: int = 1):
    """r = lambda S / (B w n): the contrastive gradient per ROI element over the flow loss's (L1,
    output placement; see the derivation above). Works on floats and tensors alike."""
    return lam * weight_sum / (batch_size * float(label_weight) * roi_voxels)


def normalised_lambdas(lam: float, roi_voxels: torch.Tensor, weight_sum: float | torch.Tensor, batch_size: int,
                       label_weight: float, normalise: bool,
                       reference: Sequence[int] = REFERENCE_GEOMETRY) -> torch.Tensor:
    """Per-sample lambda_b that give every sample of this batch the relative strength `lam` has at
    the `reference` (N, n) geometry in a batch of one. roi_voxels: (n,) ROI voxel counts on the
    latent grid; weight_sum: the batch's S (`flow_weight_sum` summed over the batch)."""
    ref_n, ref_roi = int(reference[0]), int(reference[1])
    if not 0 < ref_roi <= ref_n:
        raise InvalidInput(f"the reference geometry needs 0 < ROI voxels <= latent voxels; got {tuple(reference)}")
    target = contrastive_relative_strength(lam, ref_roi, flow_weight_sum(ref_n, ref_roi, label_weight, normalise), label_weight)
    return target * batch_size * float(label_weight) * roi_voxels.float() / weight_sum
