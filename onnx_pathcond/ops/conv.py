"""Conv and ConvTranspose: sources for their output channels, sinks for their input channels.

Grouped convolutions join input channel `g·C_in/G + i` to the output channels of group g;
depthwise is G = C_in. The path network is the same convolution with squared weights (its
adjoint is the transposed convolution, and a weight's statistic the correlation of the
forward mass entering it with the adjoint mass leaving it), plus the squared bias.
"""

from __future__ import annotations

import numpy as np

from ..channels import Layout
from ..geometry import geometry, transpose_geometry
from ..nodes import attr, node_label
from ..pathnet.primitives import Bias, Conv, ConvTranspose
from .base import OpRule, extent_agrees, register


def _constant_inputs_or_cut(node, an, names) -> bool:
    for name in names:
        if name and not an.graph.is_constant(name):
            an.cut(node, f"{node.op_type} '{node_label(node)}' has a weight or bias '{name}' that is not a constant")
            return False
    return True


def _input_cols(node, an, x, channels, axis=1):
    """Positions of the input channels, or None (frozen, with the reason) when unusable."""
    lay = an.layout(x)
    if lay is None:
        return None
    if lay.axis != axis or lay.channels != channels:
        an.freeze(lay.pos, f"{node.op_type} '{node_label(node)}' reads channels on an axis other than the one they live on")
        return None
    return lay.pos


def _bias_name(node):
    return node.input[2] if len(node.input) > 2 and node.input[2] else None


def _source_prologue(node, an, out_axis):
    """What Conv and ConvTranspose share: constant weights, and fresh positions for the
    output channels (their count is the weight's `out_axis` times the groups, for
    ConvTranspose, whose weight is [C_in, C_out/G, ...]). None after cutting the node."""
    x, w, b = node.input[0], node.input[1], _bias_name(node)
    if not _constant_inputs_or_cut(node, an, [w, b]):
        return None
    wshape = an.graph.shape(w)
    groups = attr(node, "group", 1)
    n_in = wshape[1] * groups if out_axis == 0 else wshape[0]
    if not extent_agrees(node, an, x, 1, n_in, rank=len(wshape)):
        return None
    n_out = wshape[0] if out_axis == 0 else wshape[1] * groups
    y = node.output[0]
    out_pos = an.new_positions(node, y, n_out)
    an.set_layout(y, Layout(1, out_pos))
    return x, w, b, wshape, groups, out_pos


def _with_bias(node, ctx, primitives):
    """The node's primitives, and its squared bias added per output channel when it has one."""
    if _bias_name(node):
        shape = ctx.shape(node.output[0])
        primitives.append(Bias(node.output[0], ctx.weight(node, "bias"), (1, shape[1]) + (1,) * (len(shape) - 2)))
    return primitives


@register
class ConvRule(OpRule):
    op_types = ("Conv",)

    def analyse(self, node, an):
        prologue = _source_prologue(node, an, out_axis=0)
        if prologue is None:
            return
        x, w, b, wshape, groups, out_pos = prologue
        n_out, per_group_in = wshape[0], wshape[1]
        n_in, nd = per_group_in * groups, len(wshape) - 2
        in_pos = _input_cols(node, an, x, n_in)
        spatial = (1,) * nd
        cols = None
        if in_pos is not None:
            if groups == 1:
                cols = in_pos.reshape((1, n_in) + spatial)
            else:
                group_of_out = np.arange(n_out) // (n_out // groups)
                index = group_of_out[:, None] * per_group_in + np.arange(per_group_in)[None, :]
                cols = in_pos[index].reshape((n_out, per_group_in) + spatial)
        an.add_use(node, "weight", w, wshape, rows=out_pos.reshape((n_out, 1) + spatial), cols=cols)
        if b:
            an.add_use(node, "bias", b, (n_out,), rows=out_pos, cols=None)

    def path(self, node, ctx):
        x, y = node.input[0], node.output[0]
        weight = ctx.weight(node, "weight")
        geo = geometry(node, ctx.shape(x)[2:], weight.use.view_shape[2:], ctx.shape(y)[2:])
        return _with_bias(node, ctx, [Conv(x, y, weight, geo, attr(node, "group", 1))])


@register
class ConvTransposeRule(OpRule):
    op_types = ("ConvTranspose",)

    def analyse(self, node, an):
        prologue = _source_prologue(node, an, out_axis=1)
        if prologue is None:
            return
        x, w, b, wshape, groups, out_pos = prologue
        n_in, per_group_out = wshape[0], wshape[1]
        n_out, nd = per_group_out * groups, len(wshape) - 2
        spatial = (1,) * nd
        if groups == 1:
            rows = out_pos.reshape((1, n_out) + spatial)
        else:
            group_of_in = np.arange(n_in) // (n_in // groups)
            rows = out_pos[group_of_in[:, None] * per_group_out + np.arange(per_group_out)[None, :]]
            rows = rows.reshape((n_in, per_group_out) + spatial)
        in_pos = _input_cols(node, an, x, n_in)
        cols = None if in_pos is None else in_pos.reshape((n_in, 1) + spatial)
        an.add_use(node, "weight", w, wshape, rows=rows, cols=cols)
        if b:
            an.add_use(node, "bias", b, (n_out,), rows=out_pos, cols=None)

    def path(self, node, ctx):
        x, y = node.input[0], node.output[0]
        weight = ctx.weight(node, "weight")
        scatter, begin, out_size = transpose_geometry(node, ctx.shape(x)[2:], weight.use.view_shape[2:],
                                                      ctx.shape(y)[2:])
        return _with_bias(node, ctx, [ConvTranspose(x, y, weight, scatter, begin, out_size, attr(node, "group", 1))])


# onnxruntime's activations that are positively homogeneous: a FusedConv with one of them is a
# Conv followed by a ReLU-like op.
_HOMOGENEOUS_ACTIVATIONS = ("Relu", "LeakyRelu")


@register
class FusedConvRule(ConvRule):
    """com.microsoft.FusedConv (what onnxruntime writes for Conv + activation when it saves a
    model optimised at the EXTENDED level): a Conv, then its activation. With a ReLU-like
    activation its output channels are neurons as a Conv's; in the path network the
    activation is the identity."""

    domain = "com.microsoft"
    op_types = ("FusedConv",)

    def analyse(self, node, an):
        activation = attr(node, "activation", b"")
        activation = activation.decode() if isinstance(activation, bytes) else activation
        if activation and activation not in _HOMOGENEOUS_ACTIVATIONS:
            an.cut(node, f"FusedConv '{node_label(node)}' applies {activation}, which is not positively homogeneous")
            return
        if len(node.input) > 3 and node.input[3]:
            an.cut(node, f"FusedConv '{node_label(node)}' adds a tensor before its activation (input Z)")
            return
        super().analyse(node, an)
