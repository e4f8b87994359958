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

from typing import Callable, Dict, Optional, Tuple

import numpy as np
import onnx

from .errors import InputError, ModelError
from .graph import Graph
from .ops import rule_for
from .symmetry import Analysis, ParamUse


def _as_view(g, use: ParamUse) -> np.ndarray:
    return np.asarray(g, dtype=np.float64).reshape(use.view_shape)


class NumpyPathNetwork:
    """The numpy executor of the path network, and the context rules read and write."""

    def __init__(self, graph: Graph, analysis: Analysis, on_g: Callable[[ParamUse, np.ndarray], None],
                 progress: Optional[Callable[[int, int], None]] = None):
        self.progress = progress or (lambda done, total: None)
        import inspect

        try:
            self._on_g_takes_factors = len(inspect.signature(on_g).parameters) >= 3
        except (TypeError, ValueError):
            self._on_g_takes_factors = False
        self.graph = graph
        self.analysis = analysis
        self._on_g = on_g
        self._mass: Dict[str, np.ndarray] = {}
        self._adjoint: Dict[str, np.ndarray] = {}
        # Masses made by cheap nodes are dropped once the forward pass is done with them and
        # recomputed if the backward pass needs them: only the outputs of the expensive ops
        # (convolutions, matrix products) stay in memory between the passes.
        self._recompute: Dict[str, onnx.NodeProto] = {}

    # ------------------------------------------------------------ context for rules
    def mass(self, name: str) -> np.ndarray:
        if name not in self._mass and name in self._recompute:
            self._forward(self._recompute.pop(name))  # dropped after the forward pass: redo it
        return self._mass[name]

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

    def param(self, node, role: str) -> Tuple[ParamUse, np.ndarray]:
        """A parameter's value in float64, in the layout its op sees."""
        use = self.use(node, role)
        if use.ref is not None:
            value = use.ref.to_view(self.graph.stored_value(use.ref))
        else:
            value = self.graph.constant_value(use.input_name)
        return use, np.asarray(value, dtype=np.float64)

    def param_sq(self, node, role: str) -> Tuple[ParamUse, np.ndarray]:
        """A parameter squared, in float64 (one pass from the stored dtype)."""
        use = self.use(node, role)
        value = use.ref.to_view(self.graph.stored_value(use.ref)) if use.ref is not None \
            else np.asarray(self.graph.constant_value(use.input_name))
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
        total = 2 * len(active)
        readers: Dict[str, int] = {}
        for node in active:
            for i in set(node.input):
                readers[i] = readers.get(i, 0) + 1
        for done, node in enumerate(active, start=1):
            self._forward(node)
            for i in set(node.input):
                readers[i] = readers.get(i, 1) - 1
                producer = g.producer.get(i)
                if readers[i] == 0 and producer is not None and i in self._mass and i not in g.graph_outputs \
                        and self._cheap(producer):
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



BACKENDS = ("auto", "numpy", "onnxruntime")


def resolve_backend(backend: str, device: str = "cpu") -> str:
    """What `auto` means: onnxruntime for a GPU, numpy on the CPU.

    Measured on ResNet-50 with 2 CPU cores (benchmarks/bench_pipeline.py), the numpy executor
    computes diag(G) in 0.8 s with a 433 MB peak where onnxruntime's CPU provider needs 1.8 s
    and 965 MB (no float64 convolution kernels there: the graph spells them out with slices
    and matrix products). So `auto` takes onnxruntime only when CUDA is asked for and present,
    and numpy otherwise; both can always be chosen by name.
    """
    if backend not in BACKENDS:
        raise InputError(f"unknown backend '{backend}' (choose {', '.join(BACKENDS)})")
    if backend != "auto":
        return backend
    if device != "cuda":
        return "numpy"
    try:
        import onnxruntime
    except ImportError:
        return "numpy"
    return "onnxruntime" if "CUDAExecutionProvider" in onnxruntime.get_available_providers() else "numpy"


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

    info = ortstats.compute_diag_g(graph, analysis, on_g, device=device)
    return {"backend": "onnxruntime", "providers": info.providers, "precision": info.precision,
            "notice": info.notice, "graph_nodes": info.nodes}


def diag_g_by_tensor(graph: Graph, analysis: Analysis, backend: str = "numpy") -> Dict[str, np.ndarray]:
    """g of every rewritable parameter, in its stored layout, summed over its uses.

    Holds all of g at once: for tests and inspection, not for the main pipeline.
    """
    out: Dict[str, np.ndarray] = {}

    def collect(use: ParamUse, g: np.ndarray) -> None:
        key = use.ref.name if use.ref is not None else use.input_name
        stored = use.ref.to_stored(g) if use.ref is not None else g
        out[key] = out[key] + stored if key in out else stored.copy()

    compute_diag_g(graph, analysis, collect, backend=backend)
    return out
