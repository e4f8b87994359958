"""Models whose batch is fixed at 2 or more, or given as such with --input-shape.

Samples go through a network independently, so the path network fed with N samples of ones
sums N equal copies: diag(G) at batch N is exactly N times diag(G) at batch 1 (the same
network built for one sample). That is checked for the numpy executor, and the onnxruntime
executor (both of its convolution forms) must agree with numpy at batch N. End to end, such
models are rescaled and stay equivalent under onnxruntime, including a PyTorch export made
with a batch-3 example input (its Flatten becomes a Reshape to a fixed [3, F]).
"""


import numpy as np
import onnx
import pytest

from support.checks import assert_equivalent
from support.nets import Net, cnn, mlp
from onnx_pathcond import rescale
from onnx_pathcond.api import analyse_model
from onnx_pathcond.stats import diag_g_by_tensor

pytest.importorskip("onnxruntime")


def _convt_gap_reshape(batch):
    """ConvTranspose (grouped), a grouped Conv, a global pool and a Reshape whose target holds
    the batch as a constant, then a Gemm."""
    net = Net([batch, 2, 5, 5], seed=3)
    y = net.relu(net.conv_transpose(net.x, 2, 4, 3, stride=2, pad=1, group=2))
    y = net.relu(net.conv(y, 4, 4, 3, pad=1, group=2))
    y = net.node("GlobalAveragePool", [y])
    y = net.node("Reshape", [y, net.const_i64([batch, 4])])
    return net.model(net.gemm(y, 4, 2))


def _residual_bn_transpose(batch):
    """BatchNorm, a residual Add, strided and 1×1 convolutions, an average pool with padding,
    then channels moved last by a Transpose and read by a MatMul."""
    net = Net([batch, 3, 6, 6], seed=5)
    a = net.relu(net.bn(net.conv(net.x, 3, 4, 3, pad=1, stride=2), 4))
    b = net.relu(net.bn(net.conv(a, 4, 4, 1, bias=False), 4))
    y = net.node("Add", [a, b])
    y = net.node("AveragePool", [y], kernel_shape=[2, 2], strides=[1, 1], pads=[1, 1, 0, 0])
    y = net.node("Transpose", [y], perm=[0, 2, 3, 1])
    return net.model(net.matmul(y, 4, 3))


def _conv1d(batch):
    net = Net([batch, 2, 9], seed=6)
    y = net.relu(net.conv(net.x, 2, 3, 3, nd=1, pad=1, dilation=2))
    y = net.node("MaxPool", [y], kernel_shape=[2], strides=[2])
    y = net.node("Flatten", [y], axis=1)
    return net.model(net.gemm(y, 3 * 3, 2))


BUILDERS = {
    "cnn_max": lambda b: cnn([2, 3, 4], batch=b, size=8),
    "cnn_avg": lambda b: cnn([2, 3, 4], batch=b, size=8, pool="avg"),
    "mlp": lambda b: mlp([4, 5, 3], batch=b),
    "mlp_matmul": lambda b: mlp([4, 6, 3], batch=b, kind="matmul"),
    "convt_gap_reshape": _convt_gap_reshape,
    "residual_bn_transpose": _residual_bn_transpose,
    "conv1d": _conv1d,
}


def _diag_g(model, backend="numpy"):
    graph, analysis, _ = analyse_model(model)
    return diag_g_by_tensor(graph, analysis, backend=backend)


def _assert_close(got, expected):
    assert set(got) == set(expected) and expected
    for key, ref in expected.items():
        scale = max(np.abs(ref).max(), 1e-300)
        assert np.abs(got[key] - ref).max() <= 1e-10 * scale, key


@pytest.mark.parametrize("batch", [2, 3])
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_diag_g_at_batch_n_is_n_times_batch_one(name, batch):
    one = _diag_g(BUILDERS[name](1))
    many = _diag_g(BUILDERS[name](batch))
    _assert_close(many, {k: batch * v for k, v in one.items()})


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_onnxruntime_agrees_with_numpy_at_batch_n(name):
    model = BUILDERS[name](3)
    _assert_close(_diag_g(model, "onnxruntime"), _diag_g(model))


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_native_convolution_form_at_batch_n(name):
    from onnx_pathcond.pathnet import ort
    from support.refrun import reference_run

    model = BUILDERS[name](2)
    graph, analysis, _ = analyse_model(model)
    got = {}

    def collect(stat):
        use, g = stat.use, stat.array()
        key = use.ref.name if use.ref is not None else use.input_name
        g = use.ref.to_stored(g) if use.ref is not None else g
        got[key] = got[key] + g if key in got else g.copy()

    ort.compute_diag_g(graph, analysis, collect, native_conv=True, run=reference_run)
    _assert_close(got, _diag_g(model))


@pytest.mark.parametrize("batch", [2, 4])
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_fixed_batch_models_rescale_and_stay_equivalent(name, batch):
    model = BUILDERS[name](batch)
    out, report = rescale(model)
    assert report.groups.rescalable > 0
    assert report.verification.passed
    assert_equivalent(model, out)


def _dynamic_batch(model):
    model = onnx.ModelProto.FromString(model.SerializeToString())
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    for out in model.graph.output:
        dims = out.type.tensor_type.shape.dim
        if dims:
            dims[0].dim_param = "N"
    return model


def test_dynamic_batch_given_as_two_on_the_command_line(tmp_path, run_cli):
    model = _dynamic_batch(cnn([2, 3, 4], batch=1, size=8))
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    proc = run_cli(src, dst, "--input-shape", "x:2x2x8x8")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert_equivalent(model, onnx.load(dst))


def test_pytorch_export_with_a_fixed_example_batch(tmp_path, run_cli):
    torch = pytest.importorskip("torch")
    from torch import nn

    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                           nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5)).eval()
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    torch.onnx.export(module, (torch.randn(3, 3, 8, 8),), str(src), dynamo=False)  # batch fixed at 3
    model = onnx.load(src)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 3
    proc = run_cli(src, dst)
    assert proc.returncode == 0, proc.stderr
    out = onnx.load(dst)
    assert_equivalent(model, out)
    changed = [t.name for t, u in zip(model.graph.initializer, out.graph.initializer)
               if not np.array_equal(onnx.numpy_helper.to_array(t), onnx.numpy_helper.to_array(u))]
    assert changed  # the hidden channels were really rescaled
