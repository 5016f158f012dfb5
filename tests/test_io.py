"""Atomic files: a writer that fails part-way (a full disk, an object that cannot be pickled) leaves the previous file
intact, or no file under the final name, and no temporary file; output folders are checked before a run.

A full disk is simulated by giving :mod:`lightning_opt._io` an ``open`` whose files take 100 bytes and then raise
``ENOSPC``, as a real full disk does; writers that open the file themselves (``torch.export.save``, the ONNX
exporters) get a stand-in that writes a few bytes and raises.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from torch import nn

from lightning_opt import _io
from lightning_opt._io import (
    AtomicCheckpointIO,
    atomic_save,
    atomic_write,
    check_output_dir,
    use_atomic_checkpoints,
)

ENOSPC = OSError(errno.ENOSPC, "No space left on device")
#: torch.save's zip writer turns the ENOSPC of its stream into a RuntimeError when it closes the archive.
DISK_FULL = (OSError, RuntimeError)


class _FillingFile:
    """A file that takes ``room`` bytes, writes the part that fits and raises ``ENOSPC``: a disk filling up."""

    def __init__(self, fh: Any, room: int) -> None:
        self._fh, self._room = fh, room

    def write(self, data: Any) -> int:
        if len(data) > self._room:
            self._fh.write(data[: self._room])
            self._fh.flush()
            self._room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self._room -= len(data)
        return self._fh.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)

    def __enter__(self) -> _FillingFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._fh.close()


@pytest.fixture
def full_disk(monkeypatch):
    """From now on, files written through ``lightning_opt._io`` fill the disk after 100 bytes."""

    def filling_open(path: Any, mode: str = "r", **kwargs: Any) -> _FillingFile:
        return _FillingFile(open(path, mode, **kwargs), room=100)

    def enable() -> None:
        monkeypatch.setattr(_io, "open", filling_open, raising=False)

    return enable


def _partial_writer(path_arg: int):
    """A stand-in for an exporter that opens its own file: it writes some bytes to its path argument, then fails."""

    def write(*args: Any, **kwargs: Any) -> None:
        Path(args[path_arg]).write_bytes(b"partial")
        raise ENOSPC

    return write


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _assert_intact(path: Path, before: bytes | None) -> None:
    """``path`` holds ``before`` (or is absent when ``before`` is None) and its folder holds no temporary file."""
    if before is None:
        assert not path.exists(), f"a failed write left {path.name}"
    else:
        assert path.read_bytes() == before, f"a failed write changed {path.name}"
    leftovers = [name for name in _names(path.parent) if ".tmp" in name]
    assert not leftovers, f"temporary files left behind: {leftovers}"


# --------------------------------------------------------------------------------------------------- the helper
def test_atomic_write_replaces_a_file(tmp_path) -> None:
    target = tmp_path / "sub" / "a.txt"
    with atomic_write(target) as fh:
        fh.write("one")
    with atomic_write(target) as fh:
        fh.write("two")
    assert target.read_text() == "two"
    assert _names(target.parent) == ["a.txt"]


def test_atomic_write_keeps_the_old_file_on_a_full_disk(tmp_path, full_disk) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old")
    full_disk()
    with pytest.raises(OSError, match="No space"), atomic_write(target) as fh:
        fh.write("x" * 1000)
    _assert_intact(target, b"old")


def test_atomic_write_leaves_no_file_when_the_writer_raises(tmp_path) -> None:
    target = tmp_path / "new.txt"

    def write_half() -> None:
        with atomic_write(target) as fh:
            fh.write("half")
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_half()
    _assert_intact(target, None)


def test_atomic_save_of_an_unpicklable_object_keeps_the_old_file(tmp_path) -> None:
    target = tmp_path / "w.pt"
    atomic_save({"w": torch.ones(2)}, target)
    before = target.read_bytes()
    with pytest.raises(Exception, match="pickle"):
        atomic_save({"w": torch.zeros(1000), "f": lambda: 0}, target)
    _assert_intact(target, before)


def test_atomic_write_refuses_append_mode(tmp_path) -> None:
    with pytest.raises(ValueError, match="`mode`"), atomic_write(tmp_path / "a.txt", "a"):
        pass


# --------------------------------------------------------------------------------------------------- checkpoints
def _trainer(root: Path, epochs: int, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        limit_train_batches=2,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=[ModelCheckpoint(dirpath=root / "ckpts", save_last=True)],
        **kwargs,
    )


def test_checkpoint_of_a_real_trainer_survives_a_full_disk(tmp_path, full_disk) -> None:
    _trainer(tmp_path, 1, plugins=[AtomicCheckpointIO()]).fit(BoringModel())
    folder = tmp_path / "ckpts"
    last = folder / "last.ckpt"
    names, before = _names(folder), last.read_bytes()
    full_disk()
    trainer = _trainer(tmp_path, 2, plugins=[AtomicCheckpointIO()])
    with pytest.raises(DISK_FULL):
        trainer.fit(BoringModel(), ckpt_path=last)
    assert trainer.global_step == 4, "the second epoch ran; its checkpoint is the one that failed"
    _assert_intact(last, before)
    assert _names(folder) == names, "no checkpoint of the failed save under its own name"
    assert torch.load(last, weights_only=True)["global_step"] == 2


def test_the_cli_trainer_writes_checkpoints_atomically(tmp_path) -> None:
    from lightning_opt.recipe import build_from_config

    config = {
        "model": {"class_path": "lightning.pytorch.demos.boring_classes.BoringModel"},
        "data": {"class_path": "lightning.pytorch.demos.boring_classes.BoringDataModule"},
        "trainer": {"logger": False, "enable_progress_bar": False, "default_root_dir": str(tmp_path)},
    }
    cli = build_from_config(config, save_config_callback=None)
    assert type(cli.trainer.strategy.checkpoint_io) is AtomicCheckpointIO


def test_a_chosen_checkpoint_plugin_is_kept(tmp_path) -> None:
    class MyIO(TorchCheckpointIO):
        pass

    trainer = use_atomic_checkpoints(_trainer(tmp_path, 1, plugins=[MyIO()]))
    assert type(trainer.strategy.checkpoint_io) is MyIO
    assert type(use_atomic_checkpoints(_trainer(tmp_path, 1)).strategy.checkpoint_io) is AtomicCheckpointIO


# --------------------------------------------------------------------------------------------------- other writers
def test_report_survives_a_full_disk(tmp_path, full_disk) -> None:
    from lightning_opt.reporting import CompressionReport

    report = CompressionReport()
    report.stages = {"baseline": {"params": 10}}
    report.write(output_dir=tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in ("report.json", "report.md")}
    report.stages["pruned"] = {"params": 5}
    full_disk()
    with pytest.raises(OSError, match="No space"):
        report.write(output_dir=tmp_path)
    for name, content in before.items():
        _assert_intact(tmp_path / name, content)


def test_pruned_model_survives_a_full_disk(tmp_path, full_disk) -> None:
    from lightning_opt.pruning import save_pruned

    path = tmp_path / "pruned_model.pt"
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 2))
    save_pruned(model, path)
    before = path.read_bytes()
    full_disk()
    with pytest.raises(DISK_FULL):
        save_pruned(model, path)
    _assert_intact(path, before)


def test_student_checkpoint_survives_a_full_disk(tmp_path, full_disk) -> None:
    from lightning_opt.distillation import DistillationModule
    from lightning_opt.module import ImageClassifier

    model = DistillationModule(
        student=ImageClassifier("mlp", backbone_kwargs={"hidden": [16]}), teacher=ImageClassifier("small_cnn")
    )
    path = tmp_path / "student.ckpt"
    model.export_student(str(path))
    before = path.read_bytes()
    full_disk()
    with pytest.raises(DISK_FULL):
        model.export_student(str(path))
    _assert_intact(path, before)


def test_int8_state_survives_a_full_disk(tmp_path, full_disk) -> None:
    from lightning_opt.quantization import _linear

    path = tmp_path / "int8.pt"
    _linear.save_state(nn.Linear(64, 64), path, "int8_weight_only", [])
    before = path.read_bytes()
    full_disk()
    with pytest.raises(DISK_FULL):
        _linear.save_state(nn.Linear(64, 64), path, "int8_weight_only", [])
    _assert_intact(path, before)


@pytest.mark.parametrize("module", ["_pt2e", "_linear"])
def test_pt2_artifact_is_absent_after_a_failed_save(tmp_path, monkeypatch, module) -> None:
    import importlib

    save_artifact = importlib.import_module(f"lightning_opt.quantization.{module}").save_artifact
    monkeypatch.setattr(torch.export, "save", _partial_writer(1))
    path = tmp_path / "model.int8.pt2"
    with pytest.raises(OSError, match="No space"):
        save_artifact(nn.Sequential(nn.Linear(4, 2)), torch.zeros(1, 4), path)
    _assert_intact(path, None)


def test_onnx_files_are_absent_after_a_failed_export(tmp_path, monkeypatch) -> None:
    import onnxruntime.quantization

    from lightning_opt.quantization import export_onnx, quantize_onnx

    model = nn.Sequential(nn.Linear(4, 2))
    fp32 = tmp_path / "model.onnx"
    export_onnx(model, torch.zeros(1, 4), fp32)  # real: the int8 step below needs it
    before = fp32.read_bytes()
    monkeypatch.setattr(onnxruntime.quantization, "quantize_static", _partial_writer(1))
    int8 = tmp_path / "model.int8.onnx"
    with pytest.raises(OSError, match="No space"):
        quantize_onnx(fp32, int8, [(torch.zeros(1, 4), torch.zeros(1))], num_batches=1)
    _assert_intact(int8, None)
    monkeypatch.setattr(torch.onnx, "export", _partial_writer(2))
    with pytest.raises(OSError, match="No space"):
        export_onnx(model, torch.zeros(1, 4), fp32)
    _assert_intact(fp32, before)


def test_search_outputs_survive_a_full_disk(tmp_path, full_disk) -> None:
    import optuna

    from lightning_opt.search._outputs import write_outputs
    from lightning_opt.search._spec import SearchConfig

    cfg = SearchConfig.from_dict(
        {
            "objectives": [{"name": "val/acc", "direction": "maximize"}],
            "space": {"model.lr": {"type": "float", "low": 0.001, "high": 0.1}},
            "run_dir": str(tmp_path / "search"),
        }
    )
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda trial: cfg.space.sample(trial)["model.lr"], n_trials=2)
    recipe = {"model": {"lr": 0.01}}
    write_outputs(study, cfg, recipe)
    files = [cfg.run_dir / "best.yaml", cfg.run_dir / "trials.csv"]
    before = [f.read_bytes() for f in files]
    study.optimize(lambda trial: cfg.space.sample(trial)["model.lr"] + 1.0, n_trials=1)  # a new best
    full_disk()
    with pytest.raises(OSError, match="No space"):
        write_outputs(study, cfg, recipe)
    for file, content in zip(files, before):
        _assert_intact(file, content)


# --------------------------------------------------------------------------------------------------- output folders
def test_output_dir_check_leaves_nothing_behind(tmp_path) -> None:
    check_output_dir(tmp_path / "a" / "b" / "c", "out")
    assert _names(tmp_path) == []
    (tmp_path / "kept").mkdir()
    check_output_dir(tmp_path / "kept", "out")
    assert _names(tmp_path) == ["kept"]
    assert _names(tmp_path / "kept") == []


def test_output_dir_under_a_file_is_refused(tmp_path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"`my.key`: cannot write to the folder '.*file/out' \(a file is in the way\)"):
        check_output_dir(tmp_path / "file" / "out", "my.key")
    assert _names(tmp_path) == ["file"]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_dir_is_refused(tmp_path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(ValueError, match="Permission denied"):
            check_output_dir(folder / "out", "trainer.default_root_dir")
    finally:
        folder.chmod(0o700)
