"""Only values change, and each rescaled weight is the original times a per-group factor."""

import os
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from support.checks import assert_equivalent
from support.nets import Net, cnn, mlp
from onnx_pathcond import rescale
from support import repo


def arrays(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def assert_same_structure(before, after):
    assert [(t.name, list(t.dims), t.data_type) for t in before.graph.initializer] == \
           [(t.name, list(t.dims), t.data_type) for t in after.graph.initializer]
    strip = lambda m: [(n.op_type, list(n.input), list(n.output), n.name) for n in m.graph.node]
    assert strip(before) == strip(after)
    assert before.opset_import == after.opset_import
    assert before.graph.input == after.graph.input and before.graph.output == after.graph.output
    assert before.metadata_props == after.metadata_props
    assert before.producer_name == after.producer_name and before.ir_version == after.ir_version


@pytest.mark.parametrize("path", [repo.model("mlp.onnx"), repo.model("cnn.dynamo.onnx"), repo.model("resnet.dynamo_bn.onnx"),
                                  repo.model("helper_mlp.onnx")], ids=os.path.basename)
def test_only_values_change(path):
    before = onnx.load(path)
    after, _ = rescale(path)
    assert_same_structure(before, after)
    onnx.checker.check_model(after)


def test_mlp_factors_are_neuron_scales():
    # For Gemm layers W_k (out × in) with biases: W_k' = diag(λ_k) W_k diag(1/λ_{k-1}),
    # b_k' = λ_k b_k, with λ_0 = λ_last = 1 (graph input and output are fixed).
    model = mlp([7, 9, 6, 4], seed=21)
    after, report = rescale(model)
    a, b = arrays(model), arrays(after)
    names = [t.name for t in model.graph.initializer]
    lam_prev = np.ones(7)
    for layer in range(3):
        w, bias = names[2 * layer], names[2 * layer + 1]
        lam = b[bias].astype(np.float64) / a[bias]
        expected = lam[:, None] * a[w].astype(np.float64) / lam_prev[None, :]
        np.testing.assert_allclose(b[w], expected, rtol=3e-6)
        lam_prev = lam
    np.testing.assert_allclose(lam_prev, 1.0, rtol=1e-6)  # output neurons are frozen
    assert report.groups.rescalable == 15


def test_conv_factor_is_constant_over_kernel_taps():
    model = cnn([3, 5, 4], size=8, seed=22)
    after, _ = rescale(model)
    a, b = arrays(model), arrays(after)
    conv_w = [t.name for t in model.graph.initializer if len(t.dims) == 4]
    for name in conv_w:
        ratio = b[name].astype(np.float64) / a[name]
        np.testing.assert_allclose(ratio, ratio[:, :, :1, :1] * np.ones_like(ratio), rtol=3e-6)
        # rank one over (out, in): ratio[o, i] = λ_o / μ_i
        r = ratio[:, :, 0, 0]
        np.testing.assert_allclose(r, np.outer(r[:, 0], r[0, :] / r[0, 0]), rtol=1e-5)


def _half_precision_mlp(dtype):
    """MLP whose weights are stored in a half type; bfloat16 ones reach Gemm through Cast."""
    net = Net([1, 6], seed=23, dtype=np.float32)
    x = net.x
    for k, (fin, fout) in enumerate([(6, 10), (10, 10), (10, 3)]):
        rng = net.rng
        w, bias = rng.standard_normal((fout, fin)) * 0.5, rng.standard_normal(fout) * 0.1
        if dtype == "float16":
            ws = numpy_helper.from_array(w.astype(np.float16), f"w{k}")
            bs = numpy_helper.from_array(bias.astype(np.float16), f"b{k}")
        else:
            ws = helper.make_tensor(f"w{k}", TensorProto.BFLOAT16, w.shape, w.astype(np.float32).ravel().tolist())
            bs = helper.make_tensor(f"b{k}", TensorProto.BFLOAT16, bias.shape, bias.astype(np.float32).ravel().tolist())
        net.inits += [ws, bs]
        wc = net.node("Cast", [f"w{k}"], to=TensorProto.FLOAT)
        bc = net.node("Cast", [f"b{k}"], to=TensorProto.FLOAT)
        x = net.node("Gemm", [x, wc, bc], transB=1)
        if k < 2:
            x = net.relu(x)
    return net.model(x)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_weights_keep_their_dtype(dtype):
    model = _half_precision_mlp(dtype)
    after, report = rescale(model, rtol=3e-2)
    assert_same_structure(model, after)
    a, b = arrays(model), arrays(after)
    for name in a:
        assert b[name].dtype == a[name].dtype
    ratio = b["b0"].astype(np.float64) / a["b0"].astype(np.float64)
    expected = ratio[:, None] * a["w0"].astype(np.float64)
    tol = 2 ** -10 if dtype == "float16" else 2 ** -7
    np.testing.assert_allclose(b["w0"].astype(np.float64), expected, rtol=2 * tol, atol=1e-3)
    assert report.groups.rescalable == 20
    assert_equivalent(model, after, rtol=3e-2)


def test_constant_node_weights_are_rewritten_in_place():
    before = onnx.load(repo.model("helper_mlp.onnx"))
    after, report = rescale(repo.model("helper_mlp.onnx"))
    consts_before = [n.attribute[0].t for n in before.graph.node if n.op_type == "Constant"]
    consts_after = [n.attribute[0].t for n in after.graph.node if n.op_type == "Constant"]
    assert [c.name for c in consts_before] == [c.name for c in consts_after]
    changed = [not np.array_equal(numpy_helper.to_array(x), numpy_helper.to_array(y))
               for x, y in zip(consts_before, consts_after)]
    assert any(changed)
    assert {r.name for r in report.rewritten} >= {n.output[0] for n in before.graph.node if n.op_type == "Constant"}


def test_input_model_object_is_not_modified():
    model = mlp([5, 6, 2], seed=24)
    snapshot = model.SerializeToString()
    rescale(model)
    assert model.SerializeToString() == snapshot
