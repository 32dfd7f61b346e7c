"""The package's layering: imports point one way (theory -> ops -> layers -> models -> inference /
training / tasks -> cli) and no two modules import each other, directly or through others.

Imports are read from the source with ``ast``: module-level and function-level imports both count.
"""

import ast
import pathlib

PKG = pathlib.Path(__file__).resolve().parents[1] / "ssmkit"

# Rank of each top-level part of the package; a module may import from its own rank or below.
RANK = {
    "_checks": 0, "_version": 0, "testing": 0, "theory": 0,
    "ops": 1,
    "layers": 2,
    "models": 3,
    # the synthetic tasks import only ssmkit._checks; the trainer samples its batches from them
    "inference": 4, "training": 4, "tasks": 4, "bench": 4, "compat": 4,
    # the command line uses the public API of the package's __init__
    "cli": 6, "__init__": 6, "__main__": 6,
}


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def _imports(name: str, path: pathlib.Path, mods: dict) -> set[str]:
    """The ssmkit modules ``name`` imports (a package's name when a name is not a submodule)."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("ssmkit"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            if not base.startswith("ssmkit"):
                continue
            for a in node.names:
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base)
    return {m for m in out if m in mods and m != name}


def _graph():
    mods = _modules()
    return {name: _imports(name, path, mods) for name, path in mods.items()}


def _part(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_imports_point_down():
    upward = [f"{m} -> {d}" for m, deps in _graph().items() for d in deps
              if RANK[_part(d)] > RANK[_part(m)]]
    assert not upward, "imports that run upward:\n" + "\n".join(sorted(upward))


def test_no_import_circles():
    graph = _graph()
    # A package's __init__ re-exports its children; a child reaching its own package's
    # __init__ is the only edge not counted (Python imports the package first anyway).
    def deps(m):
        return {d for d in graph[m] if not m.startswith(d + ".")}

    circles, state = [], {}

    def visit(m, stack):
        state[m] = 1
        stack.append(m)
        for d in sorted(deps(m)):
            if state.get(d) == 1:
                circles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert not circles, "import circles:\n" + "\n".join(circles)
