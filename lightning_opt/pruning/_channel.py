"""Channel groups from Torch-Pruning's dependency graph: group masks while training, physical removal at the end."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn

from lightning_opt import inputs

__all__ = ["ChannelGroups", "UnsupportedModelError", "load_pruned", "output_error", "rehearse_removal", "save_pruned"]


class UnsupportedModelError(ValueError):
    """Torch-Pruning cannot build the dependency graph of the model (an internal error while tracing it)."""


def _is_hf_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


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
    if _is_hf_conv1d(module):  # weight (in, out)
        if is_out:
            return [("weight", 1)] + ([("bias", 0)] if getattr(module, "bias", None) is not None else [])
        return [("weight", 0)]
    if isinstance(module, nn.Embedding):  # embedding vectors are the hidden channels
        return [("weight", 1)]
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
    return []  # parameters not masked: the removal rehearsal (`rehearse_removal`) finds out whether that matters


def _culprits(err: BaseException, names: Mapping[nn.Module, str]) -> list[str]:
    """The layers next to where Torch-Pruning failed: the module nodes feeding the graph node it was processing."""
    tb = err.__traceback__
    node = None
    while tb is not None:
        node = tb.tb_frame.f_locals.get("node", node)
        tb = tb.tb_next
    found: list[str] = []
    stack, seen = [node] if node is not None else [], set()
    while stack and len(found) < 3:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        module = getattr(n, "module", None)
        if isinstance(module, nn.Module) and module in names:
            found.append(names[module])
            continue
        stack.extend(getattr(n, "inputs", []))
    return found


class ChannelGroups:
    """Coupled channel groups of a model (Torch-Pruning ``DependencyGraph``), masked in place and removable.

    A group is a Conv/Linear root and everything whose channels are tied to its output channels (BatchNorm,
    residual additions, the next layers' input channels). Masking a channel zeroes it in every member, so the masked
    model computes exactly what the model with the channel removed computes.

    Args:
        model: the model (the LightningModule) to trace.
        roots: ``{name: module}`` allowed as pruning roots; others (and output layers) are not pruned.
        example_inputs: an input for one forward pass: a tensor, a tuple of positional inputs or a dict of keyword
            inputs (:mod:`lightning_opt.inputs`).
        graph_kwargs: more keyword arguments of ``tp.DependencyGraph().build_dependency`` (``customized_pruners``,
            ``unwrapped_parameters``...).

    Raises:
        UnsupportedModelError: if Torch-Pruning fails while tracing the model (the message names the layers next to
            where it failed).
        ValueError: if no group can be pruned.
    """

    def __init__(
        self,
        model: nn.Module,
        roots: Mapping[str, nn.Module],
        example_inputs: Any,
        graph_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        modes = {m: m.training for m in model.modules()}
        module_names = {m: n for n, m in model.named_modules()}
        self.model = model
        try:
            with torch.enable_grad():
                self.dg = tp.DependencyGraph().build_dependency(
                    model,
                    example_inputs=example_inputs,
                    forward_fn=lambda m, x: inputs.call(m, x),
                    verbose=False,
                    **dict(graph_kwargs or {}),
                )
        except Exception as err:
            near = _culprits(err, module_names)
            raise UnsupportedModelError(
                f"Torch-Pruning cannot trace {type(model).__name__} for channel pruning: {type(err).__name__}: {err} "
                f"(near layers {near}). HINT: prune this model with granularity='unstructured' or 'nm'; channel "
                f"pruning of this architecture is not supported."
            ) from err
        finally:
            for m, mode in modes.items():
                m.training = mode
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
                out_dim=1 if isinstance(root, _CONV_T) or _is_hf_conv1d(root) else 0,
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
        return sum(self.remove_group(gname, keeps[gname]) for gname in self.groups if gname in keeps)

    @torch.no_grad()
    def remove_group(self, name: str, keep: Tensor) -> int:
        """Physically remove the pruned channels of one group.

        Args:
            name: group name.
            keep: bool keep per channel.

        Returns:
            The number of channels removed.
        """
        g = self.groups[name]
        idxs = torch.nonzero(~keep.cpu()).flatten().tolist()
        if idxs:
            self.dg.get_pruning_group(g.root, g.handler, idxs).prune()
        return len(idxs)


def output_error(reference: Any, output: Any) -> tuple[float, float]:
    """``(max abs difference, tolerance)`` between two model outputs (tensors, tuples, dicts, model outputs).

    The tolerance is ``1e-4`` times the reference's largest magnitude (at least ``1e-4``): float32 reordering stays far
    below it, a removed channel that mattered does not. Outputs of different structure or shape give ``inf``.
    """
    ref, out = inputs.flat_tensors(reference), inputs.flat_tensors(output)
    if len(ref) != len(out) or any(a.shape != b.shape for a, b in zip(ref, out)):
        return float("inf"), 0.0
    err, scale = 0.0, 1.0
    for a, b in zip(ref, out):
        if torch.is_floating_point(a):
            err = max(err, float((a.float() - b.float()).abs().max())) if a.numel() else err
            scale = max(scale, float(a.abs().max())) if a.numel() else scale
        elif not torch.equal(a, b):
            err = float("inf")
    return err, 1e-4 * scale


def rehearsal_keeps(groups: ChannelGroups, fraction: float = 0.25) -> dict[str, Tensor]:
    """Keep vectors that drop every ``round(1 / fraction)``-th channel of every group (at least one, never all)."""
    step = max(2, round(1 / fraction))
    keeps = {}
    for name, g in groups.groups.items():
        keep = torch.ones(g.channels, dtype=torch.bool)
        keep[1::step] = False
        if keep.all():
            keep[-1] = g.channels < 2
        keeps[name] = keep
    return keeps


@torch.no_grad()
def rehearse_removal(
    model: nn.Module,
    roots: Mapping[str, nn.Module],
    example_inputs: Any,
    graph_kwargs: Callable[[nn.Module], Mapping[str, Any]] | None = None,
    after_removal: Callable[[nn.Module], None] | None = None,
    fraction: float = 0.25,
) -> dict[str, str]:
    """Try channel removal on copies of ``model``: which groups cannot be removed without changing the outputs.

    Each pass deep-copies the model, masks a ``fraction`` of the channels of every group still believed removable,
    records the masked model's outputs on ``example_inputs`` (eval mode), then removes the groups one by one and
    compares the outputs after each removal (:func:`output_error`). The first group whose removal raises or changes
    the outputs is recorded and the pass restarts without it, until a pass removes all the rest cleanly.

    Args:
        model: the model (never modified).
        roots: ``{name: module of model}`` allowed as roots.
        example_inputs: the example (tensor, tuple or dict).
        graph_kwargs: a function giving the extra ``build_dependency`` arguments for a copy of the model.
        after_removal: called on the copy after each group's removal (e.g. to update head counts).
        fraction: share of channels masked per group.

    Returns:
        ``{group name: reason}`` of the groups that cannot be removed (empty when all can).

    Raises:
        UnsupportedModelError: if Torch-Pruning cannot trace the model at all.
        ValueError: if no group can be pruned.
    """
    names = {id(m): n for n, m in model.named_modules()}
    root_names = [names[id(m)] for m in roots.values()]
    bad: dict[str, str] = {}
    while True:
        work = copy.deepcopy(model).eval()
        modules = dict(work.named_modules())
        work_roots = {n: modules[n] for n in root_names if n not in bad}
        if not work_roots:
            return bad
        groups = ChannelGroups(work, work_roots, example_inputs, graph_kwargs(work) if graph_kwargs else None)
        keeps = rehearsal_keeps(groups, fraction)
        params = dict(work.named_parameters())
        for n, mk in groups.param_masks(keeps, params).items():
            params[n].mul_(mk)
        reference = inputs.call(work, example_inputs)
        failed = None
        for gname in groups.groups:
            try:
                groups.remove_group(gname, keeps[gname])
                if after_removal is not None:
                    after_removal(work)
                err, tol = output_error(reference, inputs.call(work, example_inputs))
            except Exception as e:  # any failure of the removal or of the thinner model's forward pass
                failed = (gname, f"removal fails: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                break
            if not err <= tol:
                failed = (gname, f"outputs change by {err:.3g} (tolerance {tol:.2g}) once its channels are removed")
                break
        if failed is None:
            return bad
        bad[failed[0]] = failed[1]


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


#: Module attributes that describe a layer's shape; channel removal changes them.
_SHAPE_ATTRS = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features")
STRUCTURE_KEY = "lightning_opt_pruned_structure"


def pruned_structure(model: nn.Module) -> dict[str, dict[str, int]]:
    """The shape attributes of every layer (plain ints, so a checkpoint holding them loads with ``weights_only``).

    :class:`~lightning_opt.pruning.Pruning` stores this in every checkpoint saved after channel removal, under
    ``"lightning_opt_pruned_structure"``; :func:`restore_pruned_structure` uses it to rebuild the thin layers.
    """
    return {
        name: {a: int(getattr(module, a)) for a in _SHAPE_ATTRS if isinstance(getattr(module, a, None), int)}
        for name, module in model.named_modules()
        if any(isinstance(getattr(module, a, None), int) for a in _SHAPE_ATTRS)
    }


def restore_pruned_structure(model: nn.Module, checkpoint: dict[str, Any]) -> bool:
    """Reshape a freshly built model to the thin architecture a checkpoint was saved with, so its weights load.

    Call it from ``LightningModule.on_load_checkpoint`` (``ImageClassifier`` does), so that
    ``Model.load_from_checkpoint(path)`` and ``trainer.test(ckpt_path=path)`` work on a checkpoint saved after
    pruned channels were removed (``trainer.save_checkpoint`` after fit).

    Returns:
        True when layers were reshaped (the checkpoint holds a pruned structure).

    Example:
        >>> m = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
        >>> g = ChannelGroups(m, {"0": m[0]}, torch.zeros(1, 4))
        >>> _ = g.remove({"0": torch.tensor([True, False, True])})
        >>> ckpt = {"state_dict": m.state_dict(), STRUCTURE_KEY: pruned_structure(m)}
        >>> fresh = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
        >>> restore_pruned_structure(fresh, ckpt)
        True
        >>> fresh.load_state_dict(ckpt["state_dict"])
        <All keys matched successfully>
        >>> fresh[1].in_features
        2
    """
    structure = checkpoint.get(STRUCTURE_KEY)
    if not structure:
        return False
    modules = dict(model.named_modules())
    state = checkpoint.get("state_dict", {})
    for name, attrs in structure.items():
        module = modules.get(name)
        if module is None:
            raise ValueError(
                f"The checkpoint's pruned structure names a layer {name!r} that {type(model).__name__} does not have."
            )
        for attr, value in attrs.items():
            setattr(module, attr, value)
        prefix = f"{name}." if name else ""
        for tensors in (module._parameters, module._buffers):
            for key, tensor in list(tensors.items()):
                saved = state.get(prefix + key)
                if tensor is None or saved is None or saved.shape == tensor.shape:
                    continue
                empty = torch.empty(saved.shape, dtype=tensor.dtype, device=tensor.device)
                tensors[key] = nn.Parameter(empty, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else empty
    return True
