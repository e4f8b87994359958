"""The suite from any directory: every file the tests read is found through tests/support/repo.py,
rooted at the repository, and a missing shipped model fails instead of testing nothing."""

from __future__ import annotations

import re
import shutil
import sys

import pytest

from support import repo


def _collected(run_command, cwd):
    done = run_command([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                        repo.path("tests")], cwd=cwd)
    last = [line for line in done.stdout.splitlines() if line.strip()][-1]
    assert done.returncode == 0 and "error" not in last, done.stdout[-2000:]
    ids = {line.strip() for line in done.stdout.splitlines() if "::" in line}
    return int(re.match(r"(\d+) tests? collected", last).group(1)), {i.split("tests/", 1)[-1] for i in ids}


@pytest.mark.slow
def test_the_suite_collects_the_same_tests_from_another_directory(run_command, tmp_path):
    from_root = _collected(run_command, repo.ROOT)
    from_elsewhere = _collected(run_command, tmp_path)
    assert from_root[0] > 1000 and from_root == from_elsewhere


def test_every_manifest_model_is_there_and_listed_once():
    models = repo.shipped_models()
    assert len(models) == len(set(models)) == len(repo.manifest()) >= 30
    on_disk = sorted(str(p) for p in repo.MODELS.glob("*.onnx"))
    assert models == on_disk  # no model on disk that the manifest does not list


def test_a_missing_shipped_model_is_an_error_not_an_empty_list(tmp_path):
    shutil.copy(repo.path("models", "MANIFEST.json"), tmp_path)
    with pytest.raises(FileNotFoundError, match="missing"):
        repo.shipped_models(tmp_path)
    (tmp_path / "MANIFEST.json").write_text("[]")
    with pytest.raises(FileNotFoundError, match="lists no model"):
        repo.shipped_models(tmp_path)
    with pytest.raises(FileNotFoundError):
        repo.model("no-such-model.onnx")
