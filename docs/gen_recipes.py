"""Write docs/recipes.md from the comment header of every recipe under recipes/ (run from anywhere).

python docs/gen_recipes.py           # rewrite docs/recipes.md
python docs/gen_recipes.py --check   # exit 1 if docs/recipes.md is not what the headers give

A recipe opens with a comment block: what it does (a paragraph), a blank comment line, then fields, one a line
(``# Assumes: ...``, ``# Run: <command>``, ``# Override example: <command>``, ``# Test: <overrides>``, ``# Then:``,
``# Best:``, ``# Export later:``); a line that is not a field continues the field above it. The page shows, per
recipe, the purpose, what it assumes and its commands; the ``Test`` overrides are for the test suite and left out.
``tests/test_docs.py`` and the docs hook (``docs/hooks.py``) fail when the committed page is stale.
"""

from __future__ import annotations

import re
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
PAGE = ROOT / "docs" / "recipes.md"
SOURCE_URL = "https://github.com/lightning-opt/lightning-opt/blob/main/recipes/"

#: Header fields, in the order the page shows them; the ones holding a command go into the code block.
FIELDS = ("Assumes", "Run", "Override example", "Test", "Then", "Best", "Export later")
COMMAND_FIELDS = ("Run", "Override example", "Then", "Best", "Export later")
REQUIRED = ("Run", "Override example")
#: Page sections: recipe folder -> heading, in page order ("" is the folder itself).
SECTIONS = {
    "": "Getting started",
    "pruning": "Pruning",
    "distillation": "Distillation",
    "quantization": "Quantization",
    "search": "Search",
    "lm": "Language models",
    "plan": "Planning",
}

INTRO = (
    "Each recipe is a LightningCLI config (model, data, trainer, callbacks, report) under "
    "[`recipes/`](https://github.com/lightning-opt/lightning-opt/tree/main/recipes). It opens with a comment: what it "
    "does, what it assumes, the exact command and an override example; this page is generated from those comments. "
    "Run the commands from the repository root; runs land in `runs/<name>/version_N/` (`tensorboard --logdir runs`). "
    "Every recipe is also run by the test suite through the real CLI, shrunk by the overrides on its `# Test:` line."
)
_FIELD = re.compile(rf"^({'|'.join(map(re.escape, FIELDS))}):\s*(.*)$")
_COMMAND = re.compile(r"\b(lightning-opt|tensorboard) ")


@dataclass
class Header:
    """One recipe's header: its path under recipes/, the purpose paragraph and the fields (name -> lines)."""

    path: str
    purpose: str
    fields: dict[str, list[str]] = field(default_factory=dict)


def parse_header(path: Path, recipes: Path = RECIPES) -> Header:
    """Read the leading comment block of the recipe ``path`` (under ``recipes``).

    Raises:
        ValueError: if the purpose paragraph, a required field or the blank line after the purpose is missing,
            or a field appears twice.
    """
    rel = path.relative_to(recipes).as_posix()
    lines: list[str] = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].removeprefix(" ").rstrip())
    if "" not in lines:
        raise ValueError(f"recipes/{rel}: the header needs a purpose paragraph, a blank '#' line, then the fields.")
    blank = lines.index("")
    purpose = " ".join(lines[:blank]).strip()
    if not purpose:
        raise ValueError(f"recipes/{rel}: the header must open with what the recipe does.")
    fields: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in lines[blank + 1 :]:
        match = _FIELD.match(line)
        if match:
            name, value = match.groups()
            if name in fields:
                raise ValueError(f"recipes/{rel}: the field '{name}:' appears twice.")
            current = fields[name] = [value]
        elif current is not None and line:
            current.append(line)
        elif line:
            raise ValueError(f"recipes/{rel}: header line {line!r} comes before any field ({', '.join(FIELDS)}).")
    missing = [name for name in REQUIRED if name not in fields]
    if missing:
        raise ValueError(f"recipes/{rel}: the header lacks {', '.join(f'# {m}:' for m in missing)}.")
    return Header(rel, purpose, fields)


def _prose(text: str, prefix: str = "") -> str:
    """Prose as Markdown, after ``prefix``: escaped outside `code spans` (``*`` and ``<`` would start emphasis or
    HTML), wrapped at 120 columns."""
    parts = re.split(r"(`[^`]*`)", text)
    text = "".join(p if p.startswith("`") else p.replace("*", r"\*").replace("<", "&lt;") for p in parts)
    return textwrap.fill(prefix + text, width=120, break_long_words=False, break_on_hyphens=False)


def _command_lines(name: str, value: str) -> list[str]:
    """A command field as shell lines: prose before the command and a trailing (remark) become comments."""
    match = _COMMAND.search(value)
    if match is None:
        return [f"# {name}: {value}"]
    prose, command = value[: match.start()].strip(), value[match.start() :].strip()
    remark = ""
    if " (" in command and command.endswith(")"):
        command, _, remark = command.rpartition(" (")
        command, remark = command.rstrip(), remark[:-1]
    label = f"# {name}: {prose.rstrip(':')}" if prose else f"# {name}"
    return [label, f"{command}  # {remark}" if remark else command]


def render_recipe(header: Header) -> str:
    """One recipe's section of the page."""
    name = header.path.rsplit("/", 1)[-1]
    out = [f"### {name}", "", f"[`recipes/{header.path}`]({SOURCE_URL}{header.path})", "", _prose(header.purpose), ""]
    if "Assumes" in header.fields:
        out += [_prose(" ".join(header.fields["Assumes"]), prefix="**Assumes:** "), ""]
    shell: list[str] = []
    notes: list[str] = []
    for field_name in COMMAND_FIELDS:
        if field_name in header.fields:
            first, *more = header.fields[field_name]
            shell += _command_lines(field_name, first)
            notes += more
    out += ["```bash", *shell, "```", ""]
    if notes:
        out += [_prose(" ".join(notes)), ""]
    return "\n".join(out)


def _in_run_order(headers: list[Header]) -> list[Header]:
    """By name, except that a recipe whose ``Assumes:`` names another recipe (run first) comes after it."""
    by_path = {h.path: h for h in headers}

    def depth(h: Header, seen: frozenset[str] = frozenset()) -> int:
        needs = re.findall(r"recipes/(\S+?\.yaml)", " ".join(h.fields.get("Assumes", [])))
        firsts = [by_path[n] for n in needs if n in by_path and n not in seen and n != h.path]
        return max((1 + depth(f, seen | {h.path}) for f in firsts), default=0)

    return sorted(headers, key=lambda h: (depth(h), h.path))


def render(recipes: Path = RECIPES) -> str:
    """The whole page, from every ``*.yaml`` under ``recipes``.

    Raises:
        ValueError: for a recipe in a folder without a section in ``SECTIONS``, or a malformed header.
    """
    by_section: dict[str, list[Header]] = {folder: [] for folder in SECTIONS}
    for path in sorted(recipes.rglob("*.yaml")):
        folder = "" if path.parent == recipes else path.parent.relative_to(recipes).as_posix()
        if folder not in by_section:
            raise ValueError(f"{path}: add its folder {folder!r} to SECTIONS in docs/gen_recipes.py.")
        by_section[folder].append(parse_header(path, recipes))
    out = [
        "# Recipes",
        "",
        "<!-- Generated by docs/gen_recipes.py from the recipes' header comments: edit the recipes, then run",
        "     `python docs/gen_recipes.py`. CI fails when this page is stale. -->",
        "",
        textwrap.fill(INTRO, width=120, break_long_words=False, break_on_hyphens=False),
        "",
    ]
    for folder, headers in by_section.items():
        headers = _in_run_order(headers)
        if headers:
            out += [f"## {SECTIONS[folder]}", ""]
            out += [render_recipe(h) for h in headers]
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv: list[str]) -> int:
    """Write the page, or with ``--check`` say whether it is up to date (exit 1 if not)."""
    text = render()
    if "--check" in argv:
        if PAGE.read_text() != text:
            print(f"{PAGE.relative_to(ROOT)} is stale: run `python docs/gen_recipes.py`.", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text)
    print(f"wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
