"""The values of constant tensors: Constant nodes, and nodes whose inputs are all constant
(static shapes, casts, dequantisation, anything onnx's reference evaluator runs).

`Graph.constant_value` is the entry point (it reads initializers and caches small values);
this module computes what is not stored.

The functions take the `graph.Graph` view as `graph`; graph.py calls them, and nothing here
imports it back.
"""

from __future__ import annotations

from typing import List

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


def _evaluate_node(graph, node: onnx.NodeProto) -> List[np.ndarray]:
    """Run one node whose inputs are all constant (onnx's reference evaluator)."""
    from onnx.reference import ReferenceEvaluator

    feeds = {i: graph.constant_value(i) for i in node.input if i}
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
