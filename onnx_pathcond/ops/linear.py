"""Gemm and MatMul with one constant operand: dense sources and sinks.

For `Y = α·op(A)·op(B) + β·C` with B constant, output feature o is a source (row o of op(B)
and C[o] are incoming) and input feature i is a sink (column i of op(B) is outgoing). The
mirror case with A constant is handled the same way with the feature axis of Y on axis 0.
MatMul is the same without α, β, C; its bias, if any, is a following Add (see elementwise).
The path network is the same product with squared parameters (and α², β²).
"""

from __future__ import annotations

from ..channels import Layout, add_bias_use
from ..nodes import attr, node_label
from ..pathnet.primitives import Bias, Dense
from .base import OpRule, extent_agrees, register


def _feature_positions(node, an, name, axis, count):
    """Positions of the features of activation `name` read along `axis`; None if unusable."""
    lay = an.layout(name)
    if lay is None:
        return None
    if lay.axis != axis or lay.channels != count:
        an.freeze(lay.pos, f"{node.op_type} '{node_label(node)}' reads features on an axis other than the channel axis")
        return None
    return lay.pos


def _constant_side(node, an, a, b):
    """Which operand (0 or 1) is the constant weight; None after cutting the node."""
    act_a, act_b = an.graph.is_activation(a), an.graph.is_activation(b)
    if act_a and not act_b:
        return 1
    if act_b and not act_a:
        return 0
    an.cut(node, f"{node.op_type} '{node_label(node)}' multiplies two activations (not positively homogeneous)")
    return None


def _weight_indices(const_side, trans_const, out_pos, in_pos):
    """rows/cols arrays for a 2-D weight, given its orientation."""
    # The weight as stored in the op view is [I, O] when it is the right operand and not
    # transposed, [O, I] when it is the left operand and not transposed; a trans flag swaps.
    out_first = (const_side == 0) != bool(trans_const)
    if out_first:
        rows = out_pos[:, None]
        cols = None if in_pos is None else in_pos[None, :]
    else:
        rows = out_pos[None, :]
        cols = None if in_pos is None else in_pos[:, None]
    return rows, cols


@register
class GemmRule(OpRule):
    op_types = ("Gemm",)

    def analyse(self, node, an):
        a, b = node.input[0], node.input[1]
        c = node.input[2] if len(node.input) > 2 and node.input[2] else None
        side = _constant_side(node, an, a, b)
        if side is None:
            return
        if c and an.graph.is_activation(c):
            an.cut(node, f"Gemm '{node_label(node)}' adds a non-constant C")
            return
        trans = (attr(node, "transA", 0), attr(node, "transB", 0))
        act, const = (a, b) if side == 1 else (b, a)
        wshape = an.graph.shape(const)
        if wshape is None or len(wshape) != 2:
            an.cut(node, f"Gemm '{node_label(node)}' has a weight of unknown shape")
            return
        out_first = (side == 0) != bool(trans[side])
        n_out, n_in = (wshape[0], wshape[1]) if out_first else (wshape[1], wshape[0])
        # Feature axis of the activation operand: op(A) is [N, I] (A is [I, N] if transA);
        # op(B) is [I, N] (B is [N, I] if transB) when B is the activation.
        act_axis = (1 if not trans[0] else 0) if side == 1 else (0 if not trans[1] else 1)
        if not extent_agrees(node, an, act, act_axis, n_in, rank=2):
            return
        y = node.output[0]
        out_axis = 1 if side == 1 else 0
        out_pos = an.new_positions(node, y, n_out)
        an.set_layout(y, Layout(out_axis, out_pos))
        in_pos = _feature_positions(node, an, act, act_axis, n_in)
        rows, cols = _weight_indices(side, trans[side], out_pos, in_pos)
        an.add_use(node, "weight", const, wshape, rows=rows, cols=cols)
        if c:
            cshape = an.graph.shape(c)
            yshape = an.graph.shape(y) or ((1, n_out) if side == 1 else (n_out, 1))
            add_bias_use(node, an, c, cshape, yshape, out_axis, out_pos)

    def path(self, node, ctx):
        a, b, y = node.input[0], node.input[1], node.output[0]
        alpha, beta = attr(node, "alpha", 1.0), attr(node, "beta", 1.0)
        ta, tb = bool(attr(node, "transA", 0)), bool(attr(node, "transB", 0))
        weight = ctx.weight(node, "weight", gain=float(alpha) ** 2)
        if ctx.is_activation(a):  # op(A)·op(B²)
            form = [Dense(a, y, weight, weight_left=False, weight_transposed=tb, x_transposed=ta)]
        else:  # op(A²)·op(B)
            form = [Dense(b, y, weight, weight_left=True, weight_transposed=ta, x_transposed=tb)]
        if len(node.input) > 2 and node.input[2]:
            bias = ctx.weight(node, "bias", gain=float(beta) ** 2)
            form.append(Bias(y, bias, bias.use.view_shape))
        return form


@register
class MatMulRule(OpRule):
    op_types = ("MatMul",)

    def analyse(self, node, an):
        a, b = node.input[0], node.input[1]
        side = _constant_side(node, an, a, b)
        if side is None:
            return
        act, const = (a, b) if side == 1 else (b, a)
        wshape, xshape, y = an.graph.shape(const), an.graph.shape(act), node.output[0]
        yshape = an.graph.shape(y)
        if wshape is None or len(wshape) != 2 or xshape is None or yshape is None or len(xshape) < 2:
            an.cut(node, f"MatMul '{node_label(node)}' needs a 2-D constant weight and an activation of rank ≥ 2")
            return
        if side == 1:  # X[..., I] @ W[I, O]
            n_in, n_out, act_axis, out_axis = wshape[0], wshape[1], len(xshape) - 1, len(yshape) - 1
        else:  # W[O, I] @ X[..., I, T]
            n_out, n_in, act_axis, out_axis = wshape[0], wshape[1], len(xshape) - 2, len(yshape) - 2
        if not extent_agrees(node, an, act, act_axis, n_in):
            return
        out_pos = an.new_positions(node, y, n_out)
        an.set_layout(y, Layout(out_axis, out_pos))
        in_pos = _feature_positions(node, an, act, act_axis, n_in)
        rows, cols = _weight_indices(side, 0, out_pos, in_pos)
        an.add_use(node, "weight", const, wshape, rows=rows, cols=cols)

    def path(self, node, ctx):
        a, b, y = node.input[0], node.input[1], node.output[0]
        weight = ctx.weight(node, "weight")
        if ctx.is_activation(a):  # X[..., I] @ W²[I, O]
            return [Dense(a, y, weight)]
        return [Dense(b, y, weight, weight_left=True)]  # W²[O, I] @ X[..., I, T]
