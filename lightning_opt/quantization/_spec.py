"""What to quantize and how (`QuantSpec`), the scheme checks, module paths and skip patterns."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_opt import inputs

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
