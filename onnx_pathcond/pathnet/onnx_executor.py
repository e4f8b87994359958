"""The ONNX executor of the path network: every primitive once, as float64 ONNX nodes.

The walk writes the path network and its adjoint into one ONNX graph (`model()`), which
`ort.py` runs with onnxruntime. The CPU execution provider has no float64 Conv or
AveragePool, so there windows are written as one strided Slice per kernel offset of the
zero-padded input (and their adjoints as stride dilations, Pads and a Sum), and convolutions
as matrix products of those columns; for CUDA (cuDNN has float64 convolutions) a convolution
is written as Conv, its input adjoint as ConvTranspose and its weight statistic as a Conv,
which cost far fewer nodes (onnxruntime's session set-up grows with the node count).

The parameters are graph *inputs*, fed with the stored arrays (cast to float64 and squared
inside the graph, separately in each pass so that no weight-sized float64 tensor lives from
the forward to the backward pass); the graph itself holds no copy of the weights. Its outputs
are the g of every parameter use, or the two factors of a dense layer's g.
"""

from __future__ import annotations

import itertools
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..channels import ParamUse
from ..geometry import Geometry
from ..graph import Graph
from . import primitives as P

DOUBLE = TensorProto.DOUBLE
OPSET = 18


def _written_out(src) -> np.ndarray:
    """A Gather map as an index array (a `Run` written out: the graph holds it as a constant)."""
    return src.array() if isinstance(src, P.Run) else src


class OnnxExecutor:
    """Writes primitives as ONNX nodes. Handles are tensor names of the graph being built."""

    eager_sums = False  # adjoint contributions become one Sum node when read

    def __init__(self, graph: Graph, native_conv: bool = False):
        self.graph = graph
        # Write Conv as Conv (and its adjoints as ConvTranspose and Conv) for providers that have
        # float64 convolutions; otherwise as strided slices and matrix products.
        self.native_conv = native_conv
        self.nodes: List[onnx.NodeProto] = []
        self.initializers: List[onnx.TensorProto] = []
        self.inputs: List[onnx.ValueInfoProto] = []
        self.outputs: List[onnx.ValueInfoProto] = []
        self.feeds: Dict[str, np.ndarray] = {}
        self.g_outputs: Dict[str, Tuple[ParamUse, bool]] = {}  # name -> (use, given as factors)
        self._shapes: Dict[str, Tuple[int, ...]] = {}  # shape of each handle made here
        self._params: Dict[tuple, str] = {}
        self._feeds_of: Dict[str, str] = {}  # stored tensor -> graph input feeding it
        self.phase = "forward"
        self._n = 0

    # ------------------------------------------------------------ building blocks
    def fresh(self, prefix: str = "t") -> str:
        self._n += 1
        return f"{prefix}_{self._n}"

    def op(self, op_type: str, inputs: Sequence[str], n_out: int = 1, **attrs):
        outs = [self.fresh(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value, dtype=None) -> str:
        arr = np.asarray(value, dtype=dtype if dtype is not None else
                         (np.int64 if np.asarray(value).dtype.kind in "iub" else np.float64))
        name = self.fresh("c")
        self.initializers.append(numpy_helper.from_array(arr, name))
        self._shapes[name] = arr.shape
        return name

    def ints(self, values) -> str:
        return self.const(np.asarray(list(values), dtype=np.int64))

    def filled(self, shape, value: float) -> str:
        """A float64 tensor of the given shape, every element `value` (no stored copy)."""
        name = self.op("ConstantOfShape", [self.ints(shape)],
                       value=numpy_helper.from_array(np.array([value], dtype=np.float64)))
        self._shapes[name] = tuple(shape)
        return name

    def reshape(self, name: str, shape) -> str:
        if self._shapes.get(name) == tuple(shape):
            return name
        return self._made(self.op("Reshape", [name, self.ints(shape)]), shape) if -1 not in shape else \
            self.op("Reshape", [name, self.ints(shape)])

    def transpose(self, name: str, perm) -> str:
        return self.op("Transpose", [name], perm=list(perm))

    def reduce_sum(self, name: str, axes, keepdims: int = 0) -> str:
        return self.op("ReduceSum", [name, self.ints(axes)], keepdims=keepdims)

    def mul(self, a: str, b: str) -> str:
        return self.op("Mul", [a, b])

    def scaled(self, name: str, gain: float) -> str:
        return name if gain == 1.0 else self.mul(name, self.const(float(gain)))

    def unbroadcast(self, name: str, from_shape, to_shape, reshape: bool = True) -> str:
        """Adjoint of broadcasting `to_shape` up to `from_shape`: sum the broadcast axes (left
        with their size-one axes when `reshape` is False: the caller reshapes it anyway)."""
        from_shape, to_shape = tuple(from_shape), tuple(to_shape)
        if from_shape == to_shape:
            return name
        extra = len(from_shape) - len(to_shape)
        padded = (1,) * extra + to_shape
        axes = [i for i, (a, b) in enumerate(zip(from_shape, padded)) if b == 1 and a != 1] + list(range(extra))
        out = self.reduce_sum(name, sorted(set(axes)), keepdims=1) if axes else name
        return self.reshape(out, to_shape) if reshape else out

    def _made(self, name: str, shape) -> str:
        self._shapes[name] = tuple(shape)
        return name

    def _shape(self, tensor: str) -> Tuple[int, ...]:
        return self.graph.shape(tensor)

    # ------------------------------------------------------------ what the walk calls
    @staticmethod
    def default_budget(total_bytes: float) -> float:
        return float("inf")  # every expensive mass stays: onnxruntime plans its own memory

    @staticmethod
    def measure(handle: str):
        return None

    def ones(self, shape) -> str:
        return self.filled(shape, 1.0)

    def zeros(self, shape) -> str:
        return self.filled(shape, 0.0)

    def begin_backward(self) -> None:
        self.phase = "backward"

    def total(self, parts: List[Tuple[str, bool]], shape) -> str:
        shape = tuple(shape)
        names = [name for name, _ in parts]
        if len(names) == 1 and self._shapes.get(names[0]) == shape:
            return names[0]
        result = names[0] if len(names) == 1 else self.op("Sum", names)
        if not any(self._shapes.get(n) == shape for n in names):
            result = self.op("Expand", [result, self.ints(shape)])
        return self._made(result, shape)

    def emit(self, use: ParamUse, g: Optional[str], factors: Optional[Tuple[str, str]]) -> None:
        """Make a use's g a graph output, or its two factors (g = left @ rightᵀ over its first
        two axes) for dense layers: much smaller, and multiplied out one use at a time."""
        name = f"g_{use.index}"
        if factors is not None:
            for suffix, part in zip(("left", "right"), factors):
                self.nodes.append(helper.make_node("Identity", [part], [f"{name}_{suffix}"]))
                self.outputs.append(helper.make_tensor_value_info(f"{name}_{suffix}", DOUBLE, None))
            self.g_outputs[name] = (use, True)
            return
        # The Reshape to the use's view writes the graph output itself (no Identity node).
        self.nodes.append(helper.make_node("Reshape", [g, self.ints(use.view_shape)], [name]))
        self.outputs.append(helper.make_tensor_value_info(name, DOUBLE, list(use.view_shape)))
        self.g_outputs[name] = (use, False)

    def model(self) -> onnx.ModelProto:
        model = helper.make_model(helper.make_graph(self.nodes, "path_network", self.inputs, self.outputs,
                                                   initializer=self.initializers),
                                  opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = 8
        return model

    # ------------------------------------------------------------ parameters
    def _param(self, use: ParamUse) -> str:
        """A parameter as its op sees it, in float64 (fed as a graph input)."""
        # Cast (and square) separately in each pass, so that no weight-sized float64 tensor has
        # to stay alive from the forward to the backward pass.
        key = (use.ref.name if use.ref is not None else use.input_name, str(use.ref.perm if use.ref else None),
               self.phase)
        if key in self._params:
            return self._params[key]
        if use.ref is not None:
            feed = self._feeds_of.get(use.ref.name)
            if feed is None:
                value = self.graph.stored_value(use.ref)
                if value.dtype.name == "bfloat16":  # onnxruntime takes no ml_dtypes arrays: widen exactly
                    value = value.astype(np.float32)
                feed = self._feeds_of[use.ref.name] = self.fresh("param")
                self.feeds[feed] = value
                self.inputs.append(helper.make_tensor_value_info(feed, helper.np_dtype_to_tensor_dtype(value.dtype),
                                                                 value.shape))
            tensor = feed if self.feeds[feed].dtype == np.float64 else self.op("Cast", [feed], to=DOUBLE)
            if use.ref.perm is not None:
                tensor = self.transpose(tensor, use.ref.perm)
        else:
            tensor = self.const(np.asarray(self.graph.constant_value(use.input_name), dtype=np.float64))
        self._params[key] = tensor
        return tensor

    def _factor(self, weight: P.Weight, view=None) -> str:
        """The weight in float64: the parameter squared (or the fixed value) × gain, in the
        shape `view` when given."""
        if weight.value is not None:
            value = np.asarray(weight.value, dtype=np.float64) * weight.gain
            return self.const(value if view is None else value.reshape(view))
        key = ("squared", weight.use.index, self.phase)
        if key not in self._params:
            value = self._param(weight.use)
            self._params[key] = self._made(self.mul(value, value), weight.use.view_shape)
        squared = self._params[key] if view is None else self.reshape(self._params[key], view)
        return self.scaled(squared, weight.gain)

    # ------------------------------------------------------------ primitives
    def forward(self, prim: P.Primitive, inputs: List[str]) -> List[str]:
        return getattr(self, "_forward_" + type(prim).__name__)(prim, *inputs)

    def backward(self, prim: P.Primitive, inputs: Optional[List[str]], adjoints: List[str]):
        """(adjoint contribution per input (None: none), [(use, g, factors)])."""
        return getattr(self, "_backward_" + type(prim).__name__)(prim, inputs, *adjoints)

    # Identity
    def _forward_Identity(self, prim: P.Identity, x):
        return [x]

    def _backward_Identity(self, prim: P.Identity, inputs, adj):
        return [self.unbroadcast(adj, self._shape(prim.y), self._shape(prim.x))], []

    # Scale
    def _forward_Scale(self, prim: P.Scale, x):
        factor = self._factor(prim.weight, prim.view)
        shape = np.broadcast_shapes(self._shape(prim.x), tuple(prim.view))
        return [self._made(self.mul(x, factor), shape)]

    def _backward_Scale(self, prim: P.Scale, inputs, adj):
        yshape, xshape = self._shape(prim.y), self._shape(prim.x)
        factor = self._factor(prim.weight, prim.view)
        into = self.unbroadcast(self.mul(adj, factor), yshape, xshape)
        stats = []
        if prim.weight.reports:
            g = self.unbroadcast(self.mul(adj, inputs[0]), yshape, prim.view, reshape=False)
            stats.append((prim.weight.use, self.scaled(g, prim.weight.gain), None))
        return [into], stats

    # Bias
    def _forward_Bias(self, prim: P.Bias):
        return [self._made(self._factor(prim.weight, prim.view), prim.view)]

    def _backward_Bias(self, prim: P.Bias, inputs, adj):
        stats = []
        if prim.weight.reports:
            g = self.unbroadcast(adj, self._shape(prim.y), prim.view, reshape=False)
            stats.append((prim.weight.use, self.scaled(g, prim.weight.gain), None))
        return [], stats

    # Dense
    def _swap(self, name: str, rank: int) -> str:
        return self.transpose(name, list(range(rank - 2)) + [rank - 1, rank - 2])

    def _dense_weight(self, prim: P.Dense, transposed: bool) -> str:
        """The squared weight W of the product (its transpose Wᵀ with `transposed`): one
        Transpose at most, none when the stored layout already is the one asked for."""
        w2 = self._factor(P.Weight(prim.weight.use))  # the gain goes on the activations' side
        return self.transpose(w2, [1, 0]) if prim.weight_transposed != transposed else w2

    def _dense_input(self, prim: P.Dense, x: str, swapped: bool) -> str:
        """The product's operand X (with its last two axes swapped when `swapped`)."""
        return self._swap(x, len(self._shape(prim.x))) if prim.x_transposed != swapped else x

    def _forward_Dense(self, prim: P.Dense, x):
        w2, x = self._dense_weight(prim, False), self._dense_input(prim, x, False)
        y = self.op("MatMul", [w2, x] if prim.weight_left else [x, w2])
        return [self._made(self.scaled(y, prim.weight.gain), self._shape(prim.y))]

    def _backward_Dense(self, prim: P.Dense, inputs, adj):
        adj = self.scaled(adj, prim.weight.gain)
        w2t = self._dense_weight(prim, True)
        into = self.op("MatMul", [w2t, adj] if prim.weight_left else [adj, w2t])
        if prim.x_transposed:
            into = self._swap(into, len(self._shape(prim.x)))
        # g's factors: the inputs and the (scaled) adjoints, one row per position
        if prim.weight_left:  # X [..., I, T]: positions are the other axes
            xs = self.reshape(self._dense_input(prim, inputs[0], True), [-1, self._dense_in(prim)])
            adjs = self.reshape(self._swap(adj, len(self._shape(prim.y))), [-1, self._dense_out(prim)])
        else:
            xs = self.reshape(self._dense_input(prim, inputs[0], False), [-1, self._dense_in(prim)])
            adjs = self.reshape(adj, [-1, self._dense_out(prim)])
        xs_t, adjs_t = self.transpose(xs, [1, 0]), self.transpose(adjs, [1, 0])
        out_first = prim.weight_left != prim.weight_transposed
        factors = (adjs_t, xs_t) if out_first else (xs_t, adjs_t)
        return [into], [(prim.weight.use, None, factors)]

    @staticmethod
    def _dense_sizes(prim: P.Dense) -> Tuple[int, int]:
        """(inputs, outputs) of the product, from the weight's stored view."""
        a, b = prim.weight.use.view_shape
        out_first = prim.weight_left != prim.weight_transposed
        return (b, a) if out_first else (a, b)

    def _dense_in(self, prim: P.Dense) -> int:
        return self._dense_sizes(prim)[0]

    def _dense_out(self, prim: P.Dense) -> int:
        return self._dense_sizes(prim)[1]

    # AxisDense: a MatMul on x with the contracted axis moved last, then a Transpose
    @staticmethod
    def _moved_last(rank: int, axis: int) -> List[int]:
        return [a for a in range(rank) if a != axis] + [axis]

    def _permuted(self, name: str, perm) -> str:
        perm = list(perm)
        return name if perm == sorted(perm) else self.transpose(name, perm)

    def _axis_dense_weight(self, prim: P.AxisDense, transposed: bool) -> str:
        """W of the product ([in, out]), or Wᵀ with `transposed`: one Transpose at most."""
        w2 = self._factor(P.Weight(prim.weight.use))  # the gain goes on the activations' side
        return self.transpose(w2, [1, 0]) if prim.weight_transposed != transposed else w2

    def _forward_AxisDense(self, prim: P.AxisDense, x):
        xm = self._permuted(x, self._moved_last(len(self._shape(prim.x)), prim.axis))
        z = self.op("MatMul", [xm, self._axis_dense_weight(prim, False)])
        y = self._permuted(self.scaled(z, prim.weight.gain), prim.perm)
        return [self._made(y, self._shape(prim.y))]

    def _backward_AxisDense(self, prim: P.AxisDense, inputs, adj):
        moved = self._moved_last(len(self._shape(prim.x)), prim.axis)
        adj = self.scaled(self._permuted(adj, np.argsort(prim.perm).tolist()), prim.weight.gain)
        into = self.op("MatMul", [adj, self._axis_dense_weight(prim, True)])
        into = self._permuted(into, np.argsort(moved).tolist())
        # g's factors, one row per position of the other axes (as for Dense)
        n_in, n_out = self._shape(prim.x)[prim.axis], self._shape(prim.y)[prim.perm.index(len(prim.perm) - 1)]
        xs = self.reshape(self._permuted(inputs[0], moved), [-1, n_in])
        adjs = self.reshape(adj, [-1, n_out])
        xs_t, adjs_t = self.transpose(xs, [1, 0]), self.transpose(adjs, [1, 0])
        factors = (adjs_t, xs_t) if prim.weight_transposed else (xs_t, adjs_t)
        return [self._made(into, self._shape(prim.x))], [(prim.weight.use, None, factors)]

    # Conv
    def _conv_weight(self, prim):
        """The squared weight as [G, first axis / G, rest] and its shape."""
        wshape = prim.weight.use.view_shape
        return wshape, self.reshape(self._factor(prim.weight), [prim.groups, wshape[0] // prim.groups, -1])

    def _forward_Conv(self, prim: P.Conv, x):
        geo, groups = prim.geometry, prim.groups
        if self.native_conv:
            y = self.op("Conv", [x, self._factor(prim.weight)], strides=list(geo.strides),
                        dilations=list(geo.dilations), pads=list(geo.pads_begin) + list(geo.pads_end), group=groups)
        else:
            wshape, w2r = self._conv_weight(prim)
            lead = self._shape(prim.x)[:2]
            y = self.op("MatMul", [w2r, columns(self, x, lead, groups, geo)])  # [G, Og, N·P]
            y = from_groups(self, y, lead[0], wshape[0], [], geo.out_size)
        return [self._made(y, self._shape(prim.y))]

    def _grouped_adjoint(self, prim, adj: str) -> str:
        """The output adjoint [N, O, *out] as [G, Og, N·P]."""
        n, n_out = self._shape(prim.y)[:2]
        return to_groups(self, adj, n, n_out, prim.groups, 1, int(np.prod(self._shape(prim.y)[2:])))

    def _backward_Conv(self, prim: P.Conv, inputs, adj):
        if self.native_conv:
            return self._native_conv_backward(prim, inputs[0], adj)
        geo, groups = prim.geometry, prim.groups
        wshape, w2r = self._conv_weight(prim)
        lead = self._shape(prim.x)[:2]
        adj = self._grouped_adjoint(prim, adj)
        back = self.op("MatMul", [self.transpose(w2r, [0, 2, 1]), adj])
        into = scatter_columns(self, back, lead, geo)
        cols = columns(self, inputs[0], lead, groups, geo)
        if groups == 1 and geo.kernel_volume == 1:
            factors = (self.reshape(adj, [wshape[0], -1]), self.reshape(cols, [lead[1], -1]))
            return [into], [(prim.weight.use, None, factors)]
        return [into], [(prim.weight.use, self.op("MatMul", [adj, self.transpose(cols, [0, 2, 1])]), None)]

    def _native_conv_backward(self, prim: P.Conv, x: str, adj: str):
        """Input adjoint as a ConvTranspose; the weight statistic as a Conv whose batch is the
        input channels of a group and whose kernel is the adjoint mass."""
        geo, groups = prim.geometry, prim.groups
        w2, wshape = self._factor(prim.weight), prim.weight.use.view_shape
        n, channels = self._shape(prim.x)[:2]
        nd = len(geo.kernel)
        # Input adjoint: the transposed convolution, unpadded, reaches the windows' full extent;
        # cropping the begin pads and cutting (or zero-filling) the end gives the input's size.
        back = self.op("ConvTranspose", [adj, w2], strides=list(geo.strides), dilations=list(geo.dilations),
                       group=groups)
        reach = [(o - 1) * st + (k - 1) * d + 1
                 for o, st, k, d in zip(geo.out_size, geo.strides, geo.kernel, geo.dilations)]
        stop = [min(r, pb + s) for r, pb, s in zip(reach, geo.pads_begin, geo.in_size)]
        if any(geo.pads_begin) or stop != reach:
            back = self.op("Slice", [back, self.ints(geo.pads_begin), self.ints(stop), self.ints(range(2, 2 + nd))])
        short = [pb + s - st for pb, s, st in zip(geo.pads_begin, geo.in_size, stop)]
        if any(short):  # input positions that no window reads get a zero adjoint
            back = self.op("Pad", [back, self.ints([0] * (2 + nd) + [0, 0] + short)])
        if groups == 1 and geo.kernel_volume == 1:
            cols = columns(self, x, (n, channels), 1, geo)
            factors = (self.reshape(self._grouped_adjoint(prim, adj), [wshape[0], -1]),
                       self.reshape(cols, [channels, -1]))
            return [back], [(prim.weight.use, None, factors)]
        # g[o, i, k] = Σ_n Σ_p F[n, group(o)·Cg + i, p·stride + k·dilation − pad] · adj[n, o, p]:
        # a Conv of F as [Cg, G·N, *S] (batch Cg) with adj as G groups of [O/G, N, *out]
        # kernels, stride and dilation swapped. It may reach past k: keep the first k.
        per_group = channels // groups
        spatial = list(range(3, 3 + nd))
        mass = self.transpose(self.reshape(x, [n, groups, per_group] + list(geo.in_size)), [2, 1, 0] + spatial)
        mass = self.reshape(mass, [per_group, groups * n] + list(geo.in_size))
        kernels = self.reshape(adj, [wshape[0], 1] + list(geo.out_size)) if n == 1 else \
            self.transpose(adj, [1, 0] + list(range(2, 2 + nd)))
        full = self.op("Conv", [mass, kernels], strides=list(geo.dilations), dilations=list(geo.strides),
                       pads=list(geo.pads_begin) + list(geo.pads_end), group=groups)  # [Cg, O, *K']
        g = self.op("Slice", [full, self.ints([0] * nd), self.ints(geo.kernel), self.ints(range(2, 2 + nd))])
        return [back], [(prim.weight.use, self.transpose(g, [1, 0] + list(range(2, 2 + nd))), None)]

    # ConvTranspose
    @staticmethod
    def _crop_pads(geo: Geometry, begin, out_size):
        """Pads (negative = crop) that take the full scatter [*full] to the output window."""
        return [0, 0] + [-bg for bg in begin] + [0, 0] + [o + bg - f for o, bg, f in
                                                         zip(out_size, begin, geo.padded_size)]

    def _forward_ConvTranspose(self, prim: P.ConvTranspose, x):
        geo, groups = prim.scatter, prim.groups
        wshape, w2r = self._conv_weight(prim)  # [G, Cg, Og·K]
        n, channels = self._shape(prim.x)[:2]
        n_out = wshape[1] * groups
        spread = self.op("MatMul", [self.transpose(w2r, [0, 2, 1]),
                                    to_groups(self, x, n, channels, groups, 1, int(np.prod(geo.out_size)))])
        per_offset = from_groups(self, spread, n, n_out, [geo.kernel_volume], geo.out_size)  # [N, O, K, *in]
        parts = []
        for k in range(geo.kernel_volume):
            one = self.op("Slice", [per_offset, self.ints([k]), self.ints([k + 1]), self.ints([2])])
            parts.append(self.reshape(one, [n, n_out] + list(geo.out_size)))
        full = scatter_windows(self, parts, (n, n_out), geo)
        y = self.op("Pad", [full, self.ints(self._crop_pads(geo, prim.begin, prim.out_size))])
        return [self._made(y, self._shape(prim.y))]

    def _backward_ConvTranspose(self, prim: P.ConvTranspose, inputs, adj):
        geo, groups = prim.scatter, prim.groups
        wshape, w2r = self._conv_weight(prim)
        n, channels = self._shape(prim.x)[:2]
        n_out = wshape[1] * groups
        undo = [-p for p in self._crop_pads(geo, prim.begin, prim.out_size)]
        full = self.op("Pad", [adj, self.ints(undo)])
        cols = columns(self, full, (n, n_out), groups, geo)  # [G, Og·K, N·P]
        into = from_groups(self, self.op("MatMul", [w2r, cols]), n, channels, [], geo.out_size)
        x = to_groups(self, inputs[0], n, channels, groups, 1, int(np.prod(geo.out_size)))
        return [into], [(prim.weight.use, self.op("MatMul", [x, self.transpose(cols, [0, 2, 1])]), None)]

    # WindowSum
    def _forward_WindowSum(self, prim: P.WindowSum, x):
        geo = prim.geometry
        parts = window_slices(self, pad_input(self, x, geo), geo)
        y = parts[0] if len(parts) == 1 else self.op("Sum", parts)
        if prim.weight is not None:
            y = self.mul(y, self.const(prim.weight[None, None]))
        return [self._made(y, self._shape(prim.y))]

    def _backward_WindowSum(self, prim: P.WindowSum, inputs, adj):
        geo = prim.geometry
        if prim.weight is not None:
            adj = self.mul(adj, self.const(prim.weight[None, None]))
        full = scatter_windows(self, [adj] * geo.kernel_volume, self._shape(prim.x)[:2], geo)
        return [crop_input(self, full, geo)], []

    # ReduceSum
    def _forward_ReduceSum(self, prim: P.ReduceSum, x):
        y = self.reduce_sum(x, list(prim.axes), keepdims=1) if prim.axes else x
        y = self.scaled(y, prim.gain)
        return [self._made(self.reshape(y, self._shape(prim.y)), self._shape(prim.y))]

    def _backward_ReduceSum(self, prim: P.ReduceSum, inputs, adj):
        shape = self._shape(prim.x)
        kept = [1 if a in prim.axes else d for a, d in enumerate(shape)]
        adj = self.scaled(self.reshape(adj, kept), prim.gain)
        return [self.op("Expand", [adj, self.ints(shape)])], []

    # Concat
    def _forward_Concat(self, prim: P.Concat, *xs):
        return [self._made(self.op("Concat", list(xs), axis=prim.axis), self._shape(prim.y))]

    def _backward_Concat(self, prim: P.Concat, inputs, adj):
        sizes = [self._shape(x)[prim.axis] for x in prim.xs]
        parts = self.op("Split", [adj, self.ints(sizes)], n_out=len(sizes), axis=prim.axis)
        parts = [parts] if len(sizes) == 1 else parts
        return [self._made(part, self._shape(x)) for part, x in zip(parts, prim.xs)], []

    # Gather
    def _forward_Gather(self, prim: P.Gather, *xs):
        flat = self.op("Concat", [self.reshape(x, [-1]) for x in xs] + [self.const(np.zeros(1))], axis=0)
        size = sum(int(np.prod(self._shape(x))) for x in prim.xs)
        maps = [_written_out(m) for m in prim.maps]
        return [self._made(self.op("Gather", [flat, self.const(np.where(src >= 0, src, size))], axis=0), src.shape)
                for src in maps]

    def _backward_Gather(self, prim: P.Gather, inputs, *adjs):
        sizes = [int(np.prod(self._shape(x))) for x in prim.xs]
        # Inverse of the copy map: for every input element, the output elements that copy it
        # (padded with an index that reads a zero), summed by a Gather and a ReduceSum.
        src = np.concatenate([_written_out(m).ravel() for m in prim.maps])
        n_out = src.size
        order = np.argsort(src, kind="stable")
        counts = np.bincount(src[src >= 0], minlength=sum(sizes))
        width = max(int(counts.max()) if counts.size else 0, 1)
        inverse = np.full((sum(sizes), width), n_out, dtype=np.int64)
        valid = order[src[order] >= 0]
        owners = src[valid]
        starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
        slot = np.arange(valid.size) - starts[owners]
        inverse[owners, slot] = valid
        flat = self.op("Concat", [self.reshape(a, [-1]) for a in adjs] + [self.const(np.zeros(1))], axis=0)
        summed = self.reduce_sum(self.op("Gather", [flat, self.const(inverse)], axis=0), [1])
        into, offset = [], 0
        for x, n in zip(prim.xs, sizes):
            part = self.op("Slice", [summed, self.ints([offset]), self.ints([offset + n]), self.ints([0])])
            into.append(self.reshape(part, self._shape(x)))
            offset += n
        return into, []

    # AxisMatrices
    def _along(self, x: str, matrix: np.ndarray, axis: int, rank: int) -> str:
        letters = "abcdefgh"[:rank]
        eq = f"zy,{letters}->{letters[:axis]}z{letters[axis + 1:]}".replace("y", letters[axis], 1)
        return self.op("Einsum", [self.const(matrix), x], equation=eq)

    def _forward_AxisMatrices(self, prim: P.AxisMatrices, x):
        rank = len(self._shape(prim.x))
        for k, m in enumerate(prim.matrices):
            x = self._along(x, m, prim.first_axis + k, rank)
        return [self._made(x, self._shape(prim.y))]

    def _backward_AxisMatrices(self, prim: P.AxisMatrices, inputs, adj):
        rank = len(self._shape(prim.x))
        for k, m in enumerate(prim.matrices):
            adj = self._along(adj, m.T.copy(), prim.first_axis + k, rank)
        return [adj], []


# ---------------------------------------------------------------------------- windows as ONNX nodes
# A window view becomes one strided Slice per kernel offset of the zero-padded input, and its
# adjoint places each offset's values back with a stride dilation (interleaved zeros) and a
# Pad, then sums the offsets.
def pad_input(b: OnnxExecutor, x: str, geo: Geometry) -> str:
    """[1, C, *S] → [1, C, *padded_size] (zeros around)."""
    end = [p - s - a for p, s, a in zip(geo.padded_size, geo.in_size, geo.pads_begin)]
    if not any(geo.pads_begin) and not any(end):
        return x
    return b.op("Pad", [x, b.ints([0, 0] + list(geo.pads_begin) + [0, 0] + end)])


def crop_input(b: OnnxExecutor, xp: str, geo: Geometry) -> str:
    nd = len(geo.kernel)
    if all(p == s for p, s in zip(geo.padded_size, geo.in_size)) and not any(geo.pads_begin):
        return xp
    return b.op("Slice", [xp, b.ints(geo.pads_begin), b.ints([a + s for a, s in zip(geo.pads_begin, geo.in_size)]),
                          b.ints(range(2, 2 + nd))])


def _offsets(geo: Geometry):
    return list(itertools.product(*(range(k) for k in geo.kernel)))


def window_slices(b: OnnxExecutor, xp: str, geo: Geometry) -> List[str]:
    """One [1, C, *out] tensor per kernel offset: element p is xp[p·stride + k·dilation]."""
    nd = len(geo.kernel)
    axes = b.ints(range(2, 2 + nd))
    steps = b.ints(geo.strides)
    parts = []
    for k in _offsets(geo):
        starts = [ki * d for ki, d in zip(k, geo.dilations)]
        ends = [s + (o - 1) * st + 1 for s, o, st in zip(starts, geo.out_size, geo.strides)]
        parts.append(b.op("Slice", [xp, b.ints(starts), b.ints(ends), axes, steps]))
    return parts


def _dilate(b: OnnxExecutor, t: str, shape, geo: Geometry, first_axis: int = 2) -> str:
    """Insert stride−1 zeros between neighbours along the spatial axes of t (of `shape`)."""
    shape = list(shape)
    for i, st in enumerate(geo.strides):
        if st == 1:
            continue
        axis = first_axis + i
        n = shape[axis]
        t = b.op("Unsqueeze", [t, b.ints([axis + 1])])
        pads = [0] * (2 * (len(shape) + 1))
        pads[len(shape) + 1 + axis + 1] = st - 1
        t = b.op("Pad", [t, b.ints(pads)])
        merged = shape[:axis] + [n * st] + shape[axis + 1:]
        t = b.reshape(t, merged)
        t = b.op("Slice", [t, b.ints([0]), b.ints([(n - 1) * st + 1]), b.ints([axis])])
        shape[axis] = (n - 1) * st + 1
    return t


def scatter_windows(b: OnnxExecutor, parts: List[str], lead, geo: Geometry) -> str:
    """Adjoint of `window_slices`: sum each offset's [N, C, *out] (`lead` = [N, C]) into
    [N, C, *padded_size]."""
    dilated_size = [(o - 1) * st + 1 for o, st in zip(geo.out_size, geo.strides)]
    placed = []
    for k, part in zip(_offsets(geo), parts):
        d = _dilate(b, part, list(lead) + list(geo.out_size), geo)
        begin = [ki * dd for ki, dd in zip(k, geo.dilations)]
        end = [p - bg - ds for p, bg, ds in zip(geo.padded_size, begin, dilated_size)]
        placed.append(b.op("Pad", [d, b.ints([0, 0] + begin + [0, 0] + end)]) if any(begin) or any(end) else d)
    return placed[0] if len(placed) == 1 else b.op("Sum", placed)


def to_groups(b: OnnxExecutor, t: str, n: int, channels: int, groups: int, inner: int, outer: int) -> str:
    """[N, C, *inner, *outer] (of sizes |inner|, |outer|) → [G, C/G·|inner|, N·|outer|]: a matrix per
    group whose columns run over the samples."""
    rows = channels // groups * inner
    if n == 1:
        return b.reshape(t, [groups, rows, outer])
    t = b.transpose(b.reshape(t, [n, groups, rows, outer]), [1, 2, 0, 3])
    return b.reshape(t, [groups, rows, n * outer])


def from_groups(b: OnnxExecutor, t: str, n: int, channels: int, inner, outer) -> str:
    """Inverse of `to_groups`: [G, Cg·|inner|, N·|outer|] → [N, C, *inner, *outer]."""
    inner, outer = list(inner), list(outer)
    if n == 1:
        return b.reshape(t, [1, channels] + inner + outer)
    t = b.reshape(t, [channels] + inner + [n] + outer)
    k = len(inner)
    return b.transpose(t, [k + 1, 0] + list(range(1, k + 1)) + list(range(k + 2, k + 2 + len(outer))))


def columns(b: OnnxExecutor, x: str, lead, groups: int, geo: Geometry) -> str:
    """im2col: [G, Cg·K, N·P] from x [N, C, *S] (`lead` = [N, C]): the windows of every offset."""
    n, channels = lead
    K = geo.kernel_volume
    P_ = int(np.prod(geo.out_size))
    parts = [b.reshape(p, [n, channels, 1, P_]) for p in window_slices(b, pad_input(b, x, geo), geo)]
    stacked = parts[0] if K == 1 else b.op("Concat", parts, axis=2)
    return to_groups(b, stacked, n, channels, groups, K, P_)


def scatter_columns(b: OnnxExecutor, cols: str, lead, geo: Geometry) -> str:
    """Adjoint of `columns` (up to the padding crop): [G, Cg·K, N·P] → [N, C, *S]."""
    n, channels = lead
    K = geo.kernel_volume
    per_offset = from_groups(b, cols, n, channels, [K], geo.out_size)  # [N, C, K, *out]
    parts = []
    for k in range(K):
        one = b.op("Slice", [per_offset, b.ints([k]), b.ints([k + 1]), b.ints([2])])
        parts.append(b.reshape(one, [n, channels] + list(geo.out_size)))
    return crop_input(b, scatter_windows(b, parts, lead, geo), geo)
