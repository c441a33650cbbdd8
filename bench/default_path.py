"""How many lines a reader follows through `python train.py` (#57's "default path"): runs train.py in this process
with the given flags under a profiler, and counts the lines of every project function and method that ran (nested
ones once) plus the bodies of their classes outside the methods (fields, docstrings). Prints them per module,
largest first, and the largest functions.

    python bench/default_path.py -- --max-steps 2 --eval-questions 4 --out /tmp/default-path
"""
import ast
import runpy
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def ran(argv):
    """Run train.py with argv -> the (file, qualified name) of every project function and method called."""
    calls = set()

    def profile(frame, event, arg):
        if event == "call":
            code = frame.f_code
            path = Path(code.co_filename)
            if path.parent == ROOT:
                calls.add((path.name, code.co_qualname))

    sys.argv, sys.path[0] = ["train.py", *argv], str(ROOT)
    sys.setprofile(profile)
    try:
        runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    except SystemExit as e:
        if e.code:
            raise
    finally:
        sys.setprofile(None)
    return calls


def lines_read(calls):
    """{module: set of line numbers}, {(module, function): lines} of the functions that ran and their classes."""
    read, functions = {}, {}
    for name in sorted({f for f, _ in calls}):
        called = {q for f, q in calls if f == name}
        lines = read.setdefault(name, set())
        for qualname, node, parent in defs(ast.parse((ROOT / name).read_text())):
            if qualname not in called:
                continue
            span = range(first(node), node.end_lineno + 1)
            lines.update(span)
            functions[(name, qualname)] = len(span)
            if isinstance(parent, ast.ClassDef):  # its class's own lines: the header, fields, docstring
                for stmt in [parent, *parent.body]:
                    if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        lines.update(range(first(stmt), (stmt.lineno if stmt is parent else stmt.end_lineno) + 1))
    return read, functions


def defs(node, prefix="", parent=None):
    """Every function and method under node -> (qualified name as Python gives it, node, its parent node)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + child.name, child, node
            yield from defs(child, f"{prefix}{child.name}.<locals>.", child)
        elif isinstance(child, ast.ClassDef):
            yield from defs(child, f"{prefix}{child.name}.", child)
        else:
            yield from defs(child, prefix, parent if parent is not None else node)


def first(node):
    """The line a definition starts on: its first decorator's, else its own."""
    return min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])


def show(calls):
    read, functions = lines_read(calls)
    per_module = Counter({name: len(lines) for name, lines in read.items()})
    print(f"\ndefault path: {sum(per_module.values()):,} lines in {len(per_module)} modules, "
          f"{len(functions)} functions and methods")
    for name, n in per_module.most_common():
        print(f"  {name:18s} {n:5,}")
    print("largest functions:")
    for (name, fn), n in Counter(functions).most_common(25):
        print(f"  {name + ':' + fn:50s} {n:4}")


if __name__ == "__main__":
    show(ran(sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else []))
