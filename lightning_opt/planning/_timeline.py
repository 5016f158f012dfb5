"""A recipe's timeline before training: when each pruning update, QAT phase, distillation change and checkpoint
happens, in optimizer steps and epochs, and the conflicts between them, each with the config key to change.

Every step comes from the callback that will act: `Pruning.update_steps`, :meth:`QuantizationAwareTraining.
phase_steps` / ``phase_problems``, ``Schedule.update_steps`` / ``Schedule.value`` for scheduled distillation weights.
The run's length is the Trainer's own ``estimated_stepping_batches``, read in a ``setup`` hook of a fit that stops
there (the datamodule is set up, nothing trains), so ``limit_train_batches``, ``accumulate_grad_batches``,
``max_epochs`` and ``max_steps`` count exactly as in ``fit``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_opt.planning._recipe import Recipe
from lightning_opt.pruning import Pruning
from lightning_opt.quantization import PostTrainingQuantization, QuantizationAwareTraining
from lightning_opt.schedules import Schedule

__all__ = ["Conflict", "Event", "RunLength", "Timeline", "nm_conflicts", "recipe_timeline", "run_length"]


@dataclass(frozen=True)
class RunLength:
    """The length of a fit, in Trainer units.

    Args:
        total_steps: optimizer steps of the run (``trainer.estimated_stepping_batches``; ``inf`` when unbounded).
        steps_per_epoch: optimizer steps per epoch (``ceil(batches / accumulate_grad_batches)``).
        batches_per_epoch: training batches per epoch after ``limit_train_batches``.
        accumulate_grad_batches: batches per optimizer step.
        max_epochs: the Trainer's ``max_epochs`` (None or -1: unbounded).
        max_steps: the Trainer's ``max_steps`` (-1: unbounded).
        val_every_n_epochs: ``check_val_every_n_epoch`` (0 when validation is off).
    """

    total_steps: float
    steps_per_epoch: int
    batches_per_epoch: float
    accumulate_grad_batches: int
    max_epochs: int | None
    max_steps: int
    val_every_n_epochs: int = 1

    def epoch_of(self, step: float) -> float:
        """The (fractional) epoch at an optimizer step.

        Examples:
            >>> RunLength(100, 10, 10, 1, 10, -1).epoch_of(25)
            2.5
        """
        return step / self.steps_per_epoch if self.steps_per_epoch else math.nan


@dataclass(frozen=True)
class Event:
    """Something that happens at an optimizer step.

    Args:
        step: the optimizer step from which it is in force (``trainer.global_step``; an update at step ``t`` runs
            just before the ``t``-th optimizer step).
        kind: ``"pruning"``, ``"qat"``, ``"ptq"``, ``"distillation"`` or ``"checkpoint"``.
        what: a short description (``"sparsity -> 0.512"``).
        key: the config key of what decides it.
        value: the scheduled value, when there is one.
    """

    step: int
    kind: str
    what: str
    key: str
    value: float | None = None


@dataclass(frozen=True)
class Conflict:
    """A problem found before training, with the key to change.

    Args:
        key: the full config key (``trainer.callbacks[1].init_args.freeze_bn``).
        message: what is wrong and what to do.
    """

    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


@dataclass
class Timeline:
    """The events of a run and its conflicts.

    Args:
        run: the run's length.
        events: events sorted by step.
        conflicts: problems found before training.
        notes: what the timeline leaves out (time-based checkpoints, ...).
    """

    run: RunLength
    events: list[Event] = field(default_factory=list)
    conflicts: list[Conflict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def table(self, max_per_kind: int = 6) -> str:
        """A plain-text table: step, epoch, kind, what, key; long runs of one kind are elided in the middle.

        Args:
            max_per_kind: events shown per (kind, key) before the middle ones are summarised in one line.
        """
        run = self.run
        total = "unbounded" if math.isinf(run.total_steps) else f"{int(run.total_steps)}"
        lines = [
            f"run: {total} optimizer steps, {run.steps_per_epoch} per epoch ({_fmt(run.batches_per_epoch)} batches, "
            f"accumulate_grad_batches={run.accumulate_grad_batches}), max_epochs={run.max_epochs}, "
            f"max_steps={run.max_steps}",
            "",
            f"{'step':>8}  {'epoch':>7}  {'kind':<12} {'what':<44} key",
        ]
        shown = _elide(self.events, max_per_kind)
        for item in shown:
            if isinstance(item, str):
                lines.append(f"{'':>8}  {'':>7}  {item}")
                continue
            epoch = run.epoch_of(item.step)
            lines.append(f"{item.step:>8}  {epoch:>7.2f}  {item.kind:<12} {item.what:<44} {item.key}")
        if self.notes:
            lines += ["", *(f"note: {n}" for n in self.notes)]
        if self.conflicts:
            lines += ["", f"{len(self.conflicts)} conflict(s):", *(f"  - {c}" for c in self.conflicts)]
        else:
            lines += ["", "no conflicts found."]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "run": vars(self.run),
            "events": [vars(e) | {"epoch": self.run.epoch_of(e.step)} for e in self.events],
            "conflicts": [vars(c) for c in self.conflicts],
            "notes": list(self.notes),
        }

    def figure(self) -> Any:
        """A matplotlib figure: scheduled values over steps (pruning sparsity, distillation weights), phase and
        checkpoint markers, with a second axis in epochs.
        """
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(9, 3.8))
        series: dict[tuple[str, str], list[Event]] = {}
        for e in self.events:
            if e.value is not None and e.kind in ("pruning", "distillation"):
                series.setdefault((e.kind, e.key), []).append(e)
        end = self.run.total_steps if math.isfinite(self.run.total_steps) else max([e.step for e in self.events] + [1])
        for (kind, key), evs in series.items():
            xs = [ev.step for ev in evs] + [end]
            ys = [float(ev.value or 0.0) for ev in evs] + [float(evs[-1].value or 0.0)]
            ax.step(xs, ys, where="post", label=f"{kind} {key.split('.')[-1] if kind == 'distillation' else ''}")
        colors = {"qat": "tab:red", "ptq": "tab:purple"}
        labelled: set[str] = set()
        for e in self.events:
            if e.kind in colors:
                label = e.kind if e.kind not in labelled else None
                labelled.add(e.kind)
                ax.axvline(e.step, color=colors[e.kind], linestyle="--", linewidth=1, label=label)
                ax.text(
                    e.step,
                    0.03,
                    " " + e.what,
                    rotation=90,
                    fontsize=7,
                    va="bottom",
                    ha="right",
                    transform=ax.get_xaxis_transform(),
                )
        saves = [e.step for e in self.events if e.kind == "checkpoint"]
        if saves:
            ax.plot(
                saves,
                [0.0] * len(saves),
                "|",
                color="tab:gray",
                markersize=10,
                label="checkpoint",
                transform=ax.get_xaxis_transform(),
                clip_on=False,
            )
        ax.set_xlim(0, end)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("scheduled value")
        if self.run.steps_per_epoch:
            spe = self.run.steps_per_epoch

            def to_epoch(s: Any) -> Any:
                return s / spe

            def to_step(e: Any) -> Any:
                return e * spe

            top = ax.secondary_xaxis("top", functions=(to_epoch, to_step))
            top.set_xlabel("epoch")
        ax.legend(fontsize=7, loc="center right")
        if self.conflicts:
            ax.set_title(
                f"{len(self.conflicts)} conflict(s): " + "; ".join(c.key for c in self.conflicts)[:120], fontsize=8
            )
        fig.tight_layout()
        return fig


def _fmt(value: float) -> str:
    return "inf" if math.isinf(value) else f"{int(value)}"


def _elide(events: list[Event], keep: int) -> list[Event | str]:
    groups: dict[tuple[str, str], list[Event]] = {}
    for e in events:
        groups.setdefault((e.kind, e.key), []).append(e)
    hidden: dict[int, str] = {}
    skip: set[int] = set()
    for (kind, _), evs in groups.items():
        if len(evs) <= keep:
            continue
        head, tail = keep // 2, keep - keep // 2
        middle = evs[head:-tail]
        for e in middle:
            skip.add(id(e))
        first, last = middle[0], middle[-1]
        hidden[id(evs[head - 1])] = (
            f"... {len(middle)} more {kind} events from step {first.step} to {last.step} (see timeline.json)"
        )
    out: list[Event | str] = []
    for e in events:
        if id(e) in skip:
            continue
        out.append(e)
        if id(e) in hidden:
            out.append(hidden[id(e)])
    return out


# ----------------------------------------------------------------------------------------------------- run length
class _Stop(Exception):
    """Raised by the probe once it has read what it came for."""


class _LengthProbe(Callback):
    def __init__(self) -> None:
        self.run: RunLength | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        total = float(trainer.estimated_stepping_batches)  # sets up the train dataloader
        batches = float(trainer.num_training_batches)
        acc = int(trainer.accumulate_grad_batches)
        spe = math.ceil(batches / acc) if math.isfinite(batches) else 0
        val_on = bool(trainer.limit_val_batches) and trainer.check_val_every_n_epoch is not None
        self.run = RunLength(
            total_steps=total,
            steps_per_epoch=int(spe),
            batches_per_epoch=batches,
            accumulate_grad_batches=acc,
            max_epochs=trainer.max_epochs,
            max_steps=trainer.max_steps,
            val_every_n_epochs=int(trainer.check_val_every_n_epoch or 0) if val_on else 0,
        )
        raise _Stop


def run_length(recipe: Recipe) -> RunLength:
    """The run's length as the recipe's Trainer computes it.

    A fit starts with a probe as its first callback; in its ``setup`` hook (after the datamodule's ``setup``,
    before any other callback's) it reads ``estimated_stepping_batches``, ``num_training_batches`` and
    ``accumulate_grad_batches``, then stops the fit. Nothing trains and no other callback runs.

    Args:
        recipe: the built recipe (its Trainer is used once and should not be reused for ``fit``).

    Returns:
        The `RunLength`.
    """
    probe = _LengthProbe()
    trainer = recipe.trainer
    trainer.callbacks.insert(0, probe)  # type: ignore[attr-defined]
    try:
        trainer.fit(recipe.model, datamodule=recipe.datamodule)
    except _Stop:
        pass
    finally:
        trainer.callbacks.remove(probe)  # type: ignore[attr-defined]
    if probe.run is None:  # pragma: no cover - the probe always runs when fit starts
        raise RuntimeError("the run length probe did not run")
    return probe.run


# ----------------------------------------------------------------------------------------------------- events
def _schedule_events(schedule: Schedule, total: float, key: str, label: str, conflicts: list[Conflict]) -> list[Event]:
    """A scheduled model weight (distillation ``alpha``/``temperature``): read at ``global_step`` in each step."""
    try:
        _, end = schedule.resolve(total)
    except ValueError as err:
        conflicts.append(Conflict(f"{key}.init_args.start", str(err)))
        return []
    if math.isfinite(total) and end > total:
        conflicts.append(
            Conflict(
                f"{key}.init_args.end",
                f"the {label} schedule ends at step {end} but the run has {int(total)} optimizer steps: its final "
                f"value {schedule.final} is never reached. HINT: give `end` as a fraction (e.g. 0.7) or lower it.",
            )
        )
    steps = [s for s in schedule.update_steps(total) if s <= total]
    return [
        Event(s, "distillation", f"{label} -> {schedule.value(s, total):.4g}", key, schedule.value(s, total))
        for s in steps
    ]


def _pruning_events(cb: Pruning, key: str, total: float, conflicts: list[Conflict]) -> list[Event]:
    skey = f"{key}.init_args.schedule"
    try:
        cb.schedule.resolve(total)
    except ValueError as err:
        conflicts.append(Conflict(f"{skey}.init_args.start", str(err)))
        return []
    _, end = cb.schedule.resolve(total)
    if math.isfinite(total) and end > total:
        conflicts.append(
            Conflict(
                f"{skey}.init_args.end",
                f"the pruning schedule ends at step {end} but the run has {int(total)} optimizer steps: the final "
                f"sparsity {cb.schedule.final} is never reached. HINT: give `end` as a fraction of the run (e.g. "
                "0.7) or raise max_steps/max_epochs.",
            )
        )
    events = []
    for step in cb.update_steps(total):
        value = cb.schedule.value(step, total)
        what = f"{cb.granularity} sparsity -> {value:.4f}" + (" (+overrides)" if cb.overrides else "")
        events.append(Event(step, "pruning", what, key, value))
    return events


def _qat_events(cb: QuantizationAwareTraining, key: str, total: float, conflicts: list[Conflict]) -> list[Event]:
    for name, message in cb.phase_problems(total):
        conflicts.append(Conflict(f"{key}.init_args.{name}", message))
    steps = cb.phase_steps(total)
    labels = {
        "start": "fake quantization starts",
        "freeze_observers": "observers freeze (ranges fixed)",
        "freeze_bn": "BatchNorm statistics freeze",
    }
    events = [
        Event(int(s), "qat", labels[name], f"{key}.init_args.{name}") for name, s in steps.items() if s is not None
    ]
    if cb.convert_on_fit_end and math.isfinite(total):
        events.append(
            Event(int(total), "qat", "int8 conversion + artifact (fit end)", f"{key}.init_args.convert_on_fit_end")
        )
    return events


def _checkpoint_events(cb: ModelCheckpoint, key: str, run: RunLength, notes: list[str]) -> list[Event]:
    total = run.total_steps
    if not math.isfinite(total):
        notes.append(f"{key}: unbounded run, checkpoint steps not listed.")
        return []
    every_steps = int(getattr(cb, "_every_n_train_steps", 0) or 0)
    every_epochs = int(getattr(cb, "_every_n_epochs", 1) or 0)
    if getattr(cb, "_train_time_interval", None) is not None:
        notes.append(f"{key}: checkpoints by wall time (train_time_interval), not listed.")
        return []
    what = "checkpoint" + (" (+last.ckpt)" if cb.save_last else "")
    if every_steps > 0:
        steps = list(range(every_steps, int(total) + 1, every_steps))
    elif every_epochs > 0 and run.steps_per_epoch:
        period = every_epochs if not run.val_every_n_epochs else math.lcm(every_epochs, run.val_every_n_epochs)
        epochs = math.ceil(total / run.steps_per_epoch)
        steps = [min(e * run.steps_per_epoch, int(total)) for e in range(period, epochs + 1, period)]
    else:
        steps = []
    if cb.save_last and (not steps or steps[-1] != int(total)):
        steps.append(int(total))
        notes.append(f"{key}: last.ckpt at the end of fit is listed at the run's last step.")
    return [Event(s, "checkpoint", what, key) for s in steps]


def recipe_timeline(recipe: Recipe, run: RunLength) -> Timeline:
    """The timeline of a built recipe for a run of the given length, with the conflicts found.

    Conflicts: a pruning or distillation schedule that ends after the run (``...schedule.init_args.end``); QAT that
    starts before the last pruning update while ``preserve_sparsity`` is off (``...preserve_sparsity``); a QAT start
    at or after the end of the run, a freeze point before the start (``phase_problems``); a Pruning callback listed
    after a quantization callback. N:M targets that do not match ``(m - n) / m`` make the recipe refuse to build;
    `nm_conflicts` reads them from the recipe file.

    Args:
        recipe: the built recipe.
        run: its length (`run_length`).

    Returns:
        The `Timeline`.
    """
    total = run.total_steps
    tl = Timeline(run=run)
    last_prune: dict[str, int] = {}
    callbacks = list(recipe.trainer.callbacks)  # type: ignore[attr-defined]
    for cb in callbacks:
        key = recipe.key_of(cb)
        if isinstance(cb, Pruning):
            evs = _pruning_events(cb, key, total, tl.conflicts)
            tl.events += evs
            if evs:
                last_prune[key] = evs[-1].step
        elif isinstance(cb, QuantizationAwareTraining):
            if cb.linear is not None:
                tl.notes.append(f"{key}: scheme {cb.scheme!r} fake-quantizes from the first step; no phases listed.")
                continue
            tl.events += _qat_events(cb, key, total, tl.conflicts)
        elif isinstance(cb, PostTrainingQuantization) and math.isfinite(total):
            what = f"PTQ: calibrate {cb.calibration_batches} batches, int8 artifact (fit end)"
            tl.events.append(Event(int(total), "ptq", what, key))
        elif isinstance(cb, ModelCheckpoint):
            tl.events += _checkpoint_events(cb, key, run, tl.notes)
    for name, value in vars(recipe.model).items():  # scheduled distillation weights (alpha, temperature)
        if isinstance(value, Schedule):
            tl.events += _schedule_events(value, total, f"model.init_args.{name}", name, tl.conflicts)
    tl.conflicts += _order_conflicts(recipe, callbacks, total, last_prune)
    tl.events.sort(key=lambda e: (e.step, e.kind))
    return tl


def _order_conflicts(recipe: Recipe, callbacks: list[Any], total: float, last_prune: dict[str, int]) -> list[Conflict]:
    """QAT starting before the end of pruning without ``preserve_sparsity``; Pruning listed after quantization."""
    conflicts: list[Conflict] = []
    # QAT before the end of pruning without preserve_sparsity
    for cb in callbacks:
        if not isinstance(cb, QuantizationAwareTraining) or cb.linear is not None or cb.preserve_sparsity:
            continue
        start = cb.phase_steps(total)["start"]
        assert start is not None
        for pkey, last in last_prune.items():
            if start < last:
                qkey = recipe.key_of(cb)
                conflicts.append(
                    Conflict(
                        f"{qkey}.init_args.preserve_sparsity",
                        f"QuantizationAwareTraining starts at step {start}, before the last pruning update of {pkey} "
                        f"(step {last}), with preserve_sparsity=false: weights pruned before the QAT graph is built "
                        f"are not kept at zero by QAT. HINT: set {qkey}.init_args.preserve_sparsity: true, or move "
                        f"{qkey}.init_args.start to step {last} or later.",
                    )
                )
    order = [
        i for i, cb in enumerate(callbacks) if isinstance(cb, (QuantizationAwareTraining, PostTrainingQuantization))
    ]
    for i, cb in enumerate(callbacks):
        if isinstance(cb, Pruning) and order and i > order[0]:
            quant = callbacks[order[0]]
            conflicts.append(
                Conflict(
                    recipe.key_of(cb),
                    f"Pruning is listed after {type(quant).__name__} ({recipe.key_of(quant)}): it would look for "
                    "Conv/Linear modules in the quantized graph. HINT: list the pruning callback first.",
                )
            )
    return conflicts


def nm_conflicts(config: dict[str, Any]) -> list[Conflict]:
    """N:M pruning whose schedule does not end at ``(m - n) / m``, read from a recipe mapping (such a recipe does not
    build, so this check runs on the file).

    Args:
        config: the recipe as a mapping (`read_recipe_file`).

    Returns:
        One conflict per mismatching Pruning entry, keyed at its ``schedule.init_args.final``.

    Examples:
        >>> cfg = {"trainer": {"callbacks": [{"class_path": "lightning_opt.pruning.Pruning", "init_args": {
        ...     "granularity": "nm", "schedule": {"class_path": "x", "init_args": {"final": 0.9}}}}]}}
        >>> nm_conflicts(cfg)[0].key
        'trainer.callbacks[0].init_args.schedule.init_args.final'
    """
    out = []
    callbacks = (config.get("trainer") or {}).get("callbacks") or []
    if isinstance(callbacks, dict):
        callbacks = [callbacks]
    for i, entry in enumerate(callbacks):
        if not isinstance(entry, dict) or not str(entry.get("class_path", "")).endswith("Pruning"):
            continue
        args = entry.get("init_args") or {}
        if args.get("granularity") != "nm":
            continue
        n, m = int(args.get("n", 2)), int(args.get("m", 4))
        final = ((args.get("schedule") or {}).get("init_args") or {}).get("final")
        if final is None or m <= n or abs(float(final) - (m - n) / m) <= 1e-9:
            continue
        out.append(
            Conflict(
                f"trainer.callbacks[{i}].init_args.schedule.init_args.final",
                f"{n}:{m} sparsity zeroes {(m - n) / m} of the weights, but the schedule's final is {final}. "
                f"HINT: set it to {(m - n) / m}, or change n/m (trainer.callbacks[{i}].init_args.n / .m).",
            )
        )
    return out
