"""Models that call their own functions (model.functions: torch's export_modules_as_functions,
onnxscript, hand-built models) are analysed through the function bodies: weights passed as
arguments are rescaled in the main graph, a constant inside a body is frozen with its reason
(the body is shared by every call), and the written model keeps its functions and calls.

Checked independently: group counts from the shapes built, equivalence with onnxruntime on the
written file, and diag(G) against brute-force path enumeration of the model inlined by onnx's own
inliner. PyTorch's exports with functions: tests/pytorch/test_local_functions_torch.py."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.inliner
import pytest
from onnx import TensorProto, helper, numpy_helper

from support.bruteforce import bruteforce_diag_g
from support.checks import assert_equivalent
from onnx_pathcond import rescale
from onnx_pathcond.api import analyse_model
from onnx_pathcond.stats import diag_g_by_tensor

pytest.importorskip("onnxruntime")

OPSETS = [helper.make_opsetid("", 17), helper.make_opsetid("local", 1)]


def _weight(name, shape, seed):
    return numpy_helper.from_array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), name)


def _mlp_function(name="MLP", constant_weight=False, inner=None):
    """MLP(x, W3, W4) = Gemm(Relu(Gemm(x, W3)), W4); with `constant_weight`, W4 is instead a
    Constant inside the body; with `inner`, the second Gemm is a call of that function."""
    nodes = [helper.make_node("Gemm", ["x", "W3"], ["a"], transB=1), helper.make_node("Relu", ["a"], ["r"])]
    inputs = ["x", "W3", "W4"]
    if constant_weight:
        inputs = ["x", "W3"]
        nodes.append(helper.make_node("Constant", [], ["W4"], value=_weight("W4", (3, 8), 9)))
    if inner is not None:
        nodes.append(helper.make_node(inner, ["r", "W4"], ["y"], domain="local"))
    else:
        nodes.append(helper.make_node("Gemm", ["r", "W4"], ["y"], transB=1))
    return helper.make_function("local", name, inputs, ["y"], nodes,
                                opset_imports=OPSETS if inner is not None else OPSETS[:1])


def _gemm_function(name="Dense"):
    return helper.make_function("local", name, ["x", "W"], ["y"], [helper.make_node("Gemm", ["x", "W"], ["y"], transB=1)],
                                opset_imports=[helper.make_opsetid("", 17)])


def _model(nodes, initializers, functions, outputs=3):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", outputs])], initializers)
    model = helper.make_model(graph, opset_imports=OPSETS, functions=functions)
    onnx.checker.check_model(model)
    return model


def _trunk():
    """Gemm-Relu-Gemm-Relu: 8 + 8 hidden neurons, output r2 of width 8."""
    return ([helper.make_node("Gemm", ["x", "W1"], ["h1"], transB=1), helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("Gemm", ["r1", "W2"], ["h2"], transB=1), helper.make_node("Relu", ["h2"], ["r2"])],
            [_weight("W1", (8, 4), 1), _weight("W2", (8, 8), 2)])


def the_issue_example():
    nodes, weights = _trunk()
    nodes.append(helper.make_node("MLP", ["r2", "W3", "W4"], ["y"], domain="local"))
    return _model(nodes, weights + [_weight("W3", (8, 8), 3), _weight("W4", (3, 8), 4)], [_mlp_function()])


def _hidden_widths(model):
    """Rows of every Gemm weight but the last one's: the neurons of these chains."""
    inlined = onnx.inliner.inline_local_functions(model)
    shapes = {t.name: t.dims for t in inlined.graph.initializer}
    shapes.update({n.output[0]: n.attribute[0].t.dims for n in inlined.graph.node if n.op_type == "Constant"})
    gemms = [n for n in inlined.graph.node if n.op_type == "Gemm"]
    return sum(shapes[n.input[1]][0] for n in gemms[:-1])


def _assert_diag_g_matches_paths(model):
    graph, analysis, _ = analyse_model(model)
    got = diag_g_by_tensor(graph, analysis)
    expected = bruteforce_diag_g(onnx.inliner.inline_local_functions(model), {"x": (1, 4)})
    stored = {t.name for t in model.graph.initializer}
    for name, value in expected.items():
        if name in stored:
            np.testing.assert_allclose(got[name], value, rtol=1e-10, atol=1e-12, err_msg=name)
    assert stored & set(expected)


def test_the_issue_example_finds_every_hidden_neuron(tmp_path):
    model = the_issue_example()
    out, report = rescale(model)
    assert report.groups.rescalable == _hidden_widths(model) == 24  # 8 + 8 in the trunk, 8 in the function
    assert report.verification.passed and not report.barrier_ops
    assert_equivalent(model, out)
    _assert_diag_g_matches_paths(model)
    assert [f.name for f in out.functions] == ["MLP"] and [n.op_type for n in out.graph.node][-1] == "MLP"
    changed = {t.name for t, s in zip(model.graph.initializer, out.graph.initializer)
               if not np.array_equal(numpy_helper.to_array(t), numpy_helper.to_array(s))}
    assert {"W3", "W4"} <= changed  # the function's weights are rescaled where they are stored


def test_a_constant_inside_a_body_is_frozen_with_its_reason():
    nodes, weights = _trunk()
    nodes.append(helper.make_node("MLP", ["r2", "W3"], ["y"], domain="local"))
    model = _model(nodes, weights + [_weight("W3", (8, 8), 3)], [_mlp_function(constant_weight=True)])
    out, report = rescale(model)
    reasons = " ".join(f.reason for f in report.frozen)
    assert "inside the body of local function 'MLP'" in reasons
    assert report.groups.rescalable == 16  # the body's 8 neurons feed its own constant weight: frozen
    assert report.verification.passed
    assert_equivalent(model, out)
    assert [n.op_type for n in out.graph.node if n.op_type == "Constant"] == []  # the body kept its Constant
    assert out.functions[0] == model.functions[0]


def test_a_function_called_twice_and_a_weight_passed_to_both_calls():
    nodes, weights = _trunk()
    nodes += [helper.make_node("Dense", ["r2", "W3"], ["d1"], domain="local"), helper.make_node("Relu", ["d1"], ["s1"]),
              helper.make_node("Dense", ["s1", "W3"], ["d2"], domain="local"), helper.make_node("Relu", ["d2"], ["s2"]),
              helper.make_node("Dense", ["s2", "W4"], ["y"], domain="local")]
    model = _model(nodes, weights + [_weight("W3", (8, 8), 3), _weight("W4", (3, 8), 4)], [_gemm_function()])
    out, report = rescale(model)
    # the tied weight W3 ties the channels of its two calls: one scale per element for both
    assert report.groups.rescalable >= 16 and report.verification.passed
    assert_equivalent(model, out)
    # a tensor read twice on one path is summed over its uses, as in a model without functions:
    # the same as the tool on the model inlined by onnx
    inlined = onnx.inliner.inline_local_functions(model)
    assert rescale(inlined)[1].groups.rescalable == report.groups.rescalable
    got = diag_g_by_tensor(*analyse_model(model)[:2])
    expected = diag_g_by_tensor(*analyse_model(inlined)[:2])
    assert set(got) == set(expected)
    for name in got:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-12, err_msg=name)


def test_nested_functions():
    nodes, weights = _trunk()
    nodes.append(helper.make_node("Outer", ["r2", "W3", "W4"], ["y"], domain="local"))
    model = _model(nodes, weights + [_weight("W3", (8, 8), 3), _weight("W4", (3, 8), 4)],
                   [_mlp_function("Outer", inner="Dense"), _gemm_function()])
    out, report = rescale(model)
    assert report.groups.rescalable == _hidden_widths(model) == 24
    assert_equivalent(model, out)
    _assert_diag_g_matches_paths(model)


def test_an_op_of_an_unknown_domain_stays_a_barrier_with_its_reason():
    nodes, weights = _trunk()
    nodes.append(helper.make_node("Mystery", ["r2"], ["y"], domain="elsewhere"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], weights)
    model = helper.make_model(graph, opset_imports=OPSETS[:1] + [helper.make_opsetid("elsewhere", 1)],
                              functions=[_gemm_function()])
    _, analysis, groups = analyse_model(model)
    assert groups.count == 8  # the first layer only: r2 feeds the barrier
    assert any("Mystery" in f.reason for f in analysis.freezes)


def test_the_command_line_keeps_the_functions(tmp_path, run_cli):
    model = the_issue_example()
    onnx.save(model, tmp_path / "in.onnx")
    proc = run_cli(tmp_path / "in.onnx", tmp_path / "out.onnx")
    assert proc.returncode == 0, proc.stderr
    out = onnx.load(tmp_path / "out.onnx")
    assert out.functions[0] == model.functions[0] and len(out.graph.node) == len(model.graph.node)
    assert "24 rescalable" in proc.stdout
