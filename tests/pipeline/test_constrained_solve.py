"""The solve keeps its constraints inside (bounds.py): a running variance stays >= 0 under
--bn-statistics, half-precision values stay in range, and the criterion is still minimised.

Checked, independently of the solvers' own bookkeeping:

* F at the result is never above F at no rescaling, and `exact` never above the default
  coordinate descent, on the shipped BatchNorm models with --bn-statistics (where the
  post-solve guard of old made F worse than no rescaling), on random models and in float16;
* `converged` means the KKT conditions of min F over the box hold: the gradient, taken by
  central finite differences of F (not the solver's analytic gradient), vanishes on the free
  groups and points into the box on the groups at a bound;
* the rescaled model written to disk has non-negative running variances, half-precision
  values in range, and outputs equal to the input's;
* on tiny nets, F before and after comes from brute-force path enumeration of the input and
  the written model, with the solution on a bound.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from support.bruteforce import bruteforce_diag_g
from support.builders import dead_channel_bn_net, unbalanced_mlp
from support.checks import assert_equivalent
from onnx_pathcond import bounds, rescale, rescale_file, solve, stats
from onnx_pathcond.api import analyse_model
from onnx_pathcond.criteria.pathcond import ProblemBuilder, coordinate_descent

pytest.importorskip("onnxruntime")

from support.repo import ROOT  # noqa: E402  (the repository, whatever the working directory)
BN_MODELS = ["densenet.dynamo_bn.onnx", "preact_resnet.dynamo_bn.onnx", "shufflenet.legacy_bn.onnx",
             "resnet.dynamo_bn.onnx", "mobilenet.legacy_bn.onnx"]
EPS = 1e-5


def _problem(model, bn_statistics=True):
    """The PathCond problem and the solve's bounds, built as the pipeline builds them."""
    graph, analysis, groups = analyse_model(model, bn_statistics=bn_statistics)
    builder = ProblemBuilder(groups, analysis.uses, analysis.shared)
    stats.compute_diag_g(graph, analysis, builder.add)
    return builder.finish(), bounds.solve_bounds(graph, analysis.uses, groups)


def _finite_difference_kkt(problem, box, u, step=1e-5):
    """The largest KKT violation at u, from F alone: |∂F/∂u_h| on groups inside their box,
    the outward part of it on groups at a bound (one-sided differences into the box)."""
    worst = 0.0
    F = problem.objective(u)
    for h in range(problem.H):
        up, down = u.copy(), u.copy()
        up[h] += step
        down[h] -= step
        at_lower = np.isfinite(box.lower[h]) and u[h] <= box.lower[h]
        at_upper = np.isfinite(box.upper[h]) and u[h] >= box.upper[h]
        if at_lower:  # may only move up: F must not fall that way
            worst = max(worst, -(problem.objective(up) - F) / step)
        elif at_upper:
            worst = max(worst, -(problem.objective(down) - F) / step)
        else:
            worst = max(worst, abs(problem.objective(up) - problem.objective(down)) / (2 * step))
    return worst


def _gradient_scale(problem):
    """max |∇F(0)| by central differences: the scale the tolerances are relative to."""
    return _finite_difference_kkt(problem, bounds.Bounds.none(problem.H), np.zeros(problem.H))


def _variances(model):
    names = {n.input[4] for n in model.graph.node if n.op_type == "BatchNormalization"}
    return {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer if t.name in names}


# ------------------------------------------------------------------------------ shipped models
@pytest.mark.parametrize("name", BN_MODELS)
def test_bn_statistics_solve_never_worse_than_no_rescaling_and_exact_below_default(name):
    problem, box = _problem(onnx.load(os.path.join(ROOT, "models", name)))
    assert box.variance.any()  # the running variances bound some groups
    f0 = problem.objective(np.zeros(problem.H))
    cd = coordinate_descent(problem, max_iter=10, tol=1e-2, bounds=box)
    exact = solve.exact_minimiser(problem, max_iter=1000, tol=1e-6, bounds=box, start=cd.u)
    for result in (cd, exact):
        assert np.all(box.lower <= result.u) and np.all(result.u <= box.upper)
        assert result.objective_after == pytest.approx(problem.objective(result.u), rel=1e-12, abs=1e-9)
        assert result.objective_after <= f0
    assert exact.objective_after <= cd.objective_after
    assert exact.converged and exact.kkt_residual < 1e-6
    assert exact.on_bound == int(box.on_bound(exact.u).sum())
    # the optimality conditions hold, by differences of F (looser: F's rounding over the step)
    assert _finite_difference_kkt(problem, box, exact.u) <= 1e-3 * _gradient_scale(problem)


@pytest.mark.parametrize("name", ["densenet.dynamo_bn.onnx", "preact_resnet.dynamo_bn.onnx"])
def test_written_bn_statistics_model_keeps_variances_and_outputs(name, tmp_path):
    path = os.path.join(ROOT, "models", name)
    model = onnx.load(path)
    reports = {}
    for solver in ("cd", "exact"):
        out = tmp_path / f"{solver}.onnx"
        report = rescale_file(path, out, bn_statistics=True, solver=solver)
        written = onnx.load(out)
        assert all(np.all(v >= 0) for v in _variances(written).values())
        assert report.verification.passed
        assert_equivalent(model, written, rtol=1e-4)
        assert report.solver.F_after <= report.solver.F_before
        assert report.solver.bounded > 0
        assert report.solver.on_bound == report.solver.on_variance_bound  # float32: no range bound
        reports[solver] = report
    assert reports["exact"].solver.F_after <= reports["cd"].solver.F_after
    assert reports["exact"].solver.converged and reports["exact"].solver.kkt_residual < 1e-6


def test_exact_is_never_above_the_default_without_bounds():
    for name in ("densenet.dynamo_bn.onnx", "mlp_unbalanced.onnx", "resnet.dynamo_fused.onnx"):
        path = os.path.join(ROOT, "models", name)
        _, cd = rescale(path, verify_output=False)
        _, exact = rescale(path, solver="exact", verify_output=False)
        assert exact.solver.F_after <= cd.solver.F_after <= cd.solver.F_before, name
        assert exact.solver.converged and exact.solver.bounded == 0, name


# ------------------------------------------------------------------------------ random models
def _random_bn_models(count):
    from support.randmodels import generate

    found = []
    for seed in range(400):
        model, _ = generate(seed)
        if not any(n.op_type == "BatchNormalization" for n in model.graph.node):
            continue
        problem, box = _problem(model)
        if problem.H and box.variance.any():
            found.append((seed, problem, box))
        if len(found) == count:
            return found
    return found


def test_random_models_with_bn_statistics():
    cases = _random_bn_models(6)
    assert len(cases) == 6
    for seed, problem, box in cases:
        f0 = problem.objective(np.zeros(problem.H))
        cd = coordinate_descent(problem, max_iter=10, tol=1e-2, bounds=box)
        exact = solve.exact_minimiser(problem, max_iter=1000, tol=1e-6, bounds=box, start=cd.u)
        assert cd.objective_after <= f0 and exact.objective_after <= cd.objective_after, seed
        assert np.all(box.clip(exact.u) == exact.u), seed
        if exact.converged:
            scale = _gradient_scale(problem)
            assert _finite_difference_kkt(problem, box, exact.u) <= 1e-3 * max(scale, 1e-12), seed
        else:  # stopped at the rounding floor: F cannot be lowered by any coordinate step
            again = coordinate_descent(problem, max_iter=1, tol=0.0, bounds=box)
            assert exact.objective_after <= again.objective_after + 1e-9 * abs(again.objective_after), seed


# ------------------------------------------------------------------------------ tiny nets, brute force
def _dead_channels_net(dtype=np.float32):
    return dead_channel_bn_net(5, 6, 2, seed=11, scale=20.0, variance=1.5, mean=0.2, dtype=dtype, eps=EPS)


def _pathcond_from_paths(g_before, g_after):
    """F(u) − F(0) = [p·log Σ g' − Σ log g'] − [p·log Σ g − Σ log g] over the entries with
    g > 0: every path product is unchanged, so the rescaled model's own diag(G) gives F."""
    g0 = np.concatenate([g.ravel() for g in g_before.values()])
    g1 = np.concatenate([g_after[name].ravel() for name in g_before])
    keep = g0 > 0
    p = keep.sum()
    return (p * np.log(g1[keep].sum()) - np.log(g1[keep]).sum()) - (p * np.log(g0[keep].sum()) - np.log(g0[keep]).sum())


@pytest.mark.parametrize("solver", ["cd", "exact"])
def test_bounded_variance_solution_against_path_enumeration(solver):
    model = _dead_channels_net(np.float64)
    after, report = rescale(model, bn_statistics=True, solver=solver)
    assert report.solver.on_variance_bound >= 1  # the solution sits on a bound
    change = _pathcond_from_paths(bruteforce_diag_g(model), bruteforce_diag_g(after))
    assert report.solver.F_after - report.solver.F_before == pytest.approx(change, rel=1e-8, abs=1e-8)
    assert change < 0  # better than no rescaling, by the brute-force count
    assert all(np.all(v >= 0) for v in _variances(after).values())
    assert report.verification.passed


@pytest.mark.parametrize("solver", ["cd", "exact"])
def test_bounded_half_precision_solution_against_path_enumeration(solver):
    model = unbalanced_mlp(np.float16, 3e3, 1e-3)
    after, report = rescale(model, solver=solver)
    assert report.solver.on_range_bound >= 1
    g_before = bruteforce_diag_g(model, {"x": (1, 6)})
    change = _pathcond_from_paths(g_before, bruteforce_diag_g(after, {"x": (1, 6)}))
    # float16 storage rounds every rescaled weight: F of what was written is F(u) up to that
    assert report.solver.F_after - report.solver.F_before == pytest.approx(change, rel=2e-2, abs=0.05)
    assert change < 0
    info = np.finfo(np.float16)
    for t, s in zip(model.graph.initializer, after.graph.initializer):
        a, b = numpy_helper.to_array(t).astype(np.float64), numpy_helper.to_array(s).astype(np.float64)
        assert np.all(np.isfinite(b)) and np.all(b[a != 0] != 0)
        assert np.all(np.abs(b[np.abs(a) >= info.smallest_normal]) >= info.smallest_normal)


def test_the_half_precision_box_keeps_every_corner_in_range():
    """Any point of the boxes keeps every element in range, the worst corners included."""
    model = unbalanced_mlp(np.float16, 3e3, 1e-3)
    graph, analysis, groups = analyse_model(model)
    box = bounds.solve_bounds(graph, analysis.uses, groups)
    assert box.half_range.any() and np.all(box.lower <= 0) and np.all(box.upper >= 0)
    from onnx_pathcond.rewrite import element_factors, rescaled

    info = np.finfo(np.float16)
    rng = np.random.default_rng(0)
    lower = np.where(np.isfinite(box.lower), box.lower, -30.0)
    upper = np.where(np.isfinite(box.upper), box.upper, 30.0)
    for trial in range(50):
        u = np.where(rng.random(groups.count) < 0.5, lower, upper)  # a corner of the box
        for use in analysis.uses:
            if use.ref is None or use.ignored:
                continue
            old = use.ref.to_view(graph.stored_value(use.ref))
            incoming, outgoing = element_factors(use, groups, u)
            new = rescaled(old, np.broadcast_to(incoming, old.shape), np.broadcast_to(outgoing, old.shape))
            a, b = np.abs(old.astype(np.float64)), np.abs(new.values.astype(np.float64))
            assert np.all(np.isfinite(b)) and np.all(b[a > 0] > 0)
            assert np.all(b[a >= info.smallest_normal] >= info.smallest_normal)
