"""Small ONNX graphs built in code for the tests (onnx.helper only, seeded weights)."""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper


class Net:
    """A tiny graph builder: each method adds nodes and returns the output tensor name."""

    def __init__(self, input_shape: Sequence[Optional[int]], seed: int = 0, scale: float = 1.0,
                 dtype=np.float32, opset: int = 17, input_name: str = "x"):
        self.rng = np.random.default_rng(seed)
        self.scale = scale
        self.dtype = dtype
        self.opset = opset
        self.nodes: List[onnx.NodeProto] = []
        self.inits: List[onnx.TensorProto] = []
        self.inputs = [helper.make_tensor_value_info(input_name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)),
                                                     list(input_shape))]
        self.x = input_name
        self._n = 0

    def name(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}{self._n}"

    def param(self, shape, prefix="w", scale=None, positive=False, value=None) -> str:
        name = self.name(prefix)
        if value is None:
            value = self.rng.standard_normal(shape) * (self.scale if scale is None else scale)
            if positive:
                value = np.abs(value) + 0.1
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=self.dtype), name))
        return name

    def node(self, op, inputs, n_out=1, **attrs):
        outs = [self.name(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=self.name(op + "_"), **attrs))
        return outs[0] if n_out == 1 else outs

    # ---------------------------------------------------------------- layers
    def conv(self, x, cin, cout, k, stride=1, pad=0, group=1, bias=True, dilation=1, nd=2, **attrs):
        ks = [k] * nd if isinstance(k, int) else list(k)
        w = self.param([cout, cin // group] + ks)
        ins = [x, w] + ([self.param([cout], "b")] if bias else [])
        kw = dict(kernel_shape=ks, strides=[stride] * nd, dilations=[dilation] * nd, group=group)
        if "auto_pad" in attrs:
            kw["auto_pad"] = attrs.pop("auto_pad")
        else:
            kw["pads"] = [pad] * (2 * nd) if isinstance(pad, int) else list(pad)
        kw.update(attrs)
        return self.node("Conv", ins, **kw)

    def conv_transpose(self, x, cin, cout, k, stride=1, pad=0, group=1, bias=True, nd=2, **attrs):
        ks = [k] * nd
        w = self.param([cin, cout // group] + ks)
        ins = [x, w] + ([self.param([cout], "b")] if bias else [])
        return self.node("ConvTranspose", ins, kernel_shape=ks, strides=[stride] * nd, pads=[pad] * (2 * nd),
                         group=group, **attrs)

    def gemm(self, x, fin, fout, bias=True, transB=1, alpha=1.0, beta=1.0):
        w = self.param([fout, fin] if transB else [fin, fout])
        ins = [x, w] + ([self.param([fout], "b")] if bias else [])
        return self.node("Gemm", ins, transB=transB, alpha=alpha, beta=beta)

    def matmul(self, x, fin, fout, bias=True):
        y = self.node("MatMul", [x, self.param([fin, fout])])
        if bias:
            y = self.node("Add", [y, self.param([fout], "b")])
        return y

    def bn(self, x, c):
        gamma = self.param([c], "gamma", positive=False)
        beta = self.param([c], "beta", scale=0.5)
        mean = self.param([c], "mean", scale=0.3)
        var = self.param([c], "var", positive=True)
        return self.node("BatchNormalization", [x, gamma, beta, mean, var], epsilon=1e-5)

    def relu(self, x):
        return self.node("Relu", [x])

    def const_i64(self, values) -> str:
        name = self.name("shape")
        self.inits.append(numpy_helper.from_array(np.asarray(values, dtype=np.int64), name))
        return name

    def model(self, *outputs, output_shapes=None) -> onnx.ModelProto:
        outs = [helper.make_tensor_value_info(o, helper.np_dtype_to_tensor_dtype(np.dtype(self.dtype)),
                                              None if output_shapes is None else output_shapes[k])
                for k, o in enumerate(outputs)]
        graph = helper.make_graph(self.nodes, "net", self.inputs, outs, initializer=self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        m.ir_version = 8
        if output_shapes is None:  # declare the output shapes that inference finds
            inferred = onnx.shape_inference.infer_shapes(m)
            known = {vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
            for out in m.graph.output:
                if out.name in known:
                    out.type.CopyFrom(known[out.name].type)
        onnx.checker.check_model(m)
        return m


def mlp(widths, seed=0, scale=1.0, bias=True, kind="gemm", dtype=np.float32, batch=1, prune=0.0):
    """A ReLU MLP with the given widths (input first)."""
    net = Net([batch, widths[0]], seed=seed, scale=scale, dtype=dtype)
    x = net.x
    for k, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        x = net.gemm(x, a, b, bias=bias) if kind == "gemm" else net.matmul(x, a, b, bias=bias)
        if k < len(widths) - 2:
            x = net.relu(x)
    if prune:
        for t in net.inits:
            arr = numpy_helper.to_array(t).copy()
            arr[net.rng.random(arr.shape) < prune] = 0
            t.CopyFrom(numpy_helper.from_array(arr, t.name))
    return net.model(x)


def cnn(channels, seed=0, scale=1.0, size=8, pool="max", dtype=np.float32, classes=3, batch=1):
    """Conv-ReLU(-pool) blocks then Flatten and a Gemm head."""
    net = Net([batch, channels[0], size, size], seed=seed, scale=scale, dtype=dtype)
    x = net.x
    for a, b in zip(channels[:-1], channels[1:]):
        x = net.relu(net.conv(x, a, b, 3, pad=1))
        if size >= 4:
            x = net.node("MaxPool" if pool == "max" else "AveragePool", [x], kernel_shape=[2, 2], strides=[2, 2])
            size //= 2
    x = net.node("Flatten", [x], axis=1)
    x = net.gemm(x, channels[-1] * size * size, classes)
    return net.model(x)
