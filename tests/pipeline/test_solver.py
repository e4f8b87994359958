"""The solver reproduces a plain coordinate-descent loop, decreases F, and reaches the minimiser."""

import os

import numpy as np
import pytest

from support.nets import Net, cnn, mlp
from onnx_pathcond import load_model
from onnx_pathcond.api import analyse_model
from onnx_pathcond.criteria.pathcond import ProblemBuilder
from onnx_pathcond.criteria.pathcond import _layer_updates, _sequential_updates, coordinate_descent
from onnx_pathcond.stats import compute_diag_g
from support import repo
from support.reference_criterion import gradient, objective, plain_coordinate_descent


def problem_and_entries(model):
    """The tool's Problem, and the same entries written out one per parameter element."""
    graph, analysis, groups = analyse_model(model)
    builder = ProblemBuilder(groups, analysis.uses, analysis.shared)
    entries = []

    def both(stat):
        builder.add(stat)  # g may come as factors only: the builder may use them alone
        use, g = stat.use, stat.array()
        of = groups.of_position

        def gid(pos):
            pos = np.broadcast_to(pos, use.view_shape)
            return np.where(pos >= 0, of[np.maximum(pos, 0)], -1)

        entries.append((g.ravel().copy(), gid(use.rows).ravel(), gid(use.cols).ravel()))

    compute_diag_g(graph, analysis, both)
    problem = builder.finish()
    assert any(b.factors is not None for b in problem.blocks) or name_has_no_dense_layer(model)
    g = np.concatenate([e[0] for e in entries])
    gin = np.concatenate([e[1] for e in entries])
    gout = np.concatenate([e[2] for e in entries])
    keep = g > 0
    return problem, groups.count, g[keep], gin[keep], gout[keep]


def name_has_no_dense_layer(model):
    return not any(n.op_type in ("Gemm", "MatMul") for n in model.graph.node)


def _self_loop_residual():
    # y = x + conv(x) with no activation in between: conv weights join two groups of the
    # same residual stream (and its diagonal joins a group to itself).
    net = Net([1, 3, 4, 4], seed=9)
    s = net.relu(net.conv(net.x, 3, 4, 3, pad=1))
    s = net.relu(net.node("Add", [s, net.conv(s, 4, 4, 1)]))
    s = net.relu(net.node("Add", [s, net.conv(s, 4, 4, 3, pad=1, group=4)]))
    return net.model(net.conv(s, 4, 2, 1))


MODELS = {
    "mlp": lambda: mlp([6, 8, 5, 3], seed=2),
    "mlp_large_scale": lambda: mlp([5, 7, 7, 2], seed=3, scale=8.0),
    "mlp_pruned": lambda: mlp([6, 9, 4, 3], seed=4, prune=0.5),
    "cnn": lambda: cnn([2, 4, 3], size=8, seed=5),
    "grouped_residual": _self_loop_residual,
    "resnet_bn": lambda: load_model(repo.model("resnet.legacy_bn.onnx")),
    "shufflenet_bn": lambda: load_model(repo.model("shufflenet.dynamo_bn.onnx")),  # its layers join one run
    "mlp_unbalanced": lambda: load_model(repo.model("mlp_unbalanced.onnx")),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_reproduces_plain_loop_sweep_by_sweep(name):
    problem, H, g, gin, gout = problem_and_entries(MODELS[name]())
    sweeps = 4 if g.size > 20000 else 6
    reference = plain_coordinate_descent(g, gin, gout, H, sweeps)
    for k, expected in enumerate(reference, start=1):
        got = coordinate_descent(problem, max_iter=k, tol=0.0).u
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9, err_msg=f"sweep {k}")
        assert problem.objective(got) == pytest.approx(objective(g, gin, gout, expected), rel=1e-12)


@pytest.mark.parametrize("name", ["mlp", "cnn", "grouped_residual", "mlp_pruned"])
def test_objective_never_increases_and_am_gm_drops(name):
    problem, H, g, gin, gout = problem_and_entries(MODELS[name]())
    result = coordinate_descent(problem, max_iter=30, tol=0.0)
    values = [result.objective_before] + result.history
    assert all(b <= a + 1e-9 * abs(a) for a, b in zip(values, values[1:]))
    assert problem.log_am_gm(result.u) <= problem.log_am_gm(np.zeros(H)) + 1e-12
    # The objective and the extremes of the rescaled diag(G) agree with the per-element formula.
    assert result.objective_after == pytest.approx(objective(g, gin, gout, result.u), rel=1e-12)
    ue = np.append(result.u, 0.0)
    rescaled = g * np.exp(ue[gout] - ue[gin])
    high, low = problem.extremes(result.u)
    assert high == pytest.approx(rescaled.max(), rel=1e-12) and low == pytest.approx(rescaled.min(), rel=1e-12)


@pytest.mark.parametrize("name", ["mlp", "cnn", "grouped_residual"])
def test_long_run_reaches_the_minimiser(name):
    problem, H, g, gin, gout = problem_and_entries(MODELS[name]())
    result = coordinate_descent(problem, max_iter=20000, tol=1e-12)
    assert result.converged
    grad = gradient(g, gin, gout, result.u)
    assert np.abs(grad).max() < 1e-6 * g.size
    np.testing.assert_allclose(problem.gradient(result.u), grad, atol=1e-8 * g.size)


def test_stopping_rule_uses_sum_of_changes():
    problem, H, g, gin, gout = problem_and_entries(MODELS["mlp"]())
    result = coordinate_descent(problem, max_iter=1000, tol=1e-2)
    reference = plain_coordinate_descent(g, gin, gout, H, 1000, tol=1e-2)
    assert result.sweeps == len(reference)
    assert result.last_change < 1e-2
    np.testing.assert_allclose(result.u, reference[-1], atol=1e-9)


def test_layer_recurrence_matches_the_scalar_loop():
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(1, 400))
        B = rng.random(n) * 10 ** rng.uniform(-3, 3, n)
        C = rng.random(n) * 10 ** rng.uniform(-3, 3, n)
        B[rng.random(n) < 0.1] = 0.0
        A = rng.integers(-50, 50, n).astype(float)
        e_old = np.exp(rng.normal(0, 1, n))
        p = 5000.0
        total = float((B * e_old + C / e_old).sum()) * (1 + rng.random() * 3)
        X1, T1 = _layer_updates(total, B, C, A, e_old, p)
        X2, T2 = _sequential_updates(total, B, C, A, e_old, p)
        np.testing.assert_allclose(X1, X2, rtol=1e-12)
        assert T1 == pytest.approx(T2, rel=1e-12)


def test_long_recurrence_whose_total_doubles_needs_no_scalar_loop(monkeypatch):
    """A unit of 40,000 groups along which the running total more than doubles: its Newton
    rounds reach the rounding floor of the largest total (a floor taken from the first total
    is below one ulp there, and the layer fell back to the plain loop), and give the loop's
    values."""
    from onnx_pathcond.criteria import pathcond

    rng = np.random.default_rng(3)
    doubled = 0
    for trial in range(6):
        n = 40000
        B = rng.random(n) * 10 ** rng.uniform(-3, 3, n)
        C = rng.random(n) * 10 ** rng.uniform(-3, 3, n)
        A = rng.integers(-50, 50, n).astype(float)
        e_old = np.exp(rng.normal(0, 1, n))
        p = 20.0 * n
        total = float((B * e_old + C / e_old).sum()) * (1 + rng.random())
        X2, T2 = _sequential_updates(total, B, C, A, e_old, p)
        with monkeypatch.context() as m:
            m.setattr(pathcond, "_sequential_updates", lambda *a, **k: pytest.fail("fell back to the scalar loop"))
            X1, T1 = _layer_updates(total, B, C, A, e_old, p)
        np.testing.assert_allclose(X1, X2, rtol=1e-12)
        assert T1 == pytest.approx(T2, rel=1e-12)
        doubled += T2 > 2 * total
    assert doubled >= 2


def test_bounded_layer_recurrence_matches_the_scalar_loop():
    """With a box on some groups the vectorised layer step still gives the one-group-at-a-time
    sequence, each step clipped to its box (the 1-D minimiser of a convex function within it)."""
    rng = np.random.default_rng(1)
    clipped = 0
    for trial in range(20):
        n = int(rng.integers(1, 400))
        B = rng.random(n) * 10 ** rng.uniform(-3, 3, n)
        C = rng.random(n) * 10 ** rng.uniform(-3, 3, n)
        A = rng.integers(-50, 50, n).astype(float)
        e_old = np.ones(n)
        p = 5000.0
        total = float((B + C).sum()) * (1 + rng.random() * 3)
        free, _ = _layer_updates(total, B, C, A, e_old, p)
        low = np.where(rng.random(n) < 0.3, np.exp(-rng.random(n)), 0.0)
        high = np.where(rng.random(n) < 0.3, np.exp(rng.random(n)), np.inf)
        X1, T1 = _layer_updates(total, B, C, A, e_old, p, low, high)
        X2, T2 = _sequential_updates(total, B, C, A, e_old, p, low, high)
        np.testing.assert_allclose(X1, X2, rtol=1e-12)
        assert T1 == pytest.approx(T2, rel=1e-12)
        assert np.all((X1 >= low) & (X1 <= high))
        clipped += int(((free < low) | (free > high)).sum())
    assert clipped > 50  # the boxes did cut many unconstrained steps


def _cells(problem):
    """Every cell of every block as (row group, column group, g), a factored block multiplied out."""
    for b in problem.blocks:
        G = np.concatenate([piece for _, piece in b.chunks()]) if b.factors is not None else b.G
        rows, cols, g = np.broadcast_arrays(b.row, b.col, G)
        yield rows.ravel(), cols.ravel(), g.ravel()


def _problems():
    from onnx_pathcond.criteria import enorm
    from support.randmodels import generate

    models = {os.path.basename(f): load_model(f) for f in repo.shipped_models()}
    models.update({name: make() for name, make in MODELS.items()})
    models.update({f"random_{seed}": generate(seed)[0] for seed in range(12)})
    for name, model in models.items():
        graph, analysis, groups = analyse_model(model)
        builder = ProblemBuilder(groups, analysis.uses, analysis.shared)
        compute_diag_g(graph, analysis, builder.add)
        yield name, "pathcond", builder.finish()
        yield name, "enorm", enorm.build(graph, analysis, groups).cells


def test_units_of_a_sweep_are_exact_and_as_large_as_they_may_be():
    """The units a sweep updates at once (`cells.layers`) cover the groups in order; no cell
    with g > 0 joins two groups of one unit (what makes a unit's update the one-group-at-a-time
    sequence); and each unit after the first starts where a cell joins it to the unit before,
    (else the two would be one)."""
    from onnx_pathcond.criteria.cells import layers

    joined = 0
    for name, criterion, problem in _problems():
        units = layers(problem)
        starts = [u.start for u in units]
        assert starts == sorted(starts) and (not units or (starts[0] == 0 and units[-1].stop == problem.H))
        assert all(a.stop == b.start for a, b in zip(units, units[1:]))
        unit_of = np.full(problem.H + 1, -1)
        for k, u in enumerate(units):
            unit_of[u.start:u.stop] = k
        pairs = set()
        for rows, cols, g in _cells(problem):
            ur, uc = unit_of[rows], unit_of[cols]
            inside = (ur == uc) & (ur >= 0) & (rows != cols) & (g > 0)
            assert not inside.any(), (name, criterion, "a cell joins two groups of one unit")
            between = (ur >= 0) & (uc >= 0) & (ur != uc)
            pairs.update(zip(np.minimum(ur, uc)[between].tolist(), np.maximum(ur, uc)[between].tolist()))
        node_layers = len(np.unique(problem.layer_of)) if problem.H else 0
        joined += node_layers > len(units)
        for k in range(1, len(units)):
            assert (k - 1, k) in pairs, (name, criterion, k)
    assert joined >= 10  # BatchNorm networks: their layers join into runs
