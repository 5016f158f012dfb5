from __future__ import annotations

import lightning.pytorch as pl
import optuna
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_opt.search import NonFiniteLossError, TrialCallback


class Tiny(pl.LightningModule):
    def __init__(self, lr: float = 0.1, val_values: tuple[float, ...] = (0.5, 0.4, 0.3)) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.lr = lr
        self.val_values = val_values

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def validation_step(self, batch, batch_idx):
        self.log("val/score", self.val_values[min(self.current_epoch, len(self.val_values) - 1)])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g)), batch_size=4)


def trainer(tmp_path, callback: TrialCallback, epochs: int = 3) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=1,
    )


def test_reports_each_validation_by_its_count(tmp_path) -> None:
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    cb = TrialCallback(trial, monitor="val/score")
    trainer(tmp_path, cb).fit(Tiny(), loader(), loader())
    # sanity check skipped; one report per epoch, at 0, 1, 2 whatever the number of optimizer steps
    assert cb.reported == pytest.approx({0: 0.5, 1: 0.4, 2: 0.3})
    assert study._storage.get_trial(trial._trial_id).intermediate_values == pytest.approx({0: 0.5, 1: 0.4, 2: 0.3})


def test_prunes_when_the_pruner_says_so(tmp_path) -> None:
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=0.45))
    trial = study.ask()
    cb = TrialCallback(trial, monitor="val/score")
    with pytest.raises(optuna.TrialPruned, match=r"pruned after validation 1 \(global step 8\) with val/score=0.4"):
        trainer(tmp_path, cb).fit(Tiny(), loader(), loader())
    assert sorted(cb.reported) == [0, 1]


def test_nan_loss_raises(tmp_path) -> None:
    study = optuna.create_study(direction="maximize")
    cb = TrialCallback(study.ask())  # no monitor: only watches the loss
    with pytest.raises(NonFiniteLossError, match="training loss is (nan|inf) at step"):
        trainer(tmp_path, cb).fit(Tiny(lr=float("inf")), loader(), loader())


def test_unlogged_monitor_raises(tmp_path) -> None:
    study = optuna.create_study(direction="maximize")
    cb = TrialCallback(study.ask(), monitor="val/acc")
    with pytest.raises(KeyError, match=r"objective `val/acc` is not logged; logged metrics: \['val/score'\]"):
        trainer(tmp_path, cb, epochs=1).fit(Tiny(), loader(), loader())


def test_monitor_needs_a_single_objective() -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    with pytest.raises(ValueError, match="`monitor` must be None for a multi-objective study, got 'val/acc'"):
        TrialCallback(study.ask(), monitor="val/acc")
