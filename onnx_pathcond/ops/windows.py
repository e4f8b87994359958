"""Sliding windows for N-d convolutions and pools in numpy.

A window view of a padded `[C, *S]` array has shape `[C, *kernel, *out]`: element
`[c, k..., p...]` is input position `p·stride + k·dilation` (in padded coordinates).
Forward ops contract or sum over the kernel axes of that view; their adjoints scatter
back with one strided slice per kernel offset (a loop over at most a few dozen offsets,
never over channels or positions).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ..graph import attr


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


def pad_input(x: np.ndarray, geo: Geometry) -> np.ndarray:
    """`x` of shape [C, *S] embedded in zeros of shape [C, *padded_size]."""
    xp = np.zeros((x.shape[0],) + geo.padded_size, dtype=x.dtype)
    index = (slice(None),) + tuple(slice(b, b + s) for b, s in zip(geo.pads_begin, geo.in_size))
    xp[index] = x
    return xp


def crop_input(xp: np.ndarray, geo: Geometry) -> np.ndarray:
    index = (slice(None),) + tuple(slice(b, b + s) for b, s in zip(geo.pads_begin, geo.in_size))
    return xp[index]


def window_view(xp: np.ndarray, geo: Geometry) -> np.ndarray:
    """Read-only view [C, *kernel, *out] of a padded array [C, *padded_size]."""
    xp = np.ascontiguousarray(xp)
    nd = len(geo.kernel)
    s = xp.strides
    shape = (xp.shape[0],) + geo.kernel + geo.out_size
    strides = ((s[0],) + tuple(s[1 + i] * geo.dilations[i] for i in range(nd))
               + tuple(s[1 + i] * geo.strides[i] for i in range(nd)))
    return as_strided(xp, shape=shape, strides=strides, writeable=False)


def scatter_windows(cols: np.ndarray, geo: Geometry) -> np.ndarray:
    """Adjoint of `window_view`: sum cols [C, *kernel, *out] into a padded [C, *padded_size]."""
    out = np.zeros((cols.shape[0],) + geo.padded_size, dtype=cols.dtype)
    for offset in itertools.product(*(range(k) for k in geo.kernel)):
        index = (slice(None),) + tuple(
            slice(k * d, k * d + (o - 1) * st + 1, st)
            for k, d, o, st in zip(offset, geo.dilations, geo.out_size, geo.strides))
        out[index] += cols[(slice(None),) + offset]
    return out


def window_count_weights(geo: Geometry, include_pad: bool) -> np.ndarray:
    """Squared edge weight 1/n² of an average pool, per output position.

    n counts the window elements inside the input, plus those inside the explicit pads when
    `include_pad`; elements past the pads (ceil_mode overhang) never count.
    """
    mask = np.zeros((1,) + geo.padded_size)
    if include_pad:
        index = (0,) + tuple(slice(0, b + s + e) for b, s, e in zip(geo.pads_begin, geo.in_size, geo.pads_end))
    else:
        index = (0,) + tuple(slice(b, b + s) for b, s in zip(geo.pads_begin, geo.in_size))
    mask[index] = 1.0
    nd = len(geo.kernel)
    counts = window_view(mask, geo).sum(axis=tuple(range(1, 1 + nd)))[0]
    return 1.0 / np.square(np.maximum(counts, 1.0))
