"""The interface every op rule implements, and the registry that maps op types to rules.

A rule says two things about its op:

* `analyse(node, an)`: the symmetry. It sets the channel layout of the node's outputs,
  creates positions (sources), ties or freezes positions, declares the parameters the node
  uses (`an.add_use`), or cuts the node with a reason (`an.cut`). See `channels.Analysis`.
* `path(node, ctx)`: the node in the *path network* (docs/design.md §2), as a list of
  primitives (`pathnet/primitives.py`): parameters squared, ReLU-like activations as the
  identity, max as sum. `ctx` (`pathnet.walk.PathContext`) gives shapes, the node's parameter
  uses and what `analyse` computed. `path` is asked only for nodes that `analyse` did not cut.

A rule holds no numpy or ONNX code of the path network: each executor implements every
primitive once. Ops without a rule are barriers. A rule serves the ONNX domain unless it names
another in `domain` (onnxruntime's contrib ops are "com.microsoft").
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import onnx

from ..nodes import node_label

_REGISTRY: Dict[Tuple[str, str], "OpRule"] = {}  # (domain, op type) -> rule
_DEFAULT_DOMAINS = ("", "ai.onnx")


class OpRule:
    op_types: Tuple[str, ...] = ()
    domain = ""  # the ONNX standard domain, or e.g. "com.microsoft" for onnxruntime's contrib ops
    # Whether `analyse` reads `SpreadLayout`s (channels spread over several axes). For the
    # other rules, such inputs are frozen before `analyse` runs: they see a layout or None.
    reads_spread_layouts = False

    def analyse(self, node: onnx.NodeProto, an) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def path(self, node: onnx.NodeProto, ctx) -> List:  # pragma: no cover - interface
        raise NotImplementedError


def register(rule_cls):
    """Class decorator: one instance of the rule serves all its op types."""
    rule = rule_cls()
    for op in rule_cls.op_types:
        if (rule_cls.domain, op) in _REGISTRY:
            raise RuntimeError(f"two rules for op {op}")
        _REGISTRY[(rule_cls.domain, op)] = rule
    return rule_cls


def rule_for(node: onnx.NodeProto) -> Optional[OpRule]:
    domain = "" if node.domain in _DEFAULT_DOMAINS else node.domain
    return _REGISTRY.get((domain, node.op_type))


def supported_op_types():
    """The op types with a rule; those of another domain than ONNX's as `domain.OpType`."""
    return sorted(f"{domain}.{op}" if domain else op for domain, op in _REGISTRY)


def extent_agrees(node: onnx.NodeProto, an, tensor: str, axis: int, size: int, rank: Optional[int] = None) -> bool:
    """Whether `tensor` has `size` elements along `axis` (and `rank` axes when given), as the
    node's weight expects; if not, the node is cut: the model's shape information and its
    weights disagree, and the path network cannot be built there."""
    shape = an.graph.shape(tensor)
    if shape is None or (len(shape) == (rank or len(shape)) and -len(shape) <= axis < len(shape)
                         and shape[axis] == size):
        return True
    an.cut(node, f"{node.op_type} '{node_label(node)}' reads '{tensor}' of shape {list(shape)} where its weight "
                 f"expects {size} along axis {axis}" + (f" and rank {rank}" if rank else ""))
    return False


def normalize_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis
