"""Models below IR version 4, where the format required every initializer to be listed as a
graph input too (PyTorch's exporter at opset 7-8, the ONNX model zoo's older files). onnxruntime
does not let such initializers be fed, so they are weights like any other: rescaled, with the
same groups as the same network stored at IR version 8. From IR version 4 on, an initializer
also listed as a graph input can be fed, and its channels stay frozen with that reason."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from support.checks import assert_equivalent
from support.nets import Net, cnn, mlp

pytest.importorskip("onnxruntime")

from onnx_pathcond import rescale  # noqa: E402


def _listed_as_inputs(model: onnx.ModelProto, ir_version: int, opset: int) -> onnx.ModelProto:
    """The same network with every initializer also a graph input, at the given IR version."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    m.ir_version = ir_version
    del m.opset_import[:]
    m.opset_import.append(helper.make_opsetid("", opset))
    onnx.checker.check_model(m)
    return m


NETS = {
    "mlp": lambda: mlp([6, 9, 7, 3], seed=1),
    "cnn": lambda: cnn([2, 4, 5], seed=2, size=8),
}


@pytest.mark.parametrize("name", sorted(NETS))
def test_ir3_initializers_listed_as_inputs_are_weights(name):
    model = NETS[name]()
    old = _listed_as_inputs(model, ir_version=3, opset=8)
    out, report = rescale(old)
    _, reference = rescale(model)
    assert report.groups.rescalable == reference.groups.rescalable > 0
    assert report.groups.frozen == reference.groups.frozen
    assert "fixed_weight" not in report.groups.frozen_by_category
    # only values changed: the weights are still listed as inputs, the graph is the same
    assert [i.name for i in out.graph.input] == [i.name for i in old.graph.input]
    assert [n.SerializeToString() for n in out.graph.node] == [n.SerializeToString() for n in old.graph.node]
    changed = [a.name for a, b in zip(old.graph.initializer, out.graph.initializer)
               if not np.array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))]
    assert changed
    assert_equivalent(old, out)


@pytest.mark.parametrize("name", sorted(NETS))
def test_from_ir4_an_initializer_listed_as_input_stays_put(name):
    model = NETS[name]()
    fed = _listed_as_inputs(model, ir_version=4, opset=9)
    out, report = rescale(fed)
    assert report.groups.rescalable == 0
    assert report.groups.frozen_by_category.get("fixed_weight", 0) > 0
    assert any("also a graph input" in row.reason for row in report.frozen)
    for a, b in zip(fed.graph.initializer, out.graph.initializer):
        assert a.SerializeToString() == b.SerializeToString()


def test_no_neuron_found_names_the_first_barrier():
    """A network whose every weight is a real graph input (no initializer): nothing can make a
    neuron, and the warning says why instead of only 'no neuron found'."""
    net = Net([1, 4])
    w = "w_fed"
    net.inputs.append(helper.make_tensor_value_info(w, onnx.TensorProto.FLOAT, [4, 3]))
    y = net.relu(net.node("MatMul", [net.x, w]))
    model = net.model(y)
    _, report = rescale(model, dry_run=True)
    assert report.groups.rescalable == 0
    warning = next(w for w in report.warnings if w.startswith("no rescalable group"))
    assert "no neuron found, the first barrier: MatMul" in warning, warning
