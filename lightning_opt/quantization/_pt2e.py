"""Pure pt2e plumbing (no Lightning): export, prepare, mode switching, conversion, artifacts, diagnostics.

Built on torchao 0.18's pt2e flow with the x86 inductor quantizer: ``torch.export.export(strict=True)`` ->
``prepare_qat_pt2e`` / ``prepare_pt2e`` -> ``convert_pt2e`` -> ``torch.export.save`` (``.pt2``) and, for speed,
``torch.compile`` with inductor freezing, which lowers the quantize/dequantize patterns to oneDNN int8 kernels.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import operator
import os
import re
import types
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch
import torch.utils._pytree as pytree
from torch import nn

from lightning_opt import inputs
from lightning_opt._io import atomic_path
from lightning_opt._utils import detached_copy
from lightning_opt.quantization import _torchao

SUPPORTED_DTYPES = ("int8",)
SUPPORTED_WEIGHT_SCHEMES = ("per_channel_symmetric",)
SUPPORTED_ACTIVATION_SCHEMES = ("per_tensor_affine",)

_META_KEY = "lightning_opt_quantization"
_BN_TARGETS = (torch.ops.aten.batch_norm.default,)
_DROPOUT_TARGETS = (torch.ops.aten.dropout.default, torch.ops.aten.dropout_.default)
_NATIVE_DROPOUT = torch.ops.aten.native_dropout.default
_SDPA = torch.ops.aten.scaled_dot_product_attention.default
_DROPOUT_P_KEY = "lightning_opt_dropout_p"
_COMPUTE_TARGETS = (
    torch.ops.aten.conv1d.default,
    torch.ops.aten.conv2d.default,
    torch.ops.aten.conv3d.default,
    torch.ops.aten.linear.default,
)


class QuantizationExportError(RuntimeError):
    """Raised when a module cannot be captured by ``torch.export`` for quantization."""


@dataclass
class QuantSpec:
    """Everything needed to rebuild a prepared (fake-quant) structure, stored with checkpoints.

    Args:
        module: attribute path of the quantized submodule inside the root (``""`` is the root itself).
        input_shape: shape of the first example tensor (informative; the batch dimension is exported as dynamic).
        input_dtype: dtype name of the first example tensor, e.g. ``"float32"`` or ``"int64"``.
        mode: ``"qat"`` (fake-quant, trainable) or ``"ptq"`` (observers, calibration).
        skip: exact module names (relative to the quantized submodule) kept in fp32.
        dtype: quantized dtype.
        weight_scheme: weight quantization scheme.
        activation_scheme: activation quantization scheme.
        reduce_range: use 7-bit activations (for CPUs without VNNI whose int8 kernels may saturate).
        example: the real example input (a tensor, a tuple of positional tensors or a dict of keyword tensors, one
            row each, CPU), so that a checkpoint rebuilds the graph from the very inputs it was captured with.

    Examples:
        >>> ids = torch.tensor([[5, 7, 9]])
        >>> spec = QuantSpec.for_example("backbone", (ids, torch.ones_like(ids)))
        >>> spec.input_shape, spec.input_dtype, spec.example_input()[0].tolist()
        ([1, 3], 'int64', [[5, 7, 9]])
    """

    module: str
    input_shape: list[int] | None = None
    input_dtype: str = "float32"
    mode: str = "qat"
    skip: list[str] = field(default_factory=list)
    dtype: str = "int8"
    weight_scheme: str = "per_channel_symmetric"
    activation_scheme: str = "per_tensor_affine"
    reduce_range: bool = False
    example: Any = None

    @classmethod
    def for_example(cls, module: str, example: Any, **kwargs: Any) -> QuantSpec:
        """A spec that records the first row of ``example`` (its real values and dtypes)."""
        stored = inputs.to_cpu(inputs.first_rows(example, 1))
        first = inputs.flat_tensors(stored)[0]
        return cls(
            module=module,
            input_shape=list(first.shape),
            input_dtype=inputs.as_dtype_name(first),
            example=stored,
            **kwargs,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (for checkpoints; ``example`` holds tensors, so use ``torch.save``, not json)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantSpec:
        """Inverse of `to_dict`."""
        return cls(**data)

    def example_input(self) -> Any:
        """The recorded example input (a copy); specs of older checkpoints get a seeded float tensor of their shape.

        Raises:
            ValueError: when the spec records neither an example nor a floating-point shape (integer inputs such as
                token ids are never made up).
        """
        if self.example is not None:
            return inputs.map_tensors(self.example, lambda t: t.clone())
        if self.input_shape is None or self.input_dtype not in ("float32", "float16", "bfloat16", "float64"):
            raise ValueError(
                f"The quantization spec of `{self.module or '<root>'}` records no example input (dtype "
                f"{self.input_dtype}, shape {self.input_shape}): integer inputs cannot be made up. HINT: set "
                "`example_input_array` on the LightningModule and run the callback again."
            )
        gen = torch.Generator().manual_seed(0)
        return torch.randn(*self.input_shape, generator=gen).to(getattr(torch, self.input_dtype))


def validate_scheme(dtype: str, weight_scheme: str, activation_scheme: str) -> None:
    """Check that the requested scheme is one the x86 inductor int8 path supports.

    Raises:
        ValueError: naming the argument, the value and the accepted values.
    """
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"`dtype` must be one of {list(SUPPORTED_DTYPES)}, got {dtype!r}. HINT: the x86 inductor backend runs "
            "int8 kernels only (uint8 activations, int8 weights); float8/int4 have no fast CPU path here."
        )
    if weight_scheme not in SUPPORTED_WEIGHT_SCHEMES:
        raise ValueError(
            f"`weight_scheme` must be one of {list(SUPPORTED_WEIGHT_SCHEMES)}, got {weight_scheme!r}. "
            "HINT: the x86 inductor quantizer quantizes weights per output channel, symmetric."
        )
    if activation_scheme not in SUPPORTED_ACTIVATION_SCHEMES:
        raise ValueError(
            f"`activation_scheme` must be one of {list(SUPPORTED_ACTIVATION_SCHEMES)}, got {activation_scheme!r}. "
            "HINT: activations are quantized per tensor with a zero point (uint8 affine)."
        )


# --------------------------------------------------------------------------------------------------------------------
# Module paths and skip patterns
# --------------------------------------------------------------------------------------------------------------------


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    """``root.get_submodule(path)``, with ``""`` meaning the root."""
    return root if not path else root.get_submodule(path)


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at ``path`` (non-empty) by ``module``."""
    parent_path, _, name = path.rpartition(".")
    setattr(get_submodule(root, parent_path), name, module)


def default_module_path(root: nn.Module) -> str:
    """The model's ``backbone`` attribute when it has one, else the whole model (``""``)."""
    backbone = getattr(root, "backbone", None)
    return "backbone" if isinstance(backbone, nn.Module) else ""


def resolve_skip_patterns(module: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Expand fp32-skip regexes into the module names they fully match.

    Args:
        module: the module about to be quantized (names are relative to it).
        patterns: regular expressions, each matched with ``re.fullmatch`` against ``named_modules()`` names.

    Returns:
        The matched module names, in model order.

    Raises:
        ValueError: when a pattern is not a valid regex or matches no module.
    """
    names = [name for name, _ in module.named_modules() if name]
    matched: list[str] = []
    for pattern in patterns:
        try:
            regex = re.compile(pattern)
        except re.error as err:
            raise ValueError(f"`skip` pattern {pattern!r} is not a valid regular expression: {err}.") from err
        hits = [name for name in names if regex.fullmatch(name)]
        if not hits:
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise ValueError(
                f"`skip` pattern {pattern!r} matches no module of the quantized model. Module names are: {shown}. "
                "HINT: patterns are full-matched regexes on names relative to the quantized module, e.g. 'head' or "
                r"'features\.0|classifier.*'."
            )
        matched.extend(name for name in hits if name not in matched)
    return matched


# --------------------------------------------------------------------------------------------------------------------
# Export with a readable failure
# --------------------------------------------------------------------------------------------------------------------


def _as_batch(example: Any) -> Any:
    """Export specializes a batch of 1; give every batched tensor 2 rows so the batch dimension stays dynamic."""
    try:
        rows = inputs.batch_size(example)
    except ValueError:
        return example
    return inputs.repeat_to(example, 2) if rows == 1 else example


def _dynamic_shapes(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """A dynamic batch dimension (``Dim.AUTO``: kept dynamic where the model allows) on every batched tensor.

    Given by parameter name of ``module.forward`` (so ``forward(self, *args, **kwargs)`` works too).
    """

    def spec(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return {0: torch.export.Dim.AUTO} if value.dim() > 0 else None
        if isinstance(value, dict):
            return {k: spec(v) for k, v in value.items()}
        if isinstance(value, (tuple, list)):
            return type(value)(spec(v) for v in value)
        return None

    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return {k: spec(v) for k, v in kwargs.items()} if kwargs else tuple(spec(a) for a in args)
    return {name: spec(value) for name, value in bound.arguments.items()}


def _export(module: nn.Module, example: Any, strict: bool = True) -> torch.export.ExportedProgram:
    example = _as_batch(example)
    args, kwargs = inputs.call_args(example)
    dynamic_shapes = _dynamic_shapes(module, args, kwargs)
    return torch.export.export(module, args, kwargs or None, dynamic_shapes=dynamic_shapes, strict=strict)


def capture(module: nn.Module, example: Any) -> torch.export.ExportedProgram:
    """``torch.export`` for quantization: strict first (reused modules keep their names), else non-strict.

    Strict capture (TorchDynamo) is what the x86 quantizer's patterns are written for; models whose Python Dynamo
    cannot trace (Hugging Face models' config checks, for example) are captured in non-strict mode, which runs the
    Python eagerly and records the same aten ops.
    """
    with _no_kv_cache(module):
        try:
            return _export(module, example, strict=True)
        except Exception:
            return _export(module, example, strict=False)


@contextlib.contextmanager
def _no_kv_cache(module: nn.Module) -> Iterator[None]:
    """Capture Hugging Face models with ``config.use_cache = False``.

    A key/value cache (``DynamicCache``) is an object for step-by-step generation that a graph cannot return; the
    logits do not depend on it. The captured graph therefore returns no cache; the config is restored afterwards.
    """
    configs: list[Any] = []
    for sub in module.modules():
        config = getattr(sub, "config", None)
        if getattr(config, "use_cache", False) is True and all(config is not c for c in configs):
            configs.append(config)
    for config in configs:
        config.use_cache = False
    try:
        yield
    finally:
        for config in configs:
            config.use_cache = True


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    line = next((t.strip() for t in text if t.strip()), type(err).__name__)
    return line[:300]


def _locate_export_failure(module: nn.Module, example: Any) -> tuple[str, str, str]:
    """Find the deepest submodule that fails to export on the inputs it really receives.

    Returns:
        (module path, class name, first line of the export error).
    """
    seen: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}
    handles = []
    for name, sub in module.named_modules():

        def hook(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], _name: str = name) -> None:
            seen.setdefault(_name, (args, kwargs))

        handles.append(sub.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            inputs.call(module, example)
    except Exception as err:  # the eager forward itself fails: that is the clearest message
        return "", type(module).__name__, _first_line(err)
    finally:
        for handle in handles:
            handle.remove()

    def fails(name: str) -> str | None:
        if name not in seen:
            return None
        args, kwargs = seen[name]
        if not all(isinstance(a, torch.Tensor) for a in (*args, *kwargs.values())):
            return None
        try:
            sub = get_submodule(module, name)
            if name:
                torch.export.export(sub, args, kwargs or None, strict=True)
            else:
                capture(sub, example)
        except Exception as err:
            return _first_line(err)
        return None

    path, error = "", fails("") or "unknown export error"
    while True:
        sub = get_submodule(module, path)
        for child_name, _ in sub.named_children():
            child_path = f"{path}.{child_name}" if path else child_name
            child_error = fails(child_path)
            if child_error is not None:
                path, error = child_path, child_error
                break
        else:
            return path, type(get_submodule(module, path)).__name__, error


def export_for_quantization(module: nn.Module, example: Any, module_path: str = "") -> torch.fx.GraphModule:
    """``torch.export`` the module with a dynamic batch dimension and unlift it to a GraphModule (see `capture`).

    Args:
        module: the fp32 module, in the mode (train/eval) the graph should capture.
        example: one example input: a tensor, a tuple of positional tensors or a dict of keyword tensors.
        module_path: its name in the root model (used in error messages).

    Raises:
        QuantizationExportError: naming the submodule that cannot be exported and the op/error, with the fixes.
    """
    try:
        return capture(module, example).module()
    except Exception as err:
        training = module.training
        where, cls_name, detail = _locate_export_failure(module.eval(), _as_batch(example))
        module.train(training)
        full = ".".join(p for p in (module_path, where) if p) or "<root>"
        raise QuantizationExportError(
            f"Cannot quantize: `{full}` ({cls_name}) cannot be captured by torch.export: {detail}. "
            f"HINT: quantize only an exportable part with `module=` (an attribute path such as 'backbone.features'), "
            f"keep layers in fp32 with `skip=['<regex>']`, or rewrite the failing op (data-dependent Python control "
            f"flow, .item(), numpy calls) in tensor ops."
        ) from err


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


# --------------------------------------------------------------------------------------------------------------------
# Diagnostics: ranges and SQNR per layer
# --------------------------------------------------------------------------------------------------------------------


def _node_layer_name(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path = list(stack.values())[-1][0]
        path = re.sub(r"^L\['self'\]\.?", "", str(path))
        if path:
            return path
    return node.name


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
