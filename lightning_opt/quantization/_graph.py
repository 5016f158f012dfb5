"""Preparing a captured graph (torchao's QAT/PTQ quantizers) and switching its modes and phases."""

from __future__ import annotations

import operator
import re
import types
from collections.abc import Iterator, Sequence
from typing import Any, cast

import torch
from torch import nn

from lightning_opt.quantization import _torchao
from lightning_opt.quantization._capture import export_for_quantization
from lightning_opt.quantization._spec import (
    _BN_TARGETS,
    _COMPUTE_TARGETS,
    _DROPOUT_P_KEY,
    _DROPOUT_TARGETS,
    _META_KEY,
    _NATIVE_DROPOUT,
    _SDPA,
    QuantSpec,
    validate_scheme,
)

# --------------------------------------------------------------------------------------------------------------------
# Prepare, mode switching, observer / fake-quant control
# --------------------------------------------------------------------------------------------------------------------


def build_quantizer(spec: QuantSpec) -> Any:
    """An ``X86InductorQuantizer`` for the spec: int8 global config, ``None`` (fp32) for skipped module names."""
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    class _Quantizer(X86InductorQuantizer):
        """Drops the empty "keep fp32" annotations of skipped modules once annotation is done.

        torchao marks skipped ops as annotated with no quantization specs; its QAT conv-bn fusion then indexes
        the empty spec list and fails (IndexError). Without an annotation the ops simply stay fp32.
        """

        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            model = super().annotate(model)
            for node in model.graph.nodes:
                annotation = node.meta.get("quantization_annotation")
                if annotation is not None and not annotation.input_qspec_map and annotation.output_qspec is None:
                    del node.meta["quantization_annotation"]
            return model

    validate_scheme(spec.dtype, spec.weight_scheme, spec.activation_scheme)
    config = get_default_x86_inductor_quantization_config(is_qat=spec.mode == "qat", reduce_range=spec.reduce_range)
    quantizer = (_Quantizer() if spec.skip else X86InductorQuantizer()).set_global(config)
    for name in spec.skip:
        quantizer.set_module_name_qconfig(name, None)
    return quantizer


def prepare(module: nn.Module, spec: QuantSpec, example: Any = None) -> torch.fx.GraphModule:
    """Export ``module`` and insert fake-quant (``spec.mode == "qat"``) or observers (``"ptq"``).

    The result keeps the parameter objects (and names) of ``module``, so an optimizer built on them stays valid.
    Its ``train()``/``eval()`` switch BatchNorm and dropout inside the graph (see `set_graph_mode`).
    In QAT mode fake-quant and observers start *disabled* (fp32 warm-up); switch them with `set_phase`.
    QAT conv-BatchNorm pairs keep each BatchNorm's own ``eps`` and stay finite when a BatchNorm weight is zero
    (``_torchao.patch_qat_conv_bn``), so the prepared graph computes what the fp32 model computes before training.

    Args:
        module: the fp32 module.
        spec: what to quantize and how.
        example: the example input; default the spec's recorded one.
    """
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e, prepare_qat_pt2e

    _torchao.check_torchao_version()
    if spec.mode not in ("qat", "ptq"):
        raise ValueError(f"`mode` must be 'qat' or 'ptq', got {spec.mode!r}.")
    example = spec.example_input() if example is None else example
    training = module.training
    module.train(spec.mode == "qat")
    try:
        graph = export_for_quantization(module, example, spec.module)
    finally:
        module.train(training)
    quantizer = build_quantizer(spec)
    eps = _torchao.bn_eps(graph)
    prepared = prepare_qat_pt2e(graph, quantizer) if spec.mode == "qat" else prepare_pt2e(graph, quantizer)
    if spec.mode == "qat":
        _torchao.patch_qat_conv_bn(prepared, eps)
    prepared.meta[_META_KEY] = {
        "spec": spec.to_dict(),
        "training": spec.mode == "qat",
        "bn_frozen": False,
        "fake_quant": spec.mode != "qat",
        "observers": spec.mode != "qat",
    }
    install_train_eval(prepared)
    _check_skipped(prepared, spec.skip)
    if spec.mode == "qat":
        set_phase(prepared, fake_quant=False, observers=False)
    else:
        prepared.eval()
    return prepared


def quantized_weight_layers(graph: torch.fx.GraphModule) -> list[str]:
    """Names of the conv/linear layers whose weights the prepared graph quantizes."""
    names = []
    for node in graph.graph.nodes:
        if node.op != "call_module" or not str(node.target).startswith("activation_post_process"):
            continue
        module = graph.get_submodule(str(node.target))
        if getattr(module, "qscheme", None) in (torch.per_channel_symmetric, torch.per_channel_affine):
            names += [_node_layer_name(u) for u in _users_through_dequant(node) if u.target in _COMPUTE_TARGETS]
    return names


def _check_skipped(graph: torch.fx.GraphModule, skip: Sequence[str]) -> None:
    quantized = quantized_weight_layers(graph)
    for name in skip:
        hits = [q for q in quantized if q == name or q.startswith(name + ".")]
        if hits:
            parent = name.rpartition(".")[0] or "<the whole block>"
            raise ValueError(
                f"`skip` keeps {name!r} in fp32, but the quantizer still quantizes {hits}: the x86 quantizer treats "
                "conv/linear + BatchNorm + activation as one pattern and skips it only when the whole pattern lies "
                f"inside the skipped module. HINT: skip the enclosing module instead (e.g. {parent!r})."
            )


def is_prepared(module: nn.Module) -> bool:
    """Whether ``module`` is a graph produced by `prepare`."""
    return isinstance(module, torch.fx.GraphModule) and _META_KEY in module.meta


def spec_of(module: nn.Module) -> QuantSpec:
    """The `QuantSpec` a prepared graph was built with."""
    return QuantSpec.from_dict(cast(Any, module).meta[_META_KEY]["spec"])


def state_of(module: torch.fx.GraphModule) -> dict[str, Any]:
    """The live switches of a prepared graph (training, bn_frozen, fake_quant, observers)."""
    return module.meta.setdefault(_META_KEY, {})


def set_graph_mode(graph: torch.fx.GraphModule, training: bool, bn_frozen: bool | None = None) -> None:
    """Switch BatchNorm and dropout nodes between train and eval behaviour by rewriting their ``training`` flags.

    An exported graph bakes ``training`` into the op arguments, so ``nn.Module.train()`` alone changes nothing.
    This flips the flags in place (cheap: no pattern re-tracing). With ``bn_frozen`` BatchNorm keeps using its
    running statistics (and stops updating them) even in training.
    """
    meta = graph.meta.setdefault(_META_KEY, {})
    if bn_frozen is None:
        bn_frozen = bool(meta.get("bn_frozen", False))
    bn_training = training and not bn_frozen
    changed = False
    for node in graph.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _BN_TARGETS and node.args[5] != bn_training:
            args = list(node.args)
            args[5] = bn_training
            node.args = tuple(args)
            changed = True
        elif (
            node.target is torch.ops.aten.add_.Tensor
            and isinstance(node.args[0], torch.fx.Node)
            and node.args[0].op == "get_attr"
            and str(node.args[0].target).endswith("num_batches_tracked")
            and node.args[1] != int(bn_training)
        ):  # BatchNorm's step counter: counts only while the statistics update
            node.args = (node.args[0], int(bn_training))
            changed = True
        elif node.target in (*_DROPOUT_TARGETS, _NATIVE_DROPOUT) and node.args[2] != training:
            args = list(node.args)
            args[2] = training
            node.args = tuple(args)
            changed = True
        elif node.target is _SDPA:
            changed |= _set_sdpa_dropout(node, training)
    if changed:
        graph.recompile()
    meta["training"] = training
    meta["bn_frozen"] = bn_frozen


def _set_sdpa_dropout(node: torch.fx.Node, training: bool) -> bool:
    """Attention dropout (``dropout_p`` of ``scaled_dot_product_attention``) on in training, 0 otherwise."""
    args = list(node.args)
    current = node.kwargs.get("dropout_p", args[4] if len(args) > 4 else 0.0)
    original = node.meta.setdefault(_DROPOUT_P_KEY, current)
    wanted = original if training else 0.0
    if current == wanted:
        return False
    if "dropout_p" in node.kwargs or len(args) <= 4:
        node.kwargs = {**node.kwargs, "dropout_p": wanted}
    else:
        args[4] = wanted
        node.args = tuple(args)
    return True


def strip_dropout(graph: torch.fx.GraphModule) -> int:
    """Remove every dropout of an inference graph: ``dropout``/``dropout_`` nodes, ``native_dropout`` (whose mask
    output becomes all-true) and attention dropout (``dropout_p`` of ``scaled_dot_product_attention`` set to 0).

    Returns:
        The number of dropouts removed or turned off.
    """
    removed = 0
    for node in list(graph.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _DROPOUT_TARGETS:
            node.replace_all_uses_with(node.args[0])
            graph.graph.erase_node(node)
            removed += 1
        elif node.target is _NATIVE_DROPOUT:
            x = node.args[0]
            for user in list(node.users):
                if user.target is operator.getitem and user.args[1] == 0:
                    user.replace_all_uses_with(x)
                elif user.target is operator.getitem:
                    with graph.graph.inserting_before(user):
                        ones = graph.graph.call_function(torch.ops.aten.ones_like.default, (x,), {"dtype": torch.bool})
                    user.replace_all_uses_with(ones)
                graph.graph.erase_node(user)
            graph.graph.erase_node(node)
            removed += 1
        elif node.target is _SDPA:
            removed += int(_set_sdpa_dropout(node, False))
            node.meta[_DROPOUT_P_KEY] = 0.0  # for good: ``train()`` on the inference graph keeps it off
    graph.graph.eliminate_dead_code()
    graph.recompile()
    return removed


def _fake_quant_modules(graph: nn.Module) -> Iterator[Any]:
    for module in graph.modules():
        if hasattr(module, "fake_quant_enabled") and hasattr(module, "observer_enabled"):
            yield module


def set_quant_state(graph: torch.fx.GraphModule, fake_quant: bool, observers: bool) -> None:
    """Enable/disable fake quantization and observer updates of a QAT graph (the buffers are checkpointed)."""
    for module in _fake_quant_modules(graph):
        module.fake_quant_enabled.fill_(int(fake_quant))
        module.observer_enabled.fill_(int(observers))
    meta = graph.meta.setdefault(_META_KEY, {})
    meta["fake_quant"] = fake_quant
    meta["observers"] = observers


def _apply_mode(graph: torch.fx.GraphModule, mode: bool) -> None:
    set_graph_mode(graph, mode)
    meta = state_of(graph)
    if meta.get("spec", {}).get("mode") == "qat":
        live = mode and bool(meta.get("observers_requested", False))
        for module in _fake_quant_modules(graph):
            module.observer_enabled.fill_(int(live))


def sync_mode(graph: nn.Module, *args: Any) -> None:
    """Make the graph's ops follow ``graph.training`` when it was assigned without ``train()``/``eval()``.

    Lightning's evaluation loop restores module modes by assigning ``.training`` directly, so the QAT callback
    calls this at each training batch start. It is also a forward pre-hook of the graph; note that a pre-hook runs
    after ``nn.Module`` has looked up ``forward``, so that call still runs the old code and the next one the new.
    """
    if graph.training != state_of(graph).get("training"):  # type: ignore[arg-type]
        _apply_mode(graph, graph.training)  # type: ignore[arg-type]


def install_train_eval(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Make ``graph.train()``/``graph.eval()`` (called by Lightning on the root) switch the graph's ops.

    BatchNorm/dropout flags follow the mode (see `set_graph_mode`). For QAT graphs observers never update in
    eval mode (validation must not move the quantization ranges); in train mode they update when the current phase
    asks for it (`set_phase`). Fake-quant stays as the phase set it, so evaluation sees the quantized model.
    A forward pre-hook also syncs the graph with its ``training`` attribute when that was assigned directly.
    """

    def _train(self: torch.fx.GraphModule, mode: bool = True) -> torch.fx.GraphModule:
        self.training = mode
        for sub in self.children():
            sub.train(mode)
        _apply_mode(self, mode)
        return self

    def _eval(self: torch.fx.GraphModule) -> torch.fx.GraphModule:
        return _train(self, False)

    graph.train = types.MethodType(_train, graph)  # type: ignore[method-assign]
    graph.eval = types.MethodType(_eval, graph)  # type: ignore[method-assign]
    if not getattr(graph, "_lightning_opt_sync", False):
        graph.register_forward_pre_hook(sync_mode)
        setattr(graph, "_lightning_opt_sync", True)  # noqa: B010
    graph.training = bool(state_of(graph).get("training", graph.training))
    return graph


def set_phase(graph: torch.fx.GraphModule, fake_quant: bool, observers: bool) -> None:
    """Set the QAT phase: fake-quant on/off, and whether observers update while training (never in eval)."""
    meta = state_of(graph)
    meta["observers_requested"] = observers
    set_quant_state(graph, fake_quant=fake_quant, observers=observers and bool(meta.get("training", False)))


def _node_layer_name(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path = list(stack.values())[-1][0]
        path = re.sub(r"^L\['self'\]\.?", "", str(path))
        if path:
            return path
    return node.name


def _users_through_dequant(node: torch.fx.Node, depth: int = 3) -> list[torch.fx.Node]:
    """Users of ``node``, looking through up to ``depth`` intermediate nodes (reshape, dequantize, ...)."""
    found: list[torch.fx.Node] = []
    frontier = list(node.users)
    for _ in range(depth):
        nxt: list[torch.fx.Node] = []
        for user in frontier:
            if user.op == "call_function" and user.target in _COMPUTE_TARGETS:
                found.append(user)
            else:
                nxt.extend(user.users)
        if found:
            return found
        frontier = nxt
    return found
