"""The package's layering, read from its source: the CLI on top, no cycles, no reaching into a sibling's privates.

Every ``import`` of ``lightning_opt`` counts, also those inside functions: a lazy import that only dodges a cycle is
still a tie between two modules.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "lightning_opt"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports() -> dict[str, set[tuple[str, str]]]:
    """module -> {(imported module, imported name or "")} for every import of ``lightning_opt`` in it."""
    graph: dict[str, set[tuple[str, str]]] = {}
    for path in ROOT.rglob("*.py"):
        module = _module_name(path)
        found: set[tuple[str, str]] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {(a.name, "") for a in node.names if a.name.startswith("lightning_opt")}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lightning_opt"):
                for alias in node.names:
                    candidate = f"{node.module}.{alias.name}"
                    if (ROOT.parent / candidate.replace(".", "/")).with_suffix(".py").exists() or (
                        ROOT.parent / candidate.replace(".", "/") / "__init__.py"
                    ).exists():
                        found.add((candidate, ""))  # `from package import module`
                    else:
                        found.add((node.module, alias.name))
        graph[module] = found
    return graph


def _unit(module: str) -> str:
    """What owns a module's private names: its subpackage (``lightning_opt.pruning`` for
    ``lightning_opt.pruning._masks``), or the module itself at the top level (``lightning_opt.text``)."""
    parts = module.split(".")
    if len(parts) >= 2 and (ROOT / parts[1]).is_dir():
        return ".".join(parts[:2])
    return module


#: The package-wide helpers: private to ``lightning_opt``, shared by all its modules.
SHARED = ("lightning_opt._utils", "lightning_opt._errors", "lightning_opt._io")


GRAPH = _imports()


def test_nothing_in_the_library_imports_the_cli() -> None:
    offenders = sorted(
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        if not module.startswith("lightning_opt.cli") and module != "lightning_opt.__main__"
        for target, _ in targets
        if target == "lightning_opt.cli" or target.startswith("lightning_opt.cli.")
    )
    assert offenders == []


def test_no_module_imports_a_private_module_or_name_of_another_package() -> None:
    offenders = []
    for module, targets in GRAPH.items():
        for target, name in targets:
            owner, own = _unit(target), _unit(module) == _unit(target)
            private_module = not own and target not in SHARED and any(p.startswith("_") for p in target.split(".")[1:])
            private_name = name.startswith("_") and not name.startswith("__") and not own and owner not in SHARED
            if private_module or private_name:
                offenders.append(f"{module} imports {target}{'.' + name if name else ''}")
    assert sorted(offenders) == []


def test_there_are_no_import_cycles() -> None:
    edges = {m: {t for t, _ in targets if t in GRAPH and t != m} for m, targets in GRAPH.items()}
    # a package's __init__ re-exports its modules: an edge into a package is an edge into what it re-exports
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if nxt.startswith(node + ".") or node.startswith(nxt + "."):
                continue  # a package and its own modules
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert cycles == []


@pytest.mark.parametrize("argv", [["--help"], ["fitt"], ["--version"]], ids=["help", "unknown command", "version"])
def test_top_level_help_and_usage_errors_import_no_torch(argv: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "lightning_opt", *argv], capture_output=True, text=True, timeout=60
    )
    assert done.returncode in (0, 2), done.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert not {name for name in imported if name.split(".")[0] in ("torch", "lightning")}
