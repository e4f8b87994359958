"""The README's two set-up commands stay true to what CI runs and to what ships."""

import os
import re
from support import repo


def readme_commands():
    text = open(repo.path("README.md")).read()
    section = text.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    return [line.strip() for line in section.splitlines() if line.startswith("    ")]


def test_readme_has_two_setup_commands():
    assert len(readme_commands()) == 2


def test_ci_runs_the_readme_test_command():
    ci = open(repo.path(".ci", "run")).read()
    assert readme_commands()[1] in ci


def test_readme_run_command_uses_a_shipped_model():
    model = re.search(r"onnx-pathcond (models/\S+\.onnx)", readme_commands()[0]).group(1)
    assert os.path.exists(repo.path(model))
