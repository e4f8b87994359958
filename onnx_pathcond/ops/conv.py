"""Conv and ConvTranspose: sources for their output channels, sinks for their input channels.

Grouped convolutions join input channel `g·C_in/G + i` to the output channels of group g;
depthwise is G = C_in. The path network is the same convolution with squared weights; its
adjoint is the transposed convolution, and a weight's statistic is the correlation of the
forward mass entering it with the adjoint mass leaving it (a weight-gradient contraction).
"""

from __future__ import annotations

import numpy as np

from ..graph import attr, node_label
from ..symmetry import Layout
from . import graphops
from .base import OpRule, register
from .windows import Geometry, crop_input, geometry, pad_input, scatter_windows, window_view


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


def _onnx_weight(node, b):
    """Squared weight as [G, first axis / G, rest] in the onnxruntime graph, and the shapes."""
    use, w2 = b.param_sq(node, "weight")
    wshape = use.view_shape
    groups = attr(node, "group", 1)
    out_shape = b.shape(node.output[0])
    w2r = b.reshape(w2, [groups, wshape[0] // groups, -1])
    return use, wshape, b.shape(node.input[0]), (out_shape[2:] if out_shape else None), groups, w2r


def _source_prologue(node, an, out_axis):
    """What Conv and ConvTranspose share: constant weights, and fresh positions for the
    output channels (their count is the weight's `out_axis` times the groups, for
    ConvTranspose, whose weight is [C_in, C_out/G, ...]). None after cutting the node."""
    x, w, b = node.input[0], node.input[1], _bias_name(node)
    if not _constant_inputs_or_cut(node, an, [w, b]):
        return None
    wshape = an.graph.shape(w)
    groups = attr(node, "group", 1)
    n_out = wshape[0] if out_axis == 0 else wshape[1] * groups
    y = node.output[0]
    out_pos = an.new_positions(node, y, n_out)
    an.set_layout(y, Layout(1, out_pos))
    return x, w, b, wshape, groups, out_pos


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

    @staticmethod
    def _setup(node, pn):
        use, w2 = pn.param_sq(node, "weight")
        x = pn.mass(node.input[0])[0]
        groups = attr(node, "group", 1)
        out_shape = pn.graph.shape(node.output[0])
        geo = geometry(node, x.shape[1:], w2.shape[2:], out_shape[2:] if out_shape else None)
        return use, w2.shape, x, groups, geo, w2.reshape(groups, w2.shape[0] // groups, -1)

    @staticmethod
    def _columns(x, groups, geo: Geometry) -> np.ndarray:
        if geo.kernel_volume == 1 and all(s == 1 for s in geo.strides) and geo.padded_size == geo.in_size:
            return x.reshape(groups, x.shape[0] // groups, -1)  # a 1×1 convolution reads x as it is
        cols = window_view(pad_input(x, geo), geo)
        return cols.reshape(groups, (x.shape[0] // groups) * geo.kernel_volume, -1)

    def forward(self, node, pn):
        _, wshape, x, groups, geo, w2 = self._setup(node, pn)
        y = np.matmul(w2, self._columns(x, groups, geo)).reshape((1, wshape[0]) + geo.out_size)
        b = _bias_name(node)
        if b:
            y += pn.param_sq(node, "bias")[1].reshape((1, -1) + (1,) * len(geo.out_size))
        pn.set_mass(node.output[0], y)

    def backward(self, node, pn):
        use, wshape, x, groups, geo, w2 = self._setup(node, pn)
        adj = pn.adjoint(node.output[0])[0].reshape(groups, wshape[0] // groups, -1)
        back = np.matmul(w2.transpose(0, 2, 1), adj).reshape((x.shape[0],) + geo.kernel + geo.out_size)
        del w2  # the weights' copies go before the statistics' arrays arrive
        pn.add_adjoint(node.input[0], crop_input(scatter_windows(back, geo), geo)[None])
        del back
        cols = self._columns(x, groups, geo)
        factors = (adj[0], cols[0]) if groups == 1 and geo.kernel_volume == 1 else None
        pn.emit_g(use, np.matmul(adj, cols.transpose(0, 2, 1)).reshape(wshape), factors)
        if _bias_name(node):
            pn.emit_g(pn.use(node, "bias"), adj.sum(axis=-1).reshape(-1))

    # ------------------------------------------------------------ onnxruntime forms
    @staticmethod
    def _onnx_setup(node, b):
        use, wshape, x_shape, out_spatial, groups, w2r = _onnx_weight(node, b)
        geo = geometry(node, x_shape[2:], wshape[2:], out_spatial)
        return use, wshape, x_shape, groups, geo, w2r

    def onnx_forward(self, node, b):
        if b.native_conv:
            return self._native_forward(node, b)
        _, wshape, x_shape, groups, geo, w2r = self._onnx_setup(node, b)
        cols = graphops.columns(b, b.mass(node.input[0]), x_shape[1], groups, geo)
        y = b.reshape(b.op("MatMul", [w2r, cols]), [1, wshape[0]] + list(geo.out_size))
        if _bias_name(node):
            bias2 = b.reshape(b.param_sq(node, "bias")[1], [1, -1] + [1] * len(geo.out_size))
            y = b.op("Add", [y, bias2])
        b.set_mass(node.output[0], y)

    def onnx_backward(self, node, b):
        if b.native_conv:
            return self._native_backward(node, b)
        use, wshape, x_shape, groups, geo, w2r = self._onnx_setup(node, b)
        adj = b.reshape(b.adjoint(node.output[0]), [groups, wshape[0] // groups, -1])
        back = b.op("MatMul", [b.transpose(w2r, [0, 2, 1]), adj])
        b.add_adjoint(node.input[0], graphops.scatter_columns(b, back, x_shape[1], geo))
        cols = graphops.columns(b, b.mass(node.input[0]), x_shape[1], groups, geo)
        if groups == 1 and geo.kernel_volume == 1:
            b.emit_g(use, None, (b.reshape(adj, [wshape[0], -1]), b.reshape(cols, [x_shape[1], -1])))
        else:
            b.emit_g(use, b.op("MatMul", [adj, b.transpose(cols, [0, 2, 1])]))
        if _bias_name(node):
            b.emit_g(b.use(node, "bias"), b.reduce_sum(adj, [2]))

    # Native forms, for providers with float64 convolution kernels (CUDA's cuDNN; not
    # onnxruntime's CPU provider): the path network's Conv is a Conv, its input adjoint a
    # ConvTranspose, and the weight statistic the weight-gradient contraction written as a
    # Conv whose batch is the input channels of a group and whose kernel is the adjoint mass.
    @staticmethod
    def _native_setup(node, b):
        use, w2 = b.param_sq(node, "weight")
        x_shape = b.shape(node.input[0])
        out_shape = b.shape(node.output[0])
        geo = geometry(node, x_shape[2:], use.view_shape[2:], out_shape[2:] if out_shape else None)
        return use, w2, list(use.view_shape), list(x_shape), attr(node, "group", 1), geo

    def _native_forward(self, node, b):
        _, w2, _, _, groups, geo = self._native_setup(node, b)
        inputs = [b.mass(node.input[0]), w2]
        if _bias_name(node):
            inputs.append(b.param_sq(node, "bias")[1])
        b.set_mass(node.output[0], b.op("Conv", inputs, strides=list(geo.strides), dilations=list(geo.dilations),
                                        pads=list(geo.pads_begin) + list(geo.pads_end), group=groups))

    def _native_backward(self, node, b):
        use, w2, wshape, x_shape, groups, geo = self._native_setup(node, b)
        nd = len(geo.kernel)
        adj = b.adjoint(node.output[0])  # [1, O, *out]
        # Input adjoint: the transposed convolution, unpadded, reaches the windows' full extent;
        # cropping the begin pads and cutting (or zero-filling) the end gives the input's size.
        back = b.op("ConvTranspose", [adj, w2], strides=list(geo.strides), dilations=list(geo.dilations),
                    group=groups)
        reach = [(o - 1) * st + (k - 1) * d + 1
                 for o, st, k, d in zip(geo.out_size, geo.strides, geo.kernel, geo.dilations)]
        stop = [min(r, pb + s) for r, pb, s in zip(reach, geo.pads_begin, geo.in_size)]
        if any(geo.pads_begin) or stop != reach:
            back = b.op("Slice", [back, b.ints(geo.pads_begin), b.ints(stop), b.ints(range(2, 2 + nd))])
        short = [pb + s - st for pb, s, st in zip(geo.pads_begin, geo.in_size, stop)]
        if any(short):  # input positions that no window reads get a zero adjoint
            back = b.op("Pad", [back, b.ints([0] * (2 + nd) + [0, 0] + short)])
        b.add_adjoint(node.input[0], back)
        if groups == 1 and geo.kernel_volume == 1:
            cols = graphops.columns(b, b.mass(node.input[0]), x_shape[1], 1, geo)
            b.emit_g(use, None, (b.reshape(adj, [wshape[0], -1]), b.reshape(cols, [x_shape[1], -1])))
        else:
            # g[o, i, k] = sum_p F[group(o)·Cg + i, p·stride + k·dilation − pad] · adj[o, p]:
            # a Conv of F as [Cg, G, *S] (batch Cg) with adj as G groups of [O/G, 1, *out]
            # kernels, stride and dilation swapped. It may reach past k: keep the first k.
            per_group = x_shape[1] // groups
            mass = b.reshape(b.mass(node.input[0]), [groups, per_group] + list(geo.in_size))
            mass = b.transpose(mass, [1, 0] + list(range(2, 2 + nd)))
            kernels = b.reshape(adj, [wshape[0], 1] + list(geo.out_size))
            full = b.op("Conv", [mass, kernels], strides=list(geo.dilations), dilations=list(geo.strides),
                        pads=list(geo.pads_begin) + list(geo.pads_end), group=groups)  # [Cg, O, *K']
            g = b.op("Slice", [full, b.ints([0] * nd), b.ints(geo.kernel), b.ints(range(2, 2 + nd))])
            b.emit_g(use, b.transpose(g, [1, 0] + list(range(2, 2 + nd))))
        if _bias_name(node):
            b.emit_g(b.use(node, "bias"), b.reduce_sum(adj, [0] + list(range(2, 2 + nd))))


def _transpose_geometry(node, in_size, kernel, out_size):
    """Geometry of ConvTranspose seen as a scatter: windows sit at input positions."""
    nd = len(in_size)
    strides = tuple(attr(node, "strides", None) or [1] * nd)
    dilations = tuple(attr(node, "dilations", None) or [1] * nd)
    out_pad = tuple(attr(node, "output_padding", None) or [0] * nd)
    full = tuple((s - 1) * st + (k - 1) * d + 1 for s, st, k, d in zip(in_size, strides, kernel, dilations))
    auto_pad = attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    pads = attr(node, "pads", None)
    if out_size is None:
        given = attr(node, "output_shape", None)
        if given is not None:
            out_size = tuple(given[-nd:])
    if pads is not None and auto_pad == "NOTSET" and attr(node, "output_shape", None) is None:
        begin = tuple(pads[:nd])
        if out_size is None:
            out_size = tuple(f + op - b - e for f, op, b, e in zip(full, out_pad, pads[:nd], pads[nd:]))
    else:
        if out_size is None:
            if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
                out_size = tuple(s * st for s, st in zip(in_size, strides))
            else:
                out_size = tuple(f + op for f, op in zip(full, out_pad))
        total = [f + op - o for f, op, o in zip(full, out_pad, out_size)]
        if auto_pad == "SAME_UPPER":
            begin = tuple(t // 2 for t in total)
        else:
            begin = tuple(t - t // 2 for t in total)
    scatter = Geometry(tuple(kernel), strides, dilations, (0,) * nd, (0,) * nd, full, tuple(in_size))
    return scatter, begin, tuple(out_size)


def _crop_or_pad(arr, begin, size):
    """Window [begin, begin+size) of the spatial axes of arr [C, *S], zero outside."""
    out = np.zeros((arr.shape[0],) + tuple(size), dtype=arr.dtype)
    src, dst = [slice(None)], [slice(None)]
    for b, s, n in zip(begin, size, arr.shape[1:]):
        lo, hi = max(b, 0), min(b + s, n)
        src.append(slice(lo, max(lo, hi)))
        dst.append(slice(lo - b, lo - b + max(0, hi - lo)))
    out[tuple(dst)] = arr[tuple(src)]
    return out


def _uncrop(arr, begin, full_size):
    """Adjoint of `_crop_or_pad`: place arr back into zeros of `full_size`."""
    out = np.zeros((arr.shape[0],) + tuple(full_size), dtype=arr.dtype)
    src, dst = [slice(None)], [slice(None)]
    for b, s, n in zip(begin, arr.shape[1:], full_size):
        lo, hi = max(b, 0), min(b + s, n)
        dst.append(slice(lo, max(lo, hi)))
        src.append(slice(lo - b, lo - b + max(0, hi - lo)))
    out[tuple(dst)] = arr[tuple(src)]
    return out


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

    @staticmethod
    def _setup(node, pn):
        use, weight = pn.param(node, "weight")
        x = pn.mass(node.input[0])[0]
        groups = attr(node, "group", 1)
        out_shape = pn.graph.shape(node.output[0])
        geo, begin, out_size = _transpose_geometry(node, x.shape[1:], weight.shape[2:],
                                                   out_shape[2:] if out_shape else None)
        per_group_in = weight.shape[0] // groups
        w2 = np.square(weight).reshape(groups, per_group_in, -1)  # [G, Cg, Og*K]
        return use, weight.shape, x, groups, geo, begin, out_size, w2

    def forward(self, node, pn):
        _, wshape, x, groups, geo, begin, out_size, w2 = self._setup(node, pn)
        n_out = wshape[1] * groups
        spread = np.matmul(w2.transpose(0, 2, 1), x.reshape(groups, x.shape[0] // groups, -1))
        full = scatter_windows(spread.reshape((n_out,) + geo.kernel + geo.out_size), geo)
        y = _crop_or_pad(full, begin, out_size)
        if _bias_name(node):
            y += np.square(pn.param(node, "bias")[1]).reshape((-1,) + (1,) * len(out_size))
        pn.set_mass(node.output[0], y[None])

    def backward(self, node, pn):
        use, wshape, x, groups, geo, begin, out_size, w2 = self._setup(node, pn)
        adj_y = pn.adjoint(node.output[0])[0]
        full = _uncrop(adj_y, begin, geo.padded_size)
        cols = window_view(full, geo).reshape(groups, -1, int(np.prod(geo.out_size)))  # [G, Og*K, P]
        pn.add_adjoint(node.input[0], np.matmul(w2, cols).reshape((1,) + x.shape))
        xg = x.reshape(groups, x.shape[0] // groups, -1)
        pn.emit_g(use, np.matmul(xg, cols.transpose(0, 2, 1)).reshape(wshape))
        if _bias_name(node):
            pn.emit_g(pn.use(node, "bias"), adj_y.reshape(adj_y.shape[0], -1).sum(axis=1))

    # ------------------------------------------------------------ onnxruntime forms
    @staticmethod
    def _onnx_setup(node, b):
        use, wshape, x_shape, out_spatial, groups, w2r = _onnx_weight(node, b)  # w2r: [G, Cg, Og*K]
        geo, begin, out_size = _transpose_geometry(node, x_shape[2:], wshape[2:], out_spatial)
        return use, wshape, x_shape, groups, geo, begin, out_size, w2r

    @staticmethod
    def _crop_pads(geo, begin, out_size):
        """Pads (negative = crop) that take the full scatter [*full] to the output window."""
        return [0, 0] + [-bg for bg in begin] + [0, 0] + [o + bg - f for o, bg, f in
                                                         zip(out_size, begin, geo.padded_size)]

    def onnx_forward(self, node, b):
        _, wshape, x_shape, groups, geo, begin, out_size, w2r = self._onnx_setup(node, b)
        n_out = wshape[1] * groups
        x = b.reshape(b.mass(node.input[0]), [groups, x_shape[1] // groups, -1])
        spread = b.op("MatMul", [b.transpose(w2r, [0, 2, 1]), x])  # [G, Og*K, P]
        per_offset = b.reshape(spread, [1, n_out, geo.kernel_volume] + list(geo.out_size))
        parts = []
        for k in range(geo.kernel_volume):
            one = b.op("Slice", [per_offset, b.ints([k]), b.ints([k + 1]), b.ints([2])])
            parts.append(b.reshape(one, [1, n_out] + list(geo.out_size)))
        full = graphops.scatter_windows(b, parts, n_out, geo)
        y = b.op("Pad", [full, b.ints(self._crop_pads(geo, begin, out_size))])
        if _bias_name(node):
            y = b.op("Add", [y, b.reshape(b.param_sq(node, "bias")[1], [1, -1] + [1] * len(out_size))])
        b.set_mass(node.output[0], y)

    def onnx_backward(self, node, b):
        use, wshape, x_shape, groups, geo, begin, out_size, w2r = self._onnx_setup(node, b)
        n_out = wshape[1] * groups
        adj_y = b.adjoint(node.output[0])
        undo = [-p for p in self._crop_pads(geo, begin, out_size)]
        full = b.op("Pad", [adj_y, b.ints(undo)])
        cols = graphops.columns(b, full, n_out, groups, geo)  # [G, Og*K, P]
        b.add_adjoint(node.input[0], b.reshape(b.op("MatMul", [w2r, cols]), list(x_shape)))
        x = b.reshape(b.mass(node.input[0]), [groups, x_shape[1] // groups, -1])
        b.emit_g(use, b.op("MatMul", [x, b.transpose(cols, [0, 2, 1])]))
        if _bias_name(node):
            b.emit_g(b.use(node, "bias"), b.reduce_sum(adj_y, [0] + list(range(2, 2 + len(out_size)))))
