"""ENorm (Equi-normalization) as the criterion: it minimises Σθ² of the rescaled parameters.

Checked against independent computations: brute force on tiny nets whose groups are written
out by hand (each group's perturbation is first checked to be a symmetry with onnxruntime),
the closed form on a one-neuron network, a plain one-group-at-a-time loop, the exact solver,
and onnxruntime on every shipped model.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from support.builders import unbalanced_mlp
from support.checks import assert_equivalent
from support.nets import Net, mlp
import onnx_pathcond
from onnx_pathcond import options, rescale
from onnx_pathcond.api import analyse_model
from onnx_pathcond import criteria
from onnx_pathcond.criteria import enorm
from onnx_pathcond.solve import exact_minimiser

from support.repo import ROOT  # noqa: E402  (the repository, whatever the working directory)
MODELS = sorted(glob.glob(str(ROOT / "models" / "*.onnx")))


def arrays(model):
    """Every stored value in float64: initializers and Constant nodes' tensors, by name."""
    values = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t).astype(np.float64)
    return values


def squared_norm(values, names):
    return float(sum((values[n] ** 2).sum() for n in names))


# ---------------------------------------------------------------------------- tiny nets, groups by hand
# Each net comes with its groups written out from its construction, not from the tool: a group
# is {initializer: (incoming mask, outgoing mask)}. Scaling the group by s multiplies its
# incoming elements by s and its outgoing ones by 1/s (an element both incoming and outgoing,
# such as a residual layer's diagonal weight, keeps its value).
def _mask(shape, index):
    m = np.zeros(shape, dtype=bool)
    m[index] = True
    return m


def mlp_net():
    net = Net([1, 5], seed=11)
    h = net.relu(net.gemm(net.x, 5, 6))
    h = net.relu(net.gemm(h, 6, 4))
    model = net.model(net.gemm(h, 4, 3))
    w1, b1, w2, b2, w3, _ = [t.name for t in model.graph.initializer]
    groups = [{w1: (_mask((6, 5), j), None), b1: (_mask(6, j), None), w2: (None, _mask((4, 6), (slice(None), j)))}
              for j in range(6)]
    groups += [{w2: (_mask((4, 6), j), None), b2: (_mask(4, j), None), w3: (None, _mask((3, 4), (slice(None), j)))}
               for j in range(4)]
    names = [t.name for t in model.graph.initializer]
    return model, groups, names


def cnn_net():
    net = Net([1, 2, 5, 5], seed=12)
    h = net.relu(net.conv(net.x, 2, 3, 3, pad=1))
    h = net.relu(net.conv(h, 3, 4, 3, pad=1))
    h = net.node("Flatten", [net.node("GlobalAveragePool", [h])], axis=1)
    model = net.model(net.gemm(h, 4, 2))
    w1, b1, w2, b2, wg, _ = [t.name for t in model.graph.initializer]
    groups = [{w1: (_mask((3, 2, 3, 3), c), None), b1: (_mask(3, c), None),
               w2: (None, _mask((4, 3, 3, 3), (slice(None), c)))} for c in range(3)]
    groups += [{w2: (_mask((4, 3, 3, 3), c), None), b2: (_mask(4, c), None),
                wg: (None, _mask((2, 4), (slice(None), c)))} for c in range(4)]
    return model, groups, [t.name for t in model.graph.initializer]


def bn_net():
    """Conv (no bias) -> BatchNorm -> ReLU -> Conv -> ReLU -> pool -> Gemm: the BatchNorm's
    channel is scaled through γ and β; the channel between the conv and the BatchNorm is not."""
    net = Net([1, 2, 4, 4], seed=13)
    h = net.relu(net.bn(net.conv(net.x, 2, 3, 3, pad=1, bias=False), 3))
    h = net.relu(net.conv(h, 3, 4, 1))
    h = net.node("Flatten", [net.node("GlobalAveragePool", [h])], axis=1)
    model = net.model(net.gemm(h, 4, 2))
    w1, gamma, beta, mean, var, w2, b2, wg, _ = [t.name for t in model.graph.initializer]
    groups = [{gamma: (_mask(3, c), None), beta: (_mask(3, c), None),
               w2: (None, _mask((4, 3, 1, 1), (slice(None), c)))} for c in range(3)]
    groups += [{w2: (_mask((4, 3, 1, 1), c), None), b2: (_mask(4, c), None),
                wg: (None, _mask((2, 4), (slice(None), c)))} for c in range(4)]
    parameters = [n for n in (t.name for t in model.graph.initializer) if n not in (mean, var)]
    return model, groups, parameters


def residual_net():
    """h1 = relu(W1 x + b1), h2 = relu(W2 h1 + b2), y = W3 relu(h1 + h2): channel j of h1 and
    of h2 share one scale, so W2[j, k] is incoming to group j and outgoing from group k."""
    net = Net([1, 4], seed=14)
    h1 = net.relu(net.gemm(net.x, 4, 5))
    h2 = net.relu(net.gemm(h1, 5, 5))
    model = net.model(net.gemm(net.relu(net.node("Add", [h1, h2])), 5, 2))
    w1, b1, w2, b2, w3, _ = [t.name for t in model.graph.initializer]
    groups = [{w1: (_mask((5, 4), j), None), b1: (_mask(5, j), None), b2: (_mask(5, j), None),
               w2: (_mask((5, 5), j), _mask((5, 5), (slice(None), j))),
               w3: (None, _mask((2, 5), (slice(None), j)))} for j in range(5)]
    return model, groups, [t.name for t in model.graph.initializer]


TINY = {"mlp": mlp_net, "cnn": cnn_net, "batchnorm": bn_net, "residual": residual_net}


def scaled(values, group, s):
    out = {k: v.copy() for k, v in values.items()}
    for name, (incoming, outgoing) in group.items():
        exponent = np.zeros(out[name].shape)
        if incoming is not None:
            exponent += incoming
        if outgoing is not None:
            exponent -= outgoing
        out[name] = out[name] * s ** exponent
    return out


def with_values(model, values):
    m = onnx.ModelProto.FromString(model.SerializeToString())
    for t in m.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(values[t.name].astype(np.float32), t.name))
    return m


@pytest.mark.parametrize("name", list(TINY))
def test_exact_enorm_is_optimal_against_every_single_group_change(name):
    model, groups, parameters = TINY[name]()
    before = arrays(model)
    for group in groups:  # the hand-written groups are symmetries of the network
        assert_equivalent(model, with_values(model, scaled(before, group, 1.7)))

    out, report = rescale(model, criterion="enorm", solver="exact")
    assert report.criterion.name == "enorm" and report.solver.converged
    after = arrays(out)
    value = squared_norm(after, parameters)
    # F is Σθ² of the written weights (float32), computed here from the initializers
    assert report.criterion.F_after == pytest.approx(value, rel=1e-6)
    assert report.criterion.F_before == pytest.approx(squared_norm(before, parameters), rel=1e-12)
    assert value < squared_norm(before, parameters)
    for group in groups:
        for s in (0.9, 0.99, 1.01, 1.1):
            changed = squared_norm(scaled(after, group, s), parameters)
            assert changed > value * (1 + 1e-9), (group.keys(), s, changed, value)
    assert_equivalent(model, out)


# ---------------------------------------------------------------------------- the closed form
def one_neuron_net(n=5, m=3, seed=21):
    net = Net([1, n], seed=seed)
    model = net.model(net.gemm(net.relu(net.gemm(net.x, n, 1)), 1, m))
    return model


def test_closed_form_step_on_one_hidden_neuron():
    model = one_neuron_net()
    w1, b1, w2, b2 = (arrays(model)[t.name] for t in model.graph.initializer)
    incoming = (w1 ** 2).sum() + (b1 ** 2).sum()
    outgoing = (w2 ** 2).sum()
    # E(u) = incoming·e^u + outgoing·e^−u is least at u = ½·log(outgoing / incoming), where
    # λ = e^(u/2) = (outgoing / incoming)^¼ multiplies the incoming weights and divides the outgoing
    lam = (outgoing / incoming) ** 0.25
    out, report = rescale(model, criterion="enorm")
    assert report.solver.sweeps == 2 and report.solver.converged  # exact after one sweep; the second moves nothing
    v1, c1, v2, c2 = (arrays(out)[t.name] for t in out.graph.initializer)
    np.testing.assert_allclose(v1, w1 * lam, rtol=1e-6)
    np.testing.assert_allclose(c1, b1 * lam, rtol=1e-6)
    np.testing.assert_allclose(v2, w2 / lam, rtol=1e-6)
    np.testing.assert_array_equal(c2, b2)
    assert report.layers[0].lambda_min == pytest.approx(lam, rel=1e-12)
    assert report.criterion.F_after == pytest.approx(2 * np.sqrt(incoming * outgoing) + (b2 ** 2).sum(), rel=1e-12)
    # the step itself
    u = enorm.closed_form_step(np.array([incoming]), np.array([outgoing]))
    assert u[0] == pytest.approx(0.5 * np.log(outgoing / incoming), rel=1e-14)


def test_closed_form_step_keeps_an_empty_side_at_zero():
    with np.errstate(all="raise"):
        u = enorm.closed_form_step(np.array([0.0, 2.0, 0.0, 4.0]), np.array([3.0, 0.0, 0.0, 1.0]))
    np.testing.assert_array_equal(u[:3], 0.0)
    assert u[3] == pytest.approx(0.5 * np.log(1 / 4))


# ---------------------------------------------------------------------------- the solvers
def problem_and_entries(model):
    """ENorm's problem, and its entries written out one per parameter element: (θ², in, out)."""
    graph, analysis, groups = analyse_model(model)
    problem = enorm.build(graph, analysis, groups)
    values = arrays(model)
    entries = []
    seen = set()
    of = groups.of_position
    for use in analysis.uses:
        if use.ref is None or use.ignored or use.ref.name in seen:
            continue
        seen.add(use.ref.name)

        def gid(pos):
            pos = np.broadcast_to(pos, use.view_shape)
            return np.where(pos >= 0, of[np.maximum(pos, 0)], -1).ravel()

        theta = use.ref.to_view(values[use.ref.name]).reshape(use.view_shape)
        entries.append(((theta ** 2).ravel(), gid(use.rows), gid(use.cols)))
    t2, gin, gout = (np.concatenate([e[k] for e in entries]) for k in range(3))
    return problem, groups.count, t2, gin, gout


def plain_enorm_sweeps(t2, gin, gout, H, sweeps):
    """Cyclic coordinate descent written the obvious way: one group at a time, full sums."""
    u = np.zeros(H)
    history = []
    for _ in range(sweeps):
        for h in range(H):
            ue = np.append(u, 0.0)
            w = t2 * np.exp(ue[gin] - ue[gout])  # gin/gout = -1 reads the appended 0
            incoming = w[(gin == h) & (gout != h)].sum() * np.exp(-u[h])
            outgoing = w[(gout == h) & (gin != h)].sum() * np.exp(u[h])
            if incoming > 0 and outgoing > 0:
                u[h] = 0.5 * np.log(outgoing / incoming)
        history.append(u.copy())
    return history


def direct_objective(t2, gin, gout, u):
    ue = np.append(u, 0.0)
    return float((t2 * np.exp(ue[gin] - ue[gout])).sum())


@pytest.mark.parametrize("model", [mlp([6, 9, 7, 8, 3], seed=31), residual_net()[0], cnn_net()[0],
                                   onnx_pathcond.load_model(str(ROOT / "models" / "shufflenet.dynamo_bn.onnx"))],
                         ids=["mlp", "residual", "cnn", "shufflenet_bn"])  # shufflenet: its layers join one run
def test_layerwise_sweeps_equal_one_group_at_a_time(model):
    problem, H, t2, gin, gout = problem_and_entries(model)
    reference = plain_enorm_sweeps(t2, gin, gout, H, 4)
    result = enorm.coordinate_descent(problem, max_iter=4, tol=0.0)
    assert result.sweeps == 4
    np.testing.assert_allclose(result.u, reference[-1], rtol=1e-12, atol=1e-12)
    assert problem.objective(result.u) == pytest.approx(direct_objective(t2, gin, gout, reference[-1]), rel=1e-12)
    assert result.objective_after == pytest.approx(direct_objective(t2, gin, gout, result.u), rel=1e-12)
    history = [direct_objective(t2, gin, gout, u) for u in reference]
    np.testing.assert_allclose(result.history, history, rtol=1e-10)
    assert all(b <= a * (1 + 1e-12) for a, b in zip(history, history[1:]))


def test_gradient_is_the_derivative_of_the_objective():
    problem, H, t2, gin, gout = problem_and_entries(mlp([5, 7, 6, 3], seed=32))
    u = np.random.default_rng(0).standard_normal(H) * 0.3
    E, grad, curvature = problem.evaluate(u)
    assert E == pytest.approx(direct_objective(t2, gin, gout, u), rel=1e-12)
    step = 1e-6
    for h in range(H):
        e = np.zeros(H)
        e[h] = step
        numeric = (direct_objective(t2, gin, gout, u + e) - direct_objective(t2, gin, gout, u - e)) / (2 * step)
        assert grad[h] == pytest.approx(numeric, rel=1e-6, abs=1e-9)
        e[h] = 1e-4  # a wider step for the second difference (rounding)
        second = (direct_objective(t2, gin, gout, u + e) - 2 * E + direct_objective(t2, gin, gout, u - e)) / 1e-8
        assert curvature[h] * problem.p == pytest.approx(second, rel=1e-5)


def test_coordinate_descent_converges_to_the_exact_minimiser():
    model = mlp([8, 16, 16, 16, 4], seed=33, scale=0.7)
    problem, H, t2, gin, gout = problem_and_entries(model)
    exact = exact_minimiser(problem, max_iter=2000, tol=1e-13)
    cd = enorm.coordinate_descent(problem, max_iter=20000, tol=1e-12)
    assert cd.converged and exact.sweeps > 0
    np.testing.assert_allclose(cd.u, exact.u, atol=1e-7)
    assert cd.objective_after == pytest.approx(exact.objective_after, rel=1e-12)
    # at the minimiser each group's rescaled incoming and outgoing squared norms are equal
    ue = np.append(cd.u, 0.0)
    w = t2 * np.exp(ue[gin] - ue[gout])
    for h in range(H):
        incoming, outgoing = w[(gin == h) & (gout != h)].sum(), w[(gout == h) & (gin != h)].sum()
        assert incoming == pytest.approx(outgoing, rel=1e-8)
    # the defaults (options.ENORM_SOLVERS) run the same to convergence
    _, report = rescale(model, criterion="enorm")
    assert report.solver.converged and report.solver.max_iter == options.ENORM_SOLVERS["cd"].max_iter
    assert report.criterion.F_after == pytest.approx(exact.objective_after, rel=1e-6)  # float32 weights written


def test_dead_neurons_keep_scale_one_and_nothing_is_infinite():
    model = mlp([5, 6, 6, 3], seed=34)
    values = arrays(model)
    w1, b1, w2, b2, w3, _ = [t.name for t in model.graph.initializer]
    values[w1][2], values[b1][2] = 0.0, 0.0  # neuron 2 of layer 1 takes nothing in
    values[w3][:, 4] = 0.0  # neuron 4 of layer 2 gives nothing out
    model = with_values(model, values)
    graph, analysis, groups = analyse_model(model)
    problem = enorm.build(graph, analysis, groups)
    first = analysis.blocks[0].start  # positions of layer 1, then layer 2
    dead = groups.of_position[[first + 2, first + 6 + 4]]
    assert not problem.free[dead].any() and problem.free.sum() == groups.count - 2
    for result in (enorm.coordinate_descent(problem, max_iter=1000, tol=1e-10),
                   exact_minimiser(problem, max_iter=1000, tol=1e-10)):
        assert np.all(np.isfinite(result.u)) and np.all(result.u[dead] == 0.0)
        assert result.converged and np.isfinite(result.objective_after)
    for solver in ("cd", "exact"):
        out, report = rescale(model, criterion="enorm", solver=solver)
        assert all(np.all(np.isfinite(v)) for v in arrays(out).values())
        assert_equivalent(model, out)


def test_half_precision_weights_stay_in_range():
    model = unbalanced_mlp(np.float16, 3e3, 1e-3)
    out, report = rescale(model, criterion="enorm", solver="exact")
    assert report.solver.on_range_bound > 0 and report.solver.converged
    info = np.finfo(np.float16)
    for t, s in zip(model.graph.initializer, out.graph.initializer):
        a, b = numpy_helper.to_array(t).astype(np.float64), numpy_helper.to_array(s).astype(np.float64)
        assert np.all(np.isfinite(b)) and np.all(b[a != 0] != 0)
        assert np.all(np.abs(b[np.abs(a) >= info.smallest_normal]) >= info.smallest_normal)
    assert report.verification.passed
    # F after the guard is the norm of what was written
    assert report.criterion.F_after == pytest.approx(squared_norm(arrays(out), arrays(out)), rel=2e-3)


# ---------------------------------------------------------------------------- every shipped model
@pytest.mark.parametrize("path", MODELS, ids=os.path.basename)
def test_shipped_model_with_enorm_is_equivalent(path):
    before = onnx.load(path)
    b = arrays(before)
    for solver in ("cd", "exact"):
        after, report = rescale(path, criterion="enorm", solver=solver)
        assert report.verification.passed
        assert_equivalent(before, after)
        assert "statistics" not in report.timings
        if report.groups.rescalable == 0:  # nothing to solve: no criterion either (as for pathcond)
            assert not report.rewritten and report.criterion is None
            continue
        assert report.to_dict()["statistics"]["skipped"].startswith("not needed")
        assert report.rewritten and report.solver.converged
        c = report.criterion
        assert c.name == "enorm" and c.F_after < c.F_before
        # the drop in F is the drop in Σθ² over the initializers, read from both files
        a = arrays(after)
        drop = sum(float((b[n] ** 2).sum() - (a[n] ** 2).sum()) for n in b if b[n].dtype.kind == "f")
        assert c.F_before - c.F_after == pytest.approx(drop, rel=1e-4, abs=1e-6 * c.F_before)


# ---------------------------------------------------------------------------- the command line
def test_command_line_criterion_enorm_end_to_end(tmp_path, invoke_cli):
    source = ROOT / "models" / "mlp_unbalanced.onnx"
    out, report_path = tmp_path / "out.onnx", tmp_path / "r.json"
    result = invoke_cli(source, out, "--criterion", "enorm", "--report", report_path)
    assert result.exit_code == 0, result.stderr
    assert "criterion  enorm: F = sum of squared parameters" in result.stdout
    assert "diag(G)    not needed" in result.stdout and "coordinate-descent (enorm)" in result.stdout
    report = json.loads(report_path.read_text())
    assert report["criterion"]["name"] == "enorm" and "squared" in report["criterion"]["objective"]
    assert report["statistics"] == {"skipped": "not needed: the enorm criterion uses the parameter values only"}
    assert "statistics" not in report["timings"] and report["timings"]["norms"] >= 0
    before, after = onnx.load(str(source)), onnx.load(str(out))
    assert_equivalent(before, after)
    # the same weights as the API writes
    api_model, _ = rescale(str(source), criterion="enorm")
    for t, s in zip(api_model.graph.initializer, after.graph.initializer):
        np.testing.assert_array_equal(numpy_helper.to_array(t), numpy_helper.to_array(s))
    # PathCond's own summary names its criterion too
    result = invoke_cli(source, tmp_path / "p.onnx")
    assert result.exit_code == 0 and "coordinate-descent (pathcond)" in result.stdout


def test_statistics_options_are_said_to_have_no_effect():
    _, report = rescale(mlp([6, 8, 3], seed=2), criterion="enorm", backend="onnxruntime")
    assert any("no effect with the enorm criterion" in w for w in report.warnings)
    _, report = rescale(mlp([6, 8, 3], seed=2), criterion="enorm")
    assert not report.warnings


def test_bad_criterion_is_one_error_line_and_writes_nothing(tmp_path, invoke_cli):
    out = tmp_path / "out.onnx"
    result = invoke_cli(ROOT / "models" / "mlp.onnx", out, "--criterion", "l2")
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--criterion" in lines[0], result.stderr
    assert not out.exists() and os.listdir(tmp_path) == []
    with pytest.raises(onnx_pathcond.InputError, match="unknown criterion 'l2'"):
        rescale(str(ROOT / "models" / "mlp.onnx"), criterion="l2")


def test_bn_statistics_is_refused_with_enorm(tmp_path, invoke_cli):
    # ENorm balances stored weights; a BatchNorm input's scale lives in running statistics
    # instead, so the combination has no meaning and is refused before anything is read.
    out = tmp_path / "out.onnx"
    result = invoke_cli(ROOT / "models" / "mlp.onnx", out, "--criterion", "enorm", "--bn-statistics")
    assert result.exit_code == 2 and "--bn-statistics" in result.stderr and len(result.stderr.splitlines()) == 1
    assert not out.exists()
    with pytest.raises(onnx_pathcond.InputError, match="pathcond criterion only"):
        rescale(str(ROOT / "models" / "mlp.onnx"), criterion="enorm", bn_statistics=True)


def test_help_lists_the_criteria_and_enorms_defaults(invoke_cli):
    text = " ".join(invoke_cli("--help").stdout.split())
    assert "--criterion [pathcond|enorm]" in text and "[default: pathcond]" in text
    cd, exact = options.ENORM_SOLVERS["cd"], options.ENORM_SOLVERS["exact"]
    assert f"with --criterion enorm the defaults are {cd.max_iter} sweeps and {exact.max_iter} iterations" in text
    assert f"with --criterion enorm the defaults are cd {cd.tol:.0e}".replace("e-0", "e-") in text


@pytest.mark.parametrize("solver", ["cd", "exact"])
def test_api_and_command_line_take_the_same_enorm_defaults(tmp_path, solver, invoke_cli):
    model_path = tmp_path / "in.onnx"
    onnx.save(mlp([6, 8, 8, 3], seed=1), str(model_path))
    report_path = tmp_path / "r.json"
    result = invoke_cli(model_path, tmp_path / "out.onnx", "--criterion", "enorm", "--solver", solver, "--report",
                  report_path, "-q")
    assert result.exit_code == 0, result.stderr
    from_cli = json.loads(report_path.read_text())["solver"]
    _, report = rescale(str(model_path), criterion="enorm", solver=solver)
    table = options.ENORM_SOLVERS[solver]
    assert (from_cli["max_iter"], from_cli["tol"]) == (report.solver.max_iter, report.solver.tol) == \
        (table.max_iter, table.tol)
    assert criteria.solver_settings(solver, criterion="enorm") == table
    # PathCond's defaults are unchanged by the criterion's table
    assert criteria.solver_settings(solver) == options.SOLVERS[solver]


# ---------------------------------------------------------------------------- each optimises its own objective
def am_gm_of_diag_g(model):
    """AM/GM of diag(G) of a model as it stands (no rescaling: zero sweeps)."""
    _, report = rescale(model, max_iter=0, verify_output=False)
    return report.criterion.am_gm_before


def test_each_criterion_wins_on_its_own_objective():
    source = onnx.load(str(ROOT / "models" / "mlp_unbalanced.onnx"))
    by_pathcond, _ = rescale(source, solver="exact")
    by_enorm, _ = rescale(source, criterion="enorm", solver="exact")
    names = [n for n, v in arrays(source).items() if v.dtype.kind == "f"]
    norm = {k: squared_norm(arrays(m), names) for k, m in
            (("none", source), ("pathcond", by_pathcond), ("enorm", by_enorm))}
    assert norm["enorm"] < norm["none"] and norm["enorm"] < norm["pathcond"]
    am_gm = {k: am_gm_of_diag_g(m) for k, m in (("none", source), ("pathcond", by_pathcond), ("enorm", by_enorm))}
    assert am_gm["pathcond"] < am_gm["none"] and am_gm["pathcond"] < am_gm["enorm"]
