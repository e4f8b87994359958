"""The one walk of the path network (docs/design.md §5), for every executor.

Graph inputs and the outputs of barriers are masses of ones; the inputs of barriers and the
graph outputs receive adjoints of ones (the path network is cut at barriers). The forward pass
runs each active node's primitives in topological order, the backward pass runs their
adjoints in reverse, and each primitive hands its parameter's statistic to the executor.

Memory: the forward masses are what the pass holds the longest (the adjoints live only for
the span of the graph the backward pass is crossing). Masses made by cheap primitives
(elementwise ops, copies, pools) are dropped once the forward pass is done with them and
recomputed when the backward pass needs them. Masses of expensive nodes (convolutions, matrix
products) are checkpointed: the network is cut into stretches (`_plan`); the masses that
cross a cut are kept (checkpoints), those of the last stretch too (the backward pass starts
there), and every other mass is dropped once its readers are done. When the backward pass
needs a dropped mass it recomputes it, and whatever it depends on, from the kept masses
before it, in forward order (no recursion); a recomputed mass stays until the backward pass
reaches the node that made it, so a node's forward runs at most twice. Recomputation runs the
same primitives on the same inputs: g is bitwise the same.

An executor with `counts_roundings` (the numpy one in float32) also gets its roundings
counted: each mass and adjoint carries the longest chain of roundings behind it, from the
executor's `roundings(prim)` per primitive and one per addition of parts; `rounding_depth`
is then the most that any statistic entry went through (docs/design.md §2.6).

`budget` is the bytes the masses may hold at once (a target: stretches are sized so that the
checkpoints before a stretch plus the arrays it makes fit). Checkpoints add up, so a budget
below what any plan can meet is raised to the least one that can. `None` takes the
executor's default; `math.inf` keeps every mass of an expensive node.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Set, Tuple

import numpy as np
import onnx

from ..channels import Analysis, ParamUse
from ..errors import ModelError
from ..graph import Graph
from ..ops import rule_for
from .primitives import Identity, Primitive, Weight


class PathContext:
    """What an op rule's `path(node, ctx)` reads to describe its node: shapes, the parameter
    uses the analysis declared, what the analysis computed for the node, and small constants."""

    def __init__(self, graph: Graph, analysis: Analysis):
        self.graph = graph
        self.analysis = analysis

    def shape(self, name: str) -> Tuple[int, ...]:
        shape = self.graph.shape(name)
        if shape is None:
            raise ModelError(f"the statistics need the static shape of tensor '{name}', which shape inference "
                             f"could not find")
        return shape

    def is_activation(self, name: str) -> bool:
        return self.graph.is_activation(name)

    def use(self, node: onnx.NodeProto, role: str) -> ParamUse:
        return self.analysis.uses_by_node[self.graph.index(node)][role]

    def has_use(self, node: onnx.NodeProto, role: str) -> bool:
        return role in self.analysis.uses_by_node.get(self.graph.index(node), {})

    def weight(self, node: onnx.NodeProto, role: str, gain: float = 1.0) -> Weight:
        """The parameter use `role` of the node, squared, as a factor of the path network."""
        return Weight(self.use(node, role), gain=gain)

    def data(self, node: onnx.NodeProto):
        """What the node's rule computed once during the analysis (`an.node_data`)."""
        return self.analysis.node_data[self.graph.index(node)]

    def constant(self, name: str) -> np.ndarray:
        return np.asarray(self.graph.constant_value(name), dtype=np.float64)

    def param_value(self, node: onnx.NodeProto, role: str) -> np.ndarray:
        """A small parameter (a per-channel vector) in float64, in the layout its op sees."""
        use = self.use(node, role)
        if use.ref is None:
            return self.constant(use.input_name)
        value = self.graph.stored_value(use.ref)
        if value.dtype.name == "bfloat16":
            value = value.astype(np.float32)
        return np.asarray(use.ref.to_view(np.asarray(value, dtype=np.float64)))


class _MassStore(dict):
    """The forward masses by tensor name, counting the bytes they hold (an array shared by
    several names, e.g. the output of an identity, counts once): `live_bytes` now and
    `peak_bytes` over the run. `measure(handle)` gives (key of the buffer, bytes, buffer) or
    None for handles that hold no memory of this process."""

    def __init__(self, measure):
        super().__init__()
        self._measure = measure
        self._holders: Dict[object, List] = {}  # buffer key -> [bytes, names holding it, buffer]
        self.live_bytes = 0
        self.peak_bytes = 0

    def _hold(self, value) -> None:
        measured = self._measure(value)
        if measured is None:
            return
        key, nbytes, buffer = measured
        entry = self._holders.get(key)
        if entry is None:
            self._holders[key] = [nbytes, 1, buffer]
            self.live_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        else:
            entry[1] += 1

    def _release(self, value) -> None:
        measured = self._measure(value)
        if measured is None:
            return
        entry = self._holders[measured[0]]
        entry[1] -= 1
        if entry[1] == 0:
            del self._holders[measured[0]]
            self.live_bytes -= entry[0]

    def __setitem__(self, name: str, value) -> None:
        old = self.get(name)
        self._hold(value)  # before releasing the old value: the same array may be set again
        if old is not None:
            self._release(old)
        super().__setitem__(name, value)

    def __delitem__(self, name: str) -> None:
        self._release(self[name])
        super().__delitem__(name)

    _missing = object()

    def pop(self, name: str, default=_missing):
        if name in self:
            value = super().pop(name)
            self._release(value)
            return value
        if default is self._missing:
            raise KeyError(name)
        return default


class PathWalk:
    """Runs the path network of an analysed graph on an executor (see the module docstring).

    After `run()`: `mass_bytes_peak` is the most bytes the masses held at once (an array
    shared by several names counted once), `recomputed_nodes` how many node forwards the
    backward pass redid (`recomputed_expensive` of them for expensive nodes),
    `checkpoints` the names of the masses kept at the cuts, and `rounding_depth` the most
    roundings behind one statistic entry (0 unless the executor counts them).
    """

    def __init__(self, graph: Graph, analysis: Analysis, executor, progress: Optional[Callable[[int, int], None]] = None,
                 budget: Optional[float] = None):
        if budget is not None and not budget > 0:
            raise ValueError(f"the mass budget must be a positive number of bytes, not {budget}")
        self.graph = graph
        self.analysis = analysis
        self.executor = executor
        self.progress = progress or (lambda done, total: None)
        self.budget = budget
        self._mass = _MassStore(executor.measure)
        self._adjoint: Dict[str, list] = {}
        self._recompute: Dict[str, onnx.NodeProto] = {}  # dropped masses -> the node that remakes them
        self._order: Dict[int, int] = {}  # id(node) -> its place in the forward pass
        self._forms: Dict[int, List[Primitive]] = {}  # node index -> its primitives
        self.recomputed_nodes = 0
        self.recomputed_expensive = 0
        self.checkpoints: Set[str] = set()
        self.context = PathContext(graph, analysis)
        self._counting = bool(getattr(executor, "counts_roundings", False))
        self._roundings: Dict[int, Tuple[int, int, int]] = {}  # id(prim) -> executor.roundings(prim)
        self._mass_depth: Dict[str, int] = {}
        self._adjoint_depth: Dict[str, int] = {}
        self.rounding_depth = 0

    @property
    def mass_bytes_peak(self) -> int:
        return self._mass.peak_bytes

    # ------------------------------------------------------------ masses and adjoints
    def _shape(self, name: str) -> Tuple[int, ...]:
        return self.context.shape(name)

    def mass(self, name: str):
        """The forward mass of a tensor the walk still holds (after `run()`: the graph outputs)."""
        return self._mass[name]

    def _mass_of(self, name: str):
        value = self._mass.get(name)
        if value is None and name in self._recompute:
            self._recompute_for(name)  # dropped after the forward pass: redo it
            value = self._mass.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def _has_mass(self, name: str) -> bool:
        return name in self._mass or name in self._recompute

    def _rounds(self, prim: Primitive) -> Tuple[int, int, int]:
        counts = self._roundings.get(id(prim))
        if counts is None:
            counts = self._roundings[id(prim)] = self.executor.roundings(prim)
        return counts

    def _add_adjoint(self, name: str, value, depth: int = 0) -> None:
        parts = self._adjoint.setdefault(name, [])
        if self._counting:
            before = self._adjoint_depth.get(name) if parts else None
            self._adjoint_depth[name] = depth if before is None else max(before, depth) + 1
        parts.append((value, False))
        if self.executor.eager_sums and len(parts) > 1:
            self._adjoint[name] = [(self.executor.total(parts, self._shape(name)), False)]

    def _adjoint_of(self, name: str):
        parts = self._adjoint.get(name)
        if not parts:
            return self.executor.zeros(self._shape(name))
        if len(parts) > 1:
            parts[:] = [(self.executor.total(parts, self._shape(name)), False)]
        return parts[0][0]

    # ------------------------------------------------------------ the passes
    def _is_cut(self, node) -> bool:
        return self.graph.index(node) in self.analysis.cut_nodes

    def _form(self, node) -> List[Primitive]:
        index = self.graph.index(node)
        form = self._forms.get(index)
        if form is None:
            form = self._forms[index] = list(rule_for(node).path(node, self.context))
        return form

    def _cheap(self, node) -> bool:
        return self._is_cut(node) or all(p.cheap for p in self._form(node))

    def _aliases(self, node) -> bool:
        """Whether the node's output is its input itself (an identity of the same shape)."""
        if self._is_cut(node):
            return False
        form = self._form(node)
        return len(form) == 1 and isinstance(form[0], Identity) and \
            self.graph.shape(form[0].x) == self.graph.shape(form[0].y)

    def _reads(self, node) -> List[str]:
        """The tensors the node's forward reads: its inputs, and any other tensor its primitives
        name (a SequenceAt reads the tensor its sequence was split from)."""
        names = [i for i in node.input if i]
        if not self._is_cut(node):
            names += [i for prim in self._form(node) for i in prim.inputs]
        return list(dict.fromkeys(names))

    def run(self) -> None:
        g = self.graph
        ex = self.executor
        for name in g.graph_inputs:
            if g.is_float(name):
                self._mass[name] = ex.ones(self._shape(name))
        active = [node for node in g.nodes if any(g.is_activation(o) for o in node.output if o)]
        for node in active:
            if not self._is_cut(node):
                self._form(node)
        self._order = {id(node): t for t, node in enumerate(active)}
        total = 2 * len(active)
        readers: Dict[str, int] = {}
        for node in active:
            for i in self._reads(node):
                readers[i] = readers.get(i, 0) + 1
        self.checkpoints, kept_from = self._plan(active)
        for done, node in enumerate(active, start=1):
            self._forward(node)
            for i in self._reads(node):
                readers[i] = readers.get(i, 1) - 1
                producer = g.producer.get(i)
                if readers[i] == 0 and producer is not None and i in self._mass and i not in g.graph_outputs \
                        and i not in self.checkpoints \
                        and (self._cheap(producer) or self._order.get(id(producer), kept_from) < kept_from):
                    del self._mass[i]
                    self._recompute[i] = producer
            self.progress(done, total)
        ex.begin_backward()
        for name in g.graph_outputs:
            if self._has_mass(name):
                self._add_adjoint(name, ex.ones(self._shape(name)))
        for done, node in enumerate(reversed(active), start=len(active) + 1):
            if self._is_cut(node):
                for i in dict.fromkeys(node.input):
                    if i and self._has_mass(i):
                        self._add_adjoint(i, ex.ones(self._shape(i)))
            else:
                self._backward(node)
            self.progress(done, total)
            for o in node.output:  # every consumer of o came later and is done with it
                self._adjoint.pop(o, None)
                self._recompute.pop(o, None)
                if o not in g.graph_outputs:
                    self._mass.pop(o, None)

    def _forward(self, node) -> None:
        g, ex = self.graph, self.executor
        if self._is_cut(node):
            for o in node.output:  # (a barrier's output of unknown shape is read by barriers only)
                if o and g.is_activation(o) and g.is_float(o) and g.shape(o) is not None:
                    self._mass[o] = ex.ones(self._shape(o))
            return
        parts: Dict[str, list] = {}
        depths: Dict[str, List[int]] = {}
        for prim in self._form(node):
            values = ex.forward(prim, [self._mass_of(i) for i in prim.inputs])
            if self._counting:
                depth = max((self._mass_depth.get(i, 0) for i in prim.inputs), default=0) + self._rounds(prim)[0]
            for o, value in zip(prim.outputs, values):
                parts.setdefault(o, []).append((value, not prim.aliases))
                if self._counting:
                    depths.setdefault(o, []).append(depth)
        for o, contributions in parts.items():
            self._mass[o] = ex.total(contributions, self._shape(o))
            if self._counting:
                self._mass_depth[o] = max(depths[o]) + len(contributions) - 1

    def _backward(self, node) -> None:
        ex = self.executor
        for prim in reversed(self._form(node)):
            adjoints = [self._adjoint_of(o) for o in prim.outputs]
            masses = [self._mass_of(i) for i in prim.inputs] if prim.reads_inputs_backward else None
            into_inputs, statistics = ex.backward(prim, masses, adjoints)
            into_depth = 0
            if self._counting:
                _, backward, statistic = self._rounds(prim)
                reached = max((self._adjoint_depth.get(o, 0) for o in prim.outputs), default=0)
                into_depth = reached + backward
                if statistics:
                    read = max((self._mass_depth.get(i, 0) for i in prim.inputs), default=0)
                    self.rounding_depth = max(self.rounding_depth, reached + read + statistic)
            for name, value in zip(prim.inputs, into_inputs):
                if value is not None:
                    self._add_adjoint(name, value, into_depth)
            for use, g, factors in statistics:
                if not use.ignored:
                    ex.emit(use, g, factors)

    def _plan(self, active) -> Tuple[Set[str], int]:
        """Where to cut the network: (the masses kept as checkpoints, the place in `active`
        from which the forward pass keeps the masses of expensive nodes: the last stretch).

        While the backward pass crosses a stretch it holds the checkpoints made before it
        (they live until the backward pass reaches the nodes that made them) plus the arrays
        the stretch's nodes make. The walk goes in forward order and lets a stretch grow
        while that stays within the budget; then it cuts the network at the point of the
        stretch's second half where the fewest new bytes cross, and what crosses becomes a
        checkpoint. Checkpoints add up, so a budget can be too small for any plan of this
        form: then the smallest budget that has one is taken (found by bisection).
        """
        g = self.graph
        itemsize = int(getattr(self.executor, "itemsize", 8))  # bytes per element of a mass
        owner: Dict[str, str] = {}  # a mass -> the mass whose array it is (identities share)
        size: Dict[str, int] = {}
        made = [0] * len(active)  # bytes of the new arrays each node's forward makes
        last_read: Dict[str, int] = {}
        for t, node in enumerate(active):
            for i in self._reads(node):
                last_read[i] = t
            alias = self._aliases(node)
            for o in node.output:
                if not o or not g.is_activation(o):
                    continue
                if alias:
                    owner[o] = owner.get(node.input[0], node.input[0])
                    continue
                owner[o] = o
                shape = g.shape(o)
                size[o] = itemsize * int(np.prod(shape, dtype=np.int64)) if shape is not None else 0
                made[t] += size[o]
        total = sum(made)
        budget = self.budget if self.budget is not None else self.executor.default_budget(total)
        if total <= budget:
            return set(), 0
        # the masses crossing each point of the network (made before node t, read at t or later)
        crossing: List[frozenset] = []
        live: Set[str] = set()
        for t, node in enumerate(active):
            crossing.append(frozenset(live))
            for i in self._reads(node):
                if last_read.get(i) == t:
                    live.discard(i)
            live.update(o for o in node.output if o in owner and last_read.get(o, -1) > t)

        def plan(limit: float, tail: Optional[int] = None):
            """Cuts for `limit`, the last one before node `tail` when given; None if none fit."""
            checkpoints: Set[str] = set()
            kept_arrays: Set[str] = set()

            def new_bytes(t: int) -> int:
                return sum(size.get(a, 0) for a in {owner[x] for x in crossing[t]} - kept_arrays)

            def cut_before(t: int) -> int:
                checkpoints.update(crossing[t])
                added = new_bytes(t)
                kept_arrays.update(owner[x] for x in crossing[t])
                return added

            held = start = kept = 0  # `held`: bytes the current stretch makes; `kept`: checkpoints'
            for t, step in enumerate(made):
                if t == tail:
                    kept += cut_before(t)
                    return (checkpoints, t) if kept + sum(made[t:]) <= limit else None
                if held and kept + held + step > limit:
                    later = range(start + 1 + (t - start) // 2, t + 1)  # cut before one of these
                    start = min(later, key=lambda c: (new_bytes(c), -c))
                    kept += cut_before(start)
                    held = sum(made[start:t])
                    if kept + step > limit:
                        return None  # the checkpoints alone fill the budget
                held += step
            return checkpoints, start

        limit, best = budget, plan(budget)
        if best is None:
            low, high = budget, float(total)
            best = set(), 0  # no cut at all fits any limit ≥ total
            for _ in range(16):
                middle = (low + high) / 2
                found = plan(middle)
                if found is None:
                    low = middle
                else:
                    high, best = middle, found
                if high - low < 0.01 * high:
                    break
            limit = high
        # Where the budget leaves room, make the last stretch (kept, never recomputed) longer:
        # the earliest start for it that still fits, by bisection.
        low, high = 1, best[1]
        while low < high:
            middle = (low + high) // 2
            found = plan(limit, middle)
            if found is None:
                low = middle + 1
            else:
                high, best = middle, found
        return best

    def _recompute_for(self, name: str) -> None:
        """Recompute a dropped mass: first find every dropped mass it needs, back to the ones
        held, then run their nodes in forward order (no recursion, however long the chain)."""
        todo: Dict[int, onnx.NodeProto] = {}
        stack = [name]
        while stack:
            current = stack.pop()
            if current in self._mass:
                continue
            node = self._recompute.get(current)
            if node is None:
                continue
            place = self._order[id(node)]
            if place in todo:
                continue
            todo[place] = node
            if not self._is_cut(node):  # a barrier's outputs are ones: it reads nothing
                stack.extend(self._reads(node))
        for place in sorted(todo):
            node = todo[place]
            for o in node.output:
                self._recompute.pop(o, None)
            self._forward(node)
            self.recomputed_nodes += 1
            self.recomputed_expensive += not self._cheap(node)
