"""Weights that are part of the model's interface keep their values: an initializer also
listed as a graph input (the caller may feed it) and a weight also returned as a graph output
(directly or through Identity)."""

import numpy as np
import onnx
from onnx import helper

from support.builders import weights
from support.checks import run
from support.nets import mlp
from onnx_pathcond import rescale


def test_an_initializer_that_is_a_graph_input_is_frozen_and_can_still_be_fed():
    model = mlp([4, 6, 5, 3], seed=2)
    first = model.graph.initializer[0]  # the first layer's weight
    model.graph.input.append(helper.make_tensor_value_info(first.name, first.data_type, list(first.dims)))
    out, report = rescale(model)
    before, after = weights(model), weights(out)
    assert np.array_equal(before[first.name], after[first.name])
    assert any(row.category == "fixed_weight" and "graph input" in row.reason for row in report.frozen)
    assert report.groups.rescalable > 0  # the second hidden layer is still rescaled
    assert any(not np.array_equal(before[k], after[k]) for k in before)
    rng = np.random.default_rng(0)
    fed = {"x": rng.standard_normal((1, 4)).astype(np.float32),
           first.name: rng.standard_normal(tuple(first.dims)).astype(np.float32)}
    a, b = run(model, fed)[0], run(out, fed)[0]
    assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()


def test_a_weight_returned_as_a_graph_output_is_frozen():
    model = mlp([4, 6, 5, 3], seed=3)
    w = model.graph.initializer[2]  # the second layer's weight, read by its Gemm
    model.graph.node.append(helper.make_node("Identity", [w.name], ["w_out"]))
    model.graph.output.append(helper.make_tensor_value_info("w_out", w.data_type, list(w.dims)))
    onnx.checker.check_model(model)
    out, report = rescale(model)  # the default check compares every output, w_out included
    assert report.verification.passed
    assert np.array_equal(weights(model)[w.name], weights(out)[w.name])
    assert any("graph output 'w_out'" in row.reason for row in report.frozen)
