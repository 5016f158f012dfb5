"""The torchao workarounds of ``quantization/_torchao.py`` still apply to the installed torchao, inside its bound.

Each test shows the torchao behaviour a workaround corrects: when a torchao release fixes one, its test fails here
and says which workaround to drop before the upper bound in pyproject.toml is raised.
"""

from __future__ import annotations

import copy
import re
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from torch import nn

from lightning_opt.quantization import _pt2e, _torchao

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


class ConvBn(nn.Module):
    def __init__(self, eps: float = 1e-5, zero_weight: bool = False) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=eps)
        with torch.no_grad():
            self.bn.running_var.uniform_(1e-3, 1e-2)  # small variances make eps matter
            if zero_weight:
                self.bn.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def _torchao_qat_graph(model: nn.Module, x: torch.Tensor) -> torch.fx.GraphModule:
    """torchao's own QAT preparation, without the workarounds (public torchao API)."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    spec = _pt2e.QuantSpec.for_example("", x)
    model.train()
    graph = _pt2e.export_for_quantization(model, x)
    prepared = prepare_qat_pt2e(graph, _pt2e.build_quantizer(spec))
    _pt2e.set_quant_state(prepared, fake_quant=False, observers=False)  # compare the fp32 arithmetic only
    return prepared


def test_installed_torchao_is_a_tested_version_inside_the_bound() -> None:
    line = re.search(r'^\s*"(torchao[^"]*)"', PYPROJECT.read_text(), flags=re.M)
    assert line is not None, "pyproject.toml names no torchao requirement"
    requirement = Requirement(line.group(1))
    installed = version("torchao")
    assert requirement.specifier.contains(installed), (requirement, installed)
    assert requirement.specifier.contains("0.19.0") is False, "raise the bound only after these tests pass on it"
    assert installed.startswith(_torchao.TESTED_TORCHAO)


def test_torchao_still_hard_codes_the_batchnorm_eps() -> None:
    torch.manual_seed(0)
    model, x = ConvBn(eps=1e-3), torch.randn(2, 3, 8, 8)
    reference = copy.deepcopy(model).train()(x)
    raw = _torchao_qat_graph(copy.deepcopy(model), x)
    assert not torch.allclose(raw(x), reference, atol=2e-5, rtol=1e-4), "torchao honours eps now: drop the eps patch"
    patched = _pt2e.prepare(model, _pt2e.QuantSpec.for_example("", x))
    torch.testing.assert_close(patched(x), reference, atol=2e-5, rtol=1e-4)


def test_torchao_still_divides_by_a_zero_batchnorm_weight() -> None:
    torch.manual_seed(0)
    model, x = ConvBn(zero_weight=True), torch.randn(2, 3, 8, 8)
    raw = _torchao_qat_graph(copy.deepcopy(model), x)
    assert not torch.isfinite(raw(x)).all(), "torchao handles zero BatchNorm weights now: drop the zero guard"
    assert torch.isfinite(_pt2e.prepare(model, _pt2e.QuantSpec.for_example("", x))(x)).all()


@pytest.mark.slow  # torchao's own conversion re-traces 96 patterns: about a minute
def test_fast_conv_bn_fold_converts_to_the_same_int8_model() -> None:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    torch.manual_seed(0)
    model, x = ConvBn(), torch.randn(2, 3, 8, 8)
    graph = _pt2e.prepare(model, _pt2e.QuantSpec.for_example("", x))
    _pt2e.set_phase(graph, fake_quant=True, observers=True)
    graph(x)
    graph.eval()
    slow = convert_pt2e(copy.deepcopy(graph))
    fast = _pt2e.convert(graph)  # through fast_conv_bn_fold
    torch.testing.assert_close(fast(x), slow(x))


@pytest.mark.filterwarnings("error")
def test_a_tested_torchao_gives_no_version_warning() -> None:
    assert _torchao.check_torchao_version() == version("torchao")
