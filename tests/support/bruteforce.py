"""Brute-force reference for the path-lifting statistics ``diag(G)`` (docs/design.md §2).

This module is deliberately independent of ``onnx_pathcond``: it is written from the
definitions only, favours clarity over speed, and is meant to check the real
implementation on *tiny* networks (batch 1, a few hundred scalar units).

How it works
------------
1. The model is run once with onnxruntime with every intermediate tensor requested as an
   output.  That gives the static shape of every tensor and the value of every *constant*
   tensor (initializers, ``Constant`` nodes and whole constant subgraphs such as the shape
   computations feeding a ``Reshape``).
2. An explicit scalar **unit graph** of the path network is built: one unit per scalar element
   of every activation tensor, plus two virtual units ``START`` and ``END``.  Every edge carries
   its (signed) value ``w`` and, when that value is a parameter element, a label
   ``(stored tensor name, flat index into the stored tensor)``.

   * ``START -> u`` for every graph-input element (value 1), every element of an output of a
     barrier op (value 1), and every bias element (value = the bias, labelled with it);
   * ``u -> END`` once for every unit that is a graph-output element or an element of an
     activation input of a barrier op.

   The per-op rules are those of docs/design.md §2 (see ``_Builder._op_*``).
3. **Every path from START to END is enumerated explicitly** (depth-first, no dynamic
   programming; only the guard that refuses huge graphs counts paths with a DP first), and
   for every parameter element θ_i

       g_i = Σ_{paths p through θ_i}  Π_{other edges j on p} w_j²

   is accumulated.  Concretely, for one path ``p`` with edge values ``w_1 … w_L`` the
   contribution to θ_i is ``(Σ_{e on p labelled θ_i} d_e · Π_{j≠e} w_j)²``.  With the default
   ``wrt="edge"`` the factor ``d_e`` is 1, so a path that uses θ_i once contributes exactly
   ``Π_{j≠e} w_j²`` (the brief's definition).  With ``wrt="param"`` ``d_e = ∂w_e/∂θ_i`` (the
   true Jacobian of the path-lifting with respect to the *stored* parameter): this differs from
   "edge" only where an edge value is not the parameter itself, i.e. ``Gemm`` alpha/beta
   (``d = alpha`` / ``beta``) and inference ``BatchNormalization`` (``a = γ·s`` with
   ``s = 1/√(var+ε)`` gives ``d = s``; the bias ``b = β − γ·s·mean`` depends on β with ``d = 1``
   and also on γ with ``d = −s·mean``).

Public functions: :func:`build_unit_graph`, :func:`enumerate_paths`,
:func:`bruteforce_diag_g`, :func:`bruteforce_path_sum`, :func:`unit_graph_forward`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = [
    "START",
    "END",
    "Edge",
    "UnitGraph",
    "TooManyPaths",
    "build_unit_graph",
    "enumerate_paths",
    "count_paths",
    "bruteforce_diag_g",
    "bruteforce_path_sum",
    "unit_graph_forward",
]

START = -1  # virtual source unit
END = -2  # virtual sink unit
DEFAULT_MAX_PATHS = 2_000_000

Label = tuple  # (stored tensor name, flat index)


class TooManyPaths(ValueError):
    """The unit graph has more paths than the brute force is willing to enumerate."""


@dataclass(frozen=True)
class Edge:
    src: int  # unit id or START
    dst: int  # unit id or END
    w: float  # signed edge value
    label: Optional[Label] = None  # parameter element this value is (None: fixed weight)
    d: float = 1.0  # ∂w/∂θ_label, only used with wrt="param"
    extra: tuple = ()  # further ((name, idx), ∂w/∂θ) dependencies, only used with wrt="param"
    kind: str = "op"  # "input" | "bias" | "barrier" | "op" | "end"
    node: str = ""  # producing node (op type and name) for debugging


@dataclass
class UnitGraph:
    units: list  # unit id -> (tensor name, multi-index)
    edges: list  # list[Edge]
    out_edges: dict  # unit id (or START) -> list of edge indices
    params: dict  # parameter name -> stored shape (every name that labels an edge)
    barriers: list  # "OpType(name)" of every node treated as a barrier
    tensor_units: dict = field(default_factory=dict)  # activation tensor -> array of unit ids

    def describe_path(self, path) -> str:
        """Human-readable form of a path (a sequence of Edge)."""
        parts = ["START"]
        for e in path:
            parts.append("END" if e.dst == END else f"{self.units[e.dst][0]}{list(self.units[e.dst][1])}")
        return " -> ".join(parts)


# --------------------------------------------------------------------------------------------
# running the model once (shapes of everything, values of constants)
# --------------------------------------------------------------------------------------------

_SHAPE_OPS = {"Shape", "Size"}  # their outputs are static (constant) whatever the input values
# ops whose outputs are sequences of tensors (not requested from the runtime: no tensor value)
_SEQUENCE_OPS = {"SplitToSequence", "SequenceConstruct", "SequenceEmpty", "SequenceInsert", "SequenceErase"}


def make_session(model: onnx.ModelProto):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _graph_inputs(model):
    inits = {i.name for i in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in inits]


def _input_shapes(model, input_shapes):
    shapes = {}
    input_shapes = dict(input_shapes or {})
    for vi in _graph_inputs(model):
        if vi.name in input_shapes:
            shapes[vi.name] = tuple(int(s) for s in input_shapes[vi.name])
            continue
        dims = []
        for ax, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(d.dim_value)
            elif ax == 0:
                dims.append(1)  # batch 1
            else:
                raise ValueError(f"input {vi.name!r} has a non-static dim {ax}; pass input_shapes")
        shapes[vi.name] = tuple(dims)
    return shapes


def _run_everything(model, in_shapes, seed=0):
    """Run with every node output requested; returns {tensor name: np.ndarray}."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for node in m.graph.node:
        if node.op_type in _SEQUENCE_OPS:
            continue
        for o in node.output:
            if o and o not in have:
                m.graph.output.append(helper.make_empty_tensor_value_info(o))
                have.add(o)
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in _graph_inputs(model):
        np_dtype = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        shape = in_shapes[vi.name]
        if np.issubdtype(np_dtype, np.floating):
            feeds[vi.name] = rng.standard_normal(shape).astype(np_dtype)
        else:
            feeds[vi.name] = np.zeros(shape, np_dtype)
    sess = make_session(m)
    names = [o.name for o in sess.get_outputs()]
    vals = sess.run(names, feeds)
    out = dict(zip(names, vals))
    out.update(feeds)
    return out


# --------------------------------------------------------------------------------------------
# small helpers for attributes and geometry
# --------------------------------------------------------------------------------------------


def _attrs(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _s(v):
    return v.decode() if isinstance(v, bytes) else v


def _pad_begin_end(auto_pad, pads, i, in_size, out_size, stride, k_eff):
    """Padding (begin, end) of spatial dim i for Conv and the pools."""
    auto_pad = _s(auto_pad or "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        total = max(0, (out_size - 1) * stride + k_eff - in_size)
        small, big = total // 2, total - total // 2
        return (small, big) if auto_pad == "SAME_UPPER" else (big, small)
    if auto_pad == "VALID":
        return 0, 0
    nd = len(pads) // 2 if pads else 0
    if not pads:
        return 0, 0
    return int(pads[i]), int(pads[i + nd])


class _Unsupported(Exception):
    """Raised inside an op handler: the node is then treated as a barrier."""


# --------------------------------------------------------------------------------------------
# the unit-graph builder
# --------------------------------------------------------------------------------------------


class _Builder:
    def __init__(self, model: onnx.ModelProto, input_shapes=None):
        self.model = model
        self.in_shapes = _input_shapes(model, input_shapes)
        self.values = _run_everything(model, self.in_shapes)
        self.units: list = []
        self.edges: list = []
        self.ids: dict = {}  # activation tensor -> int array of unit ids
        self.const: dict = {}  # constant tensor -> float64 (or raw) value
        self.prov: dict = {}  # constant tensor -> (stored name or None, flat-index array, -1 = none)
        self.stored_shape: dict = {}  # stored parameter name -> shape
        self.params: dict = {}  # names that label at least one edge -> stored shape
        self.ends: set = set()
        self.barriers: list = []
        self.seqs: dict = {}  # sequence tensor -> list of unit-id arrays, one per element tensor

        for init in model.graph.initializer:
            arr = numpy_helper.to_array(init)
            self._set_const(init.name, arr, stored=True)

    # ---- constants -------------------------------------------------------------------------
    def _set_const(self, name, arr, stored=False, prov=None):
        arr = np.asarray(arr)
        self.const[name] = arr
        if stored:
            self.stored_shape[name] = tuple(arr.shape)
            self.prov[name] = (name, np.arange(arr.size).reshape(arr.shape))
        elif prov is not None:
            self.prov[name] = prov
        else:
            self.prov[name] = (None, -np.ones(arr.shape, np.int64))

    def is_const(self, name):
        return name in self.const

    def is_act(self, name):
        return name in self.ids

    def cval(self, name):
        v = self.const[name]
        return v.astype(np.float64) if np.issubdtype(v.dtype, np.number) or v.dtype == bool else v

    def label(self, name, flat_prov_idx):
        src, _ = self.prov[name]
        if src is None or flat_prov_idx < 0:
            return None
        self.params[src] = self.stored_shape[src]
        return (src, int(flat_prov_idx))

    def cprov(self, name):
        return self.prov[name][1]

    def _const_node(self, node):
        """A node all of whose inputs are constant: record its outputs (and provenance)."""
        a = _attrs(node)
        for o in node.output:
            if not o:
                continue
            if o not in self.values:
                raise ValueError(f"no value for constant tensor {o!r}")
        if node.op_type == "Constant":
            self._set_const(node.output[0], self.values[node.output[0]], stored=True)
            return
        src_name = node.input[0] if node.input else ""
        src = self.prov.get(src_name)
        out0 = node.output[0]
        val = self.values[out0]
        prov = None
        if src is not None and src[0] is not None:
            name, idx = src
            op = node.op_type
            if op in ("Identity", "Cast"):
                prov = (name, idx)
            elif op == "Transpose":
                perm = a.get("perm", list(range(idx.ndim))[::-1])
                prov = (name, np.transpose(idx, perm))
            elif op in ("Reshape", "Flatten", "Squeeze", "Unsqueeze") and idx.size == val.size:
                prov = (name, idx.reshape(val.shape))
        self._set_const(out0, val, prov=prov)
        for o in node.output[1:]:
            if o:
                self._set_const(o, self.values[o])

    # ---- units and edges -------------------------------------------------------------------
    def new_units(self, tensor, shape=None):
        if shape is None:
            shape = self.values[tensor].shape
        shape = tuple(int(s) for s in shape)
        if tensor in self.values and tuple(self.values[tensor].shape) != shape:
            raise AssertionError(f"{tensor}: built shape {shape} != runtime shape {self.values[tensor].shape}")
        n0 = len(self.units)
        for idx in np.ndindex(*shape):
            self.units.append((tensor, idx))
        ids = np.arange(n0, n0 + int(np.prod(shape, dtype=np.int64))).reshape(shape)
        self.ids[tensor] = ids
        return ids

    def add(self, src, dst, w, label=None, d=1.0, extra=(), kind="op"):
        self.edges.append(Edge(int(src), int(dst), float(w), label, float(d), tuple(extra), kind, self._cur))

    def act_or_const_units(self, name):
        """Unit ids of an activation; a constant becomes fresh units fed by bias edges."""
        if self.is_act(name):
            return self.ids[name]
        val = self.cval(name)
        pseudo = f"{name}@const[{self._cur}]"
        ids = self.new_units(pseudo, val.shape)
        prov = self.cprov(name)
        for pos in np.ndindex(*val.shape):
            self.add(START, ids[pos], val[pos], self.label(name, prov[pos]), kind="bias")
        return ids

    def copy_edges(self, src_ids, out_name, weight=1.0):
        """out[pos] <- src_ids[pos] (src -1 means 'no source', e.g. padding)."""
        out = self.new_units(out_name, src_ids.shape)
        for pos in np.ndindex(*src_ids.shape):
            if src_ids[pos] >= 0:
                self.add(src_ids[pos], out[pos], weight)
        return out

    def barrier(self, node):
        self.barriers.append(self._cur)
        for i in node.input:
            if i and self.is_act(i):
                self.ends.update(int(u) for u in self.ids[i].ravel())
            for piece in self.seqs.get(i, []) if i else []:  # a sequence: every element of every tensor
                self.ends.update(int(u) for u in piece.ravel())
        for o in node.output:
            if o and o in self.values:  # (a sequence output has no units: nothing downstream follows it)
                ids = self.new_units(o)
                for u in ids.ravel():
                    self.add(START, u, 1.0, kind="barrier")

    # ---- main loop ---------------------------------------------------------------------------
    def build(self) -> UnitGraph:
        g = self.model.graph
        self._cur = "<inputs>"
        for vi in _graph_inputs(self.model):
            ids = self.new_units(vi.name, self.in_shapes[vi.name])
            for u in ids.ravel():
                self.add(START, u, 1.0, kind="input")
        for node in g.node:
            self._cur = f"{node.op_type}({node.name})"
            ins = [i for i in node.input if i]
            if node.domain not in ("", "ai.onnx"):
                handler = None
            else:
                handler = getattr(self, "_op_" + node.op_type, None)
            if node.op_type in _SHAPE_OPS or all(self.is_const(i) for i in ins):
                self._const_node(node)
                continue
            if handler is None:
                self.barrier(node)
                continue
            n_units, n_edges = len(self.units), len(self.edges)
            saved_ids, saved_params = dict(self.ids), dict(self.params)
            try:
                handler(node, _attrs(node))
            except _Unsupported:
                del self.units[n_units:]
                del self.edges[n_edges:]
                self.ids, self.params = saved_ids, saved_params
                self.barrier(node)
        self._cur = "<outputs>"
        for o in g.output:
            if self.is_act(o.name):
                self.ends.update(int(u) for u in self.ids[o.name].ravel())
            for piece in self.seqs.get(o.name, []):
                self.ends.update(int(u) for u in piece.ravel())
        for u in sorted(self.ends):
            self.add(u, END, 1.0, kind="end")
        out_edges: dict = {}
        for k, e in enumerate(self.edges):
            out_edges.setdefault(e.src, []).append(k)
        return UnitGraph(self.units, self.edges, out_edges, dict(self.params), self.barriers,
                         {k: v for k, v in self.ids.items() if "@const[" not in k})

    # ---- op handlers -------------------------------------------------------------------------
    # Each takes (node, attrs); raises _Unsupported to fall back to a barrier.

    def _need_act(self, name):
        if not name or not self.is_act(name):
            raise _Unsupported
        return self.ids[name]

    def _need_const(self, name):
        if not name or not self.is_const(name):
            raise _Unsupported
        return self.cval(name)

    def _need_ints(self, name):
        if not name or not self.is_const(name):
            raise _Unsupported
        return [int(v) for v in np.asarray(self.const[name]).ravel()]

    # identity family
    def _identity(self, node, a):
        x = self._need_act(node.input[0])
        for extra in node.input[1:]:
            if extra and not self.is_const(extra):
                raise _Unsupported
        self.copy_edges(x, node.output[0])

    _op_Relu = _op_LeakyRelu = _op_PRelu = _op_Identity = _op_Dropout = _identity

    def _op_Clip(self, node, a):
        # max(x, 0) (or no bound at all) is an identity edge per element; any other bound is a barrier
        x = self._need_act(node.input[0])
        low = node.input[1] if len(node.input) > 1 else ""
        high = node.input[2] if len(node.input) > 2 else ""
        low_value = self._need_const(low) if low else a.get("min")
        if high or "max" in a or (low_value is not None and np.any(np.asarray(low_value) != 0)):
            raise _Unsupported
        self.copy_edges(x, node.output[0])

    # Gemm: Y = alpha * A' B' + beta * C
    def _op_Gemm(self, node, a):
        if self.is_const(node.input[0]) and self.is_act(node.input[1]):
            return self._gemm_constant_a(node, a)
        A = self._need_act(node.input[0])
        Bname = node.input[1]
        Bv = self._need_const(Bname)
        Bp = self.cprov(Bname)
        Cname = node.input[2] if len(node.input) > 2 and node.input[2] else None
        alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
        if a.get("transA", 0):
            A = A.T
        if a.get("transB", 0):
            Bv, Bp = Bv.T, Bp.T
        M, K = A.shape
        N = Bv.shape[1]
        Y = self.new_units(node.output[0], (M, N))
        for m, n, k in itertools.product(range(M), range(N), range(K)):
            self.add(A[m, k], Y[m, n], alpha * Bv[k, n], self.label(Bname, Bp[k, n]), d=alpha)
        self._gemm_bias(Y, Cname, beta)

    def _gemm_bias(self, Y, Cname, beta):
        """beta * C added to every unit of Y (C broadcast to Y's shape)."""
        if not Cname:
            return
        M, N = Y.shape
        Cv = np.broadcast_to(self._need_const(Cname), (M, N))
        Cp = np.broadcast_to(self.cprov(Cname), (M, N))
        for m, n in itertools.product(range(M), range(N)):
            self.add(START, Y[m, n], beta * Cv[m, n], self.label(Cname, Cp[m, n]), d=beta, kind="bias")

    def _gemm_constant_a(self, node, a):
        """Y = alpha * A' B' + beta * C with A the constant and B the activation."""
        Aname = node.input[0]
        Av, Ap = self._need_const(Aname), self.cprov(Aname)
        B = self._need_act(node.input[1])
        Cname = node.input[2] if len(node.input) > 2 and node.input[2] else None
        alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
        if a.get("transA", 0):
            Av, Ap = Av.T, Ap.T
        if a.get("transB", 0):
            B = B.T
        M, K = Av.shape
        N = B.shape[1]
        Y = self.new_units(node.output[0], (M, N))
        for m, n, k in itertools.product(range(M), range(N), range(K)):
            self.add(B[k, n], Y[m, n], alpha * Av[m, k], self.label(Aname, Ap[m, k]), d=alpha)
        self._gemm_bias(Y, Cname, beta)

    # MatMul with one constant rank-2 operand
    def _op_MatMul(self, node, a):
        x_name, w_name = node.input[0], node.input[1]
        Yshape = self.values[node.output[0]].shape
        if self.is_act(x_name) and self.is_const(w_name):  # Y = X @ W
            X, W, P = self.ids[x_name], self.cval(w_name), self.cprov(w_name)
            if W.ndim != 2:
                raise _Unsupported
            K, N = W.shape
            Y = self.new_units(node.output[0], Yshape)
            if X.ndim == 1:
                X, Yv = X[None], Y[None]
            else:
                Yv = Y
            for lead in np.ndindex(*X.shape[:-1]):
                for n, k in itertools.product(range(N), range(K)):
                    self.add(X[lead + (k,)], Yv[lead + (n,)], W[k, n], self.label(w_name, P[k, n]))
        elif self.is_const(x_name) and self.is_act(w_name):  # Y = W @ X
            W, P, X = self.cval(x_name), self.cprov(x_name), self.ids[w_name]
            if W.ndim != 2:
                raise _Unsupported
            M, K = W.shape
            Y = self.new_units(node.output[0], Yshape)
            if X.ndim == 1:
                X, Yv = X[:, None], Y[:, None]
            else:
                Yv = Y
            for lead in np.ndindex(*X.shape[:-2]):
                for m, n, k in itertools.product(range(M), range(X.shape[-1]), range(K)):
                    self.add(X[lead + (k, n)], Yv[lead + (m, n)], W[m, k], self.label(x_name, P[m, k]))
        else:
            raise _Unsupported

    # Einsum of an activation and a constant: a sum of products x[u]·w[e], one edge per term
    def _op_Einsum(self, node, a):
        names = list(node.input)
        if len(names) != 2 or sum(self.is_act(n) for n in names) != 1 or not all(names):
            raise _Unsupported  # two activations multiply each other: not linear
        side = 0 if self.is_act(names[0]) else 1
        X, w_name = self.ids[names[side]], names[1 - side]
        W, P = self._need_const(w_name), self.cprov(w_name)
        equation = "".join(_s(a["equation"]).split())
        Y = self.new_units(node.output[0])
        # Each term of the einsum's sum reads one element u of x and one element e of w: run it
        # on one-hot operands, and every output element it reaches gets an edge u -> v of value w[e].
        one_x, one_w = np.zeros(X.shape), np.zeros(W.shape)
        for u in np.ndindex(*X.shape):
            one_x[u] = 1.0
            for e in np.ndindex(*W.shape):
                one_w[e] = 1.0
                reached = np.einsum(equation, *((one_x, one_w) if side == 0 else (one_w, one_x)))
                for v in zip(*np.nonzero(reached)):
                    for _ in range(int(round(reached[v]))):
                        self.add(X[u], Y[v], W[e], self.label(w_name, P[e]))
                one_w[e] = 0.0
            one_x[u] = 0.0

    # elementwise Add / Sum / Sub / Mul with broadcasting
    def _elementwise(self, node, a, signs):
        out = node.output[0]
        shape = self.values[out].shape
        ins = list(node.input)
        Y = self.new_units(out, shape)
        for i, name in enumerate(ins):
            if not name:
                continue
            sgn = signs[i] if i < len(signs) else 1.0
            if self.is_act(name):
                X = np.broadcast_to(self.ids[name], shape)
                for pos in np.ndindex(*shape):
                    self.add(X[pos], Y[pos], sgn)
            else:
                Cv = np.broadcast_to(self.cval(name), shape)
                Cp = np.broadcast_to(self.cprov(name), shape)
                for pos in np.ndindex(*shape):
                    self.add(START, Y[pos], sgn * Cv[pos], self.label(name, Cp[pos]), d=sgn, kind="bias")

    def _op_Add(self, node, a):
        self._elementwise(node, a, [1.0, 1.0])

    def _op_Sum(self, node, a):
        self._elementwise(node, a, [1.0] * len(node.input))

    def _op_Sub(self, node, a):
        self._elementwise(node, a, [1.0, -1.0])

    def _op_Mul(self, node, a):
        x_name, c_name = node.input[0], node.input[1]
        if self.is_const(x_name) and self.is_act(c_name):
            x_name, c_name = c_name, x_name
        if not (self.is_act(x_name) and self.is_const(c_name)):
            raise _Unsupported
        shape = self.values[node.output[0]].shape
        X = np.broadcast_to(self.ids[x_name], shape)
        Cv = np.broadcast_to(self.cval(c_name), shape)
        Cp = np.broadcast_to(self.cprov(c_name), shape)
        Y = self.new_units(node.output[0], shape)
        for pos in np.ndindex(*shape):
            self.add(X[pos], Y[pos], Cv[pos], self.label(c_name, Cp[pos]))

    # BatchNormalization (inference form)
    def _op_BatchNormalization(self, node, a):
        X = self._need_act(node.input[0])
        gname, bname = node.input[1], node.input[2]
        gam, bet = self._need_const(gname), self._need_const(bname)
        mean, var = self._need_const(node.input[3]), self._need_const(node.input[4])
        eps = float(a.get("epsilon", 1e-5))
        s = 1.0 / np.sqrt(var + eps)
        A = gam * s
        B = bet - A * mean
        gp, bp = self.cprov(gname), self.cprov(bname)
        Y = self.new_units(node.output[0], X.shape)
        for pos in np.ndindex(*X.shape):
            c = pos[1]
            gl = self.label(gname, gp[c])
            self.add(X[pos], Y[pos], A[c], gl, d=s[c])
            extra = ((gl, -s[c] * mean[c]),) if gl is not None else ()
            self.add(START, Y[pos], B[c], self.label(bname, bp[c]), d=1.0, extra=extra, kind="bias")

    # Conv / ConvTranspose
    def _op_Conv(self, node, a):
        X = self._need_act(node.input[0])
        wname = node.input[1]
        W, P = self._need_const(wname), self.cprov(wname)
        bname = node.input[2] if len(node.input) > 2 and node.input[2] else None
        Yshape = self.values[node.output[0]].shape
        N, C = X.shape[:2]
        in_sp = X.shape[2:]
        M, Cg = W.shape[:2]
        ks = W.shape[2:]
        nd = len(ks)
        G = int(a.get("group", 1))
        strides = a.get("strides", [1] * nd)
        dil = a.get("dilations", [1] * nd)
        out_sp = Yshape[2:]
        pb = [_pad_begin_end(a.get("auto_pad"), a.get("pads"), i, in_sp[i], out_sp[i], strides[i],
                             (ks[i] - 1) * dil[i] + 1)[0] for i in range(nd)]
        Mg = M // G
        Y = self.new_units(node.output[0], Yshape)
        for n, m in itertools.product(range(N), range(M)):
            grp = m // Mg
            for o in np.ndindex(*out_sp):
                for cl in range(Cg):
                    c = grp * Cg + cl
                    for k in np.ndindex(*ks):
                        ip = tuple(o[i] * strides[i] - pb[i] + k[i] * dil[i] for i in range(nd))
                        if all(0 <= ip[i] < in_sp[i] for i in range(nd)):
                            widx = (m, cl) + k
                            self.add(X[(n, c) + ip], Y[(n, m) + o], W[widx], self.label(wname, P[widx]))
        if bname:
            Bv, Bp = self._need_const(bname), self.cprov(bname)
            for pos in np.ndindex(*Yshape):
                self.add(START, Y[pos], Bv[pos[1]], self.label(bname, Bp[pos[1]]), kind="bias")

    def _op_ConvTranspose(self, node, a):
        X = self._need_act(node.input[0])
        wname = node.input[1]
        W, P = self._need_const(wname), self.cprov(wname)
        bname = node.input[2] if len(node.input) > 2 and node.input[2] else None
        Yshape = self.values[node.output[0]].shape
        N, C = X.shape[:2]
        in_sp = X.shape[2:]
        Cw, Mg = W.shape[:2]
        ks = W.shape[2:]
        nd = len(ks)
        G = int(a.get("group", 1))
        Cg = C // G
        strides = a.get("strides", [1] * nd)
        dil = a.get("dilations", [1] * nd)
        opad = a.get("output_padding", [0] * nd)
        out_sp = Yshape[2:]
        auto_pad = _s(a.get("auto_pad", "NOTSET"))
        pb = []
        for i in range(nd):
            full = strides[i] * (in_sp[i] - 1) + opad[i] + (ks[i] - 1) * dil[i] + 1
            if "output_shape" in a or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
                # pads derived from the (requested) output size; the runtime output size is it
                total = full - out_sp[i]
                if auto_pad == "SAME_UPPER":
                    pb.append(total // 2)
                elif auto_pad == "SAME_LOWER":
                    pb.append(total - total // 2)
                else:
                    pb.append(total - total // 2)  # spec: NOTSET with output_shape as SAME_LOWER
            elif auto_pad == "VALID":
                pb.append(0)
            else:
                pads = a.get("pads", [0] * (2 * nd))
                pb.append(int(pads[i]))
        Y = self.new_units(node.output[0], Yshape)
        for n, c in itertools.product(range(N), range(C)):
            grp = c // Cg
            for ip in np.ndindex(*in_sp):
                for ml in range(Mg):
                    m = grp * Mg + ml
                    for k in np.ndindex(*ks):
                        op = tuple(ip[i] * strides[i] + k[i] * dil[i] - pb[i] for i in range(nd))
                        if all(0 <= op[i] < out_sp[i] for i in range(nd)):
                            widx = (c, ml) + k
                            self.add(X[(n, c) + ip], Y[(n, m) + op], W[widx], self.label(wname, P[widx]))
        if bname:
            Bv, Bp = self._need_const(bname), self.cprov(bname)
            for pos in np.ndindex(*Yshape):
                self.add(START, Y[pos], Bv[pos[1]], self.label(bname, Bp[pos[1]]), kind="bias")

    # pools
    def _pool(self, node, a, average):
        X = self._need_act(node.input[0])
        if len(node.output) > 1 and node.output[1]:
            raise _Unsupported  # MaxPool Indices output: not a path-network tensor
        Yshape = self.values[node.output[0]].shape
        in_sp, out_sp = X.shape[2:], Yshape[2:]
        nd = len(in_sp)
        ks = a["kernel_shape"]
        strides = a.get("strides", [1] * nd)
        dil = a.get("dilations", [1] * nd)
        pads = [_pad_begin_end(a.get("auto_pad"), a.get("pads"), i, in_sp[i], out_sp[i], strides[i],
                               (ks[i] - 1) * dil[i] + 1) for i in range(nd)]
        include_pad = bool(a.get("count_include_pad", 0))
        Y = self.new_units(node.output[0], Yshape)
        for o in np.ndindex(*out_sp):
            taps = []
            n_pad = 0  # taps inside the padded extent [-pad_begin, in + pad_end)
            for k in np.ndindex(*ks):
                ip = tuple(o[i] * strides[i] - pads[i][0] + k[i] * dil[i] for i in range(nd))
                if all(-pads[i][0] <= ip[i] < in_sp[i] + pads[i][1] for i in range(nd)):
                    n_pad += 1
                if all(0 <= ip[i] < in_sp[i] for i in range(nd)):
                    taps.append(ip)
            n = n_pad if include_pad else len(taps)
            w = 1.0 / n if average else 1.0
            for lead in np.ndindex(*Yshape[:2]):
                for ip in taps:
                    self.add(X[lead + ip], Y[lead + o], w)

    def _op_MaxPool(self, node, a):
        self._pool(node, a, average=False)

    def _op_AveragePool(self, node, a):
        self._pool(node, a, average=True)

    def _reduce(self, node, axes, keepdims, average):
        X = self._need_act(node.input[0])
        Yshape = self.values[node.output[0]].shape
        axes = sorted(ax % X.ndim for ax in axes)
        n = int(np.prod([X.shape[ax] for ax in axes], dtype=np.int64))
        w = 1.0 / n if average else 1.0
        Y = self.new_units(node.output[0], Yshape)
        for pos in np.ndindex(*X.shape):
            if keepdims:
                opos = tuple(0 if ax in axes else p for ax, p in enumerate(pos))
            else:
                opos = tuple(p for ax, p in enumerate(pos) if ax not in axes)
            self.add(X[pos], Y[opos], w)

    def _op_GlobalMaxPool(self, node, a):
        X = self._need_act(node.input[0])
        self._reduce(node, range(2, X.ndim), True, False)

    def _op_GlobalAveragePool(self, node, a):
        X = self._need_act(node.input[0])
        self._reduce(node, range(2, X.ndim), True, True)

    def _reduce_op(self, node, a, average):
        X = self._need_act(node.input[0])
        if "axes" in a:
            axes = list(a["axes"])
        elif len(node.input) > 1 and node.input[1]:
            axes = self._need_ints(node.input[1])
        else:
            axes = []
        if not axes:
            if a.get("noop_with_empty_axes", 0):
                self.copy_edges(X, node.output[0])
                return
            axes = list(range(X.ndim))
        self._reduce(node, axes, bool(a.get("keepdims", 1)), average)

    def _op_ReduceMax(self, node, a):
        self._reduce_op(node, a, False)

    def _op_ReduceSum(self, node, a):
        self._reduce_op(node, a, False)

    def _op_ReduceMean(self, node, a):
        self._reduce_op(node, a, True)

    # pure index remapping
    def _reshape_like(self, node, a):
        X = self._need_act(node.input[0])
        for extra in node.input[1:]:
            if extra and not self.is_const(extra):
                raise _Unsupported
        self.copy_edges(X.reshape(self.values[node.output[0]].shape), node.output[0])

    _op_Flatten = _op_Reshape = _op_Squeeze = _op_Unsqueeze = _reshape_like

    def _op_Transpose(self, node, a):
        X = self._need_act(node.input[0])
        perm = a.get("perm", list(range(X.ndim))[::-1])
        self.copy_edges(np.transpose(X, perm), node.output[0])

    def _op_Concat(self, node, a):
        parts = [self.act_or_const_units(i) for i in node.input if i]
        self.copy_edges(np.concatenate(parts, axis=int(a["axis"])), node.output[0])

    def _op_Split(self, node, a):
        X = self._need_act(node.input[0])
        axis = int(a.get("axis", 0)) % X.ndim
        start = 0
        for o in node.output:
            size = self.values[o].shape[axis]  # the runtime's split sizes
            sl = [slice(None)] * X.ndim
            sl[axis] = slice(start, start + size)
            start += size
            if o:
                self.copy_edges(X[tuple(sl)], o)

    def _op_SplitToSequence(self, node, a):
        # A sequence of tensors cut from X along `axis`: the pieces are X's own units (the
        # sequence adds no edge); SequenceAt copies one piece. No split: pieces of one element,
        # the axis kept or dropped by keepdims; a scalar split: chunks of that size, the last
        # one shorter; a 1-D split: those lengths.
        X = self._need_act(node.input[0])
        axis = int(a.get("axis", 0))
        if not -X.ndim <= axis < X.ndim:
            raise _Unsupported
        axis %= X.ndim
        n = X.shape[axis]
        keep = True
        if len(node.input) > 1 and node.input[1]:
            split = np.asarray(self._need_const(node.input[1]))
            if split.ndim == 0:
                chunk = int(split)
                sizes = [min(chunk, n - start) for start in range(0, n, chunk)]
            else:
                sizes = [int(v) for v in split]
        else:
            sizes = [1] * n
            keep = bool(a.get("keepdims", 1))
        pieces, start = [], 0
        for size in sizes:
            piece = np.take(X, np.arange(start, start + size), axis=axis)
            pieces.append(piece if keep else np.squeeze(piece, axis=axis))
            start += size
        self.seqs[node.output[0]] = pieces

    def _op_SequenceAt(self, node, a):
        pieces = self.seqs.get(node.input[0])
        position = self._need_ints(node.input[1])
        if pieces is None or not -len(pieces) <= position[0] < len(pieces):
            raise _Unsupported
        self.copy_edges(pieces[position[0]], node.output[0])

    def _op_Slice(self, node, a):
        X = self._need_act(node.input[0])
        if "starts" in a:  # opset < 10
            starts, ends = list(a["starts"]), list(a["ends"])
            axes = list(a.get("axes", range(len(starts))))
            steps = [1] * len(starts)
        else:
            def opt(i):
                return self._need_ints(node.input[i]) if len(node.input) > i and node.input[i] else None
            starts, ends = opt(1), opt(2)
            axes = opt(3) or list(range(len(starts)))
            steps = opt(4) or [1] * len(starts)
        sl = [slice(None)] * X.ndim
        for s, e, ax, st in zip(starts, ends, axes, steps):
            sl[ax % X.ndim] = slice(s, e, st)  # Python slicing clamps like ONNX
        self.copy_edges(X[tuple(sl)], node.output[0])

    def _op_Pad(self, node, a):
        X = self._need_act(node.input[0])
        if _s(a.get("mode", "constant")) != "constant":
            raise _Unsupported
        if "pads" in a:  # opset < 11
            pads, value, axes = list(a["pads"]), float(a.get("value", 0.0)), None
        else:
            pads = self._need_ints(node.input[1])
            value = float(self._need_const(node.input[2]).ravel()[0]) \
                if len(node.input) > 2 and node.input[2] else 0.0
            axes = self._need_ints(node.input[3]) if len(node.input) > 3 and node.input[3] else None
        if value != 0.0:
            raise _Unsupported
        axes = [ax % X.ndim for ax in (axes if axes is not None else range(X.ndim))]
        nax = len(axes)
        begin, end = [0] * X.ndim, [0] * X.ndim
        for j, ax in enumerate(axes):
            begin[ax], end[ax] = pads[j], pads[j + nax]
        src = np.pad(X, [(max(b, 0), max(e, 0)) for b, e in zip(begin, end)], constant_values=-1)
        crop = tuple(slice(max(-b, 0), src.shape[i] - max(-e, 0)) for i, (b, e) in enumerate(zip(begin, end)))
        self.copy_edges(src[crop], node.output[0])

    def _op_Resize(self, node, a):
        X = self._need_act(node.input[0])
        if _s(a.get("mode", "nearest")) != "nearest":
            raise _Unsupported
        for extra in node.input[1:]:
            if extra and not self.is_const(extra):
                raise _Unsupported
        # which input element does each output element copy?  Evaluate the same Resize on an
        # index-coded float input with onnxruntime.
        shape = X.shape
        inputs = [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, list(shape))]
        inits, names = [], ["X"]
        for j, extra in enumerate(node.input[1:], start=1):
            if not extra:
                names.append("")
                continue
            nm = f"in{j}"
            inits.append(numpy_helper.from_array(self.const[extra], nm))
            names.append(nm)
        rnode = helper.make_node("Resize", names, ["Y"], **_attrs(node))
        graph = helper.make_graph([rnode], "probe", inputs, [helper.make_empty_tensor_value_info("Y")], inits)
        probe = helper.make_model(graph, opset_imports=[o for o in self.model.opset_import if o.domain in ("", "ai.onnx")])
        probe.ir_version = self.model.ir_version
        coded = np.arange(X.size, dtype=np.float32).reshape(shape)
        src_flat = make_session(probe).run(None, {"X": coded})[0]
        src_flat = np.rint(src_flat).astype(np.int64)
        self.copy_edges(X.ravel()[src_flat], node.output[0])


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def build_unit_graph(model: onnx.ModelProto, input_shapes: dict | None = None) -> UnitGraph:
    """The explicit scalar unit graph of the path network of ``model`` (batch 1)."""
    return _Builder(model, input_shapes).build()


def count_paths(graph: UnitGraph) -> int:
    """Number of START->END paths (a DP count; used only as a guard before enumerating)."""
    # units are created in topological order and START/END are the ends: count backwards.
    n_units = len(graph.units)
    to_end = [0] * n_units
    for u in range(n_units - 1, -1, -1):
        total = 0
        for k in graph.out_edges.get(u, ()):
            e = graph.edges[k]
            total += 1 if e.dst == END else to_end[e.dst]
        to_end[u] = total
    return sum(1 if graph.edges[k].dst == END else to_end[graph.edges[k].dst]
               for k in graph.out_edges.get(START, ()))


def _as_graph(model_or_graph, input_shapes):
    if isinstance(model_or_graph, UnitGraph):
        return model_or_graph
    return build_unit_graph(model_or_graph, input_shapes)


def enumerate_paths(model_or_graph, input_shapes: dict | None = None, *,
                    max_paths: int = DEFAULT_MAX_PATHS) -> Iterator[tuple]:
    """Yield every START->END path as a tuple of :class:`Edge` (depth-first).

    Raises :class:`TooManyPaths` before yielding anything if there are more than ``max_paths``.
    """
    graph = _as_graph(model_or_graph, input_shapes)
    n = count_paths(graph)
    if n > max_paths:
        raise TooManyPaths(f"{n} paths > max_paths={max_paths}; use a tinier network")
    edges, out_edges = graph.edges, graph.out_edges
    path: list = []
    # explicit stack of (unit, iterator over its out-edge indices)
    stack = [iter(out_edges.get(START, ()))]
    while stack:
        k = next(stack[-1], None)
        if k is None:
            stack.pop()
            if path:
                path.pop()
            continue
        e = edges[k]
        if e.dst == END:
            yield tuple(path) + (e,)
            continue
        path.append(e)
        stack.append(iter(out_edges.get(e.dst, ())))


def bruteforce_diag_g(model: onnx.ModelProto, input_shapes: dict | None = None, *,
                      wrt: str = "edge", max_paths: int = DEFAULT_MAX_PATHS) -> dict:
    """diag(G) by explicit path enumeration.

    Returns ``{stored parameter name: float64 array in the stored shape}`` for every
    initializer / Constant-node output whose elements label at least one edge of the path
    network (elements on no complete path are 0).  ``wrt="edge"`` (default): g is the sum over
    paths of the product of the *other* edges' squared values; ``wrt="param"``: the squared
    derivative of each path product with respect to the stored element (see module doc).
    """
    if wrt not in ("edge", "param"):
        raise ValueError("wrt must be 'edge' or 'param'")
    graph = _as_graph(model, input_shapes)
    g = {name: np.zeros(shape, np.float64) for name, shape in graph.params.items()}
    flat = {name: arr.reshape(-1) for name, arr in g.items()}
    for path in enumerate_paths(graph, max_paths=max_paths):
        L = len(path)
        prefix = [1.0] * (L + 1)
        for j, e in enumerate(path):
            prefix[j + 1] = prefix[j] * e.w
        suffix = [1.0] * (L + 1)
        for j in range(L - 1, -1, -1):
            suffix[j] = suffix[j + 1] * path[j].w
        deriv: dict = {}  # label -> ∂(path product)/∂θ
        for j, e in enumerate(path):
            others = prefix[j] * suffix[j + 1]
            deps = []
            if e.label is not None:
                deps.append((e.label, 1.0 if wrt == "edge" else e.d))
            if wrt == "param":
                deps.extend(e.extra)
            for lab, d in deps:
                deriv[lab] = deriv.get(lab, 0.0) + d * others
        for (name, idx), dv in deriv.items():
            flat[name][idx] += dv * dv
    return g


def bruteforce_path_sum(model: onnx.ModelProto, input_shapes: dict | None = None, *,
                        max_paths: int = DEFAULT_MAX_PATHS) -> float:
    """Σ over all START->END paths of Π w² (explicit enumeration)."""
    total = 0.0
    for path in enumerate_paths(_as_graph(model, input_shapes), max_paths=max_paths):
        prod = 1.0
        for e in path:
            prod *= e.w * e.w
        total += prod
    return total


def unit_graph_forward(model_or_graph, feeds: dict, input_shapes: dict | None = None,
                       square: bool = False) -> dict:
    """Evaluate the unit graph as a linear network (sanity check of the index relations).

    Graph-input units take ``feeds``; bias edges contribute their value (times START = 1);
    barrier-output units are 1.  With ``square=True`` every edge value is squared (the path
    network).  Returns ``{activation tensor: array}`` for every activation tensor.  For a model
    made only of linear ops this reproduces the model's own outputs.
    """
    if input_shapes is None and not isinstance(model_or_graph, UnitGraph):
        input_shapes = {k: np.shape(v) for k, v in feeds.items()}
    graph = _as_graph(model_or_graph, input_shapes)
    val = np.zeros(len(graph.units), np.float64)
    for name, ids in graph.tensor_units.items():
        if name in feeds:
            val[ids.ravel()] = np.asarray(feeds[name], np.float64).ravel()
    incoming: dict = {}
    for e in graph.edges:
        if e.dst != END and not (e.src == START and e.kind == "input"):
            incoming.setdefault(e.dst, []).append(e)
    for u in range(len(graph.units)):  # units are in topological order
        if u not in incoming:
            continue
        s = 0.0
        for e in incoming[u]:
            w = e.w * e.w if square else e.w
            s += w * (1.0 if e.src == START else val[e.src])
        val[u] = s
    return {name: val[ids] for name, ids in graph.tensor_units.items()}
