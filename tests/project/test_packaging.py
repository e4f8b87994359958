"""What ships with the package: `python -m onnx_pathcond`, the typing marker, the licence."""

import os
import sys

import pytest

import onnx_pathcond

from support.repo import ROOT  # noqa: E402  (the repository, whatever the working directory)


@pytest.fixture
def run_module(run_command):
    """`run_module(*args)`: `python -m onnx_pathcond ARGS...` (the package, not its cli module)."""
    def run(*args):
        return run_command([sys.executable, "-m", "onnx_pathcond", *args])
    return run


def test_python_dash_m_prints_the_version(run_module):
    done = run_module("--version")
    assert done.returncode == 0, done.stderr
    assert onnx_pathcond.__version__ in done.stdout


def test_python_dash_m_prints_the_help(run_module):
    done = run_module("--help")
    assert done.returncode == 0, done.stderr
    assert "IN" in done.stdout and "--solver" in done.stdout


def test_a_child_python_imports_this_checkouts_package(run_command, tmp_path):
    # conftest's environment for subprocesses: from any folder, the package of the tree
    # under test, not one installed from elsewhere
    done = run_command([sys.executable, "-c", "import onnx_pathcond; print(onnx_pathcond.__file__)"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert os.path.dirname(done.stdout.strip()) == os.path.join(ROOT, "onnx_pathcond")


def test_python_dash_m_fails_like_the_command_on_a_missing_input(tmp_path, run_module):
    done = run_module(str(tmp_path / "missing.onnx"), str(tmp_path / "out.onnx"))
    assert done.returncode == 2
    assert done.stderr.startswith("error: ")


def test_package_is_marked_as_typed():
    assert os.path.isfile(os.path.join(os.path.dirname(onnx_pathcond.__file__), "py.typed"))


def test_pyproject_ships_the_typing_marker_and_names_the_licence():
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["onnx_pathcond"]
    assert project["project"]["license"] == {"text": "MIT"}
    assert "License :: OSI Approved :: MIT License" in project["project"]["classifiers"]
    with open(os.path.join(ROOT, "LICENSE")) as f:
        assert f.readline().strip() == "MIT License"


def test_documentation_links_resolve_inside_the_repository():
    import glob
    import re

    pages = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
    assert len(pages) >= 3
    for page in pages:
        with open(page, encoding="utf-8") as f:
            text = f.read()
        assert "DESIGN.md" not in text and "shared folder" not in text, page
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
            if "://" in target:
                continue
            assert os.path.exists(os.path.join(os.path.dirname(page), target)), (page, target)
