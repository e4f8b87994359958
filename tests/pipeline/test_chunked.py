"""Large weights are squared and rescaled a block of rows at a time; the blocks must add up
to the whole. Checked with blocks of a few elements against the direct computation, and
diag(G) against path enumeration with such blocks."""

import numpy as np
import pytest

from support.bruteforce import bruteforce_diag_g
from support.nets import Net, mlp
from onnx_pathcond import rewrite
from onnx_pathcond.api import analyse_model
from onnx_pathcond.pathnet import numpy_executor
from onnx_pathcond.stats import diag_g_by_tensor


@pytest.fixture
def tiny_blocks(monkeypatch):
    monkeypatch.setattr(numpy_executor, "_SQUARE_CHUNK", 3)
    monkeypatch.setattr(rewrite, "_CHUNK", 5)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_squared_product_in_row_blocks(tiny_blocks, dtype):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((7, 4)).astype(dtype)
    w2 = np.square(w.astype(np.float64))
    cases = [((2, 3, 7), False, False, lambda x: x @ w2), ((3, 4), False, True, lambda x: x @ w2.T),
             ((2, 4, 3), True, False, lambda x: w2 @ x), ((7, 5), True, True, lambda x: w2.T @ x)]
    for shape, w_left, transposed, direct in cases:
        x = rng.random(shape)
        np.testing.assert_allclose(numpy_executor.squared_product(w, x, w_left, transposed), direct(x), rtol=1e-13)


def _gemm_weight_left(trans_a):
    """Y = op(W)·X with the constant on the left (features on axis 0), then more layers."""
    net = Net([3, 2], seed=5)
    w = net.param([4, 3] if not trans_a else [3, 4])
    y = net.relu(net.node("Gemm", [w, net.x, net.param([4, 1], "b")], transA=trans_a))
    return net.model(net.node("Gemm", [net.param([2, 4]), y]))


@pytest.mark.parametrize("make", [lambda: mlp([5, 7, 6, 3], seed=2), lambda: mlp([5, 7, 3], seed=3, kind="matmul"),
                                  lambda: _gemm_weight_left(0), lambda: _gemm_weight_left(1)],
                         ids=["gemm", "matmul", "gemm_weight_left", "gemm_weight_left_transA"])
def test_diag_g_with_row_blocks_matches_path_enumeration(tiny_blocks, make):
    model = make()
    expected = bruteforce_diag_g(model)
    graph, analysis, _ = analyse_model(model)
    got = diag_g_by_tensor(graph, analysis)
    assert expected
    for name, ref in expected.items():
        np.testing.assert_allclose(got[name], ref, rtol=1e-10, atol=1e-12 * np.abs(ref).max(), err_msg=name)


@pytest.mark.parametrize("shape", [(), (6,), (4, 3), (3, 2, 5)])
def test_rescaled_in_row_blocks(tiny_blocks, shape):
    rng = np.random.default_rng(1)
    original = rng.standard_normal(shape).astype(np.float32)
    incoming = np.exp(rng.standard_normal(shape[:1] + (1,) * (len(shape) - 1)))
    outgoing = np.exp(rng.standard_normal((1,) + shape[1:2] + (1,) * max(0, len(shape) - 2)))[:len(shape)] \
        if shape else np.exp(rng.standard_normal(()))
    outgoing = outgoing.reshape(outgoing.shape[:len(shape)])
    result = rewrite.rescaled(original, incoming, outgoing)
    factor = np.broadcast_to(incoming * outgoing, shape)
    expected = (original.astype(np.float64) * factor).astype(np.float32)
    np.testing.assert_array_equal(result.values, expected)
    assert result.values.dtype == np.float32 and result.values.shape == shape
    assert result.max_abs == pytest.approx(float(np.abs(expected.astype(np.float64)).max()))
    assert (result.min_factor, result.max_factor) == pytest.approx((factor.min(), factor.max()))
