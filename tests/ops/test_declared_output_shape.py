"""A graph output declared with a shape the runtime does not compute must not decide the shape
that the nodes reading it see.

The model is the part that mattered of what tests/support/randmodels.py once generated for seed 4492
(test_shapes.py pinned that seed; the generator has changed since, so the model is written out
here): a MaxPool in ceil_mode whose last window would start in the padding, a ConvTranspose, and
its Relu, which is a graph output declared with the shape onnx's inference gives (8×8: onnx keeps
the pool's extra window) and is read by a Conv. onnxruntime computes 6×8.
"""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from support.checks import assert_equivalent, run

pytest.importorskip("onnxruntime")


def _model():
    rng = np.random.default_rng(4492)

    def weight(name, shape):
        return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32),
                                       name)

    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["conv0"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv0"], ["relu0"]),
        helper.make_node("MaxPool", ["relu0"], ["pool"], kernel_shape=[2, 3], strides=[2, 2], pads=[1, 1, 1, 1],
                         ceil_mode=1),
        helper.make_node("ConvTranspose", ["pool", "w1", "b1"], ["convt"], kernel_shape=[2, 3], strides=[2, 2],
                         auto_pad="SAME_UPPER"),
        helper.make_node("Relu", ["convt"], ["relu1"]),
        helper.make_node("Conv", ["relu1", "w2", "b2"], ["conv2"], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["conv2"], ["relu2"]),
        helper.make_node("GlobalAveragePool", ["relu2"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w3", "b3"], ["y"], transB=1),
    ]
    inits = [weight("w0", [4, 1, 3, 3]), weight("b0", [4]), weight("w1", [4, 2, 2, 3]), weight("b1", [2]),
             weight("w2", [7, 2, 3, 3]), weight("b2", [7]), weight("w3", [3, 7]), weight("b3", [3])]
    graph = helper.make_graph(nodes, "declared_output", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                      [1, 1, 5, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("relu1", TensorProto.FLOAT, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    known = {vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
    for out in model.graph.output:  # declared as onnx's inference has them, as the generator did
        out.type.CopyFrom(known[out.name].type)
    onnx.checker.check_model(model, full_check=True)
    return model


def test_a_declared_output_shape_that_the_runtime_does_not_compute_is_ignored(tmp_path, run_cli):
    model = _model()
    declared = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output}
    computed = run(model, {"x": np.zeros([1, 1, 5, 6], np.float32)})[1].shape
    assert declared["relu1"] == [1, 2, 8, 8] and list(computed) == [1, 2, 6, 8]  # the case this is about
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    proc = run_cli(src, dst, "-q")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    after = onnx.load(dst)
    changed = [t.name for t, u in zip(model.graph.initializer, after.graph.initializer)
               if t.SerializeToString() != u.SerializeToString()]
    assert changed  # the convolutions' channels are rescaled, not frozen
    assert_equivalent(model, after)
