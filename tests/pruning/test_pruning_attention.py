"""Whole-head and block-aware channel removal (``lightning_opt.pruning._attention``) on hand-made and zoo models.

Each case builds the Torch-Pruning dependency graph with the config on the model, picks channels (whole heads, whole
grouped-conv units), zeroes them in every coupled parameter (the masked model), removes them from the model, and
checks the removed model computes what the masked model computes.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
import torch_pruning as tp
from torch import Tensor, nn

from lightning_opt import inputs
from lightning_opt.pruning._attention import (
    MultiheadAttentionHeadPruner,
    PrunedMultiheadAttention,
    TPConfig,
    after_removal,
    attention_structure,
    channel_units,
    extra_groups,
    head_slices,
    param_slices,
    restore_attention_structure,
    transformer_config,
)
from lightning_opt.pruning._channel import STRUCTURE_KEY, pruned_structure, restore_pruned_structure
from lightning_opt.testing import zoo

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_PER_CHANNEL = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.PReLU)


def _dims(module: nn.Module, handler: Any, is_out: bool) -> list[tuple[str, int]]:
    """The masking rules of ChannelGroups for standard layers (parameter, dim) of a channel."""
    if isinstance(module, (*_CONV, nn.Linear)):
        if is_out or "Depthwise" in type(getattr(handler, "__self__", None)).__name__:
            return [("weight", 0)] + ([("bias", 0)] if module.bias is not None else [])
        if isinstance(module, _CONV) and module.groups > 1:
            return []  # grouped input channels: zero inputs make them inert
        return [("weight", 1)]
    if isinstance(module, _PER_CHANNEL):
        return [(n, 0) for n, _ in module.named_parameters(recurse=False)]
    assert not any(True for _ in module.parameters(recurse=False)), f"no masking rule for {type(module).__name__}"
    return []


def _graph(model: nn.Module, example: Any, config: TPConfig) -> tp.DependencyGraph:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tp.DependencyGraph().build_dependency(model, example, **config.graph_kwargs())


def _groups(model: nn.Module, dg: tp.DependencyGraph, config: TPConfig) -> list[Any]:
    outputs = [m for m, node in dg.module2node.items() if isinstance(m, nn.Module) and not node.outputs]
    roots = (*_CONV, nn.Linear, *config.root_module_types)
    found = dg.get_all_groups(ignored_layers=config.ignored_modules(model) + outputs, root_module_types=roots)
    return [*found, *extra_groups(config, dg)]


def _drop(units: Tensor | None, n: int, every: int = 2) -> list[int]:
    """Channels to remove: every ``every``-th unit (at least one, never all)."""
    if units is None:
        return list(range(0, n, every + 1))
    chosen = set(range(0, int(units.max()) + 1, every))
    return [i for i in range(n) if int(units[i]) in chosen]


def prune_and_compare(model: nn.Module, example: Any, heads_only: bool = False) -> dict[str, Any]:
    """Mask and remove the chosen channels of every group (or of the head groups); return outputs and counts."""
    model.eval()
    config = transformer_config(model, example)
    dg = _graph(model, example, config)
    names = {m: n for n, m in model.named_modules()}
    params = dict(model.named_parameters())
    masks: dict[str, Tensor] = {}
    plan, head_groups = [], 0
    for group in _groups(model, dg, config):
        root, handler = group[0].dep.target.module, group[0].dep.handler
        is_head = head_slices(config, group) is not None
        head_groups += is_head
        if heads_only and not is_head:
            continue
        idxs = _drop(channel_units(config, group), len(group[0].idxs))
        plan.append((root, handler, idxs))
        for item in dg.get_pruning_group(root, handler, idxs).items:
            mod = item.dep.target.module
            assert not isinstance(mod, nn.Parameter), "a kept group holds an unwrapped parameter"
            if mod not in names:
                continue
            slices = param_slices(config, mod, item.dep.handler, item.idxs)
            if slices is None:
                is_out = dg.is_out_channel_pruning_fn(item.dep.handler)
                idx = torch.as_tensor([int(i) for i in item.idxs])
                slices = [(p, d, idx) for p, d in _dims(mod, item.dep.handler, is_out)]
            for pname, dim, idx in slices:
                full = f"{names[mod]}.{pname}" if names[mod] else pname
                masks.setdefault(full, torch.ones_like(params[full], dtype=torch.bool)).index_fill_(dim, idx, False)
    masked = copy.deepcopy(model)
    masked_params = dict(masked.named_parameters())
    with torch.no_grad():
        before = inputs.call(model, example)
        for name, mask in masks.items():
            masked_params[name].mul_(mask)
        reference = inputs.call(masked, example)
        n_before = sum(p.numel() for p in model.parameters())
        for root, handler, idxs in plan:
            dg.get_pruning_group(root, handler, idxs).prune()
        after_removal(model, config)
        out = inputs.call(model, example)
    return {
        "config": config,
        "before": before,
        "masked": reference,
        "removed": out,
        "groups": len(plan),
        "head_groups": head_groups,
        "params": (n_before, sum(p.numel() for p in model.parameters())),
    }


def assert_same(result: dict[str, Any]) -> None:
    before, masked, removed = result["before"], result["masked"], result["removed"]
    assert removed.shape == before.shape
    scale = float(masked.abs().max()) + 1e-12
    assert torch.allclose(removed, masked, atol=1e-4 * max(scale, 1.0), rtol=0)
    assert not torch.allclose(masked, before, atol=1e-6 * scale, rtol=0), "masking changed nothing: the test is void"


# --------------------------------------------------------------------------------------------------------------------
# nn.MultiheadAttention by hand
# --------------------------------------------------------------------------------------------------------------------


class _AttnBlock(nn.Module):
    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(64, 4, batch_first=batch_first)
        self.fc = nn.Linear(64, 3)

    def forward(self, x: Tensor, mask: Tensor | None = None, padding: Tensor | None = None) -> Tensor:
        y = self.attn(x, x, x, attn_mask=mask, key_padding_mask=padding, need_weights=False)[0]
        return self.fc(y)


def _mha_pruned(batch_first: bool = True) -> tuple[_AttnBlock, _AttnBlock, TPConfig]:
    torch.manual_seed(0)
    model = _AttnBlock(batch_first).eval()
    x = torch.randn(2, 5, 64)
    config = transformer_config(model, x)
    dg = _graph(model, x, config)
    [group] = extra_groups(config, dg)
    heads = head_slices(config, group)
    assert heads is not None
    drop = [i for i in range(64) if int(heads[i]) in (1, 2)]
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for pname, dim, idx in param_slices(config, masked.attn, group[0].dep.handler, drop) or []:
            dict(masked.attn.named_parameters())[pname].index_fill_(dim, idx, 0.0)
    dg.get_pruning_group(model.attn, group[0].dep.handler, drop).prune()
    after_removal(model, config)
    return model, masked, config


def test_mha_four_heads_to_two_exact_shapes_and_outputs() -> None:
    model, masked, config = _mha_pruned()
    attn = model.attn
    assert isinstance(attn, PrunedMultiheadAttention)
    assert (attn.num_heads, attn.head_dim, attn.embed_dim, attn.kept_heads) == (2, 16, 64, [0, 3])
    assert attn.in_proj_weight is not None and attn.in_proj_bias is not None
    assert tuple(attn.in_proj_weight.shape) == (3 * 32, 64)
    assert tuple(attn.in_proj_bias.shape) == (3 * 32,)
    assert tuple(attn.out_proj.weight.shape) == (64, 32)
    assert list(config.ignored) == []  # nothing in this model needs excluding
    x = torch.randn(3, 7, 64)
    causal = torch.ones(7, 7, dtype=torch.bool).triu(1)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[0, 5:] = True
    with torch.no_grad():
        for mask, pad in ((None, None), (causal, padding), (causal.float() * -1e9, None)):
            torch.testing.assert_close(model(x, mask, pad), masked(x, mask, pad), atol=1e-5, rtol=0)


def test_mha_sequence_first_and_per_head_masks() -> None:
    model, masked, _ = _mha_pruned(batch_first=False)
    x = torch.randn(6, 2, 64)  # (L, N, E)
    per_head = torch.randn(2 * 4, 6, 6)  # one slice per original head
    with torch.no_grad():
        torch.testing.assert_close(model(x, per_head), masked(x, per_head), atol=1e-5, rtol=0)
        out, weights = model.attn(x, x, x, need_weights=True)
    assert out.shape == (6, 2, 64)
    assert weights is not None and weights.shape == (2, 6, 6)


def test_mha_prune_heads_refuses_partial_heads() -> None:
    attn = nn.MultiheadAttention(8, 2)
    with pytest.raises(ValueError, match="whole heads of 4 channels, got 2 channels over heads"):
        MultiheadAttentionHeadPruner().prune_heads(attn, [0, 5])


def test_mha_embedding_dim_cannot_be_masked() -> None:
    attn = nn.MultiheadAttention(8, 2)
    pruner = MultiheadAttentionHeadPruner()
    with pytest.raises(NotImplementedError, match="embedding dimension of nn.MultiheadAttention"):
        param_slices(TPConfig(), attn, pruner.prune_out_channels, [0])


# --------------------------------------------------------------------------------------------------------------------
# The zoo
# --------------------------------------------------------------------------------------------------------------------


def _zoo(name: str, layer_scale: float | None = None) -> dict[str, Any]:
    if not zoo.available(name):
        pytest.skip(f"{name} needs {zoo.ZOO[name].requires}")
    torch.manual_seed(0)
    model = zoo.ZooModule(name)
    if layer_scale is not None:  # timm initialises layer scale to 1e-6: the blocks would not change the outputs
        with torch.no_grad():
            for m in model.modules():
                if isinstance(getattr(m, "gamma", None), nn.Parameter):
                    m.gamma.fill_(layer_scale)
    return {"model": model, **prune_and_compare(model, model.example_input_array)}


def test_demo_transformer_heads_of_every_attention() -> None:
    r = _zoo("demo_transformer")
    assert_same(r)
    model = r["model"]
    attentions = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(attentions) == 6 and r["head_groups"] == 6  # 2 encoder self, 2 decoder self, 2 decoder cross
    assert all(isinstance(m, PrunedMultiheadAttention) and m.num_heads == 2 for m in attentions)
    assert all(tuple(m.in_proj_weight.shape) == (96, 64) for m in attentions)
    assert r["groups"] == 10  # + 4 feed-forward hidden groups
    assert model.backbone.transformer.encoder.layers[0].linear1.out_features == 128 - 43
    reasons = r["config"].ignored
    assert sorted(reasons) == [
        f"backbone.transformer.{part}.layers.{i}.linear2" for part in ("decoder", "encoder") for i in (0, 1)
    ]
    assert all("embedding backbone.embedding" in why for why in reasons.values())


def test_vit_timm_attention_heads_and_mlp() -> None:
    r = _zoo("vit")
    assert_same(r)
    blocks = r["model"].backbone.blocks
    assert r["head_groups"] == 2 and r["groups"] == 4
    for block in blocks:
        assert (block.attn.num_heads, block.attn.attn_dim, block.attn.head_dim) == (2, 32, 16)
        assert tuple(block.attn.qkv.weight.shape) == (96, 64)
        assert tuple(block.attn.proj.weight.shape) == (64, 32)
        assert block.mlp.fc1.out_features == 256 - 86
    reasons = r["config"].ignored
    assert "backbone.patch_embed.proj" in reasons
    assert "cls_token" in reasons["backbone.patch_embed.proj"] or "pos_embed" in reasons["backbone.patch_embed.proj"]


def test_bert_self_attention_heads() -> None:
    r = _zoo("bert")
    assert_same(r)
    layers = r["model"].backbone.bert.encoder.layer
    assert r["head_groups"] == 2 and r["groups"] == 5  # 2 attention, 2 intermediate, the pooler
    for layer in layers:
        attn = layer.attention.self
        assert (attn.num_attention_heads, attn.attention_head_size, attn.all_head_size) == (2, 16, 32)
        assert {attn.query.out_features, attn.key.out_features, attn.value.out_features} == {32}
        assert layer.attention.output.dense.in_features == 32
    reasons = r["config"].ignored
    assert "backbone.bert.encoder.layer.0.attention.output.dense" in reasons
    assert "embedding backbone.bert.embeddings" in reasons["backbone.bert.encoder.layer.0.attention.output.dense"]


def test_gpt2_conv1d_attention_heads_and_mlp() -> None:
    r = _zoo("gpt2")
    assert_same(r)
    model = r["model"].backbone
    assert r["head_groups"] == 2 and r["groups"] == 4
    for block in model.transformer.h:
        attn = block.attn
        assert (attn.num_heads, attn.head_dim, attn.split_size, attn.embed_dim) == (2, 16, 32, 64)
        assert tuple(attn.c_attn.weight.shape) == (64, 96) and tuple(attn.c_proj.weight.shape) == (32, 64)
        assert block.mlp.c_fc.nf == 256 - 86 and tuple(block.mlp.c_proj.weight.shape) == (170, 64)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied embedding untouched
    assert "backbone.transformer.h.0.mlp.c_proj" in r["config"].ignored


def test_regnet_grouped_convolutions() -> None:
    r = _zoo("regnet")
    assert_same(r)
    convs = [m for m in r["model"].modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert convs and all(m.in_channels % m.groups == 0 and m.out_channels % m.groups == 0 for m in convs)
    assert r["config"].ignored == {}
    assert r["params"][1] < r["params"][0] * 0.5


def test_shufflenet_channel_shuffle_blocks() -> None:
    r = _zoo("shufflenet")
    assert_same(r)
    assert r["groups"] == 17  # the hidden channels of 16 blocks + conv5
    assert r["config"].ignored == {
        "backbone.conv1.0": "channels of backbone.stage2.0, traced as one node (only its inner channels are pruned)"
    }
    assert r["model"].backbone.stage2[1].branch2[3].groups == r["model"].backbone.stage2[1].branch2[0].out_channels


def test_convnext_layer_scale_and_layernorm() -> None:
    r = _zoo("convnext", layer_scale=1.0)
    assert_same(r)
    config = r["config"]
    assert r["groups"] == 5  # the MLP hidden units of the 5 blocks
    assert any(p.dim() == 1 for p, _ in config.unwrapped_parameters)  # layer scale gamma, per channel
    assert "backbone.stages.0.blocks.0.conv_dw" in config.ignored
    assert "LayerNorm" in config.ignored["backbone.stages.0.blocks.0.conv_dw"]


def test_after_removal_refuses_partial_heads() -> None:
    if not zoo.available("vit"):
        pytest.skip("vit needs timm")
    model = zoo.ZooModule("vit").eval()
    config = transformer_config(model, model.example_input_array)
    qkv = model.backbone.blocks[0].attn.qkv
    tp.prune_linear_out_channels(qkv, [0, 1, 2])  # 189 = 3 x 63: not whole heads of 16
    with pytest.raises(RuntimeError, match="63 inner channels is not a whole number of heads of 16"):
        after_removal(model, config)


@pytest.mark.parametrize("name", ["vit", "bert", "gpt2", "demo_transformer"])
def test_head_structure_reloads_into_a_fresh_model(name: str) -> None:
    if not zoo.available(name):
        pytest.skip(f"{name} needs {zoo.ZOO[name].requires}")
    torch.manual_seed(0)
    model = zoo.ZooModule(name)
    r = prune_and_compare(model, model.example_input_array, heads_only=True)
    assert_same(r)
    # as a checkpoint holds it: the layer shapes (ChannelGroups) merged with the head counts and sizes
    heads, layers, state = attention_structure(model), pruned_structure(model), model.state_dict()
    structure = {n: {**layers.get(n, {}), **heads.get(n, {})} for n in {*layers, *heads}}
    fresh = zoo.ZooModule(name).eval()
    assert restore_pruned_structure(fresh, {"state_dict": state, STRUCTURE_KEY: structure})
    restore_attention_structure(fresh, structure, state)
    fresh.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(inputs.call(fresh, model.example_input_array), r["removed"], atol=1e-6, rtol=0)
    assert attention_structure(fresh) == heads


def test_restore_attention_structure_names_a_missing_module() -> None:
    with pytest.raises(ValueError, match="names a module 'encoder' that Sequential does not have"):
        restore_attention_structure(nn.Sequential(nn.Linear(2, 2)), {"encoder": {"num_heads": 2}})


def test_members_of_inner_groups() -> None:
    model = _AttnBlock().eval()
    config = transformer_config(model, torch.randn(1, 3, 64))
    assert config.members(model.attn) == [model.attn, model.attn.out_proj]
    assert config.members(model.fc) == []
