"""The image classifier LightningModule that recipes train: a backbone by name or as a module, accuracy metrics."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_opt.distillation.losses import labeled_cross_entropy
from lightning_opt.models import build_backbone
from lightning_opt.targets import UNLABELED

__all__ = ["ImageClassifier"]


class ImageClassifier(pl.LightningModule):
    """Classifies images (or feature vectors) with a backbone built by name or given as a module.

    Logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``, ``test/loss`` and ``test/acc``. Batches are
    ``(inputs, labels, *extra)``; extra items (such as sample indices) are ignored. Samples labelled -1 (the
    unlabelled transfer set of a datamodule's ``labeled_size``) count in neither the loss nor the accuracy; a batch
    without any labelled sample gives a zero loss (no gradient), not NaN.

    Args:
        backbone: A name for `lightning_opt.models.build_backbone` (``"small_cnn"``, ``"mlp"``,
            ``"tiny_resnet"``, or a torchvision model name such as ``"resnet18"``) or an ``nn.Module``.
        num_classes: Number of classes.
        in_channels: Channels of the input images.
        input_size: Height and width of the input images.
        input_shape: The shape of one input without the batch dimension, when it is not
            ``(in_channels, input_size, input_size)`` (``[13]`` for a tabular set of 13 features).
        backbone_kwargs: Keyword arguments of the backbone's constructor (``channels``, ``kernel_sizes``, ...).
        optimizer: The optimizer class and its arguments (``class_path``/``init_args`` in YAML).
        lr_scheduler: An optional learning-rate scheduler, stepped every epoch.

    Raises:
        ValueError: If the backbone name is unknown (see `build_backbone`).

    Examples:
        >>> model = ImageClassifier("small_cnn", backbone_kwargs={"channels": [8, 16]})
        >>> model(model.example_input_array).shape
        torch.Size([1, 10])
    """

    def __init__(
        self,
        backbone: str | nn.Module = "small_cnn",
        num_classes: int = 10,
        in_channels: int = 1,
        input_size: int = 8,
        input_shape: Sequence[int] | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        # Optimizer and scheduler factories stay out of the hyperparameters: checkpoints then load with
        # `weights_only=True`; `load_from_checkpoint` rebuilds the model with the default optimizer.
        ignore = ["optimizer", "lr_scheduler"] + (["backbone"] if isinstance(backbone, nn.Module) else [])
        self.save_hyperparameters(ignore=ignore)
        kwargs = dict(backbone_kwargs or {})
        if isinstance(backbone, nn.Module):
            self.backbone = backbone
        else:
            self.backbone = build_backbone(
                backbone, num_classes=num_classes, in_channels=in_channels, input_size=input_size, **kwargs
            )
        shape = tuple(input_shape) if input_shape is not None else (in_channels, input_size, input_size)
        self.example_input_array = torch.zeros(1, *shape)
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.train_acc = MulticlassAccuracy(num_classes, average="micro", ignore_index=UNLABELED)
        self.val_acc = MulticlassAccuracy(num_classes, average="micro", ignore_index=UNLABELED)
        self.test_acc = MulticlassAccuracy(num_classes, average="micro", ignore_index=UNLABELED)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def _shared_step(self, batch: Any, stage: str, metric: MulticlassAccuracy) -> torch.Tensor:
        x, y = batch[0], batch[1]
        logits = self(x)
        loss = labeled_cross_entropy(logits, y)
        metric(logits, y)
        train = stage == "train"  # one tag each: `train/loss` per logged step, `val/loss`/`test/loss` per epoch
        self.log(f"{stage}/loss", loss, on_step=train, on_epoch=not train, prog_bar=not train)
        self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train", self.train_acc)

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "val", self.val_acc)

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "test", self.test_acc)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0]).argmax(-1)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Rebuild a structure that lightning-opt changed (removed channels, a QAT graph) before the weights load."""
        from lightning_opt.pruning import restore_pruned_structure
        from lightning_opt.quantization import restore_quantized_structure

        restore_pruned_structure(self, checkpoint)
        restore_quantized_structure(self, checkpoint)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer(self.parameters())
        if self.lr_scheduler is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.lr_scheduler(optimizer), "interval": "epoch"},
        }
