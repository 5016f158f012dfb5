from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_opt.cli import COMMANDS, main
from lightning_opt.module import ImageClassifier
from lightning_opt.recipe import build_from_config

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "recipes" / "quickstart.yaml")
SHRINK = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
    "--trainer.enable_progress_bar=false",
    "--report.repeats=2",
]


def test_unknown_config_key_is_named_with_a_suggestion(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_epoch: 3\n")
    with pytest.raises(SystemExit):
        main(["fit", "--config", QUICKSTART, "--config", str(bad)])
    err = capsys.readouterr().err
    assert "trainer.max_epoch" in err and "did you mean 'trainer.max_epochs'" in err
    assert not (tmp_path / "runs").exists()  # failed before training: nothing written


def test_unknown_model_argument_is_named_with_a_suggestion(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["fit", "--config", QUICKSTART, "--model.init_args.backbone_kwarg=3"])
    err = capsys.readouterr().err
    assert "backbone_kwarg" in err and "did you mean 'backbone_kwargs'" in err


def test_bad_callback_value_names_the_allowed_values_without_a_bogus_suggestion(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    gmp = str(REPO / "recipes" / "pruning" / "gmp_digits.yaml")
    with pytest.raises(SystemExit):
        main(["fit", "--config", gmp, "--trainer.callbacks.init_args.remask=fast"])
    err = capsys.readouterr().err
    assert "remask" in err and "'auto', 'foreach', 'compiled'" in err and "Got value: fast" in err
    assert "did you mean" not in err  # the key exists; only its value is wrong
    assert not (tmp_path / "runs").exists()


def test_unknown_backbone_fails_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["fit", "--config", QUICKSTART, "--model.init_args.backbone=resnt18"])
    err = capsys.readouterr().err
    assert "Unknown backbone 'resnt18'" in err and "torchvision.models.list_models" in err
    assert not (tmp_path / "runs").exists()


def test_missing_dataset_root_fails_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", QUICKSTART, "--data=lightning_opt.data.TorchvisionDataModule"]
    with pytest.raises(SystemExit):
        main([*args, f"--data.root={tmp_path / 'mnist'}"])
    err = capsys.readouterr().err
    assert "MNIST files were not found" in err and "download" in err
    assert not (tmp_path / "runs").exists()


def test_default_logger_is_tensorboard_under_runs():
    config = {
        "model": {"class_path": "lightning_opt.module.ImageClassifier"},
        "data": {"class_path": "lightning_opt.data.DigitsDataModule"},
    }
    cli = build_from_config(config)
    assert type(cli.trainer.logger).__name__ == "TensorBoardLogger"
    assert cli.trainer.logger.save_dir == "runs"


def test_help_lists_extra_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


def test_build_from_config_validates_like_fit():
    cli = build_from_config(["--config", QUICKSTART, "--trainer.logger=false", "--model.init_args.num_classes=3"])
    assert cli.model.hparams.num_classes == 3 and cli.trainer.max_epochs == 20


def test_console_script_quickstart_then_resume_and_report(tmp_path, monkeypatch):
    """A new user's path: run the recipe with the console script, then measure its checkpoint with `report`."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "lightning_opt", "fit", "--config", QUICKSTART, *SHRINK]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "runs" / "quickstart" / "version_0"
    listed = done.stdout[done.stdout.index("Written by this run:") :]  # fit ends by saying where each file went
    for name in ("report.md", "last.ckpt", "config.yaml"):
        assert "runs/quickstart/version_0/" in listed and name in listed, listed
    data = json.loads((run_dir / "report.json").read_text())
    assert {"baseline", "final"} <= set(data["stages"]) and "test/acc" in data["stages"]["final"]
    assert (run_dir / "config.yaml").exists()

    ckpt = next((run_dir / "checkpoints").glob("last.ckpt"))
    restored = ImageClassifier.load_from_checkpoint(ckpt)  # loads for inference without the recipe
    assert restored.hparams.backbone == "small_cnn"
    resumed = [*SHRINK, "--trainer.max_epochs=2", f"--ckpt_path={ckpt}", "--test_after_fit=false"]
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", QUICKSTART, *resumed])  # the run resumes from its checkpoint (weights_only load)
    assert (tmp_path / "runs" / "quickstart" / "version_1" / "report.json").exists()
    out_dir = tmp_path / "measured"
    (tmp_path / "measured-from-here").mkdir()
    monkeypatch.chdir(tmp_path / "measured-from-here")
    main(["report", "--ckpt_path", str(ckpt), "--config", QUICKSTART, "--output_dir", str(out_dir), *SHRINK])
    measured = json.loads((out_dir / "report_last.json").read_text())["stages"]["checkpoint"]
    assert list((tmp_path / "measured-from-here").iterdir()) == []  # the report command leaves nothing behind
    assert measured["params"] == data["stages"]["final"]["params"]
    assert measured["test/acc"] == pytest.approx(data["stages"]["final"]["test/acc"])

    # without --output_dir the report lands in the run's folder under its own name: fit's report is kept
    fit_report = (run_dir / "report.json").read_text()
    main(["report", "--ckpt_path", str(ckpt), "--config", QUICKSTART, "--no_test", *SHRINK])
    assert (run_dir / "report.json").read_text() == fit_report
    assert (run_dir / "report_last.md").exists() and "checkpoint" in (run_dir / "report_last.md").read_text()


def test_report_command_rejects_missing_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["report", "--ckpt_path", str(tmp_path / "nope.ckpt"), "--config", QUICKSTART])
    assert "nope.ckpt" in capsys.readouterr().err
