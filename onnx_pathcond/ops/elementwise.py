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

from ..channels import Layout, add_bias_use
from ..nodes import node_label
from ..pathnet.primitives import Bias, Identity, Scale, Weight
from .base import OpRule, register


@register
class PassThroughRule(OpRule):
    op_types = ("Relu", "LeakyRelu", "PRelu", "Identity", "Dropout")

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

    def path(self, node, ctx):
        return [Identity(node.input[0], node.output[0])]


def _output_axis(lay: Layout, in_rank: int, out_rank: int) -> int:
    return lay.axis + (out_rank - in_rank)


@register
class CombineRule(OpRule):
    """Add, Sub, Sum, Max, Min: activations tied, constants as biases or ReLU thresholds."""

    op_types = ("Add", "Sub", "Sum", "Max", "Min")

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
                    add_bias_use(node, an, c, g.shape(c), yshape, out_layout.axis, out_layout.pos, role=f"bias:{c}")

    @staticmethod
    def _freeze_unpaired(node, an, a, b):
        # A channel tied to one that has no position (a fixed channel) cannot move either.
        a, b = np.broadcast_arrays(a, b)
        lonely = np.concatenate([a[(b < 0) & (a >= 0)], b[(a < 0) & (b >= 0)]])
        an.freeze(lonely, f"{node.op_type} '{node_label(node)}' ties it to a channel that cannot be rescaled")

    def path(self, node, ctx):
        """A sum: each activation as is (broadcast), each constant as a squared bias; Max / Min
        with zero are ReLUs, the zero dropped."""
        y = node.output[0]
        form = []
        for name in dict.fromkeys(i for i in node.input if i):
            count = list(node.input).count(name)
            if ctx.is_activation(name):
                form.extend(Identity(name, y) for _ in range(count))
            elif node.op_type in ("Add", "Sub", "Sum"):
                role = f"bias:{name}"
                weight = ctx.weight(node, role, gain=count) if ctx.has_use(node, role) \
                    else Weight(value=np.square(ctx.constant(name)), gain=count)
                form.append(Bias(y, weight, tuple(ctx.shape(name))))
        return form


@register
class ScaleRule(OpRule):
    """Mul / Div of an activation by a constant."""

    op_types = ("Mul", "Div")

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

    def path(self, node, ctx):
        a, b = node.input[0], node.input[1]
        x, c = (a, b) if ctx.is_activation(a) else (b, a)
        if ctx.has_use(node, "multiplier"):
            weight = ctx.weight(node, "multiplier")
        else:
            value = np.square(ctx.constant(c))
            weight = Weight(value=value if node.op_type == "Mul" else 1.0 / value)
        return [Scale(x, node.output[0], weight, tuple(ctx.shape(c)))]
