"""Schedules against their formulas, without Lightning."""

from __future__ import annotations

import math

import pytest

from lightning_opt.schedules import (
    ConstantSchedule,
    ExponentialSchedule,
    IterativeSchedule,
    LinearSchedule,
    OneShotSchedule,
    PolynomialSchedule,
    resolve_step,
)


def test_polynomial_is_zhu_gupta_cubic():
    s = PolynomialSchedule(final=0.9, initial=0.1, start=100, end=1100, frequency=1)
    for t in (100, 250, 600, 1099):
        expected = 0.9 + (0.1 - 0.9) * (1 - (t - 100) / 1000) ** 3
        assert s.value(t, 2000) == pytest.approx(expected)
    assert s.value(99, 2000) == 0.1
    assert s.value(1100, 2000) == pytest.approx(0.9)
    assert s.value(5000, 2000) == pytest.approx(0.9)


def test_fractions_resolve_against_total_steps():
    s = PolynomialSchedule(final=0.9, start=0.1, end=0.7)
    assert s.resolve(1000) == (100, 700)
    assert s.resolve(10) == (1, 7)
    assert resolve_step(0.5, 7) == 4
    with pytest.raises(ValueError, match="fraction of the total training steps"):
        s.resolve(float("inf"))


def test_frequency_holds_value_between_updates():
    s = LinearSchedule(final=1.0, start=10, end=50, frequency=10)
    assert s.update_steps(100) == [10, 20, 30, 40, 50]
    assert [s.is_update_step(t, 100) for t in (9, 10, 11, 20, 49, 50, 60)] == [
        False, True, False, True, False, True, False,
    ]  # fmt: skip
    assert s.value(15, 100) == s.value(10, 100) == 0.0
    assert s.value(29, 100) == pytest.approx(0.25)
    # the end step is an update even when it is not on the frequency grid
    s2 = LinearSchedule(final=1.0, start=0, end=25, frequency=10)
    assert s2.update_steps(100) == [0, 10, 20, 25]
    assert s2.value(24, 100) == pytest.approx(0.8)
    assert s2.value(25, 100) == 1.0


def test_exponential_formula_and_decreasing_values():
    s = ExponentialSchedule(final=0.0, initial=4.0, start=0, end=100, rate=2.0)
    p = 0.3
    expected = 4.0 + (0.0 - 4.0) * (1 - math.exp(-2.0 * p)) / (1 - math.exp(-2.0))
    assert s.value(30, 100) == pytest.approx(expected)
    assert s.value(100, 100) == 0.0


def test_constant_oneshot_iterative():
    c = ConstantSchedule(final=0.5, start=20)
    assert (c.value(19, 100), c.value(20, 100), c.value(99, 100)) == (0.0, 0.5, 0.5)
    o = OneShotSchedule(final=0.9, at=0.5)
    assert o.update_steps(10) == [5]
    assert (o.value(4, 10), o.value(5, 10)) == (0.0, 0.9)
    it = IterativeSchedule(final=0.8, start=0, end=30, steps=4)
    assert it.update_steps(100) == [0, 10, 20, 30]
    assert [it.value(t, 100) for t in (0, 15, 25, 30)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert IterativeSchedule(final=0.6, start=7, steps=1).update_steps(100) == [7]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"start": 0.8, "end": 0.2}, r"`start` \(0.8\) must not be after `end` \(0.2\)"),
        ({"start": 1.5}, r"`start` must be in \[0.0, 1.0\].*got 1.5.*HINT: write an int"),
        ({"end": -3}, r"`end` must be >= 0 when given in steps, got -3"),
        ({"frequency": 0}, r"`frequency` must be an int >= 1.*got 0"),
        ({"power": 0.0}, r"`power` must be > 0, got 0.0"),
    ],
)
def test_misconfiguration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PolynomialSchedule(final=0.5, **kwargs)


def test_misconfiguration_mixed_units_and_types():
    with pytest.raises(ValueError, match=r"`start` \(60 -> step 60\) must not be after `end` \(0.5 -> step 50\)"):
        LinearSchedule(start=60, end=0.5).resolve(100)
    with pytest.raises(TypeError, match="`start` must be an int"):
        LinearSchedule(start="10")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`steps` must be an int >= 1"):
        IterativeSchedule(steps=0)
    with pytest.raises(ValueError, match="`rate` must be > 0"):
        ExponentialSchedule(rate=-1.0)
