"""Quantized (QDQ) models, and weights computed by nodes the constant folding cannot run:
their channels are frozen with a reason, never a crash or an evaluator's message."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

DQ_REASON = "is computed by DequantizeLinear (a quantized model): its values cannot be rescaled"


def qdq_cnn(opset: int = 13) -> onnx.ModelProto:
    """Conv-ReLU-Conv as a QDQ export writes it: int8 weights (per channel for the first
    conv) and an int32 bias behind DequantizeLinear, activations quantized and dequantized."""
    rng = np.random.default_rng(0)

    def t(name, array):
        return numpy_helper.from_array(array, name)

    inits = [
        t("w1_q", rng.integers(-100, 100, (4, 3, 3, 3)).astype(np.int8)),
        t("w1_s", np.array([0.01, 0.02, 0.015, 0.01], np.float32)), t("w1_z", np.zeros(4, np.int8)),
        t("b1_q", rng.integers(-1000, 1000, 4).astype(np.int32)), t("b1_s", np.array(0.0005, np.float32)),
        t("w2_q", rng.integers(-100, 100, (2, 4, 1, 1)).astype(np.int8)), t("w2_s", np.array(0.02, np.float32)),
        t("w2_z", np.array(0, np.int8)),
        t("x_s", np.array(0.05, np.float32)), t("x_z", np.array(128, np.uint8)),
        t("h_s", np.array(0.05, np.float32)), t("h_z", np.array(0, np.uint8)),
    ]
    node = helper.make_node
    nodes = [
        node("QuantizeLinear", ["x", "x_s", "x_z"], ["xq"], name="q_x"),
        node("DequantizeLinear", ["xq", "x_s", "x_z"], ["xd"], name="dq_x"),
        node("DequantizeLinear", ["w1_q", "w1_s", "w1_z"], ["w1"], name="dq_w1", axis=0),
        node("DequantizeLinear", ["b1_q", "b1_s"], ["b1"], name="dq_b1"),
        node("Conv", ["xd", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        node("Relu", ["c1"], ["r1"], name="relu1"),
        node("QuantizeLinear", ["r1", "h_s", "h_z"], ["hq"], name="q_h"),
        node("DequantizeLinear", ["hq", "h_s", "h_z"], ["hd"], name="dq_h"),
        node("DequantizeLinear", ["w2_q", "w2_s", "w2_z"], ["w2"], name="dq_w2"),
        node("Conv", ["hd", "w2"], ["y"], name="conv2"),
    ]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def test_qdq_model_runs_and_keeps_its_function(tmp_path, run_cli):
    source, out, report = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(qdq_cnn(), str(source))
    before = source.read_bytes()
    proc = run_cli(source, out, "--report", report)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "evaluate" not in proc.stdout + proc.stderr
    assert source.read_bytes() == before
    frozen = json.loads(report.read_text())["frozen"]
    assert any(row["reason"] == f"weight 'w1' {DQ_REASON}" for row in frozen), frozen
    assert any(row["reason"] == f"weight 'w2' {DQ_REASON}" for row in frozen), frozen
    feeds = {"x": np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    run = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds)[0] for p in (source, out)]
    np.testing.assert_array_equal(run[0], run[1])
    a, b = onnx.load(str(source)), onnx.load(str(out))
    assert [t.SerializeToString() for t in a.graph.initializer] == [t.SerializeToString() for t in b.graph.initializer]


def test_dequantized_values_are_folded_like_onnxruntime():
    from onnx_pathcond.graph import Graph

    model = qdq_cnn()
    graph = Graph(model)
    w1 = graph.constant_value("w1")
    q = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w1_q")).astype(np.float32)
    np.testing.assert_allclose(w1, q * np.array([0.01, 0.02, 0.015, 0.01], np.float32).reshape(4, 1, 1, 1))
    assert w1.dtype == np.float32


def test_weight_computed_by_a_node_that_cannot_be_evaluated(monkeypatch):
    # As if the folding could not run DequantizeLinear (an op or a type it does not know):
    # the Conv reading the weight is cut with that reason, and the run needs no value of it.
    from onnx_pathcond import rescale
    from onnx_pathcond import constants
    from onnx_pathcond.errors import ModelError

    def cannot(graph, node):
        raise ModelError(f"cannot evaluate constant node '{node.name}': No implementation for operator")

    monkeypatch.setattr(constants, "_dequantize", cannot)
    monkeypatch.setattr(constants, "_evaluate_node", cannot)
    model = qdq_cnn()
    _, report = rescale(model)
    reasons = [row.reason for row in report.frozen]
    assert "parameter 'w1' of Conv 'conv1' is computed by DequantizeLinear 'dq_w1', which cannot be evaluated " \
           "here: its values cannot be rescaled" in reasons, reasons
    assert not any("No implementation" in r for r in reasons + report.warnings)
    assert report.verification.passed
