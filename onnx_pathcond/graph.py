"""A read-only view of an ONNX graph: producers, consumers, constants and static shapes.

Nothing here modifies the model. The view is what every later step reads:
which tensors are activations (they depend on a graph input) and which are constants,
the value of a constant (folded on demand, small shape subgraphs included), where a weight
is stored (following Identity / Transpose / Cast back to an initializer or a Constant node),
and the static shape of every tensor for a batch of one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import InputError, ModelError
from .modelfile import LEFT_IN_FILE_ABOVE, ModelFile
from .nodes import attr, node_label
from . import protoio
from .protoio import FLOAT_TYPES  # noqa: F401  (the float element types; rules import them from here)

# Tensors above this many elements are left out of the skeleton used for shape inference:
# shape inference only needs their type and shape, and copying them would double memory.
# It is the size above which a float initializer may have no data here (left in its file by
# `ModelFile`), so that no tensor without its data reaches shape inference.
SKELETON_MAX_ELEMENTS = LEFT_IN_FILE_ABOVE

# The most elements a graph input may have: the verification feeds random inputs of this
# shape, and larger ones would neither fit in memory nor in onnxruntime's 32-bit sizes of some kernels.
MAX_INPUT_ELEMENTS = 2 ** 31

# Nodes that only move a weight around; a weight behind them can still be rewritten in place.
_WEIGHT_TRANSPARENT_OPS = ("Identity", "Transpose", "Cast")

# ONNX ops whose outputs are sequences of tensors, not tensors (they have no tensor shape).
_SEQUENCE_OPS = ("SplitToSequence", "SequenceConstruct", "SequenceEmpty", "SequenceInsert", "SequenceErase",
                 "SequenceMap")


def split_to_sequence_pieces(length: int, split: Optional[np.ndarray]) -> Optional[List[Tuple[int, int]]]:
    """The [start, stop) ranges along the axis of the tensors SplitToSequence makes from an axis
    of `length` elements: pieces of one element when `split` is None, chunks of `split` (the
    last one shorter) for a scalar, the given lengths for a 1-D `split`. None for a `split`
    the op refuses (lengths that do not add up, a chunk size below 1)."""
    if split is None:
        sizes = [1] * length
    elif np.ndim(split) == 0:
        chunk = int(split)
        if chunk < 1:
            return None
        sizes = [min(chunk, length - start) for start in range(0, length, chunk)]
    else:
        sizes = [int(v) for v in np.ravel(split)]
        if sum(sizes) != length or any(v < 0 for v in sizes):
            return None
    stops = np.cumsum(sizes).tolist()
    return [(stop - size, stop) for size, stop in zip(sizes, stops)]



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


def parse_input_shapes(specs: Sequence[str]) -> Dict[str, Tuple[int, ...]]:
    """Parse `NAME:D0xD1x...` strings (as given to --input-shape) into a dict."""
    shapes: Dict[str, Tuple[int, ...]] = {}
    for spec in specs:
        name, sep, dims = spec.rpartition(":")
        if not sep or not name:
            raise InputError(f"--input-shape '{spec}' is not of the form NAME:D0xD1x... (e.g. x:1x3x224x224)")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            raise InputError(f"--input-shape '{spec}': dimensions must be positive integers separated by 'x'") from None
        if not shape or any(d <= 0 for d in shape):
            raise InputError(f"--input-shape '{spec}': dimensions must be positive integers separated by 'x'")
        elements = int(np.prod(shape, dtype=object))  # Python integers: 99999999999999999999 does not overflow
        if elements > MAX_INPUT_ELEMENTS:
            raise InputError(f"--input-shape '{spec}' makes {elements:,} elements, too many for one input "
                             f"(at most {MAX_INPUT_ELEMENTS:,})")
        shapes[name] = shape
    return shapes


def stored_array(tensor: TensorProto) -> np.ndarray:
    """The value of a TensorProto (external data must already be loaded)."""
    return numpy_helper.to_array(tensor)


def _constant_node_array(node: onnx.NodeProto) -> np.ndarray:
    attr = node.attribute[0]
    if attr.name == "value":
        return numpy_helper.to_array(attr.t)
    if attr.name == "value_float":
        return np.array(attr.f, dtype=np.float32)
    if attr.name == "value_floats":
        return np.array(list(attr.floats), dtype=np.float32)
    if attr.name == "value_int":
        return np.array(attr.i, dtype=np.int64)
    if attr.name == "value_ints":
        return np.array(list(attr.ints), dtype=np.int64)
    if attr.name == "value_string":
        return np.array(attr.s)
    if attr.name == "value_strings":
        return np.array(list(attr.strings))
    raise ModelError(f"Constant node '{node.name or node.output[0]}' has an attribute '{attr.name}' that is not supported")


def _standard_for_shapes(node: onnx.NodeProto) -> onnx.NodeProto:
    """For shape inference, an onnxruntime contrib op whose output has the shape of a standard
    op's (which onnx's inference knows): that op on the same inputs; any other node as it is."""
    if node.domain == "com.microsoft" and node.op_type == "FusedConv":
        standard = onnx.NodeProto()
        standard.CopyFrom(node)
        standard.domain, standard.op_type = "", "Conv"
        del standard.input[3:]  # Z, added before the activation, has the output's shape
        kept = [a for a in standard.attribute if not a.name.startswith("activation")]
        del standard.attribute[:]
        standard.attribute.extend(kept)
        return standard
    return node


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

    `input_shapes` overrides graph-input shapes (`--input-shape`); a dynamic batch (axis 0)
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
        self._source_nodes = nodes
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
        self.input_shapes = self._resolve_input_shapes(input_shapes or {})
        self.shapes: Dict[str, Optional[Tuple[int, ...]]] = {}
        self.activations = set()
        self._infer_shapes()

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
    def _resolve_input_shapes(self, overrides: Dict[str, Tuple[int, ...]]) -> Dict[str, Tuple[int, ...]]:
        known = {v.name: v for v in self.model.graph.input if v.name not in self.initializers}
        for name in overrides:
            if name not in known:
                raise InputError(
                    f"--input-shape names '{name}', which is not an input of the model (inputs: {', '.join(known) or 'none'})")
        shapes = {}
        for name, vi in known.items():
            tt = vi.type.tensor_type
            if not vi.type.HasField("tensor_type"):
                raise ModelError(f"graph input '{name}' is not a tensor")
            self.elem_type[name] = tt.elem_type
            if name in overrides:
                shape = overrides[name]
                if tt.HasField("shape") and len(tt.shape.dim) != len(shape):
                    raise InputError(
                        f"--input-shape for '{name}' has {len(shape)} dimensions but the model's input has {len(tt.shape.dim)}")
                for axis, (d, given) in enumerate(zip(tt.shape.dim if tt.HasField("shape") else [], shape)):
                    if d.HasField("dim_value") and d.dim_value != given:
                        raise InputError(
                            f"--input-shape for '{name}' sets axis {axis} to {given} but the model fixes it to {d.dim_value}")
                shapes[name] = tuple(shape)
                continue
            if not tt.HasField("shape"):
                raise InputError(f"input '{name}' has no shape in the model; give it with --input-shape {name}:D0xD1x...")
            dims = []
            for axis, d in enumerate(tt.shape.dim):
                if d.HasField("dim_value") and d.dim_value == 0:
                    # A size the model fixes to 0: the input is an empty tensor (onnxruntime
                    # refuses any other size), so there is nothing to compute or rescale.
                    raise ModelError(f"input '{name}' has size 0 at axis {axis} (an empty tensor): "
                                     f"the model computes nothing that could be rescaled")
                if d.HasField("dim_value") and d.dim_value > 0:
                    dims.append(d.dim_value)
                elif axis == 0:
                    dims.append(1)  # dynamic batch: the statistics use a batch of one
                else:
                    label = d.dim_param or "?"
                    raise InputError(
                        f"input '{name}' has a dynamic dimension '{label}' at axis {axis}; "
                        f"give its size with --input-shape {name}:" + "x".join(
                            str(x.dim_value) if x.HasField("dim_value") and x.dim_value > 0 else ("1" if i == 0 else "N")
                            for i, x in enumerate(tt.shape.dim)))
            if int(np.prod(dims, dtype=object)) > MAX_INPUT_ELEMENTS:
                raise ModelError(f"input '{name}' has shape {dims}, {int(np.prod(dims, dtype=object)):,} elements: "
                                 f"too large (at most {MAX_INPUT_ELEMENTS:,} per input)")
            shapes[name] = tuple(dims)
        return shapes

    def _infer_shapes(self) -> None:
        """Static shapes of every tensor, by onnx shape inference on a weight-free skeleton.

        Shape inference cannot see through every shape computation an exporter writes
        (Concat of Constants, Shape → Gather → Div → Unsqueeze, ...). So small constant tensors
        are folded to values and handed back to inference as initializers, until nothing new
        is learnt (a chain of computed Reshape targets can need one round per link).

        Where onnx's inference and onnxruntime disagree, the runtime's shape wins, since it is
        the shape of the tensors the model really computes: pools in ceil_mode, whose last
        window onnxruntime drops when it would start in the end padding (onnx keeps it). Such
        a node is taken out of the skeleton and its output handed to inference as an input of
        the runtime's shape, so that everything downstream follows it.
        """
        g = self.model.graph
        base_inputs = [helper.make_tensor_value_info(name, self.elem_type[name], shape)
                       for name, shape in self.input_shapes.items()]
        base_inits = []
        for t in g.initializer:
            self.elem_type[t.name] = t.data_type
            self.shapes[t.name] = tuple(t.dims)
            n_el = int(np.prod(t.dims)) if len(t.dims) else 1
            if n_el <= SKELETON_MAX_ELEMENTS or t.data_type not in FLOAT_TYPES:
                base_inits.append(t)
            else:
                base_inputs.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        folded: Dict[str, np.ndarray] = {}
        runtime: Dict[str, Tuple[int, ...]] = {}  # outputs whose shape onnxruntime computes otherwise
        stored = dict(self.shapes)  # initializers'
        # Graph outputs go to inference without the shapes the file declares: a declaration can
        # be wrong (written from onnx's own inference where the runtime computes another shape),
        # and the inferred shape must win. The declared one serves where inference finds none.
        outputs = [helper.make_tensor_value_info(o.name, o.type.tensor_type.elem_type, None)
                   if o.type.HasField("tensor_type") else o for o in g.output]
        for _ in range(len(self._source_nodes) + 1):
            # Each round starts afresh: a shape inferred in an earlier round, from a shape since
            # corrected, must not outlive a later round that cannot infer it.
            self.shapes = dict(stored)
            self.shapes.update((name, tuple(value.shape)) for name, value in folded.items())
            nodes = [_standard_for_shapes(n) for n in self._source_nodes
                     if not (n.output and all(o in folded or o in runtime for o in n.output if o))]
            inits = base_inits + [numpy_helper.from_array(v, name) for name, v in folded.items()]
            inputs = base_inputs + [helper.make_tensor_value_info(name, self.elem_type.get(name, TensorProto.FLOAT),
                                                                  shape) for name, shape in runtime.items()]
            graph = helper.make_graph(nodes, "skeleton", inputs, outputs, initializer=inits)
            # IR version 4 at least: below it, inference reads an initializer's shape only when
            # the initializer is also a graph input, which the skeleton's are not.
            skeleton = helper.make_model(graph, opset_imports=list(self.model.opset_import),
                                         ir_version=max(self.model.ir_version, 4))
            if not self.in_function_body:  # inlined: the calls are gone
                skeleton.functions.extend(self.model.functions)
            try:
                inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False, data_prop=True)
            except Exception:  # inference is best effort: rules needing a missing shape say so
                inferred = skeleton
            self._collect_shapes(inferred)
            self._collect_shapes(helper.make_model(helper.make_graph([], "declared", [], list(g.output))),
                                 keep_known=True)
            self.shapes.update(runtime)
            self.activations = self._find_activations()
            learnt = self._fold_small_constants(folded)
            learnt = self._runtime_pool_shapes(runtime) or learnt
            learnt = self._sequence_item_shapes(runtime) or learnt
            if not learnt:
                break

    def _runtime_pool_shapes(self, runtime: Dict[str, Tuple[int, ...]]) -> bool:
        """Record pool outputs in ceil_mode whose inferred shape is not the runtime's; True if
        any is new."""
        from .geometry import geometry

        learnt = False
        for n in self.nodes:
            if n.op_type not in ("MaxPool", "AveragePool", "LpPool") or not attr(n, "ceil_mode", 0) \
                    or n.output[0] in runtime or n.domain not in ("", "ai.onnx"):
                continue
            x = self.shapes.get(n.input[0])
            kernel = attr(n, "kernel_shape", None)
            if x is None or kernel is None or len(kernel) != len(x) - 2:
                continue
            out = tuple(x[:2]) + geometry(n, x[2:], kernel, None, ceil_mode=True).out_size
            if self.shapes.get(n.output[0]) != out:
                runtime[n.output[0]] = out
                self.elem_type.setdefault(n.output[0], self.elem_type.get(n.input[0], TensorProto.FLOAT))
                learnt = True
        return learnt

    def _sequence_item_shapes(self, runtime: Dict[str, Tuple[int, ...]]) -> bool:
        """Record the shapes of SequenceAt outputs that inference leaves open (a sequence
        holds one element type: pieces of different lengths lose that axis), where the
        sequence comes from a SplitToSequence with a constant split and the position is a
        constant; True if any is new."""
        learnt = False
        for n in self.nodes:
            if n.op_type != "SequenceAt" or n.domain not in ("", "ai.onnx") or n.output[0] in runtime \
                    or self.shapes.get(n.output[0]) is not None:
                continue
            source = self.producer.get(n.input[0])
            if source is None or source.op_type != "SplitToSequence" or source.domain not in ("", "ai.onnx"):
                continue
            x = self.shapes.get(source.input[0])
            has_split = len(source.input) > 1 and bool(source.input[1])
            names = [n.input[1]] + ([source.input[1]] if has_split else [])
            if x is None or not all(name not in self.activations and self.is_constant(name) for name in names):
                continue
            try:
                position = int(np.asarray(self.constant_value(n.input[1])).reshape(()))
                split = np.asarray(self.constant_value(source.input[1])) if has_split else None
            except Exception:
                continue
            axis = attr(source, "axis", 0)
            if not -len(x) <= axis < len(x):
                continue
            axis %= len(x)
            pieces = split_to_sequence_pieces(x[axis], split)
            if pieces is None or not -len(pieces) <= position < len(pieces):
                continue
            start, stop = pieces[position]
            shape = list(x)
            if has_split or attr(source, "keepdims", 1):
                shape[axis] = stop - start
            else:
                del shape[axis]
            runtime[n.output[0]] = tuple(shape)
            self.elem_type.setdefault(n.output[0], self.elem_type.get(source.input[0], TensorProto.FLOAT))
            learnt = True
        return learnt

    def _collect_shapes(self, inferred: onnx.ModelProto, keep_known: bool = False) -> None:
        """Static shapes and element types of the value infos of `inferred`; with `keep_known`,
        only for tensors with no shape yet."""
        for vi in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
            if keep_known and vi.name in self.shapes:
                continue
            if vi.type.HasField("sequence_type"):
                self.sequences.add(vi.name)
            if not vi.type.HasField("tensor_type"):
                continue
            tt = vi.type.tensor_type
            if tt.elem_type:
                self.elem_type.setdefault(vi.name, tt.elem_type)
            if not tt.HasField("shape"):
                continue
            dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
            if all(d is not None for d in dims):
                self.shapes[vi.name] = tuple(dims)
        for t in inferred.graph.initializer:
            self.shapes.setdefault(t.name, tuple(t.dims))
            self.elem_type.setdefault(t.name, t.data_type)
        for name, shape in self.input_shapes.items():
            self.shapes[name] = shape

    def _fold_small_constants(self, folded: Dict[str, np.ndarray]) -> bool:
        """Evaluate constant node outputs that are small; True if any is new."""
        learnt = False
        for n in self.nodes:
            outs = [o for o in n.output if o]
            if not outs or any(o in self.activations or o in folded for o in outs):
                continue
            if n.op_type == "Constant" and outs[0] in self.shapes:
                continue
            known = [o for o in outs if o in self.shapes]
            if known and all(int(np.prod(self.shapes[o])) > SKELETON_MAX_ELEMENTS for o in known):
                continue  # a weight computed from weights: shape inference handles it
            try:
                values = [self.constant_value(o) for o in outs]
            except Exception:
                continue
            if any(v.size > SKELETON_MAX_ELEMENTS or v.dtype == object for v in values):
                continue
            for o, v in zip(outs, values):
                folded[o] = v
                self.shapes[o] = tuple(v.shape)
                self.elem_type.setdefault(o, helper.np_dtype_to_tensor_dtype(v.dtype))
            learnt = True
        return learnt

    def shape(self, name: str) -> Optional[Tuple[int, ...]]:
        return self.shapes.get(name)

    # ------------------------------------------------------------------ constants
    def _find_activations(self) -> set:
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
        """Value of a constant tensor, folding its producing subgraph if needed."""
        if name in self._constant_cache:
            return self._constant_cache[name]
        if name in self.initializers:
            self.values_read.add(name)
            return self.initializer_value(name)  # not cached: may be large
        if name in self.constant_nodes:
            value = _constant_node_array(self.constant_nodes[name])
            return value
        node = self.producer.get(name)
        if node is None or name in self.activations:
            raise ModelError(f"tensor '{name}' is not a constant")
        if node.op_type == "Shape":
            shape = np.array(self.shapes[node.input[0]], dtype=np.int64)
            start, end = attr(node, "start", 0), attr(node, "end", None)
            value = shape[start:end]
        elif node.op_type == "CastLike":
            target = self.elem_type.get(node.input[1], TensorProto.FLOAT)
            value = self.constant_value(node.input[0]).astype(helper.tensor_dtype_to_np_dtype(target))
        elif node.op_type == "Size":
            value = np.array(int(np.prod(self.shapes[node.input[0]])), dtype=np.int64)
        elif node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx") and not attr(node, "block_size", 0):
            # onnx's reference evaluator has no DequantizeLinear before opset 19 (QDQ exports use 13)
            value = self._dequantize(node)
        else:
            value = self._evaluate_node(node)[list(node.output).index(name)]
        if value.size <= SKELETON_MAX_ELEMENTS:
            self._constant_cache[name] = value
        return value

    def _dequantize(self, node: onnx.NodeProto) -> np.ndarray:
        """(x - zero_point) * scale, per tensor or per channel along `axis`."""
        x = self.constant_value(node.input[0])
        scale = self.constant_value(node.input[1])
        zero = self.constant_value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if scale.ndim == 1 and x.ndim > 1:
            axis = attr(node, "axis", 1) % x.ndim
            shape = [1] * x.ndim
            shape[axis] = -1
            scale = scale.reshape(shape)
            zero = zero.reshape(shape) if zero is not None else None
        value = x.astype(np.float32) if zero is None else x.astype(np.float32) - zero.astype(np.float32)
        return (value * scale).astype(scale.dtype)

    def _evaluate_node(self, node: onnx.NodeProto) -> List[np.ndarray]:
        """Run one node whose inputs are all constant (onnx's reference evaluator)."""
        from onnx.reference import ReferenceEvaluator

        feeds = {i: self.constant_value(i) for i in node.input if i}
        inputs = [helper.make_tensor_value_info(i, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
                  for i, v in feeds.items()]
        outputs = [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in node.output if o]
        m = helper.make_model(helper.make_graph([node], "fold", inputs, outputs),
                              opset_imports=list(self.model.opset_import), ir_version=self.model.ir_version)
        try:
            results = ReferenceEvaluator(m).run(None, feeds)
        except Exception as e:
            raise ModelError(f"cannot evaluate constant node '{node_label(node)}' ({node.op_type}): {e}") from None
        return [np.asarray(r) for r in results]

    def stored_ref(self, name: str) -> Optional[StoredRef]:
        """Follow Identity / Transpose / Cast back to where a constant is stored.

        Returns None when the value is computed (its stored form cannot be rescaled in place).
        """
        perm: Optional[Tuple[int, ...]] = None
        current = name
        while True:
            if current in self.initializers:
                return StoredRef(current, "initializer", perm)
            if current in self.constant_nodes:
                return StoredRef(current, "constant_node", perm)
            node = self.producer.get(current)
            if node is None or node.op_type not in _WEIGHT_TRANSPARENT_OPS or current in self.activations:
                return None
            if node.op_type == "Transpose":
                rank = len(self.shapes.get(node.input[0]) or ())
                p = attr(node, "perm", None)
                p = tuple(p) if p is not None else tuple(reversed(range(rank)))
                # view = transpose(stored_upstream, p); stored_upstream = transpose(store, perm_up)
                perm = p if perm is None else tuple(p[i] for i in perm)
                perm = tuple(perm)
            current = node.input[0]

    def stored_value(self, ref: StoredRef) -> np.ndarray:
        if ref.kind == "initializer":
            return self.initializer_value(ref.name)
        return _constant_node_array(self.constant_nodes[ref.name])

    def set_values(self, values: Dict[str, np.ndarray]) -> None:
        """Replace initializers' values (by name) from now on; computed constants are computed
        again, since they may read them."""
        self.values.update(values)
        self._constant_cache.clear()

    def initializer_value(self, name: str) -> np.ndarray:
        """An initializer's value (one given in `values`, or read from its file when it was left there)."""
        if name in self.values:
            return self.values[name]
        return self.file.initializer_value(self.initializers[name])

    def is_sequence(self, name: str) -> bool:
        """Whether the value is a sequence of tensors (it has no tensor shape)."""
        return name in self.sequences

    def is_float(self, name: str) -> bool:
        return self.elem_type.get(name, TensorProto.FLOAT) in FLOAT_TYPES
