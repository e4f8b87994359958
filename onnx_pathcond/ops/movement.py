"""Ops that only move, copy or drop elements: Reshape, Flatten, Transpose, Concat, Slice, ...

One rule serves them all. The node is run once (with numpy for Flatten, Reshape, Transpose
and Slice, onnx's reference evaluator for the rest) on inputs whose values are their own
element indices; the result says, for every output element, which input
element it copies (or none, for padding). That map gives:

* the path network: a `Gather` primitive (copies carry weight 1), or for a Concat along the
  channels a `Concat` primitive, which needs no map;
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

import weakref
from dataclasses import dataclass

import numpy as np
from onnx import TensorProto, helper

from ..channels import Layout, SpreadLayout
from ..constants import run_with_numpy
from ..nodes import attr, node_label
from ..pathnet.primitives import Concat, Gather, Run, compact_map
from .base import OpRule, normalize_axis, register

_NO_SOURCE = -1
_UNSCALED = -1  # label of an element whose channel has no position
_PADDING = -2  # label of an element copied from nowhere (matches any channel)


# A node's index maps depend on the graph view alone (shapes and constants), not on the
# layouts: computed once per view and shared by its analyses (the count of the groups that
# bn_statistics would free runs a second one). Read-only, as every reader only reads them.
_MAPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _source_maps(graph, node):
    """`source_map(node, graph)`, computed once per graph view."""
    per_graph = _MAPS.get(graph)
    if per_graph is None:
        per_graph = _MAPS[graph] = {}
    key = graph.index(node)
    if key not in per_graph:
        maps, count = source_map(node, graph)
        if maps is not None:  # a contiguous run is kept as its bounds (`Run`)
            maps = [compact_map(m) for m in maps]
            for m in maps:
                if isinstance(m, np.ndarray):
                    m.flags.writeable = False
        per_graph[key] = maps, count
    return per_graph[key]


def source_map(node, graph):
    """For each output: int64 array (output shape) of the flat index it copies, -1 for none.

    Flat indices run over the activation inputs one after another. Returns None when the op
    is not a pure copy (an output value that is not an input element).
    """
    direct = _direct_map(node, graph)
    if direct is not None:
        return direct
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


def _direct_map(node, graph):
    """`source_map` of a Flatten, Reshape, Transpose or Slice of one non-empty activation:
    the index tensor run through numpy (`constants.run_with_numpy`, written the way onnx's
    reference evaluator computes these ops); None for anything else, or when numpy declines
    (the evaluator then decides)."""
    if node.op_type not in ("Flatten", "Reshape", "Transpose", "Slice") or not node.input \
            or not graph.is_activation(node.input[0]):
        return None
    x = node.input[0]
    shape = tuple(graph.shape(x))
    size = int(np.prod(shape))
    rest = list(node.input[1:])
    if size == 0 or any(not i or graph.is_activation(i) or i == x for i in rest):
        return None
    try:
        values = [np.asarray(graph.constant_value(i)) for i in rest]
    except Exception:  # noqa: BLE001 -- not a value numpy can read: the evaluator reports it
        return None
    out = run_with_numpy(node, [np.arange(size, dtype=np.int64).reshape(shape)] + values)
    return None if out is None else ([np.ascontiguousarray(out)], size)


def element_labels(names, an, relabel=None):
    """Channel position of every element of the activation tensors `names` (no repeats),
    flattened one after another as `source_map` numbers them, then one padding label."""
    g = an.graph
    shapes = [g.shape(name) for name in names]
    sizes = [int(np.prod(shape)) for shape in shapes]
    out = np.empty(sum(sizes) + 1, dtype=np.int64)
    offset = 0
    for name, shape, size in zip(names, shapes, sizes):
        part = out[offset:offset + size]
        offset += size
        lay = an.layout(name)
        if lay is not None and relabel and name in relabel:
            lay = Layout(lay.axis, relabel[name])
        if lay is None:
            part[...] = _UNSCALED
            continue
        if isinstance(lay, SpreadLayout):
            part[...] = lay.labels.ravel()
            continue
        view = [1] * len(shape)
        view[lay.axis] = lay.channels
        labels = np.where(lay.pos >= 0, lay.pos, _UNSCALED).reshape(view)
        part.reshape(shape)[...] = np.broadcast_to(labels, shape)
    out[-1] = _PADDING
    return out


def _channel_axis_reference(labels: np.ndarray, preferred: int):
    """`_channel_axis` written plainly: every axis tested, the best kept (used for empty
    tensors, and by the tests as the definition)."""
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


def _channel_axis(labels: np.ndarray, preferred: int):
    """An axis along which each slot holds one label (padding ignored); (axis, slot labels).

    Among such axes the longest wins, then `preferred`, then the last. The axes are tried in
    that order and the first that holds one label per slot is the answer; each test reduces
    over the other axes in place (no moved copy), and without padding reads the labels as
    they are."""
    if labels.size == 0:
        return _channel_axis_reference(labels, preferred)
    order = sorted(range(labels.ndim), key=lambda a: (labels.shape[a], a == preferred, a), reverse=True)
    real = labels != _PADDING
    padded = not real.all()
    if padded:
        hi_src = np.where(real, labels, np.iinfo(np.int64).min)
        lo_src = np.where(real, labels, np.iinfo(np.int64).max)
    for axis in order:
        others = tuple(a for a in range(labels.ndim) if a != axis)
        if not padded:  # every slot holds elements (size > 0) and none is padding
            hi = labels.max(axis=others)
            if np.array_equal(hi, labels.min(axis=others)):
                return axis, hi
            continue
        hi = hi_src.max(axis=others)
        lo = lo_src.min(axis=others)
        empty = ~real.any(axis=others)
        if np.all(empty | (hi == lo)):
            return axis, np.where(empty, _UNSCALED, hi)
    return None


def _copied(labels: np.ndarray, src) -> np.ndarray:
    """The labels of an output whose elements copy the flat elements `src` (-1: none, padding;
    or a `Run`), as a new array.

    `labels` ends with the padding label (`element_labels`), so index -1 reads it."""
    if isinstance(src, Run):
        return labels[src.start:src.start + src.size].reshape(src.shape).copy()
    return labels[src]


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


@dataclass(frozen=True)
class _JoinedAlong:
    """What the analysis keeps of a channel Concat for the path network: the axis its inputs
    are joined along (an index map of the output would hold one int64 per element)."""

    axis: int


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
        if node.op_type == "Concat" and self._channel_concat(node, an, acts):
            return
        maps, _ = _source_maps(g, node)
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
    def _channel_concat(node, an, acts) -> bool:
        """A Concat of activations along the channel axis of every input that has a layout
        (`Layout`, one position per channel): its layout without the element-level detour, when
        it is provably what the general path finds, and for the path network a `Concat`
        primitive instead of an index map. Returns False, having written nothing, for any other
        Concat.

        Each output element copies the element of its input at the same place along the other
        axes, so it carries the label of its channel slot: the inputs' slot labels `v`, joined.
        The Concat's axis holds one label per slot; any other axis holds every label of `v` in
        each of its slots (the tensor is not empty), so it holds one only when `v` is constant,
        a case left to the general path."""
        g = an.graph
        names = list(node.input)
        if not names or any(not n or not g.is_activation(n) for n in names) \
                or not any(a.name == "axis" for a in node.attribute):
            return False
        shapes = {n: tuple(int(d) for d in g.shape(n)) for n in acts}
        rank = len(shapes[acts[0]])
        axis = attr(node, "axis", 0)
        if rank == 0 or not -rank <= axis < rank:
            return False
        axis = normalize_axis(axis, rank)
        if any(len(s) != rank or s[:axis] + s[axis + 1:] != shapes[acts[0]][:axis] + shapes[acts[0]][axis + 1:]
               for s in shapes.values()):
            return False
        parts = []
        for n in names:
            lay = an.layout(n)
            if lay is None:
                parts.append(np.full(shapes[n][axis], _UNSCALED, dtype=np.int64))
            elif type(lay) is Layout and lay.axis == axis and lay.pos.shape == (shapes[n][axis],):
                parts.append(np.where(lay.pos >= 0, lay.pos, _UNSCALED))
            else:
                return False
        slot_labels = np.concatenate(parts)
        if sum(int(np.prod(shapes[n])) for n in names) == 0 or slot_labels.min() == slot_labels.max():
            return False
        an.node_data[g.index(node)] = _JoinedAlong(axis)
        an.set_layout(node.output[0], Layout(axis, slot_labels.astype(np.int64)))
        return True

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
        data = ctx.data(node)
        if isinstance(data, _JoinedAlong):  # a channel Concat: joined as it is, no index map
            return [Concat(tuple(node.input), node.output[0], data.axis)]
        acts = tuple(i for i in dict.fromkeys(node.input) if i and ctx.is_activation(i))
        return [Gather(acts, tuple(o for o in node.output if o), tuple(data))]
