"""Nodes with subgraphs (If, Loop) read tensors of the main graph that are not among their inputs:
an activation and a weight used inside a branch. The analysis counts those reads: the activation's
channels are frozen at the barrier the node is, the weight is not rescaled, the path network ends
there as at any barrier input, and the written model stays equivalent on both branches."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from support.checks import run

pytest.importorskip("onnxruntime")

from onnx_pathcond import rescale  # noqa: E402
from onnx_pathcond.graph import Graph  # noqa: E402
from onnx_pathcond.stats import diag_g_by_tensor  # noqa: E402
from onnx_pathcond.symmetry import analyse  # noqa: E402

RNG = np.random.default_rng(7)
W1 = RNG.standard_normal((4, 6)).astype(np.float32)   # x [N,4] -> 6 (free: Relu between W1 and W2)
W2 = RNG.standard_normal((6, 5)).astype(np.float32)   # -> h [N,5], read inside the branches
W3 = RNG.standard_normal((5, 3)).astype(np.float32)   # used inside the branches only


def _trunk():
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["a"]), helper.make_node("Relu", ["a"], ["ra"]),
             helper.make_node("MatMul", ["ra", "W2"], ["b"]), helper.make_node("Relu", ["b"], ["h"])]
    inits = [numpy_helper.from_array(W1, "W1"), numpy_helper.from_array(W2, "W2"), numpy_helper.from_array(W3, "W3")]
    return nodes, inits


def _model(nodes, inits, outputs, extra_inputs=()):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])
    graph = helper.make_graph(nodes, "g", [x, *extra_inputs], outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _branch(name, scale):
    out = helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [3, 3])
    nodes = [helper.make_node("MatMul", ["h", "W3"], [f"{name}_m"]),
             helper.make_node("Mul", [f"{name}_m", f"{name}_k"], [f"{name}_y"])]
    const = numpy_helper.from_array(np.array(scale, np.float32), f"{name}_k")
    return helper.make_graph(nodes, name, [], [out], initializer=[const])


def if_model(constant_condition=False):
    nodes, inits = _trunk()
    if constant_condition:
        inits.append(numpy_helper.from_array(np.array(True), "cond"))
    else:
        nodes += [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
                  helper.make_node("Greater", ["s", "zero"], ["cond"])]
        inits.append(numpy_helper.from_array(np.array(0.0, np.float32), "zero"))
    nodes.append(helper.make_node("If", ["cond"], ["y"], then_branch=_branch("then", 2.0),
                                  else_branch=_branch("else", -1.0)))
    return _model(nodes, inits, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 3])])


def loop_model():
    """A Loop run twice whose body adds h @ W3 to its carried value."""
    nodes, inits = _trunk()
    body = helper.make_graph(
        [helper.make_node("MatMul", ["h", "W3"], ["m"]), helper.make_node("Add", ["acc_in", "m"], ["acc_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [3, 3])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [3, 3])])
    inits += [numpy_helper.from_array(np.array(2, np.int64), "trips"), numpy_helper.from_array(np.array(True), "go"),
              numpy_helper.from_array(np.zeros((3, 3), np.float32), "acc0")]
    nodes.append(helper.make_node("Loop", ["trips", "go", "acc0"], ["y"], body=body))
    return _model(nodes, inits, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 3])])


def barrier_model():
    """The same trunk with h read by an ordinary barrier (Sigmoid): what the If must look like."""
    nodes, inits = _trunk()
    nodes.append(helper.make_node("Sigmoid", ["h"], ["y"]))
    return _model(nodes, inits[:2], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 5])])


def _feeds(sign):
    x = np.abs(RNG.standard_normal((3, 4))).astype(np.float32) * sign
    return {"x": x}


MODELS = {"if": if_model, "if_constant_condition": lambda: if_model(True), "loop": loop_model}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_reads_inside_subgraphs_are_frozen_and_the_result_equivalent(name):
    model = MODELS[name]()
    out, report = rescale(model)
    # the 6 channels between W1 and W2 are free; h's 5 are read inside the subgraph: frozen
    assert report.groups.rescalable == 6, report.summary()
    assert report.groups.frozen_by_category == {"barrier": 5}, report.groups.frozen_by_category
    assert any(name.split("_")[0].capitalize() in row.reason for row in report.frozen)
    after = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    assert np.array_equal(after["W3"], W3)  # read only inside the subgraph
    assert not np.allclose(after["W1"], W1)  # the free channels did move
    for sign in (1.0, -1.0):  # both branches of the If
        feeds = _feeds(sign)
        for a, b in zip(run(model, feeds), run(out, feeds)):
            assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_path_network_ends_at_the_subgraph_read_like_at_a_barrier(name):
    """diag(G) of the trunk's weights is the same as with h read by a Sigmoid."""
    got = diag_g_by_tensor(*_analysed(MODELS[name]()))
    expected = diag_g_by_tensor(*_analysed(barrier_model()))
    for weight in ("W1", "W2"):
        assert np.any(expected[weight])
        np.testing.assert_allclose(got[weight], expected[weight], rtol=1e-12)
    assert not np.any(got.get("W3", 0))


def _analysed(model):
    graph = Graph(model)
    return graph, analyse(graph)
