"""Model builders and helpers that several test modules share (no test module imports another)."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from support.nets import Net


def unbalanced_mlp(dtype, huge, tiny):
    """A 3-layer MLP whose first layer is huge (with a few small weights in it) and second
    tiny: PathCond scales the first down and the second up by large factors, which would
    take the small weights below half precision's normal range."""
    net = Net(["N", 6], seed=7, dtype=dtype)
    h = net.relu(net.gemm(net.x, 6, 8))
    h = net.relu(net.gemm(h, 8, 8))
    y = net.gemm(h, 8, 3)
    model = net.model(y)
    for k, t in enumerate(model.graph.initializer):  # weight and bias of each layer in turn
        if k >= 4:
            continue
        value = numpy_helper.to_array(t).astype(np.float64) * (huge if k < 2 else tiny)
        if k == 0:
            value.flat[:3] = [1e-3, -2e-3, 1.5e-3]
        t.CopyFrom(numpy_helper.from_array(value.astype(dtype), t.name))
    return model


def weights(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def float16_inside(model32):
    """The float32 model with float16 weights and arithmetic, float32 at its inputs and
    outputs (a Cast after the input and before each output)."""
    model = onnx.ModelProto.FromString(model32.SerializeToString())
    for t in model.graph.initializer:
        if t.data_type == TensorProto.FLOAT:
            t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t).astype(np.float16), t.name))
    x = model.graph.input[0].name
    for node in model.graph.node:
        node.input[:] = ["x16" if i == x else i for i in node.input]
    outputs = [o.name for o in model.graph.output]
    for node in model.graph.node:
        node.output[:] = [o + "_16" if o in outputs else o for o in node.output]
    for node in model.graph.node:
        node.input[:] = [i + "_16" if i in outputs else i for i in node.input]
    casts = [helper.make_node("Cast", [x], ["x16"], to=TensorProto.FLOAT16)]
    casts += [helper.make_node("Cast", [o + "_16"], [o], to=TensorProto.FLOAT) for o in outputs]
    nodes = [casts[0]] + list(model.graph.node) + casts[1:]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.graph.value_info[:]
    onnx.checker.check_model(model)
    return model


def near_cancelling(seed=1, closeness=1e-3):
    """y = Σ relu(a_i·x + 50) − relu(b_i·x + 50) with rows b_i within `closeness` of a_i: the
    output is a small difference of large terms, so its rounding noise is far above 1e-5."""
    rng = np.random.default_rng(seed)
    net = Net([1, 8], seed=seed)
    w1 = rng.standard_normal((16, 8)).astype(np.float32)
    w1[8:] = w1[:8] * (1 + closeness * rng.standard_normal((8, 8))).astype(np.float32)
    h = net.relu(net.node("Gemm", [net.x, net.param(None, value=w1), net.param(None, value=np.full(16, 50.0, np.float32))],
                          transB=1))
    w2 = np.concatenate([np.ones(8), -np.ones(8)]).astype(np.float32)[None]
    return net.model(net.node("Gemm", [h, net.param(None, value=w2)], transB=1))


def dead_channel_bn_net(inputs, width, outputs, seed, scale, variance, mean, dtype=np.float32, eps=1e-5):
    """Gemm → ReLU → BatchNormalization → ReLU → Gemm whose running variance is 0 on the first
    half of the BN's channels (units that never fired) and `variance` on the others, the first
    layer's weights `scale` times larger than usual, so that the criterion wants to shrink the
    BN's input channels (which --bn-statistics must not do where the variance is 0)."""
    half = width // 2
    net = Net([1, inputs], seed=seed, dtype=dtype)
    h = net.relu(net.node("Gemm", [net.x, net.param([width, inputs], scale=scale), net.param([width], "b")],
                          transB=1))
    gamma, beta = net.param([width], "gamma"), net.param([width], "beta", scale=0.5)
    running_mean = net.param([width], "mean", value=np.r_[np.zeros(half), np.full(width - half, mean)])
    running_var = net.param([width], "var", value=np.r_[np.zeros(half), np.full(width - half, variance)])
    y = net.relu(net.node("BatchNormalization", [h, gamma, beta, running_mean, running_var], epsilon=eps))
    return net.model(net.node("Gemm", [y, net.param([outputs, width])], transB=1))

