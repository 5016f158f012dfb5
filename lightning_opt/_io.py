"""Files written atomically, and output folders checked before a run writes to them.

Every file lightning-opt writes (checkpoints, reports, artifacts, search outputs) goes through `atomic_path`:
the writer fills a temporary file in the target's folder, which is flushed to disk (``fsync``) and renamed onto the
target only when the writer finished. A writer that fails (a full disk, an object that cannot be serialised, an
interrupt) leaves the previous file untouched, or no file under the target's name, and no temporary file.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from typing_extensions import override

__all__ = [
    "AtomicCheckpointIO",
    "atomic_path",
    "atomic_save",
    "atomic_write",
    "check_output_dir",
    "check_trainer_output_dirs",
    "use_atomic_checkpoints",
]

_PathLike = str | os.PathLike[str]


@contextlib.contextmanager
def atomic_path(path: _PathLike) -> Iterator[Path]:
    """A temporary path next to ``path`` for a writer to fill; renamed onto ``path`` when the block succeeds.

    The temporary name keeps ``path``'s suffix (exporters check it) and starts with a dot. After the block the file
    is flushed to disk and renamed onto ``path`` (``os.replace``, atomic within a folder); if the block raises, the
    temporary file is removed and ``path`` keeps its previous content (or stays absent). The folder is created if
    missing.

    Examples:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "figures.json"
        >>> with atomic_path(target) as tmp:
        ...     _ = tmp.write_text("{}")
        >>> target.read_text(), sorted(p.name for p in target.parent.iterdir())
        ('{}', ['figures.json'])
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp{target.suffix}")
    try:
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"the writer of {str(target)!r} wrote nothing (no file at {str(tmp)!r}).")
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: some filesystems cannot open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: _PathLike, mode: str = "w", **open_kwargs: Any) -> Iterator[IO[Any]]:
    """``open(path, mode)`` for writing, atomically (see `atomic_path`).

    Args:
        path: the file to write.
        mode: ``"w"`` (text) or ``"wb"`` (bytes).
        **open_kwargs: passed to `open` (``encoding``, ``newline``).

    Raises:
        ValueError: if ``mode`` is not a write mode.

    Examples:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "report.md"
        >>> with atomic_write(target) as fh:
        ...     _ = fh.write("# Report")
        >>> target.read_text()
        '# Report'
    """
    if mode not in ("w", "wb", "wt"):
        raise ValueError(f"`mode` must be 'w', 'wt' or 'wb' (a whole new file), got {mode!r}.")
    with atomic_path(path) as tmp, open(tmp, mode, **open_kwargs) as fh:
        yield fh


def atomic_save(obj: Any, path: _PathLike) -> Path:
    """``torch.save(obj, path)``, atomically (see `atomic_path`); returns the path.

    Examples:
        >>> import tempfile, torch
        >>> path = atomic_save({"w": torch.ones(2)}, Path(tempfile.mkdtemp()) / "w.pt")
        >>> torch.load(path, weights_only=True)["w"].tolist()
        [1.0, 1.0]
    """
    import torch

    with atomic_write(path, "wb") as fh:
        torch.save(obj, fh)
    return Path(path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's `TorchCheckpointIO` with atomic local files.

    Lightning 2.6's ``TorchCheckpointIO`` writes through an fsspec transaction whose temporary file lives in the
    system's temporary folder; committing it moves the file across filesystems, which copies it into the final
    name: a full disk leaves a truncated checkpoint under its normal name, and nothing is flushed to disk. This
    plugin writes local checkpoints with `atomic_save` (a temporary file in the checkpoint's folder, fsync,
    rename); remote paths (``s3://...``) keep Lightning's behaviour. ``lightning-opt`` installs it on every trainer
    it builds whose checkpoint plugin is the default one.

    Examples:
        >>> import lightning.pytorch as pl, tempfile
        >>> trainer = pl.Trainer(plugins=[AtomicCheckpointIO()], logger=False, default_root_dir=tempfile.mkdtemp())
        >>> type(trainer.strategy.checkpoint_io).__name__
        'AtomicCheckpointIO'
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        from fsspec.implementations.local import LocalFileSystem

        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)  # remote storage, or its TypeError
            return
        atomic_save(checkpoint, path)


def use_atomic_checkpoints(trainer: Any) -> Any:
    """Give ``trainer`` an `AtomicCheckpointIO` when its checkpoint plugin is Lightning's default; returns it.

    A checkpoint plugin the user chose (async, remote, a subclass) is kept.
    """
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
    return trainer


def check_output_dir(folder: _PathLike, key: str) -> None:
    """Fail unless files can be created in ``folder`` (made if missing), without leaving anything behind.

    The check creates the folder and a probe file, then removes both, so it holds for any user (root included, whom
    permission bits do not stop) and any reason (read-only filesystem, a file in the way, a full quota). URLs
    (``s3://...``) are not checked.

    Args:
        folder: the output folder.
        key: the setting that named it, for the message (``trainer.default_root_dir``).

    Raises:
        ValueError: naming the key and the folder when no file can be created there.

    Examples:
        >>> import tempfile
        >>> file = Path(tempfile.mkdtemp()) / "file"
        >>> _ = file.write_text("")
        >>> check_output_dir(file / "out", "--output_dir")
        Traceback (most recent call last):
        ...
        ValueError: `--output_dir`: cannot write to the folder '.../file/out' (a file is in the way). HINT: ...
    """
    if "://" in str(folder):
        return
    target = Path(folder).expanduser().absolute()
    created = [p for p in (target, *target.parents) if not p.exists()]  # deepest first
    try:
        target.mkdir(parents=True, exist_ok=True)
        probe = target / f".lightning_opt_write_probe.{os.getpid()}-{secrets.token_hex(4)}"
        with open(probe, "x"):
            pass
        probe.unlink()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        if isinstance(err, (FileExistsError, NotADirectoryError)):
            reason = "a file is in the way"
        raise ValueError(
            f"`{key}`: cannot write to the folder {str(folder)!r} ({reason}). HINT: give a folder you can create "
            "files in; nothing was run."
        ) from None
    finally:
        for path in created:
            with contextlib.suppress(OSError):
                path.rmdir()


def check_trainer_output_dirs(trainer: Any) -> None:
    """`check_output_dir` on every folder a run of ``trainer`` writes to, before it writes anything.

    Checked: ``trainer.default_root_dir``, each logger's ``save_dir`` and each ``ModelCheckpoint``'s ``dirpath``.

    Raises:
        ValueError: naming the first folder that cannot be written and its key.
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    check_output_dir(trainer.default_root_dir, "trainer.default_root_dir")
    for logger in trainer.loggers:
        save_dir = getattr(logger, "save_dir", None)
        if save_dir is not None:
            check_output_dir(save_dir, f"trainer.logger.init_args.save_dir ({type(logger).__name__})")
    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is not None:
            check_output_dir(callback.dirpath, f"trainer.callbacks ({type(callback).__name__}) init_args.dirpath")
