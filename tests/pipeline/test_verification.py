"""The default check never rejects a correct result and always rejects a wrong one.

* Its tolerance follows the precision the model computes in: float16 weights behind float32
  inputs and outputs (what onnxconverter-common's keep_io_types writes) compute in float16.
* Where the model's own rounding noise is above that tolerance, the noise sets it: the input
  model against itself with its weights moved by about one unit in the last place.
* A deliberately wrong rescaling (one side of a neuron scaled, not the other) still fails,
  whatever the precision and the noise.
"""

import numpy as np
import pytest
from onnx import numpy_helper

from support.builders import float16_inside, near_cancelling
from support.nets import Net, cnn, mlp
from onnx_pathcond import VerificationError, rescale, rewrite

pytest.importorskip("onnxruntime")


def test_float16_arithmetic_behind_float32_io_is_checked_at_float16_precision():
    model = float16_inside(cnn([3, 8, 8], seed=2, size=8))
    out, report = rescale(model)
    assert report.verification.precision == "float16" and report.verification.passed
    assert report.verification.max_rel > 1e-5  # what the float32 tolerance refused
    assert report.groups.rescalable > 0


def test_a_model_noisier_than_the_default_tolerance_is_accepted():
    model = near_cancelling()
    out, report = rescale(model)
    v = report.verification
    assert v.passed and v.max_rel > 1e-5
    assert v.rounding_noise is not None and v.rounding_noise > 1e-4 and v.rtol >= v.max_rel


def _wrong_factors(monkeypatch):
    """Scale the incoming side of every neuron by an extra 1.5, not its outgoing side."""
    right = rewrite.element_factors

    def wrong(use, groups, u):
        incoming, outgoing = right(use, groups, u)
        return np.where(np.asarray(use.rows) >= 0, incoming * 1.5, incoming), outgoing

    monkeypatch.setattr(rewrite, "element_factors", wrong)


@pytest.mark.parametrize("build", [lambda: mlp([6, 16, 16, 3], seed=3), lambda: cnn([3, 6, 6], seed=4, size=8),
                                   lambda: float16_inside(cnn([3, 6, 6], seed=4, size=8)), near_cancelling],
                         ids=["mlp", "cnn", "cnn_float16_inside", "near_cancelling"])
def test_a_wrong_rescaling_is_rejected(monkeypatch, build):
    model = build()
    rescale(model)  # the right factors pass
    _wrong_factors(monkeypatch)
    with pytest.raises(VerificationError, match="differs from the input"):
        rescale(model)


def test_the_noise_run_moves_the_weights_only():
    from onnx_pathcond import verify
    from onnx_pathcond.api import analyse_model

    net = Net([1, 2, 3, 3], seed=5, opset=13)
    y = net.relu(net.conv(net.x, 2, 3, 1))
    scales = net.param(None, prefix="scales", value=np.array([1, 1, 2, 2], np.float32))
    y = net.node("Resize", [y, "", scales], mode="nearest")
    model = net.model(net.gemm(net.node("Flatten", [y], axis=1), 3 * 6 * 6, 2))
    _, analysis, _ = analyse_model(model)
    parameters = {u.ref.name for u in analysis.uses if u.ref is not None}
    assert scales not in parameters
    moved = verify._with_rounding_noise(model, seed=0, weights=parameters)
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in moved.graph.initializer}
    assert np.array_equal(before[scales], after[scales])
    assert all(not np.array_equal(before[n], after[n]) for n in parameters if before[n].size > 4)
