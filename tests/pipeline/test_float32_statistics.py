"""The float32 walk of the path network (docs/design.md §2.6): its g is within the bound it
reports of the exact one (brute-force path enumeration, and the float64 walk), it has the same
zero entries, its range guard sends what it cannot bound to float64, and a solve on its g is
kept only when proven no worse than no rescaling."""

import glob
import json
import math
import os

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from support import repo
from support.bruteforce import bruteforce_diag_g
from support.cases import CASES
from support.checks import assert_equivalent
from support.nets import cnn, mlp
from onnx_pathcond import rescale
from onnx_pathcond.api import analyse_model
from onnx_pathcond.criteria import get as criterion
from onnx_pathcond.modelfile import ModelFile
from onnx_pathcond.pathnet.precision import PrecisionLost, RangeGuard, relative_bound
from onnx_pathcond.plan import RescalingPlan
from onnx_pathcond.solve import SolveResult
from onnx_pathcond.stats import compute_diag_g, float32_suits

MODELS = sorted(glob.glob(repo.path("models", "*.onnx")))


def g_by_tensor(model, precision):
    """(g per stored tensor summed over its uses in float64, the runtime record)."""
    graph, analysis, _ = analyse_model(model)
    out = {}

    def collect(stat):
        use = stat.use
        key = use.ref.name if use.ref is not None else use.input_name
        g = stat.array()
        g = use.ref.to_stored(g) if use.ref is not None else g
        out[key] = out[key] + g if key in out else np.array(g, dtype=np.float64)

    runtime = compute_diag_g(graph, analysis, collect, precision=precision)
    return out, runtime


def assert_within(got, exact, delta, what):
    exact = np.asarray(exact, dtype=np.float64)
    assert np.array_equal(got > 0, exact > 0), f"{what}: the zero entries differ"
    # δ bounds the float32 walk; 1e-12 leaves room for the float64 reference's own rounding
    err = np.abs(got - exact)
    assert np.all(err <= (delta + 1e-12) * exact + 1e-300), \
        f"{what}: off by {float((err / np.where(exact > 0, exact, 1)).max()):.3g} relative, bound {delta:.3g}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_float32_g_is_within_its_bound_of_path_enumeration(case):
    model = CASES[case]()
    expected = bruteforce_diag_g(model)
    got, runtime = g_by_tensor(model, "float32")
    assert runtime.precision == "float32" and 0 < runtime.relative_error < 1e-3
    for name, ref in expected.items():
        assert_within(got[name], ref, runtime.relative_error, name)
    assert all(not np.any(g) for name, g in got.items() if name not in expected)


@pytest.mark.parametrize("path", MODELS, ids=os.path.basename)
def test_float32_g_is_within_its_bound_of_the_float64_walk(path):
    model = onnx.load(path)
    exact, runtime64 = g_by_tensor(model, "float64")
    assert runtime64.precision == "float64" and runtime64.relative_error == 0
    try:
        got, runtime = g_by_tensor(model, "float32")
    except PrecisionLost:
        pytest.skip("this model's range is outside float32's (the float64 fallback is tested below)")
    assert set(got) == set(exact)
    measured = 0.0
    for name in exact:
        assert_within(got[name], exact[name], runtime.relative_error, name)
        positive = exact[name] > 0
        if positive.any():
            measured = max(measured, float((np.abs(got[name] - exact[name])[positive] / exact[name][positive]).max()))
    assert measured <= runtime.relative_error


def test_the_bound_is_the_depth_times_the_unit_roundoff():
    assert relative_bound(0) == 0
    assert relative_bound(1000) == pytest.approx(1000 * 2.0 ** -24, rel=1e-4)
    assert relative_bound(2 ** 24) == math.inf


# ------------------------------------------------------------------ the range guard
def test_the_guard_refuses_subnormal_nan_infinite_and_underflowing_products():
    guard = RangeGuard()
    guard.array(np.array([0.0, 1e-20, 3.0], np.float32), "mass")  # zeros are exact; 1e-20 is normal
    assert guard.smallest["mass"] == pytest.approx(1e-20, rel=1e-6)
    with pytest.raises(PrecisionLost, match="mass .* times adjoint"):
        guard.array(np.array([1e-19], np.float32), "adjoint")  # 1e-20 · 1e-19 < 1.2e-38
    with pytest.raises(PrecisionLost, match="normal range"):
        RangeGuard().array(np.array([1e-40], np.float32), "square")  # subnormal itself
    with pytest.raises(PrecisionLost, match="NaN"):
        RangeGuard().array(np.array([1.0, np.nan], np.float32), "mass")
    with pytest.raises(PrecisionLost, match="inf"):
        RangeGuard().result(np.array([1.0, np.inf], np.float32))
    with pytest.raises(PrecisionLost, match="factors multiply"):
        RangeGuard().product(np.array([[1e-20]], np.float32), np.array([[1e-20]], np.float32))
    # kinds never multiplied together do not constrain each other: two small masses are fine
    guard = RangeGuard()
    guard.array(np.array([1e-30], np.float32), "mass")
    guard.array(np.array([1e-30], np.float32), "mass")
    guard.array(np.array([1e-7], np.float32), "adjoint")  # 1e-30 · 1e-7 = 1e-37: normal


def tiny_weights_mlp():
    """An MLP whose second layer's weights are about 1e-25: their squares (1e-50) are far
    below float32's range, and so is every g its paths give the first layer."""
    model = mlp([6, 8, 8, 3], seed=12)
    w = model.graph.initializer[2]
    value = numpy_helper.to_array(w) * np.float32(1e-25)
    w.CopyFrom(numpy_helper.from_array(value.astype(np.float32), w.name))
    return model


def test_a_model_beyond_float32s_range_is_computed_in_float64():
    model = tiny_weights_mlp()
    with pytest.raises(PrecisionLost):
        g_by_tensor(model, "float32")
    after, report = rescale(model)
    assert report.statistics.precision == "float64"
    assert "range" in report.statistics.float64_because
    reference, reference_report = rescale(model, precision="float64")
    assert reference_report.statistics.float64_because == ""
    assert report.criterion.F_after == reference_report.criterion.F_after  # the same float64 solve
    for a, b in zip(after.graph.initializer, reference.graph.initializer):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
    assert report.verification.passed
    assert_equivalent(model, after)


def test_float64_weights_keep_the_float64_walk():
    model = mlp([5, 7, 3], seed=13, dtype=np.float64)
    graph, analysis, _ = analyse_model(model)
    assert not float32_suits(graph, analysis)
    _, report = rescale(model)
    assert report.statistics.precision == "float64" and report.statistics.float64_because == ""


# ------------------------------------------------------------------ the certificate
def _result(u, before, after):
    return SolveResult(u, "cd", 1, 0.0, True, before, after)


def test_the_certificate_adds_the_bounds_whole_effect_on_F():
    rule = criterion("pathcond")

    class Problem:
        p = 1000

    slack = 1000 * (math.log1p(1e-4) - math.log1p(-1e-4))  # ≈ 0.2
    u = np.array([0.5])
    assert rule.certified(Problem, _result(u, 10.0, 10.0 - 1.01 * slack), 1e-4)
    assert not rule.certified(Problem, _result(u, 10.0, 10.0 - 0.99 * slack), 1e-4)
    assert rule.certified(Problem, _result(np.zeros(1), 10.0, 10.0), 1e-4)  # no rescaling
    assert not rule.certified(Problem, _result(u, 10.0, -1e9), 1.0)  # a void bound proves nothing
    assert not criterion("enorm").certified(Problem, _result(u, 10.0, 0.0), 0.0)


def test_a_solve_near_its_optimum_is_redone_in_float64_and_the_plan_remembers():
    model = cnn(channels=[3, 8, 8, 4], seed=14, size=8)
    first, report = rescale(model, solver="exact")
    assert report.statistics.precision == "float32"  # far from the optimum: proven at once
    # The rescaled model is at the criterion's minimum (up to the solver's tolerance): what a
    # second solve can gain is below what the float32 bound can vouch for.
    plan = RescalingPlan(ModelFile(first))
    again = plan.solve(solver="exact")
    assert again.runtime.precision == "float64"
    assert "could not prove" in again.runtime.float64_because
    assert again.result.objective_after <= again.result.objective_before
    assert plan.float32_declined
    later = plan.solve()
    assert later.runtime.precision == "float64" and "earlier solve" in later.runtime.float64_because
    exact = RescalingPlan(ModelFile(first)).solve(solver="exact", precision="float64")
    np.testing.assert_array_equal(again.u, exact.u)  # the fallback is the float64 solve itself


def test_float32_statistics_give_an_equivalent_model_and_a_nearly_equal_solution():
    model = cnn(channels=[3, 16, 16, 8], seed=15, size=12)
    after32, report32 = rescale(model)
    after64, report64 = rescale(model, precision="float64")
    assert report32.statistics.precision == "float32" and report64.statistics.precision == "float64"
    assert report32.verification.passed
    assert_equivalent(model, after32)
    # F of the float32 solution on the exact problem: within the certificate of F's optimum
    p = report64.criterion.entries
    delta = report32.statistics.relative_error
    assert report32.criterion.F_after <= report32.criterion.F_before
    assert abs(report32.criterion.F_before - report64.criterion.F_before) <= p * 2.01 * delta


def test_the_command_line_reports_the_precision_and_its_bound(tmp_path):
    from click.testing import CliRunner

    from onnx_pathcond.cli import main

    src = MODELS[0]
    for flag, precision in (([], "float32"), (["--precision", "float64"], "float64")):
        out, rep = tmp_path / f"{precision}.onnx", tmp_path / f"{precision}.json"
        result = CliRunner().invoke(main, [str(src), str(out), "--report", str(rep), "-v"] + flag)
        assert result.exit_code == 0, result.output
        statistics = json.loads(rep.read_text())["statistics"]
        assert statistics["precision"] == precision
        assert ("relative_error_bound" in statistics) == (precision == "float32")
        assert f"; {precision}" in result.output
    result = CliRunner().invoke(main, [str(src), str(tmp_path / "x.onnx"), "--precision", "float16"])
    assert result.exit_code == 2 and "float16" in result.output


def test_the_criterion_takes_float32_entries_in_float64_sums():
    from onnx_pathcond.criteria.cells import _sum_of_logs

    rng = np.random.default_rng(16)
    values = (10.0 ** rng.uniform(-30, 30, 100_003)).astype(np.float32)  # products of four leave float32
    expected = float(np.log(values.astype(np.float64)).sum())
    got = _sum_of_logs(values, float(values.min()), float(values.max()), chunk=1 << 12)
    assert got == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_the_smallest_magnitude_read_through_the_bits_is_the_masked_minimum(dtype):
    from onnx_pathcond.pathnet.precision import smallest_magnitude

    rng = np.random.default_rng(17)
    for trial in range(30):
        values = (rng.standard_normal(rng.integers(1, 300)) * 10.0 ** rng.uniform(-6, 3)).astype(dtype)
        values[rng.random(values.size) < 0.3] = 0
        if trial % 5 == 0:
            values[:] = 0
        if trial % 7 == 1:
            values[0] = -np.finfo(dtype).tiny / 4  # a subnormal, negative
        nonzero = np.abs(values[values != 0]).astype(np.float64)
        expected = float(nonzero.min()) if nonzero.size else math.inf
        assert smallest_magnitude(values) == expected
        assert smallest_magnitude(values[::2]) == (float(np.abs(values[::2][values[::2] != 0]).min())
                                                   if np.any(values[::2]) else math.inf)


def test_a_weight_with_exact_zeros_is_checked_through_its_smallest_magnitude():
    model = mlp([6, 8, 8, 3], seed=18)
    w = model.graph.initializer[2]
    value = numpy_helper.to_array(w).copy()
    value[0, :3] = 0  # exact zeros: g of their paths is still exact
    w.CopyFrom(numpy_helper.from_array(value, w.name))
    got, runtime = g_by_tensor(model, "float32")
    exact, _ = g_by_tensor(model, "float64")
    for name in exact:
        assert_within(got[name], exact[name], runtime.relative_error, name)
    value[0, 3] = 1e-24  # its square underflows to zero in float32: refused
    w.CopyFrom(numpy_helper.from_array(value, w.name))
    with pytest.raises(PrecisionLost, match="square"):
        g_by_tensor(model, "float32")


def test_float64_values_given_to_a_plan_keep_the_float64_walk():
    model = mlp([5, 7, 3], seed=19)
    plan = RescalingPlan(ModelFile(model))
    assert plan.solve().runtime.precision == "float32"
    name = plan.parameters[0]
    plan.update({name: np.asarray(plan.value(name), dtype=np.float64)})
    assert plan.solve().runtime.precision == "float64"
