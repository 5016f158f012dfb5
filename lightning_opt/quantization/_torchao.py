"""The one place that works around torchao's internals, for the torchao versions in ``TESTED_TORCHAO``.

torchao's pt2e QAT flow has three behaviours this package corrects, each here and nowhere else:

1. Its QAT conv-BatchNorm patterns hard-code the BatchNorm eps (``1e-5``, "TODO: allow setting eps" in
   ``qat_utils._get_qat_conv_bn_pattern``) whatever the model's eps: `patch_qat_conv_bn` restores it.
2. The same patterns divide by the BatchNorm weight, ``0 / 0 = NaN`` for zero-initialised residual branches (timm's
   resnet-d, RegNet): `patch_qat_conv_bn` guards the division, `unpatch_qat_conv_bn` removes the guard
   before ``convert_pt2e`` folds the pattern.
3. ``convert_pt2e`` re-traces 96 conv-bn pattern variants whatever the graph holds: `fast_conv_bn_fold` skips
   those of conv types absent from the graph (about 4x faster conversion).

``pyproject.toml`` bounds torchao to the tested versions; `check_torchao_version` warns once when another
version is installed, and ``tests/quantization/test_torchao_workarounds.py`` checks that each workaround still
applies to the installed torchao (so a torchao that fixes one says so).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from importlib.metadata import version
from typing import Any

import torch

__all__ = [
    "TESTED_TORCHAO",
    "TORCHAO_QAT_BN_EPS",
    "bn_eps",
    "check_torchao_version",
    "fast_conv_bn_fold",
    "patch_qat_conv_bn",
    "unpatch_qat_conv_bn",
]

#: torchao versions (major.minor) these workarounds were written and tested against; pyproject.toml allows these only.
TESTED_TORCHAO = ("0.18",)

_BN_TARGETS = (torch.ops.aten.batch_norm.default,)
_WARNED: list[str] = []


def check_torchao_version() -> str:
    """The installed torchao version; warns once if it is not one of `TESTED_TORCHAO`.

    Examples:
        >>> check_torchao_version().startswith(TESTED_TORCHAO)
        True
    """
    installed = version("torchao")
    if not installed.startswith(TESTED_TORCHAO) and installed not in _WARNED:
        _WARNED.append(installed)
        warnings.warn(
            f"torchao {installed} is installed; lightning-opt's pt2e QAT workarounds were tested with torchao "
            f"{', '.join(TESTED_TORCHAO)}. QAT graphs may differ from the fp32 model."
            " HINT: pip install 'torchao~=0.18.0'.",
            stacklevel=2,
        )
    return installed


#: The BatchNorm eps torchao's QAT conv-bn patterns hard-code (``qat_utils._get_qat_conv_bn_pattern``, "TODO: allow
#: setting eps") in torchao <= 0.18. A later torchao that honours the model's eps leaves nothing to patch here.
TORCHAO_QAT_BN_EPS = 1e-5
_SAFE_GAMMA = "lightning_opt_safe_gamma"


def _is_attr(node: Any) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "get_attr"


def bn_eps(graph: torch.fx.GraphModule) -> dict[str, float]:
    """``{running_var attribute: eps}`` of every BatchNorm of a captured graph (before torchao rewrites it)."""
    return {
        str(node.args[4].target): float(node.args[7])
        for node in graph.graph.nodes
        if node.op == "call_function" and node.target in _BN_TARGETS and _is_attr(node.args[4])
    }


def patch_qat_conv_bn(graph: torch.fx.GraphModule, eps: dict[str, float]) -> None:
    """Make torchao's fused QAT conv-bn subgraphs compute the fp32 model: real eps, finite with a zero BN weight.

    torchao replaces ``conv -> batch_norm`` by ``conv(x, w * g/std) / (g/std) + b -> batch_norm`` with
    ``std = sqrt(running_var + 1e-5)`` and ``batch_norm(eps=1e-5)`` whatever the model's eps (MobileNetV3 uses 1e-3),
    and with a BatchNorm weight ``g == 0`` (zero-initialised residual branches) the division is ``0 / 0 = NaN``.
    Here each ``add(running_var, 1e-5)`` and ``batch_norm`` gets its BatchNorm's eps back, and the scale factor uses
    ``g`` where ``g != 0`` and 1 elsewhere (the batch_norm still multiplies by the real ``g``, so the output is the
    same and ``g`` gets its gradient). `unpatch_qat_conv_bn` removes the zero guard before ``convert_pt2e``
    folds the pattern (which matches literals loosely, so the eps values stay).
    """
    aten = torch.ops.aten
    changed = False
    for node in list(graph.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _BN_TARGETS and _is_attr(node.args[4]):
            wanted = eps.get(str(node.args[4].target))
            if wanted is not None and node.args[7] != wanted:
                node.args = (*node.args[:7], wanted, *node.args[8:])
                changed = True
        elif (
            node.target is aten.add.Tensor
            and _is_attr(node.args[0])
            and str(node.args[0].target) in eps
            and node.args[1] == TORCHAO_QAT_BN_EPS
        ):
            node.args = (node.args[0], eps[str(node.args[0].target)])
            changed = True
        elif (
            node.target is aten.div.Tensor
            and _is_attr(node.args[0])
            and isinstance(node.args[1], torch.fx.Node)
            and node.args[1].target is aten.sqrt.default
        ):
            gamma = node.args[0]
            with graph.graph.inserting_before(node):
                is_zero = graph.graph.call_function(aten.eq.Scalar, (gamma, 0.0))
                safe = graph.graph.call_function(aten.masked_fill.Scalar, (gamma, is_zero, 1.0))
            for new in (is_zero, safe):
                new.meta = {**gamma.meta, _SAFE_GAMMA: True}
            node.args = (safe, node.args[1])
            changed = True
    if changed:
        graph.recompile()


def unpatch_qat_conv_bn(graph: torch.fx.GraphModule) -> None:
    """Remove the zero-weight guards of `patch_qat_conv_bn` so that torchao's conv-bn fold matches."""
    guards = [n for n in graph.graph.nodes if n.meta.get(_SAFE_GAMMA) and n.target is torch.ops.aten.masked_fill.Scalar]
    for safe in guards:
        is_zero = safe.args[1]
        safe.replace_all_uses_with(safe.args[0])
        graph.graph.erase_node(safe)
        if isinstance(is_zero, torch.fx.Node) and not is_zero.users:
            graph.graph.erase_node(is_zero)
    if guards:
        graph.recompile()


@contextlib.contextmanager
def fast_conv_bn_fold(graph: torch.fx.GraphModule) -> Iterator[None]:
    """Skip torchao's conv-bn fold for conv flavours absent from the graph.

    ``convert_pt2e`` re-traces 96 pattern variants (conv1d/2d/transposed, with and without bias/relu...) even when
    the graph holds only conv2d; each trace is a full ``torch.export``. Patterns of an absent conv type cannot
    match, so skipping them changes nothing but the time (about 4x less here).
    """
    import torch.nn.functional as F
    from torchao.quantization.pt2e import qat_utils

    present = {node.target for node in graph.graph.nodes if node.op == "call_function"}
    aten = torch.ops.aten
    needed = {
        F.conv1d: aten.conv1d.default in present,
        F.conv2d: aten.conv2d.default in present,
        F.conv_transpose1d: aten.conv_transpose1d.default in present,
        F.conv_transpose2d: aten.conv_transpose2d.input in present,
    }
    original = qat_utils._fold_conv_bn_qat_helper

    def helper(m: Any, conv_fn: Any, example_inputs: Any, is_cuda: bool) -> Any:
        if not needed.get(conv_fn, True):
            return m
        return original(m, conv_fn, example_inputs, is_cuda=is_cuda)

    qat_utils._fold_conv_bn_qat_helper = helper
    try:
        yield
    finally:
        qat_utils._fold_conv_bn_qat_helper = original
