"""Pure mask computation and in-place application (no Lightning import).

Masks are boolean tensors with the parameter's shape, ``True`` = kept. They live outside the model (in the
callback and its checkpoint state), so the model's ``state_dict`` never holds mask buffers and a checkpoint loads
into the plain model with its zeros.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "DEFAULT_MODULE_TYPES",
    "apply_masks",
    "channel_keep",
    "coverage",
    "mask_sparsity",
    "masks_from_model",
    "module_weights",
    "nm_masks",
    "select_modules",
    "select_weights",
    "unstructured_masks",
]

DEFAULT_MODULE_TYPES = (
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "Linear",
    "MultiheadAttention",
    "transformers.pytorch_utils.Conv1D",
)
"""Module types pruned by default. ``MultiheadAttention`` contributes its input projections (``in_proj_weight``, or
``q/k/v_proj_weight``; its ``out_proj`` is a ``Linear``); Hugging Face's ``Conv1D`` (GPT-2) is used when
``transformers`` is installed."""
_OPTIONAL_TYPES = ("transformers.pytorch_utils.Conv1D",)


def _is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): a linear layer whose weight is stored ``(in, out)``."""
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


def module_weights(module: nn.Module) -> list[tuple[str, int]]:
    """The prunable weights of a module and the axis of their input features: ``[(parameter name, input axis)]``.

    ``Linear``/``Conv`` weights are ``(out, in, ...)`` (input axis 1); Hugging Face's ``Conv1D`` stores ``(in, out)``
    (axis 0); ``MultiheadAttention`` holds its input projections as ``in_proj_weight`` ``(3 * embed, embed)``, or
    ``q/k/v_proj_weight`` when key and value sizes differ. N:M groups run along the input axis.

    Args:
        module: any module.

    Returns:
        The list, empty when the module has no prunable weight of its own.

    Examples:
        >>> module_weights(nn.MultiheadAttention(8, 2))
        [('in_proj_weight', 1)]
        >>> module_weights(nn.Linear(2, 3))
        [('weight', 1)]
    """
    if isinstance(module, nn.MultiheadAttention):
        names = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
        return [(n, 1) for n in names if isinstance(getattr(module, n, None), Tensor)]
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() < 2:
        return []
    return [("weight", 0 if _is_hf_conv1d(module) else 1)]


def _resolve_type(name: str) -> type[nn.Module] | None:
    if name in _OPTIONAL_TYPES and importlib.util.find_spec(name.split(".")[0]) is None:
        return None  # a default type of a library that is not installed
    if "." in name:
        mod_name, _, cls_name = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(mod_name), cls_name)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"`module_types` entry {name!r} cannot be imported: {err}.") from err
    else:
        cls = getattr(nn, name, None)
        if cls is None:
            raise ValueError(
                f"`module_types` entry {name!r} is not a torch.nn class. HINT: use e.g. 'Conv2d', 'Linear' or a "
                "full class path such as 'my_pkg.layers.MyConv'."
            )
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"`module_types` entry {name!r} is not an nn.Module subclass.")
    return cls


def select_modules(
    model: nn.Module,
    module_types: Sequence[str],
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> dict[str, nn.Module]:
    """Modules to prune: of ``module_types``, with a prunable weight (`module_weights`), name matching
    ``include`` and not ``exclude``.

    Args:
        model: the model to search.
        module_types: ``torch.nn`` class names (``"Conv2d"``) or full class paths.
        include: regexes (``re.search``); a module is kept if any matches. ``None`` keeps all.
        exclude: regexes; a module is dropped if any matches.

    Returns:
        ``{module name: module}`` in ``named_modules`` order.

    Raises:
        ValueError: if an ``include`` regex matches no prunable module (the message lists them), or nothing is left.

    Examples:
        >>> m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> list(select_modules(m, ["Linear"], exclude=[r"^2$"]))
        ['0']
    """
    types = tuple(t for t in (_resolve_type(t) for t in module_types) if t is not None)
    candidates = {name: mod for name, mod in model.named_modules() if isinstance(mod, types) and module_weights(mod)}
    selected = dict(candidates)
    if include:
        for pattern in include:
            if not any(re.search(pattern, n) for n in candidates):
                raise ValueError(
                    f"`include` pattern {pattern!r} matches no prunable module. Prunable modules of types "
                    f"{list(module_types)}: {list(candidates)}."
                )
        selected = {n: m for n, m in selected.items() if any(re.search(p, n) for p in include)}
    if exclude:
        selected = {n: m for n, m in selected.items() if not any(re.search(p, n) for p in exclude)}
    if not selected:
        raise ValueError(
            f"No module left to prune (module_types={list(module_types)}, include={include}, exclude={exclude}). "
            f"Prunable modules: {list(candidates)}."
        )
    return selected


def select_weights(model: nn.Module, modules: Mapping[str, nn.Module]) -> dict[str, tuple[str, int]]:
    """The weights of the selected modules by their ``model.named_parameters()`` name, each once.

    A weight shared by several modules (GPT-2's ``lm_head.weight`` is the token embedding) appears once, under the
    name ``named_parameters`` gives it (the first owner), so it is scored, masked and counted once.

    Args:
        model: the model holding ``modules``.
        modules: ``{module name: module}`` (e.g. from `select_modules`).

    Returns:
        ``{parameter name: (selecting module name, input axis)}``.

    Examples:
        >>> emb = nn.Embedding(10, 4)
        >>> head = nn.Linear(4, 10, bias=False)
        >>> head.weight = emb.weight
        >>> m = nn.Sequential(emb, head)
        >>> select_weights(m, {"1": head})
        {'0.weight': ('1', 1)}
    """
    canonical = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, tuple[str, int]] = {}
    for mname, module in modules.items():
        for pname, axis in module_weights(module):
            name = canonical.get(id(getattr(module, pname)))
            if name is not None and name not in out:
                out[name] = (mname, axis)
    return out


def coverage(model: nn.Module, covered: Iterable[str]) -> tuple[float, list[tuple[str, str, float]]]:
    """Which share of a model's parameters a technique covers, and what it leaves out.

    Args:
        model: the model (each shared parameter counted once).
        covered: names (``named_parameters``) of the covered parameters.

    Returns:
        ``(covered fraction of all parameter elements, [(name, owner module type, fraction of all elements)])`` for
        every parameter not covered, largest first.

    Examples:
        >>> m = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        >>> share, left = coverage(m, ["0.weight"])
        >>> round(share, 3), [(n, t) for n, t, _ in left]
        (0.571, [('0.bias', 'Linear'), ('1.weight', 'LayerNorm'), ('1.bias', 'LayerNorm')])
    """
    owners: dict[int, str] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), type(module).__name__)
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    if not total:
        return 1.0, []
    covered = set(covered)
    done = sum(p.numel() for n, p in params.items() if n in covered)
    left = [(n, owners.get(id(p), "?"), p.numel() / total) for n, p in params.items() if n not in covered]
    left.sort(key=lambda r: -r[2])
    return done / total, left


def _pool_prune(scores: list[Tensor], masks: list[Tensor], target: float) -> list[Tensor]:
    """Prune the ``round(target * n)`` lowest scores of a pool; already pruned elements stay pruned."""
    flat = torch.cat([torch.where(m.reshape(-1), s.reshape(-1).float(), -torch.inf) for s, m in zip(scores, masks)])
    n = flat.numel()
    already = int((flat == -torch.inf).sum())
    k = max(round(target * n), already)
    keep = torch.ones(n, dtype=torch.bool, device=flat.device)
    if k > 0:
        keep[torch.topk(flat, k, largest=False, sorted=False).indices] = False
    out, offset = [], 0
    for m in masks:
        out.append(keep[offset : offset + m.numel()].view_as(m))
        offset += m.numel()
    return out


def unstructured_masks(
    scores: Mapping[str, Tensor],
    masks: Mapping[str, Tensor],
    pools: Iterable[tuple[Sequence[str], float]],
) -> dict[str, Tensor]:
    """Element masks: in each pool of tensors, prune the lowest-scoring fraction ``target``.

    A global scope is one pool of all tensors (one threshold); a per-layer scope is one pool per tensor. Elements
    pruned before stay pruned (masks only shrink), and each pool reaches exactly ``round(target * n)`` zeros.

    Args:
        scores: ``{name: score tensor}``.
        masks: ``{name: current bool mask}`` (True = kept).
        pools: ``(names, target sparsity)`` pairs.

    Returns:
        New masks for every name in the pools.

    Examples:
        >>> s = {"a": torch.tensor([1.0, 5.0]), "b": torch.tensor([2.0, 3.0])}
        >>> m = {k: torch.ones(2, dtype=torch.bool) for k in s}
        >>> unstructured_masks(s, m, [(["a", "b"], 0.5)])
        {'a': tensor([False,  True]), 'b': tensor([False,  True])}
    """
    out: dict[str, Tensor] = {}
    for names, target in pools:
        names = list(names)
        if not names:
            continue
        new = _pool_prune([scores[n] for n in names], [masks[n] for n in names], target)
        out.update(zip(names, new))
    return out


def nm_masks(score: Tensor, mask: Tensor, n: int, m: int, pruned_per_group: int) -> Tensor:
    """N:M masks: in every group of ``m`` consecutive weights along the input dimension prune the lowest ones.

    Groups run along dim 1 (the input features / input channels), as the 2:4 sparse tensor cores expect; for a
    conv weight ``(out, in, kh, kw)`` a group is ``m`` input channels at one kernel position.

    Args:
        score: importance, shaped like the weight.
        mask: the current mask (pruned elements stay pruned).
        n: weights kept per group at the end.
        m: group size.
        pruned_per_group: zeros per group at this step, in ``[0, m - n]``.

    Returns:
        The new mask.

    Raises:
        ValueError: if the input dimension is not divisible by ``m``.

    Examples:
        >>> w = torch.tensor([[1.0, -4.0, 3.0, 2.0, 0.5, 0.1, 0.2, 9.0]])
        >>> nm_masks(w.abs(), torch.ones_like(w, dtype=torch.bool), 2, 4, 2).int()
        tensor([[0, 1, 1, 0, 1, 0, 0, 1]], dtype=torch.int32)
    """
    if score.dim() < 2 or score.shape[1] % m:
        raise ValueError(f"N:M needs the input dimension divisible by m={m}, got weight shape {tuple(score.shape)}.")
    k = max(0, min(pruned_per_group, m - n))
    perm = [0, *range(2, score.dim()), 1]  # move the input dim last
    s = torch.where(mask, score.float(), -torch.inf).permute(perm).reshape(-1, m)
    keep = torch.ones_like(s, dtype=torch.bool)
    if k > 0:
        keep.scatter_(1, torch.topk(s, k, dim=1, largest=False).indices, False)
    keep &= s != -torch.inf
    shape = [score.shape[i] for i in perm]
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return keep.reshape(shape).permute(inv).contiguous()


def channel_keep(
    channel_scores: Mapping[str, Tensor],
    keeps: Mapping[str, Tensor],
    pools: Iterable[tuple[Sequence[str], float]],
    normalize: bool = True,
    sizes: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Channel masks: in each pool of channel groups prune the lowest-scoring fraction of channels.

    With ``sizes`` the entries are units of several channels (attention heads, grouped-convolution positions): the
    lowest-scoring units are pruned until ``round(target * channels)`` channels of the pool are pruned.

    Each group keeps at least one channel. In a pool of several groups (global scope) scores are divided by the
    group's mean score when ``normalize`` so that layers of different size and scale compare.

    Args:
        channel_scores: ``{group name: score per channel}``.
        keeps: ``{group name: current bool keep per channel}``.
        pools: ``(group names, target fraction of channels)`` pairs.
        normalize: divide scores by the group mean in multi-group pools.
        sizes: ``{group name: channels per entry}`` (default one channel per entry).

    Returns:
        New keep vectors for every group in the pools.

    Examples:
        >>> keep = {"c": torch.ones(4, dtype=torch.bool)}
        >>> channel_keep({"c": torch.tensor([3.0, 1.0, 2.0, 4.0])}, keep, [(["c"], 0.5)])
        {'c': tensor([ True, False, False,  True])}
        >>> heads = {"h": torch.ones(3, dtype=torch.bool)}  # 3 heads of 2 channels: 3 of 6 channels take 2 heads
        >>> sizes = {"h": torch.tensor([2, 2, 2])}
        >>> channel_keep({"h": torch.tensor([3.0, 1.0, 2.0])}, heads, [(["h"], 0.5)], sizes=sizes)
        {'h': tensor([ True, False, False])}
    """
    out: dict[str, Tensor] = {}
    for names, target in pools:
        names = list(names)
        if not names:
            continue
        scores = []
        for n in names:
            s = channel_scores[n].float()
            if normalize and len(names) > 1:
                s = s / s[keeps[n]].mean().clamp_min(1e-12)
            s = torch.where(keeps[n], s, -torch.inf).clone()
            # the best channel of each group is never pruned
            s[torch.argmax(s)] = torch.inf
            scores.append(s)
        flat = torch.cat(scores)
        total = flat.numel()
        already = int((flat == -torch.inf).sum())
        if sizes is None:
            k = round(target * total)
        else:  # the fewest lowest units whose channels reach the target
            flat_sizes = torch.cat([sizes[n].reshape(-1).to(flat.device, torch.float64) for n in names])
            goal = round(target * float(flat_sizes.sum()))
            cum = torch.cumsum(flat_sizes[torch.sort(flat, stable=True).indices], 0)
            k = int(torch.searchsorted(cum, torch.tensor([goal], dtype=torch.float64, device=flat.device))) + 1
            k = k if goal > 0 else 0
        k = min(max(k, already), total - len(names))
        keep = torch.ones(total, dtype=torch.bool, device=flat.device)
        if k > 0:
            keep[torch.topk(flat, k, largest=False, sorted=False).indices] = False
        offset = 0
        for n, s in zip(names, scores):
            out[n] = keep[offset : offset + s.numel()]
            offset += s.numel()
    return out


@torch.no_grad()
def apply_masks(module: nn.Module, masks: Mapping[str, Tensor], strict: bool = True) -> list[str]:
    """Zero the pruned elements of ``module``'s parameters in place, by parameter name.

    Use it to re-apply masks after something replaced parameters (an exported QAT graph, a reloaded state dict).

    Args:
        module: the model whose ``named_parameters()`` hold the names of ``masks``.
        masks: ``{parameter name: bool mask}`` (True = kept), e.g. ``Pruning.masks``.
        strict: raise if a name is missing or a shape differs; otherwise skip those.

    Returns:
        The names that were not found (empty when all applied).

    Raises:
        KeyError: if ``strict`` and a mask has no parameter of that name and shape.

    Examples:
        >>> lin = nn.Linear(2, 1, bias=False)
        >>> _ = apply_masks(lin, {"weight": torch.tensor([[True, False]])})
        >>> float(lin.weight[0, 1].abs())
        0.0
    """
    params = dict(module.named_parameters())
    missing = []
    for name, mask in masks.items():
        p = params.get(name)
        if p is None or p.shape != mask.shape:
            missing.append(name)
            continue
        p.mul_(mask.to(p.device))
    if strict and missing:
        raise KeyError(f"masks without a matching parameter (name and shape): {missing}")
    return missing


def masks_from_model(module: nn.Module, names: Iterable[str]) -> dict[str, Tensor]:
    """Masks that keep the nonzero elements of the named parameters (to inspect or rebuild masks from zeros).

    Args:
        module: the model.
        names: parameter names.

    Returns:
        ``{name: weight != 0}``.
    """
    params = dict(module.named_parameters())
    return {n: params[n].detach() != 0 for n in names}


def mask_sparsity(masks: Mapping[str, Tensor]) -> tuple[float, dict[str, float]]:
    """Fraction of pruned elements, overall and per tensor.

    Args:
        masks: ``{name: bool mask}``.

    Returns:
        ``(global sparsity, {name: sparsity})``.
    """
    per = {n: 1.0 - float(m.float().mean()) for n, m in masks.items()}
    total = sum(m.numel() for m in masks.values())
    pruned = sum(m.numel() - int(m.sum()) for m in masks.values())
    return (pruned / total if total else 0.0), per
