"""diag(G) from the numpy path network equals brute-force enumeration of every path."""

import numpy as np
import pytest
from onnx import helper, numpy_helper

from support.bruteforce import bruteforce_diag_g, bruteforce_path_sum
from support.cases import CASES, MORE_CASES, mlp_matmul_transposed_weight, residual_bn_concat
from support.nets import mlp
from onnx_pathcond.api import analyse_model
from onnx_pathcond.stats import diag_g_by_tensor, numpy_walk


def tool_diag_g(model):
    graph, analysis, _ = analyse_model(model)
    return diag_g_by_tensor(graph, analysis)


def assert_same_g(model, wrt="edge"):
    expected = bruteforce_diag_g(model, wrt=wrt)
    got = tool_diag_g(model)
    assert expected, "the reference found no parameter"
    for name, ref in expected.items():
        assert name in got, f"no statistics for {name}"
        np.testing.assert_allclose(got[name], ref, rtol=1e-10, atol=1e-12 * max(1.0, np.abs(ref).max()),
                                   err_msg=name)
    for name, g in got.items():
        if name not in expected:
            assert not np.any(g), f"{name} has statistics but is on no path"


@pytest.mark.parametrize("case", sorted(CASES))
def test_diag_g_matches_path_enumeration(case):
    assert_same_g(CASES[case]())


def test_gemm_alpha_beta_follow_the_parameter_convention():
    # α and β are fixed weights on the path: g of W includes α², g of C includes β².
    assert_same_g(mlp_matmul_transposed_weight(), wrt="param")


def test_path_sum_is_the_path_networks_output():
    model = residual_bn_concat()
    graph, analysis, _ = analyse_model(model)
    pn = numpy_walk(graph, analysis, lambda stat: None)
    total = float(sum(pn.mass(o).sum() for o in graph.graph_outputs))
    assert total == pytest.approx(bruteforce_path_sum(model), rel=1e-12)


def test_closed_form_one_hidden_layer():
    # y = W2 relu(W1 x + b1) + b2 with x = ones: g(W1[j,i]) = Σ_o W2[o,j]², g(b2) = 1,
    # g(W2[o,j]) = Σ_i W1[j,i]² + b1[j]².
    model = mlp([3, 4, 2], seed=11)
    w = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    (w1, b1, w2, b2) = [w[t.name] for t in model.graph.initializer]
    g = tool_diag_g(model)
    names = [t.name for t in model.graph.initializer]
    np.testing.assert_allclose(g[names[0]], np.tile((w2 ** 2).sum(0)[:, None], (1, 3)), rtol=1e-12)
    np.testing.assert_allclose(g[names[1]], (w2 ** 2).sum(0), rtol=1e-12)
    np.testing.assert_allclose(g[names[2]], np.tile(((w1 ** 2).sum(1) + b1 ** 2)[None, :], (2, 1)), rtol=1e-12)
    np.testing.assert_allclose(g[names[3]], np.ones(2), rtol=1e-12)


@pytest.mark.parametrize("case", ["resize_nearest", "residual_identity", "concat_split_slice_pad",
                                  "bn_after_concat"])
def test_diag_g_matches_path_enumeration_issue3(case):
    assert_same_g(MORE_CASES[case]())


@pytest.mark.parametrize("mode", ["linear", "cubic", "nearest"])
def test_resize_path_network_squares_every_interpolation_weight(mode):
    # Independent of the separable probe: the full operator K of Resize, column by column from
    # onnxruntime on one-hot inputs; the path network maps ones to (K∘K)·1.
    import onnxruntime as ort
    from onnx import TensorProto

    shape = [1, 1, 3, 4]
    scales = numpy_helper.from_array(np.array([1, 1, 2, 1.5], dtype=np.float32), "scales")
    node = helper.make_node("Resize", ["x", "", "scales"], ["y"], mode=mode)
    g = helper.make_graph([node], "r", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=[scales])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    n = int(np.prod(shape))
    columns = [sess.run(None, {"x": np.eye(n, dtype=np.float32)[j].reshape(shape)})[0].ravel() for j in range(n)]
    K = np.stack(columns, axis=1).astype(np.float64)
    graph, analysis, _ = analyse_model(model)
    pn = numpy_walk(graph, analysis, lambda stat: None)
    np.testing.assert_allclose(pn.mass("y").ravel(), (K ** 2).sum(axis=1), rtol=1e-5, atol=1e-6)
