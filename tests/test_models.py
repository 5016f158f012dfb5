from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_opt.models import MLP, SmallCNN, TinyResNet, build_backbone, list_backbones


@pytest.mark.parametrize(
    ("kwargs", "input_shape"),
    [
        ({"channels": [8]}, (2, 1, 8, 8)),
        ({"channels": [8, 16, 32], "kernel_sizes": [5, 3, 3], "hidden": 16, "dropout": 0.1}, (2, 1, 28, 28)),
        ({"channels": [4, 4], "batch_norm": False, "in_channels": 3}, (2, 3, 7, 7)),
    ],
)
def test_small_cnn_depth_widths_kernels(kwargs, input_shape):
    model = SmallCNN(**kwargs)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == kwargs["channels"]
    if "kernel_sizes" in kwargs:
        assert [c.kernel_size[0] for c in convs] == kwargs["kernel_sizes"]
    assert model(torch.zeros(input_shape)).shape == (2, 10)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"channels": []}, "`channels` must be a non-empty"),
        ({"channels": [8, 0]}, "`channels` must be a non-empty"),
        ({"channels": "abc"}, "`channels` must be a non-empty list of positive ints, got 'abc'"),
        ({"channels": [8, 2.5]}, "`channels` must be a non-empty list of positive ints"),
        ({"channels": [8, 8], "kernel_sizes": [3]}, "`kernel_sizes` must be an int or a list of 2"),
        ({"kernel_sizes": 4}, "`kernel_sizes` must be odd"),
    ],
)
def test_small_cnn_rejects_bad_structure(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SmallCNN(**kwargs)


def test_mlp_depth_and_widths():
    model = MLP(in_features=64, num_classes=3, hidden=[32, 16])
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(layer.in_features, layer.out_features) for layer in linears] == [(64, 32), (32, 16), (16, 3)]
    with pytest.raises(ValueError, match="`hidden` must be a list of positive ints, got \\[0\\]"):
        MLP(hidden=[0])


def test_tiny_resnet_has_residual_blocks_and_downsamples():
    model = TinyResNet(widths=[8, 16], blocks_per_stage=2)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) >= 8
    with pytest.raises(ValueError, match="`widths` must be a non-empty list of positive ints"):
        TinyResNet(widths=[])


def test_build_backbone_torchvision_adapts_input_channels():
    model = build_backbone("resnet18", num_classes=7, in_channels=1)
    assert model.eval()(torch.zeros(1, 1, 32, 32)).shape == (1, 7)
    assert "resnet18" in list_backbones() and "small_cnn" in list_backbones()


def test_build_backbone_unknown_name_lists_sources():
    with pytest.raises(ValueError, match=r"Unknown backbone 'resnt18'\. Did you mean 'resnet18'.*list_models"):
        build_backbone("resnt18")
