"""BatchNormalization (inference form): the neuron lives *after* it.

Its γ and β are incoming parameters of the group after the BN: scaling both by λ scales the
output by λ whatever mean and variance the BN normalises with, so the rescaled model is
equivalent in inference *and* when trained with BN in training mode.

The channel between the producer and the BN is frozen by default: a scale λ there is exact
in inference only if the running statistics follow it. With `bn_statistics` (the
--bn-statistics option) they do: mean ↦ λ·mean and var ↦ λ²·(var + ε) − ε, so that √(var + ε)
becomes λ·√(var + ε) and the BN's output does not move. In training mode the BN normalises
with the batch's own statistics instead, (λx − λμ)/√(λ²σ² + ε) against (x − μ)/√(σ² + ε): the
same up to ε, which acts as ε/λ² (docs/design.md §1.5).

In the path network the BN is its affine form a = γ/√(var+ε), b = β − a·mean: the forward
mass is a²·x + b², and the statistics of the entries a_c and b_c are reported under γ and β.
With `bn_statistics`, a_c is also outgoing from the input channel: γ carries its incoming
scale and the running variance its outgoing one, so the use of γ has both sides (like a
depthwise weight) and the statistic of a_c stays one entry, reported under γ.
"""

from __future__ import annotations

from typing import Optional

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
        channels = shape[1]
        in_pos = self._input_carried_by_statistics(node, an, channels)
        out_pos = an.new_positions(node, y, channels)
        an.set_layout(y, Layout(1, out_pos))
        an.add_use(node, "bn_scale", node.input[1], (channels,), rows=out_pos, cols=in_pos,
                   stores_cols=in_pos is None)
        an.add_use(node, "bn_bias", node.input[2], (channels,), rows=out_pos, cols=None)
        if in_pos is not None:  # the running statistics take the input channel's scale
            an.add_use(node, "bn_mean", node.input[3], (channels,), rows=in_pos, cols=None)
            an.add_use(node, "bn_var", node.input[4], (channels,), rows=in_pos, cols=None, power=2,
                       offset=float(attr(node, "epsilon", 1e-5)))

    @staticmethod
    def _input_carried_by_statistics(node, an, channels: int) -> Optional[np.ndarray]:
        """The positions of the input channels when the running statistics carry their scale,
        or None: then they are frozen, with the reason."""
        x, label = node.input[0], node_label(node)
        layout = an.layout(x)
        if layout is None:
            return None  # nothing before the BN can move (a graph input, a barrier's output)
        why = None
        if not an.bn_statistics:
            why = f"feeds BatchNormalization '{label}' (its γ and β carry the scale)"
        elif not isinstance(layout, Layout) or layout.axis != 1 or layout.channels != channels:
            why = f"feeds BatchNormalization '{label}' along another axis than its channels"
        elif any(an.graph.stored_ref(name) is None for name in node.input[3:5]):
            why = (f"feeds BatchNormalization '{label}', whose running statistics are computed from other "
                   f"constants and cannot carry the scale")
        if why is not None:
            an.freeze_layout(x, why, "before_bn")
            return None
        return layout.pos

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
