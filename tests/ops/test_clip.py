"""Clip with min 0 and no max is a ReLU (and with no bound an identity): rescaled, and still
the same function. Any other Clip is a barrier with its reason."""

import json

import pytest

from support.cases import CASES
from support.checks import assert_equivalent
from support.nets import Net
from onnx_pathcond import rescale


def _clip_mlp(low=0.0, high=None, opset=13):
    net = Net([1, 3], seed=17, opset=opset)
    y = net.gemm(net.x, 3, 5)
    if opset < 11:  # min and max as attributes
        bounds = {} if low is None else {"min": low}
        if high is not None:
            bounds["max"] = high
        y = net.node("Clip", [y], **bounds)
    else:
        inputs = [y, "" if low is None else net.param([], prefix="min", value=low)]
        if high is not None:
            inputs.append(net.param([], prefix="max", value=high))
        y = net.node("Clip", inputs)
    return net.model(net.gemm(y, 5, 2))


@pytest.mark.parametrize("low", [0.0, None])
@pytest.mark.parametrize("opset", [10, 13])
def test_clip_at_zero_or_unbounded_is_rescaled_and_equivalent(opset, low):
    model = _clip_mlp(low=low, opset=opset)
    after, report = rescale(model)
    assert report.groups.rescalable == 5  # the hidden features; the outputs stay frozen
    assert report.verification.passed
    assert_equivalent(model, after)  # onnxruntime on random inputs, independently of verify.py


def test_clip_case_runs_through_the_pipeline():
    model = CASES["clip_min_zero"]()
    after, report = rescale(model)
    assert report.groups.rescalable == 4  # the conv's channels (the Gemm's outputs are graph outputs)
    assert_equivalent(model, after)


@pytest.mark.parametrize("low,high,why", [
    (0.0, 6.0, "has a maximum"),  # ReLU6
    (0.5, None, "has a minimum other than 0"),
])
@pytest.mark.parametrize("opset", [10, 13])
def test_other_clips_are_barriers_with_a_reason(low, high, why, opset):
    model = _clip_mlp(low=low, high=high, opset=opset)
    after, report = rescale(model)
    assert report.groups.rescalable == 0
    assert why in json.dumps(report.to_dict())
    assert_equivalent(model, after)  # written unchanged
