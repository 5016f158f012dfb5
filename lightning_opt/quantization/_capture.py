"""Capturing a module with ``torch.export`` for quantization, with a failure that names the layer."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lightning_opt import inputs
from lightning_opt.quantization._spec import QuantizationExportError, get_submodule

# --------------------------------------------------------------------------------------------------------------------
# Export with a readable failure
# --------------------------------------------------------------------------------------------------------------------


def _as_batch(example: Any) -> Any:
    """Export specializes a batch of 1; give every batched tensor 2 rows so the batch dimension stays dynamic."""
    try:
        rows = inputs.batch_size(example)
    except ValueError:
        return example
    return inputs.repeat_to(example, 2) if rows == 1 else example


def _dynamic_shapes(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """A dynamic batch dimension (``Dim.AUTO``: kept dynamic where the model allows) on every batched tensor.

    Given by parameter name of ``module.forward`` (so ``forward(self, *args, **kwargs)`` works too).
    """

    def spec(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return {0: torch.export.Dim.AUTO} if value.dim() > 0 else None
        if isinstance(value, dict):
            return {k: spec(v) for k, v in value.items()}
        if isinstance(value, (tuple, list)):
            return type(value)(spec(v) for v in value)
        return None

    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return {k: spec(v) for k, v in kwargs.items()} if kwargs else tuple(spec(a) for a in args)
    return {name: spec(value) for name, value in bound.arguments.items()}


def _export(module: nn.Module, example: Any, strict: bool = True) -> torch.export.ExportedProgram:
    example = _as_batch(example)
    args, kwargs = inputs.call_args(example)
    dynamic_shapes = _dynamic_shapes(module, args, kwargs)
    return torch.export.export(module, args, kwargs or None, dynamic_shapes=dynamic_shapes, strict=strict)


def capture(module: nn.Module, example: Any) -> torch.export.ExportedProgram:
    """``torch.export`` for quantization: strict first (reused modules keep their names), else non-strict.

    Strict capture (TorchDynamo) is what the x86 quantizer's patterns are written for; models whose Python Dynamo
    cannot trace (Hugging Face models' config checks, for example) are captured in non-strict mode, which runs the
    Python eagerly and records the same aten ops.
    """
    with _no_kv_cache(module):
        try:
            return _export(module, example, strict=True)
        except Exception:
            return _export(module, example, strict=False)


@contextlib.contextmanager
def _no_kv_cache(module: nn.Module) -> Iterator[None]:
    """Capture Hugging Face models with ``config.use_cache = False``.

    A key/value cache (``DynamicCache``) is an object for step-by-step generation that a graph cannot return; the
    logits do not depend on it. The captured graph therefore returns no cache; the config is restored afterwards.
    """
    configs: list[Any] = []
    for sub in module.modules():
        config = getattr(sub, "config", None)
        if getattr(config, "use_cache", False) is True and all(config is not c for c in configs):
            configs.append(config)
    for config in configs:
        config.use_cache = False
    try:
        yield
    finally:
        for config in configs:
            config.use_cache = True


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    line = next((t.strip() for t in text if t.strip()), type(err).__name__)
    return line[:300]


def _locate_export_failure(module: nn.Module, example: Any) -> tuple[str, str, str]:
    """Find the deepest submodule that fails to export on the inputs it really receives.

    Returns:
        (module path, class name, first line of the export error).
    """
    seen: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}
    handles = []
    for name, sub in module.named_modules():

        def hook(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], _name: str = name) -> None:
            seen.setdefault(_name, (args, kwargs))

        handles.append(sub.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            inputs.call(module, example)
    except Exception as err:  # the eager forward itself fails: that is the clearest message
        return "", type(module).__name__, _first_line(err)
    finally:
        for handle in handles:
            handle.remove()

    def fails(name: str) -> str | None:
        if name not in seen:
            return None
        args, kwargs = seen[name]
        if not all(isinstance(a, torch.Tensor) for a in (*args, *kwargs.values())):
            return None
        try:
            sub = get_submodule(module, name)
            if name:
                torch.export.export(sub, args, kwargs or None, strict=True)
            else:
                capture(sub, example)
        except Exception as err:
            return _first_line(err)
        return None

    path, error = "", fails("") or "unknown export error"
    while True:
        sub = get_submodule(module, path)
        for child_name, _ in sub.named_children():
            child_path = f"{path}.{child_name}" if path else child_name
            child_error = fails(child_path)
            if child_error is not None:
                path, error = child_path, child_error
                break
        else:
            return path, type(get_submodule(module, path)).__name__, error


def export_for_quantization(module: nn.Module, example: Any, module_path: str = "") -> torch.fx.GraphModule:
    """``torch.export`` the module with a dynamic batch dimension and unlift it to a GraphModule (see `capture`).

    Args:
        module: the fp32 module, in the mode (train/eval) the graph should capture.
        example: one example input: a tensor, a tuple of positional tensors or a dict of keyword tensors.
        module_path: its name in the root model (used in error messages).

    Raises:
        QuantizationExportError: naming the submodule that cannot be exported and the op/error, with the fixes.
    """
    try:
        return capture(module, example).module()
    except Exception as err:
        training = module.training
        where, cls_name, detail = _locate_export_failure(module.eval(), _as_batch(example))
        module.train(training)
        full = ".".join(p for p in (module_path, where) if p) or "<root>"
        raise QuantizationExportError(
            f"Cannot quantize: `{full}` ({cls_name}) cannot be captured by torch.export: {detail}. "
            f"HINT: quantize only an exportable part with `module=` (an attribute path such as 'backbone.features'), "
            f"keep layers in fp32 with `skip=['<regex>']`, or rewrite the failing op (data-dependent Python control "
            f"flow, .item(), numpy calls) in tensor ops."
        ) from err
