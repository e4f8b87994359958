"""Elementwise ops.

* ReLU-family activations, Identity and inference Dropout pass channels through unchanged;
  in the path network they are the identity.
* Add / Sub / Sum / Max / Min of activations *tie* channel c of every input and of the output
  (a residual connection): one scale for all of them. In the path network they are sums.
* Add / Sub of a per-channel constant: the constant is a bias, incoming to the channel.
* Mul by a constant passes channels through (a multiplier with more than one element is a
  parameter on the path, never rescaled); Div by a constant is a fixed weight 1/c.
* Max / Min with a constant zero are ReLU written another way.
"""

from __future__ import annotations

import numpy as np

from ..graph import node_label
from ..symmetry import Layout
from .base import OpRule, register, unbroadcast
from .linear import _add_bias_use


@register
class PassThroughRule(OpRule):
    op_types = ("Relu", "LeakyRelu", "PRelu", "Identity", "Dropout")
    cheap_forward = True  # the backward pass recomputes its output rather than keep it

    def analyse(self, node, an):
        g = an.graph
        x = node.input[0]
        if node.op_type == "PRelu" and not g.is_constant(node.input[1]):
            an.cut(node, f"PRelu '{node_label(node)}' has a slope that is not a constant")
            return
        if node.op_type == "Dropout":
            training = node.input[2] if len(node.input) > 2 and node.input[2] else None
            if training and (not g.is_constant(training) or bool(g.constant_value(training))):
                an.cut(node, f"Dropout '{node_label(node)}' runs in training mode")
                return
        an.set_layout(node.output[0], an.layout(x))

    def forward(self, node, pn):
        pn.set_mass(node.output[0], pn.mass(node.input[0]))

    def backward(self, node, pn):
        pn.add_adjoint(node.input[0], pn.adjoint(node.output[0]))

    onnx_forward = forward
    onnx_backward = backward


def _output_axis(lay: Layout, in_rank: int, out_rank: int) -> int:
    return lay.axis + (out_rank - in_rank)


@register
class CombineRule(OpRule):
    """Add, Sub, Sum, Max, Min: activations tied, constants as biases or ReLU thresholds."""

    op_types = ("Add", "Sub", "Sum", "Max", "Min")
    cheap_forward = True  # the backward pass recomputes its output rather than keep it

    def analyse(self, node, an):
        g = an.graph
        y = node.output[0]
        yshape = g.shape(y)
        acts = [i for i in node.input if i and g.is_activation(i)]
        consts = [i for i in node.input if i and not g.is_activation(i)]
        if yshape is None or any(g.shape(i) is None for i in node.input if i):
            an.cut(node, f"{node.op_type} '{node_label(node)}' has inputs of unknown shape")
            return
        if node.op_type in ("Max", "Min"):
            if any(np.any(g.constant_value(c) != 0) for c in consts):
                an.cut(node, f"{node.op_type} '{node_label(node)}' compares with a non-zero constant")
                return
        elif node.op_type == "Sub" and node.input[1] in acts and node.input[0] not in acts:
            pass  # c - x is as homogeneous as x - c
        layouts = [an.layout(a) for a in acts]
        rank = len(yshape)
        out_layout = None
        if all(lay is not None for lay in layouts):
            axes = {_output_axis(lay, len(g.shape(a)), rank) for a, lay in zip(acts, layouts)}
            if len(axes) == 1:
                axis = axes.pop()
                widest = max(layouts, key=lambda lay: lay.channels)
                if all(lay.channels in (1, widest.channels) for lay in layouts):
                    for lay in layouts:
                        an.tie(widest.pos, lay.pos)
                        self._freeze_unpaired(node, an, widest.pos, lay.pos)
                    out_layout = Layout(axis, widest.pos)
        if out_layout is None:
            for a in acts:
                an.freeze_layout(a, f"{node.op_type} '{node_label(node)}' combines it with a tensor "
                                    f"whose channels cannot follow the same scale")
        an.set_layout(y, out_layout)
        if node.op_type in ("Add", "Sub", "Sum"):
            for c in consts:
                if out_layout is None:
                    an.add_use(node, f"bias:{c}", c, g.shape(c), rows=None, cols=None)
                else:
                    _add_bias_use(node, an, c, g.shape(c), yshape, out_layout.axis, out_layout.pos, role=f"bias:{c}")

    @staticmethod
    def _freeze_unpaired(node, an, a, b):
        # A channel tied to one that has no position (a fixed channel) cannot move either.
        a, b = np.broadcast_arrays(a, b)
        lonely = np.concatenate([a[(b < 0) & (a >= 0)], b[(a < 0) & (b >= 0)]])
        an.freeze(lonely, f"{node.op_type} '{node_label(node)}' ties it to a channel that cannot be rescaled")

    def forward(self, node, pn):
        g = pn.graph
        y = None
        for k, name in enumerate(node.input):
            if not name:
                continue
            if g.is_activation(name):
                term = pn.mass(name)
            elif node.op_type in ("Max", "Min"):
                continue  # max(x, 0) is a ReLU: identity in the path network
            else:
                term = np.square(pn.param(node, f"bias:{name}")[1]) if pn.has_use(node, f"bias:{name}") \
                    else np.square(np.asarray(g.constant_value(name), dtype=np.float64))
            y = term if y is None else y + term
        pn.set_mass(node.output[0], np.broadcast_to(y, pn.graph.shape(node.output[0])).copy())

    def backward(self, node, pn):
        g = pn.graph
        adj = pn.adjoint(node.output[0])
        for name in node.input:
            if not name:
                continue
            if g.is_activation(name):
                pn.add_adjoint(name, unbroadcast(adj, g.shape(name)))
            elif pn.has_use(node, f"bias:{name}"):
                use = pn.use(node, f"bias:{name}")
                pn.emit_g(use, unbroadcast(adj, use.view_shape))

    def onnx_forward(self, node, b):
        g = b.graph
        terms = []
        for name in node.input:
            if not name:
                continue
            if g.is_activation(name):
                terms.append(b.mass(name))
            elif node.op_type in ("Max", "Min"):
                continue
            elif b.has_use(node, f"bias:{name}"):
                terms.append(b.param_sq(node, f"bias:{name}")[1])
            else:
                terms.append(b.const(np.square(b.constant(name))))
        shape = g.shape(node.output[0])
        total = terms[0] if len(terms) == 1 else b.op("Sum", terms)
        b.set_mass(node.output[0], b.op("Expand", [total, b.ints(shape)]))

    def onnx_backward(self, node, b):
        g = b.graph
        adj = b.adjoint(node.output[0])
        shape = g.shape(node.output[0])
        for name in node.input:
            if not name:
                continue
            if g.is_activation(name):
                b.add_adjoint(name, b.unbroadcast(adj, shape, g.shape(name)))
            elif b.has_use(node, f"bias:{name}"):
                use = b.use(node, f"bias:{name}")
                b.emit_g(use, b.unbroadcast(adj, shape, use.view_shape))


@register
class ScaleRule(OpRule):
    """Mul / Div of an activation by a constant."""

    op_types = ("Mul", "Div")
    cheap_forward = True  # the backward pass recomputes its output rather than keep it

    def analyse(self, node, an):
        g = an.graph
        a, b = node.input[0], node.input[1]
        act_a, act_b = g.is_activation(a), g.is_activation(b)
        if act_a and act_b:
            an.cut(node, f"{node.op_type} '{node_label(node)}' multiplies two activations (not positively homogeneous)")
            return
        if node.op_type == "Div" and act_b:
            an.cut(node, f"Div '{node_label(node)}' divides by an activation")
            return
        x, c = (a, b) if act_a else (b, a)
        xshape, yshape, cshape = g.shape(x), g.shape(node.output[0]), g.shape(c)
        if xshape is None or yshape is None or cshape is None:
            an.cut(node, f"{node.op_type} '{node_label(node)}' has inputs of unknown shape")
            return
        lay = an.layout(x)
        an.set_layout(node.output[0], None if lay is None else Layout(_output_axis(lay, len(xshape), len(yshape)), lay.pos))
        if node.op_type == "Mul" and int(np.prod(cshape)) > 1:
            # A multiplier tensor is a parameter on the path; a channel scale passes through it.
            an.add_use(node, "multiplier", c, cshape, rows=None, cols=None)

    @staticmethod
    def _factor(node, pn):
        g = pn.graph
        a, b = node.input[0], node.input[1]
        x, c = (a, b) if g.is_activation(a) else (b, a)
        value = pn.param(node, "multiplier")[1] if pn.has_use(node, "multiplier") \
            else np.asarray(g.constant_value(c), dtype=np.float64)
        factor = np.square(value) if node.op_type == "Mul" else 1.0 / np.square(value)
        return x, factor

    def forward(self, node, pn):
        x, factor = self._factor(node, pn)
        pn.set_mass(node.output[0], np.broadcast_to(pn.mass(x) * factor, pn.graph.shape(node.output[0])).copy())

    def backward(self, node, pn):
        x, factor = self._factor(node, pn)
        adj = pn.adjoint(node.output[0])
        pn.add_adjoint(x, unbroadcast(adj * factor, pn.graph.shape(x)))
        if pn.has_use(node, "multiplier"):
            use = pn.use(node, "multiplier")
            pn.emit_g(use, unbroadcast(adj * pn.mass(x), use.view_shape))

    def _onnx_factor(self, node, b):
        g = b.graph
        a, c = node.input[0], node.input[1]
        x, c = (a, c) if g.is_activation(a) else (c, a)
        if b.has_use(node, "multiplier"):
            factor = b.param_sq(node, "multiplier")[1]
        else:
            value = np.square(b.constant(c))
            factor = b.const(value if node.op_type == "Mul" else 1.0 / value)
        return x, factor

    def onnx_forward(self, node, b):
        x, factor = self._onnx_factor(node, b)
        y = b.op("Mul", [b.mass(x), factor])
        b.set_mass(node.output[0], b.op("Expand", [y, b.ints(b.shape(node.output[0]))]))

    def onnx_backward(self, node, b):
        x, factor = self._onnx_factor(node, b)
        adj = b.adjoint(node.output[0])
        yshape = b.shape(node.output[0])
        b.add_adjoint(x, b.unbroadcast(b.op("Mul", [adj, factor]), yshape, b.shape(x)))
        if b.has_use(node, "multiplier"):
            use = b.use(node, "multiplier")
            b.emit_g(use, b.unbroadcast(b.op("Mul", [adj, b.mass(x)]), yshape, use.view_shape))
