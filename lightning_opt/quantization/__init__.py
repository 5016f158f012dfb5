"""Int8 quantization for Lightning on torchao's pt2e flow (x86 inductor): QAT, PTQ, artifacts, ONNX Runtime.

Public API:

- `QuantizationAwareTraining`: the QAT callback (fake quantization, fit-end int8 ``.pt2`` artifact).
- `PostTrainingQuantization`: static PTQ with calibration batches at fit end.
- `restore_quantized_structure`: rebuild the fake-quant structure from a checkpoint (``on_load_checkpoint``).
- `prepare`, `calibrate`, `convert`, `save_artifact`, `load_artifact`,
  `CompiledInference`: the pt2e steps as plain functions.
- `export_onnx`, `quantize_onnx`, `OnnxRuntimeModel`: the ONNX Runtime route.
- `linear`: torchao ``quantize_`` schemes for Linear-heavy models (``linear.quantize(model, "int8_dynamic")``,
  ``prepare_qat``/``convert_qat``, ``save_state``/``load_state``, ``save_artifact``/``load_artifact``, ``measure``);
  the callbacks' ``scheme=`` option.
"""

from lightning_opt.quantization import _linear as linear
from lightning_opt.quantization._callback import CHECKPOINT_KEY, calibrate, restore_quantized_structure
from lightning_opt.quantization._onnx import OnnxRuntimeModel, export_onnx, quantize_onnx
from lightning_opt.quantization._pt2e import (
    CompiledInference,
    QuantizationExportError,
    QuantSpec,
    convert,
    layer_sqnr,
    load_artifact,
    prepare,
    quant_ranges,
    save_artifact,
    sqnr_db,
)
from lightning_opt.quantization._ptq import PostTrainingQuantization
from lightning_opt.quantization._qat import QuantizationAwareTraining

__all__ = [
    "CHECKPOINT_KEY",
    "CompiledInference",
    "OnnxRuntimeModel",
    "PostTrainingQuantization",
    "QuantSpec",
    "QuantizationAwareTraining",
    "QuantizationExportError",
    "calibrate",
    "convert",
    "export_onnx",
    "layer_sqnr",
    "linear",
    "load_artifact",
    "prepare",
    "quant_ranges",
    "quantize_onnx",
    "restore_quantized_structure",
    "save_artifact",
    "sqnr_db",
]
