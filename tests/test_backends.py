"""The onnxruntime backend gives the numpy backend's diag(G); the exact solver's minimiser."""

import glob
import os

import numpy as np
import onnx
import pytest

from nets import cnn, mlp
from onnx_pathcond import rescale
from onnx_pathcond.api import analyse_model
from onnx_pathcond.criteria.pathcond import ProblemBuilder
from onnx_pathcond.solve import coordinate_descent, exact_minimiser
from onnx_pathcond.stats import compute_diag_g, diag_g_by_tensor
from test_diag_g import CASES, _resize_net

pytest.importorskip("onnxruntime")


def _resize(mode):
    return _resize_net(mode, shape=(1, 2, 3, 4), scales=(1, 1, 2, 1.5), channels=3, seed=31)


SOURCES = {name: build for name, build in CASES.items()}
SOURCES.update({"resize_linear": _resize("linear"), "resize_cubic": _resize("cubic")})
SOURCES.update({os.path.basename(p): (lambda p=p: onnx.load(p)) for p in sorted(glob.glob("models/*.onnx"))})


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_onnxruntime_backend_matches_numpy(name):
    graph, analysis, _ = analyse_model(SOURCES[name]())
    ref = diag_g_by_tensor(graph, analysis, backend="numpy")
    got = diag_g_by_tensor(graph, analysis, backend="onnxruntime")
    assert set(ref) == set(got)
    for key in ref:
        scale = max(np.abs(ref[key]).max(), 1e-300)
        assert np.abs(ref[key] - got[key]).max() <= 1e-10 * scale, key


def test_backend_and_precision_are_reported():
    _, report = rescale(mlp([4, 6, 2]), backend="onnxruntime")
    assert report.statistics["backend"] == "onnxruntime"
    assert report.statistics["precision"] == "float64"
    assert "CPUExecutionProvider" in report.statistics["providers"]
    _, report = rescale(mlp([4, 6, 2]), backend="numpy")
    assert report.statistics["backend"] == "numpy"


def test_cuda_request_without_cuda_says_so():
    import onnxruntime as ort
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("a CUDA provider is present here")
    _, report = rescale(mlp([4, 6, 2]), backend="onnxruntime", device="cuda")
    assert report.statistics["providers"] == ["CPUExecutionProvider"]
    assert any("CUDA" in w and "CPU" in w for w in report.warnings)


def _problem(model):
    graph, analysis, groups = analyse_model(model)
    builder = ProblemBuilder(groups, analysis.uses, analysis.shared)
    compute_diag_g(graph, analysis, builder.add)
    return builder.finish()


@pytest.mark.parametrize("model", [lambda: mlp([30, 60, 40, 5], seed=41), lambda: cnn([3, 8, 8, 4], size=8, seed=42),
                                   lambda: onnx.load("models/resnet.legacy_bn.onnx")],
                         ids=["mlp", "cnn", "resnet_bn"])
def test_exact_solver_reaches_the_minimiser(model):
    problem = _problem(model())
    exact = exact_minimiser(problem, max_iter=500, tol=1e-8)
    start = np.abs(problem.gradient(np.zeros(problem.H))).max()
    assert exact.converged and np.abs(problem.gradient(exact.u)).max() < 1e-8 * start
    long_cd = coordinate_descent(problem, max_iter=20000, tol=1e-10)
    # The same minimum: F equal (u may differ along directions F ignores).
    assert exact.objective_after <= long_cd.objective_after + 1e-9 * abs(long_cd.objective_after)
    assert exact.objective_after == pytest.approx(long_cd.objective_after, rel=1e-10)
    values = [exact.objective_before] + exact.history
    assert all(b <= a for a, b in zip(values, values[1:]))
    # It goes past the 10-sweep default.
    assert exact.objective_after <= coordinate_descent(problem).objective_after


def test_exact_solver_end_to_end_is_equivalent():
    before = mlp([10, 40, 40, 4], seed=43, scale=3.0)
    after, report = rescale(before, solver="exact", max_iter=300, tol=1e-6)
    assert report.solver["converged"] and report.solver["method"].startswith("exact")
    assert report.verification["passed"]
    assert report.criterion["am_gm_after"] <= report.criterion["am_gm_before"]


def test_auto_backend_choice():
    import onnxruntime as ort
    _, report = rescale(mlp([4, 6, 2]))
    assert report.statistics["backend"] == "numpy"  # on the CPU, numpy is the faster executor
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        _, report = rescale(mlp([4, 6, 2]), device="cuda")
        assert report.statistics["backend"] == "numpy"
        assert any("CUDA was asked for" in w for w in report.warnings)
