"""The interface every op rule implements, and the registry that maps op types to rules.

A rule says three things about its op:

* `analyse(node, an)`: the symmetry. It sets the channel layout of the node's outputs,
  ties or freezes positions, and declares the parameters the node uses (`an.add_use`).
* `forward(node, pn)`: the op in the *path network* (DESIGN.md §2): parameters squared,
  ReLU-like activations as identity, max as sum. Reads `pn.mass(x)`, writes `pn.set_mass(y)`.
* `backward(node, pn)`: the adjoint of `forward`. Reads `pn.adjoint(y)`, adds into
  `pn.add_adjoint(x, ...)` and hands each parameter's statistics to `pn.emit_g(use, g)`.

Numpy arrays in the path network keep the batch axis (of size one).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np
import onnx

_REGISTRY: Dict[str, "OpRule"] = {}


class OpRule:
    op_types: Tuple[str, ...] = ()
    # True when the path-network forward is cheap (elementwise, copies): its output is then
    # dropped after the forward pass and recomputed when the backward pass needs it.
    cheap_forward = False

    def analyse(self, node: onnx.NodeProto, an) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def forward(self, node: onnx.NodeProto, pn) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def backward(self, node: onnx.NodeProto, pn) -> None:  # pragma: no cover - interface
        raise NotImplementedError


def register(rule_cls):
    """Class decorator: one instance of the rule serves all its op types."""
    rule = rule_cls()
    for op in rule_cls.op_types:
        if op in _REGISTRY:
            raise RuntimeError(f"two rules for op {op}")
        _REGISTRY[op] = rule
    return rule_cls


def rule_for(node: onnx.NodeProto) -> Optional[OpRule]:
    if node.domain not in ("", "ai.onnx"):
        return None
    return _REGISTRY.get(node.op_type)


def supported_op_types():
    return sorted(_REGISTRY)


def activation_inputs(node: onnx.NodeProto, graph):
    """Indices of the node's inputs that carry activations."""
    return [k for k, name in enumerate(node.input) if name and graph.is_activation(name)]


def unbroadcast(arr: np.ndarray, shape) -> np.ndarray:
    """Sum `arr` down to `shape` (the adjoint of numpy broadcasting)."""
    shape = tuple(shape)
    if arr.shape == shape:
        return arr
    extra = arr.ndim - len(shape)
    if extra:
        arr = arr.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, d in enumerate(shape) if d == 1 and arr.shape[i] != 1)
    if axes:
        arr = arr.sum(axis=axes, keepdims=True)
    return arr.reshape(shape)


def normalize_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis
