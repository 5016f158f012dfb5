"""QuantizationAwareTraining / PostTrainingQuantization inside real (tiny) Lightning runs."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_opt.quantization import (
    PostTrainingQuantization,
    QuantizationAwareTraining,
    QuantizationExportError,
)
from lightning_opt.quantization import _pt2e as P
from tests.quantization._helpers import TinyClassifier, TinyData, make_trainer
from tests.quantization.test_pt2e import _Unexportable

QUIET = dict(convert_on_fit_end=False)


# ---------------------------------------------------------------------------------------------------------------------
# bad input, before training
# ---------------------------------------------------------------------------------------------------------------------


def test_init_rejects_bad_arguments():
    with pytest.raises(ValueError, match="`dtype` must be one of"):
        QuantizationAwareTraining(dtype="float8")
    with pytest.raises(ValueError, match="`weight_scheme` must be one of"):
        QuantizationAwareTraining(weight_scheme="per_tensor_symmetric")
    with pytest.raises(ValueError, match="`activation_scheme` must be one of"):
        QuantizationAwareTraining(activation_scheme="per_channel_affine")
    with pytest.raises(ValueError, match=r"`start` must be in \[0.0, 1.0\].*got 1.5"):
        QuantizationAwareTraining(start=1.5)
    with pytest.raises(ValueError, match="`freeze_bn` must be >= 0 when given in steps, got -1"):
        QuantizationAwareTraining(freeze_bn=-1)
    with pytest.raises(ValueError, match="`skip` must be a list"):
        QuantizationAwareTraining(skip="head")
    with pytest.raises(ValueError, match="`artifact_path` must end with '.pt2'"):
        QuantizationAwareTraining(artifact_path="model.onnx")
    with pytest.raises(ValueError, match="`calibration_batches` must be >= 1, got 0"):
        PostTrainingQuantization(calibration_batches=0)


def _fit_fails(tmp_path, callback, model=None, **trainer_kwargs):
    model = model or TinyClassifier()
    before = copy.deepcopy(model.backbone.state_dict())
    trainer = make_trainer(tmp_path, [callback], **trainer_kwargs)
    with pytest.raises((ValueError, QuantizationExportError)) as info:
        trainer.fit(model, TinyData())
    assert trainer.global_step == 0  # failed before any optimizer step
    after = P.get_submodule(model, "backbone")
    for name, value in before.items():
        torch.testing.assert_close(after.state_dict()[name], value)
    return str(info.value)


def test_start_after_end_of_training_fails_before_training(tmp_path):
    msg = _fit_fails(tmp_path, QuantizationAwareTraining(start=50, **QUIET), max_steps=8)
    assert "`start` 50 is step 50, at or after the end of training (8 steps)" in msg


def test_freeze_point_before_start_fails(tmp_path):
    msg = _fit_fails(tmp_path, QuantizationAwareTraining(start=4, freeze_observers=2, **QUIET), max_steps=8)
    assert "`freeze_observers` is step 2, before `start` (step 4)" in msg


def test_skip_pattern_matching_nothing_fails(tmp_path):
    msg = _fit_fails(tmp_path, QuantizationAwareTraining(skip=["classifier"], **QUIET), max_steps=2)
    assert "`skip` pattern 'classifier' matches no module" in msg


def test_missing_module_path_fails(tmp_path):
    msg = _fit_fails(tmp_path, QuantizationAwareTraining(module="encoder", **QUIET), max_steps=2)
    assert "`module` 'encoder' is not a submodule of TinyClassifier" in msg


def test_unexportable_model_names_module_and_points_to_skip(tmp_path):
    model = TinyClassifier()
    model.backbone = _Unexportable()
    msg = _fit_fails(tmp_path, QuantizationAwareTraining(**QUIET), model=model, max_steps=2)
    assert "`backbone.gate` (_DataDependent) cannot be captured by torch.export" in msg
    assert "skip=" in msg and "module=" in msg


# ---------------------------------------------------------------------------------------------------------------------
# schedule: warm-up, observer freeze, BN freeze, validation
# ---------------------------------------------------------------------------------------------------------------------


class _Probe(pl.Callback):
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        graph = pl_module.backbone
        fq = [m for m in graph.modules() if hasattr(m, "fake_quant_enabled")]
        bn = [b for n, b in graph.named_buffers() if n.endswith("running_mean")]
        self.rows.append(
            {
                "step": trainer.global_step - 1,  # the step that just ran
                "fake_quant": all(int(m.fake_quant_enabled) for m in fq),
                "scales": torch.cat([m.scale.flatten() for m in fq]).clone(),
                "running_mean": bn[0].clone(),
            }
        )


def test_schedule_warmup_observer_and_bn_freeze(tmp_path):
    probe = _Probe()
    qat = QuantizationAwareTraining(start=2, freeze_observers=4, freeze_bn=5, **QUIET)
    trainer = make_trainer(tmp_path, [qat, probe], max_epochs=2, val_check_interval=2)
    trainer.fit(TinyClassifier(), TinyData())
    rows = {r["step"]: r for r in probe.rows}
    assert [rows[s]["fake_quant"] for s in range(8)] == [False, False] + [True] * 6
    # observers move during QAT until step 4, then the ranges stay fixed (validation runs in between)
    assert not torch.equal(rows[2]["scales"], rows[3]["scales"])
    for s in (4, 5, 6):
        torch.testing.assert_close(rows[s]["scales"], rows[3]["scales"], rtol=0, atol=0)
    # BatchNorm statistics move until step 5, then freeze
    assert not torch.equal(rows[3]["running_mean"], rows[4]["running_mean"])
    for s in (5, 6, 7):
        torch.testing.assert_close(rows[s]["running_mean"], rows[4]["running_mean"], rtol=0, atol=0)


def test_validation_does_not_move_observers(tmp_path):
    model = TinyClassifier()
    trainer = make_trainer(tmp_path, [QuantizationAwareTraining(**QUIET)], max_steps=3)
    trainer.fit(model, TinyData())
    before = copy.deepcopy(model.backbone.state_dict())
    trainer.validate(model, TinyData())
    after = model.backbone.state_dict()
    observed = [n for n in before if n.endswith(("min_val", "max_val", "scale", "zero_point", "running_mean"))]
    assert len(observed) > 10
    for name, value in before.items():
        if not name.endswith("_enabled"):  # the on/off switches follow the mode; the observed state must not move
            torch.testing.assert_close(after[name], value, rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------------------------------------------------------------
# checkpoints: exact resume, load_from_checkpoint, test(ckpt_path), a second fit
# ---------------------------------------------------------------------------------------------------------------------


def _qat():
    return QuantizationAwareTraining(start=2, freeze_observers=6, **QUIET)


def test_resume_mid_qat_is_exact_and_checkpoint_loads_everywhere(tmp_path):
    torch.manual_seed(0)
    straight = TinyClassifier(dropout=0.0)  # no RNG in the forward: the runs must agree bit for bit
    init = copy.deepcopy(straight.state_dict())
    make_trainer(tmp_path / "a", [_qat()], max_epochs=2).fit(straight, TinyData())

    first = TinyClassifier(dropout=0.0)
    first.load_state_dict(init)
    trainer = make_trainer(tmp_path / "b", [_qat()], max_epochs=1)
    trainer.fit(first, TinyData())
    ckpt = str(tmp_path / "mid.ckpt")
    trainer.save_checkpoint(ckpt)  # step 4: fake quant on, observers live

    resumed = TinyClassifier(dropout=0.0)
    make_trainer(tmp_path / "c", [_qat()], max_epochs=2).fit(resumed, TinyData(), ckpt_path=ckpt)
    expected = straight.state_dict()
    got = resumed.state_dict()
    assert set(got) == set(expected)
    assert any(".activation_post_process_" in k for k in got)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=0, msg=name)

    # load_from_checkpoint (the module's on_load_checkpoint rebuilds the structure)
    end_ckpt = str(tmp_path / "end.ckpt")
    trainer_c = make_trainer(tmp_path / "d", [_qat()], max_epochs=2)
    trainer_c.fit(resumed, TinyData(), ckpt_path=ckpt)  # a second fit on the same (already quantized) model
    trainer_c.save_checkpoint(end_ckpt)
    loaded = TinyClassifier.load_from_checkpoint(end_ckpt)
    assert P.is_prepared(loaded.backbone)
    x = torch.randn(5, 1, 8, 8)
    resumed.eval()
    loaded.eval()
    torch.testing.assert_close(loaded(x), resumed(x), rtol=0, atol=0)

    # trainer.test(ckpt_path=...) on a fresh fp32 model: the callback rebuilds before the weights load
    fresh = TinyClassifier(dropout=0.0)
    tester = make_trainer(tmp_path / "e", [_qat()])
    result = tester.test(fresh, TinyData(), ckpt_path=end_ckpt, verbose=False)
    reference = make_trainer(tmp_path / "f", []).test(loaded, TinyData(), verbose=False)
    assert result[0]["test/acc"] == pytest.approx(reference[0]["test/acc"])
    assert P.is_prepared(fresh.backbone)


# ---------------------------------------------------------------------------------------------------------------------
# composition
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preserve", [True, False])
def test_pruned_zeros_stay_zero_during_qat(tmp_path, preserve):
    torch.manual_seed(0)
    model = TinyClassifier()
    with torch.no_grad():
        weight = model.backbone.features[0].weight
        mask = torch.rand_like(weight) > 0.5
        weight.mul_(mask)
    qat = QuantizationAwareTraining(start=1, preserve_sparsity=preserve, **QUIET)
    make_trainer(tmp_path, [qat], max_steps=6).fit(model, TinyData())
    trained = dict(model.backbone.named_parameters())["features.0.weight"]
    if preserve:
        assert bool((trained[~mask] == 0).all())
    else:  # the test can fail: without the option the pruned weights grow back
        assert bool((trained[~mask] != 0).any())


class _Distilled(pl.LightningModule):
    """A student trained on a frozen teacher's soft targets; only the student is quantized."""

    def __init__(self) -> None:
        super().__init__()
        self.teacher = TinyClassifier(width=16).backbone.eval().requires_grad_(False)
        self.student = TinyClassifier(width=4).backbone
        self.example_input_array = torch.zeros(1, 1, 8, 8)

    def forward(self, x):
        return self.student(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        with torch.no_grad():
            soft = torch.softmax(self.teacher(x) / 2.0, -1)
        logits = self.student(x)
        kd = nn.functional.kl_div(torch.log_softmax(logits / 2.0, -1), soft, reduction="batchmean")
        return 0.5 * kd + 0.5 * nn.functional.cross_entropy(logits, y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.student.parameters(), lr=0.01)


def test_qat_on_a_distilled_student(tmp_path):
    model = _Distilled()
    teacher = copy.deepcopy(model.teacher.state_dict())
    make_trainer(tmp_path, [QuantizationAwareTraining(module="student", start=1, **QUIET)], max_steps=4).fit(
        model, TinyData()
    )
    assert P.is_prepared(model.student) and not P.is_prepared(model.teacher)
    assert all(int(m.fake_quant_enabled) for m in model.student.modules() if hasattr(m, "fake_quant_enabled"))
    for name, value in teacher.items():
        torch.testing.assert_close(model.teacher.state_dict()[name], value, rtol=0, atol=0)


@pytest.mark.ddp
def test_qat_under_ddp(tmp_path):
    # ddp_spawn, not ddp_fork: after earlier tests ran backward in this process, fork + autograd is unsupported
    model = TinyClassifier()
    before = model.backbone.features[0].weight.detach().clone()
    trainer = make_trainer(
        tmp_path, [QuantizationAwareTraining(start=1, **QUIET)], max_steps=4, strategy="ddp_spawn", devices=2
    )
    trainer.fit(model, TinyData())
    assert trainer.state.finished
    # the main process gets the trained weights back (parameter names are unchanged by the QAT graph)
    assert not torch.equal(model.backbone.features[0].weight, before)
