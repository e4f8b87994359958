"""The geometry of sliding windows: convolutions, transposed convolutions and pools.

A `Geometry` says where every window of an N-d convolution or pool reads: input position
`p·stride + k·dilation − pad_begin` for output position p and kernel offset k. Rules compute
it from the node's attributes; both executors of the path network read it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

from .nodes import attr


@dataclass(frozen=True)
class Geometry:
    kernel: Tuple[int, ...]
    strides: Tuple[int, ...]
    dilations: Tuple[int, ...]
    pads_begin: Tuple[int, ...]
    pads_end: Tuple[int, ...]
    in_size: Tuple[int, ...]
    out_size: Tuple[int, ...]

    @property
    def padded_size(self) -> Tuple[int, ...]:
        """Extent of the zero-padded input that every window fits in."""
        return tuple(max(b + s + e, (o - 1) * st + (k - 1) * d + 1)
                     for b, s, e, o, st, k, d in zip(self.pads_begin, self.in_size, self.pads_end, self.out_size,
                                                     self.strides, self.kernel, self.dilations))

    @property
    def kernel_volume(self) -> int:
        return int(np.prod(self.kernel))


def geometry(node, in_size: Sequence[int], kernel: Sequence[int], out_size: Optional[Sequence[int]] = None,
             ceil_mode: bool = False) -> Geometry:
    """Strides, dilations and begin/end pads of a Conv or pool node, auto_pad resolved."""
    nd = len(in_size)
    strides = tuple(attr(node, "strides", None) or [1] * nd)
    dilations = tuple(attr(node, "dilations", None) or [1] * nd)
    auto_pad = attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    extent = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        outs = [math.ceil(s / st) for s, st in zip(in_size, strides)]
        total = [max(0, (o - 1) * st + e - s) for o, st, e, s in zip(outs, strides, extent, in_size)]
        if auto_pad == "SAME_UPPER":
            begin = [t // 2 for t in total]
        else:
            begin = [t - t // 2 for t in total]
        end = [t - b for t, b in zip(total, begin)]
    elif auto_pad == "VALID":
        begin = [0] * nd
        end = [0] * nd
    else:
        pads = attr(node, "pads", None) or [0] * (2 * nd)
        begin, end = list(pads[:nd]), list(pads[nd:])
    if out_size is None:
        out = []
        for s, b, e, ex, st in zip(in_size, begin, end, extent, strides):
            span = s + b + e - ex
            o = (math.ceil(span / st) if ceil_mode else span // st) + 1
            if ceil_mode and (o - 1) * st >= s + b:
                o -= 1  # the last window must start inside the input or its begin padding
            out.append(o)
        out_size = out
    return Geometry(tuple(kernel), strides, dilations, tuple(begin), tuple(end), tuple(in_size), tuple(out_size))


def transpose_geometry(node, in_size, kernel, out_size):
    """Geometry of ConvTranspose seen as a scatter: windows sit at input positions."""
    nd = len(in_size)
    strides = tuple(attr(node, "strides", None) or [1] * nd)
    dilations = tuple(attr(node, "dilations", None) or [1] * nd)
    out_pad = tuple(attr(node, "output_padding", None) or [0] * nd)
    full = tuple((s - 1) * st + (k - 1) * d + 1 for s, st, k, d in zip(in_size, strides, kernel, dilations))
    auto_pad = attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    pads = attr(node, "pads", None)
    if out_size is None:
        given = attr(node, "output_shape", None)
        if given is not None:
            out_size = tuple(given[-nd:])
    if pads is not None and auto_pad == "NOTSET" and attr(node, "output_shape", None) is None:
        begin = tuple(pads[:nd])
        if out_size is None:
            out_size = tuple(f + op - b - e for f, op, b, e in zip(full, out_pad, pads[:nd], pads[nd:]))
    else:
        if out_size is None:
            if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
                out_size = tuple(s * st for s, st in zip(in_size, strides))
            else:
                out_size = tuple(f + op for f, op in zip(full, out_pad))
        total = [f + op - o for f, op, o in zip(full, out_pad, out_size)]
        if auto_pad == "SAME_UPPER":
            begin = tuple(t // 2 for t in total)
        else:
            begin = tuple(t - t // 2 for t in total)
    scatter = Geometry(tuple(kernel), strides, dilations, (0,) * nd, (0,) * nd, full, tuple(in_size))
    return scatter, begin, tuple(out_size)


def window_count_weights(geo: Geometry, include_pad: bool) -> np.ndarray:
    """Squared edge weight 1/n² of an average pool, per output position (shape `out_size`).

    n counts the window elements inside the input, plus those inside the explicit pads when
    `include_pad`; elements past the pads (ceil_mode overhang) never count. Counted per axis
    (a window is a box, so its count is the product of its extent on each axis).
    """
    counts = np.ones(geo.out_size)
    for axis, (k, st, d, b, s, e, o) in enumerate(zip(geo.kernel, geo.strides, geo.dilations, geo.pads_begin,
                                                         geo.in_size, geo.pads_end, geo.out_size)):
        lo, hi = (0, b + s + e) if include_pad else (b, b + s)
        taps = np.arange(o)[:, None] * st + np.arange(k)[None, :] * d  # padded coordinates
        along = ((taps >= lo) & (taps < hi)).sum(axis=1).astype(np.float64)
        view = [1] * len(geo.out_size)
        view[axis] = o
        counts = counts * along.reshape(view)
    return 1.0 / np.square(np.maximum(counts, 1.0))
