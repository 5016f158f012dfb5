"""MkDocs hooks (mkdocs.yml ``hooks:``): checks that make ``mkdocs build --strict`` fail on what a reader would see.

- docs/recipes.md must be what ``docs/gen_recipes.py`` writes from the recipes' headers (a stale page fails).
- No page may show a raw Sphinx role (``:class:`X```): mkdocstrings renders docstrings as Markdown, so names are
  written as `X`.
- No docstring example may render as an ``Example`` admonition: the Google-style section is ``Examples:``, whose
  ``>>>`` lines mkdocstrings renders as code (an ``Example:`` section becomes a note with the code as prose).
"""

from __future__ import annotations

import importlib.util
import logging
import re
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("mkdocs.hooks.lightning_opt")

#: A role as Markdown renders it (`:class:`X`` becomes ``:class:<code>X</code>``) or left raw.
_SPHINX_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|obj|exc|const):(?=`|<code>)")
#: How mkdocstrings-python (2.x: a details block, older: a div) renders an unknown section named ``Example``.
_EXAMPLE_ADMONITION = re.compile(r'<details class="example"|class="admonition example"')


def _gen_recipes() -> Any:
    path = Path(__file__).with_name("gen_recipes.py")
    spec = importlib.util.spec_from_file_location("gen_recipes", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def on_pre_build(config: Any) -> None:
    gen = _gen_recipes()
    if gen.PAGE.read_text() != gen.render():
        log.warning("docs/recipes.md is stale (the recipes' headers changed): run `python docs/gen_recipes.py`.")


def on_page_content(html: str, page: Any, config: Any, files: Any) -> str:
    roles = sorted(set(_SPHINX_ROLE.findall(html)))
    if roles:
        log.warning(
            f"{page.file.src_uri} shows raw Sphinx roles ({', '.join(roles)}): write the name in backticks in the "
            "docstring instead."
        )
    if _EXAMPLE_ADMONITION.search(html):
        log.warning(
            f"{page.file.src_uri}: a docstring's `Example:` section renders as prose; name it `Examples:` "
            "(Google style) so its >>> lines render as code."
        )
    return html
