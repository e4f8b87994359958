"""Resize / Upsample (nearest, linear, cubic): channels pass through.

These interpolations are linear in the input and separable: along each spatial axis a, the
output is M_a @ input with a fixed matrix M_a. So the op is positively homogeneous, a channel
scale passes through it, and its path network applies M_a² (each interpolation weight
squared) along every resized axis; the adjoint applies (M_a²)ᵀ.

M_a is found by running the node once per axis on a batch of one-hot probes (probe j is 1 at
index j of axis a and 1 everywhere along the other axes, whose interpolation weights sum to
one). A mode that is not of this form (crop-and-resize with an extrapolation value,
antialiasing that mixes axes) is detected by the probe and treated as a barrier.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from ..nodes import attr, node_label
from ..pathnet.primitives import AxisMatrices
from .base import OpRule, register


def _probe_matrices(node, graph):
    """[M_a for each spatial axis] or None when the op is not a separable linear map."""
    from onnx.reference import ReferenceEvaluator

    x = node.input[0]
    in_shape, out_shape = graph.shape(x), graph.shape(node.output[0])
    if in_shape is None or out_shape is None or len(in_shape) < 3:
        return None
    if tuple(out_shape[:2]) != tuple(in_shape[:2]):
        return None  # resizing the batch or channel axis
    mode = attr(node, "coordinate_transformation_mode", b"half_pixel")
    if (mode.decode() if isinstance(mode, bytes) else mode) == "tf_crop_and_resize":
        return None
    matrices = []
    for axis in range(2, len(in_shape)):
        n = in_shape[axis]
        probe_shape = [n, 1] + list(in_shape[2:])
        along_axis = [1] * len(in_shape)
        along_axis[axis] = n
        which = np.arange(n).reshape([n] + [1] * (len(in_shape) - 1))  # probe j is one-hot at j
        probe = np.broadcast_to(np.arange(n).reshape(along_axis) == which, probe_shape).astype(np.float32)
        feeds, inputs = {x: probe}, [helper.make_tensor_value_info(x, TensorProto.FLOAT, probe_shape)]
        for k, name in enumerate(node.input[1:], start=1):
            if not name:
                continue
            value = np.asarray(graph.constant_value(name))
            if k == 3 and node.op_type == "Resize":  # sizes: batch and channels follow the probe
                value = value.copy()
                if value.size == len(in_shape):
                    value[:2] = [n, 1]
            feeds[name] = value
            inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype),
                                                        value.shape))
        out = helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None)
        model = helper.make_model(helper.make_graph([node], "probe", inputs, [out]),
                                  opset_imports=list(graph.model.opset_import), ir_version=graph.model.ir_version)
        try:
            y = np.asarray(ReferenceEvaluator(model).run(None, feeds)[0], dtype=np.float64)
        except Exception:
            return None
        if y.shape[2:] != tuple(out_shape[2:]) or y.shape[0] != n:
            return None
        # y[j, 0, ..., k (axis), ...] must not depend on the other axes.
        moved = np.moveaxis(y[:, 0], axis - 1, 1).reshape(n, out_shape[axis], -1)
        if not np.allclose(moved, moved[:, :, :1], rtol=1e-6, atol=1e-7):
            return None
        matrices.append(moved[:, :, 0].T.copy())  # M[k, j]
    return matrices


@register
class ResizeRule(OpRule):
    op_types = ("Resize", "Upsample")

    def analyse(self, node, an):
        g = an.graph
        if any(name and not g.is_constant(name) for name in node.input[1:]):
            an.cut(node, f"{node.op_type} '{node_label(node)}' has scales or sizes that are not constants")
            return
        matrices = _probe_matrices(node, g)
        if matrices is None:
            an.cut(node, f"{node.op_type} '{node_label(node)}' is not a per-axis linear interpolation")
            return
        an.node_data[g.index(node)] = [np.square(m) for m in matrices]
        lay = an.layout(node.input[0])
        if lay is not None and lay.axis != 1:
            an.freeze(lay.pos, f"{node.op_type} '{node_label(node)}' resizes the axis that holds the channels")
            lay = None
        an.set_layout(node.output[0], lay)

    def path(self, node, ctx):
        return [AxisMatrices(node.input[0], node.output[0], tuple(ctx.data(node)))]
