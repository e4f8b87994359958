"""Rescaling keeps half-precision weights within their dtype's range: no non-zero weight
becomes zero or a subnormal, none overflows. The solve keeps each group within bounds that
guarantee it (bounds.py), and the report says how many groups end on one."""

import numpy as np
import pytest
from onnx import numpy_helper

from support.builders import unbalanced_mlp
from support.checks import run
from onnx_pathcond import rescale

pytest.importorskip("onnxruntime")


def _in_range(before, after, dtype):
    info = np.finfo(dtype)
    for t, s in zip(before.graph.initializer, after.graph.initializer):
        a = numpy_helper.to_array(t).astype(np.float64)
        b = numpy_helper.to_array(s).astype(np.float64)
        assert np.all(np.isfinite(b)), t.name
        normal = np.abs(a) >= info.smallest_normal
        assert np.all(np.abs(b[normal]) >= info.smallest_normal), t.name
        assert np.all(b[a != 0] != 0), t.name


def test_float16_weights_stay_normal_and_finite():
    model = unbalanced_mlp(np.float16, 3e3, 1e-3)
    out, report = rescale(model, solver="exact")
    assert report.solver.on_range_bound > 0
    assert report.solver.converged and report.solver.kkt_residual < 1e-6
    default, _ = rescale(model)
    _in_range(model, out, np.float16)
    _in_range(model, default, np.float16)
    assert report.verification.passed
    x = {"x": np.random.default_rng(0).standard_normal((4, 6)).astype(np.float16)}
    a, b = run(model, x)[0].astype(np.float64), run(out, x)[0].astype(np.float64)
    assert np.abs(a - b).max() <= 1e-2 * np.abs(a).max()


def test_ranges_that_hold_change_nothing():
    model = unbalanced_mlp(np.float32, 3e3, 1e-3)
    out, report = rescale(model, solver="exact")
    assert report.solver.bounded == 0 and report.solver.on_range_bound == 0
