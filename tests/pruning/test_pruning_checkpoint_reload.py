"""A model whose channels were removed still loads from its Lightning checkpoint, without the callback."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from lightning_opt.data import DigitsDataModule
from lightning_opt.module import ImageClassifier
from lightning_opt.pruning import Pruning
from lightning_opt.schedules import OneShotSchedule


def test_thin_checkpoint_loads_with_load_from_checkpoint_and_trainer_test(tmp_path):
    def new_model() -> ImageClassifier:
        return ImageClassifier("tiny_resnet", backbone_kwargs={"widths": [8, 16]})

    pruning = Pruning(schedule=OneShotSchedule(final=0.5, at=0.5), granularity="channel", remove_channels=True)
    trainer = pl.Trainer(
        max_steps=6,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[pruning],
    )
    model = new_model()
    dense = sum(p.numel() for p in model.parameters())
    data = DigitsDataModule(batch_size=32)
    trainer.fit(model, datamodule=data)
    thin = sum(p.numel() for p in model.parameters())
    assert thin < 0.6 * dense
    path = tmp_path / "thin.ckpt"
    trainer.save_checkpoint(path)

    restored = ImageClassifier.load_from_checkpoint(path)  # plain Lightning API, weights_only load
    assert sum(p.numel() for p in restored.parameters()) == thin
    x = torch.randn(4, 1, 8, 8)
    model.eval()
    restored.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(x), model(x))

    tester = pl.Trainer(logger=False, enable_progress_bar=False, limit_test_batches=2)
    results = tester.test(new_model(), datamodule=data, ckpt_path=str(path), verbose=False)
    expected = pl.Trainer(logger=False, enable_progress_bar=False, limit_test_batches=2).test(
        model, datamodule=data, verbose=False
    )
    assert results[0]["test/acc"] == expected[0]["test/acc"]
