"""The default check never rejects a correct result and always rejects a wrong one.

* Its tolerance follows the precision the model computes in: float16 weights behind float32
  inputs and outputs (what onnxconverter-common's keep_io_types writes) compute in float16.
* Where the model's own rounding noise is above that tolerance, the noise sets it: the input
  model against itself with its weights moved by about one unit in the last place.
* A deliberately wrong rescaling (one side of a neuron scaled, not the other) still fails,
  whatever the precision and the noise.
"""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from nets import Net, cnn, mlp
from onnx_pathcond import VerificationError, rescale, rewrite

pytest.importorskip("onnxruntime")


def _float16_inside(model32):
    """The float32 model with float16 weights and arithmetic, float32 at its inputs and
    outputs (a Cast after the input and before each output)."""
    model = onnx.ModelProto.FromString(model32.SerializeToString())
    for t in model.graph.initializer:
        if t.data_type == TensorProto.FLOAT:
            t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t).astype(np.float16), t.name))
    x = model.graph.input[0].name
    for node in model.graph.node:
        node.input[:] = ["x16" if i == x else i for i in node.input]
    outputs = [o.name for o in model.graph.output]
    for node in model.graph.node:
        node.output[:] = [o + "_16" if o in outputs else o for o in node.output]
    for node in model.graph.node:
        node.input[:] = [i + "_16" if i in outputs else i for i in node.input]
    casts = [helper.make_node("Cast", [x], ["x16"], to=TensorProto.FLOAT16)]
    casts += [helper.make_node("Cast", [o + "_16"], [o], to=TensorProto.FLOAT) for o in outputs]
    nodes = [casts[0]] + list(model.graph.node) + casts[1:]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.graph.value_info[:]
    onnx.checker.check_model(model)
    return model


def _near_cancelling(seed=1, closeness=1e-3):
    """y = Σ relu(a_i·x + 50) − relu(b_i·x + 50) with rows b_i within `closeness` of a_i: the
    output is a small difference of large terms, so its rounding noise is far above 1e-5."""
    rng = np.random.default_rng(seed)
    net = Net([1, 8], seed=seed)
    w1 = rng.standard_normal((16, 8)).astype(np.float32)
    w1[8:] = w1[:8] * (1 + closeness * rng.standard_normal((8, 8))).astype(np.float32)
    h = net.relu(net.node("Gemm", [net.x, net.param(None, value=w1), net.param(None, value=np.full(16, 50.0, np.float32))],
                          transB=1))
    w2 = np.concatenate([np.ones(8), -np.ones(8)]).astype(np.float32)[None]
    return net.model(net.node("Gemm", [h, net.param(None, value=w2)], transB=1))


def test_float16_arithmetic_behind_float32_io_is_checked_at_float16_precision():
    model = _float16_inside(cnn([3, 8, 8], seed=2, size=8))
    out, report = rescale(model)
    assert report.verification.precision == "float16" and report.verification.passed
    assert report.verification.max_rel > 1e-5  # what the float32 tolerance refused
    assert report.groups["rescalable"] > 0


def test_a_model_noisier_than_the_default_tolerance_is_accepted():
    model = _near_cancelling()
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
                                   lambda: _float16_inside(cnn([3, 6, 6], seed=4, size=8)), _near_cancelling],
                         ids=["mlp", "cnn", "cnn_float16_inside", "near_cancelling"])
def test_a_wrong_rescaling_is_rejected(monkeypatch, build):
    model = build()
    rescale(model)  # the right factors pass
    _wrong_factors(monkeypatch)
    with pytest.raises(VerificationError, match="differs from the input"):
        rescale(model)
