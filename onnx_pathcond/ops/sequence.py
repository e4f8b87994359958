"""SplitToSequence and the SequenceAt nodes that read it: a split written with a sequence.

PyTorch's dynamo exporter (without its optimiser) writes `x.chunk(2, dim=1)` and `torch.split`
as `SplitToSequence(x, split, axis)` followed by one `SequenceAt(sequence, k)` per piece used.
With a constant split and constant positions, `SequenceAt(SplitToSequence(x), k)` is piece k of
x: a slice along the axis, which only copies elements. So:

* SplitToSequence makes no tensor: its output's layout is its input's (what a node that reads
  the whole sequence freezes), and in the path network it is empty;
* each SequenceAt is the move that copies its piece of x (as a Slice): its output's layout
  follows the elements (`movement.set_copied_layout`), and in the path network it is a
  `Gather` from x itself (the sequence never exists there).

The split is accepted only when every reader of the sequence is such a SequenceAt (any other
reader, a non-constant split or position, or a sequence that leaves the graph makes the
SplitToSequence a barrier with its reason): then no path goes through the sequence other than
through its pieces. A SequenceAt on any other sequence is a barrier.
"""

from __future__ import annotations

import numpy as np

from ..shapes import split_to_sequence_pieces
from ..nodes import attr, node_label
from ..pathnet.primitives import Gather, compact_map
from .base import OpRule, register
from .movement import element_labels, set_copied_layout


def _pieces(split_node, graph):
    """(axis, the flat indices of x each piece copies, as maps of the piece's shape: arrays,
    or `Run`s) for a SplitToSequence, or a string saying why it cannot be followed."""
    x = split_node.input[0]
    shape = graph.shape(x)
    if shape is None:
        return "splits a tensor of unknown shape"
    axis = attr(split_node, "axis", 0)
    if not -len(shape) <= axis < len(shape):
        return f"has axis {axis} outside a tensor of rank {len(shape)}"
    axis %= len(shape)
    split_name = split_node.input[1] if len(split_node.input) > 1 else ""
    split = None
    if split_name:
        if not graph.is_constant(split_name):
            return "has split lengths that are not a constant"
        split = np.asarray(graph.constant_value(split_name))
    ranges = split_to_sequence_pieces(shape[axis], split)
    if ranges is None:
        return f"has split lengths {np.asarray(split).tolist()} that do not cut its axis of {shape[axis]}"
    keep_axis = bool(split_name) or bool(attr(split_node, "keepdims", 1))
    index = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
    maps = []
    for start, stop in ranges:
        piece = np.take(index, np.arange(start, stop), axis=axis)
        maps.append(compact_map(piece if keep_axis else np.squeeze(piece, axis=axis)))
    return axis, maps


def _position(reader, graph, count):
    """The piece a SequenceAt reads (a non-negative index), or a string saying why not."""
    if reader.op_type != "SequenceAt" or reader.domain not in ("", "ai.onnx"):
        return f"is read by {reader.op_type} '{node_label(reader)}', which the tool does not follow"
    name = reader.input[1]
    if not graph.is_constant(name):
        return f"is read by SequenceAt '{node_label(reader)}' at a position that is not a constant"
    position = np.asarray(graph.constant_value(name))
    if position.size != 1 or not -count <= int(position.ravel()[0]) < count:
        return f"is read by SequenceAt '{node_label(reader)}' at position {position.tolist()}, not one of its {count} pieces"
    return int(position.ravel()[0]) % count


def _why_not_followed(split_node, graph):
    """Why the sequence of a SplitToSequence cannot be followed through its SequenceAt
    readers, or None (then `_pieces` and `_position` succeed for it and every reader)."""
    found = _pieces(split_node, graph)
    if isinstance(found, str):
        return found
    seq = split_node.output[0]
    if seq in graph.graph_outputs:
        return "makes a sequence that is a graph output"
    for reader in graph.consumers.get(seq, []):
        position = _position(reader, graph, len(found[1]))
        if isinstance(position, str):
            return position
        if graph.shape(reader.output[0]) is None:
            return f"is read by SequenceAt '{node_label(reader)}', whose output shape is unknown"
    return None


@register
class SequenceSplitRule(OpRule):
    op_types = ("SplitToSequence", "SequenceAt")
    reads_spread_layouts = True  # only moves elements: channels spread over axes stay spread

    def analyse(self, node, an):
        g = an.graph
        if node.op_type == "SplitToSequence":
            why = _why_not_followed(node, g)
            if why is not None:
                an.cut(node, f"SplitToSequence '{node_label(node)}' {why}")
                return
            _, maps = _pieces(node, g)
            an.node_data[g.index(node)] = maps
            an.set_layout(node.output[0], an.layout(node.input[0]))  # what a reader of the whole sequence sees
            return
        source = g.producer.get(node.input[0])
        if source is None or source.op_type != "SplitToSequence" or g.index(source) in an.cut_nodes \
                or g.index(source) not in an.node_data:
            made_by = f"{source.op_type} '{node_label(source)}'" if source is not None else "a graph input"
            an.cut(node, f"SequenceAt '{node_label(node)}' reads a sequence made by {made_by}, which the tool "
                         f"does not follow")
            return
        x = source.input[0]
        src = an.node_data[g.index(source)][_position(node, g, len(an.node_data[g.index(source)]))]
        an.node_data[g.index(node)] = (x, src)
        lay = an.layout(x)
        if lay is None:
            an.set_layout(node.output[0], None)
            return
        preferred = lay.axis if getattr(lay, "axis", None) is not None and src.ndim == len(g.shape(x)) \
            else min(1, src.ndim - 1)
        set_copied_layout(an, node.output[0], element_labels([x], an), src, preferred)

    def path(self, node, ctx):
        if node.op_type == "SplitToSequence":
            return []  # the sequence is not in the path network: each SequenceAt reads x itself
        x, src = ctx.data(node)
        return [Gather((x,), (node.output[0],), (src,))]
