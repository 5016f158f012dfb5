"""The allocation: exact against enumeration on small cases, budget always met, the int8 fallback order."""

from __future__ import annotations

import itertools
import random

import pytest

from lightning_opt.planning._allocate import allocate, candidates, fallback_layers


def _random_case(rng: random.Random, layers: int) -> tuple[dict, dict]:
    curves, cost = {}, {}
    for i in range(layers):
        d, points = 0.0, []
        for s in (0.5, 0.8, 0.9, 0.95, 0.99):
            d += rng.uniform(0, 10)
            points.append((s, d))
        curves[f"l{i}"] = points
        cost[f"l{i}"] = float(rng.randint(10, 5000))
    return curves, cost


@pytest.mark.parametrize("seed", range(6))
def test_dynamic_programming_matches_enumeration(seed):
    rng = random.Random(seed)
    curves, cost = _random_case(rng, 3)
    total = sum(cost.values())
    budget = rng.uniform(0.05, 0.5) * total
    plan = allocate(curves, cost, budget=budget, resolution=20000, between=2)
    options = {n: candidates(curves[n], between=2) for n in curves}
    best = min(
        (sum(d for _, d in combo), combo)
        for combo in itertools.product(*options.values())
        if sum(cost[n] * (1 - s) for n, (s, _) in zip(curves, combo)) <= budget
    )
    assert plan.kept <= budget
    assert plan.predicted_drop == pytest.approx(best[0], abs=0.02 * max(best[0], 1))  # units round costs up


def test_budget_minimising_and_drop_capped_modes():
    curves = {"big": [(0.5, 0.1), (0.9, 0.5), (0.99, 3.0)], "small": [(0.5, 2.0), (0.9, 9.0), (0.99, 40.0)]}
    cost = {"big": 9000.0, "small": 100.0}
    plan = allocate(curves, cost, budget=0.05 * 9100)
    assert plan.sparsity["small"] < 0.5 < 0.9 < plan.sparsity["big"]  # the sensitive small layer stays dense
    capped = allocate(curves, cost, max_drop=0.5)
    assert capped.predicted_drop <= 0.5 and capped.sparsity["big"] == pytest.approx(0.9)
    with pytest.raises(ValueError, match="even the highest scanned sparsity"):
        allocate(curves, cost, budget=0.001 * 9100)


def test_noisy_gains_do_not_count():
    plan = allocate({"a": [(0.5, -3.0), (0.9, 1.0)]}, {"a": 10.0}, budget=10.0)
    assert plan.predicted_drop == 0.0 and plan.sparsity["a"] < 0.5 + 1e-9


def test_fallback_keeps_the_most_sensitive_layers_in_fp32_until_within_budget():
    sensitive = {"a": 2.0, "b": 1.0, "c": 0.1, "d": 0.05, "e": 0.0}
    calls = []

    def evaluate(fp32):
        calls.append(list(fp32))
        return sum(v for k, v in sensitive.items() if k not in fp32)

    skip, history = fallback_layers(list(sensitive), evaluate, max_drop=1.2, min_int8=0.6)
    assert skip == ["a"] and [h[0] for h in history] == [[], ["a"]]
    skip, _ = fallback_layers(list(sensitive), evaluate, max_drop=0.0, min_int8=0.8)
    assert skip == ["a"]  # at most 20% of 5 layers fall back
