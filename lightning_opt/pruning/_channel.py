"""Channel groups from Torch-Pruning's dependency graph: group masks while training, physical removal at the end."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn

__all__ = ["ChannelGroups", "load_pruned", "save_pruned"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_PER_CHANNEL = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, nn.PReLU)


@dataclass
class _Item:
    param: str
    dim: int
    target_idxs: Tensor
    root_idxs: Tensor


@dataclass
class _Group:
    name: str
    root: nn.Module
    handler: Any
    channels: int
    out_dim: int
    items: list[_Item] = field(default_factory=list)


def _param_dims(module: nn.Module, handler: Any, is_out: bool) -> list[tuple[str, int]]:
    """Which of ``module``'s own parameters a channel of this dependency lives in, and along which dim."""
    own = [n for n, _ in module.named_parameters(recurse=False)]
    if not own:
        return []
    kind = type(getattr(handler, "__self__", None)).__name__
    if isinstance(module, (*_CONV, nn.Linear)):
        depthwise = "Depthwise" in kind
        if is_out or depthwise:
            return [("weight", 0)] + ([("bias", 0)] if module.bias is not None else [])
        if isinstance(module, _CONV) and module.groups > 1:
            return []  # grouped input channels: zero inputs already make them inert
        return [("weight", 1)]
    if isinstance(module, _CONV_T):
        if is_out:
            return [("weight", 1)] + ([("bias", 0)] if module.bias is not None else [])
        return [("weight", 0)]
    if isinstance(module, _PER_CHANNEL) or (isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1):
        return [(n, 0) for n in own]
    raise NotImplementedError(
        f"channel pruning does not know how to mask the parameters of {type(module).__name__} "
        f"(coupled to a pruned channel). HINT: add its producing layers to `exclude`."
    )


class ChannelGroups:
    """Coupled channel groups of a model (Torch-Pruning ``DependencyGraph``), masked in place and removable.

    A group is a Conv/Linear root and everything whose channels are tied to its output channels (BatchNorm,
    residual additions, the next layers' input channels). Masking a channel zeroes it in every member, so the masked
    model computes exactly what the model with the channel removed computes.

    Args:
        model: the model (the LightningModule) to trace.
        roots: ``{name: module}`` allowed as pruning roots; others (and output layers) are not pruned.
        example_inputs: an input for one forward pass.

    Raises:
        ValueError: if no group can be pruned.
    """

    def __init__(self, model: nn.Module, roots: Mapping[str, nn.Module], example_inputs: Any) -> None:
        modes = {m: m.training for m in model.modules()}
        try:
            with torch.enable_grad():
                self.dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
        finally:
            for m, mode in modes.items():
                m.training = mode
        module_names = {m: n for n, m in model.named_modules()}
        root_set = {id(m) for m in roots.values()}
        prunable_types = _CONV + _CONV_T + (nn.Linear,)
        outputs = [m for m, node in self.dg.module2node.items() if isinstance(m, nn.Module) and not node.outputs]
        ignored: list[nn.Module] = [
            m for m in model.modules() if isinstance(m, prunable_types) and id(m) not in root_set
        ]
        ignored += outputs
        self.output_layers = [module_names[m] for m in outputs if m in module_names]
        self.groups: dict[str, _Group] = {}
        for group in self.dg.get_all_groups(ignored_layers=ignored, root_module_types=prunable_types):
            root = group[0].dep.target.module
            name = module_names[root]
            g = _Group(
                name=name,
                root=root,
                handler=group[0].dep.handler,
                channels=len(group[0].idxs),
                out_dim=1 if isinstance(root, _CONV_T) else 0,
            )
            for item in group.items:
                mod = item.dep.target.module
                if not isinstance(mod, nn.Module) or mod not in module_names:
                    continue
                is_out = self.dg.is_out_channel_pruning_fn(item.dep.handler)
                for pname, dim in _param_dims(mod, item.dep.handler, is_out):
                    full = f"{module_names[mod]}.{pname}" if module_names[mod] else pname
                    g.items.append(
                        _Item(full, dim, torch.as_tensor(list(item.idxs)), torch.as_tensor(list(item.root_idxs)))
                    )
            self.groups[name] = g
        if not self.groups:
            raise ValueError(
                f"No channel group can be pruned among {list(roots)} (output layers {self.output_layers} are never "
                "channel-pruned). HINT: check `module_types`/`include`/`exclude`."
            )

    @property
    def param_names(self) -> list[str]:
        """Names of all parameters that some group masks."""
        seen: dict[str, None] = {}
        for g in self.groups.values():
            for it in g.items:
                seen[it.param] = None
        return list(seen)

    def root_weight(self, name: str) -> Tensor:
        """The root layer's weight of group ``name``."""
        weight = self.groups[name].root.weight
        assert isinstance(weight, Tensor)
        return weight

    def channel_scores(self, name: str, elementwise: Tensor) -> Tensor:
        """Sum an elementwise score of the root weight over each output channel.

        Args:
            name: group name.
            elementwise: scores shaped like the root weight.

        Returns:
            One score per channel.
        """
        g = self.groups[name]
        return elementwise.transpose(0, g.out_dim).reshape(g.channels, -1).sum(1)

    def param_masks(self, keeps: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Turn per-group channel keep vectors into boolean masks of every coupled parameter.

        Args:
            keeps: ``{group name: bool keep per channel}``.
            params: ``{parameter name: tensor}`` (for shapes and devices).

        Returns:
            ``{parameter name: bool mask}`` for :attr:`param_names`.
        """
        masks = {n: torch.ones_like(params[n], dtype=torch.bool) for n in self.param_names}
        for gname, g in self.groups.items():
            pruned = ~keeps[gname].cpu()
            if not pruned.any():
                continue
            for it in g.items:
                sel = pruned[it.root_idxs]
                if sel.any():
                    idx = it.target_idxs[sel].to(masks[it.param].device)
                    masks[it.param].index_fill_(it.dim, idx, False)
        return masks

    @torch.no_grad()
    def remove(self, keeps: Mapping[str, Tensor]) -> int:
        """Physically remove the pruned channels of every group (Torch-Pruning ``Group.prune``).

        Args:
            keeps: ``{group name: bool keep per channel}``.

        Returns:
            The number of channels removed.
        """
        removed = 0
        for gname, g in self.groups.items():
            idxs = torch.nonzero(~keeps[gname].cpu()).flatten().tolist()
            if not idxs:
                continue
            self.dg.get_pruning_group(g.root, g.handler, idxs).prune()
            removed += len(idxs)
        return removed


def save_pruned(model: nn.Module, path: str | Path) -> None:
    """Save a model whose channels were removed: weights and the changed layer shapes (``tp.state_dict``).

    Each direct child module that holds parameters is stored with Torch-Pruning's ``tp.state_dict`` (the root's own
    attributes and parameter-free children such as metrics are left out, so a LightningModule saves too). Reload
    with :func:`load_pruned` into a freshly built model of the same class.

    Args:
        model: the pruned model (a LightningModule or any ``nn.Module``).
        path: file to write.

    Example:
        >>> import tempfile, os
        >>> m = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
        >>> p = os.path.join(tempfile.mkdtemp(), "pruned.pt")
        >>> g = ChannelGroups(m, {"0": m[0]}, torch.zeros(1, 4))
        >>> _ = g.remove({"0": torch.tensor([True, False, True])})
        >>> save_pruned(m, p)
        >>> load_pruned(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)), p)[1].in_features
        2
    """
    children = {
        name: tp.state_dict(child)
        for name, child in model.named_children()
        if any(True for _ in child.parameters())  # metrics and other parameter-free children are rebuilt as they are
    }
    torch.save({"format": "lightning_opt.pruned/1", "children": children}, path)


def load_pruned(model: nn.Module, path: str | Path) -> nn.Module:
    """Load :func:`save_pruned` output into a freshly built (unpruned) model of the same class.

    Args:
        model: a new instance built with the original constructor arguments.
        path: the file written by :func:`save_pruned`.

    Returns:
        ``model``, reshaped to the pruned architecture and holding the pruned weights, in ``model``'s train/eval
        mode.

    Raises:
        ValueError: if the file was not written by :func:`save_pruned` or names a child ``model`` lacks.
    """
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or state.get("format") != "lightning_opt.pruned/1":
        raise ValueError(f"{path} was not written by lightning_opt.pruning.save_pruned.")
    training = model.training
    for name, child_state in state["children"].items():
        child = getattr(model, name, None)
        if not isinstance(child, nn.Module):
            raise ValueError(f"{path} holds a child module {name!r} that {type(model).__name__} does not have.")
        tp.load_state_dict(child, state_dict=child_state)
    return model.train(training)  # the file also holds the train/eval flags of the moment it was saved
