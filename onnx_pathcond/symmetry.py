"""Finding the rescaling groups of a graph (DESIGN.md §1).

Channels of activation tensors are *positions*. Only sources (Conv, Gemm, MatMul, BN, ...)
create positions; pass-through ops hand the same position array to their output, with the
channel axis and order they imply (a Flatten repeats each position over its spatial block, a
Concat concatenates arrays). Ops that require several channels to share one scale (a residual
Add) *tie* positions; ops that break the symmetry *freeze* them with a reason. Groups are the
connected components of the ties; a group is frozen if any of its positions is.

Every constant on a path that is a parameter of the network (weights, biases, BN's γ and β,
per-channel multipliers) is a `ParamUse`: where it is stored, and for each of its elements
the position it is incoming to (`rows`) and the position it is outgoing from (`cols`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import onnx

from .graph import Graph, StoredRef, node_label

NO_POSITION = -1


@dataclass
class Layout:
    """Channel structure of an activation tensor: which axis, and the position of each channel."""

    axis: int
    pos: np.ndarray  # int64, one position id per channel along `axis`

    @property
    def channels(self) -> int:
        return int(self.pos.shape[0])


@dataclass
class ParamUse:
    """One parameter tensor as used by one node.

    `rows` / `cols` are int64 arrays broadcastable to `view_shape` holding, per element, the
    position it is incoming to / outgoing from (NO_POSITION where none). `ref` is None when
    the value is computed from other constants and cannot be rewritten in place; its elements
    still count as parameters on paths, with a scale fixed to 1.
    """

    node: onnx.NodeProto
    role: str  # "weight", "bias", "bn_scale", "bn_bias", "multiplier"
    input_name: str
    ref: Optional[StoredRef]
    view_shape: Tuple[int, ...]
    rows: np.ndarray
    cols: np.ndarray
    index: int = -1
    # True for a computed all-zero bias (dynamo writes Expand(0) for a conv without bias):
    # it is on no path and needs no rewriting.
    ignored: bool = False


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

    def __init__(self, graph: Graph):
        self.graph = graph
        self.layouts: Dict[str, Optional[Layout]] = {}
        self.n_positions = 0
        self.blocks: List[PositionBlock] = []
        self._tie_a: List[np.ndarray] = []
        self._tie_b: List[np.ndarray] = []
        self.freezes: List[Freeze] = []
        self.uses: List[ParamUse] = []
        self.uses_by_node: Dict[int, Dict[str, ParamUse]] = {}
        self.cut_nodes: Dict[int, str] = {}  # node index -> why the path network is cut there
        self.unsupported: Dict[str, int] = {}  # op type -> count of barrier nodes
        self.node_data: Dict[int, object] = {}  # what a rule computed once for its node
        # stored tensors read by several parameter uses: name -> (uses, mask of non-zero elements)
        self.shared: Dict[str, Tuple[int, np.ndarray]] = {}

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
            self.freeze(lay.pos, reason, category)

    def add_use(self, node: onnx.NodeProto, role: str, input_name: str, view_shape, rows, cols) -> ParamUse:
        ref = self.graph.stored_ref(input_name)
        view_shape = tuple(int(d) for d in view_shape)
        rows = np.asarray(NO_POSITION if rows is None else rows, dtype=np.int64)
        cols = np.asarray(NO_POSITION if cols is None else cols, dtype=np.int64)
        if rows.ndim < len(view_shape):
            rows = rows.reshape((1,) * (len(view_shape) - rows.ndim) + rows.shape)
        if cols.ndim < len(view_shape):
            cols = cols.reshape((1,) * (len(view_shape) - cols.ndim) + cols.shape)
        use = ParamUse(node, role, input_name, ref, view_shape, rows, cols, index=len(self.uses))
        if ref is None and not np.any(self.graph.constant_value(input_name)):
            use.ignored = True
        elif ref is None:
            # A computed weight cannot be rewritten: the channels it touches keep scale 1.
            why = f"parameter '{input_name}' of {node.op_type} '{node_label(node)}' is computed from other constants"
            self.freeze(rows, why, "fixed_weight")
            self.freeze(cols, why, "fixed_weight")
        self.uses.append(use)
        self.uses_by_node.setdefault(self.graph.index(node), {})[role] = use
        return use

    def cut(self, node: onnx.NodeProto, reason: str, category: str = "barrier") -> None:
        """The node is a barrier: freeze what reaches it, and cut the path network there."""
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


def connected_components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Root (smallest member) of each of n nodes under the undirected edges (a, b).

    Vectorised union-find: hook every edge's larger root under its smaller root, then
    compress paths by pointer jumping, until no edge joins two roots.
    """
    parent = np.arange(n, dtype=np.int64)
    if a.size == 0:
        return parent
    while True:
        ra, rb = parent[a], parent[b]
        differ = ra != rb
        if not differ.any():
            return parent
        ra, rb = ra[differ], rb[differ]
        lo, hi = np.minimum(ra, rb), np.maximum(ra, rb)
        np.minimum.at(parent, hi, lo)
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped


@dataclass
class Groups:
    """The rescaling groups, in topological (layer) order.

    `of_position[p]` is the group of position p, or NO_POSITION when that group is frozen.
    Rescalable groups are numbered 0..count-1, ordered by their earliest position, so groups
    created by the same node are consecutive; `layer_of[h]` is that node's index.
    """

    count: int
    of_position: np.ndarray
    layer_of: np.ndarray  # node index of the group's earliest position
    first_position: np.ndarray
    size: np.ndarray  # positions per group
    frozen_roots: np.ndarray  # root position of every frozen group
    frozen_reasons: Dict[int, List[Tuple[str, str]]] = field(default_factory=dict)  # root -> [(category, reason)]
    root_of_position: Optional[np.ndarray] = None


def build_groups(an: Analysis) -> Groups:
    n = an.n_positions
    a, b = an.tie_arrays()
    root = connected_components(n, a, b)
    frozen_root = np.zeros(n, dtype=bool)
    reasons: Dict[int, List[Tuple[str, str]]] = {}
    for fr in an.freezes:
        roots = np.unique(root[fr.pos])
        frozen_root[roots] = True
        for r in roots.tolist():
            lst = reasons.setdefault(r, [])
            if len(lst) < 4 and (fr.category, fr.reason) not in lst:
                lst.append((fr.category, fr.reason))
    roots = np.unique(root)  # sorted: topological order of the earliest position
    live = roots[~frozen_root[roots]]
    group_of_root = np.full(n, NO_POSITION, dtype=np.int64)
    group_of_root[live] = np.arange(live.size)
    of_position = group_of_root[root] if n else np.zeros(0, np.int64)
    block_node = np.zeros(n, dtype=np.int64)
    for blk in an.blocks:
        block_node[blk.start:blk.start + blk.count] = blk.node_index
    size = np.bincount(of_position[of_position >= 0], minlength=live.size)
    return Groups(
        count=int(live.size),
        of_position=of_position,
        layer_of=block_node[live] if n else np.zeros(0, np.int64),
        first_position=live,
        size=size,
        frozen_roots=roots[frozen_root[roots]],
        frozen_reasons=reasons,
        root_of_position=root,
    )


def analyse(graph: Graph) -> Analysis:
    """Walk the graph once, applying each node's rule."""
    from .ops import rule_for

    an = Analysis(graph)
    for node in graph.nodes:
        outputs_active = any(graph.is_activation(o) for o in node.output if o)
        if not outputs_active:
            continue  # constant subgraph (weights, shapes): not part of the network
        rule = rule_for(node)
        non_float = [i for i in node.input if i and graph.is_activation(i) and not graph.is_float(i)]
        if non_float and rule is not None:
            an.cut(node, f"{node.op_type} '{node_label(node)}' takes a non-float activation '{non_float[0]}'")
            continue
        if rule is None:
            an.unsupported[node.op_type] = an.unsupported.get(node.op_type, 0) + 1
            an.cut(node, f"feeds {node.op_type} '{node_label(node)}', which is not positively homogeneous or not supported")
            continue
        rule.analyse(node, an)
    for name in graph.graph_outputs:
        an.freeze_layout(name, f"reaches graph output '{name}'", "graph_output")
    reconcile_stored_tensors(an)
    return an


def _readers(graph: Graph, name: str):
    """(node, input name) pairs that read a stored tensor, through Identity/Transpose/Cast."""
    found, frontier = [], [name]
    while frontier:
        current = frontier.pop()
        for node in graph.consumers.get(current, []):
            if node.op_type in ("Shape", "Size") or (node.op_type == "CastLike" and node.input[0] != current):
                continue  # reads only the shape or the type
            if node.op_type in ("Identity", "Transpose", "Cast") and not graph.is_activation(node.output[0]):
                frontier.append(node.output[0])
            else:
                found.append((node, current))
    return found


def reconcile_stored_tensors(an: Analysis) -> None:
    """A stored tensor gets one scale per element, whichever node reads it.

    When several parameter uses read the same tensor, their incoming positions are tied
    element by element, and so are their outgoing ones: the scale then agrees for every
    reader. A tensor also read by a node that is not one of its parameter uses (a barrier,
    a constant subgraph) cannot change at all: its channels are frozen. Zero elements are
    free either way (any scale leaves them zero): exporters often merge equal tensors, such
    as the all-zero biases of many BatchNorms, into one initializer.
    """
    by_store: Dict[str, List[ParamUse]] = {}
    for use in an.uses:
        if use.ref is not None and not use.ignored:
            by_store.setdefault(use.ref.name, []).append(use)
    for name, uses in by_store.items():
        value = an.graph.stored_value(uses[0].ref)
        nonzero = value != 0
        if not nonzero.any():
            if len(uses) > 1:
                an.shared[name] = (len(uses), nonzero)
            continue
        declared = {(id(u.node), u.input_name) for u in uses}
        strangers = [node for node, via in _readers(an.graph, name) if (id(node), via) not in declared]
        if strangers:
            why = (f"parameter '{name}' is also read by {strangers[0].op_type} '{node_label(strangers[0])}'"
                   f", so its values cannot change")
            for u in uses:
                an.freeze(u.rows, why, "shared_weight")
                an.freeze(u.cols, why, "shared_weight")
            continue
        if len(uses) == 1:
            continue
        an.shared[name] = (len(uses), nonzero)
        stored = [(u.ref.to_stored(np.broadcast_to(u.rows, u.view_shape))[nonzero],
                   u.ref.to_stored(np.broadcast_to(u.cols, u.view_shape))[nonzero]) for u in uses]
        rows0, cols0 = stored[0]
        why = f"parameter '{name}' is shared by {len(uses)} nodes that cannot follow one scale"
        for rows, cols in stored[1:]:
            if rows.shape != rows0.shape:
                for u in uses:
                    an.freeze(u.rows, why, "shared_weight")
                    an.freeze(u.cols, why, "shared_weight")
                break
            for a, b in ((rows0, rows), (cols0, cols)):
                an.tie(a, b)
                lonely = np.concatenate([a[(b < 0) & (a >= 0)], b[(a < 0) & (b >= 0)]])
                an.freeze(lonely, why, "shared_weight")
