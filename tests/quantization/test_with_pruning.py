"""QAT composed with the Pruning callback (runs once `lightning_opt.pruning` is merged)."""

from __future__ import annotations

import pytest
import torch

from lightning_opt.quantization import QuantizationAwareTraining
from lightning_opt.quantization import _pt2e as P
from tests.quantization._helpers import TinyClassifier, TinyData, make_trainer

pruning = pytest.importorskip("lightning_opt.pruning")


def test_qat_during_and_after_pruning_keeps_zeros(tmp_path):
    torch.manual_seed(0)
    prune = pruning.Pruning(schedule=pruning.PolynomialSchedule(final=0.6, start=0.0, end=0.5, frequency=2))
    qat = QuantizationAwareTraining(start=0.25, convert_on_fit_end=False)  # QAT during, then after, pruning
    model = TinyClassifier()
    make_trainer(tmp_path, [prune, qat], max_epochs=4).fit(model, TinyData())
    assert P.is_prepared(model.backbone)
    assert all(int(m.fake_quant_enabled) for m in model.backbone.modules() if hasattr(m, "fake_quant_enabled"))
    weights = [p for n, p in model.named_parameters() if n in prune.masks]
    assert len(weights) == 3  # two convs and the head, found by name in the QAT graph
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros == round(0.6 * sum(w.numel() for w in weights))


def test_pruning_listed_after_qat_fails_before_training(tmp_path):
    prune = pruning.Pruning(schedule=pruning.PolynomialSchedule(final=0.6, start=0.0, end=0.5))
    trainer = make_trainer(tmp_path, [QuantizationAwareTraining(convert_on_fit_end=False), prune], max_steps=2)
    with pytest.raises(ValueError, match="Pruning is listed after QuantizationAwareTraining.*pruning callback first"):
        trainer.fit(TinyClassifier(), TinyData())
    assert trainer.global_step == 0
