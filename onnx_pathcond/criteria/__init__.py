"""Criteria: what the rescaling minimises, as registered rules (docs/adding-a-criterion.md).

A criterion is one `Criterion` subclass, registered by name with `@register`. It says whether
it needs diag(G), whether it works with `bn_statistics`, its solver defaults, and provides the
three things a run asks of it:

* `build(graph, analysis, groups, statistics)`: its problem for the solvers (an object with
  `H`, `p`, `objective(u)`, `evaluate(u)` -> (F, ∇F, Hessian diagonal over p)). `statistics`
  is a function that runs the path network into a sink and returns what ran it; a criterion
  that needs no diag(G) never calls it;
* `descend(problem, max_iter, tol, progress, bounds)`: its coordinate descent (the default
  solver); the exact solver (`solve.exact_minimiser`) is generic;
* `summary(problem, result)`: its record for the report.

The run (`api`, `plan`), the options and the report read these attributes; none of them
branches on a criterion's name.
"""

from __future__ import annotations

from .base import Criterion, check_bn_statistics, get, names, register, solver_settings  # noqa: F401  (the interface)
from . import pathcond, enorm  # noqa: E402,F401  (registers the built-in criteria, in this order)
