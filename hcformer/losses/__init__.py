"""Hungarian matcher, mask/dice/class losses, the |sum s| regulariser (Sec. 4.1).

``build_criterion(cfg)`` picks the loss of the kind of head that ``cfg.model.head.type`` names
(its entry in :data:`hcformer.families.HEADS`: mask classification or per-pixel).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hcformer.families import head_entry
from hcformer.losses.criterion import (
    LossNorm,
    PerPixelCriterion,
    SetCriterion,
    local_norm,
    regulariser,
    summarize,
    summary_values,
)
from hcformer.losses.matcher import HungarianMatcher, pairwise_dice, pairwise_sigmoid_ce
from hcformer.losses.point_sampling import importance_points, point_sample, uniform_points

if TYPE_CHECKING:
    from hcformer.config import Config

__all__ = [
    "HungarianMatcher",
    "LossNorm",
    "PerPixelCriterion",
    "SetCriterion",
    "build_criterion",
    "importance_points",
    "local_norm",
    "pairwise_dice",
    "pairwise_sigmoid_ce",
    "point_sample",
    "regulariser",
    "summarize",
    "summary_values",
    "uniform_points",
]


def build_criterion(cfg: Config) -> SetCriterion | PerPixelCriterion:
    """The loss for ``cfg.model`` with the weights of ``cfg.loss``."""
    loss = cfg.loss
    if head_entry(cfg.model.head.type).per_pixel:
        return PerPixelCriterion(reg_weight=loss.reg_weight)
    # The matcher's cost weighs what the loss weighs, at the same number of points.
    shared = {
        "class_weight": loss.class_weight,
        "mask_weight": loss.mask_weight,
        "dice_weight": loss.dice_weight,
        "num_points": loss.num_points,
    }
    return SetCriterion(
        num_classes=cfg.model.num_classes,
        matcher=HungarianMatcher(**shared),
        no_object_weight=loss.no_object_weight,
        reg_weight=loss.reg_weight,
        oversample_ratio=loss.oversample_ratio,
        importance_sample_ratio=loss.importance_sample_ratio,
        deep_supervision=loss.deep_supervision,
        **shared,
    )
