"""Checkpointed forward masses: the numpy statistics drop masses and recompute them in the
backward pass; the result must not change, and the masses held must really shrink."""

import math

import numpy as np
import pytest

from nets import mlp
from onnx_pathcond.api import analyse_model, load_model
from onnx_pathcond.stats import NumpyPathNetwork


def _run(model, budget):
    graph, analysis, _ = analyse_model(model)
    out = {}

    def collect(use, g):
        key = (use.ref.name if use.ref is not None else use.input_name, use.node.name, use.role)
        out[key] = np.array(g, dtype=np.float64)

    net = NumpyPathNetwork(graph, analysis, collect, budget=budget)
    net.run()
    return out, net


@pytest.mark.parametrize("path", ["models/resnet.dynamo_bn.onnx", "models/densenet.legacy_bn.onnx",
                                  "models/unet.dynamo_bn.onnx", "models/mobilenet.legacy_fused.onnx"])
def test_checkpoints_leave_diag_g_unchanged_and_hold_less(path):
    model = load_model(path)
    everything, full = _run(model, math.inf)
    small, lean = _run(model, 1.0)  # smaller than any mass: the tightest plan there is
    assert everything.keys() == small.keys() and everything
    for key, g in everything.items():
        np.testing.assert_allclose(small[key], g, rtol=1e-12, atol=0, err_msg=str(key))
    assert lean.mass_bytes_peak < full.mass_bytes_peak


def test_long_chain_recomputes_without_recursion():
    model = mlp([4] + [6] * 1200 + [3], seed=1, scale=0.4)  # masses stay of order one
    everything, _ = _run(model, math.inf)
    small, lean = _run(model, 1.0)
    assert lean.recomputed_nodes > 0
    for key, g in everything.items():
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(small[key], g, rtol=1e-12, atol=0)


def test_budget_must_be_positive():
    model = mlp([3, 4, 2])
    graph, analysis, _ = analyse_model(model)
    with pytest.raises(ValueError, match="budget"):
        NumpyPathNetwork(graph, analysis, lambda use, g: None, budget=0)


def test_dense_layers_next_to_graph_inputs_stay_factored():
    # Batch of one: every Gemm's g is an outer product, kept as two vectors, never as a matrix,
    # the first layer (its inputs are the graph's, with no group) included.
    from onnx_pathcond.criteria.pathcond import ProblemBuilder
    from onnx_pathcond.stats import compute_diag_g

    model = mlp([50, 40, 30, 5], seed=4)
    graph, analysis, groups = analyse_model(model)
    builder = ProblemBuilder(groups, analysis.uses, analysis.shared)
    compute_diag_g(graph, analysis, builder.add)
    weights = [b for b in builder.blocks if b.name.startswith("w")]
    assert len(weights) == 3
    assert all(b.G is None and b.factors is not None for b in weights)
