"""Training losses, each a pure function of tensors.

* `flow_loss`: L1 between predicted and target velocity (MAISI trains with L1), optionally with
  per-voxel region weights (tumour voxels weigh more for the ControlNet).
* the region-specific contrastive loss of MAISI-v2 lives below it (see `region_contrastive_loss`).
"""

from __future__ import annotations

import torch

__all__ = ["flow_loss"]


def flow_loss(
    v_pred: torch.Tensor,
    v_target: torch.Tensor,
    weight: torch.Tensor | None = None,
    normalise: bool = True,
) -> torch.Tensor:
    """Mean absolute velocity error.

    v_pred, v_target: (B, C, x, y, z). weight: broadcastable to them (e.g. (B, 1, x, y, z)), or None.
    With `normalise` the weighted error is divided by the summed weight (a weighted mean, so the
    loss scale does not depend on how many voxels are up-weighted); without it, it is divided by
    the voxel count as in the official code (tumour-heavy batches then have larger losses).
    """
    err = (v_pred.float() - v_target.float()).abs()
    if weight is None:
        return err.mean()
    weight = weight.float().expand_as(err)
    if normalise:
        return (err * weight).sum() / weight.sum().clamp_min(1e-12)
    return (err * weight).mean()
