"""Pure mask computation and in-place application (no Lightning import).

Masks are boolean tensors with the parameter's shape, ``True`` = kept. They live outside the model (in the
callback and its checkpoint state), so the model's ``state_dict`` never holds mask buffers and a checkpoint loads
into the plain model with its zeros.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "apply_masks",
    "channel_keep",
    "mask_sparsity",
    "masks_from_model",
    "nm_masks",
    "select_modules",
    "unstructured_masks",
]


def _resolve_type(name: str) -> type[nn.Module]:
    if "." in name:
        mod_name, _, cls_name = name.rpartition(".")
        import importlib

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
    """Modules to prune: of ``module_types``, with a ``weight``, name matching ``include`` and not ``exclude``.

    Args:
        model: the model to search.
        module_types: ``torch.nn`` class names (``"Conv2d"``) or full class paths.
        include: regexes (``re.search``); a module is kept if any matches. ``None`` keeps all.
        exclude: regexes; a module is dropped if any matches.

    Returns:
        ``{module name: module}`` in ``named_modules`` order.

    Raises:
        ValueError: if an ``include`` regex matches no prunable module (the message lists them), or nothing is left.

    Example:
        >>> m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> list(select_modules(m, ["Linear"], exclude=[r"^2$"]))
        ['0']
    """
    types = tuple(_resolve_type(t) for t in module_types)
    candidates = {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(mod, types) and isinstance(getattr(mod, "weight", None), Tensor)
    }
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

    Example:
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

    Example:
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
) -> dict[str, Tensor]:
    """Channel masks: in each pool of channel groups prune the lowest-scoring fraction of channels.

    Each group keeps at least one channel. In a pool of several groups (global scope) scores are divided by the
    group's mean score when ``normalize`` so that layers of different size and scale compare.

    Args:
        channel_scores: ``{group name: score per channel}``.
        keeps: ``{group name: current bool keep per channel}``.
        pools: ``(group names, target fraction of channels)`` pairs.
        normalize: divide scores by the group mean in multi-group pools.

    Returns:
        New keep vectors for every group in the pools.

    Example:
        >>> keep = {"c": torch.ones(4, dtype=torch.bool)}
        >>> channel_keep({"c": torch.tensor([3.0, 1.0, 2.0, 4.0])}, keep, [(["c"], 0.5)])
        {'c': tensor([ True, False, False,  True])}
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
        k = min(max(round(target * total), already), total - len(names))
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

    Example:
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
