"""The reliability fixes, each through the command line as a user meets them: exit code,
summary or report, output written and equivalent under onnxruntime, no traceback."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from support.checks import assert_equivalent, run
from support.nets import Net, cnn, mlp
from support.builders import float16_inside, near_cancelling, unbalanced_mlp, weights

pytest.importorskip("onnxruntime")


@pytest.fixture
def cli_rescale(tmp_path, run_cli):
    """`cli_rescale(model, *options)`: the model saved in tmp_path and run through the command
    line; returns the finished process, the written model and the report (None unless exit 0)."""
    def rescale_through_the_command_line(model, *options):
        src, dst, report = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "report.json"
        onnx.save(model, src)
        before = src.read_bytes()
        proc = run_cli(src, dst, "--report", report, *options)
        assert "Traceback" not in proc.stderr, proc.stderr
        assert src.read_bytes() == before
        written = onnx.load(dst) if proc.returncode == 0 else None
        return proc, written, (json.loads(report.read_text()) if proc.returncode == 0 else None)
    return rescale_through_the_command_line


def test_initializer_fed_as_input_and_weight_returned_as_output(cli_rescale):
    model = mlp([4, 6, 5, 3], seed=2)
    first, third = model.graph.initializer[0], model.graph.initializer[4]
    model.graph.input.append(helper.make_tensor_value_info(first.name, first.data_type, list(first.dims)))
    model.graph.node.append(helper.make_node("Identity", [third.name], ["w_out"]))
    model.graph.output.append(helper.make_tensor_value_info("w_out", third.data_type, list(third.dims)))
    proc, out, report = cli_rescale(model)
    assert proc.returncode == 0, proc.stderr
    before, after = weights(model), weights(out)
    assert np.array_equal(before[first.name], after[first.name]) and np.array_equal(before[third.name], after[third.name])
    reasons = " ".join(row["reason"] for row in report["frozen"])
    assert "graph input" in reasons and "graph output 'w_out'" in reasons


def test_float16_inside_float32_io_is_not_refused(cli_rescale):
    model = float16_inside(cnn([3, 8, 8], seed=2, size=8))
    proc, out, report = cli_rescale(model)
    assert proc.returncode == 0, proc.stderr
    assert report["verification"]["precision"] == "float16" and report["verification"]["passed"]
    assert_equivalent(model, out, rtol=1e-2)


def test_a_model_noisier_than_the_default_is_written(cli_rescale):
    proc, out, report = cli_rescale(near_cancelling())
    assert proc.returncode == 0, proc.stderr
    assert report["verification"]["rounding_noise"] > 1e-4
    assert "rounding noise" in proc.stdout


def test_half_precision_weights_keep_their_range(cli_rescale):
    model = unbalanced_mlp(np.float16, 3e3, 1e-3)
    proc, out, report = cli_rescale(model, "--solver", "exact")
    assert proc.returncode == 0, proc.stderr
    assert report["solver"]["on_range_bound"] > 0
    assert "by a half-precision range" in proc.stdout
    for t, s in zip(model.graph.initializer, out.graph.initializer):
        a, b = numpy_helper.to_array(t).astype(np.float64), numpy_helper.to_array(s).astype(np.float64)
        assert np.all(np.isfinite(b)) and np.all(b[a != 0] != 0)
        normal = np.abs(a) >= np.finfo(np.float16).smallest_normal
        assert np.all(np.abs(b[normal]) >= np.finfo(np.float16).smallest_normal)
    x = {"x": np.random.default_rng(1).standard_normal((3, 6)).astype(np.float16)}
    ya, yb = run(model, x)[0].astype(np.float64), run(out, x)[0].astype(np.float64)
    assert np.abs(ya - yb).max() <= 1e-2 * np.abs(ya).max()


def test_an_op_without_shape_inference_names_itself(cli_rescale):
    net = Net([1, 2, 5, 5], seed=4)
    a = net.relu(net.conv(net.x, 2, 3, 3, pad=1))
    g = net.name("gelu")
    net.nodes.append(helper.make_node("Gelu", [a], [g], domain="com.microsoft", name="the_gelu"))
    y = net.node("Flatten", [net.node("GlobalAveragePool", [g])], axis=1)
    y = net.gemm(y, 3, 2)
    graph = helper.make_graph(net.nodes, "net", net.inputs,
                              [helper.make_tensor_value_info(y, onnx.TensorProto.FLOAT, [1, 2])], initializer=net.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    proc, out, report = cli_rescale(model, "-v")
    assert proc.returncode == 0, proc.stderr
    assert "Gelu 'the_gelu' (domain 'com.microsoft')" in proc.stdout
    assert "--input-shape" not in proc.stdout + proc.stderr
    assert_equivalent(model, out)
