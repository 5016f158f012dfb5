"""Measure a model: parameters, nonzeros, bytes of the saved weights, FLOPs and CPU latency.

Every figure lightning-opt reports comes from here and is measured on the model (or artifact) it describes.
FLOPs come from `torch.utils.flop_counter.FlopCounterMode` (a multiply-add counts as two FLOPs).

Inputs are examples in any form `lightning_opt.inputs` knows: one tensor (``model(x)``), a tuple of positional
tensors (``model(*example)``) or a dict of keyword tensors (``model(**example)``); integer inputs (token ids, masks)
keep their dtype and values.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import statistics
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_opt import inputs
from lightning_opt._utils import detached_copy

__all__ = [
    "LatencyResult",
    "count_flops",
    "count_nonzero_parameters",
    "count_parameters",
    "measure_latency",
    "measure_model",
    "saved_size_bytes",
]


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (shared parameters counted once).

    Examples:
        >>> count_parameters(nn.Linear(3, 2))
        8
    """
    return sum(p.numel() for p in model.parameters())


def count_nonzero_parameters(model: nn.Module) -> int:
    """Number of parameter elements that are not exactly zero.

    Examples:
        >>> layer = nn.Linear(3, 2)
        >>> with torch.no_grad():
        ...     _ = layer.weight.zero_()
        >>> count_nonzero_parameters(layer)
        2
    """
    return sum(int(torch.count_nonzero(p.detach())) for p in model.parameters())


def saved_size_bytes(model: nn.Module, compressed: bool = False) -> int:
    """Bytes on disk of ``torch.save(model.state_dict())``.

    Args:
        model: The model whose weights are saved.
        compressed: Whether to measure the file after DEFLATE compression (zeros of a sparse model compress away,
            so this is the size a sparse model takes when shipped compressed).
    """
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    data = buffer.getvalue()
    if not compressed:
        return len(data)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("weights.pt", data)
    return len(out.getvalue())


def file_size_bytes(path: str | os.PathLike) -> int:
    """Bytes of a file on disk (an exported artifact)."""
    return os.path.getsize(path)


def count_flops(model: nn.Module | Callable[..., Any], example_input: inputs.Example) -> int:
    """FLOPs of one forward pass on ``example_input``, counted by `FlopCounterMode`.

    Args:
        model: A module or any callable.
        example_input: One tensor, a tuple of positional tensors or a dict of keyword tensors.

    Examples:
        >>> count_flops(nn.Linear(4, 3, bias=False), torch.zeros(2, 4))  # 2 * batch * in * out
        48
        >>> ids = torch.zeros(2, 5, dtype=torch.long)
        >>> count_flops(nn.Embedding(10, 4), {"input": ids})  # a lookup is no FLOP
        0
    """
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        inputs.call(model, example_input)
    return int(counter.get_total_flops())


@dataclass(frozen=True)
class LatencyResult:
    """CPU latency of one forward pass, in milliseconds.

    Attributes:
        median_ms: Median over the repeats.
        spread_ms: Interquartile range (75th - 25th percentile) over the repeats.
        min_ms: Fastest repeat.
        repeats: Number of timed repeats.
        batch_size: Batch size of the timed input.
        num_threads: Torch intra-op threads during the measurement.
    """

    median_ms: float
    spread_ms: float
    min_ms: float
    repeats: int
    batch_size: int
    num_threads: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def measure_latency(
    model: nn.Module | Callable[..., Any],
    example_input: inputs.Example,
    warmup: int = 5,
    repeats: int = 30,
    num_threads: int = 1,
    batch_size: int | None = None,
) -> LatencyResult:
    """Time forward passes on the CPU with a fixed thread count: warm-up, then ``repeats`` timed runs.

    Args:
        model: A module or any callable (a compiled or exported artifact).
        example_input: One tensor, a tuple of positional tensors or a dict of keyword tensors.
        warmup: Untimed runs first (lazy initialisation, compilation, caches).
        repeats: Timed runs.
        num_threads: ``torch.set_num_threads`` during the measurement (restored afterwards).
        batch_size: When given, every batched input (ids *and* their attention mask) is tiled along dim 0 to this
            many rows with its real values and dtype (`lightning_opt.inputs.repeat_to`).

    Raises:
        ValueError: If ``repeats`` < 1 or ``warmup`` < 0 or ``num_threads`` < 1.

    Examples:
        >>> result = measure_latency(nn.Linear(8, 8), torch.zeros(1, 8), warmup=1, repeats=5)
        >>> result.median_ms > 0
        True
        >>> model = nn.Bilinear(3, 2, 1)  # two inputs, both tiled to the batch size
        >>> measure_latency(model, (torch.zeros(1, 3), torch.zeros(1, 2)), warmup=0, repeats=2, batch_size=4).batch_size
        4
    """
    if repeats < 1 or warmup < 0 or num_threads < 1:
        raise ValueError(
            f"`repeats` must be >= 1, `warmup` >= 0 and `num_threads` >= 1, got {repeats}, {warmup}, {num_threads}."
        )
    example = inputs.repeat_to(example_input, batch_size) if batch_size is not None else example_input
    args, kwargs = inputs.call_args(example)
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    times = []
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                model(*args, **kwargs)
            for _ in range(repeats):
                start = time.perf_counter()
                model(*args, **kwargs)
                times.append((time.perf_counter() - start) * 1e3)
    finally:
        torch.set_num_threads(previous)
    quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return LatencyResult(
        median_ms=statistics.median(times),
        spread_ms=quartiles[2] - quartiles[0],
        min_ms=min(times),
        repeats=repeats,
        batch_size=inputs.batch_size(example),
        num_threads=num_threads,
    )


def measure_model(
    model: nn.Module,
    example_input: inputs.Example,
    latency: bool = True,
    warmup: int = 5,
    repeats: int = 30,
    num_threads: int = 1,
    batch_size: int | None = None,
) -> dict[str, float]:
    """All figures of a model at once, measured in eval mode on the CPU (train/eval modes are restored afterwards).

    Args:
        model: The model.
        example_input: One tensor, a tuple of positional tensors or a dict of keyword tensors (moved to the CPU).
        latency: Whether to time the model.
        warmup: Untimed runs before timing.
        repeats: Timed runs.
        num_threads: Torch threads while timing.
        batch_size: Rows of the timed input (every batched input tiled, see `measure_latency`).

    Returns:
        ``params``, ``nonzero_params``, ``sparsity``, ``size_bytes``, ``size_bytes_compressed``, ``flops`` and,
        with ``latency``, ``latency_ms`` and ``latency_spread_ms``.

    Examples:
        >>> figures = measure_model(nn.Linear(4, 2), torch.zeros(1, 4), latency=False)
        >>> figures["params"], figures["flops"]
        (10, 16)
    """
    with _measurable(model) as probe:
        return _measure(probe, inputs.to_cpu(example_input), latency, warmup, repeats, num_threads, batch_size)


@contextlib.contextmanager
def _measurable(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode on the CPU, restored afterwards.

    A CPU model is measured in place (its training flags are put back), so that a LightningModule is never copied
    together with its trainer; a model on another device is measured on a CPU copy.
    """
    if any(t.device.type != "cpu" for t in itertools.chain(model.parameters(), model.buffers())):
        yield detached_copy(model).cpu().eval()
        return
    flags = {m: m.training for m in model.modules()}  # pre-order: parents before children
    model.eval()
    try:
        yield model
    finally:
        # `.train(mode)` rather than the bare flag: exported (pt2e) graphs switch their ops in their own `.train`
        for module, training in flags.items():
            if module.training != training:
                module.train(training)


def _measure(
    probe: nn.Module,
    example: inputs.Example,
    latency: bool,
    warmup: int,
    repeats: int,
    num_threads: int,
    batch_size: int | None,
) -> dict[str, float]:
    params = count_parameters(probe)
    nonzero = count_nonzero_parameters(probe)
    figures: dict[str, float] = {
        "params": params,
        "nonzero_params": nonzero,
        "sparsity": 1.0 - nonzero / params if params else 0.0,
        "size_bytes": saved_size_bytes(probe),
        "size_bytes_compressed": saved_size_bytes(probe, compressed=True),
        "flops": count_flops(probe, example),
    }
    if latency:
        result = measure_latency(probe, example, warmup, repeats, num_threads, batch_size)
        figures["latency_ms"] = result.median_ms
        figures["latency_spread_ms"] = result.spread_ms
    return figures
