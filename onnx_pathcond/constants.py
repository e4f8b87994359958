"""The values of constant tensors: Constant nodes, and nodes whose inputs are all constant
(static shapes, casts, dequantisation, anything onnx's reference evaluator runs).

The few ops that exporters use to compute shapes (Expand, Reshape, Concat, Gather, Cast,
Slice, integer arithmetic, ...) and that move elements (Flatten, Transpose) are computed here
with numpy, the way onnx's reference evaluator
computes them: importing the evaluator costs more than folding a whole model's shape
arithmetic, and most models need nothing else. Any other op, and any case these functions
do not take, goes to the evaluator.

`Graph.constant_value` is the entry point (it reads initializers and caches small values);
this module computes what is not stored.

The functions take the `graph.Graph` view as `graph`; graph.py calls them, and nothing here
imports it back.
"""

from __future__ import annotations

from typing import List, Optional

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import ModelError
from .nodes import attr, node_label



def constant_node_array(node: onnx.NodeProto) -> np.ndarray:
    """The value a Constant node holds, whichever of its attributes holds it."""
    value = node.attribute[0]
    if value.name == "value":
        return numpy_helper.to_array(value.t)
    if value.name == "value_float":
        return np.array(value.f, dtype=np.float32)
    if value.name == "value_floats":
        return np.array(list(value.floats), dtype=np.float32)
    if value.name == "value_int":
        return np.array(value.i, dtype=np.int64)
    if value.name == "value_ints":
        return np.array(list(value.ints), dtype=np.int64)
    if value.name == "value_string":
        return np.array(value.s)
    if value.name == "value_strings":
        return np.array(list(value.strings))
    raise ModelError(f"Constant node '{node.name or node.output[0]}' has an attribute '{value.name}' that is not supported")


def computed_value(graph, name: str) -> np.ndarray:
    """The value of `name`, a constant that no initializer stores: a Constant node's, or its
    producer's run on the values of its (constant) inputs."""
    if name in graph.constant_nodes:
        return constant_node_array(graph.constant_nodes[name])
    node = graph.producer.get(name)
    if node is None or name in graph.activations:
        raise ModelError(f"tensor '{name}' is not a constant")
    if node.op_type == "Shape":
        shape = np.array(graph.shapes[node.input[0]], dtype=np.int64)
        return shape[attr(node, "start", 0):attr(node, "end", None)]
    if node.op_type == "CastLike":
        target = graph.elem_type.get(node.input[1], TensorProto.FLOAT)
        return graph.constant_value(node.input[0]).astype(helper.tensor_dtype_to_np_dtype(target))
    if node.op_type == "Size":
        return np.array(int(np.prod(graph.shapes[node.input[0]])), dtype=np.int64)
    if node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx") and not attr(node, "block_size", 0):
        # onnx's reference evaluator has no DequantizeLinear before opset 19 (QDQ exports use 13)
        return _dequantize(graph, node)
    return _evaluate_node(graph, node)[list(node.output).index(name)]


def _dequantize(graph, node: onnx.NodeProto) -> np.ndarray:
    """(x - zero_point) * scale, per tensor or per channel along `axis`."""
    x = graph.constant_value(node.input[0])
    scale = graph.constant_value(node.input[1])
    zero = graph.constant_value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if scale.ndim == 1 and x.ndim > 1:
        axis = attr(node, "axis", 1) % x.ndim
        shape = [1] * x.ndim
        shape[axis] = -1
        scale = scale.reshape(shape)
        zero = zero.reshape(shape) if zero is not None else None
    value = x.astype(np.float32) if zero is None else x.astype(np.float32) - zero.astype(np.float32)
    return (value * scale).astype(scale.dtype)


def _axes(node: onnx.NodeProto, axes_input: tuple):
    """The `axes` of Squeeze / Unsqueeze (the second input from opset 13, an attribute before),
    as ints; None when absent."""
    axes = axes_input[0] if axes_input else attr(node, "axes", None)
    return None if axes is None else [int(a) for a in np.asarray(axes).ravel()]


def _unsqueeze(node, x, *axes_input):
    return np.expand_dims(x, tuple(_axes(node, axes_input)))  # numpy counts negative axes on the output, as ONNX


def _squeeze(node, x, *axes_input):
    axes = _axes(node, axes_input)
    return np.squeeze(x, axis=None if axes is None else tuple(a % x.ndim for a in axes))


def _flattened(node, x):
    axis = attr(node, "axis", 1)
    return x.reshape((1, -1) if axis == 0 else (int(np.prod(x.shape[:axis])), -1))


def _reshaped(x: np.ndarray, shape, allowzero: int = 0) -> np.ndarray:
    """ONNX Reshape: -1 inferred; a 0 keeps the input's extent there unless `allowzero`."""
    if shape.dtype != np.int64 or shape.ndim != 1:
        return None  # not a valid shape input: the evaluator says what it makes of it
    shape = np.array(shape, dtype=np.int64)
    if not allowzero:
        zeros = np.flatnonzero(shape == 0)
        shape[zeros] = np.array(x.shape, dtype=np.int64)[zeros]
    return x.reshape(tuple(int(d) for d in shape))


def _sliced(x: np.ndarray, starts, ends, axes=None, steps=None) -> np.ndarray:
    """ONNX Slice (opset 10 on: bounds as inputs). Python's slices count negative bounds from
    the end and clamp the rest the way ONNX does, for either sign of step."""
    starts, ends = np.asarray(starts).ravel(), np.asarray(ends).ravel()
    axes = range(len(starts)) if axes is None else [int(a) for a in np.asarray(axes).ravel()]
    steps = [1] * len(starts) if steps is None else np.asarray(steps).ravel()
    if not len(starts) == len(ends) == len(axes) == len(steps):
        raise ValueError("starts, ends, axes and steps differ in length")
    index = [slice(None)] * x.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps):
        if int(step) == 0:
            raise ValueError("a step of 0")
        index[axis] = slice(int(start), int(end), int(step))
    return x[tuple(index)]


def _integer_divide(x, y):
    """Integer Div truncates towards zero, in integer arithmetic (no float detour)."""
    q = np.floor_divide(x, y)
    return q + ((np.remainder(x, y) != 0) & ((x < 0) ^ (y < 0))).astype(q.dtype)


def _binary(op):
    def run(node, a, b):
        if a.dtype != b.dtype:
            raise ValueError("inputs of different types")
        if op is np.divide and np.issubdtype(a.dtype, np.integer):
            return _integer_divide(a, b)
        return np.asarray(op(a, b)).astype(a.dtype, copy=False)
    return run


# numpy folding of one node: op type -> f(node, *input values) -> output value. Each raises
# (or returns None) on a case it does not take; the reference evaluator then runs the node.
_STANDARD_CASTS = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.INT8,
                   TensorProto.INT16, TensorProto.INT32, TensorProto.INT64, TensorProto.UINT8,
                   TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64, TensorProto.BOOL}
_NUMPY_FOLDS = {
    "Expand": lambda node, x, shape: np.array(np.broadcast_to(
        x, np.broadcast_shapes(x.shape, tuple(int(d) for d in shape)))),
    "Flatten": _flattened,
    "Reshape": lambda node, x, shape: _reshaped(x, shape, attr(node, "allowzero", 0)),
    "Slice": lambda node, x, *bounds: _sliced(x, *bounds) if len(bounds) >= 2 else None,
    "Concat": lambda node, *xs: np.concatenate(xs, axis=attr(node, "axis", None)) if any(
        a.name == "axis" for a in node.attribute) else None,
    "Gather": lambda node, x, indices: np.take(x, indices, axis=attr(node, "axis", 0)),
    "Cast": lambda node, x: (x.astype(helper.tensor_dtype_to_np_dtype(attr(node, "to", None)))
                             if attr(node, "to", None) in _STANDARD_CASTS and x.dtype.kind in "biuf" else None),
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Transpose": lambda node, x: np.transpose(x, attr(node, "perm", None) or None),
    "Add": _binary(np.add),
    "Sub": _binary(np.subtract),
    "Mul": _binary(np.multiply),
    "Div": _binary(np.divide),
}


def run_with_numpy(node: onnx.NodeProto, inputs: list) -> Optional[np.ndarray]:
    """The one output of `node` on the input values `inputs` (in the node's order) with numpy
    (`_NUMPY_FOLDS`), or None where onnx's reference evaluator must decide. The movement rule
    runs its index tensors through the same functions."""
    fold = _NUMPY_FOLDS.get(node.op_type)
    if fold is None or node.domain not in ("", "ai.onnx") or len([o for o in node.output if o]) != 1 \
            or any(not i for i in node.input):
        return None
    try:
        with np.errstate(all="ignore"):
            value = fold(node, *inputs)
    except Exception:
        return None
    return None if value is None else np.asarray(value)


def _fold_with_numpy(node: onnx.NodeProto, feeds: dict):
    """`run_with_numpy` on the constant values `feeds` (by name), as a list of outputs."""
    value = run_with_numpy(node, [feeds.get(i) for i in node.input])  # an omitted input: declined there
    return None if value is None else [value]


def _evaluate_node(graph, node: onnx.NodeProto) -> List[np.ndarray]:
    """Run one node whose inputs are all constant (numpy for the common shape arithmetic,
    onnx's reference evaluator for the rest)."""
    feeds = {i: graph.constant_value(i) for i in node.input if i}
    folded = _fold_with_numpy(node, feeds)
    if folded is not None:
        return folded
    from onnx.reference import ReferenceEvaluator

    inputs = [helper.make_tensor_value_info(i, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
              for i, v in feeds.items()]
    outputs = [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in node.output if o]
    model = helper.make_model(helper.make_graph([node], "fold", inputs, outputs),
                              opset_imports=list(graph.model.opset_import), ir_version=graph.model.ir_version)
    try:
        results = ReferenceEvaluator(model).run(None, feeds)
    except Exception as e:
        raise ModelError(f"cannot evaluate constant node '{node_label(node)}' ({node.op_type}): {e}") from None
    return [np.asarray(r) for r in results]
