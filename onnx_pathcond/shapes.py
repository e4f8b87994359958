"""Static shapes for a batch of one: the graph inputs' shapes, from the model or given by the
caller, and onnx's shape inference on a weight-free skeleton with the patch-ups it needs
(small constants folded back into it, the runtime's shapes where onnx's inference disagrees,
the pieces of a split sequence).

Errors about input shapes name the way shapes are given with `errors.option("input_shapes")`:
the Python API reads it as its keyword, the command line as its flag.

The functions take the `graph.Graph` view as `graph`; graph.py calls them, and nothing here
imports it back.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import InputError, ModelError, option
from .modelfile import LEFT_IN_FILE_ABOVE
from .nodes import attr
from .protoio import FLOAT_TYPES


# Tensors above this many elements are left out of the skeleton used for shape inference:
# shape inference only needs their type and shape, and copying them would double memory.
# It is the size above which a float initializer may have no data here (left in its file by
# `ModelFile`), so that no tensor without its data reaches shape inference.
SKELETON_MAX_ELEMENTS = LEFT_IN_FILE_ABOVE

# The most elements a graph input may have: the verification feeds random inputs of this
# shape, and larger ones would neither fit in memory nor in onnxruntime's 32-bit sizes of some kernels.
MAX_INPUT_ELEMENTS = 2 ** 31

SHAPES = option("input_shapes")


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


def parse_input_shapes(specs: Sequence[str]) -> Dict[str, Tuple[int, ...]]:
    """Parse `NAME:D0xD1x...` strings (what the command line takes) into a dict."""
    shapes: Dict[str, Tuple[int, ...]] = {}
    for spec in specs:
        name, sep, dims = spec.rpartition(":")
        if not sep or not name:
            raise InputError(f"{SHAPES} '{spec}' is not of the form NAME:D0xD1x... (e.g. x:1x3x224x224)")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            raise InputError(f"{SHAPES} '{spec}': dimensions must be positive integers separated by 'x'") from None
        if not shape or any(d <= 0 for d in shape):
            raise InputError(f"{SHAPES} '{spec}': dimensions must be positive integers separated by 'x'")
        elements = int(np.prod(shape, dtype=object))  # Python integers: 99999999999999999999 does not overflow
        if elements > MAX_INPUT_ELEMENTS:
            raise InputError(f"{SHAPES} '{spec}' makes {elements:,} elements, too many for one input "
                             f"(at most {MAX_INPUT_ELEMENTS:,})")
        if name in shapes:
            raise InputError(f"{SHAPES} given more than once for '{name}'")
        shapes[name] = shape
    return shapes


def resolve_input_shapes(model: onnx.ModelProto, overrides: Dict[str, Tuple[int, ...]]
                         ) -> Tuple[Dict[str, Tuple[int, ...]], Dict[str, int]]:
    """The shape of every graph input for a batch of one, and its element type: `overrides`
    (given by the caller) first, a dynamic batch (axis 0) as 1; any other dynamic dimension
    without an override is an error, which says how to give it."""
    initializers = {t.name for t in model.graph.initializer}
    elem_types: Dict[str, int] = {}
    known = {v.name: v for v in model.graph.input if v.name not in initializers}
    for name in overrides:
        if name not in known:
            raise InputError(
                f"{SHAPES} names '{name}', which is not an input of the model (inputs: {', '.join(known) or 'none'})")
    shapes = {}
    for name, vi in known.items():
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise ModelError(f"graph input '{name}' is not a tensor")
        elem_types[name] = tt.elem_type
        if name in overrides:
            shape = overrides[name]
            if tt.HasField("shape") and len(tt.shape.dim) != len(shape):
                raise InputError(
                    f"{SHAPES} for '{name}' has {len(shape)} dimensions but the model's input has {len(tt.shape.dim)}")
            for axis, (d, given) in enumerate(zip(tt.shape.dim if tt.HasField("shape") else [], shape)):
                if d.HasField("dim_value") and d.dim_value != given:
                    raise InputError(
                        f"{SHAPES} for '{name}' sets axis {axis} to {given} but the model fixes it to {d.dim_value}")
            shapes[name] = tuple(shape)
            continue
        if not tt.HasField("shape"):
            raise InputError(f"input '{name}' has no shape in the model; give it with {SHAPES} {name}:D0xD1x...")
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
                    f"give its size with {SHAPES} {name}:" + "x".join(
                        str(x.dim_value) if x.HasField("dim_value") and x.dim_value > 0 else ("1" if i == 0 else "N")
                        for i, x in enumerate(tt.shape.dim)))
        if int(np.prod(dims, dtype=object)) > MAX_INPUT_ELEMENTS:
            raise ModelError(f"input '{name}' has shape {dims}, {int(np.prod(dims, dtype=object)):,} elements: "
                             f"too large (at most {MAX_INPUT_ELEMENTS:,} per input)")
        shapes[name] = tuple(dims)
    return shapes, elem_types


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


def infer_shapes(graph) -> None:
    """Fill `graph.shapes` (static shapes of every tensor, by onnx shape inference on a weight-free
    skeleton), `graph.elem_type`, `graph.sequences` and `graph.activations`.

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
    g = graph.model.graph
    base_inputs = [helper.make_tensor_value_info(name, graph.elem_type[name], shape)
                   for name, shape in graph.input_shapes.items()]
    base_inits = []
    for t in g.initializer:
        graph.elem_type[t.name] = t.data_type
        graph.shapes[t.name] = tuple(t.dims)
        n_el = int(np.prod(t.dims)) if len(t.dims) else 1
        if n_el <= SKELETON_MAX_ELEMENTS or t.data_type not in FLOAT_TYPES:
            base_inits.append(t)
        else:
            base_inputs.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    folded: Dict[str, np.ndarray] = {}
    runtime: Dict[str, Tuple[int, ...]] = {}  # outputs whose shape onnxruntime computes otherwise
    stored = dict(graph.shapes)  # initializers'
    # Graph outputs go to inference without the shapes the file declares: a declaration can
    # be wrong (written from onnx's own inference where the runtime computes another shape),
    # and the inferred shape must win. The declared one serves where inference finds none.
    outputs = [helper.make_tensor_value_info(o.name, o.type.tensor_type.elem_type, None)
               if o.type.HasField("tensor_type") else o for o in g.output]
    for _ in range(len(graph.source_nodes) + 1):
        # Each round starts afresh: a shape inferred in an earlier round, from a shape since
        # corrected, must not outlive a later round that cannot infer it.
        graph.shapes = dict(stored)
        graph.shapes.update((name, tuple(value.shape)) for name, value in folded.items())
        nodes = [_standard_for_shapes(n) for n in graph.source_nodes
                 if not (n.output and all(o in folded or o in runtime for o in n.output if o))]
        inits = base_inits + [numpy_helper.from_array(v, name) for name, v in folded.items()]
        inputs = base_inputs + [helper.make_tensor_value_info(name, graph.elem_type.get(name, TensorProto.FLOAT),
                                                              shape) for name, shape in runtime.items()]
        body = helper.make_graph(nodes, "skeleton", inputs, outputs, initializer=inits)
        # IR version 4 at least: below it, inference reads an initializer's shape only when
        # the initializer is also a graph input, which the skeleton's are not.
        skeleton = helper.make_model(body, opset_imports=list(graph.model.opset_import),
                                     ir_version=max(graph.model.ir_version, 4))
        if not graph.in_function_body:  # inlined: the calls are gone
            skeleton.functions.extend(graph.model.functions)
        try:
            inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False, data_prop=True)
        except Exception:  # inference is best effort: rules needing a missing shape say so
            inferred = skeleton
        _collect_shapes(graph, inferred)
        _collect_shapes(graph, helper.make_model(helper.make_graph([], "declared", [], list(g.output))),
                             keep_known=True)
        graph.shapes.update(runtime)
        graph.activations = graph.find_activations()
        learnt = _fold_small_constants(graph, folded)
        learnt = _runtime_pool_shapes(graph, runtime) or learnt
        learnt = _sequence_item_shapes(graph, runtime) or learnt
        if not learnt:
            break

def _runtime_pool_shapes(graph, runtime: Dict[str, Tuple[int, ...]]) -> bool:
    """Record pool outputs in ceil_mode whose inferred shape is not the runtime's; True if
    any is new."""
    from .geometry import geometry

    learnt = False
    for n in graph.nodes:
        if n.op_type not in ("MaxPool", "AveragePool", "LpPool") or not attr(n, "ceil_mode", 0) \
                or n.output[0] in runtime or n.domain not in ("", "ai.onnx"):
            continue
        x = graph.shapes.get(n.input[0])
        kernel = attr(n, "kernel_shape", None)
        if x is None or kernel is None or len(kernel) != len(x) - 2:
            continue
        out = tuple(x[:2]) + geometry(n, x[2:], kernel, None, ceil_mode=True).out_size
        if graph.shapes.get(n.output[0]) != out:
            runtime[n.output[0]] = out
            graph.elem_type.setdefault(n.output[0], graph.elem_type.get(n.input[0], TensorProto.FLOAT))
            learnt = True
    return learnt

def _sequence_item_shapes(graph, runtime: Dict[str, Tuple[int, ...]]) -> bool:
    """Record the shapes of SequenceAt outputs that inference leaves open (a sequence
    holds one element type: pieces of different lengths lose that axis), where the
    sequence comes from a SplitToSequence with a constant split and the position is a
    constant; True if any is new."""
    learnt = False
    for n in graph.nodes:
        if n.op_type != "SequenceAt" or n.domain not in ("", "ai.onnx") or n.output[0] in runtime \
                or graph.shapes.get(n.output[0]) is not None:
            continue
        source = graph.producer.get(n.input[0])
        if source is None or source.op_type != "SplitToSequence" or source.domain not in ("", "ai.onnx"):
            continue
        x = graph.shapes.get(source.input[0])
        has_split = len(source.input) > 1 and bool(source.input[1])
        names = [n.input[1]] + ([source.input[1]] if has_split else [])
        if x is None or not all(name not in graph.activations and graph.is_constant(name) for name in names):
            continue
        try:
            position = int(np.asarray(graph.constant_value(n.input[1])).reshape(()))
            split = np.asarray(graph.constant_value(source.input[1])) if has_split else None
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
        graph.elem_type.setdefault(n.output[0], graph.elem_type.get(source.input[0], TensorProto.FLOAT))
        learnt = True
    return learnt

def _collect_shapes(graph, inferred: onnx.ModelProto, keep_known: bool = False) -> None:
    """Static shapes and element types of the value infos of `inferred`; with `keep_known`,
    only for tensors with no shape yet."""
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        if keep_known and vi.name in graph.shapes:
            continue
        if vi.type.HasField("sequence_type"):
            graph.sequences.add(vi.name)
        if not vi.type.HasField("tensor_type"):
            continue
        tt = vi.type.tensor_type
        if tt.elem_type:
            graph.elem_type.setdefault(vi.name, tt.elem_type)
        if not tt.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        if all(d is not None for d in dims):
            graph.shapes[vi.name] = tuple(dims)
    for t in inferred.graph.initializer:
        graph.shapes.setdefault(t.name, tuple(t.dims))
        graph.elem_type.setdefault(t.name, t.data_type)
    for name, shape in graph.input_shapes.items():
        graph.shapes[name] = shape

def _fold_small_constants(graph, folded: Dict[str, np.ndarray]) -> bool:
    """Evaluate constant node outputs that are small; True if any is new."""
    learnt = False
    for n in graph.nodes:
        outs = [o for o in n.output if o]
        if not outs or any(o in graph.activations or o in folded for o in outs):
            continue
        if n.op_type == "Constant" and outs[0] in graph.shapes:
            continue
        known = [o for o in outs if o in graph.shapes]
        if known and all(int(np.prod(graph.shapes[o])) > SKELETON_MAX_ELEMENTS for o in known):
            continue  # a weight computed from weights: shape inference handles it
        try:
            values = [graph.constant_value(o) for o in outs]
        except Exception:
            continue
        if any(v.size > SKELETON_MAX_ELEMENTS or v.dtype == object for v in values):
            continue
        for o, v in zip(outs, values):
            folded[o] = v
            graph.shapes[o] = tuple(v.shape)
            graph.elem_type.setdefault(o, helper.np_dtype_to_tensor_dtype(v.dtype))
        learnt = True
    return learnt
