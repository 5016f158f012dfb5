"""TextDataModule and tokenizers: argument checks, split by file, windows, byte and BPE tokenizers, exact resume."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_opt.lm import LanguageModel
from lightning_opt.text import BPETokenizer, ByteTokenizer, TextDataModule, TokenWindows


def _corpus(root: Path, n: int = 10, lines: int = 40) -> Path:
    """``n`` small Python-like files (a few are in a subfolder), each distinct."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        folder = root / "sub" if i % 3 == 0 else root
        folder.mkdir(exist_ok=True)
        body = "".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}  # é\n" for j in range(lines))
        (folder / f"m{i}.py").write_text(body, encoding="utf-8")
    (root / "notes.txt").write_text("not python\n")
    return root


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return _corpus(tmp_path / "corpus")


# ------------------------------------------------------------------------------------------------ argument checks
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, r"`batch_size` must be an integer >= 1, got 0"),
        ({"context": 0}, r"`context` must be an integer >= 1, got 0"),
        ({"max_files": 2}, r"`max_files` must be an integer >= 3 or None, got 2.*each of train, val and test"),
        ({"max_tokens": 1}, r"`max_tokens` must be an integer >= 2 or None, got 1"),
        ({"val_fraction": 1.0}, r"`val_fraction` must be a fraction in \(0, 1\), got 1.0"),
        ({"test_fraction": 0}, r"`test_fraction` must be a fraction in \(0, 1\), got 0"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, r"`val_fraction` \+ `test_fraction` must be < 1"),
        ({"tokenizer": "word"}, r"`tokenizer` must be 'byte' or 'bpe', got 'word'"),
        ({"tokenizer_path": "t.json"}, r"`tokenizer_path` is for tokenizer='bpe'.*HINT: set tokenizer: bpe"),
        ({"tokenizer": "bpe", "vocab_size": 256}, r"`vocab_size` must be an integer >= 257, got 256"),
    ],
)
def test_bad_arguments_are_refused(corpus: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TextDataModule(root=str(corpus), **kwargs)


def test_root_that_is_not_a_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"`root` must be a folder of text files, got .*missing"):
        TextDataModule(root=str(tmp_path / "missing"))


def test_no_file_matching_the_glob_names_folder_and_glob(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=rf"No file matches glob='\*.md'.*root='{tmp_path}'"):
        TextDataModule(root=str(tmp_path), glob="*.md")


def test_non_recursive_glob_ignores_subfolders(corpus: Path) -> None:
    assert len(TextDataModule(root=str(corpus))._all_files) == 10
    assert len(TextDataModule(root=str(corpus), recursive=False)._all_files) == 6
    with pytest.raises(FileNotFoundError, match=r"directly in it \(recursive: false\)"):
        TextDataModule(root=str(corpus / "sub"), glob="*.txt", recursive=False)


def test_split_without_a_file(tmp_path: Path) -> None:
    root = _corpus(tmp_path / "two", n=2)
    dm = TextDataModule(root=str(root), context=8)
    with pytest.raises(ValueError, match=r"The train split has no file: 2 file\(s\) match glob='\*.py'"):
        dm.setup()


def test_split_too_short_for_a_window(corpus: Path) -> None:
    dm = TextDataModule(root=str(corpus), context=64, max_tokens=50)
    with pytest.raises(ValueError, match=r"The train split is too short for one window: 50 tokens .* context \+ 1"):
        dm.setup()


def test_missing_tokenizer_file(corpus: Path, tmp_path: Path) -> None:
    dm = TextDataModule(root=str(corpus), tokenizer="bpe", tokenizer_path=str(tmp_path / "nope.json"))
    with pytest.raises(FileNotFoundError, match=r"No tokenizer file at .*nope.json"):
        dm.setup()


# ------------------------------------------------------------------------------------------------ data
def test_byte_tokenizer_round_trips_any_text() -> None:
    tok = ByteTokenizer()
    text = "héllo, wörld ✓\n\tdef f(): pass"
    assert tok.encode(text) == list(text.encode("utf-8"))
    assert tok.decode(tok.encode(text)) == text


def test_split_is_by_file_and_seeded(corpus: Path) -> None:
    dm = TextDataModule(root=str(corpus), context=8, val_fraction=0.2, test_fraction=0.2)
    splits = dm.split_files()
    assert [len(splits[s]) for s in ("train", "val", "test")] == [6, 2, 2]
    assert sorted(p for files in splits.values() for p in files) == dm._all_files  # each file in exactly one split
    assert splits == TextDataModule(root=str(corpus), context=8, val_fraction=0.2, test_fraction=0.2).split_files()
    other = TextDataModule(root=str(corpus), context=8, val_fraction=0.2, test_fraction=0.2, seed=1).split_files()
    assert other != splits


def test_windows_hold_the_split_text_in_order(corpus: Path) -> None:
    dm = TextDataModule(root=str(corpus), context=16, batch_size=4, val_fraction=0.2, test_fraction=0.2)
    dm.setup()
    text = "\n".join(p.read_text(encoding="utf-8") for p in dm.files["val"]).encode("utf-8")
    loader = dm.val_dataloader()
    x, y = next(iter(loader))
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert len(loader.dataset) == (len(text) - 1) // 16 == (dm.num_tokens["val"] - 1) // 16
    assert bytes(x[0].tolist()) == text[:16]
    targets = torch.cat([b.reshape(-1) for _, b in loader]).tolist()  # every target, in order: the text from byte 1
    assert bytes(targets) == text[1 : 1 + len(targets)] and len(targets) == len(loader.dataset) * 16
    assert dm.bytes_per_token == {"train": 1.0, "val": 1.0, "test": 1.0}


def test_token_windows_cover_every_token_once() -> None:
    windows = TokenWindows(torch.arange(13, dtype=torch.uint8), context=4)
    assert len(windows) == 3
    targets = torch.cat([windows[i][1] for i in range(3)])
    assert targets.tolist() == list(range(1, 13)) and windows[0][0].dtype == torch.int64
    with pytest.raises(IndexError):
        windows[3]


def test_default_corpus_is_the_standard_library() -> None:
    dm = TextDataModule(context=32, batch_size=2, max_files=5)
    assert all("site-packages" not in p.parts for p in dm._all_files)
    assert any(p.name == "os.py" for p in dm._all_files)
    dm.setup()
    assert sum(len(f) for f in dm.files.values()) == 5


def test_bpe_is_trained_on_the_training_split_saved_with_the_run_and_reloaded(tmp_path: Path) -> None:
    root = _corpus(tmp_path / "corpus", n=6, lines=5)
    words = {}
    for i, path in enumerate(sorted(root.rglob("*.py"))):  # a word repeated in one file only
        words[path] = "".join(chr(ord("a") + (5 * i + 3 * k) % 26) for k in range(6))
        path.write_text(path.read_text() + f" {words[path]}" * 200)
    dm = TextDataModule(root=str(root), context=8, tokenizer="bpe", vocab_size=300)
    trainer = pl.Trainer(logger=False, default_root_dir=tmp_path / "run", enable_progress_bar=False)
    dm.trainer = trainer
    dm.setup("fit")
    assert isinstance(dm.tokenizer, BPETokenizer) and dm.vocab_size == 300
    vocab = dm.tokenizer.tokenizer.get_vocab()
    for split, files in dm.files.items():
        for path in files:  # merged to one token when seen in training only
            assert ("\u0120" + words[path] in vocab) == (split == "train"), (split, words[path])  # \u0120: a space
    saved = tmp_path / "run" / "tokenizer.json"
    assert dm.tokenizer_file == saved and saved.is_file()
    reloaded = BPETokenizer.load(saved)
    text = (root / "m1.py").read_text()
    assert reloaded.encode(text) == dm.tokenizer.encode(text)
    assert reloaded.decode(reloaded.encode(text)) == text
    again = TextDataModule(root=str(root), context=8, tokenizer="bpe", tokenizer_path=str(saved))
    again.setup()
    assert torch.equal(again._splits["val"].tokens, dm._splits["val"].tokens)
    # bytes per token: the UTF-8 bytes of the decoded split over its tokens
    tokens = dm._splits["val"].tokens.tolist()
    assert dm.bytes_per_token["val"] == pytest.approx(len(dm.tokenizer.decode(tokens).encode("utf-8")) / len(tokens))
    assert dm.bytes_per_token["val"] > 1.0


# ------------------------------------------------------------------------------------------------ resume
def _fit(root: Path, corpus: Path, max_steps: int, ckpt_path: str | None = None, every: int | None = None):
    pl.seed_everything(0)
    model = LanguageModel(vocab_size=256, context=8, layers=1, width=8, heads=2, warmup=2, sample_tokens=0)
    callbacks = [ModelCheckpoint(dirpath=root, every_n_train_steps=every, save_top_k=-1)] if every else []
    trainer = pl.Trainer(
        max_steps=max_steps,
        limit_train_batches=5,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=bool(every),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        deterministic=True,
    )
    dm = TextDataModule(root=str(corpus), context=8, batch_size=4)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model


@pytest.mark.parametrize("kill_at", [5, 7], ids=["end-of-epoch", "mid-epoch"])
def test_resume_gives_bitwise_the_uninterrupted_weights(tmp_path: Path, corpus: Path, kill_at: int) -> None:
    reference = _fit(tmp_path / "full", corpus, max_steps=12)
    # the checkpoint a run killed at `kill_at` leaves (same max_steps: the cosine schedule depends on it)
    _fit(tmp_path / "killed", corpus, max_steps=12, every=kill_at)
    (ckpt,) = (tmp_path / "killed").glob(f"*step={kill_at}.ckpt")
    torch.manual_seed(1234)  # a new process starts from another global generator state
    resumed = _fit(tmp_path / "resumed", corpus, max_steps=12, ckpt_path=str(ckpt))
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_resume_with_another_context_warns(corpus: Path) -> None:
    dm = TextDataModule(root=str(corpus), context=8)
    with pytest.warns(UserWarning, match=r"context: 16 -> 8"):
        dm.load_state_dict({"seed": 0, "batch_size": 32, "context": 16, "files": None, "tokens": None})
