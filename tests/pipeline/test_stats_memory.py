"""Checkpointed forward masses: the numpy statistics drop masses and recompute them in the
backward pass; the result must not change, and the masses held must really shrink."""

import os
import math

import numpy as np
import pytest

from support.nets import mlp
from onnx_pathcond.api import analyse_model, load_model
from onnx_pathcond.pathnet.numpy_executor import NumpyExecutor
from onnx_pathcond.pathnet.records import Statistic
from onnx_pathcond.pathnet.walk import PathWalk
from onnx_pathcond.stats import numpy_walk
from support import repo


def _run(model, budget):
    graph, analysis, _ = analyse_model(model)
    out = {}

    def collect(stat):
        use = stat.use
        key = (use.ref.name if use.ref is not None else use.input_name, use.node.name, use.role)
        out[key] = np.array(stat.array(), dtype=np.float64)

    return out, numpy_walk(graph, analysis, collect, budget=budget)


@pytest.mark.parametrize("path", [repo.model("resnet.dynamo_bn.onnx"), repo.model("densenet.legacy_bn.onnx"),
                                  repo.model("unet.dynamo_bn.onnx"), repo.model("mobilenet.legacy_fused.onnx")], ids=os.path.basename)
def test_checkpoints_leave_diag_g_unchanged_and_hold_less(path):
    model = load_model(path)
    everything, full = _run(model, math.inf)
    small, lean = _run(model, 1.0)  # smaller than any mass: the tightest plan there is
    assert everything.keys() == small.keys() and everything
    for key, g in everything.items():
        np.testing.assert_allclose(small[key], g, rtol=1e-12, atol=0, err_msg=str(key))
    assert lean.mass_bytes_peak < full.mass_bytes_peak


def test_long_chain_recomputes_without_recursion():
    model = mlp([4] + [6] * 1200 + [3], seed=1, scale=0.4)  # masses stay of order one
    everything, _ = _run(model, math.inf)
    small, lean = _run(model, 1.0)
    assert lean.recomputed_nodes > 0
    for key, g in everything.items():
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(small[key], g, rtol=1e-12, atol=0)


def test_budget_must_be_positive():
    model = mlp([3, 4, 2])
    graph, analysis, _ = analyse_model(model)
    with pytest.raises(ValueError, match="budget"):
        numpy_walk(graph, analysis, lambda stat: None, budget=0)


def test_dense_layers_next_to_graph_inputs_stay_factored():
    # Batch of one: every Gemm's g is an outer product, kept as two vectors, never as a matrix,
    # the first layer (its inputs are the graph's, with no group) included.
    from onnx_pathcond.criteria.pathcond import ProblemBuilder
    from onnx_pathcond.stats import compute_diag_g

    model = mlp([50, 40, 30, 5], seed=4)
    graph, analysis, groups = analyse_model(model)
    builder = ProblemBuilder(groups, analysis.uses, analysis.shared)
    compute_diag_g(graph, analysis, builder.add)
    weights = [b for b in builder.blocks if b.name.startswith("w")]
    assert len(weights) == 3
    assert all(b.G is None and b.factors is not None for b in weights)


# ---------------------------------------------------------------- checkpoint plans


def _same_g(a, b):
    assert a.keys() == b.keys() and a
    for key, g in a.items():
        assert np.array_equal(b[key], g), key  # the same rules on the same inputs: bitwise


@pytest.mark.parametrize("path", [repo.model("resnet.legacy_fused.onnx"), repo.model("densenet.dynamo_fused.onnx"),
                                  repo.model("unet.legacy_fused.onnx"), repo.model("vgg_bn.dynamo_bn.onnx"),
                                  repo.model("mobilenet_relu6.legacy_bn.onnx"), repo.model("cnn.onnx")], ids=os.path.basename)
def test_every_plan_gives_bitwise_the_same_g(path):
    model = load_model(path)
    everything, full = _run(model, math.inf)
    assert not full.checkpoints and full.recomputed_expensive == 0
    for budget in (1.0, full.mass_bytes_peak / 3, full.mass_bytes_peak / 1.5):
        got, net = _run(model, budget)
        _same_g(everything, got)
        # The plan really dropped masses: it held less. (Whether an expensive one is then
        # recomputed depends on the network: only the adjoints of products read their inputs.)
        assert net.checkpoints and net.mass_bytes_peak < full.mass_bytes_peak, budget


def test_a_chain_recomputed_in_one_go_needs_no_recursion():
    # With half the bytes, the first stretch is about 600 layers long, and the backward pass
    # recomputes it at once: one recursive call per node would pass Python's recursion limit.
    model = mlp([4] + [6] * 1200 + [3], seed=1, scale=0.4)
    everything, full = _run(model, math.inf)
    got, net = _run(model, full.mass_bytes_peak / 2)
    _same_g(everything, got)
    assert net.recomputed_expensive > 500
    assert net.mass_bytes_peak <= 0.55 * full.mass_bytes_peak


def test_masses_held_follow_the_budget():
    model = load_model(repo.model("resnet.dynamo_bn.onnx"))
    _, full = _run(model, math.inf)
    _, tight = _run(model, 1.0)  # below any plan: the least budget that has one
    assert tight.checkpoints and tight.mass_bytes_peak <= 0.8 * full.mass_bytes_peak
    for fraction in (0.95, 0.85, 0.75, 0.5):
        budget = fraction * full.mass_bytes_peak
        _, net = _run(model, budget)
        assert net.mass_bytes_peak <= 1.05 * max(budget, tight.mass_bytes_peak), fraction


def test_a_budget_above_all_masses_changes_nothing():
    model = load_model(repo.model("resnet.dynamo_bn.onnx"))
    _, full = _run(model, math.inf)
    for budget in (1e12, None):  # the default keeps small networks as they are
        _, net = _run(model, budget)
        assert not net.checkpoints and net.recomputed_expensive == 0
        assert net.recomputed_nodes == full.recomputed_nodes
        assert net.mass_bytes_peak == full.mass_bytes_peak


def test_mass_bytes_count_shared_arrays_once():
    model = mlp([3, 5, 2])
    graph, analysis, _ = analyse_model(model)
    net = PathWalk(graph, analysis, NumpyExecutor(graph, lambda stat: None), budget=math.inf)
    store = net._mass
    a = np.ones(10)
    store["a"] = a
    store["b"] = a  # an identity: its output is its input's array
    store["c"] = a[2:]  # a view
    assert store.live_bytes == 80
    del store["a"]
    store.pop("b")
    assert store.live_bytes == 80
    store.pop("c")
    assert store.live_bytes == 0 and store.peak_bytes == 80


# ---------------------------------------------------------------- the criterion's cell reductions


def test_cell_reductions_match_numpy():
    from onnx_pathcond.criteria import cells

    rng = np.random.default_rng(3)
    g = rng.random((96, 40, 3, 3))
    g[rng.random(g.shape) < 0.3] = 0.0
    cases = [(g, (2, 3)),  # trailing and contiguous: the blocked path
             (g[:, :, :, :2], (2, 3)),  # not contiguous: numpy
             (np.ascontiguousarray(g.transpose(2, 3, 0, 1)), (0, 1)),  # leading axes: numpy
             (rng.random((64, 64, 5, 5)), (2, 3)),
             (rng.random((64, 64, 7, 7)), (2, 3)),  # many taps: numpy
             (rng.random((32, 16, 1, 1)), (2, 3))]  # one tap per cell
    for arr, axes in cases:
        np.testing.assert_allclose(cells._cell_sum(arr, axes), arr.sum(axis=axes), rtol=1e-14, atol=0)
        if np.prod([arr.shape[a] for a in axes]) > 1:
            assert np.array_equal(cells._cell_extreme(arr, axes, np.maximum), arr.max(axis=axes))
            assert np.array_equal(cells._cell_extreme(arr, axes, np.minimum), arr.min(axis=axes))
    positive = g > 0
    assert np.array_equal(np.rint(cells._cell_sum(positive, (2, 3))).astype(np.int64),
                          positive.sum(axis=(2, 3)))
    assert cells._as_cells(g, (2, 3)) is not None  # the first case did take the blocked path


def _conv_uses():
    from support.nets import Net

    net = Net([1, 32, 8, 8], seed=2)
    y = net.relu(net.conv(net.x, 32, 64, 3, pad=1))
    y = net.relu(net.conv(y, 64, 64, 3, pad=1, group=2))  # per-cell groups
    y = net.relu(net.conv(y, 64, 64, 5, pad=2))
    y = net.conv(y, 64, 48, 3, pad=1)
    model = net.model(y)
    _, analysis, groups = analyse_model(model)
    return analysis, groups


@pytest.mark.parametrize("zeros", [0.0, 0.3, "cells"])
def test_blocked_cell_reductions_build_the_same_problem(zeros, monkeypatch):
    from onnx_pathcond.criteria import cells

    analysis, groups = _conv_uses()
    rng = np.random.default_rng(5)
    stream = []
    for use in analysis.uses:
        if use.ignored:
            continue
        g = rng.random(use.view_shape) + 0.01
        if zeros == "cells":  # whole kernel slices on no path, as behind a dead channel
            if g.ndim == 4:
                g[:, : g.shape[1] // 3] = 0.0
        elif zeros:
            g[rng.random(g.shape) < zeros] = 0.0
        stream.append((use, g))

    def build():
        builder = cells.ProblemBuilder(groups, analysis.uses, analysis.shared)
        for use, g in stream:
            builder.add(Statistic(use, g.copy()))
        return builder.finish()

    fast = build()
    assert any(cells._as_cells(g, (2, 3)) is not None for _, g in stream if g.ndim == 4)
    monkeypatch.setattr(cells, "_as_cells", lambda g, reduced: None)
    slow = build()
    assert (fast.p, fast.log_sum, fast.const_sum, fast.const_max, fast.const_min) == \
        (slow.p, slow.log_sum, slow.const_sum, slow.const_max, slow.const_min)
    assert np.array_equal(fast.n_in, slow.n_in) and np.array_equal(fast.n_out, slow.n_out)
    assert len(fast.blocks) == len(slow.blocks)
    for a, b in zip(fast.blocks, slow.blocks):
        assert a.name == b.name
        np.testing.assert_allclose(a.G, b.G, rtol=1e-14, atol=0)
        for attr in ("row", "col", "gmax", "gmin"):
            x, y = getattr(a, attr), getattr(b, attr)
            assert (x is None and y is None) or np.array_equal(x, y), attr
    u = np.random.default_rng(0).normal(size=fast.H) * 0.1
    assert fast.objective(u) == pytest.approx(slow.objective(u), rel=1e-13)


def test_sum_of_logs_matches_numpy_in_and_out_of_the_four_product_range():
    from onnx_pathcond.criteria import cells

    rng = np.random.default_rng(11)
    cases = [rng.random(n) * 10.0 ** rng.uniform(-30, 30, n) for n in (1, 7, 8, 9, 1001, 4 * (1 << 20) + 3)]
    cases.append(np.array([1e-200, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]))  # a product would underflow
    cases.append(np.array([1e200] * 12))  # ... or overflow
    for values in cases:
        expected = float(np.log(values).sum())
        got = cells._sum_of_logs(values, float(values.min()), float(values.max()), chunk=1 << 20)
        assert got == pytest.approx(expected, rel=1e-13, abs=1e-9), values.size
    # a chunk size that does not divide by four still covers every value once
    values = rng.random(103) + 0.5
    assert cells._sum_of_logs(values, 0.5, 1.5, chunk=10) == pytest.approx(float(np.log(values).sum()), rel=1e-13)


def test_groups_meet_agrees_with_a_set_intersection():
    from onnx_pathcond.criteria import cells

    rng = np.random.default_rng(12)
    H = 50
    for _ in range(500):
        row = rng.integers(0, H + 1, int(rng.integers(0, 8)))
        col = rng.integers(0, H + 1, int(rng.integers(0, 8)))
        if rng.random() < 0.5:  # layer-like: two ranges side by side
            start = int(rng.integers(0, H - 10))
            row = np.append(np.arange(start, start + 5), H)
            col = np.arange(start + 5 - int(rng.integers(0, 2)), start + 9)
        expected = bool(np.intersect1d(row[row < H], col[col < H]).size)
        assert cells._groups_meet(row[:, None], col[None, :], H) == expected


def test_tally_over_the_keys_span_equals_a_count_over_every_group():
    from onnx_pathcond.criteria import cells

    rng = np.random.default_rng(13)
    H = 40
    for _ in range(500):
        size = int(rng.integers(0, 12))
        if rng.random() < 0.5:  # a layer's range, sometimes beside the fixed side H
            start = int(rng.integers(0, H - size)) if size < H else 0
            keys = np.arange(start, start + size)
            if rng.random() < 0.5 and size:
                keys[rng.integers(0, size)] = H
        else:
            keys = rng.integers(0, H + 1, size)
        weights = rng.integers(0, 9, size).astype(np.float64) if rng.random() < 0.5 else None
        scale = float(rng.choice([1.0, 9.0]))
        acc = rng.integers(0, 5, H + 1).astype(np.float64)
        expected = acc + np.bincount(keys, weights=weights, minlength=H + 1) * scale
        cells._tally(acc, keys, weights, scale)
        assert np.array_equal(acc[:H], expected[:H])  # the fixed side's entry is never read
