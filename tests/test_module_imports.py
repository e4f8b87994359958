"""The package's modules import each other in one direction only (no cycle, lazy imports
inside functions included), so each step can be read and tested on its own."""

import ast
import os

PACKAGE = "onnx_pathcond"


def _module_name(path):
    rel = os.path.relpath(path, ".")[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _imports():
    paths = [os.path.join(folder, name) for folder, _, files in os.walk(PACKAGE) for name in files
             if name.endswith(".py")]
    modules = {_module_name(p) for p in paths}

    def is_module(name):
        return name in modules

    graph = {}
    for path in paths:
        name = os.path.basename(path)
        module = _module_name(path)
        package = module if name == "__init__.py" else module.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.startswith(PACKAGE):  # `from .pkg import sub` depends on pkg.sub alone
                    found.update(f"{target}.{a.name}" if is_module(f"{target}.{a.name}") else target
                                 for a in node.names)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith(PACKAGE))
        graph[module] = found
    return {m: {t for t in targets if t in graph and t != m} for m, targets in graph.items()}


def _cycle(graph):
    """A list of modules that import each other in a circle, or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                return stack[stack.index(t):] + [t]
            if t not in state:
                found = visit(t)
                if found:
                    return found
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_cycle():
    graph = _imports()
    assert "onnx_pathcond.symmetry" in graph and graph["onnx_pathcond.symmetry"]
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
