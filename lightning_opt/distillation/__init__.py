"""Knowledge distillation: KD losses (pure functions and modules) and the teacher-student ``DistillationModule``."""

from __future__ import annotations

from lightning_opt.distillation.callbacks import StudentCheckpoint
from lightning_opt.distillation.losses import (
    FeatureAdapter,
    FeatureDistillationLoss,
    HintonLoss,
    KDLoss,
    agreement,
    feature_loss,
    hinton_loss,
    kd_loss,
    token_logits,
)
from lightning_opt.distillation.module import DistillationModule

__all__ = [
    "DistillationModule",
    "FeatureAdapter",
    "FeatureDistillationLoss",
    "HintonLoss",
    "KDLoss",
    "StudentCheckpoint",
    "agreement",
    "feature_loss",
    "hinton_loss",
    "kd_loss",
    "token_logits",
]
