"""Concat of channels whose layouts do not sit on the Concat's axis.

1. One-channel pieces (a Split or sequence split into single channels) have one position over
   the whole tensor, so their layout may name any axis. Joined back along the channel axis,
   next to a piece that cannot be rescaled (a slice of the graph input), they are channels side
   by side: each keeps its own scale and the reader of the Concat compensates each. (Random
   model 21306: the Concat tied them instead, with the input's unscaled slot, and the channels
   lost their positions: rescaled on one side only, refused by the check.)
2. A Concat along a spatial axis ties channel c of every input. When one input's channel c
   cannot be rescaled, the channels tied to it are frozen: every slot of the output then holds
   elements with scale 1.
Both are checked for the group counts (derived by hand below) and equivalence with onnxruntime.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from support.checks import assert_equivalent
from support.nets import Net

pytest.importorskip("onnxruntime")

from onnx_pathcond import rescale  # noqa: E402


def _ints(net, values):
    name = net.name("i")
    net.inits.append(numpy_helper.from_array(np.array(values, np.int64), name))
    return name


def _input_slice(net, channels):
    """x[:, :channels]: elements of the graph input, which keep scale 1."""
    return net.node("Slice", [net.x, _ints(net, [0]), _ints(net, [channels]), _ints(net, [1])])


def one_channel_pieces(split_op):
    net = Net([2, 3, 5, 5], seed=4)
    h = net.relu(net.conv(net.x, 3, 2, 3, pad=1))                 # 2 free channels
    if split_op == "Split":
        h0, h1 = net.node("Split", [h, _ints(net, [1, 1])], n_out=2, axis=1)
    else:
        seq = net.node("SplitToSequence", [h], axis=-3)           # pieces of one channel, axis kept
        h0 = net.node("SequenceAt", [seq, _ints(net, -2)])
        h1 = net.node("SequenceAt", [seq, _ints(net, 1)])
    joined = net.node("Concat", [_input_slice(net, 1), h1, h0], axis=1)  # [x0, h1, h0]
    y = net.conv(joined, 3, 4, 1)
    return net.model(y)


def spatial_concat_with_an_unscaled_channel():
    net = Net([1, 3, 4, 4], seed=5)
    a = net.relu(net.conv(net.x, 3, 2, 3, pad=1))                 # channels a0, a1
    b = net.relu(net.conv(net.x, 3, 1, 3, pad=1))                 # channel b0
    b_and_x = net.node("Concat", [b, _input_slice(net, 1)], axis=1)  # [b0, x0]
    tall = net.node("Concat", [a, b_and_x], axis=2)               # rows of a, then rows of [b0, x0]
    y = net.conv(tall, 2, 3, 1)
    return net.model(y)


@pytest.mark.parametrize("split_op", ["Split", "SplitToSequence"])
def test_one_channel_pieces_joined_back_keep_their_own_scales(split_op):
    model = one_channel_pieces(split_op)
    out, report = rescale(model, max_iter=50)
    assert report.groups.rescalable == 2, report.summary()
    assert report.groups.frozen_by_category == {"graph_output": 4}, report.groups.frozen_by_category
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    assert any(not np.allclose(before[k], after[k]) for k in before if before[k].dtype.kind == "f")
    assert_equivalent(model, out)


def test_a_spatial_concat_freezes_channels_tied_to_an_unscaled_one():
    model = spatial_concat_with_an_unscaled_channel()
    out, report = rescale(model, max_iter=50)
    # a0 and b0 share a slot: one tied group; a1 shares its slot with the input's x0: frozen
    assert report.groups.rescalable == 1, report.summary()
    reasons = [row.reason for row in report.frozen if row.category == "barrier"]
    assert any("Concat" in r for r in reasons), reasons
    assert_equivalent(model, out)
