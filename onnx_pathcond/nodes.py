"""Reading ONNX nodes: attribute values and the name a node goes by in messages."""

from __future__ import annotations

import onnx
from onnx import helper


def attr(node: onnx.NodeProto, name: str, default=None):
    """A node attribute's Python value, or `default` when absent."""
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def node_label(node: onnx.NodeProto) -> str:
    """How a node is named in messages: its name, or its first output."""
    return node.name or (node.output[0] if node.output else node.op_type)
