"""When a float32 walk of the path network is as good as a float64 one, and by how much it
can differ (docs/design.md §2.6).

Every quantity of the path network is non-negative, so a float32 walk loses nothing to
cancellation; what it can lose is range. A product too small for a normal float32 is
rounded with a large relative error, or to exactly zero, and a zero g is left out of the
criterion (§3.2), which changes its number of entries p. `RangeGuard` rules that out: it is
shown the operands of every product the walk forms, kind by kind (squared weights; scalar
gains and fixed weights; the factors made of them; masses; adjoints; statistics before their
gain), and requires that every non-zero operand is a normal float32, that the product of the
smallest non-zero operands of any two kinds that are multiplied together is one too, and
that no statistic is infinite or NaN (an infinite or NaN operand reaches the statistics that
depend on it; one that reaches none does not matter). Then every product and every sum
behind a statistic is a normal number, a positive result is never zero, and each rounding
has relative error at most u = 2⁻²⁴. The guard costs one pass (a minimum) over each array
it is shown, one more (a maximum) over each statistic.

The bound: a g entry is a sum of products along the paths through it; each term goes through
at most D roundings, where D is the longest chain of roundings the walk counts for it
(`PathWalk.rounding_depth`). With non-negative terms the computed g is then within a factor
(1 ± γ_D) of the exact one, γ_D = D·u / (1 − D·u), in whatever order BLAS adds.
"""

from __future__ import annotations

import math

import numpy as np

UNIT_ROUNDOFF_FLOAT32 = 2.0 ** -24
_SMALLEST_NORMAL = float(np.finfo(np.float32).tiny)

# The kinds of operands, and which kinds the numpy executor multiplies together.
SQUARE, SCALAR, FACTOR, MASS, ADJOINT, STATISTIC = "square", "scalar", "factor", "mass", "adjoint", "statistic"
_PRODUCTS = ((SQUARE, SCALAR), (SQUARE, MASS), (SQUARE, ADJOINT), (FACTOR, MASS), (FACTOR, ADJOINT),
             (MASS, SCALAR), (ADJOINT, SCALAR), (MASS, ADJOINT), (STATISTIC, SCALAR))


class PrecisionLost(Exception):
    """A float32 walk met a value outside the range where its bound holds (the message says
    which); the statistics are computed again in float64."""


def relative_bound(depth: int) -> float:
    """γ_D: the relative error of a sum of non-negative products through at most `depth`
    float32 roundings (inf when the bound says nothing)."""
    du = depth * UNIT_ROUNDOFF_FLOAT32
    return du / (1.0 - du) if du < 1.0 else math.inf


def smallest_magnitude(values: np.ndarray) -> float:
    """The smallest non-zero |x| of `values` (inf: none), in float64. float32 and float16
    arrays are read through their bits (sign cleared, minus one, so that zeros wrap to the
    largest pattern): three passes with no mask and no absolute values."""
    values = np.asarray(values)
    bits = {np.dtype(np.float32): (np.uint32, 0x7FFFFFFF), np.dtype(np.float16): (np.uint16, 0x7FFF)}.get(values.dtype)
    if bits is None or not values.flags.c_contiguous or not values.size:
        return float(np.min(np.abs(values), where=values != 0, initial=math.inf)) if values.size else math.inf
    kind, sign_cleared = bits
    pattern = np.bitwise_and(values.view(kind), kind(sign_cleared))
    pattern -= kind(1)  # a zero wraps to the largest pattern
    least = pattern.min()
    if least == np.iinfo(kind).max:
        return math.inf
    return float(np.array([least + kind(1)], dtype=kind).view(values.dtype)[0])


class RangeGuard:
    """The smallest non-zero operand seen of each kind; raises `PrecisionLost` as soon as
    one is not a normal float32, is infinite or NaN, or a product of two kinds multiplied
    together could leave the normal range."""

    def __init__(self):
        self.smallest = {kind: math.inf for kind in (SQUARE, SCALAR, FACTOR, MASS, ADJOINT, STATISTIC)}

    def scalar(self, value: float, kind: str = SCALAR) -> None:
        value = float(value)
        if not math.isfinite(value) or 0.0 < abs(value) < _SMALLEST_NORMAL:
            raise PrecisionLost(f"{kind} {value:.3g} is outside float32's normal range")
        if 0.0 < value < self.smallest[kind]:
            self._lower(kind, value)

    def array(self, value: np.ndarray, kind: str) -> float:
        """Show an array of `kind`; returns its smallest non-zero element (inf: none)."""
        low = self._smallest_nonzero(value, kind)
        self.note(kind, low)
        return low

    def made(self, value: np.ndarray, source: np.ndarray, kind: str = SQUARE, squared: bool = True) -> float:
        """Show an array made in float32 from `source`, squared (a parameter) or cast (a
        fixed value): a non-zero element that became zero is refused too. Returns the
        smallest non-zero element. One pass (a minimum) where `value` has no zero; where it
        has some (a weight with a few exact zeros), the smallest non-zero magnitude of the
        source gives the smallest non-zero element, rounded as the walk rounds it."""
        def from_source() -> float:
            magnitude = smallest_magnitude(source)
            return float(np.float32(magnitude * magnitude if squared else magnitude))

        low = self._smallest_nonzero(value, kind, from_source)
        self.note(kind, low)
        return low

    def note(self, kind: str, low: float) -> None:
        """The smallest non-zero element of an array of `kind`, already known."""
        if low < self.smallest[kind]:
            self._lower(kind, low)

    def result(self, value: np.ndarray) -> None:
        """A statistic as handed on (nothing multiplies it again): finite. Its non-zero
        entries are normal already: each has a term that is a product of two operands the
        guard was shown."""
        if value.size:
            high = float(value.max())
            if not math.isfinite(high):
                raise PrecisionLost(f"statistic reached {high}")

    def product(self, left: np.ndarray, right: np.ndarray) -> None:
        """A statistic handed on as two factors, multiplied later (left @ rightᵀ): each
        finite and normal, and the product of their smallest non-zero elements normal too."""
        self.result(left)
        self.result(right)
        low = self._smallest_nonzero(left, STATISTIC) * self._smallest_nonzero(right, STATISTIC)
        if low < _SMALLEST_NORMAL:
            raise PrecisionLost(f"a statistic's factors multiply to {low:.3g}, below float32's normal range")

    @staticmethod
    def _smallest_nonzero(value: np.ndarray, kind: str, where_zero=None) -> float:
        """The smallest non-zero element (inf: none), refused unless normal; where `value` has
        zeros it comes from `where_zero()` when given (else a masked minimum)."""
        if not value.size:
            return math.inf
        low = float(value.min())
        if math.isnan(low):
            raise PrecisionLost(f"{kind} is NaN")
        if low == 0.0:  # zeros are exact: the smallest of the others counts
            low = where_zero() if where_zero is not None else float(np.min(value, where=value > 0, initial=math.inf))
        if low < _SMALLEST_NORMAL:
            raise PrecisionLost(f"{kind} {low:.3g} is below float32's normal range")
        return low

    def _lower(self, kind: str, value: float) -> None:
        self.smallest[kind] = value
        for a, b in _PRODUCTS:
            if kind in (a, b) and self.smallest[a] * self.smallest[b] < _SMALLEST_NORMAL:
                raise PrecisionLost(f"{a} {self.smallest[a]:.3g} times {b} {self.smallest[b]:.3g} is below "
                                    f"float32's normal range")
