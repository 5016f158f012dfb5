"""Reference models that recipes use: a small CNN, an MLP and a tiny ResNet, all shaped by plain arguments.

Search varies their depth, widths and kernel sizes, so every structural choice is a plain ``int`` or a list of them.
`build_backbone` also builds any torchvision classification model by name (without pretrained weights).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["BUILTIN_BACKBONES", "MLP", "SmallCNN", "TinyResNet", "build_backbone", "list_backbones"]


def _widths(value: Sequence[int], name: str, allow_empty: bool = False) -> list[int]:
    """``value`` as a list of positive ints, or a ValueError naming ``name`` and the value (a string is no list)."""
    ok = isinstance(value, Sequence) and not isinstance(value, str | bytes)
    values = list(value) if ok else []
    if not ok or (not values and not allow_empty) or any(type(v) is not int or v <= 0 for v in values):
        raise ValueError(
            f"`{name}` must be a {'' if allow_empty else 'non-empty '}list of positive ints, got {value!r}. "
            "HINT: e.g. [16, 32]."
        )
    return values


def _as_list(value: int | Sequence[int], length: int, name: str) -> list[int]:
    if isinstance(value, int):
        return [value] * length
    values = list(value)
    if len(values) != length:
        raise ValueError(f"`{name}` must be an int or a list of {length} ints (one per block), got {values}.")
    return values


class SmallCNN(nn.Module):
    """Conv blocks (conv -> [BN] -> ReLU, max-pool after each block but the last) and a global-average-pool head.

    Args:
        in_channels: Channels of the input images.
        num_classes: Number of output classes.
        channels: Output channels of each conv block; its length is the depth.
        kernel_sizes: Kernel size of every block (an int) or of each block (a list as long as ``channels``).
        hidden: Width of an extra fully connected layer before the classifier; 0 for none.
        dropout: Dropout before the classifier.
        batch_norm: Whether each conv is followed by BatchNorm.
        pool_every: Max-pool after every ``pool_every`` blocks (never after the last block).

    Raises:
        ValueError: If ``channels`` is empty or holds a non-positive width, or ``kernel_sizes`` has the wrong length
            or an even or non-positive size.

    Examples:
        >>> model = SmallCNN(channels=[8, 16], kernel_sizes=3)
        >>> model(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        channels: Sequence[int] = (16, 32),
        kernel_sizes: int | Sequence[int] = 3,
        hidden: int = 0,
        dropout: float = 0.0,
        batch_norm: bool = True,
        pool_every: int = 1,
    ) -> None:
        super().__init__()
        channels = _widths(channels, "channels")
        kernels = _as_list(kernel_sizes, len(channels), "kernel_sizes")
        if any(k <= 0 or k % 2 == 0 for k in kernels):
            raise ValueError(f"`kernel_sizes` must be odd positive ints (to keep the spatial size), got {kernels}.")
        layers: list[nn.Module] = []
        prev = in_channels
        for i, (c, k) in enumerate(zip(channels, kernels)):
            layers.append(nn.Conv2d(prev, c, k, padding=k // 2, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(c))
            layers.append(nn.ReLU())
            if i < len(channels) - 1 and (i + 1) % pool_every == 0:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            prev = c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        head: list[nn.Module] = [nn.Flatten()]
        if hidden > 0:
            head += [nn.Linear(prev, hidden), nn.ReLU()]
            prev = hidden
        if dropout > 0:
            head.append(nn.Dropout(dropout))
        head.append(nn.Linear(prev, num_classes))
        self.classifier = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


class MLP(nn.Module):
    """A multi-layer perceptron that flattens its input.

    Args:
        in_features: Number of input features after flattening (64 for 8x8 digits, 784 for MNIST).
        num_classes: Number of output classes.
        hidden: Width of each hidden layer; its length is the depth.
        dropout: Dropout after each hidden layer.

    Examples:
        >>> MLP(in_features=4, num_classes=3, hidden=[16])(torch.zeros(5, 4)).shape
        torch.Size([5, 3])
    """

    def __init__(
        self, in_features: int = 64, num_classes: int = 10, hidden: Sequence[int] = (128,), dropout: float = 0.0
    ) -> None:
        super().__init__()
        hidden = _widths(hidden, "hidden", allow_empty=True)
        layers: list[nn.Module] = [nn.Flatten()]
        prev = in_features
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            prev = h
        layers.append(nn.Linear(prev, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with BatchNorm and a residual (projected when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class TinyResNet(nn.Module):
    """A small ResNet (stem, stages of basic blocks with residual connections and BatchNorm, average-pool head).

    Args:
        in_channels: Channels of the input images.
        num_classes: Number of output classes.
        widths: Channels of each stage; stages after the first halve the spatial size.
        blocks_per_stage: Basic blocks in each stage.

    Examples:
        >>> TinyResNet(widths=[8, 16])(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        widths: Sequence[int] = (16, 32, 64),
        blocks_per_stage: int = 1,
    ) -> None:
        super().__init__()
        widths = _widths(widths, "widths")
        if blocks_per_stage < 1:
            raise ValueError(
                "`widths` must be non-empty positive ints and `blocks_per_stage` >= 1,"
                f" got {widths} and {blocks_per_stage}."
            )
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        blocks: list[nn.Module] = []
        prev = widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks_per_stage):
                blocks.append(BasicBlock(prev, w, stride=2 if (i > 0 and j == 0) else 1))
                prev = w
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


BUILTIN_BACKBONES = ("small_cnn", "mlp", "tiny_resnet")
"""Backbone names `build_backbone` builds itself; other names go to ``torchvision.models``."""


def list_backbones() -> list[str]:
    """Names `build_backbone` accepts: the built-in ones, then torchvision's classification models."""
    import torchvision

    return list(BUILTIN_BACKBONES) + sorted(torchvision.models.list_models(module=torchvision.models))


def _adapt_first_conv(model: nn.Module, in_channels: int) -> None:
    """Replace the first Conv2d of a torchvision model so that it takes ``in_channels`` channels."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.in_channels == in_channels:
                return
            new = nn.Conv2d(
                in_channels,
                module.out_channels,
                module.kernel_size,  # type: ignore[arg-type]
                stride=module.stride,  # type: ignore[arg-type]
                padding=module.padding,  # type: ignore[arg-type]
                dilation=module.dilation,  # type: ignore[arg-type]
                groups=1,
                bias=module.bias is not None,
            )
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(parent, name.rpartition(".")[2], new)
            return


def build_backbone(name: str, num_classes: int = 10, in_channels: int = 1, input_size: int = 8, **kwargs) -> nn.Module:
    """Build a backbone by name.

    Args:
        name: ``"small_cnn"``, ``"mlp"``, ``"tiny_resnet"`` or any name of ``torchvision.models.list_models()``
            among the classification models (``"resnet18"``, ``"mobilenet_v2"``, ...), built without weights.
        num_classes: Number of output classes.
        in_channels: Channels of the input images (torchvision models get their first conv adapted).
        input_size: Height and width of the input images (used by ``"mlp"`` to size its first layer).
        **kwargs (Any): Passed to the model's constructor.

    Raises:
        ValueError: If ``name`` is not a known backbone; the message lists where names come from.

    Examples:
        >>> build_backbone("mlp", num_classes=3, in_channels=1, input_size=2, hidden=[4])(torch.zeros(1, 1, 2, 2)).shape
        torch.Size([1, 3])
    """
    if name == "small_cnn":
        return SmallCNN(in_channels=in_channels, num_classes=num_classes, **kwargs)
    if name == "mlp":
        kwargs.setdefault("in_features", in_channels * input_size * input_size)
        return MLP(num_classes=num_classes, **kwargs)
    if name == "tiny_resnet":
        return TinyResNet(in_channels=in_channels, num_classes=num_classes, **kwargs)
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        import difflib

        close = difflib.get_close_matches(name, list(BUILTIN_BACKBONES) + available, n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"Unknown backbone {name!r}.{hint} Allowed: the built-ins {list(BUILTIN_BACKBONES)} or any classification"
            " model of `torchvision.models.list_models(module=torchvision.models)` (e.g. 'resnet18', 'mobilenet_v2');"
            " `lightning_opt.models.list_backbones()` lists them all."
        )
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    if in_channels != 3:
        _adapt_first_conv(model, in_channels)
    return model
