"""The timeline before training: steps equal to those the callbacks act at in a real fit; conflicts with their key."""

from __future__ import annotations

import json

import pytest
from planning_helpers import pruning_entry, qat_entry, write_recipe

from lightning_opt.cli.plan import main
from lightning_opt.planning import build_recipe, recipe_timeline, run_length
from lightning_opt.pruning import Pruning


def _timeline(path, overrides=()):
    recipe = build_recipe([path], list(overrides))
    return recipe_timeline(recipe, run_length(recipe))


@pytest.mark.parametrize(
    ("trainer", "schedule"),
    [
        ({"max_epochs": 3}, {"final": 0.8, "start": 0.1, "end": 0.7, "frequency": 2}),
        ({"max_epochs": 4, "accumulate_grad_batches": 2}, {"final": 0.6, "start": 0, "end": 0.5, "frequency": 3}),
        ({"max_epochs": 5, "max_steps": 17}, {"final": 0.5, "start": 2, "end": 12, "frequency": 4}),
    ],
    ids=["epochs", "accumulation", "max_steps"],
)
def test_pruning_steps_match_a_real_fit(tmp_path, monkeypatch, trainer, schedule):
    path = write_recipe(tmp_path / "r.yaml", [pruning_entry(schedule=schedule)], **trainer)
    tl = _timeline(path)
    planned = [e.step for e in tl.events if e.kind == "pruning"]
    planned_values = [round(e.value, 6) for e in tl.events if e.kind == "pruning"]

    seen: list[tuple[int, int, float]] = []
    original = Pruning._update

    def spy(self, trainer, pl_module, step, total):
        original(self, trainer, pl_module, step, total)
        seen.append((step, trainer.global_step + 1, round(self.target, 6)))

    monkeypatch.setattr(Pruning, "_update", spy)
    recipe = build_recipe([path])
    recipe.trainer.fit(recipe.model, datamodule=recipe.datamodule)
    assert planned == [s for s, _, _ in seen] == [g for _, g, _ in seen]
    assert planned_values == [v for _, _, v in seen]
    assert tl.run.total_steps == recipe.trainer.global_step
    assert len(planned) >= 3


def test_qat_before_pruning_ends_without_preserve_sparsity(tmp_path):
    path = write_recipe(
        tmp_path / "r.yaml",
        [pruning_entry(), qat_entry(start=0.2, preserve_sparsity=False)],
    )
    keys = [c.key for c in _timeline(path).conflicts]
    assert keys == ["trainer.callbacks[1].init_args.preserve_sparsity"]
    path = write_recipe(tmp_path / "ok.yaml", [pruning_entry(), qat_entry(start=0.2, preserve_sparsity=True)])
    assert _timeline(path).conflicts == []


def test_schedule_ending_after_the_run(tmp_path):
    schedule = {"final": 0.8, "start": 0, "end": 500, "frequency": 5}
    path = write_recipe(tmp_path / "r.yaml", [pruning_entry(schedule=schedule)])
    (conflict,) = _timeline(path).conflicts
    assert conflict.key == "trainer.callbacks[0].init_args.schedule.init_args.end"
    assert "500" in conflict.message and "10 optimizer steps" in conflict.message


def test_freeze_before_start(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", [qat_entry(start=0.5, freeze_bn=0.2, freeze_observers=0.9)])
    tl = _timeline(path)
    assert [c.key for c in tl.conflicts] == ["trainer.callbacks[0].init_args.freeze_bn"]
    qat = {e.key.rsplit(".", 1)[-1]: e.step for e in tl.events if e.kind == "qat"}
    assert qat["start"] == 5 and qat["freeze_bn"] == 2 and qat["freeze_observers"] == 9


def test_nm_target_mismatch_names_the_key(tmp_path):
    schedule = {"final": 0.9, "start": 0, "end": 0.5, "frequency": 2}
    path = write_recipe(tmp_path / "r.yaml", [pruning_entry(schedule=schedule, granularity="nm")])
    with pytest.raises(ValueError, match=r"trainer\.callbacks\[0\]\.init_args\.schedule\.init_args\.final.*0\.5"):
        main(["--config", path, "--output_dir", str(tmp_path / "out")])


def test_command_writes_table_figure_and_json(tmp_path, capsys):
    path = write_recipe(
        tmp_path / "r.yaml",
        [
            pruning_entry(),
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}},
        ],
        max_epochs=3,
    )
    out = tmp_path / "out"
    assert main(["--config", path, "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "15 optimizer steps, 5 per epoch" in printed and "no conflicts found" in printed
    data = json.loads((out / "timeline.json").read_text())
    saves = [e["step"] for e in data["events"] if e["kind"] == "checkpoint"]
    assert saves == [5, 10, 15]
    assert (out / "timeline.png").stat().st_size > 1000
    assert list(out.glob("events.out.tfevents.*"))
    conflicted = write_recipe(tmp_path / "c.yaml", [qat_entry(start=0.5, freeze_bn=0.2)])
    assert main(["--config", conflicted, "--output_dir", str(tmp_path / "out2")]) == 1
