from __future__ import annotations

import copy
import os
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_opt.distillation import DistillationModule, StudentCheckpoint
from lightning_opt.distillation.losses import kd_loss
from lightning_opt.schedules import LinearSchedule
from tests.distillation.distill_helpers import Digits, Net, quiet_trainer


def make(teacher_ckpt: str, **kwargs: Any) -> DistillationModule:
    kwargs.setdefault("alpha", 0.7)
    kwargs.setdefault("temperature", 3.0)
    return DistillationModule(student=Net(width=4), teacher=Net(width=16), teacher_checkpoint=teacher_ckpt, **kwargs)


# ---------------------------------------------------------------- teacher storage


def test_teacher_is_frozen_unregistered_and_not_in_state_dict(trained_teacher_ckpt: str) -> None:
    model = make(trained_teacher_ckpt)
    assert not model.teacher.training
    assert all(not p.requires_grad for p in model.teacher.parameters())
    assert not any(k.startswith("teacher") or "_teacher" in k for k in model.state_dict())
    student_ids = {id(p) for p in model.student.parameters()}
    assert {id(p) for p in model.parameters()} == student_ids
    assert all(m is not model.teacher for m in model.modules())
    # weights came from the checkpoint
    ckpt = torch.load(trained_teacher_ckpt, weights_only=False)
    torch.testing.assert_close(model.teacher.head.weight, ckpt["state_dict"]["head.weight"])


def test_fit_keeps_teacher_frozen_and_optimizes_only_the_student(trained_teacher_ckpt: str, tmp_path: Any) -> None:
    model = make(trained_teacher_ckpt)
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in model.student.state_dict().items()}
    trainer = quiet_trainer(tmp_path)
    trainer.fit(model, Digits())
    after = model.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "teacher weights or BN statistics changed"
    assert not model.teacher.training, "Trainer put the teacher in train mode"
    assert any(not torch.equal(student_before[k], v) for k, v in model.student.state_dict().items())
    opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in model.student.parameters()}
    assert not any(id(p) in opt_params for p in model.teacher.parameters())


def test_teacher_follows_the_module_device_and_dtype(trained_teacher_ckpt: str) -> None:
    model = make(trained_teacher_ckpt).to(torch.float64)
    assert next(model.teacher.parameters()).dtype == torch.float64
    assert model.teacher.device == model.device


def test_uses_the_students_configure_optimizers_and_validation(trained_teacher_ckpt: str, tmp_path: Any) -> None:
    model = DistillationModule(
        student=Net(width=4, optimizer="sgd"),
        teacher_checkpoint=trained_teacher_ckpt,
        teacher_class="tests.distillation.distill_helpers.Net",
    )
    trainer = quiet_trainer(tmp_path)
    trainer.fit(model, Digits())
    assert isinstance(trainer.optimizers[0], torch.optim.SGD)
    assert isinstance(trainer.lr_scheduler_configs[0].scheduler, torch.optim.lr_scheduler.StepLR)
    # the student's own metric, under its own name
    assert "val/acc" in trainer.callback_metrics
    assert "val/loss" in trainer.callback_metrics
    result = trainer.test(model, Digits(), verbose=False)[0]
    assert {"test/acc", "test/teacher_acc", "test/agreement"} <= set(result)


def test_checkpoint_holds_no_teacher_and_resume_rebuilds_it(trained_teacher_ckpt: str, tmp_path: Any) -> None:
    model = make(trained_teacher_ckpt)
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last")
    trainer = quiet_trainer(tmp_path, max_epochs=1, enable_checkpointing=True, callbacks=[ckpt_cb])
    trainer.fit(model, Digits())
    ckpt = torch.load(ckpt_cb.best_model_path, weights_only=False)
    assert all(k.startswith("student.") for k in ckpt["state_dict"])
    teacher_size = os.path.getsize(trained_teacher_ckpt)
    assert os.path.getsize(ckpt_cb.best_model_path) < teacher_size, "checkpoint bloated by the teacher"
    assert ckpt["hyper_parameters"]["teacher_checkpoint"] == trained_teacher_ckpt
    # resume: a fresh module (teacher reloaded from its checkpoint path) continues from epoch 1
    resumed = make(trained_teacher_ckpt)
    trainer2 = quiet_trainer(tmp_path, max_epochs=2)
    trainer2.fit(resumed, Digits(), ckpt_path=ckpt_cb.best_model_path)
    assert trainer2.current_epoch == 2
    assert trainer2.global_step == 8


# ---------------------------------------------------------------- teacher loading


def test_teacher_from_class_path_and_checkpoint(trained_teacher_ckpt: str) -> None:
    cls = "tests.distillation.distill_helpers.Net"
    model = DistillationModule(student=Net(width=4), teacher_class=cls, teacher_checkpoint=trained_teacher_ckpt)
    assert isinstance(model.teacher, Net)
    assert model.teacher.hparams.width == 16


def test_teacher_from_checkpoint_alone_uses_recorded_class_path(trained_teacher_ckpt: str, tmp_path: Any) -> None:
    ckpt = torch.load(trained_teacher_ckpt, weights_only=False)
    ckpt["hyper_parameters"]["_class_path"] = "tests.distillation.distill_helpers.Net"
    torch.save(ckpt, tmp_path / "cli.ckpt")
    model = DistillationModule(student=Net(width=4), teacher_checkpoint=str(tmp_path / "cli.ckpt"))
    assert model.teacher.hparams.width == 16
    with pytest.raises(ValueError, match=r"does not record its class.*set `teacher_class`"):
        DistillationModule(student=Net(width=4), teacher_checkpoint=trained_teacher_ckpt)


def test_missing_teacher_checkpoint(tmp_path: Any) -> None:
    with pytest.raises(FileNotFoundError, match=r"`teacher_checkpoint` not found: .*nope.ckpt"):
        DistillationModule(student=Net(width=4), teacher=Net(16), teacher_checkpoint=str(tmp_path / "nope.ckpt"))


def test_incompatible_teacher_checkpoint(trained_teacher_ckpt: str, tmp_path: Any) -> None:
    with pytest.raises(ValueError, match=r"incompatible with the teacher Net: .*shape mismatches \['features.0.weight"):
        DistillationModule(student=Net(width=4), teacher=Net(width=32), teacher_checkpoint=trained_teacher_ckpt)
    with pytest.raises(ValueError, match=r"incompatible with `teacher_class`"):
        DistillationModule(
            student=Net(width=4),
            teacher_class="lightning.pytorch.demos.boring_classes.BoringModel",
            teacher_checkpoint=trained_teacher_ckpt,
        )
    torch.save([1, 2], tmp_path / "list.ckpt")
    with pytest.raises(ValueError, match=r"holds a list, expected a checkpoint dict"):
        DistillationModule(student=Net(width=4), teacher=Net(16), teacher_checkpoint=str(tmp_path / "list.ckpt"))


def test_teacher_argument_rules(trained_teacher_ckpt: str) -> None:
    with pytest.raises(ValueError, match="a teacher is required"):
        DistillationModule(student=Net(width=4))
    with pytest.raises(ValueError, match="not both"):
        DistillationModule(student=Net(4), teacher=Net(16), teacher_class="tests.distillation.distill_helpers.Net")
    with pytest.raises(ValueError, match=r"needs `teacher_checkpoint`"):
        DistillationModule(student=Net(4), teacher_class="tests.distillation.distill_helpers.Net")
    with pytest.raises(ValueError, match=r"`teacher_class`='nope.Missing' cannot be imported"):
        DistillationModule(student=Net(4), teacher_class="nope.Missing", teacher_checkpoint=trained_teacher_ckpt)
    with pytest.raises(ValueError, match=r"is not a LightningModule"):
        DistillationModule(student=Net(4), teacher_class="torch.nn.Linear", teacher_checkpoint=trained_teacher_ckpt)
    with pytest.raises(ValueError, match=r"`student` must be a LightningModule, got Linear"):
        DistillationModule(student=torch.nn.Linear(2, 2), teacher=Net(16))  # type: ignore[arg-type]


# ---------------------------------------------------------------- validation of the other arguments


@pytest.mark.parametrize("bad", [0.0, -2.0])
def test_temperature_must_be_positive(bad: float) -> None:
    with pytest.raises(ValueError, match=rf"`temperature` must be a finite number > 0, got {bad}"):
        DistillationModule(student=Net(4), teacher=Net(16), temperature=bad)


@pytest.mark.parametrize("bad", [-0.5, 1.01])
def test_alpha_must_be_in_unit_interval(bad: float) -> None:
    with pytest.raises(ValueError, match=rf"`alpha` must be in \[0, 1\], got {bad}"):
        DistillationModule(student=Net(4), teacher=Net(16), alpha=bad)


def test_scheduled_alpha_and_temperature_are_checked_over_the_run() -> None:
    with pytest.raises(ValueError, match=r"`alpha \(a schedule, at 50% of training\)` must be in \[0, 1\], got 1.25"):
        DistillationModule(student=Net(4), teacher=Net(16), alpha=LinearSchedule(final=2.0, initial=0.5))
    with pytest.raises(
        ValueError, match=r"`temperature \(a schedule, at 0% of training\)` must be a finite number > 0, got 0.0"
    ):
        DistillationModule(student=Net(4), teacher=Net(16), temperature=LinearSchedule(final=1.0, initial=0.0))


def test_feature_layer_that_does_not_exist_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"student layer 'features.9'.*Valid names: features, features.0, features.1"):
        DistillationModule(student=Net(4), teacher=Net(16), feature_layers={"features.9": "features"})
    with pytest.raises(ValueError, match=r"teacher layer 'body'.*Valid names: features, features.0"):
        DistillationModule(student=Net(4), teacher=Net(16), feature_layers={"features": "body"})


def test_feature_weight_must_be_non_negative() -> None:
    with pytest.raises(ValueError, match=r"`feature_weight` must be a finite number >= 0, got -1"):
        DistillationModule(student=Net(4), teacher=Net(16), feature_weight=-1)


def test_output_shape_mismatch_fails_at_construction() -> None:
    with pytest.raises(ValueError, match=r"outputs differ in shape: student \(1, 10\), teacher \(1, 5\)"):
        DistillationModule(student=Net(4), teacher=Net(16, num_classes=5))


# ---------------------------------------------------------------- losses, schedules, logging


def test_logs_loss_components_teacher_accuracy_and_agreement(trained_teacher_ckpt: str, tmp_path: Any) -> None:
    model = make(
        trained_teacher_ckpt,
        feature_layers={"features": "features"},
        feature_weight=0.5,
        alpha=LinearSchedule(final=0.9, initial=0.1, start=0, end=1.0),
    )
    logger = TensorBoardLogger(str(tmp_path), name="kd")
    trainer = quiet_trainer(tmp_path, logger=logger, log_every_n_steps=1, max_epochs=2)
    trainer.fit(model, Digits())
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {
        "train/loss",
        "train/hard_loss",
        "train/soft_loss",
        "train/feature_loss",
        "train/acc",
        "train/teacher_acc",
        "train/agreement",
        "train/alpha",
        "val/acc",
        "val/teacher_acc",
        "val/agreement",
    }
    assert expected <= tags, expected - tags
    alphas = [e.value for e in events.Scalars("train/alpha")]
    assert alphas[0] == pytest.approx(0.1)
    assert alphas[-1] > alphas[0]
    data = Digits()
    x, y = data.x[1400:1656], data.y[1400:1656]  # the one validation batch
    with torch.no_grad():
        expected_acc = (model.teacher(x).argmax(1) == y).float().mean().item()
        expected_agree = (model.teacher(x).argmax(1) == model.student.eval()(x).argmax(1)).float().mean().item()
    assert events.Scalars("val/teacher_acc")[-1].value == pytest.approx(expected_acc)
    assert events.Scalars("val/agreement")[-1].value == pytest.approx(expected_agree)


def test_training_loss_is_the_hinton_mix(trained_teacher_ckpt: str, tmp_path: Any) -> None:
    model = make(trained_teacher_ckpt, alpha=0.25, temperature=2.0)
    trainer = quiet_trainer(tmp_path, limit_train_batches=1, limit_val_batches=0, log_every_n_steps=1)
    trainer.fit(model, Digits())
    m = trainer.logged_metrics
    assert m["train/loss"].item() == pytest.approx(
        0.25 * m["train/soft_loss"].item() + 0.75 * m["train/hard_loss"].item(), rel=1e-5
    )


def test_feature_adapters_are_trained_with_the_students_optimizer_and_scheduler(
    trained_teacher_ckpt: str, tmp_path: Any
) -> None:
    model = DistillationModule(
        student=Net(width=4, optimizer="sgd", lr=0.1),
        teacher=Net(16),
        teacher_checkpoint=trained_teacher_ckpt,
        feature_layers={"features": "features"},
    )
    assert model.feature_loss is not None
    adapter = model.feature_loss.adapters["pair0"]
    assert adapter.mode == "conv"
    w0 = adapter.proj.weight.detach().clone()
    trainer = quiet_trainer(tmp_path, max_epochs=2)
    trainer.fit(model, Digits())
    assert not torch.equal(w0, adapter.proj.weight)
    groups = trainer.optimizers[0].param_groups
    assert len(groups) == 2
    assert groups[1]["lr"] == pytest.approx(groups[0]["lr"]), "StepLR must move the adapter group too"
    assert groups[0]["lr"] < 0.1


# ---------------------------------------------------------------- caching


class CountingNet(Net):
    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        CountingNet.calls += 1
        return super().forward(x)


def test_cached_teacher_outputs_skip_the_teacher_after_the_first_epoch(
    trained_teacher_ckpt: str, tmp_path: Any
) -> None:
    teacher = CountingNet(width=16)
    model = DistillationModule(
        student=Net(4),
        teacher=teacher,
        teacher_checkpoint=trained_teacher_ckpt,
        cache_teacher_outputs=True,
        log_teacher_metrics=False,
    )
    data = Digits(return_index=True, batch_size=350)  # 4 batches cover the 1,400 training samples
    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_val_batches=0, limit_train_batches=None)
    CountingNet.calls = 0
    trainer.fit(model, data)
    assert CountingNet.calls == 4
    assert model._cached is not None
    assert bool(model._cached.all())
    assert model._cache.shape == (1400, 10)
    # cached logits are the teacher's logits for those samples
    torch.testing.assert_close(model._cache[:5], model.teacher(data.x[:5]))
    trainer = quiet_trainer(tmp_path, max_epochs=3, limit_val_batches=0, limit_train_batches=None)
    CountingNet.calls = 0
    trainer.fit(model, data)
    assert CountingNet.calls == 0, "epochs after the first must read the cache"


def test_cache_requires_indices_and_unaugmented_data(trained_teacher_ckpt: str, tmp_path: Any) -> None:
    model = make(trained_teacher_ckpt, cache_teacher_outputs=True)
    with pytest.raises(ValueError, match=r"return_index=False. HINT: set `return_index: true`"):
        quiet_trainer(tmp_path).fit(model, Digits(return_index=False))
    with pytest.raises(ValueError, match=r"unaugmented training set, but the datamodule has augment_shift=2"):
        quiet_trainer(tmp_path).fit(model, Digits(return_index=True, augment_shift=2))


# ---------------------------------------------------------------- the student comes out alone


def test_student_checkpoint_loads_without_the_teacher(trained_teacher_ckpt: str, tmp_path: Any) -> None:
    model = make(trained_teacher_ckpt, feature_layers={"features": "features"})
    cb = StudentCheckpoint(dirpath=str(tmp_path / "out"))
    trainer = quiet_trainer(tmp_path, callbacks=[cb])
    trainer.fit(model, Digits())
    assert cb.last_path == str(tmp_path / "out" / "student.ckpt")
    ckpt = torch.load(cb.last_path, weights_only=False)
    assert set(ckpt["state_dict"]) == set(Net(4).state_dict())
    assert "optimizer_states" not in ckpt
    student = Net.load_from_checkpoint(cb.last_path)
    assert student.hparams.width == 4
    student.eval()
    model.eval()
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(student(x), model(x))
    # and it trains/validates as a plain model
    quiet_trainer(tmp_path).validate(student, Digits(), verbose=False)


def test_student_checkpoint_rejects_other_models(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="needs the model to be a DistillationModule, got Net"):
        quiet_trainer(tmp_path, callbacks=[StudentCheckpoint()]).fit(Net(4), Digits())
    with pytest.raises(ValueError, match=r"`filename` must be a plain file name"):
        StudentCheckpoint(filename="a/b.ckpt")


@pytest.mark.ddp
def test_ddp_spawn_two_devices(trained_teacher_ckpt: str, tmp_path: Any) -> None:
    model = make(trained_teacher_ckpt)
    cb = StudentCheckpoint(dirpath=str(tmp_path))
    trainer = quiet_trainer(tmp_path, strategy="ddp_spawn", devices=2, callbacks=[cb])
    trainer.fit(model, Digits())
    assert os.path.isfile(tmp_path / "student.ckpt")
    Net.load_from_checkpoint(str(tmp_path / "student.ckpt"))


def test_pruning_callback_acts_on_the_student_only(trained_teacher_ckpt: str, tmp_path: Any) -> None:
    from lightning_opt.pruning import Pruning
    from lightning_opt.schedules import LinearSchedule as Linear

    model = make(trained_teacher_ckpt)
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    pruning = Pruning(schedule=Linear(final=0.5, start=0, end=0.5, frequency=1), log_histograms=False)
    trainer = quiet_trainer(tmp_path, callbacks=[pruning], limit_val_batches=0)
    trainer.fit(model, Digits())
    student_w = [p for n, p in model.student.named_parameters() if n.endswith("weight") and p.ndim > 1]
    sparsity = sum(int((w == 0).sum()) for w in student_w) / sum(w.numel() for w in student_w)
    assert sparsity == pytest.approx(0.5, abs=0.02)
    assert all(torch.equal(teacher_before[k], v) for k, v in model.teacher.state_dict().items())
    assert all(int((p == 0).sum()) == 0 for n, p in model.teacher.named_parameters() if p.ndim > 1)


def test_output_shape_mismatch_without_example_input_fails_at_setup(tmp_path: Any) -> None:
    student = Net(4)
    student.example_input_array = None
    model = DistillationModule(student=student, teacher=Net(16, num_classes=5))  # nothing to probe yet
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(ValueError, match=r"outputs differ in shape: student \(2, 10\), teacher \(2, 5\)"):
        quiet_trainer(tmp_path).fit(model, Digits())
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items()), "no training step ran"


def test_cache_works_with_the_foundation_datamodule(tmp_path: Any) -> None:
    from lightning_opt.data import DigitsDataModule
    from lightning_opt.module import ImageClassifier

    teacher = ImageClassifier("small_cnn", backbone_kwargs={"channels": [8, 16]})
    model = DistillationModule(
        student=ImageClassifier("mlp", backbone_kwargs={"hidden": [8]}), teacher=teacher, cache_teacher_outputs=True
    )
    data = DigitsDataModule(batch_size=64, return_index=True)
    quiet_trainer(tmp_path, max_epochs=2, limit_train_batches=None, limit_val_batches=1).fit(model, data)
    assert model._cached is not None
    assert bool(model._cached.all())
    train_x = data.train_dataloader().dataset.tensors[0]
    assert model._cache.shape == (len(train_x), 10)
    torch.testing.assert_close(model._cache[:4], teacher(train_x[:4]))
    with pytest.raises(ValueError, match="augment_shift=1"):
        quiet_trainer(tmp_path).fit(model, DigitsDataModule(return_index=True, augment_shift=1))


# ---------------------------------------------------------------- unlabelled transfer set (label -1)


def _one_batch_fit(model: DistillationModule, x: torch.Tensor, y: torch.Tensor, tmp_path: Any) -> dict[str, float]:
    from torch.utils.data import DataLoader, TensorDataset

    trainer = quiet_trainer(tmp_path, limit_train_batches=1, limit_val_batches=0, log_every_n_steps=1)
    trainer.fit(model, train_dataloaders=DataLoader(TensorDataset(x, y), batch_size=len(x)))
    return {k: v.item() for k, v in trainer.logged_metrics.items()}


def test_kd_loss_on_a_mixed_batch_uses_labels_where_present_and_soft_targets_everywhere(
    trained_teacher_ckpt: str, tmp_path: Any
) -> None:
    model = make(trained_teacher_ckpt, alpha=0.3, temperature=2.0)
    data = Digits()
    x, y = data.x[:32], data.y[:32].clone()
    y[::3] = -1  # every third sample is unlabelled
    labeled = y != -1
    student = copy.deepcopy(model.student).train()
    with torch.no_grad():
        s, t = student(x), model.teacher(x)
    hard = F.cross_entropy(s[labeled], y[labeled])
    soft = kd_loss(s, t, 2.0)  # over all 32 samples
    m = _one_batch_fit(model, x, y, tmp_path)
    assert m["train/hard_loss"] == pytest.approx(hard.item(), rel=1e-5)
    assert m["train/soft_loss"] == pytest.approx(soft.item(), rel=1e-5)
    assert m["train/loss"] == pytest.approx((0.3 * soft + 0.7 * hard).item(), rel=1e-5)
    assert m["train/acc"] == pytest.approx((s[labeled].argmax(1) == y[labeled]).float().mean().item())
    assert m["train/teacher_acc"] == pytest.approx((t[labeled].argmax(1) == y[labeled]).float().mean().item())


def test_an_all_unlabelled_batch_trains_on_soft_targets_only(trained_teacher_ckpt: str, tmp_path: Any) -> None:
    model = make(trained_teacher_ckpt, alpha=0.5, temperature=4.0)
    x = Digits().x[:16]
    student = copy.deepcopy(model.student).train()
    before = {k: v.clone() for k, v in model.student.state_dict().items()}
    with torch.no_grad():
        soft = kd_loss(student(x), model.teacher(x), 4.0)
    m = _one_batch_fit(model, x, torch.full((16,), -1), tmp_path)
    assert m["train/hard_loss"] == 0.0
    assert m["train/loss"] == pytest.approx(0.5 * soft.item(), rel=1e-5)
    assert "train/acc" not in m and "train/teacher_acc" not in m  # nothing labelled to score
    after = model.student.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert any(not torch.equal(before[k], v) for k, v in after.items()), "the soft loss alone moved the student"


def test_distills_on_the_transfer_set_of_the_foundation_datamodule(tmp_path: Any) -> None:
    from lightning_opt.data import DigitsDataModule
    from lightning_opt.module import ImageClassifier

    model = DistillationModule(
        student=ImageClassifier("mlp", backbone_kwargs={"hidden": [8]}),
        teacher=ImageClassifier("small_cnn", backbone_kwargs={"channels": [8, 16]}),
        cache_teacher_outputs=True,
    )
    data = DigitsDataModule(batch_size=16, labeled_size=50, return_index=True)
    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=None, limit_val_batches=1)
    trainer.fit(model, data)
    assert all(torch.isfinite(v) for v in trainer.callback_metrics.values())
    assert bool(model._cached.all()) and model._cache.shape[0] == len(data._splits["train"])  # teacher saw all images


def test_student_export_is_rehearsed_before_the_first_step(tmp_path) -> None:
    """A callback whose `on_save_checkpoint` cannot take the student's records fails at fit start, not at fit end."""
    import lightning.pytorch as pl

    class NeedsOptimizerStates(pl.Callback):
        def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
            checkpoint["optimizer_states"][0]

    class CountSteps(pl.Callback):
        steps = 0

        def on_train_batch_end(self, *args) -> None:
            CountSteps.steps += 1

    model = DistillationModule(student=Net(width=4), teacher=Net(width=16))
    callbacks = [NeedsOptimizerStates(), CountSteps(), StudentCheckpoint(dirpath=str(tmp_path))]
    trainer = quiet_trainer(tmp_path, callbacks=callbacks, max_steps=2)
    with pytest.raises(KeyError, match="optimizer_states"):
        trainer.fit(model, Digits())
    assert CountSteps.steps == 0
    assert not (tmp_path / "student.ckpt").exists()
