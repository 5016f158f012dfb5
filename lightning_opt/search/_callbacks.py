"""The callback that connects a Lightning fit to its optuna trial."""

from __future__ import annotations

import math
import time
from typing import Any

import lightning.pytorch as pl
import optuna
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

__all__ = ["NonFiniteLossError", "ObjectiveNotLoggedError", "TrialCallback", "TrialProgress"]


class ObjectiveNotLoggedError(KeyError):
    """An objective names a metric the model never logs: a recipe error, so the search stops after this trial."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite: the trial is failed with this reason."""


class TrialCallback(Callback):
    """Reports the monitored metric to an optuna trial after each validation and stops a hopeless trial.

    After every validation (sanity check excluded) the value of ``monitor`` is reported to the trial, at step
    0, 1, 2, ... (the count of validations so far: with the default ``val_check_interval`` the epoch), so that trials
    whose optimizer steps differ (a searched batch size) are compared at the same point of training; when the
    study's trial pruner says so, `optuna.TrialPruned` is raised, which ends the fit and marks the trial
    pruned. A NaN or infinite training loss raises `NonFiniteLossError`; a ``monitor`` that the model does not
    log raises `ObjectiveNotLoggedError` (the search stops: every other trial would fail the same way).

    It is added by the search loop to each trial's Trainer. Its reports are part of the checkpoint: a dead worker's
    trial re-run from that trial's ``last.ckpt`` reports its earlier validations again to the new trial and goes on
    counting from there.

    Args:
        trial: The optuna trial of this fit.
        monitor: The logged metric to report, or ``None`` to only watch the loss (multi-objective studies).

    Raises:
        ValueError: If ``monitor`` is set on a multi-objective trial (optuna cannot prune those).

    Examples:
        >>> import optuna
        >>> study = optuna.create_study(direction="maximize")
        >>> cb = TrialCallback(study.ask(), monitor="val/acc")
        >>> cb.monitor
        'val/acc'
    """

    def __init__(self, trial: optuna.Trial, monitor: str | None = None) -> None:
        if monitor is not None and len(trial.study.directions) > 1:
            raise ValueError(
                f"`monitor` must be None for a multi-objective study, got {monitor!r}: optuna cannot prune trials"
                " with several objectives."
            )
        self.trial = trial
        self.monitor = monitor
        self.reported: dict[int, float] = {}
        self._last_global_step = -1

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"reported": dict(self.reported), "last_global_step": self._last_global_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.reported = {int(k): float(v) for k, v in state_dict.get("reported", {}).items()}
        self._last_global_step = int(state_dict.get("last_global_step", -1))

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for step, value in sorted(self.reported.items()):  # a resumed trial: its history, for the trial pruner
            self.trial.report(value, step)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and not torch.isfinite(loss.detach()).all():
            raise NonFiniteLossError(f"training loss is {loss.item()} at step {trainer.global_step}")

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor is None:
            return
        logged = trainer.callback_metrics.get(self.monitor)
        if logged is None:
            available = sorted(trainer.callback_metrics)
            raise ObjectiveNotLoggedError(f"objective `{self.monitor}` is not logged; logged metrics: {available}")
        value = float(logged)
        if not math.isfinite(value):
            raise NonFiniteLossError(f"`{self.monitor}` is {value} at step {trainer.global_step}")
        if trainer.global_step == self._last_global_step:  # validated again without training in between
            return
        self._last_global_step = trainer.global_step
        step = len(self.reported)
        self.reported[step] = value
        self.trial.report(value, step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(
                f"pruned after validation {step} (global step {trainer.global_step}) with {self.monitor}={value:.6g}"
            )


class TrialProgress(Callback):
    """Shows the running trial's training progress (optimizer steps, epoch, last validation) as a progress bar line.

    The search's console shows one line per running trial under the trials bar; updates are throttled to a few per
    second so that the display costs nothing measurable.

    Args:
        progress: The search's `rich.progress.Progress`.
        description: The line's label (``"trial 3"``).
        monitor: A logged metric to show after each validation (``None``: none).
    """

    def __init__(self, progress: Any, description: str, monitor: str | None = None) -> None:
        self.progress = progress
        self.description = description
        self.monitor = monitor
        self.task: Any = None
        self._last = 0.0

    def _update(self, trainer: pl.Trainer, force: bool = False) -> None:
        now = time.monotonic()
        if self.task is None or (not force and now - self._last < 0.25):
            return
        self._last = now
        total = trainer.estimated_stepping_batches
        text = f"{self.description}: epoch {trainer.current_epoch}"
        value = trainer.callback_metrics.get(self.monitor) if self.monitor else None
        if value is not None and getattr(value, "numel", lambda: 1)() == 1:
            text += f", {self.monitor}={float(value):.4g}"
        self.progress.update(
            self.task,
            completed=trainer.global_step,
            total=total if math.isfinite(total) else None,
            description=text,
            refresh=force,  # after each validation the line is drawn at once, whatever the refresh rate
        )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.task = self.progress.add_task(self.description, total=None, study="")
        self._update(trainer, force=True)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._update(trainer)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._update(trainer, force=True)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None
