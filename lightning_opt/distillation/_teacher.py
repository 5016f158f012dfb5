"""Loading and freezing the teacher of a `DistillationModule`."""

from __future__ import annotations

import importlib
import os
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import nn

from lightning_opt._utils import load_checkpoint

__all__ = ["freeze", "import_class", "load_teacher"]


def import_class(class_path: str, name: str = "teacher_class") -> type:
    """Import ``"package.module.Class"`` and return the class.

    Raises:
        ValueError: If the path is not a dotted path or does not resolve to a class.
    """
    module_name, _, attr = class_path.rpartition(".")
    if not module_name:
        raise ValueError(
            f"`{name}` must be a dotted class path such as 'lightning_opt.module.ImageClassifier', got {class_path!r}."
        )
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"`{name}`={class_path!r} cannot be imported: {err}.") from err
    if not isinstance(cls, type):
        raise ValueError(f"`{name}`={class_path!r} is not a class.")
    return cls


def _read_checkpoint(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"`teacher_checkpoint` not found: {path!r}. HINT: train the teacher first "
            "(recipes/distillation/teacher_digits.yaml writes one) and pass the path of its .ckpt file."
        )
    try:  # weights-only: a checkpoint is data, never code to run
        ckpt = load_checkpoint(path, lightning=False)
    except ValueError as err:
        raise ValueError(f"`teacher_checkpoint`: {err}") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"`teacher_checkpoint`={path!r} holds a {type(ckpt).__name__}, expected a checkpoint dict.")
    return ckpt


def _load_weights(teacher: nn.Module, ckpt: dict[str, Any], path: str) -> None:
    state = ckpt.get("state_dict", ckpt)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"`teacher_checkpoint`={path!r} has no state_dict of tensors.")
    own = teacher.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs teacher {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"`teacher_checkpoint`={path!r} is incompatible with the teacher {type(teacher).__name__}: "
            f"missing keys {missing[:10]}, unexpected keys {unexpected[:10]}, shape mismatches {mismatched[:10]}. "
            "HINT: `teacher`/`teacher_class` must describe the same architecture the checkpoint was trained with."
        )
    teacher.load_state_dict(state)


def load_teacher(teacher: nn.Module | None, teacher_class: str | None, teacher_checkpoint: str | None) -> nn.Module:
    """Build the teacher from the three ways a `DistillationModule` accepts it.

    * ``teacher`` alone: used as given (already trained);
    * ``teacher`` + ``teacher_checkpoint``: the checkpoint's weights (Lightning ``state_dict`` or a plain one) are
      loaded into it, strictly;
    * ``teacher_class`` + ``teacher_checkpoint``: ``teacher_class.load_from_checkpoint`` (a LightningModule);
    * ``teacher_checkpoint`` alone: the class is read from the checkpoint's ``_class_path`` hyperparameter, which
      ``lightning-opt fit`` (LightningCLI) records.

    Raises:
        ValueError: On ambiguous or missing arguments, unreadable or incompatible checkpoints.
        FileNotFoundError: If ``teacher_checkpoint`` does not exist.
    """
    if teacher is not None and teacher_class is not None:
        raise ValueError(
            "pass either `teacher` (a module) or `teacher_class` (a class path), not both, got "
            f"teacher={type(teacher).__name__} and teacher_class={teacher_class!r}."
        )
    if teacher is None and teacher_class is None and teacher_checkpoint is None:
        raise ValueError(
            "a teacher is required: pass `teacher` (a module), or `teacher_checkpoint` (a checkpoint written by "
            "`lightning-opt fit`), or `teacher_class` + `teacher_checkpoint`."
        )
    if teacher is not None:
        if not isinstance(teacher, nn.Module):
            raise ValueError(f"`teacher` must be a torch.nn.Module, got {type(teacher).__name__}.")
        if teacher_checkpoint is not None:
            _load_weights(teacher, _read_checkpoint(teacher_checkpoint), teacher_checkpoint)
        return teacher
    if teacher_checkpoint is None:
        raise ValueError(
            f"`teacher_class`={teacher_class!r} needs `teacher_checkpoint`: an untrained teacher teaches nothing."
        )
    ckpt = _read_checkpoint(teacher_checkpoint)
    hparams = dict(ckpt.get(LightningModule.CHECKPOINT_HYPER_PARAMS_KEY) or {})
    if teacher_class is None:
        teacher_class = hparams.get("_class_path")
        if teacher_class is None:
            raise ValueError(
                f"`teacher_checkpoint`={teacher_checkpoint!r} does not record its class (no '_class_path' "
                "hyperparameter: it was not written by `lightning-opt fit`). HINT: set `teacher_class` too."
            )
    cls = import_class(teacher_class)
    if not issubclass(cls, LightningModule):
        raise ValueError(
            f"`teacher_class`={teacher_class!r} is not a LightningModule, so it cannot be rebuilt from a checkpoint. "
            "HINT: pass the module itself as `teacher` (class_path/init_args in YAML) plus `teacher_checkpoint`."
        )
    try:
        return cls.load_from_checkpoint(teacher_checkpoint, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"`teacher_checkpoint`={teacher_checkpoint!r} is incompatible with `teacher_class`={teacher_class!r}: "
            f"{type(err).__name__}: {err}"
        ) from err


def freeze(module: nn.Module) -> nn.Module:
    """Put ``module`` in eval mode and turn off gradients for all its parameters; return it."""
    module.eval()
    module.requires_grad_(False)
    return module
