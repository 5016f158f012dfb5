"""The Recipes page (docs/recipes.md) is generated from the recipes' headers and kept up to date.

The full docs build (``mkdocs build --strict``, with the checks in docs/hooks.py) runs in CI (.ci/run); these tests
need no docs dependencies.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]

HEADER = """\
# Trains a thing.
#
# Assumes: nothing.
# Run: lightning-opt fit --config recipes/{name}
# Override example: lightning-opt fit --config recipes/{name} --trainer.max_epochs=2
# Test: --trainer.max_epochs=1
# Then: tensorboard --logdir runs   (Scalars)
"""


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_recipes", ROOT / "docs" / "gen_recipes.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_recipes_page_is_up_to_date(gen):
    assert gen.PAGE.read_text() == gen.render(), "docs/recipes.md is stale: run `python docs/gen_recipes.py`"


def test_recipes_page_lists_every_recipe_with_its_commands(gen):
    page = gen.PAGE.read_text()
    recipes = sorted(gen.RECIPES.rglob("*.yaml"))
    assert len(recipes) >= 18
    for path in recipes:
        header = gen.parse_header(path)
        rel = path.relative_to(gen.RECIPES).as_posix()
        assert f"[`recipes/{rel}`]" in page
        assert f"\n{header.fields['Run'][0]}\n" in page, f"{rel}: its Run command is not on the page as a line"
        assert f"\n{header.fields['Override example'][0]}\n" in page


def test_header_fields_render_as_commands_and_prose(gen, tmp_path):
    (tmp_path / "pruning").mkdir()
    (tmp_path / "pruning" / "a.yaml").write_text(HEADER.format(name="pruning/a.yaml") + "model: {}\n")
    page = gen.render(tmp_path)
    assert "## Pruning\n\n### a.yaml\n" in page
    assert "Trains a thing.\n\n**Assumes:** nothing.\n" in page
    assert "# Run\nlightning-opt fit --config recipes/pruning/a.yaml\n" in page
    assert "tensorboard --logdir runs  # Scalars\n" in page  # a trailing (remark) becomes a shell comment
    assert "--trainer.max_epochs=1" not in page  # the Test overrides are for the test suite


def test_a_recipe_that_assumes_another_comes_after_it(gen, tmp_path):
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "teacher.yaml").write_text(HEADER.format(name="lm/teacher.yaml"))
    student = HEADER.format(name="lm/a_student.yaml").replace("Assumes: nothing.", "Assumes: recipes/lm/teacher.yaml")
    (tmp_path / "lm" / "a_student.yaml").write_text(student)
    page = gen.render(tmp_path)
    assert page.index("### teacher.yaml") < page.index("### a_student.yaml")


@pytest.mark.parametrize(
    ("header", "match"),
    [
        ("# Trains a thing.\n# Run: lightning-opt fit\n", "a blank '#' line"),
        ("#\n# Run: lightning-opt fit\n", "must open with what the recipe does"),
        ("# Trains.\n#\n# Run: lightning-opt fit --config x.yaml\n", r"lacks # Override example:"),
        ("# Trains.\n#\n# Note: x\n# Run: a\n# Override example: b\n", "comes before any field"),
        ("# Trains.\n#\n# Run: a\n# Run: b\n# Override example: b\n", "'Run:' appears twice"),
    ],
)
def test_malformed_headers_are_refused(gen, tmp_path, header, match):
    (tmp_path / "bad.yaml").write_text(header + "model: {}\n")
    with pytest.raises(ValueError, match=match):
        gen.render(tmp_path)


def test_a_recipe_folder_without_a_section_is_refused(gen, tmp_path):
    (tmp_path / "robotics").mkdir()
    (tmp_path / "robotics" / "arm.yaml").write_text(HEADER.format(name="robotics/arm.yaml"))
    with pytest.raises(ValueError, match="add its folder 'robotics' to SECTIONS"):
        gen.render(tmp_path)
