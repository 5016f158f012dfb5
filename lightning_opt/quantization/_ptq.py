"""Post-training quantization on the pt2e flow: the `PostTrainingQuantization` callback."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_opt import inputs
from lightning_opt.quantization import _linear_callback, _pt2e
from lightning_opt.quantization._callback import _example_input, _Int8Callback, calibrate

__all__ = ["PostTrainingQuantization"]


class PostTrainingQuantization(_Int8Callback):
    """Post-training static int8 quantization at fit end: calibrate observers on training batches, convert, measure.

    The baseline QAT has to beat. Uses the same int8 scheme as `QuantizationAwareTraining` (histogram
    observers for activations, per-channel min/max for weights) and writes the same kind of artifact and figures,
    as the ``int8_ptq`` column of the compression report.

    Args:
        calibration_batches: training batches run through the observers.
        module: attribute path of the submodule to quantize; default: ``backbone`` if present.
        skip: regexes of layers kept in fp32.
        dtype: only ``"int8"``.
        weight_scheme: only ``"per_channel_symmetric"``.
        activation_scheme: only ``"per_tensor_affine"``.
        reduce_range: 7-bit activations (CPUs without VNNI).
        artifact_path: where to save the ``.pt2``; default ``<log_dir>/int8_ptq.pt2``.
        evaluate: evaluate the artifact on the test set.
        compile: run it through inductor with freezing.
        latency: time it beside fp32.
        num_threads: torch threads while timing (with a `CompressionReport`, the report's threads, batch size and
            repeats: its fp32 and int8 rows share one timing protocol).
        latency_batch_size: rows of the timed input without a `CompressionReport` (default 1).
        scheme: ``"pt2e_static"`` (calibrated static graph), or ``"int8_dynamic"`` / ``"int8_weight_only"``
            (torchao ``quantize_`` on the Linear layers at fit end, no calibration).

    Raises:
        ValueError: for ``calibration_batches`` < 1, an unsupported dtype/scheme, a ``skip`` pattern matching
            nothing, a missing ``module``.

    Examples:
        >>> ptq = PostTrainingQuantization(calibration_batches=10)
        >>> ptq.stage_name
        'int8_ptq'
    """

    stage_name = "int8_ptq"
    mode = "ptq"

    def __init__(
        self,
        calibration_batches: int = 10,
        module: str | None = None,
        skip: list[str] | None = None,
        dtype: str = "int8",
        weight_scheme: str = "per_channel_symmetric",
        activation_scheme: str = "per_tensor_affine",
        reduce_range: bool = False,
        artifact_path: str | None = None,
        evaluate: bool = True,
        compile: bool = True,
        latency: bool = True,
        num_threads: int = 1,
        latency_batch_size: int | None = None,
        scheme: str = "pt2e_static",
    ) -> None:
        if calibration_batches < 1:
            raise ValueError(f"`calibration_batches` must be >= 1, got {calibration_batches}.")
        super().__init__(
            module,
            skip,
            dtype,
            weight_scheme,
            activation_scheme,
            reduce_range,
            True,
            artifact_path,
            evaluate,
            compile,
            latency,
            num_threads,
            latency_batch_size,
        )
        self.calibration_batches = calibration_batches
        self.scheme = scheme
        self.linear = _linear_callback.stage_for(self, scheme, reduce_range=(reduce_range, False))

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.linear is not None:
            return self.linear.setup(trainer, pl_module, stage)
        if stage == "fit":  # fail before training: skip patterns, module path, capture, convert, save
            example = _example_input(trainer, pl_module)
            self.spec = self.build_spec(pl_module, example)
            self._root_example = inputs.first_rows(example, 1)
            self.rehearse(trainer, pl_module, example)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.linear is not None:
            self.linear.on_fit_end(trainer, pl_module)
            self.results = self.linear.results
            return
        if trainer.global_rank != 0 or trainer.interrupted or self.spec is None:
            return
        target = _pt2e.get_submodule(pl_module, self.spec.module)
        if _pt2e.is_prepared(target):
            rank_zero_warn("PostTrainingQuantization: the submodule is already quantized (QAT); skipping PTQ.")
            return
        loader = trainer.datamodule.train_dataloader()  # type: ignore[attr-defined]
        graph = calibrate(target, self.spec, loader, self.calibration_batches)
        self.finalize(trainer, pl_module, graph)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"results": self.results}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.results = dict(state_dict.get("results") or {})
