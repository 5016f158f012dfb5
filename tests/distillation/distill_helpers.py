"""Small models and data for the distillation tests (independent of the foundation's models)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_opt import testing


class Net(pl.LightningModule):
    """A small classifier on 1x8x8 digits: conv features (named ``features``) then a linear head."""

    def __init__(self, width: int = 8, num_classes: int = 10, lr: float = 0.01, optimizer: str = "adam") -> None:
        super().__init__()
        self.save_hyperparameters()
        self.features = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(width * 4, num_classes)
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.example_input_array = torch.zeros(1, 1, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch[0], batch[1]
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch[0], batch[1]
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y))
        self.log("val/acc", self.val_acc)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch[0], batch[1]
        self.test_acc(self(x), y)
        self.log("test/acc", self.test_acc)

    def configure_optimizers(self) -> Any:
        if self.hparams.optimizer == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1)}
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class IndexedTensorDataset(TensorDataset):
    def __getitem__(self, index: int) -> tuple:
        return (*super().__getitem__(index), index)


class Digits(pl.LightningDataModule):
    """sklearn digits, 1x8x8 in [0, 1]; first 1,400 samples train, the rest validation/test."""

    def __init__(self, batch_size: int = 64, return_index: bool = False, augment_shift: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.return_index = return_index
        self.augment_shift = augment_shift
        x, y = load_digits(return_X_y=True)
        self.x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
        self.y = torch.tensor(y)

    def train_dataloader(self) -> DataLoader:
        cls = IndexedTensorDataset if self.return_index else TensorDataset
        return DataLoader(cls(self.x[:1400], self.y[:1400]), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x[1400:], self.y[1400:]), batch_size=256)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


def quiet_trainer(tmp_path: Any, **kwargs: Any) -> pl.Trainer:
    callbacks = kwargs.pop("callbacks", None)
    return testing.quiet_trainer(
        tmp_path, callbacks, **{"max_epochs": 1, "limit_train_batches": 4, "limit_val_batches": 1, **kwargs}
    )
