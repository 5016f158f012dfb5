"""torchao ``quantize_`` schemes for Linear-heavy models: validation, closeness to fp32, artifacts, QAT, PTQ, export.

Tolerance of every "close to fp32" check: ``max |int8 - fp32| <= 5% of max |fp32|`` on the same input (measured:
0.8-1.5% on the zoo's gpt2, bert and vit; int8 rounding of weights and activations, never a changed computation).
"""

from __future__ import annotations

import copy
import json

import lightning.pytorch as pl
import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_opt import inputs
from lightning_opt.cli import main
from lightning_opt.quantization import PostTrainingQuantization, QuantizationAwareTraining, _linear, _linear_callback
from lightning_opt.quantization.export import export_checkpoint
from lightning_opt.recipe import build_from_config
from lightning_opt.testing.zoo import ZooModule, available

TOLERANCE = 0.05


def close_to(out: torch.Tensor, ref: torch.Tensor) -> bool:
    return float((out - ref).abs().max()) <= TOLERANCE * float(ref.abs().max())


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


class TinyLM(nn.Module):
    """Embedding -> Linear -> ReLU -> Linear over a 50-token vocabulary."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 32)
        self.out = nn.Linear(32, 50)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc(self.embed(ids))))


class TinyLMModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = TinyLM()
        self.example_input_array = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.backbone(ids)

    def training_step(self, batch, batch_idx):
        ids, target = batch
        loss = nn.functional.cross_entropy(self(ids).reshape(-1, 50), target.reshape(-1))
        assert torch.isfinite(loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def lm_data() -> DataLoader:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (16, 6), generator=gen)
    return DataLoader(TensorDataset(ids, torch.roll(ids, -1, dims=1)), batch_size=4)


def trainer(tmp_path, callback) -> pl.Trainer:
    return pl.Trainer(
        max_steps=2,
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )


# --------------------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------------------


def test_unknown_scheme_is_refused() -> None:
    with pytest.raises(ValueError, match=r"`scheme` must be one of \['int8_dynamic', 'int8_weight_only'\], got 'int4'"):
        _linear.quantize(mlp(), "int4")


def test_skip_pattern_matching_nothing_is_refused() -> None:
    with pytest.raises(
        ValueError,
        match=r"`skip` pattern 'head' matches no module of the quantized model\. "
        r"Module names are: 0, 1, 2",
    ):
        _linear.quantize(mlp(), "int8_dynamic", skip=["head"])


def test_skip_pattern_that_is_not_a_regex_is_refused() -> None:
    with pytest.raises(ValueError, match=r"`skip` pattern '\(' is not a valid regular expression"):
        _linear.select_layers(mlp(), skip=["("])


def test_skip_as_a_string_is_refused() -> None:
    with pytest.raises(ValueError, match=r"`skip` must be a list of regular expressions, got '0'"):
        _linear.select_layers(mlp(), skip="0")  # type: ignore[arg-type]


def test_model_without_linear_layers_is_refused_before_any_change() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
    with pytest.raises(ValueError, match=r"Nothing to quantize: Sequential has no nn\.Linear module left.*HINT"):
        _linear.quantize(model, "int8_weight_only")
    model = mlp()
    with pytest.raises(ValueError, match=r"Nothing to quantize: Sequential has no nn\.Linear module left \(skip="):
        _linear.quantize(model, "int8_dynamic", skip=["0|2|4"])
    assert _linear.quantized_layers(model) == []


def test_convert_without_prepare_is_refused() -> None:
    with pytest.raises(ValueError, match=r"has no fake-quantized module to convert\. HINT: call `prepare_qat`"):
        _linear.convert_qat(mlp(), "int8_dynamic")


def test_callbacks_refuse_an_unknown_scheme() -> None:
    with pytest.raises(ValueError, match=r"`scheme` must be one of \['pt2e_static', 'int8_dynamic', 'int8_weight_on"):
        QuantizationAwareTraining(scheme="int4")
    with pytest.raises(ValueError, match=r"`scheme` must be one of \['pt2e_static'"):
        PostTrainingQuantization(scheme="dynamic")


def test_callbacks_refuse_pt2e_only_arguments_with_a_torchao_scheme() -> None:
    with pytest.raises(ValueError, match=r"`start`=5 applies to scheme 'pt2e_static' only, got scheme 'int8_dynamic'"):
        QuantizationAwareTraining(scheme="int8_dynamic", start=5)
    with pytest.raises(ValueError, match=r"`freeze_bn`=0\.5 applies to scheme 'pt2e_static' only"):
        QuantizationAwareTraining(scheme="int8_weight_only", freeze_bn=0.5)
    with pytest.raises(ValueError, match=r"`reduce_range`=True applies to scheme 'pt2e_static' only"):
        PostTrainingQuantization(scheme="int8_dynamic", reduce_range=True)


# --------------------------------------------------------------------------------------------------------------------
# Post-training quantization: outputs close to fp32
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", _linear.SCHEMES)
def test_tiny_linear_model_is_quantized_except_skipped_layers(scheme: str) -> None:
    model = mlp()
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(x)
        assert _linear.quantize(model, scheme, skip=["4"]) == ["0", "2"]
        out = model(x)
    assert _linear.quantized_layers(model) == ["0", "2"]
    assert type(model[4].weight) is nn.Parameter  # skipped: still fp32
    assert close_to(out, reference)
    assert not torch.equal(out, reference)


@pytest.mark.skipif(not available("gpt2"), reason="needs transformers")
def test_gpt2_conv1d_is_replaced_by_an_equal_linear() -> None:
    model = ZooModule("gpt2").eval()
    x = model.example_input_array
    with torch.no_grad():
        reference = inputs.call(model, x)
        replaced = _linear.linearize_conv1d(model)
        out = inputs.call(model, x)
    assert len(replaced) == 8  # 2 blocks x (c_attn, c_proj, mlp.c_fc, mlp.c_proj)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("name", "layers"), [("gpt2", 9), ("bert", 14)])
@pytest.mark.parametrize("scheme", _linear.SCHEMES)
def test_zoo_transformers_stay_close_to_fp32(name: str, layers: int, scheme: str) -> None:
    if not available(name):
        pytest.skip("needs transformers")
    torch.manual_seed(0)
    model = ZooModule(name).eval()
    x = model.example_input_array
    with torch.no_grad():
        reference = inputs.call(model, x)
        names = _linear.quantize(model, scheme)
        out = inputs.call(model, x)
    # gpt2: 8 Conv1D (linearized) + lm_head; bert: 2 x 6 Linear + pooler + classifier
    assert len(names) == layers
    assert len(_linear.quantized_layers(model)) == layers
    assert close_to(out, reference)


# --------------------------------------------------------------------------------------------------------------------
# Artifacts
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", _linear.SCHEMES)
def test_pt2_artifact_round_trip_gives_the_same_outputs(tmp_path, scheme: str) -> None:
    model = mlp()
    _linear.quantize(model, scheme)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    size = _linear.save_artifact(model, torch.zeros(1, 16), tmp_path / "m.pt2")
    loaded = _linear.load_artifact(tmp_path / "m.pt2")
    assert size == (tmp_path / "m.pt2").stat().st_size
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)  # batch 5: the batch dimension is dynamic


@pytest.mark.skipif(not available("gpt2"), reason="needs transformers")
def test_state_file_loads_weights_only_into_a_fresh_model(tmp_path) -> None:
    torch.manual_seed(0)
    model = ZooModule("gpt2").eval()
    x = model.example_input_array
    names = _linear.quantize(model, "int8_dynamic")
    _linear.save_state(model, tmp_path / "gpt2.int8.pt", "int8_dynamic", names)
    torch.load(tmp_path / "gpt2.int8.pt", weights_only=True)  # no pickled code needed
    fresh = _linear.load_state(ZooModule("gpt2").eval(), tmp_path / "gpt2.int8.pt")
    with torch.no_grad():
        torch.testing.assert_close(inputs.call(fresh, x), inputs.call(model, x), atol=0, rtol=0)
    assert _linear.quantized_layers(fresh) == _linear.quantized_layers(model)


def test_load_state_refuses_another_file(tmp_path) -> None:
    torch.save({"state_dict": {}}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match=r"is not a quantized state saved by `save_state`"):
        _linear.load_state(mlp(), tmp_path / "plain.pt")


def test_measure_reports_sizes_and_latencies() -> None:
    model = mlp()
    quantized, _ = _linear.quantized_copy(model, "int8_weight_only")
    figures = _linear.measure(quantized, model, torch.zeros(1, 16), batch_size=4, repeats=3, rounds=1)
    assert figures["batch_size"] == 4 and figures["num_threads"] == 1
    assert figures["size_bytes"] < figures["fp32_size_bytes"]
    assert figures["speedup_vs_fp32"] == pytest.approx(figures["fp32_latency_ms"] / figures["latency_ms"])


# --------------------------------------------------------------------------------------------------------------------
# QAT: Linear and Embedding, with a real Trainer
# --------------------------------------------------------------------------------------------------------------------


def test_qat_prepare_keeps_parameters_and_convert_matches_fake_quant() -> None:
    torch.manual_seed(0)
    model = TinyLM()
    params = [id(p) for p in model.parameters()]
    keys = list(model.state_dict())
    ids = torch.randint(0, 50, (4, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids)
    assert _linear.prepare_qat(model, "int8_dynamic") == ["embed", "fc", "out"]
    assert [id(p) for p in model.parameters()] == params and list(model.state_dict()) == keys
    with torch.no_grad():
        fake = model(ids)
    assert close_to(fake, reference) and not torch.equal(fake, reference)
    assert _linear.convert_qat(model, "int8_dynamic") == ["embed", "fc", "out"]
    assert not _linear.is_qat_prepared(model)
    assert _linear.quantized_layers(model) == ["embed", "fc", "out"]
    with torch.no_grad():
        assert close_to(model(ids), fake)


@pytest.mark.parametrize("scheme", _linear.SCHEMES)
def test_qat_callback_trains_two_steps_and_writes_an_int8_artifact(tmp_path, scheme: str) -> None:
    module = TinyLMModule()
    before = module.backbone.fc.weight.detach().clone()
    qat = QuantizationAwareTraining(scheme=scheme, artifact_path=str(tmp_path / "lm.pt2"), compile=False, latency=False)
    trainer(tmp_path, qat).fit(module, train_dataloaders=lm_data())
    assert trainer is not None and qat.linear is not None
    assert sum(type(m).__name__.startswith("FakeQuantized") for m in module.backbone.modules()) == 3
    assert not torch.equal(module.backbone.fc.weight, before)  # trained with fake quantization
    assert qat.results["scheme"] == scheme and qat.results["layers"] == 3
    assert qat.results["max_abs_diff_vs_fp32"] > 0
    assert qat.results["weights_bytes"] < qat.results["fp32_weights_bytes"]
    artifact = _linear.load_artifact(tmp_path / "lm.pt2")
    fp32 = copy.deepcopy(module.backbone)
    _linear.strip_qat(fp32)
    ids = module.example_input_array
    with torch.no_grad():
        assert close_to(artifact(ids), fp32.eval()(ids))


def test_ptq_callback_quantizes_at_fit_end_and_times_it(tmp_path) -> None:
    module = TinyLMModule()
    ptq = PostTrainingQuantization(
        scheme="int8_dynamic", skip=["out"], artifact_path=str(tmp_path / "ptq.pt2"), compile=False
    )
    trainer(tmp_path, ptq).fit(module, train_dataloaders=lm_data())
    assert type(module.backbone.fc.weight) is nn.Parameter  # the trained module itself stays fp32
    assert ptq.results["layers"] == 1  # fc only: `out` skipped, embeddings not quantized by PTQ
    assert ptq.results["speedup_vs_fp32"] > 0 and ptq.results["batch_size"] == 2
    assert (tmp_path / "ptq.pt2").stat().st_size == ptq.results["size_bytes"]


def test_ptq_callback_refuses_a_bad_skip_before_training(tmp_path) -> None:
    module = TinyLMModule()
    before = module.backbone.fc.weight.detach().clone()
    ptq = PostTrainingQuantization(scheme="int8_weight_only", skip=["lm_head"], compile=False, latency=False)
    with pytest.raises(
        ValueError,
        match=r"`skip` pattern 'lm_head' matches no module of the quantized model\. "
        r"Module names are: embed",
    ):
        trainer(tmp_path, ptq).fit(module, train_dataloaders=lm_data())
    assert torch.equal(module.backbone.fc.weight, before)


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints and `lightning-opt export`
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not available("gpt2"), reason="needs transformers")
def test_qat_checkpoint_with_linearized_conv1d_loads_into_a_fresh_gpt2(tmp_path) -> None:
    torch.manual_seed(0)
    trained = ZooModule("gpt2").eval()
    _linear.prepare_qat(trained.backbone, "int8_dynamic")
    torch.save({"state_dict": trained.state_dict()}, tmp_path / "qat.ckpt")
    _linear.strip_qat(trained)
    fresh = ZooModule("gpt2").eval()
    assert len(_linear_callback.load_checkpoint_weights(fresh, str(tmp_path / "qat.ckpt"))) == 8
    x = fresh.example_input_array
    with torch.no_grad():
        torch.testing.assert_close(inputs.call(fresh, x), inputs.call(trained, x), atol=0, rtol=0)


def test_export_cli_turns_a_qat_checkpoint_into_an_int8_pt2(tmp_path, capsys) -> None:
    recipe = {
        "seed_everything": 0,
        "model": {
            "class_path": "lightning_opt.module.ImageClassifier",
            "init_args": {
                "backbone": "mlp",
                "num_classes": 3,
                "input_shape": [13],
                "backbone_kwargs": {"in_features": 13, "hidden": [32]},
            },
        },
        "data": {"class_path": "lightning_opt.data.TabularDataModule", "init_args": {"dataset": "wine"}},
        "trainer": {"logger": False, "enable_progress_bar": False, "accelerator": "cpu", "devices": 1},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    cli = build_from_config(["--config", str(tmp_path / "recipe.yaml")])
    qat = QuantizationAwareTraining(scheme="int8_dynamic", convert_on_fit_end=False)
    fit = trainer(tmp_path, qat)
    fit.fit(cli.model, cli.datamodule)
    fit.save_checkpoint(tmp_path / "qat.ckpt")
    assert not (tmp_path / "int8.pt2").exists() and qat.results == {}  # convert_on_fit_end=False
    output = tmp_path / "mlp.int8.pt2"
    args = ["--config", str(tmp_path / "recipe.yaml"), "--ckpt_path", str(tmp_path / "qat.ckpt")]
    main(["export", *args, "--quantize", "int8_dynamic", "--output", str(output), "--no_latency"])
    figures = json.loads((tmp_path / "mlp.int8.pt2.json").read_text())
    assert figures["quantize"] == "int8_dynamic" and figures["layers"] == 2
    assert figures["size_bytes"] == output.stat().st_size
    assert 0 < figures["max_abs_diff_vs_fp32"] < 0.05
    assert json.loads(capsys.readouterr().out)["layers"] == 2


def test_export_refuses_a_torchao_scheme_to_onnx(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"`quantize` 'int8_weight_only' writes a \.pt2 only, got format 'onnx'"):
        export_checkpoint(["--config", "unused.yaml"], None, format="onnx", quantize="int8_weight_only")
