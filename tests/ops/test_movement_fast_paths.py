"""The movement rule's fast paths give what its general path gives (ops/movement.py).

1. A Concat along the channel axis of its inputs gets its output layout without element
   labels or onnx's reference evaluator, and a Concat primitive whose copies are the general
   path's source map: for random shapes, axes, repeated inputs and
   layouts (none, on the Concat's axis with or without unscaled or repeated positions, on
   another axis, spread), the rule writes the same maps, layouts, ties, freezes and cuts as with
   the fast path switched off.
2. `_channel_axis` (axes tried best first, reductions in place) against its plain definition
   `_channel_axis_reference` on random label arrays, with and without padding.
3. `_copied` (padding read at index -1) against its definition with an explicit index.
4. The shipped models analysed with and without the Concat fast path: same groups and layouts.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from onnx_pathcond.channels import Layout, SpreadLayout
from onnx_pathcond.pathnet.numpy_executor import NumpyExecutor
from onnx_pathcond.pathnet.primitives import Concat, Run
from onnx_pathcond.ops import movement
from onnx_pathcond.ops.movement import (MovementRule, _PADDING, _channel_axis, _channel_axis_reference, _copied,
                                        element_labels)

from support.repo import MODELS


class _Graph:
    """What the movement rule reads of a graph: activations with their shapes, one node."""

    def __init__(self, shapes, opset=17, constants=None):
        self.shapes = dict(shapes)
        self.constants = dict(constants or {})
        self.model = helper.make_model(helper.make_graph([], "g", [], []),
                                       opset_imports=[helper.make_opsetid("", opset)])

    def is_activation(self, name):
        return name in self.shapes and not name.startswith("const")

    def shape(self, name):
        return self.shapes.get(name)

    def index(self, node):
        return 0

    def is_constant(self, name):
        return name in self.constants

    def constant_value(self, name):
        return self.constants[name]


class _Analysis:
    """What the rule writes: layouts, node data, ties, freezes and cuts, recorded."""

    def __init__(self, graph, layouts):
        self.graph = graph
        self.layouts = dict(layouts)
        self.node_data = {}
        self.events = []

    def layout(self, name):
        return self.layouts.get(name)

    def set_layout(self, name, layout):
        self.layouts[name] = layout

    def tie(self, a, b):
        self.events.append(("tie", np.asarray(a).tolist(), np.asarray(b).tolist()))

    def freeze(self, pos, reason, category="barrier"):
        self.events.append(("freeze", np.asarray(pos).tolist(), reason))

    def cut(self, node, reason):
        self.events.append(("cut", reason))


def _same_layout(a, b):
    if a is None or b is None:
        return a is None and b is None
    if type(a) is not type(b):
        return False
    if isinstance(a, Layout):
        return a.axis == b.axis and a.pos.dtype == b.pos.dtype and np.array_equal(a.pos, b.pos)
    return a.labels.dtype == b.labels.dtype and np.array_equal(a.labels, b.labels)


def _run(node, shapes, layouts, fast):
    """The rule on one node; an error it raises (the general path raises on some empty
    tensors) is recorded as an event, so both paths must fail alike."""
    an = _Analysis(_Graph(shapes), layouts)
    rule = MovementRule()
    original = vars(MovementRule)["_channel_concat"]  # the staticmethod itself
    if not fast:
        MovementRule._channel_concat = staticmethod(lambda *a: False)
    try:
        rule.analyse(node, an)
    except Exception as e:
        an.events.append(("raised", type(e).__name__, str(e)))
    finally:
        MovementRule._channel_concat = original
    return an


def _random_layout(rng, shape, axis, next_pos):
    kind = rng.choice(["none", "axis", "axis", "axis", "unscaled", "repeated", "other_axis", "spread", "one"])
    c = shape[axis]
    if kind == "none":
        return None
    if kind in ("axis", "unscaled", "repeated", "one"):
        pos = np.arange(next_pos, next_pos + c, dtype=np.int64)
        if kind == "unscaled":
            pos[rng.random(c) < 0.5] = -1
        if kind == "repeated":
            pos = np.full(c, next_pos, dtype=np.int64)
        if kind == "one":  # a one-channel layout that does not match the tensor's axis length
            return Layout(axis, np.array([next_pos], dtype=np.int64)) if c > 1 else Layout(axis, pos)
        return Layout(axis, pos)
    if kind == "other_axis":
        other = int(rng.integers(len(shape)))
        return Layout(other, np.arange(next_pos, next_pos + shape[other], dtype=np.int64))
    labels = rng.integers(-1, 4, size=shape).astype(np.int64) + next_pos
    return SpreadLayout(labels)


def _concat_case(seed):
    """A random Concat: (node, shapes, layouts)."""
    rng = np.random.default_rng(seed)
    rank = int(rng.integers(1, 5))
    axis = int(rng.integers(rank))
    base = [int(d) for d in rng.integers(1, 4, size=rank)]
    if rng.random() < 0.3:
        base[0] = 1  # a batch of one: the inputs are one slab each
    if rng.random() < 0.05:
        base[int(rng.integers(rank))] = 0  # an empty tensor
    n_distinct = int(rng.integers(1, 4))
    names = [f"x{i}" for i in range(n_distinct)]
    shapes = {}
    for n in names:
        s = list(base)
        s[axis] = int(rng.integers(1, 5))
        shapes[n] = tuple(s)
    if rng.random() < 0.05 and rank > 1:  # inputs whose other axes disagree (no valid Concat)
        other = (axis + 1) % rank
        s = list(shapes[names[-1]])
        s[other] += 1
        shapes[names[-1]] = tuple(s)
    inputs = list(rng.choice(names, size=int(rng.integers(1, 5))))  # repeats allowed
    out_shape = list(base)
    out_shape[axis] = sum(shapes[n][axis] for n in inputs)
    shapes["y"] = tuple(out_shape)
    layouts, next_pos = {}, 0
    for n in names:
        layouts[n] = _random_layout(rng, shapes[n], axis, next_pos)
        next_pos += 10
    stored_axis = axis - rank if rng.random() < 0.5 else axis
    node = helper.make_node("Concat", inputs, ["y"], axis=stored_axis)
    return node, shapes, layouts


def _maps(node, shapes, an):
    """The node's source maps as the analysis left them; for the fast path's `_JoinedAlong`,
    those its Concat primitive computes: the primitive run on inputs whose values are their
    flat element numbers, the distinct inputs numbered one after another (as `source_map`
    numbers them)."""
    data = an.node_data.get(0, [])
    if not isinstance(data, movement._JoinedAlong):  # a run written out, to compare arrays
        return [m.array() if isinstance(m, Run) else m for m in data]
    numbers, start = {}, 0
    for name in dict.fromkeys(node.input):
        size = int(np.prod(shapes[name]))
        numbers[name] = np.arange(start, start + size, dtype=np.int64).reshape(shapes[name])
        start += size
    prim = Concat(tuple(node.input), node.output[0], data.axis)
    (joined,) = NumpyExecutor(_Graph(shapes), sink=None).forward(prim, [numbers[n] * 1.0 for n in prim.xs])
    return [joined.astype(np.int64)]  # the numbers are exact in float64


def test_channel_concat_matches_the_general_path():
    taken = 0
    for seed in range(400):
        node, shapes, layouts = _concat_case(seed)
        acts = list(dict.fromkeys(node.input))
        taken += MovementRule._channel_concat(node, _Analysis(_Graph(shapes), layouts), acts)
        fast, general = _run(node, shapes, layouts, True), _run(node, shapes, layouts, False)
        assert fast.events == general.events, seed
        assert fast.node_data.keys() == general.node_data.keys(), seed
        for a, b in zip(_maps(node, shapes, fast), _maps(node, shapes, general)):
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), seed
        assert fast.layouts.keys() == general.layouts.keys(), seed
        for name in fast.layouts:
            assert _same_layout(fast.layouts[name], general.layouts[name]), (seed, name)
    assert taken > 40  # the fast path ran on many of them, the general path on the rest


def test_channel_concat_is_taken_for_plain_channel_joins():
    """The fast path is not vacuous: a channel Concat of plain layouts goes through it."""
    shapes = {"a": (1, 3, 4, 4), "b": (1, 2, 4, 4), "y": (1, 8, 4, 4)}
    layouts = {"a": Layout(1, np.arange(3, dtype=np.int64)), "b": Layout(1, np.array([5, -1], dtype=np.int64))}
    node = helper.make_node("Concat", ["a", "b", "a"], ["y"], axis=1)
    an = _Analysis(_Graph(shapes), layouts)
    assert MovementRule._channel_concat(node, an, ["a", "b"])
    assert an.layouts["y"].axis == 1
    assert an.layouts["y"].pos.tolist() == [0, 1, 2, 5, -1, 0, 1, 2]
    general = _run(node, shapes, layouts, False)
    assert isinstance(an.node_data[0], movement._JoinedAlong) and an.node_data[0].axis == 1
    assert np.array_equal(_maps(node, shapes, an)[0], _maps(node, shapes, general)[0])


def _reference_map(node, graph, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(movement, "_direct_map", lambda *a: None)
        return movement.source_map(node, graph)


def _random_move(rng):
    """A random Flatten, Reshape, Transpose or Slice of one tensor: (node, graph)."""
    rank = int(rng.integers(1, 6))
    shape = tuple(int(d) for d in rng.integers(1, 5, size=rank))
    op = rng.choice(["Flatten", "Reshape", "Transpose", "Slice"])
    constants = {}
    if op == "Slice":
        node, constants = _random_slice(rng, shape)
        return node, _Graph({"x": shape}, constants=constants)
    if op == "Flatten":
        node = helper.make_node("Flatten", ["x"], ["y"], axis=int(rng.integers(-rank, rank + 1))) \
            if rng.random() < 0.8 else helper.make_node("Flatten", ["x"], ["y"])
    elif op == "Transpose":
        perm = [int(p) for p in rng.permutation(rank)]
        if rng.random() < 0.1:
            perm = perm[:-1] or [0, 0]  # wrong length: left to the evaluator
        node = helper.make_node("Transpose", ["x"], ["y"], perm=perm) if rng.random() < 0.8 \
            else helper.make_node("Transpose", ["x"], ["y"])
    else:
        size = int(np.prod(shape))
        dims = []
        rest = size
        for f in (2, 3, 2, 4):
            if rest % f == 0 and rng.random() < 0.5:
                dims.append(f)
                rest //= f
        dims.append(rest)
        dims = list(rng.permutation(dims))
        if rng.random() < 0.3:
            dims[int(rng.integers(len(dims)))] = -1
        if rng.random() < 0.3 and len(dims) <= rank:
            k = int(rng.integers(len(dims)))
            if dims[k] == shape[k]:
                dims[k] = 0  # copies the input's dimension
        if rng.random() < 0.05:
            dims[0] += 1  # a wrong size: the evaluator fails, the node is not a copy
        constants["s"] = np.array(dims, dtype=np.int64)
        allowzero = int(rng.integers(3)) - 1  # -1: the attribute absent
        node = helper.make_node("Reshape", ["x", "s"], ["y"], **({} if allowzero < 0 else {"allowzero": allowzero}))
    return node, _Graph({"x": shape}, constants=constants)


def _random_slice(rng, shape):
    """A Slice of `shape` with bounds of either sign, beyond the extent or INT64's ends, steps
    of either sign, axes given (negative too) or not, steps given or not: (node, its bound
    tensors)."""
    rank = len(shape)
    axes = [int(a) for a in rng.permutation(rank)[:int(rng.integers(1, rank + 1))]]
    big = np.iinfo(np.int64)
    starts, ends, steps = [], [], []
    for a in axes:
        bound = lambda: int(rng.choice([rng.integers(-shape[a] - 2, shape[a] + 3), big.max, big.min, 0]))
        starts.append(bound())
        ends.append(bound())
        steps.append(int(rng.choice([1, 1, 2, -1, -2, 3])))
    inputs = ["x", "starts", "ends"]
    constants = {"starts": np.array(starts, dtype=np.int64), "ends": np.array(ends, dtype=np.int64)}
    with_axes, with_steps = rng.random() < 0.8 or axes != list(range(len(axes))), rng.random() < 0.7
    if with_axes or with_steps:
        inputs.append("axes")
        constants["axes"] = np.array([a - rank if rng.random() < 0.3 else a for a in axes], dtype=np.int64)
    if with_steps:
        inputs.append("steps")
        constants["steps"] = np.array(steps, dtype=np.int64)
    return helper.make_node("Slice", inputs, ["y"]), constants


def test_direct_maps_match_the_reference_evaluator(monkeypatch):
    taken = 0
    for seed in range(300):
        node, graph = _random_move(np.random.default_rng(3000 + seed))
        taken += movement._direct_map(node, graph) is not None
        (got, got_n), (want, want_n) = movement.source_map(node, graph), _reference_map(node, graph, monkeypatch)
        assert got_n == want_n, seed
        if want is None:
            assert got is None, seed
            continue
        assert got is not None and len(got) == len(want), seed
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), seed
    assert taken > 230


def _random_labels(rng):
    rank = int(rng.integers(1, 5))
    shape = tuple(int(d) for d in rng.integers(1, 5, size=rank))
    kind = rng.choice(["axis", "axis", "constant", "random"])
    if kind == "random":
        labels = rng.integers(-1, 3, size=shape)
    elif kind == "constant":
        labels = np.full(shape, int(rng.integers(-1, 3)))
    else:
        axis = int(rng.integers(rank))
        view = [1] * rank
        view[axis] = shape[axis]
        labels = np.broadcast_to(rng.integers(-1, 3, size=shape[axis]).reshape(view), shape).copy()
    labels = labels.astype(np.int64)
    if rng.random() < 0.4:
        labels[rng.random(shape) < rng.random()] = _PADDING
    return labels


def test_channel_axis_matches_its_definition():
    found = 0
    for seed in range(1000):
        rng = np.random.default_rng(1000 + seed)
        labels = _random_labels(rng)
        preferred = int(rng.integers(labels.ndim))
        got, want = _channel_axis(labels, preferred), _channel_axis_reference(labels, preferred)
        if want is None:
            assert got is None, seed
            continue
        found += 1
        assert got is not None and got[0] == want[0], seed
        assert got[1].dtype == want[1].dtype and np.array_equal(got[1], want[1]), seed
    assert 200 < found < 1000


def test_copied_matches_its_definition():
    for seed in range(50):
        rng = np.random.default_rng(2000 + seed)
        labels = np.append(rng.integers(-1, 5, size=int(rng.integers(1, 30))), _PADDING).astype(np.int64)
        src = rng.integers(-1, labels.size - 1, size=tuple(int(d) for d in rng.integers(1, 4, size=3)))
        want = labels[np.where(src >= 0, src, labels.size - 1)]
        got = _copied(labels, src)
        assert got.dtype == want.dtype and np.array_equal(got, want), seed


def test_element_labels_as_defined():
    """One label per element, tensors one after another, then the padding label."""
    shapes = {"a": (2, 3), "b": (3,), "c": (2, 2)}
    layouts = {"a": Layout(1, np.array([4, -1, 6], dtype=np.int64)), "b": None,
               "c": SpreadLayout(np.array([[1, 2], [3, -1]], dtype=np.int64))}
    an = _Analysis(_Graph(shapes), layouts)
    got = element_labels(["a", "b", "c"], an)
    assert got.dtype == np.int64
    assert got.tolist() == [4, -1, 6, 4, -1, 6, -1, -1, -1, 1, 2, 3, -1, _PADDING]
    relabelled = element_labels(["a"], an, {"a": np.array([7, 8, 9], dtype=np.int64)})
    assert relabelled.tolist() == [7, 8, 9, 7, 8, 9, _PADDING]


@pytest.mark.parametrize("model", ["densenet.legacy_fused.onnx", "densenet.dynamo_bn.onnx",
                                   "shufflenet.legacy_bn.onnx", "shufflenet.dynamo_fused.onnx"])
def test_shipped_models_analyse_alike_without_the_fast_path(model, monkeypatch):
    from onnx_pathcond.modelfile import ModelFile
    from onnx_pathcond.plan import RescalingPlan

    path = MODELS / model
    fast = RescalingPlan(ModelFile.read(str(path), lazy=True))
    monkeypatch.setattr(MovementRule, "_channel_concat", staticmethod(lambda *a: False))
    general = RescalingPlan(ModelFile.read(str(path), lazy=True))
    for field in vars(fast.groups):
        a, b = getattr(fast.groups, field), getattr(general.groups, field)
        assert (np.array_equal(a, b) and a.dtype == b.dtype) if isinstance(a, np.ndarray) else a == b, field
    assert fast.analysis.layouts.keys() == general.analysis.layouts.keys()
    for name in fast.analysis.layouts:
        assert _same_layout(fast.analysis.layouts[name], general.analysis.layouts[name]), name
