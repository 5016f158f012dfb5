r"""Checkpoint + recipe -> a deployable artifact (int8 ``.pt2`` or ONNX), measured (``lightning-opt export``).

The recipe rebuilds the model and data exactly as training did; the checkpoint's weights are loaded (a QAT
checkpoint gets its fake-quant structure rebuilt first). Then:

- ``--format pt2 --quantize int8``: a QAT checkpoint is converted as trained; an fp32 one is quantized post-training
  with ``--calibration_batches`` training batches (``--method`` forces one or the other). Saved with
  ``torch.export.save``; run with `lightning_opt.quantization.CompiledInference` (inductor int8 kernels).
- ``--format pt2 --quantize none``: the fp32 model as ``.pt2``.
- ``--format pt2 --quantize int8_dynamic|int8_weight_only``: torchao ``quantize_`` on the Linear layers
  (transformers; QAT checkpoints of those schemes too), see `lightning_opt.quantization._linear`.
- ``--format onnx``: the fp32 model through ``torch.onnx.export(dynamo=True)``; with ``--quantize int8`` then
  onnxruntime ``quant_pre_process`` + ``quantize_static`` (QDQ, per channel), calibrated on training batches.

The artifact is loaded back from disk, evaluated on the test set and timed beside the fp32 eager model
(interleaved, same threads); the figures are printed and written next to it as ``<artifact>.json``.

Examples:
    ```bash
    lightning-opt export --config recipes/quantization/qat_digits.yaml --ckpt_path runs/.../last.ckpt \
        --format pt2 --quantize int8 --output artifacts/digits_int8.pt2
    ```
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from lightning_opt import inputs
from lightning_opt._io import atomic_write, check_output_dir
from lightning_opt._utils import load_checkpoint
from lightning_opt.quantization import _artifact, _callback, _linear, _linear_callback, _onnx, _pt2e
from lightning_opt.recipe import build_from_config

__all__ = ["FORMATS", "METHODS", "QUANTIZE", "export_checkpoint"]

FORMATS = ("pt2", "onnx")
"""``format`` values: a ``torch.export`` program (``.pt2``) or an ONNX file."""
QUANTIZE = ("int8", "none", *_linear.SCHEMES)
"""``quantize`` values: int8 (pt2e static, or ONNX Runtime static), none (fp32), or a torchao ``quantize_`` scheme."""
METHODS = ("auto", "qat", "ptq")
"""``method`` values for ``quantize="int8"``: ``auto`` (QAT when the checkpoint was trained with it, else PTQ),
``qat`` or ``ptq``."""


def _validate(fmt: str, quantize: str, method: str, calibration_batches: int, ckpt_path: str | None) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"`format` must be one of {list(FORMATS)}, got {fmt!r}.")
    if quantize not in QUANTIZE:
        raise ValueError(f"`quantize` must be one of {list(QUANTIZE)}, got {quantize!r}.")
    if quantize in _linear.SCHEMES and fmt != "pt2":
        raise ValueError(f"`quantize` {quantize!r} writes a .pt2 only, got format {fmt!r}. HINT: use `--format pt2`.")
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {list(METHODS)}, got {method!r}.")
    if calibration_batches < 1:
        raise ValueError(f"`calibration_batches` must be >= 1, got {calibration_batches}.")
    if ckpt_path is not None and not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"`ckpt_path` {ckpt_path!r} does not exist.")


def _load_checkpoint(model: nn.Module, ckpt_path: str) -> list[_pt2e.QuantSpec]:
    checkpoint = load_checkpoint(ckpt_path)  # weights-only: a file the user names never runs code
    specs = _callback._spec_from_checkpoint(checkpoint)
    for spec in specs:
        if not _pt2e.is_prepared(_pt2e.get_submodule(model, spec.module)):
            _callback._prepare_at(model, spec)
    model.load_state_dict(checkpoint["state_dict"])
    return specs


def export_checkpoint(
    config: Sequence[str] | dict[str, Any],
    ckpt_path: str | None = None,
    format: str = "pt2",
    quantize: str = "int8",
    method: str = "auto",
    module: str | None = None,
    calibration_batches: int = 10,
    output: str | None = None,
    evaluate: bool = True,
    compile: bool = True,
    latency: bool = True,
    num_threads: int = 1,
    batch_size: int = 1,
) -> dict[str, Any]:
    """Build the recipe, load the checkpoint, write the artifact, measure it; returns the figures.

    Args:
        config: recipe arguments for `lightning_opt.recipe.build_from_config` (``["--config", "r.yaml", ...]``).
        ckpt_path: the Lightning checkpoint; None exports the freshly initialised model (for smoke tests).
        format: ``"pt2"`` or ``"onnx"``.
        quantize: ``"int8"`` (pt2e static or ONNX Runtime static), ``"none"``, or a torchao ``quantize_`` scheme for
            Linear-heavy models, ``"int8_dynamic"`` / ``"int8_weight_only"`` (``.pt2`` only; QAT checkpoints of
            those schemes included).
        method: ``"auto"`` (QAT state if the checkpoint has it, else PTQ), ``"qat"`` or ``"ptq"``.
        module: attribute path quantized by PTQ (default ``backbone`` if present).
        calibration_batches: training batches for PTQ / ONNX static calibration.
        output: artifact path; default next to the checkpoint (or in the working directory).
        evaluate: accuracy on the datamodule's test set.
        compile: run the ``.pt2`` through inductor (int8 kernels) when evaluating and timing.
        latency: time the artifact beside the fp32 eager model.
        num_threads: threads while timing.
        batch_size: rows of the timed input.

    Raises:
        ValueError: for an unknown format/quantize/method, ``method="qat"`` on a checkpoint without QAT state.
        FileNotFoundError: when ``ckpt_path`` does not exist.
    """
    _validate(format, quantize, method, calibration_batches, ckpt_path)
    check_output_dir(Path(output).parent if output else Path(ckpt_path or ".").parent, "output")
    cli = build_from_config(config)
    if quantize in _linear.SCHEMES:  # torchao quantize_ on the Linear layers (transformers): see _linear_callback
        return _linear_callback.export_checkpoint(
            cli.model, cli.datamodule, ckpt_path, quantize, module, output, compile, latency, num_threads, batch_size
        )
    model: Any = cli.model
    datamodule = cli.datamodule
    specs = _load_checkpoint(model, ckpt_path) if ckpt_path else []
    model.eval()
    if datamodule is not None:
        datamodule.setup("fit")

    example = inputs.module_example(model, datamodule.train_dataloader() if datamodule is not None else None)
    if example is None:
        raise ValueError(
            "The model has no `example_input_array` and the recipe no datamodule to take an input from. HINT: set "
            "`self.example_input_array` (a tensor, a tuple of positional tensors or a dict of keyword tensors)."
        )
    example = inputs.first_rows(example, 1)
    path = module if module is not None else (specs[0].module if specs else _pt2e.default_module_path(model))
    current = _pt2e.get_submodule(model, path)
    qat_graph = current if _pt2e.is_prepared(current) else None
    if method == "qat" and qat_graph is None:
        raise ValueError(
            f"`method='qat'` needs a checkpoint saved during quantization-aware training; {ckpt_path!r} has no "
            "fake-quant state. HINT: use `--method ptq` (or auto) to calibrate the fp32 weights."
        )
    eager = _artifact.eager_of(qat_graph) if qat_graph is not None else current
    if eager is None:  # pragma: no cover - a prepared graph always records its eager module in this process
        raise RuntimeError("The fp32 module behind the QAT graph is unknown.")

    suffix = "int8" if quantize == "int8" else "fp32"
    if output is None:
        stem = Path(ckpt_path).with_suffix("") if ckpt_path else Path("model")
        output = f"{stem}.{suffix}.{format}"
    if not str(output).endswith(f".{format}"):
        raise ValueError(f"`output` must end with '.{format}' for format {format!r}, got {output!r}.")
    test_batches = None
    if evaluate and datamodule is not None:
        datamodule.setup("test")
        test_batches = datamodule.test_dataloader()

    figures: dict[str, Any] = {"format": format, "quantize": quantize, "checkpoint": ckpt_path}
    with _artifact.swapped(model, path, eager) as fp32_model:
        fp32_model.eval()
        if format == "pt2":
            if quantize == "int8":
                use_qat = qat_graph is not None and method != "ptq"
                if use_qat:
                    graph = cast(torch.fx.GraphModule, qat_graph)
                else:
                    spec = _pt2e.QuantSpec.for_example(
                        path, _callback.submodule_example(fp32_model, path, example), mode="ptq"
                    )
                    graph = _callback.calibrate(eager, spec, datamodule.train_dataloader(), calibration_batches)
                figures["method"] = "qat" if use_qat else "ptq"
                converted = _pt2e.convert(graph)
                with _artifact.swapped(model, path, converted) as int8_model:
                    artifact, size = _artifact.save_and_reload(int8_model, example, output)
                runner_compile = compile
            else:
                artifact, size = _artifact.save_and_reload(fp32_model, example, output)
                runner_compile = compile
            figures.update(
                _artifact.measure_artifact(
                    artifact,
                    fp32_model,
                    example,
                    test_batches,
                    compile=runner_compile,
                    latency=latency,
                    num_threads=num_threads,
                    batch_size=batch_size,
                )
            )
        else:
            fp32_path = output if quantize == "none" else str(Path(output).with_suffix("")) + ".fp32.onnx"
            size = _onnx.export_onnx(fp32_model, example, fp32_path)
            if quantize == "int8":
                size = _onnx.quantize_onnx(fp32_path, output, datamodule.train_dataloader(), calibration_batches)
                figures["method"] = "onnxruntime_static_qdq"
            session = _onnx.OnnxRuntimeModel(output, num_threads=num_threads)
            figures.update(
                _artifact.measure_artifact(
                    session,
                    fp32_model,
                    example,
                    test_batches,
                    compile=False,
                    latency=latency,
                    num_threads=num_threads,
                    batch_size=batch_size,
                )
            )
    figures["size_bytes"] = size
    figures["artifact"] = os.path.abspath(output)
    with atomic_write(Path(output).with_suffix(Path(output).suffix + ".json")) as fh:
        fh.write(json.dumps(figures, indent=2))
    return figures
