from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from lightning_opt.data import DigitsDataModule
from lightning_opt.distillation.losses import labeled_cross_entropy
from lightning_opt.module import ImageClassifier


def test_labeled_cross_entropy_ignores_unlabelled_samples():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 10, generator=g)
    y = torch.tensor([3, -1, 0, -1, -1, 9, 2, -1])
    keep = y != -1
    torch.testing.assert_close(labeled_cross_entropy(logits, y), F.cross_entropy(logits[keep], y[keep]))


def test_labeled_cross_entropy_of_an_all_unlabelled_batch_is_zero_not_nan():
    logits = torch.randn(4, 10, requires_grad=True)
    loss = labeled_cross_entropy(logits, torch.full((4,), -1))
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None and torch.equal(logits.grad, torch.zeros_like(logits))


def test_image_classifier_loss_and_accuracy_count_labelled_samples_only():
    torch.manual_seed(0)
    model = ImageClassifier("mlp", backbone_kwargs={"hidden": [16]})
    x = torch.randn(6, 1, 8, 8)
    y = torch.tensor([1, -1, 4, -1, 7, -1])
    keep = y != -1
    logits = model(x)
    loss = model._shared_step((x, y), "train", model.train_acc)
    torch.testing.assert_close(loss, F.cross_entropy(logits[keep], y[keep]))
    acc = model.train_acc.compute()
    torch.testing.assert_close(acc, (logits[keep].argmax(1) == y[keep]).float().mean())
    model.train_acc.reset()
    none = model._shared_step((x, torch.full((6,), -1)), "train", model.train_acc)
    assert torch.isfinite(none) and none.item() == 0.0


def test_image_classifier_trains_on_a_partly_labelled_loader(tmp_path):
    torch.manual_seed(0)
    model = ImageClassifier("mlp", backbone_kwargs={"hidden": [16]})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = pl.Trainer(
        default_root_dir=tmp_path, max_epochs=1, limit_train_batches=10, limit_val_batches=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(model, DigitsDataModule(batch_size=8, labeled_size=100))  # some batches hold no labelled image
    loss = trainer.callback_metrics["train/loss"]
    assert torch.isfinite(loss)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())
