"""Kill and resume, per technique: the resumed run ends bitwise where the uninterrupted run ends.

Each case trains on shift-augmented, shuffled digits (the order and the shifts come from the datamodule's seeded
generators, not from torch's global one), saves a checkpoint in the middle of training (mid-epoch, and inside the
technique's active phase), "kills" the run there, and resumes in a fresh Trainer from a different global RNG state.
Final weights, buffers (observers, fake-quant state), pruning masks and logged metrics must equal the uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_opt.data import DigitsDataModule
from lightning_opt.distillation import DistillationModule
from lightning_opt.module import ImageClassifier
from lightning_opt.pruning import Pruning, RandomCriterion
from lightning_opt.quantization import QuantizationAwareTraining
from lightning_opt.schedules import PolynomialSchedule

TOTAL = 14  # optimizer steps of the whole run; 5 batches an epoch
KILL = 7  # mid-epoch (epoch 1, batch 2), after pruning started and inside the QAT phase


def _student() -> ImageClassifier:
    return ImageClassifier("small_cnn", backbone_kwargs={"channels": [4, 8]})


def _plain() -> pl.LightningModule:
    return _student()


def _distilled() -> pl.LightningModule:
    torch.manual_seed(5)
    teacher = ImageClassifier("small_cnn", backbone_kwargs={"channels": [8, 8]}).backbone
    return DistillationModule(student=_student(), teacher=teacher, cache_teacher_outputs=True, alpha=0.7)


TECHNIQUES: dict[str, tuple[Callable[[], pl.LightningModule], Callable[[], list[Callback]], dict[str, Any]]] = {
    "pruning-magnitude": (
        _plain,
        lambda: [Pruning(PolynomialSchedule(final=0.8, start=0.1, end=0.8, frequency=2), log_histograms=False)],
        {},
    ),
    "pruning-random": (
        _plain,
        lambda: [
            Pruning(
                PolynomialSchedule(final=0.8, start=0.1, end=0.8, frequency=2),
                criterion=RandomCriterion(seed=3),
                log_histograms=False,
            )
        ],
        {},
    ),
    "qat": (
        _plain,
        lambda: [
            QuantizationAwareTraining(
                module="backbone", start=0.3, freeze_observers=0.7, convert_on_fit_end=False, evaluate=False
            )
        ],
        {},
    ),
    # the cache needs a fixed training set: shuffled, not augmented
    "distillation-cached-teacher": (_distilled, lambda: [], {"return_index": True, "augment_shift": 0}),
}


class _Killed(Exception):
    pass


class _KillAt(Callback):
    """Stops the process the hard way at the first batch after ``step`` (its checkpoint is already on disk)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            raise _Killed


def _fit(
    name: str, root: Path, ckpt_path: str | None = None, kill_at: int | None = None
) -> tuple[pl.LightningModule, pl.Trainer]:
    make_model, make_callbacks, data_kwargs = TECHNIQUES[name]
    pl.seed_everything(0)
    model = make_model()
    callbacks = make_callbacks() + ([_KillAt(kill_at)] if kill_at else [])
    checkpoint = ModelCheckpoint(dirpath=root, every_n_train_steps=kill_at or TOTAL, save_top_k=-1)
    trainer = pl.Trainer(
        max_steps=TOTAL,
        limit_train_batches=5,
        limit_val_batches=2,
        val_check_interval=5,
        logger=False,
        callbacks=[*callbacks, checkpoint],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        deterministic=True,
    )
    datamodule = DigitsDataModule(**{"batch_size": 16, "augment_shift": 1, **data_kwargs})
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    return model, trainer


def _state(model: pl.LightningModule, trainer: pl.Trainer) -> dict[str, torch.Tensor]:
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(callback, Pruning):
            state.update({f"mask.{k}": v for k, v in callback.masks.items()})
    state.update({f"metric.{k}": v for k, v in trainer.callback_metrics.items()})
    return state


@pytest.mark.parametrize("technique", list(TECHNIQUES))
def test_killed_and_resumed_run_ends_bitwise_equal(technique: str, tmp_path: Path) -> None:
    reference = _state(*_fit(technique, tmp_path / "full"))
    with pytest.raises(_Killed):
        _fit(technique, tmp_path / "killed", kill_at=KILL)
    (ckpt,) = (tmp_path / "killed").glob(f"*step={KILL}.ckpt")
    torch.manual_seed(987)  # a new process: the global generator is somewhere else
    resumed = _state(*_fit(technique, tmp_path / "resumed", ckpt_path=str(ckpt)))
    assert resumed.keys() == reference.keys()
    different = [k for k in reference if not torch.equal(reference[k], resumed[k])]
    assert not different, f"differ after resume: {different[:8]}"
