"""Int8 for Linear-heavy models (transformers) on torchao's ``quantize_`` API: no graph capture, module by module.

Two inference schemes, each a torchao 0.18 configuration applied with `torchao.quantization.quantize_`:

- ``"int8_dynamic"``: `Int8DynamicActivationInt8WeightConfig`: int8 weights per output
  channel (symmetric), activations quantized per token at run time (asymmetric, so that QAT's fake quantization,
  which has no symmetric per-token form in torchao 0.18, matches the converted model).
- ``"int8_weight_only"``: `Int8WeightOnlyConfig`: int8 weights per output channel,
  fp32 activations.

And their quantization-aware training: `prepare_qat` swaps ``nn.Linear``/``nn.Embedding`` for torchao's
``FakeQuantizedLinear``/``FakeQuantizedEmbedding`` (``QATConfig(activation_config=..., weight_config=...,
step="prepare")``: the same numerics as the scheme, parameters shared, so optimizers and tied weights keep working);
`convert_qat` swaps them back (``QATConfig(step="convert")``) and quantizes with the scheme. Embeddings get
int8 weight-only (per row) in every scheme.

Hugging Face's GPT-2 ``Conv1D`` (a transposed Linear) is not an ``nn.Linear``, so torchao would leave it in fp32:
`linearize_conv1d` replaces it by an equal ``nn.Linear`` first (outputs equal to float rounding).

Weights become torchao tensor subclasses (``Int8Tensor``). ``torch.save(model.state_dict())`` keeps them and
``torch.load(..., weights_only=True)`` loads them (torchao registers them as safe globals), so `save_state` /
`load_state` are weights-only-safe; ``torch.export`` traces them into plain int8 ops, so `save_artifact`
writes a self-contained ``.pt2`` that `load_artifact` runs without the model's code.

Speed on a CPU without VNNI (see ``docs/benchmarks.md``): torchao's eager int8 kernels are slower than fp32; under
``torch.compile`` they lower to inductor kernels. Measure with `measure` before relying on either.

Examples:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    >>> reference = model(torch.ones(2, 16))
    >>> quantize(model, "int8_dynamic", skip=["2"])
    ['0']
    >>> bool((model(torch.ones(2, 16)) - reference).abs().max() < 0.05)
    True
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_opt import inputs
from lightning_opt._io import atomic_path, atomic_save
from lightning_opt.measure import measure_latency, saved_size_bytes
from lightning_opt.quantization import _pt2e

__all__ = [
    "SCHEMES",
    "convert_qat",
    "export",
    "is_qat_prepared",
    "linearize_conv1d",
    "load_artifact",
    "load_state",
    "measure",
    "prepare_qat",
    "quantize",
    "quantized_copy",
    "quantized_layers",
    "save_artifact",
    "save_state",
    "select_layers",
    "strip_qat",
    "validate_scheme",
]

#: The torchao ``quantize_`` schemes.
SCHEMES = ("int8_dynamic", "int8_weight_only")

_STATE_FORMAT = "lightning_opt.linear_int8/1"


def validate_scheme(scheme: str) -> str:
    """Check a scheme name.

    Args:
        scheme: one of `SCHEMES`.

    Returns:
        The scheme.

    Raises:
        ValueError: naming the value and the allowed ones.

    Examples:
        >>> validate_scheme("int8_dynamic")
        'int8_dynamic'
    """
    if scheme not in SCHEMES:
        raise ValueError(
            f"`scheme` must be one of {list(SCHEMES)}, got {scheme!r}. HINT: 'int8_dynamic' quantizes weights and "
            "activations (per token, at run time), 'int8_weight_only' the weights only; the static pt2e path is "
            "'pt2e_static' in the callbacks."
        )
    return scheme


def _config(scheme: str) -> Any:
    """The torchao inference configuration of a scheme."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, MappingType

    if validate_scheme(scheme) == "int8_dynamic":
        return Int8DynamicActivationInt8WeightConfig(act_mapping_type=MappingType.ASYMMETRIC, set_inductor_config=False)
    return Int8WeightOnlyConfig(set_inductor_config=False)


def _embedding_config() -> Any:
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig(set_inductor_config=False)


def _fake_quant_configs(scheme: str) -> tuple[Any, Any]:
    """(activation, weight) fake-quant configurations with the numerics of ``scheme`` (activation None: fp32)."""
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    weight = IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True)
    if validate_scheme(scheme) == "int8_dynamic":
        return IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False), weight
    return None, weight


# --------------------------------------------------------------------------------------------------------------------
# Layer selection
# --------------------------------------------------------------------------------------------------------------------


def _is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (``transformers.pytorch_utils.Conv1D``): ``x @ weight + bias``, weight (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(module.weight, torch.Tensor)


def linearize_conv1d(model: nn.Module) -> list[str]:
    """Replace every Hugging Face ``Conv1D`` (GPT-2's attention and MLP) by an equal ``nn.Linear``, in place.

    Args:
        model: the model; changed in place (new parameter objects: build optimizers afterwards).

    Returns:
        The names of the replaced modules.
    """
    replaced = []
    for name, module in list(model.named_modules()):
        if not name or not _is_conv1d(module):
            continue
        weight = module.weight.detach()
        bias = getattr(module, "bias", None)
        linear = nn.Linear(weight.shape[0], weight.shape[1], bias=bias is not None, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight.t())
            if bias is not None:
                linear.bias.copy_(bias.detach())
        linear.train(module.training)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, linear)
        replaced.append(name)
    return replaced


def select_layers(model: nn.Module, skip: Sequence[str] | None = None, embeddings: bool = False) -> list[str]:
    """Names of the ``nn.Linear`` (and with ``embeddings``, ``nn.Embedding``) modules a scheme would quantize.

    Args:
        model: the model (names are relative to it).
        skip: regular expressions, each full-matched against module names; a match keeps that module (and the
            modules inside it) in fp32.
        embeddings: include ``nn.Embedding`` modules.

    Raises:
        ValueError: for a ``skip`` pattern that is not a regex or matches no module, and when no layer is left.

    Examples:
        >>> select_layers(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)), skip=["0"])
        ['2']
    """
    if skip is not None and (isinstance(skip, str) or not all(isinstance(p, str) for p in skip)):
        raise ValueError(f"`skip` must be a list of regular expressions, got {skip!r}.")
    skipped = _pt2e.resolve_skip_patterns(model, skip or [])  # one rule for skip patterns on both int8 paths
    types: tuple[type[nn.Module], ...] = (nn.Linear, nn.Embedding) if embeddings else (nn.Linear,)
    chosen = [
        name
        for name, module in model.named_modules()
        if name
        and isinstance(module, types)
        and not any(name == s or name.startswith(s + ".") for s in skipped)
        and type(module).__name__ != "NonDynamicallyQuantizableLinear"  # nn.MultiheadAttention's out_proj
        and not _is_quantized_tensor(module.weight)
    ]
    if not chosen:
        kinds = "nn.Linear or nn.Embedding" if embeddings else "nn.Linear"
        raise ValueError(
            f"Nothing to quantize: {type(model).__name__} has no {kinds} module left "
            f"(skip={list(skip or [])}). HINT: these schemes quantize Linear layers (and Hugging Face Conv1D, "
            "converted first); for a convolutional network use the 'pt2e_static' scheme, and check `skip`."
        )
    return chosen


def _is_quantized_tensor(t: Any) -> bool:
    from torchao.utils import TorchAOBaseTensor

    return isinstance(t, TorchAOBaseTensor)


def quantized_layers(model: nn.Module) -> list[str]:
    """Names of the modules whose ``weight`` is a torchao quantized tensor."""
    return [name for name, m in model.named_modules() if _is_quantized_tensor(getattr(m, "weight", None))]


def _apply(model: nn.Module, config: Any, names: Sequence[str]) -> None:
    from torchao.quantization import quantize_

    wanted = set(names)
    quantize_(model, config, filter_fn=lambda _module, fqn: fqn in wanted)


# --------------------------------------------------------------------------------------------------------------------
# Post-training quantization and QAT
# --------------------------------------------------------------------------------------------------------------------


def quantize(model: nn.Module, scheme: str, skip: Sequence[str] | None = None, embeddings: bool = False) -> list[str]:
    """Quantize ``model``'s Linear layers (and embeddings) in place with a scheme; no calibration needed.

    Hugging Face ``Conv1D`` modules are first replaced by ``nn.Linear`` (`linearize_conv1d`). Weights tied to
    a quantized Linear (GPT-2's ``lm_head`` and its token embedding) are untied: the other user keeps fp32.

    Args:
        model: the fp32 model (changed in place; call it in eval mode for inference).
        scheme: ``"int8_dynamic"`` or ``"int8_weight_only"``.
        skip: regexes of module names kept in fp32 (see `select_layers`).
        embeddings: also quantize ``nn.Embedding`` weights (int8 per row, dequantized at lookup: smaller, not
            faster).

    Returns:
        The names of the quantized modules.

    Raises:
        ValueError: for an unknown scheme, a bad ``skip`` pattern, or a model with nothing to quantize.
    """
    validate_scheme(scheme)
    select_layers(model, skip, embeddings)  # validate before changing anything
    linearize_conv1d(model)
    names = select_layers(model, skip, embeddings)
    linear = [n for n in names if isinstance(model.get_submodule(n), nn.Linear)]
    embedding = [n for n in names if n not in linear]
    if embedding:
        _apply(model, _embedding_config(), embedding)
    _apply(model, _config(scheme), linear)
    return names


def prepare_qat(
    model: nn.Module, scheme: str = "int8_dynamic", skip: Sequence[str] | None = None, embeddings: bool = True
) -> list[str]:
    """Insert torchao fake quantization into ``model``'s Linear (and Embedding) layers, in place, for training.

    The fake-quantized modules keep the original parameter objects (optimizers and tied weights stay valid) and the
    same ``state_dict`` keys. Hugging Face ``Conv1D`` modules are first replaced by ``nn.Linear`` (new parameters:
    build the optimizer afterwards, as Lightning does after callback ``setup``).

    Args:
        model: the fp32 model.
        scheme: the scheme the model will be converted to (sets the fake-quant numerics).
        skip: regexes of module names kept in fp32.
        embeddings: fake-quantize ``nn.Embedding`` weights too (int8 per row).

    Returns:
        The names of the fake-quantized modules.

    Raises:
        ValueError: for an unknown scheme, a bad ``skip`` pattern, or a model with nothing to quantize.
    """
    from torchao.quantization.qat import QATConfig

    validate_scheme(scheme)
    select_layers(model, skip, embeddings)
    linearize_conv1d(model)
    names = select_layers(model, skip, embeddings)
    activation, weight = _fake_quant_configs(scheme)
    linear = [n for n in names if isinstance(model.get_submodule(n), nn.Linear)]
    embedding = [n for n in names if n not in linear]
    if embedding:
        _apply(model, QATConfig(weight_config=weight, step="prepare"), embedding)
    _apply(model, QATConfig(activation_config=activation, weight_config=weight, step="prepare"), linear)
    return names


def _fake_quant_types() -> tuple[type[nn.Module], ...]:
    from torchao.quantization.qat import FakeQuantizedEmbedding, FakeQuantizedLinear

    return FakeQuantizedLinear, FakeQuantizedEmbedding


def is_qat_prepared(model: nn.Module) -> bool:
    """Whether ``model`` holds torchao fake-quantized Linear/Embedding modules (after `prepare_qat`)."""
    types = _fake_quant_types()
    return any(isinstance(m, types) for m in model.modules())


def strip_qat(model: nn.Module) -> list[str]:
    """Swap fake-quantized modules back to plain fp32 ``nn.Linear``/``nn.Embedding`` (same weights), in place.

    The trained fp32 model of a QAT run: the reference an int8 model is compared against.

    Returns:
        The names of the swapped modules.
    """
    from torchao.quantization.qat import QATConfig

    types = _fake_quant_types()
    names = [name for name, m in model.named_modules() if isinstance(m, types)]
    if names:
        _apply(model, QATConfig(step="convert"), names)
    return names


def convert_qat(model: nn.Module, scheme: str = "int8_dynamic") -> list[str]:
    """Turn a QAT model into the int8 model, in place: fake-quant modules back to Linear/Embedding, then quantized.

    Args:
        model: a model prepared by `prepare_qat` (and trained).
        scheme: the scheme it was prepared for.

    Returns:
        The names of the quantized modules.

    Raises:
        ValueError: for an unknown scheme, or a model without fake-quantized modules.
    """
    from torchao.quantization.qat import QATConfig

    validate_scheme(scheme)
    types = _fake_quant_types()
    names = [name for name, m in model.named_modules() if isinstance(m, types)]
    if not names:
        raise ValueError(
            f"{type(model).__name__} has no fake-quantized module to convert. HINT: call `prepare_qat` before "
            "training, or use `quantize` on an fp32 model."
        )
    linear = [n for n in names if isinstance(model.get_submodule(n), types[0])]
    embedding = [n for n in names if n not in linear]
    _apply(model, QATConfig(step="convert"), names)
    if embedding:
        _apply(model, _embedding_config(), embedding)
    _apply(model, _config(scheme), linear)
    return names


# --------------------------------------------------------------------------------------------------------------------
# Artifacts
# --------------------------------------------------------------------------------------------------------------------


def save_state(model: nn.Module, path: str | os.PathLike[str], scheme: str, layers: Sequence[str]) -> int:
    """Save the quantized weights with what `load_state` needs to rebuild the structure; returns bytes.

    Args:
        model: the quantized model.
        path: the file (``torch.save`` format).
        scheme: the scheme it was quantized with.
        layers: the quantized module names (the return value of `quantize` / `convert_qat`).
    """
    linearized = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    atomic_save(
        {
            "format": _STATE_FORMAT,
            "scheme": validate_scheme(scheme),
            "layers": list(layers),
            "linear_modules": linearized,
            "state_dict": model.state_dict(),
        },
        path,
    )
    return os.path.getsize(path)


def load_state(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load weights saved by `save_state` into a freshly built fp32 ``model`` (in place), weights-only.

    The file is read with ``torch.load(weights_only=True)``: no pickled code runs. The model is quantized with the
    recorded scheme on the recorded layers, then the int8 weights are assigned.

    Raises:
        ValueError: when the file is not a `save_state` file.
    """
    import torchao.quantization  # noqa: F401  (registers torchao's tensor subclasses as safe globals)

    saved = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or saved.get("format") != _STATE_FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not a quantized state saved by `save_state`.")
    linearize_conv1d(model)
    layers = list(saved["layers"])
    linear = [n for n in layers if isinstance(model.get_submodule(n), nn.Linear)]
    embedding = [n for n in layers if n not in linear]
    if embedding:
        _apply(model, _embedding_config(), embedding)
    _apply(model, _config(saved["scheme"]), linear)
    model.load_state_dict(saved["state_dict"], assign=True)
    return model


def _dynamic_batch(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Dynamic-shape specs marking dim 0 of every batched input tensor as dynamic (any signature, ``*args`` too)."""
    shapes = torch.export.ShapesCollection()
    for t in inputs.flat_tensors((*args, *kwargs.values())):
        if t.dim() > 0:
            shapes[t] = {0: torch.export.Dim.AUTO}
    return shapes.dynamic_shapes(model, args, kwargs)


def export(model: nn.Module, example: Any) -> torch.export.ExportedProgram:
    """``torch.export`` (non-strict) a quantized model in eval mode with a dynamic batch dimension.

    Args:
        model: the quantized (or fp32) model.
        example: an example input (tensor, tuple or dict; see `lightning_opt.inputs`).
    """
    example = inputs.repeat_to(example, 2) if inputs.batch_size(example) == 1 else example
    args, kwargs = inputs.call_args(example)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return torch.export.export(
                model, args, kwargs, dynamic_shapes=_dynamic_batch(model, args, kwargs), strict=False
            )
    finally:
        model.train(training)


def save_artifact(model: nn.Module, example: Any, path: str | os.PathLike[str]) -> int:
    """Export the quantized model (`export`) and save it as a self-contained ``.pt2``; returns its bytes."""
    program = export(model, example)
    with atomic_path(path) as tmp:
        torch.export.save(program, tmp)
    return os.path.getsize(path)


def load_artifact(path: str | os.PathLike[str]) -> nn.Module:
    """Load a ``.pt2`` written by `save_artifact` as a module (``torch.export.load``, no model code needed)."""
    import torchao.quantization  # noqa: F401  (registers the ops the int8 graph calls)

    return torch.export.load(path).module()


# --------------------------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------------------------


def _timed(model: Any, example: Any, num_threads: int, repeats: int, warmup: int) -> float:
    first = inputs.flat_tensors(example)[0]
    result = measure_latency(
        lambda _x: inputs.call(model, example), first, warmup=warmup, repeats=repeats, num_threads=num_threads
    )
    return result.median_ms


def measure(
    quantized: nn.Module | Any,
    reference: nn.Module,
    example: Any,
    num_threads: int = 1,
    batch_size: int | None = None,
    repeats: int = 30,
    rounds: int = 3,
) -> dict[str, float]:
    """Size and CPU latency of a quantized model against its fp32 eager reference, side by side.

    The two are timed in alternating rounds (machine noise hits both alike); each figure is the median of the
    rounds' medians.

    Args:
        quantized: the int8 model (a module, or any callable taking the example, e.g. a compiled model).
        reference: the fp32 eager model with the same weights.
        example: an example input (tensor, tuple or dict); real values, repeated to ``batch_size`` rows.
        num_threads: torch threads while timing.
        batch_size: rows of the timed input (default: the example's).
        repeats: timed runs per round.
        rounds: alternating rounds.

    Returns:
        ``size_bytes`` and ``fp32_size_bytes`` (``torch.save`` of the ``state_dict``; only for modules),
        ``latency_ms``, ``fp32_latency_ms``, ``speedup_vs_fp32``, ``batch_size``, ``num_threads``.
    """
    example = inputs.to_cpu(example)
    if batch_size is not None:
        example = inputs.repeat_to(example, batch_size)
    figures: dict[str, float] = {}
    if isinstance(quantized, nn.Module):
        figures["size_bytes"] = saved_size_bytes(quantized)
    figures["fp32_size_bytes"] = saved_size_bytes(reference)
    fast, slow = [], []
    for _ in range(max(rounds, 1)):
        fast.append(_timed(quantized, example, num_threads, max(repeats // rounds, 1), warmup=3))
        slow.append(_timed(reference, example, num_threads, max(repeats // rounds, 1), warmup=2))
    figures["latency_ms"] = sorted(fast)[len(fast) // 2]
    figures["fp32_latency_ms"] = sorted(slow)[len(slow) // 2]
    figures["speedup_vs_fp32"] = figures["fp32_latency_ms"] / figures["latency_ms"]
    figures["batch_size"] = inputs.batch_size(example)
    figures["num_threads"] = num_threads
    return figures


def quantized_copy(
    model: nn.Module, scheme: str, skip: Sequence[str] | None = None, embeddings: bool = False
) -> tuple[nn.Module, list[str]]:
    """A quantized deep copy of ``model`` (the original stays fp32); returns ``(copy, quantized names)``."""
    clone = copy.deepcopy(model)
    return clone, quantize(clone, scheme, skip, embeddings)
