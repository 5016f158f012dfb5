"""The ``Pruning`` callback: scheduled sparsity during training, exact resume, DDP, logging, channel removal."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_opt import inputs
from lightning_opt._utils import find_callback, local_log_dir
from lightning_opt.measure import measure_model
from lightning_opt.pruning._channel import (
    STRUCTURE_KEY,
    ChannelGroups,
    UnsupportedModelError,
    output_error,
    pruned_structure,
    rehearse_removal,
    save_pruned,
)
from lightning_opt.pruning._criteria import Criterion, resolve_criterion
from lightning_opt.pruning._masks import (
    DEFAULT_MODULE_TYPES,
    channel_keep,
    coverage,
    mask_sparsity,
    nm_masks,
    select_modules,
    select_weights,
    unstructured_masks,
)
from lightning_opt.pruning._remask import Remasker
from lightning_opt.reporting import CompressionReport
from lightning_opt.schedules import Schedule

__all__ = ["Pruning"]

_GRANULARITIES = ("unstructured", "channel", "nm")
_SCOPES = ("global", "layer")
_UNREMOVABLE = ("error", "skip")


def _as_list(value: str | list[str] | None) -> list[str] | None:
    if value is None:
        return None
    return [value] if isinstance(value, str) else list(value)


class Pruning(Callback):
    """Prune a LightningModule during training along a schedule, in Trainer steps, with exact resume.

    Every schedule update (``schedule.is_update_step``) scores the selected weights with ``criterion``, and the
    lowest-scoring fraction ``schedule.value(step)`` is masked: element by element (``"unstructured"``), as whole
    output channels with everything coupled to them (``"channel"``, Torch-Pruning's dependency graph), or ``n`` of
    every ``m`` consecutive input weights (``"nm"``, e.g. 2:4). Between updates the masks are re-applied in place
    after every optimizer step (``optimizer.register_step_post_hook``), so pruned weights stay exactly zero under
    momentum, Adam and AMP while the forward pass runs on plain dense weights. Masks only shrink.

    Masks live in the callback's ``state_dict`` (a checkpoint resumes with the same masks and schedule position)
    and never in the model: the model's ``state_dict`` has its usual keys, with zeros, and loads with
    ``load_from_checkpoint``. At the end of fit the masks are applied a last time and the hooks removed; with
    ``remove_channels=True`` the pruned channels are cut out physically, leaving a smaller dense model.

    Args:
        schedule: target sparsity per optimizer step (e.g. ``PolynomialSchedule(final=0.9, start=0.1, end=0.7)``).
            For ``"unstructured"`` a fraction of weights, for ``"channel"`` a fraction of output channels, for
            ``"nm"`` it must end at ``(m - n) / m`` (it can ramp: zeros per group = ``floor(value * m)``).
        granularity: ``"unstructured"``, ``"channel"`` or ``"nm"``.
        criterion: ``"magnitude"``, ``"random"``, ``"taylor"`` or a `Criterion` instance (``class_path``).
        scope: ``"global"`` (one threshold across layers) or ``"layer"`` (each layer reaches the target).
            N:M is always per group of ``m``.
        module_types: which modules to prune, ``torch.nn`` class names or class paths (default Conv1d/2d/3d, Linear,
            ``MultiheadAttention``'s input projections and Hugging Face's ``Conv1D``). A weight shared by several
            modules (tied embeddings) is pruned once. Parameters left out (biases, norms, embeddings...) are listed in
            one warning at setup with their share of the model's parameters.
        include: regexes on module names (``re.search``); only matching modules are pruned.
        exclude: regexes on module names; matching modules are not pruned.
        overrides: ``{regex: final sparsity}`` for matching modules; they follow the schedule's shape to their own
            final value and are ranked on their own.
        n: weights kept per group for ``"nm"``.
        m: group size for ``"nm"``.
        remove_channels: with ``"channel"``, remove the pruned channels at the end of fit (Torch-Pruning) and add
            before/after rows to the ``CompressionReport``; also writes ``pruned_model.pt`` (see
            `load_pruned`) next to the logs.
        example_input_shape: shape of a float input (``torch.randn``) for tracing channel groups when the
            LightningModule has no ``example_input_array`` (e.g. ``[1, 3, 32, 32]``); without either, the inputs of
            the first training batch are used (any form: tensor, tuple, dict; real values and dtypes).
        log_histograms: log weight histograms of pruned layers at each update (TensorBoard).
        remask: how the masks are re-applied after every optimizer step (bit-identical results):
            ``"foreach"`` multiplies by float copies of the masks (one ``torch._foreach_mul_``; the copies take as
            much memory as the pruned weights); ``"compiled"`` multiplies by the bool masks themselves with a
            ``torch.compile``d kernel (no copies, ~0.8x the time on CPU; compiles once per process, needs a C++
            compiler on CPU, falls back to ``"foreach"`` with a warning); ``"auto"`` (default) uses ``"compiled"``
            on CPU from 4M masked weights, else ``"foreach"``.
        on_unremovable: with ``remove_channels=True``, what to do with channel groups whose removal fails or changes
            the outputs. At setup, before step 1, the removal is rehearsed on a copy of the model (a quarter of each
            group's channels masked, then removed, outputs compared with the masked model's on the example input);
            ``"error"`` (default) refuses the run with a message naming the layers and the ``exclude`` regex to add,
            ``"skip"`` leaves those groups unpruned and lists them in a warning.
        allow_output_change: at fit end the removed model's outputs are compared with the masked model's on the
            example input; a difference beyond float tolerance (``1e-4`` of the output scale) raises unless this is
            True (then it is only a warning).

    Raises:
        TypeError: if ``schedule`` is not a `Schedule`.
        ValueError: if ``schedule.final`` or ``schedule.initial`` is outside [0, 1) or ``initial > final``;
            ``granularity``/``scope``/``remask`` is unknown; ``criterion`` is unknown; ``n``/``m`` are invalid
            (``n >= m``) or the schedule does not end at ``(m - n) / m``; an ``overrides`` value is outside [0, 1)
            or used with N:M; a regex does not compile; ``remove_channels`` without ``granularity="channel"``; at
            setup: an ``include``/``overrides`` regex matches no prunable module (the message lists them), the
            schedule's start resolves after its end, channel pruning has no example input, Torch-Pruning cannot
            trace the model, or (``on_unremovable="error"``) the removal rehearsal finds groups that cannot be
            removed; ``on_unremovable`` is unknown.
        RuntimeError: at fit end, if the removed model's outputs differ from the masked model's beyond tolerance
            and ``allow_output_change`` is False (``pruned_model.pt`` is not written).

    Examples:
        >>> from lightning_opt.schedules import PolynomialSchedule
        >>> cb = Pruning(schedule=PolynomialSchedule(final=0.9, start=0.1, end=0.7, frequency=10))
        >>> cb.granularity, cb.scope
        ('unstructured', 'global')
    """

    def __init__(
        self,
        schedule: Schedule,
        granularity: Literal["unstructured", "channel", "nm"] = "unstructured",
        criterion: Criterion | str = "magnitude",
        scope: Literal["global", "layer"] = "global",
        module_types: list[str] | None = None,
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        overrides: dict[str, float] | None = None,
        n: int = 2,
        m: int = 4,
        remove_channels: bool = False,
        example_input_shape: list[int] | None = None,
        log_histograms: bool = True,
        remask: Literal["auto", "foreach", "compiled"] = "auto",
        on_unremovable: Literal["error", "skip"] = "error",
        allow_output_change: bool = False,
    ) -> None:
        _check_schedule(schedule)
        if granularity not in _GRANULARITIES:
            raise ValueError(f"`granularity` must be one of {list(_GRANULARITIES)}, got {granularity!r}.")
        if scope not in _SCOPES:
            raise ValueError(f"`scope` must be one of {list(_SCOPES)}, got {scope!r}.")
        self.criterion = resolve_criterion(criterion)
        if granularity == "nm":
            _check_nm(n, m, schedule, overrides)
        if on_unremovable not in _UNREMOVABLE:
            raise ValueError(
                f"`on_unremovable` must be one of {list(_UNREMOVABLE)}, got {on_unremovable!r}. HINT: 'skip' prunes "
                "the other groups and leaves the unremovable ones dense."
            )
        if remove_channels and granularity != "channel":
            raise ValueError(
                f"`remove_channels=True` needs granularity='channel', got granularity={granularity!r}. "
                "HINT: unstructured and N:M zeros keep the tensor shapes; only whole channels can be removed."
            )
        self.include = _as_list(include)
        self.exclude = _as_list(exclude)
        _check_patterns(self.include, self.exclude, overrides)
        if example_input_shape is not None and (
            not example_input_shape or any(not isinstance(d, int) or d < 1 for d in example_input_shape)
        ):
            raise ValueError(f"`example_input_shape` must be a list of positive ints, got {example_input_shape!r}.")

        self.schedule = schedule
        self.granularity = granularity
        self.scope = scope
        self.module_types = list(module_types) if module_types is not None else list(DEFAULT_MODULE_TYPES)
        self.overrides = dict(overrides or {})
        self.n = n
        self.m = m
        self.remove_channels = remove_channels
        self.example_input_shape = example_input_shape
        self.log_histograms = log_histograms
        self.remask = remask
        self._remasker = Remasker(remask)  # validates `remask`
        self.on_unremovable = on_unremovable
        self.allow_output_change = allow_output_change

        # state
        self._masks: dict[str, Tensor] = {}  # bool, True = kept (params for unstructured/nm, all coupled for channel)
        self._keeps: dict[str, Tensor] = {}  # channel granularity: bool keep per channel of each group
        self._last_update: int = -1
        self._target: float = 0.0
        self._total_steps: float | None = None
        self._removed = False
        self.pruned_model_path: str | None = None  # set when remove_channels wrote pruned_model.pt
        self.removal_figures: dict[str, Any] = {}  # before/after figures of the channel removal
        # runtime
        self._modules: dict[str, nn.Module] = {}
        self._weights: list[str] = []  # names of the pruned weights (roots for channel)
        self._selected: dict[str, tuple[str, int]] = {}  # weight name -> (module name, input axis)
        self._root_weights: dict[str, str] = {}  # channel group -> its root weight's parameter name
        self._example: Any = None  # the example input (CPU), for tracing and the removal check
        self.unremovable: dict[str, str] = {}  # channel groups the rehearsal left out, with the reason
        self._groups: ChannelGroups | None = None
        self._params: dict[str, nn.Parameter] = {}
        self._handles: list[Any] = []
        self._hooked: list[int] = []
        self._pending: dict[str, Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        # runtime references (dependency graph, hook handles, parameters) are rebuilt in setup/on_fit_start; leaving
        # them out keeps the callback picklable (ddp_spawn) and deep-copyable (anything copying the trainer)
        state = dict(self.__dict__)
        state.update(_groups=None, _handles=[], _hooked=[], _params={}, _remasker=Remasker(self.remask), _modules={})
        return state

    # ------------------------------------------------------------------ public helpers
    @property
    def masks(self) -> dict[str, Tensor]:
        """``{parameter name: bool mask}`` (True = kept) of every masked parameter, on the parameters' devices."""
        return dict(self._masks)

    @property
    def target(self) -> float:
        """The schedule's target sparsity at the last update."""
        return self._target

    @staticmethod
    def find(trainer: pl.Trainer) -> Pruning | None:
        """The first ``Pruning`` callback of ``trainer``, or ``None`` (for other callbacks that compose with it).

        Args:
            trainer: the Trainer.

        Returns:
            The callback or ``None``.
        """
        return find_callback(trainer, Pruning)

    def rebind(self, module: nn.Module, optimizers: list[torch.optim.Optimizer] | None = None) -> list[str]:
        """Point the masks at ``module``'s parameters (by name) and re-hook ``optimizers``, then re-apply them.

        Call it after replacing the model or its parameters mid-training (e.g. a QAT callback swapping in an
        exported graph module with the same parameter names), so that pruned weights stay zero.

        Args:
            module: the (new) LightningModule.
            optimizers: optimizers to hook (default: the ones already hooked are kept).

        Returns:
            Mask names that found no parameter of the same name and shape (those are no longer enforced).
        """
        params = dict(module.named_parameters())
        missing = [n for n, mk in self._masks.items() if n not in params or params[n].shape != mk.shape]
        self._params = {n: params[n] for n in self._masks if n not in missing}
        for n in self._params:
            self._masks[n] = self._masks[n].to(self._params[n].device)
        self._refresh_hot()
        if optimizers is not None:
            self._hook(optimizers)
        self.apply()
        if missing:
            rank_zero_warn(f"Pruning.rebind: no parameter of the same name and shape for masks {missing}.")
        return missing

    def update_steps(self, total_steps: int | float) -> list[int]:
        """The optimizer steps at which this callback updates the masks in a run of ``total_steps`` steps.

        A step ``t`` here means: the update runs just before the ``t``-th optimizer step (``trainer.global_step ==
        t - 1``, in ``on_before_optimizer_step``), so the new masks are in force from ``global_step == t`` on. An
        update the schedule places at step 0 runs before the first optimizer step (``t = 1``); updates the schedule
        places after ``total_steps`` never run. These are the steps of ``schedule.update_steps`` as the callback
        reaches them (the planner's timeline reads them from here).

        Args:
            total_steps: the run's optimizer steps (``trainer.estimated_stepping_batches``).

        Returns:
            The sorted steps, each once.

        Raises:
            ValueError: if the schedule cannot be resolved for ``total_steps`` (see ``Schedule.resolve``).

        Examples:
            >>> from lightning_opt.schedules import PolynomialSchedule
            >>> Pruning(schedule=PolynomialSchedule(final=0.9, start=0, end=30, frequency=10)).update_steps(100)
            [1, 10, 20, 30]
        """
        steps: list[int] = []
        for due in self.schedule.update_steps(total_steps):
            at = max(due, 1)  # `on_before_optimizer_step` asks for the update due at `global_step + 1` >= 1
            if at <= total_steps and (not steps or at > steps[-1]):
                steps.append(at)
        return steps

    @torch.no_grad()
    def apply(self) -> None:
        """Zero the pruned elements in place (what runs after every optimizer step)."""
        self._remasker.apply()

    # ------------------------------------------------------------------ override points
    def select_modules(self, pl_module: pl.LightningModule) -> dict[str, nn.Module]:
        """Modules to prune (override to customise beyond ``module_types``/``include``/``exclude``).

        Args:
            pl_module: the LightningModule.

        Returns:
            ``{module name: module}``.
        """
        return select_modules(pl_module, self.module_types, self.include, self.exclude)

    # ------------------------------------------------------------------ setup
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(granularity=self.granularity, include=self.include, exclude=self.exclude)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._modules = self.select_modules(pl_module)
        for pattern in self.overrides:
            if not any(re.search(pattern, name) for name in self._modules):
                raise ValueError(
                    f"`overrides` pattern {pattern!r} matches no pruned module. Pruned modules: {list(self._modules)}."
                )
        self._selected = select_weights(pl_module, self._modules)
        if self.granularity == "nm":
            params = dict(pl_module.named_parameters())
            bad_w = [n for n, (_, axis) in self._selected.items() if params[n].shape[axis] % self.m != 0]
            bad = sorted({self._selected[n][0] for n in bad_w})
            if bad:
                rank_zero_warn(
                    f"Pruning: {self.n}:{self.m} sparsity skips {bad}: their input dimension is not divisible by "
                    f"m={self.m}. Add them to `exclude` to silence this."
                )
                self._selected = {n: v for n, v in self._selected.items() if n not in bad_w}
                self._modules = {k: v for k, v in self._modules.items() if k not in bad}
            if not self._selected:
                raise ValueError(f"No module has an input dimension divisible by m={self.m}; nothing to prune.")
        start_method = getattr(trainer.strategy, "_start_method", None)
        if self.remove_channels and start_method in ("spawn", "fork", "forkserver"):
            raise ValueError(
                f"`remove_channels=True` cannot be used with strategy 'ddp_{start_method}': the main process reloads "
                "the full-size weights from the workers after fit. HINT: use strategy='ddp' (one process per device, "
                "launched as subprocesses)."
            )
        if self.granularity == "channel":
            self._example = self._example_input(trainer, pl_module)
            self._setup_channel_groups(pl_module)
            canonical = {id(p): n for n, p in pl_module.named_parameters()}
            assert self._groups is not None
            self._weights = list(self._groups.groups)
            self._root_weights = {
                g: canonical[id(w)] for g in self._weights if (w := self._groups.root_weight(g)) is not None
            }
            covered = self._groups.param_names
        else:
            self._groups = None
            self._weights = list(self._selected)
            covered = self._weights
        self._warn_coverage(pl_module, covered)
        total = trainer.estimated_stepping_batches
        _, end = self.schedule.resolve(total)  # raises on unresolvable fractions / start after end
        if end > total:
            rank_zero_warn(
                f"Pruning: the schedule ends at step {end} but the run has {total} optimizer steps; "
                f"the final sparsity {self.schedule.final} will not be reached."
            )

    def _setup_channel_groups(self, pl_module: pl.LightningModule) -> None:
        """Trace the channel groups; with ``remove_channels``, rehearse the removal first and drop or refuse groups."""
        roots = dict(self._modules)
        self.unremovable = {}
        try:
            if self.remove_channels:
                self.unremovable = rehearse_removal(pl_module, roots, self._example)
        except UnsupportedModelError as err:
            raise ValueError(f"Pruning(granularity='channel'): {err}") from err
        if self.unremovable:
            lines = "\n".join(f"  {name}: {why}" for name, why in self.unremovable.items())
            regex = "^(" + "|".join(re.escape(n) for n in self.unremovable) + ")$"
            if self.on_unremovable == "error":
                raise ValueError(
                    f"Pruning: {len(self.unremovable)} channel group(s) cannot be removed at the end of fit without "
                    f"changing the model (rehearsed on a copy at setup):\n{lines}\nHINT: add `exclude: ['{regex}']` "
                    "to prune the rest, or `on_unremovable: skip` to leave these groups dense automatically."
                )
            rank_zero_warn(
                f"Pruning: on_unremovable='skip' leaves {len(self.unremovable)} channel group(s) unpruned because "
                f"their removal fails or changes the outputs:\n{lines}\n(`exclude: ['{regex}']` says so explicitly.)"
            )
            roots = {n: m for n, m in roots.items() if n not in self.unremovable}
            if not roots:
                raise ValueError("Pruning: no channel group is left that can be removed; nothing to prune.")
        try:
            self._groups = ChannelGroups(pl_module, roots, self._example)
        except UnsupportedModelError as err:
            raise ValueError(f"Pruning(granularity='channel'): {err}") from err
        if self._groups.excluded:
            rank_zero_warn(
                "Pruning: channel groups kept unpruned because removing them cannot keep the outputs equal:\n"
                + "\n".join(f"  {n}: {why}" for n, why in self._groups.excluded.items())
            )
        if self.unremovable:  # groups rooted elsewhere may also hold channels of a refused layer: leave them out too
            self._groups.groups = {n: g for n, g in self._groups.groups.items() if n not in self.unremovable}

    def _warn_coverage(self, pl_module: pl.LightningModule, covered: list[str]) -> None:
        share, left = coverage(pl_module, covered)
        if not left:
            return
        by_type: dict[str, list[tuple[str, float]]] = {}
        for name, kind, frac in left:
            by_type.setdefault(kind, []).append((name, frac))
        parts = []
        for kind, rows in sorted(by_type.items(), key=lambda kv: -sum(f for _, f in kv[1])):
            names = ", ".join(f"{n} ({f:.1%})" for n, f in rows[:6])
            names += f", +{len(rows) - 6} more" if len(rows) > 6 else ""
            parts.append(f"{kind} {sum(f for _, f in rows):.1%}: {names}")
        rank_zero_warn(
            f"Pruning: pruning covers {share:.1%} of parameters; not covered: " + "; ".join(parts) + ". HINT: "
            "biases and norms are usually left dense; add module types to `module_types` (class paths) to cover more."
        )

    def _example_input(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        if self.example_input_shape is not None and not inputs.is_example(
            getattr(pl_module, "example_input_array", None)
        ):
            return torch.randn(*self.example_input_shape)
        example = inputs.module_example(pl_module, _train_batches(trainer, pl_module))
        if example is None:
            raise ValueError(
                "granularity='channel' traces the model and needs an example input: set `example_input_array` on "
                "the LightningModule (a tensor, a tuple or a dict), give the Trainer training data, or pass "
                "`example_input_shape` (e.g. [1, 3, 32, 32]) for a float image input."
            )
        return inputs.first_rows(example, 2)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._total_steps = float(trainer.estimated_stepping_batches)
        params = dict(pl_module.named_parameters())
        if self._pending is not None:
            state, self._pending = self._pending, None
            unknown = [n for n in state["masks"] if n not in params or params[n].shape != state["masks"][n].shape]
            if unknown:
                raise ValueError(
                    f"The checkpoint's pruning masks do not fit this model: {unknown}. "
                    "HINT: resume with the same model and Pruning settings."
                )
            if state.get("total_steps") not in (None, self._total_steps):
                rank_zero_warn(
                    f"Pruning: resuming a run of {state['total_steps']} steps as a run of {self._total_steps}; "
                    "fractions in the schedule now resolve to other steps."
                )
            self._masks = {n: mk.to(params[n].device) for n, mk in state["masks"].items()}
            self._keeps = {n: k.clone() for n, k in state["keeps"].items()}
            self._last_update = int(state["last_update"])
            self._target = float(state["target"])
        self._params = {n: params[n] for n in self._masks}
        self._refresh_hot()
        self.apply()
        self._hook(trainer.optimizers)

    def _hook(self, optimizers: list[torch.optim.Optimizer]) -> None:
        for h in self._handles:
            h.remove()
        self._handles = [opt.register_step_post_hook(self._post_step) for opt in optimizers]
        self._hooked = [id(o) for o in optimizers]

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.apply()

    def _refresh_hot(self) -> None:
        self._remasker.set(
            [(self._params[n], mk) for n, mk in self._masks.items() if n in self._params and not bool(mk.all())]
        )

    # ------------------------------------------------------------------ training
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if [id(o) for o in trainer.optimizers] != self._hooked:  # optimizers replaced (e.g. by another callback)
            self.rebind(pl_module, trainer.optimizers)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if trainer.sanity_checking or self._removed:
            return
        total = self._total_steps if self._total_steps is not None else float(trainer.estimated_stepping_batches)
        after = trainer.global_step + 1  # optimizer steps done once this step finishes
        due = self.schedule.last_update_step(after, total)
        if due is None or due <= self._last_update:
            return
        self._update(trainer, pl_module, after, total)
        self._last_update = due

    def _layer_targets(self, value: float, names: list[str]) -> dict[str, float]:
        s = self.schedule
        frac = 1.0 if s.final == s.initial else (value - s.initial) / (s.final - s.initial)
        out = {}
        for name in names:
            module_name = self._module_of(name)
            target = value
            for pattern, final in self.overrides.items():
                if re.search(pattern, module_name):
                    target = s.initial + (final - s.initial) * frac
                    break
            out[name] = target
        return out

    def _module_of(self, name: str) -> str:
        if self.granularity == "channel":
            return name
        return self._selected[name][0] if name in self._selected else name.rsplit(".", 1)[0]

    def _pools(self, targets: dict[str, float]) -> list[tuple[list[str], float]]:
        if self.scope == "layer":
            return [([n], t) for n, t in targets.items()]
        overridden = {n for n in targets if any(re.search(p, self._module_of(n)) for p in self.overrides)}
        pools = [([n for n in targets if n not in overridden], self._target)]
        return pools + [([n], targets[n]) for n in overridden]

    @torch.no_grad()
    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, total: float) -> None:
        value = self.schedule.value(step, total)
        self._target = value
        params = dict(pl_module.named_parameters())
        targets = self._layer_targets(value, self._weights)
        crit = self.criterion

        def score(name: str) -> Tensor:
            p = params[name]
            return crit.score(p.detach(), p.grad if crit.needs_grad else None, name=name, step=step)

        if self.granularity == "channel":
            assert self._groups is not None
            groups = self._groups
            keeps = {n: self._keeps.get(n, torch.ones(g.channels, dtype=torch.bool)) for n, g in groups.groups.items()}
            unit_ids, unit_scores, unit_keeps, unit_sizes = {}, {}, {}, {}
            for gname in groups.groups:
                if gname in self._root_weights:  # a channel scored by its root layer's weights
                    ch = groups.channel_scores(gname, score(self._root_weights[gname])).cpu()
                else:  # attention heads: scored as units over all their q/k/v/out weights
                    ch = groups.group_scores(gname, {it.param: score(it.param) for it in groups.groups[gname].items})
                ids, unit_scores[gname] = groups.unit_scores(gname, ch)
                units = groups.units(gname)
                unit_ids[gname] = ids
                unit_keeps[gname] = torch.stack([keeps[gname][units == u].any() for u in ids])
                unit_sizes[gname] = torch.stack([(units == u).sum() for u in ids])
            new = channel_keep(unit_scores, unit_keeps, self._pools(targets), sizes=unit_sizes)
            keeps = {n: groups.channel_keep_of_units(n, unit_ids[n], new[n]) for n in new}
            masks = groups.param_masks(keeps, params)
        else:
            current = {n: self._masks.get(n, torch.ones_like(params[n], dtype=torch.bool)) for n in self._weights}
            if self.granularity == "nm":
                masks = {}
                for n in self._weights:
                    axis = self._selected[n][1]  # N:M groups run along the input axis (dim 0 of HF Conv1D)
                    sc, cur = score(n).transpose(1, axis), current[n].transpose(1, axis)
                    k = int(targets[n] * self.m + 1e-6)
                    masks[n] = nm_masks(sc, cur, self.n, self.m, k).transpose(1, axis).contiguous()
            else:
                masks = unstructured_masks({n: score(n) for n in self._weights}, current, self._pools(targets))
            keeps = {}
        if trainer.world_size > 1:  # identical masks on every rank, whatever the criterion
            payload = trainer.strategy.broadcast(
                ({n: mk.cpu() for n, mk in masks.items()}, {n: k.cpu() for n, k in keeps.items()}), src=0
            )
            masks = {n: mk.to(params[n].device) for n, mk in payload[0].items()}
            keeps = payload[1]
        self._masks = {n: mk.to(params[n].device) for n, mk in masks.items()}
        self._keeps = {n: k.cpu() for n, k in keeps.items()}
        self._params = {n: params[n] for n in self._masks}
        self._refresh_hot()
        self.apply()
        self._log_update(trainer, pl_module, step)

    # ------------------------------------------------------------------ logging
    def layer_stats(self, module: nn.Module) -> list[dict[str, Any]]:
        """Per-layer figures of the pruned weights: name, shape, elements, nonzeros, sparsity (and channels kept).

        Args:
            module: the LightningModule.

        Returns:
            One dict per pruned weight (per group root for channel granularity).
        """
        params = dict(module.named_parameters())
        rows = []
        for name in self._weights:
            wname = self._root_weights.get(name, name) if self.granularity == "channel" else name
            p = params.get(wname)
            if p is None:
                continue
            numel = p.numel()
            nz = int(torch.count_nonzero(p.detach()))
            row: dict[str, Any] = {
                "layer": wname,
                "shape": list(p.shape),
                "params": numel,
                "nonzeros": nz,
                "sparsity": 1.0 - nz / numel,
            }
            if self.granularity == "channel" and name in self._keeps:
                k = self._keeps[name]
                row["channels_kept"] = f"{int(k.sum())}/{k.numel()}"
            rows.append(row)
        return rows

    def global_sparsity(self) -> float:
        """Achieved sparsity: fraction of masked elements (unstructured/N:M) or removed channels (channel).

        Returns:
            The fraction in [0, 1].
        """
        if self.granularity == "channel":
            total = sum(k.numel() for k in self._keeps.values())
            return 1.0 - sum(int(k.sum()) for k in self._keeps.values()) / total if total else 0.0
        return mask_sparsity(self._masks)[0]

    @rank_zero_only
    def _log_update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        if not trainer.loggers:
            return
        rows = self.layer_stats(pl_module)
        metrics = {"pruning/target": self._target, "pruning/sparsity": self.global_sparsity()}
        metrics["pruning/nonzeros"] = float(sum(r["nonzeros"] for r in rows))
        for r in rows:
            metrics[f"pruning/layer_sparsity/{r['layer']}"] = r["sparsity"]
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        tb = _tensorboard(trainer)
        if tb is not None and self.log_histograms:
            params = dict(pl_module.named_parameters())
            for r in rows:
                p = params.get(r["layer"])
                if p is not None:
                    w = p.detach()
                    kept = w[w != 0]
                    if kept.numel():  # a layer pruned to nothing has no histogram (TensorBoard refuses an empty one)
                        tb.add_histogram(f"pruning/weights/{r['layer']}", kept.float().cpu(), step)

    # ------------------------------------------------------------------ end of fit
    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._hooked = [], []
        self.apply()
        self._log_final(trainer, pl_module)
        if self.remove_channels and self._keeps and not self._removed:
            self._remove(trainer, pl_module)

    def _remove(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._groups is not None
        device = next(pl_module.parameters()).device
        example = inputs.map_tensors(self._example, lambda t: t.to(device))
        report = _find_report(trainer)
        measure = report.measure if report is not None else _measure
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            before_out = inputs.call(pl_module, example)
        before = _measure_example(measure, pl_module, example) if trainer.is_global_zero else {}
        try:
            removed = self._groups.remove(self._keeps)
        except Exception as exc:
            pl_module.train(was_training)
            raise RuntimeError(
                f"Pruning: channel removal failed at the end of fit ({type(exc).__name__}: {exc}); the model is left "
                "partly thinned and pruned_model.pt was not written. The checkpoints saved during training hold the "
                "masked model. HINT: `exclude` the layer named above, or use on_unremovable='skip'."
            ) from exc
        with torch.no_grad():
            after_out = inputs.call(pl_module, example)
        after = _measure_example(measure, pl_module, example) if trainer.is_global_zero else {}
        pl_module.train(was_training)
        self._removed = True
        self._remasker.set([])
        self._params = {}
        err, tol = output_error(before_out, after_out)
        self.removal_figures = {"before": before, "after": after, "channels_removed": removed, "max_abs_diff": err}
        if not err <= tol:
            msg = (
                f"Pruning: the outputs after channel removal differ from the masked model's by {err:.3g} on the "
                f"example input (tolerance {tol:.2g})."
            )
            if not self.allow_output_change:
                raise RuntimeError(
                    f"{msg} pruned_model.pt was not written. HINT: `exclude` the layers whose removal changes the "
                    "model (the setup rehearsal lists them), or pass `allow_output_change=True` to accept it."
                )
            rank_zero_warn(f"{msg} Accepted: allow_output_change=True.")
        if trainer.is_global_zero:
            after["channels_removed"] = removed
            after["max_abs_output_diff"] = err
            self._report(trainer, report, before, after)
        self._save(trainer, pl_module)

    @property
    def artifacts(self) -> dict[str, str]:
        """Files this callback wrote in the run, by what they hold (``lightning-opt fit`` lists them at the end)."""
        return {"pruned model": self.pruned_model_path} if self.pruned_model_path else {}

    @rank_zero_only
    def _save(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        path = Path(local_log_dir(trainer)) / "pruned_model.pt"
        save_pruned(pl_module, path)  # atomic; makes the folder
        self.pruned_model_path = str(path)

    @rank_zero_only
    def _report(self, trainer: pl.Trainer, report: Any, before: dict[str, Any], after: dict[str, Any]) -> None:
        if report is not None:
            report.add_stage("pruned (masked)", before)
            report.add_stage("channels removed", after)
        tb = _tensorboard(trainer)
        if tb is not None:
            lines = ["| figure | masked | removed | ratio |", "|---|---|---|---|"]
            for k, v in before.items():
                a = after.get(k)
                if isinstance(v, (int, float)) and isinstance(a, (int, float)):
                    ratio = f"{v / a:.2f}x" if a else "-"
                    lines.append(f"| {k} | {v:.4g} | {a:.4g} | {ratio} |")
            tb.add_text("pruning/channel_removal", "\n".join(lines), trainer.global_step)

    @rank_zero_only
    def _log_final(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        tb = _tensorboard(trainer)
        rows = self.layer_stats(pl_module)
        if tb is None or not rows:
            return
        head = "| layer | shape | params | nonzeros | sparsity |" + (
            " channels kept |" if self.granularity == "channel" else ""
        )
        lines = [head, "|" + "---|" * (head.count("|") - 1)]
        for r in rows:
            line = f"| {r['layer']} | {r['shape']} | {r['params']} | {r['nonzeros']} | {r['sparsity']:.3f} |"
            if self.granularity == "channel":
                line += f" {r.get('channels_kept', '-')} |"
            lines.append(line)
        lines.append(f"\nglobal sparsity {self.global_sparsity():.4f}, target {self._target:.4f}")
        tb.add_text("pruning/layers", "\n".join(lines), trainer.global_step)
        tb.add_figure("pruning/layer_sparsity", _sparsity_figure(rows), trainer.global_step)

    # ------------------------------------------------------------------ state
    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._removed:  # a checkpoint of the thin model records its layer shapes, so it loads without this callback
            checkpoint[STRUCTURE_KEY] = pruned_structure(pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "masks": {n: mk.detach().cpu() for n, mk in self._masks.items()},
            "keeps": {n: k.detach().cpu() for n, k in self._keeps.items()},
            "last_update": self._last_update,
            "target": self._target,
            "total_steps": self._total_steps,
            "granularity": self.granularity,
            "removed": self._removed,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("granularity", self.granularity) != self.granularity:
            raise ValueError(
                f"The checkpoint was pruned with granularity={state_dict['granularity']!r}, this callback uses "
                f"{self.granularity!r}."
            )
        if state_dict.get("removed"):
            raise ValueError(
                "The checkpoint was saved after channels were removed; it cannot resume pruning. "
                "HINT: resume from a checkpoint saved during training, or reload the thin model with `load_pruned`."
            )
        self._pending = dict(state_dict)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._hooked = [], []


def _tensorboard(trainer: pl.Trainer) -> Any:
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def _sparsity_figure(rows: list[dict[str, Any]]) -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(rows) + 2), 3.5))
    ax.bar(range(len(rows)), [r["sparsity"] for r in rows], color="tab:blue")
    ax.set_xticks(range(len(rows)), [r["layer"] for r in rows], rotation=70, ha="right", fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("sparsity")
    ax.set_title("per-layer sparsity at the end of fit")
    fig.tight_layout()
    return fig


def _find_report(trainer: pl.Trainer) -> Any:

    return CompressionReport.find(trainer)


class _KeywordCall(nn.Module):
    """Calls a model with keyword inputs given positionally (for measuring tools that take positional inputs)."""

    def __init__(self, model: nn.Module, keys: list[str]) -> None:
        super().__init__()
        self.model = model
        self.keys = keys

    def forward(self, *args: Any) -> Any:
        return self.model(**dict(zip(self.keys, args)))


def _measure_example(measure: Any, model: nn.Module, example: Any) -> dict[str, Any]:
    """``measure(model, example)`` for any example form (a tensor, positional tuple or keyword dict)."""
    args, kwargs = inputs.call_args(example)
    if kwargs:
        return dict(measure(_KeywordCall(model, list(kwargs)), tuple(kwargs.values())))
    return dict(measure(model, args[0] if len(args) == 1 else tuple(args)))


def _train_batches(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
    """The training dataloader as setup can reach it (datamodule, the module's own hook, or fit's argument)."""
    dm = trainer.datamodule  # type: ignore[attr-defined]
    if dm is not None and callable(getattr(dm, "train_dataloader", None)):
        try:
            return dm.train_dataloader()
        except Exception:
            pass
    source = getattr(getattr(trainer, "fit_loop", None), "_data_source", None)  # no public handle before fit starts
    if source is not None and source.is_defined():
        return source.dataloader()
    return None


def _measure(model: nn.Module, example: Any) -> dict[str, Any]:

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dict(measure_model(model, example, latency=True))


def _check_schedule(schedule: Any) -> None:
    if not isinstance(schedule, Schedule):
        raise TypeError(
            f"`schedule` must be a lightning_opt.schedules.Schedule, got {schedule!r}. HINT: "
            "`schedule: {class_path: lightning_opt.schedules.PolynomialSchedule, init_args: {final: 0.9}}`."
        )
    if not 0.0 <= schedule.final < 1.0:
        raise ValueError(
            f"`schedule.final` must be in [0, 1), got {schedule.final}. "
            "HINT: sparsity is a fraction, 0.9 means 90% zeros."
        )
    if not 0.0 <= schedule.initial <= schedule.final:
        raise ValueError(f"`schedule.initial` must be in [0, schedule.final={schedule.final}], got {schedule.initial}.")


def _check_nm(n: Any, m: Any, schedule: Schedule, overrides: dict[str, float] | None) -> None:
    if not (isinstance(n, int) and isinstance(m, int) and m >= 2 and n >= 1):
        raise ValueError(f"`n` and `m` must be ints with 1 <= n < m and m >= 2, got n={n!r}, m={m!r}.")
    if n >= m:
        raise ValueError(f"`n` must be < `m` for N:M sparsity, got n={n}, m={m}. HINT: 2:4 keeps 2 of 4.")
    if abs(schedule.final - (m - n) / m) > 1e-9:
        raise ValueError(
            f"`schedule.final` must be {(m - n) / m} for {n}:{m} sparsity ((m - n) / m), got {schedule.final}."
        )
    if overrides:
        raise ValueError(f"`overrides` cannot be used with granularity='nm', got {overrides}.")


def _check_patterns(include: list[str] | None, exclude: list[str] | None, overrides: dict[str, float] | None) -> None:
    for arg, patterns in (("include", include), ("exclude", exclude), ("overrides", overrides)):
        for p in patterns or []:
            try:
                re.compile(p)
            except re.error as err:
                raise ValueError(f"`{arg}` pattern {p!r} is not a valid regex: {err}.") from err
    for p, v in (overrides or {}).items():
        if not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
            raise ValueError(f"`overrides[{p!r}]` must be a final sparsity in [0, 1), got {v!r}.")
