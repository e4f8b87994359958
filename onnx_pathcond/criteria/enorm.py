"""The ENorm criterion: Equi-normalization (Stock et al., 2019; docs/design.md §4.4).

ENorm needs no path statistics: it minimises the squared ℓ2 norm of the rescaled parameters.
With u the log-rescalings of the H groups, parameter θ_i becomes θ_i·exp(−(Bu)_i / 2) with
(Bu)_i = u[out(i)] − u[in(i)] (a missing side counts as 0), so

    E(u) = Σ_i θ_i² · exp(u[in(i)] − u[out(i)]),

summed over every stored parameter element the analysis declares (weights, biases,
BatchNorm's γ and β, multipliers); entries with θ_i = 0 carry nothing.

E has the form of PathCond's total Σ g_i·exp((Bu)_i) with g_i = θ_i² and u replaced by −u.
So the entries are gathered into cells and blocks by the PathCond criterion's own
`ProblemBuilder` (one kernel slice per cell, constants folded, grouped convolutions and
tensors read by several nodes handled once), fed θ² instead of diag(G), and every sum below
is that `Problem`'s sum taken at v = −u.

The coordinate step is closed form. Fix every group but h and write X = exp(u_h): with
in_h = Σ θ²·exp(−u[out(i)]) over the entries incoming to h and out_h = Σ θ²·exp(u[in(i)])
over those outgoing from it (both at u_h = 0),

    E = in_h·X + out_h/X + const,    minimised at  X = √(out_h / in_h),  u_h = ½·log(out_h / in_h):

the rescaled incoming and outgoing squared norms of h become equal (both √(in_h·out_h)).
A group with no non-zero incoming or no non-zero outgoing entry (a dead or pruned neuron)
would have E fall without bound towards u_h → ±∞: it keeps u_h = 0.

E is convex, and the groups of one layer touch disjoint parameters, so a layer's groups are
updated all at once with no coupling between them (PathCond's running total has no
counterpart here): a sweep is one pass over the blocks, and gives exactly the cyclic
one-group-at-a-time sequence.
"""

from __future__ import annotations

import math
import time
from typing import Callable, List, Optional, Tuple

import numpy as np

from ..graph import Graph
from ..pathnet.records import Statistic
from ..records import CriterionSummary
# the layer split and the per-layer sums of PathCond's coordinate descent serve ENorm's as they are
from ..bounds import Bounds
from ..options import ENORM_SOLVERS
from ..solve import SolveResult, finish
from ..symmetry import Analysis, Groups
from .base import Criterion, register
from .cells import Problem, ProblemBuilder, layer_sums, layers

NAME = "enorm"
OBJECTIVE = ("sum of the squared rescalable parameters, Σ θ² over the stored values of every weight, bias and "
             "BatchNorm γ/β the analysis sees")


class ENormProblem:
    """E(u) over the log-rescalings u, with the interface the solvers use.

    `cells` holds θ² in the PathCond `Problem`'s form, whose sums are taken at v = −u.
    `free` marks the groups with non-zero parameters on both sides; the others keep u = 0.
    """

    name = NAME

    def __init__(self, cells: Problem, theta_max: float, theta_min: float):
        self.cells = cells
        self.H = cells.H
        self.p = cells.p  # non-zero parameter elements
        self.layer_of = cells.layer_of
        self.free = (cells.n_in > 0) & (cells.n_out > 0)
        self.theta_max_before = theta_max
        self.theta_min_before = theta_min

    def objective(self, u: np.ndarray) -> float:
        """E(u) = Σ θ²·exp(u[in] − u[out])."""
        return self.cells.total(-np.asarray(u, dtype=np.float64))

    def evaluate(self, u: np.ndarray) -> Tuple[float, np.ndarray, np.ndarray]:
        """E(u), its gradient and its Hessian diagonal divided by p, in one pass.

        With w_i = θ_i²·exp(u[in] − u[out]) summed per group over its incoming (w_in) and
        outgoing (w_out) entries, ∂E/∂u_h = w_in − w_out and ∂²E/∂u_h² = w_in + w_out. The
        exact solver takes p times the third value as its first inverse-Hessian guess
        (PathCond's third value is the leading term of its own Hessian diagonal over p), so
        it is divided by p here. Groups that are not free get a zero gradient: they stay at 0.
        """
        H = self.H
        total, w_in, w_out = self.cells.group_masses(np.append(-np.asarray(u, dtype=np.float64), 0.0))
        w_in, w_out = w_in[:H], w_out[:H]
        grad = np.where(self.free, w_in - w_out, 0.0)
        return total, grad, (w_in + w_out) / max(self.p, 1)

    def gradient(self, u: np.ndarray) -> np.ndarray:
        return self.evaluate(u)[1]

    def extremes(self, u: np.ndarray) -> Tuple[float, float]:
        """Largest and smallest non-zero |θ| after the rescaling u."""
        high, low = self.cells.extremes(-np.asarray(u, dtype=np.float64))
        return math.sqrt(high), math.sqrt(low) if math.isfinite(low) else 0.0

    def summary(self, u: np.ndarray, before: float, after: float) -> CriterionSummary:
        """The report's criterion record: F is E, the extremes are those of |θ|."""
        max_after, min_after = self.extremes(u) if self.p else (0.0, 0.0)
        return CriterionSummary(
            name=NAME, entries=self.p, F_before=before, F_after=after, am_gm_before=None, am_gm_after=None,
            max_before=self.theta_max_before, min_before=self.theta_min_before, max_after=max_after,
            min_after=min_after, objective=OBJECTIVE)


@register
class ENorm(Criterion):
    name = NAME
    needs_diag_g = False
    # A BatchNorm input's scale would move its running statistics, which are no weights: that
    # group would have no outgoing norm to balance and its incoming weights would shrink
    # without end.
    supports_bn_statistics = False
    solvers = ENORM_SOLVERS
    objective = OBJECTIVE

    def build(self, graph, analysis, groups, statistics, progress=None):
        return build(graph, analysis, groups, progress=progress), None

    def descend(self, problem, max_iter, tol, progress=None, bounds=None):
        return coordinate_descent(problem, max_iter=max_iter, tol=tol, progress=progress, bounds=bounds)

    def summary(self, problem, result):
        return problem.summary(result.u, result.objective_before, result.objective_after)


def stored_parameters(analysis: Analysis) -> list:
    """One parameter use per stored tensor, the first that reads it.

    A tensor read by several nodes is one set of parameters: its norm counts once. Its
    non-zero elements have the same groups in every use (symmetry.reconcile_stored_tensors
    ties them), and its zero elements carry nothing, so the first use says it all. A parameter
    computed from other constants (no stored value) cannot be rescaled and is left out.
    """
    seen, first = set(), []
    for use in analysis.uses:
        if use.ref is None or use.ignored or use.ref.name in seen:
            continue
        seen.add(use.ref.name)
        first.append(use)
    return first


def _squares(graph: Graph, use) -> np.ndarray:
    """θ² of a stored tensor in its use's layout, in float64."""
    value = use.ref.to_view(graph.stored_value(use.ref))
    if value.dtype.name == "bfloat16":  # no direct cast to float64 for this extension type
        value = value.astype(np.float32)
    return np.square(np.asarray(value, dtype=np.float64)).reshape(use.view_shape)


def build(graph: Graph, analysis: Analysis, groups: Groups,
          progress: Optional[Callable[[int, int], None]] = None) -> ENormProblem:
    """θ² of every stored parameter, one tensor at a time (read from the file when the
    model's weights stay there), gathered into cells."""
    uses = stored_parameters(analysis)
    builder = ProblemBuilder(groups, uses)
    for k, use in enumerate(uses):
        builder.add(Statistic(use, g=_squares(graph, use)))
        if progress is not None:
            progress(k + 1, len(uses))
    cells = builder.finish()
    # the builder keeps the largest and smallest positive entry it was given: here θ²
    high, low = builder.g_max_before, builder.g_min_before
    return ENormProblem(cells, math.sqrt(high), math.sqrt(low) if math.isfinite(low) else 0.0)


def closed_form_step(incoming: np.ndarray, outgoing: np.ndarray) -> np.ndarray:
    """u_h = ½·log(out_h / in_h), the minimiser of in_h·exp(u_h) + out_h·exp(−u_h); 0 where a
    side is empty (the minimum would be at infinity)."""
    ok = (incoming > 0) & (outgoing > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ok, 0.5 * (np.log(np.where(ok, outgoing, 1.0)) - np.log(np.where(ok, incoming, 1.0))), 0.0)


def coordinate_descent(problem: ENormProblem, max_iter: int, tol: float,
                       progress: Optional[Callable[[int, float], None]] = None,
                       bounds: Optional[Bounds] = None) -> SolveResult:
    """Cyclic exact minimisation over one u_h at a time, groups in layer order, from u = 0:
    at most `max_iter` sweeps, stopping when a sweep's Σ|Δu_h| falls below `tol` (the same
    rule as PathCond's coordinate descent). A layer is updated at once (see the module's
    docstring); a layer in which a parameter joins two of its own groups is taken one group at
    a time, as for PathCond. Within `bounds`, a step is the closed form clipped to the group's
    box: E is convex in u_h, so that is the minimiser along u_h inside the box."""
    t0 = time.perf_counter()
    H = problem.H
    cells = problem.cells
    u_ext = np.zeros(H + 1)  # u of every group, and 0 for the fixed side
    e0 = problem.objective(u_ext[:H])
    if H == 0 or problem.p == 0 or max_iter == 0:
        return SolveResult(u_ext[:H].copy(), "coordinate-descent", 0, 0.0, H == 0 or problem.p == 0, e0, e0, [],
                           time.perf_counter() - t0, 0.0)
    groups_by_layer = layers(cells)
    free = np.append(problem.free, False)
    total = e0
    history: List[float] = []
    change = math.inf
    sweeps = 0
    for sweeps in range(1, max_iter + 1):
        change = 0.0
        for layer in groups_by_layer:
            # the PathCond problem's sums at v = −u with v_h = 0: its "outgoing" sum is
            # Σ θ²·exp(u[in]) over the entries leaving h (out_h), its "incoming" Σ θ²·exp(−u[out])
            # over those entering h (in_h)
            out_h, in_h = layer_sums(cells, layer, -u_ext)
            sl = slice(layer.start, layer.stop)
            old = u_ext[sl]
            new = np.where(free[sl], closed_form_step(in_h, out_h), 0.0)
            if bounds is not None:
                new = np.clip(new, bounds.lower[sl], bounds.upper[sl])
            total += float((in_h * np.exp(new) + out_h * np.exp(-new)).sum()
                           - (in_h * np.exp(old) + out_h * np.exp(-old)).sum())
            change += float(np.abs(new - old).sum())
            u_ext[sl] = new
        history.append(total)
        if progress is not None:
            progress(sweeps, change)
        if change < tol:
            break
    result = SolveResult(u_ext[:H].copy(), "coordinate-descent", sweeps, change, change < tol, e0, e0, history)
    result = finish(problem, result.u, result, bounds)
    history[-1] = result.objective_after  # the running total, refreshed once from the parameters
    result.seconds = time.perf_counter() - t0
    return result
