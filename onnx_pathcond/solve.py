"""What every criterion's solve shares (docs/design.md §4): the result record, its final
accounting (F from the parameters, the KKT residual, never worse than no rescaling), and the
exact minimiser, projected L-BFGS on any convex problem with the `evaluate` interface. Each
criterion's coordinate descent lives with the criterion (`criteria/`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import numpy as np

from .bounds import Bounds

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


def exact_minimiser(problem, max_iter: int = 200, tol: float = 1e-6, memory: int = 20,
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
