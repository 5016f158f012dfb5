"""Every recipe under recipes/ runs through the real CLI, shrunk by the overrides on its `# Test:` line."""

from __future__ import annotations

import json
import shlex
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
