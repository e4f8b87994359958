"""Clip with a minimum of 0 and no maximum: max(x, 0), a ReLU written another way.

The legacy PyTorch exporter writes `clamp(min=0)` like this (min as an input from opset 11,
as an attribute before). A Clip with neither bound is an identity. Any other Clip (a maximum,
as in ReLU6, or a non-zero minimum) is not positively homogeneous: a barrier.
"""

from __future__ import annotations

import numpy as np

from ..nodes import attr, node_label
from ..pathnet.primitives import Identity
from .base import OpRule, register


def _not_homogeneous(node, graph):
    """Why this Clip is neither max(x, 0) nor the identity, or None when it is one of them."""
    low = node.input[1] if len(node.input) > 1 else ""
    high = node.input[2] if len(node.input) > 2 else ""
    if high or attr(node, "max") is not None:
        return "has a maximum, so it is not positively homogeneous"
    if low:  # opset 11 and later
        if not graph.is_constant(low):
            return "has a minimum that is not a constant"
        value = graph.constant_value(low)
    else:  # opset 6 to 10, or no minimum at all
        value = attr(node, "min")
    if value is not None and np.any(np.asarray(value) != 0):
        return "has a minimum other than 0"
    return None


@register
class ClipRule(OpRule):
    op_types = ("Clip",)

    def analyse(self, node, an):
        why = _not_homogeneous(node, an.graph)
        if why is not None:
            an.cut(node, f"Clip '{node_label(node)}' {why}")
            return
        an.set_layout(node.output[0], an.layout(node.input[0]))  # channels pass through

    def path(self, node, ctx):
        return [Identity(node.input[0], node.output[0])]
