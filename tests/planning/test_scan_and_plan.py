"""The sensitivity scan on a tiny trained model, the budgeted plan, plan.yaml through `fit`, and bad input."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from planning_helpers import pruning_entry, write_recipe

from lightning_opt.cli.plan import main
from lightning_opt.planning import build_recipe
from lightning_opt.pruning import Pruning

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small digits CNN trained for 4 epochs (val accuracy ~90%), and its recipe with a Pruning callback."""
    folder = tmp_path_factory.mktemp("trained")
    dense = write_recipe(
        folder / "dense.yaml",
        [],
        max_epochs=4,
        limit_train_batches=1.0,
        limit_val_batches=1.0,
        enable_checkpointing=True,
    )
    recipe = build_recipe([dense])
    recipe.trainer.fit(recipe.model, datamodule=recipe.datamodule)
    ckpt = next((folder / "runs").rglob("*.ckpt"))
    prune = write_recipe(folder / "prune.yaml", [pruning_entry()], max_epochs=2)
    return str(ckpt), prune


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_scan_csv_has_a_row_per_layer_and_sparsity(trained, tmp_path):
    ckpt, recipe = trained
    out = tmp_path / "out"
    grid = [0.3, 0.6, 0.9, 0.99]
    main(["--config", recipe, "--ckpt_path", ckpt, "--grid", ",".join(map(str, grid)), "--output_dir", str(out)])
    rows = _rows(out / "sensitivity.csv")
    prune = [r for r in rows if r["kind"] == "prune"]
    layers = ["backbone.features.0", "backbone.features.4", "backbone.classifier.1"]
    assert [(r["layer"], float(r["sparsity"])) for r in prune] == [(n, s) for n in layers for s in grid]
    scan = json.loads((out / "plan.json").read_text())["scan"]
    assert 0 < scan["fraction_of_training"] < 10 and scan["step_s"] > 0
    for layer in layers:
        metric = [float(r["metric"]) for r in prune if r["layer"] == layer]
        assert metric[-1] < metric[0] - 20, (layer, metric)  # 99% of a layer gone costs far more than 30%
    int8 = [r for r in rows if r["kind"] == "int8"]
    assert [r["layer"] for r in int8] == ["features.0", "features.4", "classifier.1"]  # names as `skip` takes them
    assert all(float(r["sqnr_db"]) > 15 for r in int8)


def test_plan_meets_sparsity_target_and_runs_with_fit(trained, tmp_path):
    ckpt, recipe = trained
    out = tmp_path / "out"
    args = ["--config", recipe, "--ckpt_path", ckpt, "--max_drop", "5", "--target", "sparsity=0.85"]
    main([*args, "--output_dir", str(out), "--timing_steps", "0", "--grid", "0.5,0.8,0.9,0.95,0.98"])
    plan = json.loads((out / "plan.json").read_text())["plan"]["pruning"]
    assert plan["global_sparsity"] >= 0.85
    assert plan["kept"] <= plan["budget"]
    text = (out / "plan.yaml").read_text()
    assert text.startswith("# Per-layer compression plan") and "predicted drop" in text
    # the planned allocation is what a full (short) fit reaches, layer by layer
    recipe_run = build_recipe([str(out / "plan.yaml")], ["--trainer.max_epochs=2"])
    recipe_run.trainer.fit(recipe_run.model, datamodule=recipe_run.datamodule)
    (pruning,) = [c for c in recipe_run.trainer.callbacks if isinstance(c, Pruning)]
    stats = {r["layer"].rsplit(".", 1)[0]: r for r in pruning.layer_stats(recipe_run.model)}
    assert {n: r["sparsity"] for n, r in stats.items()} == pytest.approx(plan["sparsity"], abs=1e-5)
    assert pruning.global_sparsity() >= 0.85
    # and the written recipe runs through the real CLI, shrunk
    done = subprocess.run(
        [sys.executable, "-m", "lightning_opt", "fit", "--config", str(out / "plan.yaml"), "--trainer.max_steps=2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_flops_target_is_met(trained, tmp_path):
    ckpt, recipe = trained
    out = tmp_path / "out"
    main(
        [
            "--config",
            recipe,
            "--ckpt_path",
            ckpt,
            "--target",
            "flops=0.5",
            "--timing_steps",
            "0",
            "--output_dir",
            str(out),
        ]
    )
    plan = json.loads((out / "plan.json").read_text())["plan"]
    kept = plan["flops"]["not_prunable"] + plan["pruning"]["flops_kept"]
    assert kept <= 0.5 * plan["flops"]["dense"]
    assert plan["pruning"]["global_sparsity"] > 0


@pytest.mark.parametrize(
    ("extra", "error", "match"),
    [
        (["--max_drop", "-1"], ValueError, "`--max_drop` must be a number of metric points >= 0, got -1"),
        (["--target", "latency=3"], ValueError, r"`--target` kind must be one of \['sparsity', 'flops', 'bytes'\]"),
        (["--target", "sparsity=1.5"], ValueError, r"must be in \(0, 1\), got 1.5"),
        (["--grid", "0.5,2"], ValueError, r"`--grid` values must be in \(0, 1\)"),
    ],
)
def test_bad_input_fails_with_a_clear_message(trained, tmp_path, extra, error, match):
    ckpt, recipe = trained
    with pytest.raises(error, match=match):
        main(["--config", recipe, "--ckpt_path", ckpt, "--output_dir", str(tmp_path / "out"), *extra])
    assert not (tmp_path / "out").exists()


def test_missing_checkpoint_and_recipe(trained, tmp_path):
    _, recipe = trained
    with pytest.raises(FileNotFoundError, match="checkpoint .*nope.ckpt' does not exist"):
        main(["--config", recipe, "--ckpt_path", str(tmp_path / "nope.ckpt"), "--max_drop", "1"])
    with pytest.raises(FileNotFoundError, match="recipe .*nope.yaml' does not exist"):
        main(["--config", str(tmp_path / "nope.yaml")])
    with pytest.raises(ValueError, match="needs `--ckpt_path`"):
        main(["--config", recipe, "--max_drop", "1"])
