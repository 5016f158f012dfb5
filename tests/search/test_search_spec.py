from __future__ import annotations

import socket
from typing import Any

import optuna
import pytest

from lightning_opt.search import SearchConfig

SPACE = {"model.init_args.optimizer.init_args.lr": {"low": 1e-3, "high": 1e-1, "log": True}}


def section(**kwargs: Any) -> dict[str, Any]:
    return {"space": SPACE, **kwargs}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_defaults_and_builders(tmp_path) -> None:
    cfg = SearchConfig.from_dict(section(run_dir=str(tmp_path)), default_name="hpo")
    assert cfg.study_name == "hpo"
    assert cfg.sampler == "tpe"
    assert cfg.directions == ["maximize"]
    assert cfg.storage_url.startswith("sqlite:///")
    assert cfg.storage_url.endswith("study.db")
    assert isinstance(cfg.make_pruner(), optuna.pruners.NopPruner)
    multi = SearchConfig.from_dict(
        section(objectives=["val/acc", {"name": "latency_ms", "direction": "minimize"}], seed=3)
    )
    assert multi.sampler == "nsga2"
    assert multi.directions == ["maximize", "minimize"]
    assert multi.objectives[1].builtin
    assert not multi.objectives[0].builtin
    for name in ("random", "tpe", "nsga2", "cmaes", "grid"):
        space = {"model.x": [1, 2]} if name == "grid" else SPACE
        one = SearchConfig.from_dict({"space": space, "sampler": name, "seed": 0})
        assert isinstance(one.make_sampler(), optuna.samplers.BaseSampler)
    for name, cls in (("median", "MedianPruner"), ("successive_halving", "SuccessiveHalvingPruner")):
        assert type(SearchConfig.from_dict(section(pruner=name)).make_pruner()).__name__ == cls
    hb = SearchConfig.from_dict(section(pruner={"name": "hyperband", "min_resource": 2}))
    assert isinstance(hb.make_pruner(), optuna.pruners.HyperbandPruner)


def test_seeded_sampler_reproduces_and_differs_per_trial() -> None:
    cfg = SearchConfig.from_dict(section(sampler="random", seed=7))

    def draws() -> list[float]:
        study = optuna.create_study(sampler=cfg.make_sampler())
        out = []
        for _ in range(4):
            t = study.ask()
            out.append(t.suggest_float("x", 0, 1))
            study.tell(t, 0.0)
        return out

    first = draws()
    assert first == draws()  # same seed, same study
    assert len(set(first)) == 4  # a fresh seed per trial number


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sampler": "tpee"}, r"`search.sampler` must be one of \[.*\], got 'tpee'. HINT: did you mean `tpe`"),
        ({"sampler": {"n_startup_trials": 3}}, "must be a name or a mapping with `name`"),
        ({"pruner": "medain"}, r"`search.pruner` must be one of .*did you mean `median`"),
        (
            {"pruner": "median", "objectives": ["val/acc", {"name": "params", "direction": "minimize"}]},
            r"`search.pruner` 'median' needs a single objective, got 2",
        ),
        ({"sampler": "cmaes", "objectives": ["val/acc", "val/loss"]}, "'cmaes' handles one objective"),
        ({"sampler": "grid"}, "grid sampler needs finite values"),
        ({"objectives": [{"name": "val/acc", "direction": "max"}]}, "must be 'maximize' or 'minimize', got 'max'"),
        ({"objectives": []}, "non-empty list"),
        ({"objectives": ["val/acc", "val/acc"]}, "lists an objective twice"),
        ({"objectives": [{"metric": "val/acc"}]}, "items must be"),
        ({"n_trials": 0}, r"`search.n_trials` must be an int >= 1, got 0"),
        ({"timeout": -1}, "`search.timeout` must be a positive number"),
        ({"seed": "a"}, "`search.seed` must be an int or null"),
        ({"heartbeat_interval": 0}, "`search.heartbeat_interval` must be an int >= 1"),
        ({"heartbeat_interval": 5, "grace_period": 5}, "`search.grace_period` must be > `heartbeat_interval`"),
        ({"max_retry": -1}, "`search.max_retry` must be an int >= 0"),
        ({"n_trails": 3}, r"`search.n_trails` is not a search option.*did you mean `n_trials`"),
        ({"latency": 3}, "`search.latency` must be a mapping"),
    ],
)
def test_bad_section(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SearchConfig.from_dict(section(**kwargs))


def test_space_required_and_sampler_kwargs() -> None:
    with pytest.raises(ValueError, match="`search.space` is required"):
        SearchConfig.from_dict({"n_trials": 3})
    with pytest.raises(ValueError, match="`search` must be a mapping"):
        SearchConfig.from_dict([1])
    cfg = SearchConfig.from_dict(section(sampler={"name": "tpe", "n_startup_tirals": 3}))
    with pytest.raises(ValueError, match="`search.sampler` 'tpe'.*n_startup_tirals"):
        cfg.make_sampler()
    cfg = SearchConfig.from_dict(section(pruner={"name": "median", "warmup": 3}))
    with pytest.raises(ValueError, match="`search.pruner` 'median'.*warmup"):
        cfg.make_pruner()


def test_unreachable_storage() -> None:
    url = f"postgresql://nobody@127.0.0.1:{free_port()}/nodb"
    cfg = SearchConfig.from_dict(section(storage=url))
    with pytest.raises(
        ValueError, match=r"`search.storage` 'postgresql://nobody@127.0.0.1:\d+/nodb' cannot be reached"
    ):
        cfg.make_storage()
    cfg = SearchConfig.from_dict(section(storage="nosuchdb://x"))
    with pytest.raises(ValueError, match="cannot be reached"):
        cfg.make_storage()


def test_storage_password_never_shown() -> None:
    url = f"postgresql://ann:s3cret-pw@127.0.0.1:{free_port()}/nodb"
    cfg = SearchConfig.from_dict(section(storage=url))
    with pytest.raises(ValueError, match="cannot be reached") as err:
        cfg.make_storage()
    assert "s3cret-pw" not in str(err.value)
    assert "postgresql://ann:***@127.0.0.1" in str(err.value)
    assert "s3cret-pw" not in cfg.masked_storage_url


def test_seeded_sampler_copies_and_drives_a_multi_objective_study() -> None:
    import copy

    cfg = SearchConfig.from_dict(section(objectives=["val/acc", "val/loss"], sampler="tpe", seed=0))
    sampler = copy.deepcopy(cfg.make_sampler())  # optuna copies samplers (multi-objective TPE did, and failed)
    study = optuna.create_study(directions=cfg.directions, sampler=sampler)
    study.optimize(lambda t: (t.suggest_float("x", 0, 1), t.suggest_float("y", 0, 1)), n_trials=12)
    assert len(study.best_trials) >= 1


def test_cmaes_sampler_runs() -> None:
    cfg = SearchConfig.from_dict(
        {"space": {"m.x": {"low": -1.0, "high": 1.0}, "m.y": {"low": -1.0, "high": 1.0}}, "sampler": "cmaes", "seed": 0}
    )
    study = optuna.create_study(sampler=cfg.make_sampler())
    study.optimize(lambda t: sum(v**2 for v in cfg.space.sample(t).values()), n_trials=8)
    assert study.best_value < 1.0
