"""Prune + distill + QAT on one model in one run, under 2-process DDP on CPU."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_opt.data import DigitsDataModule
from lightning_opt.distillation import DistillationModule
from lightning_opt.module import ImageClassifier
from lightning_opt.pruning import Pruning
from lightning_opt.quantization import QuantizationAwareTraining
from lightning_opt.quantization._pt2e import is_prepared
from lightning_opt.schedules import OneShotSchedule


class RecordPerRank(Callback):
    """Saves what each rank ends training with: the student's zeros, whether QAT is active, the teacher."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer: pl.Trainer, pl_module: DistillationModule) -> None:
        student = pl_module.student
        zeros = {n: (p == 0).cpu() for n, p in student.named_parameters() if p.ndim > 1}
        teacher = {k: v.cpu().clone() for k, v in pl_module.teacher.state_dict().items()}
        record = {"zeros": zeros, "qat": is_prepared(student.backbone), "teacher": teacher}
        torch.save(record, f"{self.out_dir}/rank{trainer.global_rank}.pt")


@pytest.mark.ddp
def test_prune_distill_qat_in_one_ddp_run(tmp_path):
    teacher = ImageClassifier("small_cnn", backbone_kwargs={"channels": [16, 32]})
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = ImageClassifier("small_cnn", backbone_kwargs={"channels": [8, 16]})
    model = DistillationModule(student=student, teacher=teacher, alpha=0.5, temperature=2.0)
    callbacks = [
        Pruning(schedule=OneShotSchedule(final=0.5, at=0.25), include=r"^student\.", log_histograms=False),
        QuantizationAwareTraining(module="student.backbone", start=0.5, convert_on_fit_end=False),
        RecordPerRank(str(tmp_path)),
    ]
    trainer = pl.Trainer(
        strategy="ddp_spawn",
        accelerator="cpu",
        devices=2,
        max_steps=8,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
    )
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(r["qat"] for r in ranks), "QAT was active on the student on every rank"
    for name in ranks[0]["zeros"]:
        assert torch.equal(ranks[0]["zeros"][name], ranks[1]["zeros"][name]), f"masks differ across ranks: {name}"
    zeros = sum(int(z.sum()) for z in ranks[0]["zeros"].values())
    total = sum(z.numel() for z in ranks[0]["zeros"].values())
    assert zeros / total == pytest.approx(0.5, abs=0.01), "the student reached its sparsity through QAT steps"
    for r in ranks:  # the teacher is frozen and never pruned or quantized
        assert all(torch.equal(teacher_state[k], v) for k, v in r["teacher"].items())
