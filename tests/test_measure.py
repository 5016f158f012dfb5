from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_opt.measure import (
    count_flops,
    count_nonzero_parameters,
    count_parameters,
    measure_latency,
    measure_model,
    saved_size_bytes,
)


def test_parameter_counts_by_hand():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(5, 2, bias=False))
    assert count_parameters(model) == (3 * 4 * 9 + 4) + 5 * 2
    with torch.no_grad():
        model[0].weight[:2].zero_()
    assert count_nonzero_parameters(model) == count_parameters(model) - 2 * 3 * 9


def test_flops_by_hand_for_conv_and_linear():
    # Conv2d 1->2, 3x3, padding 1, on 4x4: 2 out channels * 16 positions * 9 MACs * 2 FLOPs per MAC.
    assert count_flops(nn.Conv2d(1, 2, 3, padding=1, bias=False), torch.zeros(1, 1, 4, 4)) == 2 * 16 * 9 * 2
    # Linear 10->3 on a batch of 4: 4 * 10 * 3 MACs.
    assert count_flops(nn.Linear(10, 3), torch.zeros(4, 10)) == 2 * 4 * 10 * 3
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32, 5))
    assert count_flops(model, torch.zeros(1, 1, 4, 4)) == 2 * 16 * 9 * 2 + 2 * 32 * 5


def test_saved_size_grows_with_weights_and_zeros_compress():
    small, big = nn.Linear(10, 10), nn.Linear(100, 100)
    assert saved_size_bytes(big) - saved_size_bytes(small) >= (100 * 100 - 10 * 10) * 4
    sparse = nn.Linear(100, 100)
    with torch.no_grad():
        sparse.weight.zero_()
    assert saved_size_bytes(sparse, compressed=True) < saved_size_bytes(big, compressed=True) / 5


def test_latency_positive_median_and_spread_and_batch():
    result = measure_latency(nn.Linear(32, 32), torch.zeros(1, 32), warmup=2, repeats=10, batch_size=8)
    assert result.median_ms > 0 and result.spread_ms >= 0 and result.min_ms <= result.median_ms
    assert result.batch_size == 8 and result.repeats == 10 and result.num_threads == 1
    with pytest.raises(ValueError, match="`repeats` must be >= 1"):
        measure_latency(nn.Linear(2, 2), torch.zeros(1, 2), repeats=0)


def test_measure_model_leaves_model_untouched():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).train()
    figures = measure_model(model, torch.zeros(1, 4), repeats=3)
    assert model.training
    assert figures["params"] == 20 and figures["flops"] == 32 and figures["latency_ms"] > 0
    assert set(figures) >= {"nonzero_params", "sparsity", "size_bytes", "size_bytes_compressed", "latency_spread_ms"}


def test_measure_model_does_not_copy_a_lightning_module_with_its_trainer():
    import lightning.pytorch as pl

    from lightning_opt.module import ImageClassifier

    model = ImageClassifier("small_cnn", backbone_kwargs={"channels": [4]})
    model.teacher_like = torch.nn.Linear(2, 2).eval()  # a frozen submodule keeps its eval mode
    model.trainer = pl.Trainer(logger=False, enable_progress_bar=False)
    model.train()
    model.teacher_like.eval()
    figures = measure_model(model, model.example_input_array, latency=False)
    assert figures["params"] == sum(p.numel() for p in model.parameters())
    assert model.training
    assert model.backbone.training
    assert not model.teacher_like.training


class _TwoInputs(nn.Module):
    """ids (int64) + a float mask: an embedding, masked, then a linear head; fails on float ids or mismatched rows."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 4)
        self.head = nn.Linear(4, 3, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(input_ids) * attention_mask.unsqueeze(-1))


def test_flops_of_tuple_and_dict_inputs_keep_integer_ids():
    ids, mask = torch.randint(0, 20, (2, 5)), torch.ones(2, 5)
    # only the head counts: 2 * (2 * 5 tokens) * 4 * 3
    assert count_flops(_TwoInputs(), (ids, mask)) == 2 * 10 * 4 * 3
    assert count_flops(_TwoInputs(), {"input_ids": ids, "attention_mask": mask}) == 2 * 10 * 4 * 3


def test_latency_batch_size_tiles_every_input():
    ids, mask = torch.randint(0, 20, (1, 5)), torch.ones(1, 5)
    seen: list[tuple[int, int]] = []
    model = _TwoInputs()
    model.register_forward_pre_hook(lambda m, args: seen.append((args[0].shape[0], args[1].shape[0])))
    result = measure_latency(model, (ids, mask), warmup=0, repeats=2, batch_size=8)
    assert result.batch_size == 8
    assert seen == [(8, 8), (8, 8)]


def test_measure_model_on_a_dict_example():
    example = {"input_ids": torch.randint(0, 20, (2, 5)), "attention_mask": torch.ones(2, 5)}
    figures = measure_model(_TwoInputs(), example, latency=True, warmup=0, repeats=2, batch_size=4)
    assert figures["params"] == 20 * 4 + 4 * 3
    assert figures["flops"] == 2 * 10 * 4 * 3
    assert figures["latency_ms"] > 0
