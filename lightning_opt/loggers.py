"""TensorBoard that opens on what matters: the project's logger and the one way it writes an HParams session.

Lightning's `TensorBoardLogger` logs ``hp_metric = -1`` and an HParams session of
the model's constructor arguments when a run starts (once for ``fit``, again for ``test``), and an ``epoch`` scalar
with every metric: TensorBoard sorts tag groups alphabetically, so a run opens on ``epoch`` and ``hp_metric``.
`TensorBoardLogger` logs neither. The run's single HParams session is written by
`CompressionReport` when fit ends (the compression settings against the run's headline
results under ``hp/``), and by a search for each trial (its searched values against its objectives).

A session is written without an experiment summary, so that TensorBoard builds the HParams table from every session
under its logdir (the union of their settings, those that differ first) and takes the metric columns from the
sessions' scalars, sorted: the ``hp/`` group sorts first, so its columns are the ones shown.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import TensorBoardLogger as _LightningTensorBoardLogger
from typing_extensions import override

from lightning_opt._io import atomic_write

__all__ = [
    "HPARAMS_FILE",
    "TensorBoardLogger",
    "hparam_value",
    "session_summaries",
    "write_session",
    "write_session_file",
]

#: The event file a search writes beside each trial's own events: that trial's HParams session.
HPARAMS_FILE = "hparams.tfevents"


class TensorBoardLogger(_LightningTensorBoardLogger):
    """Lightning's TensorBoardLogger without the ``hp_metric = -1`` placeholder and without the ``epoch`` scalar.

    The default logger of ``lightning-opt`` and of every recipe. Two differences from Lightning's logger, both so
    that TensorBoard opens on the run's own groups (``hp/``, ``pruning/``, ``quant/``, ``report/``, ``train/``,
    ``val/``, ``test/``):

    - ``default_hp_metric`` is False: no ``hp_metric = -1`` and no HParams session of the model's arguments at the
      start of ``fit`` and again of ``test``. The run's one session comes from
      `CompressionReport` at the end of fit.
    - The ``epoch`` value that Lightning adds to every logged dict is dropped (a metric named ``epoch`` too):
      steps are the x axis, ``val/*`` points mark the epochs, and the checkpoints keep the epoch.
    - The run's folder and event file are made when something is first written, not when Lightning touches
      ``experiment`` before the callbacks' ``setup``: a run that a technique refuses at setup leaves no folder.

    ``hparams.yaml`` is written as before. Every argument of Lightning's logger is accepted.

    Examples:
        >>> import tempfile
        >>> logger = TensorBoardLogger(tempfile.mkdtemp(), name="demo")
        >>> logger.log_metrics({"epoch": 0, "train/loss": 0.5}, step=1)
        >>> logger.finalize("success")
    """

    def __init__(
        self,
        save_dir: str | Path,
        name: str | None = "lightning_logs",
        version: int | str | None = None,
        log_graph: bool = False,
        default_hp_metric: bool = False,
        prefix: str = "",
        sub_dir: str | Path | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            save_dir,
            name=name,
            version=version,
            log_graph=log_graph,
            default_hp_metric=default_hp_metric,
            prefix=prefix,
            sub_dir=sub_dir,
            **kwargs,
        )

    @override
    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        """The ``SummaryWriter``, created (with the run's folder) on first use: until then a stand-in that opens it."""
        if self._experiment is not None:
            return self._experiment
        return _DeferredWriter(self)

    def _open_writer(self) -> Any:
        return _LightningTensorBoardLogger.experiment.fget(self)  # type: ignore[attr-defined]

    @override
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        super().log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step)


class _DeferredWriter:
    """Stands for a logger's ``SummaryWriter`` until an attribute of it is used, then opens it (folder and all)."""

    def __init__(self, logger: TensorBoardLogger) -> None:
        self._logger = logger

    def __getattr__(self, name: str) -> Any:
        return getattr(self._logger._open_writer(), name)


def hparam_value(value: Any) -> bool | float | str | None:
    """A value the HParams plugin shows: numbers, strings and bools as they are, lists and dicts as JSON, a module or
    another object as its class name (a schedule or criterion as its repr), None and NaN left out.

    Examples:
        >>> hparam_value([4, 8]), hparam_value(0.5), hparam_value(None)
        ('[4, 8]', 0.5, None)
    """
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int | float):
        return None if isinstance(value, float) and math.isnan(value) else float(value)
    if isinstance(value, list | tuple | dict):
        try:
            return json.dumps(value)
        except TypeError:
            return str(value)
    if type(value).__repr__ is object.__repr__ or hasattr(value, "parameters"):  # a module, an anonymous object
        return type(value).__name__
    return repr(value)


def session_summaries(hparams: Mapping[str, Any]) -> list[Any]:
    """The summaries of one HParams session (start with its values, end with success): no experiment summary.

    Args:
        hparams: Names to values; values go through `hparam_value` (None is left out).

    Returns:
        Two ``Summary`` protos, to be written into the run's event files.
    """
    from torch.utils.tensorboard.summary import hparams as _hparams

    clean: dict[str, Any] = {}
    for name, value in hparams.items():
        shown = hparam_value(value)
        if shown is not None:
            clean[name] = str(shown).lower() if isinstance(shown, bool) else shown  # torch would write a bool as 1.0
    _experiment, start, end = _hparams(clean, {})
    return [start, end]


def write_session_file(
    run_dir: str | Path, hparams: Mapping[str, Any], scalars: Mapping[str, float], step: int = 0
) -> Path:
    """Write an HParams session and its metric scalars into ``run_dir`` as the event file `HPARAMS_FILE`.

    The file is replaced atomically, so writing it again (a search that ends twice) leaves one session in the run.

    Args:
        run_dir: The run's event folder (TensorBoard reads every ``*tfevents*`` file in it as the same run).
        hparams: The session's values.
        scalars: Metric scalars, by tag (the HParams plugin takes a session's metrics from its run's scalars).
        step: The step the scalars are logged at.

    Returns:
        The written file.
    """
    import time

    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter
    from torch.utils.tensorboard.summary import scalar

    now = time.time()
    path = Path(run_dir) / HPARAMS_FILE
    with atomic_write(path, "wb") as fh:
        writer = RecordWriter(fh)
        writer.write(Event(wall_time=now, file_version="brain.Event:2").SerializeToString())
        for summary in session_summaries(hparams):
            writer.write(Event(wall_time=now, step=0, summary=summary).SerializeToString())
        for tag, value in scalars.items():
            writer.write(Event(wall_time=now, step=step, summary=scalar(tag, float(value))).SerializeToString())
    return path


def write_session(experiment: Any, hparams: Mapping[str, Any], step: int = 0) -> bool:
    """Write an HParams session into an open ``SummaryWriter`` (a TensorBoard logger's ``experiment``).

    Returns:
        Whether ``experiment`` was a writer it could write to.
    """
    file_writer = getattr(experiment, "file_writer", None)
    if file_writer is None or not hasattr(file_writer, "add_summary"):
        return False
    for summary in session_summaries(hparams):
        file_writer.add_summary(summary, step)
    file_writer.flush()
    return True
