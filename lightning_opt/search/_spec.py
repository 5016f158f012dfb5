"""The ``search:`` section of a recipe: objectives, sampler, trial pruner, budget and storage."""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc

from lightning_opt.search._space import SearchSpace, suggest_keys

__all__ = ["BUILTIN_OBJECTIVES", "PRUNERS", "SAMPLERS", "Objective", "SearchConfig"]

BUILTIN_OBJECTIVES: tuple[str, ...] = (
    "params",
    "nonzero_params",
    "sparsity",
    "flops",
    "latency_ms",
    "size_bytes",
    "size_bytes_compressed",
)
"""Objectives measured on the trained model with `lightning_opt.measure`, with their key in ``measure_model``."""
SAMPLERS: dict[str, str] = {
    "random": "RandomSampler",
    "tpe": "TPESampler",
    "nsga2": "NSGAIISampler",
    "cmaes": "CmaEsSampler",
    "grid": "GridSampler",
}
"""``search.sampler`` names -> the optuna sampler class each builds."""
PRUNERS: dict[str, str | None] = {
    "none": None,
    "median": "MedianPruner",
    "successive_halving": "SuccessiveHalvingPruner",
    "hyperband": "HyperbandPruner",
}
"""``search.pruner`` names -> the optuna pruner class each builds (``none``: no trial is pruned)."""
_SECTION_KEYS = {
    "space",
    "objectives",
    "sampler",
    "pruner",
    "n_trials",
    "timeout",
    "seed",
    "storage",
    "study_name",
    "run_dir",
    "heartbeat_interval",
    "grace_period",
    "max_retry",
    "latency",
}


@dataclass
class Objective:
    """One objective of the search.

    Args:
        name: A metric the LightningModule logs (``val/acc``; ``test/...`` metrics make each trial run ``test`` after
            ``fit``), or a built-in measured on the trained model by `lightning_opt.measure.measure_model`:
            ``params``, ``nonzero_params``, ``sparsity``, ``flops``, ``latency_ms``, ``size_bytes``,
            ``size_bytes_compressed``.
        direction: ``"maximize"`` or ``"minimize"``.

    Raises:
        ValueError: If the direction is not one of the two.

    Examples:
        >>> Objective("val/acc", "maximize").builtin
        False
    """

    name: str
    direction: str = "maximize"

    def __post_init__(self) -> None:
        if self.direction not in ("maximize", "minimize"):
            raise ValueError(
                f"search.objectives: `direction` of `{self.name}` must be 'maximize' or 'minimize',"
                f" got {self.direction!r}."
            )

    @property
    def builtin(self) -> bool:
        """Whether it is measured on the model rather than read from the logged metrics."""
        return self.name in BUILTIN_OBJECTIVES


def _named(value: Any, what: str, allowed: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Parse ``tpe`` or ``{name: tpe, n_startup_trials: 5}`` into a name and keyword arguments."""
    if isinstance(value, str):
        name, kwargs = value, {}
    elif isinstance(value, Mapping) and "name" in value:
        kwargs = dict(value)
        name = kwargs.pop("name")
    else:
        raise ValueError(f"`search.{what}` must be a name or a mapping with `name`, got {value!r}.")
    if name not in allowed:
        raise ValueError(
            f"`search.{what}` must be one of {list(allowed)}, got {name!r}." + suggest_keys(str(name), allowed)
        )
    return name, kwargs


def _trial_seed(seed: int, number: int) -> int:
    digest = hashlib.sha256(f"{seed}:{number}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


class _PerTrialSeedSampler(optuna.samplers.BaseSampler):
    """Delegates to a sampler re-created with a seed derived from ``(seed, trial.number)`` for each trial.

    A single worker reproduces the same study from the same seed; several workers sharing the study with the same
    seed still draw different candidates (each trial number exists once), instead of repeating each other.
    """

    def __init__(self, factory: Any, seed: int) -> None:
        self._factory = factory
        self._seed = seed
        self._inner: optuna.samplers.BaseSampler = factory(seed)

    def __getattr__(self, name: str) -> Any:
        inner = self.__dict__.get("_inner")
        if inner is None:  # during copy/unpickling, before __init__ ran
            raise AttributeError(name)
        return getattr(inner, name)

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self._inner = self._factory(_trial_seed(self._seed, trial.number))
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: optuna.Study, trial: optuna.trial.FrozenTrial, search_space: dict[str, Any]
    ) -> dict[str, Any]:
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(
        self, study: optuna.Study, trial: optuna.trial.FrozenTrial, param_name: str, param_distribution: Any
    ) -> Any:
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self,
        study: optuna.Study,
        trial: optuna.trial.FrozenTrial,
        state: optuna.trial.TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()


def _sqlite_connect(path: str) -> Any:
    """A SQLite connection in WAL mode with ``synchronous=NORMAL``: safe when a worker dies (the heartbeat case),
    and a write costs about a millisecond instead of an fsync (tens of ms on a busy disk), which trial bookkeeping
    would otherwise pay a dozen times per trial.
    """
    import sqlite3

    conn = sqlite3.connect(path, timeout=60, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def mask_url(text: str, url: str | None = None) -> str:
    """Hide the password of a database URL: in the URL itself, or wherever ``url``'s password appears in ``text``.

    Examples:
        >>> mask_url("postgresql://ann:s3cret@db:5432/study")
        'postgresql://ann:***@db:5432/study'
        >>> mask_url("could not connect with s3cret", "postgresql://ann:s3cret@db/x")
        'could not connect with ***'
        >>> mask_url("sqlite:///run/study.db")
        'sqlite:///run/study.db'
    """
    source = url if url is not None else text
    match = re.match(r"^[\w+.-]+://[^:/@]*:([^@]*)@", source)
    if not match or not match.group(1):
        return text
    return text.replace(match.group(1), "***")


def _postgres_driver(url: str) -> str:
    """``postgresql://`` means psycopg 3 to SQLAlchemy 2.1; use psycopg2 (a dependency) when psycopg is absent."""
    if not url.startswith("postgresql://"):
        return url
    import importlib.util

    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url[len("postgresql://") :]
    return url


@dataclass
class SearchConfig:
    """The validated ``search:`` section of a recipe.

    Args:
        space: The search space (see `SearchSpace`).
        objectives: One or more objectives, each ``{name: ..., direction: maximize|minimize}``
            (a plain string is a metric to maximize).
        sampler: ``random``, ``tpe``, ``nsga2``, ``cmaes`` or ``grid``, or ``{name: ..., <sampler kwargs>}``.
            Default: ``tpe`` for one objective, ``nsga2`` for several.
        pruner: Trial pruner for single-objective studies: ``none``, ``median``, ``successive_halving``,
            ``hyperband`` or ``{name: ..., <pruner kwargs>}``. It sees the first objective after every validation.
        n_trials: Trials to finish in the study (all workers and reruns together; a rerun resumes).
        timeout: Seconds after which this worker starts no new trial (``None``: no limit).
        seed: Seed of the sampler (each trial draws from ``(seed, trial number)``), ``None`` for a random one.
        storage: An optuna storage URL (``postgresql://user@host:port/db`` to share a study among workers);
            default ``sqlite:///<run_dir>/study.db``.
        study_name: Name of the study in the storage; default: the recipe's file name.
        run_dir: Where trials, tables, plots and best configs are written; default ``runs/search/<study_name>``.
        heartbeat_interval: Seconds between a running trial's heartbeats (RDB storages).
        grace_period: Seconds without heartbeat after which a trial counts as dead, is failed and re-queued.
        max_retry: How many times a dead worker's trial is re-queued.
        latency: Keyword arguments of `lightning_opt.measure.measure_latency` for the ``latency_ms`` objective.

    Raises:
        ValueError: For every invalid field, before any trial runs (unknown sampler or pruner, a pruner with several
            objectives, non-positive budget, ...).
    """

    space: SearchSpace
    objectives: list[Objective]
    sampler: str = "tpe"
    sampler_kwargs: dict[str, Any] = field(default_factory=dict)
    pruner: str = "none"
    pruner_kwargs: dict[str, Any] = field(default_factory=dict)
    n_trials: int = 20
    timeout: float | None = None
    seed: int | None = None
    storage: str | None = None
    study_name: str = "search"
    run_dir: Path = Path("runs/search/search")
    heartbeat_interval: int = 10
    grace_period: int = 30
    max_retry: int = 2
    latency: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, section: Any, default_name: str = "search") -> SearchConfig:
        """Validate the ``search:`` mapping of a recipe.

        Args:
            section: The mapping under ``search:``.
            default_name: Study name used when ``study_name`` is not given (the recipe's file stem).

        Raises:
            ValueError: Naming the field, the value and what is allowed.
        """
        if not isinstance(section, Mapping):
            raise ValueError(f"`search` must be a mapping, got {section!r}.")
        unknown = set(section) - _SECTION_KEYS
        if unknown:
            key = sorted(unknown)[0]
            raise ValueError(
                f"`search.{key}` is not a search option; allowed: {sorted(_SECTION_KEYS)}."
                + suggest_keys(key, _SECTION_KEYS)
            )
        if "space" not in section:
            raise ValueError("`search.space` is required: a mapping of config key -> spec.")
        space = SearchSpace(section["space"])

        objectives = _objectives(section.get("objectives", [{"name": "val/acc", "direction": "maximize"}]))
        names = [o.name for o in objectives]

        multi = len(objectives) > 1
        sampler, sampler_kwargs = _named(section.get("sampler", "nsga2" if multi else "tpe"), "sampler", SAMPLERS)
        pruner, pruner_kwargs = _named(section.get("pruner", "none"), "pruner", PRUNERS)
        if multi and pruner != "none":
            raise ValueError(
                f"`search.pruner` {pruner!r} needs a single objective, got {len(objectives)} ({names}). HINT: optuna"
                " cannot report intermediate values of multi-objective trials; set `pruner: none`."
            )
        if multi and sampler == "cmaes":
            raise ValueError(f"`search.sampler` 'cmaes' handles one objective, got {len(objectives)} ({names}).")
        if sampler == "grid":
            space.grid_space()  # raises on a space the grid cannot cover

        n_trials = section.get("n_trials", 20)
        if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
            raise ValueError(f"`search.n_trials` must be an int >= 1, got {n_trials!r}.")
        timeout = section.get("timeout")
        if timeout is not None and (not isinstance(timeout, int | float) or timeout <= 0):
            raise ValueError(f"`search.timeout` must be a positive number of seconds or null, got {timeout!r}.")
        seed = section.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"`search.seed` must be an int or null, got {seed!r}.")
        hb, grace = _heartbeat(section)
        max_retry = section.get("max_retry", 2)
        if isinstance(max_retry, bool) or not isinstance(max_retry, int) or max_retry < 0:
            raise ValueError(f"`search.max_retry` must be an int >= 0, got {max_retry!r}.")
        study_name = str(section.get("study_name") or default_name)
        run_dir = Path(section.get("run_dir") or Path("runs") / "search" / study_name)
        latency = section.get("latency") or {}
        if not isinstance(latency, Mapping):
            raise ValueError(f"`search.latency` must be a mapping of measure_latency arguments, got {latency!r}.")
        return cls(
            space=space,
            objectives=objectives,
            sampler=sampler,
            sampler_kwargs=sampler_kwargs,
            pruner=pruner,
            pruner_kwargs=pruner_kwargs,
            n_trials=n_trials,
            timeout=timeout,
            seed=seed,
            storage=section.get("storage"),
            study_name=study_name,
            run_dir=run_dir,
            heartbeat_interval=hb,
            grace_period=grace,
            max_retry=max_retry,
            latency=dict(latency),
        )

    # ------------------------------------------------------------------------------------------------- builders
    @property
    def directions(self) -> list[str]:
        """The optuna directions of the objectives."""
        return [o.direction for o in self.objectives]

    @property
    def storage_url(self) -> str:
        """The storage URL: given, or a SQLite file in the run directory."""
        return self.storage or f"sqlite:///{(self.run_dir / 'study.db').resolve()}"

    @property
    def masked_storage_url(self) -> str:
        """`storage_url` with its password replaced by ``***``, for messages and files."""
        return mask_url(self.storage_url)

    def make_sampler(self) -> optuna.samplers.BaseSampler:
        """Build the optuna sampler; with ``seed``, random/TPE/NSGA-II draw each trial from ``(seed, trial number)``.

        Raises:
            ValueError: If the sampler rejects its keyword arguments.
        """
        cls = getattr(optuna.samplers, SAMPLERS[self.sampler])
        kwargs = dict(self.sampler_kwargs)
        if self.sampler == "grid":
            kwargs["search_space"] = self.space.grid_space()

        def factory(seed: int | None) -> optuna.samplers.BaseSampler:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                try:
                    return cls(seed=seed, **kwargs)
                except TypeError as err:
                    raise ValueError(f"`search.sampler` {self.sampler!r}: {err}") from None

        if self.seed is None or self.sampler in ("grid", "cmaes"):
            # the grid order and the CMA-ES state are drawn once from the seed: a fresh draw per trial would reorder
            return factory(self.seed)
        return _PerTrialSeedSampler(factory, self.seed)

    def make_pruner(self) -> optuna.pruners.BasePruner:
        """Build the optuna trial pruner.

        Raises:
            ValueError: If the pruner rejects its keyword arguments.
        """
        name = PRUNERS[self.pruner]
        if name is None:
            return optuna.pruners.NopPruner()
        try:
            return getattr(optuna.pruners, name)(**self.pruner_kwargs)
        except TypeError as err:
            raise ValueError(f"`search.pruner` {self.pruner!r}: {err}") from None

    def make_storage(self) -> optuna.storages.BaseStorage:
        """Connect to the storage (RDB with heartbeats, so a dead worker's trial is failed and re-queued).

        Raises:
            ValueError: If the storage cannot be reached, naming the URL.
        """
        url = self.storage_url
        engine_kwargs: dict[str, Any] = {}
        if url.startswith("sqlite:///"):
            path = url[len("sqlite:///") :]
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            engine_kwargs["creator"] = lambda: _sqlite_connect(path)
        given, url = url, _postgres_driver(url)
        if url.startswith("postgresql"):
            engine_kwargs["connect_args"] = {"connect_timeout": int(os.environ.get("LIGHTNING_OPT_DB_TIMEOUT", "10"))}
            engine_kwargs["pool_pre_ping"] = True
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=self.heartbeat_interval,
                    grace_period=self.grace_period,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                        max_retry=self.max_retry
                    ),
                )
            except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.ArgumentError, ImportError) as err:
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise ValueError(
                    f"`search.storage` {mask_url(given)!r} cannot be reached: {mask_url(first, given)}. "
                    "HINT: check host, port, user and database,"
                    " e.g. postgresql://user:password@host:5432/dbname, or leave `storage` unset for a SQLite file."
                ) from None


def _objectives(raw: Any) -> list[Objective]:
    """``search.objectives``: a name, a mapping or a list of them, each name once."""
    if isinstance(raw, str | Mapping):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"`search.objectives` must be a non-empty list, got {raw!r}.")
    objectives = []
    for obj in raw:
        if isinstance(obj, str):
            obj = {"name": obj}
        if not isinstance(obj, Mapping) or "name" not in obj or set(obj) - {"name", "direction"}:
            raise ValueError(f"`search.objectives` items must be {{name: ..., direction: ...}}, got {obj!r}.")
        objectives.append(Objective(str(obj["name"]), str(obj.get("direction", "maximize"))))
    names = [o.name for o in objectives]
    if len(set(names)) != len(names):
        raise ValueError(f"`search.objectives` lists an objective twice: {names}.")
    return objectives


def _heartbeat(section: Mapping[str, Any]) -> tuple[int, int]:
    """``(heartbeat_interval, grace_period)`` in seconds: ints >= 1, the grace longer than the interval."""
    hb, grace = section.get("heartbeat_interval", 10), section.get("grace_period", 30)
    for name, value in (("heartbeat_interval", hb), ("grace_period", grace)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`search.{name}` must be an int >= 1 (seconds), got {value!r}.")
    if grace <= hb:
        raise ValueError(
            f"`search.grace_period` must be > `heartbeat_interval`, got {grace} <= {hb}. HINT: a live trial would"
            " be taken for dead between two heartbeats."
        )
    return hb, grace
