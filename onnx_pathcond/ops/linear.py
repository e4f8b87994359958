"""Gemm and MatMul with one constant operand: dense sources and sinks.

For `Y = α·op(A)·op(B) + β·C` with B constant, output feature o is a source (row o of op(B)
and C[o] are incoming) and input feature i is a sink (column i of op(B) is outgoing). The
mirror case with A constant is handled the same way with the feature axis of Y on axis 0.
MatMul is the same without α, β, C; its bias, if any, is a following Add (see elementwise).
The path network is the same product with squared parameters (and α², β²).
"""

from __future__ import annotations

import numpy as np

from ..graph import attr, node_label
from ..symmetry import Layout
from .base import OpRule, register, unbroadcast


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


# Rows of a weight squared at once: the float64 square of a large weight (twice its float32
# size) never exists whole, only this many elements of it.
_SQUARE_CHUNK = 1 << 22


def squared_product(w: np.ndarray, x: np.ndarray, w_left: bool, transposed: bool) -> np.ndarray:
    """x @ M or M @ x (`w_left`) with M = w² or (w²)ᵀ (`transposed`), in float64.

    `w` is a 2-D weight in its stored dtype; x may have leading batch axes (np.matmul's
    broadcasting). w² is formed a block of rows at a time.
    """
    n0, n1 = w.shape
    step = max(1, _SQUARE_CHUNK // max(1, n1))
    if w_left:
        out = np.zeros(x.shape[:-2] + ((n1 if transposed else n0), x.shape[-1]))
    else:
        out = np.zeros(x.shape[:-1] + ((n0 if transposed else n1),))
    for start in range(0, n0, step):
        rows = slice(start, start + step)
        part = w[rows]
        part = np.square(part.astype(np.float32) if part.dtype.name == "bfloat16" else part, dtype=np.float64)
        if w_left and not transposed:  # rows of M are rows of w
            out[..., rows, :] = np.matmul(part, x)
        elif w_left:  # Mᵀ: rows of w are columns of M
            out += np.matmul(part.T, x[..., rows, :])
        elif not transposed:  # x @ w²: rows of w meet columns of x
            out += np.matmul(x[..., rows], part)
        else:  # x @ (w²)ᵀ: rows of w make columns of the output
            out[..., rows] = np.matmul(x, part.T)
    return out


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
            _add_bias_use(node, an, c, cshape, yshape, out_axis, out_pos)

    @staticmethod
    def _operands(node, ctx):
        """(which side is the activation, [op inputs in the path network], transA, transB), as
        ONNX tensor names of the onnxruntime graph (numpy squares the weight by blocks instead)."""
        a, b = node.input[0], node.input[1]
        side = 1 if ctx.graph.is_activation(a) else 0
        _, w2 = ctx.param_sq(node, "weight")
        x = ctx.mass(a if side == 1 else b)
        ops = [x, w2] if side == 1 else [w2, x]
        return side, ops, attr(node, "transA", 0), attr(node, "transB", 0)

    @staticmethod
    def _numpy_operands(node, pn):
        """(activation side, its mass, the weight as stored, transA, transB)."""
        side = 1 if pn.graph.is_activation(node.input[0]) else 0
        return side, pn.mass(node.input[0 if side == 1 else 1]), pn.param_stored(node, "weight")[1], \
            attr(node, "transA", 0), attr(node, "transB", 0)

    def forward(self, node, pn):
        side, x, w, ta, tb = self._numpy_operands(node, pn)
        alpha, beta = attr(node, "alpha", 1.0), attr(node, "beta", 1.0)
        if side == 1:  # op(A)·op(B²)
            y = squared_product(w, x.T if ta else x, w_left=False, transposed=bool(tb))
        else:  # op(A²)·op(B)
            y = squared_product(w, x.T if tb else x, w_left=True, transposed=bool(ta))
        y *= alpha ** 2
        if len(node.input) > 2 and node.input[2]:
            y = y + beta ** 2 * np.square(pn.param(node, "bias")[1])
        pn.set_mass(node.output[0], y)

    def backward(self, node, pn):
        side, x, w, ta, tb = self._numpy_operands(node, pn)
        alpha, beta = attr(node, "alpha", 1.0), attr(node, "beta", 1.0)
        adj = pn.adjoint(node.output[0])
        use = pn.use(node, "weight")
        # The weight's g is a product over the batch: it goes as factors, and is computed
        # only if the criterion asks for it.
        if side == 1:
            opa = x.T if ta else x
            grad_opa = alpha ** 2 * squared_product(w, adj, w_left=False, transposed=not tb)  # adj·op(B²)ᵀ
            pn.add_adjoint(node.input[0], grad_opa.T if ta else grad_opa)
            del grad_opa

            def grad_b():
                grad_opb = alpha ** 2 * opa.T @ adj
                return grad_opb.T if tb else grad_opb

            factors = (alpha ** 2 * adj.T, opa.T) if tb else (opa.T, alpha ** 2 * adj.T)
            pn.emit_g(use, grad_b, factors)
        else:
            opb = x.T if tb else x
            grad_opb = alpha ** 2 * squared_product(w, adj, w_left=True, transposed=not ta)  # op(A²)ᵀ·adj
            pn.add_adjoint(node.input[1], grad_opb.T if tb else grad_opb)
            del grad_opb

            def grad_a():
                grad_opa = alpha ** 2 * adj @ opb.T
                return grad_opa.T if ta else grad_opa

            factors = (opb, alpha ** 2 * adj) if ta else (alpha ** 2 * adj, opb)
            pn.emit_g(use, grad_a, factors)
        if len(node.input) > 2 and node.input[2]:
            use = pn.use(node, "bias")
            pn.emit_g(use, beta ** 2 * unbroadcast(adj, use.view_shape))

    # ------------------------------------------------------------ onnxruntime forms
    def onnx_forward(self, node, b):
        side, (a2, b2), ta, tb = self._operands(node, b)
        alpha, beta = attr(node, "alpha", 1.0), attr(node, "beta", 1.0)
        inputs = [a2, b2]
        if len(node.input) > 2 and node.input[2]:
            inputs.append(b.param_sq(node, "bias")[1])
        b.set_mass(node.output[0], b.op("Gemm", inputs, alpha=float(alpha) ** 2, beta=float(beta) ** 2,
                                        transA=ta, transB=tb))

    def onnx_backward(self, node, b):
        side, (a2, b2), ta, tb = self._operands(node, b)
        alpha, beta = attr(node, "alpha", 1.0), attr(node, "beta", 1.0)
        adj = b.adjoint(node.output[0])
        # grad(op(A)) = α²·adj·op(B)ᵀ; grad(op(B)) = α²·op(A)ᵀ·adj; then undo the trans flags.
        grad_a = b.op("Gemm", [adj, b2], alpha=float(alpha) ** 2, transA=0, transB=0 if tb else 1)
        if ta:
            grad_a = b.transpose(grad_a, [1, 0])
        grad_b = b.op("Gemm", [a2, adj], alpha=float(alpha) ** 2, transA=0 if ta else 1, transB=0)
        if tb:
            grad_b = b.transpose(grad_b, [1, 0])
        scaled_adj_t = b.transpose(b.op("Mul", [adj, b.const(float(alpha) ** 2)]), [1, 0])
        if side == 1:
            b.add_adjoint(node.input[0], grad_a)
            opa_t = a2 if ta else b.transpose(a2, [1, 0])
            b.emit_g(b.use(node, "weight"), grad_b, (scaled_adj_t, opa_t) if tb else (opa_t, scaled_adj_t))
        else:
            b.add_adjoint(node.input[1], grad_b)
            opb = b.transpose(b2, [1, 0]) if tb else b2
            scaled_adj = b.transpose(scaled_adj_t, [1, 0])
            b.emit_g(b.use(node, "weight"), grad_a, (opb, scaled_adj) if ta else (scaled_adj, opb))
        if len(node.input) > 2 and node.input[2]:
            use = b.use(node, "bias")
            scaled = b.op("Mul", [adj, b.const(float(beta) ** 2)])
            b.emit_g(use, b.unbroadcast(scaled, b.shape(node.output[0]), use.view_shape))


def _add_bias_use(node, an, c, cshape, yshape, out_axis, out_pos, role="bias"):
    """Declare a constant added to an output: per-channel → incoming, otherwise frozen."""
    rank = len(yshape)
    cshape = tuple(cshape) if cshape is not None else ()
    padded = (1,) * (rank - len(cshape)) + cshape
    varies = [k for k, d in enumerate(padded) if d != 1]
    n = len(out_pos)
    if varies == [out_axis] or (not varies and n == 1):
        rows = out_pos.reshape([n if k == out_axis else 1 for k in range(rank)])
        rows = rows.reshape(rows.shape[rank - len(cshape):]) if len(cshape) < rank else rows
        an.add_use(node, role, c, cshape, rows=rows, cols=None)
    else:
        why = (f"{node.op_type} '{node_label(node)}' adds a constant that is not one value per channel"
               f" (shape {list(cshape)})")
        an.freeze(out_pos, why)
        an.add_use(node, role, c, cshape, rows=None, cols=None)


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
        out_pos = an.new_positions(node, y, n_out)
        an.set_layout(y, Layout(out_axis, out_pos))
        in_pos = _feature_positions(node, an, act, act_axis, n_in)
        rows, cols = _weight_indices(side, 0, out_pos, in_pos)
        an.add_use(node, "weight", const, wshape, rows=rows, cols=cols)

    def forward(self, node, pn):
        _, w = pn.param_stored(node, "weight")
        if pn.graph.is_activation(node.input[0]):
            y = squared_product(w, pn.mass(node.input[0]), w_left=False, transposed=False)
        else:
            y = squared_product(w, pn.mass(node.input[1]), w_left=True, transposed=False)
        pn.set_mass(node.output[0], y)

    def backward(self, node, pn):
        use, w = pn.param_stored(node, "weight")
        adj = pn.adjoint(node.output[0])
        if pn.graph.is_activation(node.input[0]):
            x = pn.mass(node.input[0])
            pn.add_adjoint(node.input[0], squared_product(w, adj, w_left=False, transposed=True))
            x2, a2 = x.reshape(-1, x.shape[-1]), adj.reshape(-1, adj.shape[-1])
            g, factors = (lambda: x2.T @ a2), (x2.T, a2.T)
        else:
            x = pn.mass(node.input[1])
            pn.add_adjoint(node.input[1], squared_product(w, adj, w_left=True, transposed=True))
            xt = np.swapaxes(x, -1, -2).reshape(-1, x.shape[-2])
            at = np.swapaxes(adj, -1, -2).reshape(-1, adj.shape[-2])
            g, factors = (lambda: at.T @ xt), (at.T, xt.T)
        pn.emit_g(use, g, factors)

    # ------------------------------------------------------------ onnxruntime forms
    def onnx_forward(self, node, b):
        _, w2 = b.param_sq(node, "weight")
        if b.graph.is_activation(node.input[0]):
            y = b.op("MatMul", [b.mass(node.input[0]), w2])
        else:
            y = b.op("MatMul", [w2, b.mass(node.input[1])])
        b.set_mass(node.output[0], y)

    def onnx_backward(self, node, b):
        use, w2 = b.param_sq(node, "weight")
        adj = b.adjoint(node.output[0])
        if b.graph.is_activation(node.input[0]):
            xs = b.shape(node.input[0])
            b.add_adjoint(node.input[0], b.op("MatMul", [adj, b.transpose(w2, [1, 0])]))
            x2 = b.reshape(b.mass(node.input[0]), [-1, xs[-1]])
            a2 = b.reshape(adj, [-1, use.view_shape[1]])
            factors = (b.transpose(x2, [1, 0]), b.transpose(a2, [1, 0]))
        else:
            xs = b.shape(node.input[1])
            b.add_adjoint(node.input[1], b.op("MatMul", [b.transpose(w2, [1, 0]), adj]))
            rank = len(xs)
            swap = list(range(rank - 2)) + [rank - 1, rank - 2]
            xt = b.reshape(b.transpose(b.mass(node.input[1]), swap), [-1, xs[-2]])
            at = b.reshape(b.transpose(adj, swap), [-1, use.view_shape[0]])
            factors = (b.transpose(at, [1, 0]), b.transpose(xt, [1, 0]))
        b.emit_g(use, None, factors)
