"""onnxruntime's com.microsoft.FusedConv (Conv + activation, in models it saves optimised at
the EXTENDED level) is a Conv followed by its activation: with Relu or LeakyRelu its output
channels are neurons; any other activation makes it a barrier with its reason."""

import numpy as np
import onnx
import pytest
from onnx import helper

from support.checks import assert_equivalent
from support.nets import Net, cnn
from onnx_pathcond import rescale
from onnx_pathcond.api import analyse_model
from onnx_pathcond.stats import diag_g_by_tensor

ort = pytest.importorskip("onnxruntime")


def _optimised_by_onnxruntime(model, tmp_path):
    src, dst = tmp_path / "plain.onnx", tmp_path / "extended.onnx"
    onnx.save(model, src)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    return onnx.load(dst)


def test_a_model_saved_by_onnxruntime_rescales_like_the_original(tmp_path):
    plain = cnn([3, 6, 8], seed=1, size=8)
    fused = _optimised_by_onnxruntime(plain, tmp_path)
    assert sum(n.op_type == "FusedConv" and n.domain == "com.microsoft" for n in fused.graph.node) == 2
    out, report = rescale(fused)
    assert report.groups.rescalable == 6 + 8  # both convolutions' channels
    assert report.verification.passed
    assert_equivalent(fused, out)
    # The same path network as the unfused model: the same diag(G), from both executors.
    expected = diag_g_by_tensor(*analyse_model(plain)[:2])
    for backend in ("numpy", "onnxruntime"):
        got = diag_g_by_tensor(*analyse_model(fused)[:2], backend=backend)
        assert set(got) == set(expected)
        for name, g in expected.items():
            np.testing.assert_allclose(got[name], g, rtol=1e-10, err_msg=name)


def _fused_net(activation):
    """conv(2→2)–relu, FusedConv(2→3, activation), conv(3→4)–relu, global pool, Gemm."""
    net = Net([1, 2, 5, 5], seed=3)
    x = net.relu(net.conv(net.x, 2, 2, 1))
    w, b = net.param([3, 2, 3, 3]), net.param([3], "b")
    y = net.name("fused")
    attrs = {"activation": activation}
    if activation == "LeakyRelu":
        attrs["activation_params"] = [0.1]
    net.nodes.append(helper.make_node("FusedConv", [x, w, b], [y], domain="com.microsoft", name="the_fused",
                                      kernel_shape=[3, 3], pads=[1, 1, 1, 1], **attrs))
    y = net.relu(net.conv(y, 3, 4, 1))
    y = net.node("Flatten", [net.node("GlobalAveragePool", [y])], axis=1)
    y = net.gemm(y, 4, 2)
    graph = helper.make_graph(net.nodes, "net", net.inputs, [helper.make_tensor_value_info(y, 1, [1, 2])],
                              initializer=net.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("activation,free", [("Relu", 2 + 3 + 4), ("LeakyRelu", 2 + 3 + 4), ("Sigmoid", 4)])
def test_the_activation_decides(activation, free):
    model = _fused_net(activation)
    out, report = rescale(model)
    assert report.groups.rescalable == free
    if activation == "Sigmoid":  # the first conv's channels reach it and are frozen, with the reason
        assert any("FusedConv 'the_fused' applies Sigmoid" in row.reason for row in report.frozen)
    assert_equivalent(model, out)
