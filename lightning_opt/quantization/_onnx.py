"""The ONNX Runtime route: fp32 ``torch.onnx.export(dynamo=True)``, then onnxruntime static int8 (QDQ, per channel)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_opt import inputs
from lightning_opt._io import atomic_path
from lightning_opt.quantization import _pt2e

__all__ = ["OnnxRuntimeModel", "export_onnx", "quantize_onnx"]


def export_onnx(model: nn.Module, example: Any, path: str | os.PathLike[str]) -> int:
    """Export an fp32 eager model to ONNX (dynamo exporter) with a dynamic batch dimension; returns the file size.

    Each input tensor becomes a named graph input: a dict example's keys, else ``input`` for a single tensor and
    ``input_0, input_1, ...`` for positional tensors. Integer inputs (token ids, masks) keep their dtype.

    Args:
        model: the fp32 eager model (a QAT graph cannot be exported to ONNX: convert its weights back to an eager
            model first, see ``lightning-opt export``).
        example: one example input: a tensor, a tuple of positional tensors or a dict of keyword tensors.
        path: the ``.onnx`` file to write.

    Raises:
        QuantizationExportError: when ``torch.export`` cannot capture the model; names the submodule and the error.

    Examples:
        >>> export_onnx(nn.Linear(4, 2), torch.zeros(1, 4), "/tmp/lin.onnx") > 0  # doctest: +SKIP
        True
    """
    model = model.eval()
    x = _pt2e._as_batch(example)
    args, kwargs = inputs.call_args(x)
    try:
        _pt2e.capture(model, x)  # the exporter's first step, with a readable failure naming the layer
    except Exception as err:
        where, cls_name, detail = _pt2e._locate_export_failure(model, x)
        raise _pt2e.QuantizationExportError(
            f"Cannot export to ONNX: `{where or '<root>'}` ({cls_name}) cannot be captured by torch.export: {detail}. "
            "HINT: export an exportable part of the model (`module=`), or rewrite the failing op in tensor ops."
        ) from err
    with torch.no_grad(), _pt2e._no_kv_cache(model), atomic_path(path) as tmp:
        torch.onnx.export(
            model,
            args,
            str(tmp),
            kwargs=kwargs or None,
            dynamo=True,
            input_names=inputs.input_names(x),
            output_names=["output"],
            dynamic_shapes=_pt2e._dynamic_shapes(model, args, kwargs),
            external_data=False,
        )
    return os.path.getsize(path)


def _feed(example: Any, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Onnxruntime inputs of an example: its tensors by input name, floats as float32, integers as they are."""
    feed = {}
    for name, t in zip(inputs.input_names(example), inputs.flat_tensors(example)):
        if name in names:
            array = t.detach().cpu().numpy()
            feed[name] = array.astype(np.float32) if np.issubdtype(array.dtype, np.floating) else array
    return feed


class _Reader:
    """onnxruntime ``CalibrationDataReader`` over the model inputs of the first ``num_batches`` dataloader batches."""

    def __init__(self, batches: Iterable[Any], num_batches: int, names: Sequence[str]) -> None:
        self._items = []
        for i, batch in enumerate(batches):
            if i >= num_batches:
                break
            self._items.append(_feed(inputs.batch_inputs(batch), names))
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
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if num_batches < 1:
        raise ValueError(f"`num_batches` must be >= 1, got {num_batches}.")

    class Reader(_Reader, CalibrationDataReader):
        pass

    with tempfile.TemporaryDirectory() as tmp:
        pre = os.path.join(tmp, "pre.onnx")
        quant_pre_process(str(fp32_path), pre)
        names = [i.name for i in onnx.load(pre, load_external_data=False).graph.input]
        with atomic_path(int8_path) as tmp_int8:
            quantize_static(
                pre,
                str(tmp_int8),
                Reader(calibration, num_batches, names),
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
        self.input_names = [i.name for i in self.session.get_inputs()]

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Run the session on inputs given as the model takes them (positional or keyword tensors)."""
        example: Any = kwargs if kwargs else (args[0] if len(args) == 1 else args)
        out = self.session.run(None, _feed(example, self.input_names))[0]
        return torch.from_numpy(out)
