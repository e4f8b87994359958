"""The rescaled model computes the same function: onnxruntime on random inputs."""

import json
import os

import numpy as np
import onnx
import pytest

from support.checks import assert_equivalent, weight_rounding_noise
from support.nets import cnn, mlp
from onnx_pathcond import rescale
from support import repo

MODELS = repo.shipped_models()


def test_models_folder_is_not_empty():
    assert len(MODELS) >= 5


@pytest.mark.parametrize("path", MODELS, ids=os.path.basename)
def test_shipped_model_rescales_to_an_equivalent_model(path):
    before = onnx.load(path)
    after, report = rescale(path)
    assert report.verification.passed
    assert_equivalent(before, after)
    changed = report.groups.rescalable > 0
    assert bool(report.rewritten) == changed


def test_manifest_lists_every_shipped_model():
    with open(repo.path("models", "MANIFEST.json")) as f:
        manifest = json.load(f)
    files = {entry["file"] for entry in manifest}
    assert {os.path.basename(p) for p in MODELS} == files


GENERATED = [
    ("mlp", dict(widths=[20, 64, 64, 10], seed=0, scale=1.0)),
    ("mlp", dict(widths=[8, 200, 3, 150, 4], seed=1, scale=0.3)),
    ("mlp", dict(widths=[16] * 9 + [2], seed=2, scale=1.5)),  # deep
    ("mlp", dict(widths=[10, 30, 30, 5], seed=3, scale=1e-3)),  # tiny weights
    ("mlp", dict(widths=[10, 30, 30, 5], seed=4, scale=20.0)),  # large weights
    ("mlp", dict(widths=[12, 40, 40, 6], seed=5, prune=0.7)),  # pruned
    ("mlp", dict(widths=[12, 40, 6], seed=6, kind="matmul", batch=None)),
    ("cnn", dict(channels=[3, 8, 16, 8], seed=7, size=16)),
    ("cnn", dict(channels=[1, 4, 4, 4, 4], seed=8, size=16, pool="avg", scale=0.2)),
    ("cnn", dict(channels=[2, 32, 2, 32], seed=9, size=8, scale=3.0)),
]


@pytest.mark.parametrize("kind,kwargs", GENERATED, ids=[f"{k}{i}" for i, (k, _) in enumerate(GENERATED)])
def test_generated_network_is_equivalent(kind, kwargs):
    kwargs = dict(kwargs)
    batch = kwargs.pop("batch", 1)
    if kind == "mlp":
        model = mlp(batch=batch if batch else "N", **kwargs)
    else:
        model = cnn(**kwargs)
    after, report = rescale(model)
    assert report.groups.rescalable > 0
    assert report.criterion.F_after <= report.criterion.F_before
    # 1e-5, or twice the model's own noise where that is larger (the deep MLP: 1.5-3e-5,
    # where a rewrite lands depends on the last bits of u)
    assert_equivalent(model, after, rtol=max(1e-5, 2 * weight_rounding_noise(model)))
    for t in after.graph.initializer:
        assert np.all(np.isfinite(onnx.numpy_helper.to_array(t)))


def test_all_zero_layer_gives_no_nan():
    model = mlp([6, 8, 8, 3], seed=10)
    w = model.graph.initializer[2]  # second layer weight
    w.CopyFrom(onnx.numpy_helper.from_array(np.zeros_like(onnx.numpy_helper.to_array(w)), w.name))
    after, report = rescale(model)
    for t in after.graph.initializer:
        assert np.all(np.isfinite(onnx.numpy_helper.to_array(t)))
    assert_equivalent(model, after)


def test_without_onnxruntime_the_reference_evaluator_checks(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now fails
    model = cnn([2, 4, 3], size=8, seed=11)
    after, report = rescale(model)
    assert report.verification.engine == "onnx reference evaluator"
    assert report.verification.passed and 0 < report.verification.max_rel < 1e-5
    assert report.statistics.backend == "numpy"
