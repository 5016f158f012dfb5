"""Conversion to int8, the rehearsal of it, ``.pt2`` artifacts and compiled inference."""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from lightning_opt import inputs
from lightning_opt._io import atomic_path
from lightning_opt._utils import detached_copy
from lightning_opt.quantization import _torchao
from lightning_opt.quantization._capture import _export, _first_line, _no_kv_cache
from lightning_opt.quantization._graph import (
    _fake_quant_modules,
    _node_layer_name,
    install_train_eval,
    prepare,
    set_graph_mode,
    set_phase,
    state_of,
    strip_dropout,
)
from lightning_opt.quantization._spec import _META_KEY, QuantizationExportError, QuantSpec

# --------------------------------------------------------------------------------------------------------------------
# Conversion, artifacts, compiled inference
# --------------------------------------------------------------------------------------------------------------------


def unobserved(graph: nn.Module) -> list[str]:
    """Names of quantizers that never saw data (their ranges are still +-inf): conversion would fail on them."""
    names = []
    for name, module in graph.named_modules():
        obs = getattr(module, "activation_post_process", None)
        min_val = getattr(obs, "min_val", None)
        if isinstance(min_val, torch.Tensor) and (min_val.numel() == 0 or bool(torch.isinf(min_val).any())):
            names.append(name)
    return names


def observe(graph: torch.fx.GraphModule, batches: Iterator[Any] | Sequence[Any]) -> None:
    """Run inputs through the graph in eval mode with observers on (a calibration pass), then restore its state.

    Args:
        graph: a prepared graph.
        batches: model inputs (each a tensor, a tuple of positional tensors or a dict of keyword tensors).
    """
    saved = [(m, m.fake_quant_enabled.clone(), m.observer_enabled.clone()) for m in _fake_quant_modules(graph)]
    meta = state_of(graph)
    training, bn_frozen = bool(meta.get("training", False)), bool(meta.get("bn_frozen", False))
    try:
        set_graph_mode(graph, False)
        for module, _, _ in saved:
            module.observer_enabled.fill_(1)
        with torch.no_grad():
            for x in batches:
                inputs.call(graph, x)
    finally:
        for module, fq, _ in saved:
            module.fake_quant_enabled.copy_(fq)
            module.observer_enabled.fill_(0)
        set_graph_mode(graph, training, bn_frozen)
        for module, _, obs in saved:
            module.observer_enabled.copy_(obs)


def convert(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Convert a prepared (trained or calibrated) graph into a real int8 graph; the input graph is left untouched.

    Weights are stored as int8 tensors with per-channel scales; activations get quantize/dequantize pairs that
    inductor fuses into oneDNN int8 kernels (see `compile_int8`). BatchNorm is folded into the convs.
    """
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    work = copy.deepcopy(graph)
    work.meta[_META_KEY] = copy.deepcopy(graph.meta.get(_META_KEY, {}))
    set_graph_mode(work, False)
    for module in _fake_quant_modules(work):
        module.observer_enabled.fill_(0)
        module.fake_quant_enabled.fill_(1)
    _torchao.unpatch_qat_conv_bn(work)
    with _torchao.fast_conv_bn_fold(work):
        converted = convert_pt2e(work)
    strip_dropout(converted)
    drop_unused_tensors(converted)
    converted.meta[_META_KEY] = {"training": False, "bn_frozen": False}
    install_train_eval(converted)
    return converted


class _Found(Exception):
    def __init__(self, node: torch.fx.Node, detail: str) -> None:
        super().__init__(detail)
        self.node, self.detail = node, detail


class _BadNodeFinder(torch.fx.Interpreter):
    """Runs a graph node by node and stops at the first node that raises or returns non-finite floats."""

    def run_node(self, n: torch.fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as err:
            raise _Found(n, _first_line(err)) from err
        if n.op in ("call_function", "call_module"):
            for t in inputs.flat_tensors(result if isinstance(result, (tuple, list, dict)) else [result]):
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise _Found(n, "it produces non-finite values (NaN/inf)")
        return result


def _find_bad_node(graph: torch.fx.GraphModule, example: Any) -> tuple[str, str] | None:
    """(layer name, what goes wrong) of the first node of ``graph`` that fails or turns non-finite on ``example``."""
    args, kwargs = inputs.call_args(example)
    try:
        with torch.no_grad():
            _BadNodeFinder(graph).run(*pytree.arg_tree_leaves(*args, **kwargs), enable_io_processing=False)
    except _Found as found:
        node = found.node
        source = node if node.op != "call_module" or not node.args else node.args[0]
        name = _node_layer_name(source) if isinstance(source, torch.fx.Node) else node.name
        return name, f"{node.target}: {found.detail}"
    except Exception:
        return None
    return None


def _refuse(spec: QuantSpec, stage: str, layer: str | None, detail: str) -> QuantizationExportError:
    where = ".".join(p for p in (spec.module, layer or "") if p) or "<root>"
    skip = f"skip=[{re.escape(layer)!r}]" if layer else "skip=['<layer>']"
    return QuantizationExportError(
        f"Cannot quantize: rehearsing fit end on a copy of the model ({stage}) fails at `{where}`: {detail}. "
        f"Training was not started. HINT: keep that layer in fp32 with `{skip}` (names relative to "
        f"`{spec.module or '<root>'}`), or quantize only a part that converts with `module=`."
    )


def _check_output(graph: torch.fx.GraphModule, spec: QuantSpec, stage: str, example: Any) -> None:
    try:
        with torch.no_grad():
            out = inputs.call(graph, example)
    except Exception as err:
        bad = _find_bad_node(graph, example)
        raise _refuse(spec, stage, bad[0] if bad else None, bad[1] if bad else _first_line(err)) from err
    tensors = inputs.flat_tensors(out if isinstance(out, (tuple, list, dict)) else [out])
    if any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in tensors):
        bad = _find_bad_node(graph, example)
        raise _refuse(spec, stage, bad[0] if bad else None, bad[1] if bad else "non-finite outputs")


def rehearse(module: nn.Module, spec: QuantSpec, batches: Sequence[Any]) -> torch.fx.GraphModule:
    """Run what fit end does on a deep copy of ``module`` and return the int8 graph; ``module`` is not touched.

    Capture and prepare as ``spec`` says; for QAT a training-mode forward with fake quantization and observers on;
    calibration on ``batches``; `convert`; a forward of the converted graph. Each output must be finite.

    Args:
        module: the fp32 submodule that will be quantized.
        spec: the spec fit end will use.
        batches: real model inputs (at least one) for the forward and calibration passes.

    Raises:
        QuantizationExportError: naming the failing layer (relative to ``spec.module``) and the ``skip`` to use.
    """
    work = detached_copy(module)
    graph = prepare(work, spec)
    example = batches[0]
    if spec.mode == "qat":
        graph.train()
        set_phase(graph, fake_quant=True, observers=True)
        _check_output(graph, spec, "a QAT training step", example)
        set_phase(graph, fake_quant=True, observers=False)
    observe(graph, batches)
    graph.eval()
    _check_output(graph, spec, "calibrated fake-quant model", example)
    try:
        converted = convert(graph)
    except Exception as err:
        raise _refuse(spec, "conversion to int8", None, _first_line(err)) from err
    _check_output(converted, spec, "int8 model", example)
    return converted


def drop_unused_tensors(graph: torch.fx.GraphModule) -> list[str]:
    """Remove the parameters and buffers that no node of ``graph`` reads; returns their names.

    ``convert_pt2e`` replaces each quantized weight by an int8 constant but leaves the fp32 parameter it came from on
    the module, and ``torch.export`` saves every parameter: without this the int8 ``.pt2`` would hold the fp32 weights
    too and be larger than the fp32 model (60 MB instead of 12 MB for resnet18).
    """
    used = {str(n.target) for n in graph.graph.nodes if n.op == "get_attr"}
    owners = [str(n.target) for n in graph.graph.nodes if n.op == "call_module"]  # their tensors are read inside
    dropped = []
    named = [*graph.named_parameters(remove_duplicate=False), *graph.named_buffers(remove_duplicate=False)]
    for name, _ in named:
        if name in used or any(name.startswith(f"{owner}.") for owner in owners):
            continue
        prefix, _, leaf = name.rpartition(".")
        owner = graph.get_submodule(prefix) if prefix else graph
        owner._parameters.pop(leaf, None)
        owner._buffers.pop(leaf, None)
        dropped.append(name)
    return dropped


def export_artifact(model: nn.Module, example: Any) -> torch.export.ExportedProgram:
    """``torch.export`` an inference model (int8 or fp32) with a dynamic batch dimension, dropout removed.

    Args:
        model: the model to save; it is put in eval mode.
        example: its example input (tensor, tuple of positional tensors or dict of keyword tensors).
    """
    model.eval()
    with torch.no_grad(), _no_kv_cache(model):
        program = _export(model, example, strict=False)
    return program


def save_artifact(model: nn.Module, example: Any, path: str | os.PathLike[str]) -> int:
    """Export and save as a ``.pt2`` file; returns its size in bytes."""
    program = export_artifact(model, example)
    with atomic_path(path) as tmp:
        torch.export.save(program, tmp)
    return os.path.getsize(path)


def load_artifact(path: str | os.PathLike[str]) -> nn.Module:
    """Load a ``.pt2`` saved by `save_artifact` (in any process) as an eager module.

    Importing torchao registers the ``quantized_decomposed`` ops the int8 graph uses.
    """
    import torchao.quantization.pt2e  # noqa: F401  (registers quantized_decomposed ops)

    module = torch.export.load(path).module()
    if isinstance(module, torch.fx.GraphModule):
        state_of(module)["training"] = False
        install_train_eval(module)
    return module


class CompiledInference(nn.Module):
    """``torch.compile`` with inductor freezing (int8 q/dq patterns -> oneDNN kernels), fixed shapes.

    Inductor only lowers the int8 patterns when ``torch._inductor.config.freezing`` is set while compiling, so each
    new input shape is compiled under that setting. Call under ``torch.no_grad()``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval()
        self.compiled = torch.compile(model, dynamic=False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        import torch._inductor.config as inductor_config

        with torch.no_grad(), inductor_config.patch(freezing=True):
            return self.compiled(*args, **kwargs)
