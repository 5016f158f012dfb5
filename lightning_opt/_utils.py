"""Small helpers shared by the callbacks."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

__all__ = ["local_log_dir"]


def local_log_dir(trainer: pl.Trainer) -> str:
    """``trainer.log_dir`` computed on this process alone, for code that runs on rank zero only.

    ``trainer.log_dir`` broadcasts rank zero's value, a collective every rank must enter: called from rank-zero-only
    code under multi-process DDP it waits for ranks that never come (or fail when they exit). Rank zero's own logger
    holds the value the broadcast would give.

    Example:
        >>> import tempfile
        >>> root = tempfile.mkdtemp()
        >>> trainer = pl.Trainer(default_root_dir=root, logger=False)
        >>> local_log_dir(trainer) == trainer.log_dir == root
        True
    """
    if trainer.loggers:
        logger = trainer.loggers[0]
        path = logger.log_dir if isinstance(logger, (TensorBoardLogger, CSVLogger)) else logger.save_dir
        if path is not None:
            return str(path)
    return str(trainer.default_root_dir)
