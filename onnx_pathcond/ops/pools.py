"""Pooling and reductions over non-channel axes: channels pass through.

In the path network a max becomes a *sum* over its window (every input of the window starts
a path through it) and an average over n elements is a sum with weight 1/n per edge, i.e.
1/n² once squared. A reduction over the channel axis mixes channels: a barrier.
"""

from __future__ import annotations

import numpy as np

from ..graph import attr, node_label
from ..symmetry import Layout
from . import graphops
from .base import OpRule, normalize_axis, register
from .windows import crop_input, geometry, pad_input, scatter_windows, window_count_weights, window_view


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
    cheap_forward = True  # the backward pass recomputes its output rather than keep it

    def analyse(self, node, an):
        if len(node.output) > 1 and node.output[1] and an.graph.consumers.get(node.output[1]):
            an.cut(node, f"MaxPool '{node_label(node)}' has its Indices output used")
            return
        if an.graph.shape(node.input[0]) is None:
            an.cut(node, f"{node.op_type} '{node_label(node)}' has an input of unknown shape")
            return
        _require_channel_axis_one(node, an, node.input[0])

    @staticmethod
    def _setup(node, pn):
        x = pn.mass(node.input[0])[0]
        out_shape = pn.graph.shape(node.output[0])
        geo = geometry(node, x.shape[1:], attr(node, "kernel_shape"), out_shape[2:] if out_shape else None,
                       ceil_mode=bool(attr(node, "ceil_mode", 0)))
        if node.op_type == "MaxPool":
            weight = None
        else:
            weight = window_count_weights(geo, bool(attr(node, "count_include_pad", 0)))
        return x, geo, weight

    def forward(self, node, pn):
        x, geo, weight = self._setup(node, pn)
        nd = len(geo.kernel)
        y = window_view(pad_input(x, geo), geo).sum(axis=tuple(range(1, 1 + nd)))
        if weight is not None:
            y = y * weight
        pn.set_mass(node.output[0], y[None])

    def backward(self, node, pn):
        x, geo, weight = self._setup(node, pn)
        adj = pn.adjoint(node.output[0])[0]
        if weight is not None:
            adj = adj * weight
        nd = len(geo.kernel)
        cols = np.broadcast_to(adj.reshape((adj.shape[0],) + (1,) * nd + adj.shape[1:]),
                               (adj.shape[0],) + geo.kernel + geo.out_size)
        pn.add_adjoint(node.input[0], crop_input(scatter_windows(cols, geo), geo)[None])

    def _onnx_setup(self, node, b):
        shape = b.shape(node.input[0])
        out_shape = b.shape(node.output[0])
        geo = geometry(node, shape[2:], attr(node, "kernel_shape"), out_shape[2:] if out_shape else None,
                       ceil_mode=bool(attr(node, "ceil_mode", 0)))
        weight = None
        if node.op_type == "AveragePool":
            weight = b.const(window_count_weights(geo, bool(attr(node, "count_include_pad", 0)))[None, None])
        return shape, geo, weight

    def onnx_forward(self, node, b):
        shape, geo, weight = self._onnx_setup(node, b)
        parts = graphops.window_slices(b, graphops.pad_input(b, b.mass(node.input[0]), geo), geo)
        y = parts[0] if len(parts) == 1 else b.op("Sum", parts)
        b.set_mass(node.output[0], y if weight is None else b.op("Mul", [y, weight]))

    def onnx_backward(self, node, b):
        shape, geo, weight = self._onnx_setup(node, b)
        adj = b.adjoint(node.output[0])
        if weight is not None:
            adj = b.op("Mul", [adj, weight])
        full = graphops.scatter_windows(b, [adj] * geo.kernel_volume, shape[1], geo)
        b.add_adjoint(node.input[0], graphops.crop_input(b, full, geo))


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
    cheap_forward = True  # the backward pass recomputes its output rather than keep it

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

    @staticmethod
    def _setup(node, pn):
        shape = pn.graph.shape(node.input[0])
        axes = tuple(_reduce_axes(node, pn.graph, len(shape)))
        count = int(np.prod([shape[a] for a in axes])) if axes else 1
        averaging = node.op_type in ("GlobalAveragePool", "ReduceMean")
        weight = 1.0 / count ** 2 if averaging else 1.0
        return shape, axes, weight

    def forward(self, node, pn):
        shape, axes, weight = self._setup(node, pn)
        x = pn.mass(node.input[0])
        y = x.sum(axis=axes) * weight if axes else x.copy()
        pn.set_mass(node.output[0], y.reshape(pn.graph.shape(node.output[0])))

    def backward(self, node, pn):
        shape, axes, weight = self._setup(node, pn)
        adj = pn.adjoint(node.output[0])
        kept = [1 if a in axes else d for a, d in enumerate(shape)]
        pn.add_adjoint(node.input[0], np.broadcast_to(adj.reshape(kept) * weight, shape))

    def onnx_forward(self, node, b):
        shape, axes, weight = self._setup(node, b)
        x = b.mass(node.input[0])
        y = b.reduce_sum(x, list(axes), keepdims=1) if axes else x
        if weight != 1.0:
            y = b.op("Mul", [y, b.const(weight)])
        b.set_mass(node.output[0], b.reshape(y, b.shape(node.output[0])))

    def onnx_backward(self, node, b):
        shape, axes, weight = self._setup(node, b)
        kept = [1 if a in axes else d for a, d in enumerate(shape)]
        adj = b.reshape(b.adjoint(node.output[0]), kept)
        if weight != 1.0:
            adj = b.op("Mul", [adj, b.const(weight)])
        b.add_adjoint(node.input[0], b.op("Expand", [adj, b.ints(shape)]))
