"""The pruning recipes run through the real CLI (shrunk by their `# Test:` line) and actually prune."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from lightning_opt.cli import main

RECIPES = sorted(Path("recipes/pruning").glob("*.yaml"))


def _test_overrides(path: Path) -> list[str]:
    for line in path.read_text().splitlines():
        if line.startswith("# Test:"):
            return shlex.split(line.removeprefix("# Test:"))
    raise AssertionError(f"{path} has no '# Test:' line")


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_prunes(recipe, tmp_path):
    head = recipe.read_text().splitlines()[:12]
    assert any(line.startswith(f"# Run: lightning-opt fit --config {recipe.as_posix()}") for line in head)
    args = ["fit", "--config", str(recipe), *_test_overrides(recipe), f"--trainer.logger.init_args.save_dir={tmp_path}"]
    main(args)
    (report,) = tmp_path.rglob("report.json")
    stages = json.loads(report.read_text())["stages"]
    if "channel" in recipe.stem:
        assert stages["channels removed"]["params"] < 0.5 * stages["baseline"]["params"]
        assert stages["channels removed"]["flops"] < 0.5 * stages["baseline"]["flops"]
        assert stages["channels removed"]["max_abs_output_diff"] < 1e-4
        assert list(tmp_path.rglob("pruned_model.pt"))
    else:
        assert stages["final"]["sparsity"] > 0.3
