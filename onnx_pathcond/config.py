"""A run's options as one validated record: the single source of their defaults and checks.

`SolveOptions` is what a solve on a plan takes (criterion, solver and its stopping rule, where
diag(G) is computed); `RescaleOptions` adds what a whole run takes (input shapes, BatchNorm
statistics, the check). `rescale`, `rescale_file`, `RescalingPlan.solve` and
`onnx_pathcond.torch` build them from keywords, so a bad value is refused in one place, with the
same message, before any work. The defaults themselves are named in `options.py`, which the
command line's `--help` reads without importing numpy or onnx.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

from . import criteria, options
from .errors import InputError, option
from .options import SolverSettings

InputShapes = Union[Mapping[str, Sequence[int]], Sequence[str], None]


def _set(record, name: str, value) -> None:
    object.__setattr__(record, name, value)  # a frozen record normalising its own field


@dataclass(frozen=True)
class SolveOptions:
    """criterion: "pathcond" or "enorm"; solver: "cd" or "exact"; max_iter and tol: None for
    that solver's own defaults for the criterion (`settings` gives the values that run);
    backend and device: what computes diag(G); precision: "auto" (float32 where proven as
    good, docs/design.md §2.6) or "float64", the numpy walk's arithmetic."""

    criterion: str = options.DEFAULT_CRITERION
    solver: str = options.DEFAULT_SOLVER
    max_iter: Optional[int] = None
    tol: Optional[float] = None
    backend: str = options.DEFAULT_BACKEND
    device: str = options.DEFAULT_DEVICE
    precision: str = options.DEFAULT_PRECISION

    def __post_init__(self):
        criteria.get(self.criterion)  # an unknown criterion is refused with the registered ones
        if self.max_iter is not None:
            if isinstance(self.max_iter, bool) or not isinstance(self.max_iter, numbers.Integral):
                raise InputError(f"{option('max_iter')} must be a whole number, not {self.max_iter!r}")
            _set(self, "max_iter", int(self.max_iter))
        if self.tol is not None:
            _set(self, "tol", _number("tol", self.tol))
        criteria.solver_settings(self.solver, self.max_iter, self.tol, self.criterion)
        options.check_backend(self.backend, self.device)
        options.check_precision(self.precision)

    @property
    def settings(self) -> SolverSettings:
        """The solver with the max_iter and tol it runs with (its defaults filled in)."""
        return criteria.solver_settings(self.solver, self.max_iter, self.tol, self.criterion)

    @classmethod
    def names(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def of(cls, given: Optional["SolveOptions"] = None, **changes):
        """`given` (or the defaults) with `changes`; a keyword that is not an option is refused."""
        unknown = [key for key in changes if key not in cls.names()]
        if unknown:
            raise InputError(f"unknown option {unknown[0]}= (the options are {', '.join(cls.names())})")
        if given is None:
            return cls(**changes)
        if not isinstance(given, cls):
            raise InputError(f"options must be a {cls.__name__}, not {type(given).__name__}")
        return dataclasses.replace(given, **changes) if changes else given

    def replace(self, **changes):
        """A copy with `changes`, checked as a new record is."""
        return type(self).of(self, **changes)


@dataclass(frozen=True)
class RescaleOptions(SolveOptions):
    """SolveOptions, and: input_shapes ({"x": (1, 3, 224, 224)} or ["x:1x3x224x224"], held as a
    dict) fixing dynamic input dimensions; bn_statistics (a BatchNorm's input channels carry
    their scale in its running statistics); verify_output, rtol (None: by the model's
    precision) and seed of the check on random inputs."""

    input_shapes: InputShapes = None
    bn_statistics: bool = options.BN_STATISTICS
    verify_output: bool = True
    rtol: Optional[float] = None
    seed: int = options.DEFAULT_SEED

    def __post_init__(self):
        super().__post_init__()
        _set(self, "input_shapes", _shapes(self.input_shapes))
        for name in ("bn_statistics", "verify_output"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{option(name)} must be True or False, not {getattr(self, name)!r}")
        criteria.check_bn_statistics(self.bn_statistics, self.criterion)
        if self.rtol is not None:
            _set(self, "rtol", _number("rtol", self.rtol))
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise InputError(f"{option('seed')} must be an integer, not {self.seed!r}")

    def solve_options(self) -> SolveOptions:
        return SolveOptions(**{name: getattr(self, name) for name in SolveOptions.names()})


def _number(name: str, value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{option(name)} must be a finite number >= 0, not {value!r}") from None
    options.check_tolerance(name, number)
    return number


def _shapes(given: InputShapes) -> Dict[str, Tuple[int, ...]]:
    from .shapes import parse_input_shapes  # numpy and onnx: only once a record is made

    if given is None:
        return {}
    if isinstance(given, str):
        given = [given]
    if isinstance(given, Mapping):
        return parse_input_shapes([f"{name}:{'x'.join(str(d) for d in _dims(name, dims))}"
                                   for name, dims in given.items()])
    return parse_input_shapes(list(given))


def _dims(name: str, dims) -> Sequence[int]:
    whole = (lambda d: isinstance(d, numbers.Integral) and not isinstance(d, bool))  # noqa: E731
    if isinstance(dims, (str, bytes)) or not hasattr(dims, "__iter__") or not all(whole(d) for d in dims):
        raise InputError(f"{option('input_shapes')} for '{name}' must be a tuple of positive integers, not {dims!r}")
    return dims
