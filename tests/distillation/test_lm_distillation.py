"""Token-level distillation of next-token models: the KL functions, padding, vocabularies, a real Trainer run."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.distributions import Categorical, kl_divergence
from torch.utils.data import DataLoader, TensorDataset

from lightning_opt.distillation import DistillationModule
from lightning_opt.distillation.losses import token_kd_loss, token_logits, topk_kd_loss
from lightning_opt.lm import TOKENIZER_KEY, LanguageModel
from lightning_opt.text import ByteTokenizer, TextDataModule, tokenizer_state

TEACHER = {"vocab_size": 256, "context": 16, "layers": 2, "width": 32, "heads": 4, "sample_tokens": 0}
STUDENT = {"vocab_size": 256, "context": 16, "layers": 1, "width": 16, "heads": 2, "sample_tokens": 0}


def _corpus(root: Path, n: int = 6) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"m{i}.py").write_text(f"def add{i}(a, b):\n    return a + b\n\n" * 40)
    return root


def _trainer(tmp_path: Path, **kwargs: object) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **{"limit_val_batches": 1, **kwargs},  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_forward_and_reverse_kl_match_torch_distributions(temperature: float) -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(12, 7, generator=g), torch.randn(12, 7, generator=g) * 3
    p_s, p_t = Categorical(logits=s / temperature), Categorical(logits=t / temperature)
    forward = kl_divergence(p_t, p_s).mean() * temperature**2
    reverse = kl_divergence(p_s, p_t).mean() * temperature**2
    torch.testing.assert_close(token_kd_loss(s, t, temperature, "forward_kl"), forward)
    torch.testing.assert_close(token_kd_loss(s, t, temperature, "reverse_kl"), reverse)
    assert abs(forward.item() - reverse.item()) > 1e-3  # the two directions are different losses


def test_masked_tokens_count_in_nothing() -> None:
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    targets = torch.tensor([[1, 2, 3, -100, -100], [4, 5, -100, 6, 7]])
    rows_s, flat = token_logits(s, targets)
    rows_t, _ = token_logits(t)
    assert flat is not None
    real = flat != -100
    for kind in ("forward_kl", "reverse_kl"):
        loss = token_kd_loss(rows_s, rows_t, 2.0, kind, mask=real)  # type: ignore[arg-type]
        # the mean over the 7 real tokens alone
        torch.testing.assert_close(loss, token_kd_loss(rows_s[real], rows_t[real], 2.0, kind))  # type: ignore[arg-type]
        s2, t2 = rows_s.clone().requires_grad_(True), rows_t.clone()
        s2.data[~real] += 100.0 * torch.randn(3, 11, generator=g)
        t2[~real] = -t2[~real] * 50
        loss2 = token_kd_loss(s2, t2, 2.0, kind, mask=real)  # type: ignore[arg-type]
        torch.testing.assert_close(loss2, loss)
        loss2.backward()
        assert s2.grad is not None and s2.grad[~real].abs().sum().item() == 0.0
    assert token_kd_loss(rows_s, rows_t, mask=torch.zeros(10, dtype=torch.bool)).item() == 0.0


def test_token_kd_loss_validates_kind_and_mask() -> None:
    s = torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"`kd_loss` must be one of \['forward_kl', 'reverse_kl'\], got 'js'"):
        token_kd_loss(s, s, kind="js")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`mask` must have the logits' shape without the class dimension, \(3,\)"):
        token_kd_loss(s, s, mask=torch.ones(2, dtype=torch.bool))


def test_distillation_module_refuses_an_unknown_kd_loss() -> None:
    with pytest.raises(ValueError, match=r"`kd_loss` must be one of .* got 'kl'"):
        DistillationModule(student=LanguageModel(**STUDENT), teacher=LanguageModel(**TEACHER), kd_loss="kl")  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl"])
def test_two_layer_teacher_distils_into_narrower_one_layer_student(tmp_path: Path, kind: str) -> None:
    pl.seed_everything(0)
    student = LanguageModel(**STUDENT)
    model = DistillationModule(student=student, teacher=LanguageModel(**TEACHER), alpha=0.7, kd_loss=kind)  # type: ignore[arg-type]
    before = [p.detach().clone() for p in student.parameters()]
    dm = TextDataModule(root=str(_corpus(tmp_path / "c")), context=16, batch_size=4)
    trainer = _trainer(tmp_path, max_steps=3, val_check_interval=3)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 3
    logged = trainer.callback_metrics
    for key in ("train/loss", "train/hard_loss", "train/soft_loss"):
        assert torch.isfinite(logged[key]), key
    assert logged["train/soft_loss"].item() > 0
    # the loss is the alpha mix of the logged parts (same step)
    mix = 0.7 * logged["train/soft_loss"] + 0.3 * logged["train/hard_loss"]
    torch.testing.assert_close(logged["train/loss"], mix)
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))
    assert "val/ppl" in logged  # the student's own validation runs unchanged


class _FirstLoss(pl.Callback):
    def __init__(self) -> None:
        self.loss: float | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self.loss = float(outputs["loss"])


def _first_step_loss(tmp_path: Path, ids: torch.Tensor, targets: torch.Tensor) -> float:
    pl.seed_everything(0)
    model = DistillationModule(student=LanguageModel(**STUDENT), teacher=LanguageModel(**TEACHER), alpha=0.5)
    record = _FirstLoss()
    trainer = _trainer(tmp_path, max_steps=1, limit_val_batches=0, callbacks=[record])
    trainer.fit(model, train_dataloaders=DataLoader(TensorDataset(ids, targets), batch_size=len(ids)))
    assert record.loss is not None
    return record.loss


def test_padding_targets_change_neither_loss(tmp_path: Path) -> None:
    """Windows whose last targets are -100: changing the inputs there (so that, the model being causal, only the
    masked positions' logits change) keeps the training loss; unmasked, the same change does count."""
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    ids2 = ids.clone()
    ids2[:, -2:] = (ids2[:, -2:] + 7) % 256
    targets = torch.roll(ids, -1, dims=1)
    padded = targets.clone()
    padded[:, -3:] = -100
    first = _first_step_loss(tmp_path, ids, padded)
    assert _first_step_loss(tmp_path, ids2, padded) == pytest.approx(first, abs=1e-6)
    assert _first_step_loss(tmp_path, ids, targets) != pytest.approx(
        _first_step_loss(tmp_path, ids2, targets), abs=1e-4
    )


def test_vocabulary_mismatch_is_refused_before_training() -> None:
    with pytest.raises(ValueError, match=r"vocabularies differ: the student predicts 300 tokens, the teacher 256"):
        DistillationModule(student=LanguageModel(**{**STUDENT, "vocab_size": 300}), teacher=LanguageModel(**TEACHER))


def test_teacher_checkpoint_with_another_tokenizer_is_refused_before_step_one(tmp_path: Path) -> None:
    teacher = LanguageModel(**{**TEACHER, "vocab_size": 260})
    path = tmp_path / "teacher.ckpt"
    torch.save({"state_dict": teacher.state_dict(), TOKENIZER_KEY: tokenizer_state(ByteTokenizer())}, path)
    model = DistillationModule(
        student=LanguageModel(**{**STUDENT, "vocab_size": 260}), teacher=teacher, teacher_checkpoint=str(path)
    )
    dm = TextDataModule(root=str(_corpus(tmp_path / "c")), context=16, batch_size=4, tokenizer="bpe", vocab_size=260)
    trainer = _trainer(tmp_path, max_steps=1)
    with pytest.raises(ValueError, match=r"records a byte tokenizer of 256 tokens .* BPETokenizer of 260 tokens"):
        trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 0


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl"])
def test_topk_teacher_renormalises_over_the_kept_tokens(kind: str) -> None:
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g) * 2
    values, indices = t.topk(10)
    torch.testing.assert_close(topk_kd_loss(s, values, indices, 2.0, kind), token_kd_loss(s, t, 2.0, kind))  # type: ignore[arg-type]
    values, indices = t.topk(3)
    # explicit sums over the 3 kept tokens, both distributions renormalised there
    p_t = torch.softmax(values / 2.0, dim=1)
    p_s = torch.softmax(s.gather(1, indices) / 2.0, dim=1)
    a, b = (p_t, p_s) if kind == "forward_kl" else (p_s, p_t)
    reference = (a * (a.log() - b.log())).sum(dim=1).mean() * 4.0
    torch.testing.assert_close(topk_kd_loss(s, values, indices, 2.0, kind), reference)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`teacher_values` and `teacher_indices` must both be \(N, k\), got \(6, 3\)"):
        topk_kd_loss(s, values, indices[:, :2], 2.0)


# ------------------------------------------------------------------------------------------------ top-k teacher cache
def _cached_run(
    tmp_path: Path, teacher: LanguageModel, cache: bool, top_k: int | None, epochs: int = 2
) -> tuple[DistillationModule, TextDataModule, list[int]]:
    """Distil for ``epochs`` epochs over 24 windows; returns the module, the data and the teacher calls per epoch."""
    pl.seed_everything(0)
    model = DistillationModule(
        student=LanguageModel(**STUDENT),
        teacher=teacher,
        alpha=0.7,
        temperature=2.0,
        cache_teacher_outputs=cache,
        teacher_top_k=top_k,
        log_teacher_metrics=False,
    )
    calls: list[int] = []
    hook = teacher.register_forward_hook(lambda *_: calls.__setitem__(-1, calls[-1] + 1))

    class _PerEpoch(pl.Callback):
        def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            calls.append(0)

    dm = TextDataModule(
        root=str(_corpus(tmp_path / "c")), context=16, batch_size=4, max_tokens=16 * 24 + 1, return_index=cache
    )
    trainer = _trainer(tmp_path, max_epochs=epochs, limit_val_batches=0, callbacks=[_PerEpoch()])
    try:
        trainer.fit(model, datamodule=dm)
    finally:
        hook.remove()
    assert trainer.global_step == 6 * epochs  # 24 windows, batch 4
    return model, dm, calls


def test_topk_cache_with_the_whole_vocabulary_equals_the_uncached_full_logits_run(tmp_path: Path) -> None:
    teacher = LanguageModel(**TEACHER)
    full, _, full_calls = _cached_run(tmp_path / "a", teacher, cache=False, top_k=None)
    cached, _, cached_calls = _cached_run(tmp_path / "b", teacher, cache=True, top_k=256)
    assert full_calls == [6, 6] and cached_calls == [6, 0]  # the 2nd epoch reads the cache, the teacher never runs
    for (name, a), b in zip(full.student.state_dict().items(), cached.student.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)  # equal up to the summation order


def test_topk_cache_holds_k_logits_per_token_and_replays_them_exactly(tmp_path: Path) -> None:
    teacher = LanguageModel(**TEACHER)
    fresh, _, fresh_calls = _cached_run(tmp_path / "a", teacher, cache=False, top_k=8)
    cached, dm, cached_calls = _cached_run(tmp_path / "b", teacher, cache=True, top_k=8)
    assert fresh_calls == [6, 6] and cached_calls == [6, 0]
    for a, b in zip(fresh.student.state_dict().values(), cached.student.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # epoch 2 from the cache = epoch 2 with the teacher recomputed
    assert cached._cache is not None and cached._cache_ids is not None
    assert tuple(cached._cache.shape) == (24, 16, 8) and cached._cache_ids.dtype == torch.int16
    # bounded by k: 8 fp32 values + 8 int16 ids per token (+ one flag per window), not the 256-token vocabulary
    assert cached.teacher_cache_bytes == 24 * 16 * 8 * (4 + 2) + 24
    # the cached entries are the teacher's top 8 of those windows
    x, _, idx = dm._splits["train"][3]
    values, ids = teacher(x[None])[0].topk(8)
    torch.testing.assert_close(cached._cache[idx], values)
    assert torch.equal(cached._cache_ids[idx].long(), ids)
    # the uncapped cache of the same run would hold the whole vocabulary: 256 fp32 logits per token
    assert cached.teacher_cache_bytes < 24 * 16 * 256 * 4 / 20


def test_teacher_top_k_is_checked() -> None:
    with pytest.raises(ValueError, match=r"`teacher_top_k` must be an integer >= 1 or None .* got 0"):
        DistillationModule(student=LanguageModel(**STUDENT), teacher=LanguageModel(**TEACHER), teacher_top_k=0)
    with pytest.raises(ValueError, match=r"`teacher_top_k`=300 exceeds the teacher's 256 classes \(vocabulary\)"):
        DistillationModule(student=LanguageModel(**STUDENT), teacher=LanguageModel(**TEACHER), teacher_top_k=300)


@pytest.mark.parametrize("backbone", ["decoder", "hf"])
def test_teacher_with_a_shorter_context_is_refused_before_training(backbone: str) -> None:
    hf = {"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2} if backbone == "hf" else None
    teacher = LanguageModel(**{**TEACHER, "context": 8}, hf_config=hf)
    with pytest.raises(
        ValueError, match=r"the teacher's `context` is 8 tokens, shorter than the student's inputs \(16"
    ):
        DistillationModule(student=LanguageModel(**STUDENT), teacher=teacher)
