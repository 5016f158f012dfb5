"""Test doubles that ship with the package: a quiet Trainer, and third-party architectures at random init wrapped as
users wrap them.

`lightning_opt.testing.zoo` needs the ``zoo`` extra (``pip install "lightning-opt[zoo]"``: timm, transformers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl

__all__ = ["quiet_trainer"]


def quiet_trainer(root: str | Path, callbacks: list[pl.Callback] | None = None, **kwargs: Any) -> pl.Trainer:
    """A small, quiet CPU Trainer for tests: no progress bar, model summary, logger or checkpoints, one device.

    Args:
        root: ``default_root_dir`` (a test's ``tmp_path``).
        callbacks: The callbacks under test.
        **kwargs: Any other ``Trainer`` argument, overriding the defaults (``max_steps``, ``limit_train_batches``,
            a real ``logger`` when a test reads what was logged...).

    Examples:
        >>> import tempfile
        >>> trainer = quiet_trainer(tempfile.mkdtemp(), max_steps=2)
        >>> trainer.max_steps, trainer.logger is None, trainer.checkpoint_callback is None
        (2, True, True)
    """
    defaults: dict[str, Any] = {
        "default_root_dir": str(root),
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return pl.Trainer(callbacks=callbacks or [], **{**defaults, **kwargs})
