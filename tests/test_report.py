from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_opt.data import DigitsDataModule
from lightning_opt.module import ImageClassifier
from lightning_opt.reporting import CompressionReport, format_report_markdown
from tests.conftest import read_tensorboard

FIGURES = {"params", "nonzero_params", "sparsity", "size_bytes", "size_bytes_compressed", "flops", "latency_ms"}


def test_report_before_after_in_tensorboard_json_and_markdown(tmp_path):
    report = CompressionReport(monitor="val/acc", repeats=3)
    logger = TensorBoardLogger(tmp_path, name="run")
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=2,
        limit_test_batches=2,
        logger=logger,
        log_every_n_steps=1,
        callbacks=[report],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    model = ImageClassifier("small_cnn", backbone_kwargs={"channels": [4, 8]})
    dm = DigitsDataModule(batch_size=16)
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm, verbose=False)

    data = json.loads((tmp_path / "run" / "version_0" / "report.json").read_text())
    assert set(data["stages"]["baseline"]) >= FIGURES and set(data["stages"]["final"]) >= FIGURES
    assert data["stages"]["final"]["params"] == sum(p.numel() for p in model.parameters())
    assert 0 <= data["stages"]["final"]["val/acc"] <= 1 and 0 <= data["stages"]["final"]["test/acc"] <= 1
    assert data["ratios"]["final"]["params"] == pytest.approx(1.0)
    markdown = (tmp_path / "run" / "version_0" / "report.md").read_text()
    assert "| parameters |" in markdown and "baseline / final" in markdown

    scalars, texts = read_tensorboard(tmp_path / "run")
    assert {"train/loss", "val/acc", "val/loss", "report/final/flops", "report/baseline/params"} <= set(scalars)
    # Lightning's own logger logged hp_metric = -1 at the start; the report makes it the monitored metric
    assert scalars["hp_metric"][-1] == pytest.approx(data["stages"]["final"]["val/acc"])
    assert any("| FLOPs / forward |" in t for t in texts["compression_report/text_summary"])


def test_resumed_run_keeps_the_original_baseline(tmp_path):
    def run(report, ckpt_path=None, epochs=1):
        trainer = pl.Trainer(
            max_epochs=epochs,
            limit_train_batches=2,
            limit_val_batches=1,
            logger=TensorBoardLogger(tmp_path, name="run"),
            callbacks=[report],
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
        )
        model = ImageClassifier("small_cnn", backbone_kwargs={"channels": [4, 8]})
        trainer.fit(model, datamodule=DigitsDataModule(batch_size=16), ckpt_path=ckpt_path)
        return trainer, model

    first = CompressionReport(repeats=2)
    trainer, _ = run(first)
    ckpt = trainer.checkpoint_callback.best_model_path
    with torch.no_grad():  # what the first run started from
        baseline_nonzeros = first.stages["baseline"]["nonzero_params"]
    second = CompressionReport(repeats=2)
    run(second, ckpt_path=ckpt, epochs=2)
    assert second.stages["baseline"]["nonzero_params"] == baseline_nonzeros
    assert second.stages["baseline"]["latency_ms"] == first.stages["baseline"]["latency_ms"]


def test_other_callbacks_add_stages_with_ratios(tmp_path):
    report = CompressionReport()
    report.add_stage("baseline", {"params": 100, "latency_ms": 2.0})
    report.add_stage("int8", {"params": 100, "latency_ms": 0.5, "test/acc": 0.9})
    report.write(output_dir=tmp_path)
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["ratios"]["int8"]["latency_ms"] == pytest.approx(4.0)
    assert "4.00x" in (tmp_path / "report.md").read_text()


def test_markdown_table_shape():
    table = format_report_markdown({"baseline": {"flops": 10, "x": "a"}, "final": {"flops": 5}})
    assert table.splitlines()[2] == "| FLOPs / forward | 10 | 5 | 2.00x |"


@pytest.mark.parametrize("name", ["batch_size", "num_threads", "repeats"])
def test_report_rejects_non_positive_settings(name):
    with pytest.raises(ValueError, match=f"`{name}` must be >= 1, got 0"):
        CompressionReport(**{name: 0})


class _Tokens(pl.LightningModule):
    """A two-input sequence classifier with a tuple `example_input_array` of int64 ids and a mask."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(30, 8)
        self.head = torch.nn.Linear(8, 2)
        self.example_input_array = (torch.randint(0, 30, (1, 6)), torch.ones(1, 6, dtype=torch.long))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids) * mask.unsqueeze(-1)
        return self.head(h.sum(1) / mask.sum(1, keepdim=True))

    def training_step(self, batch, batch_idx):
        (ids, mask), y = batch
        return torch.nn.functional.cross_entropy(self(ids, mask), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_report_measures_a_model_with_tuple_inputs_and_integer_ids(tmp_path):
    from torch.utils.data import DataLoader

    ids, mask, y = torch.randint(0, 30, (8, 6)), torch.ones(8, 6, dtype=torch.long), torch.randint(0, 2, (8,))
    loader = DataLoader(list(zip(zip(ids, mask), y)), batch_size=4)
    report = CompressionReport(repeats=2, batch_size=4)
    trainer = pl.Trainer(
        max_steps=2,
        callbacks=[report],
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(_Tokens(), loader)
    final = report.stages["final"]
    assert final["params"] == 30 * 8 + 8 * 2 + 2
    assert final["flops"] == 2 * 8 * 2  # the head on one row; the embedding lookup is no FLOP
    assert final["latency_ms"] > 0


def test_report_without_an_example_refuses_with_a_hint():
    with pytest.raises(ValueError, match="needs an example input.*HINT: set `self.example_input_array`"):
        CompressionReport().measure(torch.nn.Linear(2, 2), None)
