"""The trial loop: a recipe plus its ``search:`` section in, a finished optuna study and its outputs out."""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import optuna
import torch
import yaml
from optuna.trial import TrialState
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from lightning_opt._io import atomic_write, check_output_dir
from lightning_opt._utils import load_checkpoint
from lightning_opt.measure import measure_model
from lightning_opt.recipe import build_from_config, load_recipe, load_yaml
from lightning_opt.search._callbacks import ObjectiveNotLoggedError, TrialCallback, TrialProgress
from lightning_opt.search._outputs import write_outputs
from lightning_opt.search._results import SearchResult, counted_trials
from lightning_opt.search._space import SearchSpace, flatten_keys, set_path, suggest_keys
from lightning_opt.search._spec import BUILTIN_OBJECTIVES, SearchConfig

__all__ = ["load_search_recipe", "run_search"]

_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
_QUIET_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")
_TB_LOGGER = "lightning_opt.loggers.TensorBoardLogger"
_YAML_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml's emitter: the same text, ~4x faster


class _BudgetReachedError(RuntimeError):
    """Another worker took the last trial of the budget first; this trial is dropped without training."""


# ------------------------------------------------------------------------------------------------------- recipe
def _parse_override(arg: str, nxt: str | None) -> tuple[str, Any, int]:
    """``--a.b=v`` or ``--a.b v`` -> (key, YAML value, number of argv items used)."""
    body = arg[2:]
    if "=" in body:
        key, raw = body.split("=", 1)
        used = 1
    else:
        if nxt is None or nxt.startswith("--"):
            raise ValueError(f"override `{arg}` has no value. HINT: write `{arg}=VALUE`.")
        key, raw, used = body, nxt, 2
    return key, load_yaml(raw), used


def load_search_recipe(path: str | os.PathLike, overrides: Sequence[str] = ()) -> tuple[dict[str, Any], SearchConfig]:
    """Read a recipe, apply ``--key=value`` overrides, split off and validate its ``search:`` section.

    Args:
        path: The recipe YAML (a LightningCLI config plus a ``search:`` mapping).
        overrides: ``["--trainer.max_epochs=2", "--search.n_trials=4", ...]``: dotted keys set before anything else,
            so they are part of every trial and of the ``best*.yaml`` files.

    Returns:
        The recipe without ``search`` (what LightningCLI parses) and the validated search section.

    Raises:
        FileNotFoundError: If the recipe does not exist.
        ValueError: If the recipe has no ``search:`` mapping, an override is malformed, or the section is invalid.
    """
    path = Path(path)
    recipe = load_recipe(path)
    argv = list(overrides)
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}; overrides look like `--trainer.max_epochs=2`.")
        key, value, used = _parse_override(arg, argv[i + 1] if i + 1 < len(argv) else None)
        set_path(recipe, key, value)
        i += used
    if "search" not in recipe:
        raise ValueError(
            f"`--config` {str(path)!r} has no `search:` section. HINT: add `search: {{space: {{...}}, objectives:"
            " [...]}}`, or run it with `lightning-opt fit`."
        )
    section = recipe.pop("search")
    return recipe, SearchConfig.from_dict(section, default_name=path.stem)


# ------------------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _quiet(enabled: bool) -> Iterator[None]:
    """Silence Lightning's info logs and warnings for the duration (per-trial output is quiet by default)."""
    if not enabled:
        yield
        return
    levels = {name: logging.getLogger(name).level for name in _QUIET_LOGGERS}
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.redirect_stdout(io.StringIO()):
                yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _parser_error(err: io.StringIO, exit_: SystemExit, what: str) -> ValueError:
    lines = [ln.strip() for ln in err.getvalue().strip().splitlines() if ln.strip()]
    starts = [i for i, ln in enumerate(lines) if ln.startswith("error:")]
    message = " ".join(lines[starts[-1] :] if starts else lines[-3:])
    return ValueError(f"{what} does not parse: {message or f'exit code {exit_.code}'}")


def _build(args: list[str], what: str) -> Any:
    """A trial's (or the recipe's) model, datamodule and trainer, built through LightningCLI's public path.

    Each trial gets a fresh `LightningOptCLI`, so the hyperparameters it records (the
    model's ``hparams``, ``hparams.yaml``, TensorBoard HParams, the checkpoint) are the trial's sampled values.
    LightningCLI's ``SaveConfigCallback`` is left out: the search writes each trial's ``config.yaml`` (the trial's
    recipe) itself. A parser error becomes a ``ValueError`` naming ``what`` failed.
    """
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return build_from_config(args, save_config_callback=None)
    except SystemExit as exit_:
        raise _parser_error(err, exit_, what) from None


def _has_checkpoint_callback(callbacks: Any) -> bool:
    """Whether a recipe's ``trainer.callbacks`` holds a ``ModelCheckpoint`` (then checkpointing stays on)."""
    items = callbacks if isinstance(callbacks, list) else [callbacks]
    for item in items:
        path = item.get("class_path", "") if isinstance(item, dict) else item
        if isinstance(path, str) and "Checkpoint" in path.rsplit(".", 1)[-1]:
            return True
    return False


def _trial_name(number: int) -> str:
    return f"trial_{number:04d}"


def _scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, value in metrics.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                continue
            value = value.item()
        if isinstance(value, int | float):
            out[name] = float(value)
    return out


# ------------------------------------------------------------------------------------------------------- the loop
class _Search:
    def __init__(
        self,
        recipe: dict[str, Any],
        config: SearchConfig,
        verbose: bool,
        console: Console,
    ) -> None:
        self.recipe = recipe
        self.config = config
        self.verbose = verbose
        self.console = console
        self.run_dir = config.run_dir
        self.trials_dir = self.run_dir / "trials"
        names = [o.name for o in config.objectives]
        self.need_test = any(n.startswith("test/") for n in names)
        self.builtins = [n for n in names if n in BUILTIN_OBJECTIVES]
        self.monitor = names[0] if config.pruner != "none" else None
        self.abort: BaseException | None = None
        self.last_number: int | None = None
        self.progress: Progress | None = None  # the console's bars while the loop runs

    # -------------------------------------------------------------------------------------------- validation
    def validate(self) -> None:
        """Build the recipe once (without the search) so that a broken recipe or key fails before any trial."""
        cfg = self.config
        run_cfg = self._run_config(self.recipe, self.run_dir / "dry_run", "dry_run", logger=False)
        dry = self.run_dir / f".dry_run_{os.uname().nodename}_{os.getpid()}.yaml"  # workers may share the run dir
        try:
            with _quiet(not self.verbose):
                cli = _build(self._write(dry, run_cfg), "the recipe")
        finally:
            dry.unlink(missing_ok=True)
        known = set(flatten_keys(self.recipe)) | set(flatten_keys(cli.config.as_dict()))
        cfg.space.check_keys(known)
        if self.builtins and getattr(cli.model, "example_input_array", None) is None:
            raise ValueError(
                f"`search.objectives` {self.builtins} are measured on the model, which needs `example_input_array`;"
                f" {type(cli.model).__name__} has none. HINT: set `self.example_input_array` in the module."
            )
        # a sampled example config must also be expressible (keys under a leaf value, list index out of range)
        probe = optuna.create_study(directions=cfg.directions)  # type: ignore[arg-type]
        for _ in range(3):
            values = cfg.space.sample(probe.ask())
            try:
                SearchSpace.apply(self.recipe, values)
            except KeyError as err:
                raise ValueError(f"search.space: {err.args[0]}") from None

    # -------------------------------------------------------------------------------------------- storage
    def open_study(self) -> optuna.Study:
        cfg = self.config
        study = None
        for attempt in range(4):  # new workers may race to create the same tables or study: retry
            try:
                study = optuna.create_study(
                    storage=cfg.make_storage(),
                    study_name=cfg.study_name,
                    directions=cfg.directions,  # type: ignore[arg-type]
                    sampler=cfg.make_sampler(),
                    pruner=cfg.make_pruner(),
                    load_if_exists=True,
                )
                break
            except ValueError:
                raise
            except Exception:
                if attempt == 3:
                    raise
                time.sleep(0.5 * (attempt + 1))
        assert study is not None
        wanted = [
            optuna.study.StudyDirection.MAXIMIZE if d == "maximize" else optuna.study.StudyDirection.MINIMIZE
            for d in cfg.directions
        ]
        if list(study.directions) != wanted:
            raise ValueError(
                f"study {cfg.study_name!r} in {cfg.masked_storage_url!r} has directions"
                f" {[d.name.lower() for d in study.directions]}, but `search.objectives` asks for {cfg.directions}."
                " HINT: give this search another `study_name` or `run_dir`."
            )
        names = [o.name for o in cfg.objectives]
        stored = study.user_attrs.get("objectives")
        if stored is None:
            study.set_user_attr("objectives", names)
        elif stored != names:
            raise ValueError(
                f"study {cfg.study_name!r} was created for objectives {stored}, but `search.objectives` is {names}."
                " HINT: give this search another `study_name`."
            )
        return study

    # -------------------------------------------------------------------------------------------- one trial
    def _run_config(self, config: dict[str, Any], trial_dir: Path, version: str, logger: bool = True) -> dict[str, Any]:
        """The config a trial actually runs: the trial's config with its own TensorBoard dir, quiet, no report."""
        run = copy.deepcopy(config)
        trainer = run.setdefault("trainer", {}) or {}
        run["trainer"] = trainer
        if logger:
            old = trainer.get("logger")
            init_args: dict[str, Any] = {}
            if isinstance(old, dict) and old.get("class_path", "").endswith("TensorBoardLogger"):
                init_args = {k: v for k, v in (old.get("init_args") or {}).items() if k not in ("save_dir", "name")}
            init_args.update(
                {"save_dir": str(self.trials_dir), "name": "", "version": version, "default_hp_metric": False}
            )
            trainer["logger"] = {"class_path": _TB_LOGGER, "init_args": init_args}
        else:
            trainer["logger"] = False
        trainer["default_root_dir"] = str(trial_dir)
        if "enable_checkpointing" not in trainer and not _has_checkpoint_callback(trainer.get("callbacks")):
            trainer["enable_checkpointing"] = False  # nothing reads a trial's checkpoint: `best*.yaml` is refit
        if not self.verbose:
            trainer["enable_progress_bar"] = False
            trainer["enable_model_summary"] = False
        report = run.get("report")
        run["report"] = {**(report if isinstance(report, dict) else {}), "enabled": False}
        return run

    @staticmethod
    def _write(path: Path, config: dict[str, Any], header: str = "") -> list[str]:
        with atomic_write(path) as fh:
            fh.write(header + yaml.dump(config, Dumper=_YAML_DUMPER, sort_keys=False))
        return ["--config", str(path)]

    def _over_budget(self, trial: optuna.Trial, trials: list[optuna.trial.FrozenTrial]) -> bool:
        frozen = next(t for t in reversed(trials) if t._trial_id == trial._trial_id)
        if "failed_trial" in frozen.system_attrs or "fixed_params" in frozen.system_attrs:
            return False  # a re-queued trial of a dead worker replaces one already counted
        before = [t for t in counted_trials(trials) if t.number < trial.number]
        return len(before) >= self.config.n_trials

    @staticmethod
    def _resume_from(trial: optuna.Trial, trials: list[optuna.trial.FrozenTrial]) -> str | None:
        """The ``last.ckpt`` of the dead trial this one re-runs (a retry of a lost worker), if that trial wrote one.

        A retried trial then continues where the dead one stopped, exactly (same schedule, masks, data order), instead
        of training again from the start; without a checkpoint (trials checkpoint only when the recipe asks) it starts
        over, which gives the same result for a deterministic recipe.
        """
        frozen = next(t for t in reversed(trials) if t._trial_id == trial._trial_id)
        failed = frozen.system_attrs.get("failed_trial")
        dead_dir = None if failed is None else trials[failed].user_attrs.get("trial_dir")
        if not dead_dir:
            return None
        found = sorted(Path(dead_dir).rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not found:
            return None
        load_checkpoint(found[-1])  # weights-only and readable, or the trial fails with that reason
        return str(found[-1])

    def _metrics(self, cli: Any, resumed: bool) -> dict[str, float]:
        """What a trained trial is judged on: its logged metrics, test metrics, and measured size or latency."""
        trainer, model, cfg = cli.trainer, cli.model, self.config
        metrics = _scalar_metrics(dict(trainer.callback_metrics))
        if resumed and any(o.name not in metrics for o in cfg.objectives):
            # resumed from a checkpoint at the end of training: nothing ran, so validate the restored model
            trainer.validate(model, datamodule=cli.datamodule, verbose=False)
            metrics.update(_scalar_metrics(dict(trainer.callback_metrics)))
        if self.need_test:
            trainer.test(model, datamodule=cli.datamodule, verbose=False)
            metrics.update(_scalar_metrics(dict(trainer.callback_metrics)))
        if self.builtins:
            kwargs = {"num_threads": 1, **cfg.latency}
            figures = measure_model(model, model.example_input_array, latency="latency_ms" in self.builtins, **kwargs)
            metrics.update({k: float(v) for k, v in figures.items()})
        return metrics

    def _objective_values(self, metrics: dict[str, float]) -> list[float]:
        """The objectives' values, in order; an objective never logged stops the search, a non-finite one fails."""
        result = []
        for obj in self.config.objectives:
            if obj.name not in metrics:
                raise ObjectiveNotLoggedError(
                    f"objective `{obj.name}` is not logged by the model; logged: {sorted(metrics)}."
                    + suggest_keys(obj.name, metrics)
                )
            value = metrics[obj.name]
            if not math.isfinite(value):
                raise ValueError(f"objective `{obj.name}` is {value}")
            result.append(value)
        return result

    def objective(self, trial: optuna.Trial) -> float | list[float]:
        cfg = self.config
        start = time.perf_counter()
        self.last_number = trial.number
        trials = trial.study.get_trials(deepcopy=False)  # one storage read: this trial is among them
        if self._over_budget(trial, trials):
            trial.set_user_attr("skipped", "the budget was reached by other workers")
            raise _BudgetReachedError("budget reached")
        name = _trial_name(trial.number)
        trial_dir = self.trials_dir / name
        trial.set_user_attr("trial_dir", str(trial_dir))
        trial.set_user_attr("worker", f"{os.uname().nodename}:{os.getpid()}")
        fit_s = 0.0
        try:
            values = cfg.space.sample(trial)
            config = SearchSpace.apply(self.recipe, values)
            self._write(trial_dir / "config.yaml", config, f"# Trial {trial.number} of study {cfg.study_name!r}.\n")
            args = self._write(trial_dir / "run.yaml", self._run_config(config, trial_dir, name))
            with _quiet(not self.verbose):
                build_start = time.perf_counter()
                cli = _build(args, "the trial's config")
                trial.set_user_attr("build_seconds", round(time.perf_counter() - build_start, 4))
                trainer, model = cli.trainer, cli.model
                trainer.callbacks.append(TrialCallback(trial, monitor=self.monitor))
                if self.progress is not None:
                    monitor = self.monitor or cfg.objectives[0].name
                    trainer.callbacks.append(TrialProgress(self.progress, f"trial {trial.number}", monitor))
                resume = self._resume_from(trial, trials)
                if resume is not None:
                    trial.set_user_attr("resumed_from", resume)
                fit_start = time.perf_counter()
                try:
                    trainer.fit(model, datamodule=cli.datamodule, ckpt_path=resume)
                finally:
                    fit_s = time.perf_counter() - fit_start
                    trial.set_user_attr("steps", int(trainer.global_step))
                if trainer.interrupted:
                    raise RuntimeError("the fit was interrupted")
                metrics = self._metrics(cli, resumed=resume is not None)
            result = self._objective_values(metrics)
            trial.set_user_attr("metrics", {k: v for k, v in metrics.items() if math.isfinite(v)})
            return result[0] if len(result) == 1 else result
        except optuna.TrialPruned:
            raise
        except BaseException as err:
            reason = f"{type(err).__name__}: {' '.join(str(err).split())}"[:1000]
            trial.set_user_attr("fail_reason", reason)
            if isinstance(err, ObjectiveNotLoggedError):
                self.abort = ValueError(f"`search.objectives`: {err.args[0]}")
            if isinstance(err, KeyboardInterrupt):
                raise
            if not isinstance(err, Exception):
                raise RuntimeError(reason) from err
            raise
        finally:
            total_s = time.perf_counter() - start
            trial.set_user_attr("fit_seconds", round(fit_s, 4))
            trial.set_user_attr("trial_seconds", round(total_s, 4))

    # -------------------------------------------------------------------------------------------- the loop
    def budget(self, study: optuna.Study) -> tuple[int, int, int]:
        """(finished, running, waiting) among the counted trials."""
        counted = counted_trials(study.get_trials(deepcopy=False))
        finished = sum(t.state in _FINISHED for t in counted)
        running = sum(t.state == TrialState.RUNNING for t in counted)
        waiting = sum(t.state == TrialState.WAITING for t in counted)
        return finished, running, waiting

    def describe_best(self, study: optuna.Study) -> str:
        done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
        if not done:
            return "no completed trial yet"
        if len(self.config.objectives) == 1:
            best = study.best_trial
            return f"best {self.config.objectives[0].name}={best.values[0]:.4g} (trial {best.number})"
        return f"Pareto front: {len(study.best_trials)} of {len(done)} completed"

    def loop(self, study: optuna.Study) -> None:
        cfg = self.config
        start = time.monotonic()
        n_total = cfg.n_trials
        if cfg.sampler == "grid":
            grid = cfg.space.grid_space()
            n_total = min(n_total, math.prod(len(v) for v in grid.values()))
        progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.fields[study]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            console=self.console,
            transient=False,
        )
        self.progress = progress
        with progress:
            finished, _, _ = self.budget(study)
            task = progress.add_task(self.describe_best(study), total=n_total, completed=finished, study=cfg.study_name)
            while True:
                if cfg.timeout is not None and time.monotonic() - start > cfg.timeout:
                    self.console.print(f"[yellow]timeout of {cfg.timeout} s reached: no new trial started.")
                    break
                finished, running, waiting = self.budget(study)
                if finished >= n_total and waiting == 0:
                    break
                if waiting == 0 and finished + running >= n_total:
                    # the rest is running elsewhere (or in a dead worker whose heartbeat will go stale): wait
                    time.sleep(min(cfg.heartbeat_interval, 1))
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        optuna.storages.fail_stale_trials(study)
                    continue
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    study.optimize(self.objective, n_trials=1, catch=(Exception,), gc_after_trial=False)
                if self.last_number is not None:
                    self._announce(study.get_trials(deepcopy=False)[self.last_number])
                    self.last_number = None
                if self.abort is not None:
                    raise self.abort
                finished, _, _ = self.budget(study)
                progress.update(task, completed=min(finished, n_total), description=self.describe_best(study))

    def _announce(self, trial: optuna.trial.FrozenTrial) -> None:
        if trial.user_attrs.get("skipped"):
            return
        if trial.state == TrialState.FAIL:
            self.console.print(f"[red]trial {trial.number} failed[/red]: {trial.user_attrs.get('fail_reason', '?')}")
        elif trial.state == TrialState.PRUNED:
            self.console.print(f"[dim]trial {trial.number} pruned after validation {trial.last_step}[/dim]")


def run_search(
    config: str | os.PathLike,
    overrides: Sequence[str] = (),
    *,
    verbose: bool = False,
    console: Console | None = None,
) -> SearchResult:
    """Run (or resume) the search a recipe describes and write its outputs.

    Every trial is the recipe with the sampled values set, parsed and instantiated by LightningCLI exactly as
    ``lightning-opt fit`` would, trained with its own TensorBoard run directory, and measured. A trial that raises
    or whose loss turns NaN is recorded as failed with its reason and the search goes on. Trials count toward
    ``search.n_trials`` across reruns and workers sharing the storage, so rerunning resumes.

    Args:
        config: The recipe YAML with a ``search:`` section.
        overrides: ``--key=value`` overrides, applied to the recipe (``--search.n_trials=50`` included).
        verbose: Show each trial's Lightning output (progress bars, model summary, logs).
        console: Where the progress bar and summary go (a fresh rich console by default).

    Returns:
        The study, the best trial(s) and the written files.

    Raises:
        ValueError: If the recipe or its search section is invalid, a searched key is not in the recipe, the storage
            cannot be reached, or an objective is not logged by the model (after the first trial).

    Examples:
        >>> result = run_search("recipes/search/hpo_digits.yaml", ["--search.n_trials=2"])  # doctest: +SKIP
        >>> result.best_configs[0].name  # doctest: +SKIP
        'best.yaml'
    """
    console = console or Console(file=sys.stdout)  # bound now: trials silence sys.stdout while they train
    recipe, cfg = load_search_recipe(config, overrides)
    check_output_dir(cfg.run_dir, "search.run_dir")  # before anything is built or written
    if cfg.storage_url.startswith("sqlite:///"):
        check_output_dir(Path(cfg.storage_url[len("sqlite:///") :]).parent, "search.storage")
    search = _Search(recipe, cfg, verbose, console)
    optuna_level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.INFO if verbose else optuna.logging.ERROR)
    run_dir = cfg.run_dir.resolve()
    created = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
    try:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            search.validate()
            study = search.open_study()
        except BaseException:
            if created:  # nothing ran: leave no half-made run folder behind
                shutil.rmtree(created[-1], ignore_errors=True)
            raise
        search.loop(study)
        return write_outputs(study, cfg, recipe, console)
    finally:
        optuna.logging.set_verbosity(optuna_level)
