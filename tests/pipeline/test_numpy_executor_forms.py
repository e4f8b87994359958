"""The numpy executor computes some primitives in more than one form, picked by shape: a
convolution's input adjoint as a correlation (stride 1) or as a scatter of windows, and a
Gather as a view, an assignment or a scatter-add (and a Concat, which needs no map, against
the same explicit matrix; a pool's window sums one axis at a time, against the windows). Each form is checked here against the
definition written as plain loops or as an explicit 0/1 matrix, and end to end against path
enumeration on convolutions whose padding the fast form cannot take."""

import itertools

import numpy as np
import pytest

from support.bruteforce import bruteforce_diag_g
from support.nets import Net
from onnx_pathcond.api import analyse_model
from onnx_pathcond.geometry import Geometry
from onnx_pathcond.pathnet import primitives as P
from onnx_pathcond.pathnet.numpy_executor import (NumpyExecutor, conv_input_adjoint, correlation_geometry,
                                                  kernel_statistic, pad_input, scatter_windows, summed_product, unbroadcast,
                                                  window_sums, window_sums_adjoint, window_view)
from onnx_pathcond.stats import diag_g_by_tensor


def _window_reads(out_channels, geo):
    """Every (o, k, p, i) of a convolution's definition: output channel o at position p reads,
    through kernel position k, the input position i = p·stride + k·dilation − pad_begin
    (those inside the input only)."""
    for o in range(out_channels):
        for k in itertools.product(*(range(s) for s in geo.kernel)):
            for p in itertools.product(*(range(s) for s in geo.out_size)):
                i = tuple(pp * st + kk * d - b for pp, st, kk, d, b in
                          zip(p, geo.strides, k, geo.dilations, geo.pads_begin))
                if all(0 <= ii < s for ii, s in zip(i, geo.in_size)):
                    yield o, k, p, i


def _input_adjoint_by_loops(w2, adj, groups, geo):
    """into[n, c, i] = Σ w2[o, c mod Cg, k] · adj[n, o, p] over the (o, k, p) of c's group with
    p·stride + k·dilation − pad_begin = i: the transpose of the convolution, from its definition."""
    n, out_channels = adj.shape[:2]
    og, cg = out_channels // groups, w2.shape[1]
    into = np.zeros((n, groups * cg) + geo.in_size)
    for o, k, p, i in _window_reads(out_channels, geo):
        for c in range(cg):
            into[(slice(None), (o // og) * cg + c) + i] += w2[(o, c) + k] * adj[(slice(None), o) + p]
    return into


def _geometries():
    """Strides 1 and 2, dilations, asymmetric pads, pads wider than the kernel reaches."""
    rng = np.random.default_rng(7)
    found = []
    while len(found) < 60:
        nd = int(rng.integers(1, 3))
        kernel = tuple(int(k) for k in rng.integers(1, 4, nd))
        dilations = tuple(int(d) for d in rng.integers(1, 3, nd))
        strides = tuple(int(s) for s in rng.choice([1, 1, 2], nd))
        # half of them with pads within the kernel's reach (where the correlation form applies)
        top = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)] if len(found) % 2 else [4] * nd
        begin = tuple(int(rng.integers(0, t)) for t in top)
        end = tuple(int(rng.integers(0, t)) for t in top)
        in_size = tuple(int(s) for s in rng.integers(1, 7, nd))
        out = tuple((s + b + e - (k - 1) * d - 1) // st + 1
                    for s, b, e, k, d, st in zip(in_size, begin, end, kernel, dilations, strides))
        if min(out) >= 1:
            found.append(Geometry(kernel, strides, dilations, begin, end, in_size, out))
    return found


@pytest.mark.parametrize("groups", [1, 2, 3])
def test_conv_input_adjoint_matches_its_definition(groups):
    rng = np.random.default_rng(groups)
    correlations = 0
    for geo in _geometries():
        cg, og, n = int(rng.integers(1, 4)), int(rng.integers(1, 4)), int(rng.integers(1, 3))
        w2 = rng.random((groups * og, cg) + geo.kernel)
        adj = rng.random((n, groups * og) + geo.out_size)
        grouped = adj.reshape(n, groups, og, -1).transpose(1, 2, 0, 3).reshape(groups, og, -1)
        expected = _input_adjoint_by_loops(w2, adj, groups, geo)
        forms = [None, "scatter"] + (["correlation"] if correlation_geometry(geo) is not None else [])
        for form in forms:
            got = conv_input_adjoint(w2, grouped, n, groups, geo, form=form)
            np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-300, err_msg=f"{form} {geo}")
        correlations += "correlation" in forms
    assert correlations >= 10


def _kernel_statistic_by_loops(x, adj, groups, cg, geo):
    """g[o, c, k] = Σ adj[n, o, p] · x[n, (group of o)·Cg + c, i] over (n, p) with
    i = p·stride + k·dilation − pad_begin inside x: the statistic from its definition."""
    n, out_channels = adj.shape[:2]
    og = out_channels // groups
    g = np.zeros((out_channels, cg) + geo.kernel)
    for o, k, p, i in _window_reads(out_channels, geo):
        for c in range(cg):
            g[(o, c) + k] += float((adj[(slice(None), o) + p] * x[(slice(None), (o // og) * cg + c) + i]).sum())
    return g


@pytest.mark.parametrize("groups", [1, 2, 3])
def test_kernel_statistic_from_the_adjoints_windows_matches_its_definition(groups):
    """The correlation form's windows of the adjoint give the kernel's statistic without the
    input's windows: against the definition, on every geometry where that form applies."""
    rng = np.random.default_rng(30 + groups)
    checked = 0
    for geo in _geometries():
        if correlation_geometry(geo) is None:
            continue
        cg, og, n = int(rng.integers(1, 4)), int(rng.integers(1, 4)), int(rng.integers(1, 3))
        w2 = rng.random((groups * og, cg) + geo.kernel)
        x = rng.random((n, groups * cg) + geo.in_size)
        adj = rng.random((n, groups * og) + geo.out_size)
        grouped = adj.reshape(n, groups, og, -1).transpose(1, 2, 0, 3).reshape(groups, og, -1)
        into, windows = conv_input_adjoint(w2, grouped, n, groups, geo, form="correlation", keep_windows=True)
        np.testing.assert_allclose(into, _input_adjoint_by_loops(w2, adj, groups, geo), rtol=1e-12, atol=1e-300)
        if windows is None:  # a 1×1 kernel reads x as it is: no windows to share
            assert geo.kernel_volume == 1
            continue
        held = [windows]
        got = kernel_statistic(held, x, groups, w2.shape, geo)
        assert held == []  # the windows are let go
        assert got.shape == w2.shape and got.flags.c_contiguous
        np.testing.assert_allclose(got, _kernel_statistic_by_loops(x, adj, groups, cg, geo), rtol=1e-12,
                                   atol=1e-300, err_msg=str(geo))
        checked += 1
    assert checked >= 10


def test_windows_and_their_scatter_match_explicit_padding():
    """window_view reads padded position p·stride + k·dilation, from x itself when nothing is
    padded; scatter_windows is its transpose: ⟨scatter(c), x_padded⟩ = ⟨c, windows(x_padded)⟩."""
    rng = np.random.default_rng(21)
    unpadded = 0
    for geo in _geometries():
        x = rng.random((2, 3) + geo.in_size)
        explicit = np.pad(x, [(0, 0), (0, 0)] + [(b, p - b - s) for b, p, s in
                                                 zip(geo.pads_begin, geo.padded_size, geo.in_size)])
        padded = pad_input(x, geo)
        np.testing.assert_array_equal(padded, explicit)
        if geo.padded_size == geo.in_size:
            assert padded is x
            unpadded += 1
        view = window_view(padded, geo)
        for k in itertools.product(*(range(s) for s in geo.kernel)):
            for p in itertools.product(*(range(s) for s in geo.out_size)):
                at = tuple(pp * st + kk * d for pp, st, kk, d in zip(p, geo.strides, k, geo.dilations))
                assert np.array_equal(view[(slice(None), slice(None)) + k + p], explicit[(slice(None), slice(None)) + at])
        cols = rng.random(view.shape)
        scattered = scatter_windows(cols, geo)
        assert float((scattered * explicit).sum()) == pytest.approx(float((cols * view).sum()), rel=1e-12)
    assert unpadded >= 3


def test_window_sums_axis_by_axis_match_the_windows_and_their_scatter():
    """A pool's window sums, taken one spatial axis at a time, equal the sum of each window
    read through window_view (1-D and 2-D, strides, dilations, pads beyond the kernel's reach,
    and a 3-D box); their adjoint equals scatter_windows of the adjoint broadcast over each
    window."""
    rng = np.random.default_rng(23)
    box = Geometry((2, 3, 2), (2, 1, 1), (1, 1, 2), (1, 0, 1), (0, 2, 1), (5, 4, 6), (3, 4, 6))
    for geo in _geometries() + [box]:
        nd = len(geo.kernel)
        padded = pad_input(rng.random((2, 3) + geo.in_size), geo)
        by_windows = window_view(padded, geo).sum(axis=tuple(range(2, 2 + nd)))
        np.testing.assert_allclose(window_sums(padded, geo), by_windows, rtol=1e-13)
        adj = rng.random((2, 3) + geo.out_size)
        spread = np.broadcast_to(adj.reshape(adj.shape[:2] + (1,) * nd + adj.shape[2:]),
                                 adj.shape[:2] + geo.kernel + geo.out_size)
        np.testing.assert_allclose(window_sums_adjoint(adj, geo), scatter_windows(spread, geo), rtol=1e-13)


def test_summed_product_matches_the_product_unbroadcast():
    rng = np.random.default_rng(22)
    cases = [((1, 4, 5, 6), (1, 4, 1, 1)), ((3, 4, 5), (1, 4, 1)), ((2, 7), (1, 7)), ((2, 3, 2, 2, 2), (1, 3, 1, 1, 1)),
             ((2, 4, 3), (1, 4, 3)), ((2, 4, 3), (3,)), ((2, 4, 3), (2, 4, 3)), ((2, 4, 3), ())]
    for shape, view in cases:
        a, b = rng.random(shape), rng.random(shape)
        np.testing.assert_allclose(summed_product(a, b, view), unbroadcast(a * b, view), rtol=1e-13)
        assert summed_product(a, b, view).shape == view
    a = rng.random((2, 4, 3))
    # a broadcast operand takes the product itself
    np.testing.assert_allclose(summed_product(a, a[:, :, :1], (1, 4, 1)), unbroadcast(a * a[:, :, :1], (1, 4, 1)))


def test_the_correlation_form_is_refused_where_it_does_not_apply():
    geo = Geometry((3,), (2,), (1,), (1,), (1,), (6,), (3,))  # stride 2
    assert correlation_geometry(geo) is None
    with pytest.raises(ValueError, match="stride 1"):
        conv_input_adjoint(np.ones((1, 1, 3)), np.ones((1, 1, 3)), 1, 1, geo, form="correlation")


class _Shapes:
    """What the executor asks of the graph for a Gather: the shape of each input."""

    def __init__(self, shapes):
        self.shapes = shapes

    def shape(self, name):
        return self.shapes[name]


def _gather_matrix(maps, total):
    """The 0/1 matrix of each map: row j has a one at column maps[j] (none for -1)."""
    mats = []
    for src in maps:
        flat = src.ravel()
        m = np.zeros((flat.size, total))
        rows = np.flatnonzero(flat >= 0)
        np.add.at(m, (rows, flat[rows]), 1.0)
        mats.append(m)
    return mats


@pytest.mark.parametrize("kind", ["concat", "split", "runs", "permutation", "padded", "repeated", "mixed"])
def test_gather_forms_match_the_explicit_matrix(kind):
    rng = np.random.default_rng(3)
    shapes = {"a": (1, 2, 3), "b": (1, 4, 3)}
    xs = ("a", "b")
    total = 18
    if kind == "concat":  # a channel Concat at batch one: one contiguous run
        maps = (np.arange(18).reshape(1, 6, 3),)
    elif kind == "split":  # two runs of one input
        xs, maps = ("b",), (np.arange(0, 6).reshape(1, 2, 3), np.arange(6, 12).reshape(1, 2, 3))
        total = 12
    elif kind == "runs":  # the same split, its maps held as their bounds
        xs, maps = ("b",), (P.Run(0, (1, 2, 3)), P.Run(6, (1, 2, 3)))
        total = 12
    elif kind == "permutation":  # a Transpose: each element read once
        maps = (np.arange(18).reshape(6, 3).T.copy(),)
    elif kind == "padded":  # a Pad: zeros around a permutation
        maps = (np.pad(rng.permutation(18).reshape(6, 3), 1, constant_values=-1),)
    elif kind == "repeated":  # a Tile: elements read twice
        maps = (np.tile(np.arange(18), 2).reshape(6, 6),)
    else:
        maps = (np.arange(2, 8).reshape(2, 3), rng.integers(-1, 18, (4, 5)), np.array([[17, 0, 17]]))
    prim = P.Gather(xs, tuple(f"y{k}" for k in range(len(maps))), maps)
    executor = NumpyExecutor(_Shapes(shapes), sink=None)
    inputs = [rng.random(shapes[x]) for x in xs]
    flat = np.concatenate([x.ravel() for x in inputs])
    mats = _gather_matrix([m.array() if isinstance(m, P.Run) else m for m in maps], total)
    for _ in range(2):  # the second call uses the forms worked out at the first
        outs = executor.forward(prim, inputs)
        for y, m, src in zip(outs, mats, maps):
            assert y.shape == src.shape
            np.testing.assert_array_equal(y.ravel(), m @ flat)
        adjs = [rng.random(src.shape) for src in maps]
        into, stats = executor.backward(prim, inputs, adjs)
        expected = sum(m.T @ a.ravel() for m, a in zip(mats, adjs))
        np.testing.assert_allclose(np.concatenate([i.ravel() for i in into]), expected, rtol=1e-14)
        assert [i.shape for i in into] == [shapes[x] for x in xs] and stats == []


@pytest.mark.parametrize("batch, axis, names", [(1, 1, ("a", "b")), (2, 1, ("a", "b", "a")), (2, 2, ("b", "a")),
                                                (1, 1, ("a",)), (3, 3, ("a", "a"))])
def test_concat_matches_the_explicit_matrix(batch, axis, names):
    """A Concat primitive against the 0/1 matrix of its definition: output element j copies,
    at the same place along the other axes, the element of the input whose span along `axis`
    holds j; the adjoints of an input named twice add up to that matrix's transpose too."""
    rng = np.random.default_rng(4)
    base = [batch, 2, 3, 2]
    shapes = {"a": tuple(base), "b": tuple(base[:axis] + [4] + base[axis + 1:])}
    distinct = list(dict.fromkeys(names))
    offset = dict(zip(distinct, np.cumsum([0] + [int(np.prod(shapes[n])) for n in distinct])[:-1].tolist()))
    total = sum(int(np.prod(shapes[n])) for n in distinct)
    y_shape = base[:axis] + [sum(shapes[n][axis] for n in names)] + base[axis + 1:]
    shapes["y"] = tuple(y_shape)
    matrix = np.zeros((int(np.prod(y_shape)), total))
    for j, index in enumerate(np.ndindex(*y_shape)):
        along = index[axis]
        for name in names:  # the input whose span holds `along`
            if along < shapes[name][axis]:
                source = index[:axis] + (along,) + index[axis + 1:]
                matrix[j, offset[name] + int(np.ravel_multi_index(source, shapes[name]))] = 1.0
                break
            along -= shapes[name][axis]
    prim = P.Concat(names, "y", axis)
    executor = NumpyExecutor(_Shapes(shapes), sink=None)
    values = {n: rng.random(shapes[n]) for n in distinct}
    (y,) = executor.forward(prim, [values[n] for n in names])
    assert y.shape == tuple(y_shape)
    np.testing.assert_array_equal(y.ravel(), matrix @ np.concatenate([values[n].ravel() for n in distinct]))
    adj = rng.random(y_shape)
    into, stats = executor.backward(prim, None, [adj])
    assert [i.shape for i in into] == [shapes[n] for n in names] and stats == []
    summed = {n: sum(i for i, m in zip(into, names) if m == n) for n in distinct}
    np.testing.assert_allclose(np.concatenate([summed[n].ravel() for n in distinct]), matrix.T @ adj.ravel(),
                               rtol=1e-15)
    assert executor.roundings(prim) == (0, 0, 0)  # copies only


@pytest.mark.parametrize("pads, dilation", [([2, 0, 0, 2], 1), ([3, 3, 3, 3], 1), ([0, 1, 2, 0], 2),
                                            ([1, 0, 0, 1], 1)])
def test_diag_g_of_padded_stride_one_convolutions_matches_path_enumeration(pads, dilation):
    """Pads beyond the kernel's reach (the scatter form) and within it (the correlation form),
    asymmetric, dilated, grouped: diag(G) from the path network against every path."""
    net = Net([1, 2, 5, 5], seed=11)
    y = net.relu(net.conv(net.x, 2, 4, 3, pad=pads, dilation=dilation))
    y = net.relu(net.conv(y, 4, 4, 2, pad=pads, group=2))
    model = net.model(net.conv(y, 4, 2, 1))
    graph, analysis, _ = analyse_model(model)
    got = diag_g_by_tensor(graph, analysis, backend="numpy")
    expected = bruteforce_diag_g(model)
    assert set(expected) <= set(got)
    for name, g in expected.items():
        np.testing.assert_allclose(got[name], g, rtol=1e-10, atol=1e-12 * max(1.0, float(np.max(g))))


def test_a_map_is_compacted_to_a_run_exactly_when_it_is_one():
    """`compact_map` against its definition on random maps: a Run when the flat indices are
    consecutive from a non-negative start (written out, the Run is the map), the map itself
    otherwise (gaps, a padding −1, a permutation, an empty map)."""
    rng = np.random.default_rng(5)
    runs = 0
    for trial in range(300):
        shape = tuple(int(d) for d in rng.integers(0, 4, size=int(rng.integers(1, 4))))
        size = int(np.prod(shape))
        start = int(rng.integers(0, 20))
        src = np.arange(start, start + size, dtype=np.int64)
        kind = trial % 4
        if kind == 1 and size > 1:
            src = rng.permutation(src)
        elif kind == 2 and size:
            src[int(rng.integers(size))] = -1
        elif kind == 3 and size > 1:
            src[int(rng.integers(1, size)):] += 1
        src = src.reshape(shape)
        flat = src.ravel()
        is_run = flat.size > 0 and flat[0] >= 0 and bool(np.all(flat == flat[0] + np.arange(flat.size)))
        got = P.compact_map(src)
        assert isinstance(got, P.Run) == is_run, (trial, src)
        if is_run:
            runs += 1
            assert got.shape == shape and got.size == size and got.ndim == len(shape)
            np.testing.assert_array_equal(got.array(), src)
        else:
            assert got is src
    assert runs > 50
