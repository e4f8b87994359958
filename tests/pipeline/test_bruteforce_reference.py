"""Self-checks of the brute-force diag(G) reference (tests/support/bruteforce.py).

Everything here is closed form or compared with onnxruntime; nothing uses onnx_pathcond.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from support import bruteforce as bf  # noqa: E402

ort = pytest.importorskip("onnxruntime")


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def make_model(nodes, xshape, inits, outputs=("Y",), opset=19):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(xshape))],
        [helper.make_empty_tensor_value_info(o) for o in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    return model


def rnd(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def f64(a):
    return np.asarray(a, np.float64)


def ort_run(model, x, out="Y"):
    return bf.make_session(model).run([out], {"X": x})[0]


# ------------------------------------------------------------------------------------------
# 2-layer MLP: closed form
# ------------------------------------------------------------------------------------------


def _mlp(rng, n_in=3, hid=4, n_out=2):
    W1 = rnd(rng, hid, n_in)  # Gemm transB=1: stored [out, in]
    b1 = rnd(rng, hid)
    W2 = rnd(rng, hid, n_out)  # MatMul x @ W2: stored [in, out]
    b2 = rnd(rng, n_out)
    nodes = [
        helper.make_node("Gemm", ["X", "W1", "b1"], ["h"], transB=1),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "W2"], ["t"]),
        helper.make_node("Add", ["t", "b2"], ["Y"]),
    ]
    model = make_model(nodes, [1, n_in], {"W1": W1, "b1": b1, "W2": W2, "b2": b2})
    return model, f64(W1), f64(b1), f64(W2), f64(b2)


def test_mlp_closed_form():
    rng = np.random.default_rng(0)
    model, W1, b1, W2, b2 = _mlp(rng)
    g = bf.bruteforce_diag_g(model)
    assert set(g) == {"W1", "b1", "W2", "b2"}
    out_mass = (W2 ** 2).sum(axis=1)  # Σ_o W2[j,o]²  (stored [in, out])
    np.testing.assert_allclose(g["W1"], np.broadcast_to(out_mass[:, None], W1.shape), rtol=1e-12)
    np.testing.assert_allclose(g["b1"], out_mass, rtol=1e-12)
    in_mass = (W1 ** 2).sum(axis=1) + b1 ** 2  # Σ_i W1[j,i]² + b1[j]²
    np.testing.assert_allclose(g["W2"], np.broadcast_to(in_mass[:, None], W2.shape), rtol=1e-12)
    np.testing.assert_allclose(g["b2"], np.ones_like(b2), rtol=0, atol=0)
    for name in g:
        assert g[name].dtype == np.float64


def test_mlp_path_sum_equals_path_network():
    rng = np.random.default_rng(1)
    model, W1, b1, W2, b2 = _mlp(rng)
    # straightforward path network: squared weights, ReLU removed, input of ones
    h = (W1 ** 2) @ np.ones(W1.shape[1]) + b1 ** 2
    y = h @ (W2 ** 2) + b2 ** 2
    assert bf.bruteforce_path_sum(model) == pytest.approx(y.sum(), rel=1e-12)
    n_in, hid, n_out = W1.shape[1], W1.shape[0], W2.shape[1]
    graph = bf.build_unit_graph(model)
    n_paths = n_in * hid * n_out + hid * n_out + n_out
    assert bf.count_paths(graph) == n_paths
    assert sum(1 for _ in bf.enumerate_paths(graph)) == n_paths


def test_enumerate_paths_explicit_list():
    W = np.array([[2.0, -3.0]], np.float32)
    b = np.array([0.5], np.float32)
    model = make_model([helper.make_node("Gemm", ["X", "W", "b"], ["Y"], transB=1)], [1, 2], {"W": W, "b": b})
    graph = bf.build_unit_graph(model)
    paths = list(bf.enumerate_paths(graph))
    got = sorted(((tuple(e.label for e in p), tuple(e.w for e in p)) for p in paths), key=repr)
    want = sorted([
        ((None, ("W", 0), None), (1.0, 2.0, 1.0)),
        ((None, ("W", 1), None), (1.0, -3.0, 1.0)),
        ((("b", 0), None), (0.5, 1.0)),
    ], key=repr)
    assert got == want
    assert graph.describe_path(paths[0]).startswith("START -> X[0, ")
    g = bf.bruteforce_diag_g(graph)
    np.testing.assert_array_equal(g["W"], [[1.0, 1.0]])
    np.testing.assert_array_equal(g["b"], [1.0])
    assert bf.bruteforce_path_sum(graph) == pytest.approx(4 + 9 + 0.25)


def test_zero_weights_keep_their_g():
    # g of a zero weight is the product of the *other* edges: no division by w anywhere.
    W1 = np.array([[0.0, 2.0]], np.float32)
    W2 = np.array([[3.0]], np.float32)
    nodes = [helper.make_node("MatMul", ["X", "W1t"], ["h"]), helper.make_node("MatMul", ["h", "W2"], ["Y"])]
    model = make_model(nodes, [1, 2], {"W1t": W1.T.copy(), "W2": W2})
    g = bf.bruteforce_diag_g(model)
    np.testing.assert_allclose(g["W1t"], [[9.0], [9.0]])
    np.testing.assert_allclose(g["W2"], [[0.0 + 4.0]])


def test_too_many_paths_guard():
    rng = np.random.default_rng(2)
    model, *_ = _mlp(rng)
    with pytest.raises(bf.TooManyPaths):
        bf.bruteforce_diag_g(model, max_paths=10)


# ------------------------------------------------------------------------------------------
# Conv 1-D, one channel: each tap is used at every output position
# ------------------------------------------------------------------------------------------


def test_conv1d_single_channel_closed_form():
    rng = np.random.default_rng(3)
    L, K = 7, 3
    n_out = L - K + 1
    w = rnd(rng, 1, 1, K)
    b = rnd(rng, 1)
    V = rnd(rng, n_out, 1)  # downstream weights, one per output position
    nodes = [
        helper.make_node("Conv", ["X", "w", "b"], ["c"]),
        helper.make_node("Flatten", ["c"], ["f"]),
        helper.make_node("MatMul", ["f", "V"], ["Y"]),
    ]
    model = make_model(nodes, [1, 1, L], {"w": w, "b": b, "V": V})
    g = bf.bruteforce_diag_g(model)
    down = float((f64(V) ** 2).sum())  # Σ_o V[o]²
    np.testing.assert_allclose(g["w"], np.full((1, 1, K), down), rtol=1e-12)
    np.testing.assert_allclose(g["b"], [down], rtol=1e-12)
    up = float((f64(w) ** 2).sum() + f64(b)[0] ** 2)  # input ones: Σ_k w_k² + b²
    np.testing.assert_allclose(g["V"], np.full((n_out, 1), up), rtol=1e-12)
    # without the downstream layer, g of each tap is the number of positions it is used at
    bare = make_model([helper.make_node("Conv", ["X", "w"], ["Y"])], [1, 1, L], {"w": w})
    np.testing.assert_allclose(bf.bruteforce_diag_g(bare)["w"], np.full((1, 1, K), n_out))


def test_conv_stride_pad_counts_taps_at_borders():
    # stride 2, pad 1, kernel 3 on length 5: windows [-1, 0, 1], [1, 2, 3], [3, 4, 5]
    w = np.array([[[1.0, 1.0, 1.0]]], np.float32)
    model = make_model([helper.make_node("Conv", ["X", "w"], ["Y"], strides=[2], pads=[1, 1])], [1, 1, 5], {"w": w})
    g = bf.bruteforce_diag_g(model)
    # tap 0 falls in the padding for the first window, tap 2 for the last one
    np.testing.assert_allclose(g["w"], [[[2.0, 3.0, 2.0]]])


# ------------------------------------------------------------------------------------------
# pools
# ------------------------------------------------------------------------------------------


def _scaled_pool(op, L, **kw):
    """Y = Pool(m * X): g of m[p] is the pool's squared mass out of position p."""
    m = np.linspace(0.5, 1.5, L).astype(np.float32).reshape(1, 1, L)
    nodes = [helper.make_node("Mul", ["X", "m"], ["t"]), helper.make_node(op, ["t"], ["Y"], **kw)]
    return make_model(nodes, [1, 1, L], {"m": m})


def test_average_pool_border_masses():
    kw = dict(kernel_shape=[3], pads=[1, 1])
    g1 = bf.bruteforce_diag_g(_scaled_pool("AveragePool", 5, count_include_pad=1, **kw))["m"].ravel()
    np.testing.assert_allclose(g1, np.array([2, 3, 3, 3, 2]) / 9.0, rtol=1e-12)
    g0 = bf.bruteforce_diag_g(_scaled_pool("AveragePool", 5, count_include_pad=0, **kw))["m"].ravel()
    # divisors per output: [2, 3, 3, 3, 2]
    want = np.array([1 / 4 + 1 / 9, 1 / 4 + 2 / 9, 3 / 9, 2 / 9 + 1 / 4, 1 / 9 + 1 / 4])
    np.testing.assert_allclose(g0, want, rtol=1e-12)


AVG_CONFIGS = [
    dict(kernel_shape=[3], pads=[1, 1], count_include_pad=1),
    dict(kernel_shape=[3], pads=[1, 1], count_include_pad=0),
    dict(kernel_shape=[3], strides=[2], pads=[1, 1], count_include_pad=1, ceil_mode=1),
    dict(kernel_shape=[3], strides=[2], pads=[0, 0], count_include_pad=1, ceil_mode=1),
    dict(kernel_shape=[3], strides=[2], pads=[1, 0], count_include_pad=0, ceil_mode=1),
    dict(kernel_shape=[2], strides=[2], dilations=[2], pads=[1, 1], count_include_pad=1, ceil_mode=1),
    dict(kernel_shape=[3], dilations=[2], pads=[2, 2], count_include_pad=1),
    dict(kernel_shape=[3], strides=[2], auto_pad="SAME_UPPER", count_include_pad=1),
    dict(kernel_shape=[3], strides=[2], auto_pad="SAME_LOWER", count_include_pad=1),
    dict(kernel_shape=[2], auto_pad="SAME_UPPER", count_include_pad=1),
    dict(kernel_shape=[2], auto_pad="SAME_LOWER", count_include_pad=0),
]


@pytest.mark.parametrize("kw", AVG_CONFIGS)
def test_average_pool_divisor_matches_onnxruntime(kw):
    L = 6
    model = make_model([helper.make_node("AveragePool", ["X"], ["Y"], **kw)], [1, 1, L], {})
    x = np.random.default_rng(4).standard_normal((1, 1, L)).astype(np.float32)
    ref = ort_run(model, x)[0, 0]
    graph = bf.build_unit_graph(model)
    X, Y = graph.tensor_units["X"], graph.tensor_units["Y"]
    pos = {int(u): i for i, u in enumerate(X.ravel())}
    for o, u_out in enumerate(Y.ravel()):
        taps = [e for e in graph.edges if e.dst == u_out]
        n = 1.0 / taps[0].w
        assert all(e.w == taps[0].w for e in taps)
        assert n == round(n)
        # onnxruntime's value is Σ x over the window / n
        assert ref[o] == pytest.approx(sum(x[0, 0, pos[e.src]] for e in taps) / n, rel=1e-5, abs=1e-6)


MAX_CONFIGS = [
    dict(kernel_shape=[3], strides=[2], pads=[1, 1], ceil_mode=1),
    dict(kernel_shape=[2], strides=[2]),
    dict(kernel_shape=[2], strides=[2], ceil_mode=1),
    dict(kernel_shape=[3], dilations=[2], pads=[1, 2]),
    dict(kernel_shape=[3], strides=[2], auto_pad="SAME_UPPER"),
    dict(kernel_shape=[2], auto_pad="SAME_LOWER"),
]


@pytest.mark.parametrize("kw", MAX_CONFIGS)
def test_max_pool_as_sum_window_counts(kw):
    L = 7
    model = _scaled_pool("MaxPool", L, **kw)
    g = bf.bruteforce_diag_g(model)["m"].ravel()
    # which windows contain position p?  one-hot probes through onnxruntime's MaxPool
    pool = make_model([helper.make_node("MaxPool", ["X"], ["Y"], **kw)], [1, 1, L], {})
    counts = []
    for p in range(L):
        x = -np.ones((1, 1, L), np.float32)
        x[0, 0, p] = 1.0
        counts.append(int((ort_run(pool, x) == 1.0).sum()))
    np.testing.assert_array_equal(g, counts)


def test_max_pool_upstream_bias_counts_windows():
    # k=3, s=2, pad 1 on length 6 with ceil_mode: windows [-1..1], [1..3], [3..5], [5..7]
    b = np.arange(1, 7, dtype=np.float32).reshape(1, 1, 6)
    nodes = [
        helper.make_node("Add", ["X", "b"], ["t"]),
        helper.make_node("MaxPool", ["t"], ["Y"], kernel_shape=[3], strides=[2], pads=[1, 1], ceil_mode=1),
    ]
    model = make_model(nodes, [1, 1, 6], {"b": b})
    np.testing.assert_array_equal(bf.bruteforce_diag_g(model)["b"].ravel(), [1, 2, 1, 2, 1, 2])


def test_global_pools():
    m = np.ones((1, 2, 1, 1), np.float32)
    for op, want in [("GlobalAveragePool", 1.0 / 36.0), ("GlobalMaxPool", 1.0)]:
        nodes = [helper.make_node("Mul", ["X", "m"], ["t"]), helper.make_node(op, ["t"], ["Y"])]
        model = make_model(nodes, [1, 2, 3, 2], {"m": m})
        # each channel: 6 positions, each with squared edge weight (1/6)² (or 1)
        np.testing.assert_allclose(bf.bruteforce_diag_g(model)["m"].ravel(), [6 * want] * 2, rtol=1e-12)


# ------------------------------------------------------------------------------------------
# barriers, BatchNorm, Gemm alpha/beta, residuals, weight provenance
# ------------------------------------------------------------------------------------------


def test_barrier_cuts_paths():
    rng = np.random.default_rng(5)
    W1, b1, W2, b2 = rnd(rng, 3, 2), rnd(rng, 3), rnd(rng, 2, 3), rnd(rng, 2)
    nodes = [
        helper.make_node("Gemm", ["X", "W1", "b1"], ["h"], transB=1),
        helper.make_node("Sigmoid", ["h"], ["s"]),
        helper.make_node("Gemm", ["s", "W2", "b2"], ["Y"], transB=1),
    ]
    model = make_model(nodes, [1, 2], {"W1": W1, "b1": b1, "W2": W2, "b2": b2})
    g = bf.bruteforce_diag_g(model)
    for name, arr in [("W1", W1), ("b1", b1), ("W2", W2), ("b2", b2)]:
        np.testing.assert_array_equal(g[name], np.ones(arr.shape))
    graph = bf.build_unit_graph(model)
    assert graph.barriers == ["Sigmoid()"]
    # paths: 2*3 + 3 ending at the sigmoid, 3*2 + 2 starting after it
    assert bf.count_paths(graph) == 9 + 8


def test_batchnorm_edge_and_param_conventions():
    gam = np.array([2.0, -1.0], np.float32)
    bet = np.array([0.5, 1.0], np.float32)
    mean = np.array([0.25, -2.0], np.float32)
    var = np.array([3.0, 0.5], np.float32)
    eps = 1e-3
    model = make_model(
        [helper.make_node("BatchNormalization", ["X", "g", "b", "mu", "v"], ["Y"], epsilon=eps)],
        [1, 2, 1, 1],
        {"g": gam, "b": bet, "mu": mean, "v": var},
    )
    s2 = 1.0 / (f64(var) + np.float64(np.float32(eps)))
    g_edge = bf.bruteforce_diag_g(model)
    assert set(g_edge) == {"g", "b"}  # running statistics get no entry
    np.testing.assert_allclose(g_edge["g"], [1.0, 1.0])
    np.testing.assert_allclose(g_edge["b"], [1.0, 1.0])
    g_par = bf.bruteforce_diag_g(model, wrt="param")
    # ∂(a)/∂γ = s on the x->y path; ∂(b)/∂γ = -s·mean on the bias path
    np.testing.assert_allclose(g_par["g"], s2 + s2 * f64(mean) ** 2, rtol=1e-6)
    np.testing.assert_allclose(g_par["b"], [1.0, 1.0])
    # path sum uses a² and b²
    a = f64(gam) * np.sqrt(s2)
    bb = f64(bet) - a * f64(mean)
    assert bf.bruteforce_path_sum(model) == pytest.approx(float((a ** 2 + bb ** 2).sum()), rel=1e-6)


def test_gemm_alpha_beta_conventions():
    W = np.array([[1.0, 2.0]], np.float32)
    C = np.array([3.0], np.float32)
    V = np.array([[2.0]], np.float32)
    nodes = [
        helper.make_node("Gemm", ["X", "W", "C"], ["h"], transB=1, alpha=0.5, beta=4.0),
        helper.make_node("MatMul", ["h", "V"], ["Y"]),
    ]
    model = make_model(nodes, [1, 2], {"W": W, "C": C, "V": V})
    g = bf.bruteforce_diag_g(model)
    np.testing.assert_allclose(g["W"], [[4.0, 4.0]])  # other edges: V² = 4
    np.testing.assert_allclose(g["C"], [4.0])
    np.testing.assert_allclose(g["V"], [[0.25 * 1 + 0.25 * 4 + 16 * 9]])  # (αW)² + (βC)²
    gp = bf.bruteforce_diag_g(model, wrt="param")
    np.testing.assert_allclose(gp["W"], [[1.0, 1.0]])  # α² · 4
    np.testing.assert_allclose(gp["C"], [64.0])  # β² · 4
    np.testing.assert_allclose(gp["V"], g["V"])


def test_residual_add_doubles_paths():
    m = np.array([[1.0, 2.0, 3.0]], np.float32)
    nodes = [
        helper.make_node("Mul", ["X", "m"], ["t"]),
        helper.make_node("Relu", ["t"], ["r"]),
        helper.make_node("Add", ["t", "r"], ["Y"]),
    ]
    model = make_model(nodes, [1, 3], {"m": m})
    np.testing.assert_array_equal(bf.bruteforce_diag_g(model)["m"], [[2.0, 2.0, 2.0]])
    assert bf.bruteforce_path_sum(model) == pytest.approx(2 * (1 + 4 + 9))


def test_weight_through_transpose_identity_cast_is_stored_element():
    rng = np.random.default_rng(6)
    W = rnd(rng, 3, 4)  # stored [out, in]; used as its transpose
    V = rnd(rng, 3, 2)
    nodes = [
        helper.make_node("Identity", ["W"], ["Wi"]),
        helper.make_node("Transpose", ["Wi"], ["Wt"], perm=[1, 0]),
        helper.make_node("Cast", ["Wt"], ["Wc"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["X", "Wc"], ["h"]),
        helper.make_node("MatMul", ["h", "V"], ["Y"]),
    ]
    model = make_model(nodes, [1, 4], {"W": W, "V": V})
    g = bf.bruteforce_diag_g(model)
    assert set(g) == {"W", "V"} and g["W"].shape == (3, 4)
    direct = make_model(nodes[3:], [1, 4], {"Wc": W.T.copy(), "V": V})
    np.testing.assert_allclose(g["W"], bf.bruteforce_diag_g(direct)["Wc"].T, rtol=1e-12)


def test_constant_node_parameter_and_shape_subgraph():
    # weight in a Constant node; Reshape target computed from Shape (a constant subgraph)
    w = np.array([[[1.0, -2.0]]], np.float32)
    nodes = [
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w, "w")),
        helper.make_node("Conv", ["X", "w"], ["c"]),
        helper.make_node("Shape", ["c"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "ax0"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus1"], ["shape"], axis=0),
        helper.make_node("Reshape", ["c", "shape"], ["Y"]),
    ]
    inits = {"zero": np.array(0, np.int64), "ax0": np.array([0], np.int64), "minus1": np.array([-1], np.int64)}
    model = make_model(nodes, [1, 1, 4], inits)
    graph = bf.build_unit_graph(model)
    assert graph.barriers == []  # Shape/Gather/... are constants, not barriers
    g = bf.bruteforce_diag_g(graph)
    assert set(g) == {"w"}
    np.testing.assert_allclose(g["w"], [[[3.0, 3.0]]])


def test_resize_nearest_counts_copies():
    m = np.array([1.0, 2.0, 3.0], np.float32).reshape(1, 1, 3)
    sc = np.array([1.0, 1.0, 2.0], np.float32)
    nodes = [helper.make_node("Mul", ["X", "m"], ["t"]), helper.make_node("Resize", ["t", "", "sc"], ["Y"], mode="nearest")]
    model = make_model(nodes, [1, 1, 3], {"m": m, "sc": sc})
    np.testing.assert_array_equal(bf.bruteforce_diag_g(model)["m"].ravel(), [2.0, 2.0, 2.0])


# ------------------------------------------------------------------------------------------
# index relations of the linear ops reproduce onnxruntime
# ------------------------------------------------------------------------------------------


def _linear_cases():
    rng = np.random.default_rng(7)
    R = lambda *s: rnd(rng, *s)  # noqa: E731
    mk = helper.make_node
    return [
        ("conv2d_group", [mk("Conv", ["X", "W", "B"], ["Y"], group=2, strides=[2, 1], pads=[1, 0, 1, 1])],
         [1, 4, 5, 4], {"W": R(6, 2, 3, 2), "B": R(6)}),
        ("conv1d_same_lower", [mk("Conv", ["X", "W"], ["Y"], auto_pad="SAME_LOWER", strides=[2])],
         [1, 2, 7], {"W": R(3, 2, 2)}),
        ("depthwise", [mk("Conv", ["X", "W"], ["Y"], group=3, pads=[1, 1, 1, 1])], [1, 3, 4, 4], {"W": R(3, 1, 3, 3)}),
        ("conv3d", [mk("Conv", ["X", "W", "B"], ["Y"], strides=[2, 1, 1], pads=[1, 0, 0, 0, 1, 1])],
         [1, 2, 3, 3, 2], {"W": R(2, 2, 2, 2, 2), "B": R(2)}),
        ("convT_pads_outpad", [mk("ConvTranspose", ["X", "W", "B"], ["Y"], strides=[3], output_padding=[1], pads=[1, 1])],
         [1, 2, 4], {"W": R(2, 3, 3), "B": R(3)}),
        ("convT_output_shape", [mk("ConvTranspose", ["X", "W"], ["Y"], strides=[2], output_shape=[6])],
         [1, 2, 4], {"W": R(2, 3, 3)}),
        ("convT_same_upper", [mk("ConvTranspose", ["X", "W"], ["Y"], strides=[2], auto_pad="SAME_UPPER")],
         [1, 2, 4], {"W": R(2, 3, 3)}),
        ("convT_same_lower_dil", [mk("ConvTranspose", ["X", "W"], ["Y"], strides=[2], auto_pad="SAME_LOWER", dilations=[2])],
         [1, 2, 4], {"W": R(2, 3, 3)}),
        ("convT2d_group", [mk("ConvTranspose", ["X", "W", "B"], ["Y"], group=2, strides=[2, 1], pads=[1, 0, 0, 1])],
         [1, 4, 3, 3], {"W": R(4, 2, 3, 2), "B": R(4)}),
        ("gemm", [mk("Gemm", ["X", "W", "C"], ["Y"], alpha=0.5, beta=2.0, transB=1)], [1, 4], {"W": R(3, 4), "C": R(1, 3)}),
        ("matmul_left_sub", [mk("MatMul", ["W", "X"], ["T"]), mk("Sub", ["T", "B"], ["Y"])],
         [1, 4, 2], {"W": R(3, 4), "B": R(3, 1)}),
        ("const_minus_x", [mk("Sub", ["B", "X"], ["Y"])], [1, 4, 2], {"B": R(4, 1)}),
        ("bn", [mk("BatchNormalization", ["X", "g", "b", "mu", "v"], ["Y"])], [1, 3, 2, 2],
         {"g": R(3), "b": R(3), "mu": R(3), "v": np.abs(R(3)) + 0.5}),
        ("avgpool2d", [mk("AveragePool", ["X"], ["Y"], kernel_shape=[3, 2], strides=[2, 1], pads=[1, 0, 1, 1],
                          count_include_pad=1, ceil_mode=1)], [1, 2, 5, 4], {}),
        ("reducemean", [mk("ReduceMean", ["X", "ax"], ["Y"], keepdims=0)], [1, 2, 3, 3], {"ax": np.array([1, 3])}),
        ("transpose_flatten", [mk("Transpose", ["X"], ["T"], perm=[0, 2, 3, 1]), mk("Flatten", ["T"], ["Y"])],
         [1, 2, 3, 2], {}),
        ("concat_const", [mk("Concat", ["X", "C"], ["Y"], axis=1)], [1, 2, 3], {"C": R(1, 1, 3)}),
        ("split", [mk("Split", ["X", "sp"], ["A", "Y"], axis=1)], [1, 5, 2], {"sp": np.array([2, 3])}),
        ("slice_neg", [mk("Slice", ["X", "st", "en", "ax", "sp"], ["Y"])], [1, 4, 6],
         {"st": np.array([5, -1]), "en": np.array([0, -2 ** 63]), "ax": np.array([2, 1]), "sp": np.array([-2, -1])}),
        ("pad_crop", [mk("Pad", ["X", "p"], ["Y"])], [1, 2, 4], {"p": np.array([0, 0, 2, 0, 1, -1])}),
        ("squeeze_unsqueeze", [mk("Squeeze", ["X", "a"], ["T"]), mk("Unsqueeze", ["T", "b"], ["Y"])],
         [1, 2, 1, 3], {"a": np.array([2]), "b": np.array([0])}),
        ("resize_sizes", [mk("Resize", ["X", "", "", "sz"], ["Y"], mode="nearest",
                             coordinate_transformation_mode="asymmetric", nearest_mode="floor")],
         [1, 2, 3, 2], {"sz": np.array([1, 2, 5, 5])}),
    ]


@pytest.mark.parametrize("case", _linear_cases(), ids=lambda c: c[0])
def test_linear_ops_unit_graph_reproduces_onnxruntime(case):
    _, nodes, xshape, inits = case
    model = make_model(nodes, xshape, inits)
    x = np.random.default_rng(8).standard_normal(xshape).astype(np.float32)
    ref = ort_run(model, x)
    got = bf.unit_graph_forward(model, {"X": x})["Y"]
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_path_sum_and_g_identities_on_a_conv_net():
    rng = np.random.default_rng(9)
    nodes = [
        helper.make_node("Conv", ["X", "W1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], pads=[0, 0, 1, 1]),
        helper.make_node("Conv", ["p1", "W2"], ["c2"], group=2),
        helper.make_node("Add", ["c2", "p1"], ["a"]),
        helper.make_node("GlobalAveragePool", ["a"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "W3", "b3"], ["Y"], transB=1),
    ]
    inits = {"W1": rnd(rng, 2, 1, 3, 3), "b1": rnd(rng, 2), "W2": rnd(rng, 2, 1, 1, 1),
             "W3": rnd(rng, 3, 2), "b3": rnd(rng, 3)}
    model = make_model(nodes, [1, 1, 4, 4], inits)
    graph = bf.build_unit_graph(model)
    total = bf.bruteforce_path_sum(graph)
    # the same sum by forward propagation of squared weights from an input of ones
    mass = bf.unit_graph_forward(graph, {"X": np.ones((1, 1, 4, 4))}, square=True)
    assert total == pytest.approx(float(mass["Y"].sum()), rel=1e-12)
    # Σ_i g_i θ_i² = Σ_p (number of labelled edges on p) · Π w²
    g = bf.bruteforce_diag_g(graph)
    lhs = sum(float((g[k] * f64(v) ** 2).sum()) for k, v in inits.items())
    rhs = 0.0
    for p in bf.enumerate_paths(graph):
        prod = np.prod([e.w * e.w for e in p])
        rhs += sum(e.label is not None for e in p) * prod
    assert lhs == pytest.approx(rhs, rel=1e-12)
