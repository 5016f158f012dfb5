"""GPTDecoder and LanguageModel: argument checks, causality, loss and metrics, training, samples in TensorBoard."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from lightning_opt.lm import GPTDecoder, LanguageModel, LanguageModelingMetric, next_token_losses
from lightning_opt.pruning import Pruning
from lightning_opt.quantization import PostTrainingQuantization, QuantizationAwareTraining
from lightning_opt.reporting import CompressionReport
from lightning_opt.schedules import ConstantSchedule
from lightning_opt.text import TextDataModule

TINY = {"vocab_size": 256, "context": 16, "layers": 1, "width": 16, "heads": 2}


def _corpus(root: Path, n: int = 6) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"m{i}.py").write_text("def add(a, b):\n    return a + b\n\n" * 40)
    return root


def _trainer(tmp_path: Path, **kwargs) -> pl.Trainer:
    defaults = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": tmp_path,
        "limit_val_batches": 2,
    }
    return pl.Trainer(**{**defaults, **kwargs})


# ------------------------------------------------------------------------------------------------ argument checks
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"vocab_size": 0}, r"`vocab_size` must be an integer >= 1, got 0"),
        ({"context": 0}, r"`context` must be an integer >= 1, got 0"),
        ({"layers": 0}, r"`layers` must be an integer >= 1, got 0"),
        ({"width": 1.5}, r"`width` must be an integer >= 1, got 1.5"),
        ({"heads": 0}, r"`heads` must be an integer >= 1, got 0"),
        ({"width": 10, "heads": 4}, r"`heads` must divide `width`, got heads=4 and width=10. HINT: .*heads=2"),
        ({"mlp_ratio": 0}, r"`mlp_ratio` must be a number > 0, got 0"),
        ({"dropout": 1.0}, r"`dropout` must be in \[0, 1\), got 1.0"),
    ],
)
def test_decoder_refuses_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GPTDecoder(**{**TINY, **kwargs})


def test_decoder_refuses_inputs_longer_than_its_context() -> None:
    with pytest.raises(ValueError, match=r"The input has 17 tokens, more than the model's context of 16"):
        GPTDecoder(**TINY)(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": 0}, r"`lr` must be > 0, got 0"),
        ({"weight_decay": -1}, r"`weight_decay` must be >= 0, got -1"),
        ({"betas": (0.9, 1.0)}, r"`betas` must be two numbers in \[0, 1\), got \[0.9, 1.0\]"),
        ({"warmup": 1.5}, r"`warmup` must be in \[0.0, 1.0\] when given as a fraction"),
        ({"min_lr_ratio": 2}, r"`min_lr_ratio` must be in \[0, 1\], got 2"),
        ({"sample_tokens": -1}, r"`sample_tokens` must be an integer >= 0 \(0: no sample\), got -1"),
        ({"sample_top_k": 0}, r"`sample_top_k` must be an integer >= 1 or None \(greedy\), got 0"),
        ({"sample_prompt": ""}, r"`sample_prompt` must be a non-empty text"),
        ({"hf_config": {"n_layer": 1}}, r"`hf_config` must name its `model_type`"),
        ({"hf_config": {"model_type": "nosuch"}}, r"`hf_config.model_type`='nosuch' is not a Hugging Face model type"),
        (
            {"hf_config": {"model_type": "gpt2", "vocab_size": 50257}},
            r"`hf_config.vocab_size`=50257 disagrees with the LanguageModel's `vocab_size`=256",
        ),
        (
            {"hf_config": {"model_type": "gpt2", "n_positions": 1024}},
            r"`hf_config.n_positions`=1024 disagrees with the LanguageModel's `context`=16",
        ),
    ],
)
def test_language_model_refuses_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LanguageModel(**{**TINY, **kwargs})


def test_tokenizer_larger_than_the_vocabulary_fails_before_training(tmp_path: Path) -> None:
    model = LanguageModel(**TINY)
    dm = TextDataModule(root=str(_corpus(tmp_path / "c")), context=8, tokenizer="bpe", vocab_size=260)
    trainer = _trainer(tmp_path, max_steps=1)
    with pytest.raises(ValueError, match=r"The tokenizer has 260 tokens but the model's `vocab_size` is 256"):
        trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 0


def test_data_context_longer_than_the_model_fails_before_training(tmp_path: Path) -> None:
    model = LanguageModel(**TINY)
    dm = TextDataModule(root=str(_corpus(tmp_path / "c")), context=32)
    trainer = _trainer(tmp_path, max_steps=1)
    with pytest.raises(ValueError, match=r"datamodule's `context` \(32\) is longer than the model's `context` \(16"):
        trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 0


# ------------------------------------------------------------------------------------------------ model
def test_decoder_is_built_from_plain_layers() -> None:
    decoder = GPTDecoder(**{**TINY, "layers": 2})
    attn = decoder.blocks[0].attn
    assert type(attn.qkv) is nn.Linear and attn.qkv.out_features == 48 and attn.num_heads == 2
    assert type(attn.proj) is nn.Linear and type(decoder.blocks[0].mlp.fc1) is nn.Linear
    linears = [name for name, m in decoder.named_modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2 * 4 + 1  # qkv, proj, fc1, fc2 per block and the head
    assert decoder.head.weight is not decoder.token_embedding.weight
    tied = GPTDecoder(**TINY, tie_weights=True)
    assert tied.head.weight is tied.token_embedding.weight


@pytest.mark.parametrize("backbone", ["decoder", "hf"])
def test_changing_a_future_token_leaves_earlier_logits_equal(backbone: str) -> None:
    torch.manual_seed(0)
    hf = {"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2} if backbone == "hf" else None
    model = LanguageModel(**TINY, hf_config=hf).eval()
    ids = torch.randint(0, 256, (2, 16))
    changed = ids.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 256
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert a.shape == (2, 16, 256)
    assert torch.equal(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_example_input_is_one_window_of_token_ids() -> None:
    x = LanguageModel(**TINY).example_input_array
    assert x.shape == (1, 16) and x.dtype == torch.int64


def test_loss_and_metrics_skip_the_ignore_index() -> None:
    logits = torch.randn(2, 5, 256)
    targets = torch.randint(0, 256, (2, 5))
    padded = targets.clone()
    padded[1, 2:] = -100
    losses, mask = next_token_losses(logits, padded)
    keep = padded.reshape(-1) != -100
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 256)[keep], targets.reshape(-1)[keep])
    assert int(mask.sum()) == 7
    assert torch.allclose(losses[mask].mean(), expected)
    metric = LanguageModelingMetric()
    metric.update(losses[mask], torch.full((7,), 2))  # two bytes a token
    out = metric.compute()
    assert torch.allclose(out["loss"], expected)
    assert torch.allclose(out["ppl"], expected.exp())
    assert torch.allclose(out["bpb"], expected / (2 * math.log(2)))


def test_loss_decreases_on_a_tiny_corpus(tmp_path: Path) -> None:
    pl.seed_everything(0)
    model = LanguageModel(**{**TINY, "width": 32}, lr=1e-2, warmup=3, sample_tokens=0)
    dm = TextDataModule(root=str(_corpus(tmp_path / "c")), context=16, batch_size=8)
    trainer = _trainer(tmp_path, max_steps=30, limit_val_batches=4, val_check_interval=30, num_sanity_val_steps=0)
    before = trainer.validate(model, datamodule=dm, verbose=False)[0]
    trainer.fit(model, datamodule=dm)
    after = trainer.callback_metrics
    assert before["val/loss"] == pytest.approx(math.log(256), abs=0.05)  # uniform at init
    assert float(after["val/loss"]) < 0.5 * before["val/loss"]
    assert float(after["val/ppl"]) == pytest.approx(math.exp(float(after["val/loss"])), rel=1e-4)
    assert float(after["val/bpb"]) == pytest.approx(float(after["val/loss"]) / math.log(2), rel=1e-4)  # bytes


def test_learning_rate_warms_up_then_follows_the_cosine(tmp_path: Path) -> None:
    model = LanguageModel(**TINY, lr=0.01, warmup=2, min_lr_ratio=0.1, sample_tokens=0)
    dm = TextDataModule(root=str(_corpus(tmp_path / "c")), context=16, batch_size=2)
    lrs: list[float] = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = _trainer(tmp_path, max_steps=6, limit_val_batches=0, callbacks=[Record()])
    trainer.fit(model, datamodule=dm)
    expected = [0.005, 0.01] + [0.001 + 0.009 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert lrs == pytest.approx(expected)


def test_sample_is_logged_to_tensorboard_as_text(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pl.seed_everything(0)
    model = LanguageModel(**TINY, sample_prompt="def ", sample_tokens=12, sample_top_k=5, sample_seed=3)
    dm = TextDataModule(root=str(_corpus(tmp_path / "c")), context=16, batch_size=4)
    logger = TensorBoardLogger(tmp_path, name="lm")
    trainer = _trainer(tmp_path, max_steps=4, val_check_interval=2, logger=logger)
    trainer.fit(model, datamodule=dm)
    events = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0})
    events.Reload()
    logged = [e for e in events.Tensors("val/sample/text_summary")]
    assert [e.step for e in logged] == [2, 4]  # each validation, not the sanity check
    text = logged[-1].tensor_proto.string_val[0].decode("utf-8")
    ids = model.generate("def ", 12, top_k=5, generator=torch.Generator().manual_seed(3))
    assert len(ids) == 4 + 12 and ids[:4] == list(b"def ")
    assert text == "```\n" + model.tokenizer.decode(ids) + "\n```"


def test_checkpoint_keeps_the_bpe_tokenizer(tmp_path: Path) -> None:
    model = LanguageModel(**{**TINY, "vocab_size": 300}, sample_tokens=0)
    dm = TextDataModule(root=str(_corpus(tmp_path / "c")), context=8, tokenizer="bpe", vocab_size=270)
    trainer = _trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    trainer.save_checkpoint(tmp_path / "lm.ckpt")
    loaded = LanguageModel.load_from_checkpoint(tmp_path / "lm.ckpt")
    assert loaded.tokenizer.fingerprint() == dm.tokenizer.fingerprint() != "bytes"
    assert loaded.tokenizer.encode("def add(a, b):") == dm.tokenizer.encode("def add(a, b):")


# ------------------------------------------------------------------------------------------------ compression
#: 2 blocks, 4 heads of 8: the decoder and a Hugging Face GPT-2 of the same shape
SMALL = {
    "decoder": {"layers": 2, "width": 32, "heads": 4},
    "hf": {"hf_config": {"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 4}},
}


def _small(backbone: str) -> LanguageModel:
    pl.seed_everything(0)
    return LanguageModel(vocab_size=256, context=16, sample_tokens=0, **SMALL[backbone])  # type: ignore[arg-type]


def _compress(tmp_path: Path, model: LanguageModel, callbacks: list, steps: int = 2, **kwargs) -> pl.Trainer:
    dm = TextDataModule(root=str(_corpus(tmp_path / "c")), context=16, batch_size=4)
    trainer = _trainer(tmp_path, max_steps=steps, limit_val_batches=1, callbacks=callbacks, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=dm)
    assert trainer.global_step == steps
    return trainer


class _MaskedOutputs(pl.Callback):
    """The model's logits on its example input when training ends, before Pruning removes channels."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with torch.no_grad():
            self.out = pl_module.eval()(pl_module.example_input_array)


@pytest.mark.parametrize("granularity", ["unstructured", "nm"])
@pytest.mark.parametrize("backbone", ["decoder", "hf"])
def test_unstructured_and_2_4_prune_every_linear_of_the_decoder(
    tmp_path: Path, backbone: str, granularity: str
) -> None:
    model = _small(backbone)
    cb = Pruning(ConstantSchedule(final=0.5), granularity=granularity, remask="foreach", log_histograms=False)  # type: ignore[arg-type]
    _compress(tmp_path, model, [cb])
    if backbone == "decoder":
        layers = [
            f"backbone.blocks.{i}.{n}.weight" for i in (0, 1) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
        ]
        layers.append("backbone.head.weight")
    else:  # GPT-2's Conv1D layers and its lm_head, tied to (and named as) the token embedding
        names = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
        layers = [f"backbone.transformer.h.{i}.{n}.weight" for i in (0, 1) for n in names]
        layers.append("backbone.transformer.wte.weight")
    assert sorted(cb.masks) == sorted(layers)
    params = dict(model.named_parameters())
    pruned = total = 0
    for name, mask in cb.masks.items():
        assert not params[name][~mask].any(), name  # exactly zero after the optimizer steps
        pruned, total = pruned + int((~mask).sum()), total + mask.numel()
        if granularity == "nm":  # 2 of every 4 consecutive input weights
            assert int((~mask).sum()) * 2 == mask.numel(), name
    assert pruned == total // 2


@pytest.mark.parametrize("backbone", ["decoder", "hf"])
def test_heads_and_mlp_units_are_removed_physically(tmp_path: Path, backbone: str) -> None:
    model = _small(backbone)
    before = sum(p.numel() for p in model.parameters())
    cb = Pruning(
        ConstantSchedule(final=0.5), granularity="channel", scope="layer", remove_channels=True, log_histograms=False
    )
    masked = _MaskedOutputs()
    trainer = _compress(tmp_path, model, [masked, cb])
    if backbone == "decoder":
        for block in model.backbone.blocks:  # 2 of 4 heads (of 8 channels) and 64 of 128 MLP units left
            attn = block.attn
            assert (attn.num_heads, attn.head_dim, attn.attn_dim) == (2, 8, 16)
            assert tuple(attn.qkv.weight.shape) == (48, 32) and tuple(attn.proj.weight.shape) == (32, 16)
            assert block.mlp.fc1.out_features == 64 == block.mlp.fc2.in_features
    else:
        for block in model.backbone.transformer.h:
            assert (block.attn.num_heads, block.attn.split_size) == (2, 16)
            assert tuple(block.attn.c_attn.weight.shape) == (32, 48) and block.mlp.c_fc.nf == 64
    assert sum(p.numel() for p in model.parameters()) < 0.75 * before
    with torch.no_grad():
        out = model.eval()(model.example_input_array)
    torch.testing.assert_close(out, masked.out, atol=1e-4, rtol=0)  # the thin model computes what the masked one did
    trainer.save_checkpoint(tmp_path / "thin.ckpt")
    with torch.no_grad():
        reloaded = LanguageModel.load_from_checkpoint(tmp_path / "thin.ckpt").eval()(model.example_input_array)
    torch.testing.assert_close(reloaded, out)


def _fake_quantized(model: nn.Module) -> dict[str, int]:
    names = [type(m).__name__ for m in model.modules()]
    return {kind: names.count(kind) for kind in ("FakeQuantizedLinear", "FakeQuantizedEmbedding")}


@pytest.mark.parametrize("scheme", ["int8_dynamic", "int8_weight_only"])
@pytest.mark.parametrize("backbone", ["decoder", "hf"])
def test_int8_ptq_through_the_linear_path(tmp_path: Path, backbone: str, scheme: str) -> None:
    model = _small(backbone)
    cb = PostTrainingQuantization(scheme=scheme, compile=False, latency=False)
    report = CompressionReport(monitor="val/ppl", repeats=2, lm_batches=1, lm_decode_tokens=2)
    trainer = _compress(tmp_path, model, [cb, report])
    figures = report.stages["int8_ptq"]
    assert figures["scheme"] == scheme and figures["layers"] == 9  # 4 Linear (or Conv1D) per block and the head
    # int8 Linear weights; the embeddings stay fp32 in PTQ (GPT-2's lm_head, quantized, is untied from its embedding)
    assert figures["weights_bytes"] < 0.7 * figures["fp32_weights_bytes"]
    assert figures["max_abs_diff_vs_fp32"] < 0.05
    section = report.language_model
    assert sorted(section) == ["baseline", "final", "int8_ptq"]
    assert section["int8_ptq"]["lm_ppl"] == pytest.approx(section["final"]["lm_ppl"], rel=0.01)
    assert section["int8_ptq"]["size_bytes"] < section["final"]["size_bytes"]
    assert trainer.global_step == 2


@pytest.mark.parametrize("backbone", ["decoder", "hf"])
def test_qat_fake_quantizes_linear_and_embedding_layers(tmp_path: Path, backbone: str) -> None:
    model = _small(backbone)
    seen: dict[str, int] = {}

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.update(_fake_quantized(pl_module))

    cb = QuantizationAwareTraining(scheme="int8_dynamic", compile=False, latency=False)
    _compress(tmp_path, model, [Spy(), cb])
    # every Linear (GPT-2's Conv1D become Linear) and both embeddings train fake-quantized; GPT-2's lm_head is tied
    # to the token embedding and is quantized as a Linear
    assert seen == {"FakeQuantizedLinear": 9, "FakeQuantizedEmbedding": 2}
    assert cb.results["layers"] == 11 and cb.results["max_abs_diff_vs_fp32"] < 0.05  # then converted to int8
    assert _fake_quantized(model) == {"FakeQuantizedLinear": 9, "FakeQuantizedEmbedding": 2}  # the trained model


def test_report_gives_perplexity_size_and_tokens_per_second_before_and_after(tmp_path: Path) -> None:
    model = _small("decoder")
    report = CompressionReport(monitor="val/ppl", repeats=2, lm_batches=2, lm_decode_tokens=3)
    _compress(tmp_path, model, [report], steps=4, logger=TensorBoardLogger(tmp_path, name="lm"))
    section = report.language_model
    for stage in ("baseline", "final"):
        assert set(section[stage]) == {"lm_ppl", "params", "size_bytes", "prefill_tokens_per_s", "decode_tokens_per_s"}
        assert section[stage]["prefill_tokens_per_s"] > section[stage]["decode_tokens_per_s"] > 0
    assert section["baseline"]["lm_ppl"] == pytest.approx(256, rel=0.1)  # uniform at init
    assert section["final"]["lm_ppl"] < section["baseline"]["lm_ppl"]
    assert section["final"]["params"] == sum(p.numel() for p in model.parameters())
    written = (report.output_dir / "report.md").read_text()
    assert "## Language model" in written and "| decode tokens/s |" in written
    assert json.loads((report.output_dir / "report.json").read_text())["language_model"] == section


def test_hf_backbone_refuses_inputs_longer_than_its_context() -> None:
    model = LanguageModel(**TINY, hf_config={"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2})
    with pytest.raises(ValueError, match=r"The input has 17 tokens, more than the model's context of 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("--data.init_args.root={tmp}/empty", "No file matches glob='*.py' in it or any subfolder"),
        ("--data.init_args.context=32", "datamodule's `context` (32) is longer than the model's `context` (16)"),
    ],
    ids=["empty-corpus-folder", "context-longer-than-the-model"],
)
def test_lm_recipe_with_bad_data_fails_in_one_line_before_training(
    override: str, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from lightning_opt.cli import main

    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LIGHTNING_OPT_DEBUG", raising=False)
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "lm" / "student.yaml"
    argv = ["fit", "--config", str(recipe), "--model.init_args.context=16", "--data.init_args.context=16"]
    argv += ["--data.init_args.max_files=6", "--trainer.max_steps=1", override.replace("{tmp}", str(tmp_path))]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and expected in err and "Traceback" not in err
    assert not list(tmp_path.rglob("*.ckpt"))  # nothing trained
