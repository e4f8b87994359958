"""The criterion interface and its registry (see the package's docstring)."""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

from ..errors import InputError, option
from ..options import DEFAULT_CRITERION, DEFAULT_SOLVER, SOLVERS, SolverSettings, check_tolerance

_REGISTRY: Dict[str, "Criterion"] = {}


class Criterion:
    name: str = ""
    needs_diag_g: bool = True
    supports_bn_statistics: bool = False
    # per solver ("cd", "exact"): its default max_iter and tol for this criterion
    solvers: Dict[str, SolverSettings] = {}
    objective: str = ""  # what F is, in words (the report's criterion record)

    def build(self, graph, analysis, groups, statistics: Callable, progress: Optional[Callable] = None
              ) -> Tuple[object, Optional[object]]:
        """(problem, runtime): the problem the solvers minimise, and what computed diag(G)
        (None when the criterion needs none)."""
        raise NotImplementedError

    def descend(self, problem, max_iter: int, tol: float, progress=None, bounds=None):
        """Coordinate descent on the problem, from u = 0, within `bounds`."""
        raise NotImplementedError

    def summary(self, problem, result):
        """The report's CriterionSummary for `result` (a solve.SolveResult)."""
        raise NotImplementedError

    def certified(self, problem, result, relative_error: float) -> bool:
        """Whether `result`, found on a problem whose diag(G) entries are each within a
        factor 1 ± `relative_error` of the exact ones, is proven no worse than no rescaling
        on the exact problem. A criterion that cannot tell says False: its statistics are
        then computed in float64 (docs/design.md §2.6)."""
        return False


def register(cls):
    """Class decorator: one instance of the criterion, under its name."""
    instance = cls()
    if not instance.name or instance.name in _REGISTRY:
        raise ValueError(f"criterion name {instance.name!r} is empty or taken")
    _REGISTRY[instance.name] = instance
    return cls


def get(name: str) -> Criterion:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InputError(f"unknown criterion '{name}' (choose {' or '.join(_REGISTRY)})") from None


def names() -> Tuple[str, ...]:
    return tuple(_REGISTRY)


def solver_settings(solver: str = DEFAULT_SOLVER, max_iter: Optional[int] = None,
                    tol: Optional[float] = None, criterion: str = DEFAULT_CRITERION) -> SolverSettings:
    """`solver` with `max_iter` and `tol` as given, or its own defaults for `criterion` where
    they are None."""
    rule = get(criterion)
    if solver not in SOLVERS:
        raise InputError(f"unknown {option('solver')} '{solver}' (choose {' or '.join(SOLVERS)})")
    default = rule.solvers[solver]
    settings = SolverSettings(solver, default.max_iter if max_iter is None else max_iter,
                              default.tol if tol is None else tol)
    if settings.max_iter < 0:
        raise InputError(f"{option('max_iter')} must not be negative")
    check_tolerance("tol", settings.tol)
    return settings


def check_bn_statistics(bn_statistics: bool, criterion: str) -> None:
    """Only a criterion that says so works with bn_statistics (ENorm does not: see its rule)."""
    if bn_statistics and not get(criterion).supports_bn_statistics:
        able = [name for name in names() if get(name).supports_bn_statistics]
        raise InputError(f"{option('bn_statistics', True)} works with the {' or '.join(able)} criterion only, not with {criterion}")
