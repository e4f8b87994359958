"""The small networks that the diag(G) tests run through the brute-force reference and the
backends (test_diag_g.py, test_backends.py), in one place both import.

`CASES` and `MORE_CASES` map a name to a function that builds the model; the two are kept
apart because test_diag_g.py checks them in two tests.
"""

import numpy as np
from onnx import numpy_helper

from support.nets import Net, cnn, mlp


def _conv_net(**conv):
    def build():
        net = Net([1, 2, 5, 5], seed=1)
        y = net.relu(net.conv(net.x, 2, 3, 3, **conv))
        y = net.node("Flatten", [y], axis=1)
        stride, pad, dil = conv.get("stride", 1), conv.get("pad", 0), conv.get("dilation", 1)
        out = (5 + 2 * pad - 2 * dil - 1) // stride + 1 if "auto_pad" not in conv else None
        n = 3 * out * out if out else None
        if n is None:
            y = net.node("ReduceSum", [y, net.const_i64([1])], keepdims=1)
            return net.model(y)
        return net.model(net.gemm(y, n, 2))
    return build


def _pool_net(op, **attrs):
    def build():
        net = Net([1, 2, 5, 5], seed=2)
        y = net.relu(net.conv(net.x, 2, 2, 1))
        y = net.node(op, [y], **attrs)
        y = net.conv(y, 2, 1, 1)
        return net.model(y)
    return build


def _grouped():
    net = Net([1, 4, 4, 4], seed=3)
    y = net.relu(net.conv(net.x, 4, 4, 3, pad=1, group=2))
    y = net.relu(net.conv(y, 4, 4, 3, pad=1, group=4))  # depthwise
    return net.model(net.conv(y, 4, 2, 1))


def mlp_matmul_transposed_weight():
    net = Net([1, 3], seed=4)
    w = net.param([4, 3])
    wt = net.node("Transpose", [w], perm=[1, 0])
    y = net.node("Add", [net.node("MatMul", [net.x, wt]), net.param([4], "b")])
    y = net.relu(y)
    return net.model(net.gemm(y, 4, 2, alpha=0.5, beta=2.0))


def _conv1d_3d():
    net = Net([1, 2, 6], seed=5)
    y = net.relu(net.conv(net.x, 2, 3, 3, stride=2, pad=1, dilation=1, nd=1))
    y = net.node("Unsqueeze", [y, net.const_i64([3, 4])])
    y = net.conv(y, 3, 2, [1, 1, 1], nd=3)
    return net.model(y)


def residual_bn_concat():
    net = Net([1, 2, 4, 4], seed=6)
    a = net.relu(net.bn(net.conv(net.x, 2, 3, 3, pad=1, bias=False), 3))
    b = net.relu(net.bn(net.conv(a, 3, 3, 3, pad=1, bias=False), 3))
    s = net.relu(net.node("Add", [a, b]))
    c = net.node("Concat", [s, net.conv(s, 3, 2, 1)], axis=1)
    g = net.node("GlobalAveragePool", [c])
    return net.model(net.gemm(net.node("Flatten", [g], axis=1), 5, 2))


def _conv_transpose():
    net = Net([1, 2, 3, 3], seed=7)
    y = net.relu(net.conv_transpose(net.x, 2, 3, 2, stride=2))
    y = net.relu(net.conv_transpose(y, 3, 2, 3, stride=1, pad=1, group=1))
    return net.model(net.conv(y, 2, 1, 1))


def _barrier():
    net = Net([1, 3], seed=8)
    y = net.node("Sigmoid", [net.gemm(net.x, 3, 4)])
    y = net.relu(net.gemm(y, 4, 3))
    return net.model(net.gemm(y, 3, 2))


def _clip_relu():
    net = Net([1, 3, 4, 4], seed=16, opset=13)
    zero = net.param([], prefix="min", value=0.0)
    y = net.node("Clip", [net.conv(net.x, 3, 4, 3, pad=1), zero])  # clamp(min=0), opset 11+
    y = net.node("MaxPool", [y], kernel_shape=[2, 2], strides=[2, 2])
    y = net.node("Flatten", [y], axis=1)
    return net.model(net.gemm(y, 16, 2))


def _split_to_sequence(kind):
    """A split written as SplitToSequence + SequenceAt (PyTorch's dynamo exporter without its
    optimiser): unequal channel pieces into a ShuffleNet-style unit (one piece through a
    branch, concatenated with the other, then a channel shuffle); pieces of one row each
    without the split axis (keepdims=0), two of them concatenated; chunks of 2 channels (the
    last one shorter, the first unused)."""
    def build():
        net = Net([1, 2, 3, 3], seed=17, opset=17)
        a = net.relu(net.conv(net.x, 2, 4 if kind != "chunks" else 5, 1))
        if kind == "shuffle":
            seq = net.node("SplitToSequence", [a, net.const_i64([1, 3])], axis=1)
            left = net.node("SequenceAt", [seq, net.const_i64(0)])
            right = net.relu(net.conv(net.node("SequenceAt", [seq, net.const_i64(-1)]), 3, 3, 1))
            c = net.node("Concat", [left, right], axis=1)
            c = net.node("Reshape", [c, net.const_i64([1, 2, 2, 3, 3])])
            c = net.node("Transpose", [c], perm=[0, 2, 1, 3, 4])
            c = net.node("Reshape", [c, net.const_i64([1, 4, 3, 3])])
            return net.model(net.conv(c, 4, 2, 1))
        if kind == "rows":
            seq = net.node("SplitToSequence", [a], axis=2, keepdims=0)
            rows = [net.node("SequenceAt", [seq, net.const_i64(k)]) for k in (0, 2)]
            y = net.node("Concat", rows, axis=2)  # [1, 4, 6]
            return net.model(net.conv(y, 4, 2, 1, nd=1))
        seq = net.node("SplitToSequence", [a, net.const_i64(2)], axis=1)  # pieces of 2, 2, 1 channels
        y = net.node("Concat", [net.node("SequenceAt", [seq, net.const_i64(k)]) for k in (2, 1)], axis=1)
        return net.model(net.conv(net.relu(net.conv(y, 3, 3, 1)), 3, 2, 1))
    return build


CASES = {
    "mlp_with_biases": lambda: mlp([3, 4, 3, 2], seed=0),
    "mlp_matmul_add": lambda: mlp([3, 4, 2], seed=1, kind="matmul"),
    "conv_pad_stride": _conv_net(stride=2, pad=1),
    "conv_dilation": _conv_net(dilation=2, pad=2),
    "conv_same_upper": _conv_net(auto_pad="SAME_UPPER", stride=2),
    "conv_same_lower": _conv_net(auto_pad="SAME_LOWER"),
    "maxpool": _pool_net("MaxPool", kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 1, 1]),
    "maxpool_ceil": _pool_net("MaxPool", kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
    "avgpool_exclude_pad": _pool_net("AveragePool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    "avgpool_include_pad": _pool_net("AveragePool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
                                     count_include_pad=1),
    "avgpool_ceil": _pool_net("AveragePool", kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
    "global_max": _pool_net("GlobalMaxPool"),
    "grouped_and_depthwise": _grouped,
    "conv1d_and_3d": _conv1d_3d,
    "residual_bn_concat": residual_bn_concat,
    "conv_transpose": _conv_transpose,
    "cnn_maxpool_flatten": lambda: cnn([1, 2, 2], size=4, seed=3),
    "cnn_avgpool": lambda: cnn([2, 2], size=4, pool="avg", seed=4),
    "sigmoid_barrier": _barrier,
    "pruned_mlp": lambda: mlp([4, 5, 3], seed=5, prune=0.4),
    "clip_min_zero": _clip_relu,
    "split_to_sequence_shuffle": _split_to_sequence("shuffle"),
    "split_to_sequence_rows": _split_to_sequence("rows"),
    "split_to_sequence_chunks": _split_to_sequence("chunks"),
}


def resize_net(mode, shape=(1, 2, 3, 3), scales=(1, 1, 2, 2), channels=2, seed=12):
    def build():
        net = Net(list(shape), seed=seed, opset=13)
        y = net.relu(net.conv(net.x, shape[1], channels, 1))
        name = net.name("scales")
        net.inits.append(numpy_helper.from_array(np.array(scales, dtype=np.float32), name))
        y = net.node("Resize", [y, "", name], mode=mode)
        return net.model(net.conv(y, channels, 1, 1))
    return build


def _residual_only():
    net = Net([1, 2, 3, 3], seed=13)
    s = net.relu(net.conv(net.x, 2, 2, 3, pad=1))
    t = net.conv(net.relu(net.conv(s, 2, 2, 3, pad=1)), 2, 2, 1)
    s = net.relu(net.node("Add", [s, t]))
    return net.model(net.conv(s, 2, 1, 1))


def _concat_split_slice():
    net = Net([1, 2, 4, 4], seed=14)
    a = net.relu(net.conv(net.x, 2, 3, 1))
    b = net.relu(net.conv(net.x, 2, 2, 1))
    c = net.node("Concat", [a, b], axis=1)
    left, right = net.node("Split", [c, net.const_i64([2, 3])], n_out=2, axis=1)
    s = net.node("Slice", [right, net.const_i64([1]), net.const_i64([3]), net.const_i64([2])])  # H rows 1..2
    pad = net.node("Pad", [s, net.const_i64([0, 0, 1, 0, 0, 0, 1, 0])])
    y = net.node("Concat", [net.conv(left, 2, 3, 1), pad], axis=1)
    return net.model(net.conv(y, 6, 1, 1))


def _bn_after_concat():
    net = Net([1, 2, 3, 3], seed=15)
    a = net.relu(net.bn(net.conv(net.x, 2, 2, 3, pad=1, bias=False), 2))
    c = net.node("Concat", [net.x, a], axis=1)
    y = net.relu(net.bn(c, 4))
    return net.model(net.conv(y, 4, 2, 1))


MORE_CASES = {
    "resize_nearest": resize_net("nearest"),
    "residual_identity": _residual_only,
    "concat_split_slice_pad": _concat_split_slice,
    "bn_after_concat": _bn_after_concat,
}
