"""The ONNX Runtime route: fp32 ``torch.onnx.export(dynamo=True)``, then onnxruntime static int8 (QDQ, per channel)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["OnnxRuntimeModel", "export_onnx", "quantize_onnx"]


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | os.PathLike[str]) -> int:
    """Export an fp32 eager model to ONNX (dynamo exporter) with a dynamic batch dimension; returns the file size.

    Args:
        model: the fp32 eager model (a QAT graph cannot be exported to ONNX: convert its weights back to an eager
            model first, see ``lightning-opt export``).
        example: one example input.
        path: the ``.onnx`` file to write.

    Example:
        >>> export_onnx(nn.Linear(4, 2), torch.zeros(1, 4), "/tmp/lin.onnx") > 0  # doctest: +SKIP
        True
    """
    model = model.eval()
    x = torch.cat([example, example]) if example.shape[0] == 1 else example
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            model,
            (x,),
            str(path),
            dynamo=True,
            input_names=["input"],
            output_names=["output"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            external_data=False,
        )
    return os.path.getsize(path)


class _Reader:
    """onnxruntime ``CalibrationDataReader`` over the first ``num_batches`` inputs of a dataloader."""

    def __init__(self, batches: Iterable[Any], num_batches: int, input_name: str) -> None:
        from lightning_opt.quantization._artifact import first_input

        self._items = []
        for i, batch in enumerate(batches):
            if i >= num_batches:
                break
            self._items.append({input_name: first_input(batch).detach().cpu().numpy().astype(np.float32)})
        self._it = iter(self._items)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._items)


def quantize_onnx(
    fp32_path: str | os.PathLike[str],
    int8_path: str | os.PathLike[str],
    calibration: Iterable[Any],
    num_batches: int = 10,
    per_channel: bool = True,
    reduce_range: bool = False,
) -> int:
    """Static int8 quantization of an ONNX model with onnxruntime: ``quant_pre_process`` then ``quantize_static``.

    QDQ format, int8 weights per channel, uint8 activations (min/max calibration on ``num_batches`` batches).

    Returns:
        The size of the int8 file in bytes.

    Raises:
        ValueError: if ``num_batches`` < 1.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if num_batches < 1:
        raise ValueError(f"`num_batches` must be >= 1, got {num_batches}.")

    class Reader(_Reader, CalibrationDataReader):
        pass

    with tempfile.TemporaryDirectory() as tmp:
        pre = os.path.join(tmp, "pre.onnx")
        quant_pre_process(str(fp32_path), pre)
        quantize_static(
            pre,
            str(int8_path),
            Reader(calibration, num_batches, "input"),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    return os.path.getsize(int8_path)


class OnnxRuntimeModel(nn.Module):
    """An ONNX Runtime CPU session behind a torch-like ``forward`` (for evaluation and timing code).

    Args:
        path: the ``.onnx`` file.
        num_threads: intra-op threads of the session.
    """

    def __init__(self, path: str | os.PathLike[str], num_threads: int = 1) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.detach().cpu().numpy().astype(np.float32)})[0]
        return torch.from_numpy(out)
