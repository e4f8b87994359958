"""What the op rules read and write while the symmetry is analysed (docs/design.md §1).

Channels of activation tensors are *positions*. Only sources (Conv, Gemm, MatMul, BN, ...)
create positions; pass-through ops hand the same position array to their output, with the
channel axis and order they imply. Ops that require several channels to share one scale (a
residual Add) *tie* positions; ops that break the symmetry *freeze* them with a reason.

Every constant on a path that is a parameter of the network (weights, biases, BN's γ and β,
per-channel multipliers) is a `ParamUse`: where it is stored, and for each of its elements
the position it is incoming to (`rows`) and the position it is outgoing from (`cols`).

This module holds only data and the `Analysis` context; the walk that applies the rules and
the grouping are in `symmetry.py` (which imports the rules; the rules import this module).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import onnx

from .graph import Graph, StoredRef
from .nodes import node_label

NO_POSITION = -1


@dataclass
class Layout:
    """Channel structure of an activation tensor: which axis, and the position of each channel."""

    axis: int
    pos: np.ndarray  # int64, one position id per channel along `axis`

    @property
    def channels(self) -> int:
        return int(self.pos.shape[0])

    @property
    def positions(self) -> np.ndarray:
        return self.pos


@dataclass
class SpreadLayout:
    """Channels whose elements no longer lie along one axis, after moves such as the first
    Reshape and the Transpose of a channel shuffle: the position of every element (negative
    where none). Element-moving ops and the element-wise ReLU family read such a tensor (rules
    with `reads_spread_layouts`); any other op needs one channel axis, and the positions
    reaching it are frozen."""

    labels: np.ndarray  # int64, the tensor's shape

    @property
    def positions(self) -> np.ndarray:
        return self.labels


@dataclass
class ParamUse:
    """One parameter tensor as used by one node.

    `rows` / `cols` are int64 arrays broadcastable to `view_shape` holding, per element, the
    position it is incoming to / outgoing from (NO_POSITION where none). `ref` is None when
    the value is computed from other constants and cannot be rewritten in place; its elements
    still count as parameters on paths, with a scale fixed to 1.
    """

    node: onnx.NodeProto
    role: str  # "weight", "bias", "bn_scale", "bn_bias", "bn_mean", "bn_var", "multiplier"
    input_name: str
    ref: Optional[StoredRef]
    view_shape: Tuple[int, ...]
    rows: np.ndarray
    cols: np.ndarray
    index: int = -1
    # True for a computed all-zero bias (dynamo writes Expand(0) for a conv without bias):
    # it is on no path and needs no rewriting.
    ignored: bool = False
    # How the stored values follow the scales, where they are not simply the path parameter
    # (BatchNormalization with `bn_statistics`, ops/batchnorm.py): the rewrite turns a stored
    # v into (v + offset)·(λ_rows / λ_cols)^power − offset, and leaves λ_cols out where
    # `stores_cols` is False (another tensor of the node carries that side). By default
    # v·λ_rows/λ_cols, the path parameter itself.
    power: int = 1
    offset: float = 0.0
    stores_cols: bool = True

    @property
    def stored_cols(self) -> np.ndarray:
        """The outgoing positions whose scales the stored values take (`cols`, or none)."""
        return self.cols if self.stores_cols else np.full((1,) * self.cols.ndim, NO_POSITION, dtype=np.int64)

    @property
    def rewrite_form(self) -> Tuple[int, float, bool]:
        """What the rewrite does with the scales: uses of one stored tensor must agree on it."""
        return self.power, self.offset, self.stores_cols

    def unchanged(self, value: np.ndarray) -> np.ndarray:
        """Where a stored value stays what it is whatever the scales: zeros, unless an offset
        is added before the scale (a zero running variance does change)."""
        return value + self.offset == 0 if self.offset else value == 0


@dataclass
class Freeze:
    pos: np.ndarray
    reason: str
    category: str  # "barrier", "graph_output", "before_bn", "shared_weight", "fixed_weight"


@dataclass
class PositionBlock:
    """A run of positions created by one node for one tensor."""

    start: int
    count: int
    node_index: int
    tensor: str


class Analysis:
    """What the op rules write into while the graph is walked in topological order."""

    def __init__(self, graph: Graph, bn_statistics: bool = False):
        self.graph = graph
        # Whether a BatchNormalization's input channel may carry a scale in its running
        # statistics (options.BN_STATISTICS; ops/batchnorm.py decides what that means).
        self.bn_statistics = bn_statistics
        self.layouts: Dict[str, Optional[Layout]] = {}
        self.n_positions = 0
        self.blocks: List[PositionBlock] = []
        self._tie_a: List[np.ndarray] = []
        self._tie_b: List[np.ndarray] = []
        self.freezes: List[Freeze] = []
        self.uses: List[ParamUse] = []
        self.uses_by_node: Dict[int, Dict[str, ParamUse]] = {}
        self.cut_nodes: Dict[int, str] = {}  # node index -> why the path network is cut there
        self.unsupported: Dict[str, int] = {}  # op type -> count of barrier nodes (cut, for any reason)
        self.node_data: Dict[int, object] = {}  # what a rule computed once for its node
        # stored tensors read by several parameter uses: name -> (uses, mask of non-zero elements)
        self.shared: Dict[str, Tuple[int, np.ndarray]] = {}
        # stored tensor -> which of its elements a scale changes, for every tensor whose values
        # the reconciliation of shared tensors read (the groups depend on them)
        self.changing_elements: Dict[str, np.ndarray] = {}

    # -------------------------------------------------------------- used by rules
    def layout(self, name: str) -> Optional[Layout]:
        return self.layouts.get(name)

    def set_layout(self, name: str, layout: Optional[Layout]) -> None:
        self.layouts[name] = layout

    def new_positions(self, node: onnx.NodeProto, tensor: str, count: int) -> np.ndarray:
        start = self.n_positions
        self.n_positions += count
        self.blocks.append(PositionBlock(start, count, self.graph.index(node), tensor))
        return np.arange(start, start + count, dtype=np.int64)

    def tie(self, a: np.ndarray, b: np.ndarray) -> None:
        a, b = np.broadcast_arrays(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64))
        keep = (a >= 0) & (b >= 0) & (a != b)
        if keep.any():
            self._tie_a.append(a[keep].ravel())
            self._tie_b.append(b[keep].ravel())

    def freeze(self, pos, reason: str, category: str = "barrier") -> None:
        pos = np.unique(np.asarray(pos, dtype=np.int64).ravel())
        pos = pos[pos >= 0]
        if pos.size:
            self.freezes.append(Freeze(pos, reason, category))

    def freeze_layout(self, name: str, reason: str, category: str = "barrier") -> None:
        lay = self.layouts.get(name)
        if lay is not None:
            self.freeze(lay.positions, reason, category)

    def add_use(self, node: onnx.NodeProto, role: str, input_name: str, view_shape, rows, cols,
                **stored_form) -> ParamUse:
        """Declare a parameter the node reads; `stored_form` (power, offset, stores_cols) says
        how its stored values follow the scales when they are not the parameter itself."""
        ref = self.graph.stored_ref(input_name)
        view_shape = tuple(int(d) for d in view_shape)
        rows = np.asarray(NO_POSITION if rows is None else rows, dtype=np.int64)
        cols = np.asarray(NO_POSITION if cols is None else cols, dtype=np.int64)
        if rows.ndim < len(view_shape):
            rows = rows.reshape((1,) * (len(view_shape) - rows.ndim) + rows.shape)
        if cols.ndim < len(view_shape):
            cols = cols.reshape((1,) * (len(view_shape) - cols.ndim) + cols.shape)
        use = ParamUse(node, role, input_name, ref, view_shape, rows, cols, index=len(self.uses), **stored_form)
        if ref is None:
            self._computed_parameter(use)
        self.uses.append(use)
        self.uses_by_node.setdefault(self.graph.index(node), {})[role] = use
        return use

    def _computed_parameter(self, use: ParamUse) -> None:
        """A parameter computed from other constants cannot be rewritten in place: the
        channels it touches keep scale 1 (a computed all-zero bias is on no path at all).
        One whose value cannot be computed here also cuts the path network at its node, so
        that no later step needs the value."""
        node, name = use.node, use.input_name
        source = self._computed_by(name)
        body = self.graph.in_function_body.get(name)
        if body is not None:
            why = (f"weight '{name}' of {node.op_type} '{node_label(node)}' is a constant inside the body of local "
                   f"function {body}, which every call shares: its values cannot be rescaled")
        elif source is not None and source.op_type == "DequantizeLinear":
            why = (f"weight '{name}' is computed by DequantizeLinear (a quantized model): "
                   f"its values cannot be rescaled")
        else:
            why = f"parameter '{name}' of {node.op_type} '{node_label(node)}' is computed from other constants"
        try:
            value = self.graph.constant_value(name)
        except Exception:  # an op the constant folding cannot run: say which, never the evaluator's words
            op = f"{source.op_type} '{node_label(source)}'" if source is not None else "a node"
            why = (f"parameter '{name}' of {node.op_type} '{node_label(node)}' is computed by {op}, "
                   f"which cannot be evaluated here: its values cannot be rescaled")
            self.cut_nodes[self.graph.index(node)] = why
            for i in node.input:
                if i and self.graph.is_activation(i):
                    self.freeze_layout(i, why, "fixed_weight")
        else:
            if not np.any(value) and not use.offset:  # with an offset, zero is not left unchanged
                use.ignored = True
                return
        self.freeze(use.rows, why, "fixed_weight")
        self.freeze(use.cols, why, "fixed_weight")

    def _computed_by(self, name: str) -> Optional[onnx.NodeProto]:
        """The node that computes a constant, past the ops that only move it (Identity, ...)."""
        node = self.graph.producer.get(name)
        while node is not None and node.op_type in ("Identity", "Transpose", "Cast", "Reshape", "Unsqueeze") \
                and node.input:
            node = self.graph.producer.get(node.input[0])
        return node

    def cut(self, node: onnx.NodeProto, reason: str, category: str = "barrier") -> None:
        """The node is a barrier: freeze what reaches it, and cut the path network there."""
        self.unsupported[node.op_type] = self.unsupported.get(node.op_type, 0) + 1
        self.cut_nodes[self.graph.index(node)] = reason
        for i in node.input:
            if i and self.graph.is_activation(i):
                self.freeze_layout(i, reason, category)
        for o in node.output:
            if o:
                self.layouts[o] = None

    # -------------------------------------------------------------- results
    def tie_arrays(self) -> Tuple[np.ndarray, np.ndarray]:
        if not self._tie_a:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(self._tie_a), np.concatenate(self._tie_b)


def add_bias_use(node: onnx.NodeProto, an: Analysis, c: str, cshape, yshape, out_axis: int, out_pos: np.ndarray,
                 role: str = "bias") -> ParamUse:
    """Declare a constant added to an output: one value per channel is incoming to the
    channel's position; any other shape is a parameter whose channels are frozen."""
    rank = len(yshape)
    cshape = tuple(cshape) if cshape is not None else ()
    padded = (1,) * (rank - len(cshape)) + cshape
    varies = [k for k, d in enumerate(padded) if d != 1]
    n = len(out_pos)
    if varies == [out_axis] or (not varies and n == 1):
        rows = out_pos.reshape([n if k == out_axis else 1 for k in range(rank)])
        rows = rows.reshape(rows.shape[rank - len(cshape):]) if len(cshape) < rank else rows
        return an.add_use(node, role, c, cshape, rows=rows, cols=None)
    why = (f"{node.op_type} '{node_label(node)}' adds a constant that is not one value per channel"
           f" (shape {list(cshape)})")
    an.freeze(out_pos, why)
    return an.add_use(node, role, c, cshape, rows=None, cols=None)
