"""A read-only view of an ONNX graph: producers, consumers, constants and static shapes.

Nothing here modifies the model. The view is what every later step reads:
which tensors are activations (they depend on a graph input) and which are constants,
the value of a constant (folded on demand, small shape subgraphs included), where a weight
is stored (following Identity / Transpose / Cast back to an initializer or a Constant node),
and the static shape of every tensor for a batch of one.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import onnx
from onnx import TensorProto

from . import constants, protoio, shapes, storage
from .errors import ModelError
from .modelfile import ModelFile
from .protoio import FLOAT_TYPES
from .shapes import SKELETON_MAX_ELEMENTS
from .storage import StoredRef

# ONNX ops whose outputs are sequences of tensors, not tensors (they have no tensor shape).
_SEQUENCE_OPS = ("SplitToSequence", "SequenceConstruct", "SequenceEmpty", "SequenceInsert", "SequenceErase",
                 "SequenceMap")


def _subgraphs(node: onnx.NodeProto) -> List[onnx.GraphProto]:
    return [sub for a in node.attribute
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else
                        list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else [])]


def _outer_reads(body: onnx.GraphProto, found: Dict[str, None], defined: set) -> None:
    """Names that `body` (and the subgraphs inside it) reads from an enclosing scope."""
    defined = defined | {v.name for v in body.input} | {t.name for t in body.initializer} \
        | {o for n in body.node for o in n.output}
    for n in body.node:
        for i in n.input:
            if i and i not in defined:
                found.setdefault(i)
        for sub in _subgraphs(n):
            _outer_reads(sub, found, defined)


def _with_outer_reads(node: onnx.NodeProto) -> onnx.NodeProto:
    """The node as the analysis sees it: a node with subgraphs (If, Loop, Scan, ...) also reads
    every tensor of the main graph that its subgraphs use, though not through its inputs.
    Listing them as inputs of a copy (the model itself is untouched) lets every step treat
    them alike: they order the node, make its outputs activations, and are frozen at the
    barrier it is."""
    bodies = _subgraphs(node)
    if not bodies:
        return node
    found: Dict[str, None] = {}
    for body in bodies:
        _outer_reads(body, found, set())
    extra = [name for name in found if name not in node.input]
    if not extra:
        return node
    seen = onnx.NodeProto()
    seen.CopyFrom(node)
    seen.input.extend(extra)
    return seen


def _calls_local_functions(model: onnx.ModelProto) -> bool:
    local = {(f.domain, f.name) for f in model.functions}
    return bool(local) and any((n.domain, n.op_type) in local for n in model.graph.node)


def _inlined_nodes(model: onnx.ModelProto) -> Tuple[List[onnx.NodeProto], Dict[str, str]]:
    """The main graph's nodes with every call of a model-local function replaced by its body
    (recursively; onnx's inliner names each call's tensors apart and resolves the attributes a
    body refers to), and the tensors those bodies compute -> why they are not the main graph's.

    Inlined into a copy of the model without its weights: the analysis, the statistics and the
    path network see plain nodes, while the weights stay those of the main graph (passed to the
    calls as arguments, they are rescaled where they are stored). A body that cannot be inlined
    (a recursive or malformed function) leaves its calls as they are: barriers, as any op the
    analysis does not know."""
    import onnx.inliner

    try:
        view = onnx.inliner.inline_local_functions(protoio.skeleton(model))
    except Exception:
        return list(model.graph.node), {}
    main = {o for n in model.graph.node for o in n.output if o}
    called = sorted({n.op_type for n in model.graph.node
                     if (n.domain, n.op_type) in {(f.domain, f.name) for f in model.functions}})
    inside = {o: ", ".join(f"'{c}'" for c in called) for n in view.graph.node for o in n.output if o and o not in main}
    return list(view.graph.node), inside


class Graph:
    """Read-only view of `model.graph` for a batch of one.

    `input_shapes` overrides graph-input shapes (`shapes.resolve_input_shapes`); a dynamic batch (axis 0)
    becomes 1; any other dynamic dimension without an override is an error.
    """

    def __init__(self, model: Union[onnx.ModelProto, ModelFile],
                 input_shapes: Optional[Dict[str, Tuple[int, ...]]] = None,
                 values: Optional[Dict[str, np.ndarray]] = None):
        if isinstance(model, onnx.ModelProto):
            model = ModelFile(model)
        # Where weight values are read from: the ModelProto, or the input's files; `values`
        # (initializer name -> array) replace some of them (a plan solving on new weights).
        self.file = model
        self.values: Dict[str, np.ndarray] = dict(values or {})
        # Initializers whose values `constant_value` has handed out: what the shapes and the
        # analysis may have depended on (a plan re-analyses when one of them changes).
        self.values_read: set = set()
        self.model = model.proto
        g = self.model.graph
        self.initializers: Dict[str, TensorProto] = {t.name: t for t in g.initializer}
        # Calls of the model's own functions are analysed through their bodies (inlined in the
        # view; the model itself keeps them). Tensors a body computes -> the functions called.
        self.in_function_body: Dict[str, str] = {}
        nodes = list(g.node)
        if _calls_local_functions(self.model):
            nodes, self.in_function_body = _inlined_nodes(self.model)
        self.source_nodes = nodes  # as in the model (inlined), before the view's additions and order
        self.constant_nodes: Dict[str, onnx.NodeProto] = {}
        for n in nodes:
            # a Constant inside a function body is not stored in the main graph: the body is
            # shared by every call, so it is no weight the rewrite could change
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and len(n.output) == 1 \
                    and n.output[0] not in self.in_function_body:
                self.constant_nodes[n.output[0]] = n
        self.nodes: List[onnx.NodeProto] = self._topological([_with_outer_reads(n) for n in nodes])
        self.node_index = {id(n): i for i, n in enumerate(self.nodes)}
        self.producer: Dict[str, onnx.NodeProto] = {}
        self.consumers: Dict[str, List[onnx.NodeProto]] = {}
        for n in self.nodes:
            for o in n.output:
                if o:
                    self.producer[o] = n
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        self.graph_inputs: List[str] = [v.name for v in g.input if v.name not in self.initializers]
        self.graph_outputs: List[str] = [v.name for v in g.output]
        self.elem_type: Dict[str, int] = {}
        # Values that are sequences of tensors: outputs of the sequence ops, and any value
        # inference types as a sequence.
        self.sequences = {o for n in self.nodes if n.op_type in _SEQUENCE_OPS and n.domain in ("", "ai.onnx")
                          for o in n.output if o}
        self._constant_cache: Dict[str, np.ndarray] = {}
        self._small_initializers: Dict[str, np.ndarray] = {}
        self.input_shapes, input_types = shapes.resolve_input_shapes(self.model, input_shapes or {})
        self.elem_type.update(input_types)
        self.shapes: Dict[str, Optional[Tuple[int, ...]]] = {}
        self.activations = set()
        shapes.infer_shapes(self)  # fills shapes, elem_type, sequences and activations

    # ------------------------------------------------------------------ structure
    @staticmethod
    def _topological(nodes: List[onnx.NodeProto]) -> List[onnx.NodeProto]:
        """Nodes in an order where every producer precedes its consumers (stable)."""
        produced_by = {}
        for i, n in enumerate(nodes):
            for o in n.output:
                if o:
                    produced_by[o] = i
        deps = [{produced_by[x] for x in n.input if x in produced_by and produced_by[x] != i}
                for i, n in enumerate(nodes)]
        if all(all(d < i for d in ds) for i, ds in enumerate(deps)):
            return nodes
        users: Dict[int, List[int]] = {}
        for i, ds in enumerate(deps):
            for d in ds:
                users.setdefault(d, []).append(i)
        remaining = [len(ds) for ds in deps]
        import heapq
        ready = [i for i, r in enumerate(remaining) if r == 0]
        heapq.heapify(ready)
        order = []
        while ready:
            i = heapq.heappop(ready)
            order.append(i)
            for u in users.get(i, []):
                remaining[u] -= 1
                if remaining[u] == 0:
                    heapq.heappush(ready, u)
        if len(order) != len(nodes):
            raise ModelError("the graph has a cycle")
        return [nodes[i] for i in order]

    def index(self, node: onnx.NodeProto) -> int:
        return self.node_index[id(node)]

    # ------------------------------------------------------------------ shapes
    def shape(self, name: str) -> Optional[Tuple[int, ...]]:
        return self.shapes.get(name)

    # ------------------------------------------------------------------ constants
    def find_activations(self) -> set:
        """Tensors whose value depends on a graph input (everything else is a constant)."""
        act = set(self.graph_inputs)
        for n in self.nodes:
            if n.op_type == "Shape" and n.input and self.shapes.get(n.input[0]) is not None:
                continue  # a static shape is a constant
            if n.op_type == "Size" and n.input and self.shapes.get(n.input[0]) is not None:
                continue
            data_inputs = n.input[:1] if n.op_type == "CastLike" else n.input  # CastLike reads only a type
            if any(i in act for i in data_inputs if i) or (not n.input and n.op_type != "Constant"):
                act.update(o for o in n.output if o)
        return act

    def is_activation(self, name: str) -> bool:
        return name in self.activations

    def is_constant(self, name: str) -> bool:
        return bool(name) and name not in self.activations and (
            name in self.initializers or name in self.producer)

    def constant_value(self, name: str) -> np.ndarray:
        """Value of a constant tensor: an initializer's, or computed (`constants`) and kept
        when small."""
        if name in self._constant_cache:
            return self._constant_cache[name]
        if name in self.initializers:
            self.values_read.add(name)
            return self.initializer_value(name)  # not cached: may be large
        value = constants.computed_value(self, name)
        if value.size <= SKELETON_MAX_ELEMENTS and name not in self.constant_nodes:
            self._constant_cache[name] = value
        return value

    def stored_ref(self, name: str) -> Optional[StoredRef]:
        """Where the value of `name` is stored, through the nodes that only move it (`storage`);
        None when it is computed."""
        return storage.trace(self, name)

    def stored_value(self, ref: StoredRef) -> np.ndarray:
        if ref.kind == "initializer":
            return self.initializer_value(ref.name)
        return constants.constant_node_array(self.constant_nodes[ref.name])

    def set_values(self, values: Dict[str, np.ndarray]) -> None:
        """Replace initializers' values (by name) from now on; computed constants are computed
        again, since they may read them."""
        self.values.update(values)
        self._constant_cache.clear()

    def initializer_value(self, name: str) -> np.ndarray:
        """An initializer's value (one given in `values`, or read from its file when it was left there).

        A small one held in the model is decoded once and kept, read-only: the statistics read
        every bias and BatchNorm parameter at each pass (a large one is a view of its file)."""
        if name in self.values:
            return self.values[name]
        cached = self._small_initializers.get(name)
        if cached is not None:
            return cached
        value = self.file.initializer_value(self.initializers[name])
        if value.size <= SKELETON_MAX_ELEMENTS and not self.file.in_file(name):
            value.flags.writeable = False
            self._small_initializers[name] = value
        return value

    def is_sequence(self, name: str) -> bool:
        """Whether the value is a sequence of tensors (it has no tensor shape)."""
        return name in self.sequences

    def is_float(self, name: str) -> bool:
        return self.elem_type.get(name, TensorProto.FLOAT) in FLOAT_TYPES
