"""The int8 pt2e path and ONNX on users' own models: several inputs, integer ids, dropout, degenerate BatchNorm.

Fast tests pin each mechanism on tiny modules; the zoo matrix (``slow``) runs every :data:`ZOO` entry through QAT,
PTQ and ONNX (fp32 and int8) with a real Trainer. Each cell either works (finite, deterministic, close to its
reference) or is refused at setup, before step 1, with a message naming a layer and what to skip.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_opt import inputs
from lightning_opt.quantization import (
    OnnxRuntimeModel,
    PostTrainingQuantization,
    QuantizationAwareTraining,
    QuantizationExportError,
    export_onnx,
    load_artifact,
    quantize_onnx,
    restore_quantized_structure,
    sqnr_db,
)
from lightning_opt.quantization import _pt2e as P
from lightning_opt.testing.zoo import ZooDataModule, ZooModule, available
from tests.quantization._helpers import make_trainer

#: int8 artifact vs its reference (QAT: the fake-quant model; PTQ and ONNX int8: the fp32 model), in dB of SQNR.
#: Random-init models in int8 keep 12-40 dB here; 8 dB (noise at 40% of the signal's amplitude) still catches a
#: broken artifact (wrong inputs, dropout on, unfolded BatchNorm), which lands near or below 0 dB.
MIN_SQNR_DB = 8.0
#: ONNX fp32 vs torch fp32.
ONNX_FP32_ATOL = 1e-4


def _trainer(tmp_path: Any, callbacks: list[pl.Callback], steps: int = 2) -> pl.Trainer:
    return make_trainer(tmp_path, callbacks, max_steps=steps)


def _logits(out: Any) -> torch.Tensor:
    out = getattr(out, "logits", out)
    return out[0] if isinstance(out, (tuple, list)) else out


# ---------------------------------------------------------------------------------------------------------------------
# degenerate BatchNorm: eps != 1e-5 and zero-initialised weights (torchao's QAT conv-bn pattern)
# ---------------------------------------------------------------------------------------------------------------------


class ConvBn(nn.Module):
    def __init__(self, eps: float, zero_weight: bool) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=eps)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, bias=False), nn.BatchNorm2d(4, eps=eps)
        with torch.no_grad():  # small running variances make eps matter
            self.bn1.running_var.uniform_(1e-3, 1e-2)
            self.bn2.running_var.uniform_(1e-3, 1e-2)
            if zero_weight:
                self.bn2.weight.zero_()  # a zero-initialised residual branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))


@pytest.mark.parametrize(("eps", "zero_weight"), [(1e-3, False), (1e-5, True), (1e-3, True)])
def test_qat_graph_equals_fp32_model_for_any_bn_eps_and_zero_weight(eps: float, zero_weight: bool) -> None:
    torch.manual_seed(0)
    model = ConvBn(eps, zero_weight)
    x = torch.randn(4, 3, 8, 8)
    reference_train = copy.deepcopy(model).train()(x)
    graph = P.prepare(model, P.QuantSpec.for_example("", x))
    torch.testing.assert_close(graph(x), reference_train, atol=2e-5, rtol=1e-4)
    graph.eval()
    torch.testing.assert_close(graph(x), model.eval()(x), atol=2e-5, rtol=1e-4)

    graph.train()
    P.set_phase(graph, fake_quant=True, observers=True)
    out = graph(x)
    out.square().mean().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    converted = P.convert(graph)
    assert torch.isfinite(converted(x)).all()
    assert not [n for n in converted.graph.nodes if n.target is torch.ops.aten.batch_norm.default]  # folded


def test_qat_graph_of_mobilenet_v3_equals_fp32_model() -> None:
    torch.manual_seed(0)
    model = ZooModule("mobilenet_v3").backbone.eval()
    x = ZooModule("mobilenet_v3").example_input_array
    spec = P.QuantSpec.for_example("", x)
    graph = P.prepare(model, spec).eval()
    torch.testing.assert_close(graph(x), model(x), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# dropout in every form is off in the converted graph
# ---------------------------------------------------------------------------------------------------------------------


class Dropouts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 24)
        self.drop = nn.Dropout(0.5, inplace=True)
        self.out = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.proj(x).view(x.shape[0], 2, 4, 24).chunk(3, dim=-1)
        attn = F.scaled_dot_product_attention(q, k, v, dropout_p=0.5 if self.training else 0.0)
        h = F.dropout(attn.reshape(x.shape[0], 8, 8).mean(1), 0.5, self.training)
        return self.out(self.drop(h))


def test_converted_qat_graph_holds_no_dropout_and_is_deterministic() -> None:
    torch.manual_seed(0)
    model = Dropouts()
    x = torch.randn(4, 8, 8)
    graph = P.prepare(model, P.QuantSpec.for_example("", x))  # QAT: captured in training mode, dropout in the graph
    targets = {str(n.target) for n in graph.graph.nodes}
    assert {"aten.dropout.default", "aten.scaled_dot_product_attention.default"} <= targets
    P.set_phase(graph, fake_quant=True, observers=True)
    graph(x)
    converted = P.convert(graph)
    ops = [n for n in converted.graph.nodes if "dropout" in str(n.target)]
    assert ops == []
    sdpa = [n for n in converted.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    assert [n.kwargs.get("dropout_p", n.args[4] if len(n.args) > 4 else 0.0) for n in sdpa] == [0.0]
    converted.train()  # even a stray .train() cannot turn it back on
    torch.testing.assert_close(converted(x), converted(x), atol=0, rtol=0)
    graph.eval()
    torch.testing.assert_close(graph(x), graph(x), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# several inputs, integer ids
# ---------------------------------------------------------------------------------------------------------------------


class TwoInputs(nn.Module):
    """Token ids and a float mask, like an encoder; ids out of range would crash the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids) * attention_mask.unsqueeze(-1)
        return self.head(h.mean(1))


@pytest.mark.parametrize("form", ["tuple", "dict"])
def test_spec_keeps_real_inputs_and_ptq_runs_on_them(form: str) -> None:
    ids = torch.randint(0, 50, (3, 5))
    mask = torch.ones(3, 5)
    example = (ids, mask) if form == "tuple" else {"input_ids": ids, "attention_mask": mask}
    spec = P.QuantSpec.for_example("", example, mode="ptq")
    assert spec.input_dtype == "int64"
    again = spec.example_input()
    assert inputs.describe(again) == inputs.describe(inputs.first_rows(example, 1))
    assert torch.equal(inputs.flat_tensors(again)[0], ids[:1])
    model = TwoInputs().eval()
    graph = P.prepare(model, spec)
    P.observe(graph, [example])
    converted = P.convert(graph)
    out = inputs.call(converted, example)
    assert out.shape == (3, 3)
    assert sqnr_db(model(ids, mask), out) > MIN_SQNR_DB


def test_spec_never_makes_up_integer_inputs() -> None:
    spec = P.QuantSpec(module="backbone", input_shape=[1, 16], input_dtype="int64")
    with pytest.raises(ValueError, match="records no example input.*integer inputs cannot be made up"):
        spec.example_input()


def test_onnx_has_one_named_input_per_tensor_and_keeps_ids_int64(tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = TwoInputs().eval()
    ids = torch.randint(0, 50, (4, 5))
    mask = torch.ones(4, 5)
    example = {"input_ids": ids, "attention_mask": mask}
    export_onnx(model, example, tmp_path / "m.onnx")
    session = OnnxRuntimeModel(tmp_path / "m.onnx")
    assert [(i.name, i.type) for i in session.session.get_inputs()] == [
        ("input_ids", "tensor(int64)"),
        ("attention_mask", "tensor(float)"),
    ]
    torch.testing.assert_close(session(**example), model(**example), atol=ONNX_FP32_ATOL, rtol=1e-4)
    quantize_onnx(tmp_path / "m.onnx", tmp_path / "q.onnx", [(example, torch.zeros(4))], num_batches=1)
    int8 = OnnxRuntimeModel(tmp_path / "q.onnx")
    assert int8.session.get_inputs()[0].type == "tensor(int64)"
    assert torch.isfinite(int8(**example)).all()


# ---------------------------------------------------------------------------------------------------------------------
# rehearsal: what would fail at fit end is refused at setup
# ---------------------------------------------------------------------------------------------------------------------


class Blows(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / (x - x)  # inf everywhere: fit end would produce a broken artifact


class BrokenNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.blows = Blows()
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blows(self.fc(x)))


class BrokenModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = BrokenNet()
        self.example_input_array = torch.randn(2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0]).nan_to_num().sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> Any:
        data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.zeros(8, dtype=torch.long))
        return torch.utils.data.DataLoader(data, batch_size=4)


@pytest.mark.parametrize("callback", [QuantizationAwareTraining, PostTrainingQuantization])
def test_rehearsal_refuses_at_setup_naming_the_layer(tmp_path: Any, callback: type) -> None:
    trainer = _trainer(tmp_path, [callback(compile=False, latency=False, evaluate=False)])
    with pytest.raises(QuantizationExportError, match=r"fails at `backbone\.blows`.*skip=\['blows'\]") as info:
        trainer.fit(BrokenModule())
    assert trainer.global_step == 0
    assert "non-finite" in str(info.value)


# ---------------------------------------------------------------------------------------------------------------------
# the zoo: QAT, PTQ, ONNX fp32 and int8 on every entry
# ---------------------------------------------------------------------------------------------------------------------

# tests/test_zoo_matrix.py runs all of ZOO through QAT, PTQ and ONNX; here the entries that exercise each mechanism:
# zero-init BatchNorm (resnet_d), BatchNorm eps 1e-3 and in-place dropout (mobilenet_v3), tuple int inputs (bert),
# ids-only with a tied head and Conv1D (gpt2), attention in timm (vit), a refusal at setup (demo_transformer).
HARD = ("resnet_d", "mobilenet_v3", "vit", "bert", "gpt2", "demo_transformer")
ENTRIES = [pytest.param(name, marks=pytest.mark.skipif(not available(name), reason="extra")) for name in HARD]


def _refused_at_setup(err: BaseException, trainer: pl.Trainer) -> None:
    """A refusal is acceptable only before step 1, naming a layer and what to skip or quantize instead."""
    message = str(err)
    assert trainer.global_step == 0, f"failed after training started: {message}"
    assert isinstance(err, (QuantizationExportError, ValueError)), message
    assert re.search(r"`[\w.]+`", message) and "HINT" in message and ("skip" in message or "module=" in message)


def _check_artifact(path: Any, example: Any, reference: torch.Tensor) -> torch.Tensor:
    artifact = load_artifact(path)
    first, second = _logits(inputs.call(artifact, example)), _logits(inputs.call(artifact, example))
    assert torch.equal(first, second)  # deterministic: no dropout left anywhere
    assert torch.isfinite(first).all()
    assert first.shape == reference.shape
    assert sqnr_db(reference, first) > MIN_SQNR_DB
    graph_ops = {str(n.target) for n in torch.export.load(path).graph.nodes}
    assert not [op for op in graph_ops if "dropout" in op]
    return first


@pytest.mark.slow
@pytest.mark.parametrize("name", ENTRIES)
def test_zoo_qat_to_int8_artifact(tmp_path: Any, name: str) -> None:
    torch.manual_seed(0)
    model, data = ZooModule(name), ZooDataModule(name, size=16, batch_size=8)
    qat = QuantizationAwareTraining(compile=False, latency=False, artifact_path=str(tmp_path / "int8.pt2"))
    trainer = _trainer(tmp_path, [qat])
    try:
        trainer.fit(model, data)
    except Exception as err:
        _refused_at_setup(err, trainer)
        pytest.skip(f"refused at setup: {str(err)[:200]}")
    assert trainer.global_step == 2
    model.eval()
    example = model.example_input_array
    with torch.no_grad():
        reference = _logits(inputs.call(model, example))  # the fake-quant model
    _check_artifact(tmp_path / "int8.pt2", example, reference)
    assert 0.0 <= qat.results["test/acc"] <= 1.0

    # the checkpoint rebuilds the QAT structure in a fresh model (the quantized `backbone`), with its real inputs
    trainer.save_checkpoint(tmp_path / "qat.ckpt")
    checkpoint = torch.load(tmp_path / "qat.ckpt", weights_only=False)
    fresh = ZooModule(name)
    assert restore_quantized_structure(fresh, checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"])
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(_logits(inputs.call(fresh, example)), reference, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ENTRIES)
def test_zoo_ptq_and_onnx(tmp_path: Any, name: str) -> None:
    torch.manual_seed(0)
    model, data = ZooModule(name), ZooDataModule(name, size=16, batch_size=8)
    ptq = PostTrainingQuantization(
        calibration_batches=2, compile=False, latency=False, artifact_path=str(tmp_path / "ptq.pt2")
    )
    trainer = _trainer(tmp_path, [ptq])
    ptq_refused = None
    try:
        trainer.fit(model, data)
    except Exception as err:
        _refused_at_setup(err, trainer)
        ptq_refused = str(err)
        _trainer(tmp_path, []).fit(model, data)  # ONNX below needs no callback: train without one
    model.eval()
    example = model.example_input_array
    with torch.no_grad():
        reference = _logits(inputs.call(model, example))  # PTQ leaves the trained model in fp32
    if ptq_refused is None:
        _check_artifact(tmp_path / "ptq.pt2", example, reference)

    try:
        export_onnx(model, example, tmp_path / "fp32.onnx")
    except QuantizationExportError as err:  # refused with the layer named, before any ONNX file is written
        message = str(err)
        assert re.search(r"`[\w.<>]+`", message), message
        assert "HINT" in message
        pytest.skip(f"PTQ: {'refused' if ptq_refused else 'works'}; ONNX refused: {str(err)[:200]}")
    fp32 = OnnxRuntimeModel(tmp_path / "fp32.onnx")
    assert [i.name for i in fp32.session.get_inputs()] == inputs.input_names(example)[: len(fp32.input_names)]
    torch.testing.assert_close(_logits(inputs.call(fp32, example)), reference, atol=ONNX_FP32_ATOL, rtol=1e-3)
    quantize_onnx(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", data.train_dataloader(), num_batches=2)
    int8 = OnnxRuntimeModel(tmp_path / "int8.onnx")
    for name_, tensor in zip(inputs.input_names(example), inputs.flat_tensors(example)):
        if not torch.is_floating_point(tensor) and name_ in int8.input_names:
            assert dict((i.name, i.type) for i in int8.session.get_inputs())[name_] == "tensor(int64)"
    first, second = _logits(inputs.call(int8, example)), _logits(inputs.call(int8, example))
    assert torch.equal(first, second)
    assert torch.isfinite(first).all()
    assert sqnr_db(reference, first) > MIN_SQNR_DB
    if ptq_refused is not None:
        pytest.skip(f"PTQ refused at setup (ONNX works): {ptq_refused[:200]}")
