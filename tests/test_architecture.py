"""The package's shape, read from its source with `ast`: imports flow one way, and inference never loads training.

Every ``import`` counts, those inside functions too: a cycle broken only by a function-level import is still a cycle.
"""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src"
PACKAGE = "gmlp_vision"
# Inference: what predict, export and the reports run. None of it may load the training loop or its pieces.
INFERENCE = ("gmlp_vision.evaluate", "gmlp_vision.predict", "gmlp_vision.export", "gmlp_vision.report")
TRAINING = ("gmlp_vision.train", "gmlp_vision.optim", "gmlp_vision.augment", "gmlp_vision.policy",
            "gmlp_vision.rundir", "gmlp_vision.transfer", "gmlp_vision.loop", "gmlp_vision.state")  # fmt: skip


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Each package module and the package modules it imports (a ``from pkg import submodule`` names the submodule)."""
    modules = {module_name(p): p for p in (SRC / PACKAGE).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets.add(node.module)
                targets.update(f"{node.module}.{a.name}" for a in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_the_graph_sees_the_package():
    graph = import_graph()
    assert {"gmlp_vision.train", "gmlp_vision.data.registry", "gmlp_vision.cli"} <= graph.keys()
    assert "gmlp_vision.evaluate" in graph["gmlp_vision.train"]
    assert "gmlp_vision.data.folders" not in graph["gmlp_vision.data.registry"]  # loaders load by name


def test_no_import_cycles():
    graph = import_graph()
    cycles = sorted(name for name in graph if name in reachable(graph, name))
    assert not cycles, f"modules on an import cycle: {', '.join(cycles)}"


@pytest.mark.parametrize("module", INFERENCE)
def test_inference_never_imports_training_code(module):
    loaded = reachable(import_graph(), module)
    assert not loaded & set(TRAINING), f"{module} imports {', '.join(sorted(loaded & set(TRAINING)))}"
