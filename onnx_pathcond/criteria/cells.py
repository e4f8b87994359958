"""The cells of Σ g·exp(Bu): the form in which a criterion's sums are taken (docs/design.md §3.3).

With u the log-rescalings of the H groups, entry i of a statistic g (diag(G) for PathCond,
θ² for ENorm) becomes g_i·exp((Bu)_i) where (Bu)_i = u[out(i)] − u[in(i)] (the group it is
outgoing from, minus the one it is incoming to; a missing side counts as 0). Entries of one
parameter tensor that share both groups (every tap of one conv kernel slice) are summed into
one *cell*: a block of cells is a small matrix G[r, c] with a group for each row (incoming
side) and column (outgoing side), so the sums the solvers need are matrix-vector products.
Entries whose scale cannot change (both sides fixed, or the same group on both sides) are
folded into constants.

`ProblemBuilder` gathers (use, g) pairs into a `Problem`; `layers` and `layer_sums` give the
coordinate descents of the criteria their layer split and per-layer sums.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..channels import NO_POSITION, ParamUse
from ..pathnet.records import Statistic
from ..symmetry import Groups


@dataclass
class Block:
    """Cells of one parameter tensor. `row`/`col` hold group ids (H = fixed side).

    `row` has shape (R, 1) or (R, C); `col` has shape (1, C) or (R, C). `gmax`/`gmin` are
    the largest / smallest positive entry per cell, kept only where a cell sums several
    entries (None: the cell is a single entry, equal to G).

    A large block of a dense layer may be kept *factored*: G = left @ rightᵀ with
    left (R, P) and right (C, P), P the positions the layer's weights are used at (one for
    a fully-connected layer). The statistics of such a layer are a sum of P outer products,
    so when (R + C)·P < R·C the factors are smaller than G, and products with G cheaper.
    """

    G: Optional[np.ndarray]
    row: np.ndarray
    col: np.ndarray
    gmax: Optional[np.ndarray]
    gmin: Optional[np.ndarray]
    name: str
    factors: Optional[Tuple[np.ndarray, np.ndarray]] = None

    @property
    def dense(self) -> bool:
        return self.row.shape[1] == 1 and self.col.shape[0] == 1

    @property
    def shape(self) -> Tuple[int, int]:
        if self.factors is not None:
            return self.factors[0].shape[0], self.factors[1].shape[0]
        return self.G.shape

    def _mv(self, v: np.ndarray) -> np.ndarray:
        """G @ v."""
        if self.factors is not None:
            left, right = self.factors
            return left @ (v @ right)
        return self.G @ v

    def _rmv(self, v: np.ndarray) -> np.ndarray:
        """v @ G."""
        if self.factors is not None:
            left, right = self.factors
            return right @ (v @ left)
        return v @ self.G

    def incoming(self, u_ext: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Σ g·exp(u[col]) per row key: (keys, values) — the incoming sums at u_row = 0."""
        if self.dense:
            return self.row[:, 0], self._mv(np.exp(u_ext[self.col[0]]))
        values = self.G * np.exp(u_ext[self.col])
        return np.broadcast_to(self.row, values.shape).ravel(), values.ravel()

    def outgoing(self, u_ext: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Σ g·exp(−u[row]) per column key: the outgoing sums at u_col = 0."""
        if self.dense:
            return self.col[0], self._rmv(np.exp(-u_ext[self.row[:, 0]]))
        values = self.G * np.exp(-u_ext[self.row])
        return np.broadcast_to(self.col, values.shape).ravel(), values.ravel()

    def total(self, u_ext: np.ndarray) -> float:
        if self.dense:
            return float(np.exp(-u_ext[self.row[:, 0]]) @ self._mv(np.exp(u_ext[self.col[0]])))
        return float((self.G * np.exp(u_ext[self.col] - u_ext[self.row])).sum())

    def masses(self, u_ext: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Rescaled mass per incoming key and per outgoing key: (row keys, in, col keys, out)."""
        if self.dense:
            er, ec = np.exp(-u_ext[self.row[:, 0]]), np.exp(u_ext[self.col[0]])
            return self.row[:, 0], er * self._mv(ec), self.col[0], self._rmv(er) * ec
        w = self.G * np.exp(u_ext[self.col] - u_ext[self.row])
        return (np.broadcast_to(self.row, w.shape).ravel(), w.ravel(),
                np.broadcast_to(self.col, w.shape).ravel(), w.ravel())

    def chunks(self, cells: int = 1 << 18):
        """(row slice, cells) pieces of G of about `cells` cells each; a factored block's
        pieces are multiplied out from its factors a few rows at a time."""
        n_rows, n_cols = self.shape
        step = max(1, cells // max(1, n_cols))
        for start in range(0, n_rows, step):
            rows = slice(start, start + step)
            if self.factors is None:
                yield rows, self.G[rows]
            else:
                left, right = self.factors
                yield rows, left[rows] @ right.T

    def extremes(self, u_ext: np.ndarray) -> Tuple[float, float]:
        """Largest and smallest positive rescaled entry (two temporaries of one chunk's size)."""
        outer = self._outer_extremes(u_ext)
        if outer is not None:
            return outer
        high, low = 0.0, np.inf
        for rows, G in self.chunks():
            row = self.row[rows] if self.row.shape[0] > 1 else self.row
            col = self.col[rows] if self.col.shape[0] > 1 else self.col
            factor = np.exp(u_ext[col] - u_ext[row])
            scaled = np.multiply(G if self.gmax is None else self.gmax[rows], factor)
            high = max(high, float(scaled.max()))
            bottom = G if self.gmin is None else self.gmin[rows]
            np.multiply(bottom, factor, out=scaled)
            scaled[bottom <= 0] = np.inf
            low = min(low, float(scaled.min()))
        return high, low

    def _outer_extremes(self, u_ext: np.ndarray) -> Optional[Tuple[float, float]]:
        """For a dense block factored as one outer product of non-negative factors (a fully
        connected layer at one position): entry [r, c] rescaled is a[r]·b[c] with
        a = left·exp(−u[row]) and b = right·exp(u[col]), both ≥ 0, so its largest entry is
        max a · max b and its smallest positive one min(a > 0) · min(b > 0), from R + C
        numbers instead of R·C. None where that does not hold."""
        if self.factors is None or not self.dense or self.gmax is not None or self.gmin is not None:
            return None
        left, right = self.factors
        if left.shape[1] != 1 or not left.size or not right.size or left.min() < 0 or right.min() < 0:
            return None
        a = left[:, 0] * np.exp(-u_ext[self.row[:, 0]])
        b = right[:, 0] * np.exp(u_ext[self.col[0]])
        a_pos, b_pos = a[a > 0], b[b > 0]
        if not a_pos.size or not b_pos.size:
            return 0.0, np.inf
        return float(a.max() * b.max()), float(a_pos.min() * b_pos.min())


@dataclass
class Problem:
    H: int
    blocks: List[Block]
    n_in: np.ndarray  # per group: entries with g > 0 incoming to it
    n_out: np.ndarray
    p: int
    const_sum: float  # Σ g over entries whose scale is fixed
    const_max: float
    const_min: float
    log_sum: float  # Σ log g over all p entries
    layer_of: np.ndarray  # per group: the node that created it (layer order)
    g_max_before: float = 0.0  # largest and smallest positive entry of g as given
    g_min_before: float = np.inf

    @property
    def A(self) -> np.ndarray:
        """#in − #out per group: the coefficient of u_h in −Σ(Bu)_i."""
        return (self.n_in - self.n_out).astype(np.float64)

    def u_ext(self, u: np.ndarray) -> np.ndarray:
        return np.append(np.asarray(u, dtype=np.float64), 0.0)

    def total(self, u: np.ndarray) -> float:
        ue = self.u_ext(u)
        return self.const_sum + sum(b.total(ue) for b in self.blocks)

    def objective(self, u: np.ndarray) -> float:
        if self.p == 0:
            return 0.0
        return self.p * np.log(self.total(u)) + float(self.A @ u)

    def log_am_gm(self, u: np.ndarray) -> float:
        """log(arithmetic mean / geometric mean) of the rescaled diag(G); 0 when all equal."""
        if self.p == 0:
            return 0.0
        log_am = np.log(self.total(u) / self.p)
        log_gm = (self.log_sum - float(self.A @ u)) / self.p
        return float(log_am - log_gm)

    def extremes(self, u: np.ndarray) -> Tuple[float, float]:
        ue = self.u_ext(u)
        high, low = self.const_max, self.const_min
        for b in self.blocks:
            h, lo = b.extremes(ue)
            high, low = max(high, h), min(low, lo)
        return (high if self.p else 0.0), (low if self.p else 0.0)

    def group_masses(self, u_ext: np.ndarray) -> Tuple[float, np.ndarray, np.ndarray]:
        """Σ g·exp(Bu) over every entry (constants included), and its parts per group over the
        entries incoming to it and outgoing from it (H + 1 long: the last, the fixed side)."""
        total = self.const_sum
        keys_in, vals_in, keys_out, vals_out = [], [], [], []
        for b in self.blocks:
            rk, rin, ck, cout = b.masses(u_ext)
            keys_in.append(rk)
            vals_in.append(rin)
            keys_out.append(ck)
            vals_out.append(cout)
            total += float(rin.sum())
        if not self.blocks:
            return total, np.zeros(self.H + 1), np.zeros(self.H + 1)
        # one bincount over all blocks: each is O(H), so not one per block
        w_in = np.bincount(np.concatenate(keys_in), np.concatenate(vals_in), minlength=self.H + 1)
        w_out = np.bincount(np.concatenate(keys_out), np.concatenate(vals_out), minlength=self.H + 1)
        return total, w_in, w_out

    def evaluate(self, u: np.ndarray) -> Tuple[float, np.ndarray, np.ndarray]:
        """F(u), ∇F(u) = p·Bᵀw/Σw − Bᵀ1, and the rescaled mass touching each group, in one pass."""
        total, w_in, w_out = self.group_masses(self.u_ext(u))
        if self.p == 0 or total <= 0:
            return 0.0, np.zeros(self.H), np.zeros(self.H)
        F = self.p * np.log(total) + float(self.A @ u)
        grad = self.p * (w_out[:self.H] - w_in[:self.H]) / total + self.A
        return F, grad, (w_in[:self.H] + w_out[:self.H]) / total

    def gradient(self, u: np.ndarray) -> np.ndarray:
        return self.evaluate(u)[1]


# Σ log g takes a logarithm per entry, the sink's costliest pass over a large g. Where every
# product of four entries stays a normal float64 (entries within [1e-75, 1e75]), the log of
# such products is taken instead: a quarter of the logarithms, for three multiplies each, and
# a rounding of at most 3 ulp per product, far below what the figure is used for (AM/GM).
_FOUR_SAFE = (1e-75, 1e75)


def _sum_of_logs(values: np.ndarray, low: float, high: float, chunk: int = 1 << 20) -> float:
    """Σ log(values) for positive values within [low, high], a chunk at a time (no temporary
    as large as a big weight tensor)."""
    flat = values.reshape(-1)
    if not (_FOUR_SAFE[0] <= low and high <= _FOUR_SAFE[1]) or flat.size < 8:
        return float(sum(np.log(flat[i:i + chunk], dtype=np.float64).sum() for i in range(0, flat.size, chunk)))
    total = 0.0
    products = np.empty(min(chunk, flat.size) // 4)
    for i in range(0, flat.size, chunk):
        part = flat[i:i + chunk]
        q = part.size // 4
        # in float64 whatever the entries' dtype: a product of four float32 entries can leave
        # float32's range
        fours = np.multiply(part[:q], part[q:2 * q], out=products[:q], dtype=np.float64)
        np.multiply(fours, part[2 * q:3 * q], out=fours, dtype=np.float64)
        np.multiply(fours, part[3 * q:4 * q], out=fours, dtype=np.float64)
        total += float(np.log(fours).sum()) + float(np.log(part[4 * q:], dtype=np.float64).sum())
    return total


def _groups_meet(row: np.ndarray, col: np.ndarray, H: int) -> bool:
    """Whether a movable group (< H) is on both sides of a block. Groups are numbered layer by
    layer, so the two sides' ranges usually do not overlap, which settles it without a set
    intersection."""
    row, col = row[row < H], col[col < H]
    if not row.size or not col.size:
        return False
    if row.max() < col.min() or col.max() < row.min():
        return False
    return bool(np.intersect1d(row, col).size)


# Cells of a convolution sum the taps of one kernel slice: g (o, i, kh, kw) reduced over its
# trailing axes. numpy's reductions over a few trailing axes are slow (a short inner loop per
# cell), so where those axes are trailing and contiguous, g is read as a (cells, taps) matrix:
# sums are matrix-vector products with ones, extremes a running np.maximum / np.minimum over
# the taps, both a block of cells at a time so that the block stays in cache.
_CELLS_PER_BLOCK = 8192
_MAX_TAPS = 32  # beyond this, a row of taps is long enough for numpy's own reduction


def _as_cells(g: np.ndarray, reduced: Tuple[int, ...]) -> Optional[np.ndarray]:
    """g as a (cells, taps) view when `reduced` are its trailing axes, it is C-contiguous and
    has a few taps per cell; None otherwise (then numpy's reductions are used)."""
    nd, r = g.ndim, len(reduced)
    if not r or tuple(reduced) != tuple(range(nd - r, nd)) or not g.flags.c_contiguous:
        return None
    taps = int(np.prod(g.shape[nd - r:]))
    if taps < 2 or taps > _MAX_TAPS or g.size < 2 * _CELLS_PER_BLOCK:
        return None
    return g.reshape(-1, taps)


def _cell_sum(g: np.ndarray, reduced: Tuple[int, ...]) -> np.ndarray:
    """g summed over the axes `reduced`, in float64."""
    kept_shape = tuple(n for a, n in enumerate(g.shape) if a not in reduced)
    if all(g.shape[a] == 1 for a in reduced):
        return np.asarray(g.reshape(kept_shape), dtype=np.float64)  # one entry per cell: nothing to add
    cells = _as_cells(g, reduced)
    if cells is None:
        return g.sum(axis=reduced, dtype=np.float64)
    ones = np.ones(cells.shape[1])
    out = np.empty(cells.shape[0])
    for start in range(0, cells.shape[0], _CELLS_PER_BLOCK):
        block = cells[start:start + _CELLS_PER_BLOCK]
        np.matmul(np.asarray(block, dtype=np.float64), ones, out=out[start:start + _CELLS_PER_BLOCK])
    return out.reshape(kept_shape)


def _cell_extreme(g: np.ndarray, reduced: Tuple[int, ...], ufunc) -> np.ndarray:
    """g reduced over the axes `reduced` with `ufunc` (np.maximum or np.minimum)."""
    cells = _as_cells(g, reduced)
    if cells is None:
        return ufunc.reduce(g, axis=reduced)
    out = np.empty(cells.shape[0], dtype=g.dtype)
    for start in range(0, cells.shape[0], _CELLS_PER_BLOCK):
        block, acc = cells[start:start + _CELLS_PER_BLOCK], out[start:start + _CELLS_PER_BLOCK]
        ufunc(block[:, 0], block[:, 1], out=acc)
        for tap in range(2, cells.shape[1]):
            ufunc(acc, block[:, tap], out=acc)
    return out.reshape(tuple(n for a, n in enumerate(g.shape) if a not in reduced))


def _tally(acc: np.ndarray, keys: np.ndarray, weights: Optional[np.ndarray] = None, scale: float = 1.0) -> None:
    """acc[k] += scale · (the weights of key k), over the span of groups the keys cover, not
    all of acc: a block's keys are a layer or a few, and a count over every group per block
    would make the intake blocks × groups (DenseNet-121: 300 blocks, 42,000 groups). The last
    entry of acc (the fixed side, never read) is left out of the span."""
    if not keys.size:
        return
    last = acc.size - 1
    high = int(keys.max())
    if high == last:
        inside = keys < last
        keys = keys[inside]
        weights = None if weights is None else weights[inside]
        if not keys.size:
            return
        high = int(keys.max())
    low = int(keys.min())
    counts = np.bincount(keys - low, weights=weights, minlength=high - low + 1)
    if scale != 1.0:
        counts = counts * scale
    acc[low:high + 1] += counts


class ProblemBuilder:
    """Collects (use, g) pairs from the statistics pass into a `Problem`."""

    def __init__(self, groups: Groups, uses: List[ParamUse], shared: Optional[Dict[str, Tuple[int, np.ndarray]]] = None):
        self.groups = groups
        self.H = groups.count
        self.blocks: List[Block] = []
        self.n_in = np.zeros(self.H + 1)
        self.n_out = np.zeros(self.H + 1)
        self.p = 0
        self.const_sum = 0.0
        self.const_max = 0.0
        self.const_min = np.inf
        self.log_sum = 0.0
        self.g_max_before = 0.0
        self.g_min_before = np.inf
        # A tensor read by several nodes is one set of parameters: sum its g over the uses.
        # Its zero elements are not tied across the uses (see symmetry.reconcile_stored_tensors):
        # each use keeps its own entries for them.
        self._expected: Dict[str, int] = {}
        for use in uses:
            if use.ref is not None and not use.ignored:
                self._expected[use.ref.name] = self._expected.get(use.ref.name, 0) + 1
        self._nonzero = {name: mask for name, (_, mask) in (shared or {}).items()}
        self._pending: Dict[str, Tuple[ParamUse, np.ndarray, int]] = {}

    def group_ids(self, positions: np.ndarray) -> np.ndarray:
        of = self.groups.of_position
        ids = np.where(positions >= 0, of[np.maximum(positions, 0)] if of.size else NO_POSITION, NO_POSITION)
        return np.where(ids >= 0, ids, self.H)

    def add(self, stat: Statistic) -> None:
        """Take one use's statistics (the sink of the statistics step). A dense layer's may
        come as factors only: g is then formed only when the factors do not suffice."""
        use, factors = stat.use, stat.factors
        shared = use.ref is not None and self._expected.get(use.ref.name, 1) > 1
        if stat.g is None and not shared and self._add_outer_product(use, factors):
            return
        # g as the walk made it (a float32 g is not copied into float64: the cells sum it in
        # float64); a tensor's uses are added up in float64
        g = stat.array() if shared else stat.entries()
        if shared:
            name = use.ref.name
            nonzero = self._nonzero.get(name)
            if nonzero is not None and not nonzero.all():
                keep = use.ref.to_view(nonzero)
                self._add_entries(use, np.where(keep, 0.0, g))  # zero elements: this use's own entries
                g = np.where(keep, g, 0.0)
            if name in self._pending:
                first, acc, seen = self._pending[name]
                acc += first.ref.to_view(use.ref.to_stored(g))
                self._pending[name] = (first, acc, seen + 1)
            else:
                self._pending[name] = (use, g.copy(), 1)
            first, acc, seen = self._pending[name]
            if seen == self._expected[name]:
                del self._pending[name]
                self._add_entries(first, acc)
            return
        self._add_entries(use, g, factors)

    def _add_outer_product(self, use: ParamUse, factors) -> bool:
        """A fully-connected layer with a batch of one: g = l ⊗ r. Everything the criterion
        needs follows from the two vectors, without forming g. False when the case is not
        that simple (then g is formed and takes the general path)."""
        left, right = factors
        if left.ndim != 2 or left.shape[1] != 1 or len(use.view_shape) != 2:
            return False
        l, r = np.asarray(left[:, 0], dtype=np.float64), np.asarray(right[:, 0], dtype=np.float64)
        H = self.H
        # a side with no positions (a graph input, a graph output) is the fixed group H
        rows = self.group_ids(use.rows) if use.rows is not None else np.full((1, 1), H)
        cols = self.group_ids(use.cols) if use.cols is not None else np.full((1, 1), H)
        if rows.shape == (1, 1):
            rows = np.broadcast_to(rows, (l.size, 1))
        if cols.shape == (1, 1):
            cols = np.broadcast_to(cols, (1, r.size))
        if rows.shape != (l.size, 1) or cols.shape != (1, r.size):
            return False  # groups not one per row and one per column
        row, col = rows[:, 0], cols[0]
        if _groups_meet(row, col, H):
            return False  # cells joining a group to itself: the general path handles them
        l_pos, r_pos = l > 0, r > 0
        nl, nr = int(l_pos.sum()), int(r_pos.sum())
        if nl == 0 or nr == 0:
            return True
        self.p += nl * nr
        self.log_sum += nr * float(np.log(l[l_pos]).sum()) + nl * float(np.log(r[r_pos]).sum())
        high, low = float(l.max() * r.max()), float(l[l_pos].min() * r[r_pos].min())
        self.g_max_before = max(self.g_max_before, high)
        self.g_min_before = min(self.g_min_before, low)
        if (row == H).all() and (col == H).all():
            self.const_sum += float(l.sum() * r.sum())
            self.const_max, self.const_min = max(self.const_max, high), min(self.const_min, low)
            return True
        _tally(self.n_in, row, l_pos * float(nr))
        _tally(self.n_out, col, r_pos * float(nl))
        label = use.ref.name if use.ref is not None else use.input_name
        self.blocks.append(Block(None, rows, cols, None, None, label, factors=(l[:, None], r[:, None])))
        return True

    def _add_entries(self, use: ParamUse, g: np.ndarray, factors=None) -> None:
        label = use.ref.name if use.ref is not None else use.input_name
        if not g.size:
            return
        # g ≥ 0: a positive minimum means every entry counts (the common case: no mask needed
        # anywhere below), which the minimum tells faster than counting the non-zeros.
        g_min = float(g.min())
        dense_g = g_min > 0
        n_pos = g.size if dense_g else int(np.count_nonzero(g))
        if n_pos == 0:
            return
        positive = None if dense_g else g > 0
        g_max = float(g.max())
        if not dense_g:
            g_min = float(g[positive].min())
        self.p += n_pos
        self.log_sum += _sum_of_logs(g if dense_g else g[positive], g_min, g_max)
        self.g_max_before = max(self.g_max_before, g_max)
        self.g_min_before = min(self.g_min_before, g_min)
        rows = self.group_ids(use.rows)
        cols = self.group_ids(use.cols)
        H = self.H
        if (rows == H).all() and (cols == H).all():  # nothing here can move: a constant
            self.const_sum += float(g.sum(dtype=np.float64))
            self.const_max = max(self.const_max, g_max)
            self.const_min = min(self.const_min, g_min)
            return
        nd = g.ndim
        kept = [a for a in range(nd) if rows.shape[a] > 1 or cols.shape[a] > 1]
        reduced = tuple(a for a in range(nd) if a not in kept)
        taps = int(np.prod([g.shape[a] for a in reduced])) if reduced else 1
        cell_sum = _cell_sum(g, reduced) if reduced else g
        if dense_g:  # every cell holds `taps` entries: a broadcast view, no array
            cell_count = np.broadcast_to(np.int64(taps), cell_sum.shape)
        else:
            cell_count = np.rint(_cell_sum(positive, reduced)).astype(np.int64) if reduced \
                else positive.astype(np.int64)
        cell_max = _cell_extreme(g, reduced, np.maximum) if taps > 1 else None
        cell_min = None
        if taps > 1:
            cell_min = _cell_extreme(g if dense_g else np.where(positive, g, np.inf), reduced, np.minimum)
        if reduced:
            rows, cols = rows.reshape([rows.shape[a] for a in kept]), cols.reshape([cols.shape[a] for a in kept])
        G, row, col, gmax, gmin, count, turned = self._as_matrix(cell_sum, rows, cols, cell_max, cell_min,
                                                                 cell_count)
        # Cells whose row and column are the same group never change (λ/λ): constants. A group
        # on both sides need not meet itself in a cell (per-cell groups: a depthwise convolution
        # reading its tied channels permuted), hence the second test.
        fixed = None
        if _groups_meet(row, col, H):
            fixed = np.broadcast_to((row == col) & (row < H), G.shape)
            fixed = fixed if fixed.any() else None
        if fixed is not None:
            self.const_sum += float(G[fixed].sum())
            self.const_max = max(self.const_max, float((G if gmax is None else gmax)[fixed].max()))
            low = (G if gmin is None else gmin)[fixed]
            low = low[low > 0]
            if low.size:
                self.const_min = min(self.const_min, float(low.min()))
            G = np.where(fixed, 0.0, G)
            count = np.where(fixed, 0, count)
            if gmin is not None:
                gmin = np.where(fixed, np.inf, gmin)
                gmax = np.where(fixed, 0.0, gmax)
        uniform = dense_g and fixed is None  # every cell counts `taps` entries
        count = np.broadcast_to(count, G.shape)
        stored = None
        if factors is not None and taps == 1 and kept == [0, 1] and row.shape[1] == 1 and col.shape[0] == 1 \
                and fixed is None:
            left, right = (factors[1], factors[0]) if turned else factors
            if (left.shape[0] + right.shape[0]) * left.shape[1] * 2 < G.size:
                stored = (np.ascontiguousarray(left, dtype=np.float64), np.ascontiguousarray(right, dtype=np.float64))
        if uniform:  # count cells rather than sum a broadcast array cell by cell
            R, C = G.shape
            in_keys = row[:, 0] if row.shape[1] == 1 else row.ravel()
            out_keys = col[0] if col.shape[0] == 1 else np.broadcast_to(col, G.shape).ravel()
            _tally(self.n_in, in_keys, scale=float(taps * (C if row.shape[1] == 1 else 1)))
            _tally(self.n_out, out_keys, scale=float(taps * (R if col.shape[0] == 1 else 1)))
        else:
            if row.shape[1] == 1:
                _tally(self.n_in, row[:, 0], count.sum(axis=1))
            else:
                _tally(self.n_in, row.ravel(), count.ravel())
            if col.shape[0] == 1:
                _tally(self.n_out, col[0], count.sum(axis=0))
            else:
                _tally(self.n_out, np.broadcast_to(col, G.shape).ravel(), count.ravel())
        if stored is not None:
            self.blocks.append(Block(None, row, col, None, None, label, factors=stored))
        else:
            self.blocks.append(Block(G, row, col, gmax, gmin, label))

    @staticmethod
    def _as_matrix(G, rows, cols, gmax, gmin, count):
        """Bring cells to 2-D with rows as (R,1) where possible (matrix-vector products)."""
        if G.ndim == 0:
            G, rows, cols = G.reshape(1, 1), rows.reshape(1, 1), cols.reshape(1, 1)
            gmax = None if gmax is None else gmax.reshape(1, 1)
            gmin = None if gmin is None else gmin.reshape(1, 1)
            count = count.reshape(1, 1)
        elif G.ndim == 1:
            G, rows, cols = G[:, None], rows[:, None], cols[:, None]
            gmax = None if gmax is None else gmax[:, None]
            gmin = None if gmin is None else gmin[:, None]
            count = count[:, None]
        elif G.ndim > 2:
            shape = G.shape
            G = G.reshape(-1, 1)
            rows = np.broadcast_to(rows, shape).reshape(-1, 1)
            cols = np.broadcast_to(cols, shape).reshape(-1, 1)
            gmax = None if gmax is None else gmax.reshape(-1, 1)
            gmin = None if gmin is None else gmin.reshape(-1, 1)
            count = count.reshape(-1, 1)
        # Orient so that rows vary along axis 0 only when that makes the block dense.
        turned = rows.shape[0] == 1 and cols.shape[1] == 1 and (rows.shape[1] > 1 or cols.shape[0] > 1)
        if turned:
            G, rows, cols, count = G.T, rows.T, cols.T, count.T
            gmax = None if gmax is None else gmax.T
            gmin = None if gmin is None else gmin.T
        R, C = G.shape
        if rows.shape[1] == 1 and cols.shape[0] == 1:
            rows = np.broadcast_to(rows, (R, 1))
            cols = np.broadcast_to(cols, (1, C))
        else:  # per-cell groups (grouped convolutions)
            rows = np.broadcast_to(rows, (R, C)) if rows.shape[1] != 1 else np.broadcast_to(rows, (R, 1))
            cols = np.broadcast_to(cols, (R, C))
        return (np.ascontiguousarray(G, dtype=np.float64), np.ascontiguousarray(rows), np.ascontiguousarray(cols),
                gmax, gmin, np.asarray(count), turned)

    def finish(self) -> Problem:
        if self._pending:  # a shared tensor not reached by all its uses (off every path)
            for name, (first, acc, _) in list(self._pending.items()):
                self._add_entries(first, acc)
            self._pending.clear()
        return Problem(
            H=self.H, blocks=self.blocks, n_in=self.n_in[:self.H], n_out=self.n_out[:self.H], p=self.p,
            const_sum=self.const_sum, const_max=self.const_max, const_min=self.const_min,
            log_sum=self.log_sum, layer_of=self.groups.layer_of, g_max_before=self.g_max_before,
            g_min_before=self.g_min_before)


# ---------------------------------------------------------------------------- layers
@dataclass
class Layer:
    start: int
    stop: int
    rows: List[int]  # blocks with incoming entries of this layer's groups
    cols: List[int]  # blocks with outgoing entries of this layer's groups
    # per (side, block): where the block's keys sit in the layer when they are a run of its
    # groups in order, one each (a layer's own weights, row by row), so that its sums are
    # added to a slice with no scatter; -1 when they are not. Found at the first sweep.
    offsets: Dict[Tuple[str, int], int] = field(default_factory=dict, repr=False)


def layers(problem: Problem) -> List[Layer]:
    """The units a sweep updates at once, in group order: the consecutive groups created by
    one node, split to single groups where a parameter joins two of them, then consecutive
    such layers that no parameter joins to one another, joined (docs/design.md §4.1)."""
    H = problem.H
    if H == 0:
        return []
    layer_of = problem.layer_of
    starts = np.flatnonzero(np.r_[True, layer_of[1:] != layer_of[:-1]])
    bounds = list(zip(starts.tolist(), np.r_[starts[1:], H].tolist()))
    layer_index = np.repeat(np.arange(len(bounds)), np.diff(np.r_[starts, H]))
    layer_ext = np.append(layer_index, -1)  # group H (fixed) belongs to no layer
    rows_of: List[List[int]] = [[] for _ in bounds]
    cols_of: List[List[int]] = [[] for _ in bounds]
    interacting = set()
    for k, b in enumerate(problem.blocks):
        row_layers = _layers_met(layer_ext[b.row])
        col_layers = _layers_met(layer_ext[b.col])
        for L in row_layers.tolist():
            rows_of[L].append(k)
        for L in col_layers.tolist():
            cols_of[L].append(k)
        for L in np.intersect1d(row_layers, col_layers).tolist():
            same = (layer_ext[b.row] == L) & (layer_ext[b.col] == L) & (b.row != b.col) & (
                b.G > 0 if b.G is not None else True)  # factored: assume they interact (still exact)
            if same.any():
                interacting.add(L)
    units = []
    for L, (start, stop) in enumerate(bounds):
        if L in interacting:  # a parameter joins two groups of this layer: one at a time
            units.extend(Layer(h, h + 1, rows_of[L], cols_of[L]) for h in range(start, stop))
        else:
            units.append(Layer(start, stop, rows_of[L], cols_of[L]))
    return _joined(problem, units)


def _layers_met(keys: np.ndarray) -> np.ndarray:
    """The distinct layers (≥ 0) among a block's row or column layers, sorted."""
    keys = keys.ravel()
    if not keys.size:
        return keys
    low, high = int(keys.min()), int(keys.max())
    if low == high:  # one layer, or the fixed side alone: most blocks
        return keys[:1] if low >= 0 else keys[:0]
    found = np.unique(keys)
    return found[found >= 0]


def _joined(problem: Problem, units: List[Layer]) -> List[Layer]:
    """Runs of consecutive units that no block joins to one another, each as one unit.

    Why this is exact: a unit's sums B_h, C_h read u only at the other ends of its groups'
    cells, so when no cell joins two units of a run, updating one leaves the sums of the
    others as they were; the run's sums can all be taken before its first unit is updated,
    and the running total, which still couples every group, is carried through the run in
    group order as within one layer. A sweep updates the groups in the same order and to the
    same values, in fewer, larger steps (a network whose BatchNorms stay in the graph often
    has no cell between two layers at all: every unit joins one run)."""
    n = len(units)
    if n < 2:
        return units
    unit_of = np.full(problem.H + 1, -1, dtype=np.int64)  # group H (fixed) is in no unit
    unit_of[:problem.H] = np.repeat(np.arange(n), [u.stop - u.start for u in units])
    # latest[k]: the last unit before k that a block joins to k (−1: none). A run from s may
    # take unit k when latest[k] < s.
    latest = np.full(n, -1, dtype=np.int64)
    for b in problem.blocks:
        rows, cols = unit_of[b.row], unit_of[b.col]
        if b.dense:  # every row meets every column: compare the two sets of units
            row_units, col_units = _layers_met(rows), _layers_met(cols)
            for these, others in ((row_units, col_units), (col_units, row_units)):
                if these.size and others.size:
                    before = np.searchsorted(others, these) - 1  # the last of `others` below each
                    met = before >= 0
                    np.maximum.at(latest, these[met], others[before[met]])
        else:  # cell by cell (a zero cell counts too: joining more than needed stays exact)
            rows, cols = np.broadcast_arrays(rows, cols)
            both = (rows >= 0) & (cols >= 0) & (rows != cols)
            np.maximum.at(latest, np.maximum(rows[both], cols[both]), np.minimum(rows[both], cols[both]))
    runs, start = [], 0
    for k in range(1, n + 1):
        if k < n and latest[k] < start:
            continue
        run = units[start:k]
        runs.append(run[0] if len(run) == 1 else
                    Layer(run[0].start, run[-1].stop, list(dict.fromkeys(b for u in run for b in u.rows)),
                          list(dict.fromkeys(b for u in run for b in u.cols))))
        start = k
    return runs


def layer_sums(problem: Problem, layer: Layer, u_ext: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(B_h, C_h) for the layer's groups: outgoing and incoming sums taken at u_h = 0."""
    n = layer.stop - layer.start
    incoming = np.zeros(n)
    outgoing = np.zeros(n)
    for k in layer.rows:
        keys, vals = problem.blocks[k].incoming(u_ext)
        _gather_into(incoming, keys, vals, layer, ("rows", k))
    for k in layer.cols:
        keys, vals = problem.blocks[k].outgoing(u_ext)
        _gather_into(outgoing, keys, vals, layer, ("cols", k))
    return outgoing, incoming


def _gather_into(acc: np.ndarray, keys: np.ndarray, vals: np.ndarray, layer: Layer, which) -> None:
    """acc[key − start] += val over the keys inside the layer."""
    n = acc.size
    offset = layer.offsets.get(which)
    if offset is None:
        first = int(keys[0]) - layer.start if keys.size else -1
        run = 0 <= first and first + keys.size <= n and bool(
            (keys == np.arange(layer.start + first, layer.start + first + keys.size)).all())
        offset = layer.offsets[which] = first if run else -1
    if offset >= 0:
        acc[offset:offset + keys.size] += vals
        return
    local = keys - layer.start
    inside = (local >= 0) & (local < n)
    if inside.all():
        acc += np.bincount(local, weights=vals, minlength=n)
    else:
        acc += np.bincount(local[inside], weights=vals[inside], minlength=n)
