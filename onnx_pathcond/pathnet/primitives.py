"""The path network as data: the primitives an op is made of (docs/design.md §5).

The path network is the model with every parameter squared, ReLU-like activations as the
identity, max pools as sums over their windows and averages weighted by 1/n². Every op of it
is a non-negative linear map of its inputs' masses, plus constants. An op rule describes its
node as a short list of the primitives below; a node's output mass is the sum of what its
primitives contribute. Each executor (numpy, ONNX graph) implements every primitive once: a
forward, the adjoint with respect to its inputs, and the statistic of its parameter
(∂S/∂θ², handed on as a `records.Statistic`).

Primitives name their tensors; they hold no arrays of the model's weights (a `Weight` points
to a parameter use, which the executor reads from the model when it runs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import numpy as np

from ..channels import ParamUse
from ..geometry import Geometry


@dataclass(frozen=True, eq=False)
class Weight:
    """A non-negative factor of the path network.

    `value` None: the parameter `use`, squared (read from the model by the executor), times
    `gain`. Otherwise the fixed array `value` (already squared, e.g. BatchNorm's a²), times
    `gain`. The statistic of the factor goes to `use` when there is one (it is the derivative
    of the output sum with respect to the factor before `gain`).
    """

    use: Optional[ParamUse] = None
    value: Optional[np.ndarray] = None
    gain: float = 1.0

    @property
    def reports(self) -> bool:
        """Whether the executor must compute this factor's statistic."""
        return self.use is not None and not self.use.ignored


class Primitive:
    """One non-negative linear map. `inputs` / `outputs` are tensor names of the model."""

    inputs: Tuple[str, ...] = ()
    outputs: Tuple[str, ...] = ()
    # Cheap to run again (elementwise, copies, window sums): the walk drops its output after
    # the forward pass and recomputes it when the backward pass needs it.
    cheap = True
    # The adjoint or the statistic reads the inputs' forward masses.
    reads_inputs_backward = False
    # The forward may return an array it does not own (its input, a fixed value): the walk
    # never adds into it in place.
    aliases = False


@dataclass(frozen=True, eq=False)
class OneToOne(Primitive):
    """A primitive from one input tensor `x` to one output tensor `y`."""

    x: str
    y: str

    @property
    def inputs(self):
        return (self.x,)

    @property
    def outputs(self):
        return (self.y,)


@dataclass(frozen=True, eq=False)
class Identity(OneToOne):
    """y = x broadcast to y's shape (a copy, ReLU, Dropout, a term of a sum)."""

    aliases = True


@dataclass(frozen=True, eq=False)
class Scale(OneToOne):
    """y = x · w, w (shape `view`) broadcast against x, the result broadcast to y's shape."""

    weight: Weight
    view: Tuple[int, ...]

    @property
    def reads_inputs_backward(self):
        return self.weight.reports


@dataclass(frozen=True, eq=False)
class Bias(Primitive):
    """y += w (shape `view`, broadcast to y's shape). Reads no input."""

    y: str
    weight: Weight
    view: Tuple[int, ...]
    aliases = True  # its contribution may be the fixed value itself

    @property
    def outputs(self):
        return (self.y,)


@dataclass(frozen=True, eq=False)
class Dense(OneToOne):
    """y = gain · X @ W (or gain · W @ X with `weight_left`), W the squared 2-D weight
    (transposed when `weight_transposed`), X the input (its last two axes swapped when
    `x_transposed`; leading axes broadcast as in np.matmul)."""

    weight: Weight
    weight_left: bool = False
    weight_transposed: bool = False
    x_transposed: bool = False
    cheap = False
    reads_inputs_backward = True


@dataclass(frozen=True, eq=False)
class AxisDense(OneToOne):
    """A matrix product along any axis of x: y = gain · transpose(moveaxis(x, axis, -1) @ W, perm),
    W the squared 2-D weight ([in, out], or [out, in] stored when `weight_transposed`). The
    product puts the new axis last, after x's other axes in their order; `perm` then orders
    them as y has them (an `Einsum` such as "nchw,oc->nohw" or "bi,oi->ob")."""

    weight: Weight
    axis: int
    perm: Tuple[int, ...]
    weight_transposed: bool = False
    cheap = False
    reads_inputs_backward = True


@dataclass(frozen=True, eq=False)
class Conv(OneToOne):
    """N-d convolution [N, C, *S] → [N, O, *out] with the squared weight [O, C/groups, *kernel]."""

    weight: Weight
    geometry: Geometry
    groups: int = 1
    cheap = False
    reads_inputs_backward = True


@dataclass(frozen=True, eq=False)
class ConvTranspose(OneToOne):
    """N-d transposed convolution with the squared weight [C, O/groups, *kernel]: each input
    position scatters a window; `scatter` is the geometry of those windows over the full
    output, of which [begin, begin + out_size) is kept."""

    weight: Weight
    scatter: Geometry
    begin: Tuple[int, ...]
    out_size: Tuple[int, ...]
    groups: int = 1
    cheap = False
    reads_inputs_backward = True


@dataclass(frozen=True, eq=False)
class WindowSum(OneToOne):
    """Sum over each window of [N, C, *S] (a max pool in the path network), times the fixed
    per-output-position `weight` (shape out_size) when given (an average pool's 1/n²)."""

    geometry: Geometry
    weight: Optional[np.ndarray] = None


@dataclass(frozen=True, eq=False)
class ReduceSum(OneToOne):
    """Sum over `axes` times `gain`, reshaped to y's shape (global pools, reductions)."""

    axes: Tuple[int, ...]
    gain: float = 1.0


@dataclass(frozen=True)
class Run:
    """A Gather map that reads a contiguous run of its inputs' flat elements,
    [start, start + size), laid out in `shape`: a Reshape, or a Split or Slice of whole slabs
    at batch one. Held as its bounds, not as one int64 per element."""

    start: int
    shape: Tuple[int, ...]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def array(self) -> np.ndarray:
        """The map written out, one flat index per element."""
        return np.arange(self.start, self.start + self.size, dtype=np.int64).reshape(self.shape)


def compact_map(src: np.ndarray):
    """`src` (flat indices, −1 for none) as a `Run` when it is one, else `src` itself."""
    flat = src.ravel()
    if flat.size and flat[0] >= 0 and (flat.size == 1 or bool((np.diff(flat) == 1).all())):
        return Run(int(flat[0]), tuple(int(d) for d in src.shape))
    return src


@dataclass(frozen=True, eq=False)
class Gather(Primitive):
    """Pure moves of elements: output element j of `ys[k]` copies element `maps[k][j]` of the
    inputs `xs` flattened one after another, or is zero where the map holds -1 (a map is an
    int64 array of the output's shape, or a `Run`)."""

    xs: Tuple[str, ...]
    ys: Tuple[str, ...]
    maps: Tuple[Union[np.ndarray, Run], ...]
    aliases = True  # a map that is a contiguous run of one input is read as a view of it

    @property
    def inputs(self):
        return self.xs

    @property
    def outputs(self):
        return self.ys


@dataclass(frozen=True, eq=False)
class Concat(Primitive):
    """y = the inputs `xs` (a name may come twice) joined along `axis`: a Concat of tensors
    whose other axes agree, with no index map (its adjoint is the split of y's)."""

    xs: Tuple[str, ...]
    y: str
    axis: int

    @property
    def inputs(self):
        return self.xs

    @property
    def outputs(self):
        return (self.y,)


@dataclass(frozen=True, eq=False)
class AxisMatrices(OneToOne):
    """y = x with `matrices[k]` (non-negative, [out, in]) applied along axis `first_axis + k`."""

    matrices: Tuple[np.ndarray, ...]
    first_axis: int = 2
