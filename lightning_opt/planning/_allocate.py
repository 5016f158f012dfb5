"""Per-layer allocation from sensitivity curves: a multiple-choice knapsack solved by dynamic programming, and the
greedy int8 fallback.

Pruning. Each layer ``l`` picks one sparsity ``s_l`` from its candidates; it costs ``c_l * (1 - s_l)`` of a resource
(weights kept, FLOPs kept or bytes kept) and is predicted to lose ``d_l(s_l)`` metric points, read from the scan's
curve of that layer alone. The predicted loss of a plan is the sum ``sum_l d_l(s_l)`` (layers assumed independent:
an optimistic figure before fine-tuning; the command also measures the plan one-shot). With a budget ``B`` on the
resource the plan minimises the predicted loss subject to ``sum_l c_l (1 - s_l) <= B``; without one it minimises the
resource subject to a predicted loss ``<= max_drop``. Both come from one table: the resource is counted in
``resolution`` units (each layer's cost rounded *up*, so a plan that fits in units fits exactly), and
``dp[j]`` = the least predicted loss of the layers so far using ``j`` units (``O(layers x candidates x resolution)``).

Curves. The candidates of a layer are its measured sparsities and ``between`` points between each two neighbours,
spaced evenly in log-density (``log(1 - s)``), with the loss interpolated linearly there. Measured losses are made
non-negative and non-decreasing in sparsity (a running maximum), so noise in the scan (a layer that "gains" 0.2
points at 50%) cannot pull the plan; no candidate lies beyond the highest measured sparsity.

int8 fallback (`fallback_layers`): starting from every layer int8, the layer with the largest single-layer
loss is kept in fp32, the model re-evaluated, and so on until the measured loss is within budget or no more layers
may fall back (``min_int8``: the fraction of layers that must stay int8). This is the accuracy-aware tuning of Intel
Neural Compressor / NNCF, ordered by the scan.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Allocation", "allocate", "candidates", "fallback_layers", "interpolate", "monotone_curve"]


@dataclass
class Allocation:
    """A per-layer sparsity plan.

    Args:
        sparsity: ``{layer: sparsity}``.
        predicted_drop: the sum of the layers' interpolated single-layer losses.
        kept: the resource kept by the plan (``sum_l c_l (1 - s_l)``).
        total: the resource of the dense layers (``sum_l c_l``).
        layer_drop: ``{layer: predicted loss at its sparsity}``.
    """

    sparsity: dict[str, float]
    predicted_drop: float
    kept: float
    total: float
    layer_drop: dict[str, float] = field(default_factory=dict)


def monotone_curve(curve: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """``(sparsity, loss)`` points sorted, with ``(0, 0)`` added, losses clamped at 0 and made non-decreasing.

    Examples:
        >>> monotone_curve([(0.5, -0.2), (0.9, 3.0), (0.8, 4.0)])
        [(0.0, 0.0), (0.5, 0.0), (0.8, 4.0), (0.9, 4.0)]
    """
    points = sorted({float(s): float(d) for s, d in [(0.0, 0.0), *curve]}.items())
    out, best = [], 0.0
    for s, d in points:
        best = max(best, d if math.isfinite(d) else math.inf)
        out.append((s, best))
    return out


def candidates(curve: Sequence[tuple[float, float]], between: int = 4) -> list[tuple[float, float]]:
    """The candidate ``(sparsity, loss)`` of a layer: measured points and ``between`` interpolated points between each
    two neighbours (evenly in log-density, loss linear there).

    Examples:
        >>> [round(s, 3) for s, _ in candidates([(0.9, 1.0), (0.99, 5.0)], between=1)][-3:]
        [0.9, 0.968, 0.99]
    """
    pts = monotone_curve(curve)
    out = [pts[0]]
    for (s0, d0), (s1, d1) in itertools.pairwise(pts):
        l0, l1 = math.log(1.0 - s0), math.log(1.0 - s1)
        for k in range(1, between + 1):
            t = k / (between + 1)
            out.append((1.0 - math.exp(l0 + t * (l1 - l0)), d0 + t * (d1 - d0)))
        out.append((s1, d1))
    return out


def interpolate(curve: Sequence[tuple[float, float]], sparsity: float) -> float:
    """The loss of a layer at ``sparsity`` on its monotone curve, linear in log-density between measured points
    (the value of the last point beyond it).

    Examples:
        >>> round(interpolate([(0.9, 1.0), (0.99, 5.0)], 0.9), 3), interpolate([(0.9, 1.0)], 0.95)
        (1.0, 1.0)
    """
    pts = monotone_curve(curve)
    for (s0, d0), (s1, d1) in itertools.pairwise(pts):
        if s0 <= sparsity <= s1:
            l0, l1, ls = math.log(1.0 - s0), math.log(1.0 - s1), math.log(1.0 - sparsity)
            return d0 + (d1 - d0) * ((ls - l0) / (l1 - l0) if l1 != l0 else 1.0)
    return pts[-1][1]


def allocate(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    cost: Mapping[str, float],
    budget: float | None = None,
    max_drop: float | None = None,
    resolution: int = 4000,
    between: int = 4,
) -> Allocation:
    """Choose one sparsity per layer (see the module docstring for the method).

    Args:
        curves: ``{layer: [(sparsity, loss in metric points), ...]}`` from the scan (without the dense point).
        cost: ``{layer: resource when dense}`` (weights, FLOPs or bytes).
        budget: the most resource the layers may keep; None to minimise the resource under ``max_drop``.
        max_drop: with ``budget=None``, the largest predicted loss allowed.
        resolution: units the total resource is counted in.
        between: interpolated candidates between two measured sparsities.

    Returns:
        The `Allocation`.

    Raises:
        ValueError: if neither ``budget`` nor ``max_drop`` is given, a layer has no cost, or the budget cannot be met
            even at the highest measured sparsity of every layer (the message says how far it gets).

    Examples:
        >>> curves = {"big": [(0.5, 0.1), (0.9, 0.5)], "small": [(0.5, 2.0), (0.9, 9.0)]}
        >>> a = allocate(curves, {"big": 900.0, "small": 100.0}, budget=300.0)
        >>> {k: round(v, 2) for k, v in a.sparsity.items()}, a.kept <= 300.0
        ({'big': 0.81, 'small': 0.0}, True)
    """
    if budget is None and max_drop is None:
        raise ValueError("allocate needs a `budget` or a `max_drop`.")
    layers = list(curves)
    missing = [n for n in layers if n not in cost or not cost[n] > 0]
    if missing:
        raise ValueError(f"no positive cost for layers {missing}.")
    total = float(sum(cost[n] for n in layers))
    unit = total / resolution
    size = resolution + len(layers) + 1
    options = {n: candidates(curves[n], between) for n in layers}
    dp = np.full(size, np.inf)
    dp[0] = 0.0
    choice = np.zeros((len(layers), size), dtype=np.int32)
    for i, name in enumerate(layers):
        new = np.full(size, np.inf)
        pick = np.zeros(size, dtype=np.int32)
        for k, (s, d) in enumerate(options[name]):
            units = math.ceil(cost[name] * (1.0 - s) / unit - 1e-9)
            shifted = np.full(size, np.inf)
            shifted[units:] = dp[: size - units] + d
            better = shifted < new
            new[better] = shifted[better]
            pick[better] = k
        dp, choice[i] = new, pick
    if budget is not None:
        limit = min(math.floor(budget / unit + 1e-9), size - 1)
        if limit < 0 or not np.isfinite(dp[: limit + 1]).any():
            least = sum(cost[n] * (1.0 - options[n][-1][0]) for n in layers)
            raise ValueError(
                f"the target needs the pruned layers to keep at most {budget:.6g} but even the highest scanned "
                f"sparsity of every layer keeps {least:.6g}. HINT: add higher sparsities to --grid or lower the target."
            )
        j = int(np.argmin(dp[: limit + 1]))
    else:
        assert max_drop is not None
        ok = np.nonzero(dp <= max_drop + 1e-12)[0]
        j = int(ok[0]) if len(ok) else int(np.argmin(dp))
    sparsity: dict[str, float] = {}
    layer_drop: dict[str, float] = {}
    for i in range(len(layers) - 1, -1, -1):
        name = layers[i]
        k = int(choice[i][j])
        s, d = options[name][k]
        sparsity[name], layer_drop[name] = s, d
        j -= math.ceil(cost[name] * (1.0 - s) / unit - 1e-9)
    sparsity = {n: sparsity[n] for n in layers}
    kept = sum(cost[n] * (1.0 - sparsity[n]) for n in layers)
    return Allocation(sparsity, float(sum(layer_drop.values())), kept, total, {n: layer_drop[n] for n in layers})


def fallback_layers(
    order: Sequence[str],
    evaluate: Callable[[list[str]], float],
    max_drop: float,
    min_int8: float = 0.8,
) -> tuple[list[str], list[tuple[list[str], float]]]:
    """Greedy int8 fallback: keep layers in fp32, most sensitive first, until the measured loss is within budget.

    Args:
        order: quantizable layers, most sensitive first.
        evaluate: the measured loss (metric points) with every layer int8 except those given.
        max_drop: the loss allowed.
        min_int8: the fraction of ``order`` that must stay int8 (at most ``floor((1 - min_int8) * n)`` fall back).

    Returns:
        ``(fp32 layers, [(fp32 layers, loss), ...] for every evaluation)``.

    Raises:
        ValueError: if ``min_int8`` is outside [0, 1].

    Examples:
        >>> losses = {(): 3.0, ("a",): 1.0, ("a", "b"): 0.2}
        >>> fallback_layers(["a", "b", "c", "d", "e"], lambda s: losses[tuple(s)], 0.5, min_int8=0.6)[0]
        ['a', 'b']
    """
    if not 0.0 <= min_int8 <= 1.0:
        raise ValueError(f"`min_int8` must be a fraction in [0, 1], got {min_int8}.")
    most = math.floor((1.0 - min_int8) * len(order) + 1e-9)
    skip: list[str] = []
    history = [(list(skip), evaluate(skip))]
    while history[-1][1] > max_drop and len(skip) < most:
        skip.append(order[len(skip)])
        history.append((list(skip), evaluate(skip)))
    best = min(history, key=lambda h: (h[1] > max_drop, len(h[0]) if h[1] <= max_drop else h[1]))
    return best[0], history
