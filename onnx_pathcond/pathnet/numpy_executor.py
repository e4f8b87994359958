"""The numpy executor of the path network: every primitive once, in float64 (the reference)
or in float32 with its range guarded and its rounding counted (`precision.py`).

Arrays keep the model's batch axis (one sample for a dynamic batch, or the batch the model
fixes). Convolutions read their windows through strided views of the zero-padded input
(`window_view`), whose adjoints scatter back with one strided slice per kernel offset: a loop
over at most a few dozen offsets, never over channels or positions. Pools sum their windows
one spatial axis at a time (`window_sums`). Large dense weights are squared a block of rows at
a time.
"""

from __future__ import annotations

import itertools
import string
import weakref
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ..channels import ParamUse
from ..geometry import Geometry
from ..graph import Graph
from . import primitives as P
from .precision import ADJOINT, FACTOR, MASS, SCALAR, STATISTIC, RangeGuard
from .records import Sink, Statistic


def default_mass_budget(total_bytes: float) -> float:
    """The budget of the numpy walk, from the bytes all the masses of a network would take:
    a quarter of them, and never below 16 MiB (a network whose masses are that small keeps
    them all)."""
    return max(total_bytes / 4, 16 * 2 ** 20)


def unbroadcast(arr: np.ndarray, shape) -> np.ndarray:
    """Sum `arr` down to `shape` (the adjoint of numpy broadcasting)."""
    shape = tuple(shape)
    if arr.shape == shape:
        return arr
    extra = arr.ndim - len(shape)
    if extra:
        arr = arr.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, d in enumerate(shape) if d == 1 and arr.shape[i] != 1)
    if axes:
        arr = arr.sum(axis=axes, keepdims=True)
    return arr.reshape(shape)


# ---------------------------------------------------------------------------- windows
# Arrays are [N, C, *S]: a batch axis, a channel axis, then the spatial axes the windows slide on.
def pad_input(x: np.ndarray, geo: Geometry) -> np.ndarray:
    """`x` of shape [N, C, *S] embedded in zeros of shape [N, C, *padded_size]; `x` itself
    where there is no padding (a strided 1×1 convolution, a pool without pads). For reading."""
    if geo.padded_size == tuple(x.shape[2:]):
        return x
    xp = np.zeros(x.shape[:2] + geo.padded_size, dtype=x.dtype)
    xp[_inside(geo)] = x
    return xp


def _inside(geo: Geometry):
    """The index of the input inside its padded array."""
    return (slice(None), slice(None)) + tuple(slice(b, b + s) for b, s in zip(geo.pads_begin, geo.in_size))


def crop_input(xp: np.ndarray, geo: Geometry) -> np.ndarray:
    return xp[_inside(geo)]


def window_view(xp: np.ndarray, geo: Geometry) -> np.ndarray:
    """Read-only view [N, C, *kernel, *out] of a padded array [N, C, *padded_size]: element
    [n, c, k..., p...] is padded position p·stride + k·dilation."""
    xp = np.ascontiguousarray(xp)
    nd = len(geo.kernel)
    s = xp.strides
    shape = xp.shape[:2] + geo.kernel + geo.out_size
    strides = (s[:2] + tuple(s[2 + i] * geo.dilations[i] for i in range(nd))
               + tuple(s[2 + i] * geo.strides[i] for i in range(nd)))
    return as_strided(xp, shape=shape, strides=strides, writeable=False)


def scatter_windows(cols: np.ndarray, geo: Geometry) -> np.ndarray:
    """Adjoint of `window_view`: sum cols [N, C, *kernel, *out] into [N, C, *padded_size]."""
    out = np.zeros(cols.shape[:2] + geo.padded_size, dtype=cols.dtype)
    for n, offset in enumerate(itertools.product(*(range(k) for k in geo.kernel))):
        index = (slice(None), slice(None)) + tuple(
            slice(k * d, k * d + (o - 1) * st + 1, st)
            for k, d, o, st in zip(offset, geo.dilations, geo.out_size, geo.strides))
        if n:
            out[index] += cols[(slice(None), slice(None)) + offset]
        else:  # the first offset meets only zeros, each position once: an assignment
            out[index] = cols[(slice(None), slice(None)) + offset]
    return out


def _taps(axis: int, ndim: int, tap: int, geo: Geometry, d: int):
    """The index that reads, along spatial axis `d` (array axis `axis`), the elements that
    kernel tap `tap` meets at every output position: a strided slice of the padded extent."""
    start = tap * geo.dilations[d]
    index = [slice(None)] * ndim
    index[axis] = slice(start, start + (geo.out_size[d] - 1) * geo.strides[d] + 1, geo.strides[d])
    return tuple(index)


def window_sums(xp: np.ndarray, geo: Geometry) -> np.ndarray:
    """Σ over each window of a padded array [N, C, *padded_size]: [N, C, *out]. A box's sum is
    the sum along one axis of the sums along the others, so it is taken one spatial axis at a
    time, k strided slices added per axis (k₁ + k₂ adds per output in 2-D, not k₁·k₂ through
    a strided view: 6–10 times faster on a 3×3 pool). The same terms as the window's sum, in
    chains of at most Σ (k_d − 1) ≤ k₁·k₂ − 1 additions (what the rounding count allows)."""
    y = xp
    for d, k in enumerate(geo.kernel):
        axis = 2 + d
        total = y[_taps(axis, y.ndim, 0, geo, d)]
        total = total + y[_taps(axis, y.ndim, 1, geo, d)] if k > 1 else total.copy()
        for tap in range(2, k):
            total += y[_taps(axis, y.ndim, tap, geo, d)]
        y = total
    return y


def window_sums_adjoint(adj: np.ndarray, geo: Geometry) -> np.ndarray:
    """The adjoint of `window_sums`: each output's adjoint added back onto every padded
    position of its window, one spatial axis at a time ([N, C, *out] → [N, C, *padded_size])."""
    y = adj
    for d in reversed(range(len(geo.kernel))):
        axis = 2 + d
        spread = np.zeros(y.shape[:axis] + (geo.padded_size[d],) + y.shape[axis + 1:], dtype=y.dtype)
        for tap in range(geo.kernel[d]):
            spread[_taps(axis, y.ndim, tap, geo, d)] += y
        y = spread
    return y


def _grouped(a: np.ndarray, groups: int) -> np.ndarray:
    """[N, C, *rest] → [G, C/G·|rest|, N·|...|]: a matrix per group whose columns run over the
    samples (a view when N is 1). `rest` is split as (*inner, *outer) by the caller's reshape."""
    n = a.shape[0]
    return a.reshape(n, groups, -1, a.shape[-1]).transpose(1, 2, 0, 3).reshape(groups, -1, n * a.shape[-1])


def _columns(x: np.ndarray, groups: int, geo: Geometry) -> np.ndarray:
    """im2col: [G, Cg·K, N·P] from x [N, C, *S]."""
    n, c = x.shape[:2]
    if geo.kernel_volume == 1 and all(s == 1 for s in geo.strides) and geo.padded_size == geo.in_size:
        return _grouped(x.reshape(n, c, -1), groups)  # a 1×1 convolution reads x as it is
    cols = window_view(pad_input(x, geo), geo)
    return _grouped(cols.reshape(n, c * geo.kernel_volume, -1), groups)


def _ungrouped(a: np.ndarray, n: int, inner, outer) -> np.ndarray:
    """Inverse of `_grouped`: [G, Cg·|inner|, N·|outer|] → [N, C, *inner, *outer]."""
    channels = a.shape[0] * a.shape[1] // int(np.prod(inner, dtype=np.int64))
    return np.moveaxis(a.reshape((channels,) + tuple(inner) + (n,) + tuple(outer)), 1 + len(inner), 0)


def correlation_geometry(geo: Geometry) -> Optional[Geometry]:
    """For a stride-1 convolution, the windows of its input adjoint read as a correlation of
    the output adjoint with the flipped kernel: input position i gathers output positions
    i + pad_begin − k·dilation. None where that form does not apply (strides, or pads wider
    than the kernel's reach)."""
    if any(st != 1 for st in geo.strides):
        return None
    reach = tuple((k - 1) * d for k, d in zip(geo.kernel, geo.dilations))
    begin = tuple(r - b for r, b in zip(reach, geo.pads_begin))
    end = tuple(r - e for r, e in zip(reach, geo.pads_end))
    if min(begin + end, default=0) < 0 or any(
            o != s + b + e - r for o, s, b, e, r in zip(geo.out_size, geo.in_size, geo.pads_begin, geo.pads_end, reach)):
        return None
    return Geometry(geo.kernel, geo.strides, geo.dilations, begin, end, geo.out_size, geo.in_size)


def conv_input_adjoint(w2: np.ndarray, adj: np.ndarray, n: int, groups: int, geo: Geometry,
                       form: Optional[str] = None, keep_windows: bool = False):
    """The adjoint of a convolution's input, [N, C, *S], from the squared kernel w2 [O, Cg, *K]
    and the output adjoint `adj` grouped as [G, Og, N·P].

    Two forms give the same sums. "scatter": every window's share is formed (C·K rows) and
    added back where the window reads. "correlation" (stride 1 only): one correlation of the
    output adjoint with the flipped kernel, a product with its windows (O·K rows). `form`
    None picks the one that moves less data: the correlation copies the adjoint's windows
    (O·K·P) and the flipped kernel (O·Cg·K), the scatter writes and adds back C·K·P; so the
    correlation wins on large maps and where a layer has fewer outputs than inputs (a
    DenseNet's growth convolutions), the scatter on small maps of wide layers.

    With `keep_windows`, returns (into, windows): the correlation form's windows of the
    adjoint, from which the kernel's statistic is one more product (`kernel_statistic`),
    or None where another form ran (the caller then copies the input's windows for it)."""
    wshape = w2.shape
    og = wshape[0] // groups
    if geo.kernel_volume == 1 and geo.padded_size == geo.in_size and all(st == 1 for st in geo.strides):
        back = np.matmul(w2.reshape(groups, og, -1).transpose(0, 2, 1), adj)  # both forms are this product
        into = _ungrouped(back, n, (), geo.in_size)
        return (into, None) if keep_windows else into
    corr = correlation_geometry(geo)
    if form is None:
        positions = int(np.prod(geo.out_size)) * n
        cheaper = wshape[0] * (positions + wshape[1]) < 2 * groups * wshape[1] * positions
        form = "correlation" if corr is not None and cheaper else "scatter"
    if form == "correlation":
        if corr is None:
            raise ValueError("the correlation form needs stride 1 and pads within the kernel's reach")
        nd = len(geo.kernel)
        flipped = w2[(slice(None), slice(None)) + (slice(None, None, -1),) * nd]
        # [G, Cg, Og·K]: for input channel c of group g, the kernel of every output channel o
        kernel = flipped.reshape((groups, og) + wshape[1:]).swapaxes(1, 2).reshape(groups, wshape[1], -1)
        adj_full = _ungrouped(adj, n, (), geo.out_size)
        cols = window_view(pad_input(adj_full, corr), corr)  # [N, O, *K, *S]
        cols = _grouped(cols.reshape(n, wshape[0] * geo.kernel_volume, -1), groups)
        into = _ungrouped(np.matmul(kernel, cols), n, (), geo.in_size)
        return (into, cols) if keep_windows else into
    back = _ungrouped(np.matmul(w2.reshape(groups, og, -1).transpose(0, 2, 1), adj), n, geo.kernel, geo.out_size)
    into = crop_input(scatter_windows(back, geo), geo)
    return (into, None) if keep_windows else into


def kernel_statistic(windows: List[np.ndarray], x: np.ndarray, groups: int, wshape, geo: Geometry) -> np.ndarray:
    """A stride-1 convolution's statistic g[o, c, k] = Σ over the output positions p of
    adj[o, p] · x[c, p + k·dilation − pad_begin], from the correlation form's windows of the
    adjoint ([G, Og·K, N·S]; `conv_input_adjoint`): the window k' of input position s holds
    adj[o, s + pad_begin − (K−1−k')·dilation], so g is the windows' product with x, read with
    the kernel's axes reversed. The input's own windows are never copied. (The terms that the
    windows' zero padding adds are exact zeros: no rounding beyond the P terms of the sum.)

    `windows` comes in a list that this empties: the windows go once their product is made,
    before g is laid out (two arrays of the kernel's size, not three arrays at once)."""
    n, c = x.shape[:2]
    by_input = np.matmul(windows.pop(), _grouped(x.reshape(n, c, -1), groups).transpose(0, 2, 1))  # [G, Og·K, Cg]
    by_input = by_input.reshape((wshape[0],) + tuple(geo.kernel) + (wshape[1],))
    by_input = by_input[(slice(None),) + (slice(None, None, -1),) * len(geo.kernel)]
    return np.ascontiguousarray(np.moveaxis(by_input, -1, 1))


def _crop_or_pad(arr: np.ndarray, begin, size) -> np.ndarray:
    """Window [begin, begin+size) of the spatial axes of arr [N, C, *S], zero outside."""
    out = np.zeros(arr.shape[:2] + tuple(size), dtype=arr.dtype)
    src, dst = [slice(None)] * 2, [slice(None)] * 2
    for b, s, n in zip(begin, size, arr.shape[2:]):
        lo, hi = max(b, 0), min(b + s, n)
        src.append(slice(lo, max(lo, hi)))
        dst.append(slice(lo - b, lo - b + max(0, hi - lo)))
    out[tuple(dst)] = arr[tuple(src)]
    return out


def _uncrop(arr: np.ndarray, begin, full_size) -> np.ndarray:
    """Adjoint of `_crop_or_pad`: place arr back into zeros of `full_size`."""
    out = np.zeros(arr.shape[:2] + tuple(full_size), dtype=arr.dtype)
    src, dst = [slice(None)] * 2, [slice(None)] * 2
    for b, s, n in zip(begin, arr.shape[2:], full_size):
        lo, hi = max(b, 0), min(b + s, n)
        dst.append(slice(lo, max(lo, hi)))
        src.append(slice(lo - b, lo - b + max(0, hi - lo)))
    out[tuple(dst)] = arr[tuple(src)]
    return out


# ---------------------------------------------------------------------------- dense products
# Rows of a weight squared at once: the square of a large weight never exists whole, only
# this many float64 elements of it (32 MiB; as many bytes of float32 elements).
_SQUARE_CHUNK = 1 << 22


def square_block_size(shape: Tuple[int, int], dtype) -> int:
    """Elements of the block `squared_product` squares a 2-D weight of `shape` in: whole rows,
    the same bytes in either dtype (twice the rows in float32), at least one row."""
    n1 = max(1, shape[1])
    return max(1, _SQUARE_CHUNK * 8 // np.dtype(dtype).itemsize // n1) * n1


def squared_product(w: np.ndarray, x: np.ndarray, w_left: bool, transposed: bool, dtype=np.float64,
                    guard: Optional[RangeGuard] = None, scratch: Optional[np.ndarray] = None) -> np.ndarray:
    """x @ M or M @ x (`w_left`) with M = w² or (w²)ᵀ (`transposed`), in `dtype` (x's).

    `w` is a 2-D weight in its stored dtype; x may have leading batch axes (np.matmul's
    broadcasting). w² is formed a block of rows at a time (each block shown to `guard`), in
    `scratch` when it is a 1-D array of `dtype` large enough for a block (`square_block_size`).
    """
    n0, n1 = w.shape
    step = square_block_size(w.shape, dtype) // max(1, n1)
    if w_left:
        out = np.zeros(x.shape[:-2] + ((n1 if transposed else n0), x.shape[-1]), dtype=dtype)
    else:
        out = np.zeros(x.shape[:-1] + ((n0 if transposed else n1),), dtype=dtype)
    # One block for the squares, reused from block to block: a fresh one per block would be
    # allocated (and page-faulted) anew each time.
    rows_per_block = min(step, n0)
    if scratch is not None and scratch.dtype == dtype and scratch.size >= rows_per_block * n1:
        square = scratch[:rows_per_block * n1].reshape(rows_per_block, n1)
    else:
        square = np.empty((rows_per_block, n1), dtype=dtype)
    for start in range(0, n0, step):
        rows = slice(start, start + step)
        part = w[rows]
        part = np.square(part.astype(np.float32) if part.dtype.name == "bfloat16" else part, dtype=dtype,
                         out=square[:part.shape[0]])
        if guard is not None:
            guard.made(part, w[rows])
        if w_left and not transposed:  # rows of M are rows of w
            out[..., rows, :] = np.matmul(part, x)
        elif w_left:  # Mᵀ: rows of w are columns of M
            out += np.matmul(part.T, x[..., rows, :])
        elif not transposed:  # x @ w²: rows of w meet columns of x
            out += np.matmul(x[..., rows], part)
        else:  # x @ (w²)ᵀ: rows of w make columns of the output
            out[..., rows] = np.matmul(x, part.T)
    return out


def summed_product(a: np.ndarray, b: np.ndarray, shape) -> np.ndarray:
    """`unbroadcast(a * b, shape)`: the product summed over the axes that `shape` broadcasts
    (a statistic). For two arrays of one shape it is one einsum, which forms no product array
    as large as them (a BatchNorm's scale: one dot product per channel)."""
    shape = tuple(shape)
    extra = a.ndim - len(shape)
    if a.shape != b.shape or extra < 0 or a.ndim > 26 or shape == a.shape \
            or any(d not in (1, n) for d, n in zip(shape, a.shape[extra:])):
        return unbroadcast(a * b, shape)
    axes = string.ascii_lowercase[:a.ndim]
    kept = "".join(axis for axis, d in zip(axes[extra:], shape) if d != 1)
    return np.einsum(f"{axes},{axes}->{kept}", a, b).reshape(shape)


# Primitives that only copy elements, place zeros or add: their results' smallest non-zero is
# at least their operands', and an overflow shows in the products that read them, so the
# range guard need not look at them (float32).
_MOVES_ONLY = (P.Identity, P.Gather, P.Concat)
_WINDOWED = (P.Conv, P.ConvTranspose)


def _swap(x: np.ndarray) -> np.ndarray:
    return np.swapaxes(x, -1, -2)


@dataclass(frozen=True)
class _Move:
    """How one output of a `Gather` is read from its inputs (flattened one after another):
    a contiguous run [start, start+size) when `start` is set (a channel Concat at batch one, a
    Split, a Reshape), otherwise `source` elements placed at the flat positions `kept` of the
    output (the others are zero); `unique` when no input element is read twice, `readers` the
    most times one is."""

    shape: Tuple[int, ...]
    size: int
    start: Optional[int]
    source: Optional[np.ndarray] = None
    kept: Optional[np.ndarray] = None
    unique: bool = False
    readers: int = 1


_MOVES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _moves(prim: P.Gather) -> List[_Move]:
    """The moves of a Gather's maps, worked out once per primitive (a plan walks the same
    primitives at every solve)."""
    moves = _MOVES.get(prim)
    if moves is None:
        moves = []
        for src in prim.maps:
            src = src if isinstance(src, P.Run) else P.compact_map(src)  # (an array may be a run too)
            if isinstance(src, P.Run):
                moves.append(_Move(src.shape, src.size, src.start))
                continue
            flat = src.ravel()
            kept = np.flatnonzero(flat >= 0)
            source = flat[kept]
            readers = int(np.bincount(source).max()) if source.size else 0
            moves.append(_Move(src.shape, flat.size, None, source, kept, readers <= 1, max(readers, 1)))
        _MOVES[prim] = moves
    return moves


class NumpyExecutor:
    """Runs primitives on numpy arrays of `dtype` (float64, or float32 under a `RangeGuard`:
    `guard`, None in float64); statistics go to `sink` as they are made."""

    eager_sums = True  # adjoint contributions are added as they come (one array per tensor)

    def __init__(self, graph: Graph, sink: Sink, dtype=np.float64):
        self.graph = graph
        self.sink = sink
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype(np.float64), np.dtype(np.float32)):
            raise ValueError(f"the numpy executor runs in float64 or float32, not {self.dtype}")
        self.guard = RangeGuard() if self.dtype == np.float32 else None
        self._phase = MASS  # what the arrays now made are, for the guard: masses or adjoints
        # the smallest non-zero square of each parameter use (a weight is squared at each
        # forward, recomputation and backward; its values do not change within a walk)
        self._square_low: dict = {}
        # the block the dense weights are squared in, kept from one dense layer to the next:
        # one allocation (and its page faults) for a stack of them instead of one per layer
        # and pass; let go where a convolution runs (its own arrays are the large ones)
        self._scratch: Optional[np.ndarray] = None

    # ------------------------------------------------------------ what the walk calls
    @staticmethod
    def default_budget(total_bytes: float) -> float:
        return default_mass_budget(total_bytes)

    @staticmethod
    def measure(value: np.ndarray):
        root = value
        while isinstance(root.base, np.ndarray):
            root = root.base
        return id(root), root.nbytes, root

    @property
    def counts_roundings(self) -> bool:
        return self.guard is not None

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    def ones(self, shape) -> np.ndarray:
        if self.guard is not None:  # the masses of inputs, or the adjoints of outputs
            self.guard.scalar(1.0, MASS)
            self.guard.scalar(1.0, ADJOINT)
        return np.ones(shape, dtype=self.dtype)

    def zeros(self, shape) -> np.ndarray:
        return np.zeros(shape, dtype=self.dtype)

    # ------------------------------------------------------------ float32: range and roundings
    def _operand(self, value: np.ndarray) -> np.ndarray:
        """`value`, a mass or adjoint that a product reads next, shown to the range guard."""
        if self.guard is not None:
            self.guard.array(value, self._phase)
        return value

    def _fixed(self, value: np.ndarray) -> np.ndarray:
        """A fixed non-negative array of the path network (a pool's weights, a resize's
        matrix) in the walk's dtype, shown to the guard as scalars are."""
        cast = np.asarray(value, dtype=self.dtype)
        if self.guard is not None:
            self.guard.made(cast, value, SCALAR, squared=False)
        return cast

    def _gain(self, value: np.ndarray, gain: float, kind: Optional[str] = None) -> np.ndarray:
        """value · gain, value (a mass or adjoint, or a statistic: `kind`) shown to the guard."""
        if gain == 1.0:
            return value
        if self.guard is not None:
            self.guard.array(value, kind or self._phase)
            self.guard.scalar(gain)
        return value * self.dtype.type(gain)

    def roundings(self, prim: P.Primitive) -> Tuple[int, int, int]:
        """Upper bounds on the roundings one result element of `prim` adds to its operands'
        (forward output, input adjoint, statistic), as this executor computes them: a sum
        of n terms counts n (their products included), forming a factor one, each gain two
        (its cast to the walk's dtype, and the product). One `_roundings_<primitive>` each,
        beside the primitive's forward and backward."""
        return getattr(self, "_roundings_" + type(prim).__name__)(prim)

    def _size(self, name: str) -> int:
        return int(np.prod(self._shape(name), dtype=np.int64))

    @staticmethod
    def _gain_roundings(gain: float) -> int:
        return 2 if gain != 1.0 else 0

    def begin_backward(self) -> None:
        pass

    @staticmethod
    def total(parts: List[Tuple[np.ndarray, bool]], shape) -> np.ndarray:
        """The sum of `parts` ((array, whether it is new and may be added into)) broadcast to
        `shape`; a single part of that shape is returned as it is."""
        shape = tuple(shape)
        if len(parts) == 1 and parts[0][0].shape == shape:
            return parts[0][0]
        into = next((k for k, (v, fresh) in enumerate(parts) if fresh and v.shape == shape), None)
        if into is None:
            first = parts[0][0] if len(parts) == 1 else parts[0][0] + parts[1][0]
            acc = first if first.shape == shape and len(parts) > 1 else np.broadcast_to(first, shape).copy()
            rest = parts[2:]
        else:
            acc = parts[into][0]
            rest = parts[:into] + parts[into + 1:]
        for value, _ in rest:
            np.add(acc, value, out=acc)
        return acc

    def emit(self, use: ParamUse, g, factors) -> None:
        self.sink(Statistic(use, g, factors))

    # ------------------------------------------------------------ parameters
    def _stored(self, use: ParamUse) -> np.ndarray:
        """A parameter in its stored dtype (no copy), in the layout its op sees."""
        if use.ref is not None:
            return use.ref.to_view(self.graph.stored_value(use.ref))
        return np.asarray(self.graph.constant_value(use.input_name))

    def _factor(self, weight: P.Weight) -> np.ndarray:
        """The weight's value in the walk's dtype: the parameter squared (or the fixed value)
        × gain."""
        squared = weight.value is None
        if not squared:
            stored = np.asarray(weight.value)
            value = np.asarray(stored, dtype=self.dtype)
        else:
            stored = self._stored(weight.use)
            if stored.dtype.name == "bfloat16":
                stored = stored.astype(np.float32)
            value = np.square(stored, dtype=self.dtype)
        if self.guard is None:
            return value * weight.gain if weight.gain != 1.0 else value
        low = self._square_low.get(id(weight))
        if low is None:  # (a fixed value is already squared, in float64: its cast is checked alike)
            low = self._square_low[id(weight)] = self.guard.made(value, stored, squared=squared)
        if weight.gain != 1.0:
            self.guard.scalar(weight.gain)
            value = value * self.dtype.type(weight.gain)
            self.guard.array(value, FACTOR)
        else:
            self.guard.note(FACTOR, low)
        return value

    def _square_product(self, weight: P.Weight, w, x, w_left: bool, transposed: bool) -> np.ndarray:
        """squared_product, its squares shown to the guard the first time the weight is
        squared in this walk (its values do not change within it)."""
        guard = None
        if self.guard is not None and id(weight) not in self._square_low:
            guard, self._square_low[id(weight)] = self.guard, 0.0
        need = min(square_block_size(w.shape, self.dtype), w.size)
        if self._scratch is None or self._scratch.size < need:
            self._scratch = np.empty(need, dtype=self.dtype)
        return squared_product(w, x, w_left, transposed, dtype=self.dtype, guard=guard, scratch=self._scratch)

    # ------------------------------------------------------------ primitives
    def forward(self, prim: P.Primitive, inputs: List[np.ndarray]) -> List[np.ndarray]:
        phase, self._phase = self._phase, MASS  # (a recomputation runs within the backward pass)
        if isinstance(prim, _WINDOWED):
            self._scratch = None
        try:
            outputs = getattr(self, "_forward_" + type(prim).__name__)(prim, *inputs)
            if self.guard is not None and not isinstance(prim, _MOVES_ONLY):
                for value in outputs:
                    self.guard.array(value, MASS)
        finally:
            self._phase = phase
        return outputs

    def backward(self, prim: P.Primitive, inputs: Optional[List[np.ndarray]], adjoints: List[np.ndarray]):
        """(adjoint contribution per input (None: none), [(use, g, factors)])."""
        self._phase = ADJOINT
        if isinstance(prim, _WINDOWED):
            self._scratch = None
        into, statistics = getattr(self, "_backward_" + type(prim).__name__)(prim, inputs, *adjoints)
        if self.guard is not None:
            if not isinstance(prim, _MOVES_ONLY):
                for value in into:
                    if value is not None:
                        self.guard.array(value, ADJOINT)
            for _, g, factors in statistics:
                if g is not None:
                    self.guard.result(g)
                if factors is not None:
                    self.guard.product(*factors)
        return into, statistics

    def _shape(self, name: str):
        return self.graph.shape(name)

    # Identity
    def _forward_Identity(self, prim: P.Identity, x):
        return [x]

    def _backward_Identity(self, prim: P.Identity, inputs, adj):
        return [unbroadcast(adj, self._shape(prim.x))], []

    def _roundings_Identity(self, prim: P.Identity):
        return 0, self._size(prim.y) // max(1, self._size(prim.x)), 0

    # Scale
    def _forward_Scale(self, prim: P.Scale, x):
        return [x * self._factor(prim.weight).reshape(prim.view)]

    def _backward_Scale(self, prim: P.Scale, inputs, adj):
        factor = self._factor(prim.weight).reshape(prim.view)
        into = unbroadcast(adj * factor, self._shape(prim.x))
        stats = []
        if prim.weight.reports:
            g = self._gain(summed_product(adj, inputs[0], prim.view), prim.weight.gain, STATISTIC)
            stats.append((prim.weight.use, g.reshape(prim.weight.use.view_shape), None))
        return [into], stats

    def _roundings_Scale(self, prim: P.Scale):
        gain = self._gain_roundings(prim.weight.gain)
        spread = self._size(prim.y) // max(1, int(np.prod(prim.view, dtype=np.int64)))
        return 2 + gain, 2 + gain + self._size(prim.y) // max(1, self._size(prim.x)), spread + gain

    # Bias
    def _forward_Bias(self, prim: P.Bias):
        return [self._factor(prim.weight).reshape(prim.view)]

    def _backward_Bias(self, prim: P.Bias, inputs, adj):
        stats = []
        if prim.weight.reports:
            g = self._gain(unbroadcast(adj, prim.view), prim.weight.gain, STATISTIC)
            stats.append((prim.weight.use, g.reshape(prim.weight.use.view_shape), None))
        return [], stats

    def _roundings_Bias(self, prim: P.Bias):
        gain = self._gain_roundings(prim.weight.gain)
        return 1 + gain, 0, self._size(prim.y) // max(1, int(np.prod(prim.view, dtype=np.int64))) + gain

    # Dense
    def _forward_Dense(self, prim: P.Dense, x):
        w = self._stored(prim.weight.use)
        y = self._square_product(prim.weight, w, _swap(x) if prim.x_transposed else x,
                                 w_left=prim.weight_left, transposed=prim.weight_transposed)
        return [self._gain(y, prim.weight.gain)]

    def _backward_Dense(self, prim: P.Dense, inputs, adj):
        w = self._stored(prim.weight.use)
        x = _swap(inputs[0]) if prim.x_transposed else inputs[0]
        gain = prim.weight.gain
        into = self._square_product(prim.weight, w, adj, w_left=prim.weight_left,
                                    transposed=not prim.weight_transposed)
        into = self._gain(into, gain)
        into = _swap(into) if prim.x_transposed else into
        # The weight's g is a product over the batch (and positions): it goes as factors, and
        # the criterion multiplies them out only if it needs g itself.
        if prim.weight_left:  # y[.., o, t] = Σ_i W[o, i] x[.., i, t]
            xs, adjs = _swap(x).reshape(-1, x.shape[-2]), _swap(adj).reshape(-1, adj.shape[-2])
        else:  # y[.., o] = Σ_i x[.., i] W[i, o]
            xs, adjs = x.reshape(-1, x.shape[-1]), adj.reshape(-1, adj.shape[-1])
        adjs = self._gain(adjs, gain)
        out_first = prim.weight_left != prim.weight_transposed  # the stored view is [O, I]
        factors = (adjs.T, xs.T) if out_first else (xs.T, adjs.T)
        return [into], [(prim.weight.use, None, factors)]

    def _roundings_Dense(self, prim: P.Dense):
        gain = self._gain_roundings(prim.weight.gain)
        n0, n1 = prim.weight.use.view_shape[-2:]
        return 1 + max(n0, n1) + gain, 1 + max(n0, n1) + gain, self._size(prim.x) // max(1, min(n0, n1)) + gain

    _roundings_AxisDense = _roundings_Dense

    # AxisDense: the product of Dense on x with the contracted axis moved last, then a transpose
    def _forward_AxisDense(self, prim: P.AxisDense, x):
        w = self._stored(prim.weight.use)
        z = self._square_product(prim.weight, w, np.moveaxis(x, prim.axis, -1), w_left=False,
                                 transposed=prim.weight_transposed)
        z = self._gain(z, prim.weight.gain)
        return [np.ascontiguousarray(z.transpose(prim.perm))]

    def _backward_AxisDense(self, prim: P.AxisDense, inputs, adj):
        w = self._stored(prim.weight.use)
        adj = adj.transpose(np.argsort(prim.perm))  # back to the product's order: [..., out]
        adj = self._gain(adj, prim.weight.gain)
        into = self._square_product(prim.weight, w, adj, w_left=False, transposed=not prim.weight_transposed)
        into = np.moveaxis(into, -1, prim.axis)
        # g[i, o] = Σ over the other positions of x[.., i] · adj[.., o]: as factors, as for Dense
        x = np.moveaxis(inputs[0], prim.axis, -1)
        xs, adjs = x.reshape(-1, x.shape[-1]), adj.reshape(-1, adj.shape[-1])
        factors = (adjs.T, xs.T) if prim.weight_transposed else (xs.T, adjs.T)
        return [np.ascontiguousarray(into)], [(prim.weight.use, None, factors)]

    # Conv
    def _forward_Conv(self, prim: P.Conv, x):
        w2 = self._factor(prim.weight)
        groups, geo = prim.groups, prim.geometry
        y = np.matmul(w2.reshape(groups, w2.shape[0] // groups, -1), _columns(x, groups, geo))  # [G, Og, N·P]
        return [_ungrouped(y, x.shape[0], (), geo.out_size)]

    def _backward_Conv(self, prim: P.Conv, inputs, adj):
        x = inputs[0]
        w2 = self._factor(prim.weight)
        wshape, groups, geo = w2.shape, prim.groups, prim.geometry
        n = x.shape[0]
        adj = _grouped(adj.reshape(adj.shape[:2] + (-1,)), groups)  # [G, Og, N·P]
        # The adjoint's windows replace the input's for the statistic where they are smaller
        # (fewer outputs than inputs); elsewhere holding them while the statistic is formed
        # would raise the walk's peak (VGG-16: 721 → 729 MiB).
        if wshape[0] < groups * wshape[1]:
            into, windows = conv_input_adjoint(w2, adj, n, groups, geo, keep_windows=True)
        else:
            into, windows = conv_input_adjoint(w2, adj, n, groups, geo), None
        del w2  # the weights' copies go before the statistics' arrays arrive
        if windows is not None:
            held = [windows]
            del windows  # (kernel_statistic lets them go)
            return [into], [(prim.weight.use, kernel_statistic(held, x, groups, wshape, geo), None)]
        cols = _columns(x, groups, geo)
        factors = (adj[0], cols[0]) if groups == 1 and geo.kernel_volume == 1 else None
        g = np.matmul(adj, cols.transpose(0, 2, 1)).reshape(wshape)
        return [into], [(prim.weight.use, g, factors)]

    def _roundings_Conv(self, prim: P.Conv):
        factor = 1 + self._gain_roundings(prim.weight.gain)
        wshape = prim.weight.use.view_shape
        kv, og = prim.geometry.kernel_volume, wshape[0] // prim.groups
        return (factor + wshape[1] * kv, factor + og * kv + kv,  # the input adjoint: either form
                self._size(prim.y) // max(1, self._shape(prim.y)[1]))

    # ConvTranspose
    def _forward_ConvTranspose(self, prim: P.ConvTranspose, x):
        w2 = self._factor(prim.weight)
        groups, geo = prim.groups, prim.scatter
        w2 = w2.reshape(groups, w2.shape[0] // groups, -1)  # [G, Cg, Og·K]
        spread = np.matmul(w2.transpose(0, 2, 1), _grouped(x.reshape(x.shape[:2] + (-1,)), groups))
        full = scatter_windows(_ungrouped(spread, x.shape[0], geo.kernel, geo.out_size), geo)
        return [_crop_or_pad(full, prim.begin, prim.out_size)]

    def _backward_ConvTranspose(self, prim: P.ConvTranspose, inputs, adj):
        x = inputs[0]
        w2 = self._factor(prim.weight)
        wshape, groups, geo = w2.shape, prim.groups, prim.scatter
        n = x.shape[0]
        w2 = w2.reshape(groups, w2.shape[0] // groups, -1)
        full = _uncrop(adj, prim.begin, geo.padded_size)
        view = window_view(full, geo)  # [N, O, *K, *in]
        cols = _grouped(view.reshape(n, view.shape[1] * geo.kernel_volume, -1), groups)  # [G, Og·K, N·P]
        into = _ungrouped(np.matmul(w2, cols), n, (), x.shape[2:])
        xg = _grouped(x.reshape(x.shape[:2] + (-1,)), groups)
        g = np.matmul(xg, cols.transpose(0, 2, 1)).reshape(wshape)
        return [into], [(prim.weight.use, g, None)]

    def _roundings_ConvTranspose(self, prim: P.ConvTranspose):
        factor = 1 + self._gain_roundings(prim.weight.gain)
        wshape = prim.weight.use.view_shape
        kv = prim.scatter.kernel_volume
        return (factor + wshape[0] // prim.groups + kv, factor + wshape[1] * kv,
                self._size(prim.x) // max(1, self._shape(prim.x)[1]))

    # WindowSum
    def _forward_WindowSum(self, prim: P.WindowSum, x):
        geo = prim.geometry
        y = window_sums(pad_input(x, geo), geo)
        if prim.weight is not None:
            y = self._operand(y) * self._fixed(prim.weight)
        return [y]

    def _backward_WindowSum(self, prim: P.WindowSum, inputs, adj):
        geo = prim.geometry
        if prim.weight is not None:
            adj = adj * self._fixed(prim.weight)
        return [crop_input(window_sums_adjoint(adj, geo), geo)], []

    def _roundings_WindowSum(self, prim: P.WindowSum):
        weighted = 2 if prim.weight is not None else 0  # the weights' cast, and the product
        return prim.geometry.kernel_volume + weighted, prim.geometry.kernel_volume + weighted, 0

    # ReduceSum
    def _forward_ReduceSum(self, prim: P.ReduceSum, x):
        y = self._gain(x.sum(axis=prim.axes), prim.gain) if prim.axes else x.copy()
        return [y.reshape(self._shape(prim.y))]

    def _backward_ReduceSum(self, prim: P.ReduceSum, inputs, adj):
        shape = self._shape(prim.x)
        kept = [1 if a in prim.axes else d for a, d in enumerate(shape)]
        return [np.broadcast_to(self._gain(adj.reshape(kept), prim.gain), shape)], []

    def _roundings_ReduceSum(self, prim: P.ReduceSum):
        scaled = self._gain_roundings(prim.gain)
        return self._size(prim.x) // max(1, self._size(prim.y)) + scaled, scaled, 0

    # Gather
    def _forward_Gather(self, prim: P.Gather, *xs):
        flat = xs[0].ravel() if len(xs) == 1 else np.concatenate([x.ravel() for x in xs])
        out = []
        for move in _moves(prim):
            if move.start is not None:  # a contiguous run of the inputs: a view
                out.append(flat[move.start:move.start + move.size].reshape(move.shape))
            else:
                y = np.zeros(move.shape, dtype=flat.dtype)
                y.ravel()[move.kept] = flat[move.source]
                out.append(y)
        return out

    def _backward_Gather(self, prim: P.Gather, inputs, *adjs):
        sizes = [int(np.prod(self._shape(x))) for x in prim.xs]
        moves = _moves(prim)
        if len(moves) == 1 and moves[0].start == 0 and moves[0].size == sum(sizes):  # a copy, reshaped
            total = adjs[0].ravel()
        else:
            total = np.zeros(sum(sizes), dtype=adjs[0].dtype)
            for move, adj in zip(moves, adjs):
                if move.start is not None:
                    total[move.start:move.start + move.size] += adj.ravel()
                elif move.unique:  # one reader per element: the scatter is an assignment
                    total[move.source] += adj.ravel()[move.kept]
                else:
                    total += np.bincount(move.source, weights=adj.ravel()[move.kept],
                                         minlength=total.size).astype(total.dtype, copy=False)
        parts = np.split(total, np.cumsum(sizes)[:-1])
        return [part.reshape(self._shape(x)) for x, part in zip(prim.xs, parts)], []

    def _roundings_Gather(self, prim: P.Gather):
        moves = _moves(prim)  # backward: each move adds once, an element read n times n times
        return 0, len(moves) + max((m.readers for m in moves), default=1), 0

    # Concat
    def _forward_Concat(self, prim: P.Concat, *xs):
        return [np.concatenate(xs, axis=prim.axis)]

    def _backward_Concat(self, prim: P.Concat, inputs, adj):
        ends = np.cumsum([self._shape(x)[prim.axis] for x in prim.xs])[:-1]
        return np.split(adj, ends, axis=prim.axis), []

    def _roundings_Concat(self, prim: P.Concat):
        return 0, 0, 0  # copies both ways (an input joined twice gets two adjoints: the walk adds them)

    # AxisMatrices
    @staticmethod
    def _along(x, matrix, axis):
        return np.moveaxis(np.tensordot(matrix, x, axes=([1], [axis])), 0, axis)

    def _forward_AxisMatrices(self, prim: P.AxisMatrices, x):
        for k, m in enumerate(prim.matrices):
            x = self._along(self._operand(x), self._fixed(m), prim.first_axis + k)
        return [x]

    def _backward_AxisMatrices(self, prim: P.AxisMatrices, inputs, adj):
        for k, m in enumerate(prim.matrices):
            adj = self._along(self._operand(adj), self._fixed(m).T, prim.first_axis + k)
        return [adj], []

    def _roundings_AxisMatrices(self, prim: P.AxisMatrices):
        return (sum(m.shape[1] + 1 for m in prim.matrices), sum(m.shape[0] + 1 for m in prim.matrices), 0)
