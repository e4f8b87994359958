"""Tool bugs that the random models (tests/support/randmodels.py) found, each reduced to a small model
written out here, checked through the API and the command line."""

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from support.checks import assert_equivalent
from onnx_pathcond import rescale
from onnx_pathcond.api import analyse_model
from onnx_pathcond.criteria.pathcond import ProblemBuilder
from onnx_pathcond.criteria.pathcond import coordinate_descent
from onnx_pathcond.stats import compute_diag_g

pytest.importorskip("onnxruntime")


def _tied_depthwise_reading_permuted_channels():
    """conv 3→3, ReLU, the channels permuted (Split [2, 1] and Concat in the other order:
    channel j of the result is channel (j + 2) mod 3), a depthwise conv, ReLU, pool, Gemm. The
    two convolutions share their bias, so output channel j of both is one group; depthwise cell j
    then joins group j (its output) to group (j + 2) mod 3 (its input): every group is on both
    sides of the depthwise weight, but never in the same cell.

    Reduced from random model 4735 (a shared bias, a Split/Concat, a depthwise Conv1d), which
    crashed computing diag(G): `ValueError: zero-size array to reduction operation maximum`."""
    rng = np.random.default_rng(4735)
    inits = [numpy_helper.from_array(rng.standard_normal([3, 3, 3]).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal([3, 1, 3]).astype(np.float32), "w_depthwise"),
             numpy_helper.from_array(rng.standard_normal([3]).astype(np.float32), "shared_bias"),
             numpy_helper.from_array(np.asarray([2, 1], np.int64), "split"),
             numpy_helper.from_array(rng.standard_normal([2, 3]).astype(np.float32), "w_head"),
             numpy_helper.from_array(rng.standard_normal([2]).astype(np.float32), "b_head")]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "shared_bias"], ["c1"], kernel_shape=[3], pads=[1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Split", ["r1", "split"], ["first", "last"], axis=1),
        helper.make_node("Concat", ["last", "first"], ["permuted"], axis=1),
        helper.make_node("Conv", ["permuted", "w_depthwise", "shared_bias"], ["c2"], kernel_shape=[3], pads=[1, 1],
                         group=3),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w_head", "b_head"], ["y"], transB=1),
    ]
    graph = helper.make_graph(nodes, "tied_depthwise", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    onnx.checker.check_model(model, full_check=True)
    return model


def test_a_depthwise_conv_whose_groups_meet_in_no_cell_is_rescaled():
    model = _tied_depthwise_reading_permuted_channels()
    out, report = rescale(model)
    assert report.groups.rescalable == 3  # the three tied channels
    assert report.verification.passed
    assert_equivalent(model, out)


def test_the_same_through_the_command_line(tmp_path):
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(_tied_depthwise_reading_permuted_channels(), src)
    proc = subprocess.run([sys.executable, "-m", "onnx_pathcond.cli", str(src), str(dst), "-q"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr


def _problem_and_parameters(model):
    """The tool's Problem, and the same criterion's entries written out one per parameter
    element: g summed over the uses of a tensor read by several nodes (one parameter each,
    README), with the groups of its row and column."""
    graph, analysis, groups = analyse_model(model)
    builder = ProblemBuilder(groups, analysis.uses, analysis.shared)
    g_of, groups_of = {}, {}

    def both(stat):
        builder.add(stat)
        use, g = stat.use, stat.array()
        of = groups.of_position

        def gid(pos):
            pos = np.broadcast_to(pos, use.view_shape)
            return use.ref.to_stored(np.where(pos >= 0, of[np.maximum(pos, 0)], -1)).ravel()

        for k, (value, row, col) in enumerate(zip(use.ref.to_stored(g).ravel(), gid(use.rows), gid(use.cols))):
            key = (use.ref.name, k)
            g_of[key] = g_of.get(key, 0.0) + value
            assert groups_of.setdefault(key, (row, col)) == (row, col)  # shared elements are tied

    compute_diag_g(graph, analysis, both)
    keys = [k for k in g_of if g_of[k] > 0]
    g = np.asarray([g_of[k] for k in keys])
    gin = np.asarray([groups_of[k][0] for k in keys])
    gout = np.asarray([groups_of[k][1] for k in keys])
    return builder.finish(), groups.count, g, gin, gout


def test_its_criterion_is_the_per_element_formula():
    """The Problem built for it agrees with the criterion written one parameter element at a
    time, and its coordinate descent with the plain loop (test_solver.py's references)."""
    from support.reference_criterion import objective, plain_coordinate_descent

    problem, H, g, gin, gout = _problem_and_parameters(_tied_depthwise_reading_permuted_channels())
    assert H == 3 and problem.p == g.size
    for u in np.random.default_rng(0).uniform(-1, 1, (4, H)):
        assert problem.objective(u) == pytest.approx(objective(g, gin, gout, u), rel=1e-12)
    for k, expected in enumerate(plain_coordinate_descent(g, gin, gout, H, 4), start=1):
        np.testing.assert_allclose(coordinate_descent(problem, max_iter=k, tol=0.0).u, expected, rtol=0, atol=1e-9)
