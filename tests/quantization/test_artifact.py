"""Fit-end conversion to a real int8 artifact: saved, reloaded in a fresh process, evaluated, timed, reported."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_opt.quantization import (
    OnnxRuntimeModel,
    PostTrainingQuantization,
    QuantizationAwareTraining,
    export_onnx,
    load_artifact,
    quantize_onnx,
)
from lightning_opt.quantization._artifact import accuracy
from lightning_opt.reporting import CompressionReport
from tests.conftest import read_tensorboard
from tests.quantization._helpers import TinyClassifier, TinyData, TinyNet, make_trainer


def test_qat_fit_end_artifact_report_tensorboard_fresh_process(tmp_path):
    torch.manual_seed(0)
    model = TinyClassifier(width=8, lr=0.03)
    with torch.no_grad():  # a pruned first layer: its zeros must survive QAT and int8 conversion
        weight = model.backbone.features[0].weight
        weight.mul_(torch.rand_like(weight) > 0.5)
    pruned = int((weight == 0).sum())
    qat = QuantizationAwareTraining(start=2, freeze_bn=0.8, compile=True, num_threads=2, latency_batch_size=4)
    report = CompressionReport(monitor="val/acc", repeats=3, batch_size=2)
    trainer = make_trainer(
        tmp_path,
        [qat, report],
        max_epochs=6,
        limit_train_batches=8,
        limit_val_batches=2,
        logger=TensorBoardLogger(tmp_path, name="run"),
    )
    trainer.fit(model, TinyData())

    figures = qat.results
    artifact = figures["artifact"]
    assert artifact.endswith("int8.pt2") and figures["size_bytes"] > 0
    saved_figures = json.loads(Path(artifact).with_suffix(".json").read_text())
    assert saved_figures["test/acc"] == figures["test/acc"]
    assert figures["test/acc"] >= 0.9, figures  # the task is easy: int8 must not break it
    assert figures["test/acc"] >= figures["fp32_test/acc"] - 0.05  # no loss against fp32 of the same weights
    assert figures["latency_ms"] > 0 and figures["fp32_latency_ms"] > 0
    saved = json.loads((tmp_path / "run" / "version_0" / "report.json").read_text())
    assert saved["stages"]["int8"]["test/acc"] == figures["test/acc"]
    # the report's rows share one timing protocol: its batch and threads, not the callback's own
    assert (figures["latency_batch_size"], figures["latency_num_threads"]) == (2, 1)
    assert saved["latency"] == {"batch_size": 2, "num_threads": 1, "repeats": 3}

    scalars, _ = read_tensorboard(tmp_path / "run")
    layers = {tag.rsplit("/", 1)[1] for tag in scalars if tag.startswith("quant/sqnr_db/")}
    assert "features.0" in layers
    for kind in ("scale", "zero_point", "weight_scale"):  # every quant/ tag names the same conv/linear layers
        assert {tag.rsplit("/", 1)[1] for tag in scalars if tag.startswith(f"quant/{kind}/")} == layers, kind
    assert 0 < scalars["quant/sqnr_db/features.0"][-1] < 200
    assert scalars["quant/int8/test_acc"][-1] == pytest.approx(figures["test/acc"])
    assert "quant/int8/fp32_test_acc" in scalars

    # int8 weights hold the pruned zeros
    import torchao.quantization.pt2e  # noqa: F401

    program = torch.export.load(artifact)
    int8 = [v for v in program.state_dict.values() if v.dtype == torch.int8]
    first = next(v for v in int8 if v.shape[1] == 1)
    assert int((first == 0).sum()) >= pruned
    # and no fp32 copy of the weights they replace travels with them (only biases, scales: 1-D)
    assert [k for k, v in program.state_dict.items() if v.is_floating_point() and v.dim() > 1] == []

    # the artifact loads and runs in a fresh process, giving the same outputs
    x = torch.randn(3, 1, 8, 8)
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(f"""
        import torch
        from lightning_opt.quantization import load_artifact
        model = load_artifact({artifact!r})
        torch.save(model(torch.load({str(tmp_path / "x.pt")!r})), {str(tmp_path / "y.pt")!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), load_artifact(artifact)(x))


def test_int8_artifact_is_smaller_than_the_fp32_one(tmp_path):
    """The int8 .pt2 holds int8 weights only: convert_pt2e's leftover fp32 parameters are dropped before export."""
    from lightning_opt.models import SmallCNN
    from lightning_opt.quantization import QuantSpec, calibrate, convert, save_artifact

    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, num_classes=10, channels=(64, 128, 128)).eval()
    example = torch.randn(1, 1, 8, 8)
    fp32_bytes = save_artifact(model, example, tmp_path / "fp32.pt2")
    graph = calibrate(model, QuantSpec(module="", input_shape=[1, 1, 8, 8], mode="ptq"), [example] * 2, 2)
    converted = convert(graph)
    int8_bytes = save_artifact(converted, example, tmp_path / "int8.pt2")
    assert fp32_bytes / int8_bytes > 2.5, (fp32_bytes, int8_bytes)
    torch.testing.assert_close(load_artifact(tmp_path / "int8.pt2")(example), converted(example))


def test_ptq_callback_reports_int8_ptq_stage(tmp_path):
    ptq = PostTrainingQuantization(calibration_batches=2, compile=False, latency=False)
    report = CompressionReport(latency=False)
    trainer = make_trainer(tmp_path, [ptq, report], max_epochs=6, limit_train_batches=8)
    model = TinyClassifier(lr=0.03)
    trainer.fit(model, TinyData())
    assert ptq.results["test/acc"] >= 0.9
    assert report.stages["int8_ptq"]["test/acc"] == ptq.results["test/acc"]
    assert (tmp_path / "int8_ptq.pt2").exists()
    assert not hasattr(model.backbone, "graph")  # PTQ leaves the trained fp32 model as it was


def test_onnx_fp32_and_static_int8(tmp_path):
    torch.manual_seed(0)
    data = TinyData()
    net = TinyNet(dropout=0.0)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.02)
    for _ in range(3):
        for x, y in data.train_dataloader():
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            optimizer.step()
    net.eval()
    fp32 = tmp_path / "m.onnx"
    int8 = tmp_path / "m.int8.onnx"
    export_onnx(net, torch.zeros(1, 1, 8, 8), fp32)
    quantize_onnx(fp32, int8, data.train_dataloader(), num_batches=2)
    ref = accuracy(net, data.test_dataloader())
    assert ref >= 0.9
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(OnnxRuntimeModel(fp32)(x), net(x).detach(), rtol=1e-4, atol=1e-4)
    import onnx

    ops = {n.op_type for n in onnx.load(str(int8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert accuracy(OnnxRuntimeModel(int8), data.test_dataloader()) >= ref - 0.05
