"""Finding the rescaling groups of a graph (docs/design.md §1).

`analyse` walks the graph once in topological order and applies each node's rule (`ops/`),
which writes channel layouts, ties, freezes and parameter uses into an `Analysis`
(`channels.py`). Groups are the connected components of the ties; a group is frozen if any
of its positions is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from .channels import NO_POSITION, Analysis, Freeze, Layout, ParamUse, PositionBlock, SpreadLayout
from .graph import Graph
from .nodes import node_label
from .ops import rule_for

__all__ = ["NO_POSITION", "Analysis", "Freeze", "Groups", "Layout", "ParamUse", "PositionBlock", "analyse",
           "build_groups", "connected_components", "groups_freed_by_bn_statistics"]


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
    # why each frozen group is frozen: for each of frozen_roots, an index into `reasons`
    # ((category, reason) pairs), the first freeze of the analysis that reached the group
    frozen_reason: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    reasons: List[Tuple[str, str]] = field(default_factory=list)
    root_of_position: Optional[np.ndarray] = None


def build_groups(an: Analysis) -> Groups:
    n = an.n_positions
    a, b = an.tie_arrays()
    root = connected_components(n, a, b)
    # the first freeze (in the analysis' order) that reaches each root; len(freezes): none
    reason_index: Dict[Tuple[str, str], int] = {}
    freeze_reason = np.array([reason_index.setdefault((fr.category, fr.reason), len(reason_index))
                              for fr in an.freezes], dtype=np.int64)
    first_freeze = np.full(n, len(an.freezes), dtype=np.int64)
    if an.freezes:
        frozen_pos = np.concatenate([np.ravel(fr.pos) for fr in an.freezes]).astype(np.int64, copy=False)
        which = np.repeat(np.arange(len(an.freezes)), [np.size(fr.pos) for fr in an.freezes])
        np.minimum.at(first_freeze, root[frozen_pos], which)
    frozen_root = first_freeze < len(an.freezes)
    roots = np.unique(root)  # sorted: topological order of the earliest position
    live = roots[~frozen_root[roots]]
    frozen = roots[frozen_root[roots]]
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
        frozen_roots=frozen,
        frozen_reason=freeze_reason[first_freeze[frozen]] if frozen.size else np.zeros(0, np.int64),
        reasons=list(reason_index),
        root_of_position=root,
    )


def analyse(graph: Graph, bn_statistics: bool = False) -> Analysis:
    """Walk the graph once, applying each node's rule. With `bn_statistics`, a
    BatchNormalization's input channel may carry a scale in its running statistics."""
    an = Analysis(graph, bn_statistics=bn_statistics)
    unknown = _UnknownShapes(graph)
    for node in graph.nodes:
        outputs_active = any(graph.is_activation(o) for o in node.output if o)
        if not outputs_active:
            continue  # constant subgraph (weights, shapes): not part of the network
        why = unknown.reason(node)
        if why:
            an.cut(node, why)
            continue
        rule = rule_for(node)
        non_float = [i for i in node.input if i and graph.is_activation(i) and not graph.is_float(i)]
        if non_float and rule is not None:
            an.cut(node, f"{node.op_type} '{node_label(node)}' takes a non-float activation '{non_float[0]}'")
            continue
        if rule is not None and not rule.reads_spread_layouts:
            _gather_spread_channels(node, an)
        if rule is None:
            an.cut(node, f"feeds {node.op_type} '{node_label(node)}', which is not positively homogeneous or not supported")
            continue
        rule.analyse(node, an)
    for name in graph.graph_outputs:
        an.freeze_layout(name, f"reaches graph output '{name}'", "graph_output")
    freeze_weights_visible_at_run_time(an)
    reconcile_stored_tensors(an)
    return an


def groups_freed_by_bn_statistics(graph: Graph, an: Analysis, groups: Groups) -> int:
    """How many more groups would be rescalable if the running statistics of BatchNorms
    carried their inputs' scales (the analysis run again with `bn_statistics`: ties and
    freezes elsewhere decide, so counting the frozen channels would not say it). 0 when the
    analysis already had the option, or froze nothing before a BatchNorm."""
    if an.bn_statistics or not any(f.category == "before_bn" for f in an.freezes):
        return 0
    return build_groups(analyse(graph, bn_statistics=True)).count - groups.count


def _gather_spread_channels(node, an: Analysis) -> None:
    """Freeze the positions of inputs whose channels are spread over several axes: the node
    needs them on one."""
    for name in dict.fromkeys(i for i in node.input if i):
        if isinstance(an.layout(name), SpreadLayout):
            an.freeze_layout(name, f"{node.op_type} '{node_label(node)}' reads '{name}', whose channels are spread "
                                   f"over several axes by the moves before it")
            an.set_layout(name, None)


class _UnknownShapes:
    """Why a node touches a float activation whose static shape is unknown (then it is a
    barrier: the path network needs every shape), naming the node where shapes were lost."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self._origin: Dict[str, str] = {}

    def _unknown(self, name: str) -> bool:
        g = self.graph
        return bool(name) and g.is_activation(name) and g.is_float(name) and g.shape(name) is None \
            and not g.is_sequence(name)  # a sequence has no tensor shape: the rules that read one say what they need

    def origin(self, name: str) -> str:
        """The first node upstream of `name` whose inputs have shapes and whose outputs do not."""
        g = self.graph
        current = name
        seen = set()
        while current not in self._origin and current not in seen:
            seen.add(current)
            node = g.producer.get(current)
            if node is None:
                break
            lost = next((i for i in node.input if self._unknown(i)), None)
            if lost is None:
                domain = f" (domain '{node.domain}')" if node.domain not in ("", "ai.onnx") else ""
                self._origin[current] = (f"{node.op_type} '{node_label(node)}'{domain}, whose output shape "
                                         f"shape inference does not know")
                break
            current = lost
        found = self._origin.get(current, f"tensor '{name}'")
        for n in seen:
            self._origin.setdefault(n, found)
        return found

    def reason(self, node) -> str:
        names = [n for n in list(node.input) + list(node.output) if self._unknown(n)]
        if not names:
            return ""
        return (f"{node.op_type} '{node_label(node)}' reads or makes '{names[0]}', whose shape is unknown after "
                f"{self.origin(names[0])}")


def freeze_weights_visible_at_run_time(an: Analysis) -> None:
    """A stored weight that the caller can feed (an initializer also listed as a graph input,
    as older exporters write them) or read (a graph output, directly or through Identity,
    Transpose or Cast) is part of the model's interface: rescaling it would change what the
    model computes when it is fed, or what it returns. Its channels keep scale 1.

    Below IR version 4 the format required every initializer to be listed as a graph input,
    and onnxruntime does not let such a model's initializers be fed: there the listing says
    nothing about the caller, and the weights are constants like any other."""
    graph = an.graph
    fed = set()
    if graph.model.ir_version >= 4:
        fed = {v.name for v in graph.model.graph.input} & set(graph.initializers)
    outputs = set(graph.graph_outputs)
    for use in an.uses:
        if use.ref is None or use.ignored:
            continue
        name = use.ref.name
        if name in fed:
            why = f"parameter '{name}' is also a graph input, so it can be fed at run time"
        else:
            shown = next((n for n in _aliases(graph, name) if n in outputs), None)
            if shown is None:
                continue
            why = f"parameter '{name}' is also returned as graph output '{shown}'"
        an.freeze(use.rows, why, "fixed_weight")
        an.freeze(use.cols, why, "fixed_weight")


def _aliases(graph: Graph, name: str):
    """`name` and every tensor that is it moved through Identity, Transpose or Cast nodes."""
    found, frontier = [name], [name]
    while frontier:
        current = frontier.pop()
        for node in graph.consumers.get(current, []):
            if node.op_type in ("Identity", "Transpose", "Cast") and node.output and node.output[0]:
                found.append(node.output[0])
                frontier.append(node.output[0])
    return found


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


def _freeze_uses(an: Analysis, uses: List[ParamUse], why: str) -> None:
    for u in uses:
        an.freeze(u.rows, why, "shared_weight")
        an.freeze(u.cols, why, "shared_weight")


def reconcile_stored_tensors(an: Analysis) -> None:
    """A stored tensor gets one scale per element, whichever node reads it.

    When several parameter uses read the same tensor, their incoming positions are tied
    element by element, and so are their outgoing ones: the scale then agrees for every
    reader. A tensor also read by a node that is not one of its parameter uses (a barrier,
    a constant subgraph) cannot change at all: its channels are frozen. Zero elements are
    free either way (any scale leaves them zero): exporters often merge equal tensors, such
    as the all-zero biases of many BatchNorms, into one initializer. Uses that rewrite the
    tensor in different ways (a BatchNorm's γ and another's running variance, with
    `bn_statistics`) cannot share it: their channels are frozen.
    """
    by_store: Dict[str, List[ParamUse]] = {}
    for use in an.uses:
        if use.ref is not None and not use.ignored:
            by_store.setdefault(use.ref.name, []).append(use)
    for name, uses in by_store.items():
        if len({u.rewrite_form for u in uses}) > 1:  # e.g. ones that are a γ and a running variance
            why = (f"parameter '{name}' is read as {' and as '.join(sorted({u.role for u in uses}))}, "
                   f"which a rescaling changes in different ways")
            _freeze_uses(an, uses, why)
            continue
        declared = {(id(u.node), u.input_name) for u in uses}
        strangers = [node for node, via in _readers(an.graph, name) if (id(node), via) not in declared]
        if len(uses) == 1 and not strangers:
            continue  # nothing to reconcile: its values need not be read
        value = an.graph.stored_value(uses[0].ref)
        nonzero = ~uses[0].unchanged(value)
        an.changing_elements[name] = nonzero
        if not nonzero.any():
            if len(uses) > 1:
                an.shared[name] = (len(uses), nonzero)
            continue
        if strangers:
            why = (f"parameter '{name}' is also read by {strangers[0].op_type} '{node_label(strangers[0])}'"
                   f", so its values cannot change")
            _freeze_uses(an, uses, why)
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
                _freeze_uses(an, uses, why)
                break
            for a, b in ((rows0, rows), (cols0, cols)):
                an.tie(a, b)
                lonely = np.concatenate([a[(b < 0) & (a >= 0)], b[(a < 0) & (b >= 0)]])
                an.freeze(lonely, why, "shared_weight")
