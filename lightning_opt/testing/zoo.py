"""A zoo of third-party architectures at random init (torchvision, timm, Hugging Face, Lightning's demo), tiny inputs.

Each entry is built from a config, never downloaded, and wrapped the way a user wraps a model in a LightningModule:
`ZooModule` sets ``example_input_array`` in the model's own input form (an image tensor; ``(input_ids,
attention_mask)`` for an encoder; ``input_ids`` for a decoder; ``(source, target)`` for Lightning's demo
Transformer) and `ZooDataModule` yields matching synthetic batches (token ids as ``int64``). The model-zoo
tests, ``benchmarks/zoo.py`` and ``docs/support.md`` all run these entries.

Examples:
    >>> from lightning_opt import inputs
    >>> model = ZooModule("resnet18")
    >>> inputs.call(model, model.example_input_array).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_opt import inputs

__all__ = ["ZOO", "ZooDataModule", "ZooEntry", "ZooModule", "available"]

Kind = Literal["image", "sequence", "lm", "seq2seq"]

NUM_CLASSES = 10
IMAGE_SIZE = 32
VOCAB = 1000
SEQ_LEN = 16


@dataclass(frozen=True)
class ZooEntry:
    """One architecture of the zoo.

    Args:
        name: the zoo name (``"vit"``, ``"bert"``...).
        family: what a user would call it.
        source: the library the architecture comes from.
        kind: ``"image"`` (``(N, 3, 32, 32)`` -> 10 classes), ``"sequence"`` (ids + attention mask -> 10 classes),
            ``"lm"`` (ids -> next-token logits) or ``"seq2seq"`` (source ids, target ids -> logits).
        build: a function returning the backbone at random init.
        requires: the packages the builder imports.
    """

    name: str
    family: str
    source: str
    kind: Kind
    build: Callable[[], nn.Module]
    requires: tuple[str, ...] = ()


def _tv(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return torchvision.models.get_model(name, weights=None, num_classes=NUM_CLASSES, **kwargs)

    return build


def _densenet() -> nn.Module:
    from torchvision.models import DenseNet

    return DenseNet(growth_rate=8, block_config=(2, 2, 2), num_init_features=16, num_classes=NUM_CLASSES)


def _timm(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kwargs)

    return build


def _bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(  # type: ignore[call-arg]  # num_labels: a PretrainedConfig keyword
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        num_labels=NUM_CLASSES,
    )
    return BertForSequenceClassification(config)


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(
        GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    )


def _demo_transformer() -> nn.Module:
    from lightning.pytorch.demos import Transformer

    return Transformer(vocab_size=VOCAB, ninp=64, nhead=4, nhid=128, nlayers=2)


_ENTRIES = [
    ZooEntry("resnet18", "ResNet-18", "torchvision", "image", _tv("resnet18")),
    ZooEntry("resnet_d", "ResNet-D (resnet10t, zero-init last BN)", "timm", "image", _timm("resnet10t"), ("timm",)),
    ZooEntry("mobilenet_v2", "MobileNetV2", "torchvision", "image", _tv("mobilenet_v2", width_mult=0.5)),
    ZooEntry("mobilenet_v3", "MobileNetV3-Small", "torchvision", "image", _tv("mobilenet_v3_small")),
    ZooEntry("efficientnet", "EfficientNet-B0", "torchvision", "image", _tv("efficientnet_b0")),
    ZooEntry("densenet", "DenseNet", "torchvision", "image", _densenet),
    ZooEntry("shufflenet", "ShuffleNetV2 (channel shuffle)", "torchvision", "image", _tv("shufflenet_v2_x0_5")),
    ZooEntry("regnet", "RegNetX-200MF (grouped convs)", "timm", "image", _timm("regnetx_002"), ("timm",)),
    ZooEntry(
        "convnext",
        "ConvNeXt (LayerNorm, layer scale)",
        "timm",
        "image",
        _timm("convnext_atto", depths=(1, 1, 2, 1), dims=(16, 32, 64, 128)),
        ("timm",),
    ),
    ZooEntry(
        "vit",
        "ViT (timm Attention)",
        "timm",
        "image",
        _timm("vit_tiny_patch16_224", img_size=IMAGE_SIZE, patch_size=8, embed_dim=64, depth=2, num_heads=4),
        ("timm",),
    ),
    ZooEntry("bert", "BERT encoder", "transformers", "sequence", _bert, ("transformers",)),
    ZooEntry("gpt2", "GPT-2 decoder (Conv1D, tied lm_head)", "transformers", "lm", _gpt2, ("transformers",)),
    ZooEntry("demo_transformer", "Lightning demo Transformer", "lightning", "seq2seq", _demo_transformer),
]

#: The zoo, by name.
ZOO: dict[str, ZooEntry] = {e.name: e for e in _ENTRIES}


def available(name: str) -> bool:
    """Whether the packages entry ``name`` needs are installed."""
    return all(importlib.util.find_spec(pkg) is not None for pkg in ZOO[name].requires)


def _entry(name: str) -> ZooEntry:
    if name not in ZOO:
        raise ValueError(f"`name` must be one of {sorted(ZOO)}, got {name!r}.")
    return ZOO[name]


def make_sample(kind: Kind, rows: int, generator: torch.Generator) -> tuple[Any, Tensor]:
    """``rows`` synthetic (inputs, target) pairs for a zoo kind, batched along dim 0."""
    if kind == "image":
        x = torch.randn(rows, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
        return x, torch.randint(0, NUM_CLASSES, (rows,), generator=generator)
    ids = torch.randint(0, VOCAB, (rows, SEQ_LEN), generator=generator)
    if kind == "sequence":
        lengths = torch.randint(SEQ_LEN // 2, SEQ_LEN + 1, (rows, 1), generator=generator)
        mask = (torch.arange(SEQ_LEN) < lengths).long()
        return (ids, mask), torch.randint(0, NUM_CLASSES, (rows,), generator=generator)
    if kind == "lm":
        nxt = torch.randint(0, VOCAB, (rows, 1), generator=generator)
        return ids, torch.cat([ids[:, 1:], nxt], dim=1)
    target = torch.randint(0, VOCAB, (rows, SEQ_LEN), generator=generator)
    return (ids, target), target


class ZooModule(pl.LightningModule):
    """A zoo backbone wrapped as a user would: cross-entropy on its logits, ``val/acc``, an ``example_input_array``.

    Args:
        name: a `ZOO` entry.
        lr: Adam's learning rate.

    Raises:
        ValueError: if ``name`` is not in the zoo.
    """

    def __init__(self, name: str = "resnet18", lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.entry = _entry(name)
        self.backbone = self.entry.build()
        example, _ = make_sample(self.entry.kind, 2, torch.Generator().manual_seed(0))
        self.example_input_array = example

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        out = self.backbone(*args, **kwargs)
        logits = getattr(out, "logits", out)
        return logits[0] if isinstance(logits, tuple) else logits

    def _step(self, batch: Any, stage: str) -> Tensor:
        logits = inputs.call(self, inputs.batch_inputs(batch))
        target = inputs.batch_target(batch)
        assert target is not None
        logits = logits.reshape(-1, logits.shape[-1])  # the demo Transformer returns (batch * seq, vocab)
        target = target.reshape(-1)
        loss = F.cross_entropy(logits, target)
        acc = (logits.argmax(-1) == target).float().mean()
        self.log(f"{stage}/loss", loss, prog_bar=stage != "train")
        self.log(f"{stage}/acc", acc)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams["lr"])


class _Synthetic(Dataset):
    def __init__(self, kind: Kind, size: int, seed: int) -> None:
        self.x, self.y = make_sample(kind, size, torch.Generator().manual_seed(seed))
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[Any, Tensor]:
        return inputs.map_tensors(self.x, lambda t: t[i]), self.y[i]


class ZooDataModule(pl.LightningDataModule):
    """Synthetic batches in the input form of a zoo entry (images, or ``int64`` token ids with masks).

    Args:
        name: a `ZOO` entry.
        size: samples per split.
        batch_size: rows per batch.
        seed: seed of the samples (each split its own).
    """

    def __init__(self, name: str = "resnet18", size: int = 32, batch_size: int = 8, seed: int = 0) -> None:
        super().__init__()
        self.kind = _entry(name).kind
        self.size = size
        self.batch_size = batch_size
        self.seed = seed

    def _loader(self, offset: int, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed + offset)
        dataset = _Synthetic(self.kind, self.size, self.seed + offset)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, generator=generator)

    def train_dataloader(self) -> DataLoader:
        return self._loader(0, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(1, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(2, shuffle=False)
