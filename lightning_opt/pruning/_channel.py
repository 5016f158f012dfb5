"""Channel groups from Torch-Pruning's dependency graph: group masks while training, physical removal at the end."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn

from lightning_opt import inputs
from lightning_opt._io import atomic_save
from lightning_opt._utils import detached_copy
from lightning_opt.pruning._attention import (
    TPConfig,
    after_removal,
    attention_structure,
    channel_units,
    extra_groups,
    head_slices,
    modules_with_eq_hidden,
    param_slices,
    restore_attention_structure,
    transformer_config,
)

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
    heads: Tensor | None = None  # unit of each root channel (an attention head, a grouped-conv position; -1: kept)
    inner: bool = False  # heads or a block's inner channels: scored over all the group's weights, not a root weight


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


def modules_by_name(model: nn.Module) -> dict[str, nn.Module]:
    """``dict(model.named_modules())``."""
    return dict(model.named_modules())


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
            inputs (`lightning_opt.inputs`).
        transformer: configure Torch-Pruning for transformers and blocks it does not know by itself
            (`transformer_config`): attention heads are groups pruned as
            whole heads (head counts updated on removal), Hugging Face ``Conv1D``, layer scale; groups that removal
            cannot keep equal (the hidden size set by embeddings, channels a LayerNorm normalises over) are left out
            and listed in `excluded`.

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
        transformer: bool = True,
    ) -> None:
        modes = {m: m.training for m in model.modules()}
        module_names = {m: n for n, m in model.named_modules()}
        self.model = model
        self.config: TPConfig | None = None
        try:
            kwargs: dict[str, Any] = {"forward_fn": lambda m, x: inputs.call(m, x), "verbose": False}
            if transformer:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self.config = transformer_config(model, example_inputs)
                kwargs = self.config.graph_kwargs()
            with torch.enable_grad(), warnings.catch_warnings(), modules_with_eq_hidden(model):
                warnings.simplefilter("ignore")  # Torch-Pruning's note on unwrapped parameters
                self.dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, **kwargs)
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
        prunable_types = _CONV + _CONV_T + (nn.Linear,) + (self.config.root_module_types if self.config else ())
        outputs = [m for m, node in self.dg.module2node.items() if isinstance(m, nn.Module) and not node.outputs]
        ignored: list[nn.Module] = [
            m for m in model.modules() if isinstance(m, prunable_types) and id(m) not in root_set
        ]
        ignored += outputs
        #: ``{layer name: reason}`` of the layers the transformer configuration keeps unpruned
        self.excluded: dict[str, str] = {}
        if self.config is not None:
            named = modules_by_name(model)
            self.excluded = {n: w for n, w in self.config.ignored.items() if n in named and id(named[n]) in root_set}
            ignored += self.config.ignored_modules(model)
        self.output_layers = [module_names[m] for m in outputs if m in module_names]
        self.groups: dict[str, _Group] = {}
        canonical = {id(p): n for n, p in model.named_parameters()}  # a tied weight under one name
        all_groups = list(self.dg.get_all_groups(ignored_layers=ignored, root_module_types=prunable_types))
        if self.config is not None:
            for group in extra_groups(self.config, self.dg):  # heads of MHA / GPT-2, ShuffleNet blocks' inner channels
                if any(id(m) in root_set for m in self.config.members(group[0].dep.target.module)):
                    all_groups.append(group)
        for group in all_groups:
            root = group[0].dep.target.module
            name = module_names[root]
            g = _Group(
                name=name,
                root=root,
                handler=group[0].dep.handler,
                channels=len(group[0].idxs),
                out_dim=1 if isinstance(root, _CONV_T) or _is_hf_conv1d(root) else 0,
                heads=channel_units(self.config, group) if self.config is not None else None,
                inner=self.config is not None
                and (head_slices(self.config, group) is not None or not isinstance(root, prunable_types)),
            )
            g.items = self._items(group, module_names, canonical)
            self.groups[name] = g
        if not self.groups:
            raise ValueError(
                f"No channel group can be pruned among {list(roots)} (output layers {self.output_layers} are never "
                "channel-pruned). HINT: check `module_types`/`include`/`exclude`."
            )

    def _items(self, group: Any, module_names: dict[nn.Module, str], canonical: dict[int, str]) -> list[_Item]:
        """The parameter slices a Torch-Pruning group removes, each under its parameter's canonical name."""
        items: list[_Item] = []
        for item in group.items:
            mod = item.dep.target.module
            if not isinstance(mod, nn.Module) or mod not in module_names:
                continue
            root_idxs = torch.as_tensor([int(i) for i in item.root_idxs])
            slices = param_slices(self.config, mod, item.dep.handler, item.idxs) if self.config else None
            if slices is None:
                is_out = self.dg.is_out_channel_pruning_fn(item.dep.handler)
                idx = torch.as_tensor([int(i) for i in item.idxs])
                slices = [(pname, dim, idx) for pname, dim in _param_dims(mod, item.dep.handler, is_out)]
            for pname, dim, idx in slices:
                try:
                    param = mod.get_parameter(pname)
                except AttributeError:  # e.g. no bias
                    continue
                full = canonical.get(id(param))
                if full is None:
                    continue
                reps = max(1, len(idx) // max(1, len(root_idxs)))  # q/k/v rows of one head channel
                items.append(_Item(full, dim, idx, root_idxs.repeat(reps)))
        return items

    @property
    def param_names(self) -> list[str]:
        """Names of all parameters that some group masks."""
        seen: dict[str, None] = {}
        for g in self.groups.values():
            for it in g.items:
                seen[it.param] = None
        return list(seen)

    def root_weight(self, name: str) -> Tensor | None:
        """The root layer's weight of group ``name`` (``None`` for a head group rooted at an attention module)."""
        weight = getattr(self.groups[name].root, "weight", None)
        return weight if isinstance(weight, Tensor) and not self.groups[name].inner else None

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

    def group_scores(self, name: str, elementwise: Mapping[str, Tensor]) -> Tensor:
        """Sum an elementwise score of every parameter of a group over each root channel (heads: every q/k/v/out
        weight of the head).

        Args:
            name: group name.
            elementwise: ``{parameter name: scores shaped like it}`` for the group's parameters.

        Returns:
            One score per root channel.
        """
        g = self.groups[name]
        out = torch.zeros(g.channels)
        for it in g.items:
            s = elementwise[it.param].float().cpu()
            per = s.transpose(0, it.dim).reshape(s.shape[it.dim], -1).sum(1)
            out.index_add_(0, it.root_idxs, per[it.target_idxs])
        return out

    def units(self, name: str) -> Tensor:
        """The pruning unit of each root channel: its head for attention groups (``-1`` = always kept), else itself."""
        g = self.groups[name]
        return g.heads if g.heads is not None else torch.arange(g.channels)

    def unit_scores(self, name: str, channel_scores: Tensor) -> tuple[Tensor, Tensor]:
        """``(unit ids, score per unit)``: channel scores summed over each head (heads are scored as units)."""
        units = self.units(name)
        ids = torch.unique(units[units >= 0])
        return ids, torch.stack([channel_scores[units == u].sum() for u in ids])

    def channel_keep_of_units(self, name: str, ids: Tensor, unit_keep: Tensor) -> Tensor:
        """Per-channel keep from a keep per unit (channels of no head are kept)."""
        units = self.units(name)
        keep = torch.ones(units.numel(), dtype=torch.bool)
        for u, k in zip(ids.tolist(), unit_keep.tolist()):
            if not k:
                keep[units == u] = False
        return keep

    def param_masks(self, keeps: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Turn per-group channel keep vectors into boolean masks of every coupled parameter.

        Args:
            keeps: ``{group name: bool keep per channel}``.
            params: ``{parameter name: tensor}`` (for shapes and devices).

        Returns:
            ``{parameter name: bool mask}`` for `param_names`.
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
            if self.config is not None:
                after_removal(self.model, self.config)
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
    """Keep vectors that drop a seeded random ``fraction`` of the units (channels, heads) of every group (at least
    one, never all): an irregular pattern, as the ones training chooses.
    """
    generator = torch.Generator().manual_seed(0)
    keeps = {}
    for name in groups.groups:
        ids = groups.unit_scores(name, torch.zeros(groups.groups[name].channels))[0]
        n = ids.numel()
        unit_keep = torch.ones(n, dtype=torch.bool)
        drop = min(max(1, round(fraction * n)), n - 1)
        unit_keep[torch.randperm(n, generator=generator)[:drop]] = False  # irregular, as training's choices are
        keeps[name] = groups.channel_keep_of_units(name, ids, unit_keep)
    return keeps


@torch.no_grad()
def rehearse_removal(
    model: nn.Module,
    roots: Mapping[str, nn.Module],
    example_inputs: Any,
    transformer: bool = True,
    fraction: float = 0.25,
) -> dict[str, str]:
    """Try channel removal on copies of ``model``: which groups cannot be removed without changing the outputs.

    Each pass deep-copies the model, masks a ``fraction`` of the channels of every group still believed removable,
    records the masked model's outputs on ``example_inputs`` (eval mode), then removes the groups one by one and
    compares the outputs after each removal (`output_error`). The first group whose removal raises or changes
    the outputs is recorded and the pass restarts without it, until a pass removes all the rest cleanly.

    Args:
        model: the model (never modified).
        roots: ``{name: module of model}`` allowed as roots.
        example_inputs: the example (tensor, tuple or dict).
        transformer: as for `ChannelGroups`.
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
        work = detached_copy(model).eval()
        modules = dict(work.named_modules())
        work_roots = {n: modules[n] for n in root_names if n not in bad}
        if not work_roots:
            return bad
        groups = ChannelGroups(work, work_roots, example_inputs, transformer)
        keeps = rehearsal_keeps(groups, fraction)
        params = dict(work.named_parameters())
        for n, mk in groups.param_masks(keeps, params).items():
            params[n].mul_(mk)
        reference = inputs.call(work, example_inputs)
        failed = None
        for gname in groups.groups:
            try:
                groups.remove_group(gname, keeps[gname])
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
    """Save a model whose channels were removed: its weights and the changed layer shapes, as plain tensors and ints.

    The file holds the model's ``state_dict`` and `pruned_structure` (layer widths, head counts, kept heads),
    nothing that needs code to load: `load_pruned` reads it with ``torch.load(weights_only=True)`` into a
    freshly built model of the same class. The file is written atomically (a temporary name, then a rename).

    Args:
        model: the pruned model (a LightningModule or any ``nn.Module``).
        path: file to write.

    Examples:
        >>> import tempfile, os
        >>> m = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
        >>> p = os.path.join(tempfile.mkdtemp(), "pruned.pt")
        >>> g = ChannelGroups(m, {"0": m[0]}, torch.zeros(1, 4))
        >>> _ = g.remove({"0": torch.tensor([True, False, True])})
        >>> save_pruned(m, p)
        >>> load_pruned(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)), p)[1].in_features
        2
    """
    payload = {"format": _PRUNED_FORMAT, "state_dict": model.state_dict(), STRUCTURE_KEY: pruned_structure(model)}
    atomic_save(payload, path)


def load_pruned(model: nn.Module, path: str | Path) -> nn.Module:
    """Load `save_pruned` output (weights-only) into a freshly built (unpruned) model of the same class.

    Args:
        model: a new instance built with the original constructor arguments.
        path: the file written by `save_pruned`.

    Returns:
        ``model``, reshaped to the pruned architecture and holding the pruned weights, in ``model``'s train/eval
        mode.

    Raises:
        ValueError: if the file was not written by `save_pruned`, or names a layer ``model`` lacks.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != _PRUNED_FORMAT:
        raise ValueError(
            f"{str(path)!r} was not written by lightning_opt.pruning.save_pruned (format {_PRUNED_FORMAT!r}). "
            "HINT: rerun the pruning fit, or reload its Lightning checkpoint, which records the same structure."
        )
    training = model.training
    restore_pruned_structure(model, state)
    model.load_state_dict(state["state_dict"])
    return model.train(training)


#: Shape attributes of every layer, in checkpoints and in `save_pruned` files.
_SHAPE_ATTRS = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features")
_PRUNED_FORMAT = "lightning_opt.pruned/2"
STRUCTURE_KEY = "lightning_opt_pruned_structure"


def pruned_structure(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The shape attributes of every layer (plain ints, so a checkpoint holding them loads with ``weights_only``).

    `Pruning` stores this in every checkpoint saved after channel removal, under
    ``"lightning_opt_pruned_structure"``; `restore_pruned_structure` uses it to rebuild the thin layers.
    """
    out: dict[str, dict[str, Any]] = {
        name: {a: int(getattr(module, a)) for a in _SHAPE_ATTRS if isinstance(getattr(module, a, None), int)}
        for name, module in model.named_modules()
        if any(isinstance(getattr(module, a, None), int) for a in _SHAPE_ATTRS)
    }
    for name, attrs in attention_structure(model).items():  # head counts, kept heads, Conv1D shapes
        out.setdefault(name, {}).update(attrs)
    return out


def restore_pruned_structure(model: nn.Module, checkpoint: dict[str, Any]) -> bool:
    """Reshape a freshly built model to the thin architecture a checkpoint was saved with, so its weights load.

    Call it from ``LightningModule.on_load_checkpoint`` (``ImageClassifier`` does), so that
    ``Model.load_from_checkpoint(path)`` and ``trainer.test(ckpt_path=path)`` work on a checkpoint saved after
    pruned channels were removed (``trainer.save_checkpoint`` after fit).

    Returns:
        True when layers were reshaped (the checkpoint holds a pruned structure).

    Examples:
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
    restore_attention_structure(model, structure, state)  # head counts; a head-pruned MHA's forward
    return True
