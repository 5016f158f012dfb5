"""Step -> value schedules in Trainer units (optimizer steps), independent of Lightning.

A schedule maps an optimizer step (``trainer.global_step``) and the total number of optimizer steps of the run
(``trainer.estimated_stepping_batches``) to a value. Pruning uses it for the target sparsity; distillation uses the
same classes for its loss weight or temperature. Nothing here imports Lightning, so the formulas are unit-tested
on their own.

Start and end follow Lightning's ``val_check_interval`` convention: an ``int`` is a number of optimizer steps, a
``float`` in ``[0.0, 1.0]`` is a fraction of the total steps. Before ``start`` the value is ``initial``, from ``end`` on
it is ``final``; in between it moves along the schedule's curve and changes only at update steps
(``start``, ``start + frequency``, ... and ``end``), so a value read between two updates is the one set at the last
update.

Examples:
    >>> from lightning_opt.schedules import PolynomialSchedule
    >>> s = PolynomialSchedule(final=0.9, start=0.1, end=0.7, frequency=10)
    >>> s.value(0, total_steps=1000), round(s.value(700, total_steps=1000), 3)
    (0.0, 0.9)
    >>> s.is_update_step(100, total_steps=1000), s.is_update_step(105, total_steps=1000)
    (True, False)
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

__all__ = [
    "ConstantSchedule",
    "ExponentialSchedule",
    "IterativeSchedule",
    "LinearSchedule",
    "OneShotSchedule",
    "PolynomialSchedule",
    "Schedule",
    "resolve_step",
]


def resolve_step(point: int | float, total_steps: int | float, name: str = "step") -> int:
    """Turn a step (``int``) or a fraction of ``total_steps`` (``float`` in ``[0, 1]``) into an optimizer step.

    Args:
        point: an ``int`` number of optimizer steps, or a ``float`` fraction of ``total_steps``.
        total_steps: the total number of optimizer steps of the run (``trainer.estimated_stepping_batches``).
        name: the argument name used in error messages.

    Returns:
        The optimizer step, rounded to the nearest integer for fractions.

    Raises:
        ValueError: if ``point`` is a fraction and ``total_steps`` is not finite and positive.

    Examples:
        >>> resolve_step(0.5, 101), resolve_step(30, 101)
        (50, 30)
    """
    if isinstance(point, bool):
        raise TypeError(f"`{name}` must be an int (steps) or a float in [0, 1] (fraction), got {point!r}.")
    if isinstance(point, int):
        return point
    if not math.isfinite(float(total_steps)) or total_steps <= 0:
        raise ValueError(
            f"`{name}`={point} is a fraction of the total training steps, but the total is {total_steps}. "
            "HINT: set `trainer.max_steps` or `trainer.max_epochs`, or give the schedule's start/end as int steps."
        )
    return round(point * total_steps)


def check_point(point: int | float | None, name: str, allow_none: bool = False) -> None:
    """Check a point of the run as every callback takes one: an ``int`` step >= 0 or a ``float`` fraction in [0, 1].

    Args:
        point: The value given by the user.
        name: The argument's name, for the message.
        allow_none: Whether ``None`` (never) is accepted.

    Raises:
        TypeError: If ``point`` is neither an int nor a float (nor ``None`` when allowed).
        ValueError: If a step is negative or a fraction outside [0, 1].

    Examples:
        >>> check_point(1.5, "start")
        Traceback (most recent call last):
        ...
        ValueError: `start` must be in [0.0, 1.0] when given as a fraction of the training steps, got 1.5. HINT: ...
    """
    if point is None and allow_none:
        return
    if isinstance(point, bool) or not isinstance(point, (int, float)):
        raise TypeError(f"`{name}` must be an int (steps) or a float in [0, 1] (fraction), got {point!r}.")
    if isinstance(point, int) and point < 0:
        raise ValueError(f"`{name}` must be >= 0 when given in steps, got {point}.")
    if isinstance(point, float) and not 0.0 <= point <= 1.0:
        raise ValueError(
            f"`{name}` must be in [0.0, 1.0] when given as a fraction of the training steps, got {point}. "
            f"HINT: write an int (e.g. {int(point)}) to give it in optimizer steps."
        )


class Schedule(ABC):
    """Base class: a value that moves from ``initial`` to ``final`` between ``start`` and ``end``.

    Subclasses implement `shape`, the curve on ``[0, 1]`` (0 at ``start``, 1 at ``end``). Override
    `value` or `is_update_step` for schedules that are not a single ramp.

    Args:
        final: the value from ``end`` on.
        initial: the value before ``start``.
        start: first update step; ``int`` optimizer steps or ``float`` fraction of the total steps.
        end: step at which ``final`` is reached; ``int`` or ``float`` as ``start``.
        frequency: optimizer steps between two updates (the value is held in between).

    Raises:
        ValueError: if ``frequency`` < 1, ``start``/``end`` are negative or a fraction outside [0, 1], or ``start``
            is after ``end`` (when both use the same unit; otherwise when they are resolved).
        TypeError: if ``start``/``end`` are neither int nor float.
    """

    def __init__(
        self,
        final: float = 0.0,
        initial: float = 0.0,
        start: int | float = 0.0,
        end: int | float = 1.0,
        frequency: int = 1,
    ) -> None:
        check_point(start, "start")
        check_point(end, "end")
        if isinstance(frequency, bool) or not isinstance(frequency, int) or frequency < 1:
            raise ValueError(f"`frequency` must be an int >= 1 (optimizer steps between updates), got {frequency!r}.")
        if type(start) is type(end) and start > end:
            raise ValueError(
                f"`start` ({start}) must not be after `end` ({end}). HINT: the schedule ramps from `start` to `end`."
            )
        for name, v in (("final", final), ("initial", initial)):
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"`{name}` must be a finite number, got {v!r}.")
        self.final = float(final)
        self.initial = float(initial)
        self.start = start
        self.end = end
        self.frequency = frequency

    # ----------------------------------------------------------------- formulas
    @abstractmethod
    def shape(self, progress: float) -> float:
        """Curve on ``[0, 1]``: 0 at ``start``, 1 at ``end``.

        Args:
            progress: ``(step - start) / (end - start)`` clamped to ``[0, 1]``.

        Returns:
            The fraction of the way from ``initial`` to ``final``.
        """

    def resolve(self, total_steps: int | float) -> tuple[int, int]:
        """Return ``(start_step, end_step)`` for a run of ``total_steps`` optimizer steps.

        Args:
            total_steps: total optimizer steps (``trainer.estimated_stepping_batches``).

        Returns:
            The start and end as optimizer steps.

        Raises:
            ValueError: if a fraction cannot be resolved, or ``start`` resolves after ``end``.
        """
        s = resolve_step(self.start, total_steps, "start")
        e = resolve_step(self.end, total_steps, "end")
        if s > e:
            raise ValueError(
                f"`start` ({self.start} -> step {s}) must not be after `end` ({self.end} -> step {e}) "
                f"for a run of {total_steps} optimizer steps."
            )
        return s, e

    def last_update_step(self, step: int, total_steps: int | float) -> int | None:
        """The latest update step ``<= step``, or ``None`` before ``start``.

        Args:
            step: the optimizer step (``trainer.global_step``).
            total_steps: total optimizer steps of the run.

        Returns:
            The update step whose value is in force at ``step``.
        """
        s, e = self.resolve(total_steps)
        if step < s:
            return None
        if step >= e:
            return e
        return s + ((step - s) // self.frequency) * self.frequency

    def is_update_step(self, step: int, total_steps: int | float) -> bool:
        """Whether the value changes (or is first set) at ``step``.

        Updates happen at ``start``, every ``frequency`` steps after it, and at ``end``.

        Args:
            step: the optimizer step (``trainer.global_step``).
            total_steps: total optimizer steps of the run.

        Returns:
            True at update steps.
        """
        return self.last_update_step(step, total_steps) == step

    def value(self, step: int, total_steps: int | float) -> float:
        """The value in force at ``step`` (held constant between update steps).

        Args:
            step: the optimizer step (``trainer.global_step``).
            total_steps: total optimizer steps of the run.

        Returns:
            ``initial`` before ``start``, ``final`` from ``end`` on, the curve in between.
        """
        s, e = self.resolve(total_steps)
        u = self.last_update_step(step, total_steps)
        if u is None:
            return self.initial
        progress = 1.0 if e == s else min(max((u - s) / (e - s), 0.0), 1.0)
        return self.initial + (self.final - self.initial) * self.shape(progress)

    def update_steps(self, total_steps: int | float) -> list[int]:
        """All update steps of a run of ``total_steps`` steps.

        Args:
            total_steps: total optimizer steps of the run.

        Returns:
            The sorted update steps.
        """
        s, e = self.resolve(total_steps)
        steps = list(range(s, e, self.frequency))
        if not steps or steps[-1] != e:
            steps.append(e)
        return steps

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class ConstantSchedule(Schedule):
    """The value ``final`` at every step from ``start`` on (``initial`` before it).

    Args:
        final: the value.
        initial: the value before ``start``.
        start: step (int) or fraction (float) at which ``final`` is set.
        frequency: steps between updates (the value does not change, so this matters only to re-apply it).

    Examples:
        >>> ConstantSchedule(final=0.5).value(123, total_steps=1000)
        0.5
    """

    def __init__(self, final: float = 0.0, initial: float = 0.0, start: int | float = 0, frequency: int = 1) -> None:
        super().__init__(final=final, initial=initial, start=start, end=start, frequency=frequency)

    def shape(self, progress: float) -> float:
        return 1.0

    def resolve(self, total_steps: int | float) -> tuple[int, int]:
        s = resolve_step(self.start, total_steps, "start")
        return s, s

    def last_update_step(self, step: int, total_steps: int | float) -> int | None:
        s, _ = self.resolve(total_steps)
        if step < s:
            return None
        return s + ((step - s) // self.frequency) * self.frequency


class LinearSchedule(Schedule):
    """Linear ramp: ``initial + (final - initial) * p`` with ``p = (step - start) / (end - start)``.

    Args:
        final: the value reached at ``end``.
        initial: the value before and at ``start``.
        start: step (int) or fraction (float).
        end: step (int) or fraction (float).
        frequency: steps between updates.

    Examples:
        >>> LinearSchedule(final=1.0, start=0, end=100).value(25, total_steps=100)
        0.25
    """

    def shape(self, progress: float) -> float:
        return progress


class PolynomialSchedule(Schedule):
    """Polynomial ramp ``final + (initial - final) * (1 - p) ** power``; ``power=3`` is the cubic GMP schedule.

    The gradual magnitude pruning schedule of Zhu & Gupta (2017), "To prune, or not to prune": sparsity rises
    fast at first, while there are many redundant weights, and slowly near ``final``.

    Args:
        final: the value reached at ``end`` (e.g. final sparsity).
        initial: the value at ``start`` (e.g. initial sparsity, usually 0).
        start: step (int) or fraction (float).
        end: step (int) or fraction (float).
        frequency: steps between updates (Zhu & Gupta: every 100-1000 steps).
        power: exponent of the curve, > 0.

    Raises:
        ValueError: if ``power`` <= 0 (and the rules of `Schedule`).

    Examples:
        >>> s = PolynomialSchedule(final=0.8, start=0, end=100)
        >>> round(s.value(50, total_steps=100), 4)  # 0.8 * (1 - 0.5 ** 3)
        0.7
    """

    def __init__(
        self,
        final: float = 0.0,
        initial: float = 0.0,
        start: int | float = 0.0,
        end: int | float = 1.0,
        frequency: int = 1,
        power: float = 3.0,
    ) -> None:
        super().__init__(final=final, initial=initial, start=start, end=end, frequency=frequency)
        if not isinstance(power, (int, float)) or isinstance(power, bool) or power <= 0:
            raise ValueError(f"`power` must be > 0, got {power!r}. HINT: 3 gives the cubic GMP schedule.")
        self.power = float(power)

    def shape(self, progress: float) -> float:
        return 1.0 - (1.0 - progress) ** self.power


class ExponentialSchedule(Schedule):
    """Exponential approach to ``final``: ``p' = (1 - exp(-rate * p)) / (1 - exp(-rate))``.

    Larger ``rate`` moves faster at first; ``rate -> 0`` tends to linear.

    Args:
        final: the value reached at ``end``.
        initial: the value at ``start``.
        start: step (int) or fraction (float).
        end: step (int) or fraction (float).
        frequency: steps between updates.
        rate: steepness, > 0.

    Raises:
        ValueError: if ``rate`` <= 0 (and the rules of `Schedule`).

    Examples:
        >>> s = ExponentialSchedule(final=1.0, start=0, end=100, rate=5.0)
        >>> round(s.value(20, total_steps=100), 4)
        0.6364
    """

    def __init__(
        self,
        final: float = 0.0,
        initial: float = 0.0,
        start: int | float = 0.0,
        end: int | float = 1.0,
        frequency: int = 1,
        rate: float = 5.0,
    ) -> None:
        super().__init__(final=final, initial=initial, start=start, end=end, frequency=frequency)
        if not isinstance(rate, (int, float)) or isinstance(rate, bool) or rate <= 0:
            raise ValueError(f"`rate` must be > 0, got {rate!r}.")
        self.rate = float(rate)

    def shape(self, progress: float) -> float:
        return (1.0 - math.exp(-self.rate * progress)) / (1.0 - math.exp(-self.rate))


class OneShotSchedule(Schedule):
    """Jump from ``initial`` to ``final`` once, at step ``at``.

    Args:
        final: the value from ``at`` on.
        initial: the value before ``at``.
        at: step (int) or fraction (float) of the jump.

    Examples:
        >>> s = OneShotSchedule(final=0.9, at=0.5)
        >>> s.value(49, total_steps=100), s.value(50, total_steps=100), s.update_steps(100)
        (0.0, 0.9, [50])
    """

    def __init__(self, final: float = 0.0, initial: float = 0.0, at: int | float = 0.0) -> None:
        super().__init__(final=final, initial=initial, start=at, end=at, frequency=1)
        self.at = at

    def shape(self, progress: float) -> float:
        return 1.0

    def __repr__(self) -> str:
        return f"OneShotSchedule(final={self.final!r}, initial={self.initial!r}, at={self.at!r})"


class IterativeSchedule(Schedule):
    """``steps`` equal jumps from ``initial`` to ``final``, evenly spaced from ``start`` to ``end``.

    Jump ``k`` (``k = 1..steps``) happens at ``start + (k - 1) * (end - start) / (steps - 1)`` and sets
    ``initial + (final - initial) * k / steps``: ``steps=1`` is one-shot pruning at ``start``; the classic
    iterative pruning of Han et al. (2015) is ``steps`` rounds of equal increments.

    Args:
        final: the value after the last jump.
        initial: the value before ``start``.
        start: step (int) or fraction (float) of the first jump.
        end: step (int) or fraction (float) of the last jump.
        steps: number of jumps, >= 1.

    Raises:
        ValueError: if ``steps`` < 1 (and the rules of `Schedule`).

    Examples:
        >>> s = IterativeSchedule(final=0.75, start=0, end=60, steps=3)
        >>> s.update_steps(100), [s.value(t, 100) for t in (0, 29, 30, 60)]
        ([0, 30, 60], [0.25, 0.25, 0.5, 0.75])
    """

    def __init__(
        self,
        final: float = 0.0,
        initial: float = 0.0,
        start: int | float = 0.0,
        end: int | float = 1.0,
        steps: int = 3,
    ) -> None:
        super().__init__(final=final, initial=initial, start=start, end=end, frequency=1)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"`steps` must be an int >= 1 (number of pruning rounds), got {steps!r}.")
        self.steps = steps

    def shape(self, progress: float) -> float:
        return progress

    def update_steps(self, total_steps: int | float) -> list[int]:
        s, e = self.resolve(total_steps)
        if self.steps == 1:
            return [s]
        return sorted({s + round(k * (e - s) / (self.steps - 1)) for k in range(self.steps)})

    def last_update_step(self, step: int, total_steps: int | float) -> int | None:
        done = [u for u in self.update_steps(total_steps) if u <= step]
        return done[-1] if done else None

    def value(self, step: int, total_steps: int | float) -> float:
        ups = self.update_steps(total_steps)
        k = sum(1 for u in ups if u <= step)
        if k == 0:
            return self.initial
        if k == len(ups):
            return self.final
        return self.initial + (self.final - self.initial) * k / len(ups)

    def __repr__(self) -> str:
        return (
            f"IterativeSchedule(final={self.final!r}, initial={self.initial!r}, start={self.start!r}, "
            f"end={self.end!r}, steps={self.steps!r})"
        )
