"""Callbacks that go with :class:`~lightning_opt.distillation.DistillationModule`."""

from __future__ import annotations

import os

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

__all__ = ["StudentCheckpoint"]


class StudentCheckpoint(Callback):
    """At the end of fit, write the student alone as a Lightning checkpoint (no teacher, no adapters).

    The file loads with ``StudentClass.load_from_checkpoint(path)`` and is what ``lightning-opt export`` takes.
    The callbacks' checkpoint states (pruning masks, QAT records) are kept in it, optimizer and loop states are not.

    Args:
        dirpath: Folder of the file; ``None`` uses the logger's run folder (``trainer.log_dir``), else
            ``trainer.default_root_dir``.
        filename: File name, ending in ``.ckpt``.

    Raises:
        ValueError: If ``filename`` is empty or contains a path separator; at fit start, if the model is not a
            :class:`~lightning_opt.distillation.DistillationModule`.

    Example:
        >>> StudentCheckpoint(dirpath="runs/student", filename="student.ckpt").filename
        'student.ckpt'
    """

    def __init__(self, dirpath: str | None = None, filename: str = "student.ckpt") -> None:
        if not filename or os.sep in filename or (os.altsep and os.altsep in filename):
            raise ValueError(f"`filename` must be a plain file name such as 'student.ckpt', got {filename!r}.")
        self.dirpath = dirpath
        self.filename = filename
        self.last_path: str | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from lightning_opt.distillation.module import DistillationModule

        if not isinstance(pl_module, DistillationModule):
            raise ValueError(
                f"StudentCheckpoint needs the model to be a DistillationModule, got {type(pl_module).__name__}. "
                "HINT: a plain model's checkpoints already hold the student alone; use ModelCheckpoint."
            )

    def path(self, trainer: pl.Trainer) -> str:
        """The file this callback writes for ``trainer``."""
        folder = self.dirpath or trainer.log_dir or trainer.default_root_dir
        return os.path.join(folder, self.filename)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.last_path = pl_module.export_student(self.path(trainer))  # type: ignore[operator]
