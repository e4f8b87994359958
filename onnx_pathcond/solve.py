"""Minimising the criterion over the log-rescalings u (docs/design.md §4).

`coordinate_descent` is the authors' published method: cyclic exact minimisation over one
u_h at a time, groups in layer order, from u = 0, at most `max_iter` sweeps, stopping when a
sweep's Σ|Δu_h| falls below `tol`. It reproduces the one-group-at-a-time sequence exactly,
but computes it layer by layer:

* groups of one layer touch disjoint parameters, so their incoming / outgoing sums B_h, C_h
  do not change while the layer is swept: they are computed for the whole layer at once
  (matrix-vector products over the parameter blocks);
* what still couples the groups of a layer is the running total T = Σ g·exp(Bu): group k's
  update depends on T after groups 0..k−1. That scalar recurrence T_{k+1} = T_k + δ_k(T_k)
  is solved for the whole layer by fixed-point iteration on the prefix sums of δ (each round
  fixes at least one more term exactly, and the weak dependence of δ_k on T_k makes it
  converge to machine precision in a handful of rounds); if it has not converged after a
  bounded number of rounds the layer falls back to the plain scalar loop.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import numpy as np

from .bounds import Bounds
from .criteria.pathcond import Problem

_PICARD_ROUNDS = 60


@dataclass
class SolveResult:
    u: np.ndarray
    method: str
    sweeps: int  # sweeps (coordinate descent) or iterations (exact)
    last_change: float  # Σ|Δu| of the last sweep (coordinate descent) or ‖∇F‖∞ (exact)
    converged: bool
    objective_before: float
    objective_after: float
    history: List[float] = field(default_factory=list)  # F after each sweep / iteration
    seconds: float = 0.0
    # max |projected ∇F| at the result over max |∇F(0)|: 0 at the (constrained) optimum
    kkt_residual: float = float("nan")
    on_bound: int = 0  # groups whose u sits on a bound (bounds.Bounds)


def _quadratic_root(qa, qb, qc):
    """The positive root of qa·X² + qb·X + qc = 0 (qa ≥ 0 ≥ qc), without cancellation."""
    disc = np.sqrt(np.maximum(qb * qb - 4.0 * qa * qc, 0.0))
    return np.where(qb > 0, -2.0 * qc / (qb + disc), (disc - qb) / (2.0 * qa))


def positive_root(A, D, B, C, p):
    """The positive root X of B(A+p)X² + A·D·X + C(A−p) = 0, the closed-form group update."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return _quadratic_root(B * (A + p), A * D, C * (A - p))


@dataclass
class _Layer:
    start: int
    stop: int
    rows: List[int]  # blocks with incoming entries of this layer's groups
    cols: List[int]  # blocks with outgoing entries of this layer's groups


def _layers(problem: Problem) -> List[_Layer]:
    """Consecutive groups created by one node, split to single groups where they interact."""
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
        row_layers = np.unique(layer_ext[b.row])
        col_layers = np.unique(layer_ext[b.col])
        for L in row_layers[row_layers >= 0].tolist():
            rows_of[L].append(k)
        for L in col_layers[col_layers >= 0].tolist():
            cols_of[L].append(k)
        for L in np.intersect1d(row_layers[row_layers >= 0], col_layers[col_layers >= 0]).tolist():
            same = (layer_ext[b.row] == L) & (layer_ext[b.col] == L) & (b.row != b.col) & (
                b.G > 0 if b.G is not None else True)  # factored: assume they interact (still exact)
            if same.any():
                interacting.add(L)
    layers = []
    for L, (start, stop) in enumerate(bounds):
        if L in interacting:  # a parameter joins two groups of this layer: one at a time
            layers.extend(_Layer(h, h + 1, rows_of[L], cols_of[L]) for h in range(start, stop))
        else:
            layers.append(_Layer(start, stop, rows_of[L], cols_of[L]))
    return layers


def _layer_sums(problem: Problem, layer: _Layer, u_ext: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(B_h, C_h) for the layer's groups: outgoing and incoming sums taken at u_h = 0."""
    n = layer.stop - layer.start
    incoming = np.zeros(n)
    outgoing = np.zeros(n)
    for k in layer.rows:
        keys, vals = problem.blocks[k].incoming(u_ext)
        incoming += _gather(keys, vals, layer.start, n)
    for k in layer.cols:
        keys, vals = problem.blocks[k].outgoing(u_ext)
        outgoing += _gather(keys, vals, layer.start, n)
    return outgoing, incoming


def _gather(keys, vals, start, n):
    local = keys - start
    inside = (local >= 0) & (local < n)
    if inside.all():
        return np.bincount(local, weights=vals, minlength=n)
    return np.bincount(local[inside], weights=vals[inside], minlength=n)


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
    exp(u) terms): F is convex in u_h, so that is the unconstrained root clipped to the box,
    and a clipped group's step does not depend on the total any more (slope 0 below).

    The totals T_k seen by the groups solve T_{k+1} = T_k + δ_k(T_k) with T_0 = total. Each
    round evaluates δ and its slope δ' at the current guess of every T_k, then corrects all
    of them with the linearised recurrence e_{k+1} = (1 + δ'_k)·e_k − r_k (a cumulative
    product and sum): Newton's method on the whole prefix at once, a few rounds to machine
    precision. `guess` (last sweep's increments) starts it close.
    """
    low, high = _no_box(low, high, len(B))
    active = (B > 0) | (C > 0)
    if not active.all():
        idx = np.flatnonzero(active)
        X = e_old.copy()
        if idx.size:
            X[idx], total = _layer_updates(total, B[idx], C[idx], A[idx], e_old[idx], p, low[idx], high[idx],
                                           None if guess is None else guess[idx])
        return X, total
    own = B * e_old + C / e_old
    n = len(B)
    if guess is not None and guess.shape == (n,):
        prefix = total + np.concatenate(([0.0], np.cumsum(guess[:-1])))
    else:
        prefix = np.full(n, total)
    qa = B * (A + p)
    qc = C * (A - p)
    growth = np.ones(n)
    correction = np.zeros(n)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for _ in range(_PICARD_ROUNDS):
            D = prefix - own
            qb = A * D
            root = _quadratic_root(qa, qb, qc)
            X = np.minimum(np.maximum(root, low), high)
            if not np.all(np.isfinite(X) & (X > 0)):
                break
            delta = B * X + C / X - own
            # residual of T_{k+1} = T_k + δ_k, and the slope of δ_k in T_k
            residual = prefix[1:] - prefix[:-1] - delta[:-1]
            if n == 1 or np.abs(residual).max() <= 4e-16 * abs(total):
                return X, float(D[-1] + B[-1] * X[-1] + C[-1] / X[-1])
            slope = np.where(X == root, (B - C / (X * X)) * (-A * X / (2.0 * qa * X + qb)), 0.0)
            np.cumprod(1.0 + slope[:-1], out=growth[1:])
            np.cumsum(-residual / growth[1:], out=correction[1:])
            correction[1:] *= growth[1:]
            if np.all(np.isfinite(correction)):
                prefix = prefix + correction
            else:  # fall back to a plain fixed-point round
                prefix = total + np.concatenate(([0.0], np.cumsum(delta[:-1])))
    return _sequential_updates(total, B, C, A, e_old, p, low, high)


def _exp_box(bounds: Optional[Bounds], sl: slice, n: int) -> Tuple[np.ndarray, np.ndarray]:
    """The bounds of the groups in `sl` as limits on exp(u): [0, inf) where none."""
    if bounds is None:
        return np.zeros(n), np.full(n, np.inf)
    return np.exp(bounds.lower[sl]), np.exp(bounds.upper[sl])


def finish(problem, u: np.ndarray, result: SolveResult, bounds: Optional[Bounds]) -> SolveResult:
    """Fill in F at the result from the parameters, the KKT residual and the groups on a bound,
    and never return a result worse than no rescaling (u = 0, always inside the bounds)."""
    _, grad0, _ = problem.evaluate(np.zeros(problem.H))
    F, grad, _ = problem.evaluate(u)
    if not (np.isfinite(F) and F <= result.objective_before):  # rounding: no rescaling is better
        u, F, grad = np.zeros(problem.H), result.objective_before, grad0
    projected = grad if bounds is None else bounds.projected_gradient(u, grad)
    scale = float(np.abs(grad0).max()) if grad0.size else 0.0
    result.u, result.objective_after = u, float(F)
    result.kkt_residual = float(np.abs(projected).max()) / scale if projected.size and scale > 0 else 0.0
    result.on_bound = int(bounds.on_bound(u).sum()) if bounds is not None else 0
    return result


def coordinate_descent(problem: Problem, max_iter: int = 10, tol: float = 1e-2,
                       progress: Optional[Callable[[int, float], None]] = None,
                       bounds: Optional[Bounds] = None) -> SolveResult:
    """The authors' cyclic coordinate descent, each group's step kept within its `bounds`."""
    t0 = time.perf_counter()
    u = np.zeros(problem.H)
    f0 = problem.objective(u)
    if problem.H == 0 or problem.p == 0:
        return SolveResult(u, "coordinate-descent", 0, 0.0, True, f0, f0, [], time.perf_counter() - t0, 0.0)
    layers = _layers(problem)
    A = problem.A
    p = float(problem.p)
    u_ext = np.zeros(problem.H + 1)
    history = []
    change = math.inf
    sweeps = 0
    increments = {}  # per layer: the total's increments in the last sweep (a warm start)
    boxes = {}
    for sweep in range(1, max_iter + 1):
        sweeps = sweep
        total = problem.total(u_ext[:-1])
        change = 0.0
        for k, layer in enumerate(layers):
            B, C = _layer_sums(problem, layer, u_ext)
            sl = slice(layer.start, layer.stop)
            if k not in boxes:
                boxes[k] = _exp_box(bounds, sl, layer.stop - layer.start)
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


def exact_minimiser(problem: Problem, max_iter: int = 200, tol: float = 1e-6, memory: int = 20,
                    progress: Optional[Callable[[int, float], None]] = None,
                    bounds: Optional[Bounds] = None, start: Optional[np.ndarray] = None) -> SolveResult:
    """The minimiser of the convex criterion within `bounds`, by projected L-BFGS, until the
    projected gradient's largest entry is below tol · max |∇F(0)| (the KKT conditions of
    min F over the box: ∂F/∂u_h = 0 inside, ≥ 0 at a lower bound, ≤ 0 at an upper one).

    The tolerance is relative to the gradient at no rescaling: F grows with the number of
    parameters p, and float64 resolves its gradient only to about p·1e-16 in absolute terms.
    The run also stops when no step can lower F any more (the rounding floor). `start` (a
    point inside the bounds, such as coordinate descent's result) is where it begins; a start
    worse than no rescaling is replaced by u = 0.

    Why L-BFGS: one iteration costs one pass over the parameter blocks (F and ∇F together),
    where a Newton-CG iteration costs tens of Hessian-vector products, each a pass too. The
    first inverse-Hessian guess is diagonal, p·(mass touching h)/Σw — the diagonal of the
    Hessian's leading term — so groups of very different weights start on an equal footing.

    The bounds are kept by a two-metric projection (Bertsekas): the groups near a bound with
    the gradient pushing them out take a diagonally scaled gradient step, the others the
    L-BFGS step over the free groups only, and each trial point is projected onto the box.
    Backtracking along that projected path keeps every step an Armijo decrease, so F never
    increases; when the L-BFGS step fails, a projected diagonal step is tried before stopping.
    """
    t0 = time.perf_counter()
    H = problem.H
    zero = np.zeros(H)
    F, grad, touch = problem.evaluate(zero)
    f0 = F
    if H == 0 or problem.p == 0:
        return SolveResult(zero, "exact (L-BFGS)", 0, 0.0, True, f0, f0, [], time.perf_counter() - t0, 0.0)
    threshold = tol * max(float(np.abs(grad).max()), 1e-300)
    box = bounds if bounds is not None and bounds.active else None
    u = zero
    if start is not None:
        u_start = box.clip(start) if box is not None else np.asarray(start, dtype=np.float64)
        F_start, grad_start, touch_start = problem.evaluate(u_start)
        if np.isfinite(F_start) and F_start <= F:
            u, F, grad, touch = u_start, F_start, grad_start, touch_start

    def projected(u, grad):
        return grad if box is None else box.projected_gradient(u, grad)

    def trial(u, direction, step):
        u_new = u + step * direction
        return box.clip(u_new) if box is not None else u_new

    s_list: List[np.ndarray] = []
    y_list: List[np.ndarray] = []
    history: List[float] = []
    iterations = 0
    grad_norm = float(np.abs(projected(u, grad)).max())
    stalled = 0
    while iterations < max_iter and grad_norm >= threshold:
        iterations += 1
        diag = 1.0 / np.maximum(problem.p * touch, 1e-12)  # inverse of the Hessian diagonal's main term
        near = None
        if box is not None:  # the ε-active groups: at or near a bound, pushed out by the gradient
            eps = min(1e-3, float(np.abs(u - box.clip(u - diag * grad)).max()))
            near = ((u - box.lower <= eps) & (grad > 0)) | ((box.upper - u <= eps) & (grad < 0))
            if not near.any():
                near = None
        accepted = None
        for attempt in ("lbfgs", "diagonal"):
            if attempt == "lbfgs":
                direction = -_two_loop(grad, s_list, y_list, diag, None if near is None else ~near)
                if near is not None:
                    direction[near] = -diag[near] * grad[near]
            else:
                s_list.clear()
                y_list.clear()
                direction = -diag * grad
            if float(grad @ direction) >= 0:
                continue  # not a descent direction (numerical trouble)
            step = 1.0
            while step >= 1e-12:
                u_new = trial(u, direction, step)
                with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # a trial may overshoot
                    F_new, grad_new, touch_new = problem.evaluate(u_new)
                if np.isfinite(F_new) and F_new <= F + 1e-4 * float(grad @ (u_new - u)):
                    accepted = (u_new, F_new, grad_new, touch_new)
                    break
                step *= 0.5
            if accepted is not None and accepted[1] <= F:
                break
            accepted = None
        if accepted is None:
            break  # no step keeps F from rising: the rounding floor
        u_new, F_new, grad_new, touch_new = accepted
        new_norm = float(np.abs(projected(u_new, grad_new)).max())
        if F_new == F and new_norm >= grad_norm:
            stalled += 1  # F no longer moves at float64 resolution and neither does ∇F
            if stalled >= 3:
                break
        else:
            stalled = 0
        s, y = u_new - u, grad_new - grad
        if float(s @ y) > 1e-12 * float(y @ y):
            s_list.append(s)
            y_list.append(y)
            if len(s_list) > memory:
                s_list.pop(0)
                y_list.pop(0)
        u, F, grad, touch = u_new, F_new, grad_new, touch_new
        grad_norm = new_norm
        history.append(F)
        if progress is not None:
            progress(iterations, grad_norm)
    result = SolveResult(u, "exact (L-BFGS)", iterations, grad_norm, grad_norm < threshold, f0, F, history, 0.0)
    result = finish(problem, u, result, bounds)
    result.seconds = time.perf_counter() - t0
    return result


def _two_loop(grad, s_list, y_list, diag, free=None):
    """L-BFGS two-loop recursion: an approximation of (∇²F)⁻¹·grad, over the `free`
    coordinates only when given (the others get 0: the pairs are restricted to the free ones)."""
    if free is not None:
        grad = np.where(free, grad, 0.0)
        pairs = [(np.where(free, s, 0.0), np.where(free, y, 0.0)) for s, y in zip(s_list, y_list)]
        pairs = [(s, y) for s, y in pairs if float(s @ y) > 1e-12 * float(y @ y)]
        s_list, y_list = [s for s, _ in pairs], [y for _, y in pairs]
        diag = np.where(free, diag, 0.0)
    q = grad.copy()
    alphas = []
    for s, y in zip(reversed(s_list), reversed(y_list)):
        rho = 1.0 / float(y @ s)
        a = rho * float(s @ q)
        alphas.append((a, rho, s, y))
        q -= a * y
    if s_list:  # scale the diagonal guess so its curvature matches the latest pair
        s, y = s_list[-1], y_list[-1]
        gamma = float(s @ y) / float(y @ (diag * y))
        r = gamma * diag * q
    else:
        r = diag * q
    for a, rho, s, y in reversed(alphas):
        b = rho * float(y @ r)
        r += s * (a - b)
    return r
