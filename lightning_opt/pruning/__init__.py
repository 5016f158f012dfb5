"""Pruning for Lightning: scheduled unstructured, channel and N:M sparsity as one callback.

Examples:
    >>> from lightning_opt.pruning import Pruning
    >>> from lightning_opt.schedules import PolynomialSchedule
    >>> cb = Pruning(schedule=PolynomialSchedule(final=0.9, start=0.1, end=0.7), granularity="unstructured")
"""

from __future__ import annotations

from lightning_opt.pruning._callback import Pruning
from lightning_opt.pruning._channel import (
    ChannelGroups,
    UnsupportedModelError,
    load_pruned,
    output_error,
    pruned_structure,
    rehearse_removal,
    restore_pruned_structure,
    save_pruned,
)
from lightning_opt.pruning._criteria import Criterion, MagnitudeCriterion, RandomCriterion, TaylorCriterion
from lightning_opt.pruning._masks import (
    DEFAULT_MODULE_TYPES,
    apply_masks,
    channel_keep,
    coverage,
    mask_sparsity,
    masks_from_model,
    module_weights,
    nm_masks,
    select_modules,
    select_weights,
    unstructured_masks,
)
from lightning_opt.pruning._remask import Remasker
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
    "DEFAULT_MODULE_TYPES",
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
    "Remasker",
    "Schedule",
    "TaylorCriterion",
    "UnsupportedModelError",
    "apply_masks",
    "channel_keep",
    "coverage",
    "load_pruned",
    "mask_sparsity",
    "masks_from_model",
    "module_weights",
    "nm_masks",
    "output_error",
    "pruned_structure",
    "rehearse_removal",
    "restore_pruned_structure",
    "save_pruned",
    "select_modules",
    "select_weights",
    "unstructured_masks",
]
