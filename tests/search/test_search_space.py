from __future__ import annotations

import optuna
import pytest

from lightning_opt.search import Param, SearchSpace, flatten_keys, get_path, set_path


def test_paths_get_set_flatten() -> None:
    cfg = {"model": {"init_args": {"optimizer": "torch.optim.Adam"}}, "trainer": {"callbacks": [{"init_args": {}}]}}
    set_path(cfg, "model.init_args.optimizer.init_args.lr", 0.5)
    assert cfg["model"]["init_args"]["optimizer"] == {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.5}}
    set_path(cfg, "trainer.callbacks.0.init_args.final", 0.9)
    set_path(cfg, "data.init_args.batch_size", 32)  # missing mappings are created
    assert get_path(cfg, "trainer.callbacks.0.init_args.final") == 0.9
    assert get_path(cfg, "data.init_args.batch_size") == 32
    assert get_path(cfg, "nope.x", None) is None
    assert "trainer.callbacks.0.init_args.final" in set(flatten_keys(cfg))
    with pytest.raises(KeyError, match="out of range"):
        set_path(cfg, "trainer.callbacks.3.init_args.final", 1)
    with pytest.raises(KeyError):
        get_path(cfg, "model.init_args.missing")


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"type": "float", "low": 1.0, "high": 0.1}, r"`low` must be <= `high`, got low=1.0 > high=0.1"),
        ({"type": "float", "low": 0.0, "high": 1.0, "log": True}, r"`log: true` needs `low` > 0, got 0.0"),
        ({"type": "float", "low": 0.1, "high": 1.0, "log": True, "step": 0.1}, "`step` and `log` cannot"),
        ({"type": "int", "low": 1, "high": 4, "step": 0}, r"`step` must be > 0"),
        ({"type": "int", "low": 1.5, "high": 4}, "integer bounds"),
        ({"type": "float", "low": "a", "high": 4}, "`low` must be a number"),
        ({"type": "cat", "choices": [1]}, "`type` must be one of"),
        ({"choices": []}, "`choices` must be a non-empty list"),
        ({"choices": [1, 1]}, "duplicates"),
        ({"type": "float", "low": 0, "high": 1, "lgo": True}, r"unknown field\(s\) \['lgo'\].*did you mean .*`log`"),
        ({"type": "list", "length": [3, 1], "item": {"choices": [3, 5]}}, r"`length` low must be <= high"),
        ({"type": "list", "length": 2}, "needs `item`"),
        ({"type": "list", "length": 0, "item": {"choices": [3, 5]}}, "`length` must be an int >= 1"),
        ("fast", "must be a mapping"),
    ],
)
def test_param_validation(spec, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Param.from_dict("model.x", spec)


def test_space_references_must_be_earlier() -> None:
    with pytest.raises(ValueError, match="`when` refers to `model.b`, which is not an earlier parameter"):
        SearchSpace({"model.a": {"choices": [1, 2], "when": {"model.b": 1}}, "model.b": [1, 2]})
    with pytest.raises(ValueError, match="`length` refers to `model.w`, which is not an earlier list"):
        SearchSpace({"model.k": {"type": "list", "length": "model.w", "item": {"choices": [3, 5]}}})
    with pytest.raises(ValueError, match="non-empty mapping"):
        SearchSpace({})


def test_check_keys_suggests_close_names() -> None:
    space = SearchSpace({"model.init_args.optimizer.init_args.lrr": {"low": 1e-3, "high": 1e-1, "log": True}})
    known = ["model.init_args.optimizer.init_args.lr", "model.init_args.backbone", "trainer.max_epochs"]
    with pytest.raises(ValueError, match=r"is not a key of the recipe.*did you mean `model\.init_args\.optimizer"):
        space.check_keys(known)


def test_sample_types_conditions_and_lists() -> None:
    space = SearchSpace(
        {
            "m.lr": {"low": 1e-4, "high": 1e-1, "log": True},
            "m.bs": {"type": "int", "low": 16, "high": 64, "step": 16},
            "m.drop": {"low": 0.0, "high": 0.5, "step": 0.1},
            "m.use_pruning": [True, False],
            "m.final": {"low": 0.5, "high": 0.9, "when": {"m.use_pruning": True}},
            "m.channels": {"type": "list", "length": [1, 3], "item": {"type": "int", "low": 8, "high": 32, "step": 8}},
            "m.kernels": {"type": "list", "length": "m.channels", "item": {"choices": [3, 5]}},
            "m.widths": {"choices": [[8, 16], [16, 32]]},
        }
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen_final = {True: 0, False: 0}
    lengths = set()
    for _ in range(30):
        trial = study.ask()
        values = space.sample(trial)
        assert isinstance(values["m.bs"], int)
        assert values["m.bs"] % 16 == 0
        assert 1e-4 <= values["m.lr"] <= 1e-1
        assert round(values["m.drop"] * 10, 9) == round(values["m.drop"] * 10)
        assert ("m.final" in values) == values["m.use_pruning"]
        seen_final[values["m.use_pruning"]] += 1
        assert len(values["m.kernels"]) == len(values["m.channels"])
        assert all(c in (8, 16, 24, 32) for c in values["m.channels"])
        assert values["m.widths"] in ([8, 16], [16, 32])
        lengths.add(len(values["m.channels"]))
        study.tell(trial, 0.0)
        # what is stored decodes back to the same config values
        assert space.decode_params(study.trials[-1].params) == values
    assert seen_final[True]
    assert seen_final[False]
    assert lengths == {1, 2, 3}


def test_apply_and_grid() -> None:
    space = SearchSpace(
        {"model.w": {"choices": [[8], [8, 16]]}, "model.k": {"type": "int", "low": 1, "high": 5, "step": 2}}
    )
    assert space.grid_space() == {"model.w": ["[8]", "[8, 16]"], "model.k": [1, 3, 5]}
    cfg = SearchSpace.apply({"model": {"w": [4]}}, {"model.w": [8, 16]})
    assert cfg == {"model": {"w": [8, 16]}}
    with pytest.raises(ValueError, match="grid sampler needs finite values"):
        SearchSpace({"model.lr": {"low": 0.1, "high": 1.0}}).grid_space()
    with pytest.raises(ValueError, match="list and conditional"):
        SearchSpace({"model.a": [1, 2], "model.b": {"choices": [1], "when": {"model.a": 1}}}).grid_space()


def test_search_only_gate_keys() -> None:
    space = SearchSpace(
        {"_hidden_on": [False, True], "model.hidden": {"choices": [16, 32], "when": {"_hidden_on": True}}}
    )
    space.check_keys(["model.hidden"])  # `_` keys are not recipe keys
    assert SearchSpace.apply({"model": {"hidden": 0}}, {"_hidden_on": False}) == {"model": {"hidden": 0}}
    assert SearchSpace.apply({"model": {"hidden": 0}}, {"_hidden_on": True, "model.hidden": 32}) == {
        "model": {"hidden": 32}
    }
