"""Writing the rescaled parameters back (docs/design.md §7).

Only the *values* of initializers and Constant-node tensors change; names, shapes, dtypes,
node order, opsets and metadata stay as they were. Each element is multiplied, in float64,
by exp((u[in] − u[out]) / 2) (λ of the group it is incoming to, over λ of the group it is
outgoing from) and cast back to the tensor's own dtype. A tensor that holds its parameter in
another form (a BatchNorm's running statistics with --bn-statistics, `ParamUse.power` and
`offset`) takes that factor to its power, added to its offset: (v + offset)·f^power − offset.

`plan` says which tensors change and by what; `apply` writes the new values into the
ModelProto; `apply_streamed` instead hands a writer one function per large tensor that
computes its new values on demand, so that no second copy of the weights is ever held (and
counts the time those functions take, which happens while the writer runs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .graph import Graph
from .records import RewrittenTensor
from .symmetry import Groups, ParamUse

# Elements rescaled per float64 temporary: the temporaries stay a few MB whatever the tensor.
_CHUNK = 1 << 20
# Bytes of rescaled values handed to the writer at once (see `_Chunks`).
_OUT_BLOCK = 1 << 25


@dataclass
class TensorRescale:
    """One stored tensor to rescale by `incoming × outgoing`, two factors in its stored layout
    broadcastable to it (λ of the group each element is incoming to, and 1/λ of the group it
    is outgoing from). They stay two: their product is as large as the tensor. With an
    `offset`, it is value + offset that they multiply (then the offset is taken off again)."""
    use: ParamUse  # the first use that reaches it (named in the report)
    incoming: np.ndarray
    outgoing: np.ndarray
    offset: float = 0.0

    @property
    def name(self) -> str:
        return self.use.ref.name


def element_factors(use: ParamUse, groups: Groups, u: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """λ of the incoming group and 1/λ of the outgoing group of every element of a
    parameter, in its consumer's layout (each broadcastable to it; 1 where no group), as its
    stored values take them: to `use.power`, and without the outgoing side where another
    tensor carries it (`use.stores_cols`)."""
    u_ext = np.append(u, 0.0)
    H = groups.count

    def log_scale(positions):
        ids = np.where(positions >= 0, groups.of_position[np.maximum(positions, 0)], -1) \
            if groups.of_position.size else np.full(positions.shape, -1)
        return u_ext[np.where(ids >= 0, ids, H)]

    half = use.power / 2.0
    return np.exp(log_scale(use.rows) * half), np.exp(-log_scale(use.stored_cols) * half)


def plan(uses: List[ParamUse], groups: Groups, u: np.ndarray) -> List[TensorRescale]:
    """Every stored tensor that some rescalable group touches, with its multipliers."""
    todo: Dict[str, TensorRescale] = {}
    for use in uses:
        if use.ref is None or use.ignored or use.ref.name in todo:
            continue
        incoming, outgoing = element_factors(use, groups, u)
        if np.all(incoming == 1.0) and np.all(outgoing == 1.0):
            continue
        todo[use.ref.name] = TensorRescale(use, use.ref.to_stored(np.broadcast_to(incoming, use.view_shape)),
                                           use.ref.to_stored(np.broadcast_to(outgoing, use.view_shape)), use.offset)
    return list(todo.values())


def _moved(values: np.ndarray, factor: np.ndarray, offset: float) -> np.ndarray:
    """(values + offset)·factor − offset in float64, written so that a factor of 1 gives
    the values back exactly."""
    moved = values * factor
    if offset:
        moved += offset * (factor - 1.0)
    return moved


@dataclass
class Rescaled:
    values: np.ndarray  # in the original dtype
    max_abs: float  # largest magnitude of the new values
    min_factor: float
    max_factor: float


class _Chunks:
    """original × incoming × outgoing (float64 arithmetic, cast back to original's dtype), a
    block of rows at a time: iterate to get the blocks in order (flat, in the tensor's dtype;
    each valid until the next is asked for); `summary()` once they have all been made. The
    float64 temporaries are one block's size and reused from block to block (a fresh temporary
    as large as the tensor would cost a page fault per page)."""

    def __init__(self, original: np.ndarray, incoming: np.ndarray, outgoing: np.ndarray, offset: float = 0.0):
        original = np.asarray(original)
        self.dtype = original.dtype
        shape = original.shape
        if original.ndim == 0:
            original = original.reshape(1)
        self.original = original
        self.incoming = np.broadcast_to(incoming, shape).reshape(original.shape)
        self.outgoing = np.broadcast_to(outgoing, shape).reshape(original.shape)
        self.offset = offset
        self.high, self.low_f, self.high_f = 0.0, np.inf, 0.0
        self.factor_extremes = _outer_extremes(self.incoming, self.outgoing) if original.size else None

    def __iter__(self):
        original = self.original
        rows = max(1, _CHUNK // max(1, original[0].size)) if original.shape[0] else 1
        block = (min(rows, original.shape[0]),) + original.shape[1:]
        plain = self.dtype.kind == "f"  # float16/32/64: cast to float64 inside the product
        factor = np.empty(block) if original.size else None
        values = np.empty(block) if original.size else None
        # The blocks handed out are gathered into one larger buffer of the tensor's dtype
        # (reused, and overwritten once the caller asks for the next block): the writer then
        # makes few large writes, which measured several times faster than many of 4 MB.
        count = original.size
        staging = None
        if values is not None and count > values.size:  # more than one block
            staging = np.empty(min(count, _OUT_BLOCK // max(1, self.dtype.itemsize)), dtype=self.dtype)
        filled = 0
        for start in range(0, original.shape[0], rows):
            part = slice(start, start + rows)
            n = len(range(*part.indices(original.shape[0])))
            f, v = factor[:n], values[:n]
            np.multiply(self.incoming[part], self.outgoing[part], out=f)
            if not f.size:
                continue
            np.multiply(original[part] if plain else original[part].astype(np.float64), f, out=v)
            if self.offset:
                v += self.offset * (f - 1.0)
            if self.factor_extremes is None:
                self.low_f, self.high_f = min(self.low_f, float(f.min())), max(self.high_f, float(f.max()))
            if staging is None or v.size > staging.size:
                cast = v.astype(self.dtype).reshape(-1)  # cast back to the tensor's dtype
                self._largest(cast, v, plain)
                yield cast
                continue
            if filled + v.size > staging.size:
                yield staging[:filled]
                filled = 0
            cast = staging[filled:filled + v.size]
            cast[:] = v.reshape(-1)  # cast back to the tensor's dtype
            self._largest(cast, v, plain)
            filled += v.size
        if filled:
            yield staging[:filled]
        if self.factor_extremes is not None:
            self.low_f, self.high_f = self.factor_extremes

    def _largest(self, cast: np.ndarray, wide: np.ndarray, plain: bool) -> None:
        """The largest magnitude so far. Rounding is monotone, so the extremes of the cast
        block are the casts of the float64 ones: they are read from the narrower copy."""
        block = cast if plain else wide
        self.high = max(self.high, float(max(block.max(), -block.min())))

    def summary(self, values: Optional[np.ndarray] = None) -> "Rescaled":
        low_f, high_f = (self.low_f, self.high_f) if self.original.size else (1.0, 1.0)
        # Rounding to the dtype is monotone: the largest magnitude after the cast is the cast of
        # the largest before it (inf where it overflows).
        with np.errstate(over="ignore"):
            high = float(np.asarray(self.high).astype(self.dtype).astype(np.float64))
        return Rescaled(values, high, low_f, high_f)


def _outer_extremes(incoming: np.ndarray, outgoing: np.ndarray) -> Optional[Tuple[float, float]]:
    """(min, max) of incoming × outgoing over the tensor, from the two sides' own values when
    they vary along different axes (broadcast views, both positive: the extremes of the
    product are the products of the extremes); None otherwise."""
    sides = separate_sides(incoming, outgoing)
    if sides is None or not sides[0].size or not sides[1].size or not (sides[0].min() > 0 and sides[1].min() > 0):
        return None
    a, b = sides
    return float(a.min()) * float(b.min()), float(a.max()) * float(b.max())


def separate_sides(incoming: np.ndarray, outgoing: np.ndarray) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """The distinct values of the two sides of a tensor's factor (each broadcast view cut to
    length 1 along its axes of stride 0), when they vary along different axes: the factor is
    then their outer product, and its extremes follow from theirs. None when they share one."""
    a, b = (view[tuple(slice(0, 1) if stride == 0 else slice(None) for stride in view.strides)]
            for view in (incoming, outgoing))
    if any(m > 1 and n > 1 for m, n in zip(a.shape, b.shape)):
        return None
    return a, b


def rescaled(original: np.ndarray, incoming: np.ndarray, outgoing: np.ndarray, offset: float = 0.0) -> Rescaled:
    """original × incoming × outgoing in float64 ((original + offset) × ... − offset with an
    offset), cast back to original's dtype, a chunk of rows at a time (no temporary as large
    as the tensor)."""
    original = np.asarray(original)
    chunks = _Chunks(original, incoming, outgoing, offset)
    new = np.empty(original.size, dtype=original.dtype)
    done = 0
    for block in chunks:
        new[done:done + block.size] = block
        done += block.size
    return chunks.summary(new.reshape(original.shape))


def _write_values(tensor: TensorProto, values: np.ndarray) -> None:
    """Replace a TensorProto's data in place, keeping its name, dims, dtype and storage style."""
    field = _typed_field(tensor)
    if field is None or tensor.HasField("raw_data"):
        for f in _TYPED_FIELDS:
            tensor.ClearField(f)
        tensor.raw_data = numpy_helper.from_array(values, tensor.name).raw_data
        return
    tensor.ClearField(field)
    flat = values.ravel()
    if tensor.data_type in (TensorProto.FLOAT16, TensorProto.BFLOAT16):
        getattr(tensor, field).extend(flat.view(np.uint16).astype(np.int32).tolist())
    else:
        getattr(tensor, field).extend(flat.tolist())


_TYPED_FIELDS = ("float_data", "double_data", "int32_data", "int64_data", "uint64_data")


def _typed_field(tensor: TensorProto):
    for f in _TYPED_FIELDS:
        if len(getattr(tensor, f)):
            return f
    return None


def _constant_tensor(node: onnx.NodeProto) -> TensorProto:
    for a in node.attribute:
        if a.name == "value":
            return a.t
    return None


def _raw_initializer(graph: Graph, item: TensorRescale):
    """The initializer of `item` when its value is stored as raw bytes, else None."""
    if item.use.ref.kind != "initializer":
        return None
    tensor = graph.initializers[item.name]
    return tensor if tensor.HasField("raw_data") or graph.file.in_file(item.name) else None


@dataclass
class Rewrite:
    """What `apply` and `apply_streamed` did.

    `rewritten` gets each tensor's report entry once its new values exist. `deferred` holds,
    by name, the functions that compute the new values of tensors left untouched in the
    ModelProto (for the writer to call: each returns an iterator of flat blocks of them);
    `seconds` is the time those calls took so far.
    """

    rewritten: List[RewrittenTensor] = field(default_factory=list)
    deferred: Dict[str, Callable[[], Iterator[np.ndarray]]] = field(default_factory=dict)
    seconds: float = 0.0

    def in_order(self, items: List[TensorRescale]) -> List[RewrittenTensor]:
        """The report entries in the order of `items` (the writer may ask in another order)."""
        order = {item.name: k for k, item in enumerate(items)}
        return sorted(self.rewritten, key=lambda r: order[r.name])


def apply(graph: Graph, items: List[TensorRescale]) -> Rewrite:
    """Rescale, in place in the graph's ModelProto, every tensor of `items`."""
    return Rewrite([_apply_one(graph, item) for item in items])


def _apply_one(graph: Graph, item: TensorRescale) -> RewrittenTensor:
    ref = item.use.ref
    if ref.kind == "initializer":
        tensor = graph.initializers[ref.name]
    else:
        tensor = _constant_tensor(graph.constant_nodes[ref.name])
        if tensor is None:  # value_float(s): rewrite the list attribute
            node = graph.constant_nodes[ref.name]
            original = graph.stored_value(ref)
            new = rescaled(original, item.incoming, item.outgoing, item.offset)
            a = node.attribute[0]
            if a.name == "value_float":
                a.f = float(new.values)
            else:
                del a.floats[:]
                a.floats.extend(new.values.ravel().tolist())
            return _summary(item, new)
    original = graph.stored_value(ref) if ref.kind == "initializer" else numpy_helper.to_array(tensor)
    new = rescaled(original, item.incoming, item.outgoing, item.offset)
    _write_values(tensor, new.values)
    return _summary(item, new)


def apply_streamed(graph: Graph, items: List[TensorRescale]) -> Rewrite:
    """Like `apply`, but initializers stored as raw bytes are left untouched in the ModelProto:
    for each, `deferred` gets a function that returns its new value (as an array of its
    dtype, to be written as its raw data; an iterator of flat blocks, in order, that the
    writer writes as they come, so that the new values never exist whole). Other tensors
    (small: Constant nodes, typed-field storage) are rewritten in place."""
    result = Rewrite()
    for item in items:
        tensor = _raw_initializer(graph, item)
        if tensor is None:
            result.rewritten.append(_apply_one(graph, item))
            continue

        def produce(item=item) -> Iterator[np.ndarray]:
            start = time.perf_counter()
            original = graph.stored_value(item.use.ref)
            chunks = _Chunks(original, item.incoming, item.outgoing, item.offset)
            for block in chunks:
                result.seconds += time.perf_counter() - start
                yield block
                start = time.perf_counter()
            result.rewritten.append(_summary(item, chunks.summary(np.empty(0, dtype=original.dtype))))
            result.seconds += time.perf_counter() - start

        result.deferred[item.name] = produce
    return result


def _summary(item: TensorRescale, new: Rescaled) -> RewrittenTensor:
    use = item.use
    return RewrittenTensor(
        name=use.ref.name, consumer=use.node.name or use.node.output[0], op_type=use.node.op_type, role=use.role,
        dtype=str(new.values.dtype), min_factor=new.min_factor, max_factor=new.max_factor, max_abs_after=new.max_abs)
