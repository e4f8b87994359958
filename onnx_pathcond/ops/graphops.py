"""Windows of N-d convolutions and pools written with ONNX ops that run in float64 anywhere.

The mirror of `windows.py` for the onnxruntime backend: a window view becomes one strided
Slice per kernel offset of the zero-padded input, and its adjoint places each offset's
values back with a stride dilation (interleaved zeros) and a Pad, then sums the offsets.
"""

from __future__ import annotations

import itertools
from typing import List

from .windows import Geometry


def pad_input(b, x: str, geo: Geometry) -> str:
    """[1, C, *S] → [1, C, *padded_size] (zeros around)."""
    end = [p - s - a for p, s, a in zip(geo.padded_size, geo.in_size, geo.pads_begin)]
    if not any(geo.pads_begin) and not any(end):
        return x
    return b.op("Pad", [x, b.ints([0, 0] + list(geo.pads_begin) + [0, 0] + end)])


def crop_input(b, xp: str, geo: Geometry) -> str:
    nd = len(geo.kernel)
    if all(p == s for p, s in zip(geo.padded_size, geo.in_size)) and not any(geo.pads_begin):
        return xp
    return b.op("Slice", [xp, b.ints(geo.pads_begin), b.ints([a + s for a, s in zip(geo.pads_begin, geo.in_size)]),
                          b.ints(range(2, 2 + nd))])


def offsets(geo: Geometry):
    return list(itertools.product(*(range(k) for k in geo.kernel)))


def window_slices(b, xp: str, geo: Geometry) -> List[str]:
    """One [1, C, *out] tensor per kernel offset: element p is xp[p·stride + k·dilation]."""
    nd = len(geo.kernel)
    axes = b.ints(range(2, 2 + nd))
    steps = b.ints(geo.strides)
    parts = []
    for k in offsets(geo):
        starts = [ki * d for ki, d in zip(k, geo.dilations)]
        ends = [s + (o - 1) * st + 1 for s, o, st in zip(starts, geo.out_size, geo.strides)]
        parts.append(b.op("Slice", [xp, b.ints(starts), b.ints(ends), axes, steps]))
    return parts


def dilate(b, t: str, shape, geo: Geometry, first_axis: int = 2) -> str:
    """Insert stride−1 zeros between neighbours along the spatial axes of t (of `shape`)."""
    shape = list(shape)
    for i, st in enumerate(geo.strides):
        if st == 1:
            continue
        axis = first_axis + i
        n = shape[axis]
        t = b.op("Unsqueeze", [t, b.ints([axis + 1])])
        pads = [0] * (2 * (len(shape) + 1))
        pads[len(shape) + 1 + axis + 1] = st - 1
        t = b.op("Pad", [t, b.ints(pads)])
        merged = shape[:axis] + [n * st] + shape[axis + 1:]
        t = b.reshape(t, merged)
        t = b.op("Slice", [t, b.ints([0]), b.ints([(n - 1) * st + 1]), b.ints([axis])])
        shape[axis] = (n - 1) * st + 1
    return t


def scatter_windows(b, parts: List[str], channels: int, geo: Geometry) -> str:
    """Adjoint of `window_slices`: sum each offset's [1, C, *out] into [1, C, *padded_size]."""
    dilated_size = [(o - 1) * st + 1 for o, st in zip(geo.out_size, geo.strides)]
    placed = []
    for k, part in zip(offsets(geo), parts):
        d = dilate(b, part, [1, channels] + list(geo.out_size), geo)
        begin = [ki * dd for ki, dd in zip(k, geo.dilations)]
        end = [p - bg - ds for p, bg, ds in zip(geo.padded_size, begin, dilated_size)]
        placed.append(b.op("Pad", [d, b.ints([0, 0] + begin + [0, 0] + end)]) if any(begin) or any(end) else d)
    return placed[0] if len(placed) == 1 else b.op("Sum", placed)


def columns(b, x: str, channels: int, groups: int, geo: Geometry) -> str:
    """im2col: [G, Cg·K, P] from x [1, C, *S] (the windows of every offset, stacked)."""
    K = geo.kernel_volume
    P = 1
    for o in geo.out_size:
        P *= o
    per_group = channels // groups
    parts = [b.reshape(p, [groups, per_group, 1, P]) for p in window_slices(b, pad_input(b, x, geo), geo)]
    stacked = parts[0] if K == 1 else b.op("Concat", parts, axis=2)
    return b.reshape(stacked, [groups, per_group * K, P])


def scatter_columns(b, cols: str, channels: int, geo: Geometry) -> str:
    """Adjoint of `columns` (up to the padding crop): [G, Cg·K, P] → [1, C, *S]."""
    K = geo.kernel_volume
    per_offset = b.reshape(cols, [1, channels, K] + list(geo.out_size))
    parts = []
    for k in range(K):
        one = b.op("Slice", [per_offset, b.ints([k]), b.ints([k + 1]), b.ints([2])])
        parts.append(b.reshape(one, [1, channels] + list(geo.out_size)))
    return crop_input(b, scatter_windows(b, parts, channels, geo), geo)
