"""Small helpers shared by the callbacks."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any, TypeVar

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

CallbackT = TypeVar("CallbackT", bound=Callback)

__all__ = ["detached_copy", "find_callback", "load_checkpoint", "local_log_dir"]


def local_log_dir(trainer: pl.Trainer) -> str:
    """``trainer.log_dir`` computed on this process alone, for code that runs on rank zero only.

    ``trainer.log_dir`` broadcasts rank zero's value, a collective every rank must enter: called from rank-zero-only
    code under multi-process DDP it waits for ranks that never come (or fail when they exit). Rank zero's own logger
    holds the value the broadcast would give.

    Examples:
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


def load_checkpoint(path: str | os.PathLike[str], lightning: bool = True) -> Any:
    """Load a Lightning checkpoint the user named, weights-only (a file cannot run code), with one clear error.

    Args:
        path: the checkpoint file.
        lightning: require a Lightning checkpoint (a dict holding ``state_dict``); ``False`` returns whatever
            weights-only object the file holds (a bare ``state_dict``).

    Returns:
        The checkpoint.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if it is a folder, cannot be read (truncated, not a PyTorch file), needs code to load (a pickle
            that is not weights-only), or is not a Lightning checkpoint; the message names the file.

    Examples:
        >>> import tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "not.ckpt")
        >>> _ = open(path, "w").write("hello")
        >>> load_checkpoint(path)
        Traceback (most recent call last):
        ...
        ValueError: checkpoint '...not.ckpt' cannot be read: ... HINT: give a checkpoint written by ...
    """
    import torch

    file = Path(path)
    hint = "HINT: give a checkpoint written by `lightning-opt fit` (runs/<name>/version_N/checkpoints/last.ckpt)."
    if not file.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist. {hint}")
    if not file.is_file():
        raise ValueError(f"checkpoint {str(path)!r} is not a file. {hint}")
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))  # "Unsupported global: GLOBAL x.y" / "unsupported GLOBAL x.y"
        if found is None:  # not a pickle the weights-only loader can read at all
            raise ValueError(f"checkpoint {str(path)!r} cannot be read: not a PyTorch checkpoint. {hint}") from None
        raise ValueError(
            f"checkpoint {str(path)!r} is not weights-only: loading it would run code it names "
            f"({found.group(1)}). Files are loaded weights-only. HINT: re-save it with plain tensors and primitive "
            "hyperparameters, or load it yourself if you trust it."
        ) from None
    except Exception as err:  # truncated zip, not a torch file, unreadable
        raise ValueError(f"checkpoint {str(path)!r} cannot be read: {_first_line(err)}. {hint}") from None
    if lightning and (not isinstance(checkpoint, dict) or "state_dict" not in checkpoint):
        raise ValueError(f"checkpoint {str(path)!r} is not a Lightning checkpoint (it has no 'state_dict'). {hint}")
    return checkpoint


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return (lines[0] if lines else type(err).__name__)[:300]


def detached_copy(module: Any) -> Any:
    """A deep copy of a module that leaves its Trainer behind (a LightningModule refers to it).

    Rehearsals and measurements work on copies of the user's module. Copying the attached Trainer with it is wasteful
    and, under DDP, impossible (the strategy holds process-group locks that cannot be copied).

    Examples:
        >>> import tempfile
        >>> from lightning_opt.module import ImageClassifier
        >>> model = ImageClassifier("mlp", input_size=2, backbone_kwargs={"hidden": [4]})
        >>> trainer = pl.Trainer(logger=False, default_root_dir=tempfile.mkdtemp())
        >>> model.trainer = trainer
        >>> copied = detached_copy(model)
        >>> copied.backbone is model.backbone, copied._trainer is None
        (False, True)
    """
    import copy

    memo: dict[int, Any] = {}
    if isinstance(module, pl.LightningModule):
        try:
            trainer = module.trainer
        except RuntimeError:  # not attached
            trainer = None
        if trainer is not None:
            memo[id(trainer)] = None
    return copy.deepcopy(module, memo)


def find_callback(trainer: pl.Trainer, kind: type[CallbackT]) -> CallbackT | None:
    """The first callback of ``trainer`` that is a ``kind``, or None: how the techniques find each other.

    Examples:
        >>> import tempfile
        >>> from lightning.pytorch.callbacks import ModelCheckpoint
        >>> trainer = pl.Trainer(logger=False, default_root_dir=tempfile.mkdtemp())
        >>> type(find_callback(trainer, ModelCheckpoint)).__name__
        'ModelCheckpoint'
    """
    return next((c for c in trainer.callbacks if isinstance(c, kind)), None)  # type: ignore[attr-defined]
