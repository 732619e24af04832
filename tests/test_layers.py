"""Imports point down the layers (docs/architecture.md): a lower layer never imports a higher one,
not even inside a function. A type two layers share lives in the bottom layer."""

from __future__ import annotations

import ast

from tests.helpers import REPO

# Top to bottom; a module may import its own layer and the layers below it. Names are the first
# part of a module's path under orchestrator/ (a package or a top-level module).
LAYERS = [
    {"cli", "__main__", "devcluster", "slurm"},
    {"controller"},
    {"agent"},
    {"training", "integrations", "api", "__init__"},  # training code and what it imports
    {"worker"},
    {"checkpoint"},
    {"monitor"},
    {"scaling"},
    {"config"},
    {"types", "messages", "events", "errors", "run_dir", "installation", "dev_clusters", "children",
     "node_memory"},
]


def _layer(part: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if part in names)


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] if node.module != "orchestrator" else [f"orchestrator.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found += [(node.lineno, name) for name in names if name == "orchestrator" or name.startswith("orchestrator.")]
    return found


def test_every_module_has_a_layer() -> None:
    parts = {p.relative_to(REPO / "orchestrator").parts[0].removesuffix(".py")
             for p in (REPO / "orchestrator").rglob("*.py")}
    unplaced = sorted(part for part in parts if not any(part in names for names in LAYERS))
    assert not unplaced, f"give {unplaced} a layer in tests/test_layers.py and docs/architecture.md"


def test_imports_point_down_the_layers() -> None:
    upward = []
    for path in sorted((REPO / "orchestrator").rglob("*.py")):
        source = path.relative_to(REPO / "orchestrator").parts[0].removesuffix(".py")
        for line, name in _imports(ast.parse(path.read_text())):
            target = name.split(".")[1] if "." in name else "__init__"
            if _layer(target) < _layer(source):
                upward.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    assert upward == [], "imports that point up the layers:\n" + "\n".join(upward)


def test_the_check_sees_an_upward_import() -> None:
    tree = ast.parse("def f():\n    from orchestrator.controller.failures import Failure\n")
    assert _imports(tree) == [(2, "orchestrator.controller.failures")]
    assert _layer("controller") < _layer("monitor")
