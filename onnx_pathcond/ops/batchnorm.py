"""BatchNormalization (inference form): the neuron lives *after* it.

Its γ and β are incoming parameters of the group after the BN: scaling both by λ scales the
output by λ whatever mean and variance the BN normalises with, so the rescaled model is
equivalent in inference *and* when trained with BN in training mode. The channel between the
producer and the BN is not a neuron of its own (a scale there is exact only in inference).

In the path network the BN is its affine form a = γ/√(var+ε), b = β − a·mean: the forward
mass is a²·x + b², and the statistics of the entries a_c and b_c are reported under γ and β.
"""

from __future__ import annotations

import numpy as np

from ..channels import Layout
from ..nodes import attr, node_label
from ..pathnet.primitives import Bias, Scale, Weight
from .base import OpRule, register


@register
class BatchNormRule(OpRule):
    op_types = ("BatchNormalization",)

    def analyse(self, node, an):
        g = an.graph
        x, y = node.input[0], node.output[0]
        if attr(node, "training_mode", 0) or any(o for o in node.output[1:]):
            an.cut(node, f"BatchNormalization '{node_label(node)}' is in training form (running statistics outputs)")
            return
        if any(not g.is_constant(i) for i in node.input[1:5]):
            an.cut(node, f"BatchNormalization '{node_label(node)}' has parameters that are not constants")
            return
        shape = g.shape(x)
        if shape is None or len(shape) < 2:
            an.cut(node, f"BatchNormalization '{node_label(node)}' has an input of unknown shape")
            return
        an.freeze_layout(x, f"feeds BatchNormalization '{node_label(node)}' (its γ and β carry the scale)",
                         "before_bn")
        channels = shape[1]
        out_pos = an.new_positions(node, y, channels)
        an.set_layout(y, Layout(1, out_pos))
        an.add_use(node, "bn_scale", node.input[1], (channels,), rows=out_pos, cols=None)
        an.add_use(node, "bn_bias", node.input[2], (channels,), rows=out_pos, cols=None)

    def path(self, node, ctx):
        """y = a²·x + b² per channel, with a = γ/√(var+ε) and b = β − a·mean: the statistics
        of a² and b² are reported under γ and β."""
        x, y = node.input[0], node.output[0]
        gamma, beta = ctx.param_value(node, "bn_scale"), ctx.param_value(node, "bn_bias")
        mean, var = ctx.constant(node.input[3]), ctx.constant(node.input[4])
        a = gamma / np.sqrt(var + attr(node, "epsilon", 1e-5))
        b = beta - a * mean
        shape = ctx.shape(x)
        view = (1, shape[1]) + (1,) * (len(shape) - 2)
        return [Scale(x, y, Weight(ctx.use(node, "bn_scale"), np.square(a)), view),
                Bias(y, Weight(ctx.use(node, "bn_bias"), np.square(b)), view)]
