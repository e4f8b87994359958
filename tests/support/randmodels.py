"""Seeded random ONNX models, and an independent check of what `onnx_pathcond.rescale` does with them.

    generate(seed) -> (onnx.ModelProto, description)      # always the same model for a seed
    check_seed(seed, workdir) -> Outcome                   # written / refused / crash, with failures

Every generated model passes `onnx.checker.check_model(full_check=True)` and runs in onnxruntime
(CPU) on random inputs with finite outputs: a candidate that does not is a generator problem and
the next sub-seed is tried (`generate` never hands out an invalid model).

The families are MLPs (Gemm, MatMul with the weight on either side, Einsum dense layers), 1-D and
2-D CNNs and mixtures (a conv trunk, then a flatten or a global pool, then a dense head; residual
blocks, ShuffleNet units with channel shuffles, onnxruntime's FusedConv, 1x1 convolutions written
as Einsum), built from every op that README.md lists as supported (`onnx_pathcond.ops.
supported_op_types()`, bar Upsample, which opsets 13-21 no longer have), with barriers (Sigmoid,
Tanh, ReLU6, Softmax, Gelu, refused Einsum equations, a sequence read as a whole, ...) in random
places; fixed batches 1-4 or a dynamic one ("N"); float32, float16 or float64; opsets 13-21;
weights normal, pruned, with zero rows, tiny (1e-4) or huge (1e3), shared by two nodes, stored as
initializers or Constant nodes, reached through Identity, Transpose or Cast. `seed_options(seed)`
says what the seed's model is rescaled with: bn_statistics or criterion="enorm" for one seed in
six each, the defaults otherwise.

Command line (from the repository root):

    python tests/support/randmodels.py SEED out.onnx          # write the model of SEED (and print its description)
    python tests/support/randmodels.py --describe SEED        # print the description only
    python tests/support/randmodels.py --count 2000 --start 0 # rescale that many models, print a summary table
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

if __name__ == "__main__":  # run as a script: `support` from tests/, the package from the checkout
    sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))]

DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64}
IR_FOR_OPSET = {13: 7, 14: 7, 15: 8, 16: 8, 17: 8, 18: 8, 19: 9, 20: 9, 21: 10}
MAX_CHANNELS = 8
MAX_SPATIAL = 10
MAX_FEATURES = 32
SUBSEEDS = 200
# Einsum forms the tool rescales (README's Einsum row): (activation's term, weight's term, output's
# term or None for the implicit output, which is the indices seen once in alphabetical order)
DENSE_EINSUMS = [("bi", "oi", "bo"), ("bi", "oi", None), ("...i", "oi", "...o"), ("nk", "mk", "nm"),
                 ("bi", "io", "bo"), ("ij", "jk", "ik"), ("ij", "jk", None), ("...i", "io", "...o")]
CONV_EINSUMS = {3: [("ncl", "oc", "nol"), ("abd", "cb", None), ("ncl", "co", "nol"), ("nc...", "oc", "no...")],
                4: [("nchw", "oc", "nohw"), ("abde", "cb", None), ("nchw", "co", "nohw"), ("nc...", "oc", "no...")]}
LAST_AXIS_EINSUMS = {3: [("bsd", "df", "bsf"), ("...i", "oi", "...o"), ("nlc", "cd", "nld")],
                     4: [("nhwc", "cd", "nhwd"), ("...i", "oi", "...o"), ("...i", "io", "...o")]}


class GenError(Exception):
    """A candidate model that is not valid: the generator tries the next sub-seed."""


def _tensor_type(dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


MS_DOMAIN = "com.microsoft"


def op_name(node: onnx.NodeProto) -> str:
    """The op type, qualified by its domain outside ONNX's (as `supported_op_types` names it)."""
    return f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type


def _is_fused_conv(node: onnx.NodeProto) -> bool:
    return node.op_type == "FusedConv" and node.domain == MS_DOMAIN


def for_inference(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with each com.microsoft.FusedConv written as the Conv it starts with: onnx's shape
    inference does not know onnxruntime's contrib ops, and the output has the Conv's shape."""
    if not any(_is_fused_conv(n) for n in model.graph.node):
        return model
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for n in m.graph.node:
        if _is_fused_conv(n):
            n.op_type, n.domain = "Conv", ""
            del n.input[3:]
            kept = [a for a in n.attribute if a.name not in ("activation", "activation_params")]
            del n.attribute[:]
            n.attribute.extend(kept)
    return m


# ============================================================================ the builder
class Builder:
    """Adds nodes to one graph; every method returns the name of the tensor it made. Shapes are
    read back with onnx shape inference (strict), the batch axis as None."""

    def __init__(self, rng: np.random.Generator, dtype, opset: int, batch: Optional[int], family: str,
                 bn_rate: float = 1.0):
        self.rng = rng
        self.dtype = np.dtype(dtype)
        self.opset = opset
        self.batch = batch
        self.family = family
        self.nodes: List[onnx.NodeProto] = []
        self.inits: List[onnx.TensorProto] = []
        self.input_vi: Optional[onnx.ValueInfoProto] = None
        self.n = 0
        self.ops: List[str] = []  # the description, one entry per layer or op
        self.notes: List[str] = []  # how the weights of the next described op are made
        self.pool: Dict[tuple, str] = {}  # weights that a later node may share
        self.extra_outputs: List[str] = []
        self._shapes: Dict[str, Tuple] = {}
        # shapes onnx's inference leaves open (SequenceAt of unequal pieces), declared as
        # value_info for the builder's own inference; some models carry them, as exporters do
        self.declared: Dict[str, Tuple] = {}
        self.bn_rate = bn_rate  # how much more often than usual BatchNormalization is placed

    # ------------------------------------------------------------------ basics
    def r(self) -> float:
        return float(self.rng.random())

    def pick(self, options, p=None):
        k = self.rng.choice(len(options), p=None if p is None else np.asarray(p, float) / np.sum(p))
        return options[int(k)]

    def say(self, line: str) -> None:
        self.ops.append(line + (f"  [{'; '.join(self.notes)}]" if self.notes else ""))
        self.notes = []

    def fresh(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def node(self, op, inputs, n_out=1, domain="", **attrs):
        outs = [self.fresh(op.lower() + "_") for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=self.fresh(op + "_node"), domain=domain or None,
                                           **attrs))
        return outs if n_out > 1 else outs[0]

    def const(self, array, prefix="c") -> str:
        name = self.fresh(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def ints(self, values) -> str:
        return self.const(np.asarray(values, dtype=np.int64), "i")

    def fconst(self, values) -> str:
        """A constant of the model's dtype that is not a weight (Clip bounds, a Pad value)."""
        return self.const(np.asarray(values, dtype=self.dtype), "k")

    def start(self, shape) -> str:
        dims = ["N" if self.batch is None else self.batch] + list(shape)
        self.input_vi = helper.make_tensor_value_info("x", _tensor_type(self.dtype), dims)
        self._shapes["x"] = tuple([None] + list(shape))
        return "x"

    def model(self, graph_outputs: Sequence[str] = (), declare=False) -> onnx.ModelProto:
        outs = [helper.make_tensor_value_info(o, _tensor_type(self.dtype), None) for o in graph_outputs]
        graph = helper.make_graph(self.nodes, "random", [self.input_vi], outs, initializer=self.inits)
        if declare:
            graph.value_info.extend(helper.make_tensor_value_info(name, _tensor_type(self.dtype),
                                                                  ["N" if d is None else d for d in shape])
                                    for name, shape in self.declared.items())
        opsets = [helper.make_opsetid("", self.opset)]
        if any(n.domain == MS_DOMAIN for n in self.nodes):
            opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
        m = helper.make_model(graph, opset_imports=opsets, producer_name="randmodels")
        m.ir_version = IR_FOR_OPSET[self.opset]
        return m

    def inferable(self, graph_outputs: Sequence[str] = ()) -> onnx.ModelProto:
        """The model so far as onnx's shape inference can read it (see `for_inference`)."""
        return for_inference(self.model(graph_outputs, declare=True))

    def shape(self, name: str) -> Tuple:
        if name in self._shapes:
            return self._shapes[name]
        m = self.inferable()
        try:
            inferred = onnx.shape_inference.infer_shapes(m, check_type=True, strict_mode=True)
        except Exception as e:  # an invalid candidate
            raise GenError(f"shape inference: {str(e).splitlines()[0][:200]}") from None
        for vi in inferred.graph.value_info:
            dims = vi.type.tensor_type.shape.dim
            shape = [d.dim_value if d.HasField("dim_value") else None for d in dims]
            self._shapes[vi.name] = tuple(shape)
        if name not in self._shapes:
            raise GenError(f"no shape inferred for {name}")
        return self._shapes[name]

    def dims(self, name: str) -> List[int]:
        """The shape of an activation: batch first (None), every other dimension known and positive."""
        shape = list(self.shape(name))
        if len(shape) < 1:
            raise GenError(f"{name} is a scalar")
        rest = shape[1:]
        if any(d is None or d < 1 for d in rest):
            raise GenError(f"{name} has shape {shape}")
        return [None] + rest

    # ------------------------------------------------------------------ weights
    def values(self, shape, fan_in: int, role: str = "w", out_axis: int = 0) -> np.ndarray:
        """Random weight values in one of the styles: normal, pruned, zero rows, tiny, huge."""
        rng = self.rng
        v = rng.standard_normal(shape) / np.sqrt(max(fan_in, 1))
        if role == "b":
            v = rng.standard_normal(shape) * 0.3
        style = self.pick(["normal", "pruned", "zero-rows", "tiny", "huge"], [0.55, 0.15, 0.12, 0.09, 0.09])
        if style == "pruned":
            v[rng.random(shape) < rng.uniform(0.2, 0.8)] = 0
        elif style == "zero-rows" and len(shape) >= 1 and shape[out_axis] > 1:
            rows = rng.random(shape[out_axis]) < 0.4
            index = [slice(None)] * len(shape)
            index[out_axis] = rows
            v[tuple(index)] = 0
            if len(shape) >= 2 and self.r() < 0.3:  # and a whole input column
                other = 1 - out_axis if out_axis in (0, 1) else 0
                index = [slice(None)] * len(shape)
                index[other] = int(rng.integers(shape[other]))
                v[tuple(index)] = 0
        elif style == "tiny":
            v = v * 1e-4
        elif style == "huge":
            v = v * 1e3
        if style != "normal":
            self.notes.append(f"{role} {style}")
        return v

    def weight(self, value: np.ndarray, role: str = "w", shareable=True) -> str:
        """A weight of the model's dtype, stored in one of the ways a weight can reach its node."""
        value = np.asarray(value)
        key = (role, value.shape)
        if shareable and key in self.pool and self.r() < 0.25:
            self.notes.append(f"{role} shared: {self.pool[key]}")
            return self.pool[key]
        storage = self.pick(["init", "constant", "identity", "transpose", "cast", "constant+identity"],
                            [0.6, 0.1, 0.08, 0.08, 0.08, 0.06])
        if storage == "transpose" and value.ndim < 2:
            storage = "init"
        stored_dtype = self.dtype
        if storage == "cast":
            stored_dtype = {np.dtype(np.float32): np.float64, np.dtype(np.float16): np.float32,
                            np.dtype(np.float64): np.float32}[self.dtype]
        stored = np.asarray(value, dtype=stored_dtype)
        perm = None
        if storage == "transpose":
            while perm is None or list(perm) == list(range(value.ndim)):
                perm = [int(p) for p in self.rng.permutation(value.ndim)]
            stored = np.ascontiguousarray(np.transpose(stored, np.argsort(perm)))
        name = self.fresh(role)
        if storage.startswith("constant"):
            self.nodes.append(helper.make_node("Constant", [], [name], name=self.fresh("Constant_node"),
                                               value=numpy_helper.from_array(stored, name)))
        else:
            self.inits.append(numpy_helper.from_array(stored, name))
        if storage in ("identity", "constant+identity"):
            name = self.node("Identity", [name])
        elif storage == "transpose":
            name = self.node("Transpose", [name], perm=perm)
        elif storage == "cast":
            name = self.node("Cast", [name], to=_tensor_type(self.dtype))
        if storage != "init":
            self.notes.append(f"{role} via {storage}")
        if shareable:
            self.pool[key] = name
        return name

    # ------------------------------------------------------------------ activations and barriers
    def barrier(self, x: str) -> str:
        options = ["Sigmoid", "Tanh", "Clip", "Softmax", "Gelu", "Softplus", "Elu", "HardSigmoid",
                   "Clip min", "Max const", "Einsum"]
        op = self.pick(options, [1, 1, 1, 1, 1, 1, 1, 1, 0.5, 0.5, 1.5])
        if op == "Einsum":
            return self.einsum_barrier(x)
        self.say(f"barrier {op}")
        if op == "Clip":  # ReLU6
            return self.node("Clip", [x, self.fconst(0.0), self.fconst(6.0)])
        if op == "Clip min":  # a minimum other than 0: not positively homogeneous
            return self.node("Clip", [x, self.fconst(float(self.pick([-0.5, 0.25])))])
        if op == "Max const":
            return self.node("Max", [x, self.fconst(float(self.pick([-1.0, 0.1])))])
        if op == "Softmax":
            return self.node("Softmax", [x], axis=1)
        if op == "Gelu":
            if self.opset >= 20 and self.r() < 0.5:
                return self.node("Gelu", [x])
            if self.dtype == np.float64:  # no float64 Erf in onnxruntime: the tanh form
                inner = self.node("Mul", [x, self.fconst(0.7978845608)])
                t = self.node("Tanh", [inner])
            else:
                t = self.node("Erf", [self.node("Div", [x, self.fconst(1.4142135)])])
            return self.node("Mul", [self.node("Mul", [x, self.fconst(0.5)]), self.node("Add", [t, self.fconst(1.0)])])
        return self.node(op, [x])

    def einsum_barrier(self, x: str) -> str:
        """An Einsum over the last axis in a form the tool refuses (README: any equation other
        than an activation and a 2-D weight mapping one axis); the shape is kept."""
        f = self.dims(x)[-1]
        form = self.pick(["a weight of rank 1", "two activations", "three operands", "a broadcast product"])
        if form == "a weight of rank 1":
            eq, inputs = "...i,i->...i", [x, self.weight(self.rng.uniform(0.5, 2.0, [f]), "ew", shareable=False)]
        elif form == "two activations":  # x·relu(x)
            eq, inputs = "...i,...i->...i", [x, self.node("Relu", [x])]
        elif form == "three operands":
            eq = "...i,oi,o->...o"
            inputs = [x, self.weight(self.values([f, f], f), shareable=False),
                      self.weight(self.rng.uniform(0.5, 2.0, [f]), "ew", shareable=False)]
        else:  # the weight's row index is also the output's: x_i·Σ_j W_ij
            eq = "...i,ij->...i"
            inputs = [x, self.weight(self.values([f, int(self.rng.integers(1, 4))], f), shareable=False)]
        self.say(f"barrier Einsum '{eq}' ({form})")
        return self.node("Einsum", inputs, equation=eq)

    def per_channel_shape(self, x: str) -> List[int]:
        rank = len(self.shape(x))
        c = self.dims(x)[1]
        return [c] + [1] * (rank - 2)

    def act(self, x: str, allow_barrier=True) -> str:
        homogeneous = 0.1 if self.dtype != np.float64 else 0  # onnxruntime: no float64 LeakyRelu, PRelu
        kind = self.pick(["relu", "clip0", "max0", "leaky", "prelu", "barrier", "none"],
                         [0.52, 0.05, 0.05, homogeneous, homogeneous, 0.1 if allow_barrier else 0, 0.08])
        if kind == "relu":
            return self.node("Relu", [x])
        if kind == "clip0":  # clamp(min=0) as the legacy exporter writes it
            form = self.pick(["min", "min and an empty max", "min from a Constant node"])
            if form == "min from a Constant node":
                zero = self.fresh("k")
                self.nodes.append(helper.make_node("Constant", [], [zero], name=self.fresh("Constant_node"),
                                                   value=numpy_helper.from_array(np.zeros((), self.dtype), zero)))
            else:
                zero = self.fconst(0.0)
            self.say(f"Clip min 0, no max ({form})")
            return self.node("Clip", [x, zero] + ([""] if form == "min and an empty max" else []))
        if kind == "max0":  # clamp(min=0) as the dynamo exporter writes it
            zero = self.fconst(0.0)
            self.say("Max with a constant 0")
            return self.node("Max", [x, zero] if self.r() < 0.7 else [zero, x])
        if kind == "leaky":
            self.say("LeakyRelu")
            return self.node("LeakyRelu", [x], alpha=float(self.pick([0.01, 0.1, 0.3])))
        if kind == "prelu":
            shape = self.pick([self.per_channel_shape(x), [1]])
            slope = self.rng.uniform(-0.5, 0.5, shape)
            self.say(f"PRelu slope {shape}")
            return self.node("PRelu", [x, self.weight(slope, "slope", shareable=False)])
        if kind == "barrier":
            return self.barrier(x)
        return x

    # ------------------------------------------------------------------ dense layers ([N, F])
    def linear(self, x: str, fout: int) -> str:
        fin = self.dims(x)[1]
        kind = self.pick(["gemm", "matmul", "matmul-left", "einsum"], [0.42, 0.25, 0.17, 0.16])
        if kind == "einsum":
            y, eq = self.einsum_layer(x, fout, 1, DENSE_EINSUMS)
            bias = self.r() < 0.7
            if bias:
                y = self.node("Add", [y, self.weight(self.values([fout], fin, "b"), "b")])
            self.say(f"Einsum '{eq}' {fin}->{fout} bias={bias}")
            return y
        if kind == "gemm":
            trans_a = self.r() < 0.2
            trans_b = self.r() < 0.5
            alpha = float(self.pick([1.0, 1.0, 0.5, 2.0]))
            beta = float(self.pick([1.0, 1.0, 0.25, -1.0]))
            w = self.weight(self.values([fout, fin] if trans_b else [fin, fout], fin, out_axis=0 if trans_b else 1))
            a = self.node("Transpose", [x], perm=[1, 0]) if trans_a else x
            inputs = [a, w]
            if self.r() < 0.75:
                bshape = self.pick([[fout], [1, fout]])
                inputs.append(self.weight(self.values(bshape, fin, "b", out_axis=len(bshape) - 1), "b"))
            attrs = {}
            if trans_a or self.r() < 0.3:
                attrs["transA"] = int(trans_a)
            if trans_b or self.r() < 0.3:
                attrs["transB"] = int(trans_b)
            if alpha != 1.0:
                attrs["alpha"] = alpha
            if beta != 1.0 and len(inputs) == 3:
                attrs["beta"] = beta
            self.say(f"Gemm {fin}->{fout} {attrs} C={len(inputs) == 3}")
            return self.node("Gemm", inputs, **attrs)
        if kind == "matmul":
            w = self.weight(self.values([fin, fout], fin, out_axis=1))
            y = self.node("MatMul", [x, w])
            bias = self.r() < 0.8
            if bias:
                b = self.weight(self.values([fout], fin, "b"), "b")
                y = self.node("Add", [y, b] if self.r() < 0.7 else [b, y])
            self.say(f"MatMul {fin}->{fout} bias={bias}")
            return y
        # the weight on the left: W [fout, fin] @ x^T [fin, N]
        w = self.weight(self.values([fout, fin], fin, out_axis=0))
        y = self.node("MatMul", [w, self.node("Transpose", [x], perm=[1, 0])])
        if self.r() < 0.8:
            y = self.node("Add", [y, self.weight(self.values([fout, 1], fin, "b"), "b")])
        if self.r() < 0.5:
            y = self.node("Relu", [y])
        self.say(f"MatMul(W, x^T) {fin}->{fout}")
        return self.node("Transpose", [y], perm=[1, 0])

    def einsum_layer(self, x: str, cout: int, axis: int, forms) -> Tuple[str, str]:
        """Einsum of `x` and a constant 2-D weight that maps axis `axis` of x (cin elements) to
        `cout`: one of `forms` (activation term, weight term, output term or None for the
        implicit output), the weight stored [out, in] or [in, out] as its term says, either
        operand first, sometimes written with spaces. Returns (output, equation)."""
        cin = self.dims(x)[axis]
        act_term, w_term, out_term = self.pick(forms)
        out_first = w_term[0] not in act_term  # the weight's first index is the new one
        w = self.weight(self.values([cout, cin] if out_first else [cin, cout], cin, out_axis=0 if out_first else 1))
        weight_first = self.r() < 0.3
        terms = [w_term, act_term] if weight_first else [act_term, w_term]
        spaced = self.r() < 0.15
        eq = (", " if spaced else ",").join(terms)
        if out_term is not None:
            eq += (" -> " if spaced else "->") + out_term
        return self.node("Einsum", [w, x] if weight_first else [x, w], equation=eq), eq

    def einsum_conv(self, x: str, cout: int) -> str:
        """A 1x1 convolution written as an Einsum over the channel axis, its bias an Add."""
        d = self.dims(x)
        y, eq = self.einsum_layer(x, cout, 1, CONV_EINSUMS[len(d)])
        bias = self.r() < 0.6
        if bias:
            y = self.node("Add", [y, self.weight(self.values([cout] + [1] * (len(d) - 2), d[1], "b"), "b")])
        self.say(f"Einsum '{eq}' (1x1 conv) {d[1]}->{cout} bias={bias}")
        return y

    # ------------------------------------------------------------------ conv layers ([N, C, *S])
    def conv(self, x: str, cout: int, shape_keeping=False, fused: Optional[str] = None, z: Optional[str] = None) -> str:
        """A Conv; with `fused` (an activation), onnxruntime's com.microsoft.FusedConv of the
        Conv and that activation, `z` its optional tensor added before the activation."""
        d = self.dims(x)
        cin, spatial = d[1], d[2:]
        nd = len(spatial)
        for _ in range(20):
            group = 1
            r = self.r()
            if r < 0.15:  # depthwise
                group, cout_ = cin, cin * int(self.pick([1, 2])) if cin * 2 <= MAX_CHANNELS else cin
            elif r < 0.3 and cin % 2 == 0 and cout % 2 == 0:
                group, cout_ = 2, cout
            else:
                cout_ = cout
            k = [int(self.pick([1, 2, 3], [0.3, 0.2, 0.5])) for _ in range(nd)]
            strides = [1] * nd if shape_keeping else [int(self.pick([1, 2], [0.7, 0.3])) for _ in range(nd)]
            dil = [1] * nd if shape_keeping else [int(self.pick([1, 2], [0.8, 0.2])) for _ in range(nd)]
            attrs = dict(kernel_shape=k)
            if shape_keeping:
                k = [int(self.pick([1, 3])) for _ in range(nd)]
                attrs = dict(kernel_shape=k)
                if self.r() < 0.5:
                    attrs["pads"] = [kk // 2 for kk in k] * 2
                else:
                    attrs["auto_pad"] = self.pick(["SAME_UPPER", "SAME_LOWER"])
            else:
                mode = self.pick(["pads", "none", "SAME_UPPER", "SAME_LOWER", "VALID"], [0.45, 0.15, 0.15, 0.1, 0.15])
                if mode == "pads":
                    attrs["pads"] = [int(self.rng.integers(0, kk)) if kk > 1 else 0 for kk in k + k]
                elif mode != "none":
                    attrs["auto_pad"] = mode
                if any(s != 1 for s in strides) or self.r() < 0.3:
                    attrs["strides"] = strides
                if "auto_pad" in attrs and attrs["auto_pad"] != "VALID":
                    dil = [1] * nd  # onnxruntime: no dilation with SAME_*
                if any(v != 1 for v in dil) or self.r() < 0.2:
                    attrs["dilations"] = dil
            eff = [(kk - 1) * dd + 1 for kk, dd in zip(k, dil)]
            pads = attrs.get("pads", [0] * (2 * nd))
            if all(e <= s + pads[i] + pads[i + nd] for i, (e, s) in enumerate(zip(eff, spatial))):
                break
        else:
            raise GenError("no conv fits")
        if group != 1 or self.r() < 0.2:
            attrs["group"] = group
        w = self.weight(self.values([cout_, cin // group] + k, cin // group * int(np.prod(k)), out_axis=0))
        inputs = [x, w]
        if self.r() < 0.7 or z is not None:
            inputs.append(self.weight(self.values([cout_], cin, "b"), "b"))
        if fused is None:
            self.say(f"Conv{nd}d {cin}->{cout_} {attrs} bias={len(inputs) == 3}")
            y = self.node("Conv", inputs, **attrs)
        else:
            attrs["activation"] = fused
            if fused == "LeakyRelu":  # onnxruntime needs its alpha
                attrs["activation_params"] = [float(self.pick([0.01, 0.1, 0.3]))]
            elif fused == "Clip":  # ReLU6
                attrs["activation_params"] = [0.0, 6.0]
            if z is not None:
                inputs.append(z)
            barrier = "barrier " if fused not in ("Relu", "LeakyRelu") or z is not None else ""
            self.say(f"{barrier}FusedConv{nd}d {cin}->{cout_} {attrs} bias={len(inputs) >= 3}"
                     + (" with Z (a residual added before the activation)" if z is not None else ""))
            y = self.node("FusedConv", inputs, domain=MS_DOMAIN, **attrs)
        out = self.dims(y)
        if any(s > 2 * MAX_SPATIAL for s in out[2:]):
            raise GenError("conv output too large")
        return y

    def conv_block(self, x: str, cout: int, shape_keeping=False, bn=0.35, allow_barrier=True) -> str:
        """A convolution, maybe a BatchNormalization, an activation; or onnxruntime's FusedConv of
        the convolution and a ReLU-like activation (a barrier one now and then)."""
        if self.dtype != np.float64 and self.r() < 0.18:  # onnxruntime: no float64 FusedConv
            activation = self.pick(["Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip"],
                                   [0.55, 0.3] + [0.05 if allow_barrier else 0] * 3)
            return self.conv(x, cout, shape_keeping, fused=activation)
        y = self.conv(x, cout, shape_keeping)
        if self.r() < bn * self.bn_rate:
            y = self.batchnorm(y)
        return self.act(y, allow_barrier=allow_barrier)

    def conv_transpose(self, x: str, cout: int) -> str:
        d = self.dims(x)
        cin, spatial = d[1], d[2:]
        nd = len(spatial)
        group = 2 if cin % 2 == 0 and cout % 2 == 0 and self.r() < 0.3 else 1
        k = [int(self.pick([1, 2, 3])) for _ in range(nd)]
        stride = [int(self.pick([1, 2])) if s <= 5 else 1 for s in spatial]
        attrs = dict(kernel_shape=k)
        if any(s != 1 for s in stride) or self.r() < 0.3:
            attrs["strides"] = stride
        mode = self.pick(["pads", "none", "SAME_UPPER"], [0.6, 0.3, 0.1])
        if mode == "pads":
            attrs["pads"] = [int(self.rng.integers(0, kk)) for kk in k + k]
            if self.r() < 0.3:
                attrs["output_padding"] = [int(self.rng.integers(0, s)) for s in stride]
        elif mode == "SAME_UPPER":
            attrs["auto_pad"] = "SAME_UPPER"
        if group != 1 or self.r() < 0.2:
            attrs["group"] = group
        w = self.weight(self.values([cin, cout // group] + k, cin, out_axis=1))
        inputs = [x, w]
        if self.r() < 0.7:
            inputs.append(self.weight(self.values([cout], cin, "b"), "b"))
        self.say(f"ConvTranspose{nd}d {cin}->{cout} {attrs}")
        return self.node("ConvTranspose", inputs, **attrs)

    def batchnorm(self, x: str) -> str:
        c = self.dims(x)[1]
        gamma = self.values([c], 1, "gamma")
        beta = self.rng.standard_normal(c) * 0.3
        mean = self.rng.standard_normal(c) * 0.3
        var = np.abs(self.rng.standard_normal(c)) + 0.2
        eps = float(self.pick([1e-5, 1e-3]))
        self.say("BatchNormalization")
        return self.node("BatchNormalization", [x, self.weight(gamma, "gamma"), self.weight(beta, "beta"),
                                                self.weight(mean, "mean"), self.weight(var, "var")], epsilon=eps)

    # ------------------------------------------------------------------ ops that keep the channels
    def passthrough(self, x: str) -> str:
        """One op (or a short round trip) that moves channels without mixing them."""
        d = self.dims(x)
        rank = len(d)
        c = d[1]
        spatial = d[2:]
        options = ["identity", "dropout", "mul", "div", "add", "sub", "reshape", "transpose", "unsqueeze",
                   "slice", "pad", "tile", "gather", "expand", "split", "concat-self", "shuffle"]
        weights = [1, 1, 2, 1, 2, 1, 2, 2, 1, 2, 2, 1, 2, 1, 3, 1, 2]
        if rank >= 3:
            options += ["maxpool", "avgpool", "reduce", "resize", "nhwc"]
            weights += [3, 3, 2, 2, 2]
            if rank == 4:
                options += ["d2s", "s2d"]
                weights += [1, 1]
        op = self.pick(options, weights)
        if op == "identity":
            if self.r() < 0.2:
                self.say("Clip without bounds")
                return self.node("Clip", [x])
            return self.node("Identity", [x])
        if op == "shuffle":
            return self.channel_shuffle(x)
        if op == "dropout":
            self.say("Dropout")
            if self.r() < 0.5:
                return self.node("Dropout", [x, self.fconst(0.3)])
            return self.node("Dropout", [x])
        if op in ("mul", "div", "add", "sub"):
            scalar = self.r() < 0.3
            shape = [] if scalar else self.pick([self.per_channel_shape(x), [1] + self.per_channel_shape(x)])
            if op in ("mul", "div"):
                v = self.rng.uniform(0.3, 2.0, shape) * np.where(self.rng.random(shape) < 0.2, -1, 1)
            else:
                v = self.rng.standard_normal(shape) * 0.3
            name = self.weight(np.asarray(v), op + "c", shareable=False)
            self.say(f"{op.capitalize()} const {list(np.shape(v))}")
            ins = [x, name] if (op in ("div", "sub") or self.r() < 0.6) else [name, x]
            return self.node(op.capitalize(), ins)
        if op == "reshape":
            return self.reshape_roundtrip(x, d)
        if op == "transpose":
            perm = [int(p) for p in self.rng.permutation(rank)]
            y = self.node("Transpose", [x], perm=perm)
            if self.r() < 0.5:
                y = self.node("Relu", [y])
            self.say(f"Transpose {perm} and back")
            return self.node("Transpose", [y], perm=[int(p) for p in np.argsort(perm)])
        if op == "unsqueeze":
            axis = int(self.rng.integers(1, rank + 1))
            if self.r() < 0.3:
                axis -= rank + 1
            y = self.node("Unsqueeze", [x, self.ints([axis])])
            self.say(f"Unsqueeze {axis} / Squeeze")
            return self.node("Squeeze", [y, self.ints([axis])])
        if op == "slice":
            axis = int(self.rng.integers(1, rank))
            size = d[axis]
            if size < 2:
                return x
            start = int(self.rng.integers(0, size // 2 + 1))
            end = int(self.rng.integers(start + 1, size + 1))
            inputs = [x, self.ints([start]), self.ints([end]), self.ints([axis if self.r() < 0.7 else axis - rank])]
            step = 1
            if self.r() < 0.3:
                step = 2
                inputs.append(self.ints([2]))
            elif self.r() < 0.2:  # backwards
                inputs = [x, self.ints([end - 1]), self.ints([-size - 1 if start == 0 else start - 1]),
                          inputs[3], self.ints([-1])]
            self.say(f"Slice axis {axis} [{start}:{end}] step {step}")
            return self.node("Slice", inputs)
        if op == "pad":
            axis = int(self.rng.integers(1, rank))
            if (axis == 1 and c >= MAX_CHANNELS) or (axis > 1 and d[axis] >= MAX_SPATIAL):
                return x
            pads = [0] * (2 * rank)
            pads[axis] = int(self.rng.integers(0, 3))
            pads[rank + axis] = int(self.rng.integers(0, 3))
            if d[axis] > 2 and self.r() < 0.2:  # crop
                pads[rank + axis] = -1
            inputs = [x, self.ints(pads)]
            if self.r() < 0.5:
                inputs.append(self.fconst(0.0))
            self.say(f"Pad {pads}")
            if self.opset >= 18 and self.r() < 0.3:
                if len(inputs) == 2:
                    inputs.append("")
                inputs[1] = self.ints([pads[axis], pads[rank + axis]])
                inputs.append(self.ints([axis]))
            return self.node("Pad", inputs, mode="constant")
        if op == "tile":
            axis = int(self.rng.integers(1, rank))
            if d[axis] * 2 > (MAX_CHANNELS if axis == 1 else MAX_FEATURES if rank == 2 else MAX_SPATIAL):
                return x
            reps = [1] * rank
            reps[axis] = 2
            self.say(f"Tile {reps}")
            return self.node("Tile", [x, self.ints(reps)])
        if op == "gather":
            axis = int(self.rng.integers(1, rank))
            size = d[axis]
            kind = self.pick(["perm", "subset", "repeat", "scalar"], [1, 1, 1, 0.5 if rank >= 3 else 0])
            if kind == "perm":
                idx = self.rng.permutation(size)
            elif kind == "subset":
                idx = np.sort(self.rng.choice(size, int(self.rng.integers(1, size + 1)), replace=False))
            elif kind == "repeat":
                idx = self.rng.integers(0, size, int(self.rng.integers(1, size + 2)))
            else:
                if axis == 1:
                    return x
                idx = np.asarray(int(self.rng.integers(size)))
            idx = np.asarray(idx, dtype=np.int64)
            if self.r() < 0.3:
                idx = np.where(idx >= 0, idx - size, idx)
            self.say(f"Gather axis {axis} {kind}")
            return self.node("Gather", [x, self.const(idx, "idx")], axis=axis if self.r() < 0.8 else axis - rank)
        if op == "expand":
            if rank + 1 > 5 or c * 2 > MAX_FEATURES:
                return x
            y = self.node("Unsqueeze", [x, self.ints([1])])
            target = [1, 2] + [1] * (rank - 1) if self.r() < 0.5 else [1, 2] + list(d[1:])
            y = self.node("Expand", [y, self.ints(target)])
            self.say(f"Unsqueeze/Expand {target}/Reshape")
            return self.node("Reshape", [y, self.ints([0, 2 * c] + list(d[2:]))])
        if op == "split":
            axis = int(self.rng.integers(1, rank))
            size = d[axis]
            if size < 2:
                return x
            how = self.pick(["Split", "sequence", "sequence-chunks", "sequence-ones", "sequence-concat"],
                            [0.5, 0.22, 0.12, 0.06 if size <= 4 else 0, 0.1])
            if how == "sequence-concat":  # the sequence read as a whole: a barrier
                a = int(self.rng.integers(1, size))
                seq = self.node("SplitToSequence", [x, self.ints([a, size - a])], axis=axis)
                y = self.node("ConcatFromSequence", [seq], axis=axis)
                self._shapes[y] = tuple(d)
                self.declared[y] = tuple([self.batch] + list(d[1:]))
                self.say(f"barrier: SplitToSequence axis {axis} [{a},{size - a}] read by ConcatFromSequence")
                return y
            if how in ("Split", "sequence"):
                a = int(self.rng.integers(1, size))
                parts = self.pieces(x, axis, [a, size - a], how)
                first = self.node("Relu", [parts[0]]) if self.r() < 0.5 else parts[0]
                second = self.node("Mul", [parts[1], self.fconst(float(self.pick([0.5, 2.0, 3.0])))]) \
                    if self.r() < 0.5 else parts[1]
                order = [first, second] if self.r() < 0.6 else [second, first]
                self.say(f"{how} axis {axis} [{a},{size - a}] / Concat")
                return self.node("Concat", order, axis=axis)
            if how == "sequence-chunks":  # a scalar split: chunks, the last one shorter
                chunk = int(self.rng.integers((size + 3) // 4, size))
                sizes = [min(chunk, size - s) for s in range(0, size, chunk)]
            else:
                sizes = [1] * size
            parts = self.pieces(x, axis, sizes, how)
            if self.r() < 0.4:
                parts[0] = self.node("Relu", [parts[0]])
            order = [int(k) for k in self.rng.permutation(len(parts))]
            self.say(f"{how} axis {axis} {sizes} / Concat in the order {order}")
            return self.node("Concat", [parts[k] for k in order], axis=axis)
        if op == "concat-self":
            axis = int(self.rng.integers(1, rank))
            limit = MAX_CHANNELS if axis == 1 and rank > 2 else MAX_FEATURES if rank == 2 else MAX_SPATIAL
            if d[axis] * 2 > limit:
                return x
            other = self.node("Relu", [x]) if self.r() < 0.5 else x
            self.say(f"Concat axis {axis} with itself")
            return self.node("Concat", [x, other], axis=axis)
        if op in ("maxpool", "avgpool"):
            return self.pool_op(x, d, op)
        if op == "reduce":
            return self.reduce(x, d, keep=True)
        if op == "resize":
            return self.resize(x, d)
        if op == "nhwc":
            return self.channels_last(x, d)
        if op == "d2s":
            if c % 4:
                return x
            self.say("DepthToSpace")
            mode = self.pick(["DCR", "CRD"])
            return self.node("DepthToSpace", [x], blocksize=2, mode=mode)
        if op == "s2d":
            if spatial[0] % 2 or spatial[1] % 2 or c * 4 > 2 * MAX_CHANNELS:
                return x
            self.say("SpaceToDepth")
            return self.node("SpaceToDepth", [x], blocksize=2)
        raise AssertionError(op)

    def pieces(self, x: str, axis: int, sizes: List[int], how: str) -> List[str]:
        """`x` cut along `axis` into pieces of `sizes`: by a Split, by Slices, or by a
        SplitToSequence read by SequenceAt at constant positions (its split a 1-D constant
        ("sequence"), a scalar chunk length ("sequence-chunks") or none, pieces of one
        ("sequence-ones")), as PyTorch's dynamo exporter writes chunk and split."""
        d = self.dims(x)
        rank = len(d)
        named_axis = axis if self.r() < 0.7 else axis - rank
        stops = np.cumsum(sizes).tolist()
        if how == "Split":
            parts = self.node("Split", [x, self.ints(sizes)], n_out=len(sizes), axis=named_axis)
            return list(parts) if len(sizes) > 1 else [parts]
        if how == "Slice":
            return [self.node("Slice", [x, self.ints([stop - size]), self.ints([stop]), self.ints([named_axis])])
                    for size, stop in zip(sizes, stops)]
        attrs = {}
        if how == "sequence":
            inputs = [x, self.ints(sizes)]
        elif how == "sequence-chunks":
            inputs = [x, self.const(np.asarray(sizes[0], np.int64), "chunk")]
        else:
            inputs = [x]
            if self.r() < 0.5:
                attrs["keepdims"] = 1
        seq = self.node("SplitToSequence", inputs, axis=named_axis, **attrs)
        parts = []
        for k, size in enumerate(sizes):
            position = k if self.r() < 0.7 else k - len(sizes)
            part = self.node("SequenceAt", [seq, self.const(np.asarray(position, np.int64), "at")])
            shape = list(d)
            shape[axis] = size
            # onnx's inference leaves the axis open when the pieces differ in length
            self._shapes[part] = tuple(shape)
            self.declared[part] = tuple([self.batch] + shape[1:])
            parts.append(part)
        return parts

    def channel_shuffle(self, x: str, groups: Optional[int] = None) -> str:
        """ShuffleNet's channel shuffle: Reshape [N, C, *S] to [N, g, C/g, *S], swap the two
        channel axes, Reshape back (an MLP's features too)."""
        d = self.dims(x)
        c, spatial = d[1], list(d[2:])
        if groups is None:
            divisors = [g for g in range(2, c) if c % g == 0]
            if not divisors:
                return x
            groups = int(self.pick(divisors))
        batch = 0 if self.batch is None or self.r() < 0.5 else self.batch
        y = self.node("Reshape", [x, self.ints([batch, groups, c // groups] + spatial)])
        y = self.node("Transpose", [y], perm=[0, 2, 1] + list(range(3, len(d) + 1)))
        if self.r() < 0.2:
            y = self.node("Relu", [y])
        back = [batch, c] + spatial if self.r() < 0.7 else [batch, -1] + spatial
        self.say(f"channel shuffle, {groups} groups")
        return self.node("Reshape", [y, self.ints(back)])

    def shuffle_unit(self, x: str) -> str:
        """A ShuffleNet-v2 unit: the channels split in halves (Split, Slices or a sequence), one
        half through 1x1, depthwise and 1x1 convolutions with BatchNorms, the halves
        concatenated and shuffled."""
        d = self.dims(x)
        if d[1] < 2 or d[1] % 2:
            x = self.conv_block(x, 2 * int(self.rng.integers(1, MAX_CHANNELS // 2 + 1)), shape_keeping=True)
            d = self.dims(x)
            if d[1] % 2:
                raise GenError("shuffle unit: odd channels")
        half = d[1] // 2
        how = self.pick(["Split", "Slice", "sequence"], [1, 1, 1.5])
        self.say(f"shuffle unit, halves by {how}")
        left, right = self.pieces(x, 1, [half, half], how)
        y = self.conv_block(right, half, shape_keeping=True, bn=0.7)
        y = self.conv(y, half, shape_keeping=True)
        if self.r() < 0.7 * self.bn_rate:
            y = self.batchnorm(y)
        y = self.conv_block(y, half, shape_keeping=True, bn=0.7)
        if self.dims(y)[2:] != d[2:]:
            raise GenError("shuffle unit: the branch changed the size")
        z = self.node("Concat", [left, y] if self.r() < 0.7 else [y, left], axis=1)
        return self.channel_shuffle(z, 2 if self.dims(z)[1] % 2 == 0 else None)

    def reshape_roundtrip(self, x, d):
        rank = len(d)
        c = d[1]
        shape = list(d[1:])
        if rank == 2:  # [N, F] -> [N, a, F/a] -> [N, F]
            divisors = [a for a in range(2, c) if c % a == 0]
            if not divisors:
                return x
            a = int(self.pick(divisors))
            mid = [0, a, c // a]
        else:  # merge the spatial axes, or split the channels from the rest
            mid = [0, c, int(np.prod(shape[1:]))] if self.r() < 0.6 else [0, -1]
        if self.batch is not None and self.r() < 0.3:
            mid[0] = self.batch
        y = self.node("Reshape", [x, self.ints(mid)])
        if self.r() < 0.4:
            y = self.node("Relu", [y])
        back = [0] + shape if self.batch is None or self.r() < 0.5 else [self.batch] + shape
        self.say(f"Reshape {mid} and back")
        return self.node("Reshape", [y, self.ints(back)])

    def pool_op(self, x, d, op):
        spatial = d[2:]
        nd = len(spatial)
        k = [int(self.pick([2, 3])) if s >= 3 else int(min(s, 2)) for s in spatial]
        strides = [int(self.pick([1, 2])) for _ in range(nd)]
        attrs = dict(kernel_shape=k, strides=strides)
        if self.r() < 0.4:
            attrs["pads"] = [int(self.rng.integers(0, kk // 2 + 1)) for kk in k + k]
        elif self.r() < 0.3:
            attrs["auto_pad"] = self.pick(["SAME_UPPER", "SAME_LOWER", "VALID"])
        if self.r() < 0.3 and "auto_pad" not in attrs:
            attrs["ceil_mode"] = 1
        if op == "avgpool" and self.r() < 0.4:
            attrs["count_include_pad"] = 1
        if op == "maxpool" and self.r() < 0.15 and "auto_pad" not in attrs:
            attrs["dilations"] = [2] * nd
        if any(s < (kk - 1) * attrs.get("dilations", [1] * nd)[i] + 1 for i, (s, kk) in enumerate(zip(spatial, k))):
            return x
        name = "MaxPool" if op == "maxpool" else "AveragePool"
        self.say(f"{name} {attrs}")
        return self.node(name, [x], **attrs)

    def reduce(self, x, d, keep: bool):
        rank = len(d)
        op = self.pick(["ReduceMean", "ReduceSum", "ReduceMax"])
        axes = sorted(set(int(a) for a in self.rng.choice(np.arange(2, rank), int(self.rng.integers(1, rank - 1)), replace=False)))
        if not keep:
            axes = list(range(2, rank))
        axes = [a - rank if self.r() < 0.3 else a for a in axes]
        keepdims = 1 if keep else 0
        self.say(f"{op} axes {axes} keepdims {keepdims}")
        attrs = {} if keepdims == 1 and self.r() < 0.5 else dict(keepdims=keepdims)
        if op == "ReduceSum" or self.opset >= 18:
            return self.node(op, [x, self.ints(axes)], **attrs)
        return self.node(op, [x], axes=axes, **attrs)

    def resize(self, x, d):
        spatial = d[2:]
        nd = len(spatial)
        mode = self.pick(["nearest", "linear", "cubic"] if nd == 2 else ["nearest", "linear"])
        attrs = dict(mode=mode)
        ctm = self.pick(["half_pixel", "asymmetric", "align_corners", "pytorch_half_pixel"])
        if mode != "nearest" or self.r() < 0.5:
            attrs["coordinate_transformation_mode"] = ctm
        if mode == "nearest" and self.r() < 0.5:
            attrs["nearest_mode"] = self.pick(["round_prefer_floor", "floor", "ceil"])
        if mode == "cubic" and self.r() < 0.4:
            attrs["cubic_coeff_a"] = -0.5
            attrs["exclude_outside"] = 1
        if self.r() < 0.5:
            scales = [1.0, 1.0] + [float(self.pick([2.0, 1.5, 0.5])) if s >= 4 else 2.0 for s in spatial]
            if any(s * f > 2 * MAX_SPATIAL for s, f in zip(spatial, scales[2:])):
                return x
            inputs = [x, "", self.const(np.asarray(scales, np.float32), "scales")]
        else:
            sizes = [1 if self.batch is None else self.batch, d[1]] + [int(self.rng.integers(2, MAX_SPATIAL + 1)) for _ in spatial]
            if self.batch is None:
                return x  # sizes would fix the batch
            inputs = [x, "", "", self.ints(sizes)]
        self.say(f"Resize {attrs}")
        return self.node("Resize", inputs, **attrs)

    def channels_last(self, x, d):
        """Channels moved last by a Transpose, a per-channel op or a MatMul there, and back."""
        rank = len(d)
        c = d[1]
        perm = [0] + list(range(2, rank)) + [1]
        y = self.node("Transpose", [x], perm=perm)
        kind = self.pick(["mul", "add", "matmul", "einsum"])
        if kind == "einsum":  # a layer on the last axis: "bsd,df->bsf", "...i,oi->...o", ...
            cout = int(self.rng.integers(1, MAX_CHANNELS + 1))
            y, eq = self.einsum_layer(y, cout, rank - 1, LAST_AXIS_EINSUMS[rank])
            kind = f"Einsum '{eq}'"
            if self.r() < 0.7:
                y = self.node("Add", [y, self.weight(self.values([cout], c, "b"), "b")])
            y = self.act(y, allow_barrier=False)
        elif kind == "mul":
            y = self.node("Mul", [y, self.weight(self.rng.uniform(0.5, 2.0, [c]), "mulc", shareable=False)])
            cout = c
        elif kind == "add":
            y = self.node("Add", [y, self.weight(self.rng.standard_normal([c]) * 0.3, "addc", shareable=False)])
            cout = c
        else:
            cout = int(self.rng.integers(1, MAX_CHANNELS + 1))
            y = self.node("MatMul", [y, self.weight(self.values([c, cout], c, out_axis=1))])
            if self.r() < 0.7:
                y = self.node("Add", [y, self.weight(self.values([cout], c, "b"), "b")])
            y = self.act(y, allow_barrier=False)
        self.say(f"channels last: {kind} {c}->{cout}")
        back = [0, rank - 1] + list(range(1, rank - 1))
        return self.node("Transpose", [y], perm=back)

    # ------------------------------------------------------------------ blocks
    def residual(self, x: str, dense: bool) -> str:
        d = self.dims(x)
        c = d[1]
        if dense:
            y = self.act(self.linear(x, c), allow_barrier=False)
            y = self.linear(y, c)
        else:
            y = self.conv_block(x, c, shape_keeping=True, bn=0.4, allow_barrier=False)
            if self.dims(y) != d:
                raise GenError("residual conv changed the shape")
            if self.dtype != np.float64 and self.r() < 0.1:  # onnxruntime's fusion of conv, add and relu
                y = self.conv(y, c, shape_keeping=True, fused="Relu", z=x)
                if self.dims(y) != d:
                    raise GenError("residual conv changed the shape")
                return y
            y = self.conv(y, c, shape_keeping=True)
            if self.dims(y) != d:
                raise GenError("residual conv changed the shape")
        op = self.pick(["Add", "Sub", "Sum", "Max", "Min"], [5, 1, 1, 1, 1])
        self.say(f"residual {op}")
        if op == "Sum":
            z = self.node("Sum", [x, y, self.node("Relu", [x]) if self.r() < 0.5 else y])
        elif op == "Sub":
            z = self.node("Sub", [x, y] if self.r() < 0.5 else [y, x])
        else:
            z = self.node(op, [x, y] if self.r() < 0.5 else [y, x])
        return self.act(z)

    def two_branches(self, x: str, dense: bool) -> str:
        """Two layers read the same tensor; their outputs are concatenated."""
        d = self.dims(x)
        a, b = int(self.rng.integers(1, 5)), int(self.rng.integers(1, 5))
        if dense:
            y1, y2 = self.act(self.linear(x, a * 2)), self.act(self.linear(x, b * 2))
        else:
            y1 = self.act(self.conv(x, a, shape_keeping=True))
            y2 = self.act(self.conv(x, b, shape_keeping=True)) if self.r() < 0.7 else x
            if self.dims(y1)[2:] != self.dims(y2)[2:]:
                raise GenError("branches differ in size")
        self.say("two branches / Concat")
        return self.node("Concat", [y1, y2], axis=1 if self.r() < 0.7 else -len(d) + 1)

    def to_dense(self, x: str) -> str:
        """[N, C, *S] -> [N, F]."""
        d = self.dims(x)
        rank = len(d)
        kind = self.pick(["flatten", "gap", "gmp", "reduce", "reshape", "squeeze"], [3, 2, 1, 1, 1, 1])
        if kind == "flatten":
            self.say("Flatten")
            return self.node("Flatten", [x], **({} if self.r() < 0.5 else dict(axis=1)))
        if kind == "reshape":
            self.say("Reshape to [N, F]")
            return self.node("Reshape", [x, self.ints([0 if self.batch is None else self.pick([0, self.batch]), -1])])
        if kind == "reduce":
            return self.reduce(x, d, keep=False)
        y = self.node("GlobalAveragePool" if kind in ("gap", "squeeze") else "GlobalMaxPool", [x])
        self.say(f"{kind}")
        if kind == "squeeze":
            return self.node("Squeeze", [y, self.ints(list(range(2, rank)))])
        return self.node("Flatten", [y])

    def change_rank(self, x: str) -> str:
        """A 2-D activation to 1-D (merge the spatial axes) or a 1-D one to 2-D."""
        d = self.dims(x)
        if len(d) == 4:
            self.say("Reshape 2-D -> 1-D")
            return self.node("Reshape", [x, self.ints([0, d[1], d[2] * d[3]])])
        if len(d) == 3 and d[2] % 2 == 0 and d[2] >= 4:
            self.say("Reshape 1-D -> 2-D")
            return self.node("Reshape", [x, self.ints([0, d[1], 2, d[2] // 2])])
        return x


# ============================================================================ families
def _mlp(b: Builder):
    fin = int(b.rng.integers(2, 17))
    x = b.start([fin])
    for _ in range(int(b.rng.integers(1, 4))):
        step = b.pick(["layer", "residual", "branches", "pass"], [4, 1, 1, 2])
        if step == "layer":
            x = b.act(b.linear(x, int(b.rng.integers(2, 17))))
            if b.r() < 0.2 * b.bn_rate:
                x = b.batchnorm(x)
        elif step == "residual":
            x = b.residual(x, dense=True)
        elif step == "branches":
            x = b.two_branches(x, dense=True)
        for _ in range(int(b.pick([0, 1, 2], [0.4, 0.4, 0.2]))):
            x = b.passthrough(x)
        if b.dims(x)[1] > MAX_FEATURES:
            x = b.act(b.linear(x, int(b.rng.integers(2, 17))))
        if b.r() < 0.08 and x != "x":  # a graph input is no output of its own
            b.extra_outputs.append(x)
    return b.linear(x, int(b.rng.integers(1, 6)))


def _cnn(b: Builder, nd: int, mixture: bool):
    cin = int(b.rng.integers(1, 5))
    spatial = [int(b.rng.integers(4, MAX_SPATIAL + 1)) for _ in range(nd)] if nd == 1 else \
        [int(b.rng.integers(4, 9)) for _ in range(nd)]
    x = b.start([cin] + spatial)
    for _ in range(int(b.rng.integers(1, 4))):
        if len(b.dims(x)) < 3:  # a Gather of one position removed the last spatial axis
            break
        step = b.pick(["conv", "convT", "residual", "branches", "pass", "rank", "einsum", "shuffle"],
                      [5, 1, 2 if mixture else 0.5, 1, 2, 0.5 if mixture else 0, 0.8, 0.8])
        if step == "conv":
            x = b.conv_block(x, int(b.rng.integers(1, MAX_CHANNELS + 1)))
        elif step == "einsum":
            x = b.act(b.einsum_conv(x, int(b.rng.integers(1, MAX_CHANNELS + 1))))
        elif step == "shuffle":
            x = b.shuffle_unit(x)
        elif step == "convT":
            x = b.act(b.conv_transpose(x, int(b.rng.integers(1, MAX_CHANNELS + 1))))
        elif step == "residual":
            x = b.residual(x, dense=False)
        elif step == "branches":
            x = b.two_branches(x, dense=False)
        elif step == "rank":
            x = b.change_rank(x)
        for _ in range(int(b.pick([0, 1, 2], [0.3, 0.45, 0.25]))):
            x = b.passthrough(x)
        d = b.dims(x)
        if len(d) < 3:
            break
        if d[1] > MAX_CHANNELS:
            x = b.act(b.conv(x, int(b.rng.integers(1, MAX_CHANNELS + 1))))
        if any(s > MAX_SPATIAL for s in b.dims(x)[2:]):
            x = b.node("MaxPool", [x], kernel_shape=[2] * (len(d) - 2), strides=[2] * (len(d) - 2))
            b.say("MaxPool 2 (size cap)")
        if b.r() < 0.08 and x != "x":  # a graph input is no output of its own
            b.extra_outputs.append(x)
    if len(b.dims(x)) < 3:
        pass
    elif not mixture and b.r() < 0.3:
        return b.conv(x, int(b.rng.integers(1, 5)))  # a fully convolutional model
    if len(b.dims(x)) >= 3:
        x = b.to_dense(x)
    if int(np.prod(b.dims(x)[1:])) > 4 * MAX_FEATURES * 4:
        raise GenError("dense input too wide")
    for _ in range(int(b.rng.integers(0, 3 if mixture else 2))):
        x = b.act(b.linear(x, int(b.rng.integers(2, 17))))
        if mixture and b.r() < 0.3:
            x = b.passthrough(x)
    return b.linear(x, int(b.rng.integers(1, 6)))


def seed_options(seed: int) -> Dict[str, object]:
    """The options `check_seed` rescales the model of `seed` with: bn_statistics for one seed in
    six, criterion="enorm" for another one in six (the tool refuses the two together), the
    defaults for the rest."""
    draw = int(np.random.default_rng([seed, 6]).integers(6))
    return {0: {"bn_statistics": True}, 1: {"criterion": "enorm"}}.get(draw, {})


def _options_text(options: Dict[str, object]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(options.items())) or "default options"


def _candidate(seed: int, sub: int) -> Tuple[onnx.ModelProto, str]:
    rng = np.random.default_rng([seed, sub])
    options = seed_options(seed)
    family = str(rng.choice(["mlp", "cnn1d", "cnn2d", "mixture"], p=[0.3, 0.2, 0.25, 0.25]))
    dtype_name = str(rng.choice(["float32", "float16", "float64"], p=[0.6, 0.25, 0.15]))
    if dtype_name == "float64":
        family = "mlp"  # onnxruntime's CPU provider has no float64 Conv, pooling average, Resize, Erf
    opset = int(rng.integers(13, 22))
    batch = None if rng.random() < 0.35 else int(rng.integers(1, 5))
    # with bn_statistics, BatchNormalization twice as often: the option has something to do
    b = Builder(rng, DTYPES[dtype_name], opset, batch, family, bn_rate=2.0 if options.get("bn_statistics") else 1.0)
    if family == "mlp":
        y = _mlp(b)
    elif family == "mixture":
        y = _cnn(b, int(rng.choice([1, 2])), mixture=True)
    else:
        y = _cnn(b, 1 if family == "cnn1d" else 2, mixture=False)
    outputs = [y] + [o for o in b.extra_outputs if o != y]
    # the shapes onnx's inference cannot find are in the model as value_info half the time
    # (exporters write them); otherwise the tool computes them
    model = b.model(outputs, declare=bool(b.declared) and rng.random() < 0.5)
    # declare the output shapes that inference finds
    inferred = onnx.shape_inference.infer_shapes(b.inferable(outputs), strict_mode=True)
    known = {vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
    for out in model.graph.output:
        if out.name in known:
            out.type.CopyFrom(known[out.name].type)
    ops = Counter(op_name(n) for n in model.graph.node)
    header = (f"seed {seed} (sub-seed {sub}): {family}, {dtype_name}, opset {opset}, "
              f"batch {'N (dynamic)' if batch is None else batch}, {_options_text(options)}, input {b.shape('x')[1:]}, "
              f"{len(model.graph.node)} nodes: " + ", ".join(f"{k}×{v}" for k, v in sorted(ops.items())))
    return model, header + "\n" + "\n".join("  " + line for line in b.ops)


def _ort_session(model: onnx.ModelProto):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def input_batches(model: onnx.ModelProto) -> List[int]:
    """Batches to run a model with: its own, or 1, 2 and 3 when it is dynamic."""
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    return [dim.dim_value] if dim.HasField("dim_value") else [1, 2, 3]


def random_feeds(model: onnx.ModelProto, batch: int, seed: int) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in model.graph.input:
        dims = [batch] + [d.dim_value for d in vi.type.tensor_type.shape.dim[1:]]
        dtype = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        feeds[vi.name] = (rng.standard_normal(dims) * 1.5).astype(dtype)
    return feeds


def check_feeds(model: onnx.ModelProto, seed: int) -> List[Dict[str, np.ndarray]]:
    """The random inputs that the outputs are compared on: two draws for each batch."""
    return [random_feeds(model, batch, 1000 * seed + k) for batch in input_batches(model) for k in range(2)]


def _validate(model: onnx.ModelProto, seed: int) -> None:
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        raise GenError(f"checker: {str(e).splitlines()[0][:200]}") from None
    try:
        session = _ort_session(model)
        for feeds in check_feeds(model, seed):  # the inputs that check_outputs uses
            outs = session.run(None, feeds)
            for o in outs:
                if not np.all(np.isfinite(o.astype(np.float64))):
                    raise GenError("non-finite output")
                if o.size == 0:
                    raise GenError("empty output")
    except GenError:
        raise
    except Exception as e:
        raise GenError(f"onnxruntime: {str(e).splitlines()[0][:200]}") from None


def generate(seed: int, return_rejects=False):
    """The model of `seed` and its description (the first valid candidate of sub-seeds 0, 1, ...)."""
    rejects = []
    for sub in range(SUBSEEDS):
        try:
            model, desc = _candidate(seed, sub)
            _validate(model, seed)
        except GenError as e:
            rejects.append(str(e))
            continue
        except Exception as e:  # a generator bug: counted with the rejects, see --rejects
            rejects.append(f"generator {type(e).__name__}: {e}")
            continue
        if return_rejects:
            return model, desc, rejects
        return model, desc
    raise RuntimeError(f"seed {seed}: no valid model in {SUBSEEDS} sub-seeds: {Counter(rejects).most_common(3)}")


# ============================================================================ running a model in another dtype
def model_dtype(model: onnx.ModelProto) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(model.graph.input[0].type.tensor_type.elem_type))


def cast_model(model: onnx.ModelProto, target) -> onnx.ModelProto:
    """A copy of `model` computing in `target` (a wider float dtype): tensors of the model's dtype
    are converted exactly; a Cast to the model's dtype still rounds there before widening (so the
    copy holds the same weight values); Resize's float32 roi/scales stay as they are; a FusedConv
    is written as its Conv and activation (`unfused`: onnxruntime has no float64 FusedConv)."""
    source_t = model.graph.input[0].type.tensor_type.elem_type
    target_t = _tensor_type(target)
    m = onnx.ModelProto()
    m.CopyFrom(unfused(model))
    keep = {n.input[i] for n in m.graph.node if n.op_type == "Resize" for i in (1, 2) if len(n.input) > i}
    for t in m.graph.initializer:
        if t.data_type == source_t and t.name not in keep:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(target), t.name))
    nodes = []
    for n in m.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and a.t.data_type == source_t:
                    a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(target), a.t.name))
        if n.op_type == "Cast" and any(a.name == "to" and a.i == source_t for a in n.attribute):
            rounded = n.output[0] + "__rounded"
            widen = helper.make_node("Cast", [rounded], [n.output[0]], to=target_t, name=n.name + "__widen")
            n.output[0] = rounded
            nodes += [n, widen]
            continue
        nodes.append(n)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    for vi in list(m.graph.input) + list(m.graph.output) + list(m.graph.value_info):
        if vi.type.tensor_type.elem_type == source_t:
            vi.type.tensor_type.elem_type = target_t
    return m


def unfused(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with each com.microsoft.FusedConv written as what it computes: its Conv, plus its
    input Z when it has one, then its activation as a node of its own."""
    if not any(_is_fused_conv(n) for n in model.graph.node):
        return model
    m = onnx.ModelProto()
    m.CopyFrom(model)
    dtype = model_dtype(model)
    nodes = []
    for n in m.graph.node:
        if not _is_fused_conv(n):
            nodes.append(n)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        activation = attrs.pop("activation", b"")
        activation = activation.decode() if isinstance(activation, bytes) else activation
        params = [float(v) for v in attrs.pop("activation_params", [])]
        y = n.output[0] + "__conv"
        nodes.append(helper.make_node("Conv", list(n.input[:3]), [y], name=n.name + "__conv", **attrs))
        if len(n.input) > 3 and n.input[3]:
            nodes.append(helper.make_node("Add", [y, n.input[3]], [y + "_z"], name=n.name + "__z"))
            y += "_z"
        if activation == "LeakyRelu":
            act = helper.make_node("LeakyRelu", [y], [n.output[0]], alpha=params[0])
        elif activation == "Clip":
            bounds = [n.name + "__min", n.name + "__max"]
            m.graph.initializer.extend(numpy_helper.from_array(np.asarray(v, dtype), b) for v, b in zip(params, bounds))
            act = helper.make_node("Clip", [y] + bounds, [n.output[0]])
        else:
            act = helper.make_node(activation or "Identity", [y], [n.output[0]])
        act.name = n.name + "__activation"
        nodes.append(act)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


def run_model(model: onnx.ModelProto, feeds_list) -> List[List[np.ndarray]]:
    session = _ort_session(model)
    return [session.run(None, feeds) for feeds in feeds_list]


def reference_outputs(model: onnx.ModelProto, feeds_list, outputs) -> Tuple[Optional[List[List[np.ndarray]]], str]:
    """The model's outputs computed in a wider dtype (float64, or float32 for a float16 model):
    onnxruntime where it has the kernels, else onnx's reference evaluator when that agrees with
    onnxruntime to 1e-3 (it implements some ops differently). (None, why) when neither works."""
    dtype = model_dtype(model)
    if dtype == np.float64:
        return outputs, "itself (float64)"
    widths = [np.float32, np.float64] if dtype == np.float16 else [np.float64]
    for wide in widths[::-1]:
        wide_model = cast_model(model, wide)
        wide_feeds = [{k: v.astype(wide) for k, v in f.items()} for f in feeds_list]
        try:
            return run_model(wide_model, wide_feeds), f"onnxruntime {np.dtype(wide).name}"
        except Exception:
            pass
        try:
            from onnx.reference import ReferenceEvaluator
            ref = ReferenceEvaluator(wide_model)
            result = [ref.run(None, f) for f in wide_feeds]
            ok = all(_max_rel(a, b) <= 1e-3 for ra, rb in zip(result, outputs) for a, b in zip(ra, rb))
            if ok:
                return result, f"onnx reference evaluator {np.dtype(wide).name}"
        except Exception:
            pass
    return None, "none"


def _max_rel(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    scale = max(float(np.abs(b).max()) if b.size else 0.0, 1e-30)
    return float(np.abs(a - b).max()) / scale if a.size else 0.0


# ============================================================================ the checks
TENSOR_FIELDS = ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "string_data", "uint64_data")
# largest difference accepted, relative to the output's scale, whatever the noise measured
# (float16: 8 units in the last place, float32: 32, float64: 1e-13: both models round at every
# layer, and deep models and cancellations of large terms go past a few units)
FLOOR = {"float64": 1e-13, "float32": 32 * float(np.finfo(np.float32).eps), "float16": 8 * float(np.finfo(np.float16).eps)}
# the same when no wider reference could be computed (the rounding noise is then unknown)
NO_REFERENCE_FLOOR = {"float64": 1e-9, "float32": 1e-4, "float16": 2e-2}
NOISE_FACTOR = 8.0


@dataclass
class Outcome:
    seed: int
    description: str
    kind: str = ""  # written, refused, crash
    reason: str = ""  # refused: the error class and the start of its message; crash: the exception
    message: str = ""
    failures: List[Tuple[str, str]] = field(default_factory=list)  # (kind, detail)
    notes: List[Tuple[str, str]] = field(default_factory=list)  # (kind, detail): reported, not failures
    seconds: float = 0.0
    exit_code: Optional[int] = None  # what the command line would exit with (written 0, refused the error's)
    rescaled: Optional[bool] = None  # written: whether any weight changed
    diff_over_tol: Optional[float] = None  # written: largest output difference / tolerance
    reference: str = ""
    options: str = ""  # what the model was rescaled with
    bn_statistics_rescaled: int = 0  # written with bn_statistics: running means that changed

    def fail(self, kind: str, detail: str) -> None:
        self.failures.append((kind, detail))

    def reproducer(self) -> str:
        return (f"python tests/support/randmodels.py {self.seed} /tmp/rand{self.seed}.onnx && "
                f"onnx-pathcond /tmp/rand{self.seed}.onnx /tmp/rand{self.seed}.out.onnx")


def _sha(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _storage(t: onnx.TensorProto):
    return (t.data_type, tuple(t.dims), t.data_location,
            tuple(f for f in TENSOR_FIELDS if (t.HasField(f) if f == "raw_data" else len(getattr(t, f)) > 0)))


def float_tensors(model: onnx.ModelProto) -> Dict[str, onnx.TensorProto]:
    """Every float initializer and Constant value, by the name a node reads it as."""
    out = {}
    for t in model.graph.initializer:
        out[t.name] = t
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = a.t
    return {k: t for k, t in out.items()
            if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)}


def check_same_graph(before: onnx.ModelProto, after: onnx.ModelProto, outcome: Outcome) -> None:
    """(b) The same nodes, initializers (names, dims, dtypes, storage), inputs, outputs, opsets."""
    def opsets(m):
        return sorted((o.domain, o.version) for o in m.opset_import)

    if opsets(before) != opsets(after) or before.ir_version != after.ir_version:
        outcome.fail("graph changed: opsets/ir_version", f"{opsets(before)} ir {before.ir_version} -> "
                                                         f"{opsets(after)} ir {after.ir_version}")
    g, h = before.graph, after.graph
    for what in ("input", "output"):
        a = [x.SerializeToString() for x in getattr(g, what)]
        b = [x.SerializeToString() for x in getattr(h, what)]
        if a != b:
            outcome.fail(f"graph changed: graph {what}s", f"{[x.name for x in getattr(g, what)]} -> "
                                                          f"{[x.name for x in getattr(h, what)]}")
    if len(g.node) != len(h.node):
        outcome.fail("graph changed: nodes", f"{len(g.node)} nodes -> {len(h.node)}")
    else:
        for n, m in zip(g.node, h.node):
            same = (n.op_type == m.op_type and n.domain == m.domain and n.name == m.name
                    and list(n.input) == list(m.input) and list(n.output) == list(m.output)
                    and len(n.attribute) == len(m.attribute))
            if same:
                for a, b in zip(n.attribute, m.attribute):
                    if a.name != b.name or a.type != b.type:
                        same = False
                    elif a.type == onnx.AttributeProto.TENSOR:
                        same = same and _storage(a.t) == _storage(b.t)
                    else:
                        same = same and a.SerializeToString() == b.SerializeToString()
            if not same:
                outcome.fail("graph changed: node", f"{n.op_type} '{n.name}' differs")
                break
    a = [(t.name, _storage(t)) for t in g.initializer]
    b = [(t.name, _storage(t)) for t in h.initializer]
    if a != b:
        diff = [x for x, y in zip(a, b) if x != y][:1] or f"{len(a)} -> {len(b)} initializers"
        outcome.fail("graph changed: initializers", f"{diff} (names, dtypes, dims or storage)")


def check_factors(before: onnx.ModelProto, after: onnx.ModelProto, outcome: Outcome,
                  skip: Sequence[str] = ()) -> None:
    """(c) Each float tensor element is multiplied by a positive finite factor; zeros stay zeros;
    nothing overflows or underflows in the tensor's dtype. Tensors in `skip` (running variances
    rescaled with bn_statistics, which `check_bn_statistics` checks) are left out."""
    old_tensors, new_tensors = float_tensors(before), float_tensors(after)
    outcome.rescaled = any(name in new_tensors and t.SerializeToString() != new_tensors[name].SerializeToString()
                           for name, t in old_tensors.items())
    for name, t in old_tensors.items():
        if name not in new_tensors or name in skip:
            continue  # a missing one is reported by check_same_graph
        old = numpy_helper.to_array(t).astype(np.float64)
        new_raw = numpy_helper.to_array(new_tensors[name])
        new = new_raw.astype(np.float64)
        if old.shape != new.shape:
            continue
        dtype = np.dtype(new_raw.dtype)
        if not np.all(np.isfinite(new)):
            bad = int(np.sum(~np.isfinite(new)))
            outcome.fail("weights: overflow (inf/nan)", f"'{name}' ({dtype.name}): {bad} non-finite values")
            continue
        zero_old = old == 0
        if np.any(new[zero_old] != 0):
            outcome.fail("weights: a zero became non-zero", f"'{name}': {int(np.sum(new[zero_old] != 0))} elements")
        nz = ~zero_old
        underflow = nz & (new == 0)
        if np.any(underflow):
            outcome.fail("weights: underflow to zero", f"'{name}' ({dtype.name}): {int(underflow.sum())} of "
                                                       f"{int(nz.sum())} non-zero values became 0")
        flipped = nz & (new != 0) & (np.sign(new) != np.sign(old))
        if np.any(flipped):
            outcome.fail("weights: sign changed", f"'{name}': {int(flipped.sum())} elements")
        finfo = np.finfo(dtype)
        subnormal = nz & (new != 0) & (np.abs(new) < finfo.smallest_normal) & (np.abs(old) >= finfo.smallest_normal)
        if np.any(subnormal):
            outcome.notes.append(("weights: became subnormal (precision lost)",
                                  f"'{name}' ({dtype.name}): {int(subnormal.sum())} values below "
                                  f"{finfo.smallest_normal:.3g}"))
        near_max = nz & (np.abs(new) > finfo.max / 16) & (np.abs(old) <= finfo.max / 16)
        if np.any(near_max):
            outcome.notes.append(("weights: near overflow", f"'{name}' ({dtype.name}): {int(near_max.sum())} values "
                                                            f"above max/16"))


def stored_tensor(model: onnx.ModelProto, name: str) -> Optional[str]:
    """The float initializer or Constant that the tensor `name` is (or reaches its reader
    from through Identity and Cast nodes); None for a computed tensor."""
    tensors = float_tensors(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    while name not in tensors:
        node = producers.get(name)
        if node is None or node.op_type not in ("Identity", "Cast"):
            return None
        name = node.input[0]
    return name


def running_statistics(model: onnx.ModelProto) -> List[Tuple[onnx.NodeProto, str, str]]:
    """(BatchNormalization node, its running mean's stored tensor, its running variance's)."""
    found = []
    for n in model.graph.node:
        if n.op_type == "BatchNormalization" and len(n.input) == 5:
            mean, var = stored_tensor(model, n.input[3]), stored_tensor(model, n.input[4])
            if mean is not None and var is not None:
                found.append((n, mean, var))
    return found


def _half_ulp(values: np.ndarray) -> np.ndarray:
    """Half the spacing of the stored values' dtype at each value (in float64): how far a value
    rounded to that dtype can be from what was rounded."""
    return np.abs(np.spacing(values)).astype(np.float64) / 2


def check_bn_statistics(before: onnx.ModelProto, after: onnx.ModelProto, outcome: Outcome, bn_statistics: bool) -> None:
    """(e) The running statistics of each BatchNormalization (README, BatchNorm statistics).

    Without bn_statistics a BN's input channels keep scale 1: mean and variance are unchanged,
    bit for bit. With it, channel c's mean becomes λ·mean and its variance λ²·(var + ε) − ε for
    one λ > 0. λ is read off the mean: the stored mean' is λ·mean rounded to its dtype, which
    puts λ in an interval; then var' must be (var + ε)·λ² − ε for a λ there, rounded to its
    dtype (the only slack: half a unit in the last place of each stored value, and a few units
    of float64 in the arithmetic), and never negative."""
    old_tensors, new_tensors = float_tensors(before), float_tensors(after)
    for node, mean, var in running_statistics(before):
        label = f"BatchNormalization '{node.name}'"
        if mean not in new_tensors or var not in new_tensors:
            continue  # reported by check_same_graph
        if old_tensors[mean].SerializeToString() != new_tensors[mean].SerializeToString():
            outcome.bn_statistics_rescaled += 1
        if not bn_statistics:
            for role, name in (("mean", mean), ("variance", var)):
                if old_tensors[name].SerializeToString() != new_tensors[name].SerializeToString():
                    outcome.fail("batchnorm statistics changed without bn_statistics",
                                 f"{label}: running {role} '{name}'")
            continue
        eps = next((float(a.f) for a in node.attribute if a.name == "epsilon"), 1e-5)
        m0, v0 = (numpy_helper.to_array(old_tensors[k]).astype(np.float64) for k in (mean, var))
        m1_raw, v1_raw = numpy_helper.to_array(new_tensors[mean]), numpy_helper.to_array(new_tensors[var])
        m1, v1 = m1_raw.astype(np.float64), v1_raw.astype(np.float64)
        if m0.shape != v0.shape or m1.shape != m0.shape or v1.shape != v0.shape:
            continue
        if not np.all(np.isfinite(v1)) or np.any(v1 < 0):
            outcome.fail("batchnorm: running variance negative or not finite", f"{label}: '{var}' {v1.tolist()}")
            continue
        arith = 8 * float(np.finfo(np.float64).eps)  # the tool's float64 products and sums
        known = (m0 != 0) & (m1 != 0) & (np.sign(m0) == np.sign(m1))  # a mean of 0 says nothing of λ
        slack_m = _half_ulp(m1_raw) + np.abs(m1) * arith
        lam_low = np.maximum(np.abs(m1) - slack_m, 0) / np.where(known, np.abs(m0), 1)
        lam_high = (np.abs(m1) + slack_m) / np.where(known, np.abs(m0), 1)
        v_low = (v0 + eps) * lam_low ** 2 - eps
        v_high = (v0 + eps) * lam_high ** 2 - eps
        slack_v = _half_ulp(v1_raw) + ((v0 + eps) * lam_high ** 2 + eps) * arith
        bad = known & ((v1 < v_low - slack_v) | (v1 > v_high + slack_v))
        if np.any(bad):
            c = int(np.flatnonzero(bad)[0])
            outcome.fail("batchnorm: running variance is not λ²·(var + ε) − ε for the mean's λ",
                         f"{label}, channel {c}: mean {m0[c]:.6g} -> {m1[c]:.6g} (λ in [{lam_low[c]:.9g}, "
                         f"{lam_high[c]:.9g}]), var {v0[c]:.6g} -> {v1[c]:.6g}, expected in "
                         f"[{v_low[c]:.9g}, {v_high[c]:.9g}] (ε {eps:.3g}); {int(bad.sum())} channel(s)")


def check_outputs(before: onnx.ModelProto, after: onnx.ModelProto, outcome: Outcome, seed: int) -> None:
    """(d) onnxruntime outputs of both models on seeded random inputs (every batch of
    `input_batches`, two draws each) within a tolerance from the dtype and the model's own
    rounding noise (its outputs against a wider-dtype run of itself)."""
    feeds_list = check_feeds(before, seed)
    try:
        y0 = run_model(before, feeds_list)
    except Exception as e:  # pragma: no cover - generate() ran it already
        outcome.fail("check error: input model does not run", str(e).splitlines()[0][:200])
        return
    try:
        y1 = run_model(after, feeds_list)
    except Exception as e:
        outcome.fail("outputs: rescaled model does not run", str(e).splitlines()[0][:200])
        return
    ref, how = reference_outputs(before, feeds_list, y0)
    # how much the function itself moves when each weight is rounded once more in its stored
    # dtype (what a rescaling does to every weight): the input model with its weights moved by
    # up to half a unit in the last place, both run the same way
    # (the largest of a few draws: on a small model one draw's effect varies a lot)
    weight_noise = []
    try:
        for draw in range(3):
            shaken = run_model(_weights_moved(before, seed + 100 * draw), feeds_list)
            moved = [[float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max()) if a.size else 0.0
                      for a, b in zip(ra, rb)] for ra, rb in zip(y0, shaken)]
            weight_noise = moved if not weight_noise else \
                [[max(p, q) for p, q in zip(rp, rq)] for rp, rq in zip(weight_noise, moved)]
    except Exception:
        weight_noise = []
    proxies = []
    dtype = model_dtype(before)
    narrow = {np.dtype(np.float64): np.float32, np.dtype(np.float32): np.float16}.get(dtype)
    if narrow is not None:
        # the conditioning of each model: its outputs in the next narrower dtype, the difference
        # scaled by the ratio of epsilons (a wrong rescaling is as wrong there: it does not hide)
        for m, y in ((before, y0), (after, y1)):
            try:
                proxies.append((run_model(cast_model(m, narrow), [{k: v.astype(narrow) for k, v in f.items()}
                                                                  for f in feeds_list]), y))
            except Exception:
                pass
        if proxies:
            how += f"; noise from {np.dtype(narrow).name} x {np.finfo(dtype).eps / np.finfo(narrow).eps:.2g}"
    outcome.reference = how
    # weights stored in a coarser dtype than the model's (reached through a Cast) are rescaled
    # and rounded in that dtype: the floor is the coarsest one's
    stored = [helper.tensor_dtype_to_np_dtype(t.data_type) for t in float_tensors(before).values()]
    floor_dtype = max([np.dtype(dtype)] + [np.dtype(d) for d in stored], key=lambda d: np.finfo(d).eps).name
    worst = 0.0
    worst_detail = ""
    for k, (outs0, outs1) in enumerate(zip(y0, y1)):
        for j, (a, b) in enumerate(zip(outs0, outs1)):
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            if a.shape != b.shape:
                outcome.fail("outputs: shape differs", f"output {j}: {a.shape} -> {b.shape}")
                return
            if not np.all(np.isfinite(b64)):
                outcome.fail("outputs: non-finite", f"output {j} of the rescaled model has inf/nan")
                return
            scale = float(np.abs(a64).max()) if a64.size else 0.0
            noise = 0.0
            if ref is not None:
                r64 = np.asarray(ref[k][j], np.float64)
                noise = float(np.abs(a64 - r64).max()) if r64.size else 0.0
            if weight_noise:
                noise = max(noise, weight_noise[k][j])
            for proxy, own in proxies:
                p64, o64 = np.asarray(proxy[k][j], np.float64), np.asarray(own[k][j], np.float64)
                if np.all(np.isfinite(p64)) and p64.size:
                    noise = max(noise, float(np.abs(o64 - p64).max()) * np.finfo(dtype).eps / np.finfo(narrow).eps)
            floor = FLOOR[floor_dtype] if (ref is not None or proxies) else NO_REFERENCE_FLOOR[floor_dtype]
            tol = max(NOISE_FACTOR * noise, floor * scale, 1e-30)
            diff = float(np.abs(a64 - b64).max()) if a64.size else 0.0
            if diff / tol > worst:
                worst = diff / tol
                worst_detail = (f"output {j}, feed {k}: max |difference| {diff:.3g}, output scale {scale:.3g}, "
                                f"rounding noise {noise:.3g}, tolerance {tol:.3g} (reference: {how})")
    outcome.diff_over_tol = worst
    if worst > 1:
        outcome.fail("outputs differ", worst_detail)


def _weights_moved(model: onnx.ModelProto, seed: int) -> onnx.ModelProto:
    """A copy of `model` whose float weights are each multiplied by 1 + r·ε/2, r uniform in
    [−1, 1] and ε the machine epsilon of the weight's dtype."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    rng = np.random.default_rng(seed + 7)
    for t in float_tensors(m).values():
        value = numpy_helper.to_array(t)
        eps = float(np.finfo(value.dtype).eps)
        moved = value.astype(np.float64) * (1.0 + 0.5 * eps * rng.uniform(-1.0, 1.0, value.shape))
        t.CopyFrom(numpy_helper.from_array(moved.astype(value.dtype), t.name))
    return m


def _one_line_reason(e: BaseException) -> str:
    msg = str(e)
    import re
    norm = re.sub(r"'[^']*'", "'…'", msg)
    norm = re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "#", norm)
    return f"{type(e).__name__}: {norm[:70]}"


def _crash_site(e: BaseException) -> str:
    frames = traceback.extract_tb(e.__traceback__)
    inside = [f for f in frames if "onnx_pathcond" in f.filename]
    f = (inside or frames)[-1]
    return f"{os.path.basename(f.filename)}:{f.lineno} in {f.name}"


def check_seed(seed: int, workdir: str) -> Outcome:
    """Generate the model of `seed`, rescale it the way the command line does (in-process), and
    classify and check the result (see the module docstring of test_random_models.py)."""
    import onnx_pathcond
    t0 = time.perf_counter()
    model, desc = generate(seed)
    options = seed_options(seed)
    outcome = Outcome(seed, desc, options=_options_text(options))
    folder = os.path.join(workdir, f"seed{seed}")
    in_dir, out_dir = os.path.join(folder, "in"), os.path.join(folder, "out")
    os.makedirs(in_dir)
    os.makedirs(out_dir)
    in_path, out_path = os.path.join(in_dir, "model.onnx"), os.path.join(out_dir, "rescaled.onnx")
    onnx.save_model(model, in_path)
    digest = _sha(in_path)
    try:
        try:
            onnx_pathcond.rescale_file(in_path, out_path, **options)
        except onnx_pathcond.PathCondError as e:
            outcome.kind = "refused"
            outcome.exit_code = e.exit_code
            outcome.message = str(e)
            outcome.reason = _one_line_reason(e)
            if "\n" in str(e) or not str(e).strip():
                outcome.fail("refusal: message not one line", repr(str(e))[:300])
            left = os.listdir(out_dir)
            if left:
                outcome.fail("refusal: files left next to OUT", ", ".join(left))
            if isinstance(e, onnx_pathcond.VerificationError):
                _second_opinion(model, outcome, seed, options)
        except Exception as e:
            outcome.kind = "crash"
            outcome.reason = f"{type(e).__name__} at {_crash_site(e)}: {str(e).splitlines()[0][:120] if str(e) else ''}"
            outcome.message = "".join(traceback.format_exception(e))[-3000:]
            outcome.fail("crash", outcome.reason)
        else:
            outcome.kind = "written"
            outcome.exit_code = 0
            left = sorted(set(os.listdir(out_dir)) - {"rescaled.onnx", "rescaled.onnx.data"})
            if left:
                outcome.fail("written: extra files next to OUT", ", ".join(left))
            try:
                after = onnx.load(out_path)
            except Exception as e:
                outcome.fail("written: output missing or unreadable", f"{type(e).__name__}: {e}"[:200])
            else:
                check_same_graph(model, after, outcome)
                _check_weights(model, after, outcome, options)
                check_outputs(model, after, outcome, seed)
        if _sha(in_path) != digest:
            outcome.fail("input file modified", in_path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        outcome.seconds = time.perf_counter() - t0
    return outcome


def _check_weights(before: onnx.ModelProto, after: onnx.ModelProto, outcome: Outcome, options) -> None:
    """(c) and (e): positive factors, and the BatchNorm statistics (whose variance, with
    bn_statistics, is checked by its own relation instead of a factor)."""
    bn_statistics = bool(options.get("bn_statistics"))
    variances = [var for _, _, var in running_statistics(before)] if bn_statistics else []
    check_factors(before, after, outcome, skip=variances)
    check_bn_statistics(before, after, outcome, bn_statistics)


def _second_opinion(model: onnx.ModelProto, outcome: Outcome, seed: int, options) -> None:
    """After a VerificationError: rescale in memory without the tool's check and apply our own
    checks (c), (d) and (e) to the result. If they pass, the refusal was a false rejection."""
    import onnx_pathcond
    probe = Outcome(seed, "")
    try:
        rescaled, _ = onnx_pathcond.rescale(model, verify_output=False, **options)
    except Exception as e:
        outcome.fail("verification refusal: in-memory rescale without verification fails",
                     f"{type(e).__name__}: {str(e)[:200]}")
        return
    _check_weights(model, rescaled, probe, options)
    check_outputs(model, rescaled, probe, seed)
    if not probe.failures:
        outcome.fail("false rejection", f"{outcome.message[:200]} | independent checks pass "
                                        f"(max difference {probe.diff_over_tol:.3g} of our tolerance, "
                                        f"reference {probe.reference})")
    else:
        outcome.reason += f" [confirmed: {probe.failures[0][0]}]"
        outcome.message += f" | independent check: {probe.failures[0][0]}: {probe.failures[0][1]}"


# ============================================================================ a run over many seeds
def summarise(outcomes: Sequence[Outcome], seconds: float) -> str:
    lines = []
    kinds = Counter(o.kind for o in outcomes)
    failed = [o for o in outcomes if o.failures]
    lines.append(f"models {len(outcomes)}   written {kinds['written']}   refused {kinds['refused']}   "
                 f"crashes {kinds['crash']}   with failures {len(failed)}   "
                 f"false rejections {sum(any(k == 'false rejection' for k, _ in o.failures) for o in outcomes)}   "
                 f"time {seconds:.1f}s ({seconds / max(len(outcomes), 1):.2f}s a model)")
    lines.append(f"written with some weight changed: {sum(bool(o.rescaled) for o in outcomes)}")
    by_options = Counter(o.options for o in outcomes)
    changed = Counter(o.options for o in outcomes if o.rescaled)
    lines.append("options (models, of which written with some weight changed): " +
                 ", ".join(f"{k} {v} ({changed[k]})" for k, v in sorted(by_options.items())) +
                 f"; models whose BatchNorm running statistics were rescaled: "
                 f"{sum(o.bn_statistics_rescaled > 0 for o in outcomes)}")
    families = Counter(o.description.split(":")[1].split(",")[0].strip() + "/" +
                       o.description.split(",")[1].strip() for o in outcomes)
    lines.append("families/dtypes: " + ", ".join(f"{k} {v}" for k, v in sorted(families.items())))
    refused = Counter(o.reason for o in outcomes if o.kind == "refused")
    if refused:
        lines.append("refused, by reason:")
        for reason, n in refused.most_common():
            seeds = [o.seed for o in outcomes if o.kind == "refused" and o.reason == reason][:6]
            lines.append(f"  {n:5d}  {reason}   seeds {seeds}")
    by_kind: Dict[str, List[Outcome]] = {}
    for o in failed:
        for k in sorted({k for k, _ in o.failures}):
            by_kind.setdefault(k if k != "crash" else f"crash: {o.reason[:110]}", []).append(o)
    if by_kind:
        lines.append("failures, by kind (models; first seeds; one detail):")
        for k, os_ in sorted(by_kind.items(), key=lambda kv: -len(kv[1])):
            first = os_[0]
            detail = next((d for kk, d in first.failures if kk == k), "") if not k.startswith("crash") else ""
            lines.append(f"  {len(os_):5d}  {k}   seeds {[o.seed for o in os_[:8]]}")
            if detail:
                lines.append(f"         e.g. seed {first.seed}: {detail[:230]}")
    notes: Dict[str, List[Outcome]] = {}
    for o in outcomes:
        for k in sorted({k for k, _ in o.notes}):
            notes.setdefault(k, []).append(o)
    if notes:
        lines.append("notes (not failures: the output check decides), by kind:")
        for k, os_ in sorted(notes.items(), key=lambda kv: -len(kv[1])):
            lines.append(f"  {len(os_):5d}  {k}   seeds {[o.seed for o in os_[:8]]}")
    ratios = [o.diff_over_tol for o in outcomes if o.diff_over_tol is not None]
    if ratios:
        q = np.quantile(ratios, [0.5, 0.9, 0.99, 1.0])
        lines.append("written models, largest output difference / tolerance: median {:.3g}, 90% {:.3g}, "
                     "99% {:.3g}, max {:.3g}".format(*q))
    refs = Counter(o.reference.split(";")[0] for o in outcomes if o.reference)
    lines.append("reference runs: " + ", ".join(f"{k} {v}" for k, v in refs.most_common()))
    return "\n".join(lines)


def run_many(seeds: Sequence[int], verbose=False) -> Tuple[List[Outcome], float]:
    import warnings
    t0 = time.perf_counter()
    outcomes = []
    workdir = tempfile.mkdtemp(prefix="randmodels-")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for seed in seeds:
                o = check_seed(seed, workdir)
                outcomes.append(o)
                if verbose and o.failures:
                    print(f"seed {seed}: {o.kind} {o.reason[:100]} {o.failures[:2]}", file=sys.stderr)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return outcomes, time.perf_counter() - t0


def main(argv=None) -> int:
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("seed", nargs="?", type=int, help="write the model of this seed to OUT")
    parser.add_argument("out", nargs="?", help="where to write the model of SEED")
    parser.add_argument("--describe", type=int, metavar="SEED", help="print the description of SEED's model")
    parser.add_argument("--check", type=int, metavar="SEED", help="rescale SEED's model and print the outcome")
    parser.add_argument("--count", type=int, help="rescale COUNT models and print a summary")
    parser.add_argument("--start", type=int, default=0, help="first seed of --count (default 0)")
    parser.add_argument("-v", "--verbose", action="store_true", help="with --count: print each failing seed")
    args = parser.parse_args(argv)
    if args.describe is not None:
        print(generate(args.describe)[1])
        return 0
    if args.check is not None:
        o = run_many([args.check])[0][0]
        print(o.description)
        print(f"{o.kind}: {o.reason or ''}\n{o.message}")
        for k, d in o.failures:
            print(f"FAIL {k}: {d}")
        if o.diff_over_tol is not None:
            print(f"largest output difference / tolerance {o.diff_over_tol:.3g} (reference {o.reference})")
        return 1 if o.failures else 0
    if args.count is not None:
        outcomes, seconds = run_many(range(args.start, args.start + args.count), verbose=args.verbose)
        print(f"seeds {args.start}..{args.start + args.count - 1}")
        print(summarise(outcomes, seconds))
        return 1 if any(o.failures for o in outcomes) else 0
    if args.seed is None or args.out is None:
        parser.error("give SEED OUT, --describe SEED, --check SEED or --count N")
    model, desc = generate(args.seed)
    onnx.save_model(model, args.out)
    print(desc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
