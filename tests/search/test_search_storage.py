"""Storage: a dead worker's trial is failed by its heartbeat and re-run; workers share one study on PostgreSQL."""

from __future__ import annotations

import csv
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from rich.console import Console

from lightning_opt.search import counted_trials, run_search
from lightning_opt.search._spec import _postgres_driver

REPO_ROOT = Path(__file__).resolve().parents[2]


def _worker(recipe: Path, env: dict[str, str]) -> subprocess.Popen:
    """A search worker in its own process, as a user starts one: `lightning-opt search --config RECIPE`."""
    return subprocess.Popen(
        [sys.executable, "-m", "lightning_opt", "search", "--config", str(recipe)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _load(storage: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=_postgres_driver(storage))


def test_killed_worker_trial_is_failed_and_retried(make_recipe, tmp_path, subprocess_env) -> None:
    recipe = make_recipe(
        search={
            "space": {"model.init_args.optimizer.init_args.lr": {"low": 1e-3, "high": 3e-2, "log": True}},
            "n_trials": 1,
            "heartbeat_interval": 1,
            "grace_period": 3,
        },
        **{"trainer.max_epochs": 40, "trainer.limit_train_batches": 4},
    )
    storage = f"sqlite:///{tmp_path / 'run' / 'study.db'}"
    worker = _worker(recipe, subprocess_env)
    try:
        deadline = time.time() + 120
        running = None
        while time.time() < deadline and running is None:  # wait until the trial trains (its TensorBoard dir fills)
            time.sleep(0.5)
            assert worker.poll() is None, "the worker ended before it could be killed"
            if not (tmp_path / "run" / "study.db").exists():
                continue
            try:
                trials = _load(storage, "tiny").get_trials(states=(optuna.trial.TrialState.RUNNING,))
            except Exception:  # the study is not created yet
                continue
            for t in trials:
                tdir = Path(t.user_attrs.get("trial_dir", "/nonexistent"))
                if list(tdir.glob("events.out.tfevents.*")):
                    running = t
        assert running is not None, "no trial started training in time"
        os.kill(worker.pid, signal.SIGKILL)  # a dead worker: no exception handler, no tell
        worker.wait(timeout=30)
    finally:
        if worker.poll() is None:
            os.kill(worker.pid, signal.SIGKILL)
            worker.wait(timeout=30)
    assert _load(storage, "tiny").trials[running.number].state == optuna.trial.TrialState.RUNNING

    # rerunning the command resumes: the dead trial goes stale, is failed and re-queued with the same params
    result = run_search(recipe, ["--trainer.max_epochs=2"], console=Console(file=io.StringIO()))
    trials = result.study.trials
    dead = trials[running.number]
    assert dead.state == optuna.trial.TrialState.FAIL
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == running.number]
    assert len(retried) == 1
    assert retried[0].state == optuna.trial.TrialState.COMPLETE
    assert retried[0].params == running.params
    counted = counted_trials(trials)
    assert [t.number for t in counted] == [retried[0].number]  # the budget of 1 is met once, by the retry
    # trials.csv says why the dead trial failed and which trial took its place
    rows = {int(r["number"]): r for r in csv.DictReader(result.files["csv"].open())}
    assert rows[dead.number]["fail_reason"].startswith("worker lost:")
    assert rows[dead.number]["fail_reason"].endswith(f"retried as trial {retried[0].number}")


@pytest.mark.postgres
def test_two_workers_share_a_postgres_study(make_recipe, postgres_url, subprocess_env, tmp_path) -> None:
    n_trials = 4
    recipe = make_recipe(
        search={"n_trials": n_trials, "storage": postgres_url, "study_name": "shared", "sampler": "random"}
    )
    cmd = [sys.executable, "-m", "lightning_opt", "search", "--config", str(recipe)]
    workers = [
        subprocess.Popen(
            cmd, cwd=REPO_ROOT, env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    outputs = [w.communicate(timeout=240)[0] for w in workers]
    for w, out in zip(workers, outputs):
        assert w.returncode == 0, out[-3000:]
    study = _load(postgres_url, "shared")
    trials = study.trials
    counted = counted_trials(trials)
    # no trial lost: exactly n_trials finished, all complete
    assert len(counted) == n_trials
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in counted)
    # none run twice: distinct numbers, each trained once in its own run dir, by one worker
    assert len({t.number for t in counted}) == n_trials
    for t in counted:
        events = list(Path(t.user_attrs["trial_dir"]).glob("events.out.tfevents.*"))
        assert len(events) == 1, t.user_attrs["trial_dir"]
    # a trial dropped because the other worker took the last slot first never trained
    for t in trials:
        if t.user_attrs.get("skipped"):
            assert "trial_dir" not in t.user_attrs
    # both workers took trials from the shared study
    assert len({t.user_attrs["worker"] for t in counted}) == 2
    # the seed gives each trial number its own draw: the two workers did not repeat each other
    assert len({t.params["model.init_args.optimizer.init_args.lr"] for t in counted}) == n_trials


def test_killed_trial_resumes_from_its_checkpoint_bitwise(make_recipe, tmp_path, subprocess_env) -> None:
    """A trial whose worker is killed after a checkpoint is re-run from that checkpoint and ends bitwise equal to the
    same trial run without interruption."""
    import torch

    from lightning_opt.recipe import build_from_config

    ckpt_cb = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"save_last": True, "every_n_epochs": 1},
    }
    recipe = make_recipe(
        search={
            "space": {"model.init_args.optimizer.init_args.lr": {"low": 1e-3, "high": 3e-2, "log": True}},
            "n_trials": 1,
            "heartbeat_interval": 1,
            "grace_period": 3,
        },
        **{"trainer.max_epochs": 30, "trainer.limit_train_batches": 4, "trainer.callbacks": [ckpt_cb]},
    )
    worker = _worker(recipe, subprocess_env)
    try:
        deadline, dead_dir = time.time() + 180, None
        while time.time() < deadline and dead_dir is None:  # wait for the trial's first last.ckpt
            time.sleep(0.2)
            assert worker.poll() is None, "the worker ended before it could be killed"
            found = list((tmp_path / "run" / "trials").rglob("last.ckpt"))
            if found:
                dead_dir = found[0]
        assert dead_dir is not None, "no trial wrote a checkpoint in time"
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)
    finally:
        if worker.poll() is None:
            os.kill(worker.pid, signal.SIGKILL)
            worker.wait(timeout=30)
    killed_at = torch.load(dead_dir, map_location="cpu", weights_only=True)["global_step"]

    result = run_search(recipe, console=Console(file=io.StringIO()))
    retried = next(t for t in result.study.trials if "failed_trial" in t.system_attrs)
    assert retried.state == optuna.trial.TrialState.COMPLETE
    assert retried.user_attrs["resumed_from"].endswith("last.ckpt")
    assert retried.user_attrs["steps"] == 30 * 4 and 0 < killed_at < 30 * 4
    resumed = torch.load(next(Path(retried.user_attrs["trial_dir"]).rglob("last.ckpt")), weights_only=True)

    # the same trial without interruption: its run.yaml (the dead trial's) built and fit from the start
    dead_trial_dir = Path(result.study.trials[retried.system_attrs["failed_trial"]].user_attrs["trial_dir"])
    reference = build_from_config(
        [
            "--config",
            str(dead_trial_dir / "run.yaml"),
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path / 'reference'}",
        ],
        save_config_callback=None,
    )
    reference.trainer.fit(reference.model, datamodule=reference.datamodule)
    for name, value in reference.model.state_dict().items():
        assert torch.equal(value, resumed["state_dict"][name]), name
