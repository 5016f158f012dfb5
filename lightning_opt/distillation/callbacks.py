"""Callbacks that go with `DistillationModule`."""

from __future__ import annotations

import os
from collections.abc import Mapping

import lightning.pytorch as pl
import yaml
from jsonargparse import get_loader
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_opt._io import atomic_write
from lightning_opt._utils import find_callback

__all__ = ["StudentCheckpoint"]


class StudentCheckpoint(Callback):
    """At the end of fit, write the student alone as a Lightning checkpoint (no teacher, no adapters).

    The file loads with ``StudentClass.load_from_checkpoint(path)``. The callbacks' checkpoint states (pruning masks,
    QAT records) are kept in it, optimizer and loop states are not. When the run was started by ``lightning-opt fit``
    (LightningCLI), a ``student.yaml`` is written beside it: the run's config with the student as the model and
    without this callback, so that the student can be fine-tuned, tested or exported alone:

        lightning-opt export --config runs/distill_digits/version_0/student.yaml \
            --ckpt_path runs/distill_digits/version_0/student.ckpt

    Args:
        dirpath: Folder of the file; ``None`` uses the logger's run folder (``trainer.log_dir``), else
            ``trainer.default_root_dir``.
        filename: File name, ending in ``.ckpt``.

    Raises:
        ValueError: If ``filename`` is empty or contains a path separator; at fit start, if the model is not a
            `DistillationModule`.

    Examples:
        >>> StudentCheckpoint(dirpath="runs/student", filename="student.ckpt").filename
        'student.ckpt'
    """

    def __init__(self, dirpath: str | None = None, filename: str = "student.ckpt") -> None:
        if not filename or os.sep in filename or (os.altsep and os.altsep in filename):
            raise ValueError(f"`filename` must be a plain file name such as 'student.ckpt', got {filename!r}.")
        self.dirpath = dirpath
        self.filename = filename
        self.last_path: str | None = None
        self.last_config_path: str | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from lightning_opt.distillation.module import DistillationModule

        if not isinstance(pl_module, DistillationModule):
            raise ValueError(
                f"StudentCheckpoint needs the model to be a DistillationModule, got {type(pl_module).__name__}. "
                "HINT: a plain model's checkpoints already hold the student alone; use ModelCheckpoint."
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a rehearsal of fit end before step 1: every callback's `on_save_checkpoint` runs on the records the
        # student checkpoint is built from, so a callback that cannot take them fails now, not after training
        pl_module.student_checkpoint(pl_module._callback_records(trainer))  # type: ignore[operator]

    def path(self, trainer: pl.Trainer) -> str:
        """The file this callback writes for ``trainer``."""
        folder = self.dirpath or trainer.log_dir or trainer.default_root_dir
        return os.path.join(folder, self.filename)

    @property
    def artifacts(self) -> dict[str, str]:
        """Files this callback wrote in the run, by what they hold (``lightning-opt fit`` lists them at the end)."""
        files = {"student": self.last_path, "student recipe": self.last_config_path}
        return {name: path for name, path in files.items() if path}

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        path = self.path(trainer)
        self.last_path = pl_module.export_student(path)  # type: ignore[operator]
        self.last_config_path = self._write_student_config(trainer, pl_module, path)

    def _write_student_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, path: str) -> str | None:
        from lightning.pytorch.cli import SaveConfigCallback

        saver = find_callback(trainer, SaveConfigCallback)
        student_cfg = pl_module.hparams.get("student")
        if saver is None or not isinstance(student_cfg, Mapping):
            return None
        config = get_loader("yaml")(saver.parser.dump(saver.config, skip_none=False))  # as LightningCLI reads it
        config["model"] = dict(student_cfg)
        for key in ("ckpt_path", "weights_only"):  # arguments of `fit`, not of the config
            config.pop(key, None)
        trainer_cfg = config.get("trainer") or {}
        callbacks = trainer_cfg.get("callbacks") or []
        trainer_cfg["callbacks"] = [
            c
            for c in callbacks
            if not (isinstance(c, Mapping) and str(c.get("class_path", "")).endswith("StudentCheckpoint"))
        ]
        out = os.path.splitext(path)[0] + ".yaml"
        if trainer.is_global_zero:
            with atomic_write(out) as f:
                f.write(
                    f"# The student of {type(pl_module).__name__}, alone: {os.path.basename(path)} holds its weights.\n"
                )
                yaml.safe_dump(config, f, sort_keys=False)
        return out
