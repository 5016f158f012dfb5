"""Text for language models: a datamodule over a folder of text files, byte-level and BPE tokenizers.

Everything works offline. The default corpus is the Python standard library's own source files
(``sysconfig.get_paths()["stdlib"]``, without ``site-packages``): about 1,800 files and 31 MB on CPython 3.11,
present on every machine. A user's own folder works the same way (``root`` and ``glob``).

Files are split into train/val/test *by file* with a seed, each split is tokenised and concatenated, and cut into
fixed windows of ``context + 1`` tokens: a batch is ``(input_ids, targets)``, both ``(batch, context)`` int64, the
targets shifted by one token. The training order comes from a generator seeded by ``(seed, epoch)`` and resumes
exactly, also in the middle of an epoch (`EpochSampler`,
`ResumableDataLoader`).

Examples:
    >>> dm = TextDataModule(context=32, batch_size=4, max_files=12)
    >>> dm.setup()
    >>> x, y = next(iter(dm.train_dataloader()))
    >>> x.shape, x.dtype, bool((x[:, 1:] == y[:, :-1]).all())
    (torch.Size([4, 32]), torch.int64, True)
"""

from __future__ import annotations

import hashlib
import math
import os
import sysconfig
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_opt._io import atomic_path
from lightning_opt._utils import local_log_dir
from lightning_opt.data import InMemoryDataModule

__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "TextDataModule",
    "TokenWindows",
    "Tokenizer",
    "default_corpus",
    "load_tokenizer",
    "tokenizer_from_state",
    "tokenizer_state",
]

SPLITS = ("train", "val", "test")
TOKENIZER_FILE = "tokenizer.json"


def default_corpus() -> Path:
    """The Python standard library's source folder (``site-packages`` below it is skipped by the datamodule)."""
    return Path(sysconfig.get_paths()["stdlib"])


class Tokenizer(Protocol):
    """What the datamodule and `LanguageModel` need from a tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_bytes(self) -> torch.Tensor: ...

    def fingerprint(self) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, nothing to train or save, every text round-trips.

    Examples:
        >>> tok = ByteTokenizer()
        >>> tok.encode("é!"), tok.decode(tok.encode("é!")), tok.vocab_size
        ([195, 169, 33], 'é!', 256)
    """

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text``."""
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of every text."""
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of byte ids (an invalid UTF-8 sequence becomes U+FFFD)."""
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self) -> torch.Tensor:
        """Bytes each token stands for: one."""
        return torch.ones(self.vocab_size, dtype=torch.long)

    def fingerprint(self) -> str:
        """An identifier of the vocabulary (compared on resume)."""
        return "bytes"


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """The inverse of the byte -> printable character table of byte-level BPE (GPT-2's ``bytes_to_unicode``)."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()  # the 256 characters, one per byte
    # GPT-2's table: printable latin-1 bytes map to themselves, the others to chr(256 + n) in byte order
    table: dict[str, int] = {}
    extra = 0
    for byte in range(256):
        if (33 <= byte <= 126) or (161 <= byte <= 172) or (174 <= byte <= 255):
            table[chr(byte)] = byte
        else:
            table[chr(256 + extra)] = byte
            extra += 1
    if set(table) != set(alphabet):  # pragma: no cover - a tokenizers release that changes the table
        raise RuntimeError("tokenizers' ByteLevel alphabet is not GPT-2's byte table; update _unicode_to_byte.")
    return table


class BPETokenizer:
    r"""A byte-level BPE tokenizer (Hugging Face ``tokenizers``), trained offline, saved as one ``tokenizer.json``.

    Byte-level: any text encodes (no unknown token) and decodes back to itself.

    Args:
        tokenizer: A ``tokenizers.Tokenizer`` with a byte-level pre-tokenizer and decoder.

    Examples:
        >>> tok = BPETokenizer.train(["def f(x):\n    return x\n"] * 50, vocab_size=270)
        >>> tok.vocab_size, tok.decode(tok.encode("def g(): return 1"))
        (270, 'def g(): return 1')
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        """Learn merges on ``texts`` until the vocabulary holds ``vocab_size`` tokens (the 256 bytes included).

        Raises:
            ValueError: If ``vocab_size`` < 257 (a BPE needs at least one merge above the 256 bytes).
        """
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 256:
            raise ValueError(
                f"`vocab_size` of a BPE tokenizer must be an integer > 256, got {vocab_size!r}. HINT: the 256 bytes "
                "are its first tokens; use tokenizer='byte' for a vocabulary of 256."
            )
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        """Read a ``tokenizer.json`` written by `save`.

        Raises:
            FileNotFoundError: If ``path`` does not exist.
        """
        from tokenizers import Tokenizer

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"No tokenizer file at {str(path.resolve())!r}. HINT: a run with tokenizer='bpe' saves it as "
                f"{TOKENIZER_FILE} in its log directory; point `tokenizer_path` at that file, or leave it unset to "
                "train one on the training split."
            )
        return cls(Tokenizer.from_file(str(path)))

    @classmethod
    def from_json(cls, text: str) -> BPETokenizer:
        """The tokenizer of a JSON string written by `to_json` (as checkpoints hold it)."""
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(text))

    def to_json(self) -> str:
        """The whole tokenizer as one JSON string."""
        return str(self.tokenizer.to_str())

    def save(self, path: str | Path) -> None:
        """Write the tokenizer as one JSON file."""
        with atomic_path(path) as tmp:
            self.tokenizer.save(str(tmp))

    @property
    def vocab_size(self) -> int:
        """Number of tokens."""
        return int(self.tokenizer.get_vocab_size())

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""
        return list(self.tokenizer.encode(text).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of every text (encoded in parallel)."""
        return [list(e.ids) for e in self.tokenizer.encode_batch(list(texts))]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids."""
        return str(self.tokenizer.decode([int(i) for i in ids]))

    def token_bytes(self) -> torch.Tensor:
        """Bytes of UTF-8 text each token stands for (its decoded length), indexed by id."""
        table = _unicode_to_byte()
        out = torch.zeros(self.vocab_size, dtype=torch.long)
        for token, index in self.tokenizer.get_vocab().items():
            out[index] = sum(1 for ch in token if ch in table)
        return out

    def fingerprint(self) -> str:
        """A hash of the vocabulary and merges (compared on resume)."""
        return hashlib.sha256(self.tokenizer.to_str().encode("utf-8")).hexdigest()[:16]


def tokenizer_state(tokenizer: Tokenizer) -> dict[str, str]:
    """A checkpoint-friendly description of a tokenizer: ``{"kind": "byte"}`` or ``{"kind": "bpe", "json": ...}``.

    Examples:
        >>> tokenizer_from_state(tokenizer_state(ByteTokenizer())).vocab_size
        256
    """
    if isinstance(tokenizer, BPETokenizer):
        return {"kind": "bpe", "json": tokenizer.to_json()}
    return {"kind": "byte"}


def tokenizer_from_state(state: dict[str, str]) -> Tokenizer:
    """The tokenizer described by `tokenizer_state`."""
    return BPETokenizer.from_json(state["json"]) if state.get("kind") == "bpe" else ByteTokenizer()


def load_tokenizer(path: str | Path | None) -> Tokenizer:
    """The byte tokenizer (``None``) or the BPE tokenizer saved at ``path``.

    Examples:
        >>> load_tokenizer(None).vocab_size
        256
    """
    return ByteTokenizer() if path is None else BPETokenizer.load(path)


class TokenWindows(Dataset):
    """Consecutive, non-overlapping windows of ``context + 1`` tokens of one token stream.

    Item ``i`` is ``(input_ids, targets)`` = ``tokens[i*context : i*context + context]`` and the same shifted by one,
    both int64; the last token of a window is the first of the next, so every token but the first is a target once.

    Args:
        tokens: A 1-D integer tensor (any integer dtype; stored as given, returned as int64).
        context: Tokens per input.
        return_index: Also return the window's index, third (keys the distillation teacher's cache).

    Examples:
        >>> windows = TokenWindows(torch.arange(10), context=4)
        >>> len(windows), windows[1]
        (2, (tensor([4, 5, 6, 7]), tensor([5, 6, 7, 8])))
        >>> TokenWindows(torch.arange(10), context=4, return_index=True)[1][2]
        1
    """

    def __init__(self, tokens: torch.Tensor, context: int, return_index: bool = False) -> None:
        self.tokens = tokens
        self.context = context
        self.return_index = return_index

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.context)

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range for {len(self)} windows")
        start = index * self.context
        chunk = self.tokens[start : start + self.context + 1].long()
        return (chunk[:-1], chunk[1:], index) if self.return_index else (chunk[:-1], chunk[1:])


_NOT_STDLIB = frozenset({"site-packages", "dist-packages", "__pycache__"})


def _walk(root: Path, skip: frozenset[str]) -> list[Path]:
    """Every file under ``root``, not entering folders named in ``skip``."""
    out: list[Path] = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip]
        out += [Path(folder, name) for name in names]
    return out


def _check_int(name: str, value: Any, low: int, allow_none: bool = False, hint: str = "") -> None:
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        allowed = f"an integer >= {low}" + (" or None" if allow_none else "")
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}.{' HINT: ' + hint if hint else ''}")


class TextDataModule(InMemoryDataModule):
    """Next-token windows over a folder of text files, split by file, tokenised by bytes or by a BPE.

    Files matching ``glob`` under ``root`` are sorted, shuffled with ``seed``, capped at ``max_files`` and split by
    file: the first ``ceil(val_fraction * n)`` go to validation, the next ``ceil(test_fraction * n)`` to test, the rest
    to training, so no file is in two splits. Each split's files are read, tokenised, concatenated (a newline between
    files) and cut into windows of ``context + 1`` tokens (`TokenWindows`); ``max_tokens`` caps each split.

    With ``tokenizer="bpe"`` a byte-level BPE of ``vocab_size`` tokens is trained on the *training* split only, or read
    from ``tokenizer_path``; when the datamodule is attached to a trainer it is saved as ``tokenizer.json`` in the
    trainer's log directory, where ``BPETokenizer.load`` (or ``tokenizer_path`` of a later run) reads it back.

    After ``setup``: ``tokenizer``, ``vocab_size``, ``files`` (per split), ``num_tokens`` (per split),
    ``bytes_per_token`` (per split: UTF-8 bytes of the split's text / its tokens) and ``tokenizer_file``.

    Args:
        root: Folder of text files; ``None``: the Python standard library's source folder (its ``site-packages`` is
            skipped).
        glob: File name pattern, relative to ``root`` (``"*.py"``, ``"**/*.md"``).
        recursive: Match ``glob`` in every subfolder too.
        context: Tokens per input window.
        batch_size: Windows per batch.
        val_fraction: Fraction of the files held out for validation.
        test_fraction: Fraction of the files held out for test.
        seed: Seed of the file split and of the training order (with the epoch).
        max_files: Use at most this many files (drawn with ``seed``); ``None``: all.
        max_tokens: Keep at most this many tokens of each split; ``None``: all.
        tokenizer: ``"byte"`` (vocabulary 256) or ``"bpe"``.
        vocab_size: Vocabulary of the BPE to train (``tokenizer="bpe"`` without ``tokenizer_path``).
        tokenizer_path: A ``tokenizer.json`` to load instead of training one (``tokenizer="bpe"``).
        num_workers: DataLoader workers.
        return_index: Batches are ``(input_ids, targets, window index)``: what
            ``DistillationModule(cache_teacher_outputs=True)`` keys its cache of the teacher's outputs by.

    Raises:
        ValueError: If an argument is out of range (checked here), or at ``setup``: a split without any file or too
            short for one window.
        FileNotFoundError: If ``root`` is not a folder or no file under it matches ``glob`` (here), or
            ``tokenizer_path`` does not exist (at ``setup``).

    Examples:
        >>> dm = TextDataModule(context=16, batch_size=2, max_files=6, tokenizer="bpe", vocab_size=300)
        >>> dm.setup()
        >>> dm.vocab_size, sorted(dm.files), dm.bytes_per_token["val"] > 1
        (300, ['test', 'train', 'val'], True)
    """

    def __init__(
        self,
        root: str | None = None,
        glob: str = "*.py",
        recursive: bool = True,
        context: int = 256,
        batch_size: int = 32,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        seed: int = 0,
        max_files: int | None = None,
        max_tokens: int | None = None,
        tokenizer: Literal["byte", "bpe"] = "byte",
        vocab_size: int = 4096,
        tokenizer_path: str | None = None,
        num_workers: int = 0,
        return_index: bool = False,
    ) -> None:
        _check_int("batch_size", batch_size, 1)
        super().__init__(batch_size=batch_size, seed=seed, num_workers=num_workers, return_index=return_index)
        _check_int("context", context, 1)
        _check_int("max_files", max_files, 3, allow_none=True, hint="each of train, val and test needs a file.")
        _check_int("max_tokens", max_tokens, 2, allow_none=True, hint="a window needs context + 1 tokens.")
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise ValueError(f"`{name}` must be a fraction in (0, 1), got {value!r}.")
        if val_fraction + test_fraction >= 1:
            raise ValueError(
                f"`val_fraction` + `test_fraction` must be < 1 to leave files for training, got {val_fraction} + "
                f"{test_fraction}."
            )
        if tokenizer not in ("byte", "bpe"):
            raise ValueError(f"`tokenizer` must be 'byte' or 'bpe', got {tokenizer!r}.")
        if tokenizer == "byte" and tokenizer_path is not None:
            raise ValueError(
                f"`tokenizer_path` is for tokenizer='bpe', got tokenizer='byte' and tokenizer_path={tokenizer_path!r}."
                " HINT: set tokenizer: bpe to load it."
            )
        if tokenizer == "bpe" and tokenizer_path is None:
            _check_int("vocab_size", vocab_size, 257, hint="the 256 bytes are the BPE's first tokens.")
        self.root = Path(root).expanduser() if root is not None else default_corpus()
        self.glob = glob
        self.recursive = recursive
        self.context = context
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.max_files = max_files
        self.max_tokens = max_tokens
        self.tokenizer_kind = tokenizer
        self.bpe_vocab_size = vocab_size
        self.tokenizer_path = tokenizer_path
        self.tokenizer: Tokenizer = ByteTokenizer()
        self.files: dict[str, list[Path]] = {}
        self.num_tokens: dict[str, int] = {}
        self.bytes_per_token: dict[str, float] = {}
        self.tokenizer_file: Path | None = None
        self._all_files = self._find_files()  # fails now, before any training, on an empty folder

    # ---------------------------------------------------------------- files
    def _find_files(self) -> list[Path]:
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"`root` must be a folder of text files, got {str(self.root)!r}, which is not a folder. HINT: leave "
                "root unset to use the Python standard library's sources."
            )
        if self.root == default_corpus() and self.recursive:  # skip the installed packages below the stdlib
            files = sorted(p for p in _walk(self.root, skip=_NOT_STDLIB) if p.match(self.glob))
        else:
            matches = self.root.rglob(self.glob) if self.recursive else self.root.glob(self.glob)
            files = sorted(p for p in matches if p.is_file())
        if not files:
            where = "in it or any subfolder" if self.recursive else "directly in it (recursive: false)"
            raise FileNotFoundError(
                f"No file matches glob={self.glob!r} {where}, under root={str(self.root.resolve())!r}. HINT: check the "
                "folder and the pattern (e.g. '*.txt', '*.md'), or set recursive: true to search subfolders."
            )
        return files

    def split_files(self) -> dict[str, list[Path]]:
        """The files of each split: sorted, shuffled with ``seed``, capped at ``max_files``, split by fractions.

        Raises:
            ValueError: If a split gets no file.
        """
        files = self._all_files
        generator = torch.Generator().manual_seed(self.seed)
        files = [files[i] for i in torch.randperm(len(files), generator=generator).tolist()]
        if self.max_files is not None:
            files = files[: self.max_files]
        n = len(files)
        n_val, n_test = math.ceil(self.val_fraction * n), math.ceil(self.test_fraction * n)
        splits = {"val": files[:n_val], "test": files[n_val : n_val + n_test], "train": files[n_val + n_test :]}
        for name, chosen in splits.items():
            if not chosen:
                raise ValueError(
                    f"The {name} split has no file: {n} file(s) match glob={self.glob!r} under {str(self.root)!r} "
                    f"(max_files={self.max_files}), val_fraction={self.val_fraction}, test_fraction="
                    f"{self.test_fraction}. HINT: add files, raise max_files, or lower the fractions; each split needs "
                    "at least one file."
                )
        return {name: sorted(splits[name]) for name in SPLITS}

    @staticmethod
    def _read(paths: Sequence[Path]) -> list[str]:
        return [p.read_bytes().decode("utf-8", errors="replace") for p in paths]

    # ---------------------------------------------------------------- setup
    def _load_tokenizer(self, train_texts: list[str]) -> Tokenizer:
        if self.tokenizer_kind == "byte":
            return ByteTokenizer()
        if self.tokenizer_path is not None:
            return BPETokenizer.load(self.tokenizer_path)
        return BPETokenizer.train(train_texts, self.bpe_vocab_size)

    def _save_tokenizer(self) -> None:
        trainer = self.trainer
        if not isinstance(self.tokenizer, BPETokenizer) or trainer is None:
            return
        self.tokenizer_file = Path(local_log_dir(trainer)) / TOKENIZER_FILE
        if trainer.global_rank == 0:
            self.tokenizer.save(self.tokenizer_file)

    def _tokenize(self, texts: list[str], dtype: torch.dtype) -> torch.Tensor:
        """The texts' tokens, a newline between texts, capped at ``max_tokens``."""
        if isinstance(self.tokenizer, ByteTokenizer):  # fast path: the bytes are the ids
            data = "\n".join(texts).encode("utf-8")[: self.max_tokens]
            return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=dtype)
        newline = np.asarray(self.tokenizer.encode("\n"), dtype=np.int64)
        parts: list[np.ndarray] = []
        count = 0
        for i, ids in enumerate(self.tokenizer.encode_batch(texts)):
            parts += [newline, np.asarray(ids, dtype=np.int64)] if i else [np.asarray(ids, dtype=np.int64)]
            count += len(parts[-1]) + (len(newline) if i else 0)
            if self.max_tokens is not None and count >= self.max_tokens:
                break
        flat = np.concatenate(parts)[: self.max_tokens] if parts else np.zeros(0, dtype=np.int64)
        return torch.from_numpy(flat).to(dtype)

    def setup(self, stage: str | None = None) -> None:
        """Split, read, tokenise and window every split (once); train or load the tokenizer; save it with the run."""
        if self._splits:
            return
        self.files = self.split_files()
        texts = {name: self._read(self.files[name]) for name in SPLITS}
        self.tokenizer = self._load_tokenizer(texts["train"])
        self._save_tokenizer()
        dtype = torch.uint8 if self.tokenizer.vocab_size <= 256 else torch.int32
        token_bytes = self.tokenizer.token_bytes()
        splits: dict[str, Dataset] = {}
        for name in SPLITS:
            tokens = self._tokenize(texts[name], dtype)
            windows = TokenWindows(tokens, self.context, self.return_index)
            if len(windows) == 0:
                raise ValueError(
                    f"The {name} split is too short for one window: {len(tokens)} tokens from {len(self.files[name])} "
                    f"file(s), a window needs context + 1 = {self.context + 1}. HINT: lower `context`, raise "
                    "`max_tokens` or `max_files`."
                )
            self.num_tokens[name] = len(tokens)
            counts = torch.bincount(tokens if dtype == torch.uint8 else tokens.long(), minlength=len(token_bytes))
            self.bytes_per_token[name] = float(counts @ token_bytes) / max(len(tokens), 1)
            splits[name] = windows
        self._splits = splits

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary (256 for bytes; the BPE's after ``setup``)."""
        if self.tokenizer_kind == "bpe" and not self._splits:
            if self.tokenizer_path is not None:
                return load_tokenizer(self.tokenizer_path).vocab_size
            return self.bpe_vocab_size
        return self.tokenizer.vocab_size

    # ---------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        """What the windows and their order depend on; a resumed run with other settings warns."""
        state = super().state_dict()
        state.pop("augment_shift", None)
        state.update(
            context=self.context,
            files=self.max_files,
            tokens=self.max_tokens,
            tokenizer=self.tokenizer.fingerprint() if self._splits else None,
        )
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Warn when the resumed run's data settings (or tokenizer) differ from the checkpoint's."""
        mine = self.state_dict()
        super().load_state_dict({k: v for k, v in state_dict.items() if v is not None and mine.get(k) is not None})
