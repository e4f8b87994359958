"""Where a weight is stored: the initializer or Constant node behind a tensor, followed back
through the nodes that only move a weight around, so that the stored value can be rewritten
in place (and seen in the layout its user sees).

The functions take the `graph.Graph` view as `graph`; graph.py calls them, and nothing here
imports it back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from .nodes import attr


# Nodes that only move a weight around; a weight behind them can still be rewritten in place.
WEIGHT_TRANSPARENT_OPS = ("Identity", "Transpose", "Cast")


@dataclass(frozen=True)
class StoredRef:
    """Where a constant tensor's value lives: an initializer or a Constant node's attribute."""

    name: str  # initializer name, or the Constant node's output name
    kind: str  # "initializer" or "constant_node"
    # Permutation that maps the stored tensor's axes to the axes seen by the consumer
    # (None: same layout). Composed from every Transpose between the store and the use.
    perm: Optional[Tuple[int, ...]] = None

    def to_view(self, stored: np.ndarray) -> np.ndarray:
        """The stored array as the consumer sees it."""
        return stored if self.perm is None else np.transpose(stored, self.perm)

    def to_stored(self, view: np.ndarray) -> np.ndarray:
        """An array in the consumer's layout brought back to the stored layout."""
        return view if self.perm is None else np.transpose(view, np.argsort(self.perm))


def trace(graph, name: str) -> Optional[StoredRef]:
    """Follow Identity / Transpose / Cast back from `name` to where its value is stored; None
    when the value is computed (its stored form cannot be rescaled in place)."""
    perm: Optional[Tuple[int, ...]] = None
    current = name
    while True:
        if current in graph.initializers:
            return StoredRef(current, "initializer", perm)
        if current in graph.constant_nodes:
            return StoredRef(current, "constant_node", perm)
        node = graph.producer.get(current)
        if node is None or node.op_type not in WEIGHT_TRANSPARENT_OPS or current in graph.activations:
            return None
        if node.op_type == "Transpose":
            rank = len(graph.shapes.get(node.input[0]) or ())
            p = attr(node, "perm", None)
            p = tuple(p) if p is not None else tuple(reversed(range(rank)))
            # view = transpose(stored_upstream, p); stored_upstream = transpose(store, perm_up)
            perm = p if perm is None else tuple(p[i] for i in perm)
        current = node.input[0]
