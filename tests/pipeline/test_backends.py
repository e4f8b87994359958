"""The onnxruntime backend gives the numpy backend's diag(G); the exact solver's minimiser."""

import os

import numpy as np
import onnx
import pytest

from support.cases import CASES, MORE_CASES, resize_net
from support.nets import cnn, mlp
from onnx_pathcond import rescale
from onnx_pathcond.api import analyse_model
from onnx_pathcond.criteria.pathcond import ProblemBuilder
from onnx_pathcond.criteria.pathcond import coordinate_descent
from onnx_pathcond.solve import exact_minimiser
from onnx_pathcond.stats import compute_diag_g, diag_g_by_tensor
from support import repo

pytest.importorskip("onnxruntime")


def _resize(mode):
    return resize_net(mode, shape=(1, 2, 3, 4), scales=(1, 1, 2, 1.5), channels=3, seed=31)


SOURCES = {**CASES, **MORE_CASES}
SOURCES.update({"resize_linear": _resize("linear"), "resize_cubic": _resize("cubic")})
SOURCES.update({os.path.basename(p): (lambda p=p: onnx.load(p)) for p in repo.shipped_models()})


def _has_cuda():
    import onnxruntime as ort
    return "CUDAExecutionProvider" in ort.get_available_providers()


def _assert_same_diag_g(name, device):
    graph, analysis, _ = analyse_model(SOURCES[name]())
    ref = diag_g_by_tensor(graph, analysis, backend="numpy")
    got = diag_g_by_tensor(graph, analysis, backend="onnxruntime", device=device)
    assert set(ref) == set(got)
    for key in ref:
        scale = max(np.abs(ref[key]).max(), 1e-300)
        assert np.abs(ref[key] - got[key]).max() <= 1e-10 * scale, key


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_onnxruntime_backend_matches_numpy(name):
    _assert_same_diag_g(name, "cpu")


# Run where onnxruntime-gpu and a GPU are present (the CI machine has neither): the CUDA
# provider's float64 kernels give numpy's diag(G) too.
@pytest.mark.skipif(not _has_cuda(), reason="onnxruntime has no CUDA execution provider here")
@pytest.mark.parametrize("name", sorted(SOURCES))
def test_onnxruntime_cuda_matches_numpy(name):
    _assert_same_diag_g(name, "cuda")


@pytest.mark.skipif(not _has_cuda(), reason="onnxruntime has no CUDA execution provider here")
def test_cuda_run_reports_where_nodes_ran():
    _, report = rescale(onnx.load(repo.model("resnet.dynamo_bn.onnx")), backend="onnxruntime", device="cuda")
    st = report.statistics
    assert st.providers[0] == "CUDAExecutionProvider"
    assert not any("CUDA" in w for w in report.warnings), report.warnings
    placed = st.nodes_by_provider
    if placed:  # onnxruntime >= 1.24
        assert placed.get("CUDAExecutionProvider", 0) > 0
        assert "CUDAExecutionProvider" in report.summary()


def test_nodes_per_provider_are_counted():
    import onnxruntime as ort
    _, report = rescale(onnx.load(repo.model("resnet.dynamo_bn.onnx")), backend="onnxruntime")
    st = report.statistics
    assert set(st.timings) == {"build", "session", "run", "criterion"}
    if not hasattr(ort.InferenceSession, "get_provider_graph_assignment_info"):
        pytest.skip("this onnxruntime does not say which provider runs each node")
    placed = st.nodes_by_provider
    assert list(placed) == ["CPUExecutionProvider"]
    # Every node of the path network that survives onnxruntime's optimisations is counted.
    assert 0 < placed["CPUExecutionProvider"] <= st.nodes
    assert f"CPUExecutionProvider {placed['CPUExecutionProvider']:,} nodes" in report.summary()


def test_backend_and_precision_are_reported():
    _, report = rescale(mlp([4, 6, 2]), backend="onnxruntime")
    assert report.statistics.backend == "onnxruntime"
    assert report.statistics.precision == "float64"
    assert "CPUExecutionProvider" in report.statistics.providers
    _, report = rescale(mlp([4, 6, 2]), backend="numpy")
    assert report.statistics.backend == "numpy"


@pytest.mark.skipif(_has_cuda(), reason="a CUDA provider is present here")
def test_cuda_request_without_cuda_says_so():
    _, report = rescale(mlp([4, 6, 2]), backend="onnxruntime", device="cuda")
    assert report.statistics.providers == ["CPUExecutionProvider"]
    assert any("CUDA" in w and "CPU" in w for w in report.warnings)


def _problem(model):
    graph, analysis, groups = analyse_model(model)
    builder = ProblemBuilder(groups, analysis.uses, analysis.shared)
    compute_diag_g(graph, analysis, builder.add)
    return builder.finish()


@pytest.mark.parametrize("model", [lambda: mlp([30, 60, 40, 5], seed=41), lambda: cnn([3, 8, 8, 4], size=8, seed=42),
                                   lambda: onnx.load(repo.model("resnet.legacy_bn.onnx"))],
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
    assert report.solver.converged and report.solver.method.startswith("exact")
    assert report.verification.passed
    assert report.criterion.am_gm_after <= report.criterion.am_gm_before


def test_auto_backend_choice():
    import onnxruntime as ort
    _, report = rescale(mlp([4, 6, 2]))
    assert report.statistics.backend == "numpy"  # on the CPU, numpy is the faster executor
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        _, report = rescale(mlp([4, 6, 2]), device="cuda")
        assert report.statistics.backend == "numpy"
        assert any("CUDA was asked for" in w for w in report.warnings)


# The form written for CUDA (float64 Conv / ConvTranspose nodes) cannot run on onnxruntime's
# CPU provider, which has no float64 convolution: onnx's reference evaluator runs it here.
@pytest.mark.parametrize("name", sorted(SOURCES))
def test_native_convolution_form_matches_numpy(name):
    from onnx_pathcond.pathnet import ort
    from support.refrun import reference_run

    graph, analysis, _ = analyse_model(SOURCES[name]())
    ref = diag_g_by_tensor(graph, analysis, backend="numpy")
    got, ops = {}, set()

    def collect(stat):
        use, g = stat.use, stat.array()
        key = use.ref.name if use.ref is not None else use.input_name
        stored = use.ref.to_stored(g) if use.ref is not None else g
        got[key] = got[key] + stored if key in got else stored.copy()

    def run(model, names, feeds):
        ops.update(n.op_type for n in model.graph.node)
        return reference_run(model, names, feeds)

    ort.compute_diag_g(graph, analysis, collect, native_conv=True, run=run)
    assert set(ref) == set(got)
    for key in ref:
        scale = max(np.abs(ref[key]).max(), 1e-300)
        assert np.abs(ref[key] - got[key]).max() <= 1e-10 * scale, key
    if any(n.op_type == "Conv" and n.domain in ("", "ai.onnx") for n in graph.nodes) and ref:
        assert "Conv" in ops


@pytest.mark.parametrize("group, strides, dilations, pads", [(1, [2, 1], [1, 2], [1, 0, 0, 1]),
                                                              (2, [1, 2], [2, 1], [0, 0, 0, 0]),
                                                              (3, [2, 2], [1, 1], [0, 1, 1, 0])])
def test_reference_conv_transpose_stand_in_matches_onnxruntime(group, strides, dilations, pads):
    """The test's own grouped ConvTranspose agrees with onnxruntime's (float32)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from support.refrun import reference_run

    rng = np.random.default_rng(5)
    x = rng.random((1, 6, 5, 4)).astype(np.float32)
    w = rng.random((6, 2, 3, 2)).astype(np.float32)
    bias = rng.random(2 * group).astype(np.float32)
    node = helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], group=group, strides=strides,
                            dilations=dilations, pads=pads)
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("x", "w", "b")]
    model = helper.make_model(helper.make_graph([node], "t", io, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]),
                              opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    feeds = {"x": x, "w": w, "b": bias}
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = reference_run(model, None, feeds)[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _pretend_cuda_is_installed(monkeypatch, fails_to_start):
    """onnxruntime lists a CUDA provider; the session either drops it (as onnxruntime does when
    it cannot load CUDA) or raises."""
    import onnxruntime as ort

    real_session = ort.InferenceSession
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])

    def session(data, options=None, providers=None, **kw):
        names = [p[0] if isinstance(p, tuple) else p for p in providers or []]
        if "CUDAExecutionProvider" in names and fails_to_start:
            raise RuntimeError("libcudnn.so.9: cannot open shared object file\nmore detail")
        return real_session(data, options, providers=["CPUExecutionProvider"], **kw)

    monkeypatch.setattr(ort, "InferenceSession", session)


@pytest.mark.skipif(_has_cuda(), reason="a CUDA provider is present here")
@pytest.mark.parametrize("fails_to_start", [False, True], ids=["dropped", "raises"])
def test_cuda_that_does_not_start_falls_back_to_the_cpu_form(monkeypatch, fails_to_start):
    """The CUDA form of the graph (float64 Conv) is written again for the CPU provider."""
    model = onnx.load(repo.model("resnet.dynamo_bn.onnx"))
    graph, analysis, _ = analyse_model(model)
    ref = diag_g_by_tensor(graph, analysis, backend="numpy")
    _pretend_cuda_is_installed(monkeypatch, fails_to_start)
    got = diag_g_by_tensor(graph, analysis, backend="onnxruntime", device="cuda")
    for key in ref:
        assert np.abs(ref[key] - got[key]).max() <= 1e-10 * np.abs(ref[key]).max(), key
    _, report = rescale(model, device="cuda")
    assert report.statistics.backend == "onnxruntime"
    assert report.statistics.providers == ["CPUExecutionProvider"]
    warning = [w for w in report.warnings if "CUDA was asked for" in w]
    assert len(warning) == 1 and "\n" not in warning[0]
    if fails_to_start:
        assert "libcudnn.so.9" in warning[0]
