"""The package's shape, read from its source with `ast`: imports flow one way, and inference never loads training.

Every ``import`` counts, those inside functions too: a cycle broken only by a function-level import is still a cycle.
Layers: the configuration never loads the data code, training never loads the reports, and the runtime
(`runtime`, `cpu`) sits below both training and inference.
"""

import ast
import functools
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src"
PACKAGE = "gmlp_vision"
# Training: the loop, its pieces and the run it writes. Only the CLI (and training itself) may import these.
TRAINING = tuple(
    f"{PACKAGE}.{name}"
    for name in "train loop state step graphs batches callbacks distributed optim augment policy policy_timm rundir "
    "resume_check transfer pretrained".split()
)
# Inference: what evaluation, predict, export, the exported files and the reports run. None of it may load training
# code, directly or through other modules.
INFERENCE = tuple(
    f"{PACKAGE}.{name}"
    for name in (
        "evaluate predict outputs export artifacts card hub report report_eval serve serve_requests serve_run"
    ).split()
)
NOT_YET: tuple[str, ...] = ()  # modules named above that do not exist yet


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
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


def test_the_layer_lists_name_real_modules():
    missing = sorted(set(TRAINING + INFERENCE) - import_graph().keys() - set(NOT_YET))
    assert not missing, f"no such modules (renamed? update the lists): {missing}"


@pytest.mark.parametrize("module", INFERENCE)
def test_inference_never_imports_training_code(module):
    graph = import_graph()
    if module not in graph:
        pytest.skip(f"{module} does not exist")
    loaded = reachable(graph, module)
    assert not loaded & set(TRAINING), f"{module} imports {', '.join(sorted(loaded & set(TRAINING)))}"


def in_package(module: str, package: str) -> bool:
    """``module`` is ``package`` or one of its modules (``gmlp_vision.data.base`` is in ``gmlp_vision.data``)."""
    return module == package or module.startswith(f"{package}.")


def test_the_configuration_never_loads_data():
    graph = import_graph()
    config = [m for m in graph if in_package(m, f"{PACKAGE}.config") or m == f"{PACKAGE}.presets"]
    loads = {m: sorted(d for d in reachable(graph, m) if in_package(d, f"{PACKAGE}.data")) for m in config}
    assert config and not any(loads.values()), f"configuration modules loading data: {loads}"


def test_transfer_reads_weights_without_the_checkpoint_module():
    assert f"{PACKAGE}.checkpoint" not in import_graph()[f"{PACKAGE}.transfer"]


def test_training_never_loads_the_reports():
    reports = {f"{PACKAGE}.report", f"{PACKAGE}.report_eval"}
    loaded = reachable(import_graph(), f"{PACKAGE}.train") & reports
    assert not loaded, f"train imports {', '.join(sorted(loaded))}"


def test_precision_is_decided_in_one_place():
    # What a --precision value means (its dtype, its scaler, whether it can be captured) is `precision.Precision`'s;
    # the config lists the values, the presets pick them, and nothing else compares or maps their names.
    names, allowed = (
        {"fp32", "bf16", "fp16"},
        {f"{PACKAGE}.precision", f"{PACKAGE}.presets", f"{PACKAGE}.config.groups"},
    )
    found = []
    for module, (_, tree) in sources().items():
        for node in ast.walk(tree):
            keys = [node.left, *node.comparators] if isinstance(node, ast.Compare) else []
            keys += node.keys if isinstance(node, ast.Dict) else []
            if module not in allowed and any(isinstance(k, ast.Constant) and k.value in names for k in keys):
                found.append(f"{module}:{node.lineno}")
    assert not found, f"precision names decided outside precision.py: {found}"


# Limits on the code's size and shape: a module a newcomer can read, functions that fit on a screen, no
# parameter lists that hide a missing object, and a training loop with no closures.
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60  # from `def` to the last line, docstring included
MAX_PUBLIC_PARAMETERS = 8  # all but self/cls, keyword-only ones included
MAX_FMT_SKIPS = 5
MAX_IMPORT_LEVELS = 9  # the longest chain of package imports, counting the module that starts it
# The same, on the plain module graph: ``__main__`` and the packages' ``__init__`` count as modules of their own.
MAX_RAW_IMPORT_LEVELS = 9
LOOP_MODULES = ("train", "loop", "state", "step", "batches", "augment", "optim")


@functools.cache
def sources() -> dict[str, tuple[str, ast.Module]]:
    return {module_name(p): (p.read_text(), ast.parse(p.read_text())) for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


def parameters(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    a = fn.args
    names = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)] + [x.arg for x in (a.vararg, a.kwarg) if x]
    return [n for n in names if n not in ("self", "cls")]


def test_limits_see_the_package():
    found = sources()
    assert len(found) > 30 and "gmlp_vision.train" in found
    assert sum(len(functions(tree)) for _, tree in found.values()) > 200


def test_no_module_is_too_long():
    long = {name: len(text.splitlines()) for name, (text, _) in sources().items()}
    over = {name: n for name, n in long.items() if n > MAX_MODULE_LINES}
    assert not over, f"modules over {MAX_MODULE_LINES} lines: {over}"


def test_no_function_is_too_long():
    over = {
        f"{name}.{fn.name}": fn.end_lineno - fn.lineno + 1
        for name, (_, tree) in sources().items()
        for fn in functions(tree)
        if fn.end_lineno - fn.lineno + 1 > MAX_FUNCTION_LINES
    }
    assert not over, f"functions over {MAX_FUNCTION_LINES} lines: {over}"


def test_no_public_function_takes_too_many_parameters():
    over = {
        f"{name}.{fn.name}": len(parameters(fn))
        for name, (_, tree) in sources().items()
        for fn in functions(tree)
        if not fn.name.startswith("_") and len(parameters(fn)) > MAX_PUBLIC_PARAMETERS
    }
    assert not over, f"public functions with more than {MAX_PUBLIC_PARAMETERS} parameters: {over}"


@pytest.mark.parametrize("module", LOOP_MODULES)
def test_no_closures_in_the_training_loop(module):
    _, tree = sources()[f"{PACKAGE}.{module}"]
    nested = sorted(
        f"{fn.name}: {type(inner).__name__} at line {inner.lineno}"
        for fn in functions(tree)
        for inner in ast.walk(fn)
        if inner is not fn and isinstance(inner, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
    )
    assert not nested, f"{module}.py defines functions inside functions: {nested}"


def test_the_formatter_lays_out_the_code():
    skips = sum(text.count("# fmt: skip") + text.count("# fmt: off") for text, _ in sources().values())
    assert skips <= MAX_FMT_SKIPS


def stacked_levels(graph: dict[str, set[str]]) -> dict[str, int]:
    """Each module's level: 1 for a module that imports no package module, else 1 + the highest level it imports.

    Modules on a cycle get no level of their own but the number of modules (`test_no_import_cycles` names them).
    """
    levels: dict[str, int] = {}
    while len(levels) < len(graph):
        placed = {
            name: 1 + max((levels[d] for d in deps), default=0)
            for name, deps in graph.items()
            if name not in levels and deps <= levels.keys()
        }
        if not placed:
            return {**levels, **dict.fromkeys(set(graph) - levels.keys(), len(graph))}
        levels.update(placed)
    return levels


def import_levels(graph: dict[str, set[str]]) -> dict[str, int]:
    """`stacked_levels`, where a package's ``__init__`` counts as what it re-exports and ``__main__`` not at all.

    A package's ``__init__`` only re-exports, so importing it counts as importing what it re-exports; ``__main__`` is
    the ``python -m`` door to the CLI, not a level of its own.
    """
    packages = {name for name in graph if (SRC / name.replace(".", "/")).is_dir()}

    def through_packages(names: set[str]) -> set[str]:
        return set().union(*(through_packages(graph[n]) if n in packages else {n} for n in names))

    return stacked_levels(
        {k: through_packages(v) - {k} for k, v in graph.items() if k not in packages and k != f"{PACKAGE}.__main__"}
    )


def deepest_chain(graph: dict[str, set[str]], levels: dict[str, int]) -> list[str]:
    """The longest chain of imports: from the deepest module, each time on to the deepest module it imports."""
    chain = [max(sorted(levels), key=levels.__getitem__)]
    while (deps := graph[chain[-1]] & levels.keys()) and len(chain) <= len(levels):  # bounded on a cycle too
        chain.append(max(sorted(deps), key=levels.__getitem__))
    return chain


def test_imports_stack_in_few_levels():
    levels = import_levels(import_graph())
    assert levels[f"{PACKAGE}.errors"] == 1 and levels[f"{PACKAGE}.cli.main"] > levels[f"{PACKAGE}.train"]
    top = sorted(levels.items(), key=lambda kv: -kv[1])[:6]
    assert max(levels.values()) <= MAX_IMPORT_LEVELS, f"the deepest modules and their levels: {top}"


def test_the_plain_module_graph_stacks_in_few_levels():
    graph = import_graph()
    levels = stacked_levels(graph)
    assert levels[f"{PACKAGE}.__main__"] > levels[f"{PACKAGE}.cli.main"] > levels[f"{PACKAGE}.train"]
    chain = deepest_chain(graph, levels)
    assert len(chain) == max(levels.values()) <= MAX_RAW_IMPORT_LEVELS, f"the longest chain: {' -> '.join(chain)}"
