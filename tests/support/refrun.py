"""Run an ONNX graph with onnx's reference evaluator, float64 convolutions included.

onnxruntime's CPU provider has no float64 Conv, so the path network's native-convolution
form (the one written for CUDA) is checked on the CPU with onnx's reference evaluator. Two
of its ops fall short of the ONNX spec and are replaced here by plain numpy versions:
`ConvTranspose` with groups other than depthwise, and `Pad` with negative pads (a crop).
"""

from __future__ import annotations

import itertools

import numpy as np
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun


class ConvTranspose(OpRun):
    """y[n, g·Og + o, i·stride + k·dilation − pad] += x[n, g·Cg + c, i] · w[g·Cg + c, o, k]."""

    def _run(self, x, w, B=None, auto_pad=None, dilations=None, group=None, kernel_shape=None,
             output_padding=None, output_shape=None, pads=None, strides=None):
        assert output_shape is None and auto_pad in (None, "NOTSET", b"NOTSET")
        samples = [self._one(x[n:n + 1], w, B, dilations, group, output_padding, pads, strides)
                   for n in range(x.shape[0])]
        return (np.concatenate(samples),)

    @staticmethod
    def _one(x, w, B, dilations, group, output_padding, pads, strides):
        group = group or 1
        nd = x.ndim - 2
        kernel = w.shape[2:]
        strides = strides or [1] * nd
        dilations = dilations or [1] * nd
        pads = pads or [0] * (2 * nd)
        output_padding = output_padding or [0] * nd
        in_size = x.shape[2:]
        full = [(n - 1) * s + (k - 1) * d + 1 + p for n, s, k, d, p in
                zip(in_size, strides, kernel, dilations, output_padding)]
        per_group_in, per_group_out = x.shape[1] // group, w.shape[1]
        y = np.zeros((group * per_group_out,) + tuple(full), dtype=x.dtype)
        xg = x[0].reshape(group, per_group_in, -1)
        for offset in itertools.product(*(range(k) for k in kernel)):
            wk = w[(slice(None), slice(None)) + offset].reshape(group, per_group_in, per_group_out)
            spread = np.einsum("gcp,gco->gop", xg, wk).reshape((group * per_group_out,) + tuple(in_size))
            index = (slice(None),) + tuple(slice(o * d, o * d + (n - 1) * s + 1, s)
                                           for o, d, n, s in zip(offset, dilations, in_size, strides))
            y[index] += spread
        crop = (slice(None),) + tuple(slice(b, f - e) for b, e, f in zip(pads[:nd], pads[nd:], full))
        y = y[crop]
        if B is not None:
            y = y + B.reshape((-1,) + (1,) * nd)
        return y[None]


class Pad(OpRun):
    """Constant-mode Pad where a negative pad removes elements, as the ONNX spec says."""

    def _run(self, data, pads, constant_value=None, axes=None, mode=None):
        assert mode in (None, "constant", b"constant") and axes is None
        n = data.ndim
        pads = [int(p) for p in pads]
        crop = tuple(slice(max(-b, 0), s - max(-e, 0)) for b, e, s in zip(pads[:n], pads[n:], data.shape))
        data = data[crop]
        widths = [(max(b, 0), max(e, 0)) for b, e in zip(pads[:n], pads[n:])]
        value = 0 if constant_value is None else np.asarray(constant_value).item()
        return (np.pad(data, widths, constant_values=value),)


def reference_run(model, names, feeds):
    return ReferenceEvaluator(model, new_ops=[ConvTranspose, Pad]).run(names, feeds)
