"""Weights left in their file: the command line's path reads a weight-free skeleton of the
model and each large weight when it is needed (`protoio.read_skeleton`, `FileWeights`)."""

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from support.checks import assert_equivalent
from support.nets import Net, cnn, mlp
from onnx_pathcond import protoio, rescale, rescale_file
from onnx_pathcond.modelfile import ModelFile
from onnx_pathcond.errors import InputError, ModelError
from support import repo

SHIPPED = repo.shipped_models()
FLOATS = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16)


def _expected_in_file(model, min_elements):
    """Independently of the reader: the initializers it should leave in the file."""
    return {t.name for t in model.graph.initializer
            if t.HasField("raw_data") and t.data_type in FLOATS and int(np.prod(t.dims)) > min_elements}


@pytest.mark.parametrize("path", SHIPPED, ids=os.path.basename)
@pytest.mark.parametrize("min_elements", [0, 4096])
def test_skeleton_plus_file_weights_is_the_model(path, min_elements):
    eager = onnx.load(path)
    skeleton, weights = protoio.read_skeleton(path, min_elements)
    assert set(weights.raw) == set(weights.message) == _expected_in_file(eager, min_elements)
    by_name = {t.name: t for t in eager.graph.initializer}
    for t in skeleton.graph.initializer:
        if t.name not in weights:
            assert t == by_name[t.name]
            continue
        assert not t.HasField("raw_data") and list(t.dims) == list(by_name[t.name].dims)
        expected = numpy_helper.to_array(by_name[t.name])
        got = weights.array(t)
        assert got.dtype == expected.dtype and got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)
        whole = TensorProto.FromString(weights.read_message(t.name))
        assert whole == by_name[t.name]
        t.raw_data = weights.read(t.name)
    # With the raw data put back, it is the model that onnx.load reads.
    assert skeleton == eager


def _bfloat16_tensor(name, values):
    bits = np.asarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")
    return helper.make_tensor(name, TensorProto.BFLOAT16, list(values.shape), rounded.tobytes(), raw=True)


def _wide_mlp(dtype):
    """A 3-layer MLP with 120x120 weights (past the skeleton threshold) of the given dtype."""
    net = Net([1, 120], seed=7, dtype=np.float32)
    x = net.x
    for k in range(3):
        w = net.rng.standard_normal((120, 120)) * 0.1
        if dtype == "bfloat16":
            net.inits.append(_bfloat16_tensor(f"w{k}", w))
        else:
            net.inits.append(numpy_helper.from_array(w.astype(dtype), f"w{k}"))
        x = net.node("Gemm", [x, net.node("Cast", [f"w{k}"], to=TensorProto.FLOAT)], transB=1)
        if k < 2:
            x = net.relu(x)
    return net.model(x)


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_streamed_run_from_the_file_matches_the_in_memory_run(tmp_path, dtype):
    src = tmp_path / "in.onnx"
    onnx.save(_wide_mlp(dtype), src)
    snapshot = src.read_bytes()
    assert set(ModelFile.read(str(src), lazy=True).weights.raw) == {"w0", "w1", "w2"}
    in_memory, report_a = rescale(str(src), rtol=3e-2)
    report_b = rescale_file(str(src), tmp_path / "out.onnx", rtol=3e-2)
    assert report_b.verification.passed
    assert (tmp_path / "out.onnx").read_bytes() == in_memory.SerializeToString()
    assert report_b.rewritten == report_a.rewritten and len(report_b.rewritten) == 3
    assert src.read_bytes() == snapshot


def test_external_data_is_not_read_into_memory(tmp_path):
    model = cnn([3, 40, 40, 6], size=8, seed=8)
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    src = os.path.join(tmp_path, "ext.onnx")
    onnx.save(onnx.ModelProto.FromString(model.SerializeToString()), src, save_as_external_data=True,
              all_tensors_to_one_file=True, location="ext.onnx.data", size_threshold=0)
    source = ModelFile.read(src, lazy=True)
    large = [t for t in source.proto.graph.initializer if int(np.prod(t.dims)) > 1000]
    assert large
    for t in source.proto.graph.initializer:  # every initializer still points to the data file
        assert t.data_location == TensorProto.EXTERNAL and not t.HasField("raw_data") and source.in_file(t.name)
        np.testing.assert_array_equal(source.initializer_value(t), values[t.name])
    out_a, out_b = tmp_path / "a" / "out.onnx", tmp_path / "b" / "out.onnx"
    out_a.parent.mkdir()
    out_b.parent.mkdir()
    rescale(src, output=out_a)  # the in-memory path
    rescale_file(src, out_b)
    assert out_a.read_bytes() == out_b.read_bytes()
    assert (out_a.parent / "out.onnx.data").read_bytes() == (out_b.parent / "out.onnx.data").read_bytes()
    assert_equivalent(model, onnx.load(str(out_b)))


def _external_with(tmp_path, location=None, offset=None, length=None, drop_file=False):
    model = mlp([80, 80, 4], seed=9)
    src = os.path.join(tmp_path, "m.onnx")
    onnx.save(model, src, save_as_external_data=True, all_tensors_to_one_file=True, location="m.data",
              size_threshold=0)
    loaded = onnx.load(src, load_external_data=False)
    entry = {e.key: e for e in loaded.graph.initializer[0].external_data}
    if location is not None:
        entry["location"].value = location
    if offset is not None:
        entry["offset"].value = str(offset)
    if length is not None:
        entry["length"].value = str(length)
    onnx.save(loaded, src)
    if drop_file:
        os.remove(os.path.join(tmp_path, "m.data"))
    return src


@pytest.mark.parametrize("change, fragment", [
    (dict(location="../m.data"), "outside"),
    (dict(location="/etc/passwd"), "outside"),
    (dict(length=10 ** 9), "past the end"),
    (dict(drop_file=True), "does not exist"),
], ids=["parent", "absolute", "too-long", "missing-file"])
def test_bad_external_data_is_an_input_error(tmp_path, change, fragment):
    src = _external_with(tmp_path, **change)
    with pytest.raises(InputError, match=fragment):
        ModelFile.read(src, lazy=True)


def test_weight_of_the_wrong_size_is_a_model_error(tmp_path):
    src = _external_with(tmp_path, length=80 * 80 * 4 - 4)  # one float short
    with pytest.raises(ModelError, match="needs"):
        rescale_file(src, tmp_path / "out.onnx")
    assert not os.path.exists(tmp_path / "out.onnx")


@pytest.mark.parametrize("streamed", [False, True])
def test_inline_weight_of_the_wrong_size_is_a_model_error(tmp_path, streamed):
    model = mlp([80, 80, 4], seed=1)
    model.graph.initializer[0].raw_data = model.graph.initializer[0].raw_data[:-4]
    onnx.save(model, tmp_path / "bad.onnx")
    with pytest.raises(ModelError, match=model.graph.initializer[0].name):
        (rescale_file if streamed else rescale)(str(tmp_path / "bad.onnx"), tmp_path / "out.onnx")
    assert not os.path.exists(tmp_path / "out.onnx")


def test_skeleton_is_small(tmp_path):
    """The skeleton of a model holds its graph, not its weights."""
    src = tmp_path / "wide.onnx"
    onnx.save(_wide_mlp("float32"), src)
    skeleton, weights = protoio.read_skeleton(str(src), 4096)
    stored = sum(s.length for s in weights.raw.values())
    assert stored == 3 * 120 * 120 * 4
    assert skeleton.ByteSize() < os.path.getsize(src) - stored + 64
