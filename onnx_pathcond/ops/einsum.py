"""Einsum of an activation and a constant 2-D weight that maps one axis: a source and a sink.

`"bi,oi->bo"` (a linear layer), `"bsd,df->bsf"` (a layer on the last axis of a sequence),
`"nchw,oc->nohw"` (a 1×1 mixing of image channels) and `"...i,oi->...o"` (what torch writes for
a layer on any leading axes) all have the same structure: the weight has one index `k`
contracted against one axis of the activation and one index `o` of the output, and every other
axis of the activation goes to the output unchanged, in any order. Then output channel `o` is a
source (row `o` of the weight is incoming to it) and the activation's channels along `k` are a
sink (column `k` is outgoing from them), as for MatMul. The path network is the same product
with the weight squared (`AxisDense`: the product along axis `k`, then the output's order).

Any other equation (more operands, two activations, a diagonal such as `"ii->i"`, a weight
that contracts two axes, broadcasts against the activation or sums an axis of its own, an
activation axis summed away) is a barrier whose reason quotes the equation. The activation's
channels must lie along the contracted axis to be rescaled; when they lie on another axis they
are frozen (the output channels are still new neurons).
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

from ..channels import Layout
from ..nodes import attr, node_label
from ..pathnet.primitives import AxisDense
from .base import OpRule, extent_agrees, register

_ELLIPSIS = "..."


class EquationError(ValueError):
    """An equation that is not a valid ONNX Einsum equation for the given operand ranks."""


def _term_labels(term: str) -> Tuple[List[str], bool]:
    """The letters of one term, with the place of its ellipsis marked by `_ELLIPSIS`."""
    labels: List[str] = []
    rest = term
    while rest:
        if rest.startswith(_ELLIPSIS):
            if _ELLIPSIS in labels:
                raise EquationError(f"term '{term}' has two ellipses")
            labels.append(_ELLIPSIS)
            rest = rest[len(_ELLIPSIS):]
        elif rest[0].isascii() and rest[0].isalpha():
            labels.append(rest[0])
            rest = rest[1:]
        else:
            raise EquationError(f"term '{term}' has the character '{rest[0]}', which is not a letter or '...'")
    return labels, _ELLIPSIS in labels


def parse_equation(equation: str, ranks: Sequence[int]) -> Tuple[List[List[str]], List[str]]:
    """The label of every axis of each operand and of the output, for operands of `ranks`.

    Letters label themselves; the axes an ellipsis stands for are labelled `...0`, `...1`, ...,
    right-aligned across the operands (numpy's broadcasting of ellipsis axes). Without `->`,
    the output is the ellipsis axes then the letters that occur once, in alphabetical order.
    """
    text = "".join(equation.split())
    if text.count("->") > 1:
        raise EquationError("it has more than one '->'")
    lhs, arrow, rhs = text.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ranks):
        raise EquationError(f"it has {len(terms)} input terms for {len(ranks)} operands")
    parsed = [_term_labels(term) for term in terms]
    spans = []
    for (labels, has_ellipsis), rank, term in zip(parsed, ranks, terms):
        letters = len(labels) - has_ellipsis
        span = rank - letters
        if span < 0 or (span > 0 and not has_ellipsis):
            raise EquationError(f"term '{term}' has {letters} indices for an operand of rank {rank}")
        spans.append(span if has_ellipsis else 0)
    width = max(spans, default=0)
    dots = [f"{_ELLIPSIS}{j}" for j in range(width)]

    def expand(labels, span):
        out = []
        for label in labels:
            out.extend(dots[width - span:] if label == _ELLIPSIS else [label])
        return out

    inputs = [expand(labels, span) for (labels, _), span in zip(parsed, spans)]
    if arrow:
        out_labels, _ = _term_labels(rhs)
        output = expand(out_labels, width)
        letters = {label for labels in inputs for label in labels}
        missing = [label for label in output if label not in letters]
        if missing:
            raise EquationError(f"output index '{missing[0]}' is in no input term")
        if len(set(output)) != len(output):
            raise EquationError("the output repeats an index")
    else:
        counts = {}
        for labels, _ in parsed:
            for label in labels:
                if label != _ELLIPSIS:
                    counts[label] = counts.get(label, 0) + 1
        output = dots + sorted(label for label, n in counts.items() if n == 1)
    return inputs, output


def _shown(label: str) -> str:
    return "an ellipsis axis" if label.startswith(_ELLIPSIS) else f"index '{label}'"


def axis_map(x_labels: List[str], w_labels: List[str], out_labels: List[str]):
    """(contracted axis of x, output axis of the new index, `AxisDense` perm, whether the weight
    is stored [out, in]) for a weight that maps one axis of x; or a string saying why not."""
    if len(set(x_labels)) != len(x_labels):
        return "repeats an index in the activation's term (a diagonal)"
    if len(set(w_labels)) != len(w_labels):
        return "repeats an index in the weight's term (a diagonal)"
    if len(w_labels) != 2:
        return "has a weight that is not a matrix"
    contracted = [k for k in w_labels if k in x_labels and k not in out_labels]
    new = [o for o in w_labels if o not in x_labels and o in out_labels]
    shared = [k for k in w_labels if k in x_labels and k in out_labels]
    if shared:
        return (f"has a weight with {_shown(shared[0])} that the output also keeps from the activation "
                f"(a broadcast product)")
    if len(contracted) != 1 or len(new) != 1:
        if len(contracted) == 2:
            return "has a weight that contracts two axes of the activation"
        if not contracted:
            return "has a weight that contracts no axis of the activation"
        return "has a weight that sums over an index of its own"
    k, o = contracted[0], new[0]
    summed = [label for label in x_labels if label != k and label not in out_labels]
    if summed:
        return f"sums the activation over {_shown(summed[0])}, which the weight does not contract"
    kept = [label for label in x_labels if label != k] + [o]  # the product's axes, new one last
    perm = tuple(kept.index(label) for label in out_labels)
    return x_labels.index(k), out_labels.index(o), perm, w_labels[0] == o


@register
class EinsumRule(OpRule):
    op_types = ("Einsum",)

    def analyse(self, node, an):
        equation = attr(node, "equation", b"")
        equation = equation.decode() if isinstance(equation, bytes) else str(equation)
        label = f"Einsum '{node_label(node)}' (equation '{equation}')"
        form = self._form(node, an, equation)
        if isinstance(form, str):
            an.cut(node, f"{label} {form}")
            return
        act, const, (axis, out_axis, perm, out_first) = form
        wshape, y = an.graph.shape(const), node.output[0]
        n_in, n_out = (wshape[1], wshape[0]) if out_first else (wshape[0], wshape[1])
        if not extent_agrees(node, an, act, axis, n_in):
            return
        out_pos = an.new_positions(node, y, n_out)
        an.set_layout(y, Layout(out_axis, out_pos))
        an.node_data[an.graph.index(node)] = (axis, perm, out_first)
        lay = an.layout(act)
        in_pos = None
        if lay is not None and lay.axis == axis and lay.channels == n_in:
            in_pos = lay.pos
        elif lay is not None:  # the weight mixes these channels with other elements: scale 1 for them
            where = (f"whose channels lie on axis {lay.axis}" if lay.axis != axis
                     else f"whose {lay.channels} channels are not the weight's {n_in} inputs")
            an.freeze(lay.pos, f"{label} contracts axis {axis} of '{act}', {where}")
        if out_first:  # the weight is [out, in]
            rows, cols = out_pos[:, None], None if in_pos is None else in_pos[None, :]
        else:  # [in, out]
            rows, cols = out_pos[None, :], None if in_pos is None else in_pos[:, None]
        an.add_use(node, "weight", const, wshape, rows=rows, cols=cols)

    @staticmethod
    def _form(node, an, equation: str):
        """(activation, weight, `axis_map`) for a supported node, or why it is not one."""
        operands = list(node.input)
        if len(operands) != 2 or not all(operands):
            count = f"{len(operands)} operand" + ("s" if len(operands) != 1 else "")
            return f"has {count}; only two, an activation and a constant 2-D weight, are supported"
        active = [an.graph.is_activation(i) for i in operands]
        if all(active):
            return "multiplies two activations (not positively homogeneous)"
        side = active.index(True)
        act, const = operands[side], operands[1 - side]
        xshape, wshape = an.graph.shape(act), an.graph.shape(const)
        if wshape is None or xshape is None:
            return "reads a tensor of unknown shape"
        if len(wshape) != 2:
            return f"has a weight of rank {len(wshape)}; only a 2-D weight (a matrix) is supported"
        try:
            labels, out_labels = parse_equation(equation, [len(an.graph.shape(i)) for i in operands])
        except EquationError as err:
            return f"has an equation that cannot be read: {err}"
        found = axis_map(labels[side], labels[1 - side], out_labels)
        if isinstance(found, str):
            return found
        return act, const, found

    def path(self, node, ctx):
        axis, perm, out_first = ctx.data(node)
        act = next(i for i in node.input if ctx.is_activation(i))
        return [AxisDense(act, node.output[0], ctx.weight(node, "weight"), axis=axis, perm=perm,
                          weight_transposed=out_first)]
