"""Ops that only move, copy or drop elements: Reshape, Flatten, Transpose, Concat, Slice, ...

One rule serves them all. The node is run once (onnx's reference evaluator) on inputs whose
values are their own element indices; the result says, for every output element, which input
element it copies (or none, for padding). That map gives:

* the path network: a `Gather` primitive (copies carry weight 1);
* the channel layout of each output: an output axis along which every slot copies from a
  single channel position. Such an axis exists for Flatten / Reshape / Squeeze / Transpose /
  Concat / Split / Slice / Pad / Tile whenever they keep channels apart. When none exists
  (the first Reshape and the Transpose of a channel shuffle spread each channel over two
  axes), the output keeps the position of every element (`SpreadLayout`): moves are exact
  for any labelling, so nothing is frozen until an op that needs one channel axis reads it
  (a shuffle's last Reshape brings the channels back onto one axis, permuted).

A Concat along a non-channel axis first ties the channels of its inputs (channel c of every
input becomes channel c of the output).
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from ..channels import Layout, SpreadLayout
from ..nodes import attr, node_label
from ..pathnet.primitives import Gather
from .base import OpRule, normalize_axis, register

_NO_SOURCE = -1
_UNSCALED = -1  # label of an element whose channel has no position
_PADDING = -2  # label of an element copied from nowhere (matches any channel)


def source_map(node, graph):
    """For each output: int64 array (output shape) of the flat index it copies, -1 for none.

    Flat indices run over the activation inputs one after another. Returns None when the op
    is not a pure copy (an output value that is not an input element).
    """
    from onnx.reference import ReferenceEvaluator

    feeds, offset, inputs = {}, 0, []
    for name in node.input:
        if not name or name in feeds:
            continue
        if graph.is_activation(name):
            shape = graph.shape(name)
            size = int(np.prod(shape))
            feeds[name] = (np.arange(size, dtype=np.float64) + (offset + 1)).reshape(shape)
            offset += size
        else:
            feeds[name] = graph.constant_value(name)
        inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(feeds[name].dtype),
                                                    feeds[name].shape))
    outputs = [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in node.output if o]
    model = helper.make_model(helper.make_graph([node], "index_map", inputs, outputs),
                              opset_imports=list(graph.model.opset_import), ir_version=graph.model.ir_version)
    try:
        results = ReferenceEvaluator(model).run(None, feeds)
    except Exception:
        return None, offset
    maps = []
    for r in results:
        r = np.asarray(r, dtype=np.float64)
        idx = np.rint(r)
        if not np.array_equal(idx, r) or (idx < 0).any() or (idx > offset).any():
            return None, offset
        maps.append(idx.astype(np.int64) - 1)
    return maps, offset


def element_labels(names, an, relabel=None):
    """Channel position of every element of the activation tensors `names` (no repeats),
    flattened one after another as `source_map` numbers them, then one padding label."""
    g = an.graph
    parts = []
    for name in names:
        shape = g.shape(name)
        lay = an.layout(name)
        if lay is not None and relabel and name in relabel:
            lay = Layout(lay.axis, relabel[name])
        if lay is None:
            parts.append(np.full(int(np.prod(shape)), _UNSCALED, dtype=np.int64))
            continue
        if isinstance(lay, SpreadLayout):
            parts.append(lay.labels.ravel())
            continue
        view = [1] * len(shape)
        view[lay.axis] = lay.channels
        labels = np.where(lay.pos >= 0, lay.pos, _UNSCALED).reshape(view)
        parts.append(np.broadcast_to(labels, shape).ravel())
    return np.concatenate(parts + [np.array([_PADDING], dtype=np.int64)])


def _channel_axis(labels: np.ndarray, preferred: int):
    """An axis along which each slot holds one label (padding ignored); (axis, slot labels)."""
    best = None
    for axis in range(labels.ndim):
        n = labels.shape[axis]
        slots = np.moveaxis(labels, axis, 0).reshape(n, -1)
        real = slots != _PADDING
        hi = np.where(real, slots, np.iinfo(np.int64).min).max(axis=1)
        lo = np.where(real, slots, np.iinfo(np.int64).max).min(axis=1)
        empty = ~real.any(axis=1)
        if not np.all(empty | (hi == lo)):
            continue
        slot_labels = np.where(empty, _UNSCALED, hi)
        key = (n, axis == preferred, axis)
        if best is None or key > best[0]:
            best = (key, axis, slot_labels)
    if best is None:
        return None
    return best[1], best[2]


def _copied(labels: np.ndarray, src: np.ndarray) -> np.ndarray:
    """The labels of an output whose elements copy the flat elements `src` (-1: none, padding)."""
    return labels[np.where(src >= 0, src, labels.size - 1)]


def set_copied_layout(an, output, labels, src, preferred_axis) -> None:
    """The layout of a tensor whose elements copy the elements `src` (flat indices, -1 for
    none) of inputs labelled `labels` (`element_labels`): one channel axis when an axis holds
    one position per slot (`preferred_axis` first among equals), else every element's."""
    out_labels = _copied(labels, src)
    found = _channel_axis(out_labels, preferred_axis)
    if found is None:
        an.set_layout(output, SpreadLayout(out_labels))
        return
    axis, slot_labels = found
    an.set_layout(output, Layout(axis, slot_labels.astype(np.int64)))


@register
class MovementRule(OpRule):
    op_types = ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Concat", "Split", "Slice",
                "Pad", "Tile", "Expand", "Gather", "DepthToSpace", "SpaceToDepth")
    reads_spread_layouts = True

    def analyse(self, node, an):
        g = an.graph
        acts = [i for i in dict.fromkeys(node.input) if i and g.is_activation(i)]
        if any(g.shape(i) is None for i in acts) or any(o and g.shape(o) is None for o in node.output):
            an.cut(node, f"{node.op_type} '{node_label(node)}' has a tensor of unknown shape "
                         f"(static shapes needed: give the input's shape)")
            return
        if node.op_type == "Pad" and not self._zero_padding(node, g):
            an.cut(node, f"Pad '{node_label(node)}' pads with a non-zero constant")
            return
        maps, _ = source_map(node, g)
        if maps is None:
            an.cut(node, f"{node.op_type} '{node_label(node)}' does not only copy elements")
            return
        an.node_data[g.index(node)] = maps
        layouts = [an.layout(i) for i in acts]
        if all(lay is None for lay in layouts):
            for o in node.output:
                an.set_layout(o, None)
            return
        labels = element_labels(acts, an)
        relabel = self._tie_concat(node, an, acts, layouts, labels) if node.op_type == "Concat" else None
        if relabel:
            labels = element_labels(acts, an, relabel)
        first = next(lay for lay in layouts if lay is not None)
        for o, src in zip([o for o in node.output if o], maps):
            set_copied_layout(an, o, labels, src, self._preferred_axis(node, first, len(g.shape(acts[0])), src.ndim))

    @staticmethod
    def _preferred_axis(node, lay, in_rank, out_rank):
        if not isinstance(lay, Layout):
            return min(1, out_rank - 1)
        if node.op_type == "Transpose":
            perm = list(attr(node, "perm", None) or reversed(range(in_rank)))
            return perm.index(lay.axis)
        return lay.axis if out_rank == in_rank else out_rank - 1

    @staticmethod
    def _zero_padding(node, g):
        mode = attr(node, "mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode != "constant":
            return True  # edge / reflect / wrap copy elements
        if len(node.input) > 2 and node.input[2]:
            return g.is_constant(node.input[2]) and not np.any(g.constant_value(node.input[2]))
        return attr(node, "value", 0.0) == 0.0

    @staticmethod
    def _tie_concat(node, an, acts, layouts, labels):
        """Concat along a non-channel axis: tie channel c of all inputs; label them as one."""
        g = an.graph
        rank = len(g.shape(acts[0]))
        axis = normalize_axis(attr(node, "axis", 0), rank)
        known = [lay for lay in layouts if lay is not None]
        if any(isinstance(lay, SpreadLayout) for lay in known):
            return None
        if all(lay.axis != axis for lay in known) and len({lay.channels for lay in known}) == 1 \
                and len({lay.axis for lay in known}) == 1:
            if all(_channel_axis(_copied(labels, src), 0) is not None for src in an.node_data[g.index(node)]):
                # every output already holds one label per slot along some axis: inputs whose
                # layouts name another axis only because each has one channel (any axis then
                # holds one label per slot) are channels joined along the Concat's axis
                return None
            if len(known) < len(layouts):
                for lay in known:
                    an.freeze(lay.pos, f"Concat '{node_label(node)}' joins it with channels that cannot be rescaled")
                return None
            for lay in known[1:]:
                an.tie(known[0].pos, lay.pos)
            # A slot that one input leaves unscaled holds an element with scale 1 next to the
            # others: the channels tied to it cannot take a scale (a tie skips such a pair).
            stacked = np.stack([lay.pos for lay in known])
            unscaled = (stacked < 0).any(axis=0)
            an.freeze(stacked[:, unscaled], f"Concat '{node_label(node)}' joins it with channels that cannot be "
                                            f"rescaled")
            return {a: np.where(unscaled, -1, known[0].pos) for a in acts}
        return None

    def path(self, node, ctx):
        acts = tuple(i for i in dict.fromkeys(node.input) if i and ctx.is_activation(i))
        return [Gather(acts, tuple(o for o in node.output if o), tuple(ctx.data(node)))]
