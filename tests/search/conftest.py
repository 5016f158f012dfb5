"""Fixtures of the search tests: a tiny digits recipe with a `search:` section (each trial takes about a second)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

TINY_RECIPE: dict[str, Any] = {
    "seed_everything": 0,
    "model": {
        "class_path": "lightning_opt.module.ImageClassifier",
        "init_args": {
            "backbone": "small_cnn",
            "num_classes": 10,
            "in_channels": 1,
            "input_size": 8,
            "backbone_kwargs": {"channels": [8, 16], "kernel_sizes": 3},
            "optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.01}},
        },
    },
    "data": {"class_path": "lightning_opt.data.DigitsDataModule", "init_args": {"batch_size": 64, "seed": 0}},
    "trainer": {
        "max_epochs": 2,
        "limit_train_batches": 3,
        "limit_val_batches": 1,
        "accelerator": "cpu",
        "devices": 1,
        "logger": {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": "runs", "name": "tiny"},
        },
    },
    "search": {
        "objectives": [{"name": "val/acc", "direction": "maximize"}],
        "space": {"model.init_args.optimizer.init_args.lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True}},
        "sampler": "random",
        "n_trials": 2,
        "seed": 0,
    },
}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture
def make_recipe(tmp_path: Path):
    """Write the tiny recipe with edits: ``make_recipe(search={...}, **{"trainer.max_epochs": 3})``."""

    def make(name: str = "tiny", search: dict[str, Any] | None = None, **edits: Any) -> Path:
        from lightning_opt.search import set_path

        recipe = copy.deepcopy(TINY_RECIPE)
        recipe["search"].update(search or {})
        recipe["search"].setdefault("run_dir", str(tmp_path / "run"))
        for key, value in edits.items():
            set_path(recipe, key, value)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        return path

    return make


REPO_ROOT = Path(__file__).resolve().parents[2]


def _pg_bin(name: str) -> str | None:
    import glob
    import shutil

    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


@pytest.fixture(scope="session")
def postgres_url():
    """A real PostgreSQL server for the session: ``initdb`` into a temp dir, started on a free localhost port.

    PostgreSQL refuses to run as root, so under root the server runs as the unprivileged ``postgres`` user (created
    by the Debian/Ubuntu ``postgresql`` package that ``.ci/run`` installs).
    """
    import os
    import pwd
    import shutil
    import socket
    import subprocess
    import tempfile
    import time

    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found; `apt-get install postgresql` adds them")
    prefix: list[str] = []
    owner = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no unprivileged `postgres` user to run the server as")
        runuser = shutil.which("runuser")
        prefix = [runuser, "-u", "postgres", "--"] if runuser else ["su", "postgres", "-c"]
    base = tempfile.mkdtemp(prefix="lightning_opt_pg_")
    if owner is not None:
        os.chown(base, owner.pw_uid, owner.pw_gid)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = os.path.join(base, "data")

    def run(cmd: list[str]) -> None:
        full = [*prefix, *cmd] if prefix[-1:] != ["-c"] else [*prefix, " ".join(cmd)]
        subprocess.run(full, check=True, capture_output=True, timeout=120)

    run([initdb, "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8"])
    opts = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off"
    run([pg_ctl, "-D", data, "-o", opts if prefix[-1:] != ["-c"] else f"'{opts}'", "-l", f"{base}/log", "-w", "start"])
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    try:
        import psycopg2

        deadline = time.time() + 30
        while True:
            try:
                psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres").close()
                break
            except psycopg2.OperationalError:
                if time.time() > deadline:
                    raise
                time.sleep(0.3)
        yield url
    finally:
        try:
            run([pg_ctl, "-D", data, "-m", "immediate", "-w", "stop"])
        finally:
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def subprocess_env() -> dict[str, str]:
    """Environment for worker processes that import this worktree's ``lightning_opt`` on one thread."""
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    return env
