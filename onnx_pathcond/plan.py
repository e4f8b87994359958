"""Analyse once, rescale many times: the rescaling plan (docs/design.md §4.6).

A `RescalingPlan` holds what depends on the graph only: the graph view, the symmetry
analysis, the groups and the path network's structure. Each `solve` runs the steps that
depend on the weight values (statistics or norms, bounds, solver) on the values the plan holds
now, and `new_values` / `factors` turn its log-rescalings into new tensors or element-wise
factors. `update` gives the plan new weight values (a training loop's current parameters):
no export, no new analysis, no file.

The analysis reads a few values: constants that shape the graph (a Clip's bounds, a
Reshape's target, ...) and, for tensors read by several nodes, which elements are zero. When
`update` changes one of those, the plan analyses again (`reanalysed` counts it), so a solve
always describes the model as it now is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import onnx

from . import activations, bounds, criteria, options, rewrite, solve, stats
from .config import SolveOptions
from .options import DEFAULT_SOLVER
from .errors import InputError, ModelError
from .graph import Graph
from .nodes import node_label
from .shapes import parse_input_shapes
from .modelfile import ModelFile
from .symmetry import analyse, build_groups

Clock = Callable[..., object]  # clock(step, announce=True) -> a context manager that times the step


def _no_clock(step: str, announce: bool = True):
    import contextlib
    return contextlib.nullcontext()


@dataclass
class Solution:
    """One solve: the log-rescalings `u` (λ = exp(u/2) per group) and how they were found."""

    u: np.ndarray
    result: solve.SolveResult
    problem: object
    runtime: Optional[object]  # what computed diag(G) (None: the criterion needs none)
    limits: bounds.Bounds
    criterion: criteria.Criterion
    settings: options.SolverSettings


@dataclass
class TensorFactor:
    """How one stored tensor changes: new = old·factor, or (old + offset)·factor − offset
    with an offset (a running variance under bn_statistics). `factor` is float64, in the
    stored layout, broadcastable to the tensor (a per-row or per-column vector stays one)."""

    name: str
    factor: np.ndarray
    offset: float = 0.0

    incoming: Optional[np.ndarray] = None  # the two sides, when `factor` is their product
    outgoing: Optional[np.ndarray] = None

    def full(self, shape: Tuple[int, ...]) -> np.ndarray:
        return np.broadcast_to(self.factor, shape)

    def largest_log(self) -> float:
        """max |log factor| over the elements, from the two sides' own values where they vary
        along different axes (then the extremes of the sum of logs are the sums of extremes)."""
        if self.incoming is None or self.outgoing is None or not self.factor.size:
            return float(np.abs(np.log(self.factor)).max()) if self.factor.size else 0.0
        sides = rewrite.separate_sides(self.incoming, self.outgoing)
        if sides is None:  # they share an axis
            return float(np.abs(np.log(self.factor)).max())
        la, lb = np.log(sides[0]), np.log(sides[1])
        return float(max(abs(la.max() + lb.max()), abs(la.min() + lb.min())))


class RescalingPlan:
    """The analysis of one model, kept to solve on new weight values any number of times."""

    def __init__(self, model: Union[ModelFile, onnx.ModelProto], input_shapes=None,
                 bn_statistics: bool = options.BN_STATISTICS):
        if isinstance(input_shapes, (list, tuple)):
            input_shapes = parse_input_shapes(input_shapes)
        self.file = model if isinstance(model, ModelFile) else ModelFile(model)
        self.input_shapes = input_shapes
        self.bn_statistics = bn_statistics
        self.reanalysed = 0
        # Whether a float32 solve of this plan has failed its certificate: a plan re-solved
        # near its optimum (a schedule) would pay for float32 and then float64 every time.
        self.float32_declined = False
        self._analyse({})

    def _analyse(self, values: Dict[str, np.ndarray]) -> None:
        self.graph = Graph(self.file, self.input_shapes, values)
        self.analysis = analyse(self.graph, bn_statistics=self.bn_statistics)
        self.groups = build_groups(self.analysis)
        self._read_by_analysis = {name: np.array(self.graph.initializer_value(name), copy=True)
                                  for name in self.graph.values_read}
        check_finite(self.graph, self.analysis)
        _check_not_empty(self.analysis)

    # ------------------------------------------------------------------ weights
    @property
    def parameters(self) -> List[str]:
        """The stored tensors (initializers) a rescaling can change, each once."""
        names = []
        for use in self.analysis.uses:
            if use.ref is not None and not use.ignored and use.ref.kind == "initializer" and use.ref.name not in names:
                names.append(use.ref.name)
        return names

    def value(self, name: str) -> np.ndarray:
        """The value the plan holds now for initializer `name`."""
        return self.graph.initializer_value(name)

    def update(self, values: Mapping[str, np.ndarray]) -> bool:
        """Hold new values for some initializers (by name; shapes as in the model). Returns
        True when a value the analysis depends on changed, so the plan analysed again."""
        checked = {}
        for name, value in values.items():
            tensor = self.graph.initializers.get(name)
            if tensor is None:
                raise InputError(f"'{name}' is not an initializer of the model: the plan has no value by that name")
            value = np.asarray(value)
            if tuple(value.shape) != tuple(tensor.dims):
                raise InputError(f"new value of '{name}' has shape {list(value.shape)}, the model's is {list(tensor.dims)}")
            checked[name] = value
        if not checked:
            return False
        structural = any(name in self._read_by_analysis and not np.array_equal(value, self._read_by_analysis[name])
                         for name, value in checked.items())
        if not structural:
            for name, value in checked.items():
                mask = self.analysis.changing_elements.get(name)
                if mask is not None:
                    use = next(u for u in self.analysis.uses if u.ref is not None and u.ref.name == name)
                    if not np.array_equal(~use.unchanged(value), mask):
                        structural = True
                        break
        if structural:
            merged = dict(self.graph.values)
            merged.update(checked)
            self._analyse(merged)
            self.reanalysed += 1
            return True
        self.graph.set_values(checked)
        check_finite(self.graph, self.analysis, names=set(checked))
        return False

    # ------------------------------------------------------------------ solving
    def solve(self, options: Optional[SolveOptions] = None, *, clock: Clock = _no_clock,
              say: Callable[..., None] = lambda step, done=None, total=None: None, **changes) -> Solution:
        """Statistics (or norms), bounds and solver on the values held now, with `options` (a
        `SolveOptions`; keywords replace its fields: `solve(solver="exact")`)."""
        chosen = SolveOptions.of(options, **changes)
        settings = chosen.settings
        criterion, backend, device = chosen.criterion, chosen.backend, chosen.device
        rule = criteria.get(criterion)
        criteria.check_bn_statistics(self.bn_statistics, criterion)
        graph, analysis, groups = self.graph, self.analysis, self.groups
        step = "statistics" if rule.needs_diag_g else "norms"
        limits = None

        def build_and_descend(precision: str):
            nonlocal limits
            def statistics(sink):
                return stats.compute_diag_g(graph, analysis, sink, backend=backend, device=device, precision=precision,
                                            progress=lambda done, total: say("statistics", done, total))

            with clock(step):
                problem, runtime = rule.build(graph, analysis, groups, statistics,
                                              progress=lambda done, total: say(step, done, total))
            with clock("solve"):
                if limits is None:
                    limits = self._bounds()
                return problem, runtime, self._descend(rule, problem, settings, criterion, limits, say)

        # float32 first where it may do (docs/design.md §2.6); float64 when its range guard
        # fails or its result cannot be proven no worse than no rescaling.
        declined = ""
        tries_float32 = chosen.precision == "auto" and rule.needs_diag_g \
            and stats.resolve_backend(backend, device) == "numpy" and stats.float32_suits(graph, analysis)
        if tries_float32 and self.float32_declined:
            declined = "an earlier solve of this plan could not prove its float32 result"
        elif tries_float32:
            try:
                problem, runtime, result = build_and_descend("float32")
                if rule.certified(problem, result, runtime.relative_error):
                    return Solution(result.u, result, problem, runtime, limits, rule, settings)
                self.float32_declined = True
                declined = (f"float32 entries (within {runtime.relative_error:.1e}) could not prove the result "
                            f"no worse than no rescaling")
            except stats.PrecisionLost as lost:
                declined = f"float32 left its range: {lost}"
        problem, runtime, result = build_and_descend("float64")
        if runtime is not None:
            runtime.float64_because = declined
        return Solution(result.u, result, problem, runtime, limits, rule, settings)

    def _bounds(self) -> bounds.Bounds:
        """The box of every group: from the stored values, and from the half-precision
        activations on the measuring inputs (measured now: they follow the values held)."""
        graph, analysis, groups = self.graph, self.analysis, self.groups
        limits = bounds.solve_bounds(graph, analysis.uses, groups)
        magnitudes = activations.measure(graph, activations.scaled_half_tensors(graph, analysis, groups))
        if magnitudes:
            bounds.add_activation_bounds(limits, graph, analysis, groups, magnitudes)
        return limits

    @staticmethod
    def _descend(rule, problem, settings, criterion, limits, say) -> solve.SolveResult:
        progress = lambda k, _: say("solve", k, settings.max_iter)  # noqa: E731
        if settings.solver == "exact":  # from the default solver's result: it can only end at or below it
            default = criteria.solver_settings(DEFAULT_SOLVER, None, None, criterion)
            start = rule.descend(problem, default.max_iter, default.tol, bounds=limits)
            result = solve.exact_minimiser(problem, max_iter=settings.max_iter, tol=settings.tol, bounds=limits,
                                           start=start.u, progress=progress)
            result.seconds += start.seconds
            return result
        return rule.descend(problem, settings.max_iter, settings.tol, progress=progress, bounds=limits)

    # ------------------------------------------------------------------ results
    def rewrite_items(self, u: np.ndarray) -> List[rewrite.TensorRescale]:
        """The stored tensors `u` changes, with their multipliers (what the rewrite applies)."""
        return rewrite.plan(self.analysis.uses, self.groups, u)

    def factors(self, u: np.ndarray) -> Dict[str, TensorFactor]:
        """Per changed initializer or Constant tensor: its element-wise factor new/old
        (exact, in float64; defined where old is zero too)."""
        return {item.name: TensorFactor(item.name, item.incoming * item.outgoing, item.offset, item.incoming,
                                        item.outgoing) for item in self.rewrite_items(u)}

    def new_values(self, u: np.ndarray) -> Dict[str, np.ndarray]:
        """Per changed tensor: its rescaled value in its own dtype, as the rewrite writes it."""
        out = {}
        for item in self.rewrite_items(u):
            old = self.graph.stored_value(item.use.ref)
            out[item.name] = rewrite.rescaled(old, item.incoming, item.outgoing, item.offset).values
        return out


def check_finite(graph: Graph, analysis, names: Optional[set] = None) -> None:
    seen = set()
    for use in analysis.uses:
        if use.ref is None or use.ignored or use.ref.name in seen or (names is not None and use.ref.name not in names):
            continue
        seen.add(use.ref.name)
        value = graph.stored_value(use.ref)
        if value.dtype.kind == "f" or value.dtype.name == "bfloat16":
            if value.dtype.name == "bfloat16":
                value = value.astype(np.float32)
            # A sum is finite exactly when every element is (a NaN or an infinity propagates),
            # short of the sum's overflow (float32 weights summing past 3.4e38): then each
            # element is checked. The sum runs in the tensor's own dtype, float32 for half
            # precision (VGG-16: 0.13 → 0.10 s, warm, against a float64 sum of its float32),
            # and makes no array as large as the tensor.
            with np.errstate(over="ignore", invalid="ignore"):
                total = value.sum(dtype=np.float32 if value.dtype.itemsize < 4 else None)
            if not np.isfinite(total) and not np.all(np.isfinite(value)):
                raise ModelError(f"parameter '{use.ref.name}' contains NaN or Inf values")


def _check_not_empty(analysis) -> None:
    """A parameter on a path with a dimension of size 0 makes a layer of no channel (or one
    that reads none): the path statistics have nothing to sum over. Said here, by name,
    rather than failing inside them."""
    for use in analysis.uses:
        if not use.ignored and 0 in use.view_shape:
            name = use.ref.name if use.ref is not None else use.input_name
            raise ModelError(f"parameter '{name}' of {use.node.op_type} '{node_label(use.node)}' has shape "
                             f"{list(use.view_shape)}: a dimension of size 0 (an empty tensor) is not supported")
