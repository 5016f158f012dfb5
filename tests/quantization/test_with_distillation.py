"""QAT of a distilled student inside the DistillationModule (runs once `lightning_opt.distillation` is merged)."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_opt.quantization import QuantizationAwareTraining
from lightning_opt.quantization import _pt2e as P
from tests.quantization._helpers import TinyClassifier, TinyData, make_trainer

distillation = pytest.importorskip("lightning_opt.distillation")


def test_qat_on_the_student_of_a_distillation_module(tmp_path):
    torch.manual_seed(0)
    teacher = TinyClassifier(width=16).backbone.eval()
    model = distillation.DistillationModule(student=TinyClassifier(width=4), teacher=teacher, alpha=0.5)
    before = copy.deepcopy(teacher.state_dict())
    qat = QuantizationAwareTraining(module="student.backbone", start=2, convert_on_fit_end=False)
    make_trainer(tmp_path, [qat], max_steps=6).fit(model, TinyData())
    assert P.is_prepared(model.student.backbone)
    assert all(int(m.fake_quant_enabled) for m in model.student.backbone.modules() if hasattr(m, "fake_quant_enabled"))
    for name, value in before.items():  # the teacher stays fp32 and untouched
        torch.testing.assert_close(teacher.state_dict()[name], value, rtol=0, atol=0)
