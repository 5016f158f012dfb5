"""The bad-input corpus: every wrong input ends with one clear message, exit code 2, no traceback, nothing on disk.

Each case runs the real ``lightning-opt`` entry point in-process from an empty folder and asserts what a user sees:
the exit code, that the message names the offending key, value or file, that no traceback is printed, and that the
folder holds nothing new afterwards (no ``runs/<name>/version_N``, no partial file).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lightning_opt.cli import main

REPO = Path(__file__).resolve().parents[1]
QUICK = str(REPO / "recipes" / "quickstart.yaml")
GMP = str(REPO / "recipes" / "pruning" / "gmp_digits.yaml")
NM = str(REPO / "recipes" / "pruning" / "nm_2_4.yaml")
CHANNEL = str(REPO / "recipes" / "pruning" / "channel_resnet.yaml")
QAT = str(REPO / "recipes" / "quantization" / "qat_digits.yaml")
DISTILL = str(REPO / "recipes" / "distillation" / "distill_digits.yaml")
HPO = str(REPO / "recipes" / "search" / "hpo_digits.yaml")
SMALL = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]

PRUNE = "--trainer.callbacks.init_args."
SCHEDULE = PRUNE + "schedule.init_args."

# (id, argv, substrings the message must hold). "{tmp}" is the empty working folder; the files below exist there.
CASES: list[tuple[str, list[str], list[str]]] = [
    # --- keys and values of a recipe, on the command line
    ("misspelt trainer key", ["fit", "--config", QUICK, "--trainer.max_epoch=1"], ["trainer.max_epoch", "max_epochs"]),
    ("abbreviated key", ["fit", "--config", QUICK, "--trainer.max_ep=1"], ["trainer.max_ep"]),
    ("misspelt model arg", ["fit", "--config", QUICK, "--model.init_args.backbone_kwarg=3"], ["backbone_kwargs"]),
    ("misspelt data arg", ["fit", "--config", QUICK, "--data.init_args.batchsize=3"], ["batchsize", "batch_size"]),
    ("epochs not a number", ["fit", "--config", QUICK, "--trainer.max_epochs=abc"], ["max_epochs", "abc"]),
    ("unknown backbone", ["fit", "--config", QUICK, "--model.init_args.backbone=resnt18"], ["resnt18"]),
    ("unknown optimizer", ["fit", "--config", QUICK, "--model.init_args.optimizer=torch.optim.Adamm"], ["Adamm"]),
    ("batch size zero", ["fit", "--config", QUICK, "--data.init_args.batch_size=0"], ["batch_size", "0"]),
    ("val fraction 1.5", ["fit", "--config", QUICK, "--data.init_args.val_size=1.5"], ["val_size", "1.5"]),
    ("image size zero", ["fit", "--config", QUICK, "--data.init_args.image_size=0"], ["image_size", "0"]),
    ("channels not ints", ["fit", "--config", QUICK, "--model.init_args.backbone_kwargs.channels=abc"], ["abc"]),
    ("unknown report key", ["fit", "--config", QUICK, "--report.repeat=2"], ["report.repeat", "report.repeats"]),
    ("unknown data class", ["fit", "--config", QUICK, "--data=lightning_opt.data.NoSuchData"], ["NoSuchData"]),
    ("unknown logger class", ["fit", "--config", QUICK, "--trainer.logger=nosuch.Logger"], ["nosuch.Logger"]),
    ("unknown accelerator", ["fit", "--config", QUICK, "--trainer.accelerator=tpuu"], ["tpuu"]),
    # --- pruning
    ("sparsity 1.5", ["fit", "--config", GMP, SCHEDULE + "final=1.5"], ["schedule.final", "1.5"]),
    ("sparsity negative", ["fit", "--config", GMP, SCHEDULE + "final=-0.1"], ["schedule.final", "-0.1"]),
    ("unknown granularity", ["fit", "--config", GMP, PRUNE + "granularity=block"], ["granularity", "block"]),
    ("unknown criterion", ["fit", "--config", GMP, PRUNE + "criterion=l3"], ["criterion", "l3"]),
    ("unknown scope", ["fit", "--config", GMP, PRUNE + "scope=world"], ["scope", "world"]),
    ("unknown remask", ["fit", "--config", GMP, PRUNE + "remask=fast"], ["remask", "fast"]),
    ("bad include regex", ["fit", "--config", GMP, PRUNE + "include=("], ["include", "("]),
    ("include matches nothing", ["fit", "--config", GMP, *SMALL, PRUNE + "include=nomatch"], ["nomatch"]),
    ("override sparsity 2", ["fit", "--config", GMP, PRUNE + "overrides={features: 2.0}"], ["overrides", "2.0"]),
    ("remove without channel", ["fit", "--config", GMP, PRUNE + "remove_channels=true"], ["remove_channels"]),
    ("n:m with n >= m", ["fit", "--config", NM, PRUNE + "n=4"], ["n", "4"]),
    ("bad input shape", ["fit", "--config", CHANNEL, PRUNE + "example_input_shape=[0,3]"], ["example_input_shape"]),
    # --- quantization
    ("qat unknown dtype", ["fit", "--config", QAT, "--config", "{tmp}/qat_dtype.yaml"], ["dtype", "int4"]),
    ("qat start 1.5", ["fit", "--config", QAT, "--config", "{tmp}/qat_start.yaml"], ["start", "1.5"]),
    ("qat unknown module", ["fit", "--config", QAT, *SMALL, "--config", "{tmp}/qat_module.yaml"], ["nosuch"]),
    ("qat skip matches nothing", ["fit", "--config", QAT, *SMALL, "--config", "{tmp}/qat_skip.yaml"], ["zzz"]),
    ("qat unknown key", ["fit", "--config", QAT, "--config", "{tmp}/qat_key.yaml"], ["strat", "start"]),
    # --- distillation
    (
        "missing teacher checkpoint",
        ["fit", "--config", DISTILL, "--model.init_args.teacher_checkpoint={tmp}/none.ckpt"],
        ["none.ckpt"],
    ),
    ("alpha 2", ["fit", "--config", DISTILL, "--model.init_args.alpha=2"], ["alpha", "2"]),
    ("temperature 0", ["fit", "--config", DISTILL, "--model.init_args.temperature=0"], ["temperature", "0"]),
    # --- files: recipe and checkpoint
    ("missing recipe", ["fit", "--config", "{tmp}/nope.yaml"], ["nope.yaml"]),
    ("recipe syntax error", ["fit", "--config", "{tmp}/broken.yaml"], ["broken.yaml", "line 3"]),
    ("recipe is a list", ["fit", "--config", "{tmp}/list.yaml"], ["list.yaml", "mapping"]),
    ("search recipe syntax error", ["search", "--config", "{tmp}/broken.yaml"], ["broken.yaml", "line 3"]),
    ("recipe unknown top key", ["fit", "--config", QUICK, "--config", "{tmp}/extra_key.yaml"], ["trainr"]),
    ("missing checkpoint", ["fit", "--config", QUICK, "--ckpt_path", "{tmp}/none.ckpt"], ["none.ckpt"]),
    ("text as checkpoint", ["fit", "--config", QUICK, "--ckpt_path", "{tmp}/text.ckpt"], ["text.ckpt", "checkpoint"]),
    ("truncated checkpoint", ["fit", "--config", QUICK, "--ckpt_path", "{tmp}/trunc.ckpt"], ["trunc.ckpt"]),
    ("folder as checkpoint", ["fit", "--config", QUICK, "--ckpt_path", "{tmp}/folder"], ["folder", "not a file"]),
    ("code in checkpoint", ["fit", "--config", QUICK, "--ckpt_path", "{tmp}/evil.ckpt"], ["evil.ckpt", "run code"]),
    ("tensor not checkpoint", ["fit", "--config", QUICK, "--ckpt_path", "{tmp}/tensor.ckpt"], ["state_dict"]),
    ("validate missing ckpt", ["validate", "--config", QUICK, "--ckpt_path", "{tmp}/none.ckpt"], ["none.ckpt"]),
    ("test missing ckpt", ["test", "--config", QUICK, "--ckpt_path", "{tmp}/none.ckpt"], ["none.ckpt"]),
    # --- search
    ("search missing recipe", ["search", "--config", "{tmp}/nope.yaml"], ["nope.yaml"]),
    ("search n_trials abc", ["search", "--config", HPO, "--search.n_trials=abc"], ["n_trials", "abc"]),
    ("search unknown sampler", ["search", "--config", HPO, "--search.sampler=annealing"], ["sampler", "annealing"]),
    ("search unknown key", ["search", "--config", HPO, "--search.n_trial=3"], ["n_trial"]),
    ("search unknown pruner", ["search", "--config", HPO, "--search.pruner=sometimes"], ["pruner", "sometimes"]),
    ("search unknown override", ["search", "--config", HPO, "--trainer.max_epoch=1"], ["trainer.max_epoch"]),
    (
        "search unreachable storage",
        ["search", "--config", HPO, "--search.storage=postgresql://u:hunter2@127.0.0.1:1/db"],
        ["storage", "***"],
    ),
    ("search no search section", ["search", "--config", QUICK], ["search"]),
    # --- report / export
    ("report missing ckpt", ["report", "--ckpt_path", "{tmp}/none.ckpt", "--config", QUICK], ["none.ckpt"]),
    (
        "report code in checkpoint",
        ["report", "--ckpt_path", "{tmp}/evil.ckpt", "--config", QUICK],
        ["evil.ckpt", "run code"],
    ),
    ("export code in checkpoint", ["export", "--config", QAT, "--ckpt_path", "{tmp}/evil.ckpt"], ["run code"]),
    (
        "teacher code in checkpoint",
        ["fit", "--config", DISTILL, "--model.init_args.teacher_checkpoint={tmp}/evil.ckpt"],
        ["teacher_checkpoint", "evil.ckpt", "run code"],
    ),
    ("report no config", ["report", "--ckpt_path", "{tmp}/good.ckpt"], ["--config"]),
    ("widths not ints", ["fit", "--config", QUICK, "--model.init_args.backbone_kwargs.channels=[8,x]"], ["channels"]),
    ("export unknown format", ["export", "--config", QAT, "--format", "tflite"], ["format", "tflite"]),
    ("export missing ckpt", ["export", "--config", QAT, "--ckpt_path", "{tmp}/none.ckpt"], ["none.ckpt"]),
    ("export bad batches", ["export", "--config", QAT, "--calibration_batches", "x"], ["calibration_batches", "x"]),
    ("unknown command", ["fitt", "--config", QUICK], ["fitt"]),
    # --- output folders that cannot be written: found before anything is built or trained. A folder under a regular
    # file ({tmp}/text.ckpt/...) cannot be created even by root, whom permission bits do not stop.
    (
        "root dir under a file",
        ["fit", "--config", QUICK, *SMALL, "--trainer.default_root_dir={tmp}/text.ckpt/out"],
        ["trainer.default_root_dir", "text.ckpt/out", "a file is in the way"],
    ),
    (
        "root dir is a file",
        ["fit", "--config", QUICK, *SMALL, "--trainer.default_root_dir={tmp}/text.ckpt"],
        ["trainer.default_root_dir", "text.ckpt"],
    ),
    (
        "logger dir under a file",
        ["fit", "--config", QUICK, *SMALL, "--trainer.logger.init_args.save_dir={tmp}/text.ckpt/runs"],
        ["trainer.logger.init_args.save_dir", "text.ckpt/runs"],
    ),
    (
        "checkpoint dir under a file",
        ["fit", "--config", QUICK, *SMALL, "--config", "{tmp}/ckpt_dir.yaml"],
        ["ModelCheckpoint", "dirpath", "text.ckpt/ckpts"],
    ),
    (
        "search run_dir under a file",
        ["search", "--config", HPO, "--search.run_dir={tmp}/text.ckpt/search"],
        ["search.run_dir", "text.ckpt/search"],
    ),
    (
        "search storage under a file",
        ["search", "--config", HPO, "--search.storage=sqlite:///{tmp}/text.ckpt/study.db"],
        ["search.storage", "text.ckpt"],
    ),
    (
        "report output under a file",
        ["report", "--ckpt_path", "{tmp}/good.ckpt", "--config", QUICK, "--output_dir", "{tmp}/text.ckpt/out"],
        ["--output_dir", "text.ckpt/out"],
    ),
    (
        "export output under a file",
        ["export", "--config", QAT, "--output", "{tmp}/text.ckpt/model.int8.pt2"],
        ["output", "text.ckpt"],
    ),
]


def _fixtures(folder: Path) -> None:
    """The bad files the cases name: a YAML syntax error, a key typo, unreadable and malicious checkpoints."""
    (folder / "broken.yaml").write_text("trainer:\n  max_epochs: [1, 2\n")
    (folder / "extra_key.yaml").write_text("trainr:\n  max_epochs: 1\n")
    (folder / "list.yaml").write_text("- 1\n- 2\n")
    qat = "trainer:\n  callbacks:\n    - class_path: lightning_opt.quantization.QuantizationAwareTraining\n"
    for name, args in {
        "dtype": "dtype: int4",
        "start": "start: 1.5",
        "module": "module: nosuch",
        "skip": "skip: [zzz]",
    }.items():
        (folder / f"qat_{name}.yaml").write_text(qat + f"      init_args:\n        {args}\n")
    (folder / "qat_key.yaml").write_text(qat + "      init_args:\n        strat: 0.5\n")
    (folder / "text.ckpt").write_text("not a checkpoint")
    (folder / "ckpt_dir.yaml").write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        f"      init_args:\n        dirpath: {folder / 'text.ckpt' / 'ckpts'}\n"
    )
    (folder / "folder").mkdir()
    torch.save({"state_dict": {"w": torch.zeros(2)}}, folder / "good.ckpt")
    (folder / "trunc.ckpt").write_bytes((folder / "good.ckpt").read_bytes()[:200])
    torch.save(torch.zeros(3), folder / "tensor.ckpt")
    torch.save({"state_dict": {}, "payload": _Payload(str(folder / "PAYLOAD_RAN"))}, folder / "evil.ckpt")


class _Payload:
    """Unpickling this runs ``open(path, "w")``: the file appears only if a loader ran code from the checkpoint."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (self.path, "w"))


def _snapshot(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.parametrize(("argv", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_message(argv, expected, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LIGHTNING_OPT_DEBUG", raising=False)
    _fixtures(tmp_path)
    before = _snapshot(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2, err
    assert "Traceback" not in out + err
    assert "error:" in err
    for part in expected:
        assert part in err, f"{part!r} not in the message:\n{err}"
    assert len(err.splitlines()) <= 8, f"one message, not a dump:\n{err}"
    assert not (tmp_path / "PAYLOAD_RAN").exists()
    assert _snapshot(tmp_path) == before, "a failed run left files behind"


def test_debug_shows_the_traceback(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LIGHTNING_OPT_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match=r"none\.ckpt"):
        main(["fit", "--config", QUICK, "--ckpt_path", str(tmp_path / "none.ckpt")])


def test_corpus_is_large() -> None:
    assert len(CASES) >= 60
    assert {c[1][0] for c in CASES} >= {"fit", "search", "report", "export"}
    assert os.path.basename(QUICK) == "quickstart.yaml"
