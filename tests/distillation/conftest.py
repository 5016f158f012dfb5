"""Fixtures for the distillation tests."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from tests.distillation.distill_helpers import Digits, Net, quiet_trainer


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def trained_teacher_ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A Net(width=16) trained for 2 epochs on digits, saved as a Lightning checkpoint."""
    tmp = tmp_path_factory.mktemp("teacher")
    pl.seed_everything(0)
    teacher = Net(width=16, lr=0.02)
    trainer = quiet_trainer(tmp, max_epochs=3, limit_train_batches=None, limit_val_batches=None)
    trainer.fit(teacher, Digits())
    path = str(tmp / "teacher.ckpt")
    trainer.save_checkpoint(path)
    return path
