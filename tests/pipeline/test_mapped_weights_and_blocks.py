"""The paths that keep big models fast, each against an independent computation: weights mapped from
their file, the check's mapped sessions, the rewrite's blocks, the squares' reused block and
the extremes of a factored dense block."""

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_pathcond import protoio, rewrite, verify
from onnx_pathcond.criteria.cells import Block
from onnx_pathcond.pathnet import numpy_executor


def _mlp(path, external: bool, seed=0, widths=(70, 90, 5)):
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for k, (fin, fout) in enumerate(zip(widths[:-1], widths[1:])):
        inits += [numpy_helper.from_array(rng.standard_normal((fout, fin)).astype(np.float32), f"w{k}"),
                  numpy_helper.from_array(rng.standard_normal(fout).astype(np.float32), f"b{k}")]
        nodes.append(helper.make_node("Gemm", [x, f"w{k}", f"b{k}"], [f"h{k}"], transB=1))
        x = f"h{k}"
        if k < len(widths) - 2:
            nodes.append(helper.make_node("Relu", [x], [f"r{k}"]))
            x = f"r{k}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, widths[0]])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [2, widths[-1]])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    kept = onnx.ModelProto()
    kept.CopyFrom(model)  # onnx.save with external data empties the tensors it is given
    if external:
        onnx.save(model, path, save_as_external_data=True, location=os.path.basename(path) + ".data",
                  size_threshold=0)
    else:
        onnx.save(model, path)
    return kept


@pytest.mark.parametrize("external", [False, True])
def test_mapped_weights_are_the_stored_values_read_only(tmp_path, external):
    path = str(tmp_path / "m.onnx")
    model = _mlp(path, external)
    skeleton, weights = protoio.read_skeleton(path, min_elements=100)
    protoio.add_external_sources(skeleton, str(tmp_path), weights)
    assert weights.raw  # some weights stay in the file
    for tensor in skeleton.graph.initializer:
        if tensor.name not in weights:
            continue
        value = weights.array(tensor)
        expected = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == tensor.name))
        assert value.shape == expected.shape and value.dtype == expected.dtype
        assert np.array_equal(value, expected)
        assert not value.flags.writeable
        with pytest.raises(ValueError):
            value[...] = 0


@pytest.mark.parametrize("external", [False, True])
def test_a_mapped_session_computes_what_onnxruntime_computes_from_the_file(tmp_path, external):
    ort = pytest.importorskip("onnxruntime")
    path = str(tmp_path / "m.onnx")
    _mlp(path, external, seed=3)
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 70)).astype(np.float32)}
    mapped = verify.mapped_model(path)
    assert mapped is not None
    # the serialized graph holds references only: the weights are not in it
    assert len(mapped[0]) < os.path.getsize(path) + (os.path.getsize(path + ".data") if external else 0)
    got, engine = verify._run(path, feeds)
    assert engine == "onnxruntime"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.add_session_config_entry("session.disable_prepacking", "1")
    plain = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"]).run(None, feeds)
    assert all(np.array_equal(a, b) for a, b in zip(got, plain))
    # and, to float32 rounding, the float64 product of the weights read by onnx
    m = onnx.load(path)
    w = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in m.graph.initializer}
    h = np.maximum(feeds["x"] @ w["w0"].T + w["b0"], 0) @ w["w1"].T + w["b1"]
    assert np.abs(got[0] - h).max() <= 1e-5 * np.abs(h).max()


def test_a_broken_file_still_gets_onnxruntime_s_error(tmp_path):
    path = str(tmp_path / "m.onnx")
    _mlp(path, external=True)
    os.truncate(path + ".data", 100)
    with pytest.raises(Exception):
        verify._run(path, {"x": np.zeros((2, 70), np.float32)})


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
@pytest.mark.parametrize("offset", [0.0, 1e-3])
def test_rewrite_blocks_equal_the_float64_product(monkeypatch, dtype, offset):
    monkeypatch.setattr(rewrite, "_CHUNK", 1000)  # many float64 blocks
    monkeypatch.setattr(rewrite, "_OUT_BLOCK", 4096 * np.dtype(dtype).itemsize)  # several staged blocks
    rng = np.random.default_rng(7)
    w = rng.standard_normal((301, 17, 3)).astype(dtype)
    incoming = np.exp(rng.standard_normal((301, 1, 1)) * 0.3)
    outgoing = np.exp(rng.standard_normal((1, 17, 1)) * 0.3)
    factor = np.broadcast_to(incoming, w.shape) * np.broadcast_to(outgoing, w.shape)
    # (w + offset)·factor − offset, in the form that gives w back exactly where factor is 1
    expected = w.astype(np.float64) * factor + offset * (factor - 1.0) if offset else w.astype(np.float64) * factor
    chunks = rewrite._Chunks(w, incoming, outgoing, offset)
    blocks = [b.copy() for b in chunks]  # each block is valid until the next is asked for
    assert len(blocks) > 1
    assert np.array_equal(np.concatenate(blocks), expected.astype(dtype).reshape(-1))
    summary = chunks.summary()
    assert summary.min_factor == factor.min() and summary.max_factor == factor.max()
    assert summary.max_abs == float(np.abs(expected).max().astype(dtype))
    whole = rewrite.rescaled(w, incoming, outgoing, offset)
    assert np.array_equal(whole.values, expected.astype(dtype))


@pytest.mark.parametrize("w_left", [False, True])
@pytest.mark.parametrize("transposed", [False, True])
def test_squares_in_a_reused_block_equal_the_direct_product(monkeypatch, w_left, transposed):
    monkeypatch.setattr(numpy_executor, "_SQUARE_CHUNK", 50)  # blocks of a few rows
    rng = np.random.default_rng(2)
    w = rng.standard_normal((37, 23)).astype(np.float32)
    m = np.square(w.astype(np.float64))
    m = m.T if transposed else m
    x = rng.random((3, m.shape[1], 4)) if w_left else rng.random((3, m.shape[0]))
    got = numpy_executor.squared_product(w, x, w_left=w_left, transposed=transposed)
    expected = np.matmul(m, x) if w_left else np.matmul(x, m)
    assert np.allclose(got, expected, rtol=1e-13, atol=0)


def test_extremes_of_a_factored_block_equal_those_of_its_entries():
    rng = np.random.default_rng(5)
    for _ in range(20):
        R, C, H = int(rng.integers(1, 80)), int(rng.integers(1, 80)), 30
        left, right = rng.random((R, 1)), rng.random((C, 1))
        left[rng.random(R) < 0.3] = 0.0
        right[rng.random(C) < 0.3] = 0.0
        row, col = rng.integers(0, H + 1, (R, 1)), rng.integers(0, H + 1, (1, C))
        u_ext = np.append(rng.standard_normal(H), 0.0)
        block = Block(None, row, col, None, None, "w", factors=(left, right))
        G = (left @ right.T) * np.exp(u_ext[col] - u_ext[row])
        high = G.max()
        low = G[G > 0].min() if (G > 0).any() else np.inf
        got = block.extremes(u_ext)
        assert got[0] == pytest.approx(high, rel=1e-14, abs=0)
        assert got[1] == pytest.approx(low, rel=1e-14) if np.isfinite(low) else got[1] == np.inf


@pytest.mark.parametrize("sides", ["outer", "shared axis", "one side"])
def test_rewrite_factor_extremes_equal_the_elementwise_ones(monkeypatch, sides):
    """The summary's factor extremes come from the two sides when they vary along different
    axes, from the blocks otherwise (a BatchNorm's γ under bn_statistics has both sides on
    its one axis): the same numbers as the elementwise product's, either way."""
    monkeypatch.setattr(rewrite, "_CHUNK", 500)
    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 9)).astype(np.float32)
    incoming = np.exp(rng.standard_normal((64, 1)))
    outgoing = {"outer": np.exp(rng.standard_normal((1, 9))), "shared axis": np.exp(rng.standard_normal((64, 1))),
                "one side": np.ones((1, 1))}[sides]
    factor = np.broadcast_to(incoming, w.shape) * np.broadcast_to(outgoing, w.shape)
    summary = rewrite.rescaled(w, incoming, outgoing)
    assert (summary.min_factor, summary.max_factor) == (factor.min(), factor.max())
    assert summary.max_abs == float(np.abs((w.astype(np.float64) * factor).astype(np.float32)).max())
