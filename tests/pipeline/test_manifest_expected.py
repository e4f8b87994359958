"""The shipped models whose MANIFEST entry says what the tool should find (`expected`, derived
from the PyTorch module's architecture by models/make_models.py, see models/README.md): the
analysis finds exactly those counts, rescalable and frozen by reason class."""

import json

import pytest

from onnx_pathcond import rescale
from support import repo

with open(repo.path("models", "MANIFEST.json")) as f:
    WITH_EXPECTED = [e for e in json.load(f) if "expected" in e]


def test_the_new_families_carry_expected_counts():
    assert {e["family"] for e in WITH_EXPECTED} >= {"shufflenet", "preact_resnet"}


@pytest.mark.parametrize("entry", WITH_EXPECTED, ids=[e["file"] for e in WITH_EXPECTED])
def test_analysis_finds_the_counts_the_manifest_expects(entry):
    expected = entry["expected"]["default"]  # no option
    _, report = rescale(repo.path("models", entry["file"]), dry_run=True)
    assert report.groups.rescalable == expected["rescalable"]
    assert report.groups.frozen_by_category == expected["frozen"]
    assert not report.barrier_ops


@pytest.mark.parametrize("entry", WITH_EXPECTED, ids=[e["file"] for e in WITH_EXPECTED])
def test_with_bn_statistics_the_analysis_finds_the_counts_the_manifest_expects(entry):
    expected = entry["expected"]["bn_statistics"]  # every channel feeding a BatchNorm freed
    _, report = rescale(repo.path("models", entry["file"]), dry_run=True, bn_statistics=True)
    assert report.groups.rescalable == expected["rescalable"]
    assert report.groups.frozen_by_category == expected["frozen"]
