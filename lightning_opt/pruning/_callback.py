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

from lightning_opt._utils import local_log_dir
from lightning_opt.pruning._channel import STRUCTURE_KEY, ChannelGroups, pruned_structure, save_pruned
from lightning_opt.pruning._criteria import Criterion, resolve_criterion
from lightning_opt.pruning._masks import (
    channel_keep,
    mask_sparsity,
    nm_masks,
    select_modules,
    unstructured_masks,
)
from lightning_opt.pruning._remask import Remasker
from lightning_opt.schedules import Schedule

__all__ = ["Pruning"]

_GRANULARITIES = ("unstructured", "channel", "nm")
_SCOPES = ("global", "layer")
_DEFAULT_TYPES = ("Conv1d", "Conv2d", "Conv3d", "Linear")


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
        criterion: ``"magnitude"``, ``"random"``, ``"taylor"`` or a :class:`Criterion` instance (``class_path``).
        scope: ``"global"`` (one threshold across layers) or ``"layer"`` (each layer reaches the target).
            N:M is always per group of ``m``.
        module_types: which modules to prune, ``torch.nn`` class names or class paths (default Conv1d/2d/3d, Linear).
        include: regexes on module names (``re.search``); only matching modules are pruned.
        exclude: regexes on module names; matching modules are not pruned.
        overrides: ``{regex: final sparsity}`` for matching modules; they follow the schedule's shape to their own
            final value and are ranked on their own.
        n: weights kept per group for ``"nm"``.
        m: group size for ``"nm"``.
        remove_channels: with ``"channel"``, remove the pruned channels at the end of fit (Torch-Pruning) and add
            before/after rows to the ``CompressionReport``; also writes ``pruned_model.pt`` (see
            :func:`~lightning_opt.pruning.load_pruned`) next to the logs.
        example_input_shape: input shape for tracing channel groups when the LightningModule has no
            ``example_input_array`` (e.g. ``[1, 3, 32, 32]``).
        log_histograms: log weight histograms of pruned layers at each update (TensorBoard).
        remask: how the masks are re-applied after every optimizer step (bit-identical results):
            ``"foreach"`` multiplies by float copies of the masks (one ``torch._foreach_mul_``; the copies take as
            much memory as the pruned weights); ``"compiled"`` multiplies by the bool masks themselves with a
            ``torch.compile``d kernel (no copies, ~0.8x the time on CPU; compiles once per process, needs a C++
            compiler on CPU, falls back to ``"foreach"`` with a warning); ``"auto"`` (default) uses ``"compiled"``
            on CPU from 4M masked weights, else ``"foreach"``.

    Raises:
        TypeError: if ``schedule`` is not a :class:`~lightning_opt.schedules.Schedule`.
        ValueError: if ``schedule.final`` or ``schedule.initial`` is outside [0, 1) or ``initial > final``;
            ``granularity``/``scope``/``remask`` is unknown; ``criterion`` is unknown; ``n``/``m`` are invalid
            (``n >= m``) or the schedule does not end at ``(m - n) / m``; an ``overrides`` value is outside [0, 1)
            or used with N:M; a regex does not compile; ``remove_channels`` without ``granularity="channel"``; at
            setup: an ``include``/``overrides`` regex matches no prunable module (the message lists them), the
            schedule's start resolves after its end, or channel pruning has no example input.

    Example:
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
    ) -> None:
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
            raise ValueError(
                f"`schedule.initial` must be in [0, schedule.final={schedule.final}], got {schedule.initial}."
            )
        if granularity not in _GRANULARITIES:
            raise ValueError(f"`granularity` must be one of {list(_GRANULARITIES)}, got {granularity!r}.")
        if scope not in _SCOPES:
            raise ValueError(f"`scope` must be one of {list(_SCOPES)}, got {scope!r}.")
        self.criterion = resolve_criterion(criterion)
        if granularity == "nm":
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
        if remove_channels and granularity != "channel":
            raise ValueError(
                f"`remove_channels=True` needs granularity='channel', got granularity={granularity!r}. "
                "HINT: unstructured and N:M zeros keep the tensor shapes; only whole channels can be removed."
            )
        self.include = _as_list(include)
        self.exclude = _as_list(exclude)
        for arg, patterns in (("include", self.include), ("exclude", self.exclude), ("overrides", overrides)):
            for p in patterns or []:
                try:
                    re.compile(p)
                except re.error as err:
                    raise ValueError(f"`{arg}` pattern {p!r} is not a valid regex: {err}.") from err
        for p, v in (overrides or {}).items():
            if not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
                raise ValueError(f"`overrides[{p!r}]` must be a final sparsity in [0, 1), got {v!r}.")
        if example_input_shape is not None and (
            not example_input_shape or any(not isinstance(d, int) or d < 1 for d in example_input_shape)
        ):
            raise ValueError(f"`example_input_shape` must be a list of positive ints, got {example_input_shape!r}.")

        self.schedule = schedule
        self.granularity = granularity
        self.scope = scope
        self.module_types = list(module_types) if module_types is not None else list(_DEFAULT_TYPES)
        self.overrides = dict(overrides or {})
        self.n = n
        self.m = m
        self.remove_channels = remove_channels
        self.example_input_shape = example_input_shape
        self.log_histograms = log_histograms
        self.remask = remask
        self._remasker = Remasker(remask)  # validates `remask`

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
        for cb in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(cb, Pruning):
                return cb
        return None

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
        if self.granularity == "nm":
            weights = {name: mod.weight for name, mod in self._modules.items()}
            bad = [
                name
                for name, w in weights.items()
                if not isinstance(w, Tensor) or w.dim() < 2 or w.shape[1] % self.m != 0
            ]
            if bad:
                rank_zero_warn(
                    f"Pruning: {self.n}:{self.m} sparsity skips {bad}: their input dimension is not divisible by "
                    f"m={self.m}. Add them to `exclude` to silence this."
                )
                self._modules = {k: v for k, v in self._modules.items() if k not in bad}
            if not self._modules:
                raise ValueError(f"No module has an input dimension divisible by m={self.m}; nothing to prune.")
        start_method = getattr(trainer.strategy, "_start_method", None)
        if self.remove_channels and start_method in ("spawn", "fork", "forkserver"):
            raise ValueError(
                f"`remove_channels=True` cannot be used with strategy 'ddp_{start_method}': the main process reloads "
                "the full-size weights from the workers after fit. HINT: use strategy='ddp' (one process per device, "
                "launched as subprocesses)."
            )
        if self.granularity == "channel":
            example = self._example_input(pl_module)
            self._groups = ChannelGroups(pl_module, self._modules, example)
            self._weights = list(self._groups.groups)
        else:
            self._groups = None
            self._weights = [f"{name}.weight" if name else "weight" for name in self._modules]
        total = trainer.estimated_stepping_batches
        _, end = self.schedule.resolve(total)  # raises on unresolvable fractions / start after end
        if end > total:
            rank_zero_warn(
                f"Pruning: the schedule ends at step {end} but the run has {total} optimizer steps; "
                f"the final sparsity {self.schedule.final} will not be reached."
            )

    def _example_input(self, pl_module: pl.LightningModule) -> Any:
        if self.example_input_shape is not None:
            return torch.randn(*self.example_input_shape)
        example = getattr(pl_module, "example_input_array", None)
        if example is None:
            raise ValueError(
                "granularity='channel' traces the model and needs an example input: set `example_input_array` on "
                "the LightningModule or pass `example_input_shape` (e.g. [1, 3, 32, 32])."
            )
        return example

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
            module_name = name.rsplit(".", 1)[0] if self.granularity != "channel" else name
            target = value
            for pattern, final in self.overrides.items():
                if re.search(pattern, module_name):
                    target = s.initial + (final - s.initial) * frac
                    break
            out[name] = target
        return out

    def _pools(self, targets: dict[str, float]) -> list[tuple[list[str], float]]:
        if self.scope == "layer":
            return [([n], t) for n, t in targets.items()]
        overridden = {
            n
            for n in targets
            if any(re.search(p, n.rsplit(".", 1)[0] if self.granularity != "channel" else n) for p in self.overrides)
        }
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
            ch_scores = {}
            for gname in groups.groups:
                wname = f"{gname}.weight" if gname else "weight"
                ch_scores[gname] = groups.channel_scores(gname, score(wname)).cpu()
            keeps = channel_keep(ch_scores, keeps, self._pools(targets))
            masks = groups.param_masks(keeps, params)
        else:
            current = {n: self._masks.get(n, torch.ones_like(params[n], dtype=torch.bool)) for n in self._weights}
            if self.granularity == "nm":
                masks = {
                    n: nm_masks(score(n), current[n], self.n, self.m, int(targets[n] * self.m + 1e-6))
                    for n in self._weights
                }
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
            wname = (f"{name}.weight" if name else "weight") if self.granularity == "channel" else name
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
                    tb.add_histogram(f"pruning/weights/{r['layer']}", w[w != 0].float().cpu(), step)

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
        example = self._example_input(pl_module)
        device = next(pl_module.parameters()).device
        example = example.to(device) if isinstance(example, Tensor) else example
        report = _find_report(trainer)
        measure = report.measure if report is not None else _measure
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            before_out = pl_module(example)
        before = measure(pl_module, example) if trainer.is_global_zero else {}
        removed = self._groups.remove(self._keeps)
        with torch.no_grad():
            after_out = pl_module(example)
        after = measure(pl_module, example) if trainer.is_global_zero else {}
        pl_module.train(was_training)
        self._removed = True
        self._remasker.set([])
        self._params = {}
        err = float((before_out - after_out).abs().max()) if isinstance(before_out, Tensor) else float("nan")
        if err > 1e-3 * max(1.0, float(before_out.abs().max())):
            rank_zero_warn(f"Pruning: outputs after channel removal differ from the masked model by {err:.3g}.")
        self.removal_figures = {"before": before, "after": after, "channels_removed": removed, "max_abs_diff": err}
        if trainer.is_global_zero:
            after["channels_removed"] = removed
            after["max_abs_output_diff"] = err
            self._report(trainer, report, before, after)
        self._save(trainer, pl_module)

    @rank_zero_only
    def _save(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        path = Path(local_log_dir(trainer)) / "pruned_model.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_pruned(pl_module, path)
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
    from lightning_opt.reporting import CompressionReport

    return CompressionReport.find(trainer)


def _measure(model: nn.Module, example: Any) -> dict[str, Any]:
    from lightning_opt.measure import measure_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dict(measure_model(model, example, latency=True))
