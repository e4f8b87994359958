"""The command line's save path: rescaled weights computed one tensor at a time as they are
written (`rescale_file(IN, OUT)`), checked against the in-memory path
(rewrite the ModelProto, then serialize it with protobuf's own writer)."""

import os
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from support.checks import assert_equivalent
from support.nets import cnn, mlp
from onnx_pathcond import protoio, rescale, rescale_file
from onnx_pathcond.errors import InputError
from support import repo


@pytest.mark.parametrize("path", [repo.model("mlp.onnx"), repo.model("resnet.dynamo_bn.onnx"), repo.model("helper_mlp.onnx"),
                                  repo.model("unet.legacy_bn.onnx")], ids=os.path.basename)
def test_streamed_file_is_the_serialized_rescaled_model(tmp_path, path):
    in_memory, report_a = rescale(path)
    report_b = rescale_file(path, tmp_path / "out.onnx")
    assert (tmp_path / "out.onnx").read_bytes() == in_memory.SerializeToString()
    assert report_b.rewritten == report_a.rewritten and report_b.rewritten
    assert report_b.verification.passed
    assert not [p for p in os.listdir(tmp_path) if p != "out.onnx"]


def _with_typed_fields(model):
    """Store the first initializer in float_data and add a Constant-node weight (raw)."""
    first = model.graph.initializer[0]
    values = numpy_helper.to_array(first)
    typed = helper.make_tensor(first.name, TensorProto.FLOAT, values.shape, values.ravel().tolist())
    first.CopyFrom(typed)
    return model


def test_streamed_save_keeps_storage_styles(tmp_path):
    model = _with_typed_fields(mlp([6, 8, 5, 3], seed=3))
    src = tmp_path / "in.onnx"
    onnx.save(model, src)
    in_memory, _ = rescale(str(src))
    rescale_file(str(src), tmp_path / "out.onnx")
    written = onnx.load(tmp_path / "out.onnx")
    assert written.SerializeToString() == in_memory.SerializeToString()
    assert len(written.graph.initializer[0].float_data) > 0 and not written.graph.initializer[0].raw_data
    assert_equivalent(model, written)


def _external_copy(model, folder, name="ext.onnx"):
    """The model saved with every tensor, Constant-node attributes included, as external data."""
    path = os.path.join(folder, name)
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
              location=name + ".data", size_threshold=0, convert_attribute=True)
    return path


@pytest.mark.parametrize("make", [lambda: onnx.load(repo.model("helper_mlp.onnx")),
                                  lambda: cnn([3, 6, 5], size=8, seed=4)])
def test_streamed_save_keeps_external_data_external(tmp_path, make):
    src = _external_copy(make(), str(tmp_path))
    before = (open(src, "rb").read(), open(src + ".data", "rb").read())
    out_a, out_b = tmp_path / "a" / "out.onnx", tmp_path / "b" / "out.onnx"
    out_a.parent.mkdir()
    out_b.parent.mkdir()
    in_memory, _ = rescale(src, output=out_a)
    rescale_file(src, out_b)
    assert (out_a.parent / "out.onnx.data").read_bytes() == (out_b.parent / "out.onnx.data").read_bytes()
    assert out_a.read_bytes() == out_b.read_bytes()
    skeleton = onnx.load(str(out_b), load_external_data=False)
    stored = list(skeleton.graph.initializer) + [a.t for n in skeleton.graph.node for a in n.attribute if a.t.name]
    constants = [a.t for n in skeleton.graph.node if n.op_type == "Constant" for a in n.attribute if a.t.dims]
    assert len(constants) == sum(n.op_type == "Constant" for n in make().graph.node)
    assert stored and all(t.data_location == TensorProto.EXTERNAL for t in stored if t.dims)
    for t in stored:  # every tensor points inside the data file, one after the other
        info = {e.key: e.value for e in t.external_data}
        assert info["location"] == "out.onnx.data"
    loaded = onnx.load(str(out_b))
    expected = {t.name: numpy_helper.to_array(t) for t in in_memory.graph.initializer}
    for t in loaded.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(t), expected[t.name])
    assert_equivalent(onnx.load(src), loaded)
    assert (open(src, "rb").read(), open(src + ".data", "rb").read()) == before  # input untouched


def test_writer_rejects_new_values_of_another_size(tmp_path):
    model = mlp([4, 5, 2], seed=1)
    name = model.graph.initializer[0].name
    with open(tmp_path / "m.onnx", "wb") as f, pytest.raises(ValueError, match=name):
        protoio.write_model(model, f, new_raw={name: lambda: np.zeros(3, np.float32)})


@pytest.mark.parametrize("streamed", [False, True])
def test_output_over_the_inputs_data_file_is_refused(tmp_path, streamed):
    src = _external_copy(mlp([6, 8, 3], seed=2), str(tmp_path), name="in.onnx")
    os.rename(src + ".data", tmp_path / "out.onnx.data")  # the input now reads OUT's data file
    model = onnx.load(src, load_external_data=False)
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = "out.onnx.data"
    onnx.save(model, src)
    before = (open(src, "rb").read(), (tmp_path / "out.onnx.data").read_bytes())
    with pytest.raises(InputError, match="out.onnx.data"):
        (rescale_file if streamed else rescale)(src, tmp_path / "out.onnx")
    assert (open(src, "rb").read(), (tmp_path / "out.onnx.data").read_bytes()) == before
    assert sorted(os.listdir(tmp_path)) == ["in.onnx", "out.onnx.data"]


def test_time_computing_rescaled_values_counts_as_rewrite_not_save(tmp_path, monkeypatch):
    # The writer computes each rescaled tensor as it reaches it: that time is the rewrite's.
    # Each computation is made to last 0.1 s, far longer than writing this small model.
    from onnx_pathcond import rewrite

    real = rewrite._Chunks.__iter__  # what computes the new values, block by block

    def slow(self):
        time.sleep(0.1)
        yield from real(self)

    monkeypatch.setattr(rewrite._Chunks, "__iter__", slow)
    report = rescale_file(repo.model("mlp.onnx"), tmp_path / "out.onnx", verify_output=False)
    computed = 0.1 * len(report.rewritten)
    assert len(report.rewritten) == 5
    assert report.timings["rewrite"] >= computed
    assert 0 <= report.timings["save"] < computed / 2


def test_save_model_writes_external_data_for_the_tensors_named(tmp_path):
    from onnx_pathcond import external_tensors, load_model, save_model

    src = _external_copy(mlp([6, 8, 3], seed=5), str(tmp_path), name="in.onnx")
    names = external_tensors(src)
    assert names == {t.name for t in onnx.load(src, load_external_data=False).graph.initializer}
    model = load_model(src)
    save_model(model, tmp_path / "inline.onnx")
    save_model(model, tmp_path / "kept.onnx", external=names)
    assert sorted(os.listdir(tmp_path)) == ["in.onnx", "in.onnx.data", "inline.onnx", "kept.onnx", "kept.onnx.data"]
    inline = onnx.load(str(tmp_path / "inline.onnx"), load_external_data=False)
    kept = onnx.load(str(tmp_path / "kept.onnx"), load_external_data=False)
    assert all(t.data_location == TensorProto.DEFAULT for t in inline.graph.initializer)
    assert all(t.data_location == TensorProto.EXTERNAL for t in kept.graph.initializer)
    assert onnx.load(str(tmp_path / "kept.onnx")) == inline == model
