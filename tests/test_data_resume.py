"""Exact resume of the datamodules: a run killed at a checkpoint and resumed ends with bitwise the same weights."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_opt.data import DigitsDataModule, EpochSampler, ResumableDataLoader
from lightning_opt.module import ImageClassifier


def _fit(root: Path, max_steps: int, ckpt_path: str | None = None, every: int | None = None) -> ImageClassifier:
    pl.seed_everything(0)
    model = ImageClassifier("small_cnn", backbone_kwargs={"channels": [4, 8]})
    callbacks = [ModelCheckpoint(dirpath=root, every_n_train_steps=every, save_top_k=-1)] if every else []
    trainer = pl.Trainer(
        max_steps=max_steps,
        limit_train_batches=5,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=bool(every),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        deterministic=True,
    )
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=16, augment_shift=1), ckpt_path=ckpt_path)
    return model


@pytest.mark.parametrize("kill_at", [5, 7], ids=["end-of-epoch", "mid-epoch"])
def test_resume_gives_bitwise_the_uninterrupted_weights(tmp_path: Path, kill_at: int) -> None:
    reference = _fit(tmp_path / "full", max_steps=12)
    _fit(tmp_path / "killed", max_steps=kill_at, every=kill_at)
    (ckpt,) = (tmp_path / "killed").glob(f"*step={kill_at}.ckpt")
    # the resumed process starts from a different global generator state, as a new process would
    torch.manual_seed(1234)
    resumed = _fit(tmp_path / "resumed", max_steps=12, ckpt_path=str(ckpt))
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_epoch_order_depends_on_seed_and_epoch_only() -> None:
    a, b = EpochSampler(50, seed=3), EpochSampler(50, seed=3)
    torch.manual_seed(0)
    a.set_epoch(2)
    first = list(a)
    torch.manual_seed(99)  # the global generator plays no part
    b.set_epoch(2)
    assert list(b) == first
    b.set_epoch(3)
    assert list(b) != first
    assert sorted(first) == list(range(50))


def test_loader_skips_the_consumed_batches_of_the_saved_epoch() -> None:
    sampler = EpochSampler(10, seed=0)
    loader = ResumableDataLoader(list(range(10)), sampler, progress=lambda: 2, batch_size=3)
    sampler.set_epoch(4)
    full = [int(i) for batch in loader for i in batch]
    state = loader.state_dict()
    assert state["epoch"] == 4 and state["batches"] == 2
    fresh = ResumableDataLoader(list(range(10)), EpochSampler(10, seed=0), batch_size=3)
    fresh.load_state_dict(state)
    assert [int(i) for batch in fresh for i in batch] == full[6:]
    # the next epoch starts from its beginning again
    fresh.epoch_sampler.set_epoch(5)
    assert len([int(i) for batch in fresh for i in batch]) == 10


def test_augmentation_is_reproducible_per_sample_and_epoch() -> None:
    dm = DigitsDataModule(batch_size=8, augment_shift=2)
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)
    torch.manual_seed(0)
    x1 = next(iter(loader))[0]
    torch.manual_seed(1)
    x2 = next(iter(loader))[0]
    assert torch.equal(x1, x2)
    loader.sampler.set_epoch(2)
    assert not torch.equal(next(iter(loader))[0], x1)


def test_resume_with_other_data_settings_warns() -> None:
    dm = DigitsDataModule(batch_size=8, seed=0)
    with pytest.warns(UserWarning, match=r"seed: 1 -> 0"):
        dm.load_state_dict({"seed": 1, "batch_size": 8, "augment_shift": 0})
