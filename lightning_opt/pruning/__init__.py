"""Pruning for Lightning: scheduled unstructured, channel and N:M sparsity as one callback.

Example:
    >>> from lightning_opt.pruning import Pruning
    >>> from lightning_opt.schedules import PolynomialSchedule
    >>> cb = Pruning(schedule=PolynomialSchedule(final=0.9, start=0.1, end=0.7), granularity="unstructured")
"""

from __future__ import annotations

from lightning_opt.pruning._callback import Pruning
from lightning_opt.pruning._channel import ChannelGroups, load_pruned, save_pruned
from lightning_opt.pruning._criteria import Criterion, MagnitudeCriterion, RandomCriterion, TaylorCriterion
from lightning_opt.pruning._masks import (
    apply_masks,
    channel_keep,
    mask_sparsity,
    masks_from_model,
    nm_masks,
    select_modules,
    unstructured_masks,
)
from lightning_opt.schedules import (
    ConstantSchedule,
    ExponentialSchedule,
    IterativeSchedule,
    LinearSchedule,
    OneShotSchedule,
    PolynomialSchedule,
    Schedule,
)

__all__ = [
    "ChannelGroups",
    "ConstantSchedule",
    "Criterion",
    "ExponentialSchedule",
    "IterativeSchedule",
    "LinearSchedule",
    "MagnitudeCriterion",
    "OneShotSchedule",
    "PolynomialSchedule",
    "Pruning",
    "RandomCriterion",
    "Schedule",
    "TaylorCriterion",
    "apply_masks",
    "channel_keep",
    "load_pruned",
    "mask_sparsity",
    "masks_from_model",
    "nm_masks",
    "save_pruned",
    "select_modules",
    "unstructured_masks",
]
