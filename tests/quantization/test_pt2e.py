"""The pt2e plumbing without Lightning: schemes, skip patterns, export errors, modes, diagnostics, PTQ."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_opt.quantization import QuantizationExportError, QuantSpec, calibrate, prepare, sqnr_db
from lightning_opt.quantization import _pt2e as P
from tests.quantization._helpers import TinyData, TinyNet


def test_validate_scheme_rejects_unsupported():
    with pytest.raises(ValueError, match=r"`dtype` must be one of \['int8'\], got 'int4'"):
        P.validate_scheme("int4", "per_channel_symmetric", "per_tensor_affine")
    with pytest.raises(ValueError, match="`weight_scheme` must be one of .* got 'per_tensor_affine'"):
        P.validate_scheme("int8", "per_tensor_affine", "per_tensor_affine")
    with pytest.raises(ValueError, match="`activation_scheme` must be one of .* got 'per_channel_symmetric'"):
        P.validate_scheme("int8", "per_channel_symmetric", "per_channel_symmetric")


def test_skip_patterns_resolve_and_reject_unmatched():
    net = TinyNet()
    assert P.resolve_skip_patterns(net, ["head", r"features\.[03]"]) == ["head", "features.0", "features.3"]
    with pytest.raises(ValueError, match="`skip` pattern 'classifier' matches no module.*features.0"):
        P.resolve_skip_patterns(net, ["classifier"])
    with pytest.raises(ValueError, match="not a valid regular expression"):
        P.resolve_skip_patterns(net, ["(head"])


class _DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum().item() > 0:  # data-dependent Python branch: not exportable
            return x * 2
        return x


class _Unexportable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.gate = _DataDependent()
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gate(self.stem(x)).mean((2, 3)))


def test_export_failure_names_module_and_points_to_skip():
    spec = QuantSpec(module="backbone", input_shape=[1, 1, 8, 8])
    with pytest.raises(QuantizationExportError, match=r"`backbone\.gate` \(_DataDependent\).*skip="):
        prepare(_Unexportable(), spec)


def test_prepare_shares_weights_and_switches_modes():
    net = TinyNet()
    graph = prepare(net, QuantSpec(module="", input_shape=[1, 1, 8, 8]))
    ids = {id(p) for p in net.parameters()}
    assert [n for n, _ in graph.named_parameters()] == [n for n, _ in net.named_parameters()]
    assert all(id(p) in ids for p in graph.parameters())

    def flags():
        bn = [n.args[5] for n in graph.graph.nodes if n.target is torch.ops.aten.batch_norm.default]
        drop = [n.args[2] for n in graph.graph.nodes if n.target is torch.ops.aten.dropout.default]
        return bn, drop

    assert flags() == ([True, True], [True])
    graph.eval()
    assert flags() == ([False, False], [False])
    graph.train()
    P.set_graph_mode(graph, True, bn_frozen=True)
    assert flags() == ([False, False], [True])
    # Lightning restores modes by assigning `.training`: sync_mode (also a forward pre-hook) follows it
    P.set_graph_mode(graph, True, bn_frozen=False)
    graph.training = False
    graph(torch.randn(3, 1, 8, 8))
    assert flags() == ([False, False], [False])


def test_warmup_is_fp32_then_fake_quant_changes_outputs():
    net = TinyNet().eval()
    graph = prepare(net, QuantSpec(module="", input_shape=[1, 1, 8, 8]))
    x = torch.randn(4, 1, 8, 8)
    graph.eval()
    torch.testing.assert_close(graph(x), net(x), rtol=1e-5, atol=1e-5)  # fake-quant off: fp32
    graph.train()
    P.set_phase(graph, fake_quant=True, observers=True)
    graph(x)
    graph.eval()
    fq = [m for m in graph.modules() if hasattr(m, "fake_quant_enabled")]
    assert all(int(m.observer_enabled) == 0 for m in fq)  # eval never observes
    assert not torch.allclose(graph(x), net(x), atol=1e-6)


def test_ranges_and_sqnr_per_layer():
    graph = prepare(TinyNet(), QuantSpec(module="", input_shape=[1, 1, 8, 8]))
    P.set_phase(graph, fake_quant=True, observers=True)
    x = torch.randn(8, 1, 8, 8)
    graph(x)
    ranges = P.quant_ranges(graph)
    assert ranges["input"]["scale"] > 0 and 0 <= ranges["input"]["zero_point"] <= 255
    assert ranges["features.0.weight"]["scale_min"] > 0
    sqnr = P.layer_sqnr(graph, x)
    assert set(sqnr) == {"features.0", "features.3", "head"}
    assert all(5 < v < 80 for v in sqnr.values()), sqnr  # 8-bit error, not zero and not noise
    assert math.isinf(sqnr_db(x, x))
    assert sqnr_db(torch.ones(4), torch.ones(4) * 1.1) == pytest.approx(20.0)


def test_ptq_calibration_sets_ranges_from_data():
    net = TinyNet()
    data = TinyData()
    graph = calibrate(net, QuantSpec(module="", input_shape=[1, 1, 8, 8], mode="ptq"), data.train_dataloader(), 2)
    assert P.quant_ranges(graph)["input"]["scale"] > 0
    assert net.training  # the fp32 module is left as it was


def test_skip_keeps_layers_fp32_even_inside_qat_conv_bn_patterns():
    def quantized(skip):
        return sorted(
            P.quantized_weight_layers(prepare(TinyNet(), QuantSpec(module="", input_shape=[1, 1, 8, 8], skip=skip)))
        )

    assert quantized([]) == ["features.0", "features.3", "head"]
    assert quantized(["features.3"]) == ["features.0", "head"]  # a conv fused with its BatchNorm, skipped alone
