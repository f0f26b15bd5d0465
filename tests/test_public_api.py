"""One address per name: a module's ``__all__`` lists what it defines, and importers take it from there.

Re-exports are allowed only in the packages' ``__init__`` files, each a documented API: `gmlp_vision` (the public
API, loaded lazily), `gmlp_vision.config`, `gmlp_vision.data` and `gmlp_vision.cli`. Read from the source with `ast`,
so nothing here imports torch except the check that the public API loads.
"""

import ast
import functools
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SRC = ROOT / "src"
PACKAGE = "gmlp_vision"
# Where code imports the package from: the library, its tests and its benchmarks (tools/ runs old revisions too).
IMPORTERS = ("src", "tests", "benchmarks")


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def is_package(name: str) -> bool:
    return modules()[name].name == "__init__.py"


def bound(body: list[ast.stmt]) -> set[str]:
    """The names a module's top level binds by ``def``, ``class`` or assignment (in ``if``/``try`` blocks too)."""
    names: set[str] = set()
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, ast.If | ast.Try):
            handlers = [h.body for h in getattr(node, "handlers", [])]
            for block in (node.body, node.orelse, getattr(node, "finalbody", []), *handlers):
                names |= bound(block)
    return names


@functools.cache
def defined(name: str) -> frozenset[str]:
    return frozenset(bound(ast.parse(modules()[name].read_text()).body))


def declared_all(tree: ast.Module) -> list[str] | None:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return list(ast.literal_eval(node.value))
    return None


def test_the_public_api_imports():
    import gmlp_vision

    assert "Classifier" in gmlp_vision.__all__ and "__version__" in gmlp_vision.__all__
    for name in gmlp_vision.__all__:
        assert getattr(gmlp_vision, name) is not None, name
    assert set(dir(gmlp_vision)) >= set(gmlp_vision.__all__)


def test_the_kept_addresses():
    """Addresses that exports, model cards and users rely on stay where they are."""
    from gmlp_vision.checkpoint import content_digest
    from gmlp_vision.predict import Classifier

    assert callable(content_digest) and callable(Classifier.load) and callable(Classifier.logits)
    assert importlib.import_module(f"{PACKAGE}.fused").__name__ == f"{PACKAGE}.fused"


@pytest.mark.parametrize("package", [n for n in modules() if is_package(n)])
def test_each_package_api_imports(package):
    """A package ``__init__`` that re-exports is a documented API: its docstring says so, and every name loads."""
    module = importlib.import_module(package)
    names = declared_all(ast.parse(modules()[package].read_text()))
    if names is None:
        return
    assert "__all__" in (module.__doc__ or ""), f"{package}'s docstring should say its __all__ is its API"
    for name in names:
        assert getattr(module, name) is not None, f"{package}.{name}"


def test_every_all_lists_only_what_its_module_defines():
    wrong = []
    for name, path in modules().items():
        names = declared_all(ast.parse(path.read_text()))
        if names is None or is_package(name):
            continue
        wrong += [f"{name}.{n}" for n in names if n not in defined(name)]
    assert not wrong, f"listed in __all__ but defined elsewhere (import them from where they are defined): {wrong}"


def test_importers_take_each_name_from_its_defining_module():
    """``from gmlp_vision.X import Y``: Y is defined in X, is a submodule of X, or X is a package (its API)."""
    wrong = []
    for folder in IMPORTERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if not (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in modules()):
                    continue
                if is_package(node.module):
                    continue
                wrong += [
                    f"{path.relative_to(ROOT)}:{node.lineno}: {node.module}.{a.name}"
                    for a in node.names
                    if a.name not in defined(node.module) and f"{node.module}.{a.name}" not in modules()
                ]
    assert not wrong, f"imported from a module that does not define it: {wrong}"
