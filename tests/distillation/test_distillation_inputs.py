"""DistillationModule with several inputs (tuple, dict), integer token ids and next-token (B, L, V) logits."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_opt import inputs
from lightning_opt.distillation import DistillationModule, token_logits
from lightning_opt.distillation.losses import kd_loss
from tests.distillation.distill_helpers import quiet_trainer

VOCAB, LEN = 50, 6


class Encoder(pl.LightningModule):
    """A BERT-like classifier: ``forward(input_ids, attention_mask)`` -> ``(N, 3)``; ids must stay int64."""

    def __init__(self, width: int = 8, example: str = "tuple") -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.head = nn.Linear(width, 3)
        ids, mask = torch.randint(0, VOCAB, (2, LEN)), torch.ones(2, LEN, dtype=torch.long)
        self.example_input_array = (ids, mask) if example == "tuple" else {"input_ids": ids, "attention_mask": mask}

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        h = self.embed(input_ids) * attention_mask.unsqueeze(-1)
        return self.head(h.sum(1) / attention_mask.sum(1, keepdim=True))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return F.cross_entropy(inputs.call(self, inputs.batch_inputs(batch)), inputs.batch_target(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Decoder(pl.LightningModule):
    """A next-token model: ``forward(input_ids)`` -> ``(B, L, V)``."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.head = nn.Linear(width, VOCAB)
        self.example_input_array = torch.randint(0, VOCAB, (2, LEN))

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.embed(input_ids)))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _encoder_batches(form: str) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    ids, y = torch.randint(0, VOCAB, (16, LEN), generator=g), torch.randint(0, 3, (16,), generator=g)
    mask = torch.ones(16, LEN, dtype=torch.long)
    if form == "dict":
        rows: list[Any] = [{"input_ids": i, "attention_mask": m, "labels": t} for i, m, t in zip(ids, mask, y)]
    else:
        rows = list(zip(zip(ids, mask), y))
    return DataLoader(rows, batch_size=4)


@pytest.mark.parametrize(("example", "batches"), [("tuple", "tuple"), ("dict", "dict")])
def test_two_input_student_trains_on_tuple_and_dict_batches(tmp_path, example: str, batches: str) -> None:
    pl.seed_everything(0)
    student, teacher = Encoder(4, example), Encoder(16, example)
    model = DistillationModule(student=student, teacher=teacher, alpha=0.5, temperature=2.0)
    before = student.head.weight.detach().clone()
    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(model, _encoder_batches(batches))
    assert trainer.global_step == 2
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert not torch.equal(before, student.head.weight)


def test_forward_passes_keyword_inputs_to_the_student() -> None:
    student = Encoder(4, "dict")
    model = DistillationModule(student=student, teacher=Encoder(16, "dict"))
    example = student.example_input_array
    torch.testing.assert_close(model(**example), student(**example))


def test_next_token_logits_are_distilled_per_token(tmp_path) -> None:
    pl.seed_everything(0)
    student, teacher = Decoder(4), Decoder(16)
    model = DistillationModule(student=student, teacher=teacher, alpha=1.0, temperature=2.0)
    ids = torch.randint(0, VOCAB, (4, LEN))
    target = torch.roll(ids, -1, dims=1)
    expected = kd_loss(student(ids).reshape(-1, VOCAB), teacher(ids).reshape(-1, VOCAB), 2.0)
    trainer = quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(model, DataLoader([(ids, target)], batch_size=None))
    # alpha=1: the loss of the first step is the KD loss over the vocabulary, averaged over the 4 * 6 tokens
    torch.testing.assert_close(trainer.callback_metrics["train/soft_loss"], expected.detach())
    torch.testing.assert_close(trainer.callback_metrics["train/loss"], expected.detach())


def test_token_logits_flattens_sequences_and_keeps_classifier_logits() -> None:
    logits, target = token_logits(torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long))
    assert logits.shape == (6, 5) and target is not None and target.shape == (6,)
    same, y = token_logits(torch.randn(4, 5), torch.zeros(4, dtype=torch.long))
    assert same.shape == (4, 5) and y is not None and y.shape == (4,)


def test_teacher_checkpoint_with_pickled_objects_is_refused(tmp_path) -> None:
    path = tmp_path / "teacher.ckpt"
    torch.save({"state_dict": Encoder(16).state_dict(), "extra": Encoder}, path)  # a class: needs full unpickling
    with pytest.raises(
        ValueError,
        match=r"is not weights-only: loading it would run code it names \(test_distillation_inputs\.Encoder\)",
    ):
        DistillationModule(student=Encoder(4), teacher=Encoder(16), teacher_checkpoint=str(path))
