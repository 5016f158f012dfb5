"""From a prepared graph to a measured artifact: swap submodules, save ``.pt2``, evaluate and time it."""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from lightning_opt import inputs
from lightning_opt.measure import measure_latency
from lightning_opt.quantization import _pt2e

# prepared graph -> the eager module it was exported from (they share parameters and buffers)
_EAGER: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()


def remember_eager(graph: nn.Module, eager: nn.Module) -> None:
    """Record the eager module a prepared graph came from (same parameter and buffer tensors)."""
    _EAGER[graph] = eager


def eager_of(graph: nn.Module) -> nn.Module | None:
    """The eager fp32 module that shares ``graph``'s weights, if this process prepared it."""
    return _EAGER.get(graph)


@contextlib.contextmanager
def swapped(root: nn.Module, path: str, module: nn.Module) -> Iterator[nn.Module]:
    """Temporarily put ``module`` at ``path`` inside ``root``; yields the model to run (``module`` if path is "")."""
    if not path:
        yield module
        return
    original = _pt2e.get_submodule(root, path)
    _pt2e.set_submodule(root, path, module)
    try:
        yield root
    finally:
        _pt2e.set_submodule(root, path, original)


def accuracy(model: nn.Module | Any, batches: Iterable[Any], fixed_batch: int | None = None) -> float:
    """Top-1 accuracy of ``model`` over labelled batches (per row, or per token for sequence outputs).

    Args:
        model: a module or callable returning logits (``(N, C)``, ``(N, T, C)`` or ``(N * T, C)``).
        batches: labelled dataloader batches (see `lightning_opt.inputs.batch_inputs`/``batch_target``).
        fixed_batch: pad every batch to this many rows (repeating real rows) so a shape-specialized compiled model
            sees a single shape; the padded rows are discarded.

    Raises:
        ValueError: when a batch has no target.
    """
    correct = total = 0
    with torch.no_grad():
        for batch in batches:
            x, y = inputs.batch_inputs(batch), inputs.batch_target(batch)
            if y is None:
                raise ValueError("accuracy needs labelled batches (inputs and a target).")
            n = inputs.batch_size(x)
            if fixed_batch is not None and n < fixed_batch:
                x = inputs.repeat_to(x, fixed_batch)
            logits = _logits(inputs.call(model, x))
            logits = logits.reshape(-1, logits.shape[-1])[: y.numel()]  # rows beyond the real ones are padding
            correct += int((logits.argmax(-1) == y.reshape(-1)).sum())
            total += y.numel()
    return correct / max(total, 1)


def _logits(out: Any) -> torch.Tensor:
    """The logits of a model output: a tensor, an output object's ``logits``, or the first item of a tuple."""
    out = getattr(out, "logits", out)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, dict):
        out = out.get("logits", next(iter(out.values())))
    return out


def _batch_size_of(batches: Iterable[Any]) -> int | None:
    for batch in batches:
        return inputs.batch_size(inputs.batch_inputs(batch))
    return None


def measure_artifact(
    artifact: nn.Module,
    reference: nn.Module | None,
    example: Any,
    test_batches: Iterable[Any] | None,
    compile: bool = True,
    latency: bool = True,
    num_threads: int = 1,
    batch_size: int = 1,
    repeats: int = 30,
) -> dict[str, Any]:
    """Evaluate and time an artifact, and its fp32 reference side by side (interleaved, same thread count).

    Args:
        artifact: the int8 model (loaded back from the saved file).
        reference: the fp32 eager model with the same weights, or None.
        example: one example input (its first row repeated to ``batch_size`` for timing; any input form).
        test_batches: a labelled test dataloader, or None to skip accuracy.
        compile: run the artifact through inductor (int8 kernels) as a deployment would.
        latency: time both models.
        num_threads: torch threads while timing.
        batch_size: rows of the timed input.
        repeats: timed forward passes (median and interquartile range reported).

    Returns:
        ``test/acc``, ``fp32_test/acc``, ``latency_ms``, ``latency_spread_ms``, ``fp32_latency_ms``,
        ``speedup_vs_fp32`` (each where measured).
    """
    runner: Any = _pt2e.CompiledInference(artifact) if compile else artifact.eval()
    figures: dict[str, Any] = {}
    if test_batches is not None:
        fixed = _batch_size_of(test_batches) if compile else None
        figures["test/acc"] = accuracy(runner, test_batches, fixed_batch=fixed)
        if reference is not None:
            figures["fp32_test/acc"] = accuracy(reference.eval(), test_batches)
    if latency:
        timed = inputs.repeat_to(inputs.first_rows(example, 1), batch_size)
        int8_runs, fp32_runs = [], []
        rounds = 3 if reference is not None else 1
        reps = max(repeats // rounds, 1)
        first = inputs.flat_tensors(timed)[0]  # measure_latency reads the batch size from it

        def run_int8(_: torch.Tensor) -> Any:
            return inputs.call(runner, timed)

        def run_fp32(_: torch.Tensor) -> Any:
            assert reference is not None
            return inputs.call(reference, timed)

        for _ in range(rounds):  # interleave so machine noise hits both alike
            int8_runs.append(measure_latency(run_int8, first, warmup=3, repeats=reps, num_threads=num_threads))
            if reference is not None:
                reference.eval()
                fp32_runs.append(measure_latency(run_fp32, first, warmup=2, repeats=reps, num_threads=num_threads))
        figures["latency_ms"] = float(sorted(r.median_ms for r in int8_runs)[len(int8_runs) // 2])
        figures["latency_spread_ms"] = float(sorted(r.spread_ms for r in int8_runs)[len(int8_runs) // 2])
        if fp32_runs:
            figures["fp32_latency_ms"] = float(sorted(r.median_ms for r in fp32_runs)[len(fp32_runs) // 2])
            figures["speedup_vs_fp32"] = figures["fp32_latency_ms"] / figures["latency_ms"]
        figures["latency_batch_size"] = batch_size
        figures["latency_num_threads"] = num_threads
    return figures


def save_and_reload(model: nn.Module, example: Any, path: str | os.PathLike[str]) -> tuple[nn.Module, int]:
    """Save ``model`` as a ``.pt2`` and load it back from disk (what a deployment gets); returns (model, bytes)."""
    size = _pt2e.save_artifact(model, example, path)
    return _pt2e.load_artifact(path), size
