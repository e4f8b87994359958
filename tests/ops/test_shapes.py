"""Static shapes where onnx's shape inference is wrong or silent.

* A pool in ceil_mode whose last window would start in the end padding: onnxruntime drops
  that window, onnx's inference keeps it. The runtime's shape must win, or flattened
  elements are paired with the wrong channels.
* An op that shape inference does not know (a contrib op that onnxruntime runs): it is a
  barrier, and so is everything whose shape is lost behind it, each with a reason naming the
  op; the run is not refused with a hint about --input-shape.
"""


import onnx
import pytest
from onnx import helper

from support.checks import assert_equivalent
from support.nets import Net
from onnx_pathcond import rescale

pytest.importorskip("onnxruntime")


def _ceil_pool_net(op):
    # length 3, kernel 2, stride 2, pads 1/1: onnx says 3 windows, onnxruntime computes 2
    net = Net([1, 2, "H", "W"], seed=1)
    y = net.relu(net.conv(net.x, 2, 3, 1))
    y = net.node(op, [y], kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1)
    y = net.node("Flatten", [y], axis=1)
    y = net.relu(net.gemm(y, 3 * 2 * 2, 4))
    return net.model(net.gemm(y, 4, 2), output_shapes=[[1, 2]])


@pytest.mark.parametrize("op", ["AveragePool", "MaxPool"])
def test_ceil_mode_pool_takes_the_runtime_shape(tmp_path, op, run_cli):
    model = _ceil_pool_net(op)
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    proc = run_cli(src, dst, "--input-shape", "x:1x2x3x3", "-q")
    assert proc.returncode == 0, proc.stderr
    out = onnx.load(dst)
    assert_equivalent(model, out)  # fed with H = W = 3
    _, report = rescale(model, input_shapes={"x": (1, 2, 3, 3)}, verify_output=False)
    assert report.groups.rescalable == 3 + 4  # the conv's channels and the hidden layer


def test_an_op_without_shape_inference_is_a_barrier_naming_it():
    # com.microsoft.Gelu runs in onnxruntime; onnx's shape inference does not know it
    net = Net([1, 2, 5, 5], seed=4)
    a = net.relu(net.conv(net.x, 2, 3, 3, pad=1))
    b = net.relu(net.conv(a, 3, 4, 1))
    g = net.name("gelu")
    net.nodes.append(helper.make_node("Gelu", [b], [g], domain="com.microsoft", name="the_gelu"))
    y = net.relu(net.conv(g, 4, 4, 1))
    y = net.node("GlobalAveragePool", [y])
    y = net.node("Flatten", [y], axis=1)
    y = net.gemm(y, 4, 2)
    graph = helper.make_graph(net.nodes, "net", net.inputs,
                              [helper.make_tensor_value_info(y, onnx.TensorProto.FLOAT, [1, 2])], initializer=net.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    out, report = rescale(model)
    assert report.groups.rescalable == 3  # the first conv's channels, before the Gelu
    reasons = [row.reason for row in report.frozen]
    assert any("Gelu 'the_gelu'" in r and "com.microsoft" in r for r in reasons), reasons
    assert not any("--input-shape" in r for r in reasons)
    assert report.verification.passed
    assert_equivalent(model, out)
