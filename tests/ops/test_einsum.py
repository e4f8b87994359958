"""Einsum of an activation and a constant 2-D weight that maps one axis is a source and a sink,
whatever its spelling (explicit or implicit output, spaces, ellipsis, either operand order, the
new axis anywhere in the output); any other Einsum is a barrier whose reason quotes the equation.

Each accepted form is checked against the brute-force enumeration of paths, on both backends,
and end to end (rescaled, then the same function under onnxruntime); group counts come from how
the test nets are built. PyTorch modules written with torch.einsum are exported by both
exporters, and their counts come from the modules' layers.
"""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from support.bruteforce import bruteforce_diag_g, unit_graph_forward
from support.checks import assert_equivalent, run
from support.nets import Net
from onnx_pathcond import rescale
from onnx_pathcond.api import analyse_model
from onnx_pathcond.stats import diag_g_by_tensor


# ---------------------------------------------------------------------------- accepted forms
# Each builder returns (model, rescalable groups). The hidden einsum's new index has extent H;
# those H neurons are rescalable because a ReLU follows and another sink reads them; the
# outputs of the last layer reach the graph output and stay frozen.
H = 4


def _einsum(net, x, equation, wshape, weight_first=False, bias_shape=None):
    w = net.param(wshape, scale=0.7)
    y = net.node("Einsum", [w, x] if weight_first else [x, w], equation=equation)
    if bias_shape is not None:
        y = net.node("Add", [y, net.param(bias_shape, prefix="b", scale=0.3)])
    return y


def _two_layers(x_shape, first, second, seed=1, dtype=np.float32):
    """x -> Einsum(first) -> Relu -> Einsum(second) -> output; `first`, `second` are
    (equation, weight shape, dict of options)."""
    net = Net(x_shape, seed=seed, dtype=dtype)
    y = net.relu(_einsum(net, net.x, first[0], first[1], **first[2]))
    return net.model(_einsum(net, y, second[0], second[1], **second[2])), H


def _form(x_shape, eq1, w1, eq2, w2, opts1=None, opts2=None):
    return lambda **kw: _two_layers(x_shape, (eq1, w1, opts1 or {}), (eq2, w2, opts2 or {}), **kw)


def _after_conv():
    net = Net([1, 2, 3, 3], seed=2)
    y = net.relu(net.conv(net.x, 2, 3, 2))  # 3 channels, [1, 3, 2, 2]
    y = net.relu(_einsum(net, y, "nchw,oc->nohw", [H, 3], bias_shape=[H, 1, 1]))
    return net.model(net.conv(y, H, 2, 1)), 3 + H


def _between_gemms():
    net = Net([1, 3], seed=3)
    y = net.relu(net.gemm(net.x, 3, 5))
    y = net.relu(_einsum(net, y, "bi,io->bo", [5, H], bias_shape=[H]))
    return net.model(net.gemm(y, H, 2)), 5 + H


def _constant_weights():
    """Weights as a Constant node read through a Transpose, and as a Constant node itself."""
    net = Net([1, 2, 3], seed=4)
    stored = net.rng.standard_normal((3, H)).astype(np.float32)  # [in, out], transposed in the graph
    w1 = net.node("Transpose", [net.node("Constant", [], value=numpy_helper.from_array(stored, "c1"))], perm=[1, 0])
    y = net.relu(net.node("Einsum", [net.x, w1], equation="bsi,oi->bso"))
    w2 = net.node("Constant", [], value=numpy_helper.from_array(net.rng.standard_normal((H, 2)).astype(np.float32)))
    return net.model(net.node("Einsum", [w2, y], equation="io,bsi->bos")), H


FORMS = {
    "vector": _form([3], "i,oi->o", [H, 3], "i,oi->o", [2, H]),
    "linear": _form([1, 3], "bi,oi->bo", [H, 3], "bi,oi->bo", [2, H], opts1=dict(bias_shape=[H])),
    "sequence": _form([1, 2, 3], "bsd,df->bsf", [3, H], "bsd,df->bsf", [H, 2], opts1=dict(bias_shape=[H])),
    "channel_mixing": _form([1, 3, 2, 2], "nchw,oc->nohw", [H, 3], "nchw,oc->nohw", [2, H],
                            opts1=dict(bias_shape=[H, 1, 1])),
    "ellipsis_last": _form([1, 2, 3], "...i,oi->...o", [H, 3], "...i,oi->...o", [2, H]),
    "ellipsis_middle": _form([1, 3, 2, 2], "nc...,oc->no...", [H, 3], "n c ..., o c -> n ... o", [2, H]),
    "implicit_output": _form([1, 3], "bi,io", [3, H], "bj,kj", [2, H]),
    "spaces": _form([1, 3], " b i , o i -> b o ", [H, 3], "bi, io ->bo", [H, 2]),
    "weight_first": _form([1, 3], "oi,bi->bo", [H, 3], "io,bi->bo", [H, 2],
                          opts1=dict(weight_first=True), opts2=dict(weight_first=True)),
    "channels_last_output": _form([1, 3, 2, 2], "nchw,oc->nhwo", [H, 3], "nhwc,oc->nohw", [2, H]),
    "channels_first_output": _form([1, 3], "bi,oi->ob", [H, 3], "ob,po->bp", [2, H]),
    "after_conv": lambda: _after_conv(),
    "between_gemms": lambda: _between_gemms(),
    "constant_weights": lambda: _constant_weights(),
}


def _tool_diag_g(model, backend="numpy", device="cpu"):
    graph, analysis, _ = analyse_model(model)
    return diag_g_by_tensor(graph, analysis, backend=backend, device=device)


def _einsum_nodes(model):
    return [n for n in model.graph.node if n.op_type == "Einsum"]


def _einsum_weights(model):
    """The stored tensor (initializer or Constant) behind each Einsum's weight, one per node."""
    producer = {o: n for n in model.graph.node for o in n.output}
    stored = {t.name for t in model.graph.initializer}
    found = []
    for node in _einsum_nodes(model):
        for name in node.input:
            while name in producer and producer[name].op_type in ("Transpose", "Cast"):
                name = producer[name].input[0]
            if name in stored or (name in producer and producer[name].op_type == "Constant"):
                found.append(name)
    assert len(found) == len(_einsum_nodes(model))
    return set(found)


@pytest.mark.parametrize("equation, x_shape, w_shape, weight_first", [
    ("bi,oi->bo", [2, 3], [4, 3], False),
    (" n c h w , o c -> n h w o ", [1, 3, 2, 2], [4, 3], False),
    ("...i,io", [2, 2, 3], [3, 4], False),
    ("oi,bi->ob", [2, 3], [4, 3], True),
    ("bi,ij->bij", [2, 3], [3, 2], False),  # forms the tool refuses are still linear maps here
    ("bii,oi->bo", [2, 3, 3], [4, 3], False),
    ("bi,ij->b", [2, 3], [3, 2], False),
])
def test_reference_einsum_edges_reproduce_onnxruntime(equation, x_shape, w_shape, weight_first):
    """The brute force's Einsum edges, run as a linear network, give what onnxruntime computes
    (a check of the reference itself, without onnx_pathcond)."""
    net = Net(x_shape, seed=12)
    model = net.model(_einsum(net, net.x, equation, w_shape, weight_first=weight_first))
    x = np.random.default_rng(13).standard_normal(x_shape).astype(np.float32)
    got = unit_graph_forward(model, {"x": x})[model.graph.output[0].name]
    np.testing.assert_allclose(got, run(model, {"x": x})[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", sorted(FORMS))
def test_diag_g_matches_path_enumeration(form):
    model, _ = FORMS[form]()
    expected = bruteforce_diag_g(model)
    got = _tool_diag_g(model)
    assert _einsum_weights(model) <= set(expected)  # the reference walked through every einsum
    for name, ref in expected.items():
        np.testing.assert_allclose(got[name], ref, rtol=1e-10, atol=1e-12 * max(1.0, np.abs(ref).max()), err_msg=name)
    for name, g in got.items():
        if name not in expected:
            assert not np.any(g), f"{name} has statistics but is on no path"


def _has_cuda():
    import onnxruntime as ort
    return "CUDAExecutionProvider" in ort.get_available_providers()


DEVICES = ["cpu"] + (["cuda"] if _has_cuda() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", sorted(FORMS))
def test_onnxruntime_backend_matches_numpy(form, device):
    model, _ = FORMS[form]()
    ref = _tool_diag_g(model)
    got = _tool_diag_g(model, backend="onnxruntime", device=device)
    assert set(ref) == set(got)
    for name in ref:
        assert np.abs(ref[name] - got[name]).max() <= 1e-10 * max(np.abs(ref[name]).max(), 1e-300), name


@pytest.mark.parametrize("form", sorted(FORMS))
def test_rescaled_model_computes_the_same_function(form):
    model, rescalable = FORMS[form]()
    after, report = rescale(model)
    assert report.groups.rescalable == rescalable
    assert not any(row.category == "barrier" for row in report.frozen), report.frozen
    assert report.verification.passed
    changed = {r.name for r in report.rewritten}
    assert _einsum_weights(model) <= changed
    assert_equivalent(model, after)  # onnxruntime on random inputs, independently of verify.py


def test_command_line_rescales_an_einsum_model(tmp_path, invoke_cli):
    model, _ = FORMS["channel_mixing"]()
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    result = invoke_cli(src, out)
    assert result.exit_code == 0, result.output
    after = onnx.load(str(out))
    before_w = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert any(not np.array_equal(before_w[t.name], numpy_helper.to_array(t)) for t in after.graph.initializer)
    assert_equivalent(model, after)


# ---------------------------------------------------------------------------- channels on another axis
def test_contracting_another_axis_freezes_the_channels_it_mixes():
    """The conv's channels lie on axis 1, the einsum contracts the width: they are frozen (with
    the equation in the reason); the einsum's own outputs are still new neurons."""
    net = Net([1, 2, 3, 4], seed=5)
    y = net.relu(net.conv(net.x, 2, 3, 2))  # [1, 3, 2, 3]
    y = net.relu(_einsum(net, y, "nchw,ow->ncho", [H, 3]))  # new channels on the last axis
    model = net.model(_einsum(net, y, "ncho,po->nchp", [2, H]))
    after, report = rescale(model)
    assert report.groups.rescalable == H
    reasons = [row.reason for row in report.frozen if row.category == "barrier"]
    assert any("nchw,ow->ncho" in r and "axis 3" in r and "axis 1" in r for r in reasons), reasons
    np.testing.assert_allclose(_tool_diag_g(model)[model.graph.node[2].input[1]],
                               bruteforce_diag_g(model)[model.graph.node[2].input[1]], rtol=1e-10)
    assert_equivalent(model, after)


# ---------------------------------------------------------------------------- barriers
def _after_hidden_layer(build):
    """x -> Gemm(3 -> 5) -> Relu -> the einsum `build` makes -> output: the 5 hidden neurons are
    rescalable unless the einsum is a barrier."""
    net = Net([1, 3], seed=6)
    y = net.relu(net.gemm(net.x, 3, 5))
    return net.model(build(net, y))


def _reshaped(net, y, shape):
    return net.node("Reshape", [y, net.const_i64(shape)])


BARRIERS = {
    "three_operands": ("bi,oi,o->bo", "3 operands",
                       lambda net, y: net.node("Einsum", [y, net.param([2, 5]), net.param([2])],
                                               equation="bi,oi,o->bo")),
    "diagonal_single_operand": ("ii->i", "1 operand",
                                lambda net, y: net.node("Einsum", [net.node("Concat", [y] * 5, axis=0)],
                                                        equation="ii->i")),
    "diagonal_activation": ("bii,oi->bo", "diagonal",
                            lambda net, y: net.node("Einsum", [net.node("Concat", [_reshaped(net, y, [1, 1, 5])] * 5,
                                                                        axis=1), net.param([2, 5])],
                                                    equation="bii,oi->bo")),
    "two_activations": ("bi,bj->bij", "two activations",
                        lambda net, y: net.node("Einsum", [y, net.relu(y)], equation="bi,bj->bij")),
    "weight_contracts_two_axes": ("bij,ij->b", "contracts two axes",
                                  lambda net, y: net.node("Einsum", [_reshaped(net, y, [1, 5, 1]), net.param([5, 1])],
                                                          equation="bij,ij->b")),
    "broadcast_product": ("bi,ij->bij", "broadcast product",
                          lambda net, y: net.node("Einsum", [y, net.param([5, 2])], equation="bi,ij->bij")),
    "weight_sums_its_own_index": ("bi,ij->b", "index of its own",
                                  lambda net, y: net.node("Einsum", [y, net.param([5, 2])], equation="bi,ij->b")),
    "activation_axis_summed": ("bsd,df->bf", "sums the activation",
                               lambda net, y: net.node("Einsum", [_reshaped(net, y, [1, 1, 5]), net.param([5, 2])],
                                                       equation="bsd,df->bf")),
    "weight_is_not_a_matrix": ("bi,i->b", "weight of rank 1",
                               lambda net, y: net.node("Einsum", [y, net.param([5])], equation="bi,i->b")),
}


@pytest.mark.parametrize("case", sorted(BARRIERS))
def test_other_einsums_are_barriers_that_quote_the_equation(case):
    equation, fragment, build = BARRIERS[case]
    model = _after_hidden_layer(build)
    after, report = rescale(model)
    assert report.groups.rescalable == 0  # the Gemm's neurons reach the barrier
    reasons = [row.reason for row in report.frozen if row.category == "barrier"]
    assert any(f"(equation '{equation}')" in r and fragment in r for r in reasons), reasons
    assert report.barrier_ops.get("Einsum") == 1
    assert_equivalent(model, after)  # written unchanged where it matters


# ---------------------------------------------------------------------------- dtypes
def _bfloat16(name, values):
    bits = np.asarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")
    return helper.make_tensor(name, TensorProto.BFLOAT16, list(values.shape), rounded.tobytes(), raw=True)


def _cast_weight_net(dtype):
    """float32 activations; weights stored in `dtype` and cast to float32 before each Einsum."""
    net = Net([1, 3, 2, 2], seed=8)
    y = net.x
    layers = [("nchw,oc->nohw", [H, 3]), ("nchw,oc->nhwo", [5, H]), ("nhwc,co->nohw", [5, 2])]
    for k, (eq, shape) in enumerate(layers):
        w = net.rng.standard_normal(shape) * 0.7
        stored = _bfloat16(f"w{k}", w) if dtype == "bfloat16" else numpy_helper.from_array(w.astype(dtype), f"w{k}")
        net.inits.append(stored)
        y = net.node("Einsum", [y, net.node("Cast", [f"w{k}"], to=TensorProto.FLOAT)], equation=eq)
        if k < 2:
            y = net.relu(y)
    return net.model(y), H + 5


def _same_outputs(before, after, dtype, rtol):
    rng = np.random.default_rng(9)
    vi = before.graph.input[0]
    shape = [d.dim_value or 3 for d in vi.type.tensor_type.shape.dim]
    feeds = {vi.name: rng.standard_normal(shape).astype(dtype)}
    for a, b in zip(run(before, feeds), run(after, feeds)):
        a, b = a.astype(np.float64), b.astype(np.float64)
        assert np.abs(a - b).max() <= rtol * np.abs(a).max()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_weights_in_other_dtypes_are_rescaled_in_their_dtype(dtype):
    model, rescalable = _cast_weight_net(dtype)
    after, report = rescale(model, rtol=3e-2)
    assert report.groups.rescalable == rescalable
    stored = {t.name: t.data_type for t in model.graph.initializer}
    assert {t.name: t.data_type for t in after.graph.initializer} == stored
    assert {r.name for r in report.rewritten} == {"w0", "w1", "w2"}
    _same_outputs(model, after, np.float32, 3e-2 if dtype != "float64" else 1e-5)


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_whole_model_in_another_float_type(dtype):
    model, rescalable = FORMS["channels_last_output"](dtype=dtype)
    assert model.graph.initializer[0].data_type == helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    after, report = rescale(model, rtol=3e-2)
    assert report.groups.rescalable == rescalable and report.verification.passed
    assert report.rewritten
    _same_outputs(model, after, dtype, 3e-2 if dtype == np.float16 else 1e-9)


# ---------------------------------------------------------------------------- PyTorch exports
def _torch_modules():
    torch = pytest.importorskip("torch")
    from torch import nn

    class EinsumLinear(nn.Module):
        """A layer written with torch.einsum: `equation` reads x and a [fout, fin] weight
        ([fin, fout] when not `out_first`), plus an optional bias of `bias_shape`."""

        def __init__(self, fin, fout, equation, out_first=True, bias_shape=None):
            super().__init__()
            self.equation, self.out_features = equation, fout
            shape = (fout, fin) if out_first else (fin, fout)
            self.weight = nn.Parameter(torch.randn(*shape) / fin ** 0.5)
            self.bias = nn.Parameter(torch.randn(*bias_shape) * 0.1) if bias_shape else None

        def forward(self, x):
            y = torch.einsum(self.equation, x, self.weight)
            return y if self.bias is None else y + self.bias

    torch.manual_seed(0)
    # [B, 4, 6]: two layers on the last axis of a sequence, then Flatten and a layer on [B, 20]
    mlp = nn.Sequential(EinsumLinear(6, 8, "bsd,df->bsf", out_first=False, bias_shape=(8,)), nn.ReLU(),
                        EinsumLinear(8, 5, "...i,oi->...o"), nn.ReLU(), nn.Flatten(),
                        EinsumLinear(20, 3, "bi,oi->bo", bias_shape=(3,)))
    # [B, 3, 6, 6]: a convolution, a 1×1 mixing of its channels, then two layers whose
    # channels go last and come back
    convnet = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                            EinsumLinear(4, 6, "nchw,oc->nohw", bias_shape=(6, 1, 1)), nn.ReLU(), nn.MaxPool2d(2),
                            EinsumLinear(6, 5, "nchw,oc->nhwo"), nn.ReLU(),
                            EinsumLinear(5, 2, "nhwc,oc->nohw"))
    return torch, {"mlp": (mlp.eval(), (1, 4, 6)), "convnet": (convnet.eval(), (1, 3, 6, 6))}


def _expected_groups(module):
    """Neurons of the module's layers that a ReLU follows: out_channels of a Conv2d,
    out_features of an einsum layer. The last layer's outputs are the model's outputs."""
    from torch import nn
    layers = list(module)
    total = 0
    for layer, following in zip(layers, layers[1:]):
        if isinstance(following, nn.ReLU):
            total += layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
    return total


def _export(torch, module, shape, dynamo, dynamic):
    import contextlib
    import io
    import warnings

    x = torch.randn(*shape)
    buf = io.BytesIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if dynamo:
            extra = dict(dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},)) if dynamic else {}
            program = torch.onnx.export(module, (x,), dynamo=True, input_names=["x"], output_names=["y"], **extra)
            return program.model_proto
        extra = dict(dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}) if dynamic else {}
        torch.onnx.export(module, (x,), buf, dynamo=False, opset_version=17, input_names=["x"], output_names=["y"],
                          **extra)
    return onnx.load_from_string(buf.getvalue())


EXPORTS = [("legacy", False, False), ("legacy_dynamic_batch", False, True), ("dynamo", True, False),
           ("dynamo_dynamic_batch", True, True)]


@pytest.mark.slow
@pytest.mark.parametrize("exporter", [e[0] for e in EXPORTS])
@pytest.mark.parametrize("name", ["mlp", "convnet"])
def test_torch_einsum_modules_from_both_exporters(name, exporter):
    torch, modules = _torch_modules()
    module, shape = modules[name]
    _, dynamo, dynamic = next(e for e in EXPORTS if e[0] == exporter)
    model = _export(torch, module, shape, dynamo, dynamic)
    layers = [m for m in module if hasattr(m, "equation")]
    written = _einsum_nodes(model)  # both exporters keep torch.einsum as an Einsum node
    assert len(written) == len(layers), [n.op_type for n in model.graph.node]
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.HasField("dim_param") == dynamic
    after, report = rescale(model)
    assert report.groups.rescalable == _expected_groups(module)
    assert not any(row.category == "barrier" for row in report.frozen), report.frozen
    assert report.verification.passed
    assert_equivalent(model, after)  # a batch of 3 where the batch is dynamic
    with torch.no_grad():  # and the rescaled model still computes the module's function
        x = np.random.default_rng(4).standard_normal((3 if dynamic else 1,) + shape[1:]).astype(np.float32)
        expected = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run(after, {"x": x})[0], expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())

