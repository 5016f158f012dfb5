"""Tiny models and data for the quantization tests (seconds on 2 CPU cores)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_opt import testing


class TinyNet(nn.Module):
    """Conv-BN-ReLU x2, global average pool, dropout, linear head: exercises conv-bn fusion, BN and dropout."""

    def __init__(self, width: int = 8, num_classes: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width * 2, 3, padding=1),
            nn.BatchNorm2d(width * 2),
            nn.ReLU(),
        )
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(width * 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(x).mean((2, 3))))


class TinyClassifier(pl.LightningModule):
    """A LightningModule with a ``backbone`` that restores QAT structure from checkpoints."""

    def __init__(self, width: int = 8, lr: float = 0.01, dropout: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone = TinyNet(width, dropout=dropout)
        self.example_input_array = torch.zeros(1, 1, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/acc", (self(x).argmax(-1) == y).float().mean())

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test/acc", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    def on_load_checkpoint(self, checkpoint):
        from lightning_opt.quantization import restore_quantized_structure

        restore_quantized_structure(self, checkpoint)


class TinyData(pl.LightningDataModule):
    """4 classes of 8x8 images told apart by where a bright square sits; no shuffling (exact resume)."""

    def __init__(self, n: int = 128, batch_size: int = 16) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        y = torch.arange(n) % 4
        x = 0.1 * torch.randn(n, 1, 8, 8, generator=gen)
        for i in range(n):
            r, c = divmod(int(y[i]), 2)
            x[i, 0, r * 4 : r * 4 + 4, c * 4 : c * 4 + 4] += 1.0
        self.x, self.y, self.batch_size = x, y, batch_size

    def _loader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size, shuffle=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        return self._loader()


def make_trainer(tmp_path, callbacks, **kwargs) -> pl.Trainer:
    defaults = {"max_epochs": 2, "limit_train_batches": 4, "limit_val_batches": 1, "num_sanity_val_steps": 0}
    return testing.quiet_trainer(tmp_path, callbacks, **{**defaults, **kwargs})
