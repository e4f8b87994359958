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

from ..graph import attr, node_label
from ..symmetry import Layout
from .base import OpRule, register


@register
class BatchNormRule(OpRule):
    op_types = ("BatchNormalization",)
    cheap_forward = True  # the backward pass recomputes its output rather than keep it

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

    @staticmethod
    def _affine_of(node, graph, gamma: np.ndarray, beta: np.ndarray):
        mean = np.asarray(graph.constant_value(node.input[3]), dtype=np.float64)
        var = np.asarray(graph.constant_value(node.input[4]), dtype=np.float64)
        a = gamma / np.sqrt(var + attr(node, "epsilon", 1e-5))
        return a, beta - a * mean

    @classmethod
    def affine(cls, node, pn):
        return cls._affine_of(node, pn.graph, pn.param(node, "bn_scale")[1], pn.param(node, "bn_bias")[1])

    def forward(self, node, pn):
        a, b = self.affine(node, pn)
        x = pn.mass(node.input[0])
        view = (1, -1) + (1,) * (x.ndim - 2)
        pn.set_mass(node.output[0], np.square(a).reshape(view) * x + np.square(b).reshape(view))

    def backward(self, node, pn):
        a, _ = self.affine(node, pn)
        x = pn.mass(node.input[0])
        adj = pn.adjoint(node.output[0])
        view = (1, -1) + (1,) * (x.ndim - 2)
        pn.add_adjoint(node.input[0], np.square(a).reshape(view) * adj)
        spatial = (0,) + tuple(range(2, x.ndim))
        pn.emit_g(pn.use(node, "bn_scale"), (x * adj).sum(axis=spatial))
        pn.emit_g(pn.use(node, "bn_bias"), adj.sum(axis=spatial))

    def onnx_forward(self, node, b):
        a2, bias2 = self._onnx_affine_squared(node, b)
        b.set_mass(node.output[0], b.op("Add", [b.op("Mul", [b.mass(node.input[0]), a2]), bias2]))

    def onnx_backward(self, node, b):
        a2, _ = self._onnx_affine_squared(node, b)
        shape = b.shape(node.input[0])
        adj = b.adjoint(node.output[0])
        b.add_adjoint(node.input[0], b.op("Mul", [adj, a2]))
        spatial = [0] + list(range(2, len(shape)))
        b.emit_g(b.use(node, "bn_scale"), b.reduce_sum(b.op("Mul", [b.mass(node.input[0]), adj]), spatial))
        b.emit_g(b.use(node, "bn_bias"), b.reduce_sum(adj, spatial))

    @classmethod
    def _onnx_affine_squared(cls, node, b):
        """a² and b² as constants shaped [1, C, 1, ...]. They are per-channel vectors: computed
        here once, instead of a dozen graph nodes per BatchNormalization and pass (each node
        costs onnxruntime session time)."""
        rank = len(b.shape(node.input[0]))
        view = (1, -1) + (1,) * (rank - 2)
        a, bias = cls._affine_of(node, b.graph, b.param_value(node, "bn_scale"), b.param_value(node, "bn_bias"))
        return b.const(np.square(a).reshape(view)), b.const(np.square(bias).reshape(view))
