"""Pooling and reductions over non-channel axes: channels pass through.

In the path network a max becomes a *sum* over its window (every input of the window starts
a path through it) and an average over n elements is a sum with weight 1/n per edge, i.e.
1/n² once squared. A reduction over the channel axis mixes channels: a barrier.
"""

from __future__ import annotations

import numpy as np

from ..channels import Layout
from ..geometry import geometry, window_count_weights
from ..nodes import attr, node_label
from ..pathnet.primitives import ReduceSum, WindowSum
from .base import OpRule, normalize_axis, register


def _require_channel_axis_one(node, an, x) -> bool:
    lay = an.layout(x)
    if lay is not None and lay.axis != 1:
        an.freeze(lay.pos, f"{node.op_type} '{node_label(node)}' pools over the axis that holds the channels")
        an.set_layout(node.output[0], None)
        return False
    an.set_layout(node.output[0], lay)
    return True


@register
class WindowPoolRule(OpRule):
    op_types = ("MaxPool", "AveragePool")

    def analyse(self, node, an):
        if len(node.output) > 1 and node.output[1] and an.graph.consumers.get(node.output[1]):
            an.cut(node, f"MaxPool '{node_label(node)}' has its Indices output used")
            return
        if an.graph.shape(node.input[0]) is None:
            an.cut(node, f"{node.op_type} '{node_label(node)}' has an input of unknown shape")
            return
        _require_channel_axis_one(node, an, node.input[0])

    def path(self, node, ctx):
        x, y = node.input[0], node.output[0]
        geo = geometry(node, ctx.shape(x)[2:], attr(node, "kernel_shape"), ctx.shape(y)[2:],
                       ceil_mode=bool(attr(node, "ceil_mode", 0)))
        weight = None
        if node.op_type == "AveragePool":
            weight = window_count_weights(geo, bool(attr(node, "count_include_pad", 0)))
        return [WindowSum(x, y, geo, weight)]


def _reduce_axes(node, graph, rank):
    """Reduced axes of a Reduce* / Global*Pool node (normalised), or None for 'all'."""
    if node.op_type.startswith("Global"):
        return list(range(2, rank))
    axes = attr(node, "axes", None)
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = graph.constant_value(node.input[1]).tolist()
    if not axes:
        if attr(node, "noop_with_empty_axes", 0):
            return []
        return list(range(rank))
    return sorted(normalize_axis(int(a), rank) for a in axes)


@register
class ReduceRule(OpRule):
    op_types = ("GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceSum", "ReduceMax")

    def analyse(self, node, an):
        g = an.graph
        x = node.input[0]
        shape = g.shape(x)
        if shape is None:
            an.cut(node, f"{node.op_type} '{node_label(node)}' has an input of unknown shape")
            return
        if len(node.input) > 1 and node.input[1] and not g.is_constant(node.input[1]):
            an.cut(node, f"{node.op_type} '{node_label(node)}' reduces over axes that are not constant")
            return
        axes = _reduce_axes(node, g, len(shape))
        lay = an.layout(x)
        if lay is None:
            an.set_layout(node.output[0], None)
            return
        if lay.axis in axes:
            an.freeze(lay.pos, f"{node.op_type} '{node_label(node)}' reduces over the channel axis")
            an.set_layout(node.output[0], None)
            return
        keepdims = node.op_type.startswith("Global") or attr(node, "keepdims", 1)
        axis = lay.axis if keepdims else lay.axis - sum(1 for a in axes if a < lay.axis)
        an.set_layout(node.output[0], Layout(axis, lay.pos))

    def path(self, node, ctx):
        x = node.input[0]
        shape = ctx.shape(x)
        axes = tuple(_reduce_axes(node, ctx.graph, len(shape)))
        count = int(np.prod([shape[a] for a in axes])) if axes else 1
        averaging = node.op_type in ("GlobalAveragePool", "ReduceMean")
        return [ReduceSum(x, node.output[0], axes, 1.0 / count ** 2 if averaging else 1.0)]
