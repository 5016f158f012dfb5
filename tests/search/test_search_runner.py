from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import optuna
import pytest
import yaml
from rich.console import Console
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from lightning_opt.cli import main as cli_main
from lightning_opt.search import load_search_recipe, run_search


def quiet() -> Console:
    return Console(file=io.StringIO(), width=160)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_search_end_to_end_outputs_and_best_yaml_reproduces(make_recipe, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the refit below writes LightningCLI's config.yaml into the working directory
    recipe = make_recipe(
        search={
            "space": {
                "model.init_args.optimizer.init_args.lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True},
                "model.init_args.backbone_kwargs.channels": {"choices": [[4], [4, 8]]},
            },
            "n_trials": 3,
        }
    )
    console = quiet()
    result = run_search(recipe, console=console)
    run = tmp_path / "run"
    trials = result.study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3
    # each trial has its own TensorBoard run dir and config
    for t in trials:
        tdir = run / "trials" / f"trial_{t.number:04d}"
        assert list(tdir.glob("events.out.tfevents.*")), tdir
        text = (tdir / "config.yaml").read_text()
        assert text.startswith(f"# Trial {t.number} of study"), "config.yaml must stay the trial's recipe"
        cfg = yaml.safe_load(text)
        assert cfg["model"]["init_args"]["backbone_kwargs"]["channels"] == yaml.safe_load(
            t.params["model.init_args.backbone_kwargs.channels"]
        )
        assert "enable_checkpointing" not in cfg["trainer"]  # the recipe as searched; best*.yaml keeps checkpoints
        assert yaml.safe_load((tdir / "run.yaml").read_text())["trainer"]["enable_checkpointing"] is False
        assert not list(tdir.rglob("*.ckpt")), "a trial writes no checkpoint nobody reads"
    rows = read_csv(run / "trials.csv")
    assert len(rows) == 3
    assert {r["state"] for r in rows} == {"COMPLETE"}
    assert all(0.0 <= float(r["outside_training_share"]) < 1.0 for r in rows)
    assert (run / "history.png").stat().st_size > 1000
    # TensorBoard: one run per trial (its curves and its HParams session: searched values, objectives as hp/ metrics)
    # plus the summary run, nothing else
    runs = {Path(root) for root, _, files in os.walk(run) if any("tfevents" in f for f in files)}
    assert runs == {run / "summary"} | {run / "trials" / f"trial_{t.number:04d}" for t in trials}
    for t in trials:
        acc = EventAccumulator(str(run / "trials" / f"trial_{t.number:04d}"))
        acc.Reload()
        tags = acc.PluginTagToContent("hparams")
        assert set(tags) == {"_hparams_/session_start_info", "_hparams_/session_end_info"}  # one session
        content = tags["_hparams_/session_start_info"]
        hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
        assert hparams["model.init_args.optimizer.init_args.lr"].number_value == pytest.approx(
            t.params["model.init_args.optimizer.init_args.lr"]
        )
        assert hparams["state"].string_value == "COMPLETE"
        assert acc.Scalars("hp/val/acc")[0].value == pytest.approx(t.values[0])
        assert "val/acc" in acc.Tags()["scalars"]  # the trial's own curves in the same run
    summary = EventAccumulator(str(run / "summary"))
    summary.Reload()
    assert "search/history" in summary.Tags()["images"]
    out = console.file.getvalue()
    assert "3 trials (3 complete, 0 pruned, 0 failed)" in out
    assert "best config: lightning-opt fit --config" in out

    # best.yaml is a plain recipe that `lightning-opt fit` reproduces
    best = result.best_trials[0]
    assert best.values[0] == max(t.values[0] for t in trials)
    best_yaml = result.best_configs[0]
    assert best_yaml == run / "best.yaml"
    cfg = yaml.safe_load(best_yaml.read_text())
    assert "search" not in cfg
    assert cfg["model"]["init_args"]["optimizer"]["init_args"]["lr"] == pytest.approx(
        best.params["model.init_args.optimizer.init_args.lr"]
    )
    from lightning_opt.recipe import LightningOptCLI

    cli = LightningOptCLI(
        args=[
            "fit",
            "--config",
            str(best_yaml),
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.default_root_dir",
            str(tmp_path / "refit"),
            "--test_after_fit=false",
            "--report.enabled=false",
        ]
    )
    assert float(cli.trainer.callback_metrics["val/acc"]) == pytest.approx(best.values[0], abs=1e-6)


def test_rerun_resumes_up_to_n_trials(make_recipe, tmp_path) -> None:
    recipe = make_recipe(**{"trainer.max_epochs": 1})
    first = run_search(recipe, console=quiet())
    assert len(first.study.trials) == 2
    again = run_search(recipe, console=quiet())  # already done: nothing new runs
    assert len(again.study.trials) == 2
    more = run_search(recipe, ["--search.n_trials=3"], console=quiet())
    assert len(more.study.trials) == 3
    assert [t.number for t in more.study.trials] == [0, 1, 2]


def test_failing_trials_are_recorded_and_search_goes_on(make_recipe, tmp_path) -> None:
    sgd = "torch.optim.SGD"
    recipe = make_recipe(
        search={
            "space": {
                # an infinite SGD step makes the loss NaN; an unknown class fails when the trial's config is parsed
                "model.init_args.optimizer": {
                    "choices": [
                        {"class_path": sgd, "init_args": {"lr": 0.05}},
                        {"class_path": sgd, "init_args": {"lr": float("inf")}},
                        {"class_path": "torch.optim.NoSuchOptimizer"},
                    ]
                },
            },
            "sampler": "grid",
            "n_trials": 3,
        }
    )
    console = quiet()
    result = run_search(recipe, console=console)
    by_choice = {}
    for t in result.study.trials:
        choice = json.loads(t.params["model.init_args.optimizer"])
        by_choice[str(choice.get("init_args", {}).get("lr", choice["class_path"]))] = t
    assert len(by_choice) == 3
    ok, nan, bad = by_choice["0.05"], by_choice["inf"], by_choice["torch.optim.NoSuchOptimizer"]
    assert ok.state == optuna.trial.TrialState.COMPLETE
    assert nan.state == optuna.trial.TrialState.FAIL
    assert nan.user_attrs["fail_reason"].startswith("NonFiniteLossError: training loss is")
    assert bad.state == optuna.trial.TrialState.FAIL
    assert "NoSuchOptimizer" in bad.user_attrs["fail_reason"]
    rows = read_csv(tmp_path / "run" / "trials.csv")
    assert sum(r["state"] == "FAIL" for r in rows) == 2
    assert all(r["fail_reason"] for r in rows if r["state"] == "FAIL")
    assert [t.number for t in result.best_trials] == [ok.number]
    assert f"trial {nan.number} failed" in console.file.getvalue()


def test_median_pruner_stops_hopeless_trials(make_recipe) -> None:
    recipe = make_recipe(
        search={
            "space": {"model.init_args.optimizer.init_args.lr": {"choices": [0.03, 1.0e-7]}},
            "sampler": "grid",
            "seed": 1,  # the seeded grid order runs the good lr first
            "pruner": {"name": "median", "n_startup_trials": 1, "n_warmup_steps": 2},
            "n_trials": 2,
        },
        **{
            "trainer.max_epochs": 5,
            "trainer.limit_train_batches": 10,
            "trainer.limit_val_batches": 2,
            "data.init_args.batch_size": 32,
        },
    )
    result = run_search(recipe, console=quiet())
    states = {t.params["model.init_args.optimizer.init_args.lr"]: t for t in result.study.trials}
    good, bad = states[0.03], states[1e-07]
    assert good.number < bad.number
    assert good.state == optuna.trial.TrialState.COMPLETE
    assert sorted(good.intermediate_values) == [0, 1, 2, 3, 4]  # one report per validation (epoch)
    assert bad.state == optuna.trial.TrialState.PRUNED
    assert bad.user_attrs["steps"] < good.user_attrs["steps"]
    assert len(bad.intermediate_values) < len(good.intermediate_values)


def test_multi_objective_latency_pareto(make_recipe, tmp_path) -> None:
    recipe = make_recipe(
        search={
            "space": {"model.init_args.backbone_kwargs.channels": {"choices": [[4], [16, 32]]}},
            "objectives": [
                {"name": "val/acc", "direction": "maximize"},
                {"name": "latency_ms", "direction": "minimize"},
                {"name": "params", "direction": "minimize"},
            ],
            "sampler": "grid",
            "n_trials": 2,
            "latency": {"repeats": 3, "warmup": 1},
        }
    )
    result = run_search(recipe, console=quiet())
    trials = result.study.trials
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    params = {t.params["model.init_args.backbone_kwargs.channels"]: t.values[2] for t in trials}
    assert params["[4]"] < params["[16, 32]"]  # measured on the trained model
    assert all(t.values[1] > 0 for t in trials)
    assert (tmp_path / "run" / "pareto.png").stat().st_size > 1000
    summary = EventAccumulator(str(tmp_path / "run" / "summary"))
    summary.Reload()
    assert "search/pareto_front" in summary.Tags()["images"]
    assert result.best_configs[0].name == "best.yaml"
    assert len(result.best_configs) == len(result.best_trials) >= 1


def test_bad_input_fails_before_any_trial(make_recipe, tmp_path, capsys) -> None:
    recipe = make_recipe(search={"space": {"model.init_args.optimizer.init_args.lrr": {"low": 1e-3, "high": 1e-1}}})
    with pytest.raises(ValueError, match=r"`model.init_args.optimizer.init_args.lrr` is not a key.*did you mean"):
        run_search(recipe, console=quiet())
    assert not (tmp_path / "run" / "trials").exists()
    assert not (tmp_path / "run" / "study.db").exists()
    # through the command: exit code 2 and the message
    with pytest.raises(SystemExit) as exit_:
        cli_main(["search", "--config", str(recipe)])
    assert exit_.value.code == 2
    assert "is not a key of the recipe" in capsys.readouterr().err

    recipe = make_recipe(search={"space": {"model.init_args.optimizer.init_args.lr": {"low": 0.1, "high": 0.01}}})
    with pytest.raises(ValueError, match="`low` must be <= `high`"):
        run_search(recipe, console=quiet())
    with pytest.raises(ValueError, match="`search.sampler` must be one of"):
        run_search(make_recipe(), ["--search.sampler=bayes"], console=quiet())
    with pytest.raises(ValueError, match="needs a single objective"):
        run_search(make_recipe(), ["--search.pruner=median", "--search.objectives=[val/acc, params]"], console=quiet())
    with pytest.raises(ValueError, match="cannot be reached"):
        run_search(make_recipe(), ["--search.storage=postgresql://x@127.0.0.1:1/db"], console=quiet())
    with pytest.raises(ValueError, match="the recipe does not parse.*max_epochz"):
        run_search(make_recipe(), ["--trainer.max_epochz=1"], console=quiet())
    path = tmp_path / "plain.yaml"
    cfg = yaml.safe_load(make_recipe().read_text())
    cfg.pop("search")
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match="has no `search:` section"):
        load_search_recipe(path)
    assert not (tmp_path / "run" / "trials").exists()


def test_unlogged_objective_stops_the_search(make_recipe) -> None:
    recipe = make_recipe(search={"objectives": ["val/accuracy"], "n_trials": 3})
    with pytest.raises(ValueError, match=r"objective `val/accuracy` is not logged.*did you mean `val/acc`"):
        run_search(recipe, console=quiet())


def test_unlogged_objective_stops_the_search_with_a_trial_pruner(make_recipe, tmp_path) -> None:
    """With a pruner the objective is watched after every validation: a missing one must still stop the search."""
    recipe = make_recipe(search={"objectives": ["val/accuracy"], "n_trials": 4, "pruner": {"name": "median"}})
    with pytest.raises(ValueError, match=r"objective `val/accuracy` is not logged"):
        run_search(recipe, console=quiet())
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{next(tmp_path.rglob('study.db'))}")
    assert len(study.trials) == 1


@pytest.mark.parametrize(
    "edits",
    [
        {"trainer.enable_checkpointing": True},
        {"trainer.callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint"}]},
    ],
    ids=["enable_checkpointing", "ModelCheckpoint"],
)
def test_trial_keeps_checkpointing_the_recipe_asks_for(make_recipe, edits) -> None:
    space = {"model.init_args.optimizer.init_args.lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True}}
    result = run_search(make_recipe(search={"space": space, "n_trials": 1}, **edits), console=quiet())
    trial = result.study.get_trials()[0]
    assert trial.state == optuna.trial.TrialState.COMPLETE, trial.user_attrs.get("fail_reason")
    assert list(Path(trial.user_attrs["trial_dir"]).rglob("*.ckpt")), edits


def test_trial_checkpoints_record_the_sampled_architecture_and_load(make_recipe) -> None:
    """Each trial is built through LightningCLI's public path: its hparams and checkpoint are the sampled values."""
    from lightning_opt.module import ImageClassifier

    channels = [[2, 2, 2], [16], [4, 8]]
    space = {"model.init_args.backbone_kwargs.channels": {"choices": channels}}
    recipe = make_recipe(
        search={"space": space, "sampler": "grid", "n_trials": 3}, **{"trainer.enable_checkpointing": True}
    )
    result = run_search(recipe, console=quiet())
    trials = result.study.get_trials()
    sampled_all = [yaml.safe_load(t.params["model.init_args.backbone_kwargs.channels"]) for t in trials]
    assert sorted(map(json.dumps, sampled_all)) == sorted(map(json.dumps, channels))
    for trial in trials:
        sampled = yaml.safe_load(trial.params["model.init_args.backbone_kwargs.channels"])
        ckpt = next(Path(trial.user_attrs["trial_dir"]).rglob("*.ckpt"))
        model = ImageClassifier.load_from_checkpoint(ckpt, weights_only=True)
        assert model.hparams.backbone_kwargs["channels"] == sampled
        hparams = yaml.safe_load(
            next(
                Path(trial.user_attrs["trial_dir"]).parent.rglob(
                    f"{Path(trial.user_attrs['trial_dir']).name}/hparams.yaml"
                )
            ).read_text()
        )
        assert hparams["backbone_kwargs"]["channels"] == sampled


def test_recipe_numbers_are_read_as_lightningcli_reads_them(make_recipe) -> None:
    """`1e-4` is a float in the `search:` section and in overrides, as everywhere else in a recipe (YAML 1.2)."""
    lr = {"type": "float", "low": "LOW", "high": "HIGH", "log": True}
    recipe = make_recipe(search={"space": {"model.init_args.optimizer.init_args.lr": lr}})
    recipe.write_text(recipe.read_text().replace("LOW", "1e-4").replace("HIGH", "1e-2"))  # as a user types them
    _, config = load_search_recipe(recipe, ["--search.timeout=1e3", "--model.init_args.optimizer.init_args.lr=1e-3"])
    param = next(p for p in config.space.params if p.key == "model.init_args.optimizer.init_args.lr")
    assert (param.low, param.high) == (1e-4, 1e-2)
    assert config.timeout == 1000.0


def test_console_shows_progress_inside_a_trial_and_a_labelled_summary(make_recipe) -> None:
    console = Console(file=io.StringIO(), width=200, force_terminal=True)
    run_search(make_recipe(), console=console)
    out = console.file.getvalue()
    assert "trial 0: epoch" in out and "val/acc=" in out  # the running trial's own line
    for label in ("trial", "state", "val/acc ↑", "train steps", "time (s)", "maximized"):
        assert label in out, label
