"""Pure mask functions: exact counts, monotone masks, N:M patterns, channel groups and removal."""

from __future__ import annotations

import pytest
import torch
from pruning_helpers import make_net
from torch import nn

from lightning_opt.pruning import (
    ChannelGroups,
    MagnitudeCriterion,
    RandomCriterion,
    TaylorCriterion,
    apply_masks,
    channel_keep,
    load_pruned,
    nm_masks,
    save_pruned,
    select_modules,
    unstructured_masks,
)


def test_unstructured_global_and_layer_exact_counts_and_monotone():
    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.rand(10, 10, generator=g), "b": torch.rand(30, generator=g) * 10}
    ones = {k: torch.ones_like(v, dtype=torch.bool) for k, v in scores.items()}
    glob = unstructured_masks(scores, ones, [(["a", "b"], 0.5)])
    assert sum(int((~m).sum()) for m in glob.values()) == 65
    # one threshold: every pruned score is below every kept one
    pruned = torch.cat([scores[k][~glob[k]] for k in scores])
    kept = torch.cat([scores[k][glob[k]] for k in scores])
    assert pruned.max() <= kept.min()
    per = unstructured_masks(scores, ones, [(["a"], 0.3), (["b"], 0.3)])
    assert int((~per["a"]).sum()) == 30
    assert int((~per["b"]).sum()) == 9
    # pruned elements stay pruned even if their score becomes the highest
    scores2 = {"a": scores["a"].clone(), "b": scores["b"].clone()}
    scores2["a"][~per["a"]] = 100.0
    later = unstructured_masks(scores2, per, [(["a"], 0.5), (["b"], 0.5)])
    assert not (later["a"] & ~per["a"]).any()
    assert int((~later["a"]).sum()) == 50


def test_nm_masks_conv_groups_along_input_channels():
    w = torch.randn(6, 8, 3, 3)
    mask = nm_masks(w.abs(), torch.ones_like(w, dtype=torch.bool), 2, 4, 2)
    groups = mask.permute(0, 2, 3, 1).reshape(-1, 4)
    assert (groups.sum(1) == 2).all()
    # the kept ones are the two largest of each group
    a = w.abs().permute(0, 2, 3, 1).reshape(-1, 4)
    assert torch.equal(groups, a >= a.topk(2, dim=1).values[:, 1:2])
    half = nm_masks(w.abs(), torch.ones_like(w, dtype=torch.bool), 2, 4, 1)
    assert (half.permute(0, 2, 3, 1).reshape(-1, 4).sum(1) == 3).all()
    with pytest.raises(ValueError, match="divisible by m=4"):
        nm_masks(torch.randn(4, 6), torch.ones(4, 6, dtype=torch.bool), 2, 4, 2)


def test_channel_keep_keeps_one_channel_per_group():
    scores = {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([10.0, 20.0])}
    keeps = {k: torch.ones_like(v, dtype=torch.bool) for k, v in scores.items()}
    out = channel_keep(scores, keeps, [(["a", "b"], 0.99)])
    assert [int(v.sum()) for v in out.values()] == [1, 1]
    assert bool(out["a"][2])
    assert bool(out["b"][1])


def test_criteria():
    w = torch.tensor([3.0, -1.0, 0.5])
    assert torch.equal(MagnitudeCriterion().score(w, None, name="x", step=0), w.abs())
    assert torch.equal(
        TaylorCriterion().score(w, torch.tensor([0.0, 2.0, 1.0]), name="x", step=0), torch.tensor([0.0, 2.0, 0.5])
    )
    r = RandomCriterion(seed=1)
    assert torch.equal(r.score(w, None, name="x", step=3), r.score(w, None, name="x", step=3))
    assert not torch.equal(r.score(w, None, name="x", step=3), r.score(w, None, name="x", step=4))


def test_select_modules_include_exclude_and_error_lists_names():
    net = make_net("cnn")
    assert list(select_modules(net, ["Conv2d", "Linear"])) == ["0", "3", "8"]
    assert list(select_modules(net, ["Conv2d"], exclude=[r"^0$"])) == ["3"]
    assert list(select_modules(net, ["torch.nn.Linear"])) == ["8"]
    with pytest.raises(ValueError, match=r"`include` pattern 'fc' matches no prunable module.*\['0', '3', '8'\]"):
        select_modules(net, ["Conv2d", "Linear"], include=["fc"])
    with pytest.raises(ValueError, match="`module_types` entry 'Conv9d' is not a torch.nn class"):
        select_modules(net, ["Conv9d"])


def test_apply_masks_by_name():
    net = make_net("mlp")
    masks = {"1.weight": torch.rand(32, 64) > 0.5}
    assert apply_masks(net, masks) == []
    assert (net[1].weight[~masks["1.weight"]] == 0).all()
    with pytest.raises(KeyError, match="9.weight"):
        apply_masks(net, {"9.weight": torch.ones(2, dtype=torch.bool)})


@pytest.mark.parametrize("kind", ["cnn", "resnet"])
def test_channel_group_masks_match_removal_and_reload(kind, tmp_path):
    torch.manual_seed(0)
    net = make_net(kind)
    x = torch.randn(4, 1, 8, 8)
    for _ in range(2):  # non-trivial BatchNorm statistics
        net(x)
    net.eval()
    groups = ChannelGroups(net, select_modules(net, ["Conv2d", "Linear"]), x)
    classifier = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)][-1]
    assert groups.output_layers == [classifier]  # the classifier's outputs (the classes) are never pruned
    assert classifier not in groups.groups
    params = dict(net.named_parameters())
    scores = {n: groups.channel_scores(n, groups.root_weight(n).abs()) for n in groups.groups}
    ones = {n: torch.ones(g.channels, dtype=torch.bool) for n, g in groups.groups.items()}
    keeps = channel_keep(scores, ones, [(list(groups.groups), 0.5)])
    apply_masks(net, groups.param_masks(keeps, params))
    with torch.no_grad():
        masked = net(x)
    n_before = sum(p.numel() for p in net.parameters())
    removed = groups.remove(keeps)
    with torch.no_grad():
        thin = net(x)
    assert removed == sum(int((~k).sum()) for k in keeps.values()) > 0
    assert sum(p.numel() for p in net.parameters()) < 0.6 * n_before
    torch.testing.assert_close(thin, masked, atol=1e-5, rtol=1e-4)
    save_pruned(net, tmp_path / "p.pt")
    fresh = load_pruned(make_net(kind).eval(), tmp_path / "p.pt")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), thin)
    assert isinstance(fresh, nn.Module)
