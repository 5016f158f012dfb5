"""Quantization-aware training on the pt2e flow: the `QuantizationAwareTraining` callback."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_opt import inputs
from lightning_opt.pruning import Remasker
from lightning_opt.quantization import _linear_callback, _pt2e
from lightning_opt.quantization._callback import _check_order, _Int8Callback, _resolve_point
from lightning_opt.schedules import check_point

__all__ = ["QuantizationAwareTraining"]


class QuantizationAwareTraining(_Int8Callback):
    """Quantization-aware training to int8 on torchao's pt2e flow (x86 inductor), ending in a real int8 artifact.

    At ``setup`` the quantized submodule is captured with ``torch.export`` (strict) and fake-quantizers are inserted
    (``prepare_qat_pt2e`` with ``X86InductorQuantizer``): int8 weights, per output channel and symmetric; uint8
    activations, per tensor and affine; Conv+BatchNorm pairs are fused the QAT way. Parameters keep their objects
    and names, so optimizers, pruning masks and checkpoints keep working. Training runs in fp32 until ``start``,
    then with fake quantization; observers stop moving at ``freeze_observers`` and BatchNorm statistics freeze at
    ``freeze_bn``. ``.train()``/``.eval()`` switch BatchNorm/dropout inside the graph; observers never update
    during validation. At fit end the graph is converted (``convert_pt2e``) to int8, saved with
    ``torch.export.save`` as ``.pt2``, loaded back, compiled with inductor freezing (oneDNN int8 kernels), evaluated
    on the test set and timed beside the fp32 model; the figures become the ``int8`` column of the
    `CompressionReport` and a ``.json`` next to the artifact.

    TensorBoard (each validation during QAT), per conv/linear layer of the quantized module, one name across the
    tags: ``quant/scale/<layer>`` and ``quant/zero_point/<layer>`` (of the layer's quantized input),
    ``quant/weight_scale/<layer>`` (mean per-channel scale of its weight), ``quant/sqnr_db/<layer>`` (its output,
    fake-quant vs fp32 on a validation batch); at the end ``quant/int8/test_acc`` beside ``quant/int8/fp32_test_acc``.

    Args:
        module: attribute path of the submodule to quantize; default: the model's ``backbone`` if it has one.
        start: when fake quantization starts: a global step (int) or a fraction of the training steps (float).
        freeze_observers: when the quantization ranges stop updating (step or fraction), or None (never).
        freeze_bn: when BatchNorm switches to its running statistics (step or fraction), or None (never).
        skip: regexes (full match on module names inside the quantized submodule) of layers kept in fp32.
        dtype: quantized dtype; only ``"int8"``.
        weight_scheme: only ``"per_channel_symmetric"``.
        activation_scheme: only ``"per_tensor_affine"``.
        reduce_range: 7-bit activations, for CPUs without VNNI whose int8 kernels could saturate.
        preserve_sparsity: keep weights that are exactly zero when training starts at zero (pruned models),
            re-applied after every optimizer step.
        convert_on_fit_end: convert, save and measure the int8 artifact when fit ends.
        artifact_path: where to save the ``.pt2``; default ``<log_dir>/int8.pt2``.
        evaluate: evaluate the artifact on the datamodule's test set.
        compile: run the artifact through ``torch.compile`` with freezing (the deployed, fast form).
        latency: time the artifact and the fp32 model.
        num_threads: torch threads while timing (with a `CompressionReport`, the report's threads, batch size and
            repeats: its fp32 and int8 rows share one timing protocol).
        latency_batch_size: rows of the timed input without a `CompressionReport` (default 1).
        log_every_n_val: log ranges and SQNR every n-th validation run (0 turns it off).
        scheme: ``"pt2e_static"`` (this graph path, for CNNs), or a torchao ``quantize_`` scheme for Linear-heavy
            models: ``"int8_dynamic"`` / ``"int8_weight_only"`` (fake-quantized ``nn.Linear``/``nn.Embedding`` from
            the first step, converted at fit end; see `lightning_opt.quantization._linear`).

    Raises:
        ValueError: for an unsupported ``dtype`` or scheme, a bad ``start``/freeze point (negative, a fraction
            outside [0, 1], a freeze point before ``start``, a start at or after the end of training), a ``skip``
            pattern matching no module, a ``module`` path that does not exist.
        QuantizationExportError: when the model cannot be exported; names the submodule and the failing op.

    Examples:
        >>> from lightning_opt.module import ImageClassifier
        >>> qat = QuantizationAwareTraining(start=0.3, freeze_observers=0.8, freeze_bn=0.9, skip=["head"])
        >>> trainer = pl.Trainer(max_epochs=3, callbacks=[qat])  # doctest: +SKIP
    """

    mode = "qat"

    def __init__(
        self,
        module: str | None = None,
        start: int | float = 0,
        freeze_observers: int | float | None = None,
        freeze_bn: int | float | None = None,
        skip: list[str] | None = None,
        dtype: str = "int8",
        weight_scheme: str = "per_channel_symmetric",
        activation_scheme: str = "per_tensor_affine",
        reduce_range: bool = False,
        preserve_sparsity: bool = True,
        convert_on_fit_end: bool = True,
        artifact_path: str | None = None,
        evaluate: bool = True,
        compile: bool = True,
        latency: bool = True,
        num_threads: int = 1,
        latency_batch_size: int | None = None,
        log_every_n_val: int = 1,
        scheme: str = "pt2e_static",
    ) -> None:
        super().__init__(
            module,
            skip,
            dtype,
            weight_scheme,
            activation_scheme,
            reduce_range,
            convert_on_fit_end,
            artifact_path,
            evaluate,
            compile,
            latency,
            num_threads,
            latency_batch_size,
        )
        check_point(start, "start")
        check_point(freeze_observers, "freeze_observers", allow_none=True)
        check_point(freeze_bn, "freeze_bn", allow_none=True)
        if log_every_n_val < 0:
            raise ValueError(f"`log_every_n_val` must be >= 0, got {log_every_n_val}.")
        self.start = start
        self.freeze_observers = freeze_observers
        self.freeze_bn = freeze_bn
        self.preserve_sparsity = preserve_sparsity
        self.log_every_n_val = log_every_n_val
        self.start_step: int | None = None
        self.freeze_observers_step: int | None = None
        self.freeze_bn_step: int | None = None
        self._phase: tuple[bool, bool, bool] | None = None
        self._masks: dict[str, torch.Tensor] = {}
        self._remasker = Remasker()
        self._val_batch: Any = None
        self._val_runs = 0
        self.scheme = scheme
        self.linear = _linear_callback.stage_for(
            self, scheme, start=(start, 0), freeze_observers=(freeze_observers, None), freeze_bn=(freeze_bn, None)
        )

    # ----------------------------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.linear is not None:
            return self.linear.setup(trainer, pl_module, stage)
        self._install_load_hook(pl_module)
        if stage == "fit":
            _check_order(trainer, self)
            self.ensure_prepared(trainer, pl_module)

    def phase_steps(self, total_steps: float) -> dict[str, int | None]:
        """The global steps of ``start``, ``freeze_observers`` and ``freeze_bn`` in a run of ``total_steps`` steps.

        What fit uses (`resolve_steps` sets them from here; the planner's timeline reads them): a fraction is
        ``round(fraction * total_steps)`` (the schedules' rule); a fractional ``freeze_observers`` that rounds onto
        ``start`` moves one step after it. Nothing is checked here: `phase_problems` lists what fit would refuse.

        Args:
            total_steps: the run's optimizer steps (``trainer.estimated_stepping_batches``).

        Returns:
            ``{"start": step, "freeze_observers": step or None, "freeze_bn": step or None}``.

        Raises:
            ValueError: if a fraction is given and ``total_steps`` is infinite.

        Examples:
            >>> QuantizationAwareTraining(start=0.5, freeze_observers=0.8).phase_steps(100)
            {'start': 50, 'freeze_observers': 80, 'freeze_bn': None}
        """
        start = _resolve_point(self.start, total_steps, "start")
        assert start is not None
        observers = _resolve_point(self.freeze_observers, total_steps, "freeze_observers")
        bn = _resolve_point(self.freeze_bn, total_steps, "freeze_bn")
        if isinstance(self.freeze_observers, float) and observers is not None and observers <= start:
            observers = start + 1  # fractions of a very short run can round onto `start`: observe for at least a step
        return {"start": start, "freeze_observers": observers, "freeze_bn": bn}

    def phase_problems(self, total_steps: float) -> list[tuple[str, str]]:
        """What fit would refuse about the phase points in a run of ``total_steps`` steps, as ``(argument, message)``.

        Args:
            total_steps: the run's optimizer steps.

        Returns:
            One entry per problem (empty when the points are consistent): ``start`` at or after the end of training,
            a freeze point before ``start``.

        Examples:
            >>> QuantizationAwareTraining(start=50, freeze_bn=10).phase_problems(100)[0][0]
            'freeze_bn'
        """
        steps = self.phase_steps(total_steps)
        start = steps["start"]
        assert start is not None
        problems = []
        if not math.isinf(total_steps) and start >= total_steps:
            problems.append(
                (
                    "start",
                    f"`start` {self.start!r} is step {start}, at or after the end of training ({int(total_steps)} "
                    "steps): fake quantization would never run. HINT: use a fraction such as 0.5, or raise "
                    "max_steps/max_epochs.",
                )
            )
        for name in ("freeze_observers", "freeze_bn"):
            value = steps[name]
            if value is not None and value < start:
                problems.append(
                    (
                        name,
                        f"`{name}` is step {value}, before `start` (step {start}): nothing would be observed or "
                        "trained with fake quantization first. HINT: freeze points come after `start`.",
                    )
                )
        return problems

    def resolve_steps(self, trainer: pl.Trainer) -> None:
        """Turn ``start``/freeze points into global steps and check them against the training length.

        Raises:
            ValueError: the first of `phase_problems`.
        """
        total = float(trainer.estimated_stepping_batches)
        problems = self.phase_problems(total)
        if problems:
            raise ValueError(problems[0][1])
        steps = self.phase_steps(total)
        self.start_step = steps["start"]
        self.freeze_observers_step = steps["freeze_observers"]
        self.freeze_bn_step = steps["freeze_bn"]

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.resolve_steps(trainer)
        self._phase = None

    def phase_at(self, step: int) -> tuple[bool, bool, bool]:
        """(fake-quant on, observers on, BatchNorm frozen) at a global step."""
        assert self.start_step is not None
        active = step >= self.start_step
        observers = active and (self.freeze_observers_step is None or step < self.freeze_observers_step)
        bn_frozen = self.freeze_bn_step is not None and step >= self.freeze_bn_step
        return active, observers, bn_frozen

    def _apply_phase(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        graph = self.graph(pl_module)
        if graph is None or self.start_step is None:
            return
        _pt2e.sync_mode(graph)  # Lightning restores `.training` by assignment after validation
        phase = self.phase_at(trainer.global_step)
        if phase == self._phase:
            return
        active, observers, bn_frozen = phase
        _pt2e.set_graph_mode(graph, bool(_pt2e.state_of(graph).get("training", True)), bn_frozen=bn_frozen)
        _pt2e.set_phase(graph, fake_quant=active, observers=observers)
        self._phase = phase

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        graph = self.graph(pl_module)
        if self.preserve_sparsity and graph is not None:
            self._masks = {
                name: p.detach() != 0 for name, p in graph.named_parameters() if p.dim() > 1 and bool((p == 0).any())
            }
            params = dict(graph.named_parameters())
            self._remasker.set([(params[name], mask) for name, mask in self._masks.items()])
        self._apply_phase(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._apply_phase(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._masks:
            self._remasker.apply()  # the pruning callback's kernel: in place, one pass for all weights

    # ----------------------------------------------------------------------------------------------------------------
    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if batch_idx == 0 and not trainer.sanity_checking:
            self._val_batch = inputs.to_cpu(inputs.batch_inputs(batch))

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or self.log_every_n_val == 0:
            return
        graph = self.graph(pl_module)
        if graph is None or self._phase is None or not self._phase[0] or self._val_batch is None:
            return
        self._val_runs += 1
        if (self._val_runs - 1) % self.log_every_n_val or trainer.global_rank != 0:
            return
        metrics: dict[str, float] = {}  # one layer name (the conv/linear module) across every quant/ tag
        quantized = {layer: params for layer, params in _pt2e.layer_quant_params(graph).items() if params}
        for layer, params in quantized.items():
            for key, value in params.items():
                metrics[f"quant/{key}/{layer}"] = value
        for layer, value in _pt2e.layer_sqnr(graph, self._val_batch).items():
            if layer in quantized:  # a skipped (fp32) layer has no quant/ tags
                metrics[f"quant/sqnr_db/{layer}"] = min(value, 200.0)
        self.last_metrics = metrics
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.linear is not None:
            self.linear.on_fit_end(trainer, pl_module)
            self.results = self.linear.results
            return
        graph = self.graph(pl_module)
        if not self.convert_on_fit_end or graph is None or trainer.global_rank != 0 or trainer.interrupted:
            return
        if self._phase is None or not self._phase[0]:
            rank_zero_warn("Fit ended before fake quantization started; the int8 artifact is plain PTQ-free rounding.")
        self.finalize(trainer, pl_module, graph)

    # ----------------------------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec.to_dict() if self.spec is not None else None,
            "start_step": self.start_step,
            "freeze_observers_step": self.freeze_observers_step,
            "freeze_bn_step": self.freeze_bn_step,
            "val_runs": self._val_runs,
            "results": self.results,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("spec") is not None:
            self.spec = _pt2e.QuantSpec.from_dict(state_dict["spec"])
        self._val_runs = int(state_dict.get("val_runs", 0))
        self.results = dict(state_dict.get("results") or {})
        self._phase = None
