"""Test plumbing shared by the test modules: running the command line, in a subprocess or in
process. Model builders and checks live in the `support` package (support/nets.py, support/cases.py,
...); what is here is only how the tests reach the code under test.

Fixtures
--------
checkout_env
    A copy of the environment for a child Python, with this checkout's root first on
    PYTHONPATH: a subprocess imports the `onnx_pathcond` of the tree under test, also when
    pytest runs from a worktree while the package is installed (editable) from another one.
    Any PYTHONPATH already set is kept after it.
run_command
    `run_command(argv, cwd=None)` runs `argv` with `checkout_env` (killed after
    `TIMEOUT_S`), captures stdout and stderr as text and returns the
    `subprocess.CompletedProcess` (a non-zero exit is not an error: the tests check the exit
    code themselves). Each item of argv goes through `str`, so paths can be passed as they are.
run_cli
    `run_cli(*args, cwd=None)`: the real command line,
    `python -m onnx_pathcond.cli ARGS...`, through `run_command`.
invoke_cli
    `invoke_cli(*args)`: `onnx_pathcond.cli.main` in process through click's `CliRunner`,
    returning click's `Result` with `stdout` and `stderr` captured apart on every click the
    project accepts (click < 8.2 mixes stderr into stdout unless told `mix_stderr=False`, an
    argument 8.2 removed; from 8.2 on they are always apart, `output` being both).
    Arguments go through `str`.

A test that needs something these do not give (a `Popen` to send a signal to, a script run
with its own environment) builds it locally, from `checkout_env` where it starts the package.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner

from support.repo import ROOT  # noqa: E402  (the repository, whatever the working directory)
TIMEOUT_S = 120  # a hung child fails its test instead of stalling the run

# Code that needs PyTorch: `import torch`, `from torch ...`, `pytest.importorskip("torch")`.
_USES_TORCH = re.compile(r"^\s*(import torch\b|from torch\b|.*importorskip\([\"']torch[\"']\))", re.M)


def _uses_torch(item, modules: dict) -> bool:
    """Whether a test needs PyTorch: its module imports it at the top, or the test itself, or a
    function of its module that it calls, does."""
    module = item.module
    if module not in modules:
        source = inspect.getsource(module)
        top = "\n".join(line for line in source.splitlines() if not line.startswith((" ", "\t", ")")))
        helpers = [name for name, value in vars(module).items() if inspect.isfunction(value)
                   and value.__module__ == module.__name__ and _USES_TORCH.search(inspect.getsource(value))]
        modules[module] = (bool(_USES_TORCH.search(top)),
                           re.compile(r"\b(" + "|".join(map(re.escape, helpers)) + r")\b") if helpers else None)
    at_top, helpers = modules[module]
    function = getattr(item, "function", None)
    if at_top or function is None:
        return at_top
    body = inspect.getsource(function)
    return bool(_USES_TORCH.search(body) or (helpers is not None and helpers.search(body)))


def pytest_collection_modifyitems(config, items):
    """Mark `torch` every test that needs PyTorch (`-m "not torch"` runs the rest)."""
    modules: dict = {}
    for item in items:
        if _uses_torch(item, modules):
            item.add_marker(pytest.mark.torch)


@pytest.fixture
def checkout_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@pytest.fixture
def run_command(checkout_env):
    def run(argv, cwd=None) -> subprocess.CompletedProcess:
        return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=TIMEOUT_S, cwd=cwd,
                              env=checkout_env)
    return run


@pytest.fixture
def run_cli(run_command):
    def run(*args, cwd=None) -> subprocess.CompletedProcess:
        return run_command([sys.executable, "-m", "onnx_pathcond.cli", *args], cwd=cwd)
    return run


def _separating_runner() -> CliRunner:
    try:  # click < 8.2 mixes stderr into stdout unless told not to
        return CliRunner(mix_stderr=False)
    except TypeError:  # click >= 8.2: always apart, and the argument is gone
        return CliRunner()


@pytest.fixture
def invoke_cli():
    from onnx_pathcond.cli import main

    def invoke(*args):
        return _separating_runner().invoke(main, [str(a) for a in args])
    return invoke
