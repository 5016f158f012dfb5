"""Model inputs of any form: one tensor, a tuple of positional tensors, or a dict of keyword tensors.

Every technique that runs the user's model outside its own ``training_step`` (tracing channel groups, exporting for
quantization, calibration, ONNX, FLOPs, latency, distillation probes) goes through these functions, so a model that
takes ``(input_ids, attention_mask)`` or ``{"input_ids": ..., "attention_mask": ...}`` works everywhere, and integer
inputs (token ids) keep their dtype and values: nothing here ever makes inputs up from ``randn``.

Conventions:

- An *example* (``example_input_array``) is a ``Tensor`` (called as ``model(x)``), a ``tuple``/``list``
  (``model(*example)``) or a ``dict`` (``model(**example)``).
- A *batch* from a dataloader is ``(inputs, target, *extra)`` (``inputs`` itself an example), a dict whose label keys
  (`LABEL_KEYS`) are dropped to give the model's keyword inputs, or a bare tensor.

Examples:
    >>> import torch
    >>> batch = {"input_ids": torch.ones(4, 6, dtype=torch.long), "attention_mask": torch.ones(4, 6), "labels": 0}
    >>> x = batch_inputs(batch)
    >>> sorted(x), batch_size(x)
    (['attention_mask', 'input_ids'], 4)
    >>> first_rows(x, 1)["input_ids"].shape, first_rows(x, 1)["input_ids"].dtype
    (torch.Size([1, 6]), torch.int64)
    >>> call_args(torch.zeros(2, 3))[0][0].shape, call_args((torch.zeros(1), torch.ones(1)))[1]
    (torch.Size([2, 3]), {})
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "LABEL_KEYS",
    "Example",
    "as_dtype_name",
    "batch_index",
    "batch_inputs",
    "batch_size",
    "batch_target",
    "call",
    "call_args",
    "describe",
    "first_rows",
    "flat_tensors",
    "input_names",
    "is_example",
    "is_integer",
    "map_tensors",
    "module_example",
    "repeat_to",
    "to_cpu",
]

#: A model input: one tensor, positional tensors, or keyword tensors.
Example = Tensor | tuple[Any, ...] | list[Any] | Mapping[str, Any]

#: Keys of a dict batch that hold targets, not model inputs.
LABEL_KEYS = ("labels", "label", "target", "targets", "y", "index", "idx")


def map_tensors(example: Any, fn: Callable[[Tensor], Any]) -> Any:
    """Apply ``fn`` to every tensor of an example (tensor, tuple/list or dict), keeping its structure.

    Non-tensor leaves (``None``, flags) are kept as they are.
    """
    if isinstance(example, Tensor):
        return fn(example)
    if isinstance(example, Mapping):
        return {k: map_tensors(v, fn) for k, v in example.items()}
    if isinstance(example, (tuple, list)):
        mapped = [map_tensors(v, fn) for v in example]
        return mapped if isinstance(example, list) else tuple(mapped)
    return example


def to_cpu(example: Any) -> Any:
    """A detached CPU copy of every tensor of an example."""
    return map_tensors(example, lambda t: t.detach().cpu())


def call_args(example: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` to call a model with an example: ``model(*args, **kwargs)``.

    This is also the form ``torch.export.export(model, args, kwargs)`` takes.
    """
    if isinstance(example, Mapping):
        return (), dict(example)
    if isinstance(example, (tuple, list)):
        return tuple(example), {}
    return (example,), {}


def call(model: Callable[..., Any], example: Any) -> Any:
    """Run ``model`` on an example (a tensor, positional tensors or keyword tensors)."""
    args, kwargs = call_args(example)
    return model(*args, **kwargs)


def flat_tensors(example: Any) -> list[Tensor]:
    """The example's tensors in call order (positional first, then keywords in insertion order)."""
    out: list[Tensor] = []
    map_tensors(example, out.append)
    return out


def input_names(example: Any) -> list[str]:
    """A name for each tensor of `flat_tensors`: the dict keys, else ``input`` / ``input_0, input_1...``."""
    if isinstance(example, Mapping):
        return [k for k, v in example.items() if isinstance(v, Tensor)]
    tensors = flat_tensors(example)
    return ["input"] if isinstance(example, Tensor) else [f"input_{i}" for i in range(len(tensors))]


def batch_size(example: Any) -> int:
    """Rows of the example's first tensor (its leading dimension).

    Raises:
        ValueError: if the example holds no tensor with a batch dimension.
    """
    for t in flat_tensors(example):
        if t.dim() > 0:
            return int(t.shape[0])
    raise ValueError(f"Cannot find a batched tensor in an input of type {type(example).__name__}.")


def first_rows(example: Any, n: int) -> Any:
    """The first ``n`` rows of every batched tensor of an example (0-d tensors are kept)."""
    return map_tensors(example, lambda t: t[:n] if t.dim() > 0 else t)


def repeat_to(example: Any, rows: int) -> Any:
    """Every batched tensor tiled along dim 0 to exactly ``rows`` rows (real values, repeated; dtypes kept)."""

    def tile(t: Tensor) -> Tensor:
        if t.dim() == 0:
            return t
        reps = -(-rows // max(int(t.shape[0]), 1))
        return t.repeat(reps, *([1] * (t.dim() - 1)))[:rows]

    return map_tensors(example, tile)


def batch_inputs(batch: Any) -> Any:
    """The model's inputs of a dataloader batch.

    ``(inputs, target, *extra)`` gives ``inputs``; a dict gives its keys other than `LABEL_KEYS` (or the value
    of an ``x``/``input``/``inputs`` key when there is one); a bare tensor is the input itself.

    Raises:
        TypeError: if the batch is none of those forms.
    """
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        for key in ("x", "input", "inputs"):
            if key in batch:
                return batch[key]
        inputs = {k: v for k, v in batch.items() if k not in LABEL_KEYS}
        if not inputs:
            raise TypeError(f"A dict batch with keys {sorted(batch)} holds no model input (all are label keys).")
        return inputs
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    raise TypeError(
        f"Cannot find the model's inputs in a batch of type {type(batch).__name__}. HINT: yield `(inputs, target)`, "
        "a dict of keyword inputs (labels under 'labels'), or a tensor."
    )


def batch_target(batch: Any) -> Tensor | None:
    """The target of a batch: the second item of a tuple, or a dict's ``labels``/``label``/``target``/``y``."""
    if isinstance(batch, Mapping):
        for key in ("labels", "label", "target", "targets", "y"):
            if isinstance(batch.get(key), Tensor):
                return batch[key]
        return None
    if isinstance(batch, (tuple, list)) and len(batch) > 1 and isinstance(batch[1], Tensor):
        return batch[1]
    return None


def batch_index(batch: Any) -> Tensor | None:
    """The sample indices of a batch, when it carries them: the third item of a tuple, or a dict's ``index``/``idx``.

    Examples:
        >>> batch_index((torch.zeros(2, 3), torch.zeros(2), torch.tensor([4, 7]))).tolist()
        [4, 7]
        >>> batch_index({"input_ids": torch.zeros(2, 3), "idx": torch.tensor([1, 2])}).tolist()
        [1, 2]
        >>> batch_index((torch.zeros(2, 3), torch.zeros(2))) is None
        True
    """
    if isinstance(batch, Mapping):
        for key in ("index", "idx"):
            if isinstance(batch.get(key), Tensor):
                return batch[key]
        return None
    if isinstance(batch, (tuple, list)) and len(batch) > 2 and isinstance(batch[2], Tensor):
        return batch[2]
    return None


def describe(example: Any) -> str:
    """A one-line description of an example's tensors, for messages: ``input_ids: int64[2, 16], ...``."""
    names = input_names(example)
    return ", ".join(
        f"{name}: {str(t.dtype).removeprefix('torch.')}{list(t.shape)}" for name, t in zip(names, flat_tensors(example))
    )


def is_example(value: Any) -> bool:
    """Whether ``value`` is a usable example: a tensor, or a non-empty tuple/list/dict holding a tensor."""
    return bool(flat_tensors(value)) if isinstance(value, (Tensor, tuple, list, Mapping)) else False


def module_example(module: Any, batches: Any = None) -> Any:
    """The example input of a (Lightning) module: its ``example_input_array``, else the first batch of ``batches``.

    Args:
        module: a module that may carry ``example_input_array``.
        batches: an iterable of dataloader batches (e.g. ``trainer.datamodule.train_dataloader()``), used when the
            module has no example; its first batch's inputs are taken, with their real values and dtypes.

    Returns:
        A detached CPU example, or ``None`` when neither source gives one.
    """
    example = getattr(module, "example_input_array", None)
    if is_example(example):
        return to_cpu(example)
    if batches is not None:
        for batch in batches:
            return to_cpu(batch_inputs(batch))
    return None


def as_dtype_name(t: Tensor) -> str:
    """``"int64"`` for ``torch.int64`` (json-safe dtype names)."""
    return str(t.dtype).removeprefix("torch.")


def is_integer(t: Tensor) -> bool:
    """Whether a tensor holds integers or booleans (ids, masks): never perturbed, never cast to float."""
    return not (torch.is_floating_point(t) or torch.is_complex(t))
