"""Attention- and block-aware settings for Torch-Pruning: whole heads as units, Conv1D, MultiheadAttention, exclusions.

Torch-Pruning's dependency graph couples channels correctly through most layers, but on transformers and some CNNs a
plain channel is not a unit that can be removed: a channel of a query projection belongs to a head whose size the
attention's ``forward`` reshapes by, Hugging Face ``Conv1D`` stores its weight transposed, ``nn.MultiheadAttention``
projects q/k/v inside one module, and a LayerNorm over the pruned channels normalises a masked channel differently
from a removed one. `transformer_config` inspects a model once and returns a `TPConfig` that says how to
build the graph (customized pruners, unwrapped parameters, extra root types), which groups are attention heads
(`head_slices`; extra head groups Torch-Pruning cannot discover: `extra_groups`), which parameters a
channel lives in for layers the graph does not describe by itself (`param_slices`), and which layers must stay
as they are, with the reason (`TPConfig.ignored`). After the groups are removed, `after_removal` updates
the head counts and sizes the attention ``forward`` methods read.

How `ChannelGroups` uses it:

1. ``config = transformer_config(model, example_inputs)`` and
   ``dg = tp.DependencyGraph().build_dependency(model, example_inputs, **config.graph_kwargs())`` (the kwargs hold
   the customized pruners, the unwrapped parameters and a ``forward_fn`` that calls the model the
   `lightning_opt.inputs` way; ShuffleNet blocks and Hugging Face caches need that ``forward_fn`` to trace).
2. ``ignored_layers`` += ``config.ignored_modules(model)``, ``root_module_types`` += ``config.root_module_types``;
   groups are ``dg.get_all_groups(...)`` plus ``extra_groups(config, dg)`` (keep an extra group when one of
   ``config.members(group[0].dep.target.module)`` is selected for pruning).
3. Units: ``channel_units(config, group)`` is ``None`` (every channel is a unit) or the unit of every root channel:
   an attention head, or the channels at one position in every group of a grouped convolution. Score units as
   wholes (sum of their channel scores) and keep or drop all channels of a unit together.
   ``head_slices(config, group)`` says whether the group is an attention head group (and numbers its heads).
4. Masks: for a group item whose module the channel code does not know (``Conv1D``, ``nn.MultiheadAttention``, GPT-2
   attention, ShuffleNet blocks), ``param_slices(config, module, handler, idxs)`` gives ``(parameter name, dim,
   indices)`` to zero; fused q/k/v give ``k * len(idxs)`` indices, ``[q rows, k rows, v rows]`` in that order.
5. At fit end: ``dg.get_pruning_group(root, handler, idxs).prune()`` for each group, then
   ``after_removal(model, config)``.
6. Checkpoints: merge ``attention_structure(model)`` into the saved layer shapes; after rebuilding the layers, call
   ``restore_attention_structure(model, structure)`` (it turns a head-pruned ``nn.MultiheadAttention`` back into a
   `PrunedMultiheadAttention`).

What is kept (listed in `TPConfig.ignored` with the reason): the hidden size of a transformer (set by its
embeddings, normalised by its LayerNorms), channels a LayerNorm or GroupNorm normalises over (ConvNeXt stages), the
input/output channels of ShuffleNet blocks (split, concatenated and shuffled), attention modules of unsupported forms
(cross-attention GPT-2, q/k norm, kdim/vdim, ``add_bias_kv``).

Examples:
    >>> import torch, torch_pruning as tp
    >>> from torch import nn
    >>> class Block(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.attn = nn.MultiheadAttention(64, 4, batch_first=True)
    ...     def forward(self, x):
    ...         return self.attn(x, x, x, need_weights=False)[0]
    >>> model, x = Block(), torch.randn(2, 5, 64)
    >>> config = transformer_config(model, x)
    >>> dg = tp.DependencyGraph().build_dependency(model, x, **config.graph_kwargs())
    >>> [group] = extra_groups(config, dg)
    >>> head_slices(config, group).tolist()[::16]
    [0, 1, 2, 3]
    >>> dg.get_pruning_group(model.attn, group[0].dep.handler, list(range(16, 48))).prune()
    >>> after_removal(model, config)
    >>> model.attn.num_heads, tuple(model.attn.in_proj_weight.shape), model(x).shape
    (2, (96, 64), torch.Size([2, 5, 64]))
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import Tensor, nn
from torch_pruning.pruner.function import BasePruningFunc, MultiheadAttentionPruner

from lightning_opt import inputs

__all__ = [
    "AttentionSpec",
    "Conv1DPruner",
    "MultiheadAttentionHeadPruner",
    "PrunedMultiheadAttention",
    "TPConfig",
    "after_removal",
    "attention_structure",
    "channel_units",
    "extra_groups",
    "head_slices",
    "modules_with_eq_hidden",
    "param_slices",
    "restore_attention_structure",
    "transformer_config",
]


# --------------------------------------------------------------------------------------------------------------------
# Pruners for layers Torch-Pruning does not know
# --------------------------------------------------------------------------------------------------------------------


def _keep(n: int, idxs: Sequence[int]) -> list[int]:
    drop = set(int(i) for i in idxs)
    return [i for i in range(n) if i not in drop]


def _select(param: Tensor, keep: list[int], dim: int) -> nn.Parameter:
    index = torch.as_tensor(keep, dtype=torch.long, device=param.device)
    out = nn.Parameter(torch.index_select(param.data, dim, index), requires_grad=param.requires_grad)
    if param.grad is not None:
        out.grad = torch.index_select(param.grad, dim, index)
    return out


class Conv1DPruner(BasePruningFunc):
    """Torch-Pruning pruner for Hugging Face ``Conv1D`` (GPT-2): a Linear whose weight is stored ``(in, out)``.

    Out channels are the weight's dim 1 and the bias; in channels the weight's dim 0. ``nf``/``nx`` are updated.
    """

    TARGET_MODULES = None

    def prune_out_channels(self, layer: Any, idxs: Sequence[int]) -> nn.Module:
        """Remove output features ``idxs``."""
        keep = _keep(int(layer.nf), idxs)
        layer.weight = _select(layer.weight, keep, 1)
        if getattr(layer, "bias", None) is not None:
            layer.bias = _select(layer.bias, keep, 0)
        layer.nf = len(keep)
        return layer

    def prune_in_channels(self, layer: Any, idxs: Sequence[int]) -> nn.Module:
        """Remove input features ``idxs``."""
        keep = _keep(int(layer.nx), idxs)
        layer.weight = _select(layer.weight, keep, 0)
        layer.nx = len(keep)
        return layer

    def get_out_channels(self, layer: Any) -> int:
        """Output features."""
        return int(layer.nf)

    def get_in_channels(self, layer: Any) -> int:
        """Input features."""
        return int(layer.nx)


class GPT2AttentionPruner(BasePruningFunc):
    """Torch-Pruning pruner for Hugging Face GPT-2 attention (fused ``c_attn`` Conv1D, split along the last dim).

    Torch-Pruning maps a ``split`` only along dim 1, so through ``c_attn(x).split(split_size, dim=2)`` it would couple
    all ``3 * inner`` outputs of ``c_attn`` to ``c_proj``'s ``inner`` inputs. The attention is therefore one opaque
    node: ``prune_out_channels``/``prune_in_channels`` prune the hidden size it reads and writes (``c_attn`` inputs,
    ``c_proj`` outputs), `prune_heads` removes inner channels (whole heads) of q, k, v and ``c_proj``'s inputs and
    updates ``num_heads`` and ``split_size``.
    """

    TARGET_MODULES = None

    def prune_out_channels(self, layer: Any, idxs: Sequence[int]) -> nn.Module:
        """Remove hidden channels ``idxs`` (inputs of ``c_attn``, outputs of ``c_proj``)."""
        Conv1DPruner().prune_in_channels(layer.c_attn, idxs)
        Conv1DPruner().prune_out_channels(layer.c_proj, idxs)
        layer.embed_dim = int(layer.c_proj.nf)
        return layer

    prune_in_channels = prune_out_channels

    def prune_heads(self, layer: Any, idxs: Sequence[int]) -> nn.Module:
        """Remove inner channels ``idxs`` in ``[0, num_heads * head_dim)``, which must form whole heads.

        Raises:
            ValueError: if ``idxs`` do not form whole heads.
        """
        if not idxs:
            return layer
        head_dim = int(layer.head_dim)
        inner = int(layer.num_heads) * head_dim
        drop, dropped_heads = _whole_heads(idxs, head_dim)
        Conv1DPruner().prune_out_channels(layer.c_attn, [i + k * inner for k in range(3) for i in drop])
        Conv1DPruner().prune_in_channels(layer.c_proj, drop)
        layer.num_heads = int(layer.num_heads) - len(dropped_heads)
        layer.split_size = layer.num_heads * head_dim
        return layer

    def get_out_channels(self, layer: Any) -> int:
        """Hidden size."""
        return int(layer.c_proj.nf)

    def get_in_channels(self, layer: Any) -> int:
        """Hidden size."""
        return int(layer.c_attn.nx)

    def get_inner_channels(self, layer: Any) -> int:
        """Inner channels (``num_heads * head_dim``)."""
        return int(layer.num_heads) * int(layer.head_dim)


def _whole_heads(idxs: Sequence[int], head_dim: int) -> tuple[list[int], list[int]]:
    drop = sorted(set(int(i) for i in idxs))
    heads = sorted({i // head_dim for i in drop})
    if len(drop) != len(heads) * head_dim:
        raise ValueError(
            f"`idxs` must cover whole heads of {head_dim} channels, got {len(drop)} channels over heads {heads}. "
            "HINT: select channels with `head_slices`."
        )
    return drop, heads


class MultiheadAttentionHeadPruner(MultiheadAttentionPruner):
    """Torch-Pruning pruner for ``nn.MultiheadAttention`` that can also remove whole heads.

    ``prune_out_channels``/``prune_in_channels`` prune the embedding dimension as Torch-Pruning does (the residual
    stream; `transformer_config` normally excludes it). `prune_heads` removes inner (q/k/v) channels
    ``idxs`` in ``[0, num_heads * head_dim)``, which must form whole heads: rows of the q, k and v blocks of
    ``in_proj_weight``/``in_proj_bias`` and columns of ``out_proj.weight``. The module becomes a
    `PrunedMultiheadAttention` whose ``forward`` works with an inner size below ``embed_dim``.
    """

    def prune_heads(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        """Remove the inner channels ``idxs`` (whole heads) of a ``nn.MultiheadAttention``.

        Raises:
            ValueError: if ``idxs`` do not form whole heads.
        """
        assert isinstance(layer, nn.MultiheadAttention)
        if not idxs:
            return layer
        head_dim, heads = int(layer.head_dim), int(layer.num_heads)
        inner = head_dim * heads
        drop, dropped_heads = _whole_heads(idxs, head_dim)
        keep = _keep(inner, drop)
        keep3 = keep + [i + inner for i in keep] + [i + 2 * inner for i in keep]
        assert layer.in_proj_weight is not None
        layer.in_proj_weight = _select(layer.in_proj_weight, keep3, 0)
        if layer.in_proj_bias is not None:
            layer.in_proj_bias = _select(layer.in_proj_bias, keep3, 0)
        out = layer.out_proj
        out.weight = _select(out.weight, keep, 1)
        out.in_features = len(keep)
        kept_before = getattr(layer, "kept_heads", list(range(heads)))
        layer.kept_heads = [h for i, h in enumerate(kept_before) if i not in dropped_heads]  # type: ignore[assignment]
        layer.num_heads = heads - len(dropped_heads)
        if not isinstance(layer, PrunedMultiheadAttention):
            layer.__class__ = PrunedMultiheadAttention
        layer._qkv_same_embed_dim = (
            False  # turns off the fused fast paths of nn.Transformer*Layer that assume E == inner
        )
        return layer

    def get_inner_channels(self, layer: Any) -> int:
        """Inner channels (``num_heads * head_dim``)."""
        return int(layer.num_heads) * int(layer.head_dim)


class ShuffleBlockPruner(BasePruningFunc):
    """Torch-Pruning pruner for torchvision's ShuffleNetV2 ``InvertedResidual``: one node, inner channels prunable.

    The block splits its input in two, concatenates and shuffles the channels; Torch-Pruning 1.6 cannot map the
    shuffle's reshapes (``integer division or modulo by zero``) nor ``chunk`` on torch 2.x, so the block is traced as
    one node whose input and output channels are kept. `prune_inner` removes hidden channels of ``branch2``
    (1x1 conv out, BatchNorm, depthwise 3x3 conv, BatchNorm, 1x1 conv in), which never meet the shuffle.
    """

    TARGET_MODULES = None

    def prune_out_channels(self, layer: Any, idxs: Sequence[int]) -> nn.Module:
        """Not supported: the block's outputs are shuffled."""
        raise NotImplementedError(
            "the output channels of a ShuffleNet block are shuffled and cannot be removed. HINT: transformer_config "
            "lists the groups that reach them in `ignored`."
        )

    def prune_in_channels(self, layer: Any, idxs: Sequence[int]) -> nn.Module:
        """Not supported: the block's inputs are split and shuffled."""
        raise NotImplementedError(
            "the input channels of a ShuffleNet block are split and shuffled and cannot be removed. "
            "HINT: transformer_config lists the groups that reach them in `ignored`."
        )

    def prune_inner(self, layer: Any, idxs: Sequence[int]) -> nn.Module:
        """Remove hidden channels ``idxs`` of ``branch2``."""
        if not idxs:
            return layer
        b = layer.branch2
        idxs = sorted(int(i) for i in idxs)
        tp.prune_conv_out_channels(b[0], idxs)
        tp.prune_batchnorm_out_channels(b[1], idxs)
        tp.prune_depthwise_conv_out_channels(b[3], idxs)
        tp.prune_batchnorm_out_channels(b[4], idxs)
        tp.prune_conv_in_channels(b[5], idxs)
        return layer

    def get_out_channels(self, layer: Any) -> int:
        """Output channels of the block."""
        out = int(layer.branch2[5].out_channels)
        return out + (int(layer.branch1[2].out_channels) if len(layer.branch1) else out)

    def get_in_channels(self, layer: Any) -> int:
        """Input channels of the block."""
        return int(layer.branch1[0].in_channels) if len(layer.branch1) else 2 * int(layer.branch2[0].in_channels)

    def get_inner_channels(self, layer: Any) -> int:
        """Hidden channels of ``branch2``."""
        return int(layer.branch2[0].out_channels)


def _is_shuffle_block(m: nn.Module) -> bool:
    b1, b2 = getattr(m, "branch1", None), getattr(m, "branch2", None)
    return (
        type(m).__name__ == "InvertedResidual"
        and isinstance(b1, nn.Sequential)
        and isinstance(b2, nn.Sequential)
        and len(b2) == 8
        and isinstance(b2[3], nn.Conv2d)
        and b2[3].groups == b2[3].out_channels
    )


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """A ``nn.MultiheadAttention`` whose heads were removed: q/k/v project to ``num_heads * head_dim < embed_dim``.

    Same parameters, same call signature and the same results as the unpruned module with the removed heads zeroed
    (``nn.MultiheadAttention``'s own ``forward`` assumes the inner size equals ``embed_dim``).
    ``kept_heads`` lists which of the original heads remain (a 3-D ``attn_mask`` has one slice per original head).
    """

    kept_heads: list[int]

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Multi-head attention over the remaining heads (arguments as ``nn.MultiheadAttention.forward``)."""
        if self.bias_k is not None or self.add_zero_attn:
            raise NotImplementedError("PrunedMultiheadAttention does not support `add_bias_kv`/`add_zero_attn`.")
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        tgt_len, bsz, _ = query.shape
        src_len = key.shape[0]
        heads, head_dim = int(self.num_heads), int(self.head_dim)
        inner = heads * head_dim
        assert self.in_proj_weight is not None
        w, b = self.in_proj_weight, self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else (b[:inner], b[inner : 2 * inner], b[2 * inner :])
        q = F.linear(query, w[:inner], bq)
        k = F.linear(key, w[inner : 2 * inner], bk)
        v = F.linear(value, w[2 * inner :], bv)
        # (L, N, inner) -> (N, H, L, d)
        q = q.reshape(tgt_len, bsz, heads, head_dim).permute(1, 2, 0, 3)
        k = k.reshape(src_len, bsz, heads, head_dim).permute(1, 2, 0, 3)
        v = v.reshape(src_len, bsz, heads, head_dim).permute(1, 2, 0, 3)
        bias = torch.zeros((), dtype=q.dtype, device=q.device)
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(tgt_len, src_len, dtype=torch.bool, device=q.device).triu(1)
        if attn_mask is not None:
            mask = _additive(attn_mask, q.dtype)
            if mask.dim() == 3:  # (N * H_original, L, S): keep the slices of the remaining heads
                mask = mask.reshape(bsz, -1, tgt_len, src_len)[:, self.kept_heads]
            bias = bias + mask
        if key_padding_mask is not None:
            bias = bias + _additive(key_padding_mask, q.dtype).reshape(bsz, 1, 1, src_len)
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(head_dim)) + bias
        attn = scores.softmax(-1)
        if self.training and self.dropout > 0:
            attn = F.dropout(attn, p=self.dropout)
        out = (attn @ v).permute(2, 0, 1, 3).reshape(tgt_len, bsz, inner)
        out = self.out_proj(out)
        if not batched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        weights: Tensor | None = None
        if need_weights:
            weights = attn.mean(1) if average_attn_weights else attn
            if not batched:
                weights = weights.squeeze(0)
        return out, weights


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean mask (True: masked out) as ``-inf``/0, a float mask as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


# --------------------------------------------------------------------------------------------------------------------
# The configuration
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class AttentionSpec:
    """One attention module whose heads are pruned as units.

    Args:
        name: the attention module's name in the model.
        module: the attention module (holds the head count the ``forward`` reads).
        kind: ``"mha"`` (``nn.MultiheadAttention``), ``"timm"`` (fused ``qkv`` Linear), ``"bert"`` (separate
            ``query``/``key``/``value``) or ``"gpt2"`` (fused ``c_attn`` Conv1D).
        num_heads: heads at construction.
        head_dim: channels per head (unchanged by head pruning).
        qkv: the projection layers whose output channels hold the heads (one fused layer or three).
    """

    name: str
    module: nn.Module
    kind: str
    num_heads: int
    head_dim: int
    qkv: list[nn.Module]


@dataclass
class TPConfig:
    """How to build and use a Torch-Pruning dependency graph on one model.

    Args:
        num_heads: head count of each q/k/v projection layer (Torch-Pruning's ``MetaPruner(num_heads=...)`` form).
        customized_pruners: pruners for layer types (or instances) Torch-Pruning does not know (``Conv1D``,
            ``nn.MultiheadAttention`` with head removal).
        unwrapped_parameters: ``(parameter, channel dim)`` for parameters outside known layers (layer scale
            ``gamma``, ``cls_token``, ``pos_embed``).
        root_module_types: layer types to add to the roots of channel groups (``Conv1D``).
        ignored: ``{layer name: reason}`` for layers that must not be channel-pruned (embeddings and the residual
            stream they set, groups a LayerNorm normalises over, output layers of attention that cannot be reshaped).
        attention: the attention modules, by name.
        inner: modules traced as one node whose inner channels are groups of their own (``nn.MultiheadAttention``,
            GPT-2 attention, ShuffleNet blocks), by name: see `extra_groups`.
        prune_num_heads: heads are removed whole (always True here; head dims are never pruned, so the attention
            scale ``head_dim ** -0.5`` stays exact).
    """

    num_heads: dict[nn.Module, int] = field(default_factory=dict)
    customized_pruners: dict[Any, BasePruningFunc] = field(default_factory=dict)
    unwrapped_parameters: list[tuple[nn.Parameter, int]] = field(default_factory=list)
    root_module_types: tuple[type, ...] = ()
    ignored: dict[str, str] = field(default_factory=dict)
    attention: dict[str, AttentionSpec] = field(default_factory=dict)
    inner: dict[str, nn.Module] = field(default_factory=dict)
    prune_num_heads: bool = True

    def graph_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``tp.DependencyGraph().build_dependency(model, example_inputs, **kwargs)``.

        Includes a ``forward_fn`` that calls the model the way `lightning_opt.inputs` does (a tuple is
        positional, a dict keyword), so a one-tensor input is never unpacked along its batch dimension.
        """
        opaque = [m for m in self.inner.values() if _is_shuffle_block(m)]
        return {
            "customized_pruners": dict(self.customized_pruners),
            "unwrapped_parameters": list(self.unwrapped_parameters),
            "forward_fn": functools.partial(_forward, opaque=opaque),
            "verbose": False,
        }

    def ignored_modules(self, model: nn.Module) -> list[nn.Module]:
        """The modules named in `ignored` (for ``get_all_groups(ignored_layers=...)``)."""
        modules = dict(model.named_modules())
        return [modules[n] for n in self.ignored if n in modules]

    def members(self, module: nn.Module) -> list[nn.Module]:
        """The layers whose channels the inner group of ``module`` (a `inner` module) removes.

        For a root filter: keep an `extra_groups` group when one of these layers is selected for pruning.
        """
        m: Any = module
        spec = self.head_module(module)
        if spec is not None and spec.kind == "mha":
            return [module, m.out_proj]
        if spec is not None and spec.kind == "gpt2":
            return [m.c_attn, m.c_proj]
        if _is_shuffle_block(module):
            return [m.branch2[0], m.branch2[3], m.branch2[5]]
        return []

    def head_module(self, module: nn.Module) -> AttentionSpec | None:
        """The attention whose q/k/v projections include ``module`` (or which is ``module``), if any."""
        for spec in self.attention.values():
            if module is spec.module or any(module is m for m in spec.qkv):
                return spec
        return None


#: Attention kinds whose heads are a group of the attention module itself (handler ``prune_heads``).
_MODULE_LEVEL = ("mha", "gpt2")


def _forward(model: nn.Module, example: Any, opaque: Sequence[nn.Module] = ()) -> Any:
    """Call the model on an example for tracing, with Hugging Face key/value caches off and ``opaque`` blocks as one op.

    A cache concatenates each key/value onto an empty tensor, a concatenation Torch-Pruning cannot map (it fails with
    ``unsupported operand type(s) for +: 'int' and 'NoneType'``); caches do not change the outputs. Each ``opaque``
    module runs as one autograd node (`_Opaque`) for this call only, so the trace does not enter it.
    """
    configs: dict[int, Any] = {
        id(c): c for m in model.modules() if hasattr(c := getattr(m, "config", None), "use_cache")
    }
    saved = {k: c.use_cache for k, c in configs.items()}
    patched: list[nn.Module] = []
    try:
        for c in configs.values():
            c.use_cache = False
        for m in opaque:
            m.forward = functools.partial(_opaque_forward, type(m).forward.__get__(m))
            patched.append(m)
        return inputs.call(model, example)
    finally:
        for k, c in configs.items():
            c.use_cache = saved[k]
        for m in patched:
            del m.forward


class _Opaque(torch.autograd.Function):
    """Runs a module's forward as one autograd node whose only input is the module's input (tracing only)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        with torch.no_grad():
            return fn(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, None]:  # pragma: no cover - never differentiated
        raise RuntimeError("_Opaque is for dependency tracing only.")


def _opaque_forward(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    out = _Opaque.apply(x, fn)
    assert isinstance(out, Tensor)
    return out


def _conv1d_type() -> type | None:
    """Hugging Face ``Conv1D`` if transformers is loaded (a model holding one has loaded it), else None."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def _attention_specs(model: nn.Module) -> tuple[dict[str, AttentionSpec], dict[str, str]]:
    specs: dict[str, AttentionSpec] = {}
    refused: dict[str, str] = {}
    conv1d = _conv1d_type()
    for name, m in model.named_modules():
        cls = type(m).__name__
        if isinstance(m, nn.MultiheadAttention):
            if not (m._qkv_same_embed_dim or isinstance(m, PrunedMultiheadAttention)) or m.in_proj_weight is None:
                refused[name] = "nn.MultiheadAttention with kdim/vdim != embed_dim: heads are not pruned"
            elif m.bias_k is not None or m.add_zero_attn:
                refused[name] = "nn.MultiheadAttention with add_bias_kv/add_zero_attn: heads are not pruned"
            else:
                specs[name] = AttentionSpec(name, m, "mha", int(m.num_heads), int(m.head_dim), [m])
        elif isinstance(getattr(m, "qkv", None), nn.Linear) and hasattr(m, "num_heads") and hasattr(m, "head_dim"):
            qkv = m.qkv
            if getattr(m, "attn_dim", None) is None or qkv.out_features != 3 * m.num_heads * m.head_dim:
                refused[name] = f"{cls}: fused qkv without `attn_dim` (or not 3 x heads x head_dim): heads not pruned"
                continue
            if not isinstance(getattr(m, "q_norm", nn.Identity()), nn.Identity) or not isinstance(
                getattr(m, "norm", nn.Identity()), nn.Identity
            ):
                refused[name] = f"{cls}: q/k norm or scale norm over the head channels: heads are not pruned"
                continue
            if getattr(m, "gate", None) is not None:
                refused[name] = f"{cls}: gated attention: heads are not pruned"
                continue
            specs[name] = AttentionSpec(name, m, "timm", int(m.num_heads), int(m.head_dim), [qkv])
        elif all(isinstance(getattr(m, a, None), nn.Linear) for a in ("query", "key", "value")) and hasattr(
            m, "num_attention_heads"
        ):
            specs[name] = AttentionSpec(
                name, m, "bert", int(m.num_attention_heads), int(m.attention_head_size), [m.query, m.key, m.value]
            )
        elif conv1d is not None and isinstance(getattr(m, "c_attn", None), conv1d) and hasattr(m, "split_size"):
            if getattr(m, "is_cross_attention", False):
                refused[name] = f"{cls}: cross-attention: heads are not pruned"
                continue
            specs[name] = AttentionSpec(name, m, "gpt2", int(m.num_heads), int(m.head_dim), [m.c_attn])
    return specs, refused


def transformer_config(model: nn.Module, example_inputs: Any) -> TPConfig:
    """Inspect ``model`` and say how to prune its channels and heads consistently with Torch-Pruning.

    Traces the model once (in eval mode; the train/eval flags are restored) to find the groups that cannot be
    removed with outputs equal to the masked model's, and lists their layers in `TPConfig.ignored`:

    - the hidden size set by an embedding (``nn.Embedding``, a ``cls_token``/``pos_embed`` parameter): the residual
      stream of a transformer; pruning it would change the tied embeddings and every block;
    - groups a ``LayerNorm`` (or a ``GroupNorm`` with several channels a group) normalises over: a masked channel
      still counts in the mean and variance, so the removed model computes something else;
    - groups that change the embedding dimension of an ``nn.MultiheadAttention`` (its heads are pruned instead).

    Args:
        model: the model (the whole LightningModule, as it will be traced).
        example_inputs: one input (tensor, tuple of positional inputs, or dict of keyword inputs).

    Returns:
        The configuration.

    Examples:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
        >>> config = transformer_config(model, torch.zeros(2, 4))
        >>> config.ignored["0"][:40]
        'normalised over by the LayerNorm 1: a ma'
    """
    config = TPConfig()
    conv1d = _conv1d_type()
    if conv1d is not None and any(isinstance(m, conv1d) for m in model.modules()):
        config.customized_pruners[conv1d] = Conv1DPruner()
        config.root_module_types = (conv1d,)
    config.attention, refused = _attention_specs(model)
    if any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
        config.customized_pruners[nn.MultiheadAttention] = MultiheadAttentionHeadPruner()
    for spec in config.attention.values():
        for layer in spec.qkv:
            config.num_heads[layer] = spec.num_heads
        if spec.kind == "gpt2":
            config.customized_pruners[type(spec.module)] = GPT2AttentionPruner()
    for name, spec in config.attention.items():
        if spec.kind in _MODULE_LEVEL:
            config.inner[name] = spec.module
    for name, m in model.named_modules():
        if _is_shuffle_block(m):
            config.customized_pruners[type(m)] = ShuffleBlockPruner()
            config.inner[name] = m
    config.unwrapped_parameters = _unwrapped(model)
    config.ignored.update(refused)
    config.ignored.update(_inconsistent_groups(model, example_inputs, config))
    return config


def _unwrapped(model: nn.Module) -> list[tuple[nn.Parameter, int]]:
    """Parameters outside the layers Torch-Pruning knows, with their channel dim (the last, as Torch-Pruning does).

    Layer scale (``gamma``: ``(C,)`` or ``(C, 1, 1)``), ``cls_token`` and ``pos_embed`` (``(1, N, C)``).
    """
    known: tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.modules.batchnorm._BatchNorm)
    known += (nn.LayerNorm, nn.GroupNorm)
    known += (nn.Embedding, nn.MultiheadAttention, nn.PReLU)
    conv1d = _conv1d_type()
    if conv1d is not None:
        known += (conv1d,)
    out: list[tuple[nn.Parameter, int]] = []
    for m in model.modules():
        if isinstance(m, known):
            continue
        for p in m.parameters(recurse=False):
            dims = [i for i, s in enumerate(p.shape) if s > 1]
            if not dims:
                continue
            # (C, 1, 1) scales a conv's channels (dim 0); otherwise the last dim holds the channels
            out.append((p, dims[0] if p.dim() == 3 and p.shape[1:] == (1, 1) else dims[-1]))
    return out


@contextlib.contextmanager
def modules_with_eq_hidden(model: nn.Module) -> Iterator[None]:
    """Detach, for the duration, every submodule whose class overloads ``==`` (torchmetrics ``Metric``s).

    Torch-Pruning compares modules with ``==`` and ``in`` while it builds its graph (``m == layer_type`` for each
    customized pruner, ``m not in ignored_layers`` for each layer); a torchmetrics ``Metric`` overloads ``==`` to build
    a (truthy) compositional metric, so one metric attribute on a LightningModule (``LanguageModel.val_metric``) with
    one customized pruner (Hugging Face ``Conv1D``, ``nn.MultiheadAttention``) made every layer look ignored: the
    trace recorded no layer and no channel group could be pruned. The modules come back in their original order.

    Examples:
        >>> import torchmetrics
        >>> model = nn.Sequential(nn.Linear(2, 2), torchmetrics.MeanMetric())
        >>> with modules_with_eq_hidden(model):
        ...     [type(m).__name__ for m in model.children()]
        ['Linear']
        >>> [type(m).__name__ for m in model.children()]
        ['Linear', 'MeanMetric']
    """
    saved: list[tuple[nn.Module, dict[str, nn.Module | None]]] = []
    for parent in list(model.modules()):
        children = parent._modules
        if any(c is not None and type(c).__eq__ is not nn.Module.__eq__ for c in children.values()):
            saved.append((parent, dict(children)))
            for name in [n for n, c in children.items() if c is not None and type(c).__eq__ is not nn.Module.__eq__]:
                del children[name]
    try:
        yield
    finally:
        for parent, children in saved:
            parent._modules.clear()
            parent._modules.update(children)


def _build(model: nn.Module, example_inputs: Any, config: TPConfig) -> tp.DependencyGraph:
    modes = {m: m.training for m in model.modules()}
    try:
        with torch.enable_grad(), warnings.catch_warnings(), modules_with_eq_hidden(model):
            warnings.simplefilter("ignore")
            return tp.DependencyGraph().build_dependency(model, example_inputs, **config.graph_kwargs())
    finally:
        for m, mode in modes.items():
            m.training = mode


def _roots(config: TPConfig) -> tuple[type, ...]:
    return (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, *config.root_module_types)


def _inconsistent_groups(model: nn.Module, example_inputs: Any, config: TPConfig) -> dict[str, str]:
    dg = _build(model, example_inputs, config)
    names = {m: n for n, m in model.named_modules()}
    unwrapped = {id(p): n for n, p in model.named_parameters()}
    ignored: dict[str, str] = {}
    for group in dg.get_all_groups(root_module_types=_roots(config)):
        reasons: list[tuple[int, str]] = []  # (priority, reason): the embedding explains a residual stream best
        for item in group.items:
            mod = item.dep.target.module
            is_out = dg.is_out_channel_pruning_fn(item.dep.handler)
            if isinstance(mod, nn.Embedding) and is_out:
                reasons.append(
                    (0, f"hidden size set by the embedding {names.get(mod, '?')} (the residual stream): kept")
                )
            elif isinstance(mod, nn.Parameter) and mod.dim() == 3 and id(mod) in unwrapped:
                reasons.append(
                    (1, f"hidden size set by the parameter {unwrapped[id(mod)]} (token/position embedding): kept")
                )
            elif isinstance(mod, nn.MultiheadAttention):
                reasons.append(
                    (2, f"embedding dimension of the attention {names.get(mod, '?')} (its heads are pruned instead)")
                )
            elif any(mod is m for m in config.inner.values()):
                reasons.append(
                    (3, f"channels of {names.get(mod, '?')}, traced as one node (only its inner channels are pruned)")
                )
            elif isinstance(mod, nn.LayerNorm) and is_out:
                reasons.append(
                    (
                        4,
                        f"normalised over by the LayerNorm {names.get(mod, '?')}: a masked channel still counts in its "
                        "mean and variance, so removal would change the outputs",
                    )
                )
            elif isinstance(mod, nn.GroupNorm) and is_out and mod.num_channels != mod.num_groups:
                reasons.append(
                    (5, f"normalised over by the GroupNorm {names.get(mod, '?')} ({mod.num_groups} groups of channels)")
                )
        reason = min(reasons)[1] if reasons else None
        if reason is None:
            continue
        for item in group.items:
            mod = item.dep.target.module
            if (
                isinstance(mod, _roots(config))
                and dg.is_out_channel_pruning_fn(item.dep.handler)
                and mod in names
                and names[mod] not in ignored
            ):
                ignored[names[mod]] = reason
    return ignored


# --------------------------------------------------------------------------------------------------------------------
# Groups, heads, masks
# --------------------------------------------------------------------------------------------------------------------


def extra_groups(config: TPConfig, dg: tp.DependencyGraph) -> list[tp.Group]:
    """Groups ``dg.get_all_groups`` cannot find: the inner channels of the modules in `TPConfig.inner`.

    The heads of each ``nn.MultiheadAttention`` and GPT-2 attention (handler ``prune_heads``, one channel per inner
    q/k/v channel; `head_slices` numbers their heads) and the hidden channels of ShuffleNet blocks (handler
    ``prune_inner``). Remove with ``dg.get_pruning_group(group[0].dep.target.module, group[0].dep.handler,
    idxs).prune()``, as any other group.
    """
    groups = []
    for module in config.inner.values():
        if module not in dg.module2node:
            continue
        pruner = dg.get_pruner_of_module(module)
        handler = getattr(pruner, "prune_heads", None) or getattr(pruner, "prune_inner", None)
        assert handler is not None, f"no inner-channel pruner for {type(module).__name__}"
        n = pruner.get_inner_channels(module)
        groups.append(dg.get_pruning_group(module, handler, list(range(n))))
    return groups


def head_slices(config: TPConfig, group: tp.Group) -> Tensor | None:
    """The head of each root channel of ``group``, or ``None`` when the group holds no attention heads.

    Heads are numbered within their attention module (``0..num_heads-1``). For a fused ``qkv`` root the q, k and v
    channels of a head share its number; a root channel that feeds no head is ``-1``. Prune a head by pruning all
    channels with its number; prune no partial head (the attention ``forward`` reshapes by ``head_dim``).

    Args:
        config: from `transformer_config`.
        group: a group from ``dg.get_all_groups`` or `extra_groups`.

    Returns:
        A ``long`` tensor with one entry per root channel, or ``None``.
    """
    root_idxs = group[0].root_idxs if hasattr(group[0], "root_idxs") else list(group[0].idxs)
    n = len(root_idxs)
    for item in group.items:
        mod = item.dep.target.module
        if not isinstance(mod, nn.Module):
            continue
        spec = config.head_module(mod)
        if spec is None:
            continue
        handler_name = getattr(item.dep.handler, "__name__", "")
        if spec.kind in _MODULE_LEVEL:
            if mod is not spec.module or handler_name != "prune_heads":
                continue
        elif mod is spec.module or not group._DG.is_out_channel_pruning_fn(item.dep.handler):
            continue
        heads = torch.full((n,), -1, dtype=torch.long)
        root_pos = {int(r): i for i, r in enumerate(root_idxs)}
        inner = _inner(spec)
        for idx, ridx in zip(item.idxs, item.root_idxs):
            channel = int(idx) % inner if spec.kind == "timm" else int(idx)
            heads[root_pos[int(ridx)]] = channel // spec.head_dim
        return heads
    return None


def channel_units(config: TPConfig, group: tp.Group) -> Tensor | None:
    """The unit of each root channel of ``group``: channels of one unit must be kept or removed together.

    A unit is an attention head (`head_slices`), or, through a grouped convolution with ``G`` groups (not
    depthwise), the channels at the same position in every group (``c % (C / G)``): removal keeps the convolution's
    groups equal in size only when each group loses the same positions. ``None`` when every channel is a unit.

    Args:
        config: from `transformer_config`.
        group: a group from ``dg.get_all_groups`` or `extra_groups`.

    Returns:
        A ``long`` tensor with one unit number (``0..U-1``, in order of first channel) per root channel, or ``None``.

    Examples:
        >>> import torch_pruning as tp
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, groups=2), nn.Conv2d(8, 4, 1))
        >>> dg = tp.DependencyGraph().build_dependency(model, torch.zeros(1, 3, 8, 8))
        >>> group = dg.get_pruning_group(model[0], tp.prune_conv_out_channels, list(range(8)))
        >>> channel_units(TPConfig(), group).tolist()
        [0, 1, 2, 3, 0, 1, 2, 3]
    """
    root_idxs = [int(r) for r in group[0].root_idxs]
    n = len(root_idxs)
    pos = {r: i for i, r in enumerate(root_idxs)}
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    constrained = False
    heads = head_slices(config, group)
    keys: list[dict[int, int]] = []
    if heads is not None:
        constrained = True
        keys.append({i: int(h) for i, h in enumerate(heads.tolist()) if h >= 0})
    for item in group.items:
        mod = item.dep.target.module
        if not isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or mod.groups == 1 or mod.groups == mod.out_channels:
            continue
        size = mod.out_channels if group._DG.is_out_channel_pruning_fn(item.dep.handler) else mod.in_channels
        period = size // mod.groups
        constrained = True
        keys.append({pos[int(r)]: int(t) % period for t, r in zip(item.idxs, item.root_idxs)})
    if not constrained:
        return None
    for key in keys:
        first: dict[int, int] = {}
        for i, k in key.items():
            if k in first:
                parent[find(i)] = find(first[k])
            else:
                first[k] = i
    labels: dict[int, int] = {}
    return torch.tensor([labels.setdefault(find(i), len(labels)) for i in range(n)], dtype=torch.long)


def _inner(spec: AttentionSpec) -> int:
    """The current inner (all heads) size of an attention, read from its projection layers."""
    m: Any = spec.module
    layer: Any = spec.qkv[0]
    if spec.kind == "mha":
        return int(m.num_heads) * int(m.head_dim)
    if spec.kind == "timm":
        return int(layer.out_features) // 3
    if spec.kind == "bert":
        return int(layer.out_features)
    return int(layer.nf) // 3


def param_slices(
    config: TPConfig, module: nn.Module, handler: Callable[..., Any], idxs: Sequence[int]
) -> list[tuple[str, int, Tensor]] | None:
    """Where channels ``idxs`` of a group item live in ``module``'s own parameters, for layers only this module knows.

    Args:
        config: from `transformer_config`.
        module: the group item's module.
        handler: the item's pruning function (``dep.handler``).
        idxs: the item's channel indices (``item.idxs``).

    Returns:
        ``[(parameter name relative to module, dim, indices)]`` to zero for a masked channel, or ``None`` if the
        module is not one of ``Conv1D`` / ``nn.MultiheadAttention`` (let the caller's own rules decide).

    Examples:
        >>> attn = nn.MultiheadAttention(8, 2)
        >>> pruner = MultiheadAttentionHeadPruner()
        >>> [(n, d, i.tolist()) for n, d, i in param_slices(TPConfig(), attn, pruner.prune_heads, [1])]
        [('in_proj_weight', 0, [1, 9, 17]), ('in_proj_bias', 0, [1, 9, 17]), ('out_proj.weight', 1, [1])]
    """
    idx = torch.as_tensor([int(i) for i in idxs], dtype=torch.long)
    name = getattr(handler, "__name__", "")
    mod: Any = module
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        if name == "prune_out_channels":
            return [("weight", 1, idx), ("bias", 0, idx)]
        return [("weight", 0, idx)]
    if isinstance(getattr(module, "c_attn", None), conv1d or ()) and hasattr(module, "split_size"):
        if name == "prune_heads":
            inner = int(mod.num_heads) * int(mod.head_dim)
            cols = torch.cat([idx, idx + inner, idx + 2 * inner])
            return [("c_attn.weight", 1, cols), ("c_attn.bias", 0, cols), ("c_proj.weight", 0, idx)]
        return [("c_attn.weight", 0, idx), ("c_proj.weight", 1, idx), ("c_proj.bias", 0, idx)]
    if name == "prune_inner" and _is_shuffle_block(module):
        out = [("branch2.0.weight", 0, idx)]
        out += [(f"branch2.{i}.{p}", 0, idx) for i in (1, 4) for p in ("weight", "bias")]
        out += [("branch2.3.weight", 0, idx)] + (
            [("branch2.3.bias", 0, idx)] if mod.branch2[3].bias is not None else []
        )
        return [*out, ("branch2.5.weight", 1, idx)]
    if isinstance(module, nn.MultiheadAttention):
        if name == "prune_heads":
            inner = int(mod.num_heads) * int(mod.head_dim)
            rows = torch.cat([idx, idx + inner, idx + 2 * inner])
            out = [("in_proj_weight", 0, rows)]
            if mod.in_proj_bias is not None:
                out.append(("in_proj_bias", 0, rows))
            out.append(("out_proj.weight", 1, idx))
            return out
        raise NotImplementedError(
            f"masking the embedding dimension of nn.MultiheadAttention is not supported (handler {name}). "
            "HINT: prune its heads (`extra_groups`) instead; transformer_config lists this group in `ignored`."
        )
    return None


def after_removal(model: nn.Module, config: TPConfig) -> None:
    """Update head counts and sizes on every attention module after its heads were removed.

    Sets ``num_heads``/``attn_dim`` (timm), ``num_attention_heads``/``all_head_size`` (BERT), ``num_heads``/
    ``split_size``/``embed_dim`` stays (GPT-2: ``split_size`` is the inner size the fused projection is split by).
    ``nn.MultiheadAttention`` is already updated by its pruner. Head dims are never changed.

    Args:
        model: the model whose groups were removed (``config`` must come from this model).
        config: from `transformer_config`.

    Raises:
        RuntimeError: if a projection's size is not a whole number of heads (a partial head was removed).
    """
    del model  # the specs hold the modules
    for spec in config.attention.values():
        m: Any = spec.module
        if spec.kind == "bert" and len({layer.out_features for layer in spec.qkv}) != 1:
            raise RuntimeError(
                f"{spec.name}: query/key/value have {[layer.out_features for layer in spec.qkv]} outputs after "
                "removal; they must match. HINT: prune whole heads (`head_slices`)."
            )
        inner = _inner(spec)
        if inner % spec.head_dim:
            raise RuntimeError(
                f"{spec.name}: {inner} inner channels is not a whole number of heads of {spec.head_dim}. "
                "HINT: prune whole heads (`head_slices`)."
            )
        heads = inner // spec.head_dim
        if spec.kind == "timm":
            m.num_heads, m.attn_dim = heads, inner
        elif spec.kind == "bert":
            m.num_attention_heads, m.all_head_size = heads, inner
        else:
            m.num_heads, m.split_size = heads, inner
        config.num_heads.update({layer: heads for layer in spec.qkv})


# --------------------------------------------------------------------------------------------------------------------
# Saving and reloading a pruned structure
# --------------------------------------------------------------------------------------------------------------------

#: Attributes the attention ``forward`` methods read, by kind.
_HEAD_ATTRS = {
    "mha": ("num_heads",),
    "timm": ("num_heads", "attn_dim"),
    "bert": ("num_attention_heads", "all_head_size"),
    "gpt2": ("num_heads", "split_size"),
}


def attention_structure(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Head counts and sizes of every attention module and the shape of every ``Conv1D`` (plain ints and int lists).

    Store it beside the state dict of a model whose heads were removed; `restore_attention_structure` rebuilds
    the thin attention on a freshly built model. The format (``{module name: {attribute: value}}``) is the one of
    `pruned_structure`, so the two can be merged.

    Examples:
        >>> attn = nn.MultiheadAttention(8, 2)
        >>> _ = MultiheadAttentionHeadPruner().prune_heads(attn, [4, 5, 6, 7])
        >>> attention_structure(nn.Sequential(attn))
        {'0': {'num_heads': 1, 'kept_heads': [0]}}
    """
    specs, _ = _attention_specs(model)
    out: dict[str, dict[str, Any]] = {}
    for name, spec in specs.items():
        m: Any = spec.module
        attrs: dict[str, Any] = {a: int(getattr(m, a)) for a in _HEAD_ATTRS[spec.kind]}
        if isinstance(m, PrunedMultiheadAttention):
            attrs["kept_heads"] = [int(h) for h in m.kept_heads]
        out[name] = attrs
    conv1d = _conv1d_type()
    if conv1d is not None:
        for name, layer in model.named_modules():
            if isinstance(layer, conv1d):
                c: Any = layer
                out[name] = {"nf": int(c.nf), "nx": int(c.nx)}
    return out


def restore_attention_structure(
    model: nn.Module, structure: dict[str, dict[str, Any]], state_dict: dict[str, Tensor] | None = None
) -> None:
    """Set the head counts and sizes saved by `attention_structure` on a freshly built model.

    A ``nn.MultiheadAttention`` saved with ``kept_heads`` becomes a `PrunedMultiheadAttention`. With
    ``state_dict``, the parameters of the listed modules are also resized to the saved shapes, so that
    ``model.load_state_dict(state_dict)`` works.

    Args:
        model: a new instance built with the original constructor arguments.
        structure: from `attention_structure` (other entries are ignored).
        state_dict: the saved state dict (optional).

    Raises:
        ValueError: if ``structure`` names a module ``model`` does not have.

    Examples:
        >>> attn = nn.MultiheadAttention(8, 2)
        >>> _ = MultiheadAttentionHeadPruner().prune_heads(attn, [0, 1, 2, 3])
        >>> saved, state = attention_structure(nn.Sequential(attn)), nn.Sequential(attn).state_dict()
        >>> fresh = nn.Sequential(nn.MultiheadAttention(8, 2))
        >>> restore_attention_structure(fresh, saved, state)
        >>> fresh.load_state_dict(state)
        <All keys matched successfully>
        >>> type(fresh[0]).__name__, fresh[0].num_heads, fresh[0].kept_heads
        ('PrunedMultiheadAttention', 1, [1])
    """
    modules = dict(model.named_modules())
    for name, attrs in structure.items():
        module: Any = modules.get(name)
        if module is None:
            raise ValueError(
                f"`structure` names a module {name!r} that {type(model).__name__} does not have. "
                "HINT: build the model with the constructor arguments it was pruned with."
            )
        known = {"kept_heads", "nf", "nx", *(a for attrs_ in _HEAD_ATTRS.values() for a in attrs_)}
        for attr, value in attrs.items():
            if attr in known:
                setattr(module, attr, list(value) if isinstance(value, list) else int(value))
        if "kept_heads" in attrs and isinstance(module, nn.MultiheadAttention):
            module.__class__ = PrunedMultiheadAttention
            module._qkv_same_embed_dim = False
        if state_dict is None:
            continue
        prefix = f"{name}." if name else ""
        for sub_name, sub in module.named_modules():
            sub_prefix = f"{prefix}{sub_name}." if sub_name else prefix
            for key, param in list(sub._parameters.items()):
                saved = state_dict.get(sub_prefix + key)
                if param is None or saved is None or saved.shape == param.shape:
                    continue
                empty = torch.empty(saved.shape, dtype=param.dtype, device=param.device)
                sub._parameters[key] = nn.Parameter(empty, requires_grad=param.requires_grad)
            if isinstance(sub, nn.Linear):
                sub.out_features, sub.in_features = sub.weight.shape
