"""The project's modules import one way, leaves to entry points: no cycle, no project import inside a function (or
through importlib), and fileio.py -- errors and atomic writing -- imports nothing of the project. Read from the
source with ast, so a new import that breaks the order fails here, not at some later import time."""

import ast
import graphlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = {p.stem: p for p in ROOT.glob("*.py")}


def project_imports(nodes):
    """The project modules named by the import statements among `nodes`."""
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & set(MODULES)


def test_modules_import_one_way_with_no_cycle_and_nothing_inside_a_function():
    graph, inner, dynamic = {}, [], []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        graph[name] = project_imports(tree.body)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner += [f"{name}.{node.name} imports {m}" for m in project_imports(ast.walk(node))]
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module" \
                    and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value in MODULES:
                dynamic.append(f"{name} imports {node.args[0].value} through importlib")
    order = list(graphlib.TopologicalSorter(graph).static_order())  # CycleError names the cycle
    assert not inner and not dynamic, inner + dynamic
    assert graph["fileio"] == set() and order.index("fileio") < order.index("cli") < order.index("train")
    entry_points = {"train", "evaluate", "teacher"}
    assert not [name for name, deps in graph.items() if deps & entry_points]  # nothing builds on a command


LAZY = {"httpx", "pyarrow", "gguf", "matplotlib"}  # optional (--api, data.py import) or slow (a conversion, a plot)


def test_a_library_is_imported_inside_a_function_only_when_optional_or_slow():
    """Any other import sits at the top of its module, where a reader finds what the module needs."""
    inner = []
    for name, path in MODULES.items():
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, (ast.Import, ast.ImportFrom)):
                        roots = {a.name.split(".")[0] for a in node.names} if isinstance(node, ast.Import) \
                            else {(node.module or "").split(".")[0]}
                        inner += [f"{name}.{fn.name} imports {r}" for r in roots - LAZY]
    assert not inner, inner


def test_the_modules_lines_are_at_most_120_characters():
    """A reader sees a whole line in a side-by-side view (#57; benchmarks and experiments scripts are not held to it)."""
    long = [f"{name}.py:{n} ({len(line)})" for name, path in MODULES.items()
            for n, line in enumerate(path.read_text().splitlines(), 1) if len(line) > 120]
    assert not long, long


def test_the_checker_sees_a_cycle_and_an_import_inside_a_function():
    tree = ast.parse("import cli\ndef f():\n    from checkpoint import load_tokenizer\n")
    assert project_imports(tree.body) == {"cli"} and project_imports(ast.walk(tree)) == {"cli", "checkpoint"}
    sorter = graphlib.TopologicalSorter({"cli": {"checkpoint"}, "checkpoint": {"cli"}})
    try:
        list(sorter.static_order())
    except graphlib.CycleError:
        return
    raise AssertionError("a cycle went unseen")
