"""The search space: parameters over dotted config keys of a recipe, and how a trial samples them.

Pure logic (no Lightning): a recipe is a nested dict as loaded from YAML; a key is a dotted path
into it (``model.init_args.optimizer.init_args.lr``, list items by index: ``trainer.callbacks.0.init_args.final``).
"""

from __future__ import annotations

import copy
import difflib
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import optuna

__all__ = ["Param", "SearchSpace", "flatten_keys", "get_path", "set_path"]

_TYPES = ("int", "float", "categorical", "list")
_ITEM_TYPES = ("int", "float", "categorical")
_PARAM_KEYS = {"type", "low", "high", "step", "log", "choices", "when", "length", "item"}
_MISSING = object()


# --------------------------------------------------------------------------------------------------- config paths
def _split(key: str) -> list[str | int]:
    return [int(part) if part.lstrip("-").isdigit() else part for part in key.split(".")]


def flatten_keys(config: Any, prefix: str = "") -> Iterator[str]:
    """Yield every dotted key of a nested config (dicts and lists), inner nodes included.

    Args:
        config: A nested structure of dicts, lists and leaves.
        prefix: The key of ``config`` itself.

    Examples:
        >>> sorted(flatten_keys({"model": {"lr": 0.1}, "cbs": [{"a": 1}]}))
        ['cbs', 'cbs.0', 'cbs.0.a', 'model', 'model.lr']
    """
    items: Iterable[tuple[Any, Any]]
    if isinstance(config, Mapping):
        items = config.items()
    elif isinstance(config, list):
        items = enumerate(config)
    else:
        return
    for name, value in items:
        key = f"{prefix}.{name}" if prefix else str(name)
        yield key
        yield from flatten_keys(value, key)


def get_path(config: Any, key: str, default: Any = _MISSING) -> Any:
    """Return the value at dotted ``key`` of a nested config.

    Args:
        config: A nested structure of dicts and lists.
        key: A dotted path; list items are addressed by their index.
        default: Returned when the key is absent; without it a ``KeyError`` is raised.

    Raises:
        KeyError: If the key is absent and no default is given.

    Examples:
        >>> get_path({"a": [{"b": 3}]}, "a.0.b")
        3
    """
    node = config
    for part in _split(key):
        try:
            if isinstance(node, Mapping):
                node = node[str(part)] if str(part) in node else node[part]
            elif isinstance(node, list) and isinstance(part, int):
                node = node[part]
            else:
                raise KeyError(key)
        except (KeyError, IndexError):
            if default is _MISSING:
                raise KeyError(key) from None
            return default
    return node


def set_path(config: dict[str, Any], key: str, value: Any) -> None:
    """Set the value at dotted ``key`` in place, creating missing mappings on the way.

    A class given in its short form (``optimizer: torch.optim.Adam``) is expanded to
    ``{class_path: ..., init_args: {}}`` when a key below it is set.

    Args:
        config: The nested config to edit.
        key: A dotted path; list items are addressed by their index.
        value: The value to set.

    Raises:
        KeyError: If a list index is out of range or a leaf value sits where a mapping is needed.

    Examples:
        >>> cfg = {"model": {"optimizer": "torch.optim.Adam"}}
        >>> set_path(cfg, "model.optimizer.init_args.lr", 0.01)
        >>> cfg
        {'model': {'optimizer': {'class_path': 'torch.optim.Adam', 'init_args': {'lr': 0.01}}}}
    """
    parts = _split(key)
    node: Any = config
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            if not isinstance(part, int) or not -len(node) <= part < len(node):
                raise KeyError(f"`{key}`: index {part} is out of range for a list of {len(node)} items.")
            child = node[part]
        else:
            child = node.get(str(part), _MISSING)
            if child is _MISSING or child is None:
                child = {}
                node[str(part)] = child
        if isinstance(child, str) and nxt in ("init_args", "class_path"):
            child = {"class_path": child, "init_args": {}}
            node[part if isinstance(node, list) else str(part)] = child
        if not isinstance(child, dict | list):
            raise KeyError(f"`{key}`: `{'.'.join(map(str, parts[: i + 1]))}` holds {child!r}, not a mapping.")
        node = child
    last = parts[-1]
    if isinstance(node, list):
        if not isinstance(last, int) or not -len(node) <= last < len(node):
            raise KeyError(f"`{key}`: index {last} is out of range for a list of {len(node)} items.")
        node[last] = value
    else:
        node[str(last)] = value


def suggest_keys(key: str, known: Iterable[str], n: int = 3) -> str:
    """Return a ``HINT`` naming the known keys closest to ``key`` (empty when none is close)."""
    known = list(known)
    close = difflib.get_close_matches(key, known, n=n, cutoff=0.6)
    if not close:
        # compare the last parts too: `lr` vs `model.init_args.optimizer.init_args.lr`
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in known if k.rsplit(".", 1)[-1] == leaf][:n]
    return f" HINT: did you mean {', '.join(f'`{c}`' for c in close)}?" if close else ""


# --------------------------------------------------------------------------------------------------- parameters
def _label(value: Any) -> Any:
    """A categorical choice as optuna stores it: scalars as they are, lists and mappings as JSON strings."""
    return value if value is None or isinstance(value, str | int | float | bool) else json.dumps(value)


def _implied_type(spec: Mapping[str, Any]) -> str:
    """The ``type`` a parameter without one has: list, categorical, int (int bounds, no log) or float."""
    if "item" in spec or "length" in spec:
        return "list"
    if "choices" in spec:
        return "categorical"
    if isinstance(spec.get("low"), int) and isinstance(spec.get("high"), int) and not spec.get("log"):
        return "int"
    return "float"


@dataclass
class Param:
    """One searched config key.

    Args:
        key: The dotted config key this parameter sets.
        type: ``"int"``, ``"float"``, ``"categorical"`` or ``"list"`` (inferred when omitted: ``choices`` makes a
            categorical, integer bounds an int, otherwise a float).
        low: Lower bound (int/float), inclusive.
        high: Upper bound (int/float), inclusive.
        step: Discretization step (int/float); not with ``log``.
        log: Sample on a log scale (int/float); needs ``low > 0``.
        choices: The values of a categorical; any YAML values (lists and mappings are stored as JSON strings).
        when: Condition: a mapping from earlier keys to a value or a list of values; the parameter is sampled only
            when all hold, otherwise the recipe's value stays.
        length: For ``list``: a fixed length, ``[low, high]`` (sampled as ``<key>.length``), or the key of an
            earlier ``list`` parameter whose length it copies.
        item: For ``list``: the spec of each item (int, float or categorical), sampled as ``<key>.<index>``.

    Raises:
        ValueError: On an unknown type, ``low > high``, ``log`` with ``low <= 0`` or with ``step``, empty ``choices``,
            a bad ``length`` or an unknown field.

    Examples:
        >>> Param.from_dict("model.init_args.lr", {"low": 1e-4, "high": 1e-1, "log": True}).type
        'float'
    """

    key: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    log: bool = False
    choices: list[Any] | None = None
    when: dict[str, Any] = field(default_factory=dict)
    length: int | list[int] | str | None = None
    item: Param | None = None

    @classmethod
    def from_dict(cls, key: str, spec: Any) -> Param:
        """Build and validate a parameter from its YAML form (a mapping, or a plain list of choices)."""
        where = f"search.space.`{key}`"
        if isinstance(spec, list):
            spec = {"choices": spec}
        if not isinstance(spec, Mapping):
            raise ValueError(
                f"{where} must be a mapping (type/low/high/step/log/choices/when/length/item) or a list of choices,"
                f" got {spec!r}."
            )
        unknown = set(spec) - _PARAM_KEYS
        if unknown:
            raise ValueError(
                f"{where} has unknown field(s) {sorted(unknown)}; allowed: {sorted(_PARAM_KEYS)}."
                + suggest_keys(sorted(unknown)[0], _PARAM_KEYS)
            )
        kind = spec.get("type") or _implied_type(spec)
        if kind not in _TYPES:
            raise ValueError(f"{where}: `type` must be one of {list(_TYPES)}, got {kind!r}.")
        when = spec.get("when") or {}
        if not isinstance(when, Mapping):
            raise ValueError(f"{where}: `when` must map earlier keys to values, got {when!r}.")
        param = cls(
            key=key,
            type=kind,
            low=spec.get("low"),
            high=spec.get("high"),
            step=spec.get("step"),
            log=bool(spec.get("log", False)),
            choices=spec.get("choices"),
            when=dict(when),
            length=spec.get("length"),
        )
        if kind == "list":
            if "item" not in spec:
                raise ValueError(f"{where}: a `list` parameter needs `item` (the spec of each item).")
            param.item = cls.from_dict(f"{key}.<i>", spec["item"])
            if param.item.type not in _ITEM_TYPES or param.item.when:
                raise ValueError(f"{where}: `item` must be an int, float or categorical spec without `when`.")
            length = param.length
            if isinstance(length, list):
                if len(length) != 2 or not all(isinstance(v, int) and v >= 1 for v in length):
                    raise ValueError(f"{where}: `length` as a range must be [low, high] of ints >= 1, got {length}.")
                if length[0] > length[1]:
                    raise ValueError(f"{where}: `length` low must be <= high, got {length}.")
            elif not (isinstance(length, int) and length >= 1) and not isinstance(length, str):
                raise ValueError(
                    f"{where}: `length` must be an int >= 1, [low, high], or the key of an earlier list parameter,"
                    f" got {length!r}."
                )
        else:
            param._validate_scalar(where)
        return param

    def _validate_scalar(self, where: str) -> None:
        if self.type == "categorical":
            if not isinstance(self.choices, list) or not self.choices:
                raise ValueError(f"{where}: `choices` must be a non-empty list, got {self.choices!r}.")
            labels = [_label(c) for c in self.choices]
            if len(set(labels)) != len(labels):
                raise ValueError(f"{where}: `choices` has duplicates: {self.choices}.")
            return
        for name in ("low", "high"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{where}: `{name}` must be a number, got {value!r}.")
        assert self.low is not None
        assert self.high is not None
        if self.low > self.high:
            raise ValueError(
                f"{where}: `low` must be <= `high`, got low={self.low} > high={self.high}. HINT: swap them."
            )
        if self.type == "int" and not (float(self.low).is_integer() and float(self.high).is_integer()):
            raise ValueError(f"{where}: an int parameter needs integer bounds, got [{self.low}, {self.high}].")
        if self.log and self.low <= 0:
            raise ValueError(f"{where}: `log: true` needs `low` > 0, got {self.low}.")
        if self.step is not None:
            if self.log:
                raise ValueError(f"{where}: `step` and `log` cannot be used together.")
            if not isinstance(self.step, int | float) or self.step <= 0:
                raise ValueError(f"{where}: `step` must be > 0, got {self.step!r}.")

    # ----------------------------------------------------------------------------------------------- sampling
    def grid(self) -> list[Any]:
        """The finite values of a scalar parameter, for the grid sampler.

        Raises:
            ValueError: For a continuous float without ``step``.
        """
        if self.type == "categorical":
            return [_label(c) for c in self.choices or []]
        if self.type == "int":
            step = int(self.step or 1)
            return list(range(int(self.low), int(self.high) + 1, step))  # type: ignore[arg-type]
        if self.step is None:
            raise ValueError(
                f"search.space.`{self.key}`: the grid sampler needs finite values; give this float a `step` or"
                " `choices`."
            )
        n = math.floor((self.high - self.low) / self.step + 1e-9)  # type: ignore[operator]
        return [round(self.low + i * self.step, 12) for i in range(n + 1)]  # type: ignore[operator]

    def decode(self, stored: Any) -> Any:
        """Map the value optuna stored back to the config value (JSON labels back to lists/dicts)."""
        if self.type == "categorical":
            assert self.choices is not None
            for choice in self.choices:
                if _label(choice) == stored:
                    return copy.deepcopy(choice)
            raise ValueError(f"{stored!r} is not a choice of `{self.key}`.")
        if self.type == "int":
            return int(stored)
        if self.step is not None:  # 0.1 * 3 is 0.30000000000000004: keep the grid value a YAML reader expects
            return round(float(stored), 12)
        return float(stored)

    def suggest(self, trial: optuna.Trial, name: str) -> Any:
        """Sample a scalar parameter under ``name`` and return its config value."""
        if self.type == "categorical":
            assert self.choices is not None
            return self.decode(trial.suggest_categorical(name, [_label(c) for c in self.choices]))
        if self.type == "int":
            step = int(self.step or 1)
            return trial.suggest_int(name, int(self.low), int(self.high), step=step, log=self.log)  # type: ignore[arg-type]
        value = trial.suggest_float(name, float(self.low), float(self.high), step=self.step, log=self.log)  # type: ignore[arg-type]
        return self.decode(value)


class SearchSpace:
    """An ordered set of `Param` over dotted keys of a recipe.

    Args:
        space: Mapping from dotted config key to parameter spec (see `Param`), in sampling order. A key that
            starts with ``_`` is a search-only choice: it is sampled and recorded (a gate for ``when``) but not
            written into the config.

    Raises:
        ValueError: If a parameter spec is invalid, or a ``when`` / ``length`` refers to a key that is not an
            earlier parameter.

    Examples:
        >>> space = SearchSpace({"model.lr": {"low": 1e-3, "high": 1e-1, "log": True}, "model.depth": [1, 2]})
        >>> [p.key for p in space.params]
        ['model.lr', 'model.depth']
    """

    def __init__(self, space: Mapping[str, Any]) -> None:
        if not isinstance(space, Mapping) or not space:
            raise ValueError(f"`search.space` must be a non-empty mapping of config key -> spec, got {space!r}.")
        self.params: list[Param] = []
        seen: dict[str, Param] = {}
        for key, spec in space.items():
            param = Param.from_dict(str(key), spec)
            for dep in param.when:
                if dep not in seen:
                    raise ValueError(
                        f"search.space.`{key}`: `when` refers to `{dep}`, which is not an earlier parameter."
                        + suggest_keys(dep, seen)
                    )
            if isinstance(param.length, str):
                ref = seen.get(param.length)
                if ref is None or ref.type != "list":
                    raise ValueError(
                        f"search.space.`{key}`: `length` refers to `{param.length}`, which is not an earlier list"
                        " parameter." + suggest_keys(param.length, [k for k, p in seen.items() if p.type == "list"])
                    )
            seen[param.key] = param
            self.params.append(param)

    @property
    def keys(self) -> list[str]:
        """The searched config keys, in order."""
        return [p.key for p in self.params]

    def check_keys(self, known: Iterable[str]) -> None:
        """Check that every searched key exists in the recipe (or its parsed defaults).

        Args:
            known: All dotted keys of the recipe and of its parsed config.

        Raises:
            ValueError: Naming the first unknown key and the closest known ones.
        """
        known = set(known)
        for key in self.keys:
            if key not in known and not key.startswith("_"):
                raise ValueError(
                    f"search.space: `{key}` is not a key of the recipe (nor of its parsed config)."
                    + suggest_keys(key, sorted(known))
                )

    def sample(self, trial: optuna.Trial) -> dict[str, Any]:
        """Sample every active parameter of ``trial``; return ``{config key: value}`` of those sampled."""
        values: dict[str, Any] = {}
        for param in self.params:
            if not self._active(param, values):
                continue
            if param.type != "list":
                values[param.key] = param.suggest(trial, param.key)
                continue
            assert param.item is not None
            if isinstance(param.length, str):
                n = len(values[param.length]) if param.length in values else 0
                if n == 0:
                    continue
            elif isinstance(param.length, list):
                n = int(trial.suggest_int(f"{param.key}.length", param.length[0], param.length[1]))
            else:
                n = int(param.length)  # type: ignore[arg-type]
            values[param.key] = [param.item.suggest(trial, f"{param.key}.{i}") for i in range(n)]
        return values

    def grid_space(self) -> dict[str, list[Any]]:
        """The finite search space for optuna's ``GridSampler``.

        Raises:
            ValueError: If a parameter is continuous, a list, or conditional (a grid must be a full product).
        """
        grid: dict[str, list[Any]] = {}
        for param in self.params:
            if param.type == "list" or param.when:
                raise ValueError(
                    f"search.space.`{param.key}`: the grid sampler needs a plain product space; list and conditional"
                    " (`when`) parameters are not supported by `sampler: grid`. HINT: use categorical choices of"
                    " whole lists instead."
                )
            grid[param.key] = param.grid()
        return grid

    def decode_params(self, stored: Mapping[str, Any]) -> dict[str, Any]:
        """Rebuild ``{config key: value}`` from a finished trial's stored params."""
        values: dict[str, Any] = {}
        for param in self.params:
            if param.type != "list":
                if param.key in stored:
                    values[param.key] = param.decode(stored[param.key])
                continue
            assert param.item is not None
            items = []
            i = 0
            while f"{param.key}.{i}" in stored:
                items.append(param.item.decode(stored[f"{param.key}.{i}"]))
                i += 1
            if items:
                values[param.key] = items
        return values

    @staticmethod
    def _active(param: Param, values: Mapping[str, Any]) -> bool:
        for dep, expected in param.when.items():
            if dep not in values:
                return False
            allowed = expected if isinstance(expected, list) and not isinstance(values[dep], list) else [expected]
            if values[dep] not in allowed:
                return False
        return True

    @staticmethod
    def apply(recipe: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
        """Return a deep copy of ``recipe`` with ``values`` set at their keys (``_``-keys are search-only)."""
        config = copy.deepcopy(dict(recipe))
        for key, value in values.items():
            if not key.startswith("_"):
                set_path(config, key, value)
        return config
