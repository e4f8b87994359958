"""The package's modules import each other in one direction only (no cycle, lazy imports
inside functions included), so each step can be read and tested on its own. And the files
of tests/ take no `_private` name from one another: what they share is public (or a fixture
in conftest.py), so a helper can be renamed inside its own file without breaking another."""

import ast
import glob
import os

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(TESTS)
PACKAGE = "onnx_pathcond"
PACKAGE_DIR = os.path.join(ROOT, PACKAGE)


def _module_name(path):
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _imports():
    paths = [os.path.join(folder, name) for folder, _, files in os.walk(PACKAGE_DIR) for name in files
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


def _is_private(name):
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_names_taken(sources):
    """(module, line, "other._name") for each private name that a module of `sources`
    ({module name: source text}) takes from another of them, by `from other import _name`
    or as `other._name` after `import other [as alias]`; lazy imports included."""
    taken = []
    for module, text in sorted(sources.items()):
        tree = ast.parse(text)
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and not node.level and node.module in sources \
                    and node.module != module:
                taken += [(module, node.lineno, f"{node.module}.{a.name}") for a in node.names if _is_private(a.name)]
            elif isinstance(node, ast.Import):
                aliases.update((a.asname or a.name, a.name) for a in node.names
                               if a.name in sources and a.name != module)
        taken += [(module, node.lineno, f"{aliases[node.value.id]}.{node.attr}") for node in ast.walk(tree)
                  if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                  and node.value.id in aliases and _is_private(node.attr)]
    return sorted(taken)


def test_test_modules_take_no_private_name_from_each_other():
    sources = {}
    for path in glob.glob(os.path.join(TESTS, "**", "*.py"), recursive=True):
        with open(path, encoding="utf-8") as f:  # by the name it is imported as: support.nets, conftest
            sources[os.path.relpath(path, TESTS)[:-3].replace(os.sep, ".")] = f.read()
    assert {"support.cases", "support.nets", "conftest", "project.test_module_imports"} <= set(sources)
    assert _private_names_taken(sources) == []


def test_the_private_name_finder_finds_both_spellings():
    sources = {
        "helpers": "_hidden = 1\nshown = 2\nfrom helpers import _hidden\n",
        "user": ("from helpers import _hidden, shown\nimport helpers as h\nh._hidden, h.shown, h.__doc__\n"
                 "from os import _exit\n\n\ndef f():\n    from helpers import _late\n"),
    }
    assert _private_names_taken(sources) == [("user", 1, "helpers._hidden"), ("user", 3, "helpers._hidden"),
                                             ("user", 8, "helpers._late")]


def _package_sources():
    """{dotted module name: source} of every module of the onnx_pathcond package, its relative
    imports written out as absolute ones (so that the finder sees `from .solve import _x`)."""
    root = os.path.join(os.path.dirname(TESTS), "onnx_pathcond")
    sources = {}
    for folder, _, files in os.walk(root):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            parts = os.path.relpath(path, os.path.dirname(root))[:-3].split(os.sep)
            package = parts[:-1]  # the package a relative import starts from (for __init__ too)
            module = ".".join(parts if parts[-1] != "__init__" else parts[:-1])
            tree = ast.parse(open(path, encoding="utf-8").read())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.level:
                    base = package[:len(package) - (node.level - 1)]
                    node.module = ".".join(base + ([node.module] if node.module else []))
                    node.level = 0
            sources[module] = ast.unparse(tree)
    return sources


def test_package_modules_take_no_private_name_from_each_other():
    sources = _package_sources()
    assert {"onnx_pathcond.solve", "onnx_pathcond.criteria.enorm", "onnx_pathcond.criteria.cells"} <= set(sources)
    assert "from onnx_pathcond.solve import SolveResult" in sources["onnx_pathcond.criteria.enorm"]  # `..solve`
    assert _private_names_taken(sources) == []
    planted = dict(sources)
    planted["onnx_pathcond.criteria.enorm"] += "\nfrom onnx_pathcond.solve import _two_loop\n"
    assert [t[2] for t in _private_names_taken(planted)] == ["onnx_pathcond.solve._two_loop"]


def test_no_test_module_imports_another():
    """What tests share lives in tests/support: a test module that imported another would only
    find it when pytest had put that one's folder on the path (running its folder alone fails)."""
    taken = []
    for path in glob.glob(os.path.join(TESTS, "**", "test_*.py"), recursive=True):
        tree = ast.parse(open(path, encoding="utf-8").read())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            taken += [(os.path.relpath(path, TESTS), n) for n in names if n.split(".")[0].startswith("test_")]
    assert taken == []
