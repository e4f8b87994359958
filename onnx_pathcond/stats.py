"""diag(G): the path-lifting statistics of every parameter (DESIGN.md §2).

The path network is the model with every parameter squared, ReLU-like activations as the
identity, max pools as sums and averages with weights 1/n². Fed with ones (batch of one),
its forward masses F and the adjoint masses R of S = Σ outputs give each parameter element
g_i = ∂S/∂(θ_i²). Barriers cut the path network: their inputs count as outputs (adjoint 1)
and their outputs as inputs (mass 1).

`compute_diag_g` streams `(use, g)` pairs to a callback as the backward pass reaches each
parameter, so the full g never has to be held for all parameters at once.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Set, Tuple

import numpy as np
import onnx

from .errors import InputError, ModelError
from .graph import Graph
from .ops import rule_for
from .ops.elementwise import PassThroughRule
from .symmetry import Analysis, ParamUse


def _as_view(g, use: ParamUse) -> np.ndarray:
    return np.asarray(g, dtype=np.float64).reshape(use.view_shape)


class _MassStore(dict):
    """The forward masses by tensor name, counting the bytes they hold (an array shared by
    several names, e.g. the output of an identity, counts once): `live_bytes` now and
    `peak_bytes` over the run."""

    def __init__(self):
        super().__init__()
        self._holders: Dict[int, List] = {}  # id(root array) -> [bytes, names holding it]
        self.live_bytes = 0
        self.peak_bytes = 0

    @staticmethod
    def _root(value: np.ndarray) -> np.ndarray:
        while isinstance(value.base, np.ndarray):
            value = value.base
        return value

    def _hold(self, value: np.ndarray) -> None:
        root = self._root(value)
        entry = self._holders.get(id(root))
        if entry is None:
            self._holders[id(root)] = [root.nbytes, 1, root]
            self.live_bytes += root.nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        else:
            entry[1] += 1

    def _release(self, value: np.ndarray) -> None:
        key = id(self._root(value))
        entry = self._holders[key]
        entry[1] -= 1
        if entry[1] == 0:
            del self._holders[key]
            self.live_bytes -= entry[0]

    def __setitem__(self, name: str, value: np.ndarray) -> None:
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


class NumpyPathNetwork:
    """The numpy executor of the path network, and the context rules read and write.

    Memory: the forward masses are what the pass holds the longest (the adjoints live only
    for the span of the graph the backward pass is crossing). Masses made by cheap nodes
    (elementwise ops, copies, pools) are dropped once the forward pass is done with them and
    recomputed when the backward pass needs them. Masses of expensive nodes (convolutions,
    matrix products) are checkpointed: the network is cut into stretches (`_plan`); the masses
    that cross a cut are kept (checkpoints), those of the last stretch too (the backward pass
    starts there), and every other mass is dropped once its readers are done. When the
    backward pass needs a dropped mass it recomputes it, and whatever it depends on, from the
    kept masses before it, in forward order (no recursion); a recomputed mass stays until the
    backward pass reaches the node that made it, so a node's forward runs at most twice.
    Recomputation runs the same rules on the same inputs: g is bitwise the same.

    `budget` is the bytes the masses may hold at once (a target: stretches are sized so that
    the checkpoints before a stretch plus the arrays it makes fit). Checkpoints add up, so a
    budget below what any plan can meet is raised to the least one that can. `None` takes
    `default_mass_budget` of the network; `math.inf` keeps every mass of an expensive node.
    After `run()`, `mass_bytes_peak` is the most bytes the masses held at once (an array
    shared by several names counted once), `recomputed_nodes` how many node forwards the
    backward pass redid (`recomputed_expensive` of them for expensive nodes), and
    `checkpoints` the names of the masses kept at the cuts.
    """

    def __init__(self, graph: Graph, analysis: Analysis, on_g: Callable[[ParamUse, np.ndarray], None],
                 progress: Optional[Callable[[int, int], None]] = None, budget: Optional[float] = None):
        self.progress = progress or (lambda done, total: None)
        import inspect

        try:
            self._on_g_takes_factors = len(inspect.signature(on_g).parameters) >= 3
        except (TypeError, ValueError):
            self._on_g_takes_factors = False
        self.graph = graph
        self.analysis = analysis
        self._on_g = on_g
        if budget is not None and not budget > 0:
            raise ValueError(f"the mass budget must be a positive number of bytes, not {budget}")
        self.budget = budget
        self._mass = _MassStore()
        self._adjoint: Dict[str, np.ndarray] = {}
        # Dropped masses, by name, with the node that recomputes them.
        self._recompute: Dict[str, onnx.NodeProto] = {}
        self._order: Dict[int, int] = {}  # id(node) -> its place in the forward pass
        self.recomputed_nodes = 0
        self.recomputed_expensive = 0
        self.checkpoints: Set[str] = set()

    @property
    def mass_bytes_peak(self) -> int:
        return self._mass.peak_bytes

    # ------------------------------------------------------------ context for rules
    def mass(self, name: str) -> np.ndarray:
        value = self._mass.get(name)
        if value is None and name in self._recompute:
            self._recompute_for(name)  # dropped after the forward pass: redo it
            value = self._mass.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def set_mass(self, name: str, value: np.ndarray) -> None:
        self._mass[name] = np.asarray(value, dtype=np.float64)

    def adjoint(self, name: str) -> np.ndarray:
        adj = self._adjoint.get(name)
        if adj is None:
            return np.zeros(self._activation_shape(name))
        return adj

    def add_adjoint(self, name: str, value: np.ndarray) -> None:
        value = np.asarray(value, dtype=np.float64)
        if name in self._adjoint:
            self._adjoint[name] = self._adjoint[name] + value
        else:
            self._adjoint[name] = value  # never modified in place: sums build new arrays

    def use(self, node, role: str) -> ParamUse:
        return self.analysis.uses_by_node[self.graph.index(node)][role]

    def has_use(self, node, role: str) -> bool:
        return role in self.analysis.uses_by_node.get(self.graph.index(node), {})

    def param_stored(self, node, role: str) -> Tuple[ParamUse, np.ndarray]:
        """A parameter in its stored dtype (no copy), in the layout its op sees."""
        use = self.use(node, role)
        if use.ref is not None:
            return use, use.ref.to_view(self.graph.stored_value(use.ref))
        return use, np.asarray(self.graph.constant_value(use.input_name))

    def param(self, node, role: str) -> Tuple[ParamUse, np.ndarray]:
        """A parameter's value in float64, in the layout its op sees."""
        use, value = self.param_stored(node, role)
        return use, np.asarray(value, dtype=np.float64)

    def param_sq(self, node, role: str) -> Tuple[ParamUse, np.ndarray]:
        """A parameter squared, in float64 (one pass from the stored dtype)."""
        use, value = self.param_stored(node, role)
        if value.dtype.name == "bfloat16":
            value = value.astype(np.float32)
        return use, np.square(value, dtype=np.float64)

    def emit_g(self, use: ParamUse, g, factors=None) -> None:
        """Hand over a use's g; `factors` = (left, right) when g = left @ rightᵀ over its first
        two axes (dense layers: lets the criterion keep a large block in factored form). With
        factors, g may be a function that computes it: the criterion may not need it at all."""
        if use.ignored:
            return
        if factors is not None and self._on_g_takes_factors:
            self._on_g(use, g if callable(g) else _as_view(g, use), factors)
        else:
            self._on_g(use, _as_view(g() if callable(g) else g, use))

    # ------------------------------------------------------------ the passes
    def _activation_shape(self, name: str) -> Tuple[int, ...]:
        shape = self.graph.shape(name)
        if shape is None:
            raise ModelError(f"the shape of tensor '{name}' is unknown; the statistics need static shapes "
                             f"(give the input shapes with --input-shape)")
        return shape

    def run(self) -> None:
        g = self.graph
        cut = self.analysis.cut_nodes
        for name in g.graph_inputs:
            if g.is_float(name):
                self._mass[name] = np.ones(self._activation_shape(name))
        active = [node for node in g.nodes if any(g.is_activation(o) for o in node.output if o)]
        self._order = {id(node): t for t, node in enumerate(active)}
        total = 2 * len(active)
        readers: Dict[str, int] = {}
        for node in active:
            for i in set(node.input):
                readers[i] = readers.get(i, 0) + 1
        self.checkpoints, kept_from = self._plan(active)
        for done, node in enumerate(active, start=1):
            self._forward(node)
            for i in set(node.input):
                readers[i] = readers.get(i, 1) - 1
                producer = g.producer.get(i)
                if readers[i] == 0 and producer is not None and i in self._mass and i not in g.graph_outputs \
                        and i not in self.checkpoints \
                        and (self._cheap(producer) or self._order.get(id(producer), kept_from) < kept_from):
                    del self._mass[i]
                    self._recompute[i] = producer
            self.progress(done, total)
        for name in g.graph_outputs:
            if self._has_mass(name):
                self.add_adjoint(name, np.ones(self._activation_shape(name)))
        for done, node in enumerate(reversed(active), start=len(active) + 1):
            if g.index(node) in cut:
                for i in dict.fromkeys(node.input):
                    if i and self._has_mass(i):
                        self.add_adjoint(i, np.ones(self._activation_shape(i)))
            else:
                rule_for(node).backward(node, self)
            self.progress(done, total)
            for o in node.output:  # every consumer of o came later and is done with it
                self._adjoint.pop(o, None)
                self._recompute.pop(o, None)
                if o not in g.graph_outputs:
                    self._mass.pop(o, None)

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
        cut = self.analysis.cut_nodes
        owner: Dict[str, str] = {}  # a mass -> the mass whose array it is (identities share)
        size: Dict[str, int] = {}
        made = [0] * len(active)  # bytes of the new arrays each node's forward makes
        last_read: Dict[str, int] = {}
        for t, node in enumerate(active):
            for i in node.input:
                last_read[i] = t
            alias = g.index(node) not in cut and isinstance(rule_for(node), PassThroughRule)
            for o in node.output:
                if not o or not g.is_activation(o):
                    continue
                if alias:
                    owner[o] = owner.get(node.input[0], node.input[0])
                    continue
                owner[o] = o
                shape = g.shape(o)
                size[o] = 8 * int(np.prod(shape, dtype=np.int64)) if shape is not None else 0
                made[t] += size[o]
        total = sum(made)
        budget = self.budget if self.budget is not None else default_mass_budget(total)
        if total <= budget:
            return set(), 0
        # the masses crossing each point of the network (made before node t, read at t or later)
        crossing: List[frozenset] = []
        live: Set[str] = set()
        for t, node in enumerate(active):
            crossing.append(frozenset(live))
            for i in node.input:
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
        g = self.graph
        cut = self.analysis.cut_nodes
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
            if g.index(node) not in cut:  # a barrier's outputs are ones: it reads nothing
                stack.extend(i for i in node.input if i)
        for place in sorted(todo):
            node = todo[place]
            for o in node.output:
                self._recompute.pop(o, None)
            self._forward(node)
            self.recomputed_nodes += 1
            self.recomputed_expensive += not self._cheap(node)

    def _forward(self, node) -> None:
        g = self.graph
        if g.index(node) in self.analysis.cut_nodes:
            for o in node.output:
                if o and g.is_activation(o) and g.is_float(o):
                    self._mass[o] = np.ones(self._activation_shape(o))
        else:
            rule_for(node).forward(node, self)

    def _has_mass(self, name: str) -> bool:
        return name in self._mass or name in self._recompute

    def _cheap(self, node) -> bool:
        if self.graph.index(node) in self.analysis.cut_nodes:
            return True
        return getattr(rule_for(node), "cheap_forward", False)


def default_mass_budget(total_bytes: float) -> float:
    """The default `budget` of `NumpyPathNetwork`, from the bytes all the masses of a network
    would take: a quarter of them, and never below 16 MiB (a network whose masses are that
    small keeps them all)."""
    return max(total_bytes / 4, 16 * 2 ** 20)


BACKENDS = ("auto", "numpy", "onnxruntime")


def resolve_backend(backend: str, device: str = "cpu") -> str:
    """What `auto` means: onnxruntime for a GPU, numpy on the CPU.

    Measured on ResNet-50 with 2 CPU cores (benchmarks/bench_pipeline.py), the numpy executor
    computes diag(G) in 0.7 s with a 408 MiB peak where onnxruntime's CPU provider needs 1.8 s
    and 965 MB (no float64 convolution kernels there: the graph spells them out with slices
    and matrix products). So `auto` takes onnxruntime only when CUDA is asked for and present,
    and numpy otherwise; both can always be chosen by name.
    """
    if backend not in BACKENDS:
        raise InputError(f"unknown backend '{backend}' (choose {', '.join(BACKENDS)})")
    if backend != "auto":
        return backend
    from .ortstats import cuda_available

    return "onnxruntime" if device == "cuda" and cuda_available() else "numpy"


def compute_diag_g(graph: Graph, analysis: Analysis, on_g: Callable[[ParamUse, np.ndarray], None],
                   backend: str = "numpy", device: str = "cpu",
                   progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """Run the path network, calling `on_g(use, g)` once per parameter use.

    Returns what ran it: backend, execution providers, precision, and any notice.
    """
    if device not in ("cpu", "cuda"):
        raise InputError(f"unknown device '{device}' (choose cpu or cuda)")
    requested = backend
    backend = resolve_backend(backend, device)
    if backend == "numpy":
        NumpyPathNetwork(graph, analysis, on_g, progress).run()
        notice = ""
        if device == "cuda":
            notice = ("CUDA was asked for but onnxruntime has no CUDA execution provider here (install "
                      "onnx-pathcond[gpu]); diag(G) ran on the CPU with numpy") if requested == "auto" else \
                "the numpy backend runs on the CPU only; --device cuda needs --backend onnxruntime"
        return {"backend": "numpy", "providers": ["numpy"], "precision": "float64", "notice": notice}
    from . import ortstats

    return ortstats.compute_diag_g(graph, analysis, on_g, device=device).as_dict()


def diag_g_by_tensor(graph: Graph, analysis: Analysis, backend: str = "numpy",
                     device: str = "cpu") -> Dict[str, np.ndarray]:
    """g of every rewritable parameter, in its stored layout, summed over its uses.

    Holds all of g at once: for tests and inspection, not for the main pipeline.
    """
    out: Dict[str, np.ndarray] = {}

    def collect(use: ParamUse, g: np.ndarray) -> None:
        key = use.ref.name if use.ref is not None else use.input_name
        stored = use.ref.to_stored(g) if use.ref is not None else g
        out[key] = out[key] + stored if key in out else stored.copy()

    compute_diag_g(graph, analysis, collect, backend=backend, device=device)
    return out
