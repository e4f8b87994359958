"""Writing the rescaled parameters back into the ModelProto (DESIGN.md §4).

Only the *values* of initializers and Constant-node tensors change; names, shapes, dtypes,
node order, opsets and metadata stay as they were. Each element is multiplied, in float64,
by exp((u[in] − u[out]) / 2) (λ of the group it is incoming to, over λ of the group it is
outgoing from) and cast back to the tensor's own dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .graph import Graph, stored_array
from .symmetry import Groups, ParamUse


@dataclass
class RewrittenTensor:
    name: str
    consumer: str  # node that reads it
    op_type: str
    role: str
    dtype: str
    min_factor: float
    max_factor: float
    max_abs_after: float


def element_scales(use: ParamUse, groups: Groups, u: np.ndarray) -> np.ndarray:
    """Per-element multiplier of a parameter in its consumer's layout (broadcastable)."""
    u_ext = np.append(u, 0.0)
    H = groups.count

    def log_scale(positions):
        ids = np.where(positions >= 0, groups.of_position[np.maximum(positions, 0)], -1) \
            if groups.of_position.size else np.full(positions.shape, -1)
        return u_ext[np.where(ids >= 0, ids, H)]

    return np.exp((log_scale(use.rows) - log_scale(use.cols)) / 2.0)


def _write_values(tensor: TensorProto, values: np.ndarray) -> None:
    """Replace a TensorProto's data in place, keeping its name, dims, dtype and storage style."""
    field = _typed_field(tensor)
    if field is None or tensor.HasField("raw_data"):
        for f in _TYPED_FIELDS:
            tensor.ClearField(f)
        tensor.raw_data = numpy_helper.from_array(values, tensor.name).raw_data
        return
    tensor.ClearField(field)
    flat = values.ravel()
    if tensor.data_type in (TensorProto.FLOAT16, TensorProto.BFLOAT16):
        getattr(tensor, field).extend(flat.view(np.uint16).astype(np.int32).tolist())
    else:
        getattr(tensor, field).extend(flat.tolist())


_TYPED_FIELDS = ("float_data", "double_data", "int32_data", "int64_data", "uint64_data")


def _typed_field(tensor: TensorProto):
    for f in _TYPED_FIELDS:
        if len(getattr(tensor, f)):
            return f
    return None


def _constant_tensor(node: onnx.NodeProto) -> TensorProto:
    for a in node.attribute:
        if a.name == "value":
            return a.t
    return None


def apply(model: onnx.ModelProto, graph: Graph, uses: List[ParamUse], groups: Groups,
          u: np.ndarray) -> List[RewrittenTensor]:
    """Rescale, in place, every stored tensor that some rescalable group touches."""
    done: Dict[str, RewrittenTensor] = {}
    for use in uses:
        if use.ref is None or use.ignored or use.ref.name in done:
            continue
        scale_view = np.broadcast_to(element_scales(use, groups, u), use.view_shape)
        if np.all(scale_view == 1.0):
            continue
        scale = use.ref.to_stored(scale_view)
        if use.ref.kind == "initializer":
            tensor = graph.initializers[use.ref.name]
        else:
            tensor = _constant_tensor(graph.constant_nodes[use.ref.name])
            if tensor is None:  # value_float(s): rewrite the list attribute
                node = graph.constant_nodes[use.ref.name]
                original = graph.stored_value(use.ref)
                new = (original.astype(np.float64) * scale).astype(original.dtype)
                a = node.attribute[0]
                if a.name == "value_float":
                    a.f = float(new)
                else:
                    del a.floats[:]
                    a.floats.extend(new.ravel().tolist())
                done[use.ref.name] = _summary(use, original.dtype, scale, new)
                continue
        original = stored_array(tensor)
        new = (original.astype(np.float64) * scale).astype(original.dtype)
        _write_values(tensor, new)
        done[use.ref.name] = _summary(use, original.dtype, scale, new)
    return list(done.values())


def _summary(use: ParamUse, dtype, scale: np.ndarray, new: np.ndarray) -> RewrittenTensor:
    finite = np.asarray(new, dtype=np.float64)
    return RewrittenTensor(
        name=use.ref.name, consumer=use.node.name or use.node.output[0], op_type=use.node.op_type, role=use.role,
        dtype=str(np.dtype(dtype)), min_factor=float(scale.min()), max_factor=float(scale.max()),
        max_abs_after=float(np.abs(finite).max()) if finite.size else 0.0)
