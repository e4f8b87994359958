"""What ships with the package: `python -m onnx_pathcond`, the typing marker, the licence."""

import os
import subprocess
import sys

import onnx_pathcond

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_module(*args):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", "onnx_pathcond", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_python_dash_m_prints_the_version():
    done = _run_module("--version")
    assert done.returncode == 0, done.stderr
    assert onnx_pathcond.__version__ in done.stdout


def test_python_dash_m_prints_the_help():
    done = _run_module("--help")
    assert done.returncode == 0, done.stderr
    assert "IN" in done.stdout and "--solver" in done.stdout


def test_python_dash_m_fails_like_the_command_on_a_missing_input(tmp_path):
    done = _run_module(str(tmp_path / "missing.onnx"), str(tmp_path / "out.onnx"))
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
