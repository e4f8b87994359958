"""The PathCond criterion (docs/design.md §3) and its coordinate descent (§4.1).

PathCond minimises, over the log-rescalings u of the H groups,

    F(u) = p·log Σ_i g_i·exp((Bu)_i) − Σ_i (Bu)_i,

over the p entries of diag(G) with g_i > 0, (Bu)_i = u[out(i)] − u[in(i)]. The entries are
held as cells (`cells.py`).

`coordinate_descent` is the authors' published method: cyclic exact minimisation over one
u_h at a time, groups in layer order, from u = 0, at most `max_iter` sweeps, stopping when a
sweep's Σ|Δu_h| falls below `tol`. It reproduces the one-group-at-a-time sequence exactly,
but computes it layer by layer:

* groups of one layer touch disjoint parameters, so their incoming / outgoing sums B_h, C_h
  do not change while the layer is swept: they are computed for the whole layer at once
  (matrix-vector products over the parameter blocks); so are the sums of a run of
  consecutive layers that no parameter joins to one another, swept as one (`cells.layers`);
* what still couples the groups of a layer is the running total T = Σ g·exp(Bu): group k's
  update depends on T after groups 0..k−1. That scalar recurrence T_{k+1} = T_k + δ_k(T_k)
  is solved for the whole layer by Newton's method on the prefix sums of δ (a handful of
  rounds to machine precision); if it has not converged after a bounded number of rounds the
  layer falls back to the plain scalar loop.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional, Tuple

import numpy as np

from ..bounds import Bounds
from ..options import SOLVERS
from ..records import CriterionSummary
from ..solve import SolveResult, finish
from .base import Criterion, register
from .cells import Block, Problem, ProblemBuilder, layer_sums, layers  # noqa: F401  (Block, Problem: the cells' types)

NAME = "pathcond"
_PICARD_ROUNDS = 60


@register
class PathCond(Criterion):
    name = NAME
    needs_diag_g = True
    supports_bn_statistics = True
    solvers = SOLVERS
    objective = CriterionSummary.objective

    def build(self, graph, analysis, groups, statistics, progress=None):
        builder = ProblemBuilder(groups, analysis.uses, analysis.shared)
        runtime = statistics(builder.add)
        return builder.finish(), runtime

    def descend(self, problem, max_iter, tol, progress=None, bounds=None):
        return coordinate_descent(problem, max_iter=max_iter, tol=tol, progress=progress, bounds=bounds)

    def certified(self, problem, result, relative_error):
        """F(u) = p·log Σ g·e^(Bu) − Σ Bu: entries within 1 ± δ move F by at most
        p·log(1 ± δ) at any u, so the exact F(û) − F(0) is at most the computed difference
        plus p·log((1 + δ)/(1 − δ)). No rescaling (û = 0) is always certified."""
        if not np.any(result.u):
            return True
        if not 0 <= relative_error < 1:
            return False
        slack = problem.p * (math.log1p(relative_error) - math.log1p(-relative_error))
        return result.objective_after + slack <= result.objective_before

    def summary(self, problem, result):
        u = result.u
        max_after, min_after = problem.extremes(u)
        return CriterionSummary(
            name=NAME, entries=problem.p, F_before=result.objective_before, F_after=result.objective_after,
            am_gm_before=float(np.exp(problem.log_am_gm(np.zeros(problem.H)))),
            am_gm_after=float(np.exp(problem.log_am_gm(u))),
            max_before=problem.g_max_before if problem.p else 0.0,
            min_before=problem.g_min_before if problem.p else 0.0, max_after=max_after, min_after=min_after)


def _quadratic_root(qa, qb, qc):
    """The positive root of qa·X² + qb·X + qc = 0 (qa ≥ 0 ≥ qc), without cancellation."""
    disc = np.sqrt(np.maximum(qb * qb - 4.0 * qa * qc, 0.0))
    return np.where(qb > 0, -2.0 * qc / (qb + disc), (disc - qb) / (2.0 * qa))


def positive_root(A, D, B, C, p):
    """The positive root X of B(A+p)X² + A·D·X + C(A−p) = 0, the closed-form group update."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return _quadratic_root(B * (A + p), A * D, C * (A - p))


def _no_box(low, high, n):
    """Limits on exp(u): none where not given."""
    return (np.zeros(n) if low is None else low), (np.full(n, np.inf) if high is None else high)


def _sequential_updates(total, B, C, A, e_old, p, low=None, high=None):
    """Plain loop: the reference recurrence, one group after another."""
    low, high = _no_box(low, high, len(B))
    X = e_old.copy()
    for k in range(len(B)):
        b, c, e = float(B[k]), float(C[k]), float(e_old[k])
        if b <= 0.0 and c <= 0.0:
            continue
        d = total - b * e - c / e
        x = min(max(float(positive_root(A[k], d, b, c, p)), float(low[k])), float(high[k]))
        if not (math.isfinite(x) and x > 0.0):
            continue
        X[k] = x
        total = d + b * x + c / x
    return X, total


def _layer_updates(total, B, C, A, e_old, p, low=None, high=None, guess=None):
    """New exp(u_h) for a layer, and the running total after it, as the sequential loop gives.

    Each group's step is the minimiser of F along u_h within [low, high] (its bounds, in
    exp(u) terms; None: no bound): F is convex in u_h, so that is the unconstrained root
    clipped to the box, and a clipped group's step does not depend on the total any more
    (slope 0 below).

    The totals T_k seen by the groups solve T_{k+1} = T_k + δ_k(T_k) with T_0 = total. Each
    round evaluates δ and its slope δ' at the current guess of every T_k, then corrects all
    of them with the linearised recurrence e_{k+1} = (1 + δ'_k)·e_k − r_k (a cumulative
    product and sum): Newton's method on the whole prefix at once, a few rounds to machine
    precision. `guess` (last sweep's increments) starts it close.

    A layer has tens to a thousand groups and a sweep updates every layer, so each round's
    small-array operations are what this costs: the coefficients that do not change from
    round to round are formed once.
    """
    active = (B > 0) | (C > 0)
    if not active.all():
        idx = np.flatnonzero(active)
        X = e_old.copy()
        if idx.size:
            X[idx], total = _layer_updates(total, B[idx], C[idx], A[idx], e_old[idx], p,
                                           None if low is None else low[idx], None if high is None else high[idx],
                                           None if guess is None else guess[idx])
        return X, total
    boxed = low is not None or high is not None
    if boxed:
        low, high = _no_box(low, high, len(B))
    own = B * e_old + C / e_old
    n = len(B)
    prefix = np.full(n, total)
    if guess is not None and guess.shape == (n,):
        prefix[1:] += np.cumsum(guess[:-1])
    # the root of qa·X² + qb·X + qc as _quadratic_root takes it, qb = A·D the only part that moves
    qa = B * (A + p)
    qc = C * (A - p)
    four_ac, minus_2c, two_a, minus_A = 4.0 * qa * qc, -2.0 * qc, 2.0 * qa, -A
    growth = np.ones(n)
    correction = np.zeros(n)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for _ in range(_PICARD_ROUNDS):
            D = prefix - own
            qb = A * D
            disc = np.sqrt(np.maximum(qb * qb - four_ac, 0.0))
            root = np.where(qb > 0, minus_2c / (qb + disc), (disc - qb) / two_a)
            X = np.minimum(np.maximum(root, low), high) if boxed else root
            if not (X.min() > 0 and X.max() < np.inf):  # (NaN fails both)
                break
            delta = B * X + C / X - own
            # residual of T_{k+1} = T_k + δ_k, and the slope of δ_k in T_k
            residual = prefix[1:] - prefix[:-1] - delta[:-1]
            # the rounding floor is that of the largest total along the prefix (a long run
            # of groups can double it: then 4e-16 of the first total is below one ulp)
            worst = np.abs(residual).max() if n > 1 else 0.0
            if worst <= 4e-16 * abs(total) or worst <= 4e-16 * prefix.max():
                return X, float(D[-1] + B[-1] * X[-1] + C[-1] / X[-1])
            slope = (B - C / (X * X)) * (minus_A * X / (two_a * X + qb))
            if boxed:
                slope = np.where(X == root, slope, 0.0)
            np.cumprod(1.0 + slope[:-1], out=growth[1:])
            np.cumsum(-residual / growth[1:], out=correction[1:])
            correction[1:] *= growth[1:]
            if np.abs(correction).max() < np.inf:  # (NaN fails it)
                prefix = prefix + correction
            else:  # fall back to a plain fixed-point round
                prefix = total + np.concatenate(([0.0], np.cumsum(delta[:-1])))
    return _sequential_updates(total, B, C, A, e_old, p, low, high)


def _exp_box(bounds: Optional[Bounds], sl: slice, n: int) -> Tuple[np.ndarray, np.ndarray]:
    """The bounds of the groups in `sl` as limits on exp(u): [0, inf) where none."""
    if bounds is None:
        return np.zeros(n), np.full(n, np.inf)
    return np.exp(bounds.lower[sl]), np.exp(bounds.upper[sl])


def coordinate_descent(problem: Problem, max_iter: int = 10, tol: float = 1e-2,
                       progress: Optional[Callable[[int, float], None]] = None,
                       bounds: Optional[Bounds] = None) -> SolveResult:
    """The authors' cyclic coordinate descent, each group's step kept within its `bounds`."""
    t0 = time.perf_counter()
    u = np.zeros(problem.H)
    f0 = problem.objective(u)
    if problem.H == 0 or problem.p == 0:
        return SolveResult(u, "coordinate-descent", 0, 0.0, True, f0, f0, [], time.perf_counter() - t0, 0.0)
    groups_by_layer = layers(problem)
    A = problem.A
    p = float(problem.p)
    u_ext = np.zeros(problem.H + 1)
    history = []
    change = math.inf
    sweeps = 0
    increments = {}  # per layer: the total's increments in the last sweep (a warm start)
    boxes = {}
    # The running total: each layer's update returns it at the new u, so it is taken from
    # the blocks once (a pass over every block, a third of a sweep's reading), not per sweep.
    total = problem.total(u_ext[:-1])
    for sweep in range(1, max_iter + 1):
        sweeps = sweep
        change = 0.0
        for k, layer in enumerate(groups_by_layer):
            B, C = layer_sums(problem, layer, u_ext)
            sl = slice(layer.start, layer.stop)
            if k not in boxes:
                boxes[k] = _exp_box(bounds, sl, layer.stop - layer.start) if bounds is not None else (None, None)
            e_old = np.exp(u_ext[sl])
            X, new_total = _layer_updates(total, B, C, A[sl], e_old, p, *boxes[k], increments.get(k))
            increments[k] = B * X + C / X - (B * e_old + C / e_old)
            total = new_total
            new_u = np.log(X)
            if bounds is not None:  # exp then log can step a hair outside a bound
                new_u = np.where(X <= boxes[k][0], bounds.lower[sl], np.where(X >= boxes[k][1], bounds.upper[sl],
                                                                              new_u))
            change += float(np.abs(new_u - u_ext[sl]).sum())
            u_ext[sl] = new_u
        history.append(p * math.log(total) + float(A @ u_ext[:-1]))  # F from the running total
        if progress is not None:
            progress(sweeps, change)
        if change < tol:
            break
    result = SolveResult(u_ext[:-1].copy(), "coordinate-descent", sweeps, change if history else 0.0,
                         bool(history) and change < tol, f0, f0, history, 0.0)
    result = finish(problem, result.u, result, bounds)
    result.seconds = time.perf_counter() - t0
    return result
