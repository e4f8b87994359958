"""Constant nodes folded with numpy give what onnx's reference evaluator gives (constants.py).

The shape arithmetic that exporters write (Expand, Reshape, Concat, Gather, Cast, Slice,
Squeeze / Unsqueeze, Transpose, Add / Sub / Mul / Div on integers and floats) is folded with
numpy. For random nodes of each, with the awkward cases (negative axes and indices, a 0 in a
Reshape with and without `allowzero`, integer division of negative numbers, bounds past the
extent), the value and dtype must be the evaluator's, or the numpy path must decline (and the
evaluator then runs). A case the evaluator rejects is never given a value by numpy.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from onnx_pathcond.constants import _fold_with_numpy

_OPSET = 17


def _reference(node, feeds):
    inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
              for n, v in feeds.items()]
    outputs = [helper.make_tensor_value_info(node.output[0], TensorProto.UNDEFINED, None)]
    model = helper.make_model(helper.make_graph([node], "fold", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", _OPSET)])
    try:
        return np.asarray(ReferenceEvaluator(model).run(None, feeds)[0])
    except Exception:
        return None


def _ints(rng, shape, low=-9, high=10):
    return rng.integers(low, high, size=shape).astype(rng.choice([np.int64, np.int32]))


def _random_node(rng):
    """(node, feeds) of one random foldable op."""
    op = rng.choice(["Expand", "Reshape", "Concat", "Gather", "Cast", "Unsqueeze", "Squeeze", "Transpose",
                     "Add", "Sub", "Mul", "Div", "Slice"])
    rank = int(rng.integers(0, 4))
    shape = tuple(int(d) for d in rng.integers(1, 4, size=rank))
    x = _ints(rng, shape) if rng.random() < 0.7 else rng.standard_normal(shape).astype(np.float32)
    if op == "Expand":
        target = [int(rng.choice([1, d])) for d in shape]
        target = [int(d) for d in rng.integers(1, 3, size=int(rng.integers(0, 2)))] + target
        if rng.random() < 0.2:
            target = [5] + target  # a new leading axis, or (when it is 5 against 2) a mismatch
        return helper.make_node("Expand", ["x", "s"], ["y"]), {"x": x, "s": np.array(target, dtype=np.int64)}
    if op == "Reshape":
        dims = list(shape) if rng.random() < 0.5 else [int(np.prod(shape))]
        if dims and rng.random() < 0.4:
            dims[int(rng.integers(len(dims)))] = 0
        if dims and rng.random() < 0.3:
            dims[int(rng.integers(len(dims)))] = -1
        kwargs = {} if rng.random() < 0.5 else {"allowzero": int(rng.integers(2))}
        return helper.make_node("Reshape", ["x", "s"], ["y"], **kwargs), {"x": x, "s": np.array(dims, dtype=np.int64)}
    if op == "Concat":
        if rank == 0:
            x = x.reshape(1)
            shape = (1,)
        axis = int(rng.integers(-len(shape), len(shape)))
        other = list(shape)
        other[axis] = int(rng.integers(1, 3))
        z = _ints(rng, tuple(other)).astype(x.dtype)
        kwargs = {"axis": axis} if rng.random() < 0.9 else {}
        return helper.make_node("Concat", ["x", "z", "x"], ["y"], **kwargs), {"x": x, "z": z}
    if op == "Gather":
        if rank == 0:
            x = np.resize(x, 3)
            shape = (3,)
        axis = int(rng.integers(-len(shape), len(shape)))
        n = shape[axis]
        index_shape = tuple(int(d) for d in rng.integers(0, 3, size=int(rng.integers(0, 2))))
        indices = rng.integers(-n, n + (1 if rng.random() < 0.1 else 0), size=index_shape)  # n: out of range
        return helper.make_node("Gather", ["x", "i"], ["y"], axis=axis), {"x": x, "i": indices.astype(np.int64)}
    if op == "Cast":
        to = int(rng.choice([TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32, TensorProto.DOUBLE,
                             TensorProto.BOOL, TensorProto.FLOAT16, TensorProto.UINT8, TensorProto.BFLOAT16]))
        return helper.make_node("Cast", ["x"], ["y"], to=to), {"x": x}
    if op == "Unsqueeze":
        out_rank = rank + int(rng.integers(1, 3))
        axes = [int(a) - (out_rank if rng.random() < 0.4 else 0) for a in rng.permutation(out_rank)[:out_rank - rank]]
        return helper.make_node("Unsqueeze", ["x", "a"], ["y"]), {"x": x, "a": np.array(axes, dtype=np.int64)}
    if op == "Squeeze":
        x = x.reshape(shape + (1,))
        ones = [i for i, d in enumerate(x.shape) if d == 1]
        if rng.random() < 0.3:
            return helper.make_node("Squeeze", ["x"], ["y"]), {"x": x}
        axes = [a - x.ndim if rng.random() < 0.4 else a for a in ones[:int(rng.integers(1, len(ones) + 1))]]
        return helper.make_node("Squeeze", ["x", "a"], ["y"]), {"x": x, "a": np.array(axes, dtype=np.int64)}
    if op == "Transpose":
        kwargs = {"perm": [int(p) for p in rng.permutation(rank)]} if rank and rng.random() < 0.7 else {}
        return helper.make_node("Transpose", ["x"], ["y"], **kwargs), {"x": x}
    if op == "Slice":
        if rank == 0:
            x = np.resize(x, 4)
            shape = (4,)
        axes = [int(a) for a in rng.permutation(len(shape))[:int(rng.integers(1, len(shape) + 1))]]
        starts = [int(rng.integers(-shape[a] - 2, shape[a] + 3)) for a in axes]
        ends = [int(rng.choice([rng.integers(-shape[a] - 2, shape[a] + 3), np.iinfo(np.int64).max])) for a in axes]
        steps = [int(rng.choice([1, 2, -1, -3])) for _ in axes]
        return (helper.make_node("Slice", ["x", "b", "e", "a", "st"], ["y"]),
                {"x": x, "b": np.array(starts, dtype=np.int64), "e": np.array(ends, dtype=np.int64),
                 "a": np.array(axes, dtype=np.int64), "st": np.array(steps, dtype=np.int64)})
    other = (_ints(rng, shape, 1, 5) * rng.choice([1, -1], size=shape)).astype(x.dtype) if x.dtype.kind == "i" \
        else rng.standard_normal(shape).astype(x.dtype)
    if rng.random() < 0.1:
        other = other.astype(np.float64)  # inputs of different types: left to the evaluator
    return helper.make_node(op, ["x", "z"], ["y"]), {"x": x, "z": other}


def test_numpy_folding_matches_the_reference_evaluator():
    folded = {}
    for seed in range(600):
        rng = np.random.default_rng(7000 + seed)
        node, feeds = _random_node(rng)
        want = _reference(node, feeds)
        got = _fold_with_numpy(node, feeds)
        if got is None:
            continue
        folded[node.op_type] = folded.get(node.op_type, 0) + 1
        assert want is not None, (seed, node.op_type)
        got = got[0]
        assert got.dtype == want.dtype and got.shape == want.shape, (seed, node.op_type, got.dtype, want.dtype)
        assert np.array_equal(got, want, equal_nan=got.dtype.kind == "f"), (seed, node.op_type)
    assert set(folded) == {"Expand", "Reshape", "Concat", "Gather", "Cast", "Unsqueeze", "Squeeze", "Transpose",
                           "Add", "Sub", "Mul", "Div", "Slice"}
    assert sum(folded.values()) > 450


@pytest.mark.parametrize("x, y", [(np.array([7, -7, 7, -7, 0]), np.array([2, 2, -2, -2, 3]))])
def test_integer_division_truncates_towards_zero(x, y):
    got = _fold_with_numpy(helper.make_node("Div", ["x", "z"], ["y"]), {"x": x, "z": y})[0]
    assert got.tolist() == [3, -3, -3, 3, 0]  # C's division, not Python's floor


def test_declined_cases_are_left_to_the_evaluator():
    x = np.arange(6, dtype=np.int64).reshape(2, 3)
    assert _fold_with_numpy(helper.make_node("Cast", ["x"], ["y"], to=TensorProto.BFLOAT16), {"x": x}) is None
    assert _fold_with_numpy(helper.make_node("Concat", ["x", "x"], ["y"]), {"x": x}) is None  # no axis
    assert _fold_with_numpy(helper.make_node("Mul", ["x", "z"], ["y"]), {"x": x, "z": x.astype(np.float32)}) is None
    assert _fold_with_numpy(helper.make_node("Reshape", ["x", "s"], ["y"]), {"x": x, "s": np.array([4, -1])}) is None
    assert _fold_with_numpy(helper.make_node("Range", ["a", "b", "c"], ["y"]),
                            {"a": np.array(0), "b": np.array(3), "c": np.array(1)}) is None


def test_an_omitted_optional_input_goes_to_the_evaluator():
    """A constant Slice whose `axes` input is left out (an empty name) is declined by the numpy
    path and folded by the evaluator, through the graph's own entry point."""
    from onnx import numpy_helper

    from onnx_pathcond.graph import Graph

    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    inits = [numpy_helper.from_array(data, "d"), numpy_helper.from_array(np.array([1], np.int64), "s"),
             numpy_helper.from_array(np.array([3], np.int64), "e"),
             numpy_helper.from_array(np.array([1], np.int64), "st")]
    node = helper.make_node("Slice", ["d", "s", "e", "", "st"], ["y"])
    assert _fold_with_numpy(node, {"d": data, "s": np.array([1]), "e": np.array([3]), "st": np.array([1])}) is None
    model = helper.make_model(helper.make_graph([node], "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                                                               None)], inits),
                              opset_imports=[helper.make_opsetid("", _OPSET)])
    np.testing.assert_array_equal(Graph(model).constant_value("y"), data[1:3])  # axes default to 0, 1, ...
