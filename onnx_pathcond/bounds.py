"""Bounds on the log-rescalings u that the solve must respect (docs/design.md §4.5).

Two kinds of stored value limit how far a group may move:

* a BatchNorm's running variance under --bn-statistics becomes (var + ε)·λ² − ε, negative
  when λ² < ε/(var + ε) (a channel that never fired has var = 0: it may not shrink at all);
* a float16 or bfloat16 parameter must stay representable: no overflow, no normal value
  turned subnormal, no subnormal one shrunk (it would lose more of its few bits).

Each element e of such a tensor has its factor f = exp(a·(u_i − u_j)) (a = power/2, i the
group it is incoming to, j the one it is outgoing from, either side possibly fixed) and
admits log f in [lo_e, hi_e], an interval that holds 0 (no rescaling is always allowed). The
solvers take *boxes*, one interval per group: an element with one side fixed bounds the other
side's u exactly; an element between two free groups gives each half of its interval, so any
point of the boxes keeps every element in its range. A running variance depends on its own
group only, so its bound is exact; for half-precision weights between two groups the box is a
part of the feasible set, the part any pair of coordinates can reach independently.

The box is computed once, before the solve, from the stored values, a chunk of rows at a time
(float64 temporaries of a few MB whatever the tensor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
from onnx import TensorProto

from .channels import Layout
from .graph import Graph
from .symmetry import Groups, ParamUse

# Half-precision types whose range a rescaling can leave: (smallest normal, largest finite).
NARROW = {TensorProto.FLOAT16: (2.0 ** -14, 65504.0),
          TensorProto.BFLOAT16: (2.0 ** -126, 3.3895313892515355e38)}

# Each log bound is pulled this far inside its limit, so that the float64 products of the
# rewrite and the cast to the stored dtype cannot land on the wrong side of it.
_MARGIN = 1e-9
_CHUNK = 1 << 20  # elements per float64 temporary


@dataclass
class Bounds:
    """lower ≤ u ≤ upper per group (−inf / +inf where nothing limits it); `variance` and
    `half_range` mark the groups that a running variance or a half-precision value bounds."""

    lower: np.ndarray
    upper: np.ndarray
    variance: np.ndarray
    half_range: np.ndarray

    @classmethod
    def none(cls, count: int) -> "Bounds":
        return cls(np.full(count, -np.inf), np.full(count, np.inf), np.zeros(count, bool), np.zeros(count, bool))

    @property
    def active(self) -> bool:
        """Whether any group has a finite bound."""
        return bool(np.isfinite(self.lower).any() or np.isfinite(self.upper).any())

    def clip(self, u: np.ndarray) -> np.ndarray:
        return np.minimum(np.maximum(u, self.lower), self.upper)

    def on_bound(self, u: np.ndarray) -> np.ndarray:
        """Groups whose u sits on one of its finite bounds."""
        return (np.isfinite(self.lower) & (u <= self.lower)) | (np.isfinite(self.upper) & (u >= self.upper))

    def projected_gradient(self, u: np.ndarray, grad: np.ndarray) -> np.ndarray:
        """The gradient with the parts that point out of the box at a bound removed: zero
        exactly where the KKT conditions of min F over the box hold."""
        at_lower = np.isfinite(self.lower) & (u <= self.lower)
        at_upper = np.isfinite(self.upper) & (u >= self.upper)
        pg = np.where(at_lower, np.minimum(grad, 0.0), grad)
        return np.where(at_upper, np.maximum(pg, 0.0), pg)


def solve_bounds(graph: Graph, uses: List[ParamUse], groups: Groups) -> Bounds:
    """The box of every group from the running variances and half-precision parameters."""
    bounds = Bounds.none(groups.count)
    if not groups.count:
        return bounds
    for use in uses:
        if use.ref is None or use.ignored:
            continue
        narrow = NARROW.get(graph.elem_type.get(use.ref.name))
        if narrow is None and not use.offset:
            continue  # a plain float32/float64 parameter takes any factor
        _add_use(graph, use, groups, narrow, bounds)
    return bounds


# A half-precision activation that a rescaling grows or shrinks keeps this much room, on the
# measuring inputs, below the dtype's largest value and above its smallest normal one: room for
# a user's inputs this many times larger or smaller than those standard-normal draws.
ACTIVATION_HEADROOM = 2.0 ** 8


def add_activation_bounds(bounds: Bounds, graph: Graph, analysis, groups: Groups,
                          magnitudes: Dict[str, np.ndarray]) -> None:
    """Bound each group so that its largest half-precision activation (`magnitudes`: |value|
    of each tensor `activations.measure` ran, at the analysed shapes) stays within
    [smallest normal · headroom, largest / headroom] after its scale λ = exp(u/2), or does not
    move further out where it already is outside (every bound holds u = 0; an activation that
    overflows already may only shrink). A group whose activations are all zero there is not
    bounded by them (a zero stays zero)."""
    H = groups.count
    for name, magnitude in magnitudes.items():
        layout = analysis.layouts.get(name)
        tiny, huge = NARROW[graph.elem_type[name]]
        if isinstance(layout, Layout):
            if magnitude.ndim <= layout.axis or magnitude.shape[layout.axis] != layout.channels:
                continue
            axes = tuple(a for a in range(magnitude.ndim) if a != layout.axis)
            peak, positions = magnitude.max(axis=axes) if axes else magnitude, layout.pos
        elif layout is not None and magnitude.shape == layout.positions.shape:
            peak, positions = magnitude, layout.positions
        else:
            continue
        ids = _group_ids(positions, groups)
        peak = peak.astype(np.float64)
        keep = (ids < H) & (peak > 0)  # (NaN fails it)
        if not keep.any():
            continue
        peak, ids = peak[keep], ids[keep]
        with np.errstate(divide="ignore"):  # an infinite peak: log 0 = -inf
            lower = np.minimum(2.0 * np.log(tiny * ACTIVATION_HEADROOM / peak), 0.0)
            upper = np.maximum(2.0 * np.log(huge / ACTIVATION_HEADROOM / peak), 0.0)
        _tighten(bounds, ids, lower, upper, [bounds.half_range])


def _group_ids(positions: np.ndarray, groups: Groups) -> np.ndarray:
    """Group id per position, H where the position has no free group."""
    H = groups.count
    if not groups.of_position.size:
        return np.full(positions.shape, H)
    ids = np.where(positions >= 0, groups.of_position[np.maximum(positions, 0)], -1)
    return np.where(ids >= 0, ids, H)


def _log_interval(old: np.ndarray, narrow, offset: float):
    """[lo, hi] of the log factor each element admits (lo ≤ 0 ≤ hi), in float64.

    The new value is (old + offset)·f − offset. Half precision: at most the largest finite
    value; at least the smallest normal for a normal value; a subnormal one may not shrink
    (it has fewer bits than the dtype's precision already, and each halving drops one more:
    a float16 model whose weights were mostly subnormal differed after a rescale that kept
    them non-zero, random-model seed 405663). With an offset (a running variance, never
    negative): at least 0."""
    magnitude = np.abs(old)
    base = magnitude + offset
    target_low = np.zeros_like(base)
    have_low = np.zeros(base.shape, bool)
    if offset:
        have_low |= old >= 0
    hi = np.full(base.shape, np.inf)
    if narrow is not None:
        tiny, huge = narrow
        target_low = np.minimum(magnitude, tiny)  # a subnormal value: itself
        have_low |= magnitude > 0
        with np.errstate(divide="ignore"):
            hi = np.log((huge + offset) / base) - _MARGIN
    with np.errstate(divide="ignore", invalid="ignore"):
        lo = np.where(have_low, np.log((target_low + offset) / base) + _MARGIN, -np.inf)
    unchanged = base == 0  # a zero without offset stays zero whatever the factor
    if offset:
        unchanged |= old < 0  # not a variance: no rule of this module applies to it
    lo = np.where(unchanged, -np.inf, np.minimum(lo, 0.0))
    hi = np.where(unchanged, np.inf, np.maximum(hi, 0.0))
    return lo, hi


def _add_use(graph: Graph, use: ParamUse, groups: Groups, narrow, bounds: Bounds) -> None:
    shape = use.view_shape or (1,)
    value = use.ref.to_view(graph.stored_value(use.ref)).reshape(shape)
    rows = np.broadcast_to(use.rows, use.view_shape).reshape(shape)  # views: no copy
    cols = np.broadcast_to(use.stored_cols, use.view_shape).reshape(shape)
    H = groups.count
    a = use.power / 2.0
    kinds = ([bounds.variance] if use.offset else []) + ([bounds.half_range] if narrow is not None else [])
    step = max(1, _CHUNK // max(1, int(np.prod(shape[1:], dtype=np.int64))))
    for start in range(0, shape[0], step):
        part = slice(start, start + step)
        old = value[part]
        if old.dtype.name == "bfloat16":  # no direct cast to float64 for this extension type
            old = old.astype(np.float32)
        lo, hi = _log_interval(np.asarray(old, dtype=np.float64), narrow, use.offset)
        i, j = _group_ids(rows[part], groups), _group_ids(cols[part], groups)
        moves = (i != j) & (np.isfinite(lo) | np.isfinite(hi))
        if not moves.any():
            continue
        share = np.where((i < H) & (j < H), 2.0 * a, a)  # two free sides split the interval
        lo_share, hi_share = lo / share, hi / share
        take_i, take_j = moves & (i < H), moves & (j < H)
        _tighten(bounds, i[take_i], lo_share[take_i], hi_share[take_i], kinds)
        _tighten(bounds, j[take_j], -hi_share[take_j], -lo_share[take_j], kinds)


def _tighten(bounds: Bounds, ids: np.ndarray, lower: np.ndarray, upper: np.ndarray, kinds) -> None:
    """Intersect each group's box with [lower, upper] of its elements."""
    if not ids.size:
        return
    np.maximum.at(bounds.lower, ids, lower)
    np.minimum.at(bounds.upper, ids, upper)
    limited = ids[np.isfinite(lower) | np.isfinite(upper)]
    for kind in kinds:
        kind[limited] = True


def bound_counts(bounds: Optional[Bounds], u: np.ndarray):
    """(groups on a bound, of which set by a running variance, of which by a half-precision range)."""
    if bounds is None or not u.size:
        return 0, 0, 0
    on = bounds.on_bound(u)
    return int(on.sum()), int((on & bounds.variance).sum()), int((on & bounds.half_range).sum())
