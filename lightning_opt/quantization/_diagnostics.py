"""Per-layer diagnostics of a quantized graph: ranges, scales and zero points, SQNR."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from lightning_opt import inputs
from lightning_opt.quantization._graph import (
    _fake_quant_modules,
    _node_layer_name,
    _users_through_dequant,
    set_graph_mode,
    state_of,
)
from lightning_opt.quantization._spec import _COMPUTE_TARGETS

# --------------------------------------------------------------------------------------------------------------------
# Diagnostics: ranges and SQNR per layer
# --------------------------------------------------------------------------------------------------------------------


def quant_ranges(graph: torch.fx.GraphModule) -> dict[str, dict[str, float]]:
    """Per-layer quantization parameters of a prepared graph.

    Returns:
        ``{layer: {"scale": ..., "zero_point": ...}}`` for activation quantizers (named after the op producing
        the quantized tensor, or ``input``), and ``{layer.weight: {"scale_mean": .., "scale_min": .., "scale_max":
        ..}}`` for per-channel weight quantizers.
    """
    out: dict[str, dict[str, float]] = {}
    for node in graph.graph.nodes:
        if node.op != "call_module" or not str(node.target).startswith("activation_post_process"):
            continue
        module = graph.get_submodule(str(node.target))
        scale = getattr(module, "scale", None)
        zero_point = getattr(module, "zero_point", None)
        if scale is None or zero_point is None:
            obs: Any = getattr(module, "activation_post_process", module)
            if not hasattr(obs, "calculate_qparams"):
                continue
            try:
                scale, zero_point = obs.calculate_qparams()
            except Exception:
                continue
        src = node.args[0]
        if not isinstance(src, torch.fx.Node):
            continue
        per_channel = getattr(module, "qscheme", None) in (torch.per_channel_symmetric, torch.per_channel_affine)
        if per_channel:
            users = [u for u in _users_through_dequant(node) if u.target in _COMPUTE_TARGETS]
            name = (_node_layer_name(users[0]) if users else _node_layer_name(src)) + ".weight"
            out[name] = {
                "scale_mean": float(scale.float().mean()),
                "scale_min": float(scale.float().min()),
                "scale_max": float(scale.float().max()),
            }
        else:
            name = "input" if src.op == "placeholder" else _node_layer_name(src)
            key, i = name, 1
            while key in out:
                i += 1
                key = f"{name}#{i}"
            out[key] = {"scale": float(scale.float().flatten()[0]), "zero_point": float(zero_point.flatten()[0])}
    return out


def _quantizer_feeding(node: Any, graph: torch.fx.GraphModule, depth: int = 3) -> nn.Module | None:
    """The activation-post-process module whose output ``node`` is, looking back through up to ``depth`` nodes."""
    for _ in range(depth):
        if not isinstance(node, torch.fx.Node):
            return None
        if node.op == "call_module" and str(node.target).startswith("activation_post_process"):
            return graph.get_submodule(str(node.target))
        node = node.args[0] if node.args else None
    return None


def _qparams(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    scale, zero_point = getattr(module, "scale", None), getattr(module, "zero_point", None)
    if isinstance(scale, torch.Tensor) and isinstance(zero_point, torch.Tensor):
        return scale, zero_point
    obs: Any = getattr(module, "activation_post_process", module)
    if not hasattr(obs, "calculate_qparams"):
        return None
    try:
        scale, zero_point = obs.calculate_qparams()
    except Exception:
        return None
    return scale, zero_point


def layer_quant_params(graph: torch.fx.GraphModule) -> dict[str, dict[str, float]]:
    """Quantization parameters of each conv/linear layer of a prepared graph, named as `layer_sqnr` names them.

    Returns:
        ``{layer: {"scale": ..., "zero_point": ..., "weight_scale": ...}}``: the scale and zero point of the layer's
        quantized input, the mean per-channel scale of its quantized weight (each key present when that input is
        quantized).
    """
    out: dict[str, dict[str, float]] = {}
    for node in graph.graph.nodes:
        if node.op != "call_function" or node.target not in _COMPUTE_TARGETS:
            continue
        name, i = _node_layer_name(node), 1
        key = name
        while key in out:
            i += 1
            key = f"{name}#{i}"
        params: dict[str, float] = {}
        for arg, which in ((node.args[0], "input"), (node.args[1] if len(node.args) > 1 else None, "weight")):
            module = _quantizer_feeding(arg, graph)
            qparams = None if module is None else _qparams(module)
            if qparams is None:
                continue
            scale, zero_point = qparams
            if which == "input":
                params["scale"] = float(scale.float().flatten()[0])
                params["zero_point"] = float(zero_point.float().flatten()[0])
            else:
                params["weight_scale"] = float(scale.float().mean())
        out[key] = params
    return out


class _Recorder(torch.fx.Interpreter):
    def __init__(self, graph: torch.fx.GraphModule) -> None:
        super().__init__(graph)
        self.outputs: dict[str, torch.Tensor] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        result = super().run_node(n)
        if n.op == "call_function" and n.target in _COMPUTE_TARGETS and isinstance(result, torch.Tensor):
            name, i = _node_layer_name(n), 1
            key = name
            while key in self.outputs:
                i += 1
                key = f"{name}#{i}"
            self.outputs[key] = result.detach()
        return result


def sqnr_db(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(|ref|^2 / |ref - other|^2)`` (inf when equal)."""
    reference, other = reference.double(), other.double()
    noise = (reference - other).pow(2).sum().item()
    signal = reference.pow(2).sum().item()
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def layer_sqnr(graph: torch.fx.GraphModule, batch: Any) -> dict[str, float]:
    """Per-layer SQNR (dB) of the fake-quant graph against the same graph in fp32, on one batch.

    Each conv/linear output is compared between a run with every fake-quantizer disabled (fp32) and a run with
    them enabled, so the figure includes the error accumulated from earlier layers. The graph is run in eval mode
    and its state (mode, fake-quant and observer flags) is restored afterwards.
    """
    saved = [(m, m.fake_quant_enabled.clone(), m.observer_enabled.clone()) for m in _fake_quant_modules(graph)]
    meta = state_of(graph)
    training, bn_frozen = bool(meta.get("training", False)), bool(meta.get("bn_frozen", False))
    try:
        set_graph_mode(graph, False)
        results = []
        for fake_quant in (False, True):
            for module, _, _ in saved:
                module.fake_quant_enabled.fill_(int(fake_quant))
                module.observer_enabled.fill_(0)
            recorder = _Recorder(graph)
            args, kwargs = inputs.call_args(batch)
            with torch.no_grad():
                recorder.run(*pytree.arg_tree_leaves(*args, **kwargs), enable_io_processing=False)
            results.append(recorder.outputs)
    finally:
        for module, fq, obs in saved:
            module.fake_quant_enabled.copy_(fq)
            module.observer_enabled.copy_(obs)
        set_graph_mode(graph, training, bn_frozen)
    fp32, quant = results
    return {name: sqnr_db(fp32[name], quant[name]) for name in fp32 if name in quant}
