"""`lightning-opt export`: checkpoint + recipe -> int8 .pt2 / ONNX artifact with its measured figures."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from lightning_opt.cli import main
from lightning_opt.data import DigitsDataModule
from lightning_opt.module import ImageClassifier
from lightning_opt.quantization import QuantizationAwareTraining
from lightning_opt.quantization.export import export_checkpoint
from tests.quantization._helpers import make_trainer

CONFIG = {
    "seed_everything": 0,
    "model": {
        "class_path": "lightning_opt.module.ImageClassifier",
        "init_args": {"backbone": "small_cnn", "backbone_kwargs": {"channels": [8, 16]}},
    },
    "data": {"class_path": "lightning_opt.data.DigitsDataModule", "init_args": {"batch_size": 64}},
    "trainer": {"logger": False, "enable_progress_bar": False, "accelerator": "cpu", "devices": 1},
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """An fp32 model trained on digits, and the same model after a short QAT fine-tuning (the usual QAT recipe)."""
    tmp = tmp_path_factory.mktemp("export")
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(CONFIG))
    torch.manual_seed(0)
    model = ImageClassifier(
        "small_cnn", backbone_kwargs={"channels": [8, 16]}, optimizer=lambda p: torch.optim.Adam(p, lr=0.01)
    )
    trainer = make_trainer(tmp / "fp32", [], max_epochs=3, limit_train_batches=None)
    trainer.fit(model, DigitsDataModule(batch_size=64))
    trainer.save_checkpoint(tmp / "fp32.ckpt")
    model.optimizer = lambda p: torch.optim.Adam(p, lr=1e-3)
    trainer = make_trainer(tmp / "qat", [QuantizationAwareTraining(convert_on_fit_end=False)], max_steps=8)
    trainer.fit(model, DigitsDataModule(batch_size=64))
    trainer.save_checkpoint(tmp / "qat.ckpt")
    return {
        "recipe": str(tmp / "recipe.yaml"),
        "dir": tmp,
        "fp32": str(tmp / "fp32.ckpt"),
        "qat": str(tmp / "qat.ckpt"),
    }


def test_export_qat_checkpoint_to_int8_pt2_through_the_cli(checkpoints, capsys):
    output = checkpoints["dir"] / "digits.int8.pt2"
    main(["export", "--config", checkpoints["recipe"], "--ckpt_path", checkpoints["qat"], "--output", str(output),
          "--no_compile", "--no_latency"])  # fmt: skip
    figures = json.loads((checkpoints["dir"] / "digits.int8.pt2.json").read_text())
    assert figures["method"] == "qat" and output.exists() and figures["size_bytes"] == output.stat().st_size
    assert figures["test/acc"] > 0.5, figures  # 54 steps on digits: well above the 0.1 of chance
    assert figures["test/acc"] >= figures["fp32_test/acc"] - 0.05
    assert '"method": "qat"' in capsys.readouterr().out  # the figures are printed too


def test_export_fp32_checkpoint_to_onnx_int8(checkpoints):
    output = checkpoints["dir"] / "digits.int8.onnx"
    figures = export_checkpoint(
        ["--config", checkpoints["recipe"]], checkpoints["fp32"], format="onnx", output=str(output), batch_size=4
    )
    assert figures["method"] == "onnxruntime_static_qdq" and output.exists()
    assert (checkpoints["dir"] / "digits.int8.fp32.onnx").exists()
    assert figures["test/acc"] >= figures["fp32_test/acc"] - 0.05 and figures["fp32_test/acc"] > 0.5
    assert figures["latency_ms"] > 0 and figures["speedup_vs_fp32"] > 0
    assert figures["latency_batch_size"] == 4


def test_export_rejects_bad_requests(checkpoints):
    with pytest.raises(ValueError, match="`format` must be one of"):
        export_checkpoint(["--config", checkpoints["recipe"]], checkpoints["fp32"], format="tflite")
    with pytest.raises(FileNotFoundError, match="`ckpt_path` 'missing.ckpt' does not exist"):
        export_checkpoint(["--config", checkpoints["recipe"]], "missing.ckpt")
    with pytest.raises(ValueError, match="`method='qat'` needs a checkpoint saved during quantization-aware"):
        export_checkpoint(["--config", checkpoints["recipe"]], checkpoints["fp32"], method="qat", evaluate=False)
