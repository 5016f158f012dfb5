"""Every recipe under recipes/ runs through the real CLI, shrunk by the overrides on its `# Test:` line."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_opt.cli import main

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
ALL = sorted(RECIPES.rglob("*.yaml"))


def _header(path: Path, field: str) -> str | None:
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        if line.lstrip("# ").startswith(f"{field}:"):
            return line.lstrip("# ")[len(field) + 1 :].strip()
    return None


def test_recipes_exist():
    assert (RECIPES / "quickstart.yaml") in ALL


@pytest.mark.parametrize("recipe", ALL, ids=[str(p.relative_to(RECIPES)) for p in ALL])
def test_recipe_runs_shrunk(recipe, tmp_path, monkeypatch):
    run = _header(recipe, "Run")
    test = _header(recipe, "Test")
    assert run and run.startswith("lightning-opt "), f"{recipe} must open with a '# Run: lightning-opt ...' line"
    assert test is not None, f"{recipe} must have a '# Test: <overrides>' line that shrinks it"
    words = shlex.split(run)[1:]
    words = [str(RECIPES.parent / w) if w.startswith("recipes/") else w for w in words]
    test_args = [a.replace("{tmp}", str(tmp_path)) for a in shlex.split(test)]
    monkeypatch.chdir(tmp_path)
    main([*words, *test_args, *([] if words[0] != "fit" else ["--trainer.enable_progress_bar=false"])])
    if words[0] == "fit":
        reports = list((tmp_path / "runs").rglob("report.json"))
        assert reports, "a fit recipe writes its compression report under runs/"
        assert "final" in json.loads(reports[0].read_text())["stages"]


@pytest.mark.ddp
@pytest.mark.parametrize(
    ("recipe", "stages", "files"),
    [
        ("pruning/channel_resnet.yaml", {"pruned (masked)", "channels removed", "final"}, {"pruned_model.pt"}),
        ("distillation/distill_prune_qat_digits.yaml", {"baseline", "int8", "final"}, {"int8.pt2", "student.ckpt"}),
    ],
)
def test_recipe_under_plain_ddp(recipe, stages, files, tmp_path):
    """`lightning-opt fit` with strategy=ddp on 2 CPU processes (each rank launched as a script, as on a cluster).

    Rank-zero-only writers (the report, the thin model, the int8 artifact) must not enter collectives that the other
    rank never joins: before that was fixed these runs hung at the end of fit.
    """
    path = RECIPES / recipe
    args = [a.replace("{tmp}", str(tmp_path)) for a in shlex.split(_header(path, "Test") or "")]
    cmd = [sys.executable, "-m", "lightning_opt", "fit", "--config", str(path), *args]
    cmd += ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.enable_progress_bar=false"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GLOBAL_RANK: 1" in proc.stdout + proc.stderr  # two processes really ran
    (report,) = (tmp_path / "runs").rglob("report.json")
    assert stages <= set(json.loads(report.read_text())["stages"])
    assert files <= {p.name for p in report.parent.iterdir()}


@pytest.mark.parametrize("recipe", ALL, ids=[str(p.relative_to(RECIPES)) for p in ALL])
def test_last_ckpt_is_the_latest_state(recipe):
    """Lightning writes `last.ckpt` only when a monitored checkpoint improves: a recipe that monitors a metric must
    keep a separate unmonitored `save_last` checkpoint, so that resuming from last.ckpt never goes back epochs."""
    import yaml

    config = yaml.safe_load(recipe.read_text()) or {}
    callbacks = (config.get("trainer") or {}).get("callbacks") or []
    checkpoints = [
        c.get("init_args") or {} for c in callbacks if str(c.get("class_path", "")).endswith("ModelCheckpoint")
    ]
    for args in checkpoints:
        assert not (args.get("monitor") and args.get("save_last")), f"{recipe}: save_last on a monitored checkpoint"
    if any(args.get("monitor") for args in checkpoints) and any(a.get("save_last") is not None for a in checkpoints):
        assert any(a.get("save_last") and not a.get("monitor") for a in checkpoints)
