"""SplitToSequence read by SequenceAt at constant positions is a split (what PyTorch's dynamo
exporter writes for `chunk` and `split` without its optimiser): the channels before it are
rescaled, the model stays the same function. Every other use of a sequence is a barrier with
its reason.

The path network of these nodes is checked against the brute-force enumeration and across the
backends by the `split_to_sequence_*` entries of tests/support/cases.py (test_diag_g.py,
test_backends.py)."""

import json

import numpy as np
import onnx
import pytest

from support.bruteforce import build_unit_graph
from support.cases import CASES
from support.checks import assert_equivalent, random_feeds, run
from support.nets import Net
from onnx_pathcond import rescale
from onnx_pathcond.api import analyse_model
from onnx_pathcond.graph import Graph

# rescalable groups of each case, from its structure (tests/support/cases.py): every convolution
# followed by a ReLU whose channels reach the next convolution (the last one is the output)
EXPECTED = {
    "split_to_sequence_shuffle": 4 + 3,  # the first conv, the branch conv (the shuffle permutes them)
    "split_to_sequence_rows": 4,  # the first conv; its rows are cut apart, channels stay on axis 1
    "split_to_sequence_chunks": 5 + 3,  # the first conv (its first chunk unused), the middle conv
}


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_split_to_sequence_is_followed_and_the_model_is_the_same(case):
    model = CASES[case]()
    assert not build_unit_graph(model).barriers  # the reference follows it too: the g test is not vacuous
    _, analysis, _ = analyse_model(model)
    assert not analysis.cut_nodes
    after, report = rescale(model)
    assert report.groups.rescalable == EXPECTED[case]
    assert report.verification.passed
    assert_equivalent(model, after)


def test_unequal_pieces_get_their_shapes():
    # A sequence holds one element type, so onnx's inference leaves the split axis open when the
    # pieces differ; the graph computes each SequenceAt's shape from the split.
    model = CASES["split_to_sequence_shuffle"]()
    graph = Graph(model)
    reads = [n for n in model.graph.node if n.op_type == "SequenceAt"]
    assert [graph.shape(n.output[0]) for n in reads] == [(1, 1, 3, 3), (1, 3, 3, 3)]
    assert all(graph.is_sequence(n.input[0]) and graph.shape(n.input[0]) is None for n in reads)


def _split_net(read):
    """x -> conv 2->4 -> relu -> SplitToSequence([2, 2], axis 1) -> two pieces -> concat ->
    conv 4->3 -> relu -> conv 3->2; `read` changes how the sequence is read."""
    net = Net([1, 2, 3, 3], seed=21, opset=17)
    a = net.relu(net.conv(net.x, 2, 4, 1))
    seq = net.node("SplitToSequence", [a, net.const_i64([2, 2])], axis=1)
    first = net.const_i64(0)
    if read == "position_computed":  # 0, computed from the input: not a constant
        never = net.node("Less", [net.node("ReduceSum", [net.x], keepdims=0), net.param([], value=-1e30)])
        first = net.node("Cast", [never], to=7)
    pieces = [net.node("SequenceAt", [seq, first]), net.node("SequenceAt", [seq, net.const_i64(1)])]
    if read == "construct":  # a sequence the tool does not follow, built from the pieces
        other = net.node("SequenceConstruct", pieces)
        pieces = [net.node("SequenceAt", [other, net.const_i64(k)]) for k in (1, 0)]
    c = net.node("Concat", pieces, axis=1)
    y = net.conv(net.relu(net.conv(c, 4, 3, 1)), 3, 2, 1)
    if read == "concat_from_sequence":
        whole = net.node("ConcatFromSequence", [seq], axis=1)
        y = net.node("Add", [y, net.conv(whole, 4, 2, 1)])
    if read == "graph_output":
        model = net.model(y)
        from onnx import TensorProto, helper
        model.graph.output.append(helper.make_tensor_sequence_value_info(seq, TensorProto.FLOAT, None))
        return model
    return net.model(y)


@pytest.mark.parametrize("read,rescalable,why", [
    ("plain", 4 + 3, None),
    ("position_computed", 3, "at a position that is not a constant"),
    ("concat_from_sequence", 3, "is read by ConcatFromSequence"),
    ("graph_output", 3, "makes a sequence that is a graph output"),
    ("construct", 3, "feeds SequenceConstruct"),
])
def test_other_uses_of_a_sequence_are_barriers_with_their_reason(read, rescalable, why):
    model = _split_net(read)
    after, report = rescale(model)
    assert report.groups.rescalable == rescalable  # the conv after the pieces stays free
    text = json.dumps(report.to_dict())
    if why:
        assert why in text
        assert "whose shape is unknown" not in text  # the reason is the sequence's, not a lost shape
    assert report.verification.passed
    if read == "graph_output":  # the sequence's tensors, then y
        before_outputs, after_outputs = run(model, random_feeds(model, 5)), run(after, random_feeds(model, 5))
        np.testing.assert_allclose(np.asarray(after_outputs[1]), np.asarray(before_outputs[1]), rtol=1e-5)
        model, after = _without_sequence_output(model), _without_sequence_output(after)
    assert_equivalent(model, after)


def _without_sequence_output(model):
    trimmed = onnx.ModelProto()
    trimmed.CopyFrom(model)
    del trimmed.graph.output[1:]
    return trimmed


def test_a_computed_split_is_a_barrier():
    net = Net([1, 2, 3, 3], seed=22, opset=17)
    a = net.relu(net.conv(net.x, 2, 4, 1))
    never = net.node("Less", [net.node("ReduceSum", [net.x], keepdims=0), net.param([], value=-1e30)])
    split = net.node("Add", [net.const_i64([2, 2]), net.node("Cast", [never], to=7)])  # [2, 2], not a constant
    seq = net.node("SplitToSequence", [a, split], axis=1)
    c = net.node("Concat", [net.node("SequenceAt", [seq, net.const_i64(k)]) for k in (1, 0)], axis=1)
    model = net.model(net.conv(net.relu(net.conv(c, 4, 3, 1)), 3, 2, 1), output_shapes=[[1, 2, 3, 3]])
    after, report = rescale(model)
    # the split is computed from the input (an int64 activation): the node is cut before its
    # rule runs, and everything after it has no static shape
    assert any(row.category == "barrier" and "SplitToSequence" in row.reason and split in row.reason
               for row in report.frozen)
    assert report.groups.rescalable == 0 and report.verification.passed
    assert_equivalent(model, after)


def test_equal_chunks_of_a_channel_split_match_the_split_op():
    # The same network with Split in place of SplitToSequence + SequenceAt: the same groups and,
    # with the same weights, the same rescaled weights.
    seq_model = _split_net("plain")
    split_model = _split_net("plain")
    nodes = list(split_model.graph.node)
    at = [n for n in nodes if n.op_type == "SequenceAt"]
    stts = next(n for n in nodes if n.op_type == "SplitToSequence")
    from onnx import helper
    split = helper.make_node("Split", list(stts.input), [n.output[0] for n in at], axis=1)
    kept = [n for n in nodes if n.op_type not in ("SplitToSequence", "SequenceAt")]
    position = kept.index(next(n for n in kept if n.op_type == "Concat"))
    kept.insert(position, split)
    del split_model.graph.node[:]
    split_model.graph.node.extend(kept)
    a, report_a = rescale(seq_model)
    b, report_b = rescale(split_model)
    assert report_a.groups.rescalable == report_b.groups.rescalable == 7
    wa = {t.name: t for t in a.graph.initializer}
    from onnx import numpy_helper
    for t in b.graph.initializer:
        np.testing.assert_allclose(numpy_helper.to_array(wa[t.name]), numpy_helper.to_array(t), rtol=1e-6)
